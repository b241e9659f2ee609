"""PRepBN: LayerNorm replaced by progressively re-parameterised BatchNorm (the ``norm`` site of SLAB).

Paper: Guo et al., "SLAB: Efficient Transformers with Simplified Linear Attention and Progressive Re-parameterized
Batch Normalization", ICML 2024 (arXiv 2405.11582). METHODS.md §6 and §12 item 18.

``RepBN(x) = BN(x) + α·x`` with BN over all ``B·N`` tokens (prefix tokens included). :class:`LinearNorm` takes the
place of a host LayerNorm, adopting its ``weight``/``bias`` under the same names, and mixes
``λ·LN(x) + (1 − λ)·RepBN(x)`` in training while λ falls from ``r0`` to 0 over ``total_steps`` training-mode forward
calls; in eval it is always RepBN with running statistics (the official semantics). :func:`reparameterize` folds the
eval RepBN into the following Linears; :func:`recalibrate_bn` re-estimates the BN statistics.

Decisions this module makes where the spec leaves room:

- **Branch-free schedule.** The counters are read as tensors (``torch.where``), never as Python booleans, so a
  training step does not synchronise with the device and ``torch.compile`` sees no data-dependent branch. During the
  warm-up the BN branch is still evaluated, with weight 0, and its running statistics are put back, so the
  output and the statistics are the official ones; optimisers see zero (not missing) gradients for the BN parameters.
- **LN.** Computed with ``F.layer_norm`` on the adopted parameters (what ``nn.LayerNorm`` and timm's ``LayerNorm``
  do; timm's optional ``fast_norm`` path is not reproduced).
- **Eval warning.** While the schedule is unfinished (``iter > 0`` or ``warm > 0``) eval warns once. The counters
  are read once per switch to eval mode (and after loading a state dict), not per forward.
- **Gradient checkpointing** re-runs forwards in training mode and so advances the counters (as officially).
- **Folding.** Per norm, either every consumer Linear is fused (the norm becomes the identity) or none is (the norm
  becomes the explicit affine map ``a ⊙ x + b``, always exact, at the cost of one element-wise op). Which Linears
  read a norm is known for timm's ``Block``/``VisionTransformer`` and open_clip's residual blocks
  (:mod:`visionfx.methods._prepbn_targets`); anything else, and any patched attention whose mixer reads more than q,
  k, v (RALA's ``W_o``, InLine's predictor, ViG's DWC), keeps the explicit map. Fused Linears
  (:class:`FoldedLinear`, or fused ``in_proj`` parameters) sit under the host's names, so the state dict of a folded
  model holds fused weights; the originals are kept aside and ``visionfx.unpatch`` puts them back. After folding,
  ``forward_features`` of a timm ViT returns the features before the (folded) final norm.
- **Recalibration** resets the running statistics of every RepBN and averages them cumulatively (BN momentum
  ``None``) with the rest of the model in eval mode: dropout and drop path are off and the λ schedule does not move.
  Batches are normalised with their own statistics meanwhile, as in the usual BN recalibration.
- ``include_fc_norm=True`` also replaces ``model.fc_norm`` (role ``"fc_norm"``), which the timm adapter then offers.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from visionfx.config import MethodConfig
from visionfx.registry import MethodSpec

__all__ = ["PRepBNConfig", "RepBN", "LinearNorm", "FoldedLinear", "reparameterize", "recalibrate_bn",
           "missing_steps_message"]

ROLES = ("norm1", "norm2", "final", "fc_norm")

EVAL_WARNING = (
    "PRepBN: evaluating while the LayerNorm -> RepBN schedule is unfinished (iter > 0). Eval always uses the RepBN "
    "branch with its running statistics, which are not trained yet: outputs can be far from the host's. Finish the "
    "schedule (total_steps training-mode forwards) and consider visionfx.recalibrate_bn(model, loader)."
)


def missing_steps_message(option: str, example: str) -> str:
    """The error raised when the λ schedule length ``option`` is not given."""
    return (
        f"{option} is required. It is T, the number of training-mode forward calls over which PRepBN moves from "
        f"LayerNorm to RepBN, and it has no default because it depends on your run: use about 0.8 x the number of "
        f"training iterations you plan (forward calls; k x more with k-step gradient accumulation), e.g. {example}. "
        f"T must stay below the training length, and a much shorter T behaves like BatchNorm from the start, which "
        f"has given NaN losses (METHODS.md §6.4)."
    )


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class PRepBNConfig(MethodConfig):
    """Progressive re-parameterised BatchNorm in place of LayerNorm.

    Attributes:
        total_steps: T, training-mode forward calls over which λ falls from ``r0`` to 0. Required; use about
            0.8 × the planned training iterations.
        warmup: training-mode forward calls run as pure LayerNorm before the schedule starts.
        r0: λ at the start of the schedule (``λ = r0·iter/T``); 0 gives plain RepBN from the first step.
        include_fc_norm: also replace ``model.fc_norm`` (after pooling); off by default (METHODS.md §6.3).
        bn_eps, bn_momentum: of the BatchNorm (PyTorch defaults, as officially).
    """

    method = "prepbn"
    total_steps: int | None = None
    warmup: int = 0
    r0: float = 1.0
    include_fc_norm: bool = False
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        if self.total_steps is None:
            raise ValueError(missing_steps_message(
                "prepbn's total_steps", "visionfx.patch(model, 'prepbn', total_steps=int(0.8 * iterations))"))
        _check_int("total_steps", self.total_steps, 1)
        _check_int("warmup", self.warmup, 0)
        if not 0.0 <= float(self.r0) <= 1.0:
            raise ValueError(f"r0 must lie in [0, 1], got {self.r0}")
        if not isinstance(self.include_fc_norm, bool):
            raise ValueError(f"include_fc_norm must be a bool, got {self.include_fc_norm!r}")
        if not self.bn_eps > 0:
            raise ValueError(f"bn_eps must be > 0, got {self.bn_eps}")
        if not 0.0 < float(self.bn_momentum) <= 1.0:
            raise ValueError(f"bn_momentum must lie in (0, 1], got {self.bn_momentum}")


class RepBN(nn.Module):
    """``BN(x) + α·x`` for ``x [..., C]``; BN (``BatchNorm1d(C)``) pools all leading positions, i.e. all ``B·N``
    tokens of a ``[B, N, C]`` input. α is one learnable scalar, initialised to 1."""

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1, device=None, dtype=None):
        super().__init__()
        self.bn = nn.BatchNorm1d(channels, eps=eps, momentum=momentum, device=device, dtype=dtype)
        self.alpha = nn.Parameter(torch.ones(1, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., C] -> [..., C]``."""
        return self.bn(x.reshape(-1, x.shape[-1])).reshape(x.shape) + self.alpha * x

    @torch.no_grad()
    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The eval map as ``(a, b)``, each ``[C]`` in float64: ``RepBN(x) = a ⊙ x + b`` with
        ``a = γ/sqrt(σ² + ε) + α`` and ``b = β − γ·μ/sqrt(σ² + ε)`` (running statistics)."""
        bn = self.bn
        inv = torch.rsqrt(bn.running_var.double() + bn.eps)
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(inv)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(inv)
        return gamma * inv + self.alpha.double(), beta - gamma * bn.running_mean.double() * inv


def _fuse(weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor):
    """``(W·diag(a), W b + c)`` as Parameters like ``weight`` (computed in float64)."""
    w = weight.detach()
    w64 = w.double()
    fused_b = w64 @ b.to(w.device)
    if bias is not None:
        fused_b = fused_b + bias.detach().double()
    grad = weight.requires_grad
    return (nn.Parameter((w64 * a.to(w.device)).to(w.dtype), requires_grad=grad),
            nn.Parameter(fused_b.to(w.dtype), requires_grad=grad))


class FoldedLinear(nn.Linear):
    """A Linear with a preceding per-channel affine map folded in: ``W' = W·diag(a)``, ``c' = W b + c``.

    The original Linear is kept outside the module tree (``original``) for :meth:`LinearNorm.unfold`; it follows
    device and dtype moves of this module.
    """

    def __init__(self, original: nn.Linear, a: torch.Tensor, b: torch.Tensor):
        super().__init__(original.in_features, original.out_features, bias=True, device="meta")
        self.weight, self.bias = _fuse(original.weight, original.bias, a, b)
        self.__dict__["_vfx_original"] = original
        self.train(original.training)

    @property
    def original(self) -> nn.Linear:
        return self.__dict__["_vfx_original"]

    def _apply(self, fn, recurse=True):
        self.original._apply(fn, recurse)
        return super()._apply(fn, recurse)


class _ParameterStash(nn.Module):
    """Holds the original ``weight``/``bias`` of a parameter-level fold, outside the model, so they follow moves."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None):
        super().__init__()
        self.register_parameter("weight", weight)
        self.register_parameter("bias", bias)


class LinearNorm(nn.Module):
    """A host LayerNorm under the PRepBN schedule (METHODS.md §6.1).

    State dict: the host's ``weight``/``bias`` plus ``vfx_bn.*`` (the RepBN) and the buffers ``vfx_warm``,
    ``vfx_iter`` and ``vfx_total`` (the schedule, saved with the model). Each training-mode forward uses
    ``λ = r0·iter/T`` (1 during the warm-up) and then counts down; eval is RepBN with running statistics.

    Args:
        config: a :class:`PRepBNConfig`.
        host: the LayerNorm replaced (normalising the last dimension ``C``).
        role: ``"norm1"``, ``"norm2"``, ``"final"`` or ``"fc_norm"``: where it sits, for :func:`reparameterize`.
    """

    method = "prepbn"

    def __init__(self, config: PRepBNConfig, host: nn.LayerNorm, role: str):
        super().__init__()
        if not isinstance(host, nn.LayerNorm):
            raise TypeError(f"PRepBN replaces LayerNorm modules, got {type(host).__name__}")
        if len(host.normalized_shape) != 1:
            raise TypeError(f"PRepBN needs a LayerNorm over one dimension, got {tuple(host.normalized_shape)}")
        if role not in ROLES:
            raise ValueError(f"unknown norm role {role!r}; roles are {ROLES}")
        self.__dict__["_vfx_host"] = host  # not registered: its parameters are adopted below
        self.role = role
        self.normalized_shape = tuple(host.normalized_shape)
        self.eps = host.eps
        self.register_parameter("weight", host._parameters.get("weight"))
        self.register_parameter("bias", host._parameters.get("bias"))
        ref = next(iter(host.parameters()), None)
        device = ref.device if ref is not None else None
        dtype = ref.dtype if ref is not None else None
        self.vfx_bn = RepBN(self.normalized_shape[0], config.bn_eps, config.bn_momentum, device=device, dtype=dtype)
        for name, value in (("vfx_warm", config.warmup), ("vfx_iter", config.total_steps),
                            ("vfx_total", config.total_steps)):
            self.register_buffer(name, torch.tensor(value, dtype=torch.long, device=device))
        self.r0 = float(config.r0)
        # a Python constant: without warm-up the BN statistics need no guarding (common case, fewer kernels)
        self.has_warmup = config.warmup > 0
        self.register_buffer("vfx_scale", None, persistent=False)
        self.register_buffer("vfx_shift", None, persistent=False)
        self.folded: str | None = None
        self.__dict__["_vfx_folds"] = []
        self._vfx_eval_checked = False
        self.train(host.training)

    # --- schedule ----------------------------------------------------------------------------------------------------
    @property
    def lam(self) -> float:
        """λ of the next training-mode forward (1 during the warm-up)."""
        if int(self.vfx_warm) > 0:
            return 1.0
        return float(self.r0 * self.vfx_iter / self.vfx_total)

    def layer_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The host LayerNorm, ``[..., C] -> [..., C]``."""
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, N, C] -> [B, N, C]``: the λ mix in training, RepBN (or its folded form) in eval."""
        if self.folded == "identity":
            return x
        if self.folded == "affine":
            return x * self.vfx_scale.to(x.dtype) + self.vfx_shift.to(x.dtype)
        if not self.training:
            if not self._vfx_eval_checked:
                self.check_schedule()
            return self.vfx_bn(x)
        lam = self.r0 * self.vfx_iter / self.vfx_total
        if not self.has_warmup:
            y = lam * self.layer_norm(x) + (1 - lam) * self.vfx_bn(x)
            with torch.no_grad():
                self.vfx_iter.sub_((self.vfx_iter > 0).long())
            return y
        warm = self.vfx_warm > 0
        lam = torch.where(warm, torch.ones_like(lam), lam)
        # BN updates copies of its statistics (autograd keeps them), which replace the buffers after the warm-up only
        bn, rep_bn = self.vfx_bn.bn, self.vfx_bn
        mean, var = bn.running_mean.clone(), bn.running_var.clone()
        momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked + 1)
        C = x.shape[-1]
        bn_x = F.batch_norm(x.reshape(-1, C), mean, var, bn.weight, bn.bias, True, momentum, bn.eps)
        rep = bn_x.reshape(x.shape) + rep_bn.alpha * x
        y = lam * self.layer_norm(x) + (1 - lam) * rep
        with torch.no_grad():
            bn.running_mean.copy_(torch.where(warm, bn.running_mean, mean))
            bn.running_var.copy_(torch.where(warm, bn.running_var, var))
            bn.num_batches_tracked.add_((~warm).long())
            self.vfx_iter.sub_((~warm & (self.vfx_iter > 0)).long())
            self.vfx_warm.sub_(warm.long())
        return y

    @torch.no_grad()
    def rescale_schedule(self, factor: float) -> None:
        """Stretch the λ schedule to ``factor`` × its length (a training run shortened to fit a time budget): T
        becomes ``max(1, round(factor·T))`` and the forwards already run keep counting, so λ falls to 0 at the new
        end (``iter`` = new T − forwards so far, at least 0). The warm-up is left as it is."""
        total = max(1, round(factor * int(self.vfx_total)))
        done = int(self.vfx_total) - int(self.vfx_iter)
        self.vfx_total.fill_(total)
        self.vfx_iter.fill_(max(0, total - done))

    @torch.compiler.disable  # reads the counters once per switch to eval: run it outside any compiled graph
    def check_schedule(self) -> None:
        """Warn (once per switch to eval) if the schedule is unfinished."""
        self._vfx_eval_checked = True
        if bool(self.vfx_iter > 0) or bool(self.vfx_warm > 0):
            warnings.warn(EVAL_WARNING, UserWarning, stacklevel=3)

    def train(self, mode: bool = True):
        if mode:
            self._vfx_eval_checked = False
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs):
        self._vfx_eval_checked = False
        return super()._load_from_state_dict(*args, **kwargs)

    # --- folding -----------------------------------------------------------------------------------------------------
    def fold_into(self, targets: list[tuple[nn.Module, str | tuple[str, str]]]) -> None:
        """Fuse the eval RepBN into its consumers and become the identity. A target is ``(owner, name)`` with a
        Linear child ``name``, or ``(owner, (weight, bias))`` naming parameters ``owner`` applies as a Linear."""
        a, b = self.vfx_bn.affine()
        folds = self.__dict__["_vfx_folds"]
        for owner, name in targets:
            if isinstance(name, str):
                original = owner._modules[name]
                setattr(owner, name, FoldedLinear(original, a, b))
                folds.append((owner, name, original))
            else:
                stash = _ParameterStash(owner._parameters[name[0]], owner._parameters.get(name[1]))
                owner._parameters[name[0]], owner._parameters[name[1]] = _fuse(stash.weight, stash.bias, a, b)
                folds.append((owner, name, stash))
        self.folded = "identity"

    def fold_explicit(self) -> None:
        """Become the fixed affine map ``a ⊙ x + b`` of the eval RepBN."""
        a, b = self.vfx_bn.affine()
        dtype = self.vfx_bn.alpha.dtype
        self.vfx_scale, self.vfx_shift = a.to(dtype), b.to(dtype)
        self.folded = "affine"

    def unfold(self) -> None:
        """Undo :meth:`fold_into` / :meth:`fold_explicit`: the original Linears come back."""
        folds = self.__dict__["_vfx_folds"]
        for owner, name, original in reversed(folds):
            if isinstance(name, str):
                setattr(owner, name, original)
            else:
                owner._parameters[name[0]], owner._parameters[name[1]] = original.weight, original.bias
        folds.clear()
        self.vfx_scale = self.vfx_shift = None
        self.folded = None

    def _apply(self, fn, recurse=True):
        for _, name, original in self.__dict__["_vfx_folds"]:
            if not isinstance(name, str):
                original._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def restore_host(self) -> nn.Module:
        """The original LayerNorm with the current ``weight``/``bias`` (any folding undone first)."""
        self.unfold()
        host = self.__dict__["_vfx_host"]
        for name in ("weight", "bias"):
            if name in host._parameters:
                host._parameters[name] = self._parameters.get(name)
        host.train(self.training)
        return host

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape[0]}, role={self.role}, r0={self.r0}, folded={self.folded}, "
                f"iter={int(self.vfx_iter)}/{int(self.vfx_total)}, warm={int(self.vfx_warm)}")


def _linear_norms(model: nn.Module) -> list[tuple[nn.Module, str, LinearNorm]]:
    return [(parent, name, child) for parent in model.modules() for name, child in parent._modules.items()
            if isinstance(child, LinearNorm)]


def reparameterize(model: nn.Module) -> nn.Module:
    """Fold every eval RepBN of a PRepBN-patched model into the Linears that follow it (METHODS.md §6.2–§6.3).

    norm1 folds into ``attn.qkv`` (and timm's ``attn.gate``; open_clip's ``in_proj``), norm2 into ``mlp.fc1`` (both
    halves of a gated MLP; open_clip's ``mlp.c_fc``), the final norm into ``head`` (and ``head_dist``) through token
    or average pooling. Where the normalised input is read otherwise, the norm stays an explicit per-channel affine
    map. Eval outputs are unchanged (up to
    rounding); ``visionfx.unpatch`` restores the host exactly. Idempotent. The model must be in eval mode.

    Returns:
        ``model``, folded in place.
    """
    norms = _linear_norms(model)
    if not norms:
        raise ValueError("reparameterize found no PRepBN norms: patch the model with 'prepbn' or slab norm='prepbn'")
    if any(n.training for _, _, n in norms):
        raise RuntimeError("reparameterize folds the eval form (running statistics): call model.eval() first")
    from visionfx.methods._prepbn_targets import fold_targets

    for parent, name, norm in norms:
        if norm.folded is not None:
            continue
        targets = fold_targets(parent, name, norm.role)
        if targets is None:
            norm.fold_explicit()
        else:
            norm.fold_into(targets)
    return model


def _forward_batch(model: nn.Module, batch, device) -> None:
    if isinstance(batch, torch.Tensor):
        model(batch.to(device))
    elif isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        model(batch[0].to(device))
    elif isinstance(batch, dict):
        model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    else:
        raise TypeError("recalibrate_bn: a batch must be a tensor, a (inputs, ...) tuple/list or a dict of model "
                        f"keyword arguments, got {type(batch).__name__}")


def recalibrate_bn(model: nn.Module, loader, steps: int | None = None) -> nn.Module:
    """Re-estimate the BN statistics of every PRepBN norm with all parameters frozen (METHODS.md §6.4).

    The running statistics are reset and then averaged cumulatively over the batches; dropout and drop path are
    off and the λ schedule does not advance. Modes and BN momenta are restored afterwards.

    Args:
        model: a PRepBN-patched model, not folded yet.
        loader: an iterable of batches: ``[B, ...]`` tensors, ``(inputs, targets)`` tuples or keyword dicts.
        steps: the number of batches to use (``None``: the whole loader).

    Returns:
        ``model``.
    """
    norms = [n for _, _, n in _linear_norms(model)]
    if not norms:
        raise ValueError("recalibrate_bn found no PRepBN norms: patch the model with 'prepbn' or slab norm='prepbn'")
    if any(n.folded is not None for n in norms):
        raise RuntimeError("recalibrate_bn needs the unfolded model: recalibrate before visionfx.reparameterize")
    if steps is not None:
        _check_int("steps", steps, 1)
    modes = [(m, m.training) for m in model.modules()]
    checked = [n._vfx_eval_checked for n in norms]
    bns = [n.vfx_bn.bn for n in norms]
    momenta = [bn.momentum for bn in bns]
    param = next(model.parameters())
    count = 0
    try:
        model.eval()
        for n, bn in zip(norms, bns):
            n._vfx_eval_checked = True  # recalibrating is not evaluating: no schedule warning
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        with torch.no_grad():
            for batch in loader:
                if steps is not None and count >= steps:
                    break
                _forward_batch(model, batch, param.device)
                count += 1
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        for m, mode in modes:
            m.training = mode
        for n, c in zip(norms, checked):
            n._vfx_eval_checked = c
    if count == 0:
        raise ValueError("recalibrate_bn: the loader gave no batches")
    return model


METHOD = MethodSpec(
    name="prepbn",
    site="norm",
    config_cls=PRepBNConfig,
    module_cls=LinearNorm,
    summary="LayerNorm -> RepBN (BN + αx) over a linear schedule, foldable into the next Linear (SLAB)",
    regime="fine-tuning",
    paper="SLAB, ICML 2024 (arXiv 2405.11582)",
)
