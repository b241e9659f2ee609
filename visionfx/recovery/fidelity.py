"""The fidelity pipeline: how much of the reference model's accuracy each token mixer keeps, before and after
recovery, and at what share of the reference's training compute (``scripts/fidelity_cifar10.py``).

For each mixer, a fresh copy of the reference model is patched and evaluated with no recovery, after stage 1
(attention transfer) and after stages 1+2 (distillation fine-tuning), through :func:`~visionfx.recovery.distill`.
Training-free mixers (``agentsd``) are evaluated as patched only. Each step's GPU time is recorded; the compute
share is the recovery's GPU time over the reference training's GPU time (both measured the same way: synchronised
wall-clock time of the training loop times the number of devices, evaluation excluded). On CUDA each mixer first runs
one untimed forward and backward of a patched copy at every batch size the recovery uses (:func:`warm_up`), so
one-off kernel compilation and autotuning, which happen once per machine and shape, are recorded apart
(``warmup_seconds``) instead of inside stage 1. The target is at least
98% of the reference's top-1 after recovery with at most 5% of its training compute.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
import traceback
from pathlib import Path

import torch

from visionfx.bench_env import short_commit
from visionfx.recovery.config import DistillConfig
from visionfx.recovery.data import ImageData
from visionfx.recovery.distill import distill, resolve_method
from visionfx.recovery.train import load_reference

__all__ = ["MIXERS", "TRAINING_FREE", "run_fidelity", "fidelity_markdown", "TARGET_RATIO", "TARGET_SHARE"]

MIXERS = ("agent", "agentsd", "inline", "rala", "slab", "vig")
TRAINING_FREE = frozenset({"agentsd"})
TARGET_RATIO = 0.98
TARGET_SHARE = 0.05


def environment() -> dict:
    cuda = torch.cuda.is_available()
    return {"gpu": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
            "python": platform.python_version(), "commit": short_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def warm_up(reference, mixer, config: DistillConfig, data: ImageData | None = None) -> float:
    """Seconds spent on one forward and backward of the patched reference at each batch size of ``config`` (and one
    evaluation forward), under bf16 autocast on CUDA: Triton kernels compile and autotune here, once per shape. 0 off
    CUDA (nothing to compile or tune). With ``config.compile`` (and ``data``), a short :func:`distill` of a copy
    (at most 2 + 12 steps) runs instead, so that ``torch.compile``'s traces and Inductor's kernels of stage 2 are
    built here too."""
    import visionfx

    if not torch.cuda.is_available() or config.cpu:
        return 0.0
    model, info = load_reference(reference)
    if config.compile and data is not None and config.stage2_steps > 0:
        short = config.replace(stage1_steps=min(config.stage1_steps, 2), stage2_steps=12, time_budget=None,
                               eval_at_start=False, eval_every=0, save_every=0)
        return _cuda_seconds(lambda: distill(model, mixer, data, config=short, progress=False))
    visionfx.patch(model, resolve_method(mixer, config.prepbn_steps, config.default_prepbn_steps))
    model.cuda().train()
    size = int((info.get("model_kwargs") or {}).get("img_size", 32))
    dtype = torch.bfloat16 if config.mixed_precision in ("auto", "bf16") else torch.float16

    def passes():
        with torch.autocast("cuda", dtype=dtype, enabled=config.mixed_precision != "no"):
            for batch in sorted({config.stage1_batch_size, config.stage2_batch_size}):
                model(torch.randn(batch, 3, size, size, device="cuda")).float().square().mean().backward()
            model.eval()
            with torch.no_grad():
                model(torch.randn(config.eval_batch_size, 3, size, size, device="cuda"))

    return _cuda_seconds(passes)


def _cuda_seconds(fn) -> float:
    """Synchronised wall-clock seconds of ``fn()``."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_fidelity(reference: str | os.PathLike | dict, data: ImageData, config: DistillConfig, *,
                 mixers=MIXERS, output_dir: str | os.PathLike | None = None, progress: bool = True,
                 budget_share: float | None = None) -> dict:
    """Evaluate and recover each mixer on the reference model; returns the results (see :func:`fidelity_markdown`).

    Args:
        reference: a reference checkpoint (path or dict, :mod:`visionfx.recovery.train`).
        data: labelled training and held-out data (normalised with the reference's statistics here).
        config: the recovery recipe (step counts, batch sizes, learning rates).
        mixers: method names or YAML recipes.
        output_dir: where each mixer's distill log goes (``<output_dir>/<mixer>/``); None: nowhere.
        budget_share: give every mixer's recovery ``budget_share`` × the reference's training GPU time
            (``DistillConfig.time_budget``: stage 2 fits its step count to what stage 1 left); None: the recipe's
            step counts (and its own ``time_budget``, if any).
    """
    import dataclasses

    _, info = load_reference(reference)
    data = dataclasses.replace(data, mean=tuple(info["mean"]), std=tuple(info["std"]))
    ref_gpu = float(info["gpu_seconds"])
    if budget_share is not None:
        if not 0 < budget_share <= 1:
            raise ValueError(f"budget_share must be in (0, 1], got {budget_share}")
        config = config.replace(time_budget=budget_share * ref_gpu)
    rows = []
    for mixer in mixers:
        name = Path(mixer).stem if str(mixer).endswith((".yaml", ".yml")) else str(mixer)
        free = name in TRAINING_FREE
        cfg = config.replace(stage1_steps=0, stage2_steps=0) if free else config
        if cfg.compile:
            # a fresh dynamo state per mixer: the compiled forwards of all models share code objects (accelerate's
            # autocast wrapper), and after torch._dynamo.config.recompile_limit models a later mixer would run eager
            torch._dynamo.reset()
        model, _ = load_reference(reference)
        row = {"mixer": name, "training_free": free}
        try:
            row["warmup_seconds"] = warm_up(reference, mixer, cfg, data)
            res = distill(model, mixer, data, config=cfg.replace(eval_at_start=True), progress=progress,
                          output_dir=None if output_dir is None else Path(output_dir) / name)
            stages = res.log["stages"]
            s1 = stages.get("stage1", {})
            s2 = stages.get("stage2", {})
            gpu = float(s1.get("gpu_seconds", 0.0)) + float(s2.get("gpu_seconds", 0.0))
            row.update(top1_none=res.top1.get("start"), top1_stage1=res.top1.get("stage1"),
                       top1_recovered=res.top1.get("final") if not free else None,
                       stage1_gpu_seconds=s1.get("gpu_seconds"), stage2_gpu_seconds=s2.get("gpu_seconds"),
                       stage1_images=s1.get("images"), stage2_images=s2.get("images"),
                       stage2_steps=s2.get("steps"),
                       stage1_skipped=s1.get("skipped"), recovery_gpu_seconds=gpu,
                       compute_share=gpu / ref_gpu if ref_gpu > 0 else None)
            best = row["top1_recovered"] if row["top1_recovered"] is not None else row["top1_none"]
            row["ratio"] = None if best is None or not info["top1"] else best / info["top1"]
            row["meets_target"] = (row["ratio"] is not None and row["ratio"] >= TARGET_RATIO
                                   and (row["compute_share"] or 0.0) <= TARGET_SHARE)
        except Exception as e:  # one mixer failing must not lose the others' results
            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc()
        rows.append(row)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"reference": {k: info.get(k) for k in ("timm_model", "model_kwargs", "top1", "seconds", "gpu_seconds",
                                                 "steps", "images", "device", "config")},
            "distill_config": config.to_dict(), "rows": rows, "environment": environment(),
            "target": {"ratio": TARGET_RATIO, "compute_share": TARGET_SHARE}, "budget_share": budget_share}


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _sec(v) -> str:
    return "-" if v is None else f"{v:.1f} s"


def _stage2_steps(cfg: dict) -> str:
    if cfg.get("time_budget") is None:
        return f"{cfg['stage2_steps']} steps"
    return (f"at most {cfg['stage2_steps']} steps: as many as fit in a budget of {cfg['time_budget']:.1f} GPU-seconds "
            "for stages 1+2 (each mixer's count is in the table)")


def _mixing(cfg: dict) -> str:
    if not (cfg.get("mixup_alpha") or cfg.get("cutmix_alpha")):
        return ""
    return (f"; mixup α {cfg['mixup_alpha']} / CutMix α {cfg['cutmix_alpha']} on {100 * cfg['mix_prob']:.0f}% of "
            "the batches")


def _steps(row: dict) -> str:
    return f" ({row['stage2_steps']} steps)" if row.get("stage2_steps") and row.get("stage2_gpu_seconds") else ""


def fidelity_markdown(results: dict) -> str:
    """The ``docs/fidelity.md`` page for :func:`run_fidelity`'s results."""
    ref, env, cfg = results["reference"], results["environment"], results["distill_config"]
    kw = ref.get("model_kwargs") or {}
    lines = [
        "# Fidelity: token mixers on a CIFAR-10 reference ViT",
        "",
        f"Reference: timm `{ref['timm_model']}` geometry with patch {kw.get('patch_size')} on "
        f"{kw.get('img_size')}×{kw.get('img_size')} images, width {kw.get('embed_dim')}, depth {kw.get('depth')}, "
        f"{kw.get('num_heads')} heads, trained from scratch: top-1 **{_pct(ref['top1'])}** after {ref['steps']} steps "
        f"({ref['images']:,} images) in {_sec(ref['gpu_seconds'])} of GPU time on {ref.get('device')}.",
        "",
        f"Recovery (METHODS.md §10): stage 1 attention transfer, {cfg['stage1_steps']} steps × "
        f"{cfg['stage1_batch_size']} images (lr {cfg['stage1_lr']}, LoRA rank {cfg['lora_rank']}); stage 2 "
        f"distillation fine-tuning, {cfg['stage2_batch_size']} images per step, {_stage2_steps(cfg)} (lr "
        f"{cfg['stage2_lr']}, T = {cfg['temperature']}{_mixing(cfg)}). Target: ≥ "
        f"{100 * results['target']['ratio']:.0f}% of the "
        f"reference top-1 after recovery using ≤ {100 * results['target']['compute_share']:.0f}% of its training "
        "compute (GPU time).",
        "",
        "| mixer | no recovery | after stage 1 | after stages 1+2 | ratio to reference | stage 1 GPU time | "
        "stage 2 GPU time | compute share | target met |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| reference (softmax) | {_pct(ref['top1'])} | - | - | 100.00% | - | - | - | - |",
    ]
    for r in results["rows"]:
        if "error" in r:
            lines.append(f"| {r['mixer']} | failed: {r['error'].splitlines()[0][:120]} | | | | | | | |")
            continue
        s1 = "skipped" if r.get("stage1_skipped") else _pct(r["top1_stage1"])
        if r["training_free"]:
            s1 = "(training-free)"
        lines.append(
            f"| {r['mixer']} | {_pct(r['top1_none'])} | {s1} | {_pct(r['top1_recovered'])} | {_pct(r['ratio'])} | "
            f"{_sec(r['stage1_gpu_seconds'])} | {_sec(r['stage2_gpu_seconds'])}{_steps(r)} | "
            f"{_pct(r['compute_share'])} | "
            f"{'yes' if r['meets_target'] else 'no'} |")
    lines += [
        "",
        "Ratio to reference: the recovered top-1 (no-recovery top-1 for training-free mixers) over the reference's. "
        "Compute share: stage 1 + stage 2 GPU time over the reference's training GPU time (evaluation excluded). "
        + ("Stage 2 ran under `torch.compile`; tracing, Inductor's and the Triton kernels' compilation and autotuning "
           "ran before each mixer's clock started (a 12-step run of the same recipe), as the reference's did not (its "
           "seconds include its own compilation): "
           if cfg.get("compile") else
           "Kernel compilation and autotuning ran before each mixer's clock started, once per shape: ")
        + ", ".join(f"{r['mixer']} {r['warmup_seconds']:.1f} s" for r in results["rows"] if r.get("warmup_seconds"))
        + ("." if any(r.get("warmup_seconds") for r in results["rows"]) else " (none: not on CUDA)."),
        "",
        f"Environment: {env.get('gpu') or 'CPU'}, torch {env['torch']}, Python {env['python']}, commit "
        f"{env.get('commit') or 'unknown'}, {env['date']}. Produced by `scripts/fidelity_cifar10.py`.",
        "",
    ]
    return "\n".join(lines)


MD_BEGIN = "<!-- cifar10 fidelity: begin (written by scripts/fidelity_cifar10.py) -->"
MD_END = "<!-- cifar10 fidelity: end -->"


def write_markdown_section(path: str | os.PathLike, body: str, begin: str = MD_BEGIN, end: str = MD_END) -> Path:
    """Replace the text between the markers ``begin`` and ``end`` in ``path`` with ``body`` (markers and body are
    appended when absent); the rest of the file, e.g. other tables and their commentary, is left as it is."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text and text.index(begin) < text.index(end):
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + ("\n\n" if text.strip() else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_results(results: dict, json_path: str | os.PathLike | None, md_path: str | os.PathLike | None) -> None:
    """Write the results JSON and the table's section of the Markdown page (``docs/fidelity.md``)."""
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(results, indent=1, default=str) + "\n")
    if md_path:
        write_markdown_section(md_path, fidelity_markdown(results))
