"""Triton ``@jit`` kernels of agent attention; the design is described in ``triton.py``, which launches them.

Aggregation forward (``_agg_fwd`` split over N, ``_agg_combine``), broadcast forward (``_bcast_fwd``); backward:
``_bcast_bwd`` / ``_agg_bwd`` (dQ; dK, dV; dVA and dA summed on chip per token chunk) and ``_bias2_bwd`` /
``_bias1_bwd`` (the batch-shared bias gradients), all recomputing probabilities through ``_bcast_tile`` /
``_agg_tile`` from the saved log-sum-exps.
"""

import triton
import triton.language as tl


@triton.jit
def _bias_tile(Bias, h, ra, rn, a_mask, NB, sb_h, sb_a, sb_n):
    """A ``[BA, BN]`` tile (agents × tokens) of a batch-shared bias table. Tokens ``≥ NB`` read 0; between N and
    ``NB`` (a bound the host checked to be allocated, a multiple of 16 when the table is padded) they read whatever
    is there and their scores are masked by the caller: a 16-aligned bound lets token-contiguous tables load in
    vectors."""
    return tl.load(Bias + h * sb_h + ra[:, None] * sb_a + rn[None, :] * sb_n,
                   mask=a_mask[:, None] & (rn < NB)[None, :], other=0.0)


@triton.jit
def _agg_fwd(
    A, K, V, B1, M_out, L_out, ACC_out,
    N, NB1, n_agents, n_heads, chunk, s1,
    sa_b, sa_h, sa_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sb1_h, sb1_a, sb1_n,
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
            s += _bias_tile(B1, h, ra, rn, a_mask, NB1, sb1_h, sb1_a, sb1_n)
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
    N, NB2, n_agents, n_heads, s2, chunk,
    sq_b, sq_h, sq_n, sa_b, sa_h, sa_n, so_b, so_h, so_n, sb2_h, sb2_a, sb2_n,
    HAS_B2: tl.constexpr, D: tl.constexpr, BA: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
    PREC: tl.constexpr,
):
    """Token blocks of one chunk of one (batch, head): the agents and ``VA`` are loaded once per program."""
    pid_bh, pid_s = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // n_heads, pid_bh % n_heads
    ra, rd = tl.arange(0, BA), tl.arange(0, BD)
    a_mask, d_mask = ra < n_agents, rd < D
    a = tl.load(A + b * sa_b + h * sa_h + ra[:, None] * sa_n + rd[None, :], mask=a_mask[:, None] & d_mask[None, :], other=0.0)
    va = tl.load(VA + (pid_bh * BA + ra[:, None]) * BD + rd[None, :]).to(a.dtype)
    start = pid_s * chunk
    stop = tl.minimum(start + chunk, N)
    for m0 in range(start, stop, BM):
        rm = m0 + tl.arange(0, BM)
        m_mask = rm < stop
        q = tl.load(Q + b * sq_b + h * sq_h + rm[:, None] * sq_n + rd[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        s = tl.dot(q, tl.trans(a), input_precision=PREC) * s2
        if HAS_B2:
            s += tl.trans(_bias_tile(B2, h, ra, rm, a_mask, NB2, sb2_h, sb2_a, sb2_n))
        s = tl.where(a_mask[None, :], s, float("-inf"))
        mx = tl.max(s, 1)
        p = tl.exp(s - mx[:, None])
        l = tl.sum(p, 1)
        p = p / l[:, None]
        o = tl.dot(p.to(q.dtype), va, input_precision=PREC)
        tl.store(O + b * so_b + h * so_h + rm[:, None] * so_n + rd[None, :], o.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
        tl.store(LSE2 + pid_bh * N + rm, mx + tl.log(l), mask=m_mask)


@triton.jit
def _bcast_tile(
    Q, A, VA, B2, O, DO, LSE2, b, h, pid_bh, rm, N, NB2, n_agents, s2,
    sq_b, sq_h, sq_n, sa_b, sa_h, sa_n, so_b, so_h, so_n, sb2_h, sb2_a, sb2_n,
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
        s += tl.trans(_bias_tile(B2, h, ra, rm, a_mask, NB2, sb2_h, sb2_a, sb2_n))
    p = tl.exp(s - lse[:, None])
    p = tl.where(a_mask[None, :] & m_mask[:, None], p, 0.0)
    dp = tl.dot(do, tl.trans(va), input_precision=PREC)
    delta = tl.sum(do * o, 1)
    ds = p * (dp - delta[:, None])
    return q.to(tl.float32), a.to(tl.float32), do, p, ds


@triton.jit
def _bcast_bwd(
    Q, A, VA, B2, O, DO, LSE2, DQ, DVA, DA,
    N, NB2, n_agents, n_heads, s2, chunk,
    sq_b, sq_h, sq_n, sa_b, sa_h, sa_n, so_b, so_h, so_n, sb2_h, sb2_a, sb2_n,
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
            Q, A, VA, B2, O, DO, LSE2, b, h, pid_bh, rm, N, NB2, n_agents, s2,
            sq_b, sq_h, sq_n, sa_b, sa_h, sa_n, so_b, so_h, so_n, sb2_h, sb2_a, sb2_n,
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
    N, NB2, n_agents, n_heads, s2, b_chunk, n_batch,
    sq_b, sq_h, sq_n, sa_b, sa_h, sa_n, so_b, so_h, so_n, sb2_h, sb2_a, sb2_n,
    D: tl.constexpr, BA: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr,
):
    """dB2 of one (token block, head), summed over this program's batch chunk on chip, then one atomic add."""
    pid_m, h, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    ra = tl.arange(0, BA)
    db = tl.zeros([BM, BA], tl.float32)
    for b in range(pid_b * b_chunk, tl.minimum(pid_b * b_chunk + b_chunk, n_batch)):
        _q, _a, _do, _p, ds = _bcast_tile(
            Q, A, VA, B2, O, DO, LSE2, b, h, b * n_heads + h, rm, N, NB2, n_agents, s2,
            sq_b, sq_h, sq_n, sa_b, sa_h, sa_n, so_b, so_h, so_n, sb2_h, sb2_a, sb2_n,
            HAS_B2=True, D=D, BA=BA, BD=BD, PREC=PREC,
        )
        db += ds
    tl.atomic_add(DB2 + h * N * BA + rm[:, None] * BA + ra[None, :], db, mask=(rm < N)[:, None] & (ra < n_agents)[None, :])


@triton.jit
def _agg_tile(
    A, K, V, B1, VA, DVA, LSE1, b, h, pid_bh, rn, N, NB1, n_agents, s1,
    sa_b, sa_h, sa_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sb1_h, sb1_a, sb1_n,
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
        s += _bias_tile(B1, h, ra, rn, a_mask, NB1, sb1_h, sb1_a, sb1_n)
    p = tl.exp(s - lse[:, None])
    p = tl.where(a_mask[:, None] & n_mask[None, :], p, 0.0)
    dp = tl.dot(dva, tl.trans(v), input_precision=PREC)
    delta = tl.sum(dva * va, 1)
    ds = p * (dp - delta[:, None])
    return a.to(tl.float32), k.to(tl.float32), dva, p, ds


@triton.jit
def _agg_bwd(
    A, K, V, B1, VA, DVA, LSE1, DK, DV, DA,
    N, NB1, n_agents, n_heads, s1, chunk,
    sa_b, sa_h, sa_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sb1_h, sb1_a, sb1_n,
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
            A, K, V, B1, VA, DVA, LSE1, b, h, pid_bh, rn, N, NB1, n_agents, s1,
            sa_b, sa_h, sa_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sb1_h, sb1_a, sb1_n,
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
    N, NB1, n_agents, n_heads, s1, b_chunk, n_batch,
    sa_b, sa_h, sa_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sb1_h, sb1_a, sb1_n,
    D: tl.constexpr, BA: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    """dB1 of one (head, token block), summed over this program's batch chunk on chip, then one atomic add."""
    pid_n, h, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    ra = tl.arange(0, BA)
    db = tl.zeros([BA, BN], tl.float32)
    for b in range(pid_b * b_chunk, tl.minimum(pid_b * b_chunk + b_chunk, n_batch)):
        _a, _k, _dva, _p, ds = _agg_tile(
            A, K, V, B1, VA, DVA, LSE1, b, h, b * n_heads + h, rn, N, NB1, n_agents, s1,
            sa_b, sa_h, sa_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sb1_h, sb1_a, sb1_n,
            HAS_B1=True, D=D, BA=BA, BD=BD, PREC=PREC,
        )
        db += ds
    tl.atomic_add(DB1 + h * BA * N + ra[:, None] * N + rn[None, :], db, mask=(ra < n_agents)[:, None] & (rn < N)[None, :])
