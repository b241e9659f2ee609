"""Host-side helpers shared by the bidirectional GLA implementations (``triton.py`` and the legacy ``_scan.py``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _p2(x):
    return max(16, triton.next_power_of_2(int(x)))


def _prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def _dot_dtype(dtype):
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float32


def _gates(gf, gb):
    """One base tensor and the element offset of the backward gates: zero-copy when gf and gb are two views of one
    fp32 buffer with equal strides (as the vig mixer produces them), otherwise a stacked copy."""
    gf, gb = gf.float(), gb.float()
    if gf.untyped_storage().data_ptr() == gb.untyped_storage().data_ptr() and gf.stride() == gb.stride():
        return gf, gb.storage_offset() - gf.storage_offset()
    both = torch.stack((gf, gb))
    return both[0], both.stride(0)


def _same_layout(*ts):
    """The [B, H, N, *] inputs share one set of strides in the kernel: make them contiguous."""
    return [t.contiguous() for t in ts]
