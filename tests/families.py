"""Tiny models of every supported family, built from configs (no downloads), for the generated test matrix.

Each entry of FAMILIES is a :class:`Family`: ``build()`` returns an eval-mode model, ``inputs(seed)`` the positional
arguments of one forward call, ``adapter`` the adapter expected to match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import open_clip
import timm
import torch
from open_clip.transformer import Transformer as OpenClipTransformer, VisionTransformer as OpenClipViT

from visionfx.models.dit import DiT


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
    # DeiT-III: LayerScale in the blocks (init 0.1 so the attention branch visibly reaches the output)
    "deit3": Family(_timm("deit3_small_patch16_224", embed_dim=64, init_values=0.1), image(2, 3, 56, 56), "timm_vit"),
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


# --- DiT and open_clip ----------------------------------------------------------------------------------------------


def _randomise_zero_init(model, seed=0):
    """DiT's adaLN-Zero makes every block the identity and the output zero at init; a trained DiT is neither. Give
    the zero-initialised (trainable) tensors small random values so that the attention shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _dit():
    return _randomise_zero_init(DiT(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                                    num_classes=10, class_dropout_prob=0.1)).eval()


def dit_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([3.0, 871.0]), torch.randint(0, 10, (2,), generator=g))


OPEN_CLIP_TOWER = dict(image_size=56, patch_size=8, width=64, layers=2, heads=2, mlp_ratio=2.0, output_dim=16)


def _open_clip_tower(**kw):
    def build():
        return OpenClipViT(**dict(OPEN_CLIP_TOWER, **kw)).eval()

    return build


def _open_clip_seq_first():
    """open_clip 3.3's VisionTransformer always builds its Transformer batch first (it has no batch_first argument),
    as older releases were not. The same Transformer class takes ``batch_first=False``: swap one in, with the
    tower's own weights, so the blocks' MultiheadAttention receives ``[N, B, C]``."""
    tower = OpenClipViT(**dict(OPEN_CLIP_TOWER, image_size=(64, 48)))
    seq_first = OpenClipTransformer(64, 2, 2, 2.0, batch_first=False)
    seq_first.load_state_dict(tower.transformer.state_dict())
    tower.transformer = seq_first
    return tower.eval()


CLIP_CONFIG = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=56, patch_size=8, width=64, layers=2, head_width=32, mlp_ratio=2.0),
    text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
)


class CLIPImageEncoder(open_clip.CLIP):
    """A whole ``open_clip.CLIP`` (text tower included) whose forward is ``encode_image``, so the generated test
    matrix can call it with an image. Everything outside ``visual`` is frozen: an image forward gives it no
    gradient (as when training the image tower against a locked text tower)."""

    def forward(self, image):
        return self.encode_image(image)


def _clip():
    model = CLIPImageEncoder(**CLIP_CONFIG)
    for name, p in model.named_parameters():
        if not name.startswith("visual."):
            p.requires_grad_(False)
    return model.eval()


FAMILIES.update({
    # DiT: timm Attention in adaLN-Zero blocks, called positionally; no prefix tokens, 8x8 grid; inputs (x, t, y)
    "dit": Family(_dit, dit_inputs, "timm_vit"),
    # open_clip vision tower (nn.MultiheadAttention, batch first), CLS + 7x7 grid
    "open_clip": Family(_open_clip_tower(), image(2, 3, 56, 56), "open_clip"),
    # open_clip tower whose transformer runs sequence first ([N, B, C]); CLS + non-square 8x6 grid (N = 49)
    "open_clip_seq_first": Family(_open_clip_seq_first, image(2, 3, 64, 48), "open_clip"),
    # a whole CLIP model, run through encode_image; the text tower must stay untouched
    "open_clip_clip": Family(_clip, image(2, 3, 56, 56), "open_clip"),
})
