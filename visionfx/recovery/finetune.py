"""Stage 2 of recovery: end-to-end fine-tuning with logit distillation from the unpatched model (METHODS.md §10
step 3), and the PRepBN steps that follow it (§10 step 4, §6.4).

The teacher is a deep copy of the model taken before patching, frozen and in eval mode. The loss per batch is
``kd_weight · T²·KL(softmax(t/T) || softmax(s/T)) + ce_weight · CE(s, y)``, the cross-entropy only where the batch
has labels (hard labels with ``label_smoothing``, or the soft targets of mixup/cutmix). Both models see the same
(augmented) input. Optionally (``feature_weight > 0``) a per-layer feature term is added: at every patched site, the
student's output (``feature_site="attention"``) or the output of the block that holds it (``"block"``) is matched to
the teacher's at the same path, ``feature_weight · mean_l(‖s_l − t_l‖² / ‖t_l‖²)`` (each layer's squared error
relative to the teacher's power, so the weight is scale-free), as in hidden-state distillation (TinyBERT,
arXiv 1909.10351). A PRepBN model's λ schedule advances with every training-mode forward of the student, so its
length defaults to 0.8 × the stage's optimiser steps × gradient-accumulation micro-batches.

Stage 2 is for classifiers (outputs ``[B, K]`` logits); diffusion hosts need their own denoising objective.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from visionfx.recovery.config import FEATURE_SITES
from visionfx.recovery.engine import kd_loss

__all__ = ["DistillationLoss", "FeatureTaps", "feature_taps", "prepbn_norms", "recalibrate", "freeze_teacher"]


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class FeatureTaps:
    """The outputs of ``modules`` at their latest forward (forward hooks; the first tensor of a tuple output).
    Hooks registered before ``torch.compile`` are traced with the module, so the outputs keep their graph."""

    def __init__(self, modules: list[nn.Module]):
        self.outputs: list[torch.Tensor | None] = [None] * len(modules)
        self.handles = [m.register_forward_hook(self._recorder(i)) for i, m in enumerate(modules)]

    def _recorder(self, i: int):
        def record(module, args, out):
            self.outputs[i] = out if isinstance(out, torch.Tensor) else out[0]
        return record

    def take(self) -> list[torch.Tensor]:
        """The recorded outputs, released from the taps (so no graph outlives its step)."""
        out, self.outputs = self.outputs, [None] * len(self.outputs)
        if any(t is None for t in out):
            raise RuntimeError("feature distillation: the forward did not reach every tapped module")
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def feature_taps(student: nn.Module, teacher: nn.Module, site: str) -> tuple[FeatureTaps, FeatureTaps]:
    """Taps on the student's patched attention sites (``site="attention"``) or on the modules holding them
    (``"block"``), and on the teacher's modules at the same paths."""
    from visionfx.recovery.attention_transfer import attention_sites

    if site not in FEATURE_SITES:
        raise ValueError(f"feature_site must be one of {FEATURE_SITES}, got {site!r}")
    paths = [name if site == "attention" else name.rpartition(".")[0] for name, _ in attention_sites(student)]
    if not paths:
        raise ValueError("feature distillation needs a model with patched attention sites")
    if site == "block" and "" in paths:
        raise ValueError("feature_site='block': a patched site has no parent module; use 'attention'")
    modules = []
    for path in paths:
        try:
            modules.append((student.get_submodule(path), teacher.get_submodule(path)))
        except AttributeError:
            raise ValueError(f"feature distillation: the teacher has no module {path!r} to match the student's") from None
    return FeatureTaps([s for s, _ in modules]), FeatureTaps([t for _, t in modules])


def feature_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """``mean_l(‖s_l − t_l‖² / ‖t_l‖²)`` in float32."""
    terms = [(s.float() - t.float()).pow(2).mean() / t.float().pow(2).mean().clamp_min(1e-12)
             for s, t in zip(student, teacher)]
    return torch.stack(terms).mean()


class DistillationLoss:
    """``loss(x, y) -> (loss, {"kd", "ce"[, "feature"]})`` for student and teacher forwards (callables on ``x``);
    ``taps`` (``(student_taps, teacher_taps)`` from :func:`feature_taps`) with ``feature_weight > 0`` adds the
    feature term."""

    def __init__(self, student, teacher, *, temperature: float = 1.0, kd_weight: float = 1.0, ce_weight: float = 1.0,
                 label_smoothing: float = 0.0, feature_weight: float = 0.0,
                 taps: tuple[FeatureTaps, FeatureTaps] | None = None):
        if feature_weight > 0 and taps is None:
            raise ValueError("feature_weight > 0 needs the taps of student and teacher (feature_taps)")
        self.student, self.teacher = student, teacher
        self.temperature, self.kd_weight, self.ce_weight = temperature, kd_weight, ce_weight
        self.label_smoothing = label_smoothing
        self.feature_weight, self.taps = feature_weight, taps

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
        if self.taps is not None:
            feats = [taps.take() for taps in self.taps]
            if self.feature_weight > 0:
                feat = feature_loss(*feats)
                loss = loss + self.feature_weight * feat
                metrics["feature"] = feat.detach()
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
