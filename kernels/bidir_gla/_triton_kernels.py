"""Triton kernels of the chunked bidirectional GLA; the design and the numerics are described in ``triton.py``.

Conventions shared by every kernel here:

* A program owns one chunk of ``CH`` tokens (one ``[CH, ·]`` register tile), tokens ``c·CH + [0, CH)`` in memory
  order for both directions. Scan order is ascending tokens for direction 0 and descending for direction 1 (``REV``).
* For a tile, ``incl`` is the inclusive cumulative sum of its gates in scan order and ``after`` the sum of the gates
  that follow each row within the tile in scan order. ``after`` is summed from a second, shifted load of the gates
  rather than taken as ``total − incl``: every exponent is then a sum of exactly the gates it stands for, so it is
  ``≤ 0`` (sums of non-positive floats stay non-positive under any rounding) and as precise as its own magnitude
  allows, not the magnitude of the tile's total.
* Dot operands are cast to ``DT``: bf16 for bf16 inputs, fp32 otherwise (``PREC`` = "ieee" for fp32, "tf32" for
  fp16, whose 5-bit exponent could not hold the diagonal block's ``exp(+x)`` factors); accumulation is fp32 always.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile(ptr, tok, hi, cols, n_cols, stride_n):
    """``[len(tok), len(cols)]`` tile of a ``[N, n_cols]`` row-major slab; rows at or past ``hi`` read as 0."""
    mask = (tok < hi)[:, None] & (cols < n_cols)[None, :]
    return tl.load(ptr + tok[:, None] * stride_n + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _gates(G, tok, lo, hi, rk, DK, g_n, g_c, REV: tl.constexpr):
    """Gates of the tile ``tok`` (tokens ``[lo, hi)`` real): ``(g, incl, after, total)``, fp32, see the header."""
    km = (rk < DK)[None, :]
    g = tl.load(G + tok[:, None] * g_n + rk[None, :] * g_c, mask=(tok < hi)[:, None] & km, other=0.0)
    if REV:
        nxt = tok - 1
    else:
        nxt = tok + 1
    gn = tl.load(G + nxt[:, None] * g_n + rk[None, :] * g_c, mask=((nxt >= lo) & (nxt < hi))[:, None] & km,
                 other=0.0)
    if REV:
        incl = tl.cumsum(g, 0, reverse=True)
        after = tl.cumsum(gn, 0)
    else:
        incl = tl.cumsum(g, 0)
        after = tl.cumsum(gn, 0, reverse=True)
    return g, incl, after, tl.sum(g, 0)


@triton.jit
def _causal(r, REV: tl.constexpr):
    """``[L, L]``: row i is at or after column j in scan order."""
    if REV:
        return r[:, None] <= r[None, :]
    else:
        return r[:, None] >= r[None, :]


@triton.jit
def _diag_exact(q, k, p, g, r, REV: tl.constexpr, L: tl.constexpr, GRAD: tl.constexpr):
    """Exact diagonal block: walk key positions j from last to first in scan order keeping
    ``M[i, :] = exp(Σ_{j < t ≤ i} g_t)`` (rows before j stay 0) by one multiplication per step, every factor ≤ 1.

    Returns ``a [L, L]`` (``a_ij = Σ_c q_ic k_jc M``) and, with GRAD, ``dq``/``dk`` of ``p`` (``dq_i =
    Σ_j p_ij k_j M``, ``dk_j = Σ_i p_ij q_i M``), else zeros."""
    a = tl.zeros([L, L], tl.float32)
    dq = tl.zeros(q.shape, tl.float32)
    dk = tl.zeros(q.shape, tl.float32)
    M = tl.zeros(q.shape, tl.float32)
    for t in range(L):
        if REV:
            jrow = t
            nrow = t - 1
        else:
            jrow = L - 1 - t
            nrow = L - t
        # rows are picked out by masked sums (exact: the other terms are zeros)
        gn = tl.sum(tl.where(r[:, None] == nrow, g, 0.0), 0)
        M = tl.where(r[:, None] == jrow, 1.0, M * tl.exp(gn)[None, :])
        kj = tl.sum(tl.where(r[:, None] == jrow, k, 0.0), 0)
        a = tl.where(r[None, :] == jrow, tl.sum(q * M * kj[None, :], 1)[:, None], a)
        if GRAD:
            pj = tl.sum(tl.where(r[None, :] == jrow, p, 0.0), 1)
            dq += pj[:, None] * M * kj[None, :]
            dk = tl.where(r[:, None] == jrow, tl.sum(pj[:, None] * q * M, 0)[None, :], dk)
    return a, dq, dk


@triton.jit
def _diag_scores(q, k, qd, incl, total, g, r, span_max, REV: tl.constexpr, L: tl.constexpr, DT: tl.constexpr,
                 PREC: tl.constexpr):
    """The causal ``[L, L]`` scores of a tile with itself (``qd = q ⊙ exp(incl)`` in ``DT``): factorised through the
    tile's start when no channel decays by more than ``span_max`` over it, else the exact walk (:func:`_diag_exact`)."""
    if tl.min(total, 0) >= -span_max:
        kh = (k * tl.exp(-incl)).to(DT)
        a = tl.where(_causal(r, REV), tl.dot(qd, tl.trans(kh), input_precision=PREC), 0.0)
    else:
        a, _, _ = _diag_exact(q, k, q, g, r, REV, L, False)
    return a


@triton.jit
def _diag_grads(q, k, qd, eq, incl, total, g, do, v, r, span_max, REV: tl.constexpr, L: tl.constexpr,
                DT: tl.constexpr, PREC: tl.constexpr):
    """The tile with itself in the backward (see :func:`_diag_scores`): ``(a, dq, dk)``, the scores (for dv) and the
    tile's own terms of dq and dk (``eq = exp(incl)``)."""
    causal = _causal(r, REV)
    p = tl.where(causal, tl.dot(do, tl.trans(v), input_precision=PREC), 0.0)
    if tl.min(total, 0) >= -span_max:
        eqi = tl.exp(-incl)
        kh = (k * eqi).to(DT)
        a = tl.where(causal, tl.dot(qd, tl.trans(kh), input_precision=PREC), 0.0)
        dq = eq * tl.dot(p.to(DT), kh, input_precision=PREC)
        dk = eqi * tl.dot(tl.trans(p.to(DT)), qd, input_precision=PREC)
    else:
        a, dq, dk = _diag_exact(q, k, p, g, r, REV, L, True)
    return a, dq, dk


@triton.jit
def _chunk_start(c, t, TOWARD_END: tl.constexpr, CH: tl.constexpr):
    """First token of the ``t``-th chunk (0: the nearest) beside chunk ``c``, towards the sequence's end or start."""
    if TOWARD_END:
        return (c + 1 + t) * CH
    else:
        return (c - 1 - t) * CH


@triton.jit
def _own_tiles(Q, K, V, kbase, vbase, tok, hi, rk, rv, DK, DV, s_n, t_n, DT: tl.constexpr):
    """A program's own tile of tokens ``tok`` (< ``hi``): ``(q, k)`` in fp32 and ``v`` in ``DT``."""
    q = _tile(Q + kbase, tok, hi, rk, DK, s_n).to(tl.float32)
    k = _tile(K + kbase, tok, hi, rk, DK, s_n).to(tl.float32)
    v = _tile(V + vbase, tok, hi, rv, DV, t_n).to(DT)
    return q, k, v


@triton.jit
def _keys_before(K, V, gbase, kbase, vbase, lo, N, r, rk, rv, mid, DK, DV, s_n, t_n, g_n, g_c,
                 L: tl.constexpr, REV: tl.constexpr, DT: tl.constexpr):
    """The tile of ``L`` tokens at ``lo`` that comes before the current one in scan order, as the current tile's
    queries see it: ``(k ⊙ exp(after + mid), v, total)``, k and v in ``DT``, its keys decayed to the point just before
    the current tile (``mid`` sums the gates of the tiles in between; every factor ≤ 1)."""
    hi = tl.minimum(lo + L, N)
    tok = lo + r
    k = _tile(K + kbase, tok, hi, rk, DK, s_n).to(tl.float32)
    v = _tile(V + vbase, tok, hi, rv, DV, t_n).to(DT)
    _, _, after, total = _gates(gbase, tok, lo, hi, rk, DK, g_n, g_c, REV)
    return (k * tl.exp(after + mid[None, :])).to(DT), v, total


@triton.jit
def _queries_after(Q, DO, gbase, kbase, dbase, lo, N, r, rk, rv, mid, DK, DV, s_n, do_n, g_n, g_c,
                   L: tl.constexpr, REV: tl.constexpr, DT: tl.constexpr):
    """The tile of ``L`` tokens at ``lo`` that comes after the current one in scan order, as the current tile's keys
    see it: ``(q ⊙ exp(incl + mid), dO, total)`` in ``DT``, its queries decayed from the point just after the current
    tile (``mid`` sums the gates of the tiles in between; every factor ≤ 1)."""
    hi = tl.minimum(lo + L, N)
    tok = lo + r
    q = _tile(Q + kbase, tok, hi, rk, DK, s_n).to(tl.float32)
    do = _tile(DO + dbase, tok, hi, rv, DV, do_n).to(DT)
    _, incl, _, total = _gates(gbase, tok, lo, hi, rk, DK, g_n, g_c, REV)
    return (q * tl.exp(incl + mid[None, :])).to(DT), do, total


@triton.jit
def _chunk_sums(
    K, V, Q, DO, G, U, E,
    N, n_chunks, n_bh, n_heads,
    s_b, s_h, s_n, t_b, t_h, t_n, g_dir, g_b, g_h, g_n, g_c,
    do_b, do_h, do_n,  # strides of DO (its last dim contiguous, like every input's)
    KINDS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    CH: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """Each chunk's own term of the state recurrence (:func:`_state_scan`), all chunks in parallel. Grid
    ``(B·H, 2·KINDS, n_chunks)``.

    Kind 0 (forward state, walked in scan order): ``U = (k ⊙ exp(after))ᵀ v``, the chunk's keys decayed to its end.
    Kind 1 (gradient state of the backward pass, walked against scan order): ``U = (q ⊙ exp(incl))ᵀ dO``, the
    chunk's queries decayed to its start. ``E = exp(Σ_chunk g)``, the chunk's decay per key channel. ``U`` is fp32
    ``[KINDS, 2, B·H, n_chunks, BK, BV]``, ``E`` fp32 ``[KINDS, 2, B·H, n_chunks, BK]``. K and Q share the strides
    ``s_*``; V has ``t_*`` and DO ``do_*``."""
    pid_bh, pid_dk, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d = pid_dk // KINDS
    kind = pid_dk % KINDS
    b, h = pid_bh // n_heads, pid_bh % n_heads
    rk, rv = tl.arange(0, BK), tl.arange(0, BV)
    rt = tl.arange(0, CH)
    # kind 0 sums the gates after each row (shifted load), kind 1 the gates up to it (unshifted)
    shift = (1 - kind) * (1 - 2 * d)
    # vector-shaped: the interpreter rejects masks broadcast from scalars
    is0 = ((rt * 0 + kind) == 0)[:, None]
    is1 = ((rt * 0 + kind) != 0)[:, None]
    gbase = G + d * g_dir + b * g_b + h * g_h
    kbase = b * s_b + h * s_h
    vbase = b * t_b + h * t_h
    dbase = b * do_b + h * do_h
    km = (rk < DK)[None, :]
    lo = c * CH
    hi = tl.minimum(lo + CH, N)
    tok = lo + rt
    g = tl.load(gbase + tok[:, None] * g_n + rk[None, :] * g_c, mask=(tok < hi)[:, None] & km, other=0.0)
    sh = tok + shift
    gs = tl.load(gbase + sh[:, None] * g_n + rk[None, :] * g_c, mask=((sh >= lo) & (sh < hi))[:, None] & km,
                 other=0.0)
    w = tl.where((d + kind) == 1, tl.cumsum(gs, 0), tl.cumsum(gs, 0, reverse=True))
    # the kind picks the operands; the other pair's loads are masked off and read nothing
    xm = (tok < hi)[:, None] & km
    ym = (tok < hi)[:, None] & (rv < DV)[None, :]
    xo = tok[:, None] * s_n + rk[None, :]
    yo = tok[:, None] * t_n + rv[None, :]
    zo = tok[:, None] * do_n + rv[None, :]
    x = (tl.load(K + kbase + xo, mask=xm & is0, other=0.0).to(tl.float32)
         + tl.load(Q + kbase + xo, mask=xm & is1, other=0.0).to(tl.float32))
    y = (tl.load(V + vbase + yo, mask=ym & is0, other=0.0).to(tl.float32)
         + tl.load(DO + dbase + zo, mask=ym & is1, other=0.0).to(tl.float32))
    u = tl.dot(tl.trans(x * tl.exp(w)).to(DT), y.to(DT), input_precision=PREC)
    row = ((kind * 2 + d) * n_bh + pid_bh).to(tl.int64) * n_chunks + c
    tl.store(U + row * (BK * BV) + rk[:, None] * BV + rv[None, :], u)
    tl.store(E + row * BK + rk, tl.exp(tl.sum(g, 0)))


@triton.jit
def _state_scan(
    U, E, ST, n_chunks, n_bh,
    KINDS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BKS: tl.constexpr,
):
    """The states entering every chunk: a sequential walk over the chunks of one direction (kind 0 in scan order,
    kind 1 against it), ``S ← E_c ⊙ S + U_c`` in fp32, storing ``S`` before each step into ``ST`` (its dtype). Only
    elementwise work is serial here; each program carries ``BKS`` rows of the state (rows are independent). Grid
    ``(B·H, 2·KINDS, BK // BKS)``; buffers as in :func:`_chunk_sums`, ``ST`` like ``U``."""
    pid_bh, pid_dk, kb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d = pid_dk // KINDS
    kind = pid_dk % KINDS
    rk = kb * BKS + tl.arange(0, BKS)
    rv = tl.arange(0, BV)
    row0 = ((kind * 2 + d) * n_bh + pid_bh).to(tl.int64) * n_chunks
    off = rk[:, None] * BV + rv[None, :]
    rev_walk = (d + kind) == 1
    S = tl.zeros([BKS, BV], tl.float32)
    for step in range(n_chunks):
        row = row0 + tl.where(rev_walk, n_chunks - 1 - step, step)
        u = tl.load(U + row * (BK * BV) + off)
        e = tl.load(E + row * BK + rk)
        tl.store(ST + row * (BK * BV) + off, S.to(ST.dtype.element_ty))
        S = S * e[:, None] + u


@triton.jit
def _chunk_fwd(
    Q, K, V, G, ST, O,
    N, n_chunks, n_bh, n_heads, scale, span_max,
    s_b, s_h, s_n, t_b, t_h, t_n, g_dir, g_b, g_h, g_n, g_c,
    o_b, o_h, o_n,  # strides of the output (its last dim contiguous)
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, CH: tl.constexpr, TL: tl.constexpr,
    STATES: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """Output of one ``CH``-token chunk, both directions summed on chip: the chunk with itself (factorised or exact,
    :func:`_diag_scores`) and the earlier chunks in scan order, through the stored state entering the chunk
    (``STATES``; ``ST [2, B·H, n_chunks, BK, BV]``) or directly, one ``[CH, CH]`` product per earlier chunk. Grid
    ``(B·H, n_chunks)``. ``TL < CH`` (direct only): the last chunk is short, and it and its products with the others
    take ``TL``-row tiles (:func:`_fwd_tile`)."""
    pid_bh, c = tl.program_id(0), tl.program_id(1)
    if TL < CH:
        if c == n_chunks - 1:
            _fwd_tile(Q, K, V, G, ST, O, N, n_chunks, n_bh, n_heads, scale, span_max, s_b, s_h, s_n, t_b, t_h, t_n,
                      g_dir, g_b, g_h, g_n, g_c, o_b, o_h, o_n, pid_bh, c, DK, DV, BK, BV, CH, TL, TL, STATES, DT, PREC)
        else:
            _fwd_tile(Q, K, V, G, ST, O, N, n_chunks, n_bh, n_heads, scale, span_max, s_b, s_h, s_n, t_b, t_h, t_n,
                      g_dir, g_b, g_h, g_n, g_c, o_b, o_h, o_n, pid_bh, c, DK, DV, BK, BV, CH, CH, TL, STATES, DT, PREC)
    else:
        _fwd_tile(Q, K, V, G, ST, O, N, n_chunks, n_bh, n_heads, scale, span_max, s_b, s_h, s_n, t_b, t_h, t_n,
                  g_dir, g_b, g_h, g_n, g_c, o_b, o_h, o_n, pid_bh, c, DK, DV, BK, BV, CH, CH, CH, STATES, DT, PREC)


@triton.jit
def _fwd_tile(
    Q, K, V, G, ST, O, N, n_chunks, n_bh, n_heads, scale, span_max, s_b, s_h, s_n, t_b, t_h, t_n, g_dir, g_b, g_h, g_n,
    g_c, o_b, o_h, o_n, pid_bh, c,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, CH: tl.constexpr, L: tl.constexpr,
    TL: tl.constexpr, STATES: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """The body of :func:`_chunk_fwd` for chunk ``c`` on an ``L``-row tile (``CH``, or ``TL`` for a short last
    chunk); the chunks it meets have ``CH`` rows, the short last one ``TL``."""
    b, h = pid_bh // n_heads, pid_bh % n_heads
    kbase = b * s_b + h * s_h
    vbase = b * t_b + h * t_h
    r = tl.arange(0, L)
    rk, rv = tl.arange(0, BK), tl.arange(0, BV)
    lo = c * CH
    hi = tl.minimum(lo + L, N)
    tok = lo + r
    q, k, v = _own_tiles(Q, K, V, kbase, vbase, tok, hi, rk, rv, DK, DV, s_n, t_n, DT)
    out = tl.zeros([L, BV], tl.float32)
    for d in tl.static_range(2):
        gbase = G + d * g_dir + b * g_b + h * g_h
        g, incl, _, total = _gates(gbase, tok, lo, hi, rk, DK, g_n, g_c, d == 1)
        qd = (q * tl.exp(incl)).to(DT)  # relative to the point just before the chunk in scan order: ≤ 1
        # the chunk itself
        a = _diag_scores(q, k, qd, incl, total, g, r, span_max, d == 1, L, DT, PREC)
        out += tl.dot(a.to(DT), v, input_precision=PREC)
        if STATES:
            s = tl.load(ST + ((d * n_bh + pid_bh) * n_chunks + c).to(tl.int64) * (BK * BV)
                        + rk[:, None] * BV + rv[None, :])
            out += tl.dot(qd, s.to(DT), input_precision=PREC)
        else:
            # earlier chunks in scan order, nearest first; `mid` sums the gates of the chunks in between
            mid = tl.zeros([BK], tl.float32)
            if d == 0:
                n_prev = c
            else:
                n_prev = n_chunks - 1 - c
                if TL < CH:
                    n_prev -= (c < n_chunks - 1).to(tl.int32)  # the short last chunk is met after the loop
            rc = tl.arange(0, CH)
            for t in range(n_prev):
                lo_o = _chunk_start(c, t, d == 1, CH)
                kt, v_o, total_o = _keys_before(K, V, gbase, kbase, vbase, lo_o, N, rc, rk, rv, mid, DK, DV, s_n,
                                                t_n, g_n, g_c, CH, d == 1, DT)
                ao = tl.dot(qd, tl.trans(kt), input_precision=PREC)
                out += tl.dot(ao.to(DT), v_o, input_precision=PREC)
                mid += total_o
            if TL < CH:
                if d == 1:
                    if c < n_chunks - 1:  # the short last chunk: the farthest earlier one backwards
                        k_t, v_t, total_t = _keys_before(K, V, gbase, kbase, vbase, (n_chunks - 1) * CH, N,
                                                         tl.arange(0, TL), rk, rv, mid, DK, DV, s_n, t_n, g_n, g_c,
                                                         TL, True, DT)
                        a_t = tl.dot(qd, tl.trans(k_t), input_precision=PREC)
                        out += tl.dot(a_t.to(DT), v_t, input_precision=PREC)
    tl.store(O + b * o_b + h * o_h + tok[:, None] * o_n + rv[None, :], (out * scale).to(O.dtype.element_ty),
             mask=(tok < hi)[:, None] & (rv < DV)[None, :])


@triton.jit
def _chunk_bwd(
    Q, K, V, DO, G, ST, DQ, DK_, DV_, DGF, DGB,
    N, n_chunks, n_bh, n_heads, scale, span_max,
    s_b, s_h, s_n, t_b, t_h, t_n, g_dir, g_b, g_h, g_n, g_c,
    do_b, do_h, do_n,  # strides of DO
    dq_b, dq_h, dq_n, dv_b, dv_h, dv_n,  # strides of the outputs DQ and DK (allocated alike), and DV
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, CH: tl.constexpr, TL: tl.constexpr,
    STATES: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """dq, dk, dv of one ``CH``-token chunk (both directions summed on chip) and its gate gradients. The chunk's
    queries meet the keys of its own and the earlier chunks in scan order (dq), its keys and values the queries of its
    own and the later chunks (dk, dv): through the stored states entering the chunk (``STATES``;
    ``ST [2, 2, B·H, n_chunks, BK, BV]``, the forward states, kind 0, and the gradient states, kind 1) or directly,
    chunk by chunk. Grid ``(B·H, n_chunks)``. Q and K share the strides ``s_*``, V has ``t_*`` and DO ``do_*``; the
    last dim of every tensor is contiguous.

    Gate gradients (``DGF``, ``DGB``: ``[B·H, N, DK]`` fp32, token order): with ``dA_d = q ⊙ dq_d − k ⊙ dk_d`` per
    direction, ``dgf_t = Σ_{s≥t} dA_0,s`` and ``dgb_t = Σ_{s≤t} dA_1,s``. The kernel sums only inside its chunk and,
    with ``STATES``, adds the sum over the other chunks as its exact value at the chunk's boundary, a product of the two
    states that meet there (no cancellation): the gate between tokens ``t−1`` and ``t`` is crossed by every pair
    (later query, earlier key), so in scan order the sum beyond the chunk is ``Σ_e S[:, e] ⊙ R[:, e]``, with ``S``
    the forward state entering the next chunk and ``R`` the gradient state entering this one. One sum over the
    whole sequence would carry the rounding of the 16-bit products behind dq and dk where the true gradient cancels
    (``dgf`` at the first token is exactly 0): in bf16 at N = 4097 that error was several percent of the gradient.
    Without ``STATES`` (short sequences) the host adds the other chunks' sums (:func:`triton._add_carries`), and
    ``TL < CH`` is a short last chunk on ``TL``-row tiles, as in :func:`_chunk_fwd`."""
    pid_bh, c = tl.program_id(0), tl.program_id(1)
    if TL < CH:
        if c == n_chunks - 1:
            _bwd_tile(Q, K, V, DO, G, ST, DQ, DK_, DV_, DGF, DGB, N, n_chunks, n_bh, n_heads, scale, span_max,
                      s_b, s_h, s_n, t_b, t_h, t_n, g_dir, g_b, g_h, g_n, g_c, do_b, do_h, do_n, dq_b, dq_h, dq_n,
                      dv_b, dv_h, dv_n, pid_bh, c, DK, DV, BK, BV, CH, TL, TL, STATES, DT, PREC)
        else:
            _bwd_tile(Q, K, V, DO, G, ST, DQ, DK_, DV_, DGF, DGB, N, n_chunks, n_bh, n_heads, scale, span_max,
                      s_b, s_h, s_n, t_b, t_h, t_n, g_dir, g_b, g_h, g_n, g_c, do_b, do_h, do_n, dq_b, dq_h, dq_n,
                      dv_b, dv_h, dv_n, pid_bh, c, DK, DV, BK, BV, CH, CH, TL, STATES, DT, PREC)
    else:
        _bwd_tile(Q, K, V, DO, G, ST, DQ, DK_, DV_, DGF, DGB, N, n_chunks, n_bh, n_heads, scale, span_max,
                  s_b, s_h, s_n, t_b, t_h, t_n, g_dir, g_b, g_h, g_n, g_c, do_b, do_h, do_n, dq_b, dq_h, dq_n,
                  dv_b, dv_h, dv_n, pid_bh, c, DK, DV, BK, BV, CH, CH, CH, STATES, DT, PREC)


@triton.jit
def _bwd_tile(
    Q, K, V, DO, G, ST, DQ, DK_, DV_, DGF, DGB, N, n_chunks, n_bh, n_heads, scale, span_max, s_b, s_h, s_n, t_b, t_h,
    t_n, g_dir, g_b, g_h, g_n, g_c, do_b, do_h, do_n, dq_b, dq_h, dq_n, dv_b, dv_h, dv_n, pid_bh, c,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, CH: tl.constexpr, L: tl.constexpr,
    TL: tl.constexpr, STATES: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """The body of :func:`_chunk_bwd` for chunk ``c`` on an ``L``-row tile (as :func:`_fwd_tile`)."""
    b, h = pid_bh // n_heads, pid_bh % n_heads
    kbase = b * s_b + h * s_h
    vbase = b * t_b + h * t_h
    r = tl.arange(0, L)
    rc = tl.arange(0, CH)
    rk, rv = tl.arange(0, BK), tl.arange(0, BV)
    lo = c * CH
    hi = tl.minimum(lo + L, N)
    tok = lo + r
    tm = tok < hi
    dbase = b * do_b + h * do_h
    q, k, v = _own_tiles(Q, K, V, kbase, vbase, tok, hi, rk, rv, DK, DV, s_n, t_n, DT)
    do = _tile(DO + dbase, tok, hi, rv, DV, do_n).to(DT)
    dq = tl.zeros([L, BK], tl.float32)
    dk = tl.zeros([L, BK], tl.float32)
    dv = tl.zeros([L, BV], tl.float32)
    soff = rk[:, None] * BV + rv[None, :]
    for d in tl.static_range(2):
        gbase = G + d * g_dir + b * g_b + h * g_h
        g, incl, after, total = _gates(gbase, tok, lo, hi, rk, DK, g_n, g_c, d == 1)
        eq = tl.exp(incl)
        qd = (q * eq).to(DT)
        # the chunk itself
        a, dq_d, dk_d = _diag_grads(q, k, qd, eq, incl, total, g, do, v, r, span_max, d == 1, L, DT, PREC)
        dv += tl.dot(tl.trans(a.to(DT)), do, input_precision=PREC)
        # chunks toward the end; a short last one is met after the loop over whole ones
        n_end = n_chunks - 1 - c
        if TL < CH:
            n_end -= (c < n_chunks - 1).to(tl.int32)
        if d == 0:
            n_prev = c
            n_next = n_end
        else:
            n_prev = n_end
            n_next = c
        # keys of earlier chunks: dq, to be multiplied by exp(incl)
        if STATES:
            s = tl.load(ST + ((d * n_bh + pid_bh) * n_chunks + c).to(tl.int64) * (BK * BV) + soff).to(DT)
            acc = tl.dot(do, tl.trans(s), input_precision=PREC)
        else:
            acc = tl.zeros([L, BK], tl.float32)
            mid = tl.zeros([BK], tl.float32)  # gates of the chunks in between (nearest first)
            for t in range(n_prev):
                lo_o = _chunk_start(c, t, d == 1, CH)
                kt, v_o, total_o = _keys_before(K, V, gbase, kbase, vbase, lo_o, N, rc, rk, rv, mid, DK, DV, s_n,
                                                t_n, g_n, g_c, CH, d == 1, DT)
                pp = tl.dot(do, tl.trans(v_o), input_precision=PREC)
                acc += tl.dot(pp.to(DT), kt, input_precision=PREC)
                mid += total_o
            if TL < CH:
                if d == 1:
                    if c < n_chunks - 1:  # the short last chunk
                        k_t, v_t, total_t = _keys_before(K, V, gbase, kbase, vbase, (n_chunks - 1) * CH, N,
                                                         tl.arange(0, TL), rk, rv, mid, DK, DV, s_n, t_n, g_n, g_c,
                                                         TL, True, DT)
                        p_t = tl.dot(do, tl.trans(v_t), input_precision=PREC)
                        acc += tl.dot(p_t.to(DT), k_t, input_precision=PREC)
        dq_d += eq * acc
        # queries of later chunks: dk (to be multiplied by exp(after)) and dv
        f = tl.exp(after)  # this chunk's keys relative to its end in scan order: ≤ 1
        kf = (k * f).to(DT)
        if STATES:
            rs = tl.load(ST + (((2 + d) * n_bh + pid_bh) * n_chunks + c).to(tl.int64) * (BK * BV) + soff).to(DT)
            acc = tl.dot(v, tl.trans(rs), input_precision=PREC)
            dv += tl.dot(kf, rs, input_precision=PREC)
        else:
            acc = tl.zeros([L, BK], tl.float32)
            mid = tl.zeros([BK], tl.float32)
            for t in range(n_next):
                lo_o = _chunk_start(c, t, d == 0, CH)
                qt_o, do_o, total_o = _queries_after(Q, DO, gbase, kbase, dbase, lo_o, N, rc, rk, rv, mid, DK, DV,
                                                     s_n, do_n, g_n, g_c, CH, d == 1, DT)
                aa = tl.dot(qt_o, tl.trans(kf), input_precision=PREC)  # [later rows, rows]
                pq = tl.dot(do_o, tl.trans(v), input_precision=PREC)
                dv += tl.dot(tl.trans(aa.to(DT)), do_o, input_precision=PREC)
                acc += tl.dot(tl.trans(pq.to(DT)), qt_o, input_precision=PREC)
                mid += total_o
            if TL < CH:
                if d == 0:
                    if c < n_chunks - 1:  # the short last chunk
                        q_t, do_t, total_t = _queries_after(Q, DO, gbase, kbase, dbase, (n_chunks - 1) * CH, N,
                                                            tl.arange(0, TL), rk, rv, mid, DK, DV, s_n, do_n, g_n,
                                                            g_c, TL, False, DT)
                        aq_t = tl.dot(q_t, tl.trans(kf), input_precision=PREC)
                        pq_t = tl.dot(do_t, tl.trans(v), input_precision=PREC)
                        dv += tl.dot(tl.trans(aq_t.to(DT)), do_t, input_precision=PREC)
                        acc += tl.dot(tl.trans(pq_t.to(DT)), q_t, input_precision=PREC)
        dk_d += f * acc
        dA = (q * dq_d - k * dk_d) * scale  # rows past the end are 0 (q and k are)
        if d == 0:
            dg = tl.cumsum(dA, 0, reverse=True)
            nb = c + 1
        else:
            dg = tl.cumsum(dA, 0)
            nb = c - 1
        if STATES:
            if (nb >= 0) & (nb < n_chunks):
                so = tl.load(ST + ((d * n_bh + pid_bh) * n_chunks + nb).to(tl.int64) * (BK * BV) + soff)
                dg += scale * tl.sum(so.to(tl.float32) * rs.to(tl.float32), 1)[None, :]
        if d == 0:
            dg_out = DGF
        else:
            dg_out = DGB
        tl.store(dg_out + pid_bh.to(tl.int64) * N * DK + tok[:, None] * DK + rk[None, :], dg,
                 mask=tm[:, None] & (rk < DK)[None, :])
        dq += dq_d
        dk += dk_d
    kmask = tm[:, None] & (rk < DK)[None, :]
    kout = b * dq_b + h * dq_h + tok[:, None] * dq_n + rk[None, :]
    tl.store(DQ + kout, (dq * scale).to(DQ.dtype.element_ty), mask=kmask)
    tl.store(DK_ + kout, (dk * scale).to(DK_.dtype.element_ty), mask=kmask)
    tl.store(DV_ + b * dv_b + h * dv_h + tok[:, None] * dv_n + rv[None, :], (dv * scale).to(DV_.dtype.element_ty),
             mask=tm[:, None] & (rv < DV)[None, :])
