"""Training plumbing shared by ``distill`` and the reference recipe: accelerator, schedules, evaluation, timing,
the JSON log and checkpoints.

Checkpoints are folders ``<output>/checkpoints/<stage>-step<NNNNNNN>/`` holding ``accelerate/`` (what
``Accelerator.save_state`` writes: model, optimiser, scheduler, gradient scaler, RNG states), ``progress.json`` (stage,
step and the log so far) and, for patched models, ``visionfx/`` (``visionfx.save_pretrained``). A checkpoint is
written to a temporary name and renamed when complete, so an interrupted save never looks like a checkpoint.

Timing: a stage's time is wall-clock time with the device synchronised at both ends, evaluation excluded;
``gpu_seconds`` is that time multiplied by the number of processes (devices).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["make_accelerator", "start_run", "device_name", "WarmupCosine", "param_groups", "adamw_warmup_cosine",
           "evaluate", "StageClock", "RunLog", "save_checkpoint", "latest_checkpoint", "sync_gradients", "synchronize",
           "steps_that_fit", "StepBudget", "kd_loss", "budgeted_training"]


def make_accelerator(mixed_precision: str = "auto", grad_accum: int = 1, cpu: bool = False):
    """An ``accelerate.Accelerator`` with ``mixed_precision`` (``auto``: bf16 on CUDA, else off) and
    ``grad_accum`` micro-batches per optimiser step; the scheduler steps once per call (we call it per optimiser
    step). In a single process, settings that differ from an earlier accelerator's replace them."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and not cpu else "no"
    kwargs = dict(mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum, cpu=cpu,
                  step_scheduler_with_optimizer=False)
    try:
        return Accelerator(**kwargs)
    except ValueError as e:
        # accelerate keeps one process-wide state; one process running several recipes (tests, the fidelity
        # script) may change its settings between them, which several processes must never do
        if "already been initialized" not in str(e) or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(**kwargs)


def start_run(mixed_precision: str, grad_accum: int, cpu: bool, seed: int):
    """The accelerator of a training run (:func:`make_accelerator`), with every RNG seeded and, on CUDA, TF32 allowed
    for the fp32 matmuls outside autocast."""
    from accelerate.utils import set_seed

    acc = make_accelerator(mixed_precision, grad_accum, cpu)
    set_seed(seed)
    if acc.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return acc


def device_name(device) -> str:
    """The GPU's name on CUDA, else the device type (``"cpu"``)."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


class WarmupCosine:
    """LR factor at optimiser step ``s``: linear warm-up over ``warmup`` steps, then cosine from 1 to ``floor``
    at ``total``. A plain object, so ``LambdaLR.state_dict`` saves ``total`` and ``warmup``."""

    def __init__(self, total: int, warmup: int, floor: float = 0.0):
        self.total, self.warmup, self.floor = max(1, int(total)), int(warmup), float(floor)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * t))


def param_groups(named: Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float,
                 added_lr_mult: float = 1.0) -> list[dict]:
    """AdamW groups: weight decay on matrices and kernels only (not biases, norms, scalars, embeddings' tokens);
    the parameters a patch added (a ``vfx_`` name component) get ``lr · added_lr_mult``."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in named:
        if not p.requires_grad:
            continue
        decay = p.dim() >= 2 and not name.endswith(("cls_token", "reg_token", "dist_token", "pos_embed"))
        added = any(part.startswith("vfx_") for part in name.split("."))
        groups.setdefault((decay, added), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr": lr * (added_lr_mult if added else 1)}
            for (decay, added), ps in groups.items()]


def adamw_warmup_cosine(named: Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float, total: int,
                        warmup: int, floor: float = 0.0, added_lr_mult: float = 1.0, betas=(0.9, 0.999)):
    """``(optimiser, schedule, scheduler)``: AdamW over :func:`param_groups` and a ``LambdaLR`` following
    ``WarmupCosine(total, warmup, floor)`` (the schedule is returned too: the time budget may shorten it).
    Parameters all on CUDA get the fused AdamW kernels (one launch per step instead of several per tensor group:
    these small models' training steps are bound by launches)."""
    groups = param_groups(named, lr, weight_decay, added_lr_mult)
    fused = all(p.is_cuda and p.is_floating_point() for g in groups for p in g["params"]) and bool(groups)
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)
    schedule = WarmupCosine(total, warmup, floor)
    return opt, schedule, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class StageClock:
    """Accumulates synchronised wall-clock time of the training work of one stage (pause it for evaluation)."""

    def __init__(self, device, seconds: float = 0.0):
        self.device, self.seconds, self._t0 = device, float(seconds), None

    def start(self) -> None:
        synchronize(self.device)
        self._t0 = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds so far, the running interval included (synchronises the device)."""
        if self._t0 is None:
            return self.seconds
        synchronize(self.device)
        return self.seconds + time.perf_counter() - self._t0

    def stop(self) -> None:
        if self._t0 is not None:
            synchronize(self.device)
            self.seconds += time.perf_counter() - self._t0
            self._t0 = None


@torch.no_grad()
def evaluate(model: nn.Module, source, normalize, accelerator, batch_size: int = 256) -> float | None:
    """Top-1 accuracy of ``model`` on ``source`` (all processes' shares together), or None without labels.

    ``normalize`` maps ``uint8 [B, 3, H, W]`` to the model's input. The model's train/eval mode is restored.
    """
    if source is None:
        return None
    mode = model.training
    model.eval()
    counts = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    try:
        for x, y in source.eval_batches(batch_size, rank=accelerator.process_index, world=accelerator.num_processes,
                                        device=accelerator.device):
            if y is None:
                return None
            with accelerator.autocast():
                logits = model(normalize(x))
            counts[0] += (logits.argmax(-1) == y).sum()
            counts[1] += y.numel()
    finally:
        model.train(mode)
    counts = accelerator.reduce(counts, reduction="sum")
    return float(counts[0] / counts[1]) if counts[1] > 0 else None


def sync_gradients(params: list[nn.Parameter], accelerator) -> None:
    """Average gradients over processes where no DDP wrapper did (attention transfer calls the layers directly)."""
    if accelerator.num_processes == 1:
        return
    for p in params:
        if p.grad is not None:
            p.grad.copy_(accelerator.reduce(p.grad, reduction="mean"))


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) || softmax(student/T))``, averaged over the batch (logits ``[B, K]``)."""
    t = temperature
    return F.kl_div(F.log_softmax(student.float() / t, -1), F.log_softmax(teacher.float() / t, -1),
                    reduction="batchmean", log_target=True) * (t * t)


class RunLog:
    """The JSON log of a run: ``{"meta": ..., "stages": {name: {...summary, "history": [records]}}, "evals": [...]}``,
    rewritten at each :meth:`write` by the main process."""

    def __init__(self, path: str | os.PathLike | None, meta: dict | None = None, data: dict | None = None):
        self.path = None if path is None else Path(path)
        self.data = data or {"meta": meta or {}, "stages": {}, "evals": []}

    def stage(self, name: str) -> dict:
        return self.data["stages"].setdefault(name, {"history": []})

    def record(self, stage: str, **values) -> None:
        self.stage(stage)["history"].append(values)

    def eval(self, stage: str, step: int, top1: float | None) -> None:
        self.data["evals"].append({"stage": stage, "step": step, "top1": top1})

    def write(self, accelerator=None) -> None:
        if self.path is None or (accelerator is not None and not accelerator.is_main_process):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)


def save_checkpoint(accelerator, output_dir: str | os.PathLike, stage: str, step: int, progress: dict,
                    model: nn.Module | None = None, keep: int = 2) -> Path:
    """Write checkpoint ``<output_dir>/checkpoints/<stage>-step<step>`` (see the module docstring) and keep the
    newest ``keep`` checkpoints."""
    root = Path(output_dir) / "checkpoints"
    final = root / f"{stage}-step{step:07d}"
    tmp = root / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "accelerate"))
    if accelerator.is_main_process:
        if model is not None:
            from visionfx import is_patched, save_pretrained

            if is_patched(model):
                save_pretrained(model, tmp / "visionfx")
        (tmp / "progress.json").write_text(json.dumps({"stage": stage, "step": step, **progress}, default=str))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, old, _ in _checkpoints(root)[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(output_dir: str | os.PathLike) -> tuple[Path, dict] | None:
    """The newest complete checkpoint under ``<output_dir>/checkpoints`` and its progress record, or None."""
    found = _checkpoints(Path(output_dir) / "checkpoints")
    return (found[-1][1], found[-1][2]) if found else None


def _checkpoints(root: Path) -> list[tuple[tuple[int, int], Path, dict]]:
    """Complete checkpoints under ``root``, oldest first by (stage order, step)."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        f = p / "progress.json"
        if p.is_dir() and not p.name.startswith(".") and f.is_file():
            progress = json.loads(f.read_text())
            found.append(((int(progress.get("order", 0)), int(progress["step"])), p, progress))
    return sorted(found, key=lambda t: t[0])


def steps_that_fit(done: int, planned: int, budget: float, elapsed: float, per_step: float) -> int:
    """The step count of a loop that has run ``done`` of ``planned`` steps in ``elapsed`` of its ``budget`` seconds,
    at ``per_step`` seconds per step: shrunk to fit the budget, never grown, never below ``done``."""
    return max(done, min(planned, done + int(max(0.0, budget - elapsed) / per_step)))


class StepBudget:
    """Fits a training loop to ``budget`` seconds of its :class:`StageClock`: steps ``start + 10`` to ``start + 10 +
    calibrate_steps`` are timed (the first ten after ``start`` absorb one-off costs), and at the end of that window
    :meth:`after_step` returns the step count that fits (:func:`steps_that_fit`); ``per_step`` keeps the rate."""

    def __init__(self, budget: float, calibrate_steps: int, start: int = 0):
        self.budget, self.calibrate_steps, self.begin = float(budget), int(calibrate_steps), start + 10
        self.t0: float | None = None
        self.per_step: float | None = None

    def after_step(self, done: int, planned: int, clock: StageClock) -> int | None:
        """Call after each step with the steps done: the fitted count once, at the end of the window, else None."""
        if done == self.begin:
            self.t0 = clock.elapsed()
        elif self.t0 is not None and self.per_step is None and done == self.begin + self.calibrate_steps:
            now = clock.elapsed()
            self.per_step = (now - self.t0) / self.calibrate_steps
            return steps_that_fit(done, planned, self.budget, now, self.per_step)
        return None


def budgeted_training(acc, model_p: nn.Module, opt, sched, schedule: WarmupCosine, loss_fn, *, planned: int,
                      log: "RunLog", clock: StageClock, grad_clip: float = 0.0, time_budget: float | None = None,
                      calibrate_steps: int = 30, eval_every: int = 0, on_eval=None, progress: bool = True,
                      desc: str = "train") -> int:
    """The optimiser loop of the from-scratch recipes (the CIFAR-10 ViT, the easy-VQA LLaVA); returns the steps run.

    Each step: ``loss = loss_fn(step)`` (the caller's forward, under its autocast), backward, gradient clipping at
    ``grad_clip`` (0: none), optimiser and scheduler steps. The mean loss goes to ``log`` every 50 steps. With
    ``time_budget`` (seconds of ``clock``), ``calibrate_steps`` steps are timed after 10 untimed ones and the planned
    count shrinks (never grows) to fit, with the cosine ``schedule`` stretched over the new length. Every
    ``eval_every`` steps (0: never) before the last, ``on_eval(step)`` runs with the clock stopped.
    """
    from tqdm.auto import tqdm

    params = [p for p in model_p.parameters() if p.requires_grad]
    bar = tqdm(total=planned, desc=desc, disable=not (progress and acc.is_local_main_process), dynamic_ncols=True)
    total, step, loss_sum, n_loss = planned, 0, None, 0
    budget = StepBudget(time_budget, calibrate_steps) if time_budget else None
    model_p.train()
    clock.start()
    while step < total:
        loss = loss_fn(step)
        acc.backward(loss)
        if grad_clip > 0:
            acc.clip_grad_norm_(params, grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        n_loss += 1
        step += 1
        fit = budget.after_step(step, total, clock) if budget is not None else None
        if fit is not None:
            total = schedule.total = bar.total = fit
            log.data["meta"].update(step_seconds=budget.per_step, budget_steps=total)
        if step % 50 == 0 or step == total:
            mean_loss = float(loss_sum) / n_loss  # waits for the device anyway, so the clock reading costs nothing
            log.record("train", step=step, loss=mean_loss, lr=sched.get_last_lr()[0], seconds=clock.elapsed())
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            loss_sum, n_loss = None, 0
        if eval_every and on_eval is not None and step % eval_every == 0 and step < total:
            clock.stop()
            on_eval(step)
            clock.start()
        bar.update(1)
    clock.stop()
    bar.close()
    return step
