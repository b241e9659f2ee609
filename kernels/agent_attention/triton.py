"""Triton kernels of agent attention: two softmax stages through n agents, fused, forward and backward.

Same signature and semantics as :func:`visionfx.kernels.agent_attention.reference.agent_attention_reference`
(without dropout). The n×N and N×n probability matrices never reach memory:

* aggregation (agents are the queries, flash-style over N, split over N when B·h is small, then a combine):
  ``VA = softmax(s1·A Kᵀ + B1) V`` → ``VA [B,h,n,d]`` fp32 and its log-sum-exp ``lse1 [B,h,n]``;
* broadcast (parallel over token blocks): ``O = softmax(s2·Q Aᵀ + B2) VA`` and ``lse2 [B,h,N]``.

Backward recomputes the probabilities from the saved log-sum-exps: the broadcast pass gives dQ and sums dVA and dA
over a chunk of tokens on chip (one atomic add per program); the aggregation pass then gives dK, dV and adds to dA
the same way. The batch-shared bias gradients dB1, dB2 come from separate passes over (token block, head) that loop
over the batch, so no two programs of the same batch element contend for an address. Biases are batch-independent tables ``B1 [h,n,N]``, ``B2 [h,N,n]`` read in fp32.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["agent_attention_triton"]


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(x)))


@triton.jit
def _agg_fwd(
    A, K, V, B1, M_out, L_out, ACC_out,
    N, n_agents, n_heads, chunk, s1,
    sa_b, sa_h, sa_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sb1_h, sb1_a,
    HAS_B1: tl.constexpr, D: tl.constexpr, BA: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_bh, pid_s = tl.program_id(0), tl.program_id(1)
    n_split = tl.num_programs(1)
    b, h = pid_bh // n_heads, pid_bh % n_heads
    ra, rd = tl.arange(0, BA), tl.arange(0, BD)
    a_mask = ra < n_agents
    d_mask = rd < D
    a = tl.load(A + b * sa_b + h * sa_h + ra[:, None] * sa_n + rd[None, :], mask=a_mask[:, None] & d_mask[None, :], other=0.0)
    m_i = tl.full([BA], float("-inf"), tl.float32)
    l_i = tl.zeros([BA], tl.float32)
    acc = tl.zeros([BA, BD], tl.float32)
    start = pid_s * chunk
    stop = tl.minimum(start + chunk, N)
    for j0 in range(start, stop, BN):
        rn = j0 + tl.arange(0, BN)
        n_mask = rn < stop
        k = tl.load(K + b * sk_b + h * sk_h + rn[:, None] * sk_n + rd[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        s = tl.dot(a, tl.trans(k), input_precision=PREC) * s1
        if HAS_B1:
            s += tl.load(B1 + h * sb1_h + ra[:, None] * sb1_a + rn[None, :], mask=a_mask[:, None] & n_mask[None, :], other=0.0)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * sv_b + h * sv_h + rn[:, None] * sv_n + rd[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    base = (pid_bh * n_split + pid_s) * BA
    tl.store(M_out + base + ra, m_i)
    tl.store(L_out + base + ra, l_i)
    tl.store(ACC_out + (base + ra[:, None]) * BD + rd[None, :], acc)


@triton.jit
def _agg_combine(
    M_in, L_in, ACC_in, VA, LSE, n_split, n_agents, BA: tl.constexpr, BD: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    ra, rd = tl.arange(0, BA), tl.arange(0, BD)
    m = tl.full([BA], float("-inf"), tl.float32)
    for s in range(0, n_split):
        m = tl.maximum(m, tl.load(M_in + (pid_bh * n_split + s) * BA + ra))
    l = tl.zeros([BA], tl.float32)
    acc = tl.zeros([BA, BD], tl.float32)
    for s in range(0, n_split):
        base = (pid_bh * n_split + s) * BA
        w = tl.exp(tl.load(M_in + base + ra) - m)
        w = tl.where(m == float("-inf"), 0.0, w)
        l += w * tl.load(L_in + base + ra)
        acc += w[:, None] * tl.load(ACC_in + (base + ra[:, None]) * BD + rd[None, :])
    va = acc / l[:, None]
    tl.store(VA + (pid_bh * BA + ra[:, None]) * BD + rd[None, :], va)
    tl.store(LSE + pid_bh * BA + ra, m + tl.log(l), mask=ra < n_agents)


@triton.jit
def _bcast_fwd(
    Q, A, VA, B2, O, LSE2,
    N, n_agents, n_heads, s2,
    sq_b, sq_h, sq_n, sa_b, sa_h, sa_n, so_b, so_h, so_n, sb2_h, sb2_n,
    HAS_B2: tl.constexpr, D: tl.constexpr, BA: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // n_heads, pid_bh % n_heads
    rm = pid_m * BM + tl.arange(0, BM)
    ra, rd = tl.arange(0, BA), tl.arange(0, BD)
    m_mask, a_mask, d_mask = rm < N, ra < n_agents, rd < D
    q = tl.load(Q + b * sq_b + h * sq_h + rm[:, None] * sq_n + rd[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    a = tl.load(A + b * sa_b + h * sa_h + ra[:, None] * sa_n + rd[None, :], mask=a_mask[:, None] & d_mask[None, :], other=0.0)
    va = tl.load(VA + (pid_bh * BA + ra[:, None]) * BD + rd[None, :])
    s = tl.dot(q, tl.trans(a), input_precision=PREC) * s2
    if HAS_B2:
        s += tl.load(B2 + h * sb2_h + rm[:, None] * sb2_n + ra[None, :], mask=m_mask[:, None] & a_mask[None, :], other=0.0)
    s = tl.where(a_mask[None, :], s, float("-inf"))
    mx = tl.max(s, 1)
    p = tl.exp(s - mx[:, None])
    l = tl.sum(p, 1)
    p = p / l[:, None]
    o = tl.dot(p.to(q.dtype), va.to(q.dtype), input_precision=PREC)
    tl.store(O + b * so_b + h * so_h + rm[:, None] * so_n + rd[None, :], o.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    tl.store(LSE2 + pid_bh * N + rm, mx + tl.log(l), mask=m_mask)


@triton.jit
def _bcast_tile(
    Q, A, VA, B2, O, DO, LSE2, b, h, pid_bh, rm, N, n_agents, s2,
    sq_b, sq_h, sq_n, sa_b, sa_h, sa_n, so_b, so_h, so_n, sb2_h, sb2_n,
    HAS_B2: tl.constexpr, D: tl.constexpr, BA: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
):
    """Recompute the broadcast stage of one token block: ``q, a, dO`` (fp32), ``P2`` and ``dS2`` (``[BM, BA]``)."""
    ra, rd = tl.arange(0, BA), tl.arange(0, BD)
    m_mask, a_mask, d_mask = rm < N, ra < n_agents, rd < D
    md = m_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + b * sq_b + h * sq_h + rm[:, None] * sq_n + rd[None, :], mask=md, other=0.0)
    do = tl.load(DO + b * so_b + h * so_h + rm[:, None] * so_n + rd[None, :], mask=md, other=0.0).to(tl.float32)
    o = tl.load(O + b * so_b + h * so_h + rm[:, None] * so_n + rd[None, :], mask=md, other=0.0).to(tl.float32)
    a = tl.load(A + b * sa_b + h * sa_h + ra[:, None] * sa_n + rd[None, :], mask=a_mask[:, None] & d_mask[None, :], other=0.0)
    va = tl.load(VA + (pid_bh * BA + ra[:, None]) * BD + rd[None, :])
    lse = tl.load(LSE2 + pid_bh * N + rm, mask=m_mask, other=0.0)
    s = tl.dot(q, tl.trans(a), input_precision=PREC) * s2
    if HAS_B2:
        s += tl.load(B2 + h * sb2_h + rm[:, None] * sb2_n + ra[None, :], mask=m_mask[:, None] & a_mask[None, :], other=0.0)
    p = tl.exp(s - lse[:, None])
    p = tl.where(a_mask[None, :] & m_mask[:, None], p, 0.0)
    dp = tl.dot(do, tl.trans(va), input_precision=PREC)
    delta = tl.sum(do * o, 1)
    ds = p * (dp - delta[:, None])
    return q.to(tl.float32), a.to(tl.float32), do, p, ds


@triton.jit
def _bcast_bwd(
    Q, A, VA, B2, O, DO, LSE2, DQ, DVA, DA,
    N, n_agents, n_heads, s2, chunk,
    sq_b, sq_h, sq_n, sa_b, sa_h, sa_n, so_b, so_h, so_n, sb2_h, sb2_n,
    HAS_B2: tl.constexpr, D: tl.constexpr, BA: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
    PREC: tl.constexpr,
):
    """dQ per token block; dVA and dA summed over this program's token chunk on chip, then one atomic add."""
    pid_bh, pid_s = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // n_heads, pid_bh % n_heads
    ra, rd = tl.arange(0, BA), tl.arange(0, BD)
    dva = tl.zeros([BA, BD], tl.float32)
    da = tl.zeros([BA, BD], tl.float32)
    start = pid_s * chunk
    stop = tl.minimum(start + chunk, N)
    for m0 in range(start, stop, BM):
        rm = m0 + tl.arange(0, BM)
        q, a, do, p, ds = _bcast_tile(
            Q, A, VA, B2, O, DO, LSE2, b, h, pid_bh, rm, N, n_agents, s2,
            sq_b, sq_h, sq_n, sa_b, sa_h, sa_n, so_b, so_h, so_n, sb2_h, sb2_n,
            HAS_B2=HAS_B2, D=D, BA=BA, BD=BD, PREC=PREC,
        )
        dq = tl.dot(ds, a, input_precision=PREC) * s2
        tl.store(DQ + pid_bh * N * BD + rm[:, None] * BD + rd[None, :], dq, mask=(rm < stop)[:, None] & (rd < D)[None, :])
        dva += tl.dot(tl.trans(p), do, input_precision=PREC)
        da += tl.dot(tl.trans(ds), q, input_precision=PREC) * s2
    ad = (ra < n_agents)[:, None] & (rd < D)[None, :]
    tl.atomic_add(DVA + (pid_bh * BA + ra[:, None]) * BD + rd[None, :], dva, mask=ad)
    tl.atomic_add(DA + (pid_bh * BA + ra[:, None]) * BD + rd[None, :], da, mask=ad)


@triton.jit
def _bias2_bwd(
    Q, A, VA, B2, O, DO, LSE2, DB2,
    N, n_agents, n_heads, s2, b_chunk, n_batch,
    sq_b, sq_h, sq_n, sa_b, sa_h, sa_n, so_b, so_h, so_n, sb2_h, sb2_n,
    D: tl.constexpr, BA: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr,
):
    """dB2 of one (token block, head), summed over this program's batch chunk on chip, then one atomic add."""
    pid_m, h, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    ra = tl.arange(0, BA)
    db = tl.zeros([BM, BA], tl.float32)
    for b in range(pid_b * b_chunk, tl.minimum(pid_b * b_chunk + b_chunk, n_batch)):
        _q, _a, _do, _p, ds = _bcast_tile(
            Q, A, VA, B2, O, DO, LSE2, b, h, b * n_heads + h, rm, N, n_agents, s2,
            sq_b, sq_h, sq_n, sa_b, sa_h, sa_n, so_b, so_h, so_n, sb2_h, sb2_n,
            HAS_B2=True, D=D, BA=BA, BD=BD, PREC=PREC,
        )
        db += ds
    tl.atomic_add(DB2 + h * N * BA + rm[:, None] * BA + ra[None, :], db, mask=(rm < N)[:, None] & (ra < n_agents)[None, :])


@triton.jit
def _agg_tile(
    A, K, V, B1, VA, DVA, LSE1, b, h, pid_bh, rn, N, n_agents, s1,
    sa_b, sa_h, sa_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sb1_h, sb1_a,
    HAS_B1: tl.constexpr, D: tl.constexpr, BA: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
):
    """Recompute the aggregation stage of one token block: ``a, k, dVA`` (fp32), ``P1`` and ``dS1`` (``[BA, BN]``)."""
    ra, rd = tl.arange(0, BA), tl.arange(0, BD)
    n_mask, a_mask, d_mask = rn < N, ra < n_agents, rd < D
    nd = n_mask[:, None] & d_mask[None, :]
    a = tl.load(A + b * sa_b + h * sa_h + ra[:, None] * sa_n + rd[None, :], mask=a_mask[:, None] & d_mask[None, :], other=0.0)
    k = tl.load(K + b * sk_b + h * sk_h + rn[:, None] * sk_n + rd[None, :], mask=nd, other=0.0)
    v = tl.load(V + b * sv_b + h * sv_h + rn[:, None] * sv_n + rd[None, :], mask=nd, other=0.0).to(tl.float32)
    va = tl.load(VA + (pid_bh * BA + ra[:, None]) * BD + rd[None, :])
    dva = tl.load(DVA + (pid_bh * BA + ra[:, None]) * BD + rd[None, :])
    lse = tl.load(LSE1 + pid_bh * BA + ra, mask=a_mask, other=0.0)
    s = tl.dot(a, tl.trans(k), input_precision=PREC) * s1
    if HAS_B1:
        s += tl.load(B1 + h * sb1_h + ra[:, None] * sb1_a + rn[None, :], mask=a_mask[:, None] & n_mask[None, :], other=0.0)
    p = tl.exp(s - lse[:, None])
    p = tl.where(a_mask[:, None] & n_mask[None, :], p, 0.0)
    dp = tl.dot(dva, tl.trans(v), input_precision=PREC)
    delta = tl.sum(dva * va, 1)
    ds = p * (dp - delta[:, None])
    return a.to(tl.float32), k.to(tl.float32), dva, p, ds


@triton.jit
def _agg_bwd(
    A, K, V, B1, VA, DVA, LSE1, DK, DV, DA,
    N, n_agents, n_heads, s1, chunk,
    sa_b, sa_h, sa_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sb1_h, sb1_a,
    HAS_B1: tl.constexpr, D: tl.constexpr, BA: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
    PREC: tl.constexpr,
):
    """dK, dV per token block; dA summed over this program's token chunk on chip, then one atomic add."""
    pid_bh, pid_s = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // n_heads, pid_bh % n_heads
    ra, rd = tl.arange(0, BA), tl.arange(0, BD)
    da = tl.zeros([BA, BD], tl.float32)
    start = pid_s * chunk
    stop = tl.minimum(start + chunk, N)
    for n0 in range(start, stop, BN):
        rn = n0 + tl.arange(0, BN)
        a, k, dva, p, ds = _agg_tile(
            A, K, V, B1, VA, DVA, LSE1, b, h, pid_bh, rn, N, n_agents, s1,
            sa_b, sa_h, sa_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sb1_h, sb1_a,
            HAS_B1=HAS_B1, D=D, BA=BA, BD=BD, PREC=PREC,
        )
        nd = (rn < stop)[:, None] & (rd < D)[None, :]
        tl.store(DK + pid_bh * N * BD + rn[:, None] * BD + rd[None, :], tl.dot(tl.trans(ds), a, input_precision=PREC) * s1, mask=nd)
        tl.store(DV + pid_bh * N * BD + rn[:, None] * BD + rd[None, :], tl.dot(tl.trans(p), dva, input_precision=PREC), mask=nd)
        da += tl.dot(ds, k, input_precision=PREC) * s1
    tl.atomic_add(DA + (pid_bh * BA + ra[:, None]) * BD + rd[None, :], da, mask=(ra < n_agents)[:, None] & (rd < D)[None, :])


@triton.jit
def _bias1_bwd(
    A, K, V, B1, VA, DVA, LSE1, DB1,
    N, n_agents, n_heads, s1, b_chunk, n_batch,
    sa_b, sa_h, sa_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sb1_h, sb1_a,
    D: tl.constexpr, BA: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    """dB1 of one (head, token block), summed over this program's batch chunk on chip, then one atomic add."""
    pid_n, h, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    ra = tl.arange(0, BA)
    db = tl.zeros([BA, BN], tl.float32)
    for b in range(pid_b * b_chunk, tl.minimum(pid_b * b_chunk + b_chunk, n_batch)):
        _a, _k, _dva, _p, ds = _agg_tile(
            A, K, V, B1, VA, DVA, LSE1, b, h, b * n_heads + h, rn, N, n_agents, s1,
            sa_b, sa_h, sa_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sb1_h, sb1_a,
            HAS_B1=True, D=D, BA=BA, BD=BD, PREC=PREC,
        )
        db += ds
    tl.atomic_add(DB1 + h * BA * N + ra[:, None] * N + rn[None, :], db, mask=(ra < n_agents)[:, None] & (rn < N)[None, :])


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device) -> int:
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


def _num_splits(bh: int, n: int, block: int, device) -> int:
    """Split the aggregation over N when B·h programs would leave the GPU idle."""
    if device.type != "cuda":
        return 1 if n <= 4 * block else 2
    sms = _sm_count(device)
    want = max(1, (2 * sms) // max(bh, 1))
    return int(max(1, min(want, triton.cdiv(n, 4 * block), 32)))


def _new_output(q):
    """The output in token layout, ``[B, N, H, D]``: the kernels write its ``[B, H, N, D]`` view, and callers get that
    view back (made outside any autograd Function, so that in-place updates of it stay legal), whose heads merge
    without a copy (``o.transpose(1, 2).reshape(B, N, H * D)``)."""
    B, H, N, D = q.shape
    return q.new_empty((B, N, H, D))


def _forward(q, k, v, agents, bias1, bias2, scale1, scale2):
    B, H, N, D = q.shape
    n = agents.shape[2]
    BA, BD = _pow2(n), _pow2(D)
    BN = 64 if BA <= 64 else 32
    BM = 64 if BA <= 128 else 32
    prec = _precision(q.dtype)
    dev = q.device
    bh = B * H
    splits = _num_splits(bh, N, BN, dev)
    chunk = triton.cdiv(triton.cdiv(N, splits), BN) * BN
    splits = triton.cdiv(N, chunk)
    m_part = torch.empty(bh, splits, BA, device=dev, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(bh, splits, BA, BD, device=dev, dtype=torch.float32)
    b1 = bias1 if bias1 is not None else q
    b2 = bias2 if bias2 is not None else q
    _agg_fwd[(bh, splits)](
        agents, k, v, b1, m_part, l_part, acc_part,
        N, n, H, chunk, float(scale1),
        *agents.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        b1.stride(0) if bias1 is not None else 0, b1.stride(1) if bias1 is not None else 0,
        HAS_B1=bias1 is not None, D=D, BA=BA, BD=BD, BN=BN, PREC=prec, num_warps=4,
    )
    va = torch.empty(bh, BA, BD, device=dev, dtype=torch.float32)
    lse1 = torch.zeros(bh, BA, device=dev, dtype=torch.float32)
    _agg_combine[(bh,)](m_part, l_part, acc_part, va, lse1, splits, n, BA=BA, BD=BD, num_warps=4)
    o_tok = _new_output(q)
    o = o_tok.transpose(1, 2)
    lse2 = torch.empty(bh, N, device=dev, dtype=torch.float32)
    _bcast_fwd[(triton.cdiv(N, BM), bh)](
        q, agents, va, b2, o, lse2,
        N, n, H, float(scale2),
        *q.stride()[:3], *agents.stride()[:3], *o.stride()[:3],
        b2.stride(0) if bias2 is not None else 0, b2.stride(1) if bias2 is not None else 0,
        HAS_B2=bias2 is not None, D=D, BA=BA, BD=BD, BM=BM, PREC=prec, num_warps=4,
    )
    return o_tok, va, lse1, lse2


def _batch_splits(blocks: int, heads: int, batch: int, device) -> int:
    """Split the batch loop of the bias-gradient kernels so that enough programs run."""
    sms = _sm_count(device) if device.type == "cuda" else 2
    return int(max(1, min(batch, triton.cdiv(2 * sms, max(blocks * heads, 1)))))


def _backward(do, q, k, v, agents, bias1, bias2, scale1, scale2, o, va, lse1, lse2):
    B, H, N, D = q.shape
    n = agents.shape[2]
    BA, BD = _pow2(n), _pow2(D)
    BN = 64 if BA <= 64 else 32
    BM = 64 if BA <= 128 else 32
    prec = _precision(q.dtype)
    dev, bh = q.device, B * H
    if do.stride() != o.stride():  # the kernels read do with the strides of o
        do = torch.empty_like(o, dtype=do.dtype).copy_(do)
    # the backward passes keep two [BA, BD] fp32 accumulators on chip: eight warps keep them in registers
    meta = dict(D=D, BA=BA, BD=BD, PREC=prec, num_warps=8)
    qs, as_, os_ = q.stride()[:3], agents.stride()[:3], o.stride()[:3]
    ks, vs = k.stride()[:3], v.stride()[:3]
    b1s = (bias1.stride(0), bias1.stride(1)) if bias1 is not None else (0, 0)
    b2s = (bias2.stride(0), bias2.stride(1)) if bias2 is not None else (0, 0)
    b1, b2 = (bias1 if bias1 is not None else q), (bias2 if bias2 is not None else q)

    dq = torch.empty(bh, N, BD, device=dev, dtype=torch.float32)
    dva = torch.zeros(bh, BA, BD, device=dev, dtype=torch.float32)
    da = torch.zeros(bh, BA, BD, device=dev, dtype=torch.float32)
    splits = _num_splits(bh, N, BM, dev)
    chunk = triton.cdiv(triton.cdiv(N, splits), BM) * BM
    _bcast_bwd[(bh, triton.cdiv(N, chunk))](
        q, agents, va, b2, o, do, lse2, dq, dva, da, N, n, H, float(scale2), chunk, *qs, *as_, *os_, *b2s,
        HAS_B2=bias2 is not None, BM=BM, **meta,
    )
    db2 = None
    if bias2 is not None:
        db2 = torch.zeros(H, N, BA, device=dev, dtype=torch.float32)
        blocks = triton.cdiv(N, BM)
        bsplit = _batch_splits(blocks, H, B, dev)
        b_chunk = triton.cdiv(B, bsplit)
        _bias2_bwd[(blocks, H, triton.cdiv(B, b_chunk))](
            q, agents, va, b2, o, do, lse2, db2, N, n, H, float(scale2), b_chunk, B, *qs, *as_, *os_, *b2s,
            BM=BM, **meta,
        )
    dk = torch.empty(bh, N, BD, device=dev, dtype=torch.float32)
    dv = torch.empty(bh, N, BD, device=dev, dtype=torch.float32)
    splits = _num_splits(bh, N, BN, dev)
    chunk = triton.cdiv(triton.cdiv(N, splits), BN) * BN
    _agg_bwd[(bh, triton.cdiv(N, chunk))](
        agents, k, v, b1, va, dva, lse1, dk, dv, da, N, n, H, float(scale1), chunk, *as_, *ks, *vs, *b1s,
        HAS_B1=bias1 is not None, BN=BN, **meta,
    )
    db1 = None
    if bias1 is not None:
        db1 = torch.zeros(H, BA, N, device=dev, dtype=torch.float32)
        blocks = triton.cdiv(N, BN)
        bsplit = _batch_splits(blocks, H, B, dev)
        b_chunk = triton.cdiv(B, bsplit)
        _bias1_bwd[(blocks, H, triton.cdiv(B, b_chunk))](
            agents, k, v, b1, va, dva, lse1, db1, N, n, H, float(scale1), b_chunk, B, *as_, *ks, *vs, *b1s,
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
    BA, BD = _pow2(agents.shape[2]), _pow2(D)
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


def _backward_rule(ctx, do, _dva, _dlse1, _dlse2):
    q, k, v, agents, bias1, bias2, o, va, lse1, lse2 = ctx.saved_tensors  # o, do: token layout [B, N, H, D]
    dq, dk, dv, da, db1, db2 = _agent_bwd_op(do.transpose(1, 2), q, k, v, agents, bias1, bias2, *ctx.scales,
                                             o.transpose(1, 2), va, lse1, lse2)
    return dq, dk, dv, da, db1 if ctx.has_bias[0] else None, db2 if ctx.has_bias[1] else None, None, None


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
        q, k, v, agents, bias1, bias2, o, va, lse1, lse2 = ctx.saved_tensors  # o, do: token layout [B, N, H, D]
        dq, dk, dv, da, db1, db2 = _backward(do.transpose(1, 2), q, k, v, agents, bias1, bias2, *ctx.scales,
                                             o.transpose(1, 2), va, lse1, lse2)
        return dq, dk, dv, da, db1, db2, None, None


def agent_attention_triton(q, k, v, agents, bias1=None, bias2=None, *, scale1, scale2, dropout_p=0.0, training=False):
    """Fused agent attention; see the reference for the math. ``q, k, v [B,h,N,d]``, ``agents [B,h,n,d]``,
    ``bias1 [h,n,N]``, ``bias2 [h,N,n]`` (fp32 tables, broadcast over the batch). Dropout is not supported here
    (the dispatcher sends training with ``dropout_p > 0`` to the reference)."""
    if dropout_p and training:
        raise ValueError("agent_attention_triton has no attention dropout; use the reference backend")
    b1 = bias1.float().contiguous() if bias1 is not None else None
    b2 = bias2.float().contiguous() if bias2 is not None else None
    agents = agents.to(q.dtype)
    if torch.compiler.is_compiling():
        return _agent_fwd_op(q, k, v, agents, b1, b2, float(scale1), float(scale2))[0].transpose(1, 2)
    return _EagerAgentAttention.apply(q, k, v, agents, b1, b2, float(scale1), float(scale2)).transpose(1, 2)
