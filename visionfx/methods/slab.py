"""SLAB's simplified linear attention (SLA): ReLU linear attention with a key position term and a shared DWC on V.

Paper: Guo et al., "SLAB: Efficient Transformers with Simplified Linear Attention and Progressive Re-parameterized
Batch Normalization", ICML 2024 (arXiv 2405.11582). METHODS.md §5. Differences from the official code: prefix tokens
are kept (they join the sums and get no position term or DWC), and the position term is resampled to other grids
like timm's position embedding.

Numerics (§5.5): the attention part runs with autocast disabled, and the position term is added in the promoted
dtype (an fp32 PE under autocast keeps ``k'`` in fp32, as officially); q and v join that dtype and the op
accumulates in fp32. The DWC runs as any convolution (under autocast in half precision, as officially). The output
is cast back to the input dtype once, at the end.

Memory traffic: the position term is padded with zero rows for the prefix tokens and added to all of k in one op (no
concatenation); the DWC runs channels-last on the patch rows of V (``[B, H, W, h·d]``, the token layout) with the
head-shared kernel repeated per head (``groups = h·d``), and its result is added in place to the patch rows of the
op's output, which the op does not keep for its backward; at inference both happen in one pass, the fused
``patch_dwconv`` op (:func:`~visionfx.methods.patch_rows.add_local_conv`), which reads the head-shared kernel as it
is. The Triton op writes its output in the token layout, so the heads merge without a copy.
:mod:`visionfx.methods.patch_rows` holds these helpers (re-exported here), which the other mixers share.

``norm="prepbn"`` also replaces the model's LayerNorms by PRepBN (METHODS.md §6, :mod:`visionfx.methods.prepbn`):
the config then carries the schedule length ``prepbn_steps`` (required: about 0.8 x the planned training iterations)
and ``companions()`` returns the matching :class:`~visionfx.methods.prepbn.PRepBNConfig`. PRepBN replaces every
LayerNorm of the blocks and the final norm, whatever ``layers`` selects for the attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from visionfx.config import AttentionConfig, suggest
from visionfx.methods.base import HostInfo, TokenLayout, TokenMixer
from visionfx.methods.patch_rows import add_local_conv, add_to_patch_rows, depthwise_conv_patch_rows, grid_constant
from visionfx.methods.prepbn import PRepBNConfig, missing_steps_message
from visionfx.registry import MethodSpec

__all__ = ["SlabConfig", "SlabAttention", "resample_grid_param", "depthwise_conv_patch_rows", "add_to_patch_rows",
           "grid_constant"]


NORMS = (None, "prepbn")


@dataclass(frozen=True)
class SlabConfig(AttentionConfig):
    """Simplified linear attention.

    Attributes:
        dwc_kernel: kernel size of the head-shared depthwise convolution on V (odd).
        use_pe: add the learnable position term to the keys of patch tokens.
        pe_resample: interpolation used to resample the position term to another grid.
        eps: added to the denominator.
        norm: ``None`` (LayerNorms untouched) or ``"prepbn"`` (also patch the norm site with PRepBN).
        prepbn_steps: with ``norm="prepbn"``, PRepBN's ``total_steps`` T (required; about 0.8 x the planned
            training iterations).
        prepbn_warmup: with ``norm="prepbn"``, PRepBN's ``warmup`` (pure LayerNorm forwards before the schedule).
        prepbn_r0: with ``norm="prepbn"``, PRepBN's ``r0`` (λ at the start of the schedule).
    """

    method = "slab"
    dwc_kernel: int = 5
    use_pe: bool = True
    pe_resample: str = "bicubic"
    eps: float = 1e-6
    norm: str | None = None
    prepbn_steps: int | None = None
    prepbn_warmup: int = 0
    prepbn_r0: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.dwc_kernel < 1 or self.dwc_kernel % 2 == 0:
            raise ValueError(f"dwc_kernel must be a positive odd number, got {self.dwc_kernel}")
        if self.pe_resample not in ("bicubic", "bilinear", "nearest"):
            raise ValueError(f"pe_resample must be bicubic, bilinear or nearest, got {self.pe_resample!r}")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        if self.norm not in NORMS:
            hint = suggest(self.norm, ["prepbn"]) if isinstance(self.norm, str) else ""
            raise ValueError(f"norm must be None or 'prepbn', got {self.norm!r}{hint}")
        if self.norm is None:
            if (self.prepbn_steps, self.prepbn_warmup, self.prepbn_r0) != (None, 0, 1.0):
                raise ValueError("prepbn_steps, prepbn_warmup and prepbn_r0 apply with norm='prepbn' only")
        else:
            if self.prepbn_steps is None:
                raise ValueError(missing_steps_message(
                    "prepbn_steps (slab with norm='prepbn')",
                    "visionfx.patch(model, 'slab', norm='prepbn', prepbn_steps=int(0.8 * iterations))"))
            self.companions()  # validates the PRepBN options

    def companions(self) -> tuple[PRepBNConfig, ...]:
        """The PRepBN config of the norm site when ``norm="prepbn"``."""
        if self.norm != "prepbn":
            return ()
        return (PRepBNConfig(total_steps=self.prepbn_steps, warmup=self.prepbn_warmup, r0=self.prepbn_r0),)


def resample_grid_param(p: torch.Tensor, src: tuple[int, int], dst: tuple[int, int], mode: str) -> torch.Tensor:
    """Resample a per-position parameter ``[1, H0*W0, C]`` from grid ``src`` to ``dst`` (as timm resamples its
    position embedding: antialiased when shrinking with bicubic/bilinear)."""
    if tuple(src) == tuple(dst):
        return p
    C = p.shape[-1]
    grid = p.reshape(1, src[0], src[1], C).permute(0, 3, 1, 2).float()
    kwargs = {"antialias": True, "align_corners": False} if mode in ("bicubic", "bilinear") else {}
    grid = F.interpolate(grid, size=tuple(dst), mode=mode, **kwargs)
    return grid.permute(0, 2, 3, 1).reshape(1, dst[0] * dst[1], C).to(p.dtype)


class SlabAttention(TokenMixer):
    """SLA: ``o_i = ReLU(q_i) Σ_j ReLU(k'_j)ᵀ v_j / (ReLU(q_i)·Σ_j ReLU(k'_j) + eps)`` with ``k'_j = k_j + PE_j``,
    plus a depthwise ``dwc_kernel``² convolution shared by all heads on each head's V over the patch grid."""

    method = "slab"
    op = "linear_attention"
    inference_ops = ("patch_dwconv",)

    def __init__(self, config: SlabConfig, host: HostInfo):
        super().__init__(config, host)
        d, k = host.head_dim, config.dwc_kernel
        self.grid0 = tuple(host.grid)
        self.pe = nn.Parameter(torch.zeros(1, host.grid[0] * host.grid[1], host.attn_dim)) if config.use_pe else None
        self.dwc = nn.Conv2d(d, d, k, padding=k // 2, groups=d, bias=True)
        if config.init == "pretrained":
            nn.init.zeros_(self.dwc.weight)
            nn.init.zeros_(self.dwc.bias)

    def op_options(self) -> dict:
        return {"feature": "relu", "normalizer": "divisive"}

    def forward(self, q, k, v, x, layout: TokenLayout):
        """``q, k, v [B, h, N, d]`` (host q/k norms applied) -> ``[B, h, N, d]`` in the dtype of ``q``."""
        B, h, N, d = q.shape
        P0, (H, W) = layout.num_prefix_tokens, layout.grid
        out_dtype = q.dtype
        v_in = v
        if self.pe is not None:
            pe = resample_grid_param(self.pe, self.grid0, (H, W), self.config.pe_resample)
            pe = F.pad(pe, (0, 0, P0, 0))  # no position term on prefix keys: k + 0, in k's promoted dtype
            k = k + pe.view(1, N, h, d).transpose(1, 2)
            q, v = q.to(k.dtype), v.to(k.dtype)
        with torch.autocast(q.device.type, enabled=False):  # §5.5: fp32 even under autocast
            o = self.kernel(q)(q, k, v, feature="relu", normalizer="divisive", eps=self.config.eps)
        # v convolved in the weights' dtype directly: the detour through k's dtype (a superset of v's) changes no value
        o = add_local_conv(self, o, v_in, self.dwc.weight, self.dwc.bias, (H, W), P0, inplace=True)  # head-shared
        return o.to(out_dtype)


METHOD = MethodSpec(
    name="slab",
    site="attention",
    config_cls=SlabConfig,
    module_cls=SlabAttention,
    summary="ReLU linear attention, key position term, head-shared DWC on V (SLAB)",
    regime="fine-tuning",
    paper="SLAB, ICML 2024 (arXiv 2405.11582)",
)
