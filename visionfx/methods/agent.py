"""Agent attention: n agent tokens (pooled queries) gather from all tokens, then every query reads from the agents.

Paper: Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention", ECCV 2024 (arXiv
2312.08874); training-free AgentSD from the same repository. METHODS.md §2. Per head::

    A  = AdaptiveAvgPool2d(patch queries, (ph, pw))                        [n, d]   prefix queries are not pooled
    O  = softmax(s2·Q Aᵀ + B2) · (softmax(s·A Kᵀ + B1) · V)               [N, d]   (kernels/agent_attention)
    O[P0:] += DWC_k(V[P0:] as a C×H×W map);   O += λ·V

Two registered methods share :class:`AgentAttention`: ``agent`` (position biases and DWC, trained; zero-initialised
on a pretrained host so that the layer starts as plain two-softmax agent attention) and ``agentsd`` (the training-free
preset: no biases, no DWC, ``s2 = s^0.3``, ``λ = 0.075``).

Differences from the official code, and choices the paper leaves open:

* The grid and the prefix count come from the model's :class:`TokenLayout`, never from ``sqrt(N)``; any ``H×W`` grid
  and any number ``P0`` of prefix tokens work. Each prefix token has its own bias column ``ac [h, n, P0]`` and row
  ``ca [h, P0, n]``, is never pooled and gets no DWC term.
* Bias shapes are compact (no leading singleton dimensions): ``an_bias``/``na_bias [h, n, b, b]``,
  ``ah_bias [h, n, H0]``, ``aw_bias [h, n, W0]``, ``ha_bias [h, H0, n]``, ``wa_bias [h, W0, n]``. ``(H0, W0)`` is the
  model's grid at patch time. On another grid the ``b×b`` maps are resized bilinearly and the row/column factors
  linearly (``align_corners=False``), which equals the official downstream recipe of resizing their 2-D sum.
* The biases are rebuilt at every forward from the parameters (cheap: ``h·n·N`` values) and broadcast over the batch,
  never repeated per batch element.
* The agent count must be at most 256. A count that is not a perfect square is laid out on the factor pair closest to
  a square, ``ph ≤ pw`` (``agent_shape`` sets the grid explicitly). The agent grid does not change with the input
  grid; adaptive pooling handles any ``H×W``.
* ``attn_drop`` is the host's dropout probability at patch time, applied to both probability matrices in training.
* Biases are added in fp32 but stored in the host's dtype (the adapter places the module like its host).
* Pooling and bias resampling run as matrix products with constant per-grid matrices built on the device and cached
  (:func:`~visionfx.methods.patch_rows.grid_constant`): the agents are ``P Q_patch`` with ``P [n, H·W]`` holding
  ``1/|bin|`` over each adaptive-pooling bin (PyTorch's bin bounds; in the inputs' dtype, so half-precision inputs
  see ``1/|bin|`` rounded to that dtype), and each bias is one product of its parameters (base map, row and column
  factors, prefix entries, side by side) with the stacked interpolation matrix ``T [K, N]``. Equal to the pooling
  and interpolation above up to rounding.
* The DWC runs channels-last on the token layout (:func:`~visionfx.methods.patch_rows.depthwise_conv_patch_rows`) and is
  added in place to the op's output when autograd does not need it (the Triton op keeps its output for the
  backward), else as a zero-prefix term in one addition; at inference both happen in one pass, the fused
  ``patch_dwconv`` op (:func:`~visionfx.methods.patch_rows.add_local_conv`); the V shortcut is one fused ``o + λ·v``.
* AgentSD's ToMe-cluster agents (``agent_source="merge"`` in METHODS.md §2.4) are not implemented: ``agentsd`` uses
  pooled queries (spatial-bin centroids).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from visionfx.config import AttentionConfig
from visionfx.methods.base import HostInfo, TokenLayout, TokenMixer
from visionfx.methods.patch_rows import add_local_conv, grid_constant
from visionfx.registry import MethodSpec

__all__ = ["AgentConfig", "AgentSDConfig", "AgentAttention", "agent_grid", "resize_linear", "resize_bilinear"]

MAX_AGENTS = 256


def agent_grid(agent_num: int) -> tuple[int, int]:
    """The ``(ph, pw)`` agent grid for ``agent_num`` agents: the factor pair closest to a square, ``ph ≤ pw``."""
    ph = max(a for a in range(1, math.isqrt(agent_num) + 1) if agent_num % a == 0)
    return ph, agent_num // ph


@dataclass(frozen=True)
class AgentConfig(AttentionConfig):
    """Agent attention (METHODS.md §2).

    Attributes:
        agent_num: number n of agents (1..256), pooled from the patch queries on a ``(ph, pw)`` grid: a perfect
            square gives ``sqrt(n)×sqrt(n)``, other counts the factor pair closest to a square (``ph ≤ pw``).
        agent_shape: explicit ``(ph, pw)`` agent grid; overrides ``agent_num`` (which is set to ``ph·pw``).
        dwc_kernel: kernel size of the depthwise convolution on V (odd).
        bias_base: side of the square base maps ``an``/``na`` of the position biases.
        use_bias: learn the agent/token position biases B1, B2.
        use_dwc: add the depthwise convolution of V to the patch tokens' output.
        scale2_exponent: κ; the second stage uses ``s^κ`` (1: the host scale; AgentSD: 0.3, sharper).
        v_shortcut: λ; ``O += λ·V`` (AgentSD: 0.075).
    """

    method = "agent"
    agent_num: int = 49
    agent_shape: tuple[int, int] | None = None
    dwc_kernel: int = 3
    bias_base: int = 7
    use_bias: bool = True
    use_dwc: bool = True
    scale2_exponent: float = 1.0
    v_shortcut: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.agent_shape is not None:
            shape = tuple(self.agent_shape)
            if len(shape) != 2 or not all(_is_int(s) and s >= 1 for s in shape):
                raise ValueError(f"agent_shape must be two positive integers (ph, pw), got {self.agent_shape!r}")
            shape = (int(shape[0]), int(shape[1]))
            object.__setattr__(self, "agent_shape", shape)
            object.__setattr__(self, "agent_num", shape[0] * shape[1])
        if not _is_int(self.agent_num) or not 1 <= self.agent_num <= MAX_AGENTS:
            raise ValueError(f"agent_num must be an integer in 1..{MAX_AGENTS}, got {self.agent_num!r}")
        if not _is_int(self.dwc_kernel) or self.dwc_kernel < 1 or self.dwc_kernel % 2 == 0:
            raise ValueError(f"dwc_kernel must be a positive odd integer, got {self.dwc_kernel!r}")
        if not _is_int(self.bias_base) or self.bias_base < 1:
            raise ValueError(f"bias_base must be a positive integer, got {self.bias_base!r}")
        for name in ("use_bias", "use_dwc"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not _is_real(self.scale2_exponent) or not self.scale2_exponent > 0:
            raise ValueError(f"scale2_exponent must be a finite number > 0, got {self.scale2_exponent!r}")
        if not _is_real(self.v_shortcut):
            raise ValueError(f"v_shortcut must be a finite number, got {self.v_shortcut!r}")

    @property
    def agent_grid(self) -> tuple[int, int]:
        """``(ph, pw)``, the grid the agents are pooled on."""
        return self.agent_shape if self.agent_shape is not None else agent_grid(self.agent_num)


@dataclass(frozen=True)
class AgentSDConfig(AgentConfig):
    """Training-free agent attention (AgentSD's form, METHODS.md §2.4): pooled-query agents, no position biases, no
    DWC, a sharper second softmax (``s^0.3``) and a V shortcut ``0.075·V``. Same fields as :class:`AgentConfig`."""

    method = "agentsd"
    use_bias: bool = False
    use_dwc: bool = False
    scale2_exponent: float = 0.3
    v_shortcut: float = 0.075


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def resize_linear(x: torch.Tensor, size: int) -> torch.Tensor:
    """Linear resampling of the last dimension of ``x [..., L]`` to ``size`` (``align_corners=False``)."""
    if x.shape[-1] == size:
        return x
    lead = x.shape[:-1]
    y = F.interpolate(x.reshape(1, -1, x.shape[-1]), size=size, mode="linear", align_corners=False)
    return y.reshape(*lead, size)


def resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resampling of ``x [a, b, H0, W0]`` to ``[a, b, *size]`` (``align_corners=False``)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _bin_matrix(size: int, parts: int, device) -> torch.Tensor:
    """``[parts, size]`` (float64): ``1/|bin|`` over the adaptive-pooling bins
    ``[floor(i·size/parts), ceil((i+1)·size/parts))``."""
    i = torch.arange(parts, device=device)
    start = (i * size) // parts
    end = ((i + 1) * size + parts - 1) // parts
    x = torch.arange(size, device=device)
    inside = (x[None, :] >= start[:, None]) & (x[None, :] < end[:, None])
    return inside.to(torch.float64) / (end - start).to(torch.float64)[:, None]


def pooling_matrix(grid: tuple[int, int], agent_hw: tuple[int, int], device, dtype) -> torch.Tensor:
    """``[ph·pw, H·W]``: adaptive average pooling of a row-major ``H×W`` grid to ``ph×pw`` as a matrix."""
    (H, W), (ph, pw) = grid, agent_hw
    rows, cols = _bin_matrix(H, ph, device), _bin_matrix(W, pw, device)
    return (rows[:, None, :, None] * cols[None, :, None, :]).reshape(ph * pw, H * W).to(dtype)


def _lerp_matrix(src: int, dst: int, device) -> torch.Tensor:
    """``[dst, src]`` (float64): linear resampling from ``src`` to ``dst`` samples, ``align_corners=False``."""
    pos = ((torch.arange(dst, device=device, dtype=torch.float64) + 0.5) * (src / dst) - 0.5).clamp(min=0.0)
    i0 = pos.floor().long().clamp(max=src - 1)
    i1 = (i0 + 1).clamp(max=src - 1)
    lam = pos - i0.to(torch.float64)
    x = torch.arange(src, device=device)
    return (1.0 - lam)[:, None] * (x[None, :] == i0[:, None]) + lam[:, None] * (x[None, :] == i1[:, None])


def bias_basis(grid: tuple[int, int], grid0: tuple[int, int], base: int, num_prefix_tokens: int, device,
               dtype) -> torch.Tensor:
    """``T [b² + H0 + W0 + P0, P0 + H·W]``: the position bias of the tokens is ``[base map | row factors | column
    factors | prefix entries] @ T`` (bilinear resize of the ``b×b`` map, linear resize of the row and column
    factors, one entry per prefix token)."""
    (H, W), (H0, W0), P0 = grid, grid0, num_prefix_tokens
    ry, rx = _lerp_matrix(base, H, device), _lerp_matrix(base, W, device)
    ly, lx = _lerp_matrix(H0, H, device), _lerp_matrix(W0, W, device)
    f64 = dict(device=device, dtype=torch.float64)
    patch = torch.cat((
        (ry.T[:, None, :, None] * rx.T[None, :, None, :]).reshape(base * base, H * W),
        ly.T[:, :, None].expand(H0, H, W).reshape(H0, H * W),
        lx.T[:, None, :].expand(W0, H, W).reshape(W0, H * W),
        torch.zeros(P0, H * W, **f64),
    ))
    prefix = torch.cat((torch.zeros(base * base + H0 + W0, P0, **f64), torch.eye(P0, **f64)))
    return torch.cat((prefix, patch), dim=1).to(dtype)


class AgentAttention(TokenMixer):
    """Agent attention on the host's q, k, v (see the module docstring); ``agent`` and ``agentsd``."""

    method = "agent"
    op = "agent_attention"
    inference_ops = ("patch_dwconv",)

    def __init__(self, config: AgentConfig, host: HostInfo):
        super().__init__(config, host)
        self.method = type(config).method
        h, n, C, b = host.num_heads, config.agent_num, host.attn_dim, config.bias_base
        H0, W0 = host.grid
        self.agent_hw = config.agent_grid
        self.grid0 = (int(H0), int(W0))
        self.num_prefix_tokens = int(host.num_prefix_tokens)
        self.scale2 = float(host.scale) ** config.scale2_exponent
        self.attn_drop = float(host.attn_drop)
        if config.use_bias:
            self.an_bias = nn.Parameter(torch.zeros(h, n, b, b))
            self.na_bias = nn.Parameter(torch.zeros(h, n, b, b))
            self.ah_bias = nn.Parameter(torch.zeros(h, n, H0))
            self.aw_bias = nn.Parameter(torch.zeros(h, n, W0))
            self.ha_bias = nn.Parameter(torch.zeros(h, H0, n))
            self.wa_bias = nn.Parameter(torch.zeros(h, W0, n))
            if self.num_prefix_tokens > 0:
                self.ac_bias = nn.Parameter(torch.zeros(h, n, self.num_prefix_tokens))
                self.ca_bias = nn.Parameter(torch.zeros(h, self.num_prefix_tokens, n))
        k = config.dwc_kernel
        self.dwc = nn.Conv2d(C, C, k, padding=k // 2, groups=C, bias=True) if config.use_dwc else None
        self._init(config.init)

    def _init(self, init: str) -> None:
        for name, p in self.named_parameters():
            if name.endswith("_bias"):
                if init == "official":
                    nn.init.trunc_normal_(p, std=0.02)
                else:
                    nn.init.zeros_(p)
        if self.dwc is not None and init == "pretrained":
            nn.init.zeros_(self.dwc.weight)
            nn.init.zeros_(self.dwc.bias)

    def op_options(self) -> dict:
        return {"bias": self.config.use_bias, "dropout": self.training and self.attn_drop > 0}

    def position_biases(self, grid: tuple[int, int], dtype: torch.dtype = torch.float32):
        """``(B1 [h, n, N], B2 [h, N, n])`` for a ``grid = (H, W)`` of patch tokens after the prefix tokens, in
        ``dtype``; ``(None, None)`` without biases. Both are views of products with a basis padded to ``N'``, a
        multiple of 16 tokens: B1 is token-contiguous with ``N'``-long rows, which the Triton kernel loads in
        vectors; B2 is agent-contiguous, the layout its broadcast pass reads fastest."""
        if not self.config.use_bias:
            return None, None
        h, n, b = self.an_bias.shape[:3]
        P0, dev = self.num_prefix_tokens, self.an_bias.device
        grid = (int(grid[0]), int(grid[1]))
        N = P0 + grid[0] * grid[1]

        def padded_basis():
            basis = bias_basis(grid, self.grid0, b, P0, dev, dtype)  # [K, N]
            return F.pad(basis, (0, -N % 16))

        basis = grid_constant(("agent_bias", grid, self.grid0, b, P0, dev, dtype), padded_basis)  # [K, N']
        prefix1 = (self.ac_bias,) if P0 else ()
        prefix2 = (self.ca_bias.transpose(1, 2),) if P0 else ()
        p1 = torch.cat((self.an_bias.flatten(2), self.ah_bias, self.aw_bias, *prefix1), dim=2)  # [h, n, K]
        p2 = torch.cat((self.na_bias.flatten(2), self.ha_bias.transpose(1, 2), self.wa_bias.transpose(1, 2),
                        *prefix2), dim=2)
        with torch.autocast(dev.type, enabled=False):  # the biases stay in ``dtype`` (fp32) under autocast
            b1 = (p1.to(dtype) @ basis)[:, :, :N]  # [h, n, N]
            b2 = (basis.T @ p2.to(dtype).transpose(1, 2))[:, :N]  # [h, N, n]
        return b1, b2

    def agents(self, q: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Adaptive average pooling of the patch queries ``q[:, :, P0:]`` on the grid: ``[B, h, N, d]`` ->
        ``[B, h, n, d]``."""
        B, h, _, d = q.shape
        P0, (H, W) = layout.num_prefix_tokens, (int(layout.grid[0]), int(layout.grid[1]))
        pool = grid_constant(("agent_pool", (H, W), self.agent_hw, q.device, q.dtype),
                             lambda: pooling_matrix((H, W), self.agent_hw, q.device, q.dtype))  # [n, H·W]
        qp = q[:, :, P0:].transpose(1, 2).reshape(B, H * W, h * d)  # a view of the token layout
        return (pool @ qp).view(B, -1, h, d).transpose(1, 2)  # [B, h, n, d]

    def forward(self, q, k, v, x, layout: TokenLayout):
        B, h, N, d = q.shape
        P0, (H, W) = layout.num_prefix_tokens, layout.grid
        if self.config.use_bias and P0 != self.num_prefix_tokens:
            raise ValueError(
                f"{self.method}: the layer was patched with {self.num_prefix_tokens} prefix tokens and has a bias "
                f"for each, but the input has {P0}; re-patch the model for this token layout"
            )
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        bias1, bias2 = self.position_biases((H, W), acc)
        o = self.kernel(q)(
            q, k, v, self.agents(q, layout), bias1, bias2,
            scale1=self.scale, scale2=self.scale2, dropout_p=self.attn_drop, training=self.training,
        )
        # the Triton op keeps its output for the backward: add in place only where autograd does not track it
        inplace = not o.requires_grad
        if self.dwc is not None:
            o = add_local_conv(self, o, v, self.dwc.weight, self.dwc.bias, (H, W), P0, inplace)
            inplace = True  # o is now this layer's own sum
        lam = self.config.v_shortcut
        if lam != 0:
            o = o.add_(v.to(o.dtype), alpha=lam) if inplace else torch.add(o, v.to(o.dtype), alpha=lam)
        return o

    def extra_repr(self) -> str:
        c = self.config
        return (f"method={self.method}, heads={self.num_heads}, head_dim={self.head_dim}, agents={self.agent_hw}, "
                f"bias={c.use_bias}, dwc={c.use_dwc}, scale2={self.scale2:.4g}, v_shortcut={c.v_shortcut}")


METHODS = [
    MethodSpec(
        name="agent",
        site="attention",
        config_cls=AgentConfig,
        module_cls=AgentAttention,
        summary="two softmaxes through n pooled-query agents, agent/token position biases, DWC on V",
        regime="fine-tuning",
        paper="Agent Attention, ECCV 2024 (arXiv 2312.08874)",
    ),
    MethodSpec(
        name="agentsd",
        site="attention",
        config_cls=AgentSDConfig,
        module_cls=AgentAttention,
        summary="agent attention without biases or DWC, s^0.3 second stage, 0.075·V shortcut (AgentSD's form)",
        regime="training-free",
        paper="Agent Attention, ECCV 2024 (arXiv 2312.08874), AgentSD",
    ),
]
