"""The local term as one Triton kernel: same signature as :func:`.reference.patch_dwconv_reference`.

A program owns ``BLOCK_T`` consecutive token rows of one sample and one head: for each of the ``k²`` taps it loads
the neighbours' V rows (masked at the grid's edges; they come from L1/L2, each row is read from memory once), sums
``w · v`` in fp32, adds the bias and the op's output and writes the result once, rounded to the output's dtype.
The PyTorch composition copies V's patch rows into a channels-last tensor, convolves it into another and adds that
to the output's patch rows through strided views: about seven activations of traffic and three launches against three
activations and one launch here (ViT-S/16 at 224², B = 256, on the H200: docs/benchmarks.md, twelfth series). No
backward: the mixers use it without autograd only. Under ``torch.compile`` it is the custom op
``visionfx::patch_dwconv`` (one opaque node, out of place: the result is a new token-layout tensor and ``o`` is left
as it is, whatever ``inplace`` says).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["patch_dwconv_triton"]

BLOCK_T = 32  # token rows per program (H200, bf16, ViT-S/16 shapes: 32 rows at 4 warps beat 16 and 64)


@triton.jit
def _dwconv_add(O, V, Wt, Bias, Y, N, P0, H, W, row0, w_b, w_h, b_h,
                o_b, o_h, o_n, v_b, v_h, v_n, y_b, y_h, y_n,
                D: tl.constexpr, BD: tl.constexpr, KS: tl.constexpr, HAS_BIAS: tl.constexpr,
                BLOCK_T: tl.constexpr):
    """Grid ``(B, cdiv(N − row0, BLOCK_T), h)``: rows ``[row0, N)`` of ``Y = O + conv(V)`` (prefix rows copied).
    Head ``g``'s weights start ``g·w_h`` taps-rows in and its bias ``g·b_h`` (0 for kernels shared by the heads)."""
    b, blk, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bb = b.to(tl.int64)
    n = row0 + blk * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BD)
    em = e < D
    rm = n < N
    t = n - P0
    patch = rm & (t >= 0)
    ty = t // W
    tx = t - ty * W
    # the neighbour (i, j) of token n is token n + (i − k//2)·W + (j − k//2): one scalar offset from the same
    # pointers
    ptr = V + bb * v_b + g * v_h + n[:, None] * v_n + e[None, :]
    wbase = Wt + bb * w_b + g * w_h + e * (KS * KS)
    acc = tl.zeros([BLOCK_T, BD], tl.float32)
    for i in tl.static_range(KS):
        sy = ty + (i - KS // 2)
        row_ok = patch & (sy >= 0) & (sy < H)
        for j in tl.static_range(KS):
            sx = tx + (j - KS // 2)
            ok = row_ok & (sx >= 0) & (sx < W)
            val = tl.load(ptr + ((i - KS // 2) * W + (j - KS // 2)) * v_n, mask=ok[:, None] & em[None, :], other=0.0)
            wv = tl.load(wbase + (i * KS + j), mask=em, other=0.0)
            acc += val.to(tl.float32) * wv.to(tl.float32)[None, :]
    if HAS_BIAS:
        bias = tl.load(Bias + g * b_h + e, mask=em, other=0.0).to(tl.float32)
        acc += tl.where(patch[:, None], bias[None, :], 0.0)
    m2 = rm[:, None] & em[None, :]
    o = tl.load(O + bb * o_b + g * o_h + n[:, None] * o_n + e[None, :], mask=m2, other=0.0)
    tl.store(Y + bb * y_b + g * y_h + n[:, None] * y_n + e[None, :], (o.to(tl.float32) + acc).to(Y.dtype.element_ty),
             mask=m2)


def patch_dwconv_triton(o, v, weight, bias, *, grid, num_prefix_tokens, inplace=False):
    """See :func:`.reference.patch_dwconv_reference`. Inputs with any strides (a last dim that is not contiguous is
    copied); the sum is formed in fp32 and rounded once into ``o``'s dtype. Out of place the result is token-layout
    memory; in place only the patch rows of ``o`` are written (eager calls only: see the module docstring)."""
    B, h, N, d = o.shape
    P0, (H, W) = int(num_prefix_tokens), (int(grid[0]), int(grid[1]))
    C, ks = h * d, weight.shape[-1]
    if H * W != N - P0:
        raise ValueError(f"grid {H}x{W} does not match {N} tokens with {P0} prefix tokens")
    if v.shape != o.shape:
        raise ValueError(f"v must have o's shape {tuple(o.shape)}, got {tuple(v.shape)}")
    shared = weight.dim() == 4 and weight.shape[1] == 1 and weight.shape[0] in (C, d)
    if weight.dim() != 4 or ks % 2 == 0 or weight.shape[-2] != ks or not (shared or tuple(weight.shape[:2]) == (B, C)):
        raise ValueError(f"weight must be [{C}, 1, k, k], [{d}, 1, k, k] (shared by the heads) or [{B}, {C}, k, k] "
                         f"with k odd, got {tuple(weight.shape)}")
    per_head = 0 if shared and weight.shape[0] == d else 1  # 0: the heads share the kernels
    if bias is not None and tuple(bias.shape) != (C if per_head else d,):
        raise ValueError(f"bias must be [{C if per_head else d}] for weights {tuple(weight.shape)}, "
                         f"got {tuple(bias.shape)}")
    if torch.compiler.is_compiling():
        return _dwconv_op(o, v, weight, bias, H, W, P0)
    w = weight.reshape(-1, weight.shape[0] if shared else C, ks * ks).contiguous()
    b = bias.contiguous() if bias is not None else w  # w: a placeholder the kernel never reads
    v = v if v.stride(-1) == 1 else v.contiguous()
    if inplace and o.stride(-1) == 1:
        y, row0 = o, P0  # prefix rows stay as they are
    else:
        y, row0 = o.new_empty((B, N, h, d)).transpose(1, 2), 0
    src = o if o.stride(-1) == 1 else o.contiguous()
    if N > row0:
        _dwconv_add[(B, triton.cdiv(N - row0, BLOCK_T), h)](
            src, v, w, b, y, N, P0, H, W, row0, 0 if shared else w.stride(0), per_head * d * ks * ks, per_head * d,
            src.stride(0), src.stride(1), src.stride(2), v.stride(0), v.stride(1), v.stride(2),
            y.stride(0), y.stride(1), y.stride(2),
            D=d, BD=max(16, triton.next_power_of_2(d)), KS=ks, HAS_BIAS=bias is not None, BLOCK_T=BLOCK_T,
            num_warps=4,
        )
    if inplace and y is not o:
        o.copy_(y)
        return o
    return y


@torch.library.custom_op("visionfx::patch_dwconv", mutates_args=())
def _dwconv_op(o: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], H: int, W: int,
               P0: int) -> torch.Tensor:
    return patch_dwconv_triton(o, v, weight, bias, grid=(H, W), num_prefix_tokens=P0, inplace=False)


@_dwconv_op.register_fake
def _dwconv_fake(o, v, weight, bias, H, W, P0):
    B, h, N, d = o.shape
    return o.new_empty((B, N, h, d)).transpose(1, 2)
