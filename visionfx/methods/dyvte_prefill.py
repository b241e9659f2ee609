"""What a DyVTE prefill carries from layer to layer (:mod:`visionfx.methods.dyvte` runs it): the prefill's
decisions, kept for its decoding steps; the current forward's per-layer scratch; a router decision on its way to the
host and the restart it can cause; and the small adapters that route module hooks and a decoder layer's ``forward``
to the handle."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from visionfx.methods.dyvte_router import TextSpan
from visionfx.patches.llava import PromptState, true_first

if TYPE_CHECKING:
    from visionfx.methods.dyvte import DyVTEHandle

__all__ = ["PrefillState", "ForwardStep", "RouterDecision", "Restart", "LayerPreHook", "AttentionPreHook",
           "RouterHook", "restartable_forward", "check_not_compiling", "keep_indices"]


@dataclass
class PrefillState:
    """What the last prefill decided (kept for its decoding steps)."""

    state: PromptState
    exits: torch.Tensor  # [B] long
    keep: torch.Tensor  # [B, M] gather indices
    slot_valid: torch.Tensor | None  # [B, M] bool, None when every slot is real
    routed: bool
    exit_list: list = field(default_factory=list)  # host copies, so layers need no device sync to decide
    has_list: list = field(default_factory=list)
    compact_from: int | None = None
    span: TextSpan | None = None  # routed prefills: the routers' text span, and the samples that can exit
    routable: list = field(default_factory=list)
    router_step: Any = None  # routed prefills: the router op's function (kernels/dyvte_router), chosen once
    pending: RouterDecision | None = None  # routed prefills: the last router decision, not yet read
    host_logits: Any = None  # routed prefills on CUDA: pinned [L, B, 2] fp32, where each layer's logits are copied


@dataclass
class ForwardStep:
    """The current forward (prefill or one decoding step): its total length and mask format, and what its layers
    have built so far."""

    prefill: bool
    total: int
    float_dtype: Any
    gathered: bool = False
    cache: dict = field(default_factory=dict)
    inputs: Any = None  # routed prefills: (index, args, kwargs) the current layer was called with, for a restart


@dataclass
class RouterDecision:
    """A routed layer's logits on their way to the host: ``logits`` is a pinned host copy that ``ready`` (recorded
    after the copy) completes on CUDA, the op's own output elsewhere; ``samples`` are those that may exit."""

    index: int
    logits: torch.Tensor
    ready: Any
    samples: list

    def read(self) -> list:
        """The logits as lists; on CUDA this waits for this router step only, not for the work queued after it."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.logits.tolist()


class Restart(Exception):
    """Raised before a layer's attention when the previous layer's router decision, read there, changes what the
    layer must run on; the layer's forward wrapper runs it again from its inputs."""


class LayerPreHook:
    def __init__(self, handle: "DyVTEHandle", index: int):
        self.handle, self.index = handle, index

    def __call__(self, module, args, kwargs):
        return self.handle._before_layer(self.index, args, kwargs)


class AttentionPreHook:
    def __init__(self, handle: "DyVTEHandle", index: int):
        self.handle, self.index = handle, index

    def __call__(self, module, args, kwargs):
        self.handle._before_attention(self.index)
        return None


def restartable_forward(handle: "DyVTEHandle", original, signature, args, kwargs):
    """A decoder layer's ``forward``: on :class:`Restart` it runs again on its inputs as the layer pre-hook now
    shapes them (nothing of the first attempt has reached the KV cache: the restart comes before the attention)."""
    try:
        return original(*args, **kwargs)
    except Restart:
        index, args, kwargs = handle._step.inputs
        new = handle._before_layer(index, args, kwargs)
        if new is not None:
            args, kwargs = new
        return original(*args, **kwargs)


class RouterHook:
    def __init__(self, handle: "DyVTEHandle", index: int):
        self.handle, self.index = handle, index

    def __call__(self, module, args, kwargs, output):
        self.handle._after_layer(self.index, output)
        return None


COMPILE_MSG = "DyVTE makes data-dependent decisions in hooks and does not support torch.compile"


def check_not_compiling(*modules: nn.Module):
    if torch.compiler.is_compiling():
        raise RuntimeError(COMPILE_MSG)
    for m in modules:
        if getattr(m, "_compiled_call_impl", None) is not None or hasattr(m, "_orig_mod"):
            raise RuntimeError(COMPILE_MSG + f" ({type(m).__name__} is compiled)")


def keep_indices(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Non-image positions of each row of ``image [B, L]``, right-aligned in ``[B, M]`` (M = the longest); the slots
    before a shorter row's positions point at its image positions and are marked invalid."""
    M = int((~image).sum(1).max())
    keep = true_first(image)[:, image.shape[1] - M:]
    valid = (~image).gather(1, keep)
    return keep, (None if bool(valid.all()) else valid)
