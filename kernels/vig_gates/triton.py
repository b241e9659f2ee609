"""vig's log-decays as one Triton kernel: same signature as :func:`.reference.vig_gates_reference`.

A program computes a ``[BM, BN]`` tile of ``g = z W2ᵀ + b2`` (a tensor-core product when z and W2 share a 16-bit
dtype, whose products are exact in the fp32 accumulator; an IEEE fp32 product otherwise) and writes
``logsigmoid(g)/n = (min(g, 0) − log1p(exp(−|g|)))/n`` once, in fp32 (no exponential of a positive number). The
PyTorch composition writes the fp32 logits, reads them back for the softplus and writes the result (ViT-S at 1024²,
B = 16: 2 × 200 MB more traffic per layer). Used without autograd (inference); under ``torch.compile`` it is the
custom op ``visionfx::vig_gates`` (one opaque node).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["vig_gates_triton"]

BM, BN = 64, 128  # rows (tokens) and columns (gate channels) per program


@triton.jit
def _vig_gates(Z, W, Bias, A, M, NC, R, inv_n, z_m, w_c, a_m,
               BR: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, EXACT16: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    rr = tl.arange(0, BR)
    rm, cm = rows < M, cols < NC
    z = tl.load(Z + rows[:, None].to(tl.int64) * z_m + rr[None, :], mask=rm[:, None] & (rr < R)[None, :], other=0.0)
    w = tl.load(W + cols[:, None] * w_c + rr[None, :], mask=cm[:, None] & (rr < R)[None, :], other=0.0)
    if EXACT16:  # two 16-bit operands of one dtype: their products are exact in the fp32 accumulator
        g = tl.dot(z, tl.trans(w))
    else:
        g = tl.dot(z.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
    g += tl.load(Bias + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
    # log1p(x) for x = exp(−|g|) ∈ (0, 1], to full relative precision: log(1 + x)·x / ((1 + x) − 1)
    x = tl.exp(-tl.abs(g))
    u = 1.0 + x
    log1p = tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))
    a = (tl.minimum(g, 0.0) - log1p) * inv_n
    tl.store(A + rows[:, None].to(tl.int64) * a_m + cols[None, :], a, mask=rm[:, None] & cm[None, :])


def vig_gates_triton(z, weight, bias, normalizer):
    if torch.compiler.is_compiling():
        return _gates_op(z, weight, bias, float(normalizer))
    lead, r = z.shape[:-1], z.shape[-1]
    z2 = z.reshape(-1, r)
    if z2.stride(-1) != 1:
        z2 = z2.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    M, NC = z2.shape[0], weight.shape[0]
    a = torch.empty((M, NC), device=z.device, dtype=torch.float32)
    _vig_gates[(triton.cdiv(M, BM), triton.cdiv(NC, BN))](
        z2, weight, bias, a, M, NC, r, 1.0 / float(normalizer), z2.stride(0), weight.stride(0), a.stride(0),
        BR=max(16, triton.next_power_of_2(r)), BM=BM, BN=BN,
        EXACT16=z.dtype == weight.dtype and z.dtype in (torch.bfloat16, torch.float16), num_warps=4,
    )
    return a.view(*lead, NC)


@torch.library.custom_op("visionfx::vig_gates", mutates_args=())
def _gates_op(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, normalizer: float) -> torch.Tensor:
    return vig_gates_triton(z, weight, bias, normalizer)


@_gates_op.register_fake
def _gates_fake(z, weight, bias, normalizer):
    return z.new_empty((*z.shape[:-1], weight.shape[0]), dtype=torch.float32)
