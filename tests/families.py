"""Tiny models of every supported family, built from configs (no downloads), for the generated test matrix.

Each entry of FAMILIES is a :class:`Family`: ``build()`` returns an eval-mode model, ``inputs(seed)`` the positional
arguments of one forward call, ``adapter`` the adapter expected to match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import timm
import torch


@dataclass(frozen=True)
class Family:
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[int], tuple]
    adapter: str


def image(*shape):
    def make(seed=0):
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(*shape, generator=g),)

    return make


TIMM_BASE = dict(pretrained=False, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)


def _timm(name, **kw):
    def build():
        args = dict(TIMM_BASE, img_size=56)
        args.update(kw)
        return timm.create_model(name, **args).eval()

    return build


FAMILIES = {
    # ViT with a CLS token, 7x7 grid
    "vit": Family(_timm("vit_tiny_patch16_224"), image(2, 3, 56, 56), "timm_vit"),
    # distilled DeiT: two prefix tokens (CLS + distillation)
    "deit_distilled": Family(_timm("deit_tiny_distilled_patch16_224"), image(2, 3, 56, 56), "timm_vit"),
    # DeiT-III: LayerScale in the blocks
    "deit3": Family(_timm("deit3_small_patch16_224", embed_dim=64), image(2, 3, 56, 56), "timm_vit"),
    # register tokens (CLS + 2 registers)
    "vit_reg": Family(_timm("vit_tiny_patch16_224", reg_tokens=2), image(2, 3, 56, 56), "timm_vit"),
    # no CLS, global average pooling, non-square 8x6 grid
    "vit_gap_nonsquare": Family(
        _timm("vit_tiny_patch16_224", class_token=False, global_pool="avg", img_size=(64, 48)),
        image(2, 3, 64, 48),
        "timm_vit",
    ),
    # dynamic image size: built at 56x56 (7x7), run at 64x48 (8x6)
    "vit_dynamic": Family(_timm("vit_tiny_patch16_224", dynamic_img_size=True), image(2, 3, 64, 48), "timm_vit"),
}

