"""DiT: the class-conditional latent diffusion transformer of Peebles & Xie (arXiv 2212.09748), built on timm layers.

A re-implementation of the architecture of facebookresearch/DiT ``models.py`` (METHODS.md §8), so that visionfx can
patch a DiT without the official repository. The blocks hold timm's ``Attention`` (qkv_bias=True, no qk-norm), timm's
``Mlp`` with tanh-approximated GELU, and adaLN-Zero conditioning; a block calls ``attn(modulate(norm1(x), shift,
scale))`` positionally with ``x`` only. There are no prefix tokens and the patch grid is ``x_embedder.grid_size``.

Differences from the official file, none of which changes a square model:

* ``input_size`` may also be an ``(H, W)`` pair: the sin-cos position table and :meth:`DiT.unpatchify` then follow the
  non-square grid (the official code assumes a square one).
* :meth:`DiT.forward_with_cfg` takes ``guidance_channels`` (default 3, the official choice of guiding only the first
  three latent channels); ``None`` guides every predicted-noise channel.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn
from timm.layers import Attention, Mlp, PatchEmbed

__all__ = [
    "DiT", "DiTBlock", "FinalLayer", "TimestepEmbedder", "LabelEmbedder", "modulate", "sincos_pos_embed_2d",
    "DIT_MODELS", "dit_xl_2", "dit_xl_4", "dit_xl_8", "dit_l_2", "dit_l_4", "dit_l_8",
    "dit_b_2", "dit_b_4", "dit_b_8", "dit_s_2", "dit_s_4", "dit_s_8",
]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-sample affine modulation: ``x [B, N, C] * (1 + scale [B, C]) + shift [B, C]``."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """``pos [M]`` -> ``[M, dim]``: ``sin(pos·ω_i)`` in the first half, ``cos(pos·ω_i)`` in the second, with
    ``ω_i = 10000^(-i/(dim/2))``."""
    if dim % 2:
        raise ValueError(f"the 1-D sin-cos embedding needs an even width, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.to(torch.float64)[:, None] * omega[None]
    return torch.cat((angles.sin(), angles.cos()), dim=1)


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """The fixed 2-D sin-cos position table of DiT (MAE convention) for an ``(H, W)`` grid: ``[H·W, dim]``, rows in
    row-major order. The first ``dim/2`` channels encode the column index, the last ``dim/2`` the row index."""
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    H, W = grid
    rows, cols = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    return torch.cat((_sincos_1d(dim // 2, cols.reshape(-1)), _sincos_1d(dim // 2, rows.reshape(-1))), dim=1)


class TimestepEmbedder(nn.Module):
    """Diffusion timesteps ``t [B]`` (float or int) -> ``[B, hidden_size]``: a sinusoidal frequency embedding
    followed by ``Linear -> SiLU -> Linear``."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """``t [B]`` -> ``[B, dim]``: ``[cos(t·f_i) | sin(t·f_i)]`` with ``f_i = max_period^(-i/half)``, ``i <
        half = dim // 2``; a zero column is appended when ``dim`` is odd."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat((torch.cos(args), torch.sin(args)), dim=-1)
        if dim % 2:
            emb = torch.cat((emb, torch.zeros_like(emb[:, :1])), dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels ``y [B]`` -> ``[B, hidden_size]``. With ``dropout_prob > 0`` the table has one extra row, the
    null class ``num_classes`` used for classifier-free guidance; in training each label is replaced by it with
    probability ``dropout_prob``."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        if not 0.0 <= dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {dropout_prob}")
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(use_cfg_embedding), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null class: at random, or where ``force_drop_ids == 1``."""
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning: ``c [B, C]`` gives per-sample shift, scale and gate for the
    attention and MLP branches; ``x [B, N, C]`` -> ``[B, N, C]``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(
            in_features=hidden_size,
            hidden_features=int(hidden_size * mlp_ratio),
            act_layer=partial(nn.GELU, approximate="tanh"),
            drop=0.0,
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        # positional call with x only, as in the official block: patched attention must accept it
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated affine-free LayerNorm and a Linear to ``patch_size² · out_channels`` values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion transformer on latents ``x [B, in_channels, H, W]``.

    Args:
        input_size: latent side (or ``(H, W)``); the patch grid is ``input_size / patch_size``.
        patch_size: side of the square latent patches.
        in_channels: latent channels.
        hidden_size: model width ``C``.
        depth: number of DiT blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width over ``C``.
        class_dropout_prob: probability of replacing a label by the null class in training (classifier-free
            guidance); 0 disables it and the null class.
        num_classes: number of class labels.
        learn_sigma: predict the variance too (output has ``2 · in_channels`` channels).
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # fixed, not learned; a parameter (not a buffer) so that checkpoints keep the official key
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official initialisation: Xavier-uniform Linears with zero bias, the sin-cos position table,
        N(0, 0.02) label table and timestep MLP, and zeros for every adaLN modulation and the output Linear
        (adaLN-Zero: each block starts as the identity)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        grid = tuple(self.x_embedder.grid_size)
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H·W, p·p·c]`` (tokens row-major, values ``(p_row, p_col, c)``) -> ``[B, c, H·p, W·p]``."""
        c, p = self.out_channels, self.patch_size
        H, W = self.x_embedder.grid_size
        x = x.reshape(x.shape[0], H, W, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, H * p, W * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x [B, in_channels, H, W]``, timesteps ``t [B]``, labels ``y [B]`` -> ``[B, out_channels, H, W]``."""
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))

    def forward_with_cfg(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float, guidance_channels: int | None = 3
    ) -> torch.Tensor:
        """Classifier-free guidance on a batch whose second half carries the null labels: both halves run on the
        first half's latents, and the predicted noise becomes ``uncond + cfg_scale · (cond - uncond)`` on the first
        ``guidance_channels`` channels (the official default, 3), repeated for both halves."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat((half, half), dim=0), t, y)
        n = self.in_channels if guidance_channels is None else guidance_channels
        eps, rest = out[:, :n], out[:, n:]
        cond, uncond = eps.chunk(2, dim=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat((torch.cat((guided, guided), dim=0), rest), dim=1)


_SIZES = {
    "xl": dict(depth=28, hidden_size=1152, num_heads=16),
    "l": dict(depth=24, hidden_size=1024, num_heads=16),
    "b": dict(depth=12, hidden_size=768, num_heads=12),
    "s": dict(depth=12, hidden_size=384, num_heads=6),
}


def _dit(size: str, patch_size: int, **overrides) -> DiT:
    args = dict(_SIZES[size], patch_size=patch_size)
    args.update(overrides)
    return DiT(**args)


def dit_xl_2(**kw) -> DiT:
    """DiT-XL/2 (C 1152, 16 heads, 28 blocks, d 72); keyword arguments override any :class:`DiT` argument."""
    return _dit("xl", 2, **kw)


def dit_xl_4(**kw) -> DiT:
    """DiT-XL/4; keyword arguments override any :class:`DiT` argument."""
    return _dit("xl", 4, **kw)


def dit_xl_8(**kw) -> DiT:
    """DiT-XL/8; keyword arguments override any :class:`DiT` argument."""
    return _dit("xl", 8, **kw)


def dit_l_2(**kw) -> DiT:
    """DiT-L/2 (C 1024, 16 heads, 24 blocks); keyword arguments override any :class:`DiT` argument."""
    return _dit("l", 2, **kw)


def dit_l_4(**kw) -> DiT:
    """DiT-L/4; keyword arguments override any :class:`DiT` argument."""
    return _dit("l", 4, **kw)


def dit_l_8(**kw) -> DiT:
    """DiT-L/8; keyword arguments override any :class:`DiT` argument."""
    return _dit("l", 8, **kw)


def dit_b_2(**kw) -> DiT:
    """DiT-B/2 (C 768, 12 heads, 12 blocks); keyword arguments override any :class:`DiT` argument."""
    return _dit("b", 2, **kw)


def dit_b_4(**kw) -> DiT:
    """DiT-B/4; keyword arguments override any :class:`DiT` argument."""
    return _dit("b", 4, **kw)


def dit_b_8(**kw) -> DiT:
    """DiT-B/8; keyword arguments override any :class:`DiT` argument."""
    return _dit("b", 8, **kw)


def dit_s_2(**kw) -> DiT:
    """DiT-S/2 (C 384, 6 heads, 12 blocks); keyword arguments override any :class:`DiT` argument."""
    return _dit("s", 2, **kw)


def dit_s_4(**kw) -> DiT:
    """DiT-S/4; keyword arguments override any :class:`DiT` argument."""
    return _dit("s", 4, **kw)


def dit_s_8(**kw) -> DiT:
    """DiT-S/8; keyword arguments override any :class:`DiT` argument."""
    return _dit("s", 8, **kw)


#: the official model list, by the official names
DIT_MODELS = {
    "DiT-XL/2": dit_xl_2, "DiT-XL/4": dit_xl_4, "DiT-XL/8": dit_xl_8,
    "DiT-L/2": dit_l_2, "DiT-L/4": dit_l_4, "DiT-L/8": dit_l_8,
    "DiT-B/2": dit_b_2, "DiT-B/4": dit_b_4, "DiT-B/8": dit_b_8,
    "DiT-S/2": dit_s_2, "DiT-S/4": dit_s_4, "DiT-S/8": dit_s_8,
}
