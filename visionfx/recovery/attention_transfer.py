"""Stage 1 of recovery, attention transfer (METHODS.md §10 step 2; LoLCATs, arXiv 2410.10254).

Each patched attention layer learns to reproduce the host's softmax attention output on the inputs the host itself
produces. Per batch:

1. **Teacher pass** (no gradients): the patched model runs in :func:`host_mode`, where every patched attention site
   computes the host's softmax attention (``PatchedAttention.softmax_attention``, the same shared weights), every
   PRepBN norm computes its LayerNorm and LoRA adapters are off, i.e. exactly the original model. A forward
   pre-hook on each site records its call arguments (its input, taken from the host's residual stream) and the
   softmax path's output is recorded as the target.
2. **Student pass**: each site is called again on its recorded (detached) input, now computing the patched mixer;
   the loss is ``Σ_layers mean((mixer output − softmax output)²)`` in float32. Inputs are detached, so each layer's
   graph is local and all layers train independently, in parallel.

Only the parameters the mixers added (``vfx_``) train, plus LoRA adapters on the host projections when enabled
(:mod:`visionfx.recovery.lora`); everything else is frozen. The model runs in eval mode (no dropout, no drop path).

Decisions: the target is the softmax output of the sites' *call* (after the host's projection, ``[B, N, C]``), not
the attention weights, so every mixer (including those whose weights are never materialised) is trained the same
way; sites are called through their module (``site(*args, **kwargs)``), which for a timm host is ``mix(x)`` and for
a sequence-first open_clip host adds the transposes, so any adapter's call convention works unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from visionfx.patches.base import PatchedAttention
from visionfx.recovery.lora import lora_parameters, set_lora_enabled

__all__ = ["attention_sites", "host_mode", "capture", "AttentionTransferLoss", "transfer_parameters", "layer_mse",
           "calibrate_outputs"]


def attention_sites(model: nn.Module) -> list[tuple[str, PatchedAttention]]:
    """The patched attention sites of ``model``, in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PatchedAttention)]


def transfer_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """What stage 1 trains: the ``vfx_`` parameters under patched attention sites, and LoRA adapters."""
    out, seen = [], set()
    for name, site in attention_sites(model):
        for pname, p in site.named_parameters():
            if any(part.startswith("vfx_") for part in pname.split(".")) and id(p) not in seen:
                out.append((f"{name}.{pname}", p))
                seen.add(id(p))
    lora = {id(p) for p in lora_parameters(model)}
    for pname, p in model.named_parameters():
        if id(p) in lora and id(p) not in seen:
            out.append((pname, p))
            seen.add(id(p))
    return out


class _SoftmaxForward:
    """Instance-level ``forward`` of a site in host mode: the host softmax attention, output recorded."""

    def __init__(self, site: PatchedAttention, slot: dict | None):
        self.site, self.slot = site, slot

    def __call__(self, *args, **kwargs):
        out = self.site.softmax_attention(*args, **kwargs)
        if self.slot is not None:
            self.slot["target"] = _first_tensor(out)
        return out


class _RecordInputs:
    def __init__(self, slot: dict):
        self.slot = slot

    def __call__(self, module, args, kwargs):
        self.slot["args"], self.slot["kwargs"] = args, dict(kwargs)


def _first_tensor(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


@contextmanager
def host_mode(model: nn.Module, records: dict[str, dict] | None = None):
    """Within the context, ``model`` computes the original (unpatched) function: softmax attention at patched
    sites, LayerNorm at PRepBN norms, LoRA adapters off. With ``records``, each site's call arguments and softmax
    output are stored in ``records[path] = {"args", "kwargs", "target"}``."""
    from visionfx.methods.prepbn import LinearNorm

    sites = attention_sites(model)
    norms = [m for m in model.modules() if isinstance(m, LinearNorm) and m.folded is None]
    handles = []
    try:
        for name, site in sites:
            slot = None
            if records is not None:
                slot = records.setdefault(name, {})
                handles.append(site.register_forward_pre_hook(_RecordInputs(slot), with_kwargs=True))
            site.forward = _SoftmaxForward(site, slot)
        for norm in norms:
            norm.forward = norm.layer_norm
        set_lora_enabled(model, False)
        yield records
    finally:
        for h in handles:
            h.remove()
        for _, site in sites:
            site.__dict__.pop("forward", None)
        for norm in norms:
            norm.__dict__.pop("forward", None)
        set_lora_enabled(model, True)


@torch.no_grad()
def capture(model: nn.Module, x: Any) -> dict[str, dict]:
    """Run ``model(x)`` as the original model and return each patched site's recorded inputs and softmax output."""
    records: dict[str, dict] = {}
    with host_mode(model, records):
        model(x)
    missing = [name for name, _ in attention_sites(model) if "target" not in records.get(name, {})]
    if missing:
        raise RuntimeError(f"attention transfer: the forward did not reach the patched sites {missing[:3]}")
    return records


def layer_mse(site: PatchedAttention, record: dict) -> torch.Tensor:
    """MSE (float32) between ``site``'s patched output on the recorded input and the recorded softmax output."""
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in record["args"])
    out = _first_tensor(site(*args, **record["kwargs"]))
    return F.mse_loss(out.float(), record["target"].float())


@torch.no_grad()
def calibrate_outputs(model: nn.Module, x: Any) -> list[str]:
    """Let every patched site's mixer calibrate its output scale (:meth:`TokenMixer.calibrate_output`) on the inputs
    the original model gives that site for the batch ``x``; returns the sites whose mixer did (those of methods with
    nothing to calibrate are left as they are). Run before stage 1."""
    from visionfx.methods.base import TokenMixer

    sites = [(name, site) for name, site in attention_sites(model)
             if type(site.mixer).calibrate_output is not TokenMixer.calibrate_output]
    if not sites:  # nothing to calibrate: no forward pass
        return []
    records = capture(model, x)
    done = []
    for name, site in sites:
        seen: dict[str, tuple] = {}

        def record(module, args):  # returns None: the call's arguments stay as they are
            seen["qkv"] = args[:3]

        hook = site.mixer.register_forward_pre_hook(record)
        try:
            site(*records[name]["args"], **records[name]["kwargs"])
        finally:
            hook.remove()
        if site.mixer.calibrate_output(*seen["qkv"]):
            done.append(name)
    return done


class AttentionTransferLoss:
    """``loss(x) -> (Σ_layers MSE, {"layer_mse": [L], "layer_rel": [L]})`` for a batch of model inputs ``x``.

    ``layer_rel`` is each layer's MSE divided by the mean square of its target (scale-free, for logs).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.sites = attention_sites(model)
        if not self.sites:
            raise ValueError("attention transfer needs a model with patched attention sites")

    def __call__(self, x) -> tuple[torch.Tensor, dict]:
        records = capture(self.model, x)
        losses = torch.stack([layer_mse(site, records[name]) for name, site in self.sites])
        power = torch.stack([records[name]["target"].float().pow(2).mean() for name, _ in self.sites])
        # tensors, not floats: reading them would synchronise the device every step
        return losses.sum(), {"layer_mse": losses.detach(), "layer_rel": losses.detach() / power.clamp_min(1e-12)}
