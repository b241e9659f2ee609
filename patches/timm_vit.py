"""timm VisionTransformer family and DiT-style models built from timm ``Attention``.

Covers ViT (CLS token), DeiT, distilled DeiT (two prefix tokens), DeiT-III (LayerScale lives in the block and is
untouched), register tokens, ``class_token=False`` with global average pooling, ``dynamic_img_size=True``, and DiT
(grid from ``x_embedder``, no prefix tokens, attention called positionally with ``x`` only). Only modules whose type is
timm's plain ``Attention`` are patched (EVA, Swin and BEiT have their own classes and are out of scope).
"""

from __future__ import annotations

import torch
from torch import nn

from visionfx.methods.base import HostInfo, TokenLayout, check_no_mask
from visionfx.patches.base import Adapter, PatchedAttention
from visionfx.registry import AdapterSpec

__all__ = ["TimmPatchedAttention", "TimmViTAdapter"]


def _attention_classes() -> tuple[type, ...]:
    classes = []
    try:
        from timm.layers import Attention

        classes.append(Attention)
    except ImportError:  # timm < 1.0.16 keeps it in vision_transformer only
        pass
    try:
        from timm.models.vision_transformer import Attention as VitAttention

        classes.append(VitAttention)
    except ImportError:
        pass
    return tuple(dict.fromkeys(classes))


class TimmPatchedAttention(PatchedAttention):
    """timm ``Attention`` with a visionfx token mixer; keeps ``qkv``, ``q_norm``, ``k_norm``, ``attn_drop``,
    ``norm``, ``gate``, ``proj`` and ``proj_drop`` under their names. Signature as timm 1.0.26+:
    ``forward(x, attn_mask=None, is_causal=False)``."""

    host_children = ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop")

    def __init__(self, host: nn.Module, mixer, layout: TokenLayout):
        super().__init__(host, mixer, layout)
        self.num_heads = mixer.num_heads
        self.head_dim = mixer.head_dim
        self.attn_dim = mixer.num_heads * mixer.head_dim

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        check_no_mask(self.mixer.method, attn_mask, is_causal)
        return self.mix(x)

    def _qkv(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if "q_norm" in self._modules:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def _norm(self, o):
        return self.norm(o) if "norm" in self._modules else o

    def _out(self, o, x):
        if self._modules.get("gate") is not None:
            o = o * self.gate(x).sigmoid()
        return self.proj_drop(self.proj(o))


class TimmViTAdapter(Adapter):
    name = "timm_vit"

    @staticmethod
    def _grid_module(model: nn.Module):
        for attr in ("patch_embed", "x_embedder"):
            m = getattr(model, attr, None)
            if m is not None and hasattr(m, "grid_size"):
                return m
        return None

    def matches(self, model: nn.Module) -> bool:
        if self._grid_module(model) is None:
            return False
        classes = _attention_classes()
        return any(type(m) in classes for m in model.modules())

    def attention_sites(self, model):
        classes = _attention_classes()
        return [(n, m) for n, m in model.named_modules() if type(m) in classes]

    def layout(self, model) -> TokenLayout:
        grid = tuple(self._grid_module(model).grid_size)
        return TokenLayout(grid, int(getattr(model, "num_prefix_tokens", 0)))

    def layout_target(self, model):
        return self._grid_module(model), {
            "dynamic": bool(getattr(model, "dynamic_img_size", False)),
            "patch_drop": getattr(model, "patch_drop", None),
        }

    def update_layout(self, module, args, kwargs, layout, context):
        patch_drop = context.get("patch_drop")
        if module.training and patch_drop is not None and getattr(patch_drop, "prob", 0.0) > 0:
            raise RuntimeError(
                "patch dropout is active in training: dropped tokens leave no grid for the patched token mixer. "
                "Build the model with patch_drop_rate=0 to train it patched."
            )
        if context.get("dynamic"):
            x = args[0] if args else kwargs["x"]
            layout.grid = tuple(int(s) for s in module.dynamic_feat_size(tuple(x.shape[-2:])))

    def host_info(self, model, host, layout, index, count) -> HostInfo:
        num_heads = host.num_heads
        attn_dim = getattr(host, "attn_dim", host.qkv.out_features // 3)
        head_dim = getattr(host, "head_dim", attn_dim // num_heads)
        return HostInfo(
            dim=host.qkv.in_features,
            attn_dim=attn_dim,
            num_heads=num_heads,
            head_dim=head_dim,
            scale=float(host.scale),
            grid=layout.grid,
            num_prefix_tokens=layout.num_prefix_tokens,
            attn_drop=float(host.attn_drop.p),
            layer_index=index,
            num_layers=count,
            qkv_bias=host.qkv.bias is not None,
        )

    def wrap(self, host, mixer, layout):
        return TimmPatchedAttention(host, mixer, layout)

    def norm_sites(self, model, config=None):
        if not hasattr(model, "patch_embed"):
            raise TypeError("the norm site (PRepBN) is offered for timm ViTs only, not for DiT (METHODS.md §6.3)")
        sites = []
        blocks = [(n, m) for n, m in model.named_modules() if isinstance(getattr(m, "norm1", None), nn.LayerNorm)]
        for name, block in blocks:
            prefix = f"{name}." if name else ""
            for role in ("norm1", "norm2"):
                if isinstance(getattr(block, role, None), nn.LayerNorm):
                    sites.append((prefix + role, getattr(block, role), role))
        if isinstance(getattr(model, "norm", None), nn.LayerNorm):
            sites.append(("norm", model.norm, "final"))
        if getattr(config, "include_fc_norm", False) and isinstance(getattr(model, "fc_norm", None), nn.LayerNorm):
            sites.append(("fc_norm", model.fc_norm, "fc_norm"))
        return sites


ADAPTER = AdapterSpec(
    name="timm_vit",
    family="timm VisionTransformer (ViT, DeiT, distilled DeiT, DeiT-III, register tokens) and DiT built on timm Attention",
    sites=("attention", "norm"),
    adapter=TimmViTAdapter(),
)

