"""Prompt-token bookkeeping for the LLaVA adapter: where the image placeholders are, and how to shrink their runs when
a method keeps fewer visual tokens (FasterVLM), with left padding and labels kept consistent.
Re-exported by :mod:`visionfx.patches.llava`.
"""

from __future__ import annotations

import torch

__all__ = ["image_spans", "shrink_placeholders", "true_first"]


def true_first(mask: torch.Tensor) -> torch.Tensor:
    """Indices along the last dimension of a bool ``mask [..., L]``: its True positions first, then the False ones,
    each in ascending order (a stable partition; slice it to take either part)."""
    L = mask.shape[-1]
    pos = torch.arange(L, device=mask.device).expand_as(mask)
    return torch.sort(torch.where(mask, pos, pos + L), dim=-1).indices  # the keys are distinct: the order is unique


def _leading_pad(mask_row: torch.Tensor) -> int:
    return int((mask_row.cumsum(0) == 0).sum())


def _runs(row: torch.Tensor, token_id: int) -> list[tuple[int, int]]:
    hit = (row == token_id).to(torch.int8)
    if not bool(hit.any()):
        return []
    edges = torch.diff(torch.nn.functional.pad(hit, (1, 1))).nonzero().flatten().tolist()
    return list(zip(edges[0::2], edges[1::2]))


def image_spans(input_ids: torch.Tensor, image_token_id: int) -> list[list[tuple[int, int]]]:
    """Per row of ``input_ids [B, L]``, the ``(start, end)`` tensor coordinates (padding included) of each run of
    image placeholders. Two images written back to back form one run."""
    return [_runs(row, image_token_id) for row in input_ids]


def shrink_placeholders(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_token_id: int,
    full_counts: list[int],
    kept_counts: list[int],
    pad_token_id: int = 0,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Shrink each image's placeholder run from its full count to its kept count (MLLM.md §1.3b).

    Images are numbered in reading order over the batch (row 0 first), as HF scatters features. Per row the left
    padding is stripped, every run is replaced by a run of the kept length, and rows are left padded again to the new
    maximum length. Idempotent: inputs whose placeholder total already equals ``sum(kept_counts)`` come back as they
    are (the same tensors).

    Args:
        input_ids: ``[B, L]`` left-padded token ids.
        attention_mask: ``[B, L]`` or ``None`` (no padding).
        image_token_id: the placeholder id.
        full_counts: placeholders per image before pruning, in reading order.
        kept_counts: features per image after pruning.
        pad_token_id: id written into new padding.
        labels: ``[B, L]`` or ``None``; image positions become -100.

    Returns:
        ``(input_ids [B, L'], attention_mask [B, L'] or None, labels [B, L'] or None)``.

    Raises:
        ValueError: the placeholder total matches neither count, or a run does not cover whole images.
    """
    if len(full_counts) != len(kept_counts):
        raise ValueError(f"{len(full_counts)} full counts but {len(kept_counts)} kept counts")
    total = int((input_ids == image_token_id).sum())
    if total == sum(kept_counts):
        return input_ids, attention_mask, labels
    if total != sum(full_counts):
        if total == 0:
            raise ValueError(
                f"images were given but input_ids holds no image token (id {image_token_id}); build the prompt with "
                "the processor (it expands <image> into its placeholder run)"
            )
        raise ValueError(
            f"input_ids holds {total} image tokens (id {image_token_id}) but the {len(full_counts)} images need "
            f"{sum(full_counts)} (one full run each) or {sum(kept_counts)} (already shrunk)"
        )
    B, L = input_ids.shape
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
    image = 0
    for b in range(B):
        pad = _leading_pad(mask[b])
        ids, m = input_ids[b, pad:], mask[b, pad:]
        lab = labels[b, pad:] if labels is not None else None
        pieces_ids, pieces_m, pieces_l, cursor = [], [], [], 0
        for start, end in _runs(ids, image_token_id):
            covered, new_len = 0, 0
            while covered < end - start and image < len(full_counts):
                covered, new_len, image = covered + full_counts[image], new_len + kept_counts[image], image + 1
            if covered != end - start:
                raise ValueError(
                    f"row {b}: a run of {end - start} image tokens does not match the placeholder counts of the "
                    f"images it should hold ({covered}); is each image's placeholder run complete?"
                )
            pieces_ids += [ids[cursor:start], ids.new_full((new_len,), image_token_id)]
            pieces_m += [m[cursor:start], m.new_ones((new_len,))]
            if lab is not None:
                pieces_l += [lab[cursor:start], lab.new_full((new_len,), -100)]
            cursor = end
        pieces_ids.append(ids[cursor:])
        pieces_m.append(m[cursor:])
        if lab is not None:
            pieces_l.append(lab[cursor:])
        rows.append((torch.cat(pieces_ids), torch.cat(pieces_m), torch.cat(pieces_l) if lab is not None else None))
    if image != len(full_counts):
        raise ValueError(f"{len(full_counts)} images were given but input_ids holds placeholders for {image}")
    width = max(r[0].shape[0] for r in rows)
    out_ids = input_ids.new_full((B, width), pad_token_id)
    out_mask = mask.new_zeros((B, width))
    out_lab = labels.new_full((B, width), -100) if labels is not None else None
    for b, (ids, m, lab) in enumerate(rows):
        out_ids[b, width - ids.shape[0]:] = ids
        out_mask[b, width - m.shape[0]:] = m
        if out_lab is not None:
            out_lab[b, width - lab.shape[0]:] = lab
    if attention_mask is None and bool(out_mask.all()):
        out_mask = None
    return out_ids, out_mask, out_lab
