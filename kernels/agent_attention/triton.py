"""Triton kernels of agent attention: two softmax stages through n agents, fused, forward and backward.

Same signature and semantics as :func:`visionfx.kernels.agent_attention.reference.agent_attention_reference`
(without dropout). The n×N and N×n probability matrices never reach memory:

* aggregation (agents are the queries, flash-style over N, split over N when B·h is small, then a combine):
  ``VA = softmax(s1·A Kᵀ + B1) V`` → ``VA [B,h,n,d]`` fp32 and its log-sum-exp ``lse1 [B,h,n]``;
* broadcast (each program a run of up to 8 token blocks, loading the agents and ``VA`` once):
  ``O = softmax(s2·Q Aᵀ + B2) VA`` and ``lse2 [B,h,N]``.

Backward recomputes the probabilities from the saved log-sum-exps: the broadcast pass gives dQ and sums dVA and dA
over a chunk of tokens on chip (one atomic add per program); the aggregation pass then gives dK, dV and adds to dA
the same way. The batch-shared bias gradients dB1, dB2 come from separate passes over (token block, head) that loop
over the batch, so no two programs of the same batch element contend for an address. Biases are batch-independent
tables ``B1 [h,n,N]``, ``B2 [h,N,n]`` read in fp32 with any strides; the bias tiles, not Q, K, V, dominate the
forward's time (at B = 64, N = 4097 on the H200 it was about 1.07x the slab op's without biases), and a
token-contiguous B1 with 16-aligned rows (the agent mixer's layout, see ``_bias_args``) loads in vectors. The
``@jit`` kernels live in ``_triton_kernels``.
"""

from __future__ import annotations

import torch
import triton

from visionfx.kernels._triton_host import device_sm_count as _sm_count
from visionfx.kernels._triton_host import token_layout_output as _new_output
from visionfx.kernels.agent_attention._triton_kernels import (
    _agg_bwd, _agg_combine, _agg_fwd, _bcast_bwd, _bcast_fwd, _bias1_bwd, _bias2_bwd,
)

__all__ = ["agent_attention_triton"]


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(x)))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _blocks(n_agents: int, d: int) -> tuple[int, int, int, int]:
    """``(BA, BD, BN, BM)``: padded agents and head dim, token blocks of the aggregation and broadcast passes."""
    BA = _pow2(n_agents)
    return BA, _pow2(d), 64 if BA <= 64 else 32, 64 if BA <= 128 else 32


def _num_splits(bh: int, n: int, block: int, device) -> int:
    """Split the aggregation over N when B·h programs would leave the GPU idle."""
    if device.type != "cuda":
        return 1 if n <= 4 * block else 2
    sms = _sm_count(device)
    want = max(1, (2 * sms) // max(bh, 1))
    return int(max(1, min(want, triton.cdiv(n, 4 * block), 32)))


def _bias_args(bias, token_dim: int, q) -> tuple[torch.Tensor, tuple[int, int, int], int]:
    """``(table, (head, agent, token) strides, token bound)`` of a bias table for the kernels (``q`` and zeros
    stand in for an absent one).

    The bound is N rounded up to 16 when the table is token-contiguous with 16-aligned rows and has memory behind
    the padded tail of its last row (a view of a padded buffer, as the agent mixer builds them); the kernels then
    load it in vectors. Otherwise it is N, which works for any strides."""
    N = q.shape[2]
    if bias is None:
        return q, (0, 0, 0), N
    agent_dim = 3 - token_dim
    sh, sa, sn = bias.stride(0), bias.stride(agent_dim), bias.stride(token_dim)
    padded = triton.cdiv(N, 16) * 16
    last = bias.storage_offset() + (bias.shape[0] - 1) * sh + (bias.shape[agent_dim] - 1) * sa + padded
    vectors = (sn == 1 and sa % 16 == 0 and sh % 16 == 0 and bias.storage_offset() % 16 == 0
               and last * bias.element_size() <= bias.untyped_storage().nbytes())
    return bias, (sh, sa, sn), padded if vectors else N


def _bcast_tiles(bh: int, n: int, block: int, device) -> int:
    """Token blocks per program of the broadcast forward: up to 8 (the agents and ``VA`` are loaded once per
    program), while at least two programs per SM remain."""
    sms = _sm_count(device) if device.type == "cuda" else 2
    return int(max(1, min(8, triton.cdiv(n, block) * bh // (2 * sms))))


def _forward(q, k, v, agents, bias1, bias2, scale1, scale2):
    B, H, N, D = q.shape
    n = agents.shape[2]
    BA, BD, BN, BM = _blocks(n, D)
    BN = min(BN, 32)  # the aggregation forward adds a [BA, BN] bias tile per block: 32 tokens measured fastest
    prec = _precision(q.dtype)
    dev = q.device
    bh = B * H
    splits = _num_splits(bh, N, BN, dev)
    chunk = triton.cdiv(triton.cdiv(N, splits), BN) * BN
    splits = triton.cdiv(N, chunk)
    m_part = torch.empty(bh, splits, BA, device=dev, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(bh, splits, BA, BD, device=dev, dtype=torch.float32)
    b1, b1s, nb1 = _bias_args(bias1, 2, q)
    b2, b2s, nb2 = _bias_args(bias2, 1, q)
    _agg_fwd[(bh, splits)](
        agents, k, v, b1, m_part, l_part, acc_part,
        N, nb1, n, H, chunk, float(scale1),
        *agents.stride()[:3], *k.stride()[:3], *v.stride()[:3], *b1s,
        HAS_B1=bias1 is not None, D=D, BA=BA, BD=BD, BN=BN, PREC=prec, num_warps=4, num_stages=3,
    )
    va = torch.empty(bh, BA, BD, device=dev, dtype=torch.float32)
    lse1 = torch.zeros(bh, BA, device=dev, dtype=torch.float32)
    _agg_combine[(bh,)](m_part, l_part, acc_part, va, lse1, splits, n, BA=BA, BD=BD, num_warps=4)
    o_tok = _new_output(q)
    o = o_tok.transpose(1, 2)
    lse2 = torch.empty(bh, N, device=dev, dtype=torch.float32)
    chunk = BM * _bcast_tiles(bh, N, BM, dev)
    _bcast_fwd[(bh, triton.cdiv(N, chunk))](
        q, agents, va, b2, o, lse2,
        N, nb2, n, H, float(scale2), chunk,
        *q.stride()[:3], *agents.stride()[:3], *o.stride()[:3], *b2s,
        HAS_B2=bias2 is not None, D=D, BA=BA, BD=BD, BM=BM, PREC=prec, num_warps=4, num_stages=3,
    )
    return o_tok, va, lse1, lse2


def _bias_grid(blocks: int, heads: int, batch: int, device) -> tuple[tuple[int, int, int], int]:
    """Grid ``(blocks, heads, batch chunks)`` of a bias-gradient kernel and its batch chunk: the batch loop is split
    so that enough programs run."""
    sms = _sm_count(device) if device.type == "cuda" else 2
    splits = int(max(1, min(batch, triton.cdiv(2 * sms, max(blocks * heads, 1)))))
    chunk = triton.cdiv(batch, splits)
    return (blocks, heads, triton.cdiv(batch, chunk)), chunk


def _backward(do, q, k, v, agents, bias1, bias2, scale1, scale2, o, va, lse1, lse2):
    B, H, N, D = q.shape
    n = agents.shape[2]
    BA, BD, BN, BM = _blocks(n, D)
    prec = _precision(q.dtype)
    dev, bh = q.device, B * H
    if do.stride() != o.stride():  # the kernels read do with the strides of o
        do = torch.empty_like(o, dtype=do.dtype).copy_(do)
    # the backward passes keep two [BA, BD] fp32 accumulators on chip: eight warps keep them in registers
    meta = dict(D=D, BA=BA, BD=BD, PREC=prec, num_warps=8)
    qs, as_, os_ = q.stride()[:3], agents.stride()[:3], o.stride()[:3]
    ks, vs = k.stride()[:3], v.stride()[:3]
    b1, b1s, nb1 = _bias_args(bias1, 2, q)
    b2, b2s, nb2 = _bias_args(bias2, 1, q)

    dq = torch.empty(bh, N, BD, device=dev, dtype=torch.float32)
    dva = torch.zeros(bh, BA, BD, device=dev, dtype=torch.float32)
    da = torch.zeros(bh, BA, BD, device=dev, dtype=torch.float32)
    splits = _num_splits(bh, N, BM, dev)
    chunk = triton.cdiv(triton.cdiv(N, splits), BM) * BM
    _bcast_bwd[(bh, triton.cdiv(N, chunk))](
        q, agents, va, b2, o, do, lse2, dq, dva, da, N, nb2, n, H, float(scale2), chunk, *qs, *as_, *os_, *b2s,
        HAS_B2=bias2 is not None, BM=BM, **meta,
    )
    db2 = None
    if bias2 is not None:
        db2 = torch.zeros(H, N, BA, device=dev, dtype=torch.float32)
        grid, b_chunk = _bias_grid(triton.cdiv(N, BM), H, B, dev)
        _bias2_bwd[grid](
            q, agents, va, b2, o, do, lse2, db2, N, nb2, n, H, float(scale2), b_chunk, B, *qs, *as_, *os_, *b2s,
            BM=BM, **meta,
        )
    dk = torch.empty(bh, N, BD, device=dev, dtype=torch.float32)
    dv = torch.empty(bh, N, BD, device=dev, dtype=torch.float32)
    splits = _num_splits(bh, N, BN, dev)
    chunk = triton.cdiv(triton.cdiv(N, splits), BN) * BN
    _agg_bwd[(bh, triton.cdiv(N, chunk))](
        agents, k, v, b1, va, dva, lse1, dk, dv, da, N, nb1, n, H, float(scale1), chunk, *as_, *ks, *vs, *b1s,
        HAS_B1=bias1 is not None, BN=BN, **meta,
    )
    db1 = None
    if bias1 is not None:
        db1 = torch.zeros(H, BA, N, device=dev, dtype=torch.float32)
        grid, b_chunk = _bias_grid(triton.cdiv(N, BN), H, B, dev)
        _bias1_bwd[grid](
            agents, k, v, b1, va, dva, lse1, db1, N, nb1, n, H, float(scale1), b_chunk, B, *as_, *ks, *vs, *b1s,
            BN=BN, **meta,
        )

    def unpad(t, rows, dtype):  # contiguous, as the op's fake implementation promises
        return t[:, :rows, :D].reshape(B, H, rows, D).to(dtype).contiguous()

    grads = [unpad(dq, N, q.dtype), unpad(dk, N, k.dtype), unpad(dv, N, v.dtype), unpad(da, n, agents.dtype)]
    grads.append(db1[:, :n, :].to(bias1.dtype).contiguous() if bias1 is not None else None)
    grads.append(db2[:, :, :n].to(bias2.dtype).contiguous() if bias2 is not None else None)
    return grads


@torch.library.custom_op("visionfx::agent_attention_fwd", mutates_args=())
def _agent_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agents: torch.Tensor,
    bias1: torch.Tensor | None, bias2: torch.Tensor | None, scale1: float, scale2: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, agents, bias1, bias2, scale1, scale2)


@_agent_fwd_op.register_fake
def _(q, k, v, agents, bias1, bias2, scale1, scale2):
    B, H, N, D = q.shape
    BA, BD = _blocks(agents.shape[2], D)[:2]
    f32 = torch.float32
    return (_new_output(q), q.new_empty((B * H, BA, BD), dtype=f32), q.new_empty((B * H, BA), dtype=f32),
            q.new_empty((B * H, N), dtype=f32))


@torch.library.custom_op("visionfx::agent_attention_bwd", mutates_args=())
def _agent_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agents: torch.Tensor,
    bias1: torch.Tensor | None, bias2: torch.Tensor | None, scale1: float, scale2: float,
    o: torch.Tensor, va: torch.Tensor, lse1: torch.Tensor, lse2: torch.Tensor,
) -> list[torch.Tensor]:
    grads = _backward(do, q, k, v, agents, bias1, bias2, scale1, scale2, o, va, lse1, lse2)
    # custom ops return tensors only: absent bias gradients travel as empty tensors
    return [g if g is not None else q.new_empty(0) for g in grads]


@_agent_bwd_op.register_fake
def _(do, q, k, v, agents, bias1, bias2, scale1, scale2, o, va, lse1, lse2):
    out = [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), agents.new_empty(agents.shape)]
    out.append(bias1.new_empty(bias1.shape) if bias1 is not None else q.new_empty(0))
    out.append(bias2.new_empty(bias2.shape) if bias2 is not None else q.new_empty(0))
    return out


def _setup_context(ctx, inputs, output):
    q, k, v, agents, bias1, bias2, scale1, scale2 = inputs
    o, va, lse1, lse2 = output
    ctx.save_for_backward(q, k, v, agents, bias1, bias2, o, va, lse1, lse2)
    ctx.scales = (scale1, scale2)
    ctx.has_bias = (bias1 is not None, bias2 is not None)


def _grads(ctx, do, backward):
    """The inputs' gradients through ``backward`` (the custom op when compiled, ``_backward`` in eager mode)."""
    q, k, v, agents, bias1, bias2, o, va, lse1, lse2 = ctx.saved_tensors  # o, do: token layout [B, N, H, D]
    dq, dk, dv, da, db1, db2 = backward(do.transpose(1, 2), q, k, v, agents, bias1, bias2, *ctx.scales,
                                        o.transpose(1, 2), va, lse1, lse2)
    return dq, dk, dv, da, db1 if ctx.has_bias[0] else None, db2 if ctx.has_bias[1] else None, None, None


def _backward_rule(ctx, do, _dva, _dlse1, _dlse2):
    return _grads(ctx, do, _agent_bwd_op)


_agent_fwd_op.register_autograd(_backward_rule, setup_context=_setup_context)


class _EagerAgentAttention(torch.autograd.Function):
    """The same forward and backward without the custom-op dispatcher, whose per-call CPU cost exceeds the kernels'
    GPU time at small shapes; ``torch.compile`` traces the custom op instead."""

    @staticmethod
    def forward(ctx, q, k, v, agents, bias1, bias2, scale1, scale2):
        o, va, lse1, lse2 = _forward(q, k, v, agents, bias1, bias2, scale1, scale2)
        _setup_context(ctx, (q, k, v, agents, bias1, bias2, scale1, scale2), (o, va, lse1, lse2))
        return o

    @staticmethod
    def backward(ctx, do):
        return _grads(ctx, do, _backward)


def agent_attention_triton(q, k, v, agents, bias1=None, bias2=None, *, scale1, scale2, dropout_p=0.0, training=False):
    """Fused agent attention; see the reference for the math. ``q, k, v [B,h,N,d]``, ``agents [B,h,n,d]``,
    ``bias1 [h,n,N]``, ``bias2 [h,N,n]`` (fp32 tables, broadcast over the batch). Dropout is not supported here
    (the dispatcher sends training with ``dropout_p > 0`` to the reference)."""
    if dropout_p and training:
        raise ValueError("agent_attention_triton has no attention dropout; use the reference backend")
    b1 = bias1.float() if bias1 is not None else None  # any strides (see _bias_args)
    b2 = bias2.float() if bias2 is not None else None
    agents = agents.to(q.dtype)
    if torch.compiler.is_compiling():
        return _agent_fwd_op(q, k, v, agents, b1, b2, float(scale1), float(scale2))[0].transpose(1, 2)
    return _EagerAgentAttention.apply(q, k, v, agents, b1, b2, float(scale1), float(scale2)).transpose(1, 2)
