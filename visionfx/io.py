"""Saving and loading what a patch adds: a JSON description and a safetensors file of the added tensors only."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from visionfx.config import config_from_dict, config_to_dict
from visionfx.patching import patch, patch_state

__all__ = ["save_pretrained", "load_pretrained", "added_state_dict", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "visionfx_config.json"
WEIGHTS_NAME = "visionfx_model.safetensors"
FORMAT_VERSION = 1


def _is_added(key: str) -> bool:
    return any(part.startswith("vfx_") for part in key.split("."))


def added_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters and buffers the patch added (every key with a ``vfx_`` component)."""
    return {k: v for k, v in model.state_dict().items() if _is_added(k)}


def _identity(model: nn.Module) -> dict:
    ident = {"class": f"{type(model).__module__}.{type(model).__qualname__}",
             "num_parameters_base": sum(p.numel() for n, p in model.named_parameters() if not _is_added(n))}
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict):
        ident["timm_architecture"] = cfg.get("architecture")
        ident["timm_tag"] = cfg.get("tag")
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    if name_or_path:
        ident["name_or_path"] = name_or_path
    return ident


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``visionfx_config.json`` and ``visionfx_model.safetensors`` (added tensors only) to ``directory``."""
    from safetensors.torch import save_file

    from visionfx import __version__

    state = patch_state(model)
    if state is None:
        raise RuntimeError("save_pretrained needs a model patched by visionfx")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "visionfx_version": __version__,
        "method": type(state["config"]).method,
        "config": config_to_dict(state["config"]),
        "records": [{"method": r["method"], "adapter": r["adapter"], "site": r["site"], "paths": r["paths"]}
                    for r in state["records"]],
        "base_model": _identity(model),
    }
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    tensors = {k: v.detach().contiguous().cpu() for k, v in added_state_dict(model).items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


def load_pretrained(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Patch a freshly built base ``model`` as described in ``directory`` and load the added tensors strictly."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{directory / CONFIG_NAME} not found: not a visionfx save_pretrained directory")
    meta = json.loads((directory / CONFIG_NAME).read_text())
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{directory} was written by a newer visionfx (format {meta['format_version']})")
    config = config_from_dict(meta["config"])
    adapter = meta["records"][0]["adapter"] if meta.get("records") else None
    patch(model, config, adapter=adapter)
    sites = [{"method": r["method"], "site": r["site"], "paths": r["paths"]} for r in patch_state(model)["records"]]
    expected = [{k: r[k] for k in ("method", "site", "paths")} for r in meta["records"]]
    if sites != expected:
        from visionfx.patching import unpatch

        unpatch(model)
        raise ValueError(f"the model's sites do not match the saved ones: saved {expected}, got {sites}")
    tensors = load_file(str(directory / WEIGHTS_NAME))
    own = added_state_dict(model)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"added tensors do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, t in tensors.items():
        if own[key].shape != t.shape:
            raise ValueError(f"{key}: saved shape {tuple(t.shape)} != model shape {tuple(own[key].shape)}")
    model.load_state_dict(tensors, strict=False)
    return model
