"""Helpers shared by the mixers that add a local term on the patch grid (slab, inline, rala, agent): the local term
itself (a depthwise convolution of V's patch rows added to the op's output; ``kernels/patch_dwconv``, whose reference
holds the channels-last composition re-exported here) and a cache of tensors that depend only on the token grid.
"""

from __future__ import annotations

import torch

from visionfx.kernels.patch_dwconv.reference import (add_to_patch_rows, depthwise_conv_patch_rows,
                                                     patch_dwconv_reference)

__all__ = ["grid_constant", "depthwise_conv_patch_rows", "add_to_patch_rows", "add_local_conv"]


_GRID_CONSTANTS: dict = {}
_GRID_CONSTANTS_MAX = 64


def grid_constant(key: tuple, build):
    """``build()``, cached under ``key`` in eager mode: tensors that depend only on the token grid (tables, pooling or
    interpolation matrices), never on parameters. ``key`` must name everything ``build`` depends on, device and dtype
    included. Under ``torch.compile`` the tensor is built in the graph instead (no side effects to trace). Built
    outside inference mode, so that autograd may save it; on CUDA, run one eager forward before capturing a graph."""
    if torch.compiler.is_compiling():
        return build()
    t = _GRID_CONSTANTS.get(key)
    if t is None:
        if len(_GRID_CONSTANTS) >= _GRID_CONSTANTS_MAX:
            _GRID_CONSTANTS.clear()
        with torch.inference_mode(False), torch.no_grad():
            t = _GRID_CONSTANTS[key] = build()
    return t


def add_local_conv(mixer, o: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   grid: tuple[int, int], num_prefix_tokens: int, inplace: bool) -> torch.Tensor:
    """``o`` plus the depthwise convolution of ``v``'s patch rows (:func:`patch_dwconv_reference` has the contract):
    at inference one fused pass (``kernels/patch_dwconv``, through ``mixer``'s backend choice, also compiled), otherwise
    the channels-last composition, which autograd handles (see :meth:`TokenMixer.inference_op`)."""
    fn = mixer.inference_op("patch_dwconv", o, kernel_size=weight.shape[-1]) or patch_dwconv_reference
    return fn(o, v, weight, bias, grid=grid, num_prefix_tokens=num_prefix_tokens, inplace=inplace)
