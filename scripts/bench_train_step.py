#!/usr/bin/env python
"""One training step of the CIFAR-10 reference ViT (``configs/train-cifar10.yaml``'s geometry: patch 4 on 32×32, width
384, depth 6, 6 heads, 65 tokens), unpatched and patched with each mixer, measured in one process.

A step is what recovery's stage 2 pays per batch on the student: forward under bf16 autocast (on CUDA), an MSE loss,
backward and a fused AdamW update, on random weights and inputs, optionally under ``torch.compile`` as the recipe
runs it. Reported: the median of ``--steps`` synchronised steps after ``--warmup`` (compilation falls into the
warm-up), in milliseconds, and the ratio to the unpatched model. Prints a table and writes JSON.

    python scripts/bench_train_step.py --compile --json train_step.json                 # CUDA GPU, batch 1024
    python scripts/bench_train_step.py --device cpu --batch-size 8 --steps 2 --warmup 1  # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

METHODS = ("none", "agent", "inline", "rala", "slab", "vig")


def step_ms(method: str, batch: int, device: str, compile_: bool, steps: int, warmup: int) -> float:
    import torch

    import visionfx
    from visionfx.recovery.engine import synchronize
    from visionfx.recovery.train import TrainConfig, build_reference_model

    torch.manual_seed(0)
    model = build_reference_model(TrainConfig(), 10)
    if method != "none":
        visionfx.patch(model, method)
    model.to(device).train()
    cuda = device == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    run = torch.compile(model) if compile_ else model
    size = TrainConfig().img_size
    x = torch.randn(batch, 3, size, size, device=device)
    target = torch.randn(batch, 10, device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = (run(x).float() - target).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        synchronize(device)
        t0 = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {METHODS}")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile", action="store_true", help="torch.compile the model, as the recovery recipe does")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", default=None, metavar="PATH", help="write the rows as JSON")
    args = p.parse_args(argv)
    import torch

    from visionfx.bench_env import environment

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {METHODS}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_train_step: --device cuda needs a CUDA GPU (use --device cpu for a smoke run)", file=sys.stderr)
        return 2
    if min(args.batch_size, args.steps) < 1 or args.warmup < 0:
        p.error("--batch-size and --steps must be >= 1, --warmup >= 0")
    env = environment(args.device)  # before the run: it records the machine's load
    rows = []
    for m in methods:
        ms = step_ms(m, args.batch_size, args.device, args.compile, args.steps, args.warmup)
        rows.append({"method": m, "ms": ms})
        print(f"{m}: {ms:.2f} ms per step", file=sys.stderr, flush=True)
    base = next((r["ms"] for r in rows if r["method"] == "none"), None)
    print(f"| method | ms per step (batch {args.batch_size}{', compiled' if args.compile else ''}) | vs unpatched |")
    print("|---|---|---|")
    for r in rows:
        r["vs_unpatched"] = None if base is None else r["ms"] / base
        ratio = "-" if base is None else f"{r['vs_unpatched']:.2f}x"
        print(f"| {r['method']} | {r['ms']:.2f} | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "batch_size": args.batch_size, "compile": args.compile,
                       "steps": args.steps, "warmup": args.warmup, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
