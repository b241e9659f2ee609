"""vig's output stage in PyTorch (METHODS.md §7.3): per-head RMSNorms of the scan output and of the layer's
(convolved) input, mixed by a sigmoid gate, optionally SiLU, written from scan order into host order."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["vig_output_reference", "normed_mix", "host_segments"]


def normed_mix(o, xs, logits, w_o, w_l, eps):
    """``(ô, l̂, G)`` in ``[B, N, h, d]`` scan order and the promoted dtype of o and xs: ``ô = RMSNorm(o)·w_o``,
    ``l̂ = RMSNorm(xs)·w_l`` per head, ``G = sigmoid(logits)``. ``o [B, h, N, d]`` is normalised in whichever of its
    two layouts is contiguous, so the norm copies nothing."""
    B, h, N, d = o.shape
    dtype = torch.promote_types(o.dtype, xs.dtype)
    o_t = o.transpose(1, 2)
    if o_t.is_contiguous():
        o_hat = F.rms_norm(o_t, (d,), w_o, eps)
    else:
        o_hat = F.rms_norm(o, (d,), w_o, eps).transpose(1, 2)
    l_hat = F.rms_norm(xs.unflatten(-1, (h, d)), (d,), w_l, eps)
    gate = logits.sigmoid().unflatten(-1, (h, d))
    return o_hat.to(dtype), l_hat.to(dtype), gate.to(dtype)


def host_segments(num_prefix: int, num_patches: int, index: int) -> list[tuple[int, int, int]]:
    """``(scan start, host start, length)`` of the three token ranges: patches before ``index``, the prefix tokens
    (scanned at ``index``), the other patches."""
    after = index + num_prefix
    segs = [(0, num_prefix, index), (index, 0, num_prefix), (after, after, num_patches - index)]
    return [s for s in segs if s[2] > 0]


def vig_output_reference(o, xs, logits, w_o, w_l, *, eps, num_prefix, scan_index, silu):
    """y ``[B, N, h, d]`` (contiguous, host order) from scan-order ``o [B, h, N, d]``, ``xs [B, N, C]`` and the gate
    logits ``[B, N, C]``: ``y = l̂ + G·(ô − l̂)``, then SiLU if ``silu``. Inference only (no autograd graph is built
    through the three writes)."""
    B, h, N, d = o.shape
    o_hat, l_hat, gate = normed_mix(o, xs, logits, w_o, w_l, eps)
    y = o.new_empty((B, N, h, d), dtype=o_hat.dtype)
    for src, dst, n in host_segments(num_prefix, N - num_prefix, scan_index):
        torch.lerp(l_hat[:, src : src + n], o_hat[:, src : src + n], gate[:, src : src + n], out=y[:, dst : dst + n])
    return F.silu(y, inplace=True) if silu else y
