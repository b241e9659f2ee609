"""Where a PRepBN norm can be folded: the token-wise Linears that read its output and nothing else (METHODS.md §6.3).

:func:`fold_targets` answers for one norm, given the module holding it, its attribute name and its role. A target is
``(owner, name)`` with ``name`` a Linear child of ``owner``, or ``(owner, (weight, bias))`` naming parameters that
``owner`` applies as ``F.linear(x, weight, bias)``. ``None`` means "keep an explicit affine map": the output is read
elsewhere too, or the structure is not one this module knows.

Known structures:

* timm ``Block``: ``norm1`` -> ``attn.qkv`` and ``attn.gate``; ``norm2`` -> ``mlp.fc1`` (``Mlp``, ``GluMlp``, both
  halves) or ``mlp.fc1_g``/``mlp.fc1_x`` (``SwiGLU``). timm ``VisionTransformer``: ``norm`` (role ``final``) ->
  ``head`` (and ``head_dist``) through token or average pooling with no ``fc_norm`` or attention pooling between;
  ``fc_norm`` -> the heads.
* open_clip ``ResidualAttentionBlock`` / ``CustomResidualAttentionBlock``: ``ln_1`` -> the attention's
  ``in_proj_weight``/``in_proj_bias``; ``ln_2`` -> ``mlp.c_fc``. ``ln_post`` feeds ``proj``, a bias-free matrix, so
  it stays explicit.
* A patched attention folds only if its mixer reads nothing but the host's q, k, v (``reads_input`` False and no
  ``pre_qkv``/``post_norm`` of its own).
"""

from __future__ import annotations

from torch import nn

__all__ = ["fold_targets"]

Target = tuple[nn.Module, "str | tuple[str, str]"]


def _linears(owner: nn.Module, names) -> list[Target] | None:
    found = [(owner, n) for n in names if owner._modules.get(n) is not None]
    return found if found and all(type(owner._modules[n]) is nn.Linear for _, n in found) else None


def _mixer_reads_only_qkv(attn: nn.Module) -> bool:
    from visionfx.methods.base import TokenMixer
    from visionfx.patches.base import MIXER_NAME

    mixer = getattr(attn, MIXER_NAME)
    cls = type(mixer)
    return not (mixer.reads_input or cls.pre_qkv is not TokenMixer.pre_qkv or cls.post_norm is not TokenMixer.post_norm)


def _timm_targets(parent: nn.Module, name: str, role: str) -> list[Target] | None:
    from timm.layers import GluMlp, Mlp, SwiGLU
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import Block, VisionTransformer

    from visionfx.patches.timm_vit import TimmPatchedAttention, _attention_classes

    if role in ("norm1", "norm2"):
        if type(parent) is not Block or name != role:
            return None
        if role == "norm1":
            attn = parent.attn
            if isinstance(attn, TimmPatchedAttention):
                if not _mixer_reads_only_qkv(attn):
                    return None
            elif type(attn) not in _attention_classes():
                return None
            return _linears(attn, ("qkv", "gate")) if type(attn._modules.get("qkv")) is nn.Linear else None
        names = {Mlp: ("fc1",), GluMlp: ("fc1",), SwiGLU: ("fc1_g", "fc1_x")}.get(type(parent.mlp))
        if names is None or any(type(parent.mlp._modules.get(n)) is not nn.Linear for n in names):
            return None
        return _linears(parent.mlp, names)
    cls = type(parent)
    if name != ("norm" if role == "final" else "fc_norm") or not isinstance(parent, VisionTransformer):
        return None
    if cls.pool is not VisionTransformer.pool:
        return None
    if cls.forward_head not in (VisionTransformer.forward_head, VisionTransformerDistilled.forward_head):
        return None
    if role == "final":
        # pooling must commute with a per-channel affine map, and nothing may sit between pooling and the head
        if getattr(parent, "attn_pool", None) is not None or not isinstance(parent.fc_norm, nn.Identity):
            return None
        if cls.forward_head is VisionTransformer.forward_head and parent.global_pool not in ("token", "avg", ""):
            return None
    return _linears(parent, ("head", "head_dist"))


def _open_clip_targets(parent: nn.Module, name: str, role: str) -> list[Target] | None:
    from open_clip import transformer as oct

    from visionfx.patches.open_clip import OpenClipCustomPatchedAttention, OpenClipPatchedAttention

    blocks = (oct.ResidualAttentionBlock, oct.CustomResidualAttentionBlock)
    if type(parent) not in blocks or (role, name) not in (("norm1", "ln_1"), ("norm2", "ln_2")):
        return None
    if role == "norm2":
        mlp = parent.mlp
        return _linears(mlp, ("c_fc",)) if isinstance(mlp, nn.Sequential) else None
    attn = parent.attn
    if isinstance(attn, (OpenClipPatchedAttention, OpenClipCustomPatchedAttention)):
        if not _mixer_reads_only_qkv(attn):
            return None
    elif type(attn) not in (nn.MultiheadAttention, oct.Attention):
        return None
    if attn._parameters.get("in_proj_weight") is None:  # MHA with separate q/k/v projections
        return None
    return [(attn, ("in_proj_weight", "in_proj_bias"))]


def fold_targets(parent: nn.Module, name: str, role: str) -> list[Target] | None:
    """The fold targets of the norm ``parent.<name>`` with ``role``, or ``None`` (keep it an explicit affine map)."""
    targets = _timm_targets(parent, name, role)
    if targets is None:
        try:
            targets = _open_clip_targets(parent, name, role)
        except ImportError:
            targets = None
    return targets
