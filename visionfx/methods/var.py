"""VAR: visual attention redistribution, moving attention from sink tokens to the other visual tokens.

Paper: "See What You Are Told: Visual Attention Sink in Large Multimodal Models" (arXiv 2503.03321, ICLR 2025);
MLLM.md §3. Sink tokens of layer ℓ ≥ 2 are the tokens whose residual stream (the input of decoder layer ℓ) reaches
|x_d| / RMS(x) > τ in a sink dimension d. For an image-centric row of an attention head (image mass ≥ summ and
non-sink share of it ≥ ρ) a fraction p of the mass on all sinks moves to the visual non-sink tokens, proportionally.
Everything is in the paper's convention (p = fraction moved); ``preset="official_code"`` reproduces the public code
(which keeps p and tests the sink share, i.e. p_paper = 1 − p_code, ρ_paper = 1 − ρ_code, with its epsilons).

How it runs:
- ``AttentionInterface.register("visionfx_var", var_attention)`` and ``AttentionMaskInterface.register(
  "visionfx_var", eager_mask)`` (without the latter transformers would hand the function no mask at all); the text
  model alone is switched to it (``set_attn_implementation({"text_config": "visionfx_var"})``), undone on unpatch;
- a pre-hook on ``LlavaModel`` records image span, padding, prompt length and prefill/decoding; pre-hooks on the
  decoder layers where VAR may act record the prefill sink sets ``[B, L0]`` from their inputs;
- :func:`var_attention` is eager attention (bit for bit) where VAR is inactive, and applies :func:`redistribute`
  to the modifiable rows of active layers; ``mode="hybrid"`` computes the rows that cannot change with SDPA and only
  the others (prefill rows after the first image's end, decoding rows) eagerly.

Cost (MLLM.md §3.7, PERFORMANCE.md: ≤ 1.3× eager): the eager path materialises exactly what eager attention does;
VAR's own work is confined to the rows that can change (in prefill the rows from the earliest end of an image with
an image: tens of rows, not the [B, H, L, L] matrix). Without gradients on CUDA the redistribution is one
Triton kernel per call (``kernels/var_redistribute``: masses accumulated in float64, head test and update in one
program per row, written into the cast weights in place; chosen once per device). The reference, used elsewhere and
with gradients, takes the four row masses from one float64 matmul against 0/1 key masks (exact whatever the fp32
matmul precision), applies one fused ``α + α·scale`` and writes the changed rows in place (no grad) or concatenates
them (grad). Sink scores reduce the squared norm in fp32 straight from the bf16 residual stream. The host syncs
with the device once per prefill (whether any image exists, and the first row after an image) and once per
generation (at its first decoding step: which layers have a visual sink at all); in prefill a layer without visual
sinks runs the update on deselected rows (a no-op) rather than asking the device, and decoding steps slice padded
masks kept per layer.

Decisions the docs leave open:
- Sink sets are computed over the prompt only (positions before the recorded prompt length), so generation without
  a cache, which re-runs the prompt, sees the same sets as cached decoding; generated tokens are never sinks.
- ``layers`` restricts VAR to those decoder layers (each in [2, L−1]); by default [2, L−2] (or [2, L−1] without
  ``except_last_layer``).
- The receivers' denominator is guarded as max(Σ_{𝒱∖V} α, ε) rather than Σ + ε, so row sums stay exact whenever
  that mass exceeds ε (with + ε a row would lose Ω·ε/Σ).
- A preset sets its values; giving a different explicit value for a field it sets is an error.
- ``find_sink_dims`` (in :mod:`visionfx.methods.var_sinks`, re-exported here with the other sink helpers) leaves the
  attention-mass validation step (§3.1.6) to the caller.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from visionfx.config import MethodConfig
from visionfx.patches.llava import (LlavaHandle, LlavaParts, check_left_padding, is_prefill, layer_hidden,
                                    prompt_state)
from visionfx.kernels.dispatch import BACKENDS, choose
from visionfx.kernels.var_redistribute import column_masks, redistribute
from visionfx.kernels.var_redistribute.reference import _acc_dtype
from visionfx.methods.var_sinks import KNOWN_SINK_DIMS, RMS_EPS, find_sink_dims, known_sink_dims, sink_scores
from visionfx.registry import MethodSpec

__all__ = ["VARConfig", "VARHandle", "var_attention", "redistribute", "column_masks", "sink_scores",
           "find_sink_dims", "known_sink_dims", "ATTN_NAME", "KNOWN_SINK_DIMS", "RMS_EPS"]

ATTN_NAME = "visionfx_var"
MODES = ("eager", "hybrid")
PRESETS = {"official_code": {"p": 0.4, "rho": 0.5}, "hallucination": {"rho": 0.5}, "general": {"rho": 0.8},
           "vision_centric": {"rho": 0.9}}


@dataclass(frozen=True)
class VARConfig(MethodConfig):
    """VAR attention redistribution (paper convention).

    Attributes:
        tau: sink threshold on |x_d| / RMS(x) (needs D > τ²; lower it for narrow models).
        rho: minimum visual non-sink share of a row's image mass.
        p: fraction of the sink mass moved to visual non-sink tokens.
        summ: minimum image mass of a row.
        sink_dims: hidden dimensions of the massive activations; ``None``: looked up (LLaMA-2-7B/13B backbones).
        except_last_layer: leave the last decoder layer alone.
        mode: ``"eager"`` (reference) or ``"hybrid"`` (SDPA, modifiable rows recomputed eagerly).
        preset: ``"official_code"`` (p 0.4, ρ 0.5, the code's epsilon placement), ``"hallucination"`` (ρ 0.5),
            ``"general"`` (ρ 0.8), ``"vision_centric"`` (ρ 0.9) or ``None``.
        eps: guard of the denominators.
        backend: ``"auto"`` runs the redistribution as one Triton kernel on CUDA (no gradients), the PyTorch
            reference elsewhere; ``"reference"`` / ``"triton"`` force one (``VISIONFX_BACKEND`` too).
    """

    method = "var"
    tau: float = 20.0
    rho: float = 0.5
    p: float = 0.6
    summ: float = 0.2
    sink_dims: tuple[int, ...] | None = None
    except_last_layer: bool = True
    mode: str = "eager"
    preset: str | None = None
    eps: float = 1e-6
    backend: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        if self.layers is not None and any(i < 2 for i in self.layers):
            raise ValueError(f"var: layers {self.layers} include layers 0/1, which have no sink sets")
        for name in ("tau", "rho", "p", "summ", "eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(v) or v < 0:
                raise ValueError(f"var: {name} must be a non-negative number, got {v!r}")
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise ValueError(f"var: preset must be one of {sorted(PRESETS)} or None, got {self.preset!r}")
            defaults = {"p": 0.6, "rho": 0.5}
            for name, value in PRESETS[self.preset].items():
                own = getattr(self, name)
                if own not in (defaults[name], value):
                    raise ValueError(f"var: preset {self.preset!r} sets {name}={value}; got {name}={own}")
                object.__setattr__(self, name, value)
        if self.p > 1 or self.rho > 1:
            raise ValueError(f"var: p and rho are fractions in [0, 1], got p={self.p}, rho={self.rho}")
        if self.backend not in BACKENDS:
            raise ValueError(f"var: backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.mode not in MODES:
            raise ValueError(f"var: mode must be one of {MODES}, got {self.mode!r}")
        if self.sink_dims is not None:
            raw = (self.sink_dims,) if isinstance(self.sink_dims, numbers.Integral) else self.sink_dims
            dims = tuple(int(d) for d in raw)
            if not dims or any(d < 0 for d in dims) or len(set(dims)) != len(dims):
                raise ValueError(f"var: sink_dims must be distinct non-negative dimensions, got {raw!r}")
            object.__setattr__(self, "sink_dims", dims)


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    if n == 1:
        return x
    B, h, S, d = x.shape
    return x[:, :, None].expand(B, h, n, S, d).reshape(B, h * n, S, d)


def _eager_rows(module, query, key, value, mask, scaling, dropout, ctx):
    """Eager attention (HF's arithmetic) with VAR applied to rows ``ctx["first_row"]:`` only (the rows before it
    cannot change): ``(out [B, H, Q, d], weights [B, H, Q, S])``."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if mask is not None:
        scores = scores + mask
    attn = nn.functional.softmax(scores, dim=-1, dtype=torch.float32)
    weights = attn.to(query.dtype)
    first = attn.shape[2] if ctx is None else ctx["first_row"]
    if first < attn.shape[2]:
        sub = attn if first == 0 else attn[:, :, first:]
        args = (sub, ctx["image"], ctx["sinks"], ctx["rows"][:, first:])
        if attn.requires_grad:
            new = redistribute(*args, masks=ctx["masks"], **ctx["params"]).to(query.dtype)
            weights = new if first == 0 else torch.cat([weights[:, :, :first], new], 2)
        else:  # the changed rows are written into the cast weights in place, cast on the way
            fn = ctx["kernel"] or redistribute  # the Triton kernel, or this module's reference
            fn(*args, masks=ctx["masks"], out=weights if first == 0 else weights[:, :, first:], **ctx["params"])
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value), weights


_MODULES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def var_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """The ``"visionfx_var"`` attention function: ``query [B, H, Q, d]``, ``key``/``value [B, Hkv, S, d]``, additive
    float ``attention_mask [B, 1, Q, S]`` -> ``(out [B, Q, H, d], weights [B, H, Q, S] or None)``."""
    entry = _MODULES.get(module)
    if entry is None:
        raise RuntimeError("this attention module belongs to no VAR patch (a copy of a patched model?); patch the "
                           "model itself with visionfx.patch(model, 'var')")
    handle, layer = entry
    key = _repeat_kv(key, module.num_key_value_groups)
    value = _repeat_kv(value, module.num_key_value_groups)
    Q = query.shape[2]
    ctx = handle._context(layer, Q, key.shape[2])
    first = Q if ctx is None else ctx["first_row"]
    if handle.config.mode == "hybrid" and first > 0:
        p_drop = dropout if module.training else 0.0
        lo = query if first >= Q else query[:, :, :first]
        m = attention_mask if attention_mask is None or first >= Q else attention_mask[:, :, :first]
        out_lo = nn.functional.scaled_dot_product_attention(lo, key, value, attn_mask=m, dropout_p=p_drop,
                                                            scale=scaling)
        if first >= Q:
            return out_lo.transpose(1, 2).contiguous(), None
        m = attention_mask[:, :, first:] if attention_mask is not None else None
        out_hi = _eager_rows(module, query[:, :, first:], key, value, m, scaling, dropout,
                             {**ctx, "first_row": 0, "rows": ctx["rows"][:, first:]})[0]
        out = query.new_empty(query.shape[0], Q, query.shape[1], value.shape[-1])
        out[:, :first] = out_lo.transpose(1, 2)
        out[:, first:] = out_hi.transpose(1, 2)
        return out, None
    out, attn = _eager_rows(module, query, key, value, attention_mask, scaling, dropout, ctx)
    return out.transpose(1, 2).contiguous(), attn


def _register() -> None:
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    try:
        from transformers import AttentionInterface
    except ImportError:  # pragma: no cover - older layouts
        from transformers.modeling_utils import AttentionInterface
    AttentionInterface.register(ATTN_NAME, var_attention)
    AttentionMaskInterface.register(ATTN_NAME, eager_mask)


class _SinkHook:
    def __init__(self, handle: "VARHandle", index: int):
        self.handle, self.index = handle, index

    def __call__(self, module, args, kwargs):
        self.handle._record_sinks(self.index, layer_hidden(args, kwargs))
        return None


class VARHandle(LlavaHandle):
    """A VAR patch on one LLaVA model.

    Attributes:
        sink_dims: the sink dimensions used; layers: decoder layers VAR may modify.
        sink_masks: ``{layer: [B, L0] bool}`` sink sets of the last prefill (text and visual sinks).
        state: :class:`~visionfx.patches.llava.PromptState` of the last prefill.
    """

    def __init__(self, parts: LlavaParts, config: VARConfig):
        super().__init__(parts, config)
        text = parts.config.text_config
        L = len(parts.llm_layers)
        dims = config.sink_dims if config.sink_dims is not None else known_sink_dims(text)
        if dims is None:
            raise ValueError(f"var: the sink dimensions of a {getattr(text, 'model_type', '?')} text model with "
                             f"hidden size {text.hidden_size} are not known; pass sink_dims=[...] (find them with "
                             "visionfx.methods.var.find_sink_dims)")
        if any(d >= text.hidden_size for d in dims):
            raise ValueError(f"var: sink_dims {dims} out of range for hidden size {text.hidden_size}")
        last = L - 1 if config.except_last_layer else L
        default = range(2, last)
        if config.layers is not None:
            bad = [i for i in config.layers if i >= L]
            if bad:
                raise ValueError(f"var: layers {bad} out of range for a {L}-layer LLM")
        self.sink_dims = tuple(dims)
        self.layers = tuple(i for i in default if config.layers is None or i in config.layers)
        self.sink_masks: dict[int, torch.Tensor] = {}
        self._active: dict[int, torch.Tensor] = {}
        self.state = None
        self._prefill = False
        self._prompt_length = self._image_mask = None
        self._valid_run = False
        self._masks: dict[int, dict] = {}
        self._kernels: dict[str, Callable | None] = {}
        self._any_image, self._first_row, self._decode_layers = False, 0, None
        self._sink_ok = self._after_image = self._dims_index = None
        self._params = {"p": config.p, "rho": config.rho, "summ": config.summ, "eps": config.eps,
                        "official": config.preset == "official_code"}

    def install(self) -> None:
        _register()
        for i, layer in enumerate(self.parts.llm_layers):
            attn = getattr(layer, "self_attn", None)
            if attn is None or not hasattr(attn, "num_key_value_groups"):
                raise TypeError(f"var needs Llama-style decoder layers (self_attn with num_key_value_groups); got "
                                f"{type(layer).__name__}")
            _MODULES[attn] = (self, i)
        for i in self.layers:
            self.pre_hook(self.parts.llm_layers[i], _SinkHook(self, i))
        self.watch_inner(self._on_inner)
        self.set_attn_implementation({"text_config": ATTN_NAME})
        self.wrap_entry_points()

    def remove(self) -> None:
        super().remove()
        for layer in self.parts.llm_layers:
            attn = getattr(layer, "self_attn", None)
            if attn is not None and _MODULES.get(attn, (None,))[0] is self:
                del _MODULES[attn]

    @contextlib.contextmanager
    def call_scope(self, kwargs: dict[str, Any], entry: str) -> Iterator[dict[str, Any]]:
        kw = dict(kwargs)
        image_mask = kw.pop("image_mask", None)
        check_left_padding(kw.get("attention_mask"))
        ref = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        saved = (self._prompt_length, self._image_mask)
        # forward calls made by generate keep the generate call's prompt length and image mask
        self._prompt_length = ref.shape[1] if entry == "generate" and ref is not None else saved[0]
        self._image_mask = image_mask if image_mask is not None else saved[1]
        try:
            yield kw
        finally:
            self._prompt_length, self._image_mask = saved

    def _on_inner(self, kw: dict[str, Any]) -> None:
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        self._prefill = is_prefill(kw.get("past_key_values"))
        if not self._prefill:
            return
        self.sink_masks, self._active, self._masks = {}, {}, {}
        length = (ids if ids is not None else embeds).shape[1]
        st = self.state = prompt_state(ids, kw.get("attention_mask"), self.parts.image_token_id, self._image_mask,
                                       length, self._prompt_length)
        # the prefill's one device sync: whether any image exists, and the first row after an image's end (rows
        # before it cannot change in any layer); per-layer facts stay on the device
        bound = torch.where(st.has_image, st.last_image + 1, st.length).min()
        any_image, first = torch.stack([st.has_image.any().long(), bound]).tolist()
        self._any_image, self._first_row = bool(any_image), int(first)
        self._decode_layers = None
        pos = torch.arange(st.length, device=st.image.device)
        self._sink_ok = st.valid & (pos < st.prompt_length)
        self._after_image = (pos[None, :] > st.last_image[:, None]) & st.valid  # the rows a prefill may change

    def _record_sinks(self, index: int, x: torch.Tensor) -> None:
        st = self.state
        if not self._prefill or st is None or not self._any_image:
            return
        if self._dims_index is None or self._dims_index.device != x.device:
            self._dims_index = torch.tensor(self.sink_dims, device=x.device)
        with torch.no_grad():
            score = sink_scores(x, self._dims_index)
        sinks = (score > self.config.tau) & self._sink_ok
        self.sink_masks[index] = sinks
        # samples with a visual sink at this layer; no host sync: in prefill a layer without one runs the
        # redistribution on rows that are all deselected (a no-op, bit for bit)
        self._active[index] = (sinks & st.image).any(1)

    def _kernel(self, device_type: str) -> Callable | None:
        """The Triton redistribution for weights on ``device_type`` (None: the reference), chosen once per device."""
        if device_type not in self._kernels:
            fn, used, _ = choose("var_redistribute", self.config.backend, device_type, torch.float32, 0)
            self._kernels[device_type] = fn if used == "triton" else None
        return self._kernels[device_type]

    def _layer_masks(self, layer: int, s_len: int, column: bool = True) -> dict:
        """Image/sink masks of ``layer``, kept at a capacity of at least ``s_len`` columns (padded with False for
        generated positions), so a decoding step only slices views; with ``column``, also their
        :func:`column_masks` (what the reference needs; the kernel reads the image/sink masks)."""
        entry = self._masks.get(layer)
        if entry is None or entry["capacity"] < s_len:
            st, sinks = self.state, self.sink_masks[layer]
            if entry is None and s_len <= st.length:  # prefill: the recorded masks, no copy
                capacity, image = st.length, st.image
            else:  # decoding: room for this step and about as many again
                capacity = max(s_len, st.length) + max(s_len, st.length if entry is None else entry["capacity"])
                image, sinks = (nn.functional.pad(t, (0, capacity - st.length)) for t in (st.image, sinks))
            entry = self._masks[layer] = {"capacity": capacity, "image": image, "sinks": sinks, "masks": None}
        if column and entry["masks"] is None:
            entry["masks"] = column_masks(entry["image"], entry["sinks"], self.config.p, torch.float32,
                                          _acc_dtype(entry["image"]))
        return entry

    def _context(self, layer: int, q_len: int, s_len: int) -> dict | None:
        """What :func:`var_attention` needs at ``layer`` for ``q_len`` queries over ``s_len`` keys (``None``:
        nothing can change)."""
        has = self._active.get(layer)
        if self.state is None or has is None:
            return None
        if not self._prefill:
            if self._decode_layers is None:  # the generation's one sync: which layers have a visual sink at all
                flags = torch.stack([a.any() for a in self._active.values()]).tolist()
                self._decode_layers = {i for i, f in zip(self._active, flags) if f}
            if layer not in self._decode_layers:
                return None
        first = self._first_row if self._prefill else 0  # a prefill holds the whole prompt: q_len == s_len
        if first >= q_len:
            return None
        kernel = self._kernel(has.device.type)
        masks = self._layer_masks(layer, s_len, column=kernel is None)
        rows = self._after_image & has[:, None] if self._prefill else has[:, None].expand(has.shape[0], q_len)
        return {"image": masks["image"][:, :s_len], "sinks": masks["sinks"][:, :s_len], "rows": rows,
                "first_row": first, "masks": masks["masks"], "kernel": kernel, "params": self._params}


METHOD = MethodSpec(
    name="var",
    site="visual_tokens",
    config_cls=VARConfig,
    module_cls=None,
    summary="redistribute attention from sink tokens to the other visual tokens (image-centric heads)",
    regime="training-free",
    paper="arXiv 2503.03321",
    handle=VARHandle,
)
