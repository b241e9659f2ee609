"""Agent attention: two softmax stages through n agent tokens, with batch-shared position biases."""

import torch

from visionfx.kernels.agent_attention.reference import agent_attention_reference
from visionfx.kernels.dispatch import Op, register_op

__all__ = ["agent_attention_reference"]


def _supports(device_type, dtype, head_dim, *, dropout: bool = False, **options):
    """Why a Triton kernel would refuse the inputs (``None``: accepted). ``dropout``: attention dropout is active
    (training with ``dropout_p > 0``), which only the reference implements."""
    if dropout:
        return "attention dropout in training is implemented by the reference only"
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {dtype} (the kernel takes fp32, fp16 or bf16)"
    if head_dim > 128:
        return f"head_dim {head_dim} > 128"
    return None


register_op(
    Op(
        "agent_attention",
        agent_attention_reference,
        triton="visionfx.kernels.agent_attention.triton:agent_attention_triton",
        supports=_supports,
        compiles=True,
    )
)
