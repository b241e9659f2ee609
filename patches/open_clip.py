"""open_clip vision towers: ``open_clip.transformer.VisionTransformer`` and models holding one at ``.visual``.

METHODS.md §1.4. The attention sites are ``visual.transformer.resblocks[i].attn``:

* ``nn.MultiheadAttention`` (``ResidualAttentionBlock``, released open_clip 3.x): ``in_proj_weight [3C, C]`` and
  ``in_proj_bias`` act as timm's ``qkv`` (rows ``[q; k; v]``, head-major), ``out_proj`` as ``proj``, the MHA dropout p
  as ``attn_drop``. The wrapper keeps MHA's call signature and ``batch_first`` (tokens arrive ``[N, B, C]`` when it
  is False) and returns ``(output, None)``: no attention weights exist to return, whatever ``need_weights`` says.
* open_clip's own ``Attention`` (``CustomResidualAttentionBlock``, built when qk-norm, head scaling or an inner norm is
  asked for): ``ln_q``/``ln_k`` act as q_norm/k_norm, ``head_scale`` multiplies each head's mixer output before the
  heads are merged, ``ln_inner`` acts as timm's ``norm``, ``out_proj`` and ``out_drop`` as ``proj`` and ``proj_drop``.
  Scaled-cosine blocks (``logit_scale``) are refused: the [visionfx] rule of §1.4 needs a learned per-head scale on
  L2-normalised q and k inside every mixer, which the mixer interface (one fixed ``scale`` per layer) cannot carry.

The grid is ``visual.grid_size`` and there is one prefix token (the class embedding, always present). The text tower
(causal mask) is never patched, nor are attention poolers (cross-attention). Towers built on timm (``TimmModel``)
hold a timm model at ``visual.trunk``: patch that with the ``timm_vit`` adapter.

Decisions where the docs are silent: cross-attention (``key``/``value`` other than ``query``), a
``key_padding_mask``, an ``attn_mask`` and ``is_causal=True`` raise ``ValueError``; active ``patch_dropout`` in
training raises ``RuntimeError`` when the tower runs (a pre-hook on the ``patch_dropout`` module, so
``forward_intermediates`` is covered too). The norm site lists ``ln_1``/``ln_2`` of each block (roles ``norm1``,
``norm2``) and ``ln_post`` (``final``) only where ``ln_post`` normalises the token sequence (no attention pooler, no
``final_ln_after_pool``); ``ln_pre`` stays a LayerNorm, as timm's ``norm_pre`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from visionfx.methods.base import HostInfo, TokenLayout, check_no_mask
from visionfx.patches.base import Adapter, PatchedAttention
from visionfx.registry import AdapterSpec

__all__ = ["OpenClipPatchedAttention", "OpenClipCustomPatchedAttention", "OpenClipAdapter"]


def _open_clip_transformer():
    try:
        from open_clip import transformer
    except ImportError:
        return None
    return transformer


def _split_heads(qkv: torch.Tensor, num_heads: int, head_dim: int):
    """``[B, N, 3C]`` with columns ``[q | k | v]``, each head-major -> ``q, k, v [B, h, N, d]``."""
    B, N, _ = qkv.shape
    return qkv.reshape(B, N, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)


class OpenClipPatchedAttention(PatchedAttention):
    """``nn.MultiheadAttention`` (self-attention only) with a visionfx token mixer. Keeps ``in_proj_weight``,
    ``in_proj_bias`` and ``out_proj`` under their names, so ``state_dict`` keys are unchanged."""

    host_children = ("in_proj_weight", "in_proj_bias", "out_proj")

    def __init__(self, host: nn.Module, mixer, layout: TokenLayout):
        super().__init__(host, mixer, layout)
        self.batch_first = bool(host.batch_first)
        self.embed_dim = int(host.embed_dim)
        self.num_heads = mixer.num_heads
        self.head_dim = mixer.head_dim
        self.dropout = float(host.dropout)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        """MHA's signature. ``query`` is ``[B, N, C]`` (``batch_first``), ``[N, B, C]`` otherwise, or ``[N, C]``
        unbatched; ``key`` and ``value`` must be ``query`` itself. Returns ``(output like query, None)``."""
        method = self.mixer.method
        if key is not query or value is not query:
            raise ValueError(
                f"{method}: the patched open_clip attention is self-attention only (key and value must be the query "
                "tensor); cross-attention layers are not patched by visionfx."
            )
        if key_padding_mask is not None:
            raise ValueError(
                f"{method}: a key_padding_mask was given, but this token mixer has no masked form. Call it without "
                "key_padding_mask, or unpatch the model (visionfx.unpatch) to use masks."
            )
        check_no_mask(method, attn_mask, is_causal)
        if query.dim() == 2:
            return self.mix(query.unsqueeze(0)).squeeze(0), None
        if self.batch_first:
            return self.mix(query), None
        return self.mix(query.transpose(0, 1)).transpose(0, 1), None

    def _qkv(self, x):
        return _split_heads(F.linear(x, self.in_proj_weight, self.in_proj_bias), self.num_heads, self.head_dim)

    def _out(self, o, x):
        return self.out_proj(o)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


class OpenClipCustomPatchedAttention(PatchedAttention):
    """open_clip's own ``Attention`` (qk-norm / head scaling / inner norm, no scaled-cosine) with a visionfx token
    mixer; keeps every host child under its name. Signature as the host: ``forward(x, attn_mask=None)``, batch
    first."""

    host_children = (
        "in_proj_weight", "in_proj_bias", "ln_q", "ln_k", "attn_drop", "head_scale", "ln_inner", "out_proj", "out_drop"
    )

    def __init__(self, host: nn.Module, mixer, layout: TokenLayout):
        super().__init__(host, mixer, layout)
        self.num_heads = mixer.num_heads
        self.head_dim = mixer.head_dim
        # decided once, so forward has no data-dependent branch
        self.has_head_scale = self._parameters.get("head_scale") is not None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, N, C]`` -> ``[B, N, C]``."""
        check_no_mask(self.mixer.method, attn_mask, False)
        return self.mix(x)

    def _qkv(self, x):
        q, k, v = _split_heads(F.linear(x, self.in_proj_weight, self.in_proj_bias), self.num_heads, self.head_dim)
        return self.ln_q(q), self.ln_k(k), v

    def _norm(self, o):
        if self.has_head_scale:
            B, N, _ = o.shape
            o = (o.reshape(B, N, self.num_heads, self.head_dim) * self.head_scale.reshape(self.num_heads, 1)).reshape(
                B, N, -1
            )
        return self.ln_inner(o)

    def _out(self, o, x):
        return self.out_drop(self.out_proj(o))


class OpenClipAdapter(Adapter):
    name = "open_clip"

    @staticmethod
    def _tower(model: nn.Module) -> tuple[str, nn.Module]:
        """``(path prefix, vision tower)`` of ``model``."""
        oct = _open_clip_transformer()
        if oct is not None:
            if isinstance(model, oct.VisionTransformer):
                return "", model
            visual = getattr(model, "visual", None)
            if isinstance(visual, oct.VisionTransformer):
                return "visual.", visual
        raise TypeError(
            f"the open_clip adapter needs an open_clip.transformer.VisionTransformer or a model holding one at "
            f".visual (CLIP, CustomTextCLIP); got {type(model).__name__}"
        )

    def matches(self, model: nn.Module) -> bool:
        try:
            self._tower(model)
        except TypeError:
            return False
        return True

    def attention_sites(self, model):
        prefix, tower = self._tower(model)
        oct = _open_clip_transformer()
        sites = []
        for i, block in enumerate(tower.transformer.resblocks):
            attn = getattr(block, "attn", None)
            path = f"{prefix}transformer.resblocks.{i}.attn"
            if type(attn) is nn.MultiheadAttention:
                _check_mha(attn, path)
            elif type(attn) is oct.Attention:
                if attn.logit_scale is not None:
                    raise TypeError(
                        f"{path}: open_clip {type(block).__name__} with scaled-cosine attention (scaled_cosine_attn="
                        "True, Attention.logit_scale) is not supported: it needs a learned per-head scale on "
                        "L2-normalised q and k inside every token mixer (METHODS.md §1.4). Supported open_clip "
                        "blocks: ResidualAttentionBlock (nn.MultiheadAttention) and CustomResidualAttentionBlock "
                        "without scaled-cosine attention."
                    )
            else:
                raise TypeError(
                    f"{path}: unsupported open_clip block {type(block).__name__} with attention "
                    f"{type(attn).__name__}; supported: nn.MultiheadAttention and open_clip's Attention"
                )
            sites.append((path, attn))
        return sites

    def layout(self, model) -> TokenLayout:
        _, tower = self._tower(model)
        return TokenLayout(tuple(tower.grid_size), 1)

    def layout_target(self, model):
        # the patch-dropout module (Identity when disabled): the tower's forward and forward_intermediates both call
        # it, and its own training flag is the one that decides whether tokens are dropped
        _, tower = self._tower(model)
        return tower.patch_dropout, {}

    def update_layout(self, module, args, kwargs, layout, context):
        if module.training and getattr(module, "prob", 0.0) > 0:
            raise RuntimeError(
                "open_clip patch_dropout is active in training: dropped tokens leave no grid for the patched token "
                "mixer. Build the tower with patch_dropout=0. to train it patched (eval mode is unaffected)."
            )

    def host_info(self, model, host, layout, index, count) -> HostInfo:
        if isinstance(host, nn.MultiheadAttention):
            dim, heads = int(host.embed_dim), int(host.num_heads)
            head_dim, scale, attn_drop = dim // heads, (dim // heads) ** -0.5, float(host.dropout)
        else:
            dim, heads = int(host.in_proj_weight.shape[1]), int(host.num_heads)
            head_dim, scale, attn_drop = int(host.head_dim), float(host.scale), float(host.attn_drop.p)
        return HostInfo(
            dim=dim,
            attn_dim=heads * head_dim,
            num_heads=heads,
            head_dim=head_dim,
            scale=scale,
            grid=layout.grid,
            num_prefix_tokens=layout.num_prefix_tokens,
            attn_drop=attn_drop,
            layer_index=index,
            num_layers=count,
            qkv_bias=host.in_proj_bias is not None,
        )

    def wrap(self, host, mixer, layout):
        cls = OpenClipPatchedAttention if isinstance(host, nn.MultiheadAttention) else OpenClipCustomPatchedAttention
        return cls(host, mixer, layout)  # the adapter base gives it the host's training mode

    def norm_sites(self, model, config=None):
        prefix, tower = self._tower(model)
        sites = []
        for i, block in enumerate(tower.transformer.resblocks):
            for attr, role in (("ln_1", "norm1"), ("ln_2", "norm2")):
                norm = getattr(block, attr, None)
                if isinstance(norm, nn.LayerNorm):
                    sites.append((f"{prefix}transformer.resblocks.{i}.{attr}", norm, role))
        on_tokens = getattr(tower, "attn_pool", None) is None and not getattr(tower, "final_ln_after_pool", False)
        if on_tokens and isinstance(getattr(tower, "ln_post", None), nn.LayerNorm):
            sites.append((f"{prefix}ln_post", tower.ln_post, "final"))
        return sites


def _check_mha(attn: nn.MultiheadAttention, path: str) -> None:
    """Refuse MHA variants whose projections are not one fused ``[3C, C]`` qkv."""
    problems = []
    if not attn._qkv_same_embed_dim:
        problems.append("kdim/vdim differ from embed_dim (separate q/k/v projections)")
    if attn.bias_k is not None:
        problems.append("add_bias_kv=True")
    if attn.add_zero_attn:
        problems.append("add_zero_attn=True")
    if problems:
        raise TypeError(f"{path}: nn.MultiheadAttention with {', '.join(problems)} is not supported")


ADAPTER = AdapterSpec(
    name="open_clip",
    family="open_clip VisionTransformer vision towers, alone or at .visual of CLIP / CustomTextCLIP (text untouched)",
    sites=("attention", "norm"),
    adapter=OpenClipAdapter(),
)
