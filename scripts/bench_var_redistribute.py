#!/usr/bin/env python
"""VAR's redistribution, one call: the PyTorch reference vs the Triton kernel (``kernels/var_redistribute``).

Per shape (batch 1, 32 heads, rows × keys as in LLaVA-1.5 prefill and decoding), both implementations write bf16
weights in place, measured in one process: the host time per call (Python and launches, 200 calls after 20
warm-ups, no synchronisation inside the loop), the wall time per call (synchronised), and the GPU time of one call
replayed from a CUDA graph. Prints a table and writes JSON.

    python scripts/bench_var_redistribute.py --json var_redistribute.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def measure(fn, calls: int = 200, warmup: int = 20) -> dict:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / calls
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return {"host_ms": host * 1e3, "wall_ms": wall * 1e3, "gpu_ms": start.elapsed_time(end) / calls}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="30x641,1x650,641x641", help="comma-separated ROWSxKEYS")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--json", default=None, help="write the rows and the environment here")
    args = p.parse_args(argv)

    import torch

    from visionfx.bench_env import environment
    from visionfx.kernels.var_redistribute import column_masks, redistribute
    from visionfx.kernels.var_redistribute.triton import redistribute_triton

    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    env = environment("cuda")  # before the run: it records the machine's load
    rows_out = []
    for shape in args.shapes.split(","):
        Q, S = (int(v) for v in shape.lower().split("x"))
        g = torch.Generator(device="cuda").manual_seed(0)
        attn = torch.randn(1, args.heads, Q, S, device="cuda", generator=g).softmax(-1)
        image = torch.zeros(1, S, dtype=torch.bool, device="cuda")
        image[:, min(35, S // 4):max(S - 30, S // 2)] = True
        sinks = torch.rand(1, S, device="cuda", generator=g) < 0.5
        rows = torch.ones(1, Q, dtype=torch.bool, device="cuda")
        masks = column_masks(image, sinks, 0.6, torch.float32, torch.float64)
        out = torch.empty_like(attn, dtype=torch.bfloat16)
        row = {"rows": Q, "keys": S, "heads": args.heads}
        row["reference"] = measure(lambda: redistribute(attn, image, sinks, rows, 0.6, 0.5, 0.0, masks=masks,
                                                        out=out))
        row["triton"] = measure(lambda: redistribute_triton(attn, image, sinks, rows, 0.6, 0.5, 0.0, out=out))
        rows_out.append(row)
    print(f"{'rows x keys':>12}  {'ref host':>9}  {'ref GPU':>8}  {'triton host':>11}  {'triton GPU':>10}  (ms per call)")
    for r in rows_out:
        print(f"{r['rows']:>5} x {r['keys']:<5}  {r['reference']['host_ms']:9.3f}  {r['reference']['gpu_ms']:8.3f}  "
              f"{r['triton']['host_ms']:11.3f}  {r['triton']['gpu_ms']:10.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "settings": vars(args), "rows": rows_out}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
