"""Triton kernels of the non-causal linear-attention family (serves slab, inline and rala), forward and backward.

``linear_attention_triton`` has exactly the signature and semantics of
:func:`visionfx.kernels.linear_attention.reference.linear_attention_reference` (its docstring is the specification).

Design (memory-bound, PERFORMANCE.md): per (batch, head) a **state pass** reads K, V (and the key weights) once and
reduces them into the fp32 state (``S [D, D]`` and the normaliser sums), and an **output pass** reads Q and writes O.
When there are at least as many (batch, head) pairs as SMs, one fused kernel runs both passes per (batch, head) and
the state never leaves the chip; otherwise N is split across programs, partial states are combined with fp32 atomics
into a tiny buffer, and a second kernel reads it back (the sum order then varies from run to run at the 1e-7 level;
under ``torch.use_deterministic_algorithms(True)`` the fused kernel is always used). The backward mirrors it: a query
pass writes ``dq`` and reduces ``dS``/``dz``, a key pass writes ``dk``, ``dv`` and ``d key_weights``. The feature map,
both normalisers, the key weights and the rotary numerator are fused; the forward saves only the fp32 state for the
backward (and only when a gradient is needed). Head dims up to 128 (non-powers of two are padded with masks), any N,
any strides, fp32/bf16/fp16. fp32 inputs use ``input_precision="tf32x3"`` on GPUs (three TF32 products, about fp32
accuracy, on tensor cores; never plain TF32 and its ~1e-3 error) and ``"ieee"`` in the interpreter; 16-bit inputs use
bf16 tensor-core products with hi/lo splitting of inexact operands (see ``_triton_kernels``), so the kernel adds
little error to the final rounding of the output.

Decisions where the contract is silent:
- q, k, v of different dtypes are cast to q's dtype; the rotary tables are used in fp32 (``[N, D/2]``, shared over
  batch and heads); ``d key_weights`` is returned in the key weights' dtype; no gradient flows to the tables.
- The subtractive state is accumulated uncentred (``Σ φ(k)ᵀv``, ``Σ φ(k)``, ``Σ v``) and centred in fp32 at the end,
  which is exact algebra; cancellation costs accuracy only when ``|k̄||v̄|`` dwarfs the centred product.
- Under ``torch.compile`` it is a ``torch.library.custom_op`` (``visionfx::linear_attention_fwd`` / ``_bwd``) with a
  fake implementation and ``register_autograd``: one opaque node per layer, no graph break. Eager calls skip the
  custom-op dispatcher (a ``torch.autograd.Function`` around the same launches) to save its CPU overhead. The same path
  runs under ``TRITON_INTERPRET=1`` on CPU tensors (there the 16-bit path emulates bf16 with fp16 operands); the
  dispatcher uses the interpreter only when the Triton backend is forced, tests call this function directly.
- Block sizes are autotuned per (head-dim block, power-of-two bucket of N, options) on first use; the split-N
  partial-state kernels reset their buffers between trials.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from visionfx.kernels._triton_host import sm_count as _sm_count
from visionfx.kernels._triton_host import token_layout_output as _new_output
from visionfx.kernels.linear_attention import _triton_kernels as K
from visionfx.kernels.linear_attention import MAX_HEAD_DIM, supports
from visionfx.kernels.linear_attention.reference import FEATURES, NORMALIZERS

__all__ = ["linear_attention_triton", "supports"]

_FEATURE_ID = {"identity": 0, "relu": 1, "elu1": 2}
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # triton.jit reads it once, when kernels are defined
# the interpreter has no bf16 arithmetic, so it emulates the 16-bit path with fp16 operands
_LP_TORCH = torch.float16 if _INTERPRET else torch.bfloat16
_LP = tl.float16 if _INTERPRET else tl.bfloat16
_CHUNK_ALIGN = 128  # split chunks are multiples of every BLOCK_N
# tests set a chunk length (tokens) to force the split kernels on small inputs
_FORCE_CHUNK: Optional[int] = None


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _plan(bh: int, n: int, device: torch.device) -> tuple[int, int]:
    """``(chunk, splits)``: tokens per program and programs per (batch, head); ``splits == 1`` means fused."""
    if _FORCE_CHUNK is not None:
        chunk = _FORCE_CHUNK
    else:
        if device.type != "cuda" or torch.are_deterministic_algorithms_enabled():
            return n, 1
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        want = min(triton.cdiv(2 * sms, bh), triton.cdiv(n, 2 * _CHUNK_ALIGN)) if bh < sms else 1
        if want <= 1:
            return n, 1
        chunk = triton.cdiv(triton.cdiv(n, want), _CHUNK_ALIGN) * _CHUNK_ALIGN
    splits = triton.cdiv(n, chunk)
    return (chunk, splits) if splits > 1 else (n, 1)


def _configs(name: str, big: bool) -> list:
    """(BLOCK_N, num_warps, num_stages) to try. The fp32 D×D state takes 32 registers per thread at D = 64 and 4 warps
    and 64 at D = 128 and 8 warps; the backward query pass keeps a second one (dS), hence its smaller token blocks."""
    if name == "fwd_kernel":
        table = ((32, 8, 2), (64, 8, 2), (64, 8, 3)) if big else (
            (64, 4, 2), (64, 4, 3), (128, 4, 2), (64, 8, 3), (128, 8, 2), (32, 4, 3))
    else:
        table = ((32, 8, 2), (32, 8, 3), (64, 8, 2)) if big else (
            (32, 4, 2), (32, 4, 3), (64, 4, 2), (32, 8, 3), (64, 8, 2))
    return [triton.Config({"BLOCK_N": b}, num_warps=w, num_stages=st) for b, w, st in table]


_KEY = ["N_BUCKET", "PHASE", "FEATURE", "SUBTRACTIVE", "HAS_KW", "HAS_ROPE", "BLOCK_D"]


@functools.lru_cache(maxsize=None)
def _tuned(name: str, big: bool, phase: int):
    # only the atomic phase accumulates into its buffers; zeroing them for another phase would erase its input state
    reset = (["state", "vec"] if name == "fwd_kernel" else ["dstate", "dvec"]) if phase == 1 else None
    return triton.autotune(_configs(name, big), key=_KEY, reset_to_zero=reset)(getattr(K, name))


# best config per (kernel, N bucket, dtype, meta): once tuned, launches go straight to the JIT function, skipping the
# autotuner's per-call work (tens of microseconds of CPU time per launch, more than the kernel itself at small N)
_BEST: dict = {}


def _launch(name: str, grid: tuple, args: tuple, meta: dict) -> None:
    if _INTERPRET:
        getattr(K, name)[grid](*args, **meta, BLOCK_N=32)
        return
    key = (name, args[-1], args[0].dtype, *(v for k, v in meta.items() if k != "LP"))
    best = _BEST.get(key)
    if best is not None:
        getattr(K, name)[grid](*args, **meta, **best)
        return
    tuner = _tuned(name, meta["BLOCK_D"] > 64, meta["PHASE"])
    tuner[grid](*args, **meta)
    _BEST[key] = tuner.best_config.all_kwargs()


def _flags(q, feature, normalizer, key_weights, cos):
    lowp = q.dtype != torch.float32
    exact_in = q.dtype == _LP_TORCH
    plain = exact_in and feature in ("identity", "relu") and cos is None
    return dict(
        FEATURE=_FEATURE_ID[feature], SUBTRACTIVE=normalizer == "subtractive", HAS_KW=key_weights is not None,
        HAS_ROPE=cos is not None, Q_EXACT=plain, K_EXACT=plain and key_weights is None, V_EXACT=exact_in,
        LOWP=lowp, LP=_LP, BLOCK_D=_block_d(q.shape[-1]),
    )


def _zeros_pair(bh: int, bd: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed fp32 ``[bh, bd, bd]`` and ``[bh, 2, bd]`` accumulators, views of one buffer (one memset)."""
    buf = torch.zeros(bh * (bd + 2) * bd, dtype=torch.float32, device=device)
    return buf[: bh * bd * bd].view(bh, bd, bd), buf[bh * bd * bd:].view(bh, 2, bd)


def _forward(q, k, v, key_weights, cos, sin, feature, normalizer, scale, eps, save_state):
    B, H, N, D = q.shape
    flags = _flags(q, feature, normalizer, key_weights, cos)
    BD = flags["BLOCK_D"]
    o_tok = _new_output(q)
    o = o_tok.transpose(1, 2)
    chunk, splits = _plan(B * H, N, q.device)
    f32 = dict(dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        shapes = _state_shapes(q) if save_state else ((0,), (0,))
        return o_tok, torch.zeros(shapes[0], **f32), torch.zeros(shapes[1], **f32)
    if splits > 1:
        state, vec = _zeros_pair(B * H, BD, q.device)
    elif save_state:
        state, vec = torch.empty((B * H, BD, BD), **f32), torch.empty((B * H, 2, BD), **f32)
    else:
        state, vec = torch.empty((0,), **f32), torch.empty((0,), **f32)
    w = key_weights if key_weights is not None else q
    ws = key_weights.stride() if key_weights is not None else (0, 0, 0)
    tab_c, tab_s = (cos, sin) if cos is not None else (q, q)
    args = (q, k, v, w, tab_c, tab_s, o, state, vec, *q.stride(), *k.stride(), *v.stride(), *ws, *o.stride()[:3],
            H, N, D, max(D // 2, 1), float(eps), float(scale), chunk, triton.next_power_of_2(N))
    if splits == 1:
        _launch("fwd_kernel", (B * H, 1), args, dict(flags, PHASE=0, SAVE_STATE=save_state))
    else:
        _launch("fwd_kernel", (B * H, splits), args, dict(flags, PHASE=1, SAVE_STATE=True))
        _launch("fwd_kernel", (B * H, splits), args, dict(flags, PHASE=2, SAVE_STATE=True))
    if splits > 1 and not save_state:
        state, vec = torch.empty((0,), **f32), torch.empty((0,), **f32)
    return o_tok, state, vec


def _backward(do, q, k, v, key_weights, cos, sin, state, vec, feature, normalizer, scale, eps):
    B, H, N, D = q.shape
    flags = _flags(q, feature, normalizer, key_weights, cos)
    BD = flags["BLOCK_D"]
    dq, dk, dv = (torch.empty((B, H, N, D), dtype=q.dtype, device=q.device) for _ in range(3))
    f32 = dict(dtype=torch.float32, device=q.device)
    dw = torch.empty((B, H, N), **f32) if key_weights is not None else torch.empty((0,), **f32)
    if dq.numel() == 0:
        return dq, dk, dv, dw.zero_()
    chunk, splits = _plan(B * H, N, q.device)
    if splits > 1:
        dstate, dvec = _zeros_pair(B * H, BD, q.device)
    else:
        dstate, dvec = torch.empty((0,), **f32), torch.empty((0,), **f32)  # unused by the fused kernel
    w = key_weights if key_weights is not None else q
    ws = key_weights.stride() if key_weights is not None else (0, 0, 0)
    tab_c, tab_s = (cos, sin) if cos is not None else (q, q)
    args = (q, k, v, w, tab_c, tab_s, do, dq, dk, dv, dw if key_weights is not None else q, state, vec, dstate, dvec,
            *q.stride(), *k.stride(), *v.stride(), *ws, *do.stride(),
            H, N, D, max(D // 2, 1), float(eps), float(scale), chunk, triton.next_power_of_2(N))
    flags["DO_EXACT"] = do.dtype == _LP_TORCH
    if splits == 1:
        _launch("bwd_kernel", (B * H, 1), args, dict(flags, PHASE=0))
    else:
        _launch("bwd_kernel", (B * H, splits), args, dict(flags, PHASE=1))
        _launch("bwd_kernel", (B * H, splits), args, dict(flags, PHASE=2))
    return dq, dk, dv, dw


def _state_shapes(q):
    B, H, _, D = q.shape
    BD = _block_d(D)
    return (B * H, BD, BD), (B * H, 2, BD)


@torch.library.custom_op("visionfx::linear_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_weights: Optional[torch.Tensor],
    cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
    feature: str, normalizer: str, scale: float, eps: float, save_state: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, key_weights, cos, sin, feature, normalizer, scale, eps, save_state)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, key_weights, cos, sin, feature, normalizer, scale, eps, save_state):
    s_shape, v_shape = _state_shapes(q) if save_state else ((0,), (0,))
    o = _new_output(q)
    return o, q.new_empty(s_shape, dtype=torch.float32), q.new_empty(v_shape, dtype=torch.float32)


@torch.library.custom_op("visionfx::linear_attention_bwd", mutates_args=())
def _bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_weights: Optional[torch.Tensor],
    cos: Optional[torch.Tensor], sin: Optional[torch.Tensor], state: torch.Tensor, vec: torch.Tensor,
    feature: str, normalizer: str, scale: float, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, key_weights, cos, sin, state, vec, feature, normalizer, scale, eps)


@_bwd_op.register_fake
def _bwd_fake(do, q, k, v, key_weights, cos, sin, state, vec, feature, normalizer, scale, eps):
    B, H, N, _ = q.shape
    dw = q.new_empty((B, H, N) if key_weights is not None else (0,), dtype=torch.float32)
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), dw


def _save(ctx, q, k, v, key_weights, cos, sin, state, vec, feature, normalizer, scale, eps, save_state):
    ctx.save_for_backward(q, k, v, key_weights, cos, sin, state, vec)
    ctx.options = (feature, normalizer, scale, eps)
    ctx.kw_dtype = None if key_weights is None else key_weights.dtype
    ctx.saved_state = save_state


def _grads(ctx, do, backward):
    q, k, v, key_weights, cos, sin, state, vec = ctx.saved_tensors
    if not ctx.saved_state:
        raise RuntimeError("linear_attention_triton: the forward ran without saving its state for the backward")
    # do is the gradient of the token-layout output [B, N, H, D]
    dq, dk, dv, dw = backward(do.to(q.dtype).transpose(1, 2), q, k, v, key_weights, cos, sin, state, vec, *ctx.options)
    dw = None if ctx.kw_dtype is None else dw.to(ctx.kw_dtype)
    return dq, dk, dv, dw, None, None, None, None, None, None, None


def _setup_context(ctx, inputs, output):
    q, k, v, key_weights, cos, sin, feature, normalizer, scale, eps, save_state = inputs
    _, state, vec = output
    ctx.mark_non_differentiable(state, vec)
    _save(ctx, q, k, v, key_weights, cos, sin, state, vec, feature, normalizer, scale, eps, save_state)


def _autograd_backward(ctx, do, _dstate, _dvec):
    return _grads(ctx, do, _bwd_op)


_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


class _EagerLinearAttention(torch.autograd.Function):
    """The same forward and backward without the custom-op dispatcher, whose per-call cost (tens of microseconds of
    CPU time) is comparable to the whole kernel at N = 197; ``torch.compile`` traces the custom op instead."""

    @staticmethod
    def forward(ctx, q, k, v, key_weights, cos, sin, feature, normalizer, scale, eps, save_state):
        o, state, vec = _forward(q, k, v, key_weights, cos, sin, feature, normalizer, scale, eps, save_state)
        _save(ctx, q, k, v, key_weights, cos, sin, state, vec, feature, normalizer, scale, eps, save_state)
        return o

    @staticmethod
    def backward(ctx, do):
        return _grads(ctx, do, _backward)


def linear_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature: str = "identity",
    normalizer: str = "divisive",
    scale: float = 1.0,
    key_weights: torch.Tensor | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Non-causal linear attention in Triton; same contract as ``linear_attention_reference``.

    Args:
        q, k, v: ``[B, H, N, D]`` (any strides), float32, bfloat16 or float16, ``D ≤ 128``.
        feature: ``"identity"``, ``"relu"`` or ``"elu1"``, applied to q and k.
        normalizer: ``"divisive"`` or ``"subtractive"``.
        scale: multiplies ``φ(q)·φ(k)`` in the subtractive form.
        key_weights: ``[B, H, N]`` key weights (divisive only); receives a gradient.
        rope: ``(cos, sin)``, each ``[N, D/2]``, rotating the numerator's q and k (divisive only); constants.
        eps: added to the divisive denominator.

    Returns:
        ``[B, H, N, D]`` in the dtype of ``q``, a view of ``[B, N, H, D]`` memory (heads merge without a copy).
    """
    if normalizer not in NORMALIZERS:
        raise ValueError(f"unknown normalizer {normalizer!r}; choose from {NORMALIZERS}")
    if feature not in FEATURES:
        raise ValueError(f"unknown feature map {feature!r}; choose from {FEATURES}")
    if normalizer == "subtractive" and (key_weights is not None or rope is not None):
        raise ValueError("key_weights and rope apply to the divisive normaliser only")
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must be [B, H, N, D] of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, N, D = q.shape
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim {D} > {MAX_HEAD_DIM}: use linear_attention_reference")
    if q.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"inputs on {q.device.type}: the Triton kernel needs CUDA (or TRITON_INTERPRET=1)")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {q.dtype} not supported (float32, bfloat16, float16)")
    if _INTERPRET and q.dtype == torch.bfloat16:
        raise ValueError("the Triton interpreter has no bfloat16 arithmetic; use float32 (or float16) inputs")
    k, v = k.to(q.dtype), v.to(q.dtype)
    cos = sin = None
    if rope is not None:
        cos, sin = (t.to(device=q.device, dtype=torch.float32).contiguous() for t in rope)
        if D % 2 or cos.shape != (N, D // 2) or sin.shape != (N, D // 2):
            raise ValueError(f"rope tables must be [N, D/2] = [{N}, {D // 2}] with an even D, got "
                             f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if key_weights is not None and key_weights.shape != (B, H, N):
        raise ValueError(f"key_weights must be [B, H, N] = {[B, H, N]}, got {tuple(key_weights.shape)}")
    tensors = (q, k, v) if key_weights is None else (q, k, v, key_weights)
    save_state = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    args = (q, k, v, key_weights, cos, sin, feature, normalizer, float(scale), float(eps), save_state)
    if torch.compiler.is_compiling():
        return _fwd_op(*args)[0].transpose(1, 2)
    return _EagerLinearAttention.apply(*args).transpose(1, 2)
