"""The CIFAR-10 reference model: a small ViT trained from scratch, the host that fidelity runs patch and recover.

Geometry: timm ``vit_small_patch16_224`` adapted to 32×32 images: patch 4 (an 8×8 grid, 64 tokens + CLS), width 384
and 6 heads (head dimension 64) as ViT-S, depth 6 instead of 12. Recipe: 300 epochs of AdamW (β = 0.9, 0.999; weight
decay 0.05 on matrices), linear warm-up then cosine decay to 1% of the peak, label smoothing 0.1, drop path 0.1;
random crop with 4-pixel zero padding, horizontal flip and, on half of the batches, mixup (α 0.8) or CutMix (α 1.0),
all on the GPU (:class:`~visionfx.recovery.data.GpuAugment`); bf16 autocast on CUDA, gradient clipping at norm 1. The
whole training set lives on the GPU as uint8, so the GPU is the bottleneck (``compile=True`` fuses the model's
element-wise work and is worth it on a GPU).

``time_budget`` (seconds of training, evaluation excluded) fits the run to a wall-clock budget: after
``calibrate_steps`` timed steps (following 10 untimed ones) the planned number of steps is reduced, never increased,
so that training ends within the budget, and the cosine schedule is stretched over the new length. The planned and
actual step counts are recorded.

The checkpoint (``reference.pt``) is a dict: ``format``, ``timm_model``, ``model_kwargs`` (rebuild with
``timm.create_model(timm_model, pretrained=False, **model_kwargs)``, or :func:`load_reference`), ``state_dict``,
``classes``, ``mean``/``std`` (the normalisation trained with), ``top1``, ``seconds``/``gpu_seconds`` (training time),
``steps``, ``images`` and ``config``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from visionfx.recovery.config import Recipe, _check, check_fields, check_mixed_precision
from visionfx.recovery.data import GpuAugment, ImageData, _seed
from visionfx.recovery.engine import (RunLog, StageClock, adamw_warmup_cosine, budgeted_training, device_name,
                                      evaluate, start_run)

__all__ = ["TrainConfig", "build_reference_model", "train_reference", "load_reference", "REFERENCE_FORMAT"]

REFERENCE_FORMAT = "visionfx-reference-1"


@dataclass(frozen=True)
class TrainConfig(Recipe):
    """The reference recipe (see the module docstring); every field is a YAML key of ``configs/train-cifar10.yaml``.

    ``epochs`` may be fractional; ``max_steps`` caps the optimiser steps (smoke tests); ``eval_every_epochs`` 0
    evaluates only at the end.
    """

    model: str = "vit_small_patch16_224"
    img_size: int = 32
    patch_size: int = 4
    embed_dim: int = 384
    depth: int = 6
    num_heads: int = 6
    mlp_ratio: float = 4.0
    drop_path: float = 0.1
    global_pool: str = "token"
    epochs: float = 300.0
    batch_size: int = 512
    lr: float = 1e-3
    min_lr_ratio: float = 0.01
    weight_decay: float = 0.05
    warmup_epochs: float = 5.0
    label_smoothing: float = 0.1
    crop_padding: int = 4
    flip: bool = True
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mix_prob: float = 0.5
    grad_clip: float = 1.0
    mixed_precision: str = "auto"
    compile: bool = False
    time_budget: float | None = None
    calibrate_steps: int = 30
    eval_every_epochs: float = 25.0
    eval_batch_size: int = 1024
    seed: int = 0
    max_steps: int | None = None
    cpu: bool = False

    def __post_init__(self):
        check_fields(self,
                     ints_ge1=("img_size", "patch_size", "embed_dim", "depth", "num_heads", "batch_size",
                               "eval_batch_size", "calibrate_steps"),
                     positive=("epochs", "lr", "mlp_ratio"),
                     nonnegative=("weight_decay", "warmup_epochs", "grad_clip", "mixup_alpha", "cutmix_alpha",
                                  "eval_every_epochs", "drop_path"),
                     fractions=("min_lr_ratio", "label_smoothing", "mix_prob"),
                     optional_ints_ge1=("max_steps",), optional_positive=("time_budget",))
        _check(self.embed_dim % self.num_heads == 0, f"embed_dim {self.embed_dim} must be a multiple of num_heads")
        _check(self.img_size % self.patch_size == 0, f"img_size {self.img_size} must be a multiple of patch_size")
        check_mixed_precision(self.mixed_precision)
        _check(self.global_pool in ("token", "avg"), f"global_pool must be 'token' or 'avg', got {self.global_pool!r}")

    def model_kwargs(self, num_classes: int) -> dict:
        return dict(img_size=self.img_size, patch_size=self.patch_size, embed_dim=self.embed_dim, depth=self.depth,
                    num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, drop_path_rate=self.drop_path,
                    global_pool=self.global_pool, num_classes=num_classes)


def build_reference_model(config: TrainConfig, num_classes: int) -> nn.Module:
    """The reference ViT with random weights (timm, no download)."""
    import timm

    return timm.create_model(config.model, pretrained=False, **config.model_kwargs(num_classes))


def load_reference(checkpoint: str | os.PathLike | dict, map_location="cpu") -> tuple[nn.Module, dict]:
    """``(model, info)`` from a reference checkpoint (path or loaded dict); ``info`` is the checkpoint without its
    state dict. The model is in eval mode, with the drop-path rate it was trained with."""
    import timm

    ckpt = checkpoint if isinstance(checkpoint, dict) else torch.load(checkpoint, map_location=map_location,
                                                                      weights_only=True)
    if ckpt.get("format") != REFERENCE_FORMAT:
        raise ValueError(f"not a visionfx reference checkpoint (format {ckpt.get('format')!r}, "
                         f"expected {REFERENCE_FORMAT!r})")
    model = timm.create_model(ckpt["timm_model"], pretrained=False, **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), {k: v for k, v in ckpt.items() if k != "state_dict"}


def train_reference(config: TrainConfig, data: ImageData, output_dir: str | os.PathLike | None = None, *,
                    progress: bool = True) -> dict:
    """Train the reference model from scratch on ``data`` and (with ``output_dir``) save ``reference.pt`` and
    ``train_log.json`` there.

    Returns:
        the checkpoint dict (see the module docstring), ``model`` (the trained module, eval mode) added.
    """
    if data.classes is None:
        raise ValueError("training the reference model needs labelled data with classes")
    acc = start_run(config.mixed_precision, 1, config.cpu, config.seed)
    data = data.to(acc.device)
    model = build_reference_model(config, len(data.classes))
    per_epoch = data.train.batches_per_epoch(config.batch_size, acc.num_processes)
    planned = max(1, round(config.epochs * per_epoch))
    if config.max_steps is not None:
        planned = min(planned, config.max_steps)
    warmup = min(round(config.warmup_epochs * per_epoch), planned // 2)
    opt, schedule, sched = adamw_warmup_cosine(model.named_parameters(), config.lr, config.weight_decay, planned,
                                               warmup, config.min_lr_ratio)
    model_p, opt, sched = acc.prepare(model, opt, sched)
    fwd = torch.compile(model_p) if config.compile else model_p
    augment = GpuAugment(data.mean, data.std, crop_padding=config.crop_padding, flip=config.flip,
                         mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha, mix_prob=config.mix_prob,
                         num_classes=len(data.classes), seed=_seed(config.seed, 10))
    out = None if output_dir is None else Path(output_dir)
    log = RunLog(None if out is None else out / "train_log.json",
                 meta={"config": config.to_dict(), "device": str(acc.device), "processes": acc.num_processes,
                       "mixed_precision": acc.mixed_precision, "planned_steps": planned})
    eval_every = round(config.eval_every_epochs * per_epoch) if config.eval_every_epochs else 0
    batches = data.train.train_batches(config.batch_size, seed=_seed(config.seed, 11), rank=acc.process_index,
                                       world=acc.num_processes, device=acc.device)
    clock = StageClock(acc.device)

    def loss_fn(step):
        x, y = augment(*next(batches), step)
        with acc.autocast():
            logits = fwd(x)
        return F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)

    def on_eval(step):
        log.eval("train", step, evaluate(acc.unwrap_model(model_p), data.eval, augment.normalize, acc,
                                         config.eval_batch_size))
        log.write(acc)

    step = budgeted_training(acc, model_p, opt, sched, schedule, loss_fn, planned=planned, log=log, clock=clock,
                             grad_clip=config.grad_clip, time_budget=config.time_budget,
                             calibrate_steps=config.calibrate_steps, eval_every=eval_every, on_eval=on_eval,
                             progress=progress)
    model = acc.unwrap_model(model_p, keep_fp32_wrapper=False)
    top1 = evaluate(model, data.eval, augment.normalize, acc, config.eval_batch_size)
    log.eval("final", step, top1)
    images = step * config.batch_size * acc.num_processes
    log.stage("train").update(steps=step, planned_steps=planned, seconds=clock.seconds,
                              gpu_seconds=clock.seconds * acc.num_processes, images=images, top1=top1)
    log.write(acc)
    ckpt = {
        "format": REFERENCE_FORMAT, "timm_model": config.model, "model_kwargs": config.model_kwargs(len(data.classes)),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "classes": list(data.classes), "mean": list(data.mean), "std": list(data.std), "top1": top1,
        "seconds": clock.seconds, "gpu_seconds": clock.seconds * acc.num_processes, "steps": step, "images": images,
        "config": config.to_dict(), "device": device_name(acc.device),
    }
    if out is not None and acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt, out / "reference.pt")
    acc.wait_for_everyone()
    return {**ckpt, "model": model.eval()}
