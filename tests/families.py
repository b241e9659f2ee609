"""Tiny models of every supported family, built from configs (no downloads), for the generated test matrix.

Each entry: name -> (builder, input shape, adapter name). Builders take no arguments and return an eval-mode model.
"""

from __future__ import annotations

import timm
import torch

TIMM_BASE = dict(pretrained=False, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)


def _timm(name, **kw):
    def build():
        args = dict(TIMM_BASE, img_size=56)
        args.update(kw)
        return timm.create_model(name, **args).eval()

    return build


# name: (builder, input shape [B, C, H, W], adapter)
FAMILIES = {
    # ViT with a CLS token, 7x7 grid
    "vit": (_timm("vit_tiny_patch16_224"), (2, 3, 56, 56), "timm_vit"),
    # distilled DeiT: two prefix tokens (CLS + distillation)
    "deit_distilled": (_timm("deit_tiny_distilled_patch16_224"), (2, 3, 56, 56), "timm_vit"),
    # DeiT-III: LayerScale in the blocks
    "deit3": (_timm("deit3_small_patch16_224", embed_dim=64), (2, 3, 56, 56), "timm_vit"),
    # register tokens (CLS + 2 registers)
    "vit_reg": (_timm("vit_tiny_patch16_224", reg_tokens=2), (2, 3, 56, 56), "timm_vit"),
    # no CLS, global average pooling, non-square 8x6 grid
    "vit_gap_nonsquare": (
        _timm("vit_tiny_patch16_224", class_token=False, global_pool="avg", img_size=(64, 48)),
        (2, 3, 64, 48),
        "timm_vit",
    ),
    # dynamic image size: built at 56x56 (7x7), run at 64x48 (8x6)
    "vit_dynamic": (_timm("vit_tiny_patch16_224", dynamic_img_size=True), (2, 3, 64, 48), "timm_vit"),
}


def make_input(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)
