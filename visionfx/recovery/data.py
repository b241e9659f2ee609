"""Image data for recovery and the reference recipe: decoded once to uint8 tensors, augmented on the device.

Two sources give the same thing, batches of ``uint8 [B, 3, H, W]`` images and ``int64 [B]`` labels on the device:

- :class:`TensorSource`: the whole split as one uint8 tensor (moved to the GPU once). An archive
  (``.tar``, ``.tar.gz``, ``.tar.xz``, ...) laid out as ``<root>/<split>/<class>/<image>`` (CIFAR-10 from
  ``/work/shared/data/cifar10.tar.xz``) is decoded **once** by :func:`load_archive_cache` into a ``.pt`` cache file
  in a cache directory; later runs load that file (a fraction of a second for CIFAR-10).
- :class:`FolderSource`: a directory in the same layout, streamed by torchvision's ``ImageFolder`` (decoded and
  resized on CPU workers, still uint8), for data too large to hold as one tensor.

:class:`GpuAugment` then does the augmentation (random crop with zero padding, horizontal flip, optionally mixup /
cutmix) and the normalisation on the device, so that the accelerator, not the CPU, is the bottleneck.

Decisions:

- **Determinism without loader state.** Training batches are a pure function of ``(seed, batch index)``: the
  permutation of epoch ``e`` comes from a generator seeded with ``(seed, e)`` and the augmentation of batch ``i``
  from one seeded with ``(seed, i)``. Resuming at batch ``i`` therefore needs only ``i``; nothing else is saved.
- **Several processes.** ``batch_size`` is per process; process ``r`` of ``w`` takes slice ``r`` of each global batch
  of ``w·batch_size`` images. Evaluation splits the held-out set by stride, without padding.
- **Class indices** are the positions of the class folder names in sorted order (for CIFAR-10 the standard order
  airplane, automobile, ..., truck). ``limit_per_class`` keeps the first images of each class in archive order
  (tests decode a subset this way); kept images are then sorted by path.
- **Normalisation statistics** of an archive are the per-channel mean and standard deviation of its (kept) training
  images, computed when the cache is built; a model checkpoint that records its own statistics overrides them.
- Images whose size differs from ``image_size`` are resized (shorter side) and centre-cropped when decoded.
"""

from __future__ import annotations

import io
import math
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "IMAGENET_MEAN", "IMAGENET_STD", "decode_archive", "load_archive_cache",
    "cache_path", "TensorSource", "FolderSource", "ImageData", "load_image_data", "tensor_data", "GpuAugment",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CACHE_FORMAT = 1
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2")


def _seed(*parts: int) -> int:
    """A 63-bit seed mixing integers (stable across runs and processes)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


# ---------------------------------------------------------------------------------------------------- archive cache


def is_archive(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(_ARCHIVE_SUFFIXES)


def _split_member(name: str) -> tuple[str, str] | None:
    """``root/<split>/<class>/<file>`` -> ``(split, class)``; None for anything else."""
    parts = name.split("/")
    if len(parts) < 4 or not parts[-1].lower().endswith(IMAGE_SUFFIXES) or parts[-1].startswith("."):
        return None
    return parts[-3], parts[-2]


def _decode(data: bytes, image_size: int | None) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if image_size is not None and im.size != (image_size, image_size):
            w, h = im.size
            s = image_size / min(w, h)
            im = im.resize((max(image_size, round(w * s)), max(image_size, round(h * s))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - image_size) // 2, (h - image_size) // 2
            im = im.crop((left, top, left + image_size, top + image_size))
        return np.asarray(im, dtype=np.uint8).copy()


def decode_archive(path: str | os.PathLike, *, image_size: int | None = None, limit_per_class: int | None = None,
                   workers: int | None = None, progress: bool = False) -> dict:
    """Decode an image archive laid out as ``<root>/<split>/<class>/<image>`` into uint8 tensors.

    Args:
        path: a tar archive (any compression ``tarfile`` reads).
        image_size: side of the square images to produce (``None``: keep the archive's size, which must be uniform).
        limit_per_class: keep at most this many images per (split, class), the first in archive order.
        workers: decoding threads (default: up to 8).
        progress: show a progress bar.

    Returns:
        ``{"classes": [...], "counts": {split: images found}, "class_counts": {split: {class: found}},
        "splits": {split: {"images": uint8 [N, 3, H, W], "labels": int64 [N], "names": [N paths]}},
        "mean": (3,), "std": (3,)}``, splits sorted by path.
    """
    path = Path(path)
    found: dict[str, dict[str, int]] = {}
    kept: dict[str, list[tuple[str, str, bytes]]] = {}
    bar = _bar(progress, f"reading {path.name}")
    with tarfile.open(path, "r|*") as tf:
        for member in tf:
            where = _split_member(member.name) if member.isfile() else None
            if where is None:
                continue
            split, cls = where
            n = found.setdefault(split, {}).get(cls, 0)
            found[split][cls] = n + 1
            if limit_per_class is None or n < limit_per_class:
                kept.setdefault(split, []).append((member.name, cls, tf.extractfile(member).read()))
            bar.update(1)
    bar.close()
    if not kept:
        raise ValueError(f"{path}: no images in the layout <root>/<split>/<class>/<image>")
    classes = sorted({c for per in found.values() for c in per})
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        for split, items in sorted(kept.items()):
            items.sort(key=lambda t: t[0])
            arrays = list(pool.map(lambda t: _decode(t[2], image_size), items, chunksize=256))
            shapes = {a.shape for a in arrays}
            if len(shapes) != 1:
                raise ValueError(f"{path}: images of different sizes {sorted(shapes)[:4]}; pass image_size=")
            images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
            labels = torch.tensor([index[c] for _, c, _ in items], dtype=torch.long)
            splits[split] = {"images": images, "labels": labels, "names": [n for n, _, _ in items]}
    train = splits.get("train", next(iter(splits.values())))["images"]
    mean, std = _channel_stats(train)
    return {"classes": classes, "counts": {s: sum(c.values()) for s, c in found.items()}, "class_counts": found,
            "splits": splits, "mean": mean, "std": std}


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    s = torch.zeros(3, dtype=torch.float64)
    s2 = torch.zeros(3, dtype=torch.float64)
    for chunk in images.split(4096):
        x = chunk.double() / 255
        s += x.sum((0, 2, 3))
        s2 += (x * x).sum((0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(0).sqrt()
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def cache_path(path: str | os.PathLike, cache_dir: str | os.PathLike, *, image_size: int | None = None,
               limit_per_class: int | None = None) -> Path:
    """Where :func:`load_archive_cache` keeps the decoded archive ``path``."""
    stem = Path(path).name
    for suffix in sorted(_ARCHIVE_SUFFIXES, key=len, reverse=True):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    tags = "".join([f"-s{image_size}" if image_size else "", f"-limit{limit_per_class}" if limit_per_class else ""])
    return Path(cache_dir) / f"{stem}-uint8{tags}.pt"


def load_archive_cache(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *,
                       image_size: int | None = None, limit_per_class: int | None = None, rebuild: bool = False,
                       progress: bool = True) -> dict:
    """The decoded archive (see :func:`decode_archive`), from its cache file or decoded now and cached.

    The cache is rebuilt when the archive's size or modification time changed. With several processes, call it
    under ``accelerator.main_process_first()`` so that one process decodes and the others read the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"archive not found: {path}")
    stat = path.stat()
    source = {"name": path.name, "size": stat.st_size, "mtime": int(stat.st_mtime)}
    target = cache_path(path, cache_dir or path.parent, image_size=image_size, limit_per_class=limit_per_class)
    if target.is_file() and not rebuild:
        cached = torch.load(target, weights_only=True)
        if cached.get("format") == CACHE_FORMAT and cached.get("source") == source:
            return cached
    data = decode_archive(path, image_size=image_size, limit_per_class=limit_per_class, progress=progress)
    data.update(format=CACHE_FORMAT, source=source, limit_per_class=limit_per_class)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    torch.save(data, tmp)
    os.replace(tmp, target)
    return data


# ---------------------------------------------------------------------------------------------------------- sources


class TensorSource:
    """A split held as one tensor: ``images uint8 [N, 3, H, W]`` and ``labels int64 [N]`` (or None: unlabeled)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels is not None and labels.shape != images.shape[:1]:
            raise ValueError(f"labels must be [N] = [{images.shape[0]}], got {tuple(labels.shape)}")
        self.images = images
        self.labels = None if labels is None else labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[2:])

    def to(self, device) -> "TensorSource":
        """This split on ``device`` (a copy when it moves)."""
        labels = None if self.labels is None else self.labels.to(device)
        return TensorSource(self.images.to(device), labels)

    def batches_per_epoch(self, batch_size: int, world: int = 1) -> int:
        n = len(self) // (batch_size * world)
        if n == 0:
            raise ValueError(f"{len(self)} images cannot fill one global batch of {batch_size} x {world} processes")
        return n

    def train_batches(self, batch_size: int, *, seed: int = 0, start: int = 0, rank: int = 0, world: int = 1,
                      device=None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Endless shuffled batches from global batch index ``start`` on (the last partial batch of an epoch is
        dropped): ``(uint8 [B, 3, H, W], int64 [B] or None)`` on ``device`` (default: where the images are)."""
        per_epoch = self.batches_per_epoch(batch_size, world)
        device = device or self.images.device
        i, perm_epoch, perm = start, None, None
        while True:
            epoch, pos = divmod(i, per_epoch)
            if epoch != perm_epoch:
                g = torch.Generator().manual_seed(_seed(seed, epoch))
                perm = torch.randperm(len(self), generator=g).to(self.images.device)
                perm_epoch = epoch
            lo = (pos * world + rank) * batch_size
            idx = perm[lo: lo + batch_size]
            yield self.images[idx].to(device, non_blocking=True), _take(self.labels, idx, device)
            i += 1

    def eval_batches(self, batch_size: int, *, rank: int = 0, world: int = 1,
                     device=None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """One pass in order over this process's share (every ``world``-th image from ``rank``)."""
        device = device or self.images.device
        idx_all = torch.arange(rank, len(self), world, device=self.images.device)
        for idx in idx_all.split(batch_size):
            yield self.images[idx].to(device, non_blocking=True), _take(self.labels, idx, device)


def _take(labels, idx, device):
    return None if labels is None else labels[idx].to(device, non_blocking=True)


class FolderSource:
    """A split streamed from a folder ``<split>/<class>/<image>`` (torchvision ``ImageFolder``), decoded to uint8
    ``[3, S, S]`` (shorter side resized to ``image_size``, centre crop) by ``workers`` CPU processes."""

    def __init__(self, root: str | os.PathLike, image_size: int, workers: int = 8,
                 classes: Sequence[str] | None = None):
        from torchvision import datasets, transforms

        tf = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size),
                                 transforms.PILToTensor()])
        self.dataset = datasets.ImageFolder(str(root), transform=tf)
        if classes is not None and list(self.dataset.classes) != list(classes):
            raise ValueError(f"{root}: classes {self.dataset.classes[:5]}... differ from the training split's")
        self.workers = workers
        self._size = (image_size, image_size)
        self.labels = torch.tensor(self.dataset.targets)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def image_size(self) -> tuple[int, int]:
        return self._size

    def to(self, device) -> "FolderSource":
        return self

    batches_per_epoch = TensorSource.batches_per_epoch

    def _loader(self, batches: list[list[int]]):
        from torch.utils.data import DataLoader

        return DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=False)

    def train_batches(self, batch_size: int, *, seed: int = 0, start: int = 0, rank: int = 0, world: int = 1,
                      device=None):
        per_epoch = self.batches_per_epoch(batch_size, world)
        epoch, pos = divmod(start, per_epoch)
        while True:
            perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(_seed(seed, epoch))).tolist()
            batches = [perm[(p * world + rank) * batch_size:(p * world + rank + 1) * batch_size]
                       for p in range(pos, per_epoch)]
            for x, y in self._loader(batches):
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            epoch, pos = epoch + 1, 0

    def eval_batches(self, batch_size: int, *, rank: int = 0, world: int = 1, device=None):
        idx = list(range(rank, len(self), world))
        for x, y in self._loader([idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]):
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@dataclass
class ImageData:
    """A training split, an optional held-out split, and what the model needs to read them."""

    train: TensorSource | FolderSource
    eval: TensorSource | FolderSource | None
    classes: list[str] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def num_classes(self) -> int | None:
        return None if self.classes is None else len(self.classes)

    def to(self, device) -> "ImageData":
        return ImageData(self.train.to(device), None if self.eval is None else self.eval.to(device), self.classes,
                         self.mean, self.std)


def tensor_data(images: torch.Tensor, labels: torch.Tensor | None = None, eval_images: torch.Tensor | None = None,
                eval_labels: torch.Tensor | None = None, *, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                classes: Sequence[str] | None = None) -> ImageData:
    """:class:`ImageData` from uint8 tensors ``[N, 3, H, W]`` (labels ``[N]`` optional)."""
    ev = None if eval_images is None else TensorSource(eval_images, eval_labels)
    return ImageData(TensorSource(images, labels), ev, None if classes is None else list(classes), tuple(mean),
                     tuple(std))


def load_image_data(path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                    train_split: str = "train", eval_split: str | None = None, image_size: int | None = None,
                    limit_per_class: int | None = None, workers: int = 8, progress: bool = True) -> ImageData:
    """Training and held-out data from an archive (decoded once, cached in ``cache_dir``) or a folder.

    Args:
        path: an archive or folder laid out as ``<root>/<split>/<class>/<image>`` (for an archive, ``<root>`` may be
            any single folder, e.g. ``cifar10/``; a folder is that root itself).
        cache_dir: where the decoded archive is kept (default: beside the archive; must be writable).
        train_split, eval_split: split names (``eval_split`` default: ``test``, else ``val``, else none).
        image_size: square image side (required for folders; archives keep their size unless given).
        limit_per_class: archives only: keep at most this many images per class and split (tests, smoke runs).
    """
    path = Path(path)
    if is_archive(path):
        cache = load_archive_cache(path, cache_dir, image_size=image_size, limit_per_class=limit_per_class,
                                   progress=progress)
        splits = cache["splits"]
        if train_split not in splits:
            raise ValueError(f"{path}: no split {train_split!r}; splits: {sorted(splits)}")
        eval_split = eval_split or next((s for s in ("test", "val") if s in splits), None)
        if eval_split is not None and eval_split not in splits:
            raise ValueError(f"{path}: no split {eval_split!r}; splits: {sorted(splits)}")
        tr = splits[train_split]
        ev = splits[eval_split] if eval_split else None
        return ImageData(TensorSource(tr["images"], tr["labels"]),
                         None if ev is None else TensorSource(ev["images"], ev["labels"]),
                         list(cache["classes"]), tuple(cache["mean"]), tuple(cache["std"]))
    if not path.is_dir():
        raise FileNotFoundError(f"data not found: {path} (an archive or a folder <split>/<class>/<image>)")
    if image_size is None:
        raise ValueError("a data folder needs image_size= (images are resized and centre-cropped to it)")
    if limit_per_class is not None:
        raise ValueError("limit_per_class applies to archives only")
    train = FolderSource(path / train_split, image_size, workers)
    eval_split = eval_split or next((s for s in ("test", "val") if (path / s).is_dir()), None)
    ev = FolderSource(path / eval_split, image_size, workers, train.dataset.classes) if eval_split else None
    return ImageData(train, ev, list(train.dataset.classes), IMAGENET_MEAN, IMAGENET_STD)


# ---------------------------------------------------------------------------------------------------- augmentation


class GpuAugment:
    """Augmentation and normalisation on the images' device.

    ``augment(x, y, step)``: ``x uint8 [B, 3, H, W]``, ``y int64 [B]`` or None ->
    ``(float32 [B, 3, H, W] normalised, targets)`` where targets are ``y`` unchanged, or soft ``float32 [B, K]``
    when mixup/cutmix mixed the batch, or None. Random choices are a function of ``(seed, step)`` only.

    Args:
        mean, std: per-channel normalisation (of ``x / 255``).
        crop_padding: random crop of the original size from the image zero-padded by this many pixels (0: off).
        flip: random horizontal flip with probability 1/2.
        mixup_alpha, cutmix_alpha: Beta parameters (0: off); with both on, each mixed batch picks one at random.
        mix_prob: probability that a batch is mixed (pairs are the batch and its reverse, as in timm).
        num_classes: needed for soft targets when mixing labelled batches.
    """

    def __init__(self, mean, std, *, crop_padding: int = 4, flip: bool = True, mixup_alpha: float = 0.0,
                 cutmix_alpha: float = 0.0, mix_prob: float = 1.0, num_classes: int | None = None, seed: int = 0):
        if crop_padding < 0 or mixup_alpha < 0 or cutmix_alpha < 0 or not 0 <= mix_prob <= 1:
            raise ValueError("crop_padding, mixup_alpha and cutmix_alpha must be >= 0 and mix_prob in [0, 1]")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.crop_padding, self.flip = int(crop_padding), bool(flip)
        self.mixup_alpha, self.cutmix_alpha, self.mix_prob = float(mixup_alpha), float(cutmix_alpha), float(mix_prob)
        self.num_classes, self.seed = num_classes, int(seed)

    @property
    def mixes(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mix_prob > 0

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``uint8 [B, 3, H, W]`` -> normalised ``float32 [B, 3, H, W]``."""
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x.float() / 255 - mean) / std

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None, step: int = 0):
        g = torch.Generator(device=x.device).manual_seed(_seed(self.seed, step, 1))
        if self.crop_padding:
            x = self._crop(x, g)
        if self.flip:
            flip = torch.rand(x.shape[0], generator=g, device=x.device) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        x = self.normalize(x)
        if self.mixes:
            x, y = self._mix(x, y, np.random.default_rng(_seed(self.seed, step, 2)))
        return x, y

    def _crop(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        B, _, H, W = x.shape
        p = self.crop_padding
        padded = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (B,), generator=g, device=x.device)
        dx = torch.randint(0, 2 * p + 1, (B,), generator=g, device=x.device)
        rows = (dy[:, None] + torch.arange(H, device=x.device))[:, :, None]  # [B, H, 1]
        cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, :]  # [B, 1, W]
        b = torch.arange(B, device=x.device)[:, None, None]
        return padded[b, :, rows, cols].permute(0, 3, 1, 2).contiguous()  # [B, H, W, 3] -> [B, 3, H, W]

    def _mix(self, x, y, rng):
        if rng.random() >= self.mix_prob:
            return x, y
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or rng.random() < 0.5)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        x2 = x.flip(0)
        if use_cutmix:
            H, W = x.shape[2:]
            ch, cw = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
            cy, cx = int(rng.integers(H)), int(rng.integers(W))
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
            x = x.clone()
            x[:, :, y0:y1, x0:x1] = x2[:, :, y0:y1, x0:x1]
            lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
        else:
            x = lam * x + (1 - lam) * x2
        if y is None:
            return x, None
        if self.num_classes is None:
            raise ValueError("GpuAugment: mixing labelled batches needs num_classes")
        if y.dim() == 1:
            y = F.one_hot(y, self.num_classes).float()
        return x, lam * y + (1 - lam) * y.flip(0)


def _bar(enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(desc=desc, unit="img", disable=not enabled, leave=False)
