"""Where DyVTE's routing cost goes: the router op alone, and the prefill with routers that never fire, split.

    python scripts/bench_dyvte_routing.py --out results/dyvte_routing.json        # H200: LLaVA-1.5-7B, bf16
    python scripts/bench_dyvte_routing.py --tiny --rounds 3 --out /tmp/routing.json   # the same code on CPU

1. **The op** (CUDA only): one router step at LLaVA-1.5-7B widths (D = 4096, 2048 units, a 29-token span): the
   PyTorch reference and the Triton kernels of ``kernels/dyvte_router``, each with its logits read on the host (the
   per-layer pattern; µs per step over a loop) and queued without reads (µs per step, host launches included).
2. **In situ**: the time to first token of a LLaVA-1.5-7B forward (random bf16 weights, 641 language-model tokens, SDPA)
   for these variants, interleaved round by round (medians after 3 warm-up rounds), each over the unpatched model:

   | variant | what runs per routed layer |
   |---|---|
   | ``no-router`` | DyVTE's prefill setup and layer pre-hooks only (the router hook returns at once) |
   | ``sync-only`` | a host read of a ready ``[B, 2]`` tensor: the device sync without router work |
   | ``op-no-sync`` | the Triton router op, its logits never read |
   | ``routed`` | the op and the host read (what DyVTE runs) |
   | ``routed-ref`` | the reference op and the host read |

   Routers have a zeroed output layer, so none fires and all 31 routed layers run. Reported per routed layer (the
   difference to the unpatched forward over L − 1) and as a share of a decoder layer (the unpatched language model's
   prefill, timed by hooks, over L).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

VARIANTS = ("no-router", "sync-only", "op-no-sync", "routed", "routed-ref")


def _bench_llava():
    spec = importlib.util.spec_from_file_location("bench_llava", Path(__file__).with_name("bench_llava.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Unread:
    """Logits that are never read: ``tolist`` answers 'keep' without touching the device."""

    def __init__(self, batch: int):
        self.batch = batch

    def tolist(self):
        return [[0.0, 0.0]] * self.batch


def op_alone(batches, reps: int = 200) -> dict:
    from visionfx.kernels.dyvte_router.reference import router_logits_reference
    from visionfx.kernels.dyvte_router.triton import router_logits_triton
    from visionfx.methods.dyvte_router import TextSpan, span_mask

    out = {}
    for B in batches:
        L, D, HD = 641, 4096, 2048
        g = torch.Generator(device="cuda").manual_seed(0)
        h = torch.randn(B, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
        image = torch.zeros(B, L, dtype=torch.bool, device="cuda")
        image[:, 35:611] = True
        end = torch.full((B,), L - 1, device="cuda")
        span, count = span_mask(image, torch.ones_like(image), end)
        sp = TextSpan.from_mask(span, count, end, int(count.max()))
        w1 = torch.randn(HD, 2 * D, device="cuda", dtype=torch.bfloat16, generator=g) * 0.01
        w2 = torch.randn(2, HD, device="cuda", dtype=torch.bfloat16, generator=g) * 0.01
        for name, fn in (("reference", router_logits_reference), ("triton", router_logits_triton)):
            row = {}
            for mode, call in (("read_us", lambda: fn(h, sp.index, sp.weights, sp.count, w1, w2).tolist()),
                               ("queued_us", lambda: fn(h, sp.index, sp.weights, sp.count, w1, w2))):
                for _ in range(20):
                    call()
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(reps):
                    call()
                torch.cuda.synchronize()
                row[mode] = (time.perf_counter() - t) / reps * 1e6
            out[f"{name} B={B}"] = row
            print(f"op {name} B={B}: {row['read_us']:.1f} us with the read, {row['queued_us']:.1f} us queued",
                  flush=True)
    return out


def in_situ(batches, rounds: int, tiny: bool) -> dict:
    import visionfx
    from visionfx.kernels.dyvte_router.reference import router_logits_reference
    from visionfx.patches.llava import get_handle

    bl = _bench_llava()
    cuda = torch.cuda.is_available() and not tiny
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    model = bl.build("llava", not cuda, device, dtype)
    model.set_attn_implementation({"text_config": "sdpa"})
    out = {}
    for B in batches:
        inputs = bl.make_inputs(model, "llava", B, 672, device, dtype)
        visionfx.patch(model, "dyvte", router_hidden=64 if tiny else 2048)
        bl.silence_routers(model)
        handle = get_handle(model)
        op = handle._router_step()
        ready = torch.zeros(B, 2, device=device)
        def launch_only(*a):
            op(*a)
            return _Unread(B)

        steps = {"no-router": op, "sync-only": lambda *a: ready, "op-no-sync": launch_only, "routed": op,
                 "routed-ref": router_logits_reference}
        times = {k: [] for k in ("unpatched", *VARIANTS)}
        clock, prefill = bl.Clock(device), []
        try:
            for r in range(rounds + 3):
                for name in times:
                    handle.enabled = name != "unpatched"
                    handle._router_step = (lambda f: (lambda: f))(steps.get(name))
                    if name == "no-router":
                        handle._after_layer = lambda *a: None
                    else:
                        handle.__dict__.pop("_after_layer", None)
                    if cuda:
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    watch = clock.watch(handle.parts.inner.language_model, prefill) if name == "unpatched" \
                        else contextlib.nullcontext()
                    with torch.inference_mode(), watch:
                        model(**inputs, logits_to_keep=1)
                    if cuda:
                        torch.cuda.synchronize()
                    if r >= 3:
                        times[name].append((time.perf_counter() - t) * 1e3)
        finally:
            visionfx.unpatch(model)
        med = {k: statistics.median(v) for k, v in times.items()}
        layers = handle.num_layers
        prefill_ms = statistics.median(clock.elapsed(a, b) for a, b in prefill[3:])
        layer_ms = prefill_ms / layers  # the unpatched language model's prefill over its layers
        row = {"ttft_ms": med, "prefill_ms": prefill_ms, "layers": layers}
        row["per_routed_layer_us"] = {k: (med[k] - med["unpatched"]) / (layers - 1) * 1e3 for k in VARIANTS}
        row["share_of_layer"] = {k: v / 1e3 / layer_ms for k, v in row["per_routed_layer_us"].items()}
        out[f"B={B}"] = row
    return out


def table(situ: dict) -> str:
    from visionfx.utils import format_table

    rows = []
    for key, row in situ.items():
        for name in ("unpatched", *VARIANTS):
            extra = row["per_routed_layer_us"].get(name)
            rows.append([key, name, f"{row['ttft_ms'][name]:.2f}", "-" if extra is None else f"{extra:+.1f}",
                         "-" if extra is None else f"{100 * row['share_of_layer'][name]:.1f}%"])
    return format_table(["batch", "variant", "TTFT ms", "us per routed layer", "of a layer"], rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--rounds", type=int, default=27, help="timed rounds after 3 warm-up rounds")
    p.add_argument("--tiny", action="store_true", help="tiny random LLaVA on CPU (a smoke test of the script)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batch_sizes.split(",") if b]
    from visionfx.bench_env import environment

    record = {"environment": environment("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"),
              "settings": vars(args)}
    if torch.cuda.is_available() and not args.tiny:
        record["op"] = op_alone(batches)
    record["in_situ"] = in_situ(batches, args.rounds, args.tiny)
    print(table(record["in_situ"]))
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
