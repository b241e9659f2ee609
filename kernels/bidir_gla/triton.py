"""Triton kernels of bidirectional gated linear attention (vig), forward and backward.

Same signature and semantics as :func:`visionfx.kernels.bidir_gla.reference.bidir_gla_reference`.

Chunked design (``impl="chunked"``, the default). Tokens are cut into chunks of ``CH = 64`` tokens, each in ``NS = 4``
sub-chunks of ``SUB = 16``. In scan order (ascending tokens forwards, descending backwards) let ``a_i`` be the
inclusive cumulative log-decay; token j reaches i ≥ j with the per-channel factor ``exp(a_i − a_j) ≤ 1``.

* **State pass** (``_state_pass``, one launch, grid ``(B·H, direction[·kind], state block)``): a program walks the
  chunks of one direction sequentially, carrying an fp32 ``[dk, dv]`` block (rows and columns of the state are
  independent, so small ``B·H`` is split into more programs) and stores the state entering every chunk (in bf16 for
  bf16 inputs, where it is read only as a bf16 dot operand): ``S ← exp(total) S + (k ⊙ exp(after))ᵀ v``.
* **Output pass** (``_fwd_out``, grid ``(B·H, chunk)``): a program owns one chunk and *both* directions, so it reads
  q, k, v once and writes ``(o_f + o_b)/2`` once, in the input dtype. For output sub-chunk I and each direction:

  - earlier chunks: ``(q_I ⊙ exp(a_I − a_c)) @ S_c`` with ``a_c`` the chunk start (factor ≤ 1);
  - earlier sub-chunks J, one tensor-core product each, with the reference point r just before I:
    ``q̃ = q_I ⊙ exp(a_I − a_r)``, ``k̃ = k_J ⊙ exp(a_r − a_J)``, ``(q̃ k̃ᵀ) @ v_J``; both factors are ≤ 1 because r
    lies between J and I, and ``exp(a_r − a_J)`` is summed from the gates between each key and r only;
  - the diagonal 16×16 block: the same factorisation with r at the block's start, ``k̂ = k_I ⊙ exp(a_r − a_I)``, whose
    factors are ≥ 1. It is used only when every channel's decay over the block is at most ``DIAG_SPAN_MAX`` = 40
    nats (checked per block, per direction: ``min_c Σ_block g ≥ −40``), so no factor exceeds e^40 ≈ 2.4e17 and none
    of the ``q̃`` factors falls below e^−40, far above fp32/bf16/tf32's smallest normal (e^−87): both operands and
    every product are finite (masked pairs included, at most e^40·|q||k| per channel before masking); an operand can
    underflow only where ``|q| < 3e−21``, dropping a term below ``3e−21·|k|``; and the exponents' rounding stays
    below 40·2⁻²⁴ ≈ 2.4e−6 relative. Otherwise (some channel decays faster than 2.5 nats per token on average) the
    block falls back to the exact computation: a walk over the 16 key positions building ``exp(a_i − a_j)`` by one
    multiplication per step (the previous kernel's scheme, now only for such blocks), then one tensor-core product.

  No other ``exp`` of a positive exponent is formed anywhere: every other exponent is a sum of gates (≤ 0), each
  summed from exactly the gates it stands for (a shifted load gives the gates *after* a row, instead of the
  difference ``total − incl``), which also keeps its rounding error proportional to its own size.
* **Backward**: one state-pass launch computes both the forward states and the gradient states
  ``R ← exp(total) R + (q ⊙ exp(incl))ᵀ dO`` (walking against scan order; R is the later tokens' ``q ⊗ dO`` decayed
  to the chunk's end), then ``_bwd_out`` (grid ``(B·H, chunk)``, both directions on chip) builds dq, dk, dv with the
  same sub-chunk factorisation (pairs in both orders, the 16×16 diagonal factorised or exact as above) and writes
  the per-direction gate terms ``dA = q ⊙ dq_d − k ⊙ dk_d``; the gate gradients are their cumulative sums over
  tokens (suffix sums forwards, prefix sums backwards), summed inside each chunk from the exact value at the chunk's
  boundary (a product of the two states that meet there, see ``_gate_grads``): one sum over the whole sequence
  cancelled away the gradient's digits at long N in bf16.

Dot operands are bf16 for bf16 inputs and fp32 (ieee for fp32, tf32 for fp16) otherwise, always accumulated in fp32;
gates and cumulative log-decays are fp32 throughout. Launches: two per forward, two per backward plus the gate sums.

Fusing the two passes for small ``B·H`` was considered and not done: a fused program must walk the sequence, so it
serialises the intra-chunk work that the output pass runs in parallel over chunks, and since the output pass sums
both directions on chip, a fused version would need an fp32 scratch or atomics plus a cast. Launch count would not
drop below two. Small ``B·H`` instead gets more state-pass programs by splitting the state into blocks.

Direct design (``impl="direct"``; the default ``"auto"`` takes it up to ``DIRECT_MAX_CHUNKS`` = 4 chunks, N ≤ 256,
and ``"chunked"`` beyond). Short sequences (vig at 32² CIFAR images has N = 65, at 224² N = 197) have too few chunks for
the state pass to pay: its programs walk one or two chunks each, and the states it stores are as large as the inputs.
The direct kernels store no state: a program owns one chunk (64 tokens forwards, 32 in the backward, where smaller
tiles spill less) and both directions, and meets every earlier chunk in scan order directly, one ``[CH, CH]`` score
product each, with both factors ≤ 1 (the reference point is the chunk's start: ``q ⊙ exp(incl)`` and
``k_o ⊙ exp(after_o + gates of the chunks in between)``); its own chunk is factorised through its start under the
same ``DIAG_SPAN_MAX`` guard, now per chunk, with the exact walk over the chunk's keys as the fallback. The backward
program builds dq from the keys of its own and earlier chunks and dk, dv from the queries of its own and later
chunks; the gate gradients are plain cumulative sums of ``dA`` over the (short) sequence. Work grows with the square
of the number of chunks, so the direct kernels are for short sequences only. One launch per forward, one plus the
cumulative sums per backward.

Legacy design (``impl="scan"``, ``_scan.py``, kept for one release to compare): one scan kernel for every pass,
16-token chunks, intra-chunk terms by a per-step recurrence over keys, per-direction fp32 outputs summed afterwards;
its backward rescans ``(scale·q) ⊗ dO`` in the opposite order with gates shifted by one token. Select with the
``impl`` keyword or the module constant ``IMPL``.
"""

from __future__ import annotations

import torch
import triton

from visionfx.kernels._triton_host import device_sm_count, token_layout_output
from visionfx.kernels.bidir_gla._host import _dot_dtype, _gates, _p2, _prec, _same_layout
from visionfx.kernels.bidir_gla._scan import _bwd_scan, _fwd_scan
from visionfx.kernels.bidir_gla._triton_kernels import _bwd_out, _direct_bwd, _direct_fwd, _fwd_out, _state_pass

__all__ = ["bidir_gla_triton"]

IMPL = "auto"  # default implementation: "auto" ("direct" up to DIRECT_MAX_CHUNKS chunks, else "chunked") or one of them
DIRECT_MAX_CHUNKS = 4  # longest sequence, in 64-token chunks, that "auto" runs without stored states
DIRECT_BWD_NS = 2  # sub-chunks per chunk of the direct backward (32-token chunks; the forward's are 64)
SUB = 16  # tokens per sub-chunk (one register tile, one tensor-core operand)
NS = 4  # sub-chunks per chunk
DIAG_SPAN_MAX = 40.0  # largest per-channel decay (nats) of a factorised diagonal block (16 tokens; direct: a chunk)
STATE_MIN_BLOCK = 32  # smallest state block (rows or columns) a state-pass program may own


def _state_blocks(n_programs, bk, bv, device):
    """Split the ``[bk, bv]`` state into blocks until the state pass has a few programs per SM (or blocks reach
    STATE_MIN_BLOCK): its programs walk the sequence serially, so for small ``B·H`` parallelism comes from here."""
    sms = device_sm_count(device) if device.type == "cuda" else 132
    bks, bvs = bk, bv
    while n_programs * (bk // bks) * (bv // bvs) < 4 * sms:
        if bvs >= bks and bvs > STATE_MIN_BLOCK:
            bvs //= 2
        elif bks > STATE_MIN_BLOCK:
            bks //= 2
        else:
            break
    return bks, bvs


def _chunked_states(k, v, q, do, gates, kinds):
    """``[kinds, 2, B·H, n_chunks, BK, BV]`` states entering each chunk (kind 0 forward, kind 1 gradient)."""
    B, H, N, dk = k.shape
    dv = v.shape[-1]
    BK, BV = _p2(dk), _p2(dv)
    n_chunks = triton.cdiv(N, SUB * NS)
    lowp = k.dtype == torch.bfloat16
    states = torch.empty(kinds, 2, B * H, n_chunks, BK, BV, device=k.device,
                         dtype=torch.bfloat16 if lowp else torch.float32)
    bks, bvs = _state_blocks(B * H * 2 * kinds, BK, BV, k.device)
    g, g_off = gates
    _state_pass[(B * H, 2 * kinds, (BK // bks) * (BV // bvs))](
        k, v, q, do, g, states, N, n_chunks, B * H, H,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), g_off, *g.stride(),
        KINDS=kinds, DK=dk, DV=dv, BK=BK, BV=BV, BKS=bks, BVS=bvs, CH=SUB * NS, DT=_dot_dtype(k.dtype),
        PREC=_prec(k.dtype), num_warps=4, num_stages=2,
    )
    return states


def _out_args(q, v, gates, scale, backward, direct=False):
    B, H, N, dk = q.shape
    g, g_off = gates
    BK, BV = _p2(dk), _p2(v.shape[-1])
    strides = (q.stride(0), q.stride(1), q.stride(2), v.stride(0), v.stride(1), v.stride(2), g_off, *g.stride())
    # warps and stages from sm_90 register counts of the compiled kernels (bf16, d = 64: forward 163 registers at 4
    # warps, backward 237 at 8, no spills; the backward spills at 4 warps, and the state pass at 3 stages). The
    # direct kernels, timed on the H200 at N = 65 and 197 (bf16, d = 64) over 4/8 warps and 32/64-token chunks: the
    # forward is fastest with 64-token chunks at 4 warps (255 registers, no spills; 0.70 ms vs 1.22 at 8 warps for
    # B·H = 6144, N = 65), the backward with 32-token chunks at 4 warps (2.18 ms vs 3.19 at 8, in spite of spills)
    warps = 4 if direct else 8 if backward or max(BK, BV) > 64 else 4
    ns = DIRECT_BWD_NS if direct and backward else NS
    meta = dict(DK=dk, DV=v.shape[-1], BK=BK, BV=BV, SUB=SUB, NS=ns, DT=_dot_dtype(q.dtype), PREC=_prec(q.dtype),
                num_warps=warps, num_stages=1)
    n_chunks = triton.cdiv(N, SUB * ns)
    return (B * H, n_chunks), (N, n_chunks, B * H, H, 0.5 * scale, float(DIAG_SPAN_MAX), *strides), meta


def _fwd_chunked(q, k, v, gf, gb, scale):
    """The output in token layout, ``[B, N, H, dv]``. q and k share strides in the kernels; q, k, v sliced from one
    projection already do, so they are read in place."""
    if q.stride() != k.stride() or q.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = _same_layout(q, k, v)
    gates = _gates(gf, gb)
    states = _chunked_states(k, v, k, v, gates, 1)
    out = token_layout_output(q, v.shape[-1])
    grid, args, meta = _out_args(q, v, gates, scale, False)
    _fwd_out[grid](q, k, v, gates[0], states, out, *args, out.stride(0), out.stride(2), out.stride(1), **meta)
    return out


def _bwd_chunked(do, q, k, v, gf, gb, scale):
    """``do`` is the gradient of the token-layout output ``[B, N, H, dv]``."""
    q, k, v, do = _same_layout(q, k, v, do.to(q.dtype).transpose(1, 2))
    gates = _gates(gf, gb)
    states = _chunked_states(k, v, q, do, gates, 2)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dA = torch.empty((2,) + q.shape, device=q.device, dtype=torch.float32)
    grid, args, meta = _out_args(q, v, gates, scale, True)
    _bwd_out[grid](q, k, v, do, gates[0], states, dq, dk, dv, dA, *args, **meta)
    return (dq, dk, dv, *_gate_grads(dA, states, 0.5 * scale))


def _fwd_direct(q, k, v, gf, gb, scale):
    """As :func:`_fwd_chunked`, in one launch without stored states (short sequences)."""
    if q.stride() != k.stride() or q.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = _same_layout(q, k, v)
    gates = _gates(gf, gb)
    out = token_layout_output(q, v.shape[-1])
    grid, args, meta = _out_args(q, v, gates, scale, False, direct=True)
    _direct_fwd[grid](q, k, v, gates[0], out, *args, out.stride(0), out.stride(2), out.stride(1), **meta)
    return out


def _bwd_direct(do, q, k, v, gf, gb, scale):
    """As :func:`_bwd_chunked`, without stored states; the gate gradients are plain cumulative sums of ``dA`` over
    the whole (short) sequence."""
    q, k, v, do = _same_layout(q, k, v, do.to(q.dtype).transpose(1, 2))
    gates = _gates(gf, gb)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dA = torch.empty((2,) + q.shape, device=q.device, dtype=torch.float32)
    grid, args, meta = _out_args(q, v, gates, scale, True, direct=True)
    _direct_bwd[grid](q, k, v, do, gates[0], dq, dk, dv, dA, *args, **meta)
    # direction 0 is stored in reversed token order: its prefix sums are suffix sums in token order
    return dq, dk, dv, dA[0].cumsum(2).flip(2), dA[1].cumsum(2)


def _direct_fits(N):
    return triton.cdiv(N, SUB * NS) <= DIRECT_MAX_CHUNKS


def _fwd_auto(q, k, v, gf, gb, scale):
    return (_fwd_direct if _direct_fits(q.shape[2]) else _fwd_chunked)(q, k, v, gf, gb, scale)


def _bwd_auto(do, q, k, v, gf, gb, scale):
    return (_bwd_direct if _direct_fits(q.shape[2]) else _bwd_chunked)(do, q, k, v, gf, gb, scale)


def _gate_grads(dA, states, half_scale):
    """``(dgf, dgb)`` from the per-token gate terms ``dA`` and the chunk states.

    Mathematically ``dgf_t = Σ_{s≥t} dA0_s`` and ``dgb_t = Σ_{s≤t} dA1_s``, but these sums cancel to zero where the
    true gradient is small (``dgf`` at the first token is exactly 0) while each term carries the rounding of the
    16-bit products behind dq and dk; summed over thousands of tokens that error grew to several percent of the
    gradient (bf16, N = 4097). So the sums run only inside each chunk, and each chunk starts from the exact value at
    its boundary, a product of the two states that meet there (no cancellation): the gate between tokens ``t−1``
    and ``t`` is crossed by every pair (later query, earlier key), so for the forward scan
    ``dgf_t = ½·scale · Σ_e S_{t−1}[:, e] ⊙ R[:, e]`` with ``S`` the forward state entering the chunk that starts at
    ``t`` and ``R`` the gradient state of the tokens ``≥ t`` decayed to ``t − 1``; symmetrically for the backward
    scan at a chunk's last token.
    """
    _, B, H, N, dk = dA.shape
    n_chunks, ch = states.shape[3], SUB * NS
    pad = n_chunks * ch - N
    S, R = states[0].float(), states[1].float()  # [2 directions, B·H, n_chunks, BK, BV]
    edge_f = half_scale * (S[0, :, 1:] * R[0, :, :-1]).sum(-1)[..., :dk]  # at the first token of chunks 1..
    edge_b = half_scale * (S[1, :, :-1] * R[1, :, 1:]).sum(-1)[..., :dk]  # at the last token of chunks ..n−2
    zero = edge_f.new_zeros(B * H, 1, dk)
    # direction 0 is stored in reversed token order: chunk-local prefix sums there are suffix sums in token order
    a0 = torch.nn.functional.pad(dA[0].flip(2), (0, 0, 0, pad)).view(B * H, n_chunks, ch, dk)
    dgf = a0.flip(2).cumsum(2).flip(2) + torch.cat((edge_f, zero), 1)[:, :, None]
    a1 = torch.nn.functional.pad(dA[1], (0, 0, 0, pad)).view(B * H, n_chunks, ch, dk)
    dgb = a1.cumsum(2) + torch.cat((zero, edge_b), 1)[:, :, None]
    return (dgf.view(B, H, -1, dk)[:, :, :N].contiguous(), dgb.view(B, H, -1, dk)[:, :, :N].contiguous())


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
        impl: ``"auto"`` (``"direct"`` up to ``DIRECT_MAX_CHUNKS`` 64-token chunks, else ``"chunked"``), ``"direct"``
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
