"""Method configurations: frozen dataclasses, YAML recipes and keyword overrides.

Every method declares one frozen dataclass deriving from :class:`MethodConfig`. Its defaults are the single source of
truth; YAML files in ``configs/`` are recipes that name a method and override some fields. Unknown keys are rejected
with a did-you-mean suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Mapping

import yaml

__all__ = ["MethodConfig", "AttentionConfig", "config_from_dict", "load_config", "config_to_dict", "suggest"]

BACKENDS = ("auto", "reference", "triton")


def suggest(word: str, choices) -> str:
    """A ' (did you mean ...?)' hint for ``word`` among ``choices``, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method configuration.

    Attributes:
        layers: indices of the sites to patch, in model order (``None``: all of them). For attention methods these are
            the attention modules in the order the model holds them (block 0 first).
    """

    method: ClassVar[str] = ""
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.layers is not None:
            layers = tuple(int(i) for i in self.layers)
            if any(i < 0 for i in layers):
                raise ValueError(f"{type(self).__name__}.layers must hold non-negative indices, got {layers}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"{type(self).__name__}.layers has duplicates: {layers}")
            object.__setattr__(self, "layers", layers)

    def companions(self) -> tuple["MethodConfig", ...]:
        """Configs of other sites this config applies too (e.g. slab with ``norm="prepbn"``); none by default."""
        return ()

    def replace(self, **overrides) -> "MethodConfig":
        """A copy with ``overrides`` applied; unknown names raise with a suggestion."""
        _check_keys(type(self), overrides)
        return dataclasses.replace(self, **overrides)


@dataclass(frozen=True)
class AttentionConfig(MethodConfig):
    """Base of the token-mixer configurations (site ``attention``).

    Attributes:
        backend: ``"auto"`` (Triton on CUDA when the kernel supports the inputs, otherwise the PyTorch reference),
            ``"reference"`` or ``"triton"``. The environment variable ``VISIONFX_BACKEND`` overrides ``"auto"``.
        init: ``"pretrained"`` (new parameters start so that the layer stays close to the host; METHODS.md §10) or
            ``"official"`` (the paper's initialisation, for training from scratch).
    """

    backend: str = "auto"
    init: str = "pretrained"

    def __post_init__(self):
        super().__post_init__()
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}{suggest(self.backend, BACKENDS)}")
        if self.init not in ("pretrained", "official"):
            raise ValueError(f"init must be 'pretrained' or 'official', got {self.init!r}")


def _field_names(cls) -> list[str]:
    return [f.name for f in fields(cls)]


def _check_keys(cls, data: Mapping[str, Any]) -> None:
    names = _field_names(cls)
    for key in data:
        if key not in names:
            raise ValueError(
                f"unknown option {key!r} for method {cls.method!r}{suggest(key, names)}; "
                f"valid options: {', '.join(names)}"
            )


def _coerce(value, annotation: str):
    # YAML gives lists where the dataclasses want tuples (hashable, frozen).
    if isinstance(value, list):
        return tuple(_coerce(v, annotation) for v in value)
    return value


def config_from_dict(data: Mapping[str, Any], **overrides) -> MethodConfig:
    """Build a method's config from a flat mapping ``{"method": name, field: value, ...}`` plus overrides."""
    from visionfx.registry import get_method

    data = dict(data)
    data.update(overrides)
    if "method" not in data:
        raise ValueError("a config needs a 'method' key naming one of visionfx.list_methods()")
    spec = get_method(data.pop("method"))
    _check_keys(spec.config_cls, data)
    annotations = {f.name: f.type for f in fields(spec.config_cls)}
    return spec.config_cls(**{k: _coerce(v, annotations[k]) for k, v in data.items()})


def load_config(path: str | os.PathLike, **overrides) -> MethodConfig:
    """Load a YAML recipe (flat mapping with a ``method`` key), applying keyword overrides."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a mapping of option names to values")
    try:
        return config_from_dict(data, **overrides)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def config_to_dict(config: MethodConfig) -> dict[str, Any]:
    """Flat, JSON/YAML-friendly mapping (tuples become lists) that :func:`config_from_dict` reads back."""
    out: dict[str, Any] = {"method": type(config).method}
    for f in fields(config):
        v = getattr(config, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out
