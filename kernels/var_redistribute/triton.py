"""VAR's redistribution as one Triton kernel: same signature as :func:`.reference.redistribute`.

One program per (sample, head, row) walks the row twice: first the four row masses (image, visual sink, all sinks,
receivers = image ∖ sinks) accumulated in float64 from the fp32 weights, then the head test and the update
``α' = α + α·([sel]·(−p·[sink]) + c·[receiver])``, ``c = p·Σ sinks / Σ receivers``, written straight into ``out`` in
its dtype (the caller's bf16 weights, in place). Rows that are not selected are written back unchanged. The reference
needs about fifteen launches per call (a float64 copy, a batched matmul, the head test, the update, the cast); at
batch 1 and in decoding, where each call touches a few rows, their host cost was VAR's whole overhead.

The column masks are read from ``image``/``sinks`` directly (``masks`` is accepted for the common signature and
ignored). Inputs: ``attn [B, H, Q, S]`` fp32 with a contiguous last dimension (any other strides), ``image``/``sinks
[B, ≥S]`` bool (the first S columns count), ``rows [B, Q]`` bool (any strides, expanded views included).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from visionfx.kernels.var_redistribute.reference import CODE_EPS

__all__ = ["redistribute_triton"]


@triton.jit
def _var_rows(A, O, IMG, SNK, ROWS, H, Q, S,
              a_b, a_h, a_q, o_b, o_h, o_q, m_b, n_b, r_b, r_q,
              p, rho, summ, eps, code_eps,
              OFFICIAL: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    q = pid % Q
    h = (pid // Q) % H
    b = pid // (Q * H)
    a_row = A + b.to(tl.int64) * a_b + h.to(tl.int64) * a_h + q.to(tl.int64) * a_q
    o_row = O + b.to(tl.int64) * o_b + h.to(tl.int64) * o_h + q.to(tl.int64) * o_q
    img_row = IMG + b.to(tl.int64) * m_b
    snk_row = SNK + b.to(tl.int64) * n_b
    cols = tl.arange(0, BLOCK)
    v_img = tl.zeros([BLOCK], tl.float64)
    v_vs = tl.zeros([BLOCK], tl.float64)
    v_snk = tl.zeros([BLOCK], tl.float64)
    v_rcv = tl.zeros([BLOCK], tl.float64)
    v_n = tl.zeros([BLOCK], tl.float64)
    for start in range(0, S, BLOCK):
        c = start + cols
        m = c < S
        a = tl.load(a_row + c, mask=m, other=0.0).to(tl.float64)
        img = tl.load(img_row + c, mask=m, other=0) != 0
        snk = tl.load(snk_row + c, mask=m, other=0) != 0
        v_img += tl.where(img, a, 0.0)
        v_vs += tl.where(img & snk, a, 0.0)
        v_snk += tl.where(snk, a, 0.0)
        v_rcv += tl.where(img & ~snk, a, 0.0)
        v_n += img.to(tl.float64)
    s_img = tl.sum(v_img, 0)
    s_vs = tl.sum(v_vs, 0)
    s_rcv = tl.sum(v_rcv, 0)
    budget = p * tl.sum(v_snk, 0)
    if OFFICIAL:
        head_ok = (s_vs / (s_img + tl.sum(v_n, 0) * code_eps) <= 1 - rho) & (s_img >= summ)
        denom = tl.where(s_rcv > 0, s_rcv, 1.0)
    else:
        head_ok = (s_img >= summ) & (s_rcv / (s_img + eps) >= rho)
        denom = tl.maximum(s_rcv, eps)
    sel = head_ok & (tl.load(ROWS + b.to(tl.int64) * r_b + q.to(tl.int64) * r_q) != 0)
    c_rcv = tl.where(sel, budget / denom, 0.0).to(tl.float32)
    c_snk = tl.where(sel, -p, 0.0).to(tl.float32)
    for start in range(0, S, BLOCK):
        c = start + cols
        m = c < S
        a = tl.load(a_row + c, mask=m, other=0.0)
        img = tl.load(img_row + c, mask=m, other=0) != 0
        snk = tl.load(snk_row + c, mask=m, other=0) != 0
        scale = tl.where(snk, c_snk, 0.0) + tl.where(img & ~snk, c_rcv, 0.0)
        tl.store(o_row + c, (a + a * scale).to(O.dtype.element_ty), mask=m)


def redistribute_triton(attn: torch.Tensor, image: torch.Tensor, sinks: torch.Tensor, rows: torch.Tensor, p: float,
                        rho: float, summ: float, eps: float = 1e-6, official: bool = False,
                        masks: tuple[torch.Tensor, torch.Tensor] | None = None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """See :func:`visionfx.kernels.var_redistribute.reference.redistribute` (``masks`` is ignored here)."""
    if attn.dtype != torch.float32:
        raise ValueError(f"redistribute_triton takes fp32 weights, got {attn.dtype}")
    if attn.requires_grad:
        raise ValueError("redistribute_triton has no backward; use the reference where gradients are needed")
    B, H, Q, S = attn.shape
    if attn.stride(-1) != 1:
        attn = attn.contiguous()
    if out is None:
        out = torch.empty_like(attn)
    elif out.shape != attn.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be a {tuple(attn.shape)} tensor with a contiguous last dimension")
    if B * H * Q == 0 or S == 0:
        return out
    # wider masks are read as they are (the kernel masks columns ≥ S): no slicing on the per-step path
    img, snk = (t if t.stride(-1) == 1 else t[:, :S].contiguous() for t in (image, sinks))
    img, snk, sel = img.view(torch.uint8), snk.view(torch.uint8), rows.view(torch.uint8)
    block = min(triton.next_power_of_2(S), 2048)
    _var_rows[(B * H * Q,)](
        attn, out, img, snk, sel, H, Q, S,
        attn.stride(0), attn.stride(1), attn.stride(2), out.stride(0), out.stride(1), out.stride(2),
        img.stride(0), snk.stride(0), sel.stride(0), sel.stride(1),
        float(p), float(rho), float(summ), float(eps), CODE_EPS,
        OFFICIAL=bool(official), BLOCK=block, num_warps=4 if block <= 1024 else 8,
    )
    return out
