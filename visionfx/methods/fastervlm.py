"""FasterVLM: keep the T visual tokens the CLIP [CLS] attends to most, before the LLM sees them.

Paper: Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM Inference
Faster" (arXiv 2412.01818); MLLM.md §1. Per image (per crop for LLaVA-NeXT): score s[j] = mean over heads of the
post-softmax attention of the CLS query over patch key j inside the CLIP layer ℓ_f whose output is the feature; keep
the top-T patches in raster order; the LLM sees only those T tokens, with contiguous positions. The alias
``vtc_cls`` (VTC-CLS, arXiv 2412.05819, §1.5) sums the CLS rows of several CLIP layers.

How it runs (patches/llava.py holds the bookkeeping):
- a forward pre-hook on each scoring CLIP layer recomputes only the CLS query row from the layer input (one extra
  ``k_proj``; never ``output_attentions``, so the tower keeps SDPA/FlashAttention);
- the wrapped ``get_image_features`` consumes those rows and keeps the chosen features;
- the wrapped ``forward``/``generate`` shrink each image's placeholder run to its kept count (re-padding on the left);
  ``generate`` returns the caller's original prompt followed by the new tokens. ``forward`` returns logits over the
  shrunk sequence.
- LLaVA-NeXT: HF's own ``pack_image_features`` packs "index features" (source id per patch, -1 for newlines), which
  says which packed positions survive: newlines always, tile patches if their crop kept them (§1.4). Counts depend on
  the data, so images are encoded once before shrinking and handed on as ``mm_encoder_outputs`` (transformers 5.18+),
  or kept for the call and returned again by the wrapped ``get_image_features`` (older versions).

Decisions the docs leave open:
- ``keep`` as an int is a count T (1 ≤ T ≤ N); as a float a kept fraction in (0, 1]; T = round(N · fraction).
- Scores are computed without gradient; ``score_dtype="float32"`` (default) does q·Kᵀ and softmax in fp32,
  ``"model"`` everything in the model dtype as the official code does.
- ``vtc_cls`` without ``score_layers`` scores with CLIP layers ``first_score_layer .. Lv-2`` (official default 16),
  the start clipped to ``Lv-2`` for shallow towers.
- A call whose ``vision_feature_layer`` differs from the one patched for raises; re-patch instead.

Deviation: HF LLaVA-NeXT always packs with ``spatial_unpad`` and newline tokens, while the official LLaVA-NeXT numbers
used the ``'spatial'`` merge (exactly 5·T tokens), so counts and scores on HF LLaVA-NeXT are not directly comparable
with the paper's NeXT table. ``generate`` keeps HF's return type (the official one returns a tuple).
"""

from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from visionfx.config import MethodConfig
from visionfx.patches.llava import (LlavaHandle, LlavaParts, call_kwargs, check_left_padding, shrink_placeholders,
                                    true_first)
from visionfx.registry import MethodSpec

__all__ = ["FasterVLMConfig", "VTCCLSConfig", "FasterVLMHandle", "cls_row_scores", "select_tokens"]

SCORE_DTYPES = ("float32", "model")


@dataclass(frozen=True)
class FasterVLMConfig(MethodConfig):
    """FasterVLM visual-token pruning.

    Attributes:
        keep: tokens kept per image (per crop for LLaVA-NeXT): an int count T, or a float fraction in (0, 1].
        reduction: fraction of tokens removed, in [0, 1) (0.75 keeps 144 of 576). Give ``keep`` or ``reduction``, not
            both; with neither, ``reduction=0.75``.
        score_layers: CLIP encoder layers (0-based) whose CLS rows are summed into the score; ``None`` is the
            feature layer ℓ_f only (FasterVLM); several layers is VTC-CLS ensembling.
        score_dtype: ``"float32"`` or ``"model"`` (the official fp16 behaviour; near-ties may then pick differently).
    """

    method = "fastervlm"
    keep: int | float | None = None
    reduction: float | None = None
    score_layers: tuple[int, ...] | None = None
    score_dtype: str = "float32"

    def __post_init__(self):
        super().__post_init__()
        name = type(self).method
        if self.layers is not None:
            raise ValueError(f"{name} prunes visual tokens and patches no layers; choose the scoring CLIP layers "
                             "with score_layers")
        if self.keep is not None and self.reduction is not None:
            raise ValueError(f"{name}: give keep or reduction, not both (keep={self.keep}, reduction={self.reduction})")
        if self.keep is not None:
            if isinstance(self.keep, bool) or not isinstance(self.keep, numbers.Real):
                raise ValueError(f"{name}: keep must be an int count or a float fraction, got {self.keep!r}")
            if isinstance(self.keep, numbers.Integral) and self.keep < 1:
                raise ValueError(f"{name}: keep={self.keep} must be at least 1 token")
            if not isinstance(self.keep, numbers.Integral) and not 0 < self.keep <= 1:
                raise ValueError(f"{name}: a float keep is the kept fraction, in (0, 1]; got {self.keep}")
        if self.reduction is not None:
            if isinstance(self.reduction, bool) or not isinstance(self.reduction, numbers.Real) \
                    or not 0 <= self.reduction < 1:
                raise ValueError(f"{name}: reduction must be in [0, 1), got {self.reduction!r}")
        if self.score_layers is not None:
            raw = (self.score_layers,) if isinstance(self.score_layers, numbers.Integral) else self.score_layers
            layers = tuple(int(i) for i in raw)
            if not layers or any(i < 0 for i in layers) or len(set(layers)) != len(layers):
                raise ValueError(f"{name}: score_layers must be distinct non-negative CLIP layer indices, got {raw!r}")
            object.__setattr__(self, "score_layers", tuple(sorted(layers)))
        if self.score_dtype not in SCORE_DTYPES:
            raise ValueError(f"{name}: score_dtype must be one of {SCORE_DTYPES}, got {self.score_dtype!r}")

    def kept_tokens(self, num_patches: int) -> int:
        """T for a tower with ``num_patches`` patch tokens per image."""
        if self.keep is not None and isinstance(self.keep, numbers.Integral):
            t = int(self.keep)
            if t > num_patches:
                raise ValueError(f"keep={t} exceeds the {num_patches} patch tokens of one image")
        elif self.keep is not None:
            t = round(num_patches * float(self.keep))
        else:
            t = round(num_patches * (1 - (0.75 if self.reduction is None else float(self.reduction))))
        if t < 1:
            raise ValueError(f"keep={self.keep}, reduction={self.reduction} keeps no token of {num_patches}")
        return t

    def resolve_score_layers(self, depth: int, feature_layer: int) -> tuple[int, ...]:
        """The CLIP layers to hook for a ``depth``-layer tower whose feature is the output of ``feature_layer``."""
        layers = self.score_layers if self.score_layers is not None else (feature_layer,)
        bad = [i for i in layers if i >= depth]
        if bad:
            raise ValueError(f"score_layers {bad} out of range: the vision tower has {depth} layers (0..{depth - 1})")
        return tuple(layers)


@dataclass(frozen=True)
class VTCCLSConfig(FasterVLMConfig):
    """VTC-CLS: FasterVLM scoring summed over CLIP layers ``first_score_layer .. Lv-2`` (``attentions[ℓ0:-1]``).

    Attributes:
        first_score_layer: ℓ0 when ``score_layers`` is not given (official default 16; clipped to Lv-2).
    """

    method = "vtc_cls"
    first_score_layer: int = 16

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.first_score_layer, bool) or not isinstance(self.first_score_layer, numbers.Integral) \
                or self.first_score_layer < 0:
            raise ValueError(f"vtc_cls: first_score_layer must be a non-negative int, got {self.first_score_layer!r}")

    def resolve_score_layers(self, depth: int, feature_layer: int) -> tuple[int, ...]:
        if self.score_layers is not None:
            return super().resolve_score_layers(depth, feature_layer)
        last = max(depth - 2, 0)
        return tuple(range(min(int(self.first_score_layer), last), last + 1))


def cls_row_scores(layer: torch.nn.Module, x: torch.Tensor, score_dtype: str = "float32") -> torch.Tensor:
    """The CLS query's attention over the patch keys inside a CLIP encoder layer, averaged over heads.

    Args:
        layer: a CLIP encoder layer (``layer_norm1``, ``self_attn.q_proj``/``k_proj``, pre-norm).
        x: ``[B, 1+N, Dv]`` the layer's input (CLS first).
        score_dtype: ``"float32"`` (q·Kᵀ and softmax in fp32) or ``"model"``.

    Returns:
        ``[B, N]``: ``mean_h softmax(q_cls · Kᵀ / sqrt(dv))[h, 1:]`` (rows do not sum to 1: CLS→CLS is dropped).
    """
    attn = layer.self_attn
    h = layer.layer_norm1(x)
    B, L, _ = h.shape
    heads = attn.num_heads
    d = getattr(attn, "head_dim", h.shape[-1] // heads)
    q = attn.q_proj(h[:, :1]).view(B, 1, heads, d).transpose(1, 2)  # [B, Hv, 1, dv]
    k = attn.k_proj(h).view(B, L, heads, d).transpose(1, 2)  # [B, Hv, 1+N, dv]
    if score_dtype == "float32":
        q, k = q.float(), k.float()
    a = torch.softmax((q @ k.transpose(-1, -2)) * getattr(attn, "scale", d**-0.5), dim=-1)  # [B, Hv, 1, 1+N]
    return a[:, :, 0, 1:].mean(1)


def select_tokens(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """``scores [B, N]`` -> indices ``[B, keep]`` of the top-``keep`` scores, sorted ascending (raster order)."""
    return scores.topk(keep, dim=-1).indices.sort(dim=-1).values


class ClsRowHook:
    """Forward pre-hook on a scoring CLIP layer: while the handle captures, append that layer's CLS row ``[B, N]``."""

    def __init__(self, handle: "FasterVLMHandle"):
        self.handle = handle

    def __call__(self, module, args, kwargs):
        capture = self.handle._capture
        if capture is not None:
            x = args[0] if args else kwargs["hidden_states"]
            with torch.no_grad():
                capture.append(cls_row_scores(module, x, self.handle.config.score_dtype))
        return None


def _features_of(out) -> list[torch.Tensor]:
    """Per-image features of a ``get_image_features`` result (5.x ``pooler_output``, 4.x list, or a stacked tensor)."""
    feats = getattr(out, "pooler_output", out)
    if torch.is_tensor(feats):
        return list(feats.unbind(0)) if feats.dim() == 3 else [feats]
    if isinstance(feats, (list, tuple)) and all(torch.is_tensor(f) for f in feats):
        return list(feats)
    raise TypeError(f"unexpected get_image_features output {type(out).__name__}")


def _with_features(out, feats: list[torch.Tensor]):
    """``out`` of the same type, holding ``feats`` instead of its features."""
    if hasattr(out, "pooler_output"):
        out.pooler_output = type(out.pooler_output)(feats) if isinstance(out.pooler_output, tuple) else list(feats)
        return out
    if torch.is_tensor(out):
        return torch.stack(feats) if out.dim() == 3 else feats[0]
    return type(out)(feats)


def _image_features_entry(handle: "FasterVLMHandle", original, signature, args, kwargs):
    return handle.image_features(original, call_kwargs(signature, args, kwargs))


class FasterVLMHandle(LlavaHandle):
    """A FasterVLM patch on one LLaVA model.

    Attributes (from the last image encoding):
        keep: T, tokens kept per image (per crop).
        feature_layer: ℓ_f; score_layers: the hooked CLIP layers.
        scores: ``[C, N]`` fp32 (or model dtype) scores per crop (C crops in vision-batch order).
        kept_indices: ``[C, T]`` kept patch indices per crop, sorted ascending.
        full_counts / kept_counts: placeholders per image before / after pruning.
        kept_positions: LLaVA-NeXT only, per image a bool mask over HF's packed positions (newlines included).
    """

    def __init__(self, parts: LlavaParts, config: FasterVLMConfig):
        super().__init__(parts, config)
        name = type(config).method
        if not parts.has_cls:
            raise TypeError(f"{name} ranks tokens by the CLS attention, but the vision tower "
                            f"{type(parts.vision_tower).__name__} has no CLS token")
        if parts.select_strategy() != "default":
            raise NotImplementedError(f"{name} is defined for vision_feature_select_strategy='default' (CLS dropped "
                                      f"from the features), not {parts.select_strategy()!r}")
        for layer in parts.vision_layers:
            if not all(hasattr(layer, a) for a in ("layer_norm1", "self_attn")) or not hasattr(layer.self_attn, "k_proj"):
                raise TypeError(f"{name} needs CLIP-style vision layers (layer_norm1, self_attn.q_proj/k_proj); got "
                                f"{type(layer).__name__}")
        self.keep = config.kept_tokens(parts.num_patches)
        self.feature_layer = parts.feature_layer()
        self.score_layers = config.resolve_score_layers(len(parts.vision_layers), self.feature_layer)
        self._capture: list | None = None
        self._stash: tuple | None = None
        self._last: tuple | None = None
        self.scores = self.kept_indices = self.full_counts = self.kept_counts = self.kept_positions = None

    def install(self) -> None:
        for i in self.score_layers:
            self.pre_hook(self.parts.vision_layers[i], ClsRowHook(self))
        self.wrap(self.parts.inner, "get_image_features", _image_features_entry)
        self.wrap_entry_points()

    # --- image features ----------------------------------------------------------------------------------------
    def image_features(self, original, kw: dict[str, Any]):
        """The wrapped ``get_image_features``: run the original while capturing CLS rows, keep top-T per crop."""
        pixel_values = kw.get("pixel_values")
        if self._stash is not None and pixel_values is self._stash[0]:
            return self._stash[1]
        strategy = self.parts.select_strategy(kw.get("vision_feature_select_strategy"))
        if strategy != "default":
            raise NotImplementedError(f"FasterVLM is not defined for vision_feature_select_strategy={strategy!r}")
        if self.parts.feature_layer(kw.get("vision_feature_layer")) != self.feature_layer:
            raise ValueError(f"the model was patched for vision_feature_layer={self.parts.config.vision_feature_layer};"
                             f" got {kw.get('vision_feature_layer')}: re-patch to score another layer")
        as_tuple = kw.get("return_dict") is False
        if as_tuple:
            kw = {**kw, "return_dict": True}
        self._capture = []
        try:
            out = original(**kw)
        finally:
            rows, self._capture = self._capture, None
        if len(rows) != len(self.score_layers):
            raise RuntimeError(f"the scoring hooks ran {len(rows)} times for {len(self.score_layers)} layers; "
                               "was the vision tower called more than once?")
        scores = torch.stack(rows).sum(0)  # [C, N]
        idx = select_tokens(scores, self.keep)  # [C, T]
        feats = _features_of(out)
        if self.parts.family == "llava":
            if len(feats) != scores.shape[0] or any(f.shape[0] != self.parts.num_patches for f in feats):
                raise RuntimeError(f"expected {scores.shape[0]} images of {self.parts.num_patches} features, got "
                                   f"{[tuple(f.shape) for f in feats]}")
            new = [f.index_select(0, i.to(f.device)) for f, i in zip(feats, idx)]
            full, kept, positions = [f.shape[0] for f in feats], [self.keep] * len(feats), None
        else:
            new, full, kept, positions = self._prune_packed(feats, idx, kw.get("image_sizes"), strategy)
        self.scores, self.kept_indices, self.kept_positions = scores, idx, positions
        self.full_counts, self.kept_counts = full, kept
        out = _with_features(out, new)
        self._last = (out, full, kept)
        return out.to_tuple() if as_tuple else out

    def _prune_packed(self, feats, idx, image_sizes, strategy):
        """LLaVA-NeXT (§1.4): pack source ids with HF's own packing; keep newlines and the kept patches."""
        parts, n = self.parts, self.parts.num_patches
        crops = parts.crops_per_image(image_sizes)
        total = sum(crops)
        if total != idx.shape[0]:
            raise RuntimeError(f"{idx.shape[0]} crops were scored but image_sizes implies {total}")
        device = feats[0].device
        source = torch.arange(total * n, device=device, dtype=torch.float32).view(total, n, 1)
        packed, _ = parts.inner.pack_image_features(
            list(torch.split(source, crops)), image_sizes, vision_feature_select_strategy=strategy,
            image_newline=torch.tensor([-1.0], device=device))
        keep = torch.zeros(total * n, dtype=torch.bool, device=device)
        keep[(idx.to(device) + torch.arange(total, device=device)[:, None] * n).flatten()] = True
        positions = []
        for f, p in zip(feats, packed):
            src = p[:, 0]
            if src.shape[0] != f.shape[0]:
                raise RuntimeError(f"index packing gave {src.shape[0]} positions for {f.shape[0]} features")
            positions.append((src < 0) | keep[src.clamp(min=0).long()])
        # the call's one device sync: how many positions each image keeps (unpadding drops some patches, so the
        # counts depend on which were chosen); the selection itself is then a gather of known size
        kept = torch.stack([sel.sum() for sel in positions]).tolist()
        new = [f.index_select(0, true_first(sel)[:k]) for f, sel, k in zip(feats, positions, kept)]
        return new, [int(f.shape[0]) for f in feats], kept, positions

    def _encode(self, kw: dict[str, Any]):
        """Run the wrapped ``get_image_features`` on a call's image inputs; returns its output."""
        names = ("pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy")
        args = {k: kw[k] for k in names if kw.get(k) is not None}
        if self.parts.family == "llava_next" and "image_sizes" not in args:
            raise ValueError("LLaVA-NeXT inputs need image_sizes")
        return self.parts.inner.get_image_features(**args)

    def _counts_of(self, image_out):
        if self._last is not None and image_out is self._last[0]:
            return self._last[1], self._last[2]
        return None

    # --- inputs --------------------------------------------------------------------------------------------------
    def _shrink(self, kw: dict[str, Any], full: list[int], kept: list[int]) -> dict[str, Any]:
        ids = kw["input_ids"]
        new_ids, mask, labels = shrink_placeholders(ids, kw.get("attention_mask"), self.parts.image_token_id, full,
                                                    kept, self.parts.pad_token_id, kw.get("labels"))
        if new_ids is ids:
            return kw
        for name in ("position_ids", "cache_position"):
            if kw.get(name) is not None:
                raise ValueError(f"do not pass {name} with images: FasterVLM shortens the prompt and positions are "
                                 "rebuilt from the attention mask")
        kw = {**kw, "input_ids": new_ids}
        if mask is not None or "attention_mask" in kw:
            kw["attention_mask"] = mask
        if labels is not None:
            kw["labels"] = labels
        return kw

    @contextlib.contextmanager
    def call_scope(self, kwargs: dict[str, Any], entry: str) -> Iterator[dict[str, Any]]:
        pixel_values = kwargs.get("pixel_values")
        mm = kwargs.get("mm_encoder_outputs") or {}
        image_out = mm.get("image") if isinstance(mm, dict) else None
        if pixel_values is None and image_out is None:
            yield kwargs
            return
        if kwargs.get("input_ids") is None:
            raise ValueError("FasterVLM shrinks the image placeholders of input_ids: pass input_ids, or build "
                             "inputs_embeds with visionfx.patches.llava.get_handle(model).prepare_inputs(batch, "
                             "as_embeds=True)")
        check_left_padding(kwargs.get("attention_mask"))
        saved = self._stash
        try:
            kw = dict(kwargs)
            counts = None
            if self.parts.family == "llava":
                n = pixel_values.shape[0] if pixel_values is not None else len(_features_of(image_out))
                counts = [self.parts.num_patches] * n, [self.keep] * n
            elif pixel_values is not None:
                out = self._encode(kw)
                counts = self.full_counts, self.kept_counts
                if self.parts.supports_mm_encoder_outputs():
                    kw.pop("pixel_values")
                    kw.pop("image_sizes", None)
                    kw["mm_encoder_outputs"] = {**mm, "image": out}
                else:
                    self._stash = (pixel_values, out)
            else:
                counts = self._counts_of(image_out)
            if counts is not None:
                kw = self._shrink(kw, *counts)
            yield kw
        finally:
            self._stash = saved

    def prepare_inputs(self, batch: dict[str, Any], as_embeds: bool = False) -> dict[str, Any]:
        """Encode and prune a batch's images and shrink its placeholder runs, for callers that drive the model
        themselves (§1.3c, §1.4).

        Args:
            batch: processor output: ``input_ids [B, L]`` (left padded), ``attention_mask``, ``pixel_values``,
                ``image_sizes`` (LLaVA-NeXT), optionally ``labels``.
            as_embeds: return ``inputs_embeds [B, L', D]`` with the kept features in place of the placeholders
                (for ``generate(inputs_embeds=...)``, whose output then holds only new tokens).

        Returns:
            A new dict: shrunk ``input_ids``/``attention_mask``/``labels`` with ``mm_encoder_outputs`` (transformers
            5.18+) or the original ``pixel_values``; or ``inputs_embeds``/``attention_mask`` when ``as_embeds``.
        """
        if batch.get("pixel_values") is None or batch.get("input_ids") is None:
            raise ValueError("prepare_inputs needs input_ids and pixel_values")
        check_left_padding(batch.get("attention_mask"))
        out = self._encode(batch)
        kw = self._shrink(dict(batch), self.full_counts, self.kept_counts)
        if as_embeds:
            ids = kw.pop("input_ids")
            embeds = self.parts.embed(ids)
            feats = torch.cat(_features_of(out)).to(embeds.device, embeds.dtype)
            where = (ids == self.parts.image_token_id).unsqueeze(-1).expand_as(embeds).to(embeds.device)
            kw["inputs_embeds"] = embeds.masked_scatter(where, feats)
            for name in ("pixel_values", "image_sizes", "mm_encoder_outputs"):
                kw.pop(name, None)
        elif self.parts.supports_mm_encoder_outputs():
            kw.pop("pixel_values")
            kw.pop("image_sizes", None)
            kw["mm_encoder_outputs"] = {"image": out}
        return kw


METHODS = [
    MethodSpec(
        name="fastervlm",
        site="visual_tokens",
        config_cls=FasterVLMConfig,
        module_cls=None,
        summary="keep the visual tokens the CLIP [CLS] attends to most, before the LLM",
        regime="training-free",
        paper="arXiv 2412.01818",
        handle=FasterVLMHandle,
    ),
    MethodSpec(
        name="vtc_cls",
        site="visual_tokens",
        config_cls=VTCCLSConfig,
        module_cls=None,
        summary="FasterVLM scoring summed over the CLS rows of several CLIP layers",
        regime="training-free",
        paper="arXiv 2412.05819",
        handle=FasterVLMHandle,
    ),
]
