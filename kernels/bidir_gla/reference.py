"""PyTorch reference of bidirectional gated linear attention (serves vig; METHODS.md §7.1 step 4, §7.5).

Per batch element and head, with per-token, per-key-channel log-decays ``gf_t, gb_t ≤ 0`` (``α = exp(g)``)::

    forward   t = 1..N:  S_t  = diag(exp(gf_t)) S_{t−1}  + k_tᵀ v_t,   o_f,t = scale · q_t S_t
    backward  t = N..1:  S'_t = diag(exp(gb_t)) S'_{t+1} + k_tᵀ v_t,   o_b,t = scale · q_t S'_t
    o = (o_f + o_b) / 2

Every token sees itself in both directions. Closed form: token j reaches i with the per-channel decay
``exp(Σ_{t=j+1..i} gf_t)`` (j ≤ i) forwards and ``exp(Σ_{t=i..j−1} gb_t)`` (j ≥ i) backwards.

Chunked parallel form (chunk length ``L``). Within a chunk, ``A_i = Σ_{t≤i} gf_t`` (inclusive prefix sum) and
``Z_i = Σ_{t≥i} gb_t`` (inclusive suffix sum). Every decay factor is the exponential of a difference taken in the
direction where it is ≤ 0 (``A_i − A_j`` for i ≥ j, ``Z_i − Z_j`` for i ≤ j, ``A_i``, ``A_last − A_j``, ``Z_i``,
``Z_0 − Z_j``), never a product ``exp(A_i)·exp(−A_j)``, whose second factor overflows under strong decay (a 16-token
chunk of log-decays −6.25 reaches −100). Masked pairs get ``−inf`` before the exponential, so nothing positive is ever
exponentiated. The two carried states are fp32 ``[dk, dv]`` per head; chunks pass them on in a loop over chunks.

Precision: in fp32 an exponent difference carries an absolute error of about ``|A|·2^-24``, with ``|A|`` at most the
chunk length times the strongest log-decay (ViG's gates give at most about 6.25 per token at g = −100, so 400 over a
64-token chunk: a relative error of about 3e-5 on a factor). Smaller chunks reduce it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["bidir_gla_reference"]


def _check(q, k, v, gf, gb, chunk_size) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, N, dk], got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("gf", gf), ("gb", gb)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, H, N, dv] with q's B, H, N {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")


def bidir_gla_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gf: torch.Tensor,
    gb: torch.Tensor,
    *,
    scale: float,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Bidirectional gated linear attention, chunked; states and gates in fp32 (float64 inputs stay float64).

    Args:
        q, k: ``[B, H, N, dk]``.
        v: ``[B, H, N, dv]``.
        gf, gb: ``[B, H, N, dk]``, finite log-decays (≤ 0) of the forward and backward scans.
        scale: multiplies ``q_t S_t``.
        chunk_size: chunk length; it changes the work split, not the result.

    Returns:
        ``(o_f + o_b) / 2``, ``[B, H, N, dv]`` in the dtype of ``q``.
    """
    _check(q, k, v, gf, gb, chunk_size)
    B, H, N, dk = q.shape
    dv = v.shape[-1]
    out_dtype = q.dtype
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if N == 0:
        return q.new_zeros(B, H, 0, dv)
    L = min(int(chunk_size), N)
    n = -(-N // L)
    pad = n * L - N

    # Zero padding at the end is neutral in both directions: padded keys and values are 0, so they add nothing to
    # either state, and their zero log-decays (α = 1) only touch states that stay 0 or are past the last real token.
    def chunks(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t.to(acc), (0, 0, 0, pad))
        return t.reshape(B, H, n, L, t.shape[-1])

    q, k, v, gf, gb = (chunks(t) for t in (q, k, v, gf, gb))
    A = gf.cumsum(-2)
    Z = gb.flip(-2).cumsum(-2).flip(-2)  # suffix sums of the gates only; q, k, v are never flipped

    # intra-chunk: weight of j in i is Σ_c q_ic k_jc (D_f + D_b)_ijc, the diagonal counted once per direction
    idx = torch.arange(L, device=q.device)
    lower = (idx[:, None] >= idx[None, :])[..., None]  # i ≥ j, [L, L, 1]
    upper = (idx[:, None] <= idx[None, :])[..., None]  # i ≤ j
    neg_inf = torch.tensor(float("-inf"), dtype=acc, device=q.device)
    d_f = torch.where(lower, A[..., :, None, :] - A[..., None, :, :], neg_inf).exp()
    d_b = torch.where(upper, Z[..., :, None, :] - Z[..., None, :, :], neg_inf).exp()
    w = torch.einsum("bhnic,bhnjc,bhnijc->bhnij", q, k, d_f + d_b)
    o = w @ v

    # per-chunk state contributions (decayed to the chunk's far end) and whole-chunk decays
    u_f = torch.einsum("bhnjc,bhnje->bhnce", k * (A[..., -1:, :] - A).exp(), v)
    u_b = torch.einsum("bhnjc,bhnje->bhnce", k * (Z[..., :1, :] - Z).exp(), v)
    decay_f = A[..., -1, :].exp()[..., None]  # [B, H, n, dk, 1]
    decay_b = Z[..., 0, :].exp()[..., None]

    # states entering each chunk: from the left for the forward scan, from the right for the backward scan
    s = q.new_zeros(B, H, dk, dv)
    s_f = []
    for c in range(n):
        s_f.append(s)
        s = decay_f[:, :, c] * s + u_f[:, :, c]
    s = q.new_zeros(B, H, dk, dv)
    s_b = [s] * n
    for c in range(n - 1, -1, -1):
        s_b[c] = s
        s = decay_b[:, :, c] * s + u_b[:, :, c]
    o = o + torch.einsum("bhnic,bhnce->bhnie", q * A.exp(), torch.stack(s_f, 2))
    o = o + torch.einsum("bhnic,bhnce->bhnie", q * Z.exp(), torch.stack(s_b, 2))
    o = o.reshape(B, H, n * L, dv)[:, :, :N]
    return (o * (0.5 * scale)).to(out_dtype)
