"""Rank-Augmented Linear Attention (RALA): ELU+1 linear attention with softmax key weights, a 2-D rotary numerator,
a LePE depthwise convolution on V and an input-conditioned output gate.

Paper: Fan, Huang, He, "Breaking the Low-Rank Dilemma of Linear Attention", CVPR 2025 (arXiv 2411.07635), model
RAVLT. METHODS.md §4. Per sample and head, with ``φ = ELU + 1``, ``Q̂ = φ(q)``, ``K̂ = φ(k)`` and ``s`` the host's
scale::

    α_j = softmax_j(s · q̄ · K̂_j),  q̄ = mean_i Q̂_i
    a_i = Σ_j α_j ⟨R_i Q̂_i, R_j K̂_j⟩ v_j / (Σ_j α_j ⟨Q̂_i, K̂_j⟩ + eps)
    a[P0:] += DWC_5(V[P0:]) ;  y = proj(host_norm(a) ⊙ (x W_oᵀ + b_o))

Decisions where the paper and official code are silent (METHODS.md §12, items 9, 10 and 17):

* Prefix tokens join q̄, α, the numerator and denominator sums and the gate; they get the identity rotation and no
  LePE (they have no grid position).
* ``init="pretrained"``: ``W_o = 0``, ``b_o = 1`` (gate ≡ 1) and LePE ≡ 0, so the layer starts as
  ``proj(RALA(q, k, v))``; ``"official"``: trunc_normal(0.02) weights and zero biases (the gate then starts near 0).
* The gate multiplies after the host's ``norm`` and before the host's ``gate`` and ``proj``; it reads the attention
  input ``x`` (after the block's ``norm1`` and after the optional CPE).
* ``cpe=True`` adds a zero-initialised depthwise 3×3 residual ``x[P0:] + DWC_3(x[P0:])`` on the patch tokens of the
  **attention input** (in ``pre_qkv``). In RAVLT the CPE sits in the block and updates the residual stream before
  ``norm1``; a patched attention site cannot reach the residual stream, so here it only changes what q, k, v and the
  gate see.
* RoPE tables are built for the current grid (``layout.grid``) in fp32 (float64 for float64 inputs) on the inputs'
  device (no host-to-device copy, so CUDA graphs can capture the layer) and cached per grid in eager mode
  (:func:`~visionfx.methods.patch_rows.grid_constant`). RoPE needs ``d % 4 == 0`` (checked at construction);
  ``rope=False`` lifts that requirement.
* α and the features it uses are computed in fp32 (float64 stays float64); the logits ``s·(ELU(k)·q̄ + Σ q̄)``,
  ``q̄ = mean ELU(q) + 1``, are one batched product of ELU(k) in the token layout with a block-diagonal ``q̄``.

Memory traffic: LePE (and CPE) run channels-last on the token layout
(:func:`~visionfx.methods.patch_rows.depthwise_conv_patch_rows`); LePE is added in place to the patch rows of the op's
output (the op keeps only its inputs), in one fused pass at inference (``patch_dwconv``,
:func:`~visionfx.methods.patch_rows.add_local_conv`); CPE as a zero-prefix term added once, never by concatenation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from visionfx.config import AttentionConfig
from visionfx.methods.base import HostInfo, TokenLayout, TokenMixer
from visionfx.methods.patch_rows import add_local_conv, add_to_patch_rows, depthwise_conv_patch_rows, grid_constant
from visionfx.registry import MethodSpec

__all__ = ["RalaConfig", "RalaAttention", "rala_key_weights", "rope_tables"]


@dataclass(frozen=True)
class RalaConfig(AttentionConfig):
    """RALA.

    Attributes:
        lepe_kernel: kernel size of the LePE depthwise convolution on V (odd).
        rope: rotate the numerator's q and k with 2-D RoPE (needs a head dim divisible by 4).
        rope_theta: RoPE base (``θ_m = rope_theta^(−m/(M−1))``, ``M = d/4``).
        eps: added to the denominator.
        cpe: add a zero-initialised depthwise 3×3 residual on the patch tokens of the attention input.
    """

    method = "rala"
    lepe_kernel: int = 5
    rope: bool = True
    rope_theta: float = 10000.0
    eps: float = 1e-6
    cpe: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.lepe_kernel, int) or self.lepe_kernel < 1 or self.lepe_kernel % 2 == 0:
            raise ValueError(f"lepe_kernel must be a positive odd integer, got {self.lepe_kernel!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if not self.eps >= 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rala_key_weights(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``α_j = softmax_j(scale · q̄ · φ(k_j))`` with ``q̄ = mean_i φ(q_i)``, ``φ = ELU + 1``.

    Args:
        q, k: ``[B, H, N, D]``.
    Returns:
        ``[B, H, N]`` in fp32 (float64 for float64 inputs); each row sums to 1.
    """
    acc = _acc_dtype(q.dtype)
    B, H, N, D = k.shape
    q_mean = F.elu(q.to(acc)).mean(dim=-2) + 1.0  # [B, H, D]
    # φ(k)·q̄ = ELU(k)·q̄ + Σ q̄: ELU(k) in the token layout [B, N, H·D] (no copy for keys from a packed qkv)
    # times the block-diagonal [B, H·D, H] holding q̄, one batched product with no other [B, N, H, D] temporary
    ek = F.elu(k.transpose(1, 2).to(acc)).reshape(B, N, H * D)
    blocks = (q_mean[..., None] * torch.eye(H, device=k.device, dtype=acc)[:, None, :]).reshape(B, H * D, H)
    logits = (ek @ blocks).transpose(1, 2) + q_mean.sum(dim=-1, keepdim=True)  # [B, H, N]
    return (scale * logits).softmax(dim=-1)


def rope_tables(
    grid: tuple[int, int],
    num_prefix_tokens: int,
    head_dim: int,
    theta: float = 10000.0,
    *,
    origin: tuple[float, float] = (0.0, 0.0),
    device=None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D RoPE tables ``(cos, sin)``, each ``[P0 + H·W, head_dim/2]``, for channel pairs ``(2p, 2p+1)``.

    With ``M = head_dim/4`` and ``θ_m = theta^(−m/(M−1))`` (``θ = 1`` when ``M = 1``), pair ``p < M`` turns by
    ``r·θ_p`` (row ``r``) and pair ``p ≥ M`` by ``c·θ_{p−M}`` (column ``c``) of the patch at ``P0 + r·W + c``.
    Prefix tokens get angle 0 (identity rotation). ``origin`` shifts the row and column indices.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
    H, W = grid
    M = head_dim // 4
    exps = torch.linspace(0.0, 1.0, M, device=device, dtype=dtype)
    freqs = torch.pow(float(theta), -exps)  # [M]; a Python base: no host-to-device copy
    rows = torch.arange(H, device=device, dtype=dtype).repeat_interleave(W) + origin[0]
    cols = torch.arange(W, device=device, dtype=dtype).repeat(H) + origin[1]
    angles = torch.cat((rows[:, None] * freqs, cols[:, None] * freqs), dim=-1)  # [H·W, d/2]
    angles = torch.cat((angles.new_zeros(num_prefix_tokens, 2 * M), angles), dim=0)
    return angles.cos(), angles.sin()


class RalaAttention(TokenMixer):
    """RALA: α-reweighted ELU+1 linear attention with a 2-D rotary numerator, LePE on V and an output gate.

    New parameters (``C² + 27·C`` for a 5×5 LePE and ``C_in = C``): ``out_gate`` = ``Linear(C_in, C)`` and ``lepe`` =
    depthwise ``Conv2d(C, C, 5)`` with bias; with ``cpe=True`` also ``cpe`` = depthwise ``Conv2d(C_in, C_in, 3)``.
    """

    method = "rala"
    op = "linear_attention"
    inference_ops = ("patch_dwconv",)
    reads_input = True

    def __init__(self, config: RalaConfig, host: HostInfo):
        super().__init__(config, host)
        if config.rope and host.head_dim % 4:
            raise ValueError(
                f"rala: 2-D RoPE needs a head dim divisible by 4, but this host has head_dim={host.head_dim}; "
                "patch with rope=False to use RALA without RoPE"
            )
        C, C_in, kl = host.attn_dim, host.dim, config.lepe_kernel
        self.out_gate = nn.Linear(C_in, C)
        self.lepe = nn.Conv2d(C, C, kl, padding=kl // 2, groups=C, bias=True)
        self.cpe = nn.Conv2d(C_in, C_in, 3, padding=1, groups=C_in, bias=True) if config.cpe else None
        convs = [m for m in (self.lepe, self.cpe) if m is not None]
        if config.init == "pretrained":
            nn.init.zeros_(self.out_gate.weight)
            nn.init.ones_(self.out_gate.bias)
            for m in convs:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
        else:
            for m in (self.out_gate, *convs):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def op_options(self) -> dict:
        return {"feature": "elu1", "normalizer": "divisive", "key_weights": True, "rope": bool(self.config.rope)}

    def pre_qkv(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """With ``cpe=True``: ``x[:, P0:] += DWC_3(x[:, P0:])`` over the grid; ``x [B, N, C_in]``."""
        if self.cpe is None:
            return x
        P0, w = layout.num_prefix_tokens, self.cpe.weight
        x1 = x.unsqueeze(1)  # [B, 1, N, C_in]: one "head" holding every channel
        local = depthwise_conv_patch_rows(x1.to(w.dtype), w, self.cpe.bias, layout.grid, P0).to(x.dtype)
        # x is the host's input (the gate reads it unchanged): a new tensor, the zero-prefix term added once
        return add_to_patch_rows(x1, local, P0, inplace=False).squeeze(1)

    def forward(self, q, k, v, x, layout: TokenLayout):
        """``q, k, v [B, h, N, d]``, ``x [B, N, C_in]`` -> ``[B, h, N, d]`` (before the gate)."""
        B, h, N, d = q.shape
        P0, (H, W) = layout.num_prefix_tokens, layout.grid
        alpha = rala_key_weights(q, k, self.scale)
        rope = None
        if self.config.rope:
            acc, theta = _acc_dtype(q.dtype), self.config.rope_theta
            rope = grid_constant(("rala_rope", H, W, P0, d, theta, q.device, acc),
                                 lambda: rope_tables((H, W), P0, d, theta, device=q.device, dtype=acc))
        o = self.kernel(q)(
            q, k, v, feature="elu1", normalizer="divisive", key_weights=alpha, rope=rope, eps=self.config.eps
        )
        return add_local_conv(self, o, v, self.lepe.weight, self.lepe.bias, (H, W), P0, inplace=True)

    def post_norm(self, o: torch.Tensor, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """The output gate ``o ⊙ (x W_oᵀ + b_o)``: ``o [B, N, C]``, ``x [B, N, C_in]``."""
        return o * self.out_gate(x.to(self.out_gate.weight.dtype)).to(o.dtype)

    def extra_repr(self) -> str:
        c = self.config
        return f"{super().extra_repr()}, lepe_kernel={c.lepe_kernel}, rope={c.rope}, cpe={c.cpe}"


METHOD = MethodSpec(
    name="rala",
    site="attention",
    config_cls=RalaConfig,
    module_cls=RalaAttention,
    summary="ELU+1 linear attention with softmax key weights, 2-D RoPE numerator, LePE and output gate (RALA)",
    regime="fine-tuning",
    paper="RALA / RAVLT, CVPR 2025 (arXiv 2411.07635)",
)
