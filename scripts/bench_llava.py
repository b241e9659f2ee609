"""Latency of the visual-token methods on the LLaVA-1.5-7B and LLaVA-NeXT-7B architectures (random weights).

    python scripts/bench_llava.py --models llava --out results/llava.json           # H200, bf16, batch 1 and 8
    python scripts/bench_llava.py --models next --out results/next.json --time-budget 500
    python scripts/bench_llava.py --models next --out results/next.json --resume    # only the rows still missing
    python scripts/bench_llava.py --report results/llava.json results/next.json     # one table from records
    python scripts/bench_llava.py --models llava --batch-sizes 1 --configs sdpa,fastervlm-90% --compile
    python scripts/bench_llava.py --tiny --out /tmp/tiny.json                       # the same code, tiny CPU model

The models are built from explicit configs (CLIP ViT-L/14-336 + Llama-2-7B; no download), in bf16 on CUDA. Per
model, batch size and configuration (eager and SDPA baselines; FasterVLM at 0/50/75/90/95 % pruning; DyVTE forced to
exit after layers 2/8/16, and routed with routers that never fire, ``dyvte-routed``: the routing cost, with the
router op's Triton kernels and, ``dyvte-routed-ref``, its PyTorch reference; VAR) it
reports, as medians (CUDA events):

- ``ttft_ms``: one full forward on the prompt (vision tower, scoring, projector, LLM prefill, LM head), over
  ``--reps`` runs after ``--warmup``;
- ``vision_ms`` / ``prefill_ms``: the vision tower's and the language model's share of that forward (hooks);
- ``decode_ms``: per generated token, the median interval between consecutive model calls of ``generate(n)`` (the
  last one ends when ``generate`` returns), over ``--decode-reps`` calls after one warm-up, ``n = --new-tokens``
  (``0`` skips decoding); ``decode_tok_s`` = batch / decode_ms; ``peak_gb``: ``torch.cuda.max_memory_allocated``
  over the timed ``generate`` calls;
- the FasterVLM scoring overhead (at the smallest batch size): the patched ``get_image_features`` vs the original,
  and the CLS-row computation alone, as shares of the vision tower's time.

The JSON record (``--out``) is rewritten after every row, so a run stopped by a time limit keeps what it measured;
``--resume`` skips the rows (and scoring splits) a record already holds, and ``--time-budget`` stops before a row
that the time measured so far says would not finish in time. Each row prints the rows left and a rough time left.

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
    hidden = 64 if tiny else 2048
    rows += [(f"dyvte-exit{k}", "dyvte", {"exit_layer": k, "router_hidden": hidden}, "sdpa") for k in exits]
    rows += [("dyvte-routed", "dyvte", {"router_hidden": hidden}, "sdpa"),
             ("dyvte-routed-ref", "dyvte", {"router_hidden": hidden, "backend": "reference"}, "sdpa")]
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
        if method == "dyvte" and overrides.get("exit_layer") is None:
            silence_routers(model)
    try:
        if compiled:
            lm_owner.language_model = torch.compile(lm, backend=args.compile_backend)
        if clock.cuda:
            torch.cuda.reset_peak_memory_stats()
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
        out = {"ttft_ms": ttft, "vision_ms": vision_ms, "prefill_ms": prefill_ms, "lm_tokens": lm_tokens,
               "decode_ms": None, "decode_tok_s": None}
        if args.new_tokens >= 2:
            steps = decode_steps(model, inputs, args.new_tokens, args.decode_reps, clock)
            decode = statistics.median(steps)
            batch = inputs["input_ids"].shape[0]
            out.update(decode_ms=decode, decode_tok_s=batch * 1e3 / decode if decode > 0 else None,
                       decode_steps=len(steps))
        out["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30 if clock.cuda else None
        if method == "dyvte":  # of the last call (L − 1: never exited)
            from visionfx.patches.llava import get_handle

            handle = get_handle(model)
            out["exit_layers"] = handle.exit_layers.tolist()
            if handle.router_backend is not None:
                out["router_backend"] = list(handle.router_backend)
        return out
    finally:
        lm_owner.language_model = lm
        if method is not None and visionfx.is_patched(model):
            visionfx.unpatch(model)


def silence_routers(model) -> None:
    """Zero the output layer of every DyVTE router: logits 0, P(exit) = 0.5, never above the threshold, so every
    layer evaluates its router and no sample exits (random routers would exit at random layers): the
    ``dyvte-routed`` row against ``sdpa`` is the routing cost in full."""
    from visionfx.patches.llava import get_handle

    with torch.no_grad():
        for router in get_handle(model).routers:
            router.w2.weight.zero_()
            if router.w2.bias is not None:
                router.w2.bias.zero_()


def decode_steps(model, inputs, n: int, reps: int, clock) -> list[float]:
    """Per-token decoding times (ms) from ``reps`` calls of ``generate(n)`` after one warm-up: the intervals between
    the starts of consecutive model calls after the prefill, the last one ending when ``generate`` returns (so each
    includes ``generate``'s own per-step work)."""
    gen = dict(do_sample=False, pad_token_id=0, suppress_tokens=[IMAGE_TOKEN], max_new_tokens=n, min_new_tokens=n)
    stamps: list = []
    hook = model.register_forward_pre_hook(lambda m, a: stamps.append(clock.stamp()))
    steps = []
    try:
        with torch.inference_mode():
            for r in range(reps + 1):
                stamps.clear()
                model.generate(**inputs, **gen)
                marks = stamps[1:] + [clock.stamp()]
                if r > 0:
                    steps += [clock.elapsed(a, b) for a, b in zip(marks, marks[1:])]
    finally:
        hook.remove()
    return steps


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


def row_key(r: dict) -> tuple:
    return r["model"], r["batch"], r["config"], bool(r.get("compiled"))


class Progress:
    """Rows left and a rough time left: the mean time of the rows measured in the same (model, batch) group, else
    the seconds per batch·token measured so far scaled to the group (``tokens`` per model, once known)."""

    def __init__(self, plan: list[tuple], start: float):
        self.left = list(plan)
        self.start = start
        self.done: dict[tuple, list[float]] = {}
        self.units: list[tuple[float, float]] = []
        self.tokens: dict[str, int] = {}

    def finish(self, key: tuple, seconds: float) -> None:
        self.left.remove(key)
        self.done.setdefault(key[:2], []).append(seconds)
        if key[0] in self.tokens:
            self.units.append((key[1] * self.tokens[key[0]], seconds))

    def predict(self, key: tuple) -> float | None:
        group = self.done.get(key[:2])
        if group:
            return statistics.mean(group)
        if not self.units:
            return None
        rate = sum(s for _, s in self.units) / sum(u for u, _ in self.units)
        tokens = self.tokens.get(key[0], statistics.mean(self.tokens.values()))
        return rate * key[1] * tokens

    def remaining(self) -> str:
        guesses = [self.predict(k) for k in self.left]
        known = [g for g in guesses if g is not None]
        eta = f"~{sum(known):.0f} s left" if known or not guesses else "time left unknown"
        if known and len(known) < len(guesses):
            eta += f" (+{len(guesses) - len(known)} rows unestimated)"
        return f"{len(self.left)} rows left, {eta}, {time.perf_counter() - self.start:.0f} s elapsed"


def write_record(path: Path, env: dict, settings: dict, rows: list, overhead: dict) -> None:
    """Rewrite the JSON record atomically (a run killed mid-write keeps the previous one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"environment": env, "settings": settings, "rows": rows,
                               "fastervlm_scoring": overhead}, indent=2) + "\n")
    tmp.replace(path)


def report(rows: list, overhead: dict) -> str:
    """The plain-text table (and scoring-overhead lines) of benchmark rows."""
    from visionfx.utils import format_table

    def fmt(v):
        return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else v)

    base = {(r["model"], r["batch"], r["compiled"]): r.get("prefill_ms") for r in rows if r["config"] == "sdpa"}
    table = []
    for r in rows:
        b = base.get((r["model"], r["batch"], r["compiled"]))
        table.append([r["model"], r["batch"], r["config"] + (" (compiled)" if r["compiled"] else ""), r["attn"],
                      fmt(r.get("lm_tokens")), fmt(r.get("ttft_ms")), fmt(r.get("vision_ms")),
                      fmt(r.get("prefill_ms")), fmt(b / r["prefill_ms"] if r.get("prefill_ms") and b else None),
                      fmt(r.get("decode_ms")), fmt(r.get("decode_tok_s")), fmt(r.get("peak_gb")), r.get("error", "")])
    lines = [format_table(["model", "B", "config", "attn", "LM tokens", "TTFT ms", "vision ms", "prefill ms",
                           "prefill speedup vs sdpa", "decode ms/tok", "tok/s", "peak GB", "error"], table)]
    for kind, o in overhead.items():
        lines.append(f"{kind}: FasterVLM scoring overhead {100 * o['overhead_share']:.2f} % of get_image_features "
                     f"({o['vision_features_ms']:.2f} ms); CLS row alone {fmt(o['cls_row_ms'])} ms")
    return "\n".join(lines)


def make_plan(args) -> list[tuple]:
    """``(model, batch, config, compiled)`` of every row asked for, in run order; unknown names are errors."""
    kinds = [k for k in args.models.split(",") if k]
    if not kinds or set(kinds) - {"llava", "next"}:
        raise SystemExit(f"--models: choose from llava, next (got {args.models!r})")
    batches = [int(b) for b in args.batch_sizes.split(",") if b]
    configs = configurations(_llama7b(args.tiny).num_hidden_layers, args.tiny)
    names = [c[0] for c in configs]
    wanted = args.configs.split(",") if args.configs else names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; known: {', '.join(names)}")
    plan = []
    for kind in kinds:
        for batch in batches:
            plan += [(kind, batch, n, False) for n in names if n in wanted]
            if args.compile and batch == 1:
                plan += [(kind, batch, c[0], True) for c in configs if c[0] in wanted and c[1] in (None, "fastervlm")]
    return plan


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny random model on CPU, fp32 (a smoke test)")
    p.add_argument("--models", default="llava,next", help="comma-separated: llava, next")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--configs", default=None, help="comma-separated configuration names (default: all)")
    p.add_argument("--reps", type=int, default=5, help="timed forwards per row (time to first token)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=8, help="tokens per generate call for decoding (0: skip)")
    p.add_argument("--decode-reps", type=int, default=3, help="timed generate calls per row (after one warm-up)")
    p.add_argument("--next-size", type=int, default=672, help="LLaVA-NeXT image side in pixels (anyres)")
    p.add_argument("--compile", action="store_true", help="also run batch 1 with a torch.compile'd language model")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--no-scoring", action="store_true", help="skip the FasterVLM scoring-overhead split")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds: start no row that the time measured so far says would end after this")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --out and run only the others")
    p.add_argument("--report", nargs="+", default=None, metavar="JSON",
                   help="print one table from existing records and exit (nothing is run)")
    p.add_argument("--out", default="bench_llava.json")
    args = p.parse_args(argv)

    if args.report:
        rows, overhead = [], {}
        for path in args.report:
            record = json.loads(Path(path).read_text())
            rows += record["rows"]
            overhead.update(record.get("fastervlm_scoring", {}))
        print(report(rows, overhead))
        return 0
    start = time.perf_counter()
    plan = make_plan(args)
    from visionfx.bench import environment

    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        args.next_size = 64
    elif not torch.cuda.is_available():
        print("no CUDA device: use --tiny for a CPU smoke test", file=sys.stderr)
        return 2
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
    import transformers

    out = Path(args.out)
    rows, overhead = [], {}
    if args.resume and out.exists():
        record = json.loads(out.read_text())
        rows = [r for r in record["rows"] if "error" not in r]
        overhead = record.get("fastervlm_scoring", {})
        have = {row_key(r) for r in rows}
        plan = [k for k in plan if k not in have]
        print(f"resume: {len(rows)} rows kept from {out}", flush=True)
    env = {**environment(str(device)), "transformers": transformers.__version__}
    settings = {k: v for k, v in vars(args).items()}
    settings.update(dtype=str(dtype), prompt=f"{PRE} text + image + {POST} text tokens, no padding")
    write_record(out, env, settings, rows, overhead)
    clock = Clock(device)
    progress = Progress(plan, start)
    configs = {c[0]: c for c in configurations(_llama7b(args.tiny).num_hidden_layers, args.tiny)}
    stopped = False
    for kind in dict.fromkeys(k[0] for k in plan):
        if stopped:
            break
        model = build(kind, args.tiny, device, dtype)
        batches = [int(b) for b in args.batch_sizes.split(",") if b]
        for batch in dict.fromkeys(k[1] for k in plan if k[0] == kind):
            inputs = make_inputs(model, kind, batch, args.next_size, device, dtype)
            visual = int((inputs["input_ids"][0] == IMAGE_TOKEN).sum())
            progress.tokens[kind] = int(inputs["input_ids"].shape[1])
            if batch == min(batches) and kind not in overhead and not args.no_scoring:
                overhead[kind] = scoring_overhead(model, inputs, args, clock)
                write_record(out, env, settings, rows, overhead)
            for key in [k for k in plan if k[:2] == (kind, batch)]:
                guess = progress.predict(key)
                if args.time_budget is not None and guess is not None and \
                        time.perf_counter() - start + guess > args.time_budget:
                    stopped = True
                    break
                name, method, overrides, attn = configs[key[2]]
                row = {"model": kind, "batch": batch, "config": name, "attn": attn, "compiled": key[3],
                       "prompt_tokens": int(inputs["input_ids"].shape[1]), "visual_tokens": visual}
                t0 = time.perf_counter()
                try:
                    row.update(run_one(model, inputs, method, overrides, attn, args, clock, key[3]))
                except Exception as e:  # one failing configuration must not stop the sweep
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                row["row_s"] = time.perf_counter() - t0
                rows.append(row)
                write_record(out, env, settings, rows, overhead)
                progress.finish(key, row["row_s"])
                print(f"{kind} b{batch} {name}{' compiled' if key[3] else ''}: "
                      + (row.get("error") or f"ttft {row['ttft_ms']:.2f} ms"
                         + (f", decode {row['decode_ms']:.2f} ms/tok" if row.get("decode_ms") else ""))
                      + f" [{row['row_s']:.1f} s; {progress.remaining()}]", flush=True)
            if stopped:
                break
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(report(rows, overhead))
    if progress.left:
        print(f"time budget reached with {len(progress.left)} rows left: run the same command with --resume",
              flush=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
