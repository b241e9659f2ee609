"""InLine attention: linear attention with injective (subtractive) normalisation and an input-conditioned local term.

Paper: Han et al., "Bridging the Divide: Reconsidering Softmax and Linear Attention", NeurIPS 2024 (arXiv 2412.06590).
METHODS.md §3. Per sample and head, with ``φ`` the kernel function and ``s`` the host's scale::

    g_i = v̄ + s·φ(q_i) Σ_kv,   Σ_kv = (1/N) Σ_j (φ(k_j) − k̄)ᵀ v_j      (centred form, fp32)

i.e. ``g = W V`` with ``w_ij = (s/N)(φ(q_i)·φ(k_j) − φ(q_i)·k̄) + 1/N`` (rows sum to 1). The patch rows then get a
per-sample depthwise 3×3 convolution of V whose kernels a small per-head MLP predicts from the mean of the layer input.

Decisions where the paper and official code are silent (METHODS.md §12, items 7 and 8):

* The host's pretrained scale ``s`` is kept, so with φ = identity the global term is the first-order Taylor expansion
  of the host's softmax around uniform weights.
* Prefix tokens (any number) take part in every global sum and in the predictor's mean; they get no local term.
* ``init="pretrained"`` zeroes the predictor's output layer (the local term starts at 0); ``"official"`` keeps
  PyTorch's default Conv1d initialisation, as the official code does.
* The predictor's first layer reads the layer input of width ``C_in`` (``Conv1d(C_in, C, 1, groups=h)``); on every
  standard host ``C_in = C``, which is the official layer. ``C_in`` must be divisible by ``h``.
* ``leakyrelu`` uses PyTorch's default slope 0.01. ``leakyrelu`` and ``exp`` are applied here before the shared
  linear-attention op (called with ``feature="identity"``); ``exp`` is evaluated in fp32 (it overflows fp16 beyond
  ≈ 11) and the op then runs on fp32 q, k, v, its output cast back to the input dtype.
* The local convolution is one grouped ``conv2d`` with ``groups = B·C`` (the batch folded into channels), as the
  official code does; the grid comes from the model, never from ``int(sqrt(N))``.

Memory traffic: the convolution runs channels-last on ``[1, H, W, B·C]`` memory (one copy of V's patch rows with
contiguous channel runs, no NCHW transposes; :func:`~visionfx.methods.patch_rows.depthwise_conv_patch_rows`) and is
added in place to the patch rows of the op's output (the op keeps only its inputs for the backward), whose token
layout lets the heads merge without a copy; at inference the fused ``patch_dwconv`` op does both in one pass
(:func:`~visionfx.methods.patch_rows.add_local_conv`). The predictor's grouped 1×1 convolutions run as batched matrix
products on the same parameters (one launch each instead of a convolution with layout conversions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from visionfx.config import AttentionConfig, suggest
from visionfx.methods.base import HostInfo, TokenLayout, TokenMixer
from visionfx.methods.patch_rows import add_local_conv
from visionfx.registry import MethodSpec

__all__ = ["InlineConfig", "InlineAttention", "INLINE_KERNELS"]

INLINE_KERNELS = ("identity", "relu", "leakyrelu", "exp")
LEAKY_SLOPE = 0.01


@dataclass(frozen=True)
class InlineConfig(AttentionConfig):
    """InLine attention.

    Attributes:
        kernel: the kernel function φ applied to q and k: ``"identity"`` (every released model), ``"relu"``,
            ``"leakyrelu"`` or ``"exp"``.
        local_kernel: size of the predicted depthwise kernel on V (odd).
        use_local: add the input-conditioned local residual on the patch tokens.
    """

    method = "inline"
    kernel: str = "identity"
    local_kernel: int = 3
    use_local: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.kernel not in INLINE_KERNELS:
            raise ValueError(
                f"kernel must be one of {INLINE_KERNELS}, got {self.kernel!r}{suggest(str(self.kernel), INLINE_KERNELS)}"
            )
        if not isinstance(self.local_kernel, int) or self.local_kernel < 1 or self.local_kernel % 2 == 0:
            raise ValueError(f"local_kernel must be a positive odd integer, got {self.local_kernel!r}")


class InlineAttention(TokenMixer):
    """InLine: subtractive-normalised linear attention plus a dynamic depthwise convolution on V.

    New parameters (only the kernel predictor, ``10·C²/h + 10·C`` for a 3×3 kernel and ``C_in = C``):
    ``pred_fc1`` = ``Conv1d(C_in, C, 1, groups=h)`` and ``pred_fc2`` = ``Conv1d(C, k²·C, 1, groups=h)``.
    """

    method = "inline"
    op = "linear_attention"
    inference_ops = ("patch_dwconv",)
    reads_input = True

    def __init__(self, config: InlineConfig, host: HostInfo):
        super().__init__(config, host)
        C, h, ks = host.attn_dim, host.num_heads, config.local_kernel
        self.use_local = bool(config.use_local)
        # the predictor reads x; without it the layer is a function of q, k, v only
        self.reads_input = self.use_local
        if self.use_local:
            if host.dim % h:
                raise ValueError(
                    f"inline: the kernel predictor groups the input width {host.dim} by {h} heads, which does not "
                    "divide it; use use_local=False for this host"
                )
            self.pred_fc1 = nn.Conv1d(host.dim, C, 1, groups=h)
            self.pred_fc2 = nn.Conv1d(C, ks * ks * C, 1, groups=h)
            if config.init == "pretrained":
                nn.init.zeros_(self.pred_fc2.weight)
                nn.init.zeros_(self.pred_fc2.bias)
        else:
            self.pred_fc1 = self.pred_fc2 = None

    def _op_feature(self) -> str:
        return self.config.kernel if self.config.kernel in ("identity", "relu") else "identity"

    def op_options(self) -> dict:
        return {"feature": self._op_feature(), "normalizer": "subtractive"}

    def predict_kernels(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample depthwise kernels from the layer input: ``x [B, N, C_in]`` -> ``[B, C, k, k]``.

        ``m = mean_t x_t`` over all tokens (prefix included), then ``Conv1d -> GELU (erf) -> Conv1d`` per head.
        """
        w = self.pred_fc1.weight
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        m = x.mean(dim=1, dtype=acc).to(w.dtype)  # [B, C_in]
        kappa = _grouped_pointwise(F.gelu(_grouped_pointwise(m, self.pred_fc1)), self.pred_fc2)  # [B, k²C]
        ks = self.config.local_kernel
        return kappa.reshape(x.shape[0], -1, ks, ks)

    def forward(self, q, k, v, x, layout: TokenLayout):
        """``q, k, v [B, h, N, d]``, ``x [B, N, C_in]`` -> ``[B, h, N, d]``."""
        P0 = layout.num_prefix_tokens
        out_dtype = v.dtype
        if self.config.kernel == "leakyrelu":
            q, k = F.leaky_relu(q, LEAKY_SLOPE), F.leaky_relu(k, LEAKY_SLOPE)
        elif self.config.kernel == "exp":
            acc = torch.float64 if q.dtype == torch.float64 else torch.float32
            q, k, v = q.to(acc).exp(), k.to(acc).exp(), v.to(acc)
        g = self.kernel(q)(q, k, v, feature=self._op_feature(), normalizer="subtractive", scale=self.scale)
        g = g.to(out_dtype)
        if not self.use_local:
            return g
        kern = self.predict_kernels(x).to(v.dtype)
        return add_local_conv(self, g, v, kern, None, layout.grid, P0, inplace=True)

    def extra_repr(self) -> str:
        c = self.config
        return f"{super().extra_repr()}, kernel={c.kernel}, local_kernel={c.local_kernel if self.use_local else None}"


def _grouped_pointwise(m: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """``conv`` (a grouped ``Conv1d`` with kernel size 1) on one position: ``m [B, C_in]`` -> ``[B, C_out]``, as a
    batched product over the groups."""
    g = conv.groups
    B, c_in = m.shape
    c_out = conv.out_channels
    w = conv.weight.view(g, c_out // g, c_in // g).transpose(1, 2)  # [g, C_in/g, C_out/g]
    out = torch.baddbmm(conv.bias.view(g, 1, c_out // g), m.view(B, g, c_in // g).transpose(0, 1), w)
    return out.transpose(0, 1).reshape(B, c_out)


METHOD = MethodSpec(
    name="inline",
    site="attention",
    config_cls=InlineConfig,
    module_cls=InlineAttention,
    summary="linear attention with subtractive (injective) normalisation and a predicted DWC on V (InLine)",
    regime="fine-tuning",
    paper="InLine, NeurIPS 2024 (arXiv 2412.06590)",
)
