"""Benchmark the token-mixer ops (SDPA vs reference vs Triton kernel); see visionfx/bench_kernels.py.

    python scripts/bench_kernels.py --json results/kernels.json                 # H200 run, B·N ≈ 64·197
    python scripts/bench_kernels.py --batch 64                                  # PERFORMANCE.md's fixed-batch table
    python scripts/bench_kernels.py --device cpu                                # smoke test (interpreted kernel)
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default=None, help="comma-separated N (default 197,577,1025,4097,16385 on CUDA)")
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    p.add_argument("--batch", type=int, default=None, help="fixed batch for every N (default: B·N ≈ 64·197)")
    p.add_argument("--configs", default="slab,rala,inline,agent,vig", help="comma-separated: slab, rala, inline, agent, vig")
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--json", default=None, metavar="PATH", help="write environment, settings and rows as JSON")
    args = p.parse_args(argv)

    import torch

    cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    if cpu:
        if "triton.language" in sys.modules:  # pragma: no cover - only if imported before this point
            print("note: Triton was imported before TRITON_INTERPRET could be set", file=sys.stderr)
        # the interpreter must be chosen before any kernel is defined; it runs fp32 only
        os.environ.setdefault("TRITON_INTERPRET", "1")
        if args.dtype != "fp32":
            print(f"CPU smoke test: using fp32 instead of {args.dtype} (the Triton interpreter has no 16-bit path)")
            args.dtype = "fp32"
        print("CPU smoke test: timings are not meaningful; run on a CUDA GPU for numbers.")

    from visionfx.bench_kernels import kernel_bench

    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else None
    try:
        kernel_bench(tokens=tokens, heads=args.heads, head_dim=args.head_dim, dtype=args.dtype, device=args.device,
                     batch=args.batch, configs=[c.strip() for c in args.configs.split(",") if c.strip()],
                     backward=not args.no_backward, json_path=args.json)
    except ValueError as e:
        print(f"bench_kernels: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
