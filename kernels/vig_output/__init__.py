"""vig's output stage: per-head RMSNorms of the scan output and the layer input, a sigmoid-gated mix, optional SiLU,
from scan order into host order (inference, eager or compiled; training runs the PyTorch composition, which autograd
handles)."""

import torch

from visionfx.kernels.dispatch import Op, register_op
from visionfx.kernels.vig_output.reference import vig_output_reference

__all__ = ["vig_output_reference"]


def _supports(device_type, dtype, head_dim, **options):
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"the kernel takes fp32/fp16/bf16 inputs, got {dtype}"
    if not 1 <= head_dim <= 256:
        return f"head_dim {head_dim} is outside the kernel's range 1..256"
    return None


register_op(Op("vig_output", vig_output_reference, triton="visionfx.kernels.vig_output.triton:vig_output_triton",
               supports=_supports, compiles=True))
