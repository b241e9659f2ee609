"""DyVTE: drop every visual token from the LLM after the layer where a learned router says the image is used up.

Paper: "Dynamic Visual-Token Exit" (arXiv 2411.19628, NeurIPS 2025); MLLM.md §2. One router per decoder layer ℓ,
Router(x) = W2·GELU(W1·x) (no biases), reads ``concat(mean of the text after the last image token excluding the final
prompt position, final prompt position)`` of layer ℓ's output during prefill; a sample exits at ℓ iff
P(exit) > threshold (0.5: the strict ``logit_exit > logit_keep`` of the official code). From layer ℓ+1 on its image
positions are gone from hidden states, keys/values, queries, RoPE tables and masks; text keeps its original positions.

How it runs (hooks only, patches/llava.py holds the bookkeeping):
- a pre-hook on ``LlavaModel`` records the image span, padding and prompt length of each forward (prefill = empty
  cache); a forward hook on each decoder layer ℓ ≤ L−2 evaluates the routers of the samples still running (the text
  span they average is found once per prefill; each routed layer then runs the router op, ``kernels/dyvte_router``,
  two Triton kernels on CUDA);
- the logits are read on the host (the next layer's shapes depend on them) by a pre-hook on layer ℓ+1's
  ``self_attn``: on CUDA they are copied to pinned memory right after the op and the host waits for that copy's
  event only, so layer ℓ+1's input norm, queued by then, keeps the device busy while the host wakes up and queues the
  attention (a ``tolist()`` of the device tensor would wait for that norm too). A sample that exited makes layer ℓ+1
  start again (its ``forward`` is wrapped) from its inputs as the pre-hook below now shapes them. Nothing of the
  first attempt is kept: it ran only the input norm, before anything that mixes tokens or writes the cache. Layers
  without a ``self_attn`` submodule read the decision in their pre-hook instead;
- a pre-hook (``with_kwargs=True``) on each decoder layer compacts, once every sample has exited: it gathers the
  hidden states (first compacted layer), ``cos``/``sin`` and the mask (eager float, SDPA bool, FlashAttention 2-D,
  ``None`` stays ``None``) at the kept positions and passes ``position_ids=None``; in decoding it gathers the mask
  columns ``kept ∪ [L0, total)``, since transformers sizes every mask from cache layer 0;
- ``batch_policy="exact"``: while only some samples have exited, a virtual-exit mask hides the image keys from their
  text queries (image query rows stay unrestricted), in prefill and decoding; ``"last"`` waits for the last sample.

Decisions the docs leave open:
- Rows without image tokens count as exited before layer 0 (nothing to remove); a batch without any image token
  passes through untouched. Images given without any image token, or ``inputs_embeds`` without ``image_mask=``, raise.
- ``handle.exit_layers[b]`` is the layer after which sample b exited; L−1 means it ran the full model, -1 that it had
  no image. ``handle.forced_exits`` (an int or one value per sample) overrides the routers for analysis;
  ``handle.compaction = False`` keeps full-length tensors and uses the virtual-exit mask everywhere.
- With different image-token counts per row, compaction left-pads rows to the longest kept length with slots that no
  query may attend to (``handle.kept_positions`` holds -1 there).
- Router features are computed over the prompt only (the generate wrapper records its length), so generation without
  a cache, which re-runs the prompt each step, makes the same decisions. Router features are detached, in the LLM dtype
  (the text mean is accumulated in fp32), cast to the routers' dtype.
- On install the base model is frozen (only the routers are trainable); ``remove()`` restores every ``requires_grad``.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from visionfx.config import MethodConfig
from visionfx.kernels.dispatch import BACKENDS, choose
from visionfx.kernels.dyvte_router.reference import router_logits_reference
from visionfx.methods.dyvte_masks import apply_block, block_mask, gather_mask, gather_seq
from visionfx.methods.dyvte_prefill import (AttentionPreHook, ForwardStep, LayerPreHook, PrefillState, Restart,
                                            RouterDecision, RouterHook, check_not_compiling, keep_indices,
                                            restartable_forward)
from visionfx.methods.dyvte_router import (Router, TextSpan, exit_decision, router_features, span_features, span_mask,
                                           text_span)
from visionfx.patches.llava import (LlavaHandle, LlavaParts, check_left_padding, is_prefill, layer_hidden,
                                    prompt_state, with_layer_hidden)
from visionfx.registry import MethodSpec

__all__ = ["DyVTEConfig", "Router", "DyVTEHandle", "router_features", "text_span", "span_features", "exit_decision",
           "block_mask", "apply_block", "gather_mask", "save_routers", "load_routers", "routers_from_official"]

POLICIES = ("exact", "last")


def __getattr__(name: str):
    # checkpoint functions live in dyvte_io (which imports this module)
    if name in ("save_routers", "load_routers", "routers_from_official", "ROUTERS_NAME"):
        from visionfx.methods import dyvte_io

        return getattr(dyvte_io, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class DyVTEConfig(MethodConfig):
    """DyVTE visual-token exit.

    Attributes:
        routers: directory of a router checkpoint (:func:`save_routers`); ``None``: fresh Xavier-initialised routers.
        threshold: a sample exits when P(exit) > threshold (0.5 is the official strict argmax).
        exit_layer: force every sample with an image to exit after this layer (analysis, benchmarks); ``None``: routers.
        batch_policy: ``"exact"`` (virtual exit per sample, compaction once all have exited) or ``"last"`` (the batch
            exits with its last sample, compaction only; FlashAttention-compatible, not exact).
        router_hidden: router width (2048 officially).
        prompt_template: name/text of the chat template the routers were trained with (checked against checkpoints).
        backend: ``"auto"`` runs each router step as two Triton kernels on CUDA (``kernels/dyvte_router``), the
            PyTorch reference elsewhere; ``"reference"`` / ``"triton"`` force one (``VISIONFX_BACKEND`` too).
    """

    method = "dyvte"
    routers: str | None = None
    threshold: float = 0.5
    exit_layer: int | None = None
    batch_policy: str = "exact"
    router_hidden: int = 2048
    prompt_template: str | None = None
    backend: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        if self.layers is not None:
            raise ValueError("dyvte decides per layer at run time and patches no chosen layers; use exit_layer to "
                             "force an exit")
        if self.routers is not None:
            if not isinstance(self.routers, (str, os.PathLike)):
                raise ValueError(f"dyvte: routers must be a directory path or None, got {self.routers!r}")
            object.__setattr__(self, "routers", os.fspath(self.routers))
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, numbers.Real) \
                or not 0 < self.threshold < 1:
            raise ValueError(f"dyvte: threshold is a probability in (0, 1), got {self.threshold!r}")
        if self.exit_layer is not None and (isinstance(self.exit_layer, bool) or not isinstance(
                self.exit_layer, numbers.Integral) or self.exit_layer < 0):
            raise ValueError(f"dyvte: exit_layer must be a non-negative layer index or None, got {self.exit_layer!r}")
        if self.batch_policy not in POLICIES:
            raise ValueError(f"dyvte: batch_policy must be one of {POLICIES}, got {self.batch_policy!r}")
        if isinstance(self.router_hidden, bool) or not isinstance(self.router_hidden, numbers.Integral) \
                or self.router_hidden < 1:
            raise ValueError(f"dyvte: router_hidden must be a positive int, got {self.router_hidden!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"dyvte: backend must be one of {BACKENDS}, got {self.backend!r}")


class DyVTEHandle(LlavaHandle):
    """A DyVTE patch on one LLaVA model.

    Attributes:
        routers: ``nn.ModuleList`` of L :class:`Router` (registered on the model as ``vfx_routers``).
        exit_layers: ``[B]`` exit layer per sample of the last prefill (L−1: full model, -1: no image).
        compact_from: first physically compacted layer of the last prefill, or ``None``.
        kept_positions: ``[B, M]`` original positions of the compacted sequence (-1 at padding slots), or ``None``.
        router_backend: ``(backend, why)`` of the router op in the last routed prefill (``"triton"`` or
            ``"reference"``), or ``None``.
        forced_exits: ``None``, an int or one exit layer per sample, overriding the routers (analysis).
        compaction: ``False`` keeps full-length tensors and uses the virtual exit mask everywhere (analysis).
    """

    def __init__(self, parts: LlavaParts, config: DyVTEConfig):
        super().__init__(parts, config)
        self.num_layers = len(parts.llm_layers)
        self.hidden_size = int(parts.config.text_config.hidden_size)
        if config.exit_layer is not None and config.exit_layer >= self.num_layers:
            raise ValueError(f"dyvte: exit_layer={config.exit_layer} out of range for a {self.num_layers}-layer LLM")
        self.routers: nn.ModuleList | None = None
        self._deferred = [False] * self.num_layers  # layers that read the previous router decision at their attention
        self.forced_exits = config.exit_layer
        self.compaction = True
        self.enabled = True
        self.exit_layers = self.compact_from = self.kept_positions = None
        self.router_backend: tuple[str, str] | None = None
        self._seq: PrefillState | None = None
        self._step: ForwardStep | None = None
        self._prompt_length = self._image_mask = None
        self._restore = False
        self._grad_flags: dict | None = None
        self._warned = False

    # --- install / remove ----------------------------------------------------------------------------------------
    def install(self) -> None:
        parts = self.parts
        if "vfx_routers" in parts.model._modules:
            raise RuntimeError("the model already holds vfx_routers; unpatch first")
        routers = []
        for layer in parts.llm_layers:
            p = next(layer.parameters())
            routers.append(Router(self.hidden_size, self.config.router_hidden, device=p.device, dtype=p.dtype))
        self._grad_flags = {n: p.requires_grad for n, p in parts.model.named_parameters()}
        parts.model.requires_grad_(False)
        self.routers = nn.ModuleList(routers)
        parts.model.add_module("vfx_routers", self.routers)
        if self.config.routers is not None:
            from visionfx.methods.dyvte_io import load_routers

            load_routers(self, self.config.routers)
        self.watch_inner(self._on_inner)
        for i, layer in enumerate(parts.llm_layers):
            self.pre_hook(layer, LayerPreHook(self, i))
            if i < self.num_layers - 1:
                self.forward_hook(layer, RouterHook(self, i))
            if i > 0 and isinstance(getattr(layer, "self_attn", None), nn.Module):
                self.pre_hook(layer.self_attn, AttentionPreHook(self, i))
                self.wrap(layer, "forward", restartable_forward)
                self._deferred[i] = True
        self.wrap_entry_points()

    def remove(self) -> None:
        super().remove()
        model = self.parts.model
        if model._modules.get("vfx_routers") is self.routers and self.routers is not None:
            del model._modules["vfx_routers"]
        if self._grad_flags is not None:
            for n, p in model.named_parameters():
                if n in self._grad_flags:
                    p.requires_grad_(self._grad_flags[n])
            self._grad_flags = None
        self._seq = self._step = None

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the model unpatched inside this block (router training uses it)."""
        saved, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = saved

    # --- entry points --------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def call_scope(self, kwargs: dict[str, Any], entry: str) -> Iterator[dict[str, Any]]:
        kw = dict(kwargs)
        restore = bool(kw.pop("restore_length", False)) if entry == "forward" else False
        image_mask = kw.pop("image_mask", None)
        if not self.enabled:
            yield kw
            return
        images = kw.get("pixel_values") is not None or kw.get("mm_encoder_outputs") is not None
        if kw.get("labels") is not None and (images or image_mask is not None):
            raise NotImplementedError("DyVTE is inference-only: labels/loss are not supported while visual tokens "
                                      "may be removed; train routers with visionfx.methods.dyvte_train.train_routers")
        check_left_padding(kw.get("attention_mask"))
        if entry == "generate":
            self._check_generate(kw)
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        saved = (self._prompt_length, self._image_mask, self._restore)
        ref = ids if ids is not None else embeds
        # forward calls made by generate keep the generate call's prompt length and image mask
        self._prompt_length = ref.shape[1] if entry == "generate" and ref is not None else saved[0]
        self._image_mask = image_mask if image_mask is not None else saved[1]
        self._restore = restore
        try:
            yield kw
        finally:
            self._prompt_length, self._image_mask, self._restore = saved

    def _check_generate(self, kw: dict[str, Any]) -> None:
        gen = kw.get("generation_config") or getattr(self.parts.model, "generation_config", None)
        beams = kw.get("num_beams", getattr(gen, "num_beams", 1)) or 1
        if int(beams) > 1:
            raise NotImplementedError("DyVTE does not support beam search (per-layer compacted caches cannot be "
                                      "reordered safely); use greedy or sampling with num_beams=1")
        impl = kw.get("cache_implementation", getattr(gen, "cache_implementation", None))
        if impl not in (None, "dynamic"):
            raise NotImplementedError(f"DyVTE needs a dynamic cache (layers hold different lengths); got "
                                      f"cache_implementation={impl!r}")

    def finish(self, output, entry: str):
        seq = self._seq
        if entry != "forward" or not self._restore or seq is None or seq.compact_from is None:
            return output
        logits = getattr(output, "logits", None)
        if logits is None or logits.shape[1] != seq.keep.shape[1]:
            return output
        full = logits.new_zeros(logits.shape[0], seq.state.length, logits.shape[2])
        pos = self.kept_positions
        real = pos >= 0
        full[real.nonzero(as_tuple=True)[0], pos[real]] = logits[real]
        output.logits = full
        return output

    # --- per forward ---------------------------------------------------------------------------------------------
    def _on_inner(self, kw: dict[str, Any]) -> None:
        self._step = None
        if not self.enabled:
            return
        inner = self.parts.inner
        check_not_compiling(self.parts.model, inner, inner.language_model, *self.parts.llm_layers)
        pkv = kw.get("past_key_values")
        if pkv is not None and getattr(pkv, "is_compileable", False):
            raise NotImplementedError(f"DyVTE does not support {type(pkv).__name__} (static caches): layers hold "
                                      "different lengths after the exit; use the default DynamicCache")
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        length = (ids if ids is not None else embeds).shape[1]
        mask = kw.get("attention_mask")
        impl = self.parts.config.text_config._attn_implementation or "eager"
        float_dtype = "2d" if impl.startswith("flash") else (None if impl in ("sdpa",) else self._llm_dtype())
        if not is_prefill(pkv):
            if self._seq is None:
                return
            self._step = ForwardStep(prefill=False, total=int(pkv.get_seq_length()) + length, float_dtype=float_dtype)
            return
        self._seq = None
        self.exit_layers = self.compact_from = self.kept_positions = None
        images = kw.get("pixel_values") is not None or kw.get("mm_encoder_outputs") is not None
        st = prompt_state(ids, mask, self.parts.image_token_id, self._image_mask, length, self._prompt_length)
        has = st.has_image
        if not bool(has.any()):
            if images:
                raise ValueError(f"images were given but the prompt holds no image token (id "
                                 f"{self.parts.image_token_id}); build the prompt with the processor")
            return
        check_left_padding(mask)
        B = has.shape[0]
        if impl == "flex_attention":
            raise NotImplementedError("DyVTE supports eager, SDPA and FlashAttention text models, not flex_attention")
        if float_dtype == "2d" and self.config.batch_policy == "exact" and B > 1:
            raise NotImplementedError("FlashAttention cannot express per-sample exits: use batch_policy='last' or "
                                      "batch size 1")
        exits = torch.full((B,), self.num_layers - 1, dtype=torch.long, device=has.device)
        forced = self._forced(B, has.device)
        if forced is not None:
            exits = forced.clone()
        exits[~has] = -1
        keep, slot_valid = keep_indices(st.image)
        seq = PrefillState(state=st, exits=exits, keep=keep, slot_valid=slot_valid, routed=forced is None)
        if seq.routed:
            end = torch.full_like(exits, st.prompt_length - 1)
            span, count = span_mask(st.image, st.valid, end)
            # the prefill's one sync: exits, which samples have an image, which can route, the span lengths
            lists = torch.stack([exits, has.long(), (has & (count > 0)).long(), count]).tolist()
            seq.exit_list = lists[0]
            seq.has_list, seq.routable = ([bool(v) for v in row] for row in lists[1:3])
            seq.span = TextSpan.from_mask(span, count, end, max(lists[3]))
            seq.router_step = self._router_step()
            if has.device.type == "cuda":
                seq.host_logits = torch.empty((self.num_layers, B, 2), dtype=torch.float32, pin_memory=True)
            if seq.routable != seq.has_list and not self._warned:
                self._warned = True
                warnings.warn("DyVTE: a prompt has no text between its last image token and its final position; "
                              "its router input is undefined and it never exits", stacklevel=2)
        else:
            seq.exit_list, seq.has_list = exits.tolist(), has.tolist()
        self._seq = seq
        self.exit_layers = exits
        self._step = ForwardStep(prefill=True, total=length, float_dtype=float_dtype)

    def _router_step(self):
        """The router op's function for this model (Triton on CUDA when the routers have their layers' dtype; a
        router on another device than its layer's output runs the reference, see :meth:`_after_layer`);
        ``router_backend`` keeps ``(backend, why)`` of the last routed prefill (benchmarks record it)."""
        p = next(self.parts.llm_layers[0].parameters())
        fn, used, why = choose("dyvte_router", self.config.backend, p.device.type, p.dtype, self.hidden_size,
                               weight_dtype=self.routers[0].w1.weight.dtype)
        self.router_backend = (used, why)
        return fn

    def _llm_dtype(self) -> torch.dtype:
        return next(self.parts.llm_layers[0].parameters()).dtype

    def _forced(self, B: int, device) -> torch.Tensor | None:
        f = self.forced_exits
        if f is None:
            return None
        vals = [int(f)] * B if isinstance(f, numbers.Integral) else [int(v) for v in f]
        if len(vals) != B or any(not 0 <= v < self.num_layers for v in vals):
            raise ValueError(f"forced_exits={f!r} must be one layer in [0, {self.num_layers - 1}] or one per sample "
                             f"(batch of {B})")
        return torch.tensor(vals, dtype=torch.long, device=device)

    # --- per layer -----------------------------------------------------------------------------------------------
    def _before_layer(self, index: int, args: tuple, kwargs: dict):
        step, seq = self._step, self._seq
        if step is None or seq is None:
            return None
        check_not_compiling()
        if step.prefill and seq.routed:
            if seq.pending is not None and not self._deferred[index]:
                self._resolve(seq)  # a layer without a hooked attention reads the decision before it starts
            step.inputs = (index, args, kwargs)
        exited = [e < index for e in seq.exit_list]
        if step.prefill and self.compaction and all(exited):
            if seq.compact_from is None:
                seq.compact_from = self.compact_from = index
                self.kept_positions = seq.keep if seq.slot_valid is None else seq.keep.masked_fill(~seq.slot_valid, -1)
            return self._compact_prefill(step, seq, args, kwargs)
        if not step.prefill and seq.compact_from is not None and index >= seq.compact_from:
            return self._compact_decode(step, seq, args, kwargs)
        flags = tuple(e and h for e, h in zip(exited, seq.has_list))
        if self.config.batch_policy == "exact" and any(flags):
            key = ("virtual", flags)
            cache = step.cache
            if key not in cache:
                virtual = torch.tensor(flags, device=seq.keep.device)
                image = seq.state.image
                if step.total > image.shape[1]:
                    image = torch.nn.functional.pad(image, (0, step.total - image.shape[1]))
                q_len = layer_hidden(args, kwargs).shape[1]
                fd = step.float_dtype if step.float_dtype != "2d" else None
                cache[key] = apply_block(kwargs.get("attention_mask"), block_mask(image, virtual, q_len), fd)
            return args, {**kwargs, "attention_mask": cache[key]}
        return None

    def _compact_prefill(self, step: ForwardStep, seq: PrefillState, args: tuple, kwargs: dict):
        keep = seq.keep
        if not step.gathered:
            args, kwargs = with_layer_hidden(args, kwargs, gather_seq(layer_hidden(args, kwargs), keep))
            step.gathered = True
        cache = step.cache
        if "mask" not in cache:
            cos, sin = kwargs["position_embeddings"]
            cache["pe"] = (gather_seq(cos, keep), gather_seq(sin, keep))
            cache["mask"] = gather_mask(kwargs.get("attention_mask"), keep, keep, seq.slot_valid, step.float_dtype)
        new = {**kwargs, "attention_mask": cache["mask"], "position_embeddings": cache["pe"], "position_ids": None}
        if kwargs.get("cache_position") is not None:  # transformers 4.x; only static caches read it
            new["cache_position"] = torch.arange(keep.shape[1], device=keep.device)
        return args, new

    def _compact_decode(self, step: ForwardStep, seq: PrefillState, args: tuple, kwargs: dict):
        cache = step.cache
        if "mask" not in cache:
            keep, L0 = seq.keep, seq.state.length
            B = keep.shape[0]
            new = torch.arange(L0, step.total, device=keep.device).expand(B, -1)
            cols = torch.cat([keep, new], dim=1)
            valid = None
            if seq.slot_valid is not None:
                valid = torch.cat([seq.slot_valid, torch.ones_like(new, dtype=torch.bool)], dim=1)
            cache["mask"] = gather_mask(kwargs.get("attention_mask"), None, cols, valid, step.float_dtype)
        return args, {**kwargs, "attention_mask": cache["mask"], "position_ids": None}

    def _after_layer(self, index: int, output) -> None:
        step, seq = self._step, self._seq
        if step is None or seq is None or not step.prefill or not seq.routed or step.gathered:
            return
        # the samples still running whose router input is defined (the warning for the others came with the prefill)
        last = self.num_layers - 1
        pending = [e == last and r for e, r in zip(seq.exit_list, seq.routable)]
        if not any(pending):
            return
        hidden = output[0] if isinstance(output, tuple) else output
        router, span = self.routers[index], seq.span
        w1, w2 = router.w1.weight, router.w2.weight
        step = seq.router_step if w1.device == hidden.device else router_logits_reference  # e.g. a device map
        with torch.no_grad():
            logits = step(hidden, span.index, span.weights, span.count, w1, w2)
        ready = None
        if seq.host_logits is not None:  # CUDA: a pinned copy; the read waits for this copy's event only
            logits = seq.host_logits[index].copy_(logits, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        seq.pending = RouterDecision(index, logits, ready, pending)

    def _before_attention(self, index: int) -> None:
        """Read the previous layer's router decision once this layer's first kernels are queued, so the device has
        work while the host waits; a new exit restarts the layer (:class:`Restart`) before anything of it is kept."""
        step, seq = self._step, self._seq
        if step is None or seq is None or not step.prefill or seq.pending is None:
            return
        if self._resolve(seq):
            raise Restart

    def _resolve(self, seq: PrefillState) -> bool:
        """Apply the pending router decision (one wait for the device); whether a sample exited."""
        decision, seq.pending = seq.pending, None
        index = decision.index
        exiting = [p and d for p, d in zip(decision.samples, exit_decision(decision.read(), self.config.threshold))]
        if not any(exiting):
            return False
        seq.exits.masked_fill_(torch.tensor(exiting, device=seq.exits.device), index)
        seq.exit_list = [index if x else e for x, e in zip(exiting, seq.exit_list)]
        return True


METHOD = MethodSpec(
    name="dyvte",
    site="visual_tokens",
    config_cls=DyVTEConfig,
    module_cls=None,
    summary="drop all visual tokens from the LLM after a router-chosen layer",
    regime="router training (LLM frozen)",
    paper="arXiv 2411.19628",
    handle=DyVTEHandle,
)
