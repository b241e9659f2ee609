#!/usr/bin/env python
"""Fidelity of every token mixer on a CIFAR-10 reference ViT, before and after recovery (METHODS.md §10).

Trains the reference model unless --reference names an existing checkpoint, then for each mixer evaluates the
patched model with no recovery, after stage 1 (attention transfer) and after stages 1+2 (distillation), recording
top-1 and each step's GPU time, and writes a JSON file and docs/fidelity.md.

    # one H200, about 14 minutes in all (reference ~8 minutes, then about a minute per mixer, compilation included)
    python scripts/fidelity_cifar10.py --data /path/to/cifar10.tar.xz --cache-dir .data --output out/fidelity \
        --train-set compile=true --time-budget 600 --budget-share 0.047

    # smoke run on a CPU in seconds (the recipe compiles stage 2; not worth it here)
    python scripts/fidelity_cifar10.py --data cifar10.tar.xz --limit 4 --max-steps 2 --batch-size 4 --cpu \
        --mixers agent,agentsd --train-set depth=1 --distill-set compile=false --md out/fidelity.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from visionfx.recovery.cli import key_value

ROOT = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    from visionfx.recovery.fidelity import MIXERS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="cifar10.tar.xz (or a folder <split>/<class>/<image>)")
    p.add_argument("--cache-dir", default=None, help="where the archive is decoded once (default: beside it)")
    p.add_argument("--limit", type=int, default=None, help="images per class and split (smoke runs)")
    p.add_argument("--reference", default=None, help="an existing reference.pt (default: train one now)")
    p.add_argument("--output", default="out/fidelity", help="folder for reference.pt, logs and fidelity.json")
    p.add_argument("--json", default=None, help="results JSON (default: <output>/fidelity.json)")
    p.add_argument("--md", default=str(ROOT / "docs" / "fidelity.md"), help="Markdown table (default docs/fidelity.md)")
    p.add_argument("--mixers", default=",".join(MIXERS), help=f"comma-separated (default {','.join(MIXERS)})")
    p.add_argument("--config", default=str(ROOT / "configs" / "distill-cifar10.yaml"), help="recovery recipe")
    p.add_argument("--train-config", default=str(ROOT / "configs" / "train-cifar10.yaml"), help="reference recipe")
    p.add_argument("--time-budget", type=float, default=180.0, help="reference training seconds (default 180)")
    p.add_argument("--budget-share", type=float, default=None,
                   help="recovery GPU time per mixer as a share of the reference's training time (e.g. 0.047): "
                        "stage 2 fits its step count to it (default: the recipe's step counts)")
    p.add_argument("--max-steps", type=int, default=None, help="cap every training loop (smoke runs)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size of every loop (smoke runs)")
    p.add_argument("--train-set", type=key_value, action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--distill-set", type=key_value, action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--cpu", action="store_true", help="run on the CPU")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    from visionfx.recovery.config import DistillConfig
    from visionfx.recovery.data import load_image_data
    from visionfx.recovery.fidelity import run_fidelity, write_results
    from visionfx.recovery.train import TrainConfig, train_reference

    args = build_parser().parse_args(argv)
    out = Path(args.output)
    progress = not args.no_progress
    data = load_image_data(args.data, cache_dir=args.cache_dir, limit_per_class=args.limit, progress=progress)

    train_over = dict(args.train_set, time_budget=args.time_budget)
    distill_over = dict(args.distill_set)
    if args.cpu:
        train_over["cpu"] = distill_over["cpu"] = True
    if args.max_steps is not None:
        train_over["max_steps"] = args.max_steps
    if args.batch_size is not None:
        train_over.update(batch_size=args.batch_size, eval_batch_size=args.batch_size)
        distill_over.update(stage1_batch_size=args.batch_size, stage2_batch_size=args.batch_size,
                            eval_batch_size=args.batch_size)
    dcfg = DistillConfig.load(args.config, **distill_over)
    if args.max_steps is not None:
        dcfg = dcfg.replace(stage1_steps=min(dcfg.stage1_steps, args.max_steps),
                            stage2_steps=min(dcfg.stage2_steps, args.max_steps),
                            recalibrate_steps=min(dcfg.recalibrate_steps, args.max_steps),
                            log_every=1)

    reference = args.reference
    if reference is None:
        tcfg = TrainConfig.load(args.train_config, **train_over)
        trained = train_reference(tcfg, data, out, progress=progress)
        print(f"reference: top-1 {trained['top1']}, {trained['steps']} steps, {trained['gpu_seconds']:.1f} GPU s")
        reference = {k: v for k, v in trained.items() if k != "model"}
    results = run_fidelity(reference, data, dcfg, mixers=[m.strip() for m in args.mixers.split(",") if m.strip()],
                           output_dir=out, progress=progress, budget_share=args.budget_share)
    json_path = args.json or out / "fidelity.json"
    write_results(results, json_path, args.md)
    for row in results["rows"]:
        print({k: v for k, v in row.items() if k != "traceback"})
    print(f"wrote {json_path} and {args.md}")
    return 1 if all("error" in r for r in results["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
