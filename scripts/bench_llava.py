"""Latency of the visual-token methods on the LLaVA-1.5-7B and LLaVA-NeXT-7B architectures (random weights).

    python scripts/bench_llava.py --out results/llava.json                 # H200: both models, batch 1 and 8, bf16
    python scripts/bench_llava.py --models llava --compile                  # + torch.compile'd LM at batch 1
    python scripts/bench_llava.py --tiny --out /tmp/tiny.json               # the same code on a tiny CPU model

The models are built from explicit configs (CLIP ViT-L/14-336 + Llama-2-7B; no download), in bf16 on CUDA. Per
model, batch size and configuration (eager and SDPA baselines; FasterVLM at 0/50/75/90/95 % pruning; DyVTE forced to
exit after layers 2/8/16; VAR) it reports, as medians over ``--reps`` runs after ``--warmup`` runs (CUDA events):

- ``ttft_ms``: one full forward on the prompt (vision tower, scoring, projector, LLM prefill, LM head);
- ``vision_ms`` / ``prefill_ms``: the vision tower's and the language model's share of that forward (hooks);
- ``decode_ms``: per generated token, ``(t(generate n) − t(generate 1)) / (n − 1)``, and ``decode_tok_s`` (batch /
  decode_ms); ``peak_gb``: ``torch.cuda.max_memory_allocated`` over one ``generate(n)``;
- the FasterVLM scoring overhead (at the smallest batch size): the patched ``get_image_features`` vs the original,
  and the CLS-row computation alone, as shares of the vision tower's time.

Prompts follow PERFORMANCE.md: 35 text tokens, the image placeholders (576 for LLaVA-1.5; HF's anyres count for
LLaVA-NeXT at ``--next-size``), 30 text tokens; no padding. VAR on random weights has no sinks at τ = 20 (that row is
the cost of running without any), so ``var-all`` (τ = 0: every token a sink, every layer on the VAR path) and
``var-hybrid`` give the full cost. ``--compile`` compiles the language model for batch-1 baselines and FasterVLM only
(DyVTE and VAR are data-dependent and refuse compilation).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

IMAGE_TOKEN = 32000
PRE, POST = 35, 30


def _clip_l336(tiny: bool):
    from transformers import CLIPVisionConfig

    if tiny:
        return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                image_size=32, patch_size=8)
    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
                            layer_norm_eps=1e-5)


def _llama7b(tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=IMAGE_TOKEN + 64, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2, max_position_embeddings=4096)
    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build(kind: str, tiny: bool, device: torch.device, dtype: torch.dtype):
    """LLaVA-1.5-7B (``kind="llava"``) or LLaVA-NeXT-7B (``"next"``) with random weights, eval mode."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig, \
        LlavaNextForConditionalGeneration

    vision, text = _clip_l336(tiny), _llama7b(tiny)
    common = dict(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, vision_feature_layer=-2,
                  vision_feature_select_strategy="default", projector_hidden_act="gelu")
    if kind == "llava":
        n = (vision.image_size // vision.patch_size) ** 2
        config, cls = LlavaConfig(image_seq_length=n, **common), LlavaForConditionalGeneration
    else:
        s = vision.image_size
        pinpoints = [[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s], [s, 3 * s]]
        config, cls = LlavaNextConfig(image_grid_pinpoints=pinpoints, **common), LlavaNextForConditionalGeneration
    config.pad_token_id = 0
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval()


def make_inputs(model, kind: str, batch: int, next_size: int, device, dtype) -> dict:
    """A batch of identical-length prompts: 35 text tokens, the image placeholders, 30 text tokens."""
    vcfg = model.config.vision_config
    s = vcfg.image_size
    g = torch.Generator().manual_seed(0)
    if kind == "llava":
        pixel = torch.randn(batch, 3, s, s, generator=g)
        extra = {}
    else:
        from visionfx.patches.llava import LlavaParts

        size = [next_size, next_size]
        crops = LlavaParts.of(model).crops_per_image([size])[0]
        pixel = torch.randn(batch, crops, 3, s, s, generator=g)
        extra = {"image_sizes": torch.tensor([size] * batch, device=device)}
    pixel = pixel.to(device=device, dtype=dtype)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixel, **extra)
    n = getattr(feats, "pooler_output", feats)[0].shape[0]
    vocab = model.config.text_config.vocab_size
    text = torch.randint(3, min(vocab, IMAGE_TOKEN), (batch, PRE + POST - 1), generator=g)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), text[:, :PRE - 1],
                     torch.full((batch, n), IMAGE_TOKEN), text[:, PRE - 1:]], dim=1).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixel, **extra}


class Clock:
    """Median milliseconds of callables, and of module calls inside them (pre/post hooks)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def stamp(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def elapsed(self, a, b) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return a.elapsed_time(b)
        return (b - a) * 1e3

    @contextlib.contextmanager
    def watch(self, module, sink: list):
        """Append the duration of every call of ``module`` to ``sink`` (read after synchronising)."""
        marks = {}
        pre = module.register_forward_pre_hook(lambda m, a: marks.__setitem__("start", self.stamp()))
        post = module.register_forward_hook(lambda m, a, o: sink.append((marks["start"], self.stamp())))
        try:
            yield
        finally:
            pre.remove()
            post.remove()

    def median(self, fn, reps: int, warmup: int) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            a = self.stamp()
            fn()
            times.append(self.elapsed(a, self.stamp()))
        return statistics.median(times)


def configurations(num_layers: int, tiny: bool) -> list[tuple[str, str | None, dict, str]]:
    """(name, method, overrides, text attention) of every benchmarked configuration."""
    rows = [("eager", None, {}, "eager"), ("sdpa", None, {}, "sdpa")]
    rows += [(f"fastervlm-{round(r * 100)}%", "fastervlm", {"keep": 1.0} if r == 0 else {"reduction": r}, "sdpa")
             for r in (0.0, 0.5, 0.75, 0.9, 0.95)]
    exits = [2, 8, 16] if num_layers >= 32 else sorted({round(k * num_layers / 32) for k in (2, 8, 16)})
    rows += [(f"dyvte-exit{k}", "dyvte", {"exit_layer": k, "router_hidden": 64 if tiny else 2048}, "sdpa")
             for k in exits]
    dims = {"sink_dims": (1,)} if tiny else {}
    rows += [("var", "var", dims, "eager"), ("var-all", "var", {**dims, "tau": 0.0, "summ": 0.0}, "eager"),
             ("var-hybrid", "var", {**dims, "tau": 0.0, "summ": 0.0, "mode": "hybrid"}, "sdpa")]
    return rows


def run_one(model, inputs, method, overrides, attn, args, clock, compiled: bool) -> dict:
    import visionfx
    from visionfx.patches.llava import LlavaParts

    parts = LlavaParts.of(model)
    model.set_attn_implementation({"text_config": attn})
    lm_owner, lm = parts.inner, parts.inner.language_model
    if method is not None:
        visionfx.patch(model, method, **overrides)
    try:
        if compiled:
            lm_owner.language_model = torch.compile(lm, backend=args.compile_backend)
        vision, prefill, lengths = [], [], []
        count = lm.register_forward_pre_hook(
            lambda m, a, k: lengths.append(int((k.get("inputs_embeds") if k.get("inputs_embeds") is not None
                                                else k["input_ids"]).shape[1])), with_kwargs=True)
        try:
            # a compiled language model runs its hooks inside the graph, where CUDA events are never recorded: time
            # only the whole forward then
            lm_watch = contextlib.nullcontext() if compiled else clock.watch(lm, prefill)
            with torch.inference_mode(), clock.watch(parts.vision_tower, vision), lm_watch:
                ttft = clock.median(lambda: model(**inputs, logits_to_keep=1), args.reps, args.warmup)
        finally:
            count.remove()
        lm_tokens = lengths[-1] if lengths else None
        keep = vision[args.warmup:], prefill[args.warmup:]
        vision_ms = statistics.median(clock.elapsed(a, b) for a, b in keep[0]) if keep[0] else None
        prefill_ms = statistics.median(clock.elapsed(a, b) for a, b in keep[1]) if keep[1] else None
        gen = dict(do_sample=False, pad_token_id=0, suppress_tokens=[IMAGE_TOKEN])

        def generate(n):
            return lambda: model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, **gen)

        with torch.inference_mode():
            t1 = clock.median(generate(1), args.reps, 1)
            n = args.new_tokens
            if clock.cuda:
                torch.cuda.reset_peak_memory_stats()
            tn = clock.median(generate(n), args.reps, 1)
        decode = (tn - t1) / max(n - 1, 1)
        batch = inputs["input_ids"].shape[0]
        return {"ttft_ms": ttft, "vision_ms": vision_ms, "prefill_ms": prefill_ms, "decode_ms": decode,
                "decode_tok_s": batch * 1e3 / decode if decode > 0 else None, "lm_tokens": lm_tokens,
                "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if clock.cuda else None}
    finally:
        lm_owner.language_model = lm
        if method is not None and visionfx.is_patched(model):
            visionfx.unpatch(model)


def scoring_overhead(model, inputs, args, clock) -> dict:
    """FasterVLM's cost on the vision side: patched vs original ``get_image_features``, and the CLS row alone."""
    import visionfx
    from visionfx.methods.fastervlm import cls_row_scores
    from visionfx.patches.llava import LlavaParts

    parts = LlavaParts.of(model)
    kw = {k: inputs[k] for k in ("pixel_values", "image_sizes") if k in inputs}
    with torch.inference_mode():
        base = clock.median(lambda: model.model.get_image_features(**kw), args.reps, args.warmup)
        layer = parts.vision_layers[parts.feature_layer()]
        captured = {}
        h = layer.register_forward_pre_hook(
            lambda m, a, k: captured.__setitem__("x", a[0] if a else k["hidden_states"]), with_kwargs=True)
        model.model.get_image_features(**kw)
        h.remove()
        x = captured.get("x")
        row = clock.median(lambda: cls_row_scores(layer, x), args.reps, args.warmup) if x is not None else None
        visionfx.patch(model, "fastervlm", reduction=0.75)
        try:
            patched = clock.median(lambda: model.model.get_image_features(**kw), args.reps, args.warmup)
        finally:
            visionfx.unpatch(model)
    return {"vision_features_ms": base, "patched_features_ms": patched, "cls_row_ms": row,
            "overhead_share": (patched - base) / base, "cls_row_share": row / base if row is not None else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny random model on CPU, fp32 (a smoke test)")
    p.add_argument("--models", default="llava,next", help="comma-separated: llava, next")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--configs", default=None, help="comma-separated configuration names (default: all)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--next-size", type=int, default=672, help="LLaVA-NeXT image side in pixels (anyres)")
    p.add_argument("--compile", action="store_true", help="also run batch 1 with a torch.compile'd language model")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--out", default="bench_llava.json")
    args = p.parse_args(argv)

    from visionfx.bench import environment
    from visionfx.utils import format_table

    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        args.next_size = 64
    elif not torch.cuda.is_available():
        print("no CUDA device: use --tiny for a CPU smoke test", file=sys.stderr)
        return 2
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
    import transformers

    env = {**environment(str(device)), "transformers": transformers.__version__}
    clock = Clock(device)
    rows, overhead = [], {}
    wanted = set(args.configs.split(",")) if args.configs else None
    for kind in args.models.split(","):
        model = build(kind, args.tiny, device, dtype)
        L = model.config.text_config.num_hidden_layers
        batches = [int(b) for b in args.batch_sizes.split(",")]
        for batch in batches:
            inputs = make_inputs(model, kind, batch, args.next_size, device, dtype)
            visual = int((inputs["input_ids"][0] == IMAGE_TOKEN).sum())
            if batch == min(batches):
                overhead[kind] = scoring_overhead(model, inputs, args, clock)
            runs = [(c, False) for c in configurations(L, args.tiny)]
            if args.compile and batch == 1:
                runs += [(c, True) for c in configurations(L, args.tiny) if c[1] in (None, "fastervlm")]
            for (name, method, overrides, attn), compiled in runs:
                if wanted is not None and name not in wanted:
                    continue
                row = {"model": kind, "batch": batch, "config": name, "attn": attn, "compiled": compiled,
                       "prompt_tokens": int(inputs["input_ids"].shape[1]), "visual_tokens": visual}
                try:
                    row.update(run_one(model, inputs, method, overrides, attn, args, clock, compiled))
                except Exception as e:  # one failing configuration must not stop the sweep
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                rows.append(row)
                print(f"{kind} b{batch} {name}{' compiled' if compiled else ''}: "
                      + (row.get("error") or f"ttft {row['ttft_ms']:.2f} ms"), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def fmt(v):
        return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else v)

    base = {(r["model"], r["batch"], r["compiled"]): r.get("prefill_ms") for r in rows if r["config"] == "sdpa"}
    table = [[r["model"], r["batch"], r["config"] + (" (compiled)" if r["compiled"] else ""), r["attn"],
              fmt(r.get("lm_tokens")), fmt(r.get("ttft_ms")), fmt(r.get("vision_ms")), fmt(r.get("prefill_ms")),
              fmt(base.get((r["model"], r["batch"], r["compiled"])) / r["prefill_ms"]
                  if r.get("prefill_ms") and base.get((r["model"], r["batch"], r["compiled"])) else None),
              fmt(r.get("decode_ms")), fmt(r.get("decode_tok_s")), fmt(r.get("peak_gb")), r.get("error", "")]
             for r in rows]
    print(format_table(["model", "B", "config", "attn", "LM tokens", "TTFT ms", "vision ms", "prefill ms",
                        "prefill speedup vs sdpa", "decode ms/tok", "tok/s", "peak GB", "error"], table))
    for kind, o in overhead.items():
        print(f"{kind}: FasterVLM scoring overhead {100 * o['overhead_share']:.2f} % of get_image_features "
              f"({o['vision_features_ms']:.2f} ms); CLS row alone {fmt(o['cls_row_ms'])} ms")
    settings = {k: v for k, v in vars(args).items()}
    settings.update(dtype=str(dtype), prompt=f"{PRE} text + image + {POST} text tokens, no padding")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"environment": env, "settings": settings, "rows": rows,
                                          "fastervlm_scoring": overhead}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
