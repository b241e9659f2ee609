"""Training recipes as frozen dataclasses: :class:`DistillConfig` (``visionfx distill``) and the YAML plumbing and
field validation (:func:`check_fields`) that :class:`~visionfx.recovery.train.TrainConfig` and
:class:`~visionfx.recovery.easy_vqa_llava.TrainVQAConfig` share.

Recipes are flat YAML mappings of field names to values (``configs/distill-*.yaml``); unknown keys are rejected with
a did-you-mean suggestion (:func:`visionfx.config.suggest`), as method configs are. Dataclass defaults are the single
source of truth. YAML lists become tuples, and numbers written as strings (PyYAML reads ``1e-3`` as a string) are
converted where the field is numeric.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from visionfx.config import suggest

__all__ = ["Recipe", "DistillConfig", "load_distill_config", "MIXED_PRECISION", "check_fields",
           "check_mixed_precision"]

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


class Recipe:
    """Mixin for frozen recipe dataclasses: construction from mappings and YAML with key checking."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def check_keys(cls, data: Mapping[str, Any]) -> None:
        names = cls.field_names()
        for key in data:
            if key not in names:
                raise ValueError(f"unknown option {key!r} for {cls.__name__}{suggest(key, names)}; "
                                 f"valid options: {', '.join(names)}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None = None, **overrides):
        """Build from a flat mapping plus keyword overrides (``None`` overrides are ignored)."""
        data = dict(data or {})
        data.update({k: v for k, v in overrides.items() if v is not None})
        cls.check_keys(data)
        types = {f.name: str(f.type) for f in fields(cls)}
        return cls(**{k: _coerce(v, types[k]) for k, v in data.items()})

    @classmethod
    def load(cls, path: str | os.PathLike, **overrides):
        """Load a YAML recipe, applying keyword overrides."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a recipe must be a mapping of option names to values")
        try:
            return cls.from_dict(data, **overrides)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def replace(self, **overrides):
        """A copy with ``overrides`` applied; unknown names raise with a suggestion."""
        type(self).check_keys(overrides)
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


def _coerce(value, annotation: str):
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, str) and ("float" in annotation or annotation.startswith("int")):
        try:
            return float(value) if "float" in annotation else int(value)
        except ValueError:
            return value
    return value


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float))


# rule name -> (test, what the message says the value must be)
_RULES = {
    "ints_ge0": (lambda v: _is_int(v) and v >= 0, "must be an integer >= 0"),
    "ints_ge1": (lambda v: _is_int(v) and v >= 1, "must be an integer >= 1"),
    "optional_ints_ge1": (lambda v: v is None or (_is_int(v) and v >= 1), "must be None or an integer >= 1"),
    "positive": (lambda v: _is_number(v) and v > 0, "must be > 0"),
    "optional_positive": (lambda v: v is None or (_is_number(v) and v > 0), "must be None or > 0"),
    "nonnegative": (lambda v: _is_number(v) and v >= 0, "must be >= 0"),
    "fractions": (lambda v: _is_number(v) and 0 <= v <= 1, "must lie in [0, 1]"),
    "flags": (lambda v: isinstance(v, bool), "must be true or false"),
}


def check_fields(recipe, **groups) -> None:
    """Validate a recipe's fields by rule: ``check_fields(self, ints_ge1=("batch_size",), fractions=(...), ...)``
    with the rules of :data:`_RULES`; the first failure raises ``ValueError("<name> <rule>, got <value>")``."""
    for rule, names in groups.items():
        test, what = _RULES[rule]
        for name in names:
            value = getattr(recipe, name)
            _check(test(value), f"{name} {what}, got {value!r}")


def check_mixed_precision(value) -> None:
    _check(value in MIXED_PRECISION,
           f"mixed_precision must be one of {MIXED_PRECISION}, got {value!r}{suggest(str(value), MIXED_PRECISION)}")


FEATURE_SITES = ("attention", "block")  # what stage 2's feature term matches (DistillConfig.feature_site)


@dataclass(frozen=True)
class DistillConfig(Recipe):
    """Recovery of a patched model's accuracy (METHODS.md §10): attention transfer, then fine-tuning with logit
    distillation from the unpatched model.

    Stage 1 (attention transfer):
        output_calibration: before stage 1 (on a fresh run), mixers with an output scale to set (vig's RMSNorm
            weights, METHODS.md §7.3) take it from the host's attention output on one batch.
        stage1_steps: optimiser steps (0: skip).
        stage1_batch_size: images per process and micro-batch.
        stage1_lr, stage1_weight_decay, stage1_warmup: AdamW learning rate, weight decay (matrices only), and linear
            warm-up as a fraction of the stage's steps (then cosine decay to 0).
        lora_rank: rank of LoRA adapters on the host projections ``lora_targets`` during stage 1 (0: off); they are
            merged into the host weights when the stage ends. ``lora_alpha`` defaults to the rank (scaling 1).
    Stage 2 (end-to-end fine-tuning):
        stage2_steps, stage2_batch_size, stage2_lr, stage2_weight_decay, stage2_warmup: as for stage 1.
        stage2_added_lr_mult: learning-rate multiplier for the parameters the patch added (``vfx_``).
        finetune: ``"all"`` (every parameter) or ``"added"`` (only the ``vfx_`` parameters).
        temperature: T of the distillation ``T²·KL(softmax(t/T) || softmax(s/T))``.
        kd_weight, ce_weight: weights of the distillation loss and of the cross-entropy on labels (when the data has
            labels); ``label_smoothing`` applies to the latter.
        feature_weight: weight of the per-layer feature distillation term (0: off): each patched site's output
            (``feature_site="attention"``) or its block's output (``"block"``) matched to the teacher's, as the mean
            over layers of the squared error relative to the teacher's power.
        prepbn_steps: PRepBN's λ schedule length in training forwards (``None``: 0.8 × stage-2 steps × grad_accum).
        recalibrate_steps: batches for ``visionfx.recalibrate_bn`` after stage 2 when the model has PRepBN norms.
        reparameterize: fold PRepBN into the following Linears at the end (``visionfx.reparameterize``).
    Augmentation (on the device): crop_padding, flip, mixup_alpha, cutmix_alpha, mix_prob (stage 1 never mixes).
    Engine:
        grad_accum: micro-batches per optimiser step. mixed_precision: ``auto`` (bf16 on CUDA, else off), ``no``,
        ``bf16``, ``fp16``. grad_clip: max gradient norm (0: off). compile: ``torch.compile`` the stage-2
        forwards (a process that runs many compiled recoveries, e.g. a sweep, should call
        ``torch._dynamo.reset()`` between them: the compiled forwards share code objects, and past dynamo's
        recompile limit later runs silently go eager).
        seed: data order, augmentation and initialisation. eval_every: steps between evaluations (0: only at the
        start and at the end of each stage); eval_batch_size; eval_at_start: evaluate before stage 1.
        save_every: steps between checkpoints (0: at stage ends only); keep_checkpoints: how many to keep.
        log_every: steps between log records. cpu: run on the CPU even where an accelerator exists.
    Budget:
        time_budget: seconds of GPU time (synchronised wall clock × processes, evaluations excluded) for stages 1 and
            2 together; None: the step counts as given. Stage 2 then runs at most ``stage2_steps``: after 10 +
            ``calibrate_steps`` steps it times itself and shortens its step count, its cosine schedule and PRepBN's
            λ schedule (in proportion) to fit what stage 1 left. A slower mixer gets fewer steps, never more time.
    """

    output_calibration: bool = True
    stage1_steps: int = 200
    stage1_batch_size: int = 64
    stage1_lr: float = 1e-3
    stage1_weight_decay: float = 0.0
    stage1_warmup: float = 0.05
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = ("qkv", "proj")
    stage2_steps: int = 1000
    stage2_batch_size: int = 64
    stage2_lr: float = 1e-4
    stage2_weight_decay: float = 0.05
    stage2_warmup: float = 0.05
    stage2_added_lr_mult: float = 1.0
    finetune: str = "all"
    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 1.0
    label_smoothing: float = 0.0
    feature_weight: float = 0.0
    feature_site: str = "block"
    prepbn_steps: int | None = None
    recalibrate_steps: int = 50
    reparameterize: bool = False
    crop_padding: int = 4
    flip: bool = True
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    grad_accum: int = 1
    mixed_precision: str = "auto"
    grad_clip: float = 1.0
    compile: bool = False
    seed: int = 0
    eval_every: int = 0
    eval_batch_size: int = 256
    eval_at_start: bool = True
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    cpu: bool = False
    time_budget: float | None = None
    calibrate_steps: int = 30

    def __post_init__(self):
        check_fields(self,
                     ints_ge0=("stage1_steps", "stage2_steps", "lora_rank", "recalibrate_steps", "crop_padding",
                               "eval_every", "save_every", "seed"),
                     ints_ge1=("stage1_batch_size", "stage2_batch_size", "grad_accum", "eval_batch_size",
                               "keep_checkpoints", "log_every", "calibrate_steps"),
                     positive=("stage1_lr", "stage2_lr", "temperature"),
                     nonnegative=("stage1_weight_decay", "stage2_weight_decay", "stage2_added_lr_mult", "kd_weight",
                                  "ce_weight", "feature_weight", "grad_clip", "mixup_alpha", "cutmix_alpha"),
                     fractions=("stage1_warmup", "stage2_warmup", "label_smoothing", "mix_prob"))
        hint = suggest(str(self.finetune), ["all", "added"])
        _check(self.finetune in ("all", "added"), f"finetune must be 'all' or 'added', got {self.finetune!r}{hint}")
        _check(self.feature_site in FEATURE_SITES,
               f"feature_site must be 'attention' or 'block', got {self.feature_site!r}"
               f"{suggest(str(self.feature_site), FEATURE_SITES)}")
        check_mixed_precision(self.mixed_precision)
        _check(self.kd_weight > 0 or self.ce_weight > 0, "kd_weight and ce_weight cannot both be 0")
        _check(self.lora_alpha is None or self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        targets = (self.lora_targets,) if isinstance(self.lora_targets, str) else tuple(self.lora_targets)
        _check(len(targets) > 0 and all(isinstance(t, str) for t in targets),
               f"lora_targets must be a list of child names, got {self.lora_targets!r}")
        object.__setattr__(self, "lora_targets", targets)
        check_fields(self, optional_ints_ge1=("prepbn_steps",), optional_positive=("time_budget",),
                     flags=("reparameterize", "flip", "compile", "eval_at_start", "cpu"))

    @property
    def default_prepbn_steps(self) -> int:
        """PRepBN's T when ``prepbn_steps`` is not given: 0.8 × the stage-2 training forwards (METHODS.md §6.4)."""
        return max(1, int(0.8 * self.stage2_steps * self.grad_accum))


def load_distill_config(path: str | os.PathLike, **overrides) -> DistillConfig:
    """A :class:`DistillConfig` from a YAML recipe (``configs/distill-*.yaml``) with keyword overrides."""
    return DistillConfig.load(path, **overrides)
