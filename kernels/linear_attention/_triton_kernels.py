"""Triton device code of the non-causal linear-attention family (see ``triton.py`` for the design and the contract).

Per (batch, head), with ``φ`` the feature map, ``w`` the key weights and ``R`` the rotations (all optional):

* state pass:  ``S = Σ_j (R_j w_j φ(k_j))ᵀ v_j`` ``[D, D]``, ``z1 = Σ_j w_j φ(k_j)``, ``z2 = Σ_j v_j`` (subtractive);
* output pass: divisive ``o_i = (R_i φ(q_i)) S / (φ(q_i)·z1 + eps)``; subtractive
  ``o_i = v̄ + scale · φ(q_i) (S/N − k̄ᵀv̄)`` with ``k̄ = z1/N``, ``v̄ = z2/N``;
* backward query pass: writes ``dq`` and reduces ``dS`` ``[D, D]`` and ``dz`` ``[D]``;
* backward key pass: writes ``dk``, ``dv`` (and ``dw``) from ``dS``, ``dz`` and the forward state.

Each pass is a ``@triton.jit`` helper over a token range; the fused kernels run both passes of one direction in one
program per (batch, head), keeping the state in registers; the split kernels give each program a chunk of tokens and
combine the partial states with fp32 atomics.

Matrix products: fp32 inputs use ``input_precision=FP32_DOT``: ``"tf32x3"`` on GPUs (three TF32 tensor-core
products, about fp32 accuracy; ``"ieee"`` FMA products spill kilobytes per thread on sm_90) up to a 64-wide state,
``"ieee"`` beyond and in the interpreter. 16-bit inputs use tensor cores on ``LP`` operands (bf16 on GPUs): an operand that is not exactly
representable in ``LP`` (the fp32 state, rotated or weighted features) is split into ``hi + lo`` ``LP`` parts and the
``lo·lo`` term is dropped, so products keep ~16 significant bits and the fp32 range (fp16 operands could overflow with
long sequences). ``*_EXACT`` flags skip the ``lo`` terms of operands
known to be exact (bf16 inputs, relu or identity features), which keeps the arithmetic intensity low.
"""

import os

import triton
import triton.language as tl

F32 = tl.float32
# fp32 products: three TF32 tensor-core products (hi·hi + hi·lo + lo·hi, ~fp32 accuracy) on GPUs; the interpreter
# computes in plain fp32 ("ieee"). Never single-pass TF32 and its ~1e-3 relative error. With a 128-wide state the
# tf32x3 operand copies overflow shared memory (the backward needs ~330 KiB), so those products use slow but exact
# "ieee" FMA products; the dispatcher sends fp32 with head dims > 64 to the reference (cuBLAS) instead.
FP32_DOT: tl.constexpr = tl.constexpr("ieee" if os.environ.get("TRITON_INTERPRET", "0") == "1" else "tf32x3")


@triton.jit
def _phi(x, FEATURE: tl.constexpr):
    if FEATURE == 1:
        x = tl.maximum(x, 0.0)
    elif FEATURE == 2:
        x = tl.where(x > 0, x + 1.0, tl.exp(x))
    return x


@triton.jit
def _times_dphi(g, x, FEATURE: tl.constexpr):
    """``g ⊙ φ'(x)``."""
    if FEATURE == 1:
        g = tl.where(x > 0, g, 0.0)
    elif FEATURE == 2:
        g = tl.where(x > 0, g, g * tl.exp(x))
    return g


@triton.jit
def _mm(a, b, acc, A_EXACT: tl.constexpr, B_EXACT: tl.constexpr, LOWP: tl.constexpr, LP: tl.constexpr):
    """``acc + a @ b`` for fp32 tiles ``a``, ``b`` (split into LP hi/lo parts in the 16-bit path)."""
    if LOWP:
        ah = a.to(LP)
        bh = b.to(LP)
        acc = tl.dot(ah, bh, acc)
        if not B_EXACT:
            acc = tl.dot(ah, (b - bh.to(F32)).to(LP), acc)
        if not A_EXACT:
            acc = tl.dot((a - ah.to(F32)).to(LP), bh, acc)
    elif b.shape[1] > 64:
        acc = tl.dot(a, b, acc, input_precision="ieee")  # see FP32_DOT
    else:
        acc = tl.dot(a, b, acc, input_precision=FP32_DOT)
    return acc


@triton.jit
def _mm_state(a, s_hi, s_lo, acc, A_EXACT: tl.constexpr, LOWP: tl.constexpr, LP: tl.constexpr):
    """``acc + a @ s`` with a loop-invariant state ``s`` already split by :func:`_split_hi` / :func:`_split_lo`."""
    if LOWP:
        ah = a.to(LP)
        acc = tl.dot(ah, s_hi, acc)
        acc = tl.dot(ah, s_lo, acc)
        if not A_EXACT:
            acc = tl.dot((a - ah.to(F32)).to(LP), s_hi, acc)
    elif s_hi.shape[1] > 64:
        acc = tl.dot(a, s_hi, acc, input_precision="ieee")  # see FP32_DOT
    else:
        acc = tl.dot(a, s_hi, acc, input_precision=FP32_DOT)
    return acc


@triton.jit
def _split_hi(s, LOWP: tl.constexpr, LP: tl.constexpr):
    if LOWP:
        return s.to(LP)
    else:
        return s


@triton.jit
def _split_lo(s, s_hi, LOWP: tl.constexpr, LP: tl.constexpr):
    if LOWP:
        return (s - s_hi.to(F32)).to(LP)
    else:
        return s_hi


@triton.jit
def _rotate(x, cos_ptr, sin_ptr, offs_n, mask_n, HALF, INVERSE: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rotate channel pairs ``(2p, 2p+1)`` of ``x [BLOCK_N, BLOCK_D]`` by the tables ``[N, HALF]`` (or back)."""
    offs_p = tl.arange(0, BLOCK_D // 2)
    idx = offs_n[:, None] * HALF + offs_p[None, :]
    mask = mask_n[:, None] & (offs_p < HALF)[None, :]
    c = tl.load(cos_ptr + idx, mask=mask, other=0.0)
    s = tl.load(sin_ptr + idx, mask=mask, other=0.0)
    if INVERSE:
        s = -s
    even, odd = tl.split(tl.reshape(x, (BLOCK_N, BLOCK_D // 2, 2)))
    return tl.reshape(tl.join(even * c - odd * s, odd * c + even * s), (BLOCK_N, BLOCK_D))


@triton.jit
def _first_row(acc):
    """Row 0 of a ``[16, X]`` tile whose rows are equal (a column sum made by :func:`_mm` with a ones tile)."""
    r = tl.arange(0, 16)
    return tl.sum(tl.where((r == 0)[:, None], acc, 0.0), 0)


@triton.jit
def _state_phase(k_base, v_base, w_base, cos_ptr, sin_ptr, skn, skd, svn, svd, swn, start, end, D, HALF,
                 FEATURE: tl.constexpr, SUBTRACTIVE: tl.constexpr, HAS_KW: tl.constexpr, HAS_ROPE: tl.constexpr,
                 K_EXACT: tl.constexpr, V_EXACT: tl.constexpr, LOWP: tl.constexpr, LP: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partial ``S``, ``z1``, ``z2`` over tokens ``[start, end)``.

    The subtractive form takes its two column sums as products with a ones tile on the tensor cores (rows of a
    ``[16, D]`` accumulator) instead of two cross-warp reductions per block: at B = 64, N = 4097 on the H200 this
    took its forward from 1.86x to 1.14x the memory floor. The divisive form keeps ``tl.sum`` for its one sum,
    which measured faster there (1.30x against 1.52x)."""
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    S = tl.zeros((BLOCK_D, BLOCK_D), F32)
    z1 = tl.zeros((BLOCK_D,), F32)
    z2 = tl.zeros((BLOCK_D,), F32)
    if SUBTRACTIVE:
        ones = tl.full((16, BLOCK_N), 1.0, F32)
        z1_rows = tl.zeros((16, BLOCK_D), F32)
        z2_rows = tl.zeros((16, BLOCK_D), F32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        mask = mask_n[:, None] & mask_d[None, :]
        # padded rows and columns must stay 0 after φ (elu1(0) = 1)
        k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=mask, other=0.0).to(F32)
        kf = tl.where(mask, _phi(k, FEATURE), 0.0)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=mask, other=0.0).to(F32)
        if HAS_KW:
            kf = kf * tl.load(w_base + offs_n * swn, mask=mask_n, other=0.0).to(F32)[:, None]
        if SUBTRACTIVE:
            z1_rows = _mm(ones, kf, z1_rows, True, K_EXACT, LOWP, LP)
            z2_rows = _mm(ones, v, z2_rows, True, V_EXACT, LOWP, LP)
        else:
            z1 += tl.sum(kf, 0)
        if HAS_ROPE:
            kf = _rotate(kf, cos_ptr, sin_ptr, offs_n, offs_n < end, HALF, False, BLOCK_N, BLOCK_D)
        S = _mm(tl.trans(kf), v, S, K_EXACT, V_EXACT, LOWP, LP)
    if SUBTRACTIVE:
        z1 = _first_row(z1_rows)
        z2 = _first_row(z2_rows)
    return S, z1, z2


@triton.jit
def _readout_matrix(S, z1, z2, N, scale, SUBTRACTIVE: tl.constexpr):
    """The matrix the features of q multiply: ``S`` (divisive) or ``scale·(S/N − k̄ᵀv̄)`` (subtractive)."""
    if SUBTRACTIVE:
        inv_n = 1.0 / N
        M = (S * inv_n - (z1 * inv_n)[:, None] * (z2 * inv_n)[None, :]) * scale
    else:
        M = S
    return M


@triton.jit
def _out_phase(q_base, o_base, cos_ptr, sin_ptr, sqn, sqd, son, S, z1, z2, start, end, N, D, HALF, eps, scale,
               FEATURE: tl.constexpr, SUBTRACTIVE: tl.constexpr, HAS_ROPE: tl.constexpr, Q_EXACT: tl.constexpr,
               LOWP: tl.constexpr, LP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Write ``o`` (rows ``son`` apart, unit channel stride) for tokens ``[start, end)``."""
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    M = _readout_matrix(S, z1, z2, N, scale, SUBTRACTIVE)
    m_hi = _split_hi(M, LOWP, LP)
    m_lo = _split_lo(M, m_hi, LOWP, LP)
    vbar = z2 * (1.0 / N)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = (offs_n < end)[:, None] & mask_d[None, :]
        q = tl.load(q_base + offs_n[:, None] * sqn + offs_d[None, :] * sqd, mask=mask, other=0.0).to(F32)
        qf = tl.where(mask, _phi(q, FEATURE), 0.0)
        acc = tl.zeros((BLOCK_N, BLOCK_D), F32)
        if SUBTRACTIVE:
            o = _mm_state(qf, m_hi, m_lo, acc, Q_EXACT, LOWP, LP) + vbar[None, :]
        else:
            den = tl.sum(qf * z1[None, :], 1) + eps
            if HAS_ROPE:
                qf = _rotate(qf, cos_ptr, sin_ptr, offs_n, offs_n < end, HALF, False, BLOCK_N, BLOCK_D)
            o = _mm_state(qf, m_hi, m_lo, acc, Q_EXACT, LOWP, LP) / den[:, None]
        tl.store(o_base + offs_n[:, None] * son + offs_d[None, :], o.to(o_base.dtype.element_ty), mask=mask)


@triton.jit
def _dq_phase(q_base, do_base, dq_base, cos_ptr, sin_ptr, sqn, sqd, sdon, sdod, S, z1, z2, start, end, N, D, HALF,
              eps, scale, FEATURE: tl.constexpr, SUBTRACTIVE: tl.constexpr, HAS_ROPE: tl.constexpr,
              Q_EXACT: tl.constexpr, DO_EXACT: tl.constexpr, LOWP: tl.constexpr, LP: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Write ``dq`` for tokens ``[start, end)``; return their ``dS`` and ``dz``.

    Divisive: ``dS = Σ (Rφq)ᵀ (do/den)``, ``dz = Σ φq·dden`` with ``dden = −(do·num)/den²``,
    ``dφq = Rᵀ((do/den) Sᵀ) + dden·z1``.
    Subtractive: ``dS = Σ φqᵀ do`` (before ``scale/N``), ``dz = Σ do``.
    """
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    M = _readout_matrix(S, z1, z2, N, scale, SUBTRACTIVE)
    m_hi = _split_hi(M, LOWP, LP)
    m_lo = _split_lo(M, m_hi, LOWP, LP)
    mt_hi = tl.trans(m_hi)
    mt_lo = tl.trans(m_lo)
    dS = tl.zeros((BLOCK_D, BLOCK_D), F32)
    dz = tl.zeros((BLOCK_D,), F32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = (offs_n < end)[:, None] & mask_d[None, :]
        q = tl.load(q_base + offs_n[:, None] * sqn + offs_d[None, :] * sqd, mask=mask, other=0.0).to(F32)
        qf = tl.where(mask, _phi(q, FEATURE), 0.0)
        do = tl.load(do_base + offs_n[:, None] * sdon + offs_d[None, :] * sdod, mask=mask, other=0.0).to(F32)
        acc = tl.zeros((BLOCK_N, BLOCK_D), F32)
        if SUBTRACTIVE:
            dqf = _mm_state(do, mt_hi, mt_lo, acc, DO_EXACT, LOWP, LP)
            dS = _mm(tl.trans(qf), do, dS, Q_EXACT, DO_EXACT, LOWP, LP)
            dz += tl.sum(do, 0)
        else:
            den = tl.sum(qf * z1[None, :], 1) + eps
            qr = qf
            if HAS_ROPE:
                qr = _rotate(qf, cos_ptr, sin_ptr, offs_n, offs_n < end, HALF, False, BLOCK_N, BLOCK_D)
            num = _mm_state(qr, m_hi, m_lo, acc, Q_EXACT, LOWP, LP)
            inv_den = 1.0 / den
            dden = -tl.sum(do * num, 1) * inv_den * inv_den
            # (do/den) Mᵀ = (do Mᵀ)/den and (Rφq)ᵀ(do/den) = (Rφq/den)ᵀ do keep the exact do as one operand
            dqf = _mm_state(do, mt_hi, mt_lo, acc, DO_EXACT, LOWP, LP) * inv_den[:, None]
            if HAS_ROPE:
                dqf = _rotate(dqf, cos_ptr, sin_ptr, offs_n, offs_n < end, HALF, True, BLOCK_N, BLOCK_D)
            dqf += dden[:, None] * z1[None, :]
            dS = _mm(tl.trans(qr * inv_den[:, None]), do, dS, False, DO_EXACT, LOWP, LP)
            dz += tl.sum(qf * dden[:, None], 0)
        dq = _times_dphi(dqf, q, FEATURE)
        tl.store(dq_base + offs_n[:, None] * D + offs_d[None, :], dq.to(dq_base.dtype.element_ty), mask=mask)
    return dS, dz


@triton.jit
def _dkv_phase(k_base, v_base, w_base, cos_ptr, sin_ptr, dk_base, dv_base, dw_base, skn, skd, svn, svd, swn,
               dS, dz, z1, z2, start, end, N, D, HALF, scale,
               FEATURE: tl.constexpr, SUBTRACTIVE: tl.constexpr, HAS_KW: tl.constexpr, HAS_ROPE: tl.constexpr,
               K_EXACT: tl.constexpr, V_EXACT: tl.constexpr, LOWP: tl.constexpr, LP: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Write ``dk``, ``dv`` (and ``dw``) for tokens ``[start, end)``.

    Divisive: ``dv = (Rwφk) dS``, ``dkw = Rᵀ(v dSᵀ) + dz``, ``dw = φk·dkw``, ``dφk = w dkw``.
    Subtractive, with ``G = scale·dS/N``: ``dφk = v Gᵀ − G v̄``, ``dv = φk G − k̄ G + dz/N``.
    """
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    inv_n = 1.0 / N
    if SUBTRACTIVE:
        G = dS * (scale * inv_n)
    else:
        G = dS
    g_hi = _split_hi(G, LOWP, LP)
    g_lo = _split_lo(G, g_hi, LOWP, LP)
    gt_hi = tl.trans(g_hi)
    gt_lo = tl.trans(g_lo)
    g_vbar = tl.sum(G * (z2 * inv_n)[None, :], 1)
    kbar_g = tl.sum((z1 * inv_n)[:, None] * G, 0)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=mask, other=0.0).to(F32)
        kf = tl.where(mask, _phi(k, FEATURE), 0.0)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=mask, other=0.0).to(F32)
        acc = tl.zeros((BLOCK_N, BLOCK_D), F32)
        if SUBTRACTIVE:
            dkf = _mm_state(v, gt_hi, gt_lo, acc, V_EXACT, LOWP, LP) - g_vbar[None, :]
            dv = _mm_state(kf, g_hi, g_lo, acc, K_EXACT, LOWP, LP) + (dz * inv_n - kbar_g)[None, :]
        else:
            kw = kf
            if HAS_KW:
                w = tl.load(w_base + offs_n * swn, mask=mask_n, other=0.0).to(F32)
                kw = kf * w[:, None]
            kr = kw
            if HAS_ROPE:
                kr = _rotate(kw, cos_ptr, sin_ptr, offs_n, offs_n < end, HALF, False, BLOCK_N, BLOCK_D)
            dv = _mm_state(kr, g_hi, g_lo, acc, K_EXACT, LOWP, LP)
            dkf = _mm_state(v, gt_hi, gt_lo, acc, V_EXACT, LOWP, LP)
            if HAS_ROPE:
                dkf = _rotate(dkf, cos_ptr, sin_ptr, offs_n, offs_n < end, HALF, True, BLOCK_N, BLOCK_D)
            dkf += dz[None, :]
            if HAS_KW:
                tl.store(dw_base + offs_n, tl.sum(kf * dkf, 1), mask=mask_n)
                dkf = dkf * w[:, None]
        dk = _times_dphi(dkf, k, FEATURE)
        out = offs_n[:, None] * D + offs_d[None, :]
        tl.store(dk_base + out, dk.to(dk_base.dtype.element_ty), mask=mask)
        tl.store(dv_base + out, dv.to(dv_base.dtype.element_ty), mask=mask)


@triton.jit
def _put_state(state, vec, bh, S, z1, z2, ATOMIC: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.arange(0, BLOCK_D)
    s_ptr = state + bh.to(tl.int64) * (BLOCK_D * BLOCK_D) + r[:, None] * BLOCK_D + r[None, :]
    v_ptr = vec + bh.to(tl.int64) * (2 * BLOCK_D) + r
    if ATOMIC:
        tl.atomic_add(s_ptr, S, sem="relaxed")
        tl.atomic_add(v_ptr, z1, sem="relaxed")
        tl.atomic_add(v_ptr + BLOCK_D, z2, sem="relaxed")
    else:
        tl.store(s_ptr, S)
        tl.store(v_ptr, z1)
        tl.store(v_ptr + BLOCK_D, z2)


@triton.jit
def _get_state(state, vec, bh, BLOCK_D: tl.constexpr):
    r = tl.arange(0, BLOCK_D)
    S = tl.load(state + bh.to(tl.int64) * (BLOCK_D * BLOCK_D) + r[:, None] * BLOCK_D + r[None, :])
    v_ptr = vec + bh.to(tl.int64) * (2 * BLOCK_D) + r
    return S, tl.load(v_ptr), tl.load(v_ptr + BLOCK_D)


@triton.jit
def _bases(q, k, v, w, sqb, sqh, skb, skh, svb, svh, swb, swh, bh, H):
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    return q + b * sqb + h * sqh, k + b * skb + h * skh, v + b * svb + h * svh, w + b * swb + h * swh


@triton.jit
def fwd_kernel(q, k, v, w, cos, sin, o, state, vec,
               sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, swb, swh, swn, sob, soh, son,
               H, N, D, HALF, eps, scale, CHUNK, N_BUCKET,
               PHASE: tl.constexpr, SAVE_STATE: tl.constexpr,
               FEATURE: tl.constexpr, SUBTRACTIVE: tl.constexpr, HAS_KW: tl.constexpr, HAS_ROPE: tl.constexpr,
               Q_EXACT: tl.constexpr, K_EXACT: tl.constexpr, V_EXACT: tl.constexpr,
               LOWP: tl.constexpr, LP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Forward. ``PHASE`` 0: fused (grid ``[B·H]``), 1: partial states by atomics, 2: output (grid ``[B·H, splits]``)."""
    bh = tl.program_id(0)
    start = tl.program_id(1) * CHUNK
    end = tl.minimum(start + CHUNK, N)
    q_base, k_base, v_base, w_base = _bases(q, k, v, w, sqb, sqh, skb, skh, svb, svh, swb, swh, bh, H)
    if PHASE == 2:
        S, z1, z2 = _get_state(state, vec, bh, BLOCK_D)
    else:
        S, z1, z2 = _state_phase(k_base, v_base, w_base, cos, sin, skn, skd, svn, svd, swn, start, end, D, HALF,
                                 FEATURE, SUBTRACTIVE, HAS_KW, HAS_ROPE, K_EXACT, V_EXACT, LOWP, LP,
                                 BLOCK_N, BLOCK_D)
        if PHASE == 1 or SAVE_STATE:
            _put_state(state, vec, bh, S, z1, z2, PHASE == 1, BLOCK_D)
    if PHASE != 1:
        o_base = o + (bh // H).to(tl.int64) * sob + (bh % H).to(tl.int64) * soh
        _out_phase(q_base, o_base, cos, sin, sqn, sqd, son, S, z1, z2, start, end, N, D, HALF, eps, scale,
                   FEATURE, SUBTRACTIVE, HAS_ROPE, Q_EXACT, LOWP, LP, BLOCK_N, BLOCK_D)


@triton.jit
def bwd_kernel(q, k, v, w, cos, sin, do, dq, dk, dv, dw, state, vec, dstate, dvec,
               sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, swb, swh, swn, sdob, sdoh, sdon, sdod,
               H, N, D, HALF, eps, scale, CHUNK, N_BUCKET,
               PHASE: tl.constexpr,
               FEATURE: tl.constexpr, SUBTRACTIVE: tl.constexpr, HAS_KW: tl.constexpr, HAS_ROPE: tl.constexpr,
               Q_EXACT: tl.constexpr, K_EXACT: tl.constexpr, V_EXACT: tl.constexpr, DO_EXACT: tl.constexpr,
               LOWP: tl.constexpr, LP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Backward. ``PHASE`` 0: fused, 1: ``dq`` and partial ``dS``/``dz`` by atomics, 2: ``dk``, ``dv``, ``dw``."""
    bh = tl.program_id(0)
    start = tl.program_id(1) * CHUNK
    end = tl.minimum(start + CHUNK, N)
    q_base, k_base, v_base, w_base = _bases(q, k, v, w, sqb, sqh, skb, skh, svb, svh, swb, swh, bh, H)
    S, z1, z2 = _get_state(state, vec, bh, BLOCK_D)
    row = bh.to(tl.int64) * N * D
    if PHASE == 2:
        dS, dz, _unused = _get_state(dstate, dvec, bh, BLOCK_D)
    else:
        do_base = do + (bh // H).to(tl.int64) * sdob + (bh % H).to(tl.int64) * sdoh
        dS, dz = _dq_phase(q_base, do_base, dq + row, cos, sin, sqn, sqd, sdon, sdod, S, z1, z2, start, end, N, D,
                           HALF, eps, scale, FEATURE, SUBTRACTIVE, HAS_ROPE, Q_EXACT, DO_EXACT, LOWP, LP,
                           BLOCK_N, BLOCK_D)
        if PHASE == 1:
            _put_state(dstate, dvec, bh, dS, dz, dz, True, BLOCK_D)
    if PHASE != 1:
        _dkv_phase(k_base, v_base, w_base, cos, sin, dk + row, dv + row, dw + bh.to(tl.int64) * N,
                   skn, skd, svn, svd, swn, dS, dz, z1, z2, start, end, N, D, HALF, scale,
                   FEATURE, SUBTRACTIVE, HAS_KW, HAS_ROPE, K_EXACT, V_EXACT, LOWP, LP, BLOCK_N, BLOCK_D)
