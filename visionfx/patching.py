"""The public patching API: ``patch``, ``unpatch``, ``is_patched``, ``get_config``, ``explain``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from torch import nn

from visionfx.config import MethodConfig, config_from_dict, load_config
from visionfx.registry import find_adapter, get_adapter, get_method

__all__ = ["patch", "unpatch", "is_patched", "get_config", "explain", "resolve_config", "patch_state"]

_STATE = "_visionfx"


def resolve_config(method: str | MethodConfig | os.PathLike, **overrides) -> MethodConfig:
    """A config from a method name, a config object or a YAML path, with keyword overrides applied."""
    if isinstance(method, MethodConfig):
        return method.replace(**overrides) if overrides else method
    if isinstance(method, os.PathLike) or (isinstance(method, str) and method.endswith((".yaml", ".yml"))):
        return load_config(Path(method), **overrides)
    if isinstance(method, str):
        return config_from_dict({"method": method}, **overrides)
    raise TypeError(f"method must be a name, a config object or a YAML path, got {type(method).__name__}")


def patch_state(model: nn.Module) -> dict[str, Any] | None:
    """The bookkeeping visionfx keeps on a patched model (``None`` if unpatched)."""
    return model.__dict__.get(_STATE)


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` currently carries a visionfx patch."""
    return patch_state(model) is not None


def patch(model: nn.Module, method: str | MethodConfig | os.PathLike, *, adapter: str | None = None, **overrides):
    """Patch ``model`` in place with a visionfx method and return it.

    Args:
        model: a supported model (see ``visionfx list``): timm ViT/DeiT/DeiT-III/DiT, open_clip, LLaVA.
        method: a method name (``"agent"``, ``"inline"``, ``"rala"``, ``"slab"``, ``"vig"``, ...), a config object
            (``visionfx.get_config("agent")``) or the path of a YAML recipe.
        adapter: force a model-family adapter by name instead of detecting it.
        **overrides: config fields, e.g. ``agent_num=49`` or ``layers=[0, 1, 2, 3]`` (indices of the sites to patch).

    Raises:
        RuntimeError: the model is already patched (call :func:`unpatch` first).
        TypeError: the model family is not supported (the message lists the supported ones).
        ValueError: unknown method or option (with suggestions), or a bad option value.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"visionfx.patch expects a torch.nn.Module, got {type(model).__name__}")
    if is_patched(model):
        methods = ", ".join(r["method"] for r in patch_state(model)["records"])
        raise RuntimeError(f"this model is already patched with {methods}; call visionfx.unpatch(model) first")
    config = resolve_config(method, **overrides)
    records = []
    try:
        first = None
        for cfg in (config, *config.companions()):
            spec = get_method(type(cfg).method)
            if adapter:
                ad = get_adapter(adapter)
            elif first is not None and spec.site in first.sites:
                ad = first  # after the first site is patched the model may no longer look like its family
            else:
                ad = find_adapter(model, spec.site)
            first = first or ad
            if spec.site not in ad.sites:
                raise TypeError(f"adapter {ad.name!r} does not provide site {spec.site!r} needed by {spec.name!r}")
            record = ad.adapter.apply(model, spec, cfg)
            records.append({"method": spec.name, "adapter": ad.name, "config": cfg, **record})
    except BaseException:
        for rec in reversed(records):
            get_adapter(rec["adapter"]).adapter.remove(model, rec)
        raise
    model.__dict__[_STATE] = {"config": config, "records": records}
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: the original modules come back (with any fine-tuned host weights) and hooks are removed."""
    state = patch_state(model)
    if state is None:
        raise RuntimeError("this model is not patched by visionfx")
    for rec in reversed(state["records"]):
        get_adapter(rec["adapter"]).adapter.remove(model, rec)
    del model.__dict__[_STATE]
    return model


def get_config(model_or_method: nn.Module | str) -> MethodConfig:
    """The config a model was patched with, or the default config of a method name."""
    if isinstance(model_or_method, str):
        return resolve_config(model_or_method)
    state = patch_state(model_or_method)
    if state is None:
        raise RuntimeError("this model is not patched by visionfx")
    return state["config"]


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def explain(model: nn.Module, file=sys.stdout) -> list[dict[str, Any]]:
    """Print a table of the patched sites (path, method, backend and why, parameters added) and return its rows."""
    from visionfx.patches.base import MIXER_NAME

    state = patch_state(model)
    if state is None:
        print("not patched by visionfx", file=file)
        return []
    rows = []
    for rec in state["records"]:
        for path in rec["paths"]:
            module = model.get_submodule(path)
            mixer = getattr(module, MIXER_NAME, None)
            if mixer is not None:
                backend, why = mixer.backend_info(next(module.parameters(), None))
                added = _count(mixer)
            else:
                backend, why = "reference", "pure PyTorch module"
                added = sum(p.numel() for n, p in module.named_parameters() if n.startswith("vfx_"))
            rows.append(
                {"path": path, "method": rec["method"], "backend": backend, "why": why, "params_added": added}
            )
    total = sum(r["params_added"] for r in rows)
    _print_table(rows, file)
    print(f"{len(rows)} sites patched, {total:,} parameters added ({_count(model):,} in the model)", file=file)
    return rows


def _print_table(rows: list[dict[str, Any]], file) -> None:
    from visionfx.utils import format_table

    print(
        format_table(
            ["layer", "method", "backend", "why", "params added"],
            [[r["path"], r["method"], r["backend"], r["why"], f"{r['params_added']:,}"] for r in rows],
        ),
        file=file,
    )
