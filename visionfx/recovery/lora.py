"""Low-rank adapters on the host projections of patched attention sites, for attention transfer.

``add_lora(model, targets=("qkv", "proj"), rank=8)`` wraps those ``nn.Linear`` children of every
:class:`~visionfx.patches.base.PatchedAttention` in a :class:`LoRALinear`: ``y = W x + b + (α/r)·B A x`` with ``A``
``[r, in]`` random (Kaiming-uniform, as in LoRA) and ``B`` ``[out, r]`` zero, so the layer starts unchanged.
``merge_lora(model)`` folds ``(α/r)·B A`` into ``W`` and puts the original Linear objects back (now holding the merged
weights), so that the model has its usual structure for fine-tuning, saving and ``visionfx.unpatch``.

The adapter parameters are named ``lora_a``/``lora_b`` (no ``vfx_`` component): they never reach
``save_pretrained``, which is right because they exist only until :func:`merge_lora`. While the adapters are
disabled (:func:`set_lora_enabled`, used by the attention-transfer teacher pass) the wrapper computes the original
Linear exactly.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

__all__ = ["LoRALinear", "add_lora", "merge_lora", "set_lora_enabled", "lora_parameters"]


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) · (x Aᵀ) Bᵀ`` for ``x [..., in] -> [..., out]``; ``base`` is the wrapped Linear."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank, self.alpha = int(rank), float(alpha)
        self.scaling = self.alpha / self.rank
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.enabled = True

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        a, b = self.lora_a.to(x.dtype), self.lora_b.to(x.dtype)
        return y + self.scaling * ((x @ a.t()) @ b.t())

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base Linear with ``(alpha/rank)·B A`` added to its weight (in place)."""
        delta = (self.lora_b.double() @ self.lora_a.double()) * self.scaling
        self.base.weight.add_(delta.to(self.base.weight.dtype))
        return self.base

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, enabled={self.enabled}"


def _sites(model: nn.Module):
    from visionfx.patches.base import PatchedAttention

    return [(name, m) for name, m in model.named_modules() if isinstance(m, PatchedAttention)]


def add_lora(model: nn.Module, targets: Iterable[str] = ("qkv", "proj"), rank: int = 8,
             alpha: float | None = None) -> list[str]:
    """Wrap the Linear children ``targets`` of every patched attention site; returns the wrapped paths.

    Raises:
        ValueError: the model has no patched attention sites, or a site has no Linear child of a target's name
            (e.g. open_clip's ``nn.MultiheadAttention`` keeps its input projection as ``in_proj_weight``, a bare
            parameter: use ``targets=("out_proj",)`` there).
    """
    sites = _sites(model)
    if not sites:
        raise ValueError("add_lora: the model has no patched attention sites (patch it first)")
    targets = tuple(targets)
    wrapped = []
    for name, site in sites:
        for t in targets:
            child = site._modules.get(t)
            if isinstance(child, LoRALinear):
                raise RuntimeError(f"{name}.{t} already carries a LoRA adapter")
            if not isinstance(child, nn.Linear):
                linears = [n for n, c in site.named_children() if isinstance(c, nn.Linear)]
                raise ValueError(f"LoRA target {t!r}: {name} ({type(site).__name__}) has no Linear child of that name; "
                                 f"its Linear children are {linears}")
            setattr(site, t, LoRALinear(child, rank, rank if alpha is None else alpha))
            wrapped.append(f"{name}.{t}" if name else t)
    return wrapped


def merge_lora(model: nn.Module) -> int:
    """Fold every :class:`LoRALinear` under a patched site into its base Linear and unwrap it; returns how many."""
    count = 0
    for _, site in _sites(model):
        for t, child in list(site._modules.items()):
            if isinstance(child, LoRALinear):
                setattr(site, t, child.merged())
                count += 1
        site._sync_host()  # the host module gets its plain Linear children back too
    return count


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.enabled = enabled


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_a, m.lora_b)]
