"""ImageNet validation of timm models, patched or not: top-1, top-5, images/s, parameter count.

Results use the keys and units of timm's ``validate.py`` (``model, top1, top1_err, top5, top5_err, param_count,
img_size, crop_pct, interpolation``: accuracies in percent rounded to 4 places, ``param_count`` in millions rounded
to 2), so existing result tables and scripts read them.

Labels: class index = position of the folder's wnid in the full class list (``synset_words.txt`` or a plain wnid per
line; the first whitespace-separated token of each line is the wnid). A partial validation folder (some classes
missing) therefore keeps the 1000-class numbering that the model's classifier uses, where an ``ImageFolder`` would
renumber the classes it finds.

Choices the docs leave open:
- The class list is looked for as ``synset_words.txt``, ``LOC_synset_mapping.txt`` or ``wnids.txt`` in the data folder
  and then in its parent; without one, a folder with exactly 1000 class folders uses their sorted names (the same
  order), and anything else is an error asking for the list (renumbering would silently corrupt the labels).
- Images are the files with an image extension (case-insensitive) directly inside each class folder, sorted by path;
  ``limit`` keeps the first N of that order.
- images/s is end-to-end throughput (data loading included, as timm's reported rate) over the whole run, all
  processes together; the CSV holds timm's columns followed by ``method``, ``images`` and ``images_per_sec``.
- Several processes (``accelerate launch``): the loader is sharded by :class:`accelerate.Accelerator`, predictions
  are gathered with ``gather_for_metrics`` (the padding of the last batch is dropped), and every process returns the
  same result.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "CLASS_LIST_NAMES",
    "TIMM_COLUMNS",
    "CSV_COLUMNS",
    "read_class_list",
    "find_class_list",
    "WnidImageFolder",
    "create_timm_model",
    "apply_method",
    "evaluate_imagenet",
    "results_row",
    "write_csv",
    "write_json",
    "format_summary",
]

CLASS_LIST_NAMES = ("synset_words.txt", "LOC_synset_mapping.txt", "wnids.txt")
TIMM_COLUMNS = ("model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size", "crop_pct",
                "interpolation")
CSV_COLUMNS = TIMM_COLUMNS + ("method", "images", "images_per_sec")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def read_class_list(path: str | os.PathLike) -> list[str]:
    """The wnids of a ``synset_words.txt`` (``"n01440764 tench, Tinca tinca"``) or a wnid-per-line file, in order."""
    wnids = [line.split()[0] for line in Path(path).read_text().splitlines() if line.strip()]
    if not wnids:
        raise ValueError(f"{path}: no class ids found")
    if len(set(wnids)) != len(wnids):
        raise ValueError(f"{path}: duplicate class ids")
    return wnids


def find_class_list(data_dir: str | os.PathLike) -> Path | None:
    """The class-list file next to a validation folder (in it, then in its parent), or ``None``."""
    data_dir = Path(data_dir)
    for folder in (data_dir, data_dir.parent):
        for name in CLASS_LIST_NAMES:
            if (folder / name).is_file():
                return folder / name
    return None


def _resolve_classes(data_dir: Path, classes: Sequence[str] | str | os.PathLike | None,
                     folders: list[str]) -> list[str]:
    if classes is None:
        found = find_class_list(data_dir)
        if found is not None:
            return read_class_list(found)
        if len(folders) == 1000:
            return sorted(folders)
        raise ValueError(
            f"{data_dir} holds {len(folders)} class folders and no class list ({', '.join(CLASS_LIST_NAMES)}) was "
            "found next to it; give the full list (e.g. synset_words.txt) so labels keep the 1000-class numbering")
    if isinstance(classes, (str, os.PathLike)):
        return read_class_list(classes)
    return list(classes)


class WnidImageFolder(Dataset):
    """``root/<wnid>/<image>`` with labels taken from a fixed class list, not from the folders present.

    Items are ``(image, target, index)``: the transformed image, the class index (position of the folder's wnid in
    ``classes``) and the sample index (position in :attr:`samples`).

    Args:
        root: the validation folder.
        classes: the full class list (wnids), a path to one, or ``None`` to look for it (:func:`find_class_list`).
        transform: applied to the RGB ``PIL.Image``.
        limit: keep only the first ``limit`` images (sorted by path).
    """

    def __init__(self, root: str | os.PathLike, classes=None, transform=None, limit: int | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"validation folder not found: {self.root}")
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not folders:
            raise ValueError(f"{self.root} has no class folders (expected root/<wnid>/<image>)")
        self.classes = _resolve_classes(self.root, classes, folders)
        index = {w: i for i, w in enumerate(self.classes)}
        unknown = [f for f in folders if f not in index]
        if unknown:
            raise ValueError(f"{len(unknown)} folders of {self.root} are not in the class list "
                             f"({len(self.classes)} classes): {unknown[:5]}")
        samples = []
        for wnid in folders:
            files = sorted(p for p in (self.root / wnid).iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            samples.extend((str(p), index[wnid]) for p in files)
        if limit is not None:
            samples = samples[:limit]
        if not samples:
            raise ValueError(f"no images found under {self.root}")
        self.samples = samples
        self.targets = [t for _, t in samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        path, target = self.samples[i]
        with Image.open(path) as img:
            img = img.convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, target, i


def create_timm_model(name: str, pretrained: bool = False, checkpoint: str | os.PathLike | None = None,
                      img_size: int | None = None, **kwargs) -> nn.Module:
    """A timm model in eval mode: random weights, timm's pretrained weights, or a local checkpoint file.

    A checkpoint is loaded the timm way, ``pretrained_cfg_overlay=dict(file=checkpoint)``: timm's own filters
    (position-embedding resampling, ``state_dict``/``model``/EMA keys, ``.safetensors``) apply and loading is strict.
    """
    import timm

    if pretrained and checkpoint:
        raise ValueError("give pretrained or checkpoint, not both")
    if img_size is not None:
        kwargs["img_size"] = img_size
    if checkpoint:
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
        kwargs["pretrained_cfg_overlay"] = dict(file=str(checkpoint))
        pretrained = True
    return timm.create_model(name, pretrained=pretrained, **kwargs).eval()


def apply_method(model: nn.Module, method: str | None = None, config: str | os.PathLike | None = None,
                 options: dict[str, Any] | None = None, patched: str | os.PathLike | None = None) -> dict | None:
    """Patch ``model`` with visionfx: a method name and/or YAML recipe with option overrides, or a
    ``save_pretrained`` directory. Returns ``{"method", "config"}`` for the report (``None`` if unpatched)."""
    import visionfx
    from visionfx.config import config_to_dict, load_config

    options = dict(options or {})
    if patched is not None:
        if config is not None or options:
            raise ValueError("a save_pretrained directory carries its own config: give it without config or options")
        visionfx.load_pretrained(model, patched)
        cfg = visionfx.get_config(model)
        if method is not None and type(cfg).method != method:
            raise ValueError(f"{patched} holds a {type(cfg).method!r} patch, not {method!r}")
    elif config is not None:
        cfg = load_config(config, **options)
        if method is not None and type(cfg).method != method:
            raise ValueError(f"{config} is a {type(cfg).method!r} recipe, not {method!r}")
        visionfx.patch(model, cfg)
    elif method is not None:
        visionfx.patch(model, method, **options)
    else:
        if options:
            raise ValueError(f"method options {sorted(options)} given without a method")
        return None
    cfg = visionfx.get_config(model)
    return {"method": type(cfg).method, "config": config_to_dict(cfg)}


def _accuracy_counts(logits: torch.Tensor, target: torch.Tensor, topk: int = 5) -> torch.Tensor:
    """``[B]`` rank of the target among the top-k logits (k when absent): top-1 hit is rank 0, top-5 hit rank < 5."""
    k = min(topk, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    hit = top == target[:, None]
    return torch.where(hit.any(-1), hit.float().argmax(-1), torch.full_like(target, topk)).to(torch.long)


def evaluate_imagenet(
    model: nn.Module,
    data_dir: str | os.PathLike,
    *,
    classes: Sequence[str] | str | os.PathLike | None = None,
    data_config: dict | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    amp: bool = False,
    amp_dtype: torch.dtype = torch.bfloat16,
    limit: int | None = None,
    num_workers: int = 0,
    progress: bool = True,
    accelerator=None,
    model_name: str | None = None,
) -> dict[str, Any]:
    """Top-1 / top-5 accuracy of ``model`` on an ImageNet-style validation folder.

    Args:
        model: maps ``[B, 3, H, W]`` images to ``[B, num_classes]`` logits (class order of ``classes``).
        data_dir: ``data_dir/<wnid>/<image>``, possibly a subset of the classes.
        classes: full class list, its file, or ``None`` (see :class:`WnidImageFolder`).
        data_config: timm data config (``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``,
            ``crop_mode``); ``None`` resolves it from the model (``timm.data.resolve_data_config``).
        batch_size: images per forward, per process.
        device: where to run; ``None`` is the accelerator's device (CUDA if present).
        amp: run the forward under ``torch.autocast`` with ``amp_dtype``.
        limit: evaluate the first ``limit`` images only.
        accelerator: an ``accelerate.Accelerator`` (one is made if ``None``).

    Returns:
        ``{"model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size", "crop_pct",
        "interpolation", "images", "correct_top1", "correct_top5", "images_per_sec", "seconds", "num_params",
        "num_classes", "num_processes", "device", "amp", "data_dir", "data_config"}``; accuracies in percent.
    """
    from accelerate import Accelerator
    from timm.data import create_transform, resolve_data_config
    from tqdm.auto import tqdm

    accelerator = accelerator or Accelerator(cpu=device is not None and torch.device(device).type == "cpu")
    device = torch.device(device) if device is not None else accelerator.device
    if data_config is None:
        data_config = resolve_data_config(model=model)
    data_config = dict(data_config)
    transform = create_transform(**{k: v for k, v in data_config.items()
                                    if k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")},
                                 is_training=False)
    dataset = WnidImageFolder(data_dir, classes=classes, transform=transform, limit=limit)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    loader = accelerator.prepare_data_loader(loader, device_placement=False)

    model = model.eval().to(device)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp else nullcontext()
    ranks, seen = [], []
    bar = tqdm(total=len(dataset), desc="imagenet", unit="img", disable=not progress or not accelerator.is_main_process)
    start = time.perf_counter()
    with torch.inference_mode():
        for images, target, index in loader:
            images, target = images.to(device, non_blocking=True), target.to(device)
            with autocast:
                logits = model(images)
            if logits.shape[-1] != len(dataset.classes):
                raise ValueError(f"the model predicts {logits.shape[-1]} classes but the class list has "
                                 f"{len(dataset.classes)}")
            rank, index = accelerator.gather_for_metrics((_accuracy_counts(logits.float(), target), index.to(device)))
            ranks.append(rank.cpu())
            seen.append(index.cpu())
            bar.update(rank.numel())
    seconds = time.perf_counter() - start
    bar.close()
    ranks, seen = torch.cat(ranks), torch.cat(seen)
    if seen.numel() != len(dataset) or not torch.equal(seen.sort().values, torch.arange(len(dataset))):
        raise RuntimeError(f"gathered {seen.numel()} predictions for {len(dataset)} images")
    n = ranks.numel()
    c1, c5 = int((ranks == 0).sum()), int((ranks < 5).sum())
    top1, top5 = 100.0 * c1 / n, 100.0 * c5 / n
    num_params = sum(p.numel() for p in model.parameters())
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {
        "model": model_name or cfg.get("architecture") or type(model).__name__,
        "top1": round(top1, 4), "top1_err": round(100 - top1, 4),
        "top5": round(top5, 4), "top5_err": round(100 - top5, 4),
        "param_count": round(num_params / 1e6, 2),
        "img_size": data_config["input_size"][-1],
        "crop_pct": data_config.get("crop_pct"),
        "interpolation": data_config.get("interpolation"),
        "images": n, "correct_top1": c1, "correct_top5": c5,
        "images_per_sec": round(n / seconds, 2) if seconds > 0 else math.inf, "seconds": round(seconds, 3),
        "num_params": num_params, "num_classes": len(dataset.classes),
        "num_processes": accelerator.num_processes, "device": str(device), "amp": bool(amp),
        "data_dir": str(data_dir), "data_config": {k: list(v) if isinstance(v, tuple) else v
                                                   for k, v in data_config.items()},
    }


def results_row(result: dict[str, Any], method: str | None = None) -> dict[str, Any]:
    """The CSV row: timm's ``validate.py`` columns, then ``method``, ``images`` and ``images_per_sec``."""
    row = {k: result[k] for k in TIMM_COLUMNS}
    row.update(method=method or result.get("method") or "none", images=result["images"],
               images_per_sec=result["images_per_sec"])
    return row


def write_csv(path: str | os.PathLike, row: dict[str, Any]) -> Path:
    """Append ``row`` to a CSV file, writing the header first if the file is new or empty. An existing file with
    other columns is an error (rows must line up)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(row)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header != columns:
            raise ValueError(f"{path} has columns {header}, not {columns}; write to a new file")
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerow(row)
    return path


def write_json(path: str | os.PathLike, result: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def format_summary(result: dict[str, Any]) -> str:
    """A two-column table of the main numbers, for the screen."""
    from visionfx.utils import format_table

    rows = [
        ["model", result["model"]],
        ["method", result.get("method") or "none"],
        ["images", f"{result['images']:,} ({result['num_classes']} classes in the label space)"],
        ["top-1", f"{result['top1']:.3f}%  ({result['correct_top1']:,} correct)"],
        ["top-5", f"{result['top5']:.3f}%  ({result['correct_top5']:,} correct)"],
        ["params", f"{result['num_params']:,} ({result['param_count']:.2f} M)"],
        ["input", f"{result['img_size']} px, crop_pct {result['crop_pct']}, {result['interpolation']}"],
        ["throughput", f"{result['images_per_sec']:,.1f} images/s over {result['num_processes']} process(es), "
                       f"{result['device']}{', amp' if result['amp'] else ''}"],
    ]
    return format_table(["", "value"], rows)
