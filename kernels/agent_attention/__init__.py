"""Agent attention: two softmax stages through n agent tokens, with batch-shared position biases."""

from visionfx.kernels.agent_attention.reference import agent_attention_reference

__all__ = ["agent_attention_reference"]

from visionfx.kernels.dispatch import Op, register_op


def _supports(device_type, dtype, head_dim, **options):
    return None


register_op(Op("agent_attention", agent_attention_reference, triton="", supports=_supports))
