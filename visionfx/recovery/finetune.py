"""Stage 2 of recovery: end-to-end fine-tuning with logit distillation from the unpatched model (METHODS.md §10
step 3), and the PRepBN steps that follow it (§10 step 4, §6.4).

The teacher is a deep copy of the model taken before patching, frozen and in eval mode. The loss per batch is
``kd_weight · T²·KL(softmax(t/T) || softmax(s/T)) + ce_weight · CE(s, y)``, the cross-entropy only where the batch
has labels (hard labels with ``label_smoothing``, or the soft targets of mixup/cutmix). Both models see the same
(augmented) input. A PRepBN model's λ schedule advances with every training-mode forward of the student, so its
length defaults to 0.8 × the stage's optimiser steps × gradient-accumulation micro-batches.

Stage 2 is for classifiers (outputs ``[B, K]`` logits); diffusion hosts need their own denoising objective.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from visionfx.recovery.engine import kd_loss

__all__ = ["DistillationLoss", "prepbn_norms", "recalibrate", "freeze_teacher"]


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class DistillationLoss:
    """``loss(x, y) -> (loss, {"kd", "ce"})`` for student and teacher forwards (callables on ``x``)."""

    def __init__(self, student, teacher, *, temperature: float = 1.0, kd_weight: float = 1.0, ce_weight: float = 1.0,
                 label_smoothing: float = 0.0):
        self.student, self.teacher = student, teacher
        self.temperature, self.kd_weight, self.ce_weight = temperature, kd_weight, ce_weight
        self.label_smoothing = label_smoothing

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            t = self.teacher(x)
        s = self.student(x)
        if not (isinstance(s, torch.Tensor) and s.dim() == 2):
            raise TypeError("distillation (stage 2) needs a classifier returning logits [B, K]; got "
                            f"{type(s).__name__}{tuple(s.shape) if isinstance(s, torch.Tensor) else ''}")
        metrics = {}
        loss = s.new_zeros((), dtype=torch.float32)
        if self.kd_weight > 0:
            kd = kd_loss(s, t, self.temperature)
            loss = loss + self.kd_weight * kd
            metrics["kd"] = kd.detach()
        if y is not None and self.ce_weight > 0:
            ce = F.cross_entropy(s.float(), y, label_smoothing=self.label_smoothing)
            loss = loss + self.ce_weight * ce
            metrics["ce"] = ce.detach()
        return loss, metrics


def prepbn_norms(model: nn.Module) -> list[nn.Module]:
    """The unfolded PRepBN norms of ``model``."""
    from visionfx.methods.prepbn import LinearNorm

    return [m for m in model.modules() if isinstance(m, LinearNorm) and m.folded is None]


def recalibrate(model: nn.Module, batches, steps: int, accelerator) -> None:
    """``visionfx.recalibrate_bn`` on ``steps`` batches of model inputs, then the BN statistics averaged over the
    processes (each process saw different batches)."""
    from visionfx import recalibrate_bn

    recalibrate_bn(model, batches, steps=steps)
    if accelerator.num_processes > 1:
        with torch.no_grad():
            for norm in prepbn_norms(model):
                bn = norm.vfx_bn.bn
                for stat in (bn.running_mean, bn.running_var):
                    stat.copy_(accelerator.reduce(stat, reduction="mean"))
