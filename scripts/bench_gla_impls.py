"""Bidirectional GLA (vig): the Triton implementations measured in one process (``impl="direct"``, ``"chunked"``,
the earlier ``"scan"``), with SDPA at the same shape.

    python scripts/bench_gla_impls.py --json gla_impls.json       # CUDA GPU; bf16, H = 6, d = 64

For each (N, B): forward (``triton.testing.do_bench`` median and, in brackets, the same call replayed from a CUDA
graph) and forward+backward; vig's gate parametrisation (logsigmoid(x + 4) / 16). ``direct`` (no stored states,
quadratic in the number of 64-token chunks) runs up to N = 1025 only; ``auto`` picks it up to
``DIRECT_MAX_CHUNKS`` chunks forwards and ``DIRECT_BWD_MAX_CHUNKS`` backwards.
"""

from __future__ import annotations

import argparse
import json
import sys

SHAPES = ((1024, 65), (64, 197), (256, 197), (24, 577), (12, 1025), (16, 4097), (1, 16385))
IMPLS = ("direct", "chunked", "scan")
DIRECT_MAX_N = 1025


def measure(B: int, N: int, H: int = 6, d: int = 64) -> dict:
    import torch
    import torch.nn.functional as F
    import triton.testing as tt

    from visionfx.kernels.bidir_gla.triton import bidir_gla_triton

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, d, generator=g).to("cuda", torch.bfloat16).requires_grad_() for _ in range(3))
    # both directions' gates as two views of one fp32 buffer, as the vig mixer makes them (no copy in the op)
    gates = (F.logsigmoid(torch.randn(2, B, H, N, d, generator=g) + 4.0) / 16).cuda().requires_grad_()
    gf, gb = gates[0], gates[1]
    leaves, do = [q, k, v, gates], torch.randn_like(q)
    row = {"N": N, "B": B, "H": H, "d": d, "sdpa_fwd_ms": tt.do_bench(lambda: F.scaled_dot_product_attention(q, k, v))}
    sdpa_leaves = [q, k, v]
    row["sdpa_fwd_bwd_ms"] = tt.do_bench(
        lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), sdpa_leaves, do))
    for impl in IMPLS:
        if impl == "direct" and N > DIRECT_MAX_N:
            continue

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
    head = " | ".join(f"{i} fwd | {i} f+b" for i in IMPLS)
    print(f"| N | B | {head} | SDPA fwd | SDPA f+b |\n|---|---|" + "---|---|" * len(IMPLS) + "---|---|")
    for r in rows:
        cells = []
        for i in IMPLS:
            if f"{i}_fwd_ms" in r:
                cells += [f"{r[i + '_fwd_ms']:.3f} ({r[i + '_fwd_graph_ms']:.3f})", f"{r[i + '_fwd_bwd_ms']:.3f}"]
            else:
                cells += ["-", "-"]
        cells += [f"{r['sdpa_fwd_ms']:.3f}", f"{r['sdpa_fwd_bwd_ms']:.3f}"]
        print(f"| {r['N']} | {r['B']} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
