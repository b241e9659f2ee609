"""Non-causal linear attention: feature map, divisive or subtractive normaliser, key weights, rotary numerator."""

from visionfx.kernels.linear_attention.reference import linear_attention_reference

__all__ = ["linear_attention_reference"]

from visionfx.kernels.dispatch import Op, register_op


def _supports(device_type, dtype, head_dim, **options):
    return None


register_op(Op("linear_attention", linear_attention_reference, triton="", supports=_supports))
