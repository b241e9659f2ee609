"""Data for recovery: the CIFAR-10 archive cache (real archive, a subset decoded), on-device augmentation, tensor
sources, and the reference recipe's command line on the cached subset."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from visionfx.recovery.data import GpuAugment, TensorSource, cache_path, load_archive_cache, load_image_data

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = Path("/work/shared/data/cifar10.tar.xz")
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
LIMIT = 3

needs_archive = pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"{ARCHIVE} not present")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cifar-cache")


@pytest.fixture(scope="module")
def cifar(cache_dir):
    return load_archive_cache(ARCHIVE, cache_dir, limit_per_class=LIMIT, progress=False)


def _first_archive_images(n: int) -> dict[str, np.ndarray]:
    """The first ``n`` JPEGs of the archive, decoded independently with PIL (stops reading early)."""
    from PIL import Image

    out = {}
    with tarfile.open(ARCHIVE, "r|xz") as tf:
        for m in tf:
            if m.isfile() and m.name.endswith(".jpg"):
                out[m.name] = np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB"))
                if len(out) == n:
                    break
    return out


@needs_archive
def test_cifar_cache_counts_and_layout(cifar):
    assert cifar["classes"] == CLASSES
    assert cifar["counts"] == {"train": 50_000, "test": 10_000}
    assert all(cifar["class_counts"]["train"][c] == 5000 and cifar["class_counts"]["test"][c] == 1000 for c in CLASSES)
    for split in ("train", "test"):
        s = cifar["splits"][split]
        assert s["images"].dtype == torch.uint8 and tuple(s["images"].shape) == (10 * LIMIT, 3, 32, 32)
        assert s["labels"].tolist() == [i for i in range(10) for _ in range(LIMIT)]  # sorted by path = by class
        assert all(name.split("/")[1] == split and name.split("/")[2] == CLASSES[label]
                   for name, label in zip(s["names"], s["labels"].tolist()))


@needs_archive
def test_cifar_cache_pixels_match_pil(cifar):
    reference = _first_archive_images(LIMIT)
    names = {name: (split, i) for split in ("train", "test") for i, name in enumerate(cifar["splits"][split]["names"])}
    for name, pixels in reference.items():
        split, i = names[name]  # the first images of a class in archive order are always kept
        got = cifar["splits"][split]["images"][i].permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(got, pixels)


@needs_archive
def test_cifar_cache_is_reused(cifar, cache_dir, monkeypatch):
    import visionfx.recovery.data as data_mod

    assert cache_path(ARCHIVE, cache_dir, limit_per_class=LIMIT).is_file()
    monkeypatch.setattr(data_mod, "decode_archive", lambda *a, **k: pytest.fail("decoded again"))
    data = load_image_data(ARCHIVE, cache_dir=cache_dir, limit_per_class=LIMIT, progress=False)
    assert data.classes == CLASSES and len(data.train) == 10 * LIMIT and len(data.eval) == 10 * LIMIT
    assert torch.equal(data.train.images, cifar["splits"]["train"]["images"])
    x = cifar["splits"]["train"]["images"].double() / 255
    np.testing.assert_allclose(data.mean, x.mean((0, 2, 3)).numpy(), atol=1e-5)
    np.testing.assert_allclose(data.std, x.permute(1, 0, 2, 3).reshape(3, -1).std(1, unbiased=False).numpy(), atol=1e-5)


# ---------------------------------------------------------------------------------------------------- augmentation


def _images(b=6, h=8, w=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g)


def test_augment_shapes_dtypes_and_normalisation():
    x, y = _images(), torch.arange(6)
    aug = GpuAugment((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), crop_padding=2, seed=1)
    out, target = aug(x, y, step=3)
    assert out.dtype == torch.float32 and out.shape == x.shape and target is y
    plain = GpuAugment((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), crop_padding=0, flip=False).normalize(x)
    expect = (x.double() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1).double()) / \
        torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1).double()
    torch.testing.assert_close(plain.double(), expect, atol=1e-6, rtol=1e-6)


def test_augment_deterministic_under_seed():
    x, y = _images(), torch.arange(6)
    a = GpuAugment((0, 0, 0), (1, 1, 1), crop_padding=3, cutmix_alpha=1.0, mixup_alpha=0.5, num_classes=6, seed=7)
    b = GpuAugment((0, 0, 0), (1, 1, 1), crop_padding=3, cutmix_alpha=1.0, mixup_alpha=0.5, num_classes=6, seed=7)
    outs = [a(x, y, step=s)[0] for s in range(4)]
    for s in range(4):
        xb, yb = b(x, y, step=s)
        assert torch.equal(outs[s], xb)
    assert not all(torch.equal(outs[0], o) for o in outs[1:])
    c = GpuAugment((0, 0, 0), (1, 1, 1), crop_padding=3, cutmix_alpha=1.0, mixup_alpha=0.5, num_classes=6, seed=8)
    assert not torch.equal(c(x, y, step=0)[0], outs[0])


def test_crop_is_a_window_of_the_zero_padded_image():
    x = _images(b=16, h=6, w=7)
    p = 2
    out, _ = GpuAugment((0, 0, 0), (1, 1, 1), crop_padding=p, flip=False, seed=3)(x, None, step=0)
    padded = torch.zeros(16, 3, 6 + 2 * p, 7 + 2 * p)
    padded[:, :, p:p + 6, p:p + 7] = x.double().float() / 255
    offsets = set()
    for i in range(16):
        hits = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                if torch.allclose(out[i], padded[i, :, dy:dy + 6, dx:dx + 7], atol=1e-6)]
        assert hits, f"image {i} is no window of its padded input"
        offsets.add(hits[0])
    assert len(offsets) > 1


def test_flip_flips_some_images_only():
    x = _images(b=32)
    out, _ = GpuAugment((0, 0, 0), (1, 1, 1), crop_padding=0, flip=True, seed=0)(x, None, step=5)
    base = x.float() / 255
    flipped = [torch.allclose(out[i], base[i].flip(2)) for i in range(32)]
    same = [torch.allclose(out[i], base[i]) for i in range(32)]
    assert all(f or s for f, s in zip(flipped, same)) and any(flipped) and any(same)


def test_mixup_and_cutmix_targets():
    x, y = _images(b=8), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])  # each image's partner (reversed batch) differs
    base = x.float() / 255
    mix = GpuAugment((0, 0, 0), (1, 1, 1), crop_padding=0, flip=False, mixup_alpha=0.4, num_classes=4, seed=2)
    out, t = mix(x, y, step=0)
    assert t.shape == (8, 4) and torch.allclose(t.sum(1), torch.ones(8))
    lam = float(t[0, 0])
    assert 0 < lam < 1
    torch.testing.assert_close(t, lam * torch.eye(4)[y] + (1 - lam) * torch.eye(4)[y.flip(0)])
    torch.testing.assert_close(out, lam * base + (1 - lam) * base.flip(0), atol=1e-5, rtol=1e-5)
    cut = GpuAugment((0, 0, 0), (1, 1, 1), crop_padding=0, flip=False, cutmix_alpha=1.0, num_classes=4, seed=2)
    for step in range(3):
        out, t = cut(x, y, step=step)
        assert torch.allclose(t.sum(1), torch.ones(8))
        own = (out == base).all(1).float().mean((1, 2))  # fraction of pixels still the image's own
        from_partner = (out == base.flip(0)).all(1).float().mean((1, 2))
        torch.testing.assert_close(own + from_partner, torch.ones(8))  # the rest is the partner's box
        torch.testing.assert_close(t[torch.arange(8), y], own)


# ---------------------------------------------------------------------------------------------------------- sources


def test_tensor_source_epochs_resume_and_shards():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()
    src = TensorSource(images, torch.arange(10))
    it = src.train_batches(3, seed=4)
    batches = [next(it) for _ in range(6)]  # 3 batches per epoch, the last image of each epoch dropped
    for epoch in (batches[:3], batches[3:]):
        ids = torch.cat([y for _, y in epoch])
        assert len(set(ids.tolist())) == 9
        assert all(torch.equal(x[:, 0, 0, 0].long(), y) for x, y in epoch)
    resumed = src.train_batches(3, seed=4, start=4)
    assert all(torch.equal(next(resumed)[1], batches[i][1]) for i in (4, 5))
    r0, r1 = src.train_batches(2, seed=1, rank=0, world=2), src.train_batches(2, seed=1, rank=1, world=2)
    for _ in range(2):
        a, b = next(r0)[1], next(r1)[1]
        assert not set(a.tolist()) & set(b.tolist())
    evals = [y for r in (0, 1) for _, y in src.eval_batches(4, rank=r, world=2)]
    assert sorted(torch.cat(evals).tolist()) == list(range(10))


def test_tensor_source_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        TensorSource(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="cannot fill"):
        next(TensorSource(_images(b=3)).train_batches(4))


# ---------------------------------------------------------------------------------------------- reference recipe


TINY_VIT = ["--set", "depth=1", "--set", "embed_dim=32", "--set", "num_heads=2"]


@pytest.fixture(scope="module")
def reference(cifar, cache_dir, tmp_path_factory):
    """``visionfx train cifar10`` for 2 steps of a 1-block ViT on the cached subset."""
    from visionfx.recovery.cli import main_train

    out = tmp_path_factory.mktemp("ref")
    torch.set_num_threads(1)
    rc = main_train(["cifar10", "--data", str(ARCHIVE), "--cache-dir", str(cache_dir), "--limit", str(LIMIT),
                     "--output", str(out), "--max-steps", "2", "--batch-size", "8", "--cpu", "--no-progress",
                     *TINY_VIT, "--set", "eval_batch_size=16"])
    assert rc == 0
    return out / "reference.pt"


@needs_archive
def test_train_cifar10_command_runs_two_steps(reference):
    from visionfx.recovery.train import load_reference

    model, info = load_reference(reference)
    assert info["steps"] == 2 and info["images"] == 16 and 0.0 <= info["top1"] <= 1.0
    assert info["model_kwargs"]["patch_size"] == 4 and len(model.blocks) == 1
    assert model.patch_embed.grid_size == (8, 8) and model.num_prefix_tokens == 1
    history = json.loads((reference.parent / "train_log.json").read_text())["stages"]["train"]["history"]
    assert history[-1]["step"] == 2 and 0 < history[-1]["seconds"] <= info["seconds"]  # the clock at each record


@needs_archive
def test_distill_command_on_reference(reference, cache_dir, tmp_path, capsys):
    import json

    from visionfx.recovery.cli import main_distill

    out = tmp_path / "distill"
    rc = main_distill(["--checkpoint", str(reference), "--method", "slab", "--data", str(ARCHIVE),
                       "--cache-dir", str(cache_dir), "--limit", str(LIMIT), "--output", str(out), "--max-steps", "1",
                       "--batch-size", "8", "--cpu", "--no-progress", "--set", "eval_batch_size=16"])
    assert rc == 0
    log = json.loads((out / "distill_log.json").read_text())
    assert log["meta"]["method"] == "slab" and log["stages"]["stage1"]["steps"] == 1
    assert log["stages"]["stage2"]["steps"] == 1 and (out / "final" / "model.safetensors").is_file()
    assert "top-1" in capsys.readouterr().out


@needs_archive
def test_fidelity_script_tiny(reference, cache_dir, tmp_path):
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("fidelity_cifar10", ROOT / "scripts" / "fidelity_cifar10.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    md = tmp_path / "fidelity.md"
    md.write_text("# Page\n\nOther tables stay.\n")
    rc = script.main(["--data", str(ARCHIVE), "--cache-dir", str(cache_dir), "--limit", str(LIMIT),
                      "--reference", str(reference), "--output", str(tmp_path / "fid"), "--md", str(md),
                      "--mixers", "agentsd,slab", "--max-steps", "1", "--batch-size", "8", "--cpu", "--no-progress",
                      "--distill-set", "compile=false",
                      "--budget-share", "0.5"])
    assert rc == 0
    results = json.loads((tmp_path / "fid" / "fidelity.json").read_text())
    rows = {r["mixer"]: r for r in results["rows"]}
    assert set(rows) == {"agentsd", "slab"} and not any("error" in r for r in rows.values())
    assert rows["agentsd"]["training_free"] and rows["agentsd"]["top1_recovered"] is None
    slab = rows["slab"]
    assert slab["stage1_gpu_seconds"] > 0 and slab["stage2_gpu_seconds"] > 0 and slab["compute_share"] > 0
    page = md.read_text()  # the script rewrites its own marked section only
    assert page.startswith("# Page\n\nOther tables stay.") and page.count("cifar10 fidelity: begin") == 1
    assert "| slab |" in page and "as many as fit in a budget of" in page
    budget = results["distill_config"]["time_budget"]
    assert results["budget_share"] == 0.5 and budget == pytest.approx(0.5 * results["reference"]["gpu_seconds"])
    assert all(0 <= slab[k] <= 1 for k in ("top1_none", "top1_stage1", "top1_recovered"))
    text = md.read_text()
    assert "| reference (softmax) |" in text and "| slab |" in text and "| agentsd |" in text


@needs_archive
def test_fidelity_resets_dynamo_per_mixer(reference, cache_dir, monkeypatch):
    """Each mixer's compiled run starts from a fresh dynamo state (otherwise the shared code objects of the compiled
    forwards hit dynamo's recompile limit after a few mixers, and the later ones silently run eager)."""
    from visionfx.recovery.config import DistillConfig
    from visionfx.recovery.data import load_image_data
    from visionfx.recovery.fidelity import run_fidelity

    events = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: events.append("reset"))
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: events.append("compile") or fn)  # no CPU compilation
    data = load_image_data(ARCHIVE, cache_dir=cache_dir, limit_per_class=LIMIT, progress=False)
    cfg = DistillConfig(stage1_steps=1, stage2_steps=1, stage1_batch_size=8, stage2_batch_size=8, eval_batch_size=16,
                        compile=True, cpu=True)
    results = run_fidelity(reference, data, cfg, mixers=["slab", "inline"], progress=False)
    assert not any("error" in r for r in results["rows"])
    # per mixer: one reset, then stage 2's compiled student and teacher
    assert events == ["reset", "compile", "compile"] * 2
