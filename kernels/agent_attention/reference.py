"""PyTorch reference of agent attention's global term (METHODS.md §2.1).

Per batch element and head, with ``n`` agent tokens ``A`` (for agent attention: pooled queries)::

    P1 = dropout(softmax_over_N(scale1 · A Kᵀ + B1))      [n, N]   agent aggregation
    P2 = dropout(softmax_over_n(scale2 · Q Aᵀ + B2))      [N, n]   agent broadcast
    O  = P2 (P1 V)                                        [N, d]

The effective ``N×N`` mixing matrix ``P2·P1`` is row-stochastic (without dropout) and has rank at most ``n``. The
position biases do not depend on the batch: they are passed once, ``[h, n, N]`` and ``[h, N, n]``, and broadcast.
Pooling, position-bias construction, the depthwise convolution and the V shortcut belong to the calling module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["agent_attention_reference"]


def _check(q, k, v, agents, bias1, bias2) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k, v must be [B, H, N, D] with matching B, H, N; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, N, D = q.shape
    if agents.dim() != 4 or agents.shape[0] != B or agents.shape[1] != H or agents.shape[3] != D:
        raise ValueError(f"agents must be [B, H, n, D] = [{B}, {H}, n, {D}], got {tuple(agents.shape)}")
    n = agents.shape[2]
    if bias1 is not None and tuple(bias1.shape) != (H, n, N):
        raise ValueError(f"bias1 must be [H, n, N] = [{H}, {n}, {N}], got {tuple(bias1.shape)}")
    if bias2 is not None and tuple(bias2.shape) != (H, N, n):
        raise ValueError(f"bias2 must be [H, N, n] = [{H}, {N}, {n}], got {tuple(bias2.shape)}")


def agent_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    bias1: torch.Tensor | None = None,
    bias2: torch.Tensor | None = None,
    *,
    scale1: float,
    scale2: float,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Two-stage softmax attention through ``n`` agent tokens, computed in fp32 (float64 inputs stay float64).

    Args:
        q, k, v: ``[B, H, N, D]``.
        agents: ``[B, H, n, D]``, the agent tokens.
        bias1: ``[H, n, N]`` agent-to-token logit bias, shared by the batch (``None``: no bias).
        bias2: ``[H, N, n]`` token-to-agent logit bias, shared by the batch (``None``: no bias).
        scale1: multiplies ``A Kᵀ`` (the host's softmax scale ``s``).
        scale2: multiplies ``Q Aᵀ`` (``s``, or ``s^κ`` in the training-free setting).
        dropout_p: dropout probability applied to both probability matrices when ``training``.
        training: whether dropout is active.

    Returns:
        ``[B, H, N, D]`` in the dtype of ``q``.
    """
    _check(q, k, v, agents, bias1, bias2)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf, af = (t.to(acc) for t in (q, k, v, agents))
    z1 = (af @ kf.transpose(-1, -2)) * scale1  # [B, H, n, N]
    if bias1 is not None:
        z1 = z1 + bias1.to(acc)
    p1 = F.dropout(torch.softmax(z1, dim=-1), dropout_p, training)
    va = p1 @ vf  # [B, H, n, D]
    z2 = (qf @ af.transpose(-1, -2)) * scale2  # [B, H, N, n]
    if bias2 is not None:
        z2 = z2 + bias2.to(acc)
    p2 = F.dropout(torch.softmax(z2, dim=-1), dropout_p, training)
    return (p2 @ va).to(q.dtype)
