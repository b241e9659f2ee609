"""VAR's sink calibration and detection (MLLM.md §3.1-3.2): registered sink dimensions of known text backbones,
per-token sink scores, and :func:`find_sink_dims`, which finds the massive-activation dimensions of a LLaVA text model
from calibration prompts. Everything here is re-exported by :mod:`visionfx.methods.var`.

``find_sink_dims`` keeps a dimension whose per-sequence firing count is, in most (prompt, layer) pairs where it
fires, at most ``max(token_frac · non-pad tokens, min_tokens)``; the attention-mass validation step (§3.1.6) is left
to the caller (it needs attention weights).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from visionfx.patches.llava import LlavaParts, layer_hidden

__all__ = ["KNOWN_SINK_DIMS", "RMS_EPS", "known_sink_dims", "sink_scores", "find_sink_dims"]

KNOWN_SINK_DIMS = {("llama", 4096): (1415, 2533), ("llama", 5120): (2100, 4743)}
RMS_EPS = 1e-6


def known_sink_dims(text_config) -> tuple[int, ...] | None:
    """Registered sink dimensions of a text backbone (keyed by ``model_type`` and ``hidden_size``), or ``None``."""
    return KNOWN_SINK_DIMS.get((getattr(text_config, "model_type", None), getattr(text_config, "hidden_size", None)))


def sink_scores(x: torch.Tensor, dims: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """``x [..., D]`` -> ``[...]`` fp32: max over ``dims`` of |x_d| / sqrt(mean_d x_d² + 1e-6).

    The squared norm is reduced in fp32 straight from ``x`` (no fp32 copy of the residual stream); ``dims`` may be a
    long tensor on ``x``'s device (no index upload per call)."""
    index = dims if isinstance(dims, torch.Tensor) else torch.tensor(list(dims), device=x.device)
    sq = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).square()
    rms = torch.sqrt(sq / x.shape[-1] + RMS_EPS)
    return x.index_select(-1, index).float().abs().amax(-1) / rms


def find_sink_dims(model: nn.Module, batches, tau_c: float = 20.0, layer_frac: float = 0.5,
                   prompt_frac: float = 0.5, token_frac: float = 0.02, min_tokens: int = 4,
                   tally_frac: float = 0.5, return_stats: bool = False):
    """Find the massive-activation dimensions of a LLaVA text model from calibration prompts (§3.1).

    Args:
        model: a LLaVA model (patched or not).
        batches: iterable of model-input dicts (``input_ids``, ``attention_mask``, optionally ``pixel_values``).
        tau_c: threshold on |x_d| / RMS(x) of the inputs of decoder layers 2..L−1.
        layer_frac / prompt_frac: minimum fraction of those layers / of the prompts where a dimension fires.
        token_frac, min_tokens: a dimension must fire on at most ``max(token_frac · n, min_tokens)`` of a sequence's
            n non-pad tokens in most (prompt, layer) pairs where it fires.
        tally_frac: minimum tally relative to the top dimension's.

    Returns:
        Sorted list of dimensions (and a per-dimension stats dict when ``return_stats``).
    """
    parts = LlavaParts.of(model)
    layers = list(range(2, len(parts.llm_layers)))
    if not layers:
        raise ValueError("find_sink_dims needs a text model with at least 3 layers")
    captured: dict[int, torch.Tensor] = {}
    hooks = [parts.llm_layers[i].register_forward_pre_hook(
        lambda m, a, k, i=i: captured.__setitem__(i, layer_hidden(a, k).detach().float()), with_kwargs=True)
        for i in layers]
    stats: dict[int, dict] = {}
    n_prompts = 0
    try:
        for batch in batches:
            captured.clear()
            with torch.no_grad():
                model(**batch, use_cache=False)
            mask = batch.get("attention_mask")
            for b in range(batch["input_ids"].shape[0]):
                valid = mask[b].bool() if mask is not None else torch.ones(batch["input_ids"].shape[1], dtype=bool)
                prompt = n_prompts + b
                for layer in layers:
                    x = captured[layer][b][valid.to(captured[layer].device)]
                    z = x.abs() / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS)
                    hot = z > tau_c
                    flagged = z.amax(-1) > tau_c
                    if not bool(flagged.any()):
                        continue
                    marks = hot.clone()
                    marks[torch.arange(z.shape[0]), z.argmax(-1)] |= flagged
                    marks &= flagged[:, None]
                    allowance = max(token_frac * int(valid.sum()), min_tokens)
                    for d in marks.any(0).nonzero().flatten().tolist():
                        s = stats.setdefault(d, {"tally": 0, "layers": set(), "prompts": set(), "pairs": 0,
                                                 "sparse_pairs": 0})
                        count = int(marks[:, d].sum())
                        s["tally"] += count
                        s["layers"].add(layer)
                        s["prompts"].add(prompt)
                        s["pairs"] += 1
                        s["sparse_pairs"] += int(count <= allowance)
            n_prompts += batch["input_ids"].shape[0]
    finally:
        for h in hooks:
            h.remove()
    top = max((s["tally"] for s in stats.values()), default=0)
    dims = sorted(d for d, s in stats.items()
                  if len(s["layers"]) >= layer_frac * len(layers) and len(s["prompts"]) >= prompt_frac * n_prompts
                  and s["sparse_pairs"] * 2 > s["pairs"] and s["tally"] >= tally_frac * top)
    if return_stats:
        return dims, {d: {**s, "layers": sorted(s["layers"]), "prompts": len(s["prompts"])} for d, s in stats.items()}
    return dims
