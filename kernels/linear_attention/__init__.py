"""Non-causal linear attention: feature map, divisive or subtractive normaliser, key weights, rotary numerator.

The PyTorch reference is the specification; the Triton kernel (``triton.py``, same signature) is imported lazily by the
dispatcher, and :func:`supports` says which inputs it refuses (without importing Triton).
"""

import torch

from visionfx.kernels.dispatch import Op, register_op
from visionfx.kernels.linear_attention.reference import FEATURES, NORMALIZERS, linear_attention_reference

__all__ = ["linear_attention_reference", "supports", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 128
_OPTIONS = ("feature", "normalizer", "scale", "eps", "key_weights", "rope")


def supports(device_type: str, dtype: torch.dtype, head_dim: int, **options) -> str | None:
    """``None`` if the Triton kernel takes such inputs, else the reason it refuses them.

    ``options`` are the op's keyword arguments known in advance: ``feature``, ``normalizer``, ``scale``, ``eps``, and
    ``key_weights`` / ``rope`` (truthy when used).
    """
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        return f"unknown option(s) {unknown} for the linear_attention kernel"
    feature, normalizer = options.get("feature", "identity"), options.get("normalizer", "divisive")
    if feature not in FEATURES:
        return f"unknown feature map {feature!r} (the kernel has {FEATURES})"
    if normalizer not in NORMALIZERS:
        return f"unknown normalizer {normalizer!r} (the kernel has {NORMALIZERS})"
    if normalizer == "subtractive" and (options.get("key_weights") or options.get("rope")):
        return "key_weights and rope apply to the divisive normaliser only"
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        return f"head dim {head_dim} outside 1..{MAX_HEAD_DIM} (the fp32 D×D state must stay on chip)"
    if options.get("rope") and head_dim % 2:
        return f"rotary terms need an even head dim, got {head_dim}"
    if device_type == "cuda":
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"dtype {dtype} not supported (float32, bfloat16, float16)"
        if dtype == torch.float32 and head_dim > 64:
            return (f"float32 with head dim {head_dim} > 64: the kernel's exact fp32 products no longer fit on chip "
                    "and would be slower than the reference's cuBLAS matmuls")
    elif dtype != torch.float32:
        return f"the Triton interpreter on {device_type} runs float32 only, got {dtype}"
    return None


register_op(
    Op(
        "linear_attention",
        linear_attention_reference,
        triton="visionfx.kernels.linear_attention.triton:linear_attention_triton",
        supports=supports,
        compiles=True,
    )
)
