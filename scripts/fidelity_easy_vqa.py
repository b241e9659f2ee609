#!/usr/bin/env python
"""Fidelity of FasterVLM, DyVTE and VAR on a tiny LLaVA trained on easy-VQA (MLLM.md; docs/fidelity.md).

Trains the model (configs/train-easy-vqa.yaml, --time-budget seconds) unless --model names a saved one, then on the
test split measures the full model, FasterVLM at 50/75/90/95 % pruning, DyVTE with routers trained here on the train
split, and VAR with sink dimensions calibrated on train prompts (visionfx.recovery.easy_vqa_fidelity says how each
column is defined). Prints a Markdown table, writes <output>/fidelity_easy_vqa.json and replaces the easy-VQA section
of docs/fidelity.md (only the text between its markers).

    # one H200, about 4 minutes in all (training 240 s)
    python scripts/fidelity_easy_vqa.py --data /path/to/easy-vqa.tar.xz --output out/easy-vqa

    # smoke run on a CPU in seconds
    python scripts/fidelity_easy_vqa.py --data easy-vqa.tar.xz --output /tmp/evqa --cpu --limit 64 --max-steps 2 \
        --router-steps 2 --train-set text_width=32 --md /tmp/evqa/fidelity.md
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

from visionfx.recovery.cli import key_value

ROOT = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="easy-vqa.tar.xz (or an extracted easy-vqa folder)")
    p.add_argument("--output", default="out/easy-vqa", help="folder for the model, routers and the JSON results")
    p.add_argument("--model", default=None, help="a saved easy-VQA LLaVA folder (skips training)")
    p.add_argument("--config", default=str(ROOT / "configs" / "train-easy-vqa.yaml"), help="training recipe")
    p.add_argument("--train-set", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="override a training recipe field (repeatable)")
    p.add_argument("--time-budget", type=float, default=240.0, help="training seconds (default 240)")
    p.add_argument("--max-steps", type=int, default=None, help="cap the training steps (smoke runs)")
    p.add_argument("--limit", type=int, default=None, help="keep the first N questions of each split (smoke runs)")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate the first N test questions (default all)")
    p.add_argument("--batch-size", type=int, default=1024, help="questions per generate call (default 1024)")
    p.add_argument("--router-steps", type=int, default=600, help="DyVTE router-training steps (default 600)")
    p.add_argument("--router-batch-size", type=int, default=64)
    p.add_argument("--router-lr", type=float, default=1e-3)
    p.add_argument("--router-hidden", type=int, default=512)
    p.add_argument("--calibration", type=int, default=64, help="train prompts for VAR's sink calibration")
    p.add_argument("--json", default=None, help="results JSON (default <output>/fidelity_easy_vqa.json)")
    p.add_argument("--md", default=str(ROOT / "docs" / "fidelity.md"),
                   help="Markdown file whose easy-VQA section is replaced (default docs/fidelity.md)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def _environment(device) -> str:
    import torch

    from visionfx.bench_env import short_commit

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    commit = short_commit()
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return f"{name}, torch {torch.__version__}, Python {platform.python_version()}" + \
        (f", commit {commit}" if commit else "") + f", {stamp}"


def main(argv=None) -> int:
    import torch

    from visionfx.recovery.easy_vqa_data import EasyVQA
    from visionfx.recovery.easy_vqa_fidelity import (fidelity_markdown, run_easy_vqa_fidelity, write_json,
                                                     write_markdown_section)
    from visionfx.recovery.easy_vqa_llava import TrainVQAConfig, train_easy_vqa

    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.output)
    progress = not args.no_progress
    train_over = dict(args.train_set, time_budget=args.time_budget, seed=args.seed)
    if args.cpu:
        train_over["cpu"] = True
    if args.max_steps is not None:
        train_over["max_steps"] = args.max_steps
    if args.limit is not None:
        train_over["limit"] = args.limit
    training = None
    if args.model is None:
        cfg = TrainVQAConfig.load(args.config, **train_over)
        trained = train_easy_vqa(cfg, args.data, out / "model", progress=progress)
        model, data = trained["model"], trained["data"]
        training = {k: trained[k] for k in ("accuracy", "by_category", "steps", "planned_steps", "examples",
                                            "seconds", "gpu_seconds", "device")}
        training["config"] = cfg.to_dict()
        print(f"trained: test accuracy {trained['accuracy']:.2f}% after {trained['steps']} steps, "
              f"{trained['gpu_seconds']:.1f} GPU s")
    else:
        from visionfx.evaluation.vqa import load_llava

        device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
        model, processor = load_llava(args.model, device, dtype="float32")
        vision = model.config.vision_config
        data = EasyVQA(args.data, tokenizer=processor.tokenizer, limit=args.limit,
                       image_tokens=(vision.image_size // vision.patch_size) ** 2)
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    results = run_easy_vqa_fidelity(
        model, data, out, router_steps=args.router_steps, router_batch_size=args.router_batch_size,
        router_lr=args.router_lr, router_hidden=args.router_hidden, calibration=args.calibration,
        batch_size=args.batch_size, eval_limit=args.eval_limit, seed=args.seed, progress=progress)
    results["training"] = training
    results["model"] = args.model or str(out / "model")
    results["wall_seconds"] = time.perf_counter() - t0
    command = "python scripts/fidelity_easy_vqa.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                          else sys.argv[1:]))
    env = _environment(device)
    results["command"], results["environment"] = command, env
    body = fidelity_markdown(results, command, f"{env}; {results['wall_seconds']:.0f} s wall time in all")
    print(body)
    json_path = write_json(results, args.json or out / "fidelity_easy_vqa.json")
    if args.md:
        write_markdown_section(args.md, body)
    print(f"wrote {json_path}" + (f" and the easy-VQA section of {args.md}" if args.md else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
