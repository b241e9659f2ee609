#!/usr/bin/env python
"""The mixers' local term (``kernels/patch_dwconv``): the PyTorch composition vs the fused Triton kernel, alone and
in ViT-S/16 end to end, measured in one process.

1. The op at ViT-S/16 shapes (6 heads of 64, CLS + grid; 224² at B = 256, 512² at B = 64, 1024² at B = 16), bf16,
   added in place to a token-layout output as the mixers do: shared 5×5 kernels with bias (slab, rala), shared 3×3
   (agent), per-sample 3×3 without bias (inline). ``triton.testing.do_bench`` medians (launched) and CUDA-graph
   replays (GPU time); the memory floor reads V's patch rows and the output and writes the output (three
   activations) at 4.28 TB/s.
2. ``visionfx.bench.run_bench`` (eval, bf16) for the original model and each mixer with the local term fused
   (``fused``) and as the composition (``composed``: the op registered without its Triton kernel for that pass),
   so both sides and the original are timed in the same process.

    python scripts/bench_patch_dwconv.py --json patch_dwconv.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys

SHAPES = ((224, 256), (512, 64), (1024, 16))  # (image size, batch)
CONFIGS = (("shared 5x5 + bias", 5, False, True), ("shared 3x3 + bias", 3, False, True),
           ("per-sample 3x3", 3, True, False))
BANDWIDTH_TBPS = 4.28


@contextlib.contextmanager
def composition_only():
    """The local-term op without its Triton kernel: every mixer runs the PyTorch composition."""
    from visionfx.kernels import dispatch

    op = dispatch.get_op("patch_dwconv")
    dispatch.register_op(dataclasses.replace(op, triton=""))
    try:
        yield
    finally:
        dispatch.register_op(op)


def op_rows(h: int = 6, d: int = 64) -> list[dict]:
    import torch
    import triton.testing as tt

    from visionfx.kernels.patch_dwconv.reference import patch_dwconv_reference
    from visionfx.kernels.patch_dwconv.triton import patch_dwconv_triton

    rows = []
    for size, B in SHAPES:
        H = W = size // 16
        N, C = 1 + H * W, h * d
        g = torch.Generator().manual_seed(0)
        qkv = torch.randn(B, N, 3, h, d, generator=g).to("cuda", torch.bfloat16)
        v = qkv[:, :, 2].transpose(1, 2)  # a strided view, as the mixers get it
        o = torch.randn(B, N, h, d, generator=g).to("cuda", torch.bfloat16).transpose(1, 2)
        floor_ms = 3 * B * N * C * 2 / (BANDWIDTH_TBPS * 1e12) * 1e3
        for name, ks, per_sample, with_bias in CONFIGS:
            shape = (B, C, ks, ks) if per_sample else (C, 1, ks, ks)
            w = (0.1 * torch.randn(shape, generator=g)).to("cuda", torch.bfloat16)
            bias = torch.randn(C, generator=g).to("cuda", torch.bfloat16) if with_bias else None
            row = {"size": size, "batch": B, "tokens": N, "config": name, "floor_ms": floor_ms}
            for impl, fn in (("composition", patch_dwconv_reference), ("triton", patch_dwconv_triton)):
                call = (lambda fn=fn: fn(o, v, w, bias, grid=(H, W), num_prefix_tokens=1, inplace=True))
                row[f"{impl}_ms"] = tt.do_bench(call)
                row[f"{impl}_graph_ms"] = tt.do_bench_cudagraph(call)
            row["x_floor_graph"] = row["triton_graph_ms"] / floor_ms
            row["speedup_graph"] = row["composition_graph_ms"] / row["triton_graph_ms"]
            rows.append(row)
            print(f"{size}² B={B} {name}: composition {row['composition_ms']:.3f} ({row['composition_graph_ms']:.3f})"
                  f" ms, triton {row['triton_ms']:.3f} ({row['triton_graph_ms']:.3f}) ms, "
                  f"{row['x_floor_graph']:.2f}x floor", flush=True)
    return rows


def model_rows(methods: list[str], warmup: int, repeat: int) -> list[dict]:
    from visionfx.bench import run_bench

    rows = []
    for size, B in SHAPES:
        fused = run_bench("vit_small_patch16_224", methods=methods, sizes=[size], batch_size=B, device="cuda",
                          dtype="bf16", warmup=warmup, repeat=repeat, progress=False)
        with composition_only():
            composed = run_bench("vit_small_patch16_224", methods=methods, sizes=[size], batch_size=B,
                                 device="cuda", dtype="bf16", warmup=warmup, repeat=repeat, progress=False)
        for label, part in (("fused", fused), ("composed", composed)):
            for r in part:  # each pass has its own original row, the base of its speed-ups
                r["local_term"] = f"- ({label} pass)" if r["method"] == "original" else label
                rows.append(r)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="slab,inline,rala,agent,agentsd")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--no-model", action="store_true", help="the op table only")
    p.add_argument("--json", default=None, metavar="PATH", help="write environment and rows as JSON")
    args = p.parse_args(argv)
    import torch

    from visionfx.bench_env import environment

    if not torch.cuda.is_available():
        print("bench_patch_dwconv: needs a CUDA GPU", file=sys.stderr)
        return 2
    env = environment("cuda")
    ops = op_rows()
    print("\n| size | batch | local term | composition ms | Triton ms | graph: composition | Triton | x floor |"
          " speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in ops:
        print(f"| {r['size']} | {r['batch']} | {r['config']} | {r['composition_ms']:.3f} | {r['triton_ms']:.3f} | "
              f"{r['composition_graph_ms']:.3f} | {r['triton_graph_ms']:.3f} | {r['x_floor_graph']:.2f}x | "
              f"{r['speedup_graph']:.2f}x |")
    models = [] if args.no_model else model_rows([m for m in args.methods.split(",") if m], args.warmup, args.repeat)
    if models:
        print("\n| size | batch | method | local term | ms | images/s | vs original |")
        print("|---|---|---|---|---|---|---|")
        for r in models:
            if r["error"]:
                print(f"| {r['size']} | {r['batch_size']} | {r['method']} | {r['local_term']} | error: {r['error']} |")
                continue
            print(f"| {r['size']} | {r['batch_size']} | {r['method']} | {r['local_term']} | {r['latency_ms']:.1f} | "
                  f"{r['images_per_s']:.0f} | {r['speedup']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "ops": ops, "models": models}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
