"""DyVTE's router step at inference (MLLM.md §2.1-2.2): the router input of each sample from a decoder layer's
output, and the router's two products, as logits in fp32."""

import torch

from visionfx.kernels.dispatch import Op, register_op
from visionfx.kernels.dyvte_router.reference import router_logits_reference, span_features_reference

__all__ = ["router_logits_reference", "span_features_reference"]


def _supports(device_type, dtype, head_dim, *, weight_dtype=None, **options):
    """Why the Triton kernels would refuse the inputs (``None``: accepted); ``head_dim`` is the LLM width."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"the kernels take fp32/fp16/bf16 hidden states, got {dtype}"
    if weight_dtype is not None and weight_dtype != dtype:
        return f"the routers' dtype {weight_dtype} differs from the hidden states' {dtype}"
    return None


register_op(Op("dyvte_router", router_logits_reference,
               triton="visionfx.kernels.dyvte_router.triton:router_logits_triton", supports=_supports))
