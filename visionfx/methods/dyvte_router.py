"""DyVTE's router and its input (MLLM.md §2.2-2.3): the two-layer router, the text span it averages, its features
and the exit rule. Re-exported by :mod:`visionfx.methods.dyvte`; :mod:`visionfx.methods.dyvte_train` trains it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from visionfx.kernels.dyvte_router.reference import span_features_reference
from visionfx.patches.llava_prompt import true_first

__all__ = ["Router", "router_features", "TextSpan", "span_mask", "text_span", "span_features", "exit_decision"]


class Router(nn.Module):
    """``[..., 2D] -> [..., 2]`` logits (index 0 keep, 1 exit): W2·GELU(W1·x), no biases, exact-erf GELU."""

    def __init__(self, dim: int, hidden: int = 2048, device=None, dtype=None):
        super().__init__()
        self.w1 = nn.Linear(2 * dim, hidden, bias=False, device=device, dtype=dtype)
        self.act = nn.GELU()
        self.w2 = nn.Linear(hidden, 2, bias=False, device=device, dtype=dtype)
        nn.init.xavier_uniform_(self.w1.weight)
        nn.init.xavier_uniform_(self.w2.weight)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(feat.to(self.w1.weight.dtype))))


def router_features(hidden: torch.Tensor, image: torch.Tensor, valid: torch.Tensor,
                    end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Router input of each sample (§2.2).

    Args:
        hidden: ``[B, L, D]`` a decoder layer's output.
        image: ``[B, L]`` bool image positions; valid: ``[B, L]`` bool non-padding positions.
        end: ``[B]`` long, the final prompt position of each sample.

    Returns:
        ``(feat [B, 2D] detached in hidden's dtype, defined [B] bool)``: ``feat = concat(mean of hidden over valid
        positions strictly between the last image token and end, hidden[end])``; ``defined`` is False where that span
        is empty (the mean is then 0).
    """
    span = text_span(image, valid, end)
    return span_features(hidden, span), span.defined


@dataclass
class TextSpan:
    """The text positions a router averages (:func:`text_span`), kept per prefill: they do not change by layer.

    ``index`` holds each sample's span positions (ascending, padded to the longest span ``S`` with positions of
    weight 0) followed by its final prompt position, so a layer's router input is one gather of ``S + 1`` rows
    instead of a pass over the whole sequence."""

    index: torch.Tensor  # [B, S + 1] long
    weights: torch.Tensor  # [B, S, 1] fp32 0/1
    count: torch.Tensor  # [B, 1] fp32, at least 1
    defined: torch.Tensor  # [B] bool: the span is not empty

    @classmethod
    def from_mask(cls, span: torch.Tensor, count: torch.Tensor, end: torch.Tensor, width: int) -> "TextSpan":
        """From :func:`span_mask`'s ``(span, count)``; ``width`` ≥ the largest count (known on the host)."""
        order = true_first(span)[:, :width]
        return cls(index=torch.cat([order, end.view(-1, 1)], dim=1), weights=span.gather(1, order)[..., None].float(),
                   count=count.clamp(min=1)[:, None].float(), defined=count > 0)


def span_mask(image: torch.Tensor, valid: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(span [B, L] bool, count [B] long)``: the valid positions strictly between each sample's last image token and
    ``end``."""
    B, L = image.shape
    pos = torch.arange(L, device=image.device).expand(B, L)
    last_img = torch.where(image, pos, torch.full_like(pos, -1)).amax(1, keepdim=True)
    span = (pos > last_img) & (pos < end[:, None]) & valid
    return span, span.sum(1)


def text_span(image: torch.Tensor, valid: torch.Tensor, end: torch.Tensor) -> TextSpan:
    """The valid positions strictly between each sample's last image token and ``end`` (see :func:`router_features`).
    Reads the longest span's length on the host (one device sync)."""
    span, count = span_mask(image, valid, end)
    return TextSpan.from_mask(span, count, end, int(count.max()))


def span_features(hidden: torch.Tensor, span: TextSpan) -> torch.Tensor:
    """:func:`router_features`' ``feat`` from a precomputed :class:`TextSpan` (the mean accumulated in fp32)."""
    return span_features_reference(hidden, span.index, span.weights, span.count)


def exit_decision(logits, threshold: float = 0.5) -> list[bool]:
    """Router logits (a ``[B, 2]`` tensor or its ``tolist()``) -> one bool per sample: softmax P(exit) > threshold,
    i.e. ``logit_exit - logit_keep > log(t / (1 - t))`` strictly, the difference taken in float64 on the host (exact
    in sign; 0 at t = 0.5, the official argmax). The caller reads the logits on the host anyway: the next layer's
    shapes depend on the decision."""
    rows = logits.tolist() if isinstance(logits, torch.Tensor) else logits
    margin = 0.0 if threshold == 0.5 else math.log(threshold) - math.log1p(-threshold)
    return [float(keep_exit[1]) - float(keep_exit[0]) > margin for keep_exit in rows]
