"""The mixers' local term on the patch grid (slab, inline, rala, agent): ``o`` plus a depthwise convolution of V's
patch rows, in one pass at inference, eager or compiled (a custom op under ``torch.compile``); training runs the
PyTorch composition, which autograd handles."""

import torch

from visionfx.kernels.dispatch import Op, register_op
from visionfx.kernels.patch_dwconv.reference import patch_dwconv_reference

__all__ = ["patch_dwconv_reference"]

MAX_HEAD_DIM = 256
MAX_KERNEL = 9


def _supports(device_type, dtype, head_dim, kernel_size=3, **options):
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"the kernel takes fp32/fp16/bf16 inputs, got {dtype}"
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        return f"head_dim {head_dim} is outside the kernel's range 1..{MAX_HEAD_DIM}"
    if kernel_size > MAX_KERNEL:
        return f"a {kernel_size}×{kernel_size} convolution is larger than the kernel's {MAX_KERNEL}×{MAX_KERNEL}"
    return None


register_op(Op("patch_dwconv", patch_dwconv_reference,
               triton="visionfx.kernels.patch_dwconv.triton:patch_dwconv_triton", supports=_supports,
               compiles=True))
