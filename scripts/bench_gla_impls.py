"""Bidirectional GLA (vig): the chunked Triton kernel vs the earlier scan kernel, measured in one process.

    python scripts/bench_gla_impls.py --json gla_impls.json       # CUDA GPU; bf16, H = 6, d = 64

For each (N, B): forward (``triton.testing.do_bench`` median and, in brackets, the same call replayed from a CUDA
graph), forward+backward, and SDPA's forward at the same shape; vig's gate parametrisation (logsigmoid(x + 4) / 16).
"""

from __future__ import annotations

import argparse
import json
import sys

SHAPES = ((64, 197), (12, 1025), (16, 4097), (1, 16385))


def measure(B: int, N: int, H: int = 6, d: int = 64) -> dict:
    import torch
    import torch.nn.functional as F
    import triton.testing as tt

    from visionfx.kernels.bidir_gla.triton import bidir_gla_triton

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, d, generator=g).to("cuda", torch.bfloat16).requires_grad_() for _ in range(3))
    gf, gb = (t.cuda().requires_grad_() for t in (F.logsigmoid(torch.randn(2, B, H, N, d, generator=g) + 4.0) / 16))
    leaves, do = [q, k, v, gf, gb], torch.randn_like(q)
    row = {"N": N, "B": B, "H": H, "d": d, "sdpa_fwd_ms": tt.do_bench(lambda: F.scaled_dot_product_attention(q, k, v))}
    for impl in ("chunked", "scan"):
        def fwd():
            return bidir_gla_triton(q, k, v, gf, gb, scale=d**-0.5, impl=impl)

        with torch.no_grad():
            row[f"{impl}_fwd_ms"] = tt.do_bench(fwd)
            row[f"{impl}_fwd_graph_ms"] = tt.do_bench_cudagraph(fwd)
        row[f"{impl}_fwd_bwd_ms"] = tt.do_bench(lambda: torch.autograd.grad(fwd(), leaves, do))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None, metavar="PATH", help="write the rows as JSON")
    args = p.parse_args(argv)
    import torch

    from visionfx.bench_env import environment

    if not torch.cuda.is_available():
        print("bench_gla_impls: needs a CUDA GPU", file=sys.stderr)
        return 2
    env = environment("cuda")  # before the run: it records the machine's load
    rows = [measure(B, N) for B, N in SHAPES]
    print("| N | B | chunked fwd | scan fwd | chunked f+b | scan f+b | SDPA fwd |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['N']} | {r['B']} | {r['chunked_fwd_ms']:.3f} ({r['chunked_fwd_graph_ms']:.3f}) | "
              f"{r['scan_fwd_ms']:.3f} ({r['scan_fwd_graph_ms']:.3f}) | {r['chunked_fwd_bwd_ms']:.3f} | "
              f"{r['scan_fwd_bwd_ms']:.3f} | {r['sdpa_fwd_ms']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
