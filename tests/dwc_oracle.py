"""Float64 oracles of the patch-grid local term, shared by the mixer-glue and ``patch_dwconv`` kernel tests (no model
families imported, so the GPU tests run where open_clip is not installed)."""

from __future__ import annotations

import torch

F64 = torch.float64


def naive_dwc(v, weight, bias, P0, H, W):
    """v [B, h, N, d]; weight [C, k, k] or [B, C, k, k] (C = h·d, channel g·d + e); explicit taps, zero padding."""
    B, h, _, d = v.shape
    v = v.double()
    w = weight.double() if weight.dim() == 4 else weight.double().expand(B, *weight.shape)
    ks = w.shape[-1]
    out = torch.zeros(B, h, H * W, d, dtype=F64)
    for r in range(H):
        for c in range(W):
            acc = torch.zeros(B, h, d, dtype=F64) if bias is None else bias.double().view(h, d).expand(B, h, d).clone()
            for u in range(ks):
                for t in range(ks):
                    rr, cc = r + u - ks // 2, c + t - ks // 2
                    if 0 <= rr < H and 0 <= cc < W:
                        acc = acc + w[:, :, u, t].view(B, h, d) * v[:, :, P0 + rr * W + cc]
            out[:, :, r * W + c] = acc
    return out


def packed_qkv(B, N, h, d, seed=0, dtype=F64):
    """q, k, v as timm makes them: views of one [B, N, 3, h, d] projection (strided, not contiguous)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, 3, h, d, generator=g, dtype=dtype).permute(2, 0, 3, 1, 4).unbind(0)
