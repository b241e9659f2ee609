"""What every model-family adapter shares: finding sites, swapping modules in and out, the token layout hook.

An adapter yields, for its family, the attention modules to replace (in model order) and their :class:`HostInfo`,
wraps each in a :class:`PatchedAttention` subclass that keeps the host's children under their original names, and
keeps a :class:`~visionfx.methods.base.TokenLayout` current. Undoing a patch puts the original host modules back,
re-attached to the (possibly fine-tuned) children the wrapper held.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from visionfx.methods.base import HostInfo, TokenLayout, TokenMixer

__all__ = ["Adapter", "PatchedAttention", "LayoutHook", "set_submodule", "MIXER_NAME"]

#: child name under which a wrapper holds the method's module; every parameter a method adds lives below a name that
#: starts with ``vfx_``, so it cannot collide with host keys and ``save_pretrained`` can find it.
MIXER_NAME = "vfx_mixer"


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


class PatchedAttention(nn.Module):
    """A host attention module with its softmax replaced by a :class:`TokenMixer`.

    Subclasses adopt the host's children (same objects, same names) and implement ``_qkv`` and ``_out``. The host
    module itself is kept outside the module tree, so ``state_dict`` keys are the host's plus ``vfx_mixer.*``, and
    :meth:`restore_host` gives it back with the current children.
    """

    #: names of host children this wrapper adopts (those the host has)
    host_children: tuple[str, ...] = ()

    def __init__(self, host: nn.Module, mixer: TokenMixer, layout: TokenLayout):
        super().__init__()
        self.__dict__["_vfx_host"] = host  # not registered: no duplicate state_dict keys
        for name in self.host_children:
            if name in host._parameters:
                self.register_parameter(name, host._parameters[name])
            elif name in host._modules:
                setattr(self, name, host._modules[name])
        self.vfx_layout = layout
        setattr(self, MIXER_NAME, mixer)

    @property
    def mixer(self) -> TokenMixer:
        return getattr(self, MIXER_NAME)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # pragma: no cover
        """``x [B, N, C_in]`` -> ``q, k, v [B, h, N, d]`` (host projections and q/k norms applied)."""
        raise NotImplementedError

    def _out(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """Merged mixer output after the method's post step -> the host's output (gate, proj, dropout)."""
        raise NotImplementedError

    def _norm(self, o: torch.Tensor) -> torch.Tensor:
        return o

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """The patched attention on ``x [B, N, C_in]``, batch first."""
        B, N, _ = x.shape
        layout, mixer = self.vfx_layout, self.mixer
        layout.check(N)
        xm = mixer.pre_qkv(x, layout)
        q, k, v = self._qkv(xm)
        o = mixer(q, k, v, xm, layout)
        o = o.transpose(1, 2).reshape(B, N, -1)
        o = mixer.post_norm(self._norm(o), xm, layout)
        return self._out(o, x)

    def _sync_host(self) -> nn.Module:
        host = self.__dict__["_vfx_host"]
        for name in self.host_children:
            if name in self._parameters:
                host._parameters[name] = self._parameters[name]
            elif name in self._modules:
                host._modules[name] = self._modules[name]
        host.train(self.training)
        return host

    def softmax_attention(self, *args, **kwargs):
        """The original softmax attention of the host, computed with the current (shared) host weights."""
        return self._sync_host()(*args, **kwargs)

    def restore_host(self) -> nn.Module:
        return self._sync_host()


class LayoutHook:
    """Forward pre-hook on the module that receives the image (e.g. timm ``patch_embed``): it refreshes the shared
    layout from the input size (dynamic image sizes) and refuses to run where tokens would not form a grid.
    ``adapter.update_layout(module, args, kwargs, layout, context)`` does the family-specific work. The hook is a
    plain picklable object; ``context`` holds whatever the adapter needs (e.g. the model's patch-dropout module)."""

    def __init__(self, adapter_name: str, layout: TokenLayout, context: dict | None = None):
        self.adapter_name = adapter_name
        self.layout = layout
        self.context = context or {}

    def __call__(self, module, args, kwargs):
        from visionfx.registry import get_adapter

        get_adapter(self.adapter_name).adapter.update_layout(module, args, kwargs, self.layout, self.context)
        return None


class Adapter:
    """Base of model-family adapters. Subclasses implement ``matches``, ``attention_sites``, ``host_info``,
    ``layout`` and ``wrap``; ``norm_sites`` and ``update_layout`` where they apply."""

    name = ""

    # --- family-specific -------------------------------------------------------------------------------------------
    def matches(self, model: nn.Module) -> bool:  # pragma: no cover
        raise NotImplementedError

    def attention_sites(self, model: nn.Module) -> list[tuple[str, nn.Module]]:  # pragma: no cover
        raise NotImplementedError

    def layout(self, model: nn.Module) -> TokenLayout:  # pragma: no cover
        raise NotImplementedError

    def host_info(self, model, host, layout: TokenLayout, index: int, count: int) -> HostInfo:  # pragma: no cover
        raise NotImplementedError

    def wrap(self, host: nn.Module, mixer: TokenMixer, layout: TokenLayout) -> PatchedAttention:  # pragma: no cover
        raise NotImplementedError

    def norm_sites(self, model: nn.Module, config=None) -> list[tuple[str, nn.Module, str]]:
        """``(path, norm module, role)`` for the norm site; role is ``norm1``, ``norm2``, ``final`` or ``fc_norm``
        (only where ``config.include_fc_norm``)."""
        raise TypeError(f"adapter {self.name!r} provides no 'norm' site")

    def layout_target(self, model: nn.Module) -> tuple[nn.Module, dict]:
        """The module whose forward pre-hook refreshes the layout (it receives the image), and the hook's context."""
        return model, {}

    def update_layout(self, module, args, kwargs, layout: TokenLayout, context: dict) -> None:
        """Refresh ``layout`` before ``module`` runs; the default keeps it fixed."""

    # --- shared ----------------------------------------------------------------------------------------------------
    @staticmethod
    def select(count: int, layers: Iterable[int] | None, what: str) -> list[int]:
        if layers is None:
            return list(range(count))
        bad = [i for i in layers if not 0 <= i < count]
        if bad:
            raise ValueError(f"layers={list(layers)}: the model has {count} {what} (indices 0..{count - 1}); {bad} out of range")
        return sorted(layers)

    def apply(self, model: nn.Module, spec, config) -> dict[str, Any]:
        """Patch ``model`` in place with method ``spec``; returns the record :meth:`remove` needs."""
        if spec.site == "attention":
            return self._apply_attention(model, spec, config)
        if spec.site == "norm":
            return self._apply_norm(model, spec, config)
        raise TypeError(f"adapter {self.name!r} does not provide site {spec.site!r}")

    def _layout_for(self, model) -> TokenLayout:
        target, context = self.layout_target(model)
        for hook in target._forward_pre_hooks.values():
            if isinstance(hook, LayoutHook):
                return hook.layout
        layout = self.layout(model)
        target.register_forward_pre_hook(LayoutHook(self.name, layout, context), with_kwargs=True)
        return layout

    def _apply_attention(self, model, spec, config) -> dict[str, Any]:
        sites = self.attention_sites(model)
        if not sites:
            raise TypeError(f"{type(model).__name__} has no attention modules that the {self.name} adapter knows")
        chosen = self.select(len(sites), config.layers, "attention layers")
        layout = self._layout_for(model)
        for i in chosen:
            path, host = sites[i]
            info = self.host_info(model, host, layout, i, len(sites))
            mixer = spec.module_cls(config, info)
            mixer.to(**_placement_of(host))
            wrapper = self.wrap(host, mixer, layout)
            wrapper.train(host.training)  # a new module starts in training mode; keep the host's
            set_submodule(model, path, wrapper)
        return {"site": "attention", "paths": [sites[i][0] for i in chosen], "indices": chosen}

    def _apply_norm(self, model, spec, config) -> dict[str, Any]:
        sites = self.norm_sites(model, config)
        chosen = self.select(len(sites), config.layers, "norm layers")
        for i in chosen:
            path, norm, role = sites[i]
            module = spec.module_cls(config, norm, role)
            module.train(norm.training)
            set_submodule(model, path, module)
        return {"site": "norm", "paths": [sites[i][0] for i in chosen], "indices": chosen}

    def remove(self, model: nn.Module, record: dict[str, Any]) -> None:
        for path in record["paths"]:
            set_submodule(model, path, model.get_submodule(path).restore_host())
        if record["site"] == "attention" and not any(isinstance(m, PatchedAttention) for m in model.modules()):
            remove_layout_hooks(model)


def remove_layout_hooks(model: nn.Module) -> None:
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, LayoutHook):
                del module._forward_pre_hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)


def _placement_of(module: nn.Module) -> dict:
    p = next(iter(module.parameters()), None)
    if p is None:
        return {}
    return {"device": p.device, "dtype": p.dtype} if p.is_floating_point() else {"device": p.device}
