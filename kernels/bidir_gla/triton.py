"""Triton kernels of bidirectional gated linear attention (vig), forward and backward.

Same signature and semantics as :func:`visionfx.kernels.bidir_gla.reference.bidir_gla_reference`.

Chunked design (``impl="chunked"``). Tokens are cut into chunks of ``CH = 64``. In scan order (ascending tokens
forwards, descending backwards) let ``a_i`` be the inclusive cumulative log-decay; token j reaches i ≥ j with the
per-channel factor ``exp(a_i − a_j) ≤ 1``.

* **States** (two launches): ``_chunk_sums`` (grid ``(B·H, direction[·kind], chunk)``, all chunks in parallel)
  computes every chunk's own term ``U_c = (k ⊙ exp(after))ᵀ v`` (fp32) and its decay ``E_c = exp(Σ_chunk g)``; then
  ``_state_scan`` walks the chunks of each direction sequentially, ``S ← E_c ⊙ S + U_c``, and stores the state
  entering every chunk (in bf16 for bf16 inputs, where it is read only as a bf16 dot operand). Only elementwise work
  is serial, and the state's rows are independent, so for small ``B·H`` the scan splits them over more programs.
* **Output pass** (``_chunk_fwd``, grid ``(B·H, chunk)``): a program owns one chunk and *both* directions, so it
  reads q, k, v once and writes ``(o_f + o_b)/2`` once, in the input dtype. Per direction, with the reference point
  just before the chunk in scan order and ``q̃ = q ⊙ exp(a_i − a_c)`` (≤ 1):

  - earlier chunks: ``q̃ @ S_c``, one tensor-core product;
  - the chunk itself, one ``[CH, CH]`` score product: ``k̂ = k ⊙ exp(a_c − a_j)``, ``(q̃ k̂ᵀ ⊙ causal) @ v``. The
    factors of ``k̂`` are ≥ 1, so this is used only when every channel's decay over the chunk is at most
    ``DIAG_SPAN_MAX`` = 40 nats (checked per chunk, per direction: ``min_c Σ_chunk g ≥ −40``), so no factor exceeds
    e^40 ≈ 2.4e17 and none of the ``q̃`` factors falls below e^−40, far above fp32/bf16/tf32's smallest normal
    (e^−87): both operands and every product are finite (masked pairs included, at most e^40·|q||k| per channel
    before masking); an operand can underflow only where ``|q| < 3e−21``, dropping a term below ``3e−21·|k|``; and
    the exponents' rounding stays below 40·2⁻²⁴ ≈ 2.4e−6 relative. Otherwise (some channel decays faster than
    0.625 nats per token on average over the chunk) the chunk falls back to the exact computation: a walk over its
    key positions building ``exp(a_i − a_j)`` by one multiplication per step, then one tensor-core product.

  No other ``exp`` of a positive exponent is formed anywhere: every other exponent is a sum of gates (≤ 0), each
  summed from exactly the gates it stands for (a shifted load gives the gates *after* a row, instead of the
  difference ``total − incl``), which also keeps its rounding error proportional to its own size.
* **Backward**: the same two state launches compute both the forward states and the gradient states
  ``R ← exp(total) R + (q ⊙ exp(incl))ᵀ dO`` (walking against scan order; R is the later tokens' ``q ⊗ dO`` decayed
  to the chunk's end), then ``_chunk_bwd`` (grid ``(B·H, chunk)``, both directions on chip) builds dq, dk, dv from
  the two states and the chunk's own ``[CH, CH]`` products (factorised or exact as above) and the gate gradients:
  the cumulative sums over tokens (suffix sums forwards, prefix sums backwards) of ``dA = q ⊙ dq_d − k ⊙ dk_d``,
  summed inside the chunk from the exact value at its boundary, a product of the two states that meet there (see
  ``_chunk_bwd``; one sum over the whole sequence cancelled away the gradient's digits at long N in bf16).

The whole chunk is one register tile. An earlier design cut chunks into four 16-token sub-chunks with one small
product per pair, and walked the states with one program doing each chunk's loads, sums and product in series; on
the H200 (bf16, N = 4097, B = 16, H = 6, d = 64) the 64-token tile took the output pass from 1.01 to 0.29 ms and the
backward's from 3.3 to 1.5 ms, and the forward as a whole went from 1.98 to 0.66 ms (at N = 16385, B = 1, where the
serial walk dominated, from 1.53 to 0.27 ms; docs/benchmarks.md, seventh series).

Dot operands are bf16 for bf16 inputs and fp32 (ieee for fp32, tf32 for fp16) otherwise, always accumulated in fp32;
gates and cumulative log-decays are fp32 throughout. Launches: three per forward, three per backward.

Fusing the state scan into the output pass was considered and not done: a fused program must walk the sequence, so
it serialises the intra-chunk work that the output pass runs in parallel over chunks, and since the output pass sums
both directions on chip, a fused version would need an fp32 scratch or atomics plus a cast.

Direct design (``impl="direct"``; the default ``"auto"`` takes it for the forward up to ``DIRECT_MAX_CHUNKS`` = 4
chunks, N ≤ 256, for the backward up to ``DIRECT_BWD_MAX_CHUNKS`` = 3, N ≤ 192, and ``"chunked"`` beyond: timed on
the H200 at N = 65–256, B·N ≈ 50k, bf16, the direct forward was faster at every length (0.48 vs 0.56 ms at N = 256),
the direct backward up to N = 129 (3.40 vs 3.77 ms) but not at N = 197 (3.08 vs 2.58 ms)). Short sequences (vig at
32² CIFAR images has N = 65, at 224² N = 197) have too few chunks for the states to pay: they are as large as the
inputs, and are written and read again.
The direct kernels (the same ``_chunk_fwd`` and ``_chunk_bwd`` without ``STATES``) store no state: a program owns one
chunk (64 tokens forwards, ``DIRECT_BWD_CH`` = 32 in the backward, where smaller tiles spill less) and both
directions, and meets every earlier chunk in scan order directly, one ``[CH, CH]`` score product each, with both
factors ≤ 1 (the reference point is the chunk's start: ``q ⊙ exp(incl)`` and ``k_o ⊙ exp(after_o + gates of the
chunks in between)``); its own chunk is handled as in the chunked design. The backward program builds dq from the
keys of its own and earlier chunks and dk, dv from the queries of its own and later chunks; the gate gradients are
summed inside each chunk by the kernel, then the other chunks' totals are added (``_add_carries``). A short last
chunk (vig's 65 tokens are one 64-token chunk and one token) takes a tile of the fewest power-of-two rows (≥ 16) that
hold it, in its own program and in the products the others form with it (``_tail_rows``; on the H200 at N = 65,
B = 1024, bf16 the forward went from 0.70 to 0.52 ms and forward+backward from 3.49 to 3.24 ms, against 0.26 and
1.94 ms at N = 64). Work grows with the square of the number of chunks, so the direct kernels are for short
sequences only. One launch per forward, one plus the carries per backward.

Legacy design (``impl="scan"``, ``_scan.py``, kept for one release to compare): one scan kernel for every pass,
16-token chunks, intra-chunk terms by a per-step recurrence over keys, per-direction fp32 outputs summed afterwards;
its backward rescans ``(scale·q) ⊗ dO`` in the opposite order with gates shifted by one token. Select with the
``impl`` keyword or the module constant ``IMPL``.
"""

from __future__ import annotations

import torch
import triton

from visionfx.kernels._triton_host import device_sm_count, token_layout_output
from visionfx.kernels.bidir_gla._host import _dot_dtype, _gates, _p2, _prec
from visionfx.kernels.bidir_gla._scan import _bwd_scan, _fwd_scan
from visionfx.kernels.bidir_gla._triton_kernels import _chunk_bwd, _chunk_fwd, _chunk_sums, _state_scan

__all__ = ["bidir_gla_triton"]

IMPL = "auto"  # default: "auto" ("direct" for sequences of few chunks, else "chunked") or one of them
CH = 64  # tokens per chunk: one register tile, and the state pass's step
DIRECT_MAX_CHUNKS = 4  # longest sequence, in chunks, whose forward "auto" runs without stored states
DIRECT_BWD_MAX_CHUNKS = 3  # and whose backward
DIRECT_BWD_CH = 32  # tokens per chunk of the direct backward
DIAG_SPAN_MAX = 40.0  # largest per-channel decay (nats) of a chunk whose scores with itself are factorised
SCAN_MIN_ROWS = 8  # fewest state rows one program of the serial state scan carries


def _chunked_states(k, v, q, do, gates, kinds):
    """``[kinds, 2, B·H, n_chunks, BK, BV]`` states entering each chunk (kind 0 forward, kind 1 gradient)."""
    B, H, N, dk = k.shape
    dv = v.shape[-1]
    BK, BV = _p2(dk), _p2(dv)
    n_chunks = triton.cdiv(N, CH)
    lowp = k.dtype == torch.bfloat16
    u = torch.empty(kinds, 2, B * H, n_chunks, BK, BV, device=k.device, dtype=torch.float32)
    e = torch.empty(kinds, 2, B * H, n_chunks, BK, device=k.device, dtype=torch.float32)
    g, g_off = gates
    _chunk_sums[(B * H, 2 * kinds, n_chunks)](
        k, v, q, do, g, u, e, N, n_chunks, B * H, H,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), g_off, *g.stride(),
        do.stride(0), do.stride(1), do.stride(2),
        KINDS=kinds, DK=dk, DV=dv, BK=BK, BV=BV, CH=CH, DT=_dot_dtype(k.dtype), PREC=_prec(k.dtype),
        num_warps=2,  # H200, bf16, d = 64: 0.283 ms at 2 warps, 0.339 at 4, 0.436 at 8 (N = 4097, B = 16)
    )
    states = torch.empty_like(u, dtype=torch.bfloat16 if lowp else torch.float32)
    bks = _scan_rows(B * H * 2 * kinds, BK, k.device)
    _state_scan[(B * H, 2 * kinds, BK // bks)](u, e, states, n_chunks, B * H, KINDS=kinds, BK=BK, BV=BV, BKS=bks,
                                               num_warps=4, num_stages=3)
    return states


def _scan_rows(n_programs, bk, device):
    """State rows per program of the serial scan: halved (down to SCAN_MIN_ROWS) until there are a few programs per
    SM, since for small ``B·H`` the scan's parallelism comes from splitting the state."""
    sms = device_sm_count(device) if device.type == "cuda" else 132
    rows = bk
    while n_programs * (bk // rows) < 4 * sms and rows > SCAN_MIN_ROWS:
        rows //= 2
    return rows


def _launch(q, v, gates, scale, ch, backward, states):
    """Grid, arguments and meta-parameters of ``_chunk_fwd``/``_chunk_bwd`` after their tensors."""
    B, H, N, dk = q.shape
    g, g_off = gates
    BK, BV = _p2(dk), _p2(v.shape[-1])
    strides = (q.stride(0), q.stride(1), q.stride(2), v.stride(0), v.stride(1), v.stride(2), g_off, *g.stride())
    # warps from sm_90 timings and register counts (bf16, d = 64): the forward at 4 warps (255 registers, no
    # spills; 8 warps took 1.8x as long at N = 4097); the chunked backward (64-token chunks) at 8 warps (1.49 ms vs
    # 1.86 at 4, both spilling); the direct backward (32-token chunks) at 4 (2.18 ms vs 3.19 at 8 for N = 65)
    if backward:
        warps = 8 if states else 4
    else:
        warps = 8 if max(BK, BV) > 64 else 4
    n_chunks = triton.cdiv(N, ch)
    meta = dict(DK=dk, DV=v.shape[-1], BK=BK, BV=BV, CH=ch, TL=ch if states else _tail_rows(N, ch), STATES=states,
                DT=_dot_dtype(q.dtype), PREC=_prec(q.dtype), num_warps=warps, num_stages=1)
    return (B * H, n_chunks), (N, n_chunks, B * H, H, 0.5 * scale, float(DIAG_SPAN_MAX), *strides), meta


def _tail_rows(N, ch):
    """Rows of the tile of the last chunk in the direct kernels: the fewest power of two (≥ 16, a tensor-core
    product's smallest side) that holds its tokens, at most ``ch``."""
    return min(ch, _p2(N - (triton.cdiv(N, ch) - 1) * ch))


def _kernel_layout(q, k, *others):
    """The inputs as the kernels read them: q and k with one set of strides, every last dim contiguous. Inputs already
    so (q, k, v sliced from one projection, dO a transposed view) are read in place; the others are copied."""
    if q.stride() != k.stride() or q.stride(-1) != 1:
        q, k = q.contiguous(), k.contiguous()
    return [q, k, *(t if t.stride(-1) == 1 else t.contiguous() for t in others)]


def _fwd_pass(q, k, v, gf, gb, scale, states):
    """The output in token layout, ``[B, N, H, dv]``, with or without stored states (inputs as
    :func:`_kernel_layout`)."""
    q, k, v = _kernel_layout(q, k, v)
    gates = _gates(gf, gb)
    st = _chunked_states(k, v, k, v, gates, 1) if states else q  # q: a placeholder the kernel never reads
    out = token_layout_output(q, v.shape[-1])
    grid, args, meta = _launch(q, v, gates, scale, CH, False, states)
    _chunk_fwd[grid](q, k, v, gates[0], st, out, *args, out.stride(0), out.stride(2), out.stride(1), **meta)
    return out


def _fwd_chunked(q, k, v, gf, gb, scale):
    return _fwd_pass(q, k, v, gf, gb, scale, True)


def _fwd_direct(q, k, v, gf, gb, scale):
    return _fwd_pass(q, k, v, gf, gb, scale, False)


def _bwd_pass(do, q, k, v, gf, gb, scale, states):
    """``(dq, dk, dv, dgf, dgb)``, contiguous, with or without stored states; ``do`` is the gradient of the
    token-layout output ``[B, N, H, dv]`` (inputs as :func:`_kernel_layout`)."""
    q, k, v, do = _kernel_layout(q, k, v, do.to(q.dtype).transpose(1, 2))
    gates = _gates(gf, gb)
    st = _chunked_states(k, v, q, do, gates, 2) if states else q  # q: a placeholder the kernel never reads
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # dq and dk: one set of strides
    dgf, dgb = (torch.empty(q.shape, device=q.device, dtype=torch.float32) for _ in range(2))
    ch = CH if states else DIRECT_BWD_CH
    grid, args, meta = _launch(q, v, gates, scale, ch, True, states)
    _chunk_bwd[grid](q, k, v, do, gates[0], st, dq, dk, dv, dgf, dgb, *args, *do.stride()[:3], *dq.stride()[:3],
                     *dv.stride()[:3], **meta)
    if not states:
        _add_carries(dgf, dgb, ch)
    return dq, dk, dv, dgf, dgb


def _add_carries(dgf, dgb, ch):
    """Complete the chunk-local gate sums of the direct backward in place (``[B, H, N, dk]``, contiguous: ``dgf``
    suffix sums, ``dgb`` prefix sums, each inside its chunk) with the sums of the other chunks of the (short)
    sequence: the later chunks' totals forwards, the earlier ones' backwards, added to each chunk's rows through a
    broadcast view (a partial last chunk, which has no later chunks, on its own backwards)."""
    N = dgf.shape[2]
    n = triton.cdiv(N, ch) - 1  # chunks that have a later one (all whole) and chunks that have an earlier one
    if n == 0:
        return
    later = dgf[:, :, ch::ch].flip(2).cumsum(2).flip(2)  # a chunk's total: its suffix sum at its first token
    earlier = dgb[:, :, ch - 1:n * ch:ch].cumsum(2)  # and its prefix sum at its last token
    dgf[:, :, :n * ch].unflatten(2, (n, ch)).add_(later[..., None, :])
    whole = N // ch - 1  # whole chunks after the first
    dgb[:, :, ch:(whole + 1) * ch].unflatten(2, (whole, ch)).add_(earlier[:, :, :whole, None, :])
    if whole < n:
        dgb[:, :, (whole + 1) * ch:].add_(earlier[:, :, -1:])


def _bwd_chunked(do, q, k, v, gf, gb, scale):
    return _bwd_pass(do, q, k, v, gf, gb, scale, True)


def _bwd_direct(do, q, k, v, gf, gb, scale):
    return _bwd_pass(do, q, k, v, gf, gb, scale, False)


def _direct_fits(N, backward=False):
    return triton.cdiv(N, CH) <= (DIRECT_BWD_MAX_CHUNKS if backward else DIRECT_MAX_CHUNKS)


def _fwd_auto(q, k, v, gf, gb, scale):
    return (_fwd_direct if _direct_fits(q.shape[2]) else _fwd_chunked)(q, k, v, gf, gb, scale)


def _bwd_auto(do, q, k, v, gf, gb, scale):
    return (_bwd_direct if _direct_fits(q.shape[2], backward=True) else _bwd_chunked)(do, q, k, v, gf, gb, scale)


_IMPLS = {"auto": (_fwd_auto, _bwd_auto), "direct": (_fwd_direct, _bwd_direct), "chunked": (_fwd_chunked, _bwd_chunked),
          "scan": (_fwd_scan, _bwd_scan)}


def _impl(impl):
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {sorted(_IMPLS)}, got {impl!r}")
    return _IMPLS[impl]


@torch.library.custom_op("visionfx::bidir_gla_fwd", mutates_args=())
def _gla_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gf: torch.Tensor, gb: torch.Tensor,
                scale: float, impl: str) -> torch.Tensor:
    return _impl(impl)[0](q, k, v, gf, gb, scale)


@_gla_fwd_op.register_fake
def _(q, k, v, gf, gb, scale, impl):
    return token_layout_output(q, v.shape[-1])


def _bwd(do, q, k, v, gf, gb, scale, impl):
    return _impl(impl)[1](do, q, k, v, gf, gb, scale)


@torch.library.custom_op("visionfx::bidir_gla_bwd", mutates_args=())
def _gla_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gf: torch.Tensor,
                gb: torch.Tensor, scale: float, impl: str) -> list[torch.Tensor]:
    return list(_bwd(do, q, k, v, gf, gb, scale, impl))


@_gla_bwd_op.register_fake
def _(do, q, k, v, gf, gb, scale, impl):
    f32 = torch.float32
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            gf.new_empty(gf.shape, dtype=f32), gb.new_empty(gb.shape, dtype=f32)]


def _setup(ctx, inputs, output):
    q, k, v, gf, gb, scale, impl = inputs
    ctx.save_for_backward(q, k, v, gf, gb)
    ctx.scale = scale
    ctx.impl = impl


def _grads(ctx, do, backward):
    """The inputs' gradients through ``backward`` (the custom op when compiled, the implementation in eager mode)."""
    q, k, v, gf, gb = ctx.saved_tensors
    dq, dk, dv, dgf, dgb = backward(do, q, k, v, gf, gb, ctx.scale, ctx.impl)
    return dq, dk, dv, dgf.to(gf.dtype), dgb.to(gb.dtype), None, None


def _backward_rule(ctx, do):
    return _grads(ctx, do, _gla_bwd_op)


_gla_fwd_op.register_autograd(_backward_rule, setup_context=_setup)


class _EagerBidirGLA(torch.autograd.Function):
    """The same forward and backward without the custom-op dispatcher (its per-call CPU cost is comparable to the
    kernels' GPU time at small shapes); ``torch.compile`` traces the custom op instead."""

    @staticmethod
    def forward(ctx, q, k, v, gf, gb, scale, impl):
        _setup(ctx, (q, k, v, gf, gb, scale, impl), None)
        return _impl(impl)[0](q, k, v, gf, gb, scale)

    @staticmethod
    def backward(ctx, do):
        return _grads(ctx, do, _bwd)


def bidir_gla_triton(q, k, v, gf, gb, *, scale, chunk_size=64, impl=None):
    """Bidirectional GLA; see the reference for the math.

    Args:
        q, k: ``[B, H, N, dk]``; v: ``[B, H, N, dv]``; gf, gb: ``[B, H, N, dk]`` log-decays (≤ 0).
        scale: multiplies ``q_t S_t``.
        chunk_size: accepted for signature parity (the kernel's chunking is internal and, like the reference's,
            does not change the result).
        impl: ``"auto"`` (``"direct"`` up to ``DIRECT_MAX_CHUNKS`` 64-token chunks forwards and
            ``DIRECT_BWD_MAX_CHUNKS`` backwards, else ``"chunked"``), ``"direct"``
            (no stored states; short sequences), ``"chunked"`` (state pass and output pass) or ``"scan"`` (the previous
            kernel); default ``IMPL``.

    Returns:
        ``[B, H, N, dv]`` in the dtype of q, a view of ``[B, N, H, dv]`` memory (made outside the op's autograd
        Function, so in-place updates stay legal; heads merge without a copy).
    """
    impl = IMPL if impl is None else impl
    _impl(impl)
    if torch.compiler.is_compiling():
        return _gla_fwd_op(q, k, v, gf, gb, float(scale), impl).transpose(1, 2)
    return _EagerBidirGLA.apply(q, k, v, gf, gb, float(scale), impl).transpose(1, 2)
