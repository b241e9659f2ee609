"""DyVTE router checkpoints (MLLM.md §2.8): ``dyvte_routers.safetensors`` + ``visionfx_config.json``, routers only.

Tensors ``routers.{l}.w1.weight [H, 2D]`` and ``routers.{l}.w2.weight [2, H]`` for l = 0..L−1; the JSON records the
format version, the base model (name, revision, D, L, router width, activation), the router input and decision, the
prompt template, the image token id and the training setup. Loading refuses a different D, L or router width and warns
when the prompt template differs from the patch's ``prompt_template``. :func:`routers_from_official` renames the
router tensors of an official DyVTE full checkpoint.

A whole patched model can also be saved with ``visionfx.save_pretrained`` (routers as ``vfx_routers.*``).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from visionfx.methods.dyvte import DyVTEHandle
from visionfx.patches.llava import get_handle

__all__ = ["save_routers", "load_routers", "routers_from_official", "ROUTERS_NAME", "ROUTERS_CONFIG"]

ROUTERS_NAME = "dyvte_routers.safetensors"
ROUTERS_CONFIG = "visionfx_config.json"
ROUTERS_FORMAT = 1
FEATURE = "mean(text after last image, excl. final) || final prompt token"


def _handle_of(model_or_handle) -> DyVTEHandle:
    handle = model_or_handle if isinstance(model_or_handle, DyVTEHandle) else get_handle(model_or_handle)
    if not isinstance(handle, DyVTEHandle):
        raise TypeError("this model is not patched with dyvte")
    return handle


def save_routers(model_or_handle, directory: str | os.PathLike, *, base_model: str | None = None,
                 revision: str | None = None, prompt_template: str | None = None, training: dict | None = None,
                 dtype: torch.dtype | None = None) -> Path:
    """Write ``dyvte_routers.safetensors`` (``routers.{l}.w1.weight [H, 2D]``, ``routers.{l}.w2.weight [2, H]``) and
    ``visionfx_config.json`` (§2.8) to ``directory``."""
    from safetensors.torch import save_file

    from visionfx import __version__

    handle = _handle_of(model_or_handle)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, r in enumerate(handle.routers):
        for name in ("w1", "w2"):
            w = getattr(r, name).weight.detach()
            tensors[f"routers.{i}.{name}.weight"] = (w.to(dtype) if dtype is not None else w).contiguous().cpu()
    cfg = handle.parts.config
    template = prompt_template if prompt_template is not None else handle.config.prompt_template
    meta = {
        "format_version": ROUTERS_FORMAT, "visionfx_version": __version__, "method": "dyvte",
        "base_model": {"name_or_path": base_model or getattr(cfg, "_name_or_path", "") or None, "revision": revision,
                       "text_hidden_size": handle.hidden_size, "num_layers": handle.num_layers,
                       "router_hidden": handle.config.router_hidden, "activation": "gelu_erf"},
        "feature": FEATURE, "decision": "argmax",
        "prompt_template": template, "image_token_id": handle.parts.image_token_id,
        "training": training or {"label_rule": {"agreement": 0.99, "loss_ratio": 1.03},
                                 "k_sampling": "uniform over 0..L-1, one k per step"},
    }
    (directory / ROUTERS_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    save_file(tensors, str(directory / ROUTERS_NAME), metadata={"format": "pt"})
    return directory


def load_routers(model_or_handle, directory: str | os.PathLike) -> DyVTEHandle:
    """Load routers written by :func:`save_routers` into a dyvte-patched model; refuse a different D, L or width,
    warn when the prompt template differs from the handle's ``prompt_template``."""
    from safetensors.torch import load_file

    handle = _handle_of(model_or_handle)
    directory = Path(directory)
    if not (directory / ROUTERS_NAME).is_file():
        raise FileNotFoundError(f"{directory / ROUTERS_NAME} not found: not a DyVTE router checkpoint")
    meta = json.loads((directory / ROUTERS_CONFIG).read_text()) if (directory / ROUTERS_CONFIG).is_file() else {}
    if meta.get("format_version", 0) > ROUTERS_FORMAT:
        raise ValueError(f"{directory} was written by a newer visionfx (format {meta['format_version']})")
    base = meta.get("base_model", {})
    for key, own in (("text_hidden_size", handle.hidden_size), ("num_layers", handle.num_layers),
                     ("router_hidden", handle.config.router_hidden)):
        if key in base and int(base[key]) != own:
            raise ValueError(f"router checkpoint {directory} has {key}={base[key]}, the model needs {own}")
    saved, own_t = meta.get("prompt_template"), handle.config.prompt_template
    if saved is not None and own_t is not None and saved != own_t:
        warnings.warn(f"routers were trained with prompt template {saved!r}, the patch declares {own_t!r}; "
                      "router decisions are template-specific", stacklevel=2)
    tensors = load_file(str(directory / ROUTERS_NAME))
    expected = {f"routers.{i}.{n}.weight": getattr(r, n).weight for i, r in enumerate(handle.routers)
                for n in ("w1", "w2")}
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(f"router checkpoint {directory} does not match a {handle.num_layers}-layer model: missing "
                         f"{missing[:4]}, unexpected {extra[:4]}")
    with torch.no_grad():
        for key, param in expected.items():
            if tuple(tensors[key].shape) != tuple(param.shape):
                raise ValueError(f"{key}: saved shape {tuple(tensors[key].shape)} != model {tuple(param.shape)} "
                                 "(different hidden size or router width)")
            param.copy_(tensors[key].to(param.dtype))
    return handle


def routers_from_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Router tensors of an official DyVTE full checkpoint (``model.visual_gates_router.{l}.w1/w2.weight``) renamed
    to this format (``routers.{l}.w1/w2.weight``); everything else is dropped."""
    prefix = "model.visual_gates_router."
    return {"routers." + k[len(prefix):]: v for k, v in state_dict.items()
            if k.startswith(prefix) and k.endswith((".w1.weight", ".w2.weight"))}
