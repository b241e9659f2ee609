"""DyVTE's router step as two Triton kernels: same signature as :func:`.reference.router_logits_reference`.

The step runs after every decoder layer of the prefill until the sample exits, and the host reads its decision (the
next layer's shapes depend on it), so its cost is latency: the PyTorch composition needs about fifteen launches
(gather, weighting, sum, division, casts, concatenation, two products, GELU); here three (H200, LLaVA-1.5-7B widths:
about 75 µs of host time and 20 µs of GPU time per step, against 150–190 µs queued for the reference):

1. ``_span_mean``, one program per (sample, block of channels): the fp32 mean over the span's rows (read by gather
   index, never a pass over the sequence) and the final prompt row, written as the ``[B, 2D]`` input in the hidden
   dtype;
2. ``_router_mlp``, one program per block of router units for up to 64 samples (so ``w1`` is read once): the tensor-
   core product with fp32 accumulation, the exact-erf GELU in fp32 and each block's share of the two logits,
   written to ``[B, 2, P]`` partials that one ``sum`` adds in a fixed order (deterministic, unlike atomics).

Inputs: ``hidden [B, L, D]`` with unit channel stride (other strides free); ``w1``, ``w2`` in hidden's dtype on its
device; fp32 inputs use IEEE fp32 products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["router_logits_triton"]

BD = 256  # channels per _span_mean program
BH = 16  # router units per _router_mlp program
STAGE_BYTES = 40 * 1024  # operand tiles per pipeline stage (3 stages)


def _reduction_step(BB: int, itemsize: int) -> int:
    """Channels per _router_mlp step: 512 for 16-bit inputs up to 16 samples (H200, B = 1 and 8: 12 µs against
    16 µs with 256), fewer where the ``[BB + BH, BK]`` tiles of three stages would not fit in shared memory."""
    fit = STAGE_BYTES // ((BB + BH) * itemsize)
    return max(64, min(512, 1 << (fit.bit_length() - 1)))  # the largest power of two that fits


@triton.jit
def _span_mean(H, Idx, Wt, Cnt, X, S, D, h_b, h_l, i_b, w_b, x_b, BD: tl.constexpr):
    b = tl.program_id(0)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    cm = cols < D
    base = H + b.to(tl.int64) * h_b
    acc = tl.zeros([BD], tl.float32)
    for s in range(S):
        pos = tl.load(Idx + b * i_b + s).to(tl.int64)
        w = tl.load(Wt + b * w_b + s)
        acc += w * tl.load(base + pos * h_l + cols, mask=cm, other=0.0).to(tl.float32)
    mean = acc / tl.load(Cnt + b)
    out = X + b.to(tl.int64) * x_b
    tl.store(out + cols, mean.to(X.dtype.element_ty), mask=cm)
    end = tl.load(Idx + b * i_b + S).to(tl.int64)
    tl.store(out + D + cols, tl.load(base + end * h_l + cols, mask=cm), mask=cm)


@triton.jit
def _router_mlp(X, W1, W2, P, B, K, HD, x_b, w1_h, w2_c, p_b, p_c,
                BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.program_id(1) * BB + tl.arange(0, BB)
    units = pid * BH + tl.arange(0, BH)
    rm, um = rows < B, units < HD
    acc = tl.zeros([BB, BH], tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        km = ks < K
        x = tl.load(X + rows[:, None].to(tl.int64) * x_b + ks[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        w = tl.load(W1 + units[:, None].to(tl.int64) * w1_h + ks[None, :], mask=um[:, None] & km[None, :],
                    other=0.0)
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:  # 16-bit operands: exact products in the fp32 accumulator
            acc = tl.dot(x, tl.trans(w), acc)
    h = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    keep = tl.load(W2 + units, mask=um, other=0.0).to(tl.float32)
    leave = tl.load(W2 + w2_c + units, mask=um, other=0.0).to(tl.float32)
    out = P + rows.to(tl.int64) * p_b + pid
    tl.store(out, tl.sum(h * keep[None, :], axis=1), mask=rm)
    tl.store(out + p_c, tl.sum(h * leave[None, :], axis=1), mask=rm)


def router_logits_triton(hidden, index, weights, count, w1, w2):
    B, _, D = hidden.shape
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    index, weights, count = index.contiguous(), weights.contiguous(), count.contiguous()
    w1 = w1 if w1.stride(-1) == 1 else w1.contiguous()
    w2 = w2 if w2.stride(-1) == 1 else w2.contiguous()
    S = weights.shape[1]
    x = torch.empty((B, 2 * D), device=hidden.device, dtype=hidden.dtype)
    _span_mean[(B, triton.cdiv(D, BD))](hidden, index, weights, count, x, S, D, hidden.stride(0), hidden.stride(1),
                                        index.stride(0), weights.stride(0), x.stride(0), BD=BD, num_warps=4)
    HD = w1.shape[0]
    blocks = triton.cdiv(HD, BH)
    BB = min(64, max(16, triton.next_power_of_2(B)))
    partial = torch.empty((B, 2, blocks), device=hidden.device, dtype=torch.float32)
    _router_mlp[(blocks, triton.cdiv(B, BB))](x, w1, w2, partial, B, 2 * D, HD, x.stride(0), w1.stride(0),
                                              w2.stride(0), partial.stride(0), partial.stride(1), BB=BB, BH=BH,
                                              BK=_reduction_step(BB, hidden.element_size()),
                                              IEEE=hidden.dtype == torch.float32, num_warps=4, num_stages=3)
    return partial.sum(-1)
