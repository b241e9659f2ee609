"""Micro-benchmark of the token-mixer ops: SDPA as shipped vs the PyTorch reference vs the Triton kernel.

:func:`kernel_bench` times, for each token count N (ViT-S geometry by default: H = 6, d = 64, bf16), the forward and
the forward+backward of ``F.scaled_dot_product_attention`` (the model as it ships), of each op's reference and of its
Triton kernel: the linear-attention op with the options of the slab, rala and inline mixers, agent attention with 49
agents and its position biases, and bidirectional gated linear attention (vig). It reports the kernel's time against
the memory floor ``bytes / bandwidth`` (PERFORMANCE.md: forward reads Q, K, V and writes O, ``4·B·H·N·d`` elements,
plus vig's two fp32 gate tensors; forward+backward adds reading Q, K, V, dO and writing dQ, dK, dV).

Decisions the specs leave open:

- Batch: ``B = round(tokens_per_batch / N)`` (at least 1) with ``tokens_per_batch = 64·197``, so every row moves
  about the same number of tokens (B = 64 at N = 197 … 1 at N = 16385); pass ``batch=64`` for PERFORMANCE.md's
  fixed-batch anchor table.
- CUDA timings are ``triton.testing.do_bench`` medians (L2 flushed between calls) of ``warmup_ms``/``rep_ms``; the
  first Triton call of each shape autotunes and is excluded by the warm-up. They include the host's launch cost
  (Python, argument binding, autograd): at small shapes that, not the GPU, sets the time. On CUDA SDPA and the
  kernel are also replayed from a CUDA graph (``do_bench_cudagraph``, columns ``graph:``), forward and
  forward+backward (the whole ``autograd.grad`` step captured): the GPU time alone, what a model run under CUDA graphs
  pays. On CPU the benchmark is a smoke test: tiny default sizes, wall-clock medians of a few calls, and the Triton
  column only under ``TRITON_INTERPRET=1``.
- rala's key weights are ``N·softmax`` of random logits and its rotary tables fp32 ``[N, d/2]``, both built outside
  the timed region; inline uses ``scale = d^-0.5``; agent's B1 is a view of rows padded to 16 tokens, the layout
  the agent mixer hands the op.
- ``x_floor`` is time / floor (1.0 is the roofline; PERFORMANCE.md's target is ≤ 1.5 for N ≥ 1025);
  ``vs_sdpa`` is SDPA's time / the kernel's (above 1: the kernel is faster).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["kernel_bench", "format_kernel_rows", "CONFIGS", "TOKENS"]

TOKENS = (197, 577, 1025, 4097, 16385)  # 224², 384², 512², 1024², 2048² at patch 16, with a CLS token
CPU_TOKENS = (17, 50)
CONFIGS = {
    "slab": dict(feature="relu", normalizer="divisive"),
    "rala": dict(feature="elu1", normalizer="divisive", key_weights=True, rope=True),
    "inline": dict(feature="identity", normalizer="subtractive", scale=None),
    "agent": dict(op="agent_attention", agents=49),
    "vig": dict(op="bidir_gla"),
}
#: extra bytes per element of q read by an op's forward beyond Q, K, V and O (vig: its two fp32 gate tensors)
_EXTRA_BYTES = {"vig": 8}
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose bf16, fp16 or fp32")
    return _DTYPES[dtype]


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here; use device='cpu'")
    return dev


def _timer(device: torch.device, warmup_ms: float, rep_ms: float) -> Callable[[Callable], float]:
    if device.type == "cuda":
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))

    def wall(fn, calls=3):
        fn()
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return wall


def _graph_timer(rep_ms: float) -> Callable[[Callable], float]:
    """Median milliseconds of ``fn`` replayed from a CUDA graph: the GPU time alone, without the host's launch cost
    (what a model run under CUDA graphs, e.g. ``torch.compile(mode="reduce-overhead")``, pays)."""
    import triton.testing

    return lambda fn: float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))


def _op(config: str) -> str:
    return CONFIGS[config].get("op", "linear_attention")


def _inputs(config: str, B: int, H: int, N: int, d: int, dtype, device, grad: bool):
    """``(args, options)`` of one configuration's op call; ``args[:3]`` are q, k, v."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, d, generator=g).to(device, dtype).requires_grad_(grad) for _ in range(3))
    if _op(config) == "agent_attention":
        n = CONFIGS[config]["agents"]
        a = torch.randn(B, H, n, d, generator=g).to(device, dtype).requires_grad_(grad)
        b1, b2 = (0.1 * torch.randn(*s, generator=g).to(device) for s in ((H, n, N), (H, N, n)))
        # B1 laid out as the agent mixer makes it: token-contiguous rows padded to 16 tokens (a view)
        b1 = F.pad(b1, (0, -N % 16))[:, :, :N]
        return [q, k, v, a, b1.requires_grad_(grad), b2.requires_grad_(grad)], dict(scale1=d**-0.5, scale2=d**-0.5)
    if _op(config) == "bidir_gla":
        gates = F.logsigmoid(torch.randn(2, B, H, N, d, generator=g) + 4.0) / 16  # the vig parametrisation
        # both directions as two views of one buffer, as the vig mixer makes them (the op then copies nothing)
        gf, gb = gates.to(device).requires_grad_(grad).unbind(0)
        return [q, k, v, gf, gb], dict(scale=d**-0.5)
    opts = {key: val for key, val in CONFIGS[config].items() if key not in ("key_weights", "rope")}
    if "scale" in opts:
        opts["scale"] = d**-0.5
    if CONFIGS[config].get("key_weights"):
        w = N * torch.softmax(torch.randn(B, H, N, generator=g), -1)
        opts["key_weights"] = w.to(device).requires_grad_(grad)
    if CONFIGS[config].get("rope"):
        ang = torch.arange(N, dtype=torch.float32)[:, None] * torch.logspace(0, -4, d // 2)[None, :]
        opts["rope"] = (ang.cos().to(device), ang.sin().to(device))
    return [q, k, v], opts


def _fwd(fn, args, opts):
    return lambda: fn(*args, **opts)


def _fwd_bwd(fn, args, opts):
    leaves = [t for t in (*args, opts.get("key_weights")) if t is not None and t.requires_grad]
    go = torch.randn_like(args[0])

    def step():
        o = fn(*args, **opts)
        torch.autograd.grad(o, leaves, go, allow_unused=True)  # SDPA ignores everything but q, k, v

    return step


def _sdpa(q, k, v, *_, **__):
    return F.scaled_dot_product_attention(q, k, v)


def _triton_refusal(device: torch.device, dtype: torch.dtype, d: int, config: str) -> str | None:
    from visionfx.kernels.dispatch import refusal, get_op

    opts = {}
    if _op(config) == "linear_attention":
        opts = {key: (True if key in ("key_weights", "rope") else val) for key, val in CONFIGS[config].items()}
        opts.pop("scale", None)
    # off CUDA the kernel runs only in the interpreter, which the dispatcher uses only when forced
    return refusal(get_op(_op(config)), device.type, dtype, d, forced=device.type != "cuda", **opts)


def kernel_bench(
    tokens: Sequence[int] | None = None,
    heads: int = 6,
    head_dim: int = 64,
    dtype: Any = "bf16",
    device: str = "auto",
    batch: int | None = None,
    tokens_per_batch: int = 64 * 197,
    configs: Sequence[str] = tuple(CONFIGS),
    backward: bool = True,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    bandwidth_tbps: float = 4.28,
    json_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Time SDPA, the reference and the Triton kernel per token count and mixer; print a table, optionally write JSON.

    Args:
        tokens: sequence lengths N (default 197 … 16385 on CUDA, a tiny smoke-test pair on CPU).
        heads, head_dim: H and d.
        dtype: ``"bf16"``, ``"fp16"``, ``"fp32"`` or a torch dtype.
        device: ``"auto"``, ``"cuda"``, ``"cuda:N"`` or ``"cpu"``.
        batch: fixed B for every N; default ``round(tokens_per_batch / N)``.
        configs: which ops to time: ``slab``, ``rala``, ``inline`` (linear-attention options), ``agent``, ``vig``.
        backward: also time forward+backward.
        warmup_ms, rep_ms: ``do_bench`` budgets on CUDA.
        bandwidth_tbps: HBM bandwidth for the floor (H200: 4.28 TB/s measured copy).
        json_path: where to write ``{"environment", "settings", "rows"}``.
        progress: print one line per measured row while running.

    Returns:
        One dict per (N, config): shapes, median milliseconds per implementation (``None`` where it cannot run, with
        ``notes``), the floors, ``x_floor`` and ``vs_sdpa`` ratios.
    """
    from visionfx.kernels.dispatch import _load, get_op

    dev, dt = _device(device), _dtype(dtype)
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    if tokens is None:
        tokens = TOKENS if dev.type == "cuda" else CPU_TOKENS
    bench = _timer(dev, warmup_ms, rep_ms)
    graphed = _graph_timer(rep_ms) if dev.type == "cuda" else None
    elt = torch.finfo(dt).bits // 8
    rows = []
    for n in tokens:
        B = batch if batch is not None else max(1, round(tokens_per_batch / n))
        if dev.type == "cpu" and batch is None:
            B = 1
        elems = B * heads * n * head_dim
        for config in configs:
            extra = _EXTRA_BYTES.get(config, 0)
            floor_fwd = (4 * elt + extra) * elems / (bandwidth_tbps * 1e12) * 1e3
            floor_fb = ((4 + 7) * elt + 2 * extra) * elems / (bandwidth_tbps * 1e12) * 1e3
            row: dict[str, Any] = dict(N=n, B=B, H=heads, d=head_dim, dtype=str(dt).replace("torch.", ""),
                                       config=config, floor_fwd_ms=floor_fwd, floor_fwd_bwd_ms=floor_fb, notes=[])
            op = get_op(_op(config))
            why, tri = _triton_refusal(dev, dt, head_dim, config), None
            if why is None:
                tri = _load(op.triton)
            else:
                hint = " (set TRITON_INTERPRET=1 for an interpreted smoke test)" if dev.type == "cpu" else ""
                row["notes"].append(f"triton: {why}{hint}")
            impls = {"sdpa": _sdpa, "reference": op.reference, "triton": tri}
            for mode in ("fwd", "fwd_bwd") if backward else ("fwd",):
                for name, fn in impls.items():
                    key = f"{name}_{mode}_ms"
                    row[key] = None
                    if fn is None:
                        continue
                    args, opts = _inputs(config, B, heads, n, head_dim, dt, dev, grad=mode == "fwd_bwd")
                    step = (_fwd if mode == "fwd" else _fwd_bwd)(fn, args, opts)
                    try:
                        with torch.set_grad_enabled(mode == "fwd_bwd"):
                            row[key] = bench(step)
                            if graphed is not None and name != "reference":
                                row[f"{name}_{mode}_graph_ms"] = graphed(step)
                    except (RuntimeError, ValueError) as e:  # out of memory, unsupported backend
                        row["notes"].append(f"{name} {mode}: {str(e).splitlines()[0][:200]}")
                    del args, opts, step
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
            _ratios(row)
            rows.append(row)
            if progress:
                print(f"  N={n} B={B} {config}: triton fwd {_ms(row['triton_fwd_ms'])} ms, "
                      f"{_x(row.get('x_floor_fwd'))} floor", flush=True)
    print(format_kernel_rows(rows))
    if json_path is not None:
        settings = dict(tokens=list(tokens), heads=heads, head_dim=head_dim, dtype=str(dt), device=str(dev),
                        batch=batch, tokens_per_batch=tokens_per_batch, configs=list(configs), backward=backward,
                        warmup_ms=warmup_ms, rep_ms=rep_ms, bandwidth_tbps=bandwidth_tbps)
        path = _write_json(json_path, rows, settings, device)
        print(f"\nwrote {path}")
    return rows


def _ratios(row: dict) -> None:
    for mode, floor in (("fwd", row["floor_fwd_ms"]), ("fwd_bwd", row["floor_fwd_bwd_ms"]),
                        ("fwd_graph", row["floor_fwd_ms"]), ("fwd_bwd_graph", row["floor_fwd_bwd_ms"])):
        t, s = row.get(f"triton_{mode}_ms"), row.get(f"sdpa_{mode}_ms")
        row[f"x_floor_{mode}"] = t / floor if t else None
        row[f"vs_sdpa_{mode}"] = s / t if (t and s) else None


def _ms(t) -> str:
    return "-" if t is None else (f"{t:.3f}" if t < 100 else f"{t:.0f}")


def _x(r) -> str:
    return "-" if r is None or not math.isfinite(r) else f"{r:.2f}x"


def format_kernel_rows(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`kernel_bench` rows (milliseconds; ratios as ``x``)."""
    graph = any(r.get("triton_fwd_graph_ms") is not None for r in rows)
    graph_fb = any(r.get("triton_fwd_bwd_graph_ms") is not None for r in rows)
    head = ["N", "B", "config", "sdpa fwd", "ref fwd", "triton fwd", "floor", "x floor", "vs sdpa",
            "sdpa f+b", "ref f+b", "triton f+b", "x floor", "vs sdpa"]
    head += ["graph: sdpa fwd", "triton fwd", "x floor", "vs sdpa"] if graph else []
    head += ["graph: sdpa f+b", "triton f+b", "x floor", "vs sdpa"] if graph_fb else []

    def graph_cells(r, mode):
        return [_ms(r.get(f"sdpa_{mode}_graph_ms")), _ms(r.get(f"triton_{mode}_graph_ms")),
                _x(r.get(f"x_floor_{mode}_graph")), _x(r.get(f"vs_sdpa_{mode}_graph"))]

    body = [[str(r["N"]), str(r["B"]), r["config"], _ms(r["sdpa_fwd_ms"]), _ms(r["reference_fwd_ms"]),
             _ms(r["triton_fwd_ms"]), _ms(r["floor_fwd_ms"]), _x(r["x_floor_fwd"]), _x(r["vs_sdpa_fwd"]),
             _ms(r.get("sdpa_fwd_bwd_ms")), _ms(r.get("reference_fwd_bwd_ms")), _ms(r.get("triton_fwd_bwd_ms")),
             _x(r.get("x_floor_fwd_bwd")), _x(r.get("vs_sdpa_fwd_bwd"))]
            + (graph_cells(r, "fwd") if graph else []) + (graph_cells(r, "fwd_bwd") if graph_fb else [])
            for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = sorted({n for r in rows for n in r["notes"]})
    return "\n".join(lines + [f"note: {n}" for n in notes])


def _write_json(path, rows, settings, device) -> Path:
    try:
        from visionfx.bench import environment

        env = environment(device)
    except Exception as e:  # the record is still useful without it
        env = {"error": f"{type(e).__name__}: {e}", "torch": torch.__version__}
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": env, "settings": settings, "rows": rows}, indent=2) + "\n")
    return path
