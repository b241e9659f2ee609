"""``visionfx.distill``: recover the accuracy of a patched model (METHODS.md §10).

``distill(model, "agent", data, stage1_steps=..., stage2_steps=...)`` patches ``model`` (unless it already is), lets
mixers with an output scale calibrate it to the host on one batch (vig; ``output_calibration``), runs stage 1
(attention transfer, :mod:`~visionfx.recovery.attention_transfer`) and stage 2 (fine-tuning with logit
distillation, :mod:`~visionfx.recovery.finetune`), then PRepBN's ``recalibrate_bn`` and optionally
``reparameterize``, and returns the model with a log. Training runs on ``accelerate`` (one GPU, several GPUs under
``accelerate launch``, or the CPU) with mixed precision and gradient accumulation.

With ``output_dir`` it writes ``distill_log.json`` (losses, per-layer attention-transfer errors, accuracies, time
per stage), checkpoints (``checkpoints/``, see :mod:`~visionfx.recovery.engine`; ``resume=True`` continues from the
newest) and ``final/`` (``visionfx.save_pretrained`` output plus ``model.safetensors``, the whole state dict: stage 2
changes the host weights too). :func:`load_distilled` rebuilds such a model.

Decisions: the teacher of stage 2 is a deep copy of ``model`` taken before patching (or an unpatched copy of an
already patched model); stages use separate optimisers (AdamW, warm-up then cosine decay); a stage whose model has
nothing to train (e.g. ``agentsd`` in stage 1) is skipped and says so in the log; parameters the caller had frozen
stay frozen in stage 2.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import nn

from visionfx.recovery.attention_transfer import AttentionTransferLoss, calibrate_outputs, transfer_parameters
from visionfx.recovery.config import DistillConfig
from visionfx.recovery.data import GpuAugment, ImageData, _seed, load_image_data, tensor_data
from visionfx.recovery.engine import (RunLog, StageClock, adamw_warmup_cosine, evaluate, latest_checkpoint,
                                      save_checkpoint, start_run, StepBudget, sync_gradients)
from visionfx.recovery.finetune import DistillationLoss, feature_taps, freeze_teacher, prepbn_norms, recalibrate
from visionfx.recovery.lora import add_lora, merge_lora

__all__ = ["distill", "DistillResult", "resolve_method", "load_distilled"]

STAGES = {"stage1": 1, "stage2": 2}


@dataclass
class DistillResult:
    """What :func:`distill` returns: the model (patched, trained, in eval mode), top-1 accuracy at ``start`` (patched,
    untrained), after ``stage1``, after ``stage2`` and ``final`` (after PRepBN recalibration/folding), the log and
    the output folder."""

    model: nn.Module
    top1: dict[str, float | None]
    log: dict
    output_dir: Path | None


def resolve_method(method, prepbn_steps: int | None = None, default_prepbn_steps: int = 1):
    """A method config from a name, a YAML path, a mapping or a config object, with PRepBN's schedule length filled
    in where the method needs one and none was given (``prepbn_steps``, else ``default_prepbn_steps``)."""
    from visionfx.config import MethodConfig, config_from_dict
    from visionfx.methods.prepbn import PRepBNConfig
    from visionfx.registry import get_method

    if isinstance(method, MethodConfig):
        return method
    if isinstance(method, os.PathLike) or (isinstance(method, str) and method.endswith((".yaml", ".yml"))):
        data = yaml.safe_load(Path(method).read_text()) or {}
    elif isinstance(method, str):
        data = {"method": method}
    elif isinstance(method, dict):
        data = dict(method)
    else:
        raise TypeError(f"method must be a name, a YAML path, a mapping or a config, got {type(method).__name__}")
    if "method" not in data:
        raise ValueError("a method config needs a 'method' key")
    cls = get_method(data["method"]).config_cls
    names = {f.name for f in dataclasses.fields(cls)}
    # the schedule counts training forwards of stage 2, so its natural length is only known here
    if issubclass(cls, PRepBNConfig) and (prepbn_steps or data.get("total_steps") is None):
        data["total_steps"] = prepbn_steps or data.get("total_steps") or default_prepbn_steps
    elif "prepbn_steps" in names and data.get("norm") == "prepbn" and (prepbn_steps or
                                                                     data.get("prepbn_steps") is None):
        data["prepbn_steps"] = prepbn_steps or data.get("prepbn_steps") or default_prepbn_steps
    return config_from_dict(data)


def _as_data(data) -> ImageData:
    if isinstance(data, ImageData):
        return data
    if isinstance(data, (str, os.PathLike)):
        return load_image_data(data)
    if isinstance(data, torch.Tensor):
        return tensor_data(data)
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], torch.Tensor):
        return tensor_data(*data)
    raise TypeError("data must be an ImageData (visionfx.recovery.load_image_data / tensor_data), a path, "
                    f"or uint8 image tensors (images[, labels]); got {type(data).__name__}")


class _Run:
    """State shared by the stages of one :func:`distill` call."""

    def __init__(self, cfg: DistillConfig, accelerator, data: ImageData, log: RunLog, output_dir, progress, callback):
        self.cfg, self.acc, self.data, self.log = cfg, accelerator, data, log
        self.output_dir, self.progress, self.callback = output_dir, progress, callback
        self.normalize = GpuAugment(data.mean, data.std).normalize
        self.last_saved: tuple[str, int] | None = None

    def evaluate(self, model, tag: str, step: int) -> float | None:
        top1 = evaluate(model, self.data.eval, self.normalize, self.acc, self.cfg.eval_batch_size)
        self.log.eval(tag, step, top1)
        self.log.write(self.acc)
        return top1

    def save(self, stage: str, step: int, model, clock: StageClock) -> None:
        if self.output_dir is None or self.last_saved == (stage, step):
            return
        progress = {"order": STAGES[stage], "clock": clock.seconds, "log": self.log.data}
        save_checkpoint(self.acc, self.output_dir, stage, step, progress, self.acc.unwrap_model(model),
                        self.cfg.keep_checkpoints)
        self.last_saved = (stage, step)

    def train(self, stage: str, steps: int, batch_size: int, loss_fn: Callable, model_p, opt, sched, params,
              augment: GpuAugment, start: int = 0, clock_seconds: float = 0.0, manual_sync: bool = False,
              time_budget: float | None = None, on_fit: Callable[[int], None] | None = None) -> None:
        """Optimiser steps ``start..steps`` of ``stage``: micro-batches, accumulation, clipping, logs, evaluations,
        checkpoints, the callback. With ``time_budget`` (seconds of this stage's clock) a :class:`StepBudget` times a
        window of steps and the step count shrinks (never grows) to fit; ``on_fit(steps)`` then shortens the
        schedules. The fitted count is logged (``budget_steps``) and kept on resume."""
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.acc
        accum = cfg.grad_accum
        order = STAGES[stage]
        batches = self.data.train.train_batches(batch_size, seed=_seed(cfg.seed, order), start=start * accum,
                                                rank=acc.process_index, world=acc.num_processes, device=acc.device)
        clock = StageClock(acc.device, clock_seconds)
        summary = self.log.stage(stage)
        fitted = summary.get("budget_steps") if time_budget is not None else None  # fitted before an interruption
        steps = fitted or steps
        summary.update(steps=steps, batch_size=batch_size, grad_accum=accum, processes=acc.num_processes)
        # a resumed run calibrates afresh unless the count was fitted before the interruption
        budget = StepBudget(time_budget, cfg.calibrate_steps, start) if time_budget is not None and not fitted else None
        bar = tqdm(total=steps, initial=start, desc=stage, disable=not (self.progress and acc.is_local_main_process),
                   dynamic_ncols=True)
        sums: dict[str, torch.Tensor] = {}
        count = 0
        clock.start()
        for step in range(start, steps):
            for j in range(accum):
                x, y = next(batches)
                x, y = augment(x, y, step * accum + j)
                with acc.accumulate(model_p):
                    with acc.autocast():
                        loss, metrics = loss_fn(x, y)
                    acc.backward(loss)
                    if acc.sync_gradients:
                        if manual_sync:
                            sync_gradients(params, acc)
                        if cfg.grad_clip > 0:
                            acc.clip_grad_norm_(params, cfg.grad_clip)
                    opt.step()
                    if acc.sync_gradients:
                        sched.step()
                    opt.zero_grad(set_to_none=True)
                for k, v in {"loss": loss.detach(), **metrics}.items():
                    sums[k] = sums[k] + v if k in sums else v.clone()
                count += 1
            done = step + 1
            if done == 1:  # includes one-off costs (kernel compilation, autotuning, allocator warm-up)
                summary["first_step_seconds"] = clock.elapsed()
            fit = budget.after_step(done, steps, clock) if budget is not None else None
            if fit is not None:
                summary.update(step_seconds=budget.per_step, budget_steps=fit, planned_steps=steps,
                               time_budget=time_budget)
                if fit < steps:
                    steps = summary["steps"] = bar.total = fit
                    if on_fit is not None:
                        on_fit(steps)
            if done % cfg.log_every == 0 or done == steps:
                record = {k: _plain(v / count) for k, v in sums.items()}
                record.update(step=done, lr=sched.get_last_lr()[0])
                self.log.record(stage, **record)
                bar.set_postfix(loss=f"{record['loss']:.4g}")
                sums, count = {}, 0
            pause = (cfg.eval_every and done % cfg.eval_every == 0 and done < steps) or \
                (cfg.save_every and done % cfg.save_every == 0)
            if pause:
                clock.stop()
                if cfg.eval_every and done % cfg.eval_every == 0 and done < steps:
                    self.evaluate(acc.unwrap_model(model_p), stage, done)
                summary.update(seconds=clock.seconds, gpu_seconds=clock.seconds * acc.num_processes)
                if cfg.save_every and done % cfg.save_every == 0:
                    self.save(stage, done, model_p, clock)
                clock.start()
            bar.update(1)
            if self.callback is not None:
                self.callback(stage, done)
            if done >= steps:  # the budget shortened the stage
                break
        clock.stop()
        bar.close()
        images = steps * accum * batch_size * acc.num_processes
        summary.update(seconds=clock.seconds, gpu_seconds=clock.seconds * acc.num_processes, images=images)
        self.save(stage, steps, model_p, clock)
        self.log.write(acc)


def _plain(v: torch.Tensor):
    v = v.detach().float().cpu()
    return float(v) if v.dim() == 0 else [float(t) for t in v]


def _optimiser(named, lr, weight_decay, warmup, steps, added_lr_mult=1.0):
    """``(optimiser, schedule, scheduler)``, see :func:`~visionfx.recovery.engine.adamw_warmup_cosine`."""
    return adamw_warmup_cosine(named, lr, weight_decay, steps, round(warmup * steps), added_lr_mult=added_lr_mult)


def distill(model: nn.Module, method_or_config=None, data=None, *, stage1_steps: int | None = None,
            stage2_steps: int | None = None, config: DistillConfig | str | os.PathLike | dict | None = None,
            output_dir: str | os.PathLike | None = None, resume: bool = False, mean=None, std=None,
            callback: Callable[[str, int], None] | None = None, progress: bool = True, **overrides) -> DistillResult:
    """Patch ``model`` with a method and recover its accuracy: attention transfer, then distillation fine-tuning.

    Args:
        model: an unpatched model (patched here with ``method_or_config``), or a patched one (then
            ``method_or_config`` must be None).
        method_or_config: a method name, YAML recipe, mapping or method config; PRepBN's schedule length is filled
            in (see :attr:`DistillConfig.prepbn_steps`).
        data: :class:`~visionfx.recovery.data.ImageData`, an archive or folder path, or uint8 tensors
            ``(images [N, 3, H, W][, labels [N]])``. Stage 2's cross-entropy and the accuracies need labels.
        stage1_steps, stage2_steps: optimiser steps of each stage (override ``config``).
        config: a :class:`DistillConfig`, a YAML recipe (``configs/distill-*.yaml``) or a mapping; ``**overrides``
            are its fields.
        output_dir: where the log, checkpoints and the final model go (None: nothing is written).
        resume: continue from the newest checkpoint in ``output_dir``.
        mean, std: input normalisation (default: the data's).
        callback: called as ``callback(stage, step)`` after every optimiser step.
        progress: show progress bars.

    Returns:
        :class:`DistillResult`; ``result.model`` is ``model``, patched and trained in place, in eval mode.
    """
    import visionfx

    if isinstance(config, DistillConfig):
        cfg = config.replace(**{k: v for k, v in overrides.items() if v is not None}) if overrides else config
    elif config is None or isinstance(config, dict):
        cfg = DistillConfig.from_dict(config, **overrides)
    else:
        cfg = DistillConfig.load(config, **overrides)
    cfg = cfg.replace(**{k: v for k, v in (("stage1_steps", stage1_steps), ("stage2_steps", stage2_steps))
                         if v is not None})
    if resume and output_dir is None:
        raise ValueError("resume=True needs the output_dir of the run to continue")
    data = _as_data(data)
    if mean is not None or std is not None:
        data = dataclasses.replace(data, mean=tuple(mean or data.mean), std=tuple(std or data.std))
    acc = start_run(cfg.mixed_precision, cfg.grad_accum, cfg.cpu, cfg.seed)
    data = data.to(acc.device)
    output_dir = None if output_dir is None else Path(output_dir)
    found = latest_checkpoint(output_dir) if resume else None
    if resume and found is None:
        raise FileNotFoundError(f"resume=True: no checkpoint under {output_dir / 'checkpoints'}")

    trainable_before = {id(p): p.requires_grad for p in model.parameters()}
    # the teacher: the model as it is now, without the patch
    if visionfx.is_patched(model):
        if method_or_config is not None:
            raise ValueError("the model is already patched: pass method_or_config=None, or unpatch it first")
        teacher = visionfx.unpatch(copy.deepcopy(model))
    else:
        teacher = copy.deepcopy(model)
        method = resolve_method(method_or_config, cfg.prepbn_steps, cfg.default_prepbn_steps)
        visionfx.patch(model, method, adapter=_adapter_for(model, method))
    teacher = freeze_teacher(teacher).to(acc.device)
    model.to(acc.device)

    method_name = type(visionfx.get_config(model)).method
    meta = {"method": method_name, "method_config": _method_dict(model), "distill_config": cfg.to_dict(),
            "processes": acc.num_processes, "mixed_precision": acc.mixed_precision, "device": str(acc.device)}
    log = RunLog(None if output_dir is None else output_dir / "distill_log.json",
                 data=found[1]["log"] if found else None, meta=meta)
    run = _Run(cfg, acc, data, log, output_dir, progress, callback)
    done_order = found[1]["order"] if found else 0
    top1: dict[str, float | None] = {e["stage"]: e["top1"] for e in log.data["evals"]}

    if not found and cfg.eval_at_start:
        top1["start"] = run.evaluate(model, "start", 0)

    # --- output scales from the host (one batch, the same on every process) ----------------------------------------
    if not found and cfg.output_calibration:
        model.eval()
        x, _ = next(data.train.train_batches(cfg.stage1_batch_size, seed=_seed(cfg.seed, 0), device=acc.device))
        calibrated = calibrate_outputs(model, GpuAugment(data.mean, data.std).normalize(x))
        if calibrated:
            log.data["calibrated_sites"] = calibrated

    # --- stage 1: attention transfer -------------------------------------------------------------------------------
    if done_order <= 1 and cfg.stage1_steps > 0:
        if cfg.lora_rank:
            add_lora(model, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha)
        named = transfer_parameters(model)
        if not named:
            log.stage("stage1").update(skipped="the patch added no parameters to train")
        else:
            chosen = {id(p) for _, p in named}
            for p in model.parameters():
                p.requires_grad_(id(p) in chosen)
            model.eval()
            opt, _, sched = _optimiser(named, cfg.stage1_lr, cfg.stage1_weight_decay, cfg.stage1_warmup,
                                       cfg.stage1_steps)
            # no DDP wrapper: the layers are called directly, so gradients are averaged by hand (manual_sync)
            model_p = acc.prepare_model(model, evaluation_mode=True)
            opt, sched = acc.prepare(opt, sched)
            start, clock = 0, 0.0
            if found and done_order == 1:
                acc.load_state(str(found[0] / "accelerate"))
                start, clock = int(found[1]["step"]), float(found[1]["clock"])
            loss_fn = AttentionTransferLoss(model)
            augment = GpuAugment(data.mean, data.std, crop_padding=cfg.crop_padding, flip=cfg.flip,
                                 seed=_seed(cfg.seed, 1))
            run.train("stage1", cfg.stage1_steps, cfg.stage1_batch_size, lambda x, y: loss_fn(x), model_p, opt,
                      sched, [p for _, p in named], augment, start, clock, manual_sync=True)
            model = _release(acc, model_p)
            del model_p, opt, sched
        merge_lora(model)
        top1["stage1"] = run.evaluate(model, "stage1", cfg.stage1_steps)

    # --- stage 2: fine-tuning with distillation ----------------------------------------------------------------------
    if cfg.stage2_steps > 0:
        for n, p in model.named_parameters():
            added = id(p) not in trainable_before or _is_added(n)  # created by the patch
            p.requires_grad_(added or (cfg.finetune == "all" and trainable_before[id(p)]))
        model.train()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        opt, schedule, sched = _optimiser(named, cfg.stage2_lr, cfg.stage2_weight_decay, cfg.stage2_warmup,
                                          cfg.stage2_steps, cfg.stage2_added_lr_mult)
        model_p, opt, sched = acc.prepare(model, opt, sched)
        start, clock = 0, 0.0
        if found and done_order == 2:
            acc.load_state(str(found[0] / "accelerate"))
            start, clock = int(found[1]["step"]), float(found[1]["clock"])
        # hooks before compiling, so that the compiled forwards record the features
        taps = feature_taps(model, teacher, cfg.feature_site) if cfg.feature_weight > 0 else None
        student_fwd = torch.compile(model_p) if cfg.compile else model_p
        teacher_fwd = torch.compile(teacher) if cfg.compile else teacher
        loss_fn = DistillationLoss(student_fwd, teacher_fwd, temperature=cfg.temperature, kd_weight=cfg.kd_weight,
                                   ce_weight=cfg.ce_weight, label_smoothing=cfg.label_smoothing,
                                   feature_weight=cfg.feature_weight, taps=taps)
        augment = GpuAugment(data.mean, data.std, crop_padding=cfg.crop_padding, flip=cfg.flip,
                             mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, mix_prob=cfg.mix_prob,
                             num_classes=data.num_classes, seed=_seed(cfg.seed, 2))
        budget = None
        if cfg.time_budget is not None:  # GPU seconds left after stage 1, as this process's wall clock
            used = float(log.data["stages"].get("stage1", {}).get("gpu_seconds", 0.0))
            budget = max(0.0, cfg.time_budget - used) / acc.num_processes

        def fit(steps: int) -> None:
            schedule.total = steps
            for norm in prepbn_norms(model):
                norm.rescale_schedule(steps / cfg.stage2_steps)

        try:
            run.train("stage2", cfg.stage2_steps, cfg.stage2_batch_size, loss_fn, model_p, opt, sched,
                      [p for _, p in named], augment, start, clock, time_budget=budget, on_fit=fit)
        finally:  # an interrupted stage 2 leaves no hooks on the user's model
            for t in taps or ():
                t.remove()
        model = _release(acc, model_p)
        del model_p, opt, sched, student_fwd, loss_fn
        top1["stage2"] = run.evaluate(model, "stage2", cfg.stage2_steps)

    # --- PRepBN: recalibrate, fold ----------------------------------------------------------------------------------
    for p in model.parameters():
        p.requires_grad_(trainable_before.get(id(p), True))
    model.eval()
    if prepbn_norms(model):
        if cfg.recalibrate_steps:
            batches = (run.normalize(x) for x, _ in data.train.train_batches(
                cfg.eval_batch_size, seed=_seed(cfg.seed, 3), rank=acc.process_index, world=acc.num_processes,
                device=acc.device))
            with acc.autocast():
                recalibrate(model, batches, cfg.recalibrate_steps, acc)
            log.stage("prepbn").update(recalibrate_steps=cfg.recalibrate_steps)
    if output_dir is not None and acc.is_main_process:
        _save_final(model, output_dir / "final", cfg.reparameterize and bool(prepbn_norms(model)))
    if prepbn_norms(model):
        if cfg.reparameterize:
            visionfx.reparameterize(model)
            log.stage("prepbn").update(reparameterized=True)
        top1["final"] = run.evaluate(model, "final", cfg.stage2_steps)
    else:
        top1["final"] = top1.get("stage2", top1.get("stage1", top1.get("start")))
    log.write(acc)
    acc.wait_for_everyone()
    return DistillResult(model, top1, log.data, output_dir)


def _is_added(name: str) -> bool:
    return any(part.startswith("vfx_") for part in name.split("."))


def _release(acc, model_p) -> nn.Module:
    """The plain model back from ``accelerate`` at the end of a stage, ready to be prepared afresh by the next."""
    model = acc.unwrap_model(model_p, keep_fp32_wrapper=False)
    acc.free_memory()
    model.__dict__.pop("_is_accelerate_prepared", None)  # else the next prepare() would skip wrapping it
    return model


def _adapter_for(model: nn.Module, method) -> str:
    """The adapter of ``model`` for ``method``'s own site, named explicitly so that a companion site (slab's PRepBN
    norms) uses the same one: auto-detection runs again for companions and no longer recognises a timm ViT whose
    attention modules are all wrapped already."""
    from visionfx.registry import find_adapter, get_method

    return find_adapter(model, get_method(type(method).method).site).name


def _method_dict(model) -> dict[str, Any]:
    import visionfx
    from visionfx.config import config_to_dict

    return config_to_dict(visionfx.get_config(model))


def _save_final(model: nn.Module, directory: Path, fold: bool) -> None:
    """``save_pretrained`` plus the whole state dict, both unfolded (folded weights are recomputed on load)."""
    import json

    from safetensors.torch import save_model

    import visionfx

    visionfx.save_pretrained(model, directory)
    save_model(model, str(directory / "model.safetensors"))
    (directory / "distill.json").write_text(json.dumps({"reparameterize": fold}) + "\n")


def load_distilled(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Rebuild a distilled model from a ``final/`` folder written by :func:`distill`: patch the freshly built base
    ``model`` as saved, load the whole trained state dict, and fold PRepBN again if the run did. Returns ``model``
    in eval mode."""
    import json

    from safetensors.torch import load_model

    import visionfx

    directory = Path(directory)
    visionfx.load_pretrained(model, directory)
    missing, unexpected = load_model(model, str(directory / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(f"{directory}: state dict does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.eval()
    info = directory / "distill.json"
    if info.is_file() and json.loads(info.read_text()).get("reparameterize"):
        visionfx.reparameterize(model)
    return model
