"""VAR's attention redistribution on post-softmax weights (MLLM.md §3.3-3.4): move a share of the sink mass of
image-centric rows to the visual non-sink keys."""

import torch

from visionfx.kernels.dispatch import Op, register_op
from visionfx.kernels.var_redistribute.reference import column_masks, redistribute

__all__ = ["redistribute", "column_masks"]


def _supports(device_type, dtype, head_dim, *, requires_grad: bool = False, **options):
    """Why the Triton kernel would refuse the inputs (``None``: accepted). ``head_dim`` is unused (the op works on
    weights, not heads)."""
    if requires_grad:
        return "gradients through the redistribution are implemented by the reference only"
    if dtype != torch.float32:
        return f"dtype {dtype} (the kernel takes the fp32 softmax weights)"
    return None


register_op(
    Op(
        "var_redistribute",
        redistribute,
        triton="visionfx.kernels.var_redistribute.triton:redistribute_triton",
        supports=_supports,
    )
)
