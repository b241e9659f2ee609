"""vig's log-decays from the low-rank gate (METHODS.md §7.1): ``logsigmoid(z W2ᵀ + b2) / n`` in fp32 (float64 for
float64 inputs), whatever the parameters' dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["vig_gates_reference"]


def vig_gates_reference(z, weight, bias, normalizer):
    """``z [..., r]`` (the gate's rank-wide input), ``weight [2C, r]``, ``bias [2C]`` -> log-decays ``[..., 2C]``.

    ``logsigmoid(g)/n = softplus(g/n; β = −n)``: one pass over the fp32 logits instead of two, with 1/n folded into
    the small W2 and b2; past the threshold (−g > 40) softplus returns g/n, which is logsigmoid(g)/n to within e^-40
    relative, and never exponentiates a large number."""
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    n = normalizer
    u = F.linear(z.to(acc), weight.to(acc) / n, bias.to(acc) / n).to(acc)
    return F.softplus(u, beta=-n, threshold=40.0)
