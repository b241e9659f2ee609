"""vig's log-decays ``logsigmoid(z W2ᵀ + b2) / n`` from the low-rank gate's input, in fp32 (inference, eager or
compiled; training runs the PyTorch composition)."""

import torch

from visionfx.kernels.dispatch import Op, register_op
from visionfx.kernels.vig_gates.reference import vig_gates_reference

__all__ = ["vig_gates_reference"]


def _supports(device_type, dtype, head_dim, **options):
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"the kernel takes fp32/fp16/bf16 inputs, got {dtype}"
    return None


register_op(Op("vig_gates", vig_gates_reference, triton="visionfx.kernels.vig_gates.triton:vig_gates_triton",
               supports=_supports, compiles=True))
