"""Attention-mask and sequence helpers of DyVTE (MLLM.md §2): the virtual exit of a mixed batch as a mask block, and
the masks and tensors of the shortened sequence after a real exit.

Masks come in the formats transformers hands attention functions: 4-D additive float or bool ``[B, 1, Q, S]``,
2-D ``[B, S]`` (FlashAttention, 0/1) or ``None`` (causal, no padding).
"""

from __future__ import annotations

import torch

__all__ = ["block_mask", "apply_block", "gather_seq", "gather_mask"]


def block_mask(image: torch.Tensor, exited: torch.Tensor, q_len: int) -> torch.Tensor:
    """``[B, 1, Q, S]`` bool, True where the virtual exit forbids attention: image keys for non-image queries of
    exited samples. ``image [B, S]`` over the keys (queries are the last ``q_len`` positions), ``exited [B]`` bool."""
    q_img = image[:, image.shape[1] - q_len:]
    return image[:, None, None, :] & ~q_img[:, None, :, None] & exited[:, None, None, None]


def _causal(q_len: int, s_len: int, device) -> torch.Tensor:
    """``[Q, S]`` bool: the last ``q_len`` of ``s_len`` positions each see the keys up to themselves."""
    return (torch.arange(q_len, device=device)[:, None] + (s_len - q_len)) >= torch.arange(s_len, device=device)


def _to_format(allowed: torch.Tensor, float_dtype: torch.dtype | None) -> torch.Tensor:
    if float_dtype is None:
        return allowed
    return torch.zeros((), dtype=float_dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(
        float_dtype).min).expand(allowed.shape).contiguous()


def apply_block(mask: torch.Tensor | None, block: torch.Tensor, float_dtype: torch.dtype | None) -> torch.Tensor:
    """The 4-D ``mask`` (additive float or bool; ``None`` = causal) with ``block [B, 1, Q, S]`` forbidden.
    ``float_dtype``: the format to build when ``mask`` is ``None`` (``None``: bool, as SDPA takes)."""
    B, _, Q, S = block.shape
    if mask is None:
        return _to_format(_causal(Q, S, block.device).expand(B, 1, Q, S) & ~block, float_dtype)
    if mask.dim() != 4:
        raise NotImplementedError("the DyVTE virtual exit needs a 4-D attention mask (eager or SDPA); FlashAttention "
                                  "cannot express per-sample columns: use batch_policy='last' or batch size 1")
    m = mask.expand(B, mask.shape[1], Q, S)
    if m.dtype == torch.bool:
        return m & ~block
    return m.masked_fill(block, torch.finfo(m.dtype).min)


def gather_seq(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t [B or 1, L, ...]`` gathered along dim 1 at ``idx [B, M]``."""
    t = t.expand(idx.shape[0], *t.shape[1:])
    shape = (*idx.shape, *t.shape[2:])
    return t.gather(1, idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(shape))


def gather_mask(mask, rows: torch.Tensor | None, cols: torch.Tensor, col_valid: torch.Tensor | None,
                float_dtype: torch.dtype | None):
    """A mask restricted to query ``rows [B, Mq]`` (``None``: all) and key ``cols [B, Mk]``, with the columns where
    ``col_valid [B, Mk]`` is False forbidden. 4-D float/bool, 2-D (FlashAttention) or ``None`` (causal, no padding)."""
    B, Mk = cols.shape
    if mask is None:
        if col_valid is None:
            return None
        if float_dtype == "2d":
            return col_valid.long()
        Mq = rows.shape[1] if rows is not None else 1
        return _to_format(_causal(Mq, Mk, cols.device).expand(B, 1, Mq, Mk) & col_valid[:, None, None, :], float_dtype)
    if mask.dim() == 2:
        m = mask.gather(1, cols.to(mask.device))
        return m if col_valid is None else m * col_valid.to(m.dtype)
    m = mask.expand(B, *mask.shape[1:])
    if rows is not None:
        m = m.gather(2, rows[:, None, :, None].expand(B, m.shape[1], rows.shape[1], m.shape[3]))
    m = m.gather(3, cols[:, None, None, :].expand(B, m.shape[1], m.shape[2], Mk))
    if col_valid is not None:
        bad = ~col_valid[:, None, None, :]
        m = m & ~bad if m.dtype == torch.bool else m.masked_fill(bad, torch.finfo(m.dtype).min)
    return m
