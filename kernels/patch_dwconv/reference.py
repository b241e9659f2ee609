"""PyTorch reference of the local term that slab, inline, rala and agent add to their output: a depthwise ``k×k``
convolution of V's patch rows over the token grid (zero padding ``k // 2``), added to the patch rows of the op's
output; prefix rows (CLS, registers) get nothing.

Per sample ``b``, patch ``(y, x)`` (token ``n = P0 + y·W + x``) and channel ``c = g·d + e`` (head ``g``,
column ``e``)::

    out[b, g, n, e] = o[b, g, n, e] + bias[c]
                      + Σ_{i,j < k} w[c, i, j] · v[b, g, P0 + (y+i−k//2)·W + (x+j−k//2), e]

with the terms whose neighbour falls outside the grid left out, ``w`` shared by the batch (``[C, 1, k, k]``), shared by
the batch and the heads (``[d, 1, k, k]`` with a ``[d]`` bias, slab's kernel: channel ``c`` uses ``w[c mod d]``) or
one kernel per sample (``[B, C, k, k]``, inline's predicted kernels).

Memory traffic: the convolution runs channels-last on the patch rows (``[B, H, W, h·d]``, the token layout, or
``[1, H, W, B·h·d]`` for per-sample kernels) and its result is a view of token-layout memory, so adding it to a
token-layout output reads it coalesced.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["patch_dwconv_reference", "depthwise_conv_patch_rows", "add_to_patch_rows"]


def depthwise_conv_patch_rows(v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              grid: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
    """Depthwise ``k×k`` convolution (zero padding ``k // 2``) of the patch rows of ``v`` over the grid, channels-last.

    Args:
        v: ``[B, h, N, d]``, any strides (e.g. a view of a packed qkv); channel ``g·d + e`` is head ``g``,
            column ``e``.
        weight: ``[h·d, 1, k, k]`` (shared by the batch) or ``[B, h·d, k, k]`` (one kernel per sample and channel).
        bias: ``[h·d]`` or ``None``.
        grid: ``(H, W)`` with ``H·W = N − num_prefix_tokens``.
    Returns:
        ``[B, h, H·W, d]`` in the dtype of ``v``, a view of token-layout memory (``[B, H·W, h, d]``, or
        ``[H·W, B, h, d]`` for per-sample kernels), so that adding it to a token-layout output reads it coalesced.

    The input is read once into a dense channels-last copy (the only copy): ``[B, H, W, h·d]`` for shared kernels;
    per-sample kernels fold the batch into the channels (``groups = B·h·d``) over ``[1, H, W, B·h·d]`` memory, a
    copy with contiguous channel runs instead of an NCHW transpose.
    """
    B, h, N, d = v.shape
    P0, (H, W) = num_prefix_tokens, grid
    C, ks = h * d, weight.shape[-1]
    tok = v[:, :, P0:].transpose(1, 2).reshape(B, H * W, C)  # a view for every qkv layout we meet
    if weight.dim() == 4 and weight.shape[1] == 1 and weight.shape[0] == C:
        x = tok.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        y = F.conv2d(x, weight, bias, padding=ks // 2, groups=C)  # [B, C, H, W]
        return y.permute(0, 2, 3, 1).reshape(B, H * W, h, d).transpose(1, 2)
    kern = weight.reshape(B * C, 1, ks, ks)
    x = tok.transpose(0, 1).contiguous().view(1, H, W, B * C).permute(0, 3, 1, 2)  # [1, B·C, H, W] channels-last
    y = F.conv2d(x, kern, None if bias is None else bias.repeat(B), padding=ks // 2, groups=B * C)
    return y.permute(0, 2, 3, 1).reshape(H * W, B, h, d).permute(1, 2, 0, 3)


def add_to_patch_rows(o: torch.Tensor, local: torch.Tensor, num_prefix_tokens: int, inplace: bool) -> torch.Tensor:
    """``o`` with ``local`` added to its patch rows: ``o [B, h, N, d]``, ``local [B, h, N − P0, d]``; prefix rows
    unchanged; the result has the dtype of ``o`` (the sum is computed in the promoted dtype and rounded once).

    ``inplace=True`` adds into ``o`` (one pass; only where autograd does not keep ``o``, e.g. the output of an op
    that saves its inputs only). Otherwise ``local`` is padded with zero prefix rows in the token layout and added
    once, so the result keeps ``o``'s layout without concatenating full-size tensors.
    """
    P0 = num_prefix_tokens
    if inplace:
        o[:, :, P0:].add_(local)  # not ``+=`` on a slice, which writes the slice back with a copy
        return o
    B, h, N, d = o.shape
    pad = F.pad(local.transpose(1, 2).reshape(B, N - P0, h * d), (0, 0, P0, 0)).view(B, N, h, d).transpose(1, 2)
    return torch.add(o, pad).to(o.dtype)


def patch_dwconv_reference(o: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
                           grid: tuple[int, int], num_prefix_tokens: int, inplace: bool = False) -> torch.Tensor:
    """``o`` plus the depthwise convolution of ``v``'s patch rows (see the module docstring).

    Args:
        o: ``[B, h, N, d]``, the op's output (any strides).
        v: ``[B, h, N, d]``, any strides.
        weight: ``[h·d, 1, k, k]``, ``[d, 1, k, k]`` (shared by the heads) or ``[B, h·d, k, k]``, ``k`` odd; the
            convolution runs in its dtype.
        bias: ``[h·d]`` (``[d]`` with head-shared weights) or ``None``.
        grid: ``(H, W)``, ``H·W = N − num_prefix_tokens``.
        inplace: add into ``o`` (where autograd does not keep ``o``) instead of returning a new tensor in its layout.

    Returns:
        ``[B, h, N, d]`` in the dtype of ``o``.
    """
    h, d = v.shape[1], v.shape[3]
    if h > 1 and weight.dim() == 4 and tuple(weight.shape[:2]) == (d, 1):  # shared by the heads
        weight, bias = weight.repeat(h, 1, 1, 1), None if bias is None else bias.repeat(h)
    local = depthwise_conv_patch_rows(v.to(weight.dtype), weight, bias, grid, num_prefix_tokens)
    return add_to_patch_rows(o, local, num_prefix_tokens, inplace)
