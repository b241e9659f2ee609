"""Hugging Face LLaVA family: ``LlavaForConditionalGeneration`` and ``LlavaNextForConditionalGeneration``.

This module is the model bookkeeping shared by the ``visual_tokens`` methods (MLLM.md §0, §1.3, §5): it finds the
vision tower, its CLIP layers, the projector and the LLM layers (:class:`LlavaParts`), locates image spans, checks left
padding, shrinks placeholder runs (:func:`shrink_placeholders`) and owns everything a patch changes
(:class:`LlavaHandle`: hooks, instance-attribute wrappers of ``get_image_features`` / ``forward`` / ``generate`` that
keep the wrapped signatures, ``attn_implementation``), so that ``remove()`` gives back the exact original model.

Methods that act inside the language model (DyVTE, VAR) share :class:`PromptState` (image span, padding, prompt
length and prefill/decoding of one forward, captured by :meth:`LlavaHandle.watch_inner`, a pre-hook on the inner
``LlavaModel``), :func:`is_prefill` (empty cache) and :func:`layer_hidden` / :func:`with_layer_hidden` for decoder-layer
pre-hooks; :meth:`LlavaHandle.finish` post-processes what the wrapped ``forward``/``generate`` return.

Protocol for methods: a ``visual_tokens`` method's spec carries its handle class (``handle(parts: LlavaParts, config)``,
a :class:`LlavaHandle` with ``install()`` and ``remove()``)
(found through the module of the method's config class). The adapter calls it and stores the handle in the patch
record; :func:`get_handle` returns it. Nothing is forked: only wrappers made with ``functools.wraps``, forward
(pre-)hooks and ``set_attn_implementation``.

Choices the docs leave open:
- The family is recognised by class name in the model's MRO (module under ``transformers.``), so importing visionfx
  never imports transformers and user subclasses are accepted; LlavaNextVideo, OneVision and others are not claimed.
- Shrinking is decided from the placeholder total: the sum of the unshrunk counts shrinks, the sum of the kept counts
  is left alone (idempotent even when two images sit next to each other), anything else is an error.
- Padding inserted by re-padding uses ``config.pad_token_id`` (or the text config's, else 0); labels of image and
  padding positions become -100.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from visionfx.patches.base import Adapter
from visionfx.patches.llava_prompt import image_spans, shrink_placeholders, true_first
from visionfx.registry import AdapterSpec

__all__ = [
    "LlavaParts",
    "LlavaHandle",
    "LlavaAdapter",
    "get_handle",
    "check_left_padding",
    "image_spans",
    "shrink_placeholders",
    "true_first",
    "call_kwargs",
    "PromptState",
    "prompt_state",
    "is_prefill",
    "layer_hidden",
    "with_layer_hidden",
]

_FAMILIES = {"LlavaForConditionalGeneration": "llava", "LlavaNextForConditionalGeneration": "llava_next"}


def _family(model: nn.Module) -> str | None:
    for cls in type(model).__mro__:
        if cls.__name__ in _FAMILIES and cls.__module__.startswith("transformers."):
            return _FAMILIES[cls.__name__]
    return None


def call_kwargs(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``args``/``kwargs`` of a call to a function with ``signature``, all as keywords (``**kwargs`` flattened)."""
    bound = signature.bind_partial(*args, **kwargs)
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"unexpected extra positional arguments {value!r}")
        else:
            out[name] = value
    return out


def check_left_padding(attention_mask: torch.Tensor | None) -> None:
    """Raise if a row of ``attention_mask [B, L]`` is right padded (its last column is 0)."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[1] == 0:
        return
    if bool((attention_mask[:, -1] == 0).any()):
        rows = torch.nonzero(attention_mask[:, -1] == 0).flatten().tolist()
        raise ValueError(
            f"rows {rows} of the batch are right padded (attention_mask[:, -1] == 0); visual-token methods need left "
            "padding: set processor.tokenizer.padding_side = 'left'"
        )


@dataclass
class PromptState:
    """Token bookkeeping of one LLM forward, captured before the LLM runs (tensor coordinates, left padding included).

    Attributes:
        image: ``[B, L]`` bool, image placeholder positions (newline placeholders of LLaVA-NeXT included).
        valid: ``[B, L]`` bool, non-padding positions.
        prompt_length: P; positions ``>= P`` are tokens generated so far (generation without a cache re-runs them).
        last_image: ``[B]`` long, position of each row's last image token, -1 for rows without one.
        prefill: whether this forward starts a sequence (empty cache); otherwise it is a decoding step.
    """

    image: torch.Tensor
    valid: torch.Tensor
    prompt_length: int
    last_image: torch.Tensor
    prefill: bool

    @property
    def length(self) -> int:
        return self.image.shape[1]

    @property
    def has_image(self) -> torch.Tensor:
        return self.last_image >= 0


def is_prefill(past_key_values) -> bool:
    """Whether a forward with this cache starts a sequence (no cache, or an empty one)."""
    return past_key_values is None or int(past_key_values.get_seq_length()) == 0


def prompt_state(input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, image_token_id: int,
                 image_mask: torch.Tensor | None = None, length: int | None = None, prompt_length: int | None = None,
                 prefill: bool = True) -> PromptState:
    """A :class:`PromptState` from a forward's ``input_ids [B, L]`` (or a caller's ``image_mask [B, L']`` when only
    embeddings are given; ``L' < L`` is padded with False) and its 2-D ``attention_mask`` (``None``: no padding)."""
    if input_ids is not None:
        image = input_ids == image_token_id
    elif image_mask is not None:
        image = image_mask.to(torch.bool)
        if length is not None and image.shape[1] < length:
            image = torch.nn.functional.pad(image, (0, length - image.shape[1]))
    else:
        raise ValueError("the image positions are needed but only inputs_embeds were given: pass image_mask=[B, L] "
                         "(True at image placeholder positions) to the call")
    B, L = image.shape
    if attention_mask is None:
        valid = torch.ones_like(image)
    elif attention_mask.dim() != 2:
        raise ValueError(f"a 2-D attention_mask [B, L] is needed, got shape {tuple(attention_mask.shape)}")
    else:
        valid = attention_mask[:, -L:].to(torch.bool).to(image.device)
    pos = torch.arange(L, device=image.device).expand(B, L)
    P = L if prompt_length is None else min(int(prompt_length), L)
    image = image & (pos < P)  # generated tokens are never image tokens
    last = torch.where(image, pos, torch.full_like(pos, -1)).amax(1)
    return PromptState(image=image, valid=valid, prompt_length=P, last_image=last, prefill=prefill)


def layer_hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    """The ``hidden_states`` a decoder layer is called with (pre-hook ``args``/``kwargs``)."""
    return args[0] if args else kwargs["hidden_states"]


def with_layer_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """Pre-hook ``(args, kwargs)`` with the decoder layer's ``hidden_states`` replaced."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@dataclass
class LlavaParts:
    """Where everything lives in one LLaVA model (MLLM.md §0 module paths).

    Attributes:
        model: the top-level ``*ForConditionalGeneration``.
        inner: ``model.model`` (``LlavaModel`` / ``LlavaNextModel``), owner of ``get_image_features``.
        family: ``"llava"`` or ``"llava_next"``.
        vision_tower, vision_layers, projector, language_model, llm_layers: the sub-modules.
        image_token_id: the placeholder id.
        num_patches: patch tokens per image (per crop for LlavaNext), N.
        grid: ``(H, W)`` patch grid of one crop.
        has_cls: the tower prepends a CLS token (CLIP).
    """

    model: nn.Module
    inner: nn.Module
    family: str
    vision_tower: nn.Module
    vision_layers: nn.ModuleList
    projector: nn.Module
    language_model: nn.Module
    llm_layers: nn.ModuleList
    image_token_id: int
    num_patches: int
    grid: tuple[int, int]
    has_cls: bool

    @classmethod
    def of(cls, model: nn.Module) -> "LlavaParts":
        family = _family(model)
        if family is None:
            raise TypeError(f"{type(model).__name__} is not a transformers LlavaForConditionalGeneration or "
                            "LlavaNextForConditionalGeneration")
        inner = model.model
        tower = inner.vision_tower
        owner = getattr(tower, "vision_model", tower)  # CLIP has a .vision_model wrapper in 4.x only
        encoder = getattr(owner, "encoder", None)
        layers = getattr(encoder, "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise TypeError(f"cannot find the encoder layers of the vision tower {type(tower).__name__}")
        lm = inner.language_model
        llm_layers = getattr(lm, "layers", None)
        if llm_layers is None:
            llm_layers = lm.model.layers  # 4.x kept a CausalLM here in some versions
        config = model.config
        token = getattr(config, "image_token_id", None)
        if token is None:
            token = config.image_token_index
        vcfg = config.vision_config
        grid = (vcfg.image_size // vcfg.patch_size,) * 2
        embeddings = getattr(owner, "embeddings", None)
        return cls(model=model, inner=inner, family=family, vision_tower=tower, vision_layers=layers,
                   projector=inner.multi_modal_projector, language_model=lm, llm_layers=llm_layers,
                   image_token_id=int(token), num_patches=grid[0] * grid[1], grid=grid,
                   has_cls=hasattr(embeddings, "class_embedding"))

    @property
    def config(self):
        return self.model.config

    @property
    def pad_token_id(self) -> int:
        for cfg in (self.config, getattr(self.config, "text_config", None)):
            pad = getattr(cfg, "pad_token_id", None)
            if pad is not None:
                return int(pad)
        return 0

    def select_strategy(self, value: str | None = None) -> str:
        return value if value is not None else self.config.vision_feature_select_strategy

    def feature_layer(self, value: int | list[int] | None = None) -> int:
        """Index ℓ_f of the CLIP layer whose *output* is the feature (MLLM.md §1.1 step 1): ``Lv + v`` for v < 0,
        ``v - 1`` for v > 0; for a list of feature layers, its last element."""
        v = self.config.vision_feature_layer if value is None else value
        if isinstance(v, (list, tuple)):
            v = v[-1]
        depth = len(self.vision_layers)
        if v == 0 or not -depth <= v <= depth:
            raise ValueError(f"vision_feature_layer={v} does not name a layer output of a {depth}-layer vision tower")
        return depth + v if v < 0 else v - 1

    def crops_per_image(self, image_sizes) -> list[int]:
        """Crops (base + tiles) of each LlavaNext image, computed as HF does from ``image_sizes [n, 2]``."""
        helper = getattr(sys.modules[type(self.inner).__module__], "image_size_to_num_patches")
        return [helper(image_size=size, grid_pinpoints=self.config.image_grid_pinpoints,
                       patch_size=self.config.vision_config.image_size) for size in image_sizes]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def supports_mm_encoder_outputs(self) -> bool:
        """Whether this transformers version lets ``forward`` take pre-encoded images (5.18 and later)."""
        return "mm_encoder_outputs" in inspect.signature(type(self.model).forward).parameters


_MISSING = object()


class _Wrapper:
    """An instance-attribute replacement of a bound method: ``fn(handle, original, *args, **kwargs)``. It carries
    the original's metadata (``functools.update_wrapper``), so ``inspect.signature`` sees the original parameters,
    which transformers uses to route kwargs."""

    def __init__(self, handle: "LlavaHandle", original: Callable, fn: Callable):
        self.handle = handle
        self.original = original
        self.fn = fn
        self.signature = inspect.signature(original)
        functools.update_wrapper(self, original)

    def __call__(self, *args, **kwargs):
        return self.fn(self.handle, self.original, self.signature, args, kwargs)


class LlavaHandle:
    """What one ``visual_tokens`` patch changed on a LLaVA model; :meth:`remove` undoes all of it.

    Subclasses (one per method) add their state and override :meth:`call_scope`, which the ``forward`` and
    ``generate`` wrappers run the original inside.
    """

    def __init__(self, parts: LlavaParts, config):
        self.parts = parts
        self.config = config
        self._hooks: list = []
        self._wrapped: list[tuple[object, str, _Wrapper, Any]] = []
        self._attn_saved: dict | None = None

    # --- changes that remove() undoes ---------------------------------------------------------------------------
    def add_hook(self, removable) -> None:
        self._hooks.append(removable)

    def pre_hook(self, module: nn.Module, hook: Callable) -> None:
        """``hook(module, args, kwargs)`` before ``module`` runs (``with_kwargs=True``)."""
        self.add_hook(module.register_forward_pre_hook(hook, with_kwargs=True))

    def forward_hook(self, module: nn.Module, hook: Callable) -> None:
        """``hook(module, args, kwargs, output)`` after ``module`` runs (``with_kwargs=True``)."""
        self.add_hook(module.register_forward_hook(hook, with_kwargs=True))

    def wrap(self, owner: object, name: str, fn: Callable) -> _Wrapper:
        """Shadow ``owner.name`` by an instance attribute calling ``fn(handle, original, signature, args, kwargs)``.
        An instance attribute already there (e.g. accelerate's device hooks) is wrapped and put back by remove()."""
        previous = owner.__dict__.get(name, _MISSING)
        if isinstance(previous, _Wrapper):
            raise RuntimeError(f"{type(owner).__name__}.{name} is already wrapped by visionfx; unpatch first")
        wrapper = _Wrapper(self, getattr(owner, name), fn)
        owner.__dict__[name] = wrapper
        self._wrapped.append((owner, name, wrapper, previous))
        return wrapper

    def set_attn_implementation(self, implementation: str | dict) -> None:
        """Switch attention implementations (``model.set_attn_implementation``); :meth:`remove` sets the previous
        values back."""
        cfg = self.parts.config
        if self._attn_saved is None:
            saved = {"": cfg._attn_implementation}
            for key in getattr(cfg, "sub_configs", {}) or {}:
                sub = getattr(cfg, key, None)
                if sub is not None:
                    saved[key] = sub._attn_implementation
            self._attn_saved = saved
        self.parts.model.set_attn_implementation(implementation)

    def remove(self) -> None:
        """Remove hooks, delete the wrappers (class methods visible again) and restore attention implementations."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for owner, name, wrapper, previous in reversed(self._wrapped):
            if owner.__dict__.get(name) is wrapper:
                if previous is _MISSING:
                    del owner.__dict__[name]
                else:
                    owner.__dict__[name] = previous
        self._wrapped.clear()
        if self._attn_saved is not None:
            self.parts.model.set_attn_implementation(self._attn_saved)
            self._attn_saved = None

    def watch_inner(self, fn: Callable[[dict[str, Any]], None]) -> None:
        """Call ``fn(kwargs)`` before every forward of the inner ``LlavaModel`` (the text model's inputs are known
        there: ``input_ids``, ``attention_mask``, ``past_key_values``, ...), with every argument as a keyword."""
        signature = inspect.signature(self.parts.inner.forward)

        def hook(module, args, kwargs):
            fn(call_kwargs(signature, args, kwargs))
            return None

        self.pre_hook(self.parts.inner, hook)

    # --- entry points ------------------------------------------------------------------------------------------
    def finish(self, output, entry: str):
        """Post-process what the original ``entry`` returned (inside :meth:`call_scope`); identity by default."""
        return output

    @contextlib.contextmanager
    def call_scope(self, kwargs: dict[str, Any], entry: str) -> Iterator[dict[str, Any]]:
        """Yield the kwargs the original ``entry`` (``"forward"`` or ``"generate"``) runs with; the default changes
        nothing. Runs around the whole original call, so state set here lives exactly as long as the call."""
        yield kwargs

    def wrap_entry_points(self) -> None:
        """Wrap the top-level ``forward`` and ``generate`` so that every call goes through :meth:`call_scope`."""
        self.wrap(self.parts.model, "forward", _forward_entry)
        self.wrap(self.parts.model, "generate", _generate_entry)


def _forward_entry(handle: LlavaHandle, original, signature, args, kwargs):
    with handle.call_scope(call_kwargs(signature, args, kwargs), "forward") as new:
        return handle.finish(original(**new), "forward")


def _generate_entry(handle: LlavaHandle, original, signature, args, kwargs):
    kw = call_kwargs(signature, args, kwargs)
    if kw.get("input_ids") is None and torch.is_tensor(kw.get("inputs")) and not kw["inputs"].is_floating_point():
        kw["input_ids"] = kw.pop("inputs")
    prompt = kw.get("input_ids")
    with handle.call_scope(kw, "generate") as new:
        shrunk = new.get("input_ids")
        out = handle.finish(original(**new), "generate")
    if prompt is None or shrunk is prompt:
        return out
    # The caller's prompt (as given) followed by the new tokens, so out[:, input_ids.shape[1]:] keeps working.
    seq = out if torch.is_tensor(out) else out.sequences
    seq = torch.cat([prompt.to(seq.device), seq[:, shrunk.shape[1]:]], dim=1)
    if torch.is_tensor(out):
        return seq
    out.sequences = seq
    return out


def get_handle(model: nn.Module) -> LlavaHandle:
    """The handle of the ``visual_tokens`` patch on ``model`` (kept indices, ``prepare_inputs``, ...)."""
    from visionfx.patching import patch_state

    state = patch_state(model)
    for rec in (state or {}).get("records", ()):
        if rec.get("site") == "visual_tokens":
            return rec["handle"]
    raise RuntimeError("this model carries no visionfx visual_tokens patch")


class LlavaAdapter(Adapter):
    """Site ``visual_tokens`` for transformers LLaVA and LLaVA-NeXT; the method's handle does the rest."""

    name = "llava"

    def matches(self, model: nn.Module) -> bool:
        return _family(model) is not None and hasattr(model, "model")

    def apply(self, model: nn.Module, spec, config) -> dict[str, Any]:
        if spec.site != "visual_tokens":
            return super().apply(model, spec, config)
        if spec.handle is None:
            raise TypeError(f"method {spec.name!r} declares no handle class for LLaVA models")
        handle = spec.handle(LlavaParts.of(model), config)
        try:
            handle.install()
        except BaseException:
            handle.remove()
            raise
        return {"site": "visual_tokens", "paths": [], "handle": handle}

    def remove(self, model: nn.Module, record: dict[str, Any]) -> None:
        if record["site"] != "visual_tokens":
            return super().remove(model, record)
        record["handle"].remove()


ADAPTER = AdapterSpec(
    name="llava",
    family="transformers LlavaForConditionalGeneration / LlavaNextForConditionalGeneration",
    sites=("visual_tokens",),
    adapter=LlavaAdapter(),
)
