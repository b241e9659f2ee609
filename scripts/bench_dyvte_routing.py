"""Where DyVTE's routing cost goes: the router op alone, and the prefill with routers that never fire, split.

    python scripts/bench_dyvte_routing.py --out results/dyvte_routing.json        # H200: LLaVA-1.5-7B, bf16
    python scripts/bench_dyvte_routing.py --tiny --rounds 3 --out /tmp/routing.json   # the same code on CPU

1. **The op** (CUDA only): one router step at LLaVA-1.5-7B widths (D = 4096, 2048 units, a 29-token span): the
   PyTorch reference and the Triton kernels of ``kernels/dyvte_router``, each with its logits read on the host (the
   per-layer pattern; µs per step over a loop) and queued without reads (µs per step, host launches included).
2. **In situ**: a LLaVA-1.5-7B forward (random bf16 weights, 641 language-model tokens, SDPA) for these variants,
   interleaved round by round (medians after 3 warm-up rounds), each against the unpatched model:

   | variant | what runs per routed layer |
   |---|---|
   | ``no-router`` | DyVTE's prefill setup and layer hooks only (the router hook returns at once) |
   | ``op-no-read`` | the Triton router op, its logits never read |
   | ``routed`` | the op, and the read of its logits before the next layer's attention (what DyVTE runs) |
   | ``routed-sync`` | the op and a host read of its logits right after it (DyVTE before the deferred read): the host waits for the device with nothing queued behind the router |
   | ``routed-ref`` | the reference op, read as in ``routed`` |

   Routers have a zeroed output layer, so none fires and all 31 routed layers run. Reported per routed layer, the
   difference to the unpatched model over L − 1, from two clocks: the time to first token (``ttft``: the whole
   forward, the prefill's setup included) and the language model's prefill (``lm``, CUDA events in hooks); and as a
   share of a decoder layer (the unpatched language model's prefill over L).
3. **An exit** (``--exit-layer K``): ``forced-K`` (every sample exits after layer K, no router runs) and
   ``routed-exit-K`` (the routers of layers 0..K run and router K fires for every sample: the decision, read before
   layer K+1's attention, restarts that layer on the text). Their difference over K + 1 is the routing cost per
   routed layer of a prefill that exits, restart included.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

VARIANTS = ("no-router", "op-no-read", "routed", "routed-sync", "routed-ref")


def exit_variants(k: int) -> tuple[str, str]:
    return f"forced-{k}", f"routed-exit-{k}"


def firing_weights(model, handle, inputs, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w1, w2)`` for router k that make every sample of ``inputs`` exit: unit b reads sample b's router input
    ``x_b`` through ``10·sign(x_b)/|x_b|_1`` (GELU(10) = 10) and feeds the exit logit, so each sample's exit logit is
    at least 10 − 0.17·(B − 1) > 0 = its keep logit (GELU ≥ −0.17)."""
    from visionfx.methods.dyvte_router import router_features

    grabbed = {}
    hook = handle.parts.llm_layers[k].register_forward_hook(lambda m, a, o: grabbed.setdefault("h", o))
    try:
        with torch.inference_mode(), handle.disabled():
            model(**inputs, logits_to_keep=1)
    finally:
        hook.remove()
    hidden = grabbed["h"][0] if isinstance(grabbed["h"], tuple) else grabbed["h"]
    ids = inputs["input_ids"]
    end = torch.full((ids.shape[0],), ids.shape[1] - 1, device=ids.device)
    feat, _ = router_features(hidden, ids == model.config.image_token_id, inputs["attention_mask"].bool(), end)
    router = handle.routers[k]
    w1 = torch.zeros_like(router.w1.weight)
    w2 = torch.zeros_like(router.w2.weight)
    x = feat.float()
    w1[: x.shape[0]] = (10 * torch.sign(x) / x.abs().sum(1, keepdim=True)).to(w1.dtype)
    w2[1, : x.shape[0]] = 1
    return w1, w2


def _bench_llava():
    spec = importlib.util.spec_from_file_location("bench_llava", Path(__file__).with_name("bench_llava.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def in_situ(batches, rounds: int, tiny: bool, exit_layer: int) -> dict:
    import visionfx
    from visionfx.kernels.dyvte_router.reference import router_logits_reference
    from visionfx.patches.llava import get_handle

    bl = _bench_llava()
    cuda = torch.cuda.is_available() and not tiny
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    model = bl.build("llava", not cuda, device, dtype)
    model.set_attn_implementation({"text_config": "sdpa"})
    exit_layer = min(exit_layer, model.config.text_config.num_hidden_layers - 2)
    out = {}
    for B in batches:
        inputs = bl.make_inputs(model, "llava", B, 672, device, dtype)
        visionfx.patch(model, "dyvte", router_hidden=64 if tiny else 2048)
        bl.silence_routers(model)
        handle = get_handle(model)
        op = handle._router_step()

        def read_at_once(*a):
            logits = op(*a)
            logits.tolist()
            return logits

        steps = {"no-router": op, "op-no-read": op, "routed": op, "routed-sync": read_at_once,
                 "routed-ref": router_logits_reference}
        forced_k, routed_k = exit_variants(exit_layer)
        steps[routed_k] = op
        router = handle.routers[exit_layer]
        silent = (router.w1.weight.detach().clone(), router.w2.weight.detach().clone())
        firing = firing_weights(model, handle, inputs, exit_layer)
        times = {k: [] for k in ("unpatched", *VARIANTS, forced_k, routed_k)}
        clock, lm = bl.Clock(device), {k: [] for k in times}
        try:
            for r in range(rounds + 3):
                for name in times:
                    handle.enabled = name != "unpatched"
                    handle._router_step = (lambda f: (lambda: f))(steps.get(name))
                    for method in ("_after_layer", "_resolve"):
                        handle.__dict__.pop(method, None)
                    if name == "no-router":
                        handle._after_layer = lambda *a: None
                    if name == "op-no-read":  # the decision is dropped unread: no sample exits
                        handle._resolve = lambda seq: setattr(seq, "pending", None)
                    handle.forced_exits = exit_layer if name == forced_k else None
                    with torch.no_grad():
                        for w, v in zip((router.w1.weight, router.w2.weight), firing if name == routed_k else silent):
                            w.copy_(v)
                    if cuda:
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    with torch.inference_mode(), clock.watch(handle.parts.inner.language_model, lm[name]):
                        model(**inputs, logits_to_keep=1)
                    if cuda:
                        torch.cuda.synchronize()
                    if name in (forced_k, routed_k) and handle.exit_layers.tolist() != [exit_layer] * B:
                        raise RuntimeError(f"{name}: exit layers {handle.exit_layers.tolist()}, not {exit_layer}")
                    if r >= 3:
                        times[name].append((time.perf_counter() - t) * 1e3)
        finally:
            visionfx.unpatch(model)
        layers = handle.num_layers
        row = {"layers": layers, "exit_layer": exit_layer}
        for clock_name, ms in (("ttft", times), ("lm", {k: [clock.elapsed(a, b) for a, b in v[3:]]
                                                        for k, v in lm.items()})):
            med = {k: statistics.median(v) for k, v in ms.items()}
            extra = {k: (med[k] - med["unpatched"]) / (layers - 1) * 1e3 for k in VARIANTS}
            extra[routed_k] = (med[routed_k] - med[forced_k]) / (exit_layer + 1) * 1e3
            row[f"{clock_name}_ms"], row[f"{clock_name}_per_routed_layer_us"] = med, extra
        row["prefill_ms"] = row["lm_ms"]["unpatched"]
        layer_us = row["prefill_ms"] / layers * 1e3  # the unpatched language model's prefill over its layers
        for clock_name in ("ttft", "lm"):
            row[f"{clock_name}_share_of_layer"] = {k: v / layer_us
                                                   for k, v in row[f"{clock_name}_per_routed_layer_us"].items()}
        out[f"B={B}"] = row
    return out


def table(situ: dict) -> str:
    from visionfx.utils import format_table

    rows = []
    for key, row in situ.items():
        for name in row["ttft_ms"]:
            cells = [key, name]
            for clock_name in ("ttft", "lm"):
                extra = row[f"{clock_name}_per_routed_layer_us"].get(name)
                share = row[f"{clock_name}_share_of_layer"].get(name)
                cells += [f"{row[f'{clock_name}_ms'][name]:.2f}", "-" if extra is None else f"{extra:+.1f}",
                          "-" if share is None else f"{100 * share:.1f}%"]
            rows.append(cells)
    return format_table(["batch", "variant", "TTFT ms", "us/layer", "of a layer", "LM ms", "us/layer", "of a layer"],
                        rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--rounds", type=int, default=27, help="timed rounds after 3 warm-up rounds")
    p.add_argument("--exit-layer", type=int, default=8, help="the exit of the forced-K / routed-exit-K pair")
    p.add_argument("--tiny", action="store_true", help="tiny random LLaVA on CPU (a smoke test of the script)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batch_sizes.split(",") if b]
    from visionfx.bench_env import environment

    record = {"environment": environment("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"),
              "settings": vars(args)}
    if torch.cuda.is_available() and not args.tiny:
        record["op"] = op_alone(batches)
    record["in_situ"] = in_situ(batches, args.rounds, args.tiny, args.exit_layer)
    print(table(record["in_situ"]))
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
