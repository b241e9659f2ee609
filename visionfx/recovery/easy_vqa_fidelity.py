"""Fidelity of the visual-token methods on the easy-VQA tiny LLaVA (``scripts/fidelity_easy_vqa.py``).

On the test split, with batched greedy generation (:func:`~visionfx.recovery.easy_vqa_llava.evaluate_vqa`):

- **full**: the unpatched model.
- **fastervlm** at ``reductions`` (default 50/75/90/95 % pruning: T = round(64·(1 − r)) = 32/16/6/3 of 64 visual
  tokens kept per image, MLLM.md §1.1). Target: ≥ 95 % of the full accuracy at 75 %.
- **dyvte**: routers trained with :func:`visionfx.methods.dyvte_train.train_routers` on the train split (MLLM.md §2.7:
  frozen LLM, one exit layer k ~ U{0..L−1} per step, labels from the agreement / loss-ratio rule, AdamW with warm-up
  and cosine), saved with ``save_routers`` to ``<output>/dyvte_routers``, then evaluated with the default
  ``batch_policy="exact"`` (batched results equal per-sample ones, MLLM.md §2.6). Reported: accuracy, the **mean exit
  layer** (over test questions; L−1 means the full model ran) and the **share of visual-token compute saved**::

      saved = Σ_b N_b · (L − 1 − k_b) / Σ_b N_b · L

  with N_b the visual tokens of question b (64) and k_b its exit layer: the fraction of the (visual token, decoder
  layer) pairs of the prefill that are skipped. Text tokens, the vision tower and decoding are not counted; under
  ``"exact"`` a batch with mixed exits masks rather than removes, so this is the saving of per-sample execution.
- **var**: sink dimensions from :func:`visionfx.methods.var.find_sink_dims` on ``calibration`` train prompts (no
  answers) at τ_c = min(20, √D / 2): with z = |x_d| / RMS(x) ≤ √D, the paper's τ = 20 cannot fire for D < 400 (D = 256
  here gives τ_c = 8). VAR then runs with those dimensions and τ = τ_c. When none qualify the table says so, and VAR
  runs with an explicit setting that exercises it: the two dimensions with the largest z over the calibration tokens,
  and τ = the 98th percentile of their sink score over those tokens (about 2 % of tokens become sinks, MLLM.md
  §3.1's "≤ 2 %"); p, ρ and summ stay at VAR's defaults. Reported: accuracy and its change from the full model.

Every stage's time is synchronised wall-clock time on the device (``gpu_seconds``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

import visionfx
from visionfx.recovery.easy_vqa_data import EasyVQA, VqaSplit, normalize_images
from visionfx.recovery.easy_vqa_llava import evaluate_vqa
from visionfx.recovery.fidelity import write_markdown_section as write_section
from visionfx.recovery.engine import StageClock

__all__ = ["REDUCTIONS", "RouterBatches", "visual_compute_saved", "calibrate_var", "run_easy_vqa_fidelity", "fidelity_markdown",
           "write_markdown_section", "MD_BEGIN", "MD_END"]

REDUCTIONS = (0.5, 0.75, 0.9, 0.95)
MD_BEGIN = "<!-- easy-vqa fidelity: begin (written by scripts/fidelity_easy_vqa.py) -->"
MD_END = "<!-- easy-vqa fidelity: end -->"
CATEGORIES = ("yes/no", "shape", "color")


class RouterBatches(Dataset):
    """Teacher-forced router-training batches of a split with answers: item i is batch i of a seeded permutation,
    ``input_ids``/``attention_mask`` ``[B, L]``, ``pixel_values`` (no augmentation) and ``labels`` (-100 except the
    answer and ``</s>``). Gathered on the split's device when asked for, so nothing is copied ahead."""

    def __init__(self, split: VqaSplit, batch_size: int, steps: int, seed: int = 0):
        if not split.with_answers:
            raise ValueError("router training needs a split built with answers (the train split)")
        self.split, self.batch_size, self.steps = split, int(batch_size), int(steps)
        n = len(split)
        g = torch.Generator().manual_seed(seed)
        reps = math.ceil(self.steps * self.batch_size / max(n, 1))
        self.order = torch.cat([torch.randperm(n, generator=g) for _ in range(max(reps, 1))])

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        idx = self.order[i * self.batch_size:(i + 1) * self.batch_size].to(self.split.image.device)
        b = self.split.batch(idx)
        labels = torch.full_like(b["input_ids"], -100)
        labels[:, -2:] = b["input_ids"][:, -2:]
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
                "pixel_values": normalize_images(b["images"]), "labels": labels}


def visual_compute_saved(exit_layers, visual_tokens, num_layers: int) -> float:
    """Σ_b N_b · (L − 1 − k_b) / Σ_b N_b · L: the share of (visual token, decoder layer) pairs skipped when sample b
    exits after layer k_b (L − 1: none skipped). ``visual_tokens``: N_b per sample, or one count for all."""
    exits = list(exit_layers)
    counts = [visual_tokens] * len(exits) if isinstance(visual_tokens, int) else list(visual_tokens)
    total = sum(counts) * num_layers
    return sum(n * (num_layers - 1 - k) for n, k in zip(counts, exits) if k >= 0) / total if total else 0.0


def _prompt_batches(split: VqaSplit, count: int, batch_size: int, device, dtype) -> list[dict]:
    """The first ``count`` prompts of a split with answers, answers cut off (the last two columns)."""
    out = []
    n = min(count, len(split))
    for s in range(0, n, batch_size):
        b = split.batch(torch.arange(s, min(s + batch_size, n), device=split.image.device))
        out.append({"input_ids": b["input_ids"][:, :-2].to(device), "attention_mask": b["attention_mask"][:, :-2]
                    .to(device), "pixel_values": normalize_images(b["images"]).to(device, dtype)})
    return out


def calibrate_var(model, batches: list[dict], tau_c: float | None = None, quantile: float = 0.98) -> dict:
    """Sink dimensions and τ for VAR (module docstring): ``{"found": [dims], "sink_dims", "tau", "tau_c",
    "fallback": bool}``."""
    from visionfx.methods.var import find_sink_dims, sink_scores
    from visionfx.patches.llava import LlavaParts, layer_hidden

    parts = LlavaParts.of(model)
    D = int(parts.config.text_config.hidden_size)
    tau_c = min(20.0, math.sqrt(D) / 2) if tau_c is None else float(tau_c)
    found = find_sink_dims(model, batches, tau_c=tau_c)
    if found:
        return {"found": found, "sink_dims": found, "tau": tau_c, "tau_c": tau_c, "fallback": False}
    layers = list(range(2, len(parts.llm_layers)))
    captured: list[torch.Tensor] = []
    hooks = [parts.llm_layers[i].register_forward_pre_hook(
        lambda m, a, k: captured.append(layer_hidden(a, k).detach().float()), with_kwargs=True) for i in layers]
    tokens = []
    try:
        for batch in batches:
            captured.clear()
            with torch.no_grad():
                model(**batch, use_cache=False)
            valid = batch["attention_mask"].bool()
            tokens += [x[valid] for x in captured]
    finally:
        for h in hooks:
            h.remove()
    x = torch.cat(tokens)  # [tokens over layers and prompts, D]
    z = x.abs() / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    dims = sorted(z.amax(0).topk(2).indices.tolist())
    tau = float(torch.quantile(sink_scores(x, dims), quantile))
    return {"found": [], "sink_dims": dims, "tau": tau, "tau_c": tau_c, "fallback": True}


def _row(method: str, setting: str, tokens, ev: dict, full: float | None, seconds: float, **extra) -> dict:
    return {"method": method, "setting": setting, "visual_tokens": tokens, "accuracy": ev["accuracy"],
            "of_full": None if not full else 100.0 * ev["accuracy"] / full, "count": ev["count"],
            "by_category": {c: v["accuracy"] for c, v in ev["by_category"].items()}, "gpu_seconds": seconds, **extra}


def run_easy_vqa_fidelity(model, data: EasyVQA, output_dir: str | os.PathLike | None = None, *,
                          reductions=REDUCTIONS, router_steps: int = 600, router_batch_size: int = 64,
                          router_lr: float = 1e-3, router_hidden: int = 512, calibration: int = 64,
                          batch_size: int = 1024, eval_limit: int | None = None, max_new_tokens: int = 3,
                          seed: int = 0, accelerator=None, progress: bool = True) -> dict:
    """The table's rows (module docstring) for ``model`` (a trained easy-VQA LLaVA on its device, unpatched; it is
    left unpatched). Returns ``{"rows": [...], "var": {...}, "dyvte": {...}, "settings": {...}}``."""
    from visionfx.methods.dyvte_io import save_routers
    from visionfx.methods.dyvte_train import train_routers

    from visionfx.recovery.engine import make_accelerator

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    accelerator = accelerator or make_accelerator("no", 1, cpu=device.type == "cpu")
    data.to(device)
    tok = data.tokenizer
    L = len(model.model.language_model.layers)
    N = data.image_tokens
    clock_of = lambda: StageClock(device)  # noqa: E731
    ev_kw = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, limit=eval_limit, progress=progress)
    rows = []
    model.eval()

    clock = clock_of()
    clock.start()
    full = evaluate_vqa(model, data.test, tok, desc="full", **ev_kw)
    clock.stop()
    rows.append(_row("full", "unpatched", N, full, full["accuracy"], clock.seconds))
    acc_full = full["accuracy"]

    for r in reductions:
        clock = clock_of()
        clock.start()
        visionfx.patch(model, "fastervlm", reduction=float(r))
        try:
            ev = evaluate_vqa(model, data.test, tok, desc=f"fastervlm {r:.0%}", **ev_kw)
        finally:
            visionfx.unpatch(model)
        clock.stop()
        kept = round(N * (1 - r))
        rows.append(_row("fastervlm", f"{100 * r:g}% pruned", kept, ev, acc_full, clock.seconds))

    # dyvte: train the routers (LLM frozen), save them, evaluate
    from visionfx.patches.llava import get_handle

    visionfx.patch(model, "dyvte", router_hidden=router_hidden, prompt_template="easy-vqa")
    handle = get_handle(model)
    dyvte_info: dict = {}
    try:
        clock = clock_of()
        clock.start()
        loader = torch.utils.data.DataLoader(RouterBatches(data.train, router_batch_size, router_steps, seed + 5),
                                             batch_size=None)
        said: list[str] = []

        def say(line: str) -> None:
            said.append(line)
            if progress:
                print(f"dyvte routers: {line}", flush=True)

        trained = train_routers(model, loader, max_steps=router_steps, lr=router_lr, seed=seed,
                                accelerator=accelerator, log_every=100, log=say)
        clock.stop()
        train_seconds = clock.seconds
        if output_dir is not None:
            save_routers(handle, Path(output_dir) / "dyvte_routers", base_model="easy-vqa tiny llava",
                         prompt_template="easy-vqa",
                         training={"steps": trained["steps"], "batch_size": router_batch_size, "lr": router_lr,
                                   "data": "easy-VQA train split"})
        exits: list[int] = []
        clock = clock_of()
        clock.start()
        ev = evaluate_vqa(model, data.test, tok, desc="dyvte", on_batch=lambda b, new: exits.extend(
            handle.exit_layers.tolist()), **ev_kw)
        clock.stop()
    finally:
        visionfx.unpatch(model)
    mean_exit = sum(exits) / max(len(exits), 1)
    saved = visual_compute_saved(exits, N, L)
    histogram = {k: exits.count(k) for k in sorted(set(exits))}
    dyvte_info = {"router_steps": trained["steps"], "router_layers": trained["layers"], "train_seconds": train_seconds,
                  "exit_histogram": histogram, "log": said}
    rows.append(_row("dyvte", f"routers {trained['steps']} steps", N, ev, acc_full, clock.seconds,
                     mean_exit_layer=mean_exit, compute_saved=100.0 * saved, router_gpu_seconds=train_seconds))

    # var: calibrate sink dimensions, then evaluate
    clock = clock_of()
    clock.start()
    cal = calibrate_var(model, _prompt_batches(data.train, calibration, min(batch_size, 64), device, dtype))
    calib_seconds = clock.elapsed()
    visionfx.patch(model, "var", sink_dims=list(cal["sink_dims"]), tau=float(cal["tau"]))
    try:
        ev = evaluate_vqa(model, data.test, tok, desc="var", **ev_kw)
    finally:
        visionfx.unpatch(model)
    clock.stop()
    setting = (f"sink dims {cal['sink_dims']} found, τ {cal['tau']:.2f}" if not cal["fallback"] else
               f"none found at τ_c {cal['tau_c']:.1f}; dims {cal['sink_dims']}, τ {cal['tau']:.2f}")
    rows.append(_row("var", setting, N, ev, acc_full, clock.seconds, change=ev["accuracy"] - acc_full,
                     calibration_gpu_seconds=calib_seconds))
    return {"rows": rows, "dyvte": dyvte_info, "var": cal, "layers": L, "visual_tokens": N,
            "settings": {"reductions": list(reductions), "router_steps": router_steps,
                         "router_batch_size": router_batch_size, "router_lr": router_lr,
                         "router_hidden": router_hidden, "calibration_prompts": calibration, "eval_limit": eval_limit,
                         "max_new_tokens": max_new_tokens, "seed": seed}}


def _pct(v) -> str:
    return "-" if v is None else f"{v:.2f}%"


def fidelity_markdown(results: dict, command: str, environment: str = "") -> str:
    """The docs section: the table, its notes and how it was made."""
    head = ["method", "setting", "visual tokens", "accuracy", "of full", *CATEGORIES, "mean exit layer",
            "visual compute saved", "change", "GPU s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["rows"]:
        cats = [_pct(r["by_category"].get(c)) for c in CATEGORIES]
        exit_ = "-" if r.get("mean_exit_layer") is None else f"{r['mean_exit_layer']:.2f} of {results['layers'] - 1}"
        saved = "-" if r.get("compute_saved") is None else f"{r['compute_saved']:.1f}%"
        change = "-" if r.get("change") is None else f"{r['change']:+.2f} pt"
        seconds = r["gpu_seconds"] + r.get("router_gpu_seconds", 0.0)
        lines.append("| " + " | ".join([r["method"], r["setting"], str(r["visual_tokens"]), _pct(r["accuracy"]),
                                         _pct(r["of_full"]), *cats, exit_, saved, change, f"{seconds:.1f}"]) + " |")
    out = [f"Produced by `{command}`" + (f" ({environment})." if environment else "."), ""]
    tr = results.get("training")
    if tr:
        out += [f"Model trained here: {tr['steps']} steps ({tr['examples']:,} questions seen) in "
                f"{tr['gpu_seconds']:.1f} s of {tr['device']} time; test accuracy {tr['accuracy']:.2f}%.", ""]
    var = results.get("var") or {}
    if var.get("fallback"):
        out += [f"VAR: find_sink_dims found no sink dimension at τ_c = {var['tau_c']:.1f}; VAR ran with the "
                f"fallback setting (dims {var['sink_dims']}, τ = {var['tau']:.2f}).", ""]
    out += [*lines, ""]
    return "\n".join(out)


def write_markdown_section(path: str | os.PathLike, body: str) -> Path:
    """Replace the text between :data:`MD_BEGIN` and :data:`MD_END` in ``path`` with ``body`` (the markers are
    appended, with the body, when absent; the rest of the file is left as it is)."""
    return write_section(path, body, MD_BEGIN, MD_END)


def write_json(results: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return path
