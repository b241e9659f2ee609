"""The legacy scan implementation of the bidirectional GLA (``impl="scan"``, kept for one release to compare; the
design is described in ``triton.py``): one scan kernel for every pass, 16-token chunks, intra-chunk terms by a
per-step recurrence over keys."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from visionfx.kernels.bidir_gla._host import _gates, _p2, _prec, _same_layout

CHUNK = 16  # tokens per step of the output pass (exact intra-chunk decays)
SPAN = 64  # tokens per program of the output pass, and per step of the state pass


@triton.jit
def _scan(
    KS, VS, G, XA, OUTA, YB, OUTB, S_IN, S_OUT,
    N, n_heads, scale_a, scale_b, span, n_spans,
    s_b, s_h, s_n,  # strides of the dk-side inputs k and x ([B, H, N, dk], last dim contiguous)
    t_b, t_h, t_n,  # strides of the dv-side inputs v and y ([B, H, N, dv], last dim contiguous)
    g_dir, g_b, g_h, g_n, g_c,  # the gates: direction d's gate of (b, h, n, c) is G[d*g_dir + b*g_b + ...]
    o_dir, o_bh,  # strides of the fp32 outputs [2, B*H, N, BK|BV]
    REV0: tl.constexpr, SHIFT: tl.constexpr, HAS_A: tl.constexpr, HAS_B: tl.constexpr,
    LOAD_STATE: tl.constexpr, STORE_STATES: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, L: tl.constexpr, PREC: tl.constexpr,
):
    """One direction of one scan over the tokens ``[pid_span * span, +span)``, in chunks of L tokens.

    LOAD_STATE: start from the state stored for this span (else zero). STORE_STATES: store the state entering every
    chunk (the state pass, with L = span of the output pass)."""
    pid_bh, pid_dir, pid_span = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = pid_bh // n_heads, pid_bh % n_heads
    if REV0:
        rev = pid_dir == 0  # scan in descending token order
    else:
        rev = pid_dir == 1
    # SHIFT = 1: the decay applied when stepping onto a token is the gate of the token before it in scan order (the
    # reversed scans of the backward pass); SHIFT = 0: its own gate
    step = tl.where(rev, -1, 1)
    gshift = -SHIFT * step
    base = b * s_b + h * s_h
    vbase = b * t_b + h * t_h
    gbase = pid_dir * g_dir + b * g_b + h * g_h
    rl = tl.arange(0, L)
    rk, rv = tl.arange(0, BK), tl.arange(0, BV)
    km, vm = rk < DK, rv < DV
    sidx = rk[:, None] * BV + rv[None, :]
    t0 = pid_span * span
    t_end = tl.minimum(t0 + span, N)
    if LOAD_STATE:
        S = tl.load(S_IN + ((pid_dir * tl.num_programs(0) + pid_bh) * n_spans + pid_span) * BK * BV + sidx)
    else:
        S = tl.zeros([BK, BV], tl.float32)
    n_chunks = tl.cdiv(t_end - t0, L)
    for c in range(0, n_chunks):
        cc = tl.where(rev, n_chunks - 1 - c, c)
        if STORE_STATES:
            tl.store(S_OUT + ((pid_dir * tl.num_programs(0) + pid_bh) * n_chunks + cc) * BK * BV + sidx, S)
        c0 = t0 + cc * L
        tok = c0 + rl  # memory order inside the chunk
        pos = tl.where(rev, L - 1 - rl, rl)  # scan position of each row
        tm = tok < t_end
        gtok = tok + gshift
        gm = tm & (gtok >= 0) & (gtok < N)
        g = tl.load(G + gbase + gtok[:, None] * g_n + rk[None, :] * g_c, mask=gm[:, None] & km[None, :], other=0.0)
        # cumulative log-decay in scan order, inclusive: a_p = Σ_{r ≤ p} g_r
        a_fwd = tl.cumsum(g, 0)
        a_rev = tl.cumsum(g, 0, reverse=True)
        a = tl.where(rev, a_rev, a_fwd)
        a_last = tl.sum(g, 0)
        k = tl.load(KS + base + tok[:, None] * s_n + rk[None, :], mask=tm[:, None] & km[None, :], other=0.0).to(tl.float32)
        v = tl.load(VS + vbase + tok[:, None] * t_n + rv[None, :], mask=tm[:, None] & vm[None, :], other=0.0).to(tl.float32)
        if HAS_A or HAS_B:
            ea = tl.exp(a)
            if HAS_A:
                x = tl.load(XA + base + tok[:, None] * s_n + rk[None, :], mask=tm[:, None] & km[None, :], other=0.0).to(tl.float32)
                out_a = tl.dot(x * ea, S, input_precision=PREC)
            if HAS_B:
                y = tl.load(YB + vbase + tok[:, None] * t_n + rv[None, :], mask=tm[:, None] & vm[None, :], other=0.0).to(tl.float32)
                out_b = ea * tl.dot(y, tl.trans(S), input_precision=PREC)
            # intra-chunk, exact: walk key positions p_j from last to first in scan order; M[i, :] = exp(a_i − a_j)
            M = tl.zeros([L, BK], tl.float32)
            for t in tl.static_range(L):
                pj = L - 1 - t
                jrow = tl.where(rev, L - 1 - pj, pj)
                # vector-shaped token indices: the interpreter mishandles masks broadcast from scalars
                jtok = c0 + jrow + 0 * rk
                jok = jtok < t_end
                # decay of the token after p_j in scan order, applied to every later row (at p_j = L - 1 every row of
                # M is still 0, so reading past the chunk there is harmless)
                nrow = tl.where(rev, jrow - 1, jrow + 1) + 0 * rk
                ntok = c0 + nrow + gshift
                nok = (c0 + nrow < t_end) & (ntok >= 0) & (ntok < N)
                gn = tl.load(G + gbase + ntok * g_n + rk * g_c, mask=nok & km, other=0.0)
                M = M * tl.exp(gn)[None, :]
                M = tl.where(pos[:, None] == pj, 1.0, M)
                kj = tl.load(KS + base + jtok * s_n + rk, mask=jok & km, other=0.0).to(tl.float32)
                jtok_v = c0 + jrow + 0 * rv
                vj = tl.load(VS + vbase + jtok_v * t_n + rv, mask=(jtok_v < t_end) & vm, other=0.0).to(tl.float32)
                if HAS_A:
                    score = tl.sum(x * M * kj[None, :], 1)
                    out_a += score[:, None] * vj[None, :]
                if HAS_B:
                    w = tl.sum(y * vj[None, :], 1)
                    out_b += w[:, None] * M * kj[None, :]
            if HAS_A:
                tl.store(OUTA + pid_dir * o_dir + pid_bh * o_bh + tok[:, None] * BV + rv[None, :], out_a * scale_a,
                         mask=tm[:, None] & vm[None, :])
            if HAS_B:
                tl.store(OUTB + pid_dir * o_dir + pid_bh * o_bh + tok[:, None] * BK + rk[None, :], out_b * scale_b,
                         mask=tm[:, None] & km[None, :])
        # state update: S = exp(a_last) S + (K ⊙ exp(a_last − a))ᵀ V
        kd = k * tl.exp(a_last[None, :] - a)
        S = S * tl.exp(a_last)[:, None] + tl.dot(tl.trans(kd), v, input_precision=PREC)


def _run_scan(ks, vs, gates, xa, yb, *, rev0, shift, scale_a, scale_b, dk, dv):
    """Both directions of one scan; returns fp32 outputs ``[2, B, H, N, dv]`` (kind A) and ``[2, B, H, N, dk]`` (B).

    Two launches: a state pass (one program per batch, head and direction, walking SPAN-token chunks and storing the
    state entering each) and an output pass parallel over spans, each program starting from its stored state and
    walking its span in CHUNK-token chunks."""
    B, H, N, _ = ks.shape
    BK, BV = _p2(dk), _p2(dv)
    dev = ks.device
    if xa is not None and yb is not None and BK != BV:
        raise ValueError("one scan computes kind A and B outputs together only when dk and dv pad alike")
    n_spans = triton.cdiv(N, SPAN)
    states = torch.empty(2, B * H, n_spans, BK, BV, device=dev, dtype=torch.float32)
    out_a = torch.empty(2, B * H, N, BV, device=dev, dtype=torch.float32) if xa is not None else None
    out_b = torch.empty(2, B * H, N, BK, device=dev, dtype=torch.float32) if yb is not None else None
    width = BK if out_b is not None else BV
    g, g_off = gates
    common = dict(
        REV0=rev0, SHIFT=shift, DK=dk, DV=dv, BK=BK, BV=BV, PREC=_prec(ks.dtype),
        num_warps=4 if max(BK, BV) <= 64 else 8,
    )
    strides = (ks.stride(0), ks.stride(1), ks.stride(2), vs.stride(0), vs.stride(1), vs.stride(2), g_off, *g.stride())
    _scan[(B * H, 2, 1)](
        ks, vs, g, ks, ks, ks, ks, states, states,
        N, H, 0.0, 0.0, N, 1, *strides, 0, 0,
        HAS_A=False, HAS_B=False, LOAD_STATE=False, STORE_STATES=True, L=SPAN, **common,
    )
    _scan[(B * H, 2, n_spans)](
        ks, vs, g,
        xa if xa is not None else ks, out_a if out_a is not None else ks,
        yb if yb is not None else ks, out_b if out_b is not None else ks, states, states,
        N, H, float(scale_a), float(scale_b), SPAN, n_spans, *strides, B * H * N * width, N * width,
        HAS_A=xa is not None, HAS_B=yb is not None, LOAD_STATE=True, STORE_STATES=False, L=CHUNK, **common,
    )
    unpad = lambda t, d: None if t is None else t[..., :d].reshape(2, B, H, N, d)
    return unpad(out_a, dv), unpad(out_b, dk)


def _fwd_scan(q, k, v, gf, gb, scale):
    q, k, v = _same_layout(q, k, v)
    out_a, _ = _run_scan(k, v, _gates(gf, gb), q, None, rev0=False, shift=0, scale_a=0.5 * scale, scale_b=0.0,
                         dk=q.shape[-1], dv=v.shape[-1])
    out = (out_a[0] + out_a[1]).to(q.dtype)
    return out.transpose(1, 2).contiguous()  # token layout [B, N, H, dv], as the chunked path


def _bwd_scan(do, q, k, v, gf, gb, scale):
    q, k, v, do = _same_layout(q, k, v, do.to(q.dtype).transpose(1, 2))
    gates = _gates(gf, gb)
    dk_, dv_ = q.shape[-1], v.shape[-1]
    # dq per direction: forward states (K = k, V = v) read by Y = dO; o = (o_f + o_b)/2 gives the 0.5
    _, dq = _run_scan(k, v, gates, None, do, rev0=False, shift=0, scale_a=0.0, scale_b=0.5 * scale, dk=dk_, dv=dv_)
    # dk, dv per direction: states of q ⊗ dO in the opposite order, gates shifted by one token
    if _p2(dk_) == _p2(dv_):
        dvv, dkk = _run_scan(q, do, gates, k, v, rev0=True, shift=1, scale_a=0.5 * scale, scale_b=0.5 * scale,
                             dk=dk_, dv=dv_)
    else:
        dvv, _ = _run_scan(q, do, gates, k, None, rev0=True, shift=1, scale_a=0.5 * scale, scale_b=0.0, dk=dk_, dv=dv_)
        _, dkk = _run_scan(q, do, gates, None, v, rev0=True, shift=1, scale_a=0.0, scale_b=0.5 * scale, dk=dk_, dv=dv_)
    qf, kf = q.float(), k.float()
    dA_f = qf * dq[0] - kf * dkk[0]
    dA_b = qf * dq[1] - kf * dkk[1]
    dgf = dA_f.flip(2).cumsum(2).flip(2)  # A_t = Σ_{τ≤t} gf_τ
    dgb = dA_b.cumsum(2)  # Z_t = Σ_{τ≥t} gb_τ
    return (dq[0] + dq[1]).to(q.dtype), (dkk[0] + dkk[1]).to(k.dtype), (dvv[0] + dvv[1]).to(v.dtype), dgf, dgb
