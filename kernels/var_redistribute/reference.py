"""VAR's attention redistribution on post-softmax weights (MLLM.md §3.3-3.4), the PyTorch reference.

Used by :mod:`visionfx.methods.var`; :mod:`visionfx.kernels.var_redistribute.triton` has the same signature and does
the whole update of a row in one program.
"""

from __future__ import annotations

import torch

__all__ = ["redistribute", "column_masks", "CODE_EPS"]

CODE_EPS = 1e-6  # the official code adds this to every image weight in the head test's denominator


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    # float64 reductions by matmul are exact enough for the invariants whatever the fp32 matmul precision (TF32) is;
    # devices without float64 fall back to the weights' dtype
    return torch.float64 if t.device.type in ("cpu", "cuda") else t.dtype


def column_masks(image: torch.Tensor, sinks: torch.Tensor, p: float, dtype: torch.dtype,
                 acc: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Key masks of :func:`redistribute` from ``image``/``sinks [B, S]`` bool: ``(reduce [B, S, 4] in acc: columns
    image, visual sink, p·sink, receiver; update [B, 2, S] in dtype: rows −p·sink, receiver)``."""
    receiver = image & ~sinks
    acc = acc or dtype
    reduce = torch.stack([image.to(acc), (image & sinks).to(acc), sinks.to(acc) * p, receiver.to(acc)], -1)
    return reduce, torch.stack([sinks.to(dtype) * -p, receiver.to(dtype)], 1)


def redistribute(attn: torch.Tensor, image: torch.Tensor, sinks: torch.Tensor, rows: torch.Tensor, p: float,
                 rho: float, summ: float, eps: float = 1e-6, official: bool = False,
                 masks: tuple[torch.Tensor, torch.Tensor] | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """VAR on post-softmax weights (§3.3-3.4, vectorised over samples, heads and rows).

    Args:
        attn: ``[B, H, Q, S]`` fp32 attention weights.
        image: ``[B, S]`` bool image key positions; sinks: ``[B, S]`` bool sink key positions (text and visual).
        rows: ``[B, Q]`` bool, rows that may be modified (the caller also clears samples without a visual sink).
        p, rho, summ: paper convention (p moved, ρ minimum non-sink share, summ minimum image mass).
        official: the public code's arithmetic: head test ``S_vs / Σ(α_img + 1e-6) ≤ 1 − ρ`` and ratios without ε.
        masks: :func:`column_masks` of ``image``/``sinks`` with this ``p`` (at least S columns; the first S count),
            when the caller keeps them.
        out: optional ``[B, H, Q, S]`` tensor (any float dtype, e.g. a view of the weights in the query's dtype)
            that receives the result, cast; it is returned.

    Returns:
        ``[B, H, Q, S]``: selected rows with ``p`` of their sink mass moved to the visual non-sink keys in
        proportion to their weights; every other row is returned unchanged (bit for bit).

    The row masses (image, visual sink, budget Ω = p·Σ sinks, receivers) come from one batched matmul against the
    masks, in float64, instead of masked copies of the weights; the non-sink share is Σ receivers / (Σ image + ε)
    (receivers = image ∖ sinks, the numerator S_img − S_vs of §3.6 without its cancellation). The update is one
    fused expression ``α' = α + α · ([sel]·(−p·[sink]) + c·[receiver])`` with ``c = Ω / Σ receivers`` on selected
    rows and 0 elsewhere, so unselected rows and untouched columns get ``α + α·0 = α`` exactly.
    """
    B, H, Q, S = attn.shape
    reduce, update = masks if masks is not None else column_masks(image, sinks, p, attn.dtype, _acc_dtype(attn))
    reduce, update = reduce[:, :S], update[:, None, :, :S].to(attn.dtype)
    m = torch.bmm(attn.to(reduce.dtype).reshape(B, H * Q, S), reduce).view(B, H, Q, 4)
    s_img, s_vs, budget, s_rcv = m.unbind(-1)
    if official:
        n_img = image.sum(-1).to(m.dtype)[:, None, None]
        head_ok = (s_vs / (s_img + n_img * CODE_EPS) <= 1 - rho) & (s_img >= summ)
        denom = torch.where(s_rcv > 0, s_rcv, 1)
    else:
        head_ok = (s_img >= summ) & (s_rcv / (s_img + eps) >= rho)
        denom = s_rcv.clamp(min=eps)
    sel = (head_ok & rows[:, None, :])[..., None]
    scale = torch.where(sel, update[:, :, 0:1], 0.0)
    scale.addcmul_(update[:, :, 1:2], torch.where(sel, (budget / denom)[..., None], 0.0))
    new = torch.addcmul(attn, attn, scale)
    return new if out is None else out.copy_(new)
