"""Choosing between an op's Triton kernel and its PyTorch reference, and saying why.

Each op registers an :class:`Op`: its reference function, the import path of its Triton function (same signature),
and a ``supports`` check returning ``None`` or the reason the kernel refuses an input. ``backend="auto"`` takes the
kernel on CUDA when it supports the input, otherwise the reference; ``"triton"`` insists (and raises with the reason);
``"reference"`` never uses the kernel. The environment variable ``VISIONFX_BACKEND`` (auto/reference/triton) stands in
for ``"auto"``.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Op", "register_op", "get_op", "choose", "preload", "triton_available", "BACKENDS"]

BACKENDS = ("auto", "reference", "triton")


@dataclass(frozen=True)
class Op:
    """One op of ``kernels/``.

    Attributes:
        name: op name.
        reference: the PyTorch reference function.
        triton: ``"module:function"`` of the Triton implementation (same signature), or ``""`` if none yet.
        supports: ``supports(device_type, dtype, head_dim, **options) -> None | str`` (the refusal reason).
        compiles: the Triton function may be called while ``torch.compile`` traces (it goes through a custom op).
            The mixers' main ops all do; an inference-only op without it is skipped under compilation (see
            ``TokenMixer.inference_op``).
    """

    name: str
    reference: Callable
    triton: str = ""
    supports: Callable[..., str | None] = lambda *a, **k: None
    compiles: bool = False


_OPS: dict[str, Op] = {}


def register_op(op: Op) -> Op:
    _OPS[op.name] = op
    return op


def get_op(name: str) -> Op:
    if name not in _OPS:
        importlib.import_module(f"visionfx.kernels.{name}")
    return _OPS[name]


_TRITON_STATUS: dict[str, str | None] = {}


def triton_available() -> str | None:
    """``None`` if Triton can run kernels here, else the reason (probed once; a plain dict, which torch.compile
    traces without the warning an ``lru_cache`` gives)."""
    if "reason" not in _TRITON_STATUS:
        try:
            import triton  # noqa: F401

            _TRITON_STATUS["reason"] = None
        except Exception as e:  # pragma: no cover - depends on the install
            _TRITON_STATUS["reason"] = f"Triton not importable ({type(e).__name__})"
    return _TRITON_STATUS["reason"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_LOADED: dict[str, Callable] = {}


def _load(path: str) -> Callable:
    """The function at ``"module:function"``, imported once. A plain dict, not ``lru_cache``: torch.compile traces the
    lookup of a loaded function silently, but warns on every ``lru_cache`` call and breaks the graph at an import."""
    fn = _LOADED.get(path)
    if fn is None:
        module, _, name = path.partition(":")
        fn = _LOADED[path] = getattr(importlib.import_module(module), name)
    return fn


def preload(name: str) -> None:
    """Import op ``name``'s Triton function now, in eager code (the mixers call this when they are built), so that a
    model compiled before its first eager call does not trace the import. Without Triton this does nothing, and an
    import error is left to the call that would use the kernel, which raises it with its context."""
    op = get_op(name)
    if op.triton and triton_available() is None:
        try:
            _load(op.triton)
        except Exception:  # noqa: BLE001 - re-raised by choose() where the kernel is needed
            pass


def _env_backend(requested: str) -> str:
    if requested != "auto":
        return requested
    env = os.environ.get("VISIONFX_BACKEND", "auto").strip().lower() or "auto"
    if env not in BACKENDS:
        raise ValueError(f"VISIONFX_BACKEND must be one of {BACKENDS}, got {env!r}")
    return env


def refusal(op: Op, device_type: str, dtype: torch.dtype, head_dim: int, forced: bool = False, **options):
    """Why ``op``'s Triton kernel would refuse these inputs (``None``: it accepts them). Off CUDA the kernel runs
    only when forced under ``TRITON_INTERPRET=1`` (the interpreter is for testing, far too slow to choose itself)."""
    if not op.triton:
        return "no Triton kernel for this op yet"
    reason = triton_available()
    if reason:
        return reason
    if device_type != "cuda" and not (forced and _interpreting()):
        return f"inputs on {device_type}; the kernel runs on CUDA"
    return op.supports(device_type, dtype, head_dim, **options)


def choose(name: str, backend: str, device_type: str, dtype: torch.dtype, head_dim: int, **options):
    """``(function, backend used, reason)`` for op ``name`` on such inputs.

    Raises:
        ValueError: ``backend`` is unknown, or ``"triton"`` was forced and the kernel refuses (with the reason).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    op = get_op(name)
    backend = _env_backend(backend)
    if backend == "reference":
        return op.reference, "reference", "forced"
    why = refusal(op, device_type, dtype, head_dim, forced=backend == "triton", **options)
    if why is None:
        return _load(op.triton), "triton", "kernel supports the inputs"
    if backend == "triton":
        raise ValueError(f"{name}: the Triton backend was forced but refuses these inputs: {why}")
    return op.reference, "reference", why
