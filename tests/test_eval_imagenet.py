"""``visionfx eval imagenet`` on a slice of the shared ImageNet validation sample (CPU, tiny inputs).

Oracles: labels computed here from ``synset_words.txt`` and the folder names (position of the wnid in the full
list); a stub model that recognises each image by its pixels (a fingerprint of the transformed tensor, computed
here from the files) and answers with those labels; counts taken from the folder on disk.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from torch import nn

from visionfx.evaluation.cli import COMMAND
from visionfx.evaluation.imagenet import (CSV_COLUMNS, TIMM_COLUMNS, WnidImageFolder, create_timm_model,
                                          evaluate_imagenet, results_row, write_csv, write_json)

ARCHIVE = Path("/work/shared/data/imagenet-val-sample.tar.xz")
TENCH = "n01440764"  # class 0
FIRST_CLASSES = 12  # whole class folders taken from the start of the archive
TENCH_IMAGES = 8
CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406),
          "std": (0.229, 0.224, 0.225), "crop_pct": 0.875, "crop_mode": "center"}


@pytest.fixture(scope="session")
def imagenet(tmp_path_factory) -> Path:
    """``root/synset_words.txt`` + ``root/val/<wnid>/*.JPEG``: the first class folders of the archive and a few
    images of class 0, streamed (the archive is read only as far as needed)."""
    if not ARCHIVE.is_file():
        pytest.skip(f"{ARCHIVE} not available")
    root = tmp_path_factory.mktemp("imagenet")
    classes: list[str] = []
    tench = 0
    with tarfile.open(ARCHIVE, "r|xz") as tar:
        for m in tar:
            parts = m.name.split("/")
            if m.isfile() and parts[-1] == "synset_words.txt":
                tar.extract(m, root, filter="data")
            elif m.isfile() and len(parts) == 4:
                wnid = parts[2]
                if wnid == TENCH:
                    if tench < TENCH_IMAGES:
                        tar.extract(m, root, filter="data")
                        tench += 1
                    continue
                if wnid not in classes and len(classes) < FIRST_CLASSES:
                    classes.append(wnid)
                if wnid in classes:
                    tar.extract(m, root, filter="data")
                elif tench >= TENCH_IMAGES:
                    break
    return root / "imagenet-val-sample"


def oracle_labels(root: Path) -> dict[str, int]:
    wnids = [line.split()[0] for line in (root / "synset_words.txt").read_text().splitlines()]
    return {str(p): wnids.index(p.parent.name) for p in sorted((root / "val").glob("*/*.JPEG"))}


def fingerprint(x: torch.Tensor) -> str:
    return hashlib.sha1(torch.round(x.float() * 1000).to(torch.int32).numpy().tobytes()).hexdigest()


class PixelOracle(nn.Module):
    """Logits [B, 1000] from a per-image table: ``mode="true"`` puts the image's label first, ``"second"`` second
    (class ``(label + 1) % 1000`` first), ``"zero"`` always ranks classes 0 > 1 > 2 ...; unknown images fail."""

    def __init__(self, table: dict[str, int], mode: str = "true"):
        super().__init__()
        self.table, self.mode = table, mode
        self.weight = nn.Parameter(torch.zeros(3))  # a parameter, so the model has a device and a count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = -torch.arange(1000, dtype=torch.float32).repeat(x.shape[0], 1)
        if self.mode == "zero":
            return logits
        logits = torch.zeros(x.shape[0], 1000)
        for b in range(x.shape[0]):
            label = self.table[fingerprint(x[b])]
            logits[b, label] = 2.0
            if self.mode == "second":
                logits[b, (label + 1) % 1000] = 3.0
        return logits


@pytest.fixture(scope="module")
def table(imagenet) -> dict[str, int]:
    from PIL import Image
    from timm.data import create_transform

    transform = create_transform(**CONFIG, is_training=False)
    out = {}
    for path, label in oracle_labels(imagenet).items():
        with Image.open(path) as img:
            out[fingerprint(transform(img.convert("RGB")))] = label
    assert len(out) == len(oracle_labels(imagenet)), "two images share a fingerprint"
    return out


def evaluate(model, imagenet, **kw):
    return evaluate_imagenet(model, imagenet / "val", data_config=CONFIG, batch_size=8, device="cpu",
                             progress=False, **kw)


def test_slice_is_partial_and_non_trivial(imagenet):
    labels = oracle_labels(imagenet)
    folders = sorted({Path(p).parent.name for p in labels})
    assert len(folders) == FIRST_CLASSES + 1 and 0 in labels.values()
    # An ImageFolder on this slice would number classes 0..12; the true labels are spread over 0..999.
    assert any(labels[p] != folders.index(Path(p).parent.name) for p in labels)


def test_true_labels_score_100_and_counts_match(imagenet, table):
    result = evaluate(PixelOracle(table), imagenet)
    n = len(list((imagenet / "val").rglob("*.JPEG")))
    assert result["images"] == result["correct_top1"] == result["correct_top5"] == n
    assert result["top1"] == result["top5"] == 100.0 and result["top1_err"] == 0.0
    assert result["num_classes"] == 1000


def test_true_label_second_is_top5_not_top1(imagenet, table):
    result = evaluate(PixelOracle(table, "second"), imagenet)
    assert result["top1"] == 0.0 and result["top5"] == 100.0


def test_constant_prediction_gets_class_fraction(imagenet, table):
    labels = list(oracle_labels(imagenet).values())
    result = evaluate(PixelOracle(table, "zero"), imagenet)
    assert result["correct_top1"] == labels.count(0) == TENCH_IMAGES
    assert result["top1"] == round(100 * labels.count(0) / len(labels), 4)
    assert result["correct_top5"] == sum(label < 5 for label in labels)


def test_limit_takes_first_images_in_path_order(imagenet, table):
    result = evaluate(PixelOracle(table, "zero"), imagenet, limit=5)
    first = sorted(oracle_labels(imagenet).items())[:5]
    assert result["images"] == 5 and result["correct_top1"] == sum(label == 0 for _, label in first)


def test_wnid_mapping_of_partial_folder(imagenet, tmp_path):
    ds = WnidImageFolder(imagenet / "val")  # finds ../synset_words.txt
    assert len(ds.classes) == 1000
    assert dict((p, t) for p, t in ds.samples) == oracle_labels(imagenet)
    # the same through an explicit wnid-per-line file
    plain = tmp_path / "wnids.txt"
    plain.write_text("\n".join(ds.classes) + "\n")
    assert WnidImageFolder(imagenet / "val", classes=plain).targets == ds.targets


def test_partial_folder_without_class_list_is_an_error(imagenet, tmp_path):
    for d in sorted((imagenet / "val").iterdir())[:3]:
        shutil.copytree(d, tmp_path / "val" / d.name)
    with pytest.raises(ValueError, match="class list"):
        WnidImageFolder(tmp_path / "val")
    (tmp_path / "val" / "n99999999").mkdir()
    with pytest.raises(ValueError, match="not in the class list"):
        WnidImageFolder(tmp_path / "val", classes=imagenet / "synset_words.txt")


def test_csv_and_json(imagenet, table, tmp_path):
    result = evaluate(PixelOracle(table), imagenet, model_name="oracle")
    row = results_row(result)
    assert tuple(row) == CSV_COLUMNS and CSV_COLUMNS[:9] == TIMM_COLUMNS
    path = tmp_path / "results.csv"
    write_csv(path, row)
    write_csv(path, row)  # appends a second row under the same header
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == 2 and list(rows[0]) == list(CSV_COLUMNS)
    assert rows[0]["model"] == "oracle" and float(rows[0]["top1"]) == 100.0 and float(rows[0]["top5_err"]) == 0.0
    assert rows[0]["img_size"] == "32" and rows[0]["interpolation"] == "bilinear" and rows[0]["crop_pct"] == "0.875"
    assert int(rows[0]["images"]) == result["images"] and float(rows[0]["param_count"]) == 0.0
    write_json(tmp_path / "r.json", result)
    assert json.loads((tmp_path / "r.json").read_text())["correct_top1"] == result["images"]
    with pytest.raises(ValueError, match="columns"):
        write_csv(path, {"model": "x"})


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="visionfx eval")
    COMMAND.add_arguments(parser)
    args = parser.parse_args(argv)
    return COMMAND.run(args, parser)


def test_checkpoint_file_through_the_cli(imagenet, tmp_path):
    """A checkpoint whose head always prefers class 0: loaded through timm's file override, the CLI must report the
    class-0 fraction; random weights would not."""
    torch.manual_seed(0)
    model = create_timm_model("test_vit")
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(-torch.arange(1000, dtype=torch.float32))
    ckpt = tmp_path / "test_vit.pth"
    torch.save({"state_dict": model.state_dict()}, ckpt)

    loaded = create_timm_model("test_vit", checkpoint=ckpt)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert not torch.equal(create_timm_model("test_vit").head.bias, model.head.bias)

    out_csv, out_json = tmp_path / "r.csv", tmp_path / "r.json"
    labels = list(oracle_labels(imagenet).values())
    assert run_cli(["imagenet", "--model", "test_vit", "--checkpoint", str(ckpt), "--data", str(imagenet / "val"),
                    "--device", "cpu", "--workers", "0", "--batch-size", "16", "--no-progress",
                    "--csv", str(out_csv), "--json", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    assert result["images"] == len(labels) and result["correct_top1"] == labels.count(0)
    assert result["weights"] == str(ckpt) and result["method"] is None
    assert result["num_params"] == sum(p.numel() for p in model.parameters())
    assert result["img_size"] == model.pretrained_cfg["input_size"][-1]
    row = next(csv.DictReader(open(out_csv)))
    assert row["model"] == "test_vit" and float(row["top1"]) == result["top1"]


def test_method_and_patched_directory_through_the_cli(imagenet, tmp_path):
    import visionfx

    torch.manual_seed(0)
    model = create_timm_model("test_vit")
    ckpt = tmp_path / "base.pth"
    torch.save(model.state_dict(), ckpt)
    visionfx.patch(model, "slab")
    visionfx.save_pretrained(model, tmp_path / "patched")
    common = ["imagenet", "--model", "test_vit", "--checkpoint", str(ckpt), "--data", str(imagenet / "val"),
              "--device", "cpu", "--workers", "0", "--limit", "4", "--no-progress"]
    assert run_cli(common + ["--patched", str(tmp_path / "patched"), "--json", str(tmp_path / "p.json")]) == 0
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["method"] == "slab" and saved["num_params"] == sum(p.numel() for p in model.parameters())
    assert run_cli(common + ["--method", "slab", "--set", "use_pe=false", "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["method_config"]["use_pe"] is False
    with pytest.raises(SystemExit):
        run_cli(common + ["--method", "agent", "--patched", str(tmp_path / "patched")])
