"""Router training for DyVTE (MLLM.md §2.7): the LLM is frozen, each step trains one router.

Per step: one exit layer k ~ Uniform{0..L−1} for the whole (global) batch; a teacher-forced forward of the full model
gives logits A and the output of layer k; continuation B re-runs layers k+1..L−1 from layer k+1's captured call with
the image columns hidden from every text query (the virtual exit, §2.5), then the final norm and LM head. A sample's
label is exit (1) iff over its answer positions (shifted labels > 0) argmax A and B agree on more than 99 % and
loss_B < 1.03 · loss_A; router k learns it by cross-entropy on its detached layer-k features, where the final prompt
position is the one before the first answer token.

Decisions the docs leave open:
- Routers are trained in fp32 (``router_dtype``) and stay in that dtype; inference casts features to it.
- All processes draw the same k (a shared seeded generator); router gradients are averaged across processes by hand,
  so the model is never wrapped (hooks and the frozen LLM stay as they are). Batches are moved to the model's device.
- Samples without answer tokens, or without text between image and answer, take no part in the loss.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable

import torch
from torch import nn

from visionfx.methods.dyvte import DyVTEHandle, apply_block, block_mask
from visionfx.methods.dyvte_router import router_features
from visionfx.patches.llava import get_handle, layer_hidden

__all__ = ["exit_labels", "answer_start", "branch_logits", "train_routers"]


def answer_start(labels: torch.Tensor) -> torch.Tensor:
    """``labels [B, L]`` -> ``[B]`` first position whose label is > 0 (L where there is none)."""
    B, L = labels.shape
    pos = torch.arange(L, device=labels.device).expand(B, L)
    return torch.where(labels > 0, pos, torch.full_like(pos, L)).amin(1)


def exit_labels(logits_a: torch.Tensor, logits_b: torch.Tensor, labels: torch.Tensor, agreement: float = 0.99,
                loss_ratio: float = 1.03) -> dict[str, torch.Tensor]:
    """The §2.7 label rule.

    Args:
        logits_a, logits_b: ``[B, L, V]`` logits of the normal and the image-masked continuation.
        labels: ``[B, L]`` token labels aligned with the inputs (answer tokens > 0; -100/0 elsewhere).

    Returns:
        ``label [B]`` long (1 exit, 0 keep), ``has_answer [B]`` bool, ``agree [B]``, ``loss_a [B]``, ``loss_b [B]``
        (fp32, means over the answer positions).
    """
    target = labels[:, 1:]
    mask = target > 0
    count = mask.sum(1)
    a, b = logits_a[:, :-1].float(), logits_b[:, :-1].float()
    agree = ((a.argmax(-1) == b.argmax(-1)) & mask).sum(1) / count.clamp(min=1)
    safe = target.clamp(min=0)

    def mean_ce(x):
        ce = nn.functional.cross_entropy(x.transpose(1, 2), safe, reduction="none")
        return (ce * mask).sum(1) / count.clamp(min=1)

    loss_a, loss_b = mean_ce(a), mean_ce(b)
    label = ((agree > agreement) & (loss_b < loss_ratio * loss_a)).long()
    return {"label": label, "has_answer": count > 0, "agree": agree, "loss_a": loss_a, "loss_b": loss_b}


def _float_dtype(handle: DyVTEHandle):
    impl = handle.parts.config.text_config._attn_implementation or "eager"
    if impl.startswith("flash"):
        raise NotImplementedError("router training masks image columns per sample and needs eager or SDPA")
    return None if impl == "sdpa" else handle._llm_dtype()


def branch_logits(handle: DyVTEHandle, batch: dict[str, Any], k: int) -> dict[str, torch.Tensor]:
    """Continuations A (normal) and B (image columns hidden from text after layer ``k``) of a teacher-forced batch.

    Returns ``logits_a``, ``logits_b`` (``[B, L, V]``) and ``hidden`` (``[B, L, D]``, the output of layer k)."""
    parts = handle.parts
    layers = parts.llm_layers
    captured: dict[str, Any] = {}

    def keep_output(module, args, kwargs, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output

    def keep_call(module, args, kwargs):
        captured["call"] = (args, kwargs)

    hooks = [layers[k].register_forward_hook(keep_output, with_kwargs=True)]
    if k + 1 < len(layers):
        hooks.append(layers[k + 1].register_forward_pre_hook(keep_call, with_kwargs=True))
    inputs = {n: v for n, v in batch.items() if n != "labels"}
    try:
        with torch.no_grad(), handle.disabled():
            logits_a = parts.model(**inputs, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    if k + 1 >= len(layers):
        return {"logits_a": logits_a, "logits_b": logits_a, "hidden": captured["hidden"]}
    args, kwargs = captured["call"]
    ids = batch["input_ids"].to(logits_a.device)
    image = ids == parts.image_token_id
    h = layer_hidden(args, kwargs)
    block = block_mask(image.to(h.device), image.any(1).to(h.device), h.shape[1])
    kwargs = {**kwargs, "attention_mask": apply_block(kwargs.get("attention_mask"), block, _float_dtype(handle))}
    kwargs.pop("hidden_states", None)
    with torch.no_grad(), handle.disabled():
        for layer in layers[k + 1:]:
            out = layer(h, *args[1:], **kwargs)
            h = out[0] if isinstance(out, tuple) else out
        logits_b = parts.model.get_output_embeddings()(parts.language_model.norm(h))
    return {"logits_a": logits_a, "logits_b": logits_b, "hidden": captured["hidden"]}


def _to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    return {n: v.to(device) if torch.is_tensor(v) else v for n, v in batch.items()}


def train_routers(model: nn.Module, loader, *, epochs: int = 1, max_steps: int | None = None, lr: float = 6e-5,
                  warmup_ratio: float = 0.03, weight_decay: float = 0.0, agreement: float = 0.99,
                  loss_ratio: float = 1.03, seed: int = 0, accelerator=None, log_every: int = 50,
                  router_dtype: torch.dtype = torch.float32, log: Callable[[str], None] | None = None) -> dict:
    """Train the routers of a dyvte-patched LLaVA model (only they change).

    Args:
        model: patched with ``visionfx.patch(model, "dyvte")``.
        loader: batches with ``input_ids``, ``attention_mask`` (left padded), ``pixel_values``, ``labels`` (answer
            tokens > 0, -100 elsewhere).
        epochs, max_steps: training length (``max_steps`` wins when given).
        lr, warmup_ratio, weight_decay: AdamW with a cosine schedule after a linear warm-up (official 6e-5, 0.03, 0).
        agreement, loss_ratio: the label rule.
        accelerator: an ``accelerate.Accelerator`` (one is created when ``None``).

    Returns:
        ``{"steps", "history": [per-step dicts], "layers": {k: {"samples", "accuracy", "keep_accuracy",
        "exit_accuracy", "exit_label_ratio", "exit_pred_ratio"}}}`` (counts summed over processes).
    """
    from accelerate import Accelerator

    handle = get_handle(model)
    if not isinstance(handle, DyVTEHandle):
        raise TypeError("train_routers needs a model patched with dyvte")
    accelerator = accelerator or Accelerator()
    say = log or accelerator.print
    loader = accelerator.prepare_data_loader(loader, device_placement=False)
    routers = handle.routers.to(router_dtype)
    routers.requires_grad_(True)
    params = [p for p in routers.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = max_steps if max_steps is not None else epochs * len(loader)
    warm = math.ceil(warmup_ratio * total)

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    rng = random.Random(seed)
    L = handle.num_layers
    counts = torch.zeros(L, 6, dtype=torch.float64)  # samples, correct, keep labels, keep correct, exit correct, pred exits
    device = next(handle.parts.llm_layers[0].parameters()).device
    history, step = [], 0
    was_training = handle.parts.model.training
    handle.parts.model.eval()
    try:
        while step < total:
            for batch in loader:
                if step >= total:
                    break
                batch = _to_device(batch, device)
                k = rng.randrange(L)
                out = branch_logits(handle, batch, k)
                rule = exit_labels(out["logits_a"], out["logits_b"], batch["labels"], agreement, loss_ratio)
                mask = batch.get("attention_mask")
                valid = mask.bool() if mask is not None else torch.ones_like(batch["input_ids"], dtype=torch.bool)
                end = answer_start(batch["labels"]) - 1
                image = batch["input_ids"] == handle.parts.image_token_id
                feat, defined = router_features(out["hidden"], image, valid, end.clamp(min=0))
                use = rule["has_answer"] & defined & image.any(1) & (end >= 0)
                logits = routers[k](feat)
                label = rule["label"]
                if bool(use.any()):
                    loss = nn.functional.cross_entropy(logits[use].float(), label[use])
                    loss.backward()
                else:
                    loss = logits.sum() * 0.0
                if accelerator.num_processes > 1:
                    for p in routers[k].parameters():
                        g = p.grad if p.grad is not None else torch.zeros_like(p)
                        p.grad = accelerator.reduce(g, "mean")
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                with torch.no_grad():
                    pred = logits.argmax(-1)
                    u = use.cpu()
                    lab, pr = label.cpu()[u], pred.cpu()[u]
                    counts[k] += torch.tensor([u.sum(), (lab == pr).sum(), (lab == 0).sum(),
                                               ((lab == 0) & (pr == 0)).sum(), ((lab == 1) & (pr == 1)).sum(),
                                               (pr == 1).sum()], dtype=torch.float64)
                record = {"step": step, "layer": k, "loss": float(loss.detach()), "samples": int(use.sum()),
                          "exit_labels": int(label[use].sum()), "lr": sched.get_last_lr()[0]}
                history.append(record)
                if log_every and step % log_every == 0:
                    say(f"step {step}: layer {k} loss {record['loss']:.4f} samples {record['samples']} "
                        f"exit labels {record['exit_labels']}")
                step += 1
            if len(loader) == 0:
                break
    finally:
        handle.parts.model.train(was_training)
    if accelerator.num_processes > 1:
        counts = accelerator.reduce(counts.to(accelerator.device), "sum").cpu()
    layers = {}
    for i in range(L):
        n, correct, keep, keep_ok, exit_ok, pred_exit = counts[i].tolist()
        if n == 0:
            continue
        layers[i] = {"samples": int(n), "accuracy": correct / n,
                     "keep_accuracy": keep_ok / keep if keep else None,
                     "exit_accuracy": exit_ok / (n - keep) if n - keep else None,
                     "exit_label_ratio": (n - keep) / n, "exit_pred_ratio": pred_exit / n}
        say(f"layer {i}: {int(n)} samples, accuracy {correct / n:.3f}, keep acc {layers[i]['keep_accuracy']}, exit "
            f"acc {layers[i]['exit_accuracy']}, exit labels {(n - keep) / n:.3f}, predicted exits {pred_exit / n:.3f}")
    return {"steps": step, "history": history, "layers": layers}
