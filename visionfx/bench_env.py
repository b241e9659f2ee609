"""The environment record of a benchmark (:func:`environment`): versions, machine, load and commit.

Re-exported by :mod:`visionfx.bench`, whose JSON records embed it.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

__all__ = ["environment", "git_commit", "short_commit"]


def git_commit() -> dict[str, Any] | None:
    """``{"commit": full hash, "dirty": tracked files modified}`` of the checkout visionfx runs from, or None."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


def short_commit() -> str | None:
    """The abbreviated hash of :func:`git_commit` (as in docs tables), or None outside a git checkout."""
    info = git_commit()
    return info["commit"][:7] if info and info["commit"] else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def environment(device: str = "auto") -> dict[str, Any]:
    """Versions, machine, load and commit, for the JSON record of a benchmark; call it before the run."""
    from visionfx import __version__
    from visionfx.bench import resolve_device

    dev = resolve_device(device)
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "visionfx": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": _version("timm"),
        "triton": _version("triton"),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        # taken before the run (the run's own threads would count): a load near or above the CPU count means other
        # processes share the CPU, and every row is slower and noisier
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "cuda": torch.version.cuda,
        "env": {k: os.environ[k] for k in ("VISIONFX_BACKEND", "TRITON_INTERPRET") if k in os.environ},
        "git": git_commit(),
    }
    return env
