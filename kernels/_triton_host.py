"""Host-side helpers shared by the Triton kernel wrappers (no ``@jit`` code; safe to import without a GPU)."""

from __future__ import annotations

import functools

import torch

__all__ = ["sm_count", "device_sm_count", "token_layout_output"]


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index``, queried once (the wrappers plan every launch with it)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_sm_count(device: torch.device) -> int:
    """:func:`sm_count` of a CUDA ``device`` (the current device when it has no index)."""
    return sm_count(device.index if device.index is not None else torch.cuda.current_device())


def token_layout_output(q: torch.Tensor, dv: int | None = None) -> torch.Tensor:
    """An uninitialised output in token layout, ``[B, N, H, dv]`` for ``q [B, H, N, D]`` (``dv`` defaults to ``D``).

    The kernels write its ``[B, H, N, dv]`` view, and callers get that view back (made outside any autograd Function,
    so that in-place updates of it stay legal), whose heads merge without a copy
    (``o.transpose(1, 2).reshape(B, N, H * dv)``)."""
    B, H, N, D = q.shape
    return q.new_empty((B, N, H, D if dv is None else dv))
