"""The registry of methods and model-family adapters.

A method is registered by existing: each module of :mod:`visionfx.methods` declares ``METHOD`` (or ``METHODS``, a
sequence) holding :class:`MethodSpec` objects, and each module of :mod:`visionfx.patches` declares ``ADAPTER`` holding
an :class:`AdapterSpec`. Modules are discovered on first use. A module that fails to import is reported with its
error when its method is asked for, and listed by :func:`import_errors`.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any

from visionfx.config import suggest

__all__ = ["MethodSpec", "AdapterSpec", "get_method", "list_methods", "list_adapters", "get_adapter", "import_errors"]

SITES = ("attention", "norm", "visual_tokens")


@dataclass(frozen=True)
class MethodSpec:
    """What the registry knows of one method.

    Attributes:
        name: the name users pass to :func:`visionfx.patch`.
        site: where the method acts: ``"attention"``, ``"norm"`` or ``"visual_tokens"``.
        config_cls: the method's frozen config dataclass.
        module_cls: the ``nn.Module`` the method adds at each site (``None`` for hook-based methods).
        summary: one line for tables.
        regime: what the method needs on a pretrained model (``"training-free"``, ``"fine-tuning"``, ...).
        paper: the paper reference.
        handle: for hook-based methods (site ``visual_tokens``): the handle class; the model family's adapter builds
            ``handle(parts, config)`` with its bookkeeping object, calls its ``install()`` (and ``remove()`` if that
            fails), and ``remove()`` undoes the patch.
    """

    name: str
    site: str
    config_cls: type
    module_cls: type | None
    summary: str
    regime: str
    paper: str = ""
    handle: Any = field(default=None, compare=False)

    def __post_init__(self):
        if self.site not in SITES:
            raise ValueError(f"method {self.name!r}: unknown site {self.site!r}; sites are {SITES}")
        if getattr(self.config_cls, "method", None) != self.name:
            raise ValueError(f"method {self.name!r}: {self.config_cls.__name__}.method must be {self.name!r}")


@dataclass(frozen=True)
class AdapterSpec:
    """What the registry knows of one model-family adapter.

    Attributes:
        name: short name (``adapter=`` in :func:`visionfx.patch`).
        family: the model families it covers, for messages and tables.
        sites: the sites it provides.
        adapter: an object with ``matches(model) -> bool``, ``apply(model, spec, config) -> dict`` and
            ``remove(model, record)`` (see :class:`visionfx.patches.base.Adapter`).
    """

    name: str
    family: str
    sites: tuple[str, ...]
    adapter: Any = field(compare=False)


_methods: dict[str, MethodSpec] = {}
_adapters: dict[str, AdapterSpec] = {}
_errors: dict[str, str] = {}
_loaded = False


def _scan(package: str, attr_one: str, attr_many: str, sink: dict, kind: str) -> None:
    pkg = importlib.import_module(package)
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        modname = f"{package}.{info.name}"
        try:
            mod = importlib.import_module(modname)
        except Exception as e:  # reported, never hidden
            _errors[modname] = f"{type(e).__name__}: {e}"
            continue
        specs: list = []
        if hasattr(mod, attr_one):
            specs.append(getattr(mod, attr_one))
        specs.extend(getattr(mod, attr_many, ()))
        for spec in specs:
            if spec.name in sink:
                raise RuntimeError(f"{kind} {spec.name!r} is registered twice ({modname})")
            sink[spec.name] = spec


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    _scan("visionfx.methods", "METHOD", "METHODS", _methods, "method")
    _scan("visionfx.patches", "ADAPTER", "ADAPTERS", _adapters, "adapter")


def import_errors() -> dict[str, str]:
    """Modules of visionfx.methods / visionfx.patches that failed to import, with their errors."""
    _load()
    return dict(_errors)


def get_method(name: str) -> MethodSpec:
    """The spec of method ``name``; an unknown name raises with suggestions and any import errors."""
    _load()
    if not isinstance(name, str):
        raise TypeError(f"a method name must be a string, got {type(name).__name__}")
    if name in _methods:
        return _methods[name]
    msg = f"unknown method {name!r}{suggest(name, _methods)}; available: {', '.join(sorted(_methods))}"
    broken = [f"{m}: {e}" for m, e in _errors.items() if m.endswith("." + name)]
    if broken:
        msg += "\nthis method's module failed to import:\n  " + "\n  ".join(broken)
    raise ValueError(msg)


def list_methods(site: str | None = None) -> list[str]:
    """Names of the registered methods, optionally only those acting at ``site``."""
    _load()
    return sorted(n for n, s in _methods.items() if site is None or s.site == site)


def method_specs() -> list[MethodSpec]:
    _load()
    return [_methods[n] for n in sorted(_methods)]


def list_adapters() -> list[AdapterSpec]:
    _load()
    return [_adapters[n] for n in sorted(_adapters)]


def get_adapter(name: str) -> AdapterSpec:
    _load()
    if name not in _adapters:
        raise ValueError(f"unknown adapter {name!r}{suggest(name, _adapters)}; available: {', '.join(sorted(_adapters))}")
    return _adapters[name]


def supported_families(site: str | None = None) -> str:
    return "; ".join(f"{a.name} ({a.family})" for a in list_adapters() if site is None or site in a.sites)


def find_adapter(model, site: str) -> AdapterSpec:
    """The one adapter that matches ``model`` and provides ``site``; none or several is an error."""
    matches = [a for a in list_adapters() if site in a.sites and a.adapter.matches(model)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise TypeError(
            f"visionfx does not support {type(model).__name__} for site {site!r}. "
            f"Supported model families: {supported_families(site)}"
        )
    raise TypeError(
        f"several adapters match {type(model).__name__} ({', '.join(a.name for a in matches)}); pass adapter=NAME"
    )

