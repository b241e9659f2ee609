"""A tiny LLaVA trained from scratch on easy-VQA: the host of the visual-token fidelity table (FasterVLM, DyVTE, VAR).

Architecture: ``LlavaForConditionalGeneration`` with a CLIP vision tower for 64×64 images (patch 8: an 8×8 grid, 64
patch tokens + CLS; width 256, 4 layers, 4 heads), LLaVA's 2-layer GELU projector, and a Llama language model (width
256, 6 layers, 4 heads, SwiGLU width 768) over the word-level vocabulary of :mod:`visionfx.recovery.easy_vqa_data`
(44 tokens). As in LLaVA-1.5 the features are the output of the second-to-last CLIP layer
(``vision_feature_layer=-2``) without the CLS token (``"default"``), so FasterVLM's CLS-attention scoring applies.

Recipe: every parameter trained jointly from random initialisation; AdamW (β = 0.9, 0.98; weight decay 0.05 on
matrices), linear warm-up then cosine decay to ``min_lr_ratio`` of the peak, bf16 autocast on CUDA, gradient clipping
at norm 1; loss = cross-entropy of the answer word and ``</s>`` only (the logits of the last three positions are
computed, ``logits_to_keep=3``). Augmentation on the device (:class:`~visionfx.recovery.easy_vqa_data.VqaAugment`).
``time_budget`` fits the run to a wall-clock budget as the CIFAR-10 recipe does (calibration after 10 + 30 steps; the
step count only shrinks; the cosine is stretched over the new length).

Evaluation: batched greedy generation (``generate``, left padding, ``do_sample=False``, ``num_beams=1``) of at most
``max_new_tokens`` tokens, decoded without special tokens, scored by exact match after LLaVA's GQA normalisation
(:func:`visionfx.evaluation.vqa_metrics.exact_match`), overall and per category (yes/no, shape, color). Any
visual-token patch on the model (it wraps ``generate``) is evaluated the same way.

Output folder: ``save_pretrained`` of the model (fp32 weights, generation config with ``</s>`` as end) and of the
``LlavaProcessor`` (tokenizer, ``CLIPImageProcessor``, chat template), so ``visionfx.evaluation.vqa.load_llava`` and
``visionfx eval vqa --model DIR`` load it; plus ``train_log.json`` and ``easy_vqa.json`` (accuracy, steps, times).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from visionfx.recovery.config import Recipe, _check, check_fields, check_mixed_precision
from visionfx.recovery.easy_vqa_data import BOS, EOS, IMAGE, PAD, EasyVQA, VqaAugment, VqaSplit, build_processor, \
    normalize_images
from visionfx.recovery.engine import (RunLog, StageClock, adamw_warmup_cosine, budgeted_training, device_name,
                                      start_run)

__all__ = ["TrainVQAConfig", "build_llava_config", "build_model", "train_easy_vqa", "evaluate_vqa", "generate_batch"]


@dataclass(frozen=True)
class TrainVQAConfig(Recipe):
    """The easy-VQA tiny LLaVA recipe (module docstring); every field is a key of ``configs/train-easy-vqa.yaml``.

    Model: ``image_size``/``patch_size`` and ``vision_*`` (CLIP tower), ``text_*`` (Llama), ``projector_act``.
    Training: ``epochs`` (an upper bound when ``time_budget`` is set; may be fractional), ``max_steps`` (cap, smoke
    tests), ``batch_size`` (per process), ``lr``, ``min_lr_ratio``, ``weight_decay``, ``warmup_steps``, ``beta2``,
    ``grad_clip``, ``translate``/``flip`` (augmentation), ``mixed_precision``, ``time_budget`` (seconds of training)
    with ``calibrate_steps`` (timed steps that size it), ``seed``, ``cpu``.
    Evaluation: ``eval_every`` steps (0: only at the end) on the first ``eval_limit`` test questions (None: all),
    ``eval_batch_size``, ``max_new_tokens``. ``limit``: keep the first N questions of each split (smoke runs).
    """

    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 256
    vision_layers: int = 4
    vision_heads: int = 4
    vision_mlp: int = 1024
    text_width: int = 256
    text_layers: int = 6
    text_heads: int = 4
    text_kv_heads: int = 4
    text_mlp: int = 768
    projector_act: str = "gelu"
    epochs: float = 40.0
    max_steps: int | None = None
    batch_size: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.01
    weight_decay: float = 0.05
    warmup_steps: int = 200
    beta2: float = 0.98
    grad_clip: float = 1.0
    translate: int = 4
    flip: bool = True
    mixed_precision: str = "auto"
    time_budget: float | None = None
    calibrate_steps: int = 30
    eval_every: int = 500
    eval_limit: int | None = 2048
    eval_batch_size: int = 1024
    max_new_tokens: int = 3
    limit: int | None = None
    seed: int = 0
    cpu: bool = False

    def __post_init__(self):
        check_fields(self,
                     ints_ge1=("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads",
                               "vision_mlp", "text_width", "text_layers", "text_heads", "text_kv_heads", "text_mlp",
                               "batch_size", "calibrate_steps", "eval_batch_size", "max_new_tokens"),
                     ints_ge0=("warmup_steps", "eval_every", "translate", "seed"))
        _check(self.image_size % self.patch_size == 0, f"image_size {self.image_size} must be a multiple of "
               f"patch_size {self.patch_size}")
        _check(self.vision_width % self.vision_heads == 0, "vision_width must be a multiple of vision_heads")
        _check(self.text_width % self.text_heads == 0, "text_width must be a multiple of text_heads")
        _check(self.text_heads % self.text_kv_heads == 0, "text_heads must be a multiple of text_kv_heads")
        _check(self.vision_layers >= 2, "vision_layers must be >= 2 (the features are the second-to-last layer's)")
        _check(self.text_layers >= 3, "text_layers must be >= 3 (VAR acts on layers 2..L-2)")
        check_fields(self, positive=("epochs", "lr", "beta2"))
        _check(self.beta2 < 1, f"beta2 must be < 1, got {self.beta2}")
        check_fields(self, nonnegative=("weight_decay", "grad_clip"), fractions=("min_lr_ratio",),
                     optional_ints_ge1=("max_steps", "eval_limit", "limit"), optional_positive=("time_budget",),
                     flags=("flip", "cpu"))
        check_mixed_precision(self.mixed_precision)

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def build_llava_config(config: TrainVQAConfig, vocab_size: int):
    """The ``LlavaConfig`` of the recipe (image token :data:`IMAGE`, 64 placeholders per image at the defaults)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=config.vision_width, intermediate_size=config.vision_mlp,
                              num_hidden_layers=config.vision_layers, num_attention_heads=config.vision_heads,
                              image_size=config.image_size, patch_size=config.patch_size, hidden_act="gelu")
    text = LlamaConfig(hidden_size=config.text_width, intermediate_size=config.text_mlp,
                       num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
                       num_key_value_heads=config.text_kv_heads, vocab_size=vocab_size, pad_token_id=PAD,
                       bos_token_id=BOS, eos_token_id=EOS, max_position_embeddings=256, tie_word_embeddings=False)
    llava = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE,
                        image_seq_length=config.image_tokens, vision_feature_layer=-2,
                        vision_feature_select_strategy="default", projector_hidden_act=config.projector_act)
    llava.pad_token_id = PAD
    return llava


def build_model(config: TrainVQAConfig, vocab_size: int):
    """A randomly initialised ``LlavaForConditionalGeneration`` whose generation config is greedy and stops at
    ``</s>``."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration(build_llava_config(config, vocab_size))
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = BOS, EOS, PAD
    gen.do_sample, gen.num_beams, gen.max_new_tokens = False, 1, config.max_new_tokens
    return model


# --- evaluation ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_batch(model, batch: dict[str, torch.Tensor], max_new_tokens: int = 3) -> torch.Tensor:
    """Greedy answers ``[B, T]`` (new tokens only) of a left-padded batch with ``images`` (uint8) or
    ``pixel_values``."""
    pixel_values = batch.get("pixel_values")
    if pixel_values is None:
        pixel_values = normalize_images(batch["images"])
    dtype = next(model.parameters()).dtype
    ids = batch["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=batch["attention_mask"], pixel_values=pixel_values.to(dtype),
                         do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=PAD,
                         eos_token_id=EOS, use_cache=True)
    return out[:, ids.shape[1]:]


def evaluate_vqa(model, split: VqaSplit, tokenizer, *, batch_size: int = 1024, max_new_tokens: int = 3,
                 limit: int | None = None, progress: bool = False, desc: str = "eval", on_batch=None,
                 keep_predictions: bool = False) -> dict:
    """Exact-match accuracy (percent) of greedy answers on ``split`` (the first ``limit`` questions).

    ``on_batch(batch, new_tokens)`` is called after each batch (the fidelity script reads DyVTE's exit layers there).
    Returns ``{"accuracy", "count", "by_category": {c: {"accuracy", "count"}}, "predictions"?}``."""
    from tqdm.auto import tqdm

    from visionfx.evaluation.vqa_metrics import exact_match

    n = len(split) if limit is None else min(limit, len(split))
    device = next(model.parameters()).device
    mode = model.training
    model.eval()
    preds: list[str] = []
    bar = tqdm(total=n, desc=desc, unit="q", disable=not progress, leave=False, dynamic_ncols=True)
    try:
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(start + batch_size, n), device=split.image.device)
            batch = {k: v.to(device) for k, v in split.batch(idx).items()}
            new = generate_batch(model, batch, max_new_tokens)
            if on_batch is not None:
                on_batch(batch, new)
            preds += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
            bar.update(len(idx))
    finally:
        bar.close()
        model.train(mode)
    hits = [exact_match(p, a) for p, a in zip(preds, split.answers[:n])]
    groups: dict[str, list[float]] = {}
    for h, c in zip(hits, split.categories[:n]):
        groups.setdefault(c, []).append(h)
    out = {"accuracy": 100.0 * sum(hits) / max(n, 1), "count": n,
           "by_category": {c: {"accuracy": 100.0 * sum(v) / len(v), "count": len(v)} for c, v in sorted(groups.items())}}
    if keep_predictions:
        out["predictions"] = preds
    return out


# --- training ------------------------------------------------------------------------------------------------------


def _answer_loss(model, batch: dict, pixel_values: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the answer word and ``</s>`` (the last two tokens of every left-padded row)."""
    ids = batch["input_ids"]
    out = model(input_ids=ids, attention_mask=batch["attention_mask"], pixel_values=pixel_values, logits_to_keep=3,
                use_cache=False)
    logits = out.logits[:, :2].float()  # positions -3 and -2 predict tokens -2 (answer) and -1 (</s>)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, -2:].reshape(-1))


def _batches(n: int, batch_size: int, seed: int, rank: int, world: int, device):
    """Indices of training batches, a pure function of ``(seed, epoch)``; process ``rank`` takes its slice of each
    global batch of ``world · batch_size``."""
    epoch, per = 0, batch_size * world
    while True:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - per + 1 if n >= per else 1, per):
            chunk = perm[i:i + per]
            yield chunk[rank * batch_size:(rank + 1) * batch_size].to(device)
        epoch += 1


def train_easy_vqa(config: TrainVQAConfig, data: EasyVQA | str | os.PathLike,
                   output_dir: str | os.PathLike | None = None, *, progress: bool = True) -> dict:
    """Train the tiny LLaVA on easy-VQA (``data``: an :class:`EasyVQA` or the archive/folder path) and, with
    ``output_dir``, save it there (module docstring).

    Returns:
        ``{"model", "processor", "data", "accuracy", "by_category", "steps", "planned_steps", "seconds",
        "gpu_seconds", "examples", "device"}``; the model is in eval mode on the training device.
    """
    from tqdm.auto import tqdm

    acc = start_run(config.mixed_precision, 1, config.cpu, config.seed)
    if not isinstance(data, EasyVQA):
        data = EasyVQA(data, image_tokens=config.image_tokens, limit=config.limit)
    if data.image_tokens != config.image_tokens:
        raise ValueError(f"the data was built with {data.image_tokens} image tokens, the model has "
                         f"{config.image_tokens}")
    data.to(acc.device)
    tok = data.tokenizer
    model = build_model(config, len(tok))
    per_epoch = max(1, len(data.train) // (config.batch_size * acc.num_processes))
    planned = max(1, round(config.epochs * per_epoch))
    if config.max_steps is not None:
        planned = min(planned, config.max_steps)
    warmup = min(config.warmup_steps, planned // 2)
    opt, schedule, sched = adamw_warmup_cosine(model.named_parameters(), config.lr, config.weight_decay, planned,
                                               warmup, config.min_lr_ratio, betas=(0.9, config.beta2))
    model_p, opt, sched = acc.prepare(model, opt, sched)
    augment = VqaAugment(config.translate, config.flip, seed=config.seed + 1)
    out = None if output_dir is None else Path(output_dir)
    log = RunLog(None if out is None else out / "train_log.json",
                 meta={"config": config.to_dict(), "device": str(acc.device), "processes": acc.num_processes,
                       "mixed_precision": acc.mixed_precision, "planned_steps": planned, "vocab": len(tok),
                       "train_questions": len(data.train), "test_questions": len(data.test)})
    batches = _batches(len(data.train), config.batch_size, config.seed + 2, acc.process_index, acc.num_processes,
                       acc.device)
    clock = StageClock(acc.device)
    unwrapped = acc.unwrap_model(model_p)

    def loss_fn(step):
        batch = data.train.batch(next(batches))
        pixel_values = augment(batch["images"], step)
        with acc.autocast():
            return _answer_loss(model_p, batch, pixel_values)

    def on_eval(step):
        if not acc.is_main_process:
            return
        with acc.autocast():
            ev = evaluate_vqa(unwrapped, data.test, tok, batch_size=config.eval_batch_size,
                              max_new_tokens=config.max_new_tokens, limit=config.eval_limit)
        log.data["evals"].append({"step": step, "accuracy": ev["accuracy"], "count": ev["count"]})
        tqdm.write(f"step {step}: test accuracy {ev['accuracy']:.2f}% ({ev['count']} questions)")
        log.write(acc)

    step = budgeted_training(acc, model_p, opt, sched, schedule, loss_fn, planned=planned, log=log, clock=clock,
                             grad_clip=config.grad_clip, time_budget=config.time_budget,
                             calibrate_steps=config.calibrate_steps, eval_every=config.eval_every, on_eval=on_eval,
                             progress=progress, desc="train easy-vqa")
    model = acc.unwrap_model(model_p, keep_fp32_wrapper=False).eval()
    ev = evaluate_vqa(model, data.test, tok, batch_size=config.eval_batch_size, max_new_tokens=config.max_new_tokens,
                      progress=progress and acc.is_local_main_process, desc="test easy-vqa")
    log.data["evals"].append({"step": step, "accuracy": ev["accuracy"], "count": ev["count"], "final": True})
    examples = step * config.batch_size * acc.num_processes
    summary = {"accuracy": ev["accuracy"], "by_category": ev["by_category"], "test_questions": ev["count"],
               "steps": step, "planned_steps": planned, "seconds": clock.seconds,
               "gpu_seconds": clock.seconds * acc.num_processes, "examples": examples,
               "device": device_name(acc.device)}
    log.stage("train").update(summary)
    log.write(acc)
    processor = build_processor(tok, config.image_size, config.patch_size)
    if out is not None and acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        processor.save_pretrained(out)
        (out / "easy_vqa.json").write_text(json.dumps({**summary, "config": config.to_dict()}, indent=1) + "\n")
    acc.wait_for_everyone()
    return {**summary, "model": model, "processor": processor, "data": data}
