"""Bidirectional gated linear attention: two per-channel decayed linear scans (forward and backward), averaged."""

import torch

from visionfx.kernels.bidir_gla.reference import bidir_gla_reference
from visionfx.kernels.dispatch import Op, register_op

__all__ = ["bidir_gla_reference"]


def _supports(device_type, dtype, head_dim, **options):
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"the kernel takes fp32/fp16/bf16 inputs, got {dtype}"
    if not 1 <= head_dim <= 128:
        return f"head_dim {head_dim} is outside the kernel's range 1..128"
    return None


register_op(
    Op("bidir_gla", bidir_gla_reference, triton="visionfx.kernels.bidir_gla.triton:bidir_gla_triton", supports=_supports,
       compiles=True)
)
