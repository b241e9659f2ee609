"""DyVTE's router step (MLLM.md §2.1-2.2) in PyTorch: the specification of the Triton kernels.

The text span of each sample is given as gather indices (:class:`visionfx.methods.dyvte_router.TextSpan`):
``index [B, S + 1]`` long holds the span positions padded to the longest span ``S`` (padding entries point at any
valid position and have weight 0) and then the final prompt position; ``weights [B, S, 1]`` fp32 0/1, ``count [B, 1]``
fp32 ≥ 1 (the span length).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["span_features_reference", "router_logits_reference"]


def span_features_reference(hidden, index, weights, count):
    """``hidden [B, L, D]`` (a decoder layer's output) -> router input ``[B, 2D]`` in hidden's dtype:
    ``concat(Σ_s w_s·hidden[index_s] / count, hidden[index_S])``, the mean accumulated in fp32 (fp64 stays fp64)
    and cast once."""
    h = hidden.detach()
    rows = h.gather(1, index[..., None].expand(-1, -1, h.shape[-1]))
    width = weights.shape[1]
    mean = (rows[:, :width] * weights).sum(1) / count  # promoted to fp32 (fp64 stays fp64); 0/1 weights
    return torch.cat([mean.to(h.dtype), rows[:, width]], dim=-1)


def router_logits_reference(hidden, index, weights, count, w1, w2):
    """Router logits ``[B, 2]`` (index 0 keep, 1 exit) in fp32 (fp64 for fp64 weights), on ``w1``'s device.

    ``w2 · GELU(w1 · x)`` with ``x`` = :func:`span_features_reference` cast to ``w1``'s dtype, ``w1 [Hd, 2D]``,
    ``w2 [2, Hd]`` (the router's ``nn.Linear`` weights), exact-erf GELU. The hidden activations stay in the
    accumulation dtype (the router module's forward, which training uses, rounds them to the weights' dtype)."""
    acc = torch.float64 if w1.dtype == torch.float64 else torch.float32
    x = span_features_reference(hidden, index, weights, count).to(w1.device, w1.dtype)
    h = F.gelu(x.to(acc) @ w1.to(acc).t())
    return h @ w2.to(acc).t()
