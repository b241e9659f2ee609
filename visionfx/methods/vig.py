"""ViG's bidirectional gated linear attention (GLA), on a pretrained host's q, k, v.

Paper: Liao et al., "ViG: Linear-complexity Visual Sequence Learning with Gated Linear Attention" (arXiv 2405.18425).
METHODS.md §7, §12 items 12-15 and 17. One layer::

    xs = DWC(x) on patch tokens (prefix tokens bypass it)                 pre_qkv; xs feeds the host qkv
    q, k, v = heads(host qkv(xs)) -> host q_norm / k_norm
    g = (xs W1ᵀ) W2ᵀ + b2 -> log-decays logsigmoid(g) / gate_normalizer -> gf, gb (per token, per key channel)
    o = (o_f + o_b) / 2, the two scans over the raster order with the prefix tokens moved to scan index ⌊P/2⌋
    y = RMSNorm_g(o) ⊙ G + RMSNorm_l(xs) ⊙ (1 − G),  G = sigmoid(xs W_gᵀ + b_g)   (per head, weights shared by heads)
    y = SiLU(y) if out_act -> merge -> host norm -> host gate -> host proj

Decisions where the spec leaves room:

* The output stage (both RMSNorms, the mix with G, the optional SiLU) runs inside :meth:`VigAttention.forward`,
  before the heads are merged, so the host ``norm`` acts on y, as METHODS.md §7.3 and §12.17 order it (mixer, merge,
  host norm, host gate, proj). ``post_norm`` stays the identity.
* The scan scale is ``d^-0.5`` (§7.1), not the host's ``scale``: the RMSNorm that follows makes it matter only
  through the eps.
* ``prefix_position`` also offers ``"front"`` (prefix tokens scanned where the host puts them, before the patches)
  and ``"end"`` (after the last patch); ``"middle"`` is the default of §7.2.
* W1 is initialised as officially (xavier-uniform, gain 2^-2.5) under both inits: with ``W2 = 0`` it does not change
  the layer at step 0, and a zero W1 would leave W1 and W2 without gradient.
* The official init has zero biases; ``forget_bias_init`` and ``mix_bias_init`` belong to the pretrained init.
* Log-decays are computed in fp32 (float64 for float64 inputs), whatever the parameters' dtype: the low-rank gate's
  second GEMM reads its (rank-wide) input in fp32 and writes fp32 logits directly, and ``logsigmoid(g)/n`` is one
  ``softplus`` with a negative β (``kernels/vig_gates``; without autograd on CUDA one Triton kernel does the GEMM and
  the log-sigmoid and writes the log-decays once).

Memory layout (every step is token-wise except the DWC and the scans, so the token order is free to choose):

* :meth:`VigAttention.pre_qkv` returns xs in **scan order** (patches before ``⌊P/2⌋``, prefix tokens, the rest): the
  copy that joins the prefix tokens to the DWC output is needed anyway, and placing them at their scan index there
  means q, k, v (the host qkv on xs) and the gates arrive in scan order with no further copy. The ``x`` that
  :meth:`VigAttention.forward` receives is this xs.
* The DWC runs on channels-last memory (the patch tokens of ``[B, N, C]`` are already channels-last up to the batch
  stride), so its output is ``[B, H·W, C]`` without a transpose copy.
* The forward and backward log-decays are two views of one fp32 ``[B, N, 2, h, d]`` buffer, the layout the bidir_gla
  kernel reads without copying.
* The output stage is two RMSNorms, a sigmoid and one ``lerp`` (``y = L̂ + G·(ô − L̂)``), written in host order into
  ``[B, N, h, d]`` memory (returned as its ``[B, h, N, d]`` view, so merging the heads is free). Without autograd, in
  eager mode, it is one op (``kernels/vig_output``: a fused Triton kernel on CUDA that reads each input once and
  writes y at the host positions; its reference writes the three token ranges straight into place); with autograd or
  under ``torch.compile`` (which fuses it) it is the PyTorch composition, reordered by a concatenation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from visionfx.config import AttentionConfig
from visionfx.kernels.vig_gates.reference import vig_gates_reference
from visionfx.kernels.vig_output.reference import host_segments, normed_mix
from visionfx.methods.base import HostInfo, TokenLayout, TokenMixer
from visionfx.registry import MethodSpec

__all__ = ["VigConfig", "VigAttention", "PREFIX_POSITIONS", "scan_index", "to_scan_order", "from_scan_order"]

PREFIX_POSITIONS = ("middle", "front", "end")
#: the official init's xavier-uniform gain
OFFICIAL_GAIN = 2.0**-2.5


@dataclass(frozen=True)
class VigConfig(AttentionConfig):
    """Bidirectional gated linear attention (ViG).

    Attributes:
        expand_k: key width over model width. Only 1.0 while q and k come from the host's qkv (METHODS.md §12.12);
            the official 0.5 needs fresh projections.
        gate_rank: rank of the low-rank forget-gate projection (W1: C -> rank, W2: rank -> 2C).
        gate_normalizer: divides ``logsigmoid(g)``; larger means slower decay.
        dwc_kernel: kernel size of the depthwise convolution on the input (odd).
        act_in_conv: SiLU after the convolution (official ViG-T).
        out_act: SiLU on the mixed output y (official ViG-T).
        prefix_position: where prefix tokens are scanned: ``"middle"`` (scan index ⌊P/2⌋), ``"front"`` or ``"end"``.
        forget_bias_init: ``b2`` under the pretrained init (+4: α ≈ 0.9989, a memory of about 900 tokens).
        mix_bias_init: ``b_g`` under the pretrained init (+4: G ≈ 0.98, mostly the global path).
        rms_eps: eps of both RMSNorms.
    """

    method = "vig"
    expand_k: float = 1.0
    gate_rank: int = 16
    gate_normalizer: float = 16.0
    dwc_kernel: int = 3
    act_in_conv: bool = False
    out_act: bool = False
    prefix_position: str = "middle"
    forget_bias_init: float = 4.0
    mix_bias_init: float = 4.0
    rms_eps: float = 1e-6

    def __post_init__(self):
        super().__post_init__()
        if self.expand_k != 1.0:
            raise ValueError(
                f"expand_k={self.expand_k}: vig reuses the host's qkv, whose q and k have the head width, so only "
                "expand_k=1.0 is possible (the official 0.5 needs fresh q/k projections; METHODS.md §12.12)"
            )
        if int(self.gate_rank) != self.gate_rank or self.gate_rank < 1:
            raise ValueError(f"gate_rank must be a positive integer, got {self.gate_rank}")
        if not self.gate_normalizer > 0:
            raise ValueError(f"gate_normalizer must be > 0, got {self.gate_normalizer}")
        if int(self.dwc_kernel) != self.dwc_kernel or self.dwc_kernel < 1 or self.dwc_kernel % 2 == 0:
            raise ValueError(f"dwc_kernel must be a positive odd number, got {self.dwc_kernel}")
        if self.prefix_position not in PREFIX_POSITIONS:
            raise ValueError(f"prefix_position must be one of {PREFIX_POSITIONS}, got {self.prefix_position!r}")
        if not self.rms_eps >= 0:
            raise ValueError(f"rms_eps must be >= 0, got {self.rms_eps}")


def scan_index(num_patches: int, position: str) -> int:
    """Index in the patch sequence at which the prefix tokens are scanned."""
    return {"middle": num_patches // 2, "front": 0, "end": num_patches}[position]


def _scan_cat(prefix: torch.Tensor, patches: torch.Tensor, index: int, dim: int) -> torch.Tensor:
    """Join ``prefix`` and ``patches`` along ``dim`` with the prefix just before patch ``index`` (one copy)."""
    if prefix.shape[dim] == 0:
        return patches
    if index == 0:
        return torch.cat((prefix, patches), dim)
    if index == patches.shape[dim]:
        return torch.cat((patches, prefix), dim)
    rest = patches.shape[dim] - index
    return torch.cat((patches.narrow(dim, 0, index), prefix, patches.narrow(dim, index, rest)), dim)


def to_scan_order(t: torch.Tensor, num_prefix: int, index: int, dim: int = 2) -> torch.Tensor:
    """Move the first ``num_prefix`` tokens of ``t`` (along ``dim``), contiguously, to just before patch ``index``."""
    if num_prefix == 0 or index == 0:
        return t
    n = t.shape[dim]
    return _scan_cat(t.narrow(dim, 0, num_prefix), t.narrow(dim, num_prefix, n - num_prefix), index, dim)


def from_scan_order(t: torch.Tensor, num_prefix: int, index: int, dim: int = 2) -> torch.Tensor:
    """Inverse of :func:`to_scan_order`: the prefix tokens go back to the front."""
    if num_prefix == 0 or index == 0:
        return t
    segments = sorted(host_segments(num_prefix, t.shape[dim] - num_prefix, index), key=lambda seg: seg[1])
    return torch.cat([t.narrow(dim, src, length) for src, _, length in segments], dim)


class VigAttention(TokenMixer):
    """ViG's gated linear attention mixer (see the module docstring).

    Parameters (all new; the host's qkv and proj are reused): ``dwc`` (depthwise ``k×k``, no bias), ``gate_down``
    (W1, no bias), ``gate_up`` (W2 with b2), ``mix`` (W_g with b_g), ``norm_o`` / ``norm_l`` (RMSNorm weights of size
    d, shared by the heads): ``C² + (k² + 3·rank + 3)·C + 2d`` (170,624 for DeiT-S).
    """

    method = "vig"
    op = "bidir_gla"
    inference_ops = ("vig_gates", "vig_output")
    reads_input = True

    def __init__(self, config: VigConfig, host: HostInfo):
        super().__init__(config, host)
        if host.dim != host.attn_dim:
            raise ValueError(
                f"vig mixes the attention output with the (convolved) layer input per head, so the host's attn_dim "
                f"({host.attn_dim}) must equal its input width ({host.dim})"
            )
        C, d, k, r = host.attn_dim, host.head_dim, config.dwc_kernel, config.gate_rank
        self.dwc = nn.Conv2d(C, C, k, padding=k // 2, groups=C, bias=False)
        self.gate_down = nn.Linear(C, r, bias=False)
        self.gate_up = nn.Linear(r, 2 * C, bias=True)
        self.mix = nn.Linear(C, C, bias=True)
        self.norm_o = nn.Parameter(torch.ones(d))
        self.norm_l = nn.Parameter(torch.ones(d))
        self.reset_parameters()

    @torch.no_grad()
    def calibrate_output(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """METHODS.md §7.3: both RMSNorm weights := the host softmax output's per-head RMS, averaged over heads (the
        weights are shared by heads). At 1 they make the output several times the host's (RMS about 1 per head
        against 0.1–0.7 in a small trained ViT), more than a short attention transfer can undo."""
        o = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=self.scale)
        rms = o.pow(2).mean((0, 2, 3)).sqrt().mean()
        self.norm_o.fill_(rms)
        self.norm_l.fill_(rms)
        return True

    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.config
        nn.init.ones_(self.norm_o)
        nn.init.ones_(self.norm_l)
        nn.init.xavier_uniform_(self.gate_down.weight, gain=OFFICIAL_GAIN)
        if cfg.init == "official":
            for m in (self.dwc, self.gate_up, self.mix):
                nn.init.xavier_uniform_(m.weight, gain=OFFICIAL_GAIN)
            nn.init.zeros_(self.gate_up.bias)
            nn.init.zeros_(self.mix.bias)
            return
        k = cfg.dwc_kernel
        self.dwc.weight.zero_()
        self.dwc.weight[:, :, k // 2, k // 2] = 1.0
        nn.init.zeros_(self.gate_up.weight)
        nn.init.constant_(self.gate_up.bias, cfg.forget_bias_init)
        nn.init.zeros_(self.mix.weight)
        nn.init.constant_(self.mix.bias, cfg.mix_bias_init)

    def pre_qkv(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """``x [B, N, C]`` -> ``xs [B, N, C]`` in scan order: the DWC over the patch grid, the prefix tokens unchanged
        and moved to scan index :func:`scan_index` (see the module docstring)."""
        B, N, C = x.shape
        P0, (H, W) = layout.num_prefix_tokens, layout.grid
        # the patch tokens are channels-last already; making the batch stride compact is the conv's only input copy
        grid = x[:, P0:].transpose(1, 2).reshape(B, C, H, W).contiguous(memory_format=torch.channels_last)
        local = self.dwc(grid)
        if self.config.act_in_conv:
            local = F.silu(local)
        local = local.flatten(2).transpose(1, 2).contiguous()  # a view of channels-last memory: no copy
        return _scan_cat(x[:, :P0], local, scan_index(H * W, self.config.prefix_position), dim=1)

    def log_decays(self, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward log-decays ``[B, h, N, d]`` (fp32, float64 for float64 input) from ``xs [B, N, C]``,
        in xs's token order: two views of one ``[B, N, 2, h, d]`` buffer."""
        B, N, _ = xs.shape
        up, z = self.gate_up, self.gate_down(xs)
        fn = self.inference_op("vig_gates", z) or vig_gates_reference
        a = fn(z, up.weight, up.bias, self.config.gate_normalizer)
        a = a.view(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return a[0], a[1]

    def forward(self, q, k, v, x, layout: TokenLayout):
        """``q, k, v [B, h, N, d]`` and ``x`` = xs ``[B, N, C]``, all in scan order (see :meth:`pre_qkv`) -> y
        ``[B, h, N, d]`` in host order, a view of ``[B, N, h, d]`` memory."""
        d = q.shape[-1]
        P0, (H, W) = layout.num_prefix_tokens, layout.grid
        gf, gb = self.log_decays(x)
        o = self.kernel(q)(q, k, v, gf, gb, scale=d**-0.5)
        return self._output(o, x, P0, H * W).transpose(1, 2)

    def _output(self, o: torch.Tensor, xs: torch.Tensor, P0: int, P: int) -> torch.Tensor:
        """Scan-order ``o [B, h, N, d]`` and ``xs [B, N, C]`` -> y ``[B, N, h, d]`` (contiguous) in host order."""
        cfg = self.config
        m = scan_index(P, cfg.prefix_position)
        logits = self.mix(xs)
        # inference: one fused kernel on CUDA (kernels/vig_output), else the reference's three direct writes
        fn = self.inference_op("vig_output", o, torch.promote_types(o.dtype, xs.dtype))
        if fn is not None:
            return fn(o, xs, logits, self.norm_o, self.norm_l, eps=cfg.rms_eps, num_prefix=P0, scan_index=m,
                      silu=cfg.out_act)
        o_hat, l_hat, gate = normed_mix(o, xs, logits, self.norm_o, self.norm_l, cfg.rms_eps)
        y = from_scan_order(torch.lerp(l_hat, o_hat, gate), P0, m, dim=1)
        return F.silu(y) if cfg.out_act else y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, prefix_position={self.config.prefix_position}"


METHOD = MethodSpec(
    name="vig",
    site="attention",
    config_cls=VigConfig,
    module_cls=VigAttention,
    summary="bidirectional gated linear attention with a DWC on the input and a gated local mix (ViG)",
    regime="fine-tuning",
    paper="ViG, arXiv 2405.18425",
)
