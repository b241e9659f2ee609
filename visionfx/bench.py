"""Speed and memory of a model patched with each method against the original, measured in one process.

:func:`run_bench` builds a timm model (random weights, ``pretrained=False``) once per image size and method, patches
it, and times forward passes of one batch under ``torch.inference_mode``: ``warmup`` untimed calls, then ``repeat``
timed calls, reporting the median. At each size the original model is measured first and the methods right after it,
so every ratio compares runs made close together in one process, never numbers from different runs.

Decisions the specs leave open:

- Latency is wall-clock time of one forward of one batch (``time.perf_counter``; on CUDA after
  ``torch.cuda.synchronize``), in milliseconds; images/s is ``batch_size / latency``.
- The model is cast to the benchmark dtype (``model.to(dtype)``), not run under autocast, so every weight and
  activation has that dtype as in deployment.
- Peak memory on CUDA is ``torch.cuda.max_memory_allocated`` over one forward after ``reset_peak_memory_stats``
  (weights, input and activations). PyTorch keeps no allocator statistics on CPU, and the process's peak resident set
  (``ru_maxrss``) only ever grows over the process's lifetime and includes freed-but-cached pages, so it cannot be
  attributed to one run. On CPU the peak is therefore the bytes of the model's parameters, buffers and the input plus
  the highest level of live PyTorch CPU allocations during one forward, read from the allocation and free events of
  ``torch.profiler`` (``profile_memory=True``); that forward is not timed.
- ``speedup`` is the original's median latency divided by the method's at the same size: above 1 is faster.
- ``threads="auto"`` (the default) keeps PyTorch's thread count on an idle CPU but lowers it to the CPUs left idle by
  other processes (CPU count minus the 1-minute load average, at least 1) when the CPU is shared: PyTorch's threads
  wait on each other at every op, so two threads on two busy cores measured 10-20x slower and far noisier than one.
  The count used is recorded in every row.
- A method that cannot run on the model (a grid it refuses, a site the model lacks) gives a row with ``error`` set
  instead of stopping the benchmark; bad arguments (unknown method or model, no CUDA) raise :class:`BenchError`.
"""

from __future__ import annotations

import gc
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from visionfx.bench_env import environment
from visionfx.config import MethodConfig, suggest

__all__ = ["BenchError", "DEFAULTS", "DTYPES", "run_bench", "environment", "format_rows", "write_json",
           "resolve_methods", "auto_threads"]

#: the arguments of a plain ``visionfx bench``: about a minute on a 2-core CPU
DEFAULTS = dict(
    model="vit_tiny_patch16_224",
    sizes=(128, 224),
    batch_size=2,
    device="auto",
    dtype="fp32",
    warmup=1,
    repeat=5,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

ORIGINAL = "original"

CPU_MEMORY_NOTE = (
    "CPU: parameters + buffers + input + the peak of live PyTorch CPU allocations during one untimed forward, from "
    "torch.profiler memory events. The process's peak RSS (resource.getrusage ru_maxrss) is not used: it only grows "
    "over the process's lifetime and counts freed-but-cached pages, so it cannot be attributed to one run."
)
CUDA_MEMORY_NOTE = "CUDA: torch.cuda.max_memory_allocated over one forward after reset_peak_memory_stats."


class BenchError(ValueError):
    """A problem with the benchmark's arguments (unknown method or model, unavailable device, bad sizes)."""


# --- arguments ---------------------------------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise BenchError(f"unknown device {device!r} ({e}); use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise BenchError(f"device {device!r}: only cpu and cuda are supported")
    return dev


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise BenchError(f"unknown dtype {dtype!r}{suggest(dtype, DTYPES)}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_methods(methods: Sequence[str] | None) -> list[tuple[str, MethodConfig]]:
    """``(label, config)`` per method: names (default: every attention method) or YAML recipe paths."""
    from visionfx.patching import resolve_config
    from visionfx.registry import list_methods

    if methods is None:
        methods = list_methods(site="attention")
    out = []
    for m in methods:
        try:
            config = resolve_config(m)
        except (ValueError, TypeError, FileNotFoundError) as e:
            raise BenchError(str(e)) from None
        label = m if not str(m).endswith((".yaml", ".yml")) else f"{type(config).method}:{Path(m).stem}"
        out.append((label, config))
    if not out:
        raise BenchError("no methods to benchmark")
    labels = [label for label, _ in out]
    if len(set(labels)) != len(labels):
        raise BenchError(f"a method is listed twice: {labels}")
    return out


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def auto_threads() -> int:
    """PyTorch's thread count, lowered to the CPUs other processes leave idle (1-minute load average), at least 1."""
    current = torch.get_num_threads()
    if not hasattr(os, "getloadavg"):
        return current
    idle = int(_cpus() - os.getloadavg()[0] + 0.5)
    return max(1, min(current, idle))


def check_model_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        raise BenchError(
            f"unknown timm model {name!r}{suggest(name, timm.list_models())}; "
            "see timm.list_models('vit_*') for ViT names"
        )


def build_model(name: str, size: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A timm model with random weights (seeded) for ``size``² images, in eval mode on ``device`` in ``dtype``."""
    import timm

    torch.manual_seed(0)
    try:
        model = timm.create_model(name, pretrained=False, img_size=size)
    except TypeError as e:  # models without an img_size argument are not ViTs
        raise BenchError(f"model {name!r} cannot be built for image size {size}: {e}") from None
    return model.eval().to(device=device, dtype=dtype)


# --- measuring ---------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(model: nn.Module, x: torch.Tensor, warmup: int, repeat: int) -> list[float]:
    """Milliseconds of ``repeat`` timed forwards of ``x [B, 3, H, W]`` after ``warmup`` untimed ones."""
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        _sync(x.device)
        for _ in range(repeat):
            t0 = time.perf_counter()
            model(x)
            _sync(x.device)
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _tensor_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def peak_memory(model: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes of one forward of ``x``, weights and input included (see the module docstring for CPU)."""
    if x.device.type == "cuda":
        _sync(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        with torch.inference_mode():
            model(x)
        _sync(x.device)
        return int(torch.cuda.max_memory_allocated(x.device))
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(x)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() ==
              torch.autograd.DeviceType.CPU]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return _tensor_bytes(model) + x.numel() * x.element_size() + peak


def _backends(model: nn.Module) -> str:
    from visionfx.patching import explain

    rows = explain(model, file=io.StringIO())
    return "+".join(sorted({r["backend"] for r in rows})) or "-"


def _tokens(model: nn.Module) -> tuple[int | None, list[int] | None]:
    from visionfx.registry import find_adapter

    try:
        layout = find_adapter(model, "attention").adapter.layout(model)
    except Exception:  # a model no adapter knows still gets timed as the original
        return None, None
    return layout.num_tokens, list(layout.grid)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def _measure(model, x, warmup, repeat, compile, memory) -> dict[str, Any]:
    run = model
    if compile:
        torch._dynamo.reset()
        run = torch.compile(model)
    times = time_forward(run, x, max(warmup, 1) if compile else warmup, repeat)
    row: dict[str, Any] = {"latency_ms": statistics.median(times), "latencies_ms": times}
    row["images_per_s"] = x.shape[0] / (row["latency_ms"] / 1e3)
    row["peak_memory_mib"] = peak_memory(run, x) / 2**20 if memory else None
    return row


# --- the benchmark -----------------------------------------------------------------------------------------------


def run_bench(
    model: str = DEFAULTS["model"],
    methods: Sequence[str] | None = None,
    sizes: Sequence[int] = DEFAULTS["sizes"],
    batch_size: int = DEFAULTS["batch_size"],
    device: str = DEFAULTS["device"],
    dtype: str = DEFAULTS["dtype"],
    warmup: int = DEFAULTS["warmup"],
    repeat: int = DEFAULTS["repeat"],
    compile: bool = False,
    memory: bool = True,
    threads: int | str | None = "auto",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Benchmark timm model ``model`` as it ships and patched with each of ``methods`` at each image size.

    Args:
        model: a timm ViT name (built with ``pretrained=False, img_size=size``).
        methods: method names or YAML recipe paths (default: every attention method of the registry).
        sizes: square image sizes in pixels.
        batch_size: images per forward.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        warmup, repeat: untimed and timed forwards per row (the median of the timed ones is reported).
        compile: run ``torch.compile(model)`` (compilation happens during warm-up).
        memory: measure peak memory (one extra untimed forward per row).
        threads: CPU threads for the run (``torch.set_num_threads``): a count, ``"auto"`` (see the module docstring)
            or ``None`` (PyTorch's setting).
        progress: show a progress bar on stderr.

    Returns:
        One dict per (size, method), the original first at each size, with ``model``, ``method``, ``size``, ``tokens``,
        ``grid``, ``batch_size``, ``device``, ``dtype``, ``compiled``, ``latency_ms`` (median), ``latencies_ms``,
        ``images_per_s``, ``speedup`` (original latency / latency), ``peak_memory_mib``, ``params``,
        ``params_added``, ``backend`` and ``error`` (``None`` or the reason the row could not be measured).

    Raises:
        BenchError: bad arguments.
    """
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    check_model_name(model)
    chosen = resolve_methods(methods)
    sizes = [int(s) for s in sizes]
    if not sizes or any(s <= 0 for s in sizes):
        raise BenchError(f"sizes must be positive integers, got {list(sizes)}")
    if batch_size < 1 or repeat < 1 or warmup < 0:
        raise BenchError(f"need batch_size >= 1, repeat >= 1, warmup >= 0; got {batch_size}, {repeat}, {warmup}")
    if threads == "auto":
        threads = auto_threads() if dev.type == "cpu" else None
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise BenchError(f"threads must be an integer >= 1 or 'auto', got {threads!r}")
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        _check_supported(model, chosen, sizes[0], dev, dt)
        return _run_all(model, chosen, sizes, batch_size, dev, dt, dtype, warmup, repeat, compile, memory, progress)
    finally:
        torch.set_num_threads(threads_before)


def _run_all(model, chosen, sizes, batch_size, dev, dt, dtype, warmup, repeat, compile, memory, progress):
    from tqdm import tqdm

    common = {"model": model, "batch_size": batch_size, "device": str(dev), "dtype": dtype, "compiled": compile,
              "threads": torch.get_num_threads()}
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(sizes) * (1 + len(chosen)), desc="visionfx bench", unit="run", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    try:
        for size in sizes:
            g = torch.Generator().manual_seed(size)
            x = torch.randn(batch_size, 3, size, size, generator=g).to(device=dev, dtype=dt)
            base = None
            for label, config in [(ORIGINAL, None), *chosen]:
                bar.set_postfix_str(f"{size}px {label}")
                row = {**common, "method": label, "size": size, **_run_one(model, size, config, x, dev, dt,
                                                                        warmup, repeat, compile, memory)}
                if label == ORIGINAL:
                    base = row
                ok = row["error"] is None and base is not None and base["error"] is None
                row["speedup"] = base["latency_ms"] / row["latency_ms"] if ok else None
                if label != ORIGINAL and base is not None and base["params"] is not None and row["params"] is not None:
                    row["params_added"] = row["params"] - base["params"]
                rows.append(row)
                bar.update(1)
            del x
    finally:
        bar.close()
    return rows


def _check_supported(name, chosen, size, dev, dt) -> None:
    """Fail early, with the supported families, when no adapter provides a method's site on this model."""
    from visionfx.registry import find_adapter, get_method

    model = build_model(name, size, dev, dt)
    for site in dict.fromkeys(get_method(type(c).method).site for _, c in chosen):
        try:
            find_adapter(model, site)
        except TypeError as e:
            raise BenchError(f"model {name!r}: {e}") from None


def _run_one(name, size, config, x, dev, dt, warmup, repeat, compile, memory) -> dict[str, Any]:
    import visionfx

    row: dict[str, Any] = {"tokens": None, "grid": None, "latency_ms": None, "latencies_ms": [],
                           "images_per_s": None, "peak_memory_mib": None, "params": None,
                           "params_added": 0, "backend": "-", "error": None}
    model = None
    try:
        model = build_model(name, size, dev, dt)
        row["tokens"], row["grid"] = _tokens(model)
        if config is not None:
            visionfx.patch(model, config)
            row["backend"] = _backends(model)
        row["params"] = _params(model)
        row.update(_measure(model, x, warmup, repeat, compile, memory))
    except BenchError:
        raise
    except Exception as e:  # recorded in the row; one failing method must not hide the others' numbers
        row["error"] = _first_line(e)
    finally:
        del model
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return row


# --- reporting ---------------------------------------------------------------------------------------------------


def _fmt_params(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if abs(n) >= 1e5 else f"{n / 1e3:.1f}k" if abs(n) >= 1e3 else str(n)


def _spread(row: dict[str, Any]) -> str:
    times = row["latencies_ms"]
    if row["error"] is not None or len(times) < 3:
        return "-"
    return f"{100 * (max(times) - min(times)) / statistics.median(times):.0f}%"


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`run_bench` as a text table (``spread``: range of the timed runs over their median), with
    the errors of failed rows listed below it."""
    from visionfx.utils import format_table

    header = ["size", "tokens", "method", "backend", "ms/batch", "spread", "img/s", "speed vs original", "peak MiB",
              "params", "added"]
    table, errors = [], []
    for r in rows:
        failed = r["error"] is not None
        if failed:
            errors.append(f"{r['method']} at {r['size']}px: {r['error']}")
        table.append([
            r["size"],
            r["tokens"] if r["tokens"] is not None else "-",
            r["method"],
            r["backend"],
            "failed" if failed else f"{r['latency_ms']:.1f}",
            _spread(r),
            "-" if failed else f"{r['images_per_s']:.1f}",
            "-" if r["speedup"] is None else f"{r['speedup']:.2f}x",
            "-" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.1f}",
            _fmt_params(r["params"]),
            "-" if r["method"] == ORIGINAL or r["params"] is None else "+" + _fmt_params(r["params_added"]),
        ])
    text = format_table(header, table)
    if errors:
        text += "\n\nfailed:\n  " + "\n  ".join(errors)
    return text


def write_json(path: str | os.PathLike, rows: list[dict[str, Any]], settings: dict[str, Any],
               env: dict[str, Any] | None = None) -> Path:
    """Write ``{"environment", "settings", "memory_note", "rows"}`` to ``path`` (``env``: :func:`environment`)."""
    path = Path(path)
    device = settings.get("device", "auto")
    dev = resolve_device(device)
    payload = {
        "environment": env if env is not None else environment(device),
        "settings": settings,
        "memory_note": CUDA_MEMORY_NOTE if dev.type == "cuda" else CPU_MEMORY_NOTE,
        "rows": rows,
    }
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
