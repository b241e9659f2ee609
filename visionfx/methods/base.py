"""The canonical interface between model-family adapters and attention-site methods.

An adapter (``visionfx.patches``) replaces a host attention module with a wrapper that keeps the host's own children
(``qkv``, ``proj``, norms, dropouts) and calls one :class:`TokenMixer` in three places::

    x [B, N, C_in] -> mixer.pre_qkv(x) -> host qkv -> q, k, v [B, h, N, d] -> q_norm / k_norm
      -> mixer(q, k, v, x, layout) -> o [B, h, N, d] -> merge [B, N, C] -> host norm
      -> mixer.post_norm(o, x, layout) -> (* host gate) -> host proj -> proj_drop

A mixer knows nothing of the model family: the host's geometry comes as a :class:`HostInfo` at construction and the
token layout (grid and prefix tokens) as a :class:`TokenLayout` at every call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["HostInfo", "TokenLayout", "TokenMixer", "check_no_mask"]


@dataclass(frozen=True)
class HostInfo:
    """Geometry of the host attention a mixer replaces.

    Attributes:
        dim: input width ``C_in`` of the attention module.
        attn_dim: ``C = h·d``, the width of q, k, v and of the merged output.
        num_heads: ``h``.
        head_dim: ``d``.
        scale: the host's softmax scale ``s`` (``d^-0.5`` unless the host overrides it).
        grid: the patch grid ``(H0, W0)`` at patch time; grid-sized parameters are created for it.
        num_prefix_tokens: ``P0`` at patch time.
        attn_drop: the host's attention-dropout probability.
        layer_index, num_layers: position of this site among the patched model's attention sites.
        qkv_bias: whether the host's qkv projection has a bias.
    """

    dim: int
    attn_dim: int
    num_heads: int
    head_dim: int
    scale: float
    grid: tuple[int, int]
    num_prefix_tokens: int
    attn_drop: float = 0.0
    layer_index: int = 0
    num_layers: int = 1
    qkv_bias: bool = True


class TokenLayout:
    """Where the tokens of a sequence sit: ``num_prefix_tokens`` first, then an ``H×W`` grid in row-major order.

    One object is shared by every patched site of a model; for models with dynamic image sizes the adapter refreshes
    ``grid`` before each forward. It is a plain object (not a module), so deep copies and pickles keep it shared.
    """

    def __init__(self, grid: tuple[int, int], num_prefix_tokens: int):
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_prefix_tokens = int(num_prefix_tokens)

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.grid[0] * self.grid[1]

    def check(self, n: int) -> None:
        """Raise if a sequence of ``n`` tokens does not match this layout."""
        if n != self.num_tokens:
            h, w = self.grid
            raise ValueError(
                f"got {n} tokens but the layout is {self.num_prefix_tokens} prefix tokens + a {h}x{w} grid "
                f"= {self.num_tokens}; the model's grid and the tokens disagree (patch dropout, token merging or a "
                "resized input without dynamic_img_size=True?)"
            )

    def __repr__(self) -> str:
        return f"TokenLayout(grid={self.grid}, num_prefix_tokens={self.num_prefix_tokens})"


def check_no_mask(method: str, attn_mask, is_causal) -> None:
    """Linear mixers define no masked attention: a mask or ``is_causal=True`` is an error, never ignored."""
    if attn_mask is not None:
        raise ValueError(
            f"{method}: an attention mask was given, but this token mixer has no masked form. "
            "Call it without attn_mask, or unpatch the model (visionfx.unpatch) to use masks."
        )
    if is_causal:
        raise ValueError(f"{method}: is_causal=True is not supported by this (non-causal) token mixer.")


class TokenMixer(nn.Module):
    """Base class of attention-site methods.

    Subclasses own only the parameters their method adds and implement :meth:`forward`. ``pre_qkv`` and
    ``post_norm`` default to the identity.
    """

    method: str = ""
    #: whether the mixer reads the layer input ``x`` beyond the host's qkv (e.g. an input-conditioned gate); PRepBN
    #: folding keeps the norm's affine map explicit for such layers
    reads_input: bool = False

    def __init__(self, config, host: HostInfo):
        super().__init__()
        self.config = config
        self.host = host
        self.num_heads = host.num_heads
        self.head_dim = host.head_dim
        self.scale = host.scale
        ops = [name for name in (self.op, *self.inference_ops) if name]
        if ops and config.backend != "reference":
            from visionfx.kernels.dispatch import preload

            for name in ops:
                preload(name)  # a model compiled before its first eager call then traces no import

    def pre_qkv(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Transform the layer input ``x [B, N, C_in]`` before the host's qkv projection."""
        return x

    def forward(self, q, k, v, x, layout: TokenLayout) -> torch.Tensor:  # pragma: no cover - abstract
        """Mix tokens: ``q, k, v [B, h, N, d]``, ``x [B, N, C_in]`` (after ``pre_qkv``) -> ``[B, h, N, d]``."""
        raise NotImplementedError

    def post_norm(self, o: torch.Tensor, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Transform the merged output ``o [B, N, C]`` after the host norm, before the host gate and proj."""
        return o

    def calibrate_output(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Set the scale of the mixer's output from the host's softmax attention on one batch (``q, k, v`` as
        :meth:`forward` receives them), before recovery; ``False``: the method has nothing to calibrate (default)."""
        return False

    #: the kernels/ op carrying this mixer's global term, for dispatch and ``explain``
    op: str = ""
    #: the inference-only kernels/ ops the mixer calls through :meth:`inference_op`
    inference_ops: tuple[str, ...] = ()

    def op_options(self) -> dict:
        """Options of :attr:`op` that decide whether its kernel supports this layer (passed to ``supports``)."""
        return {}

    def kernel(self, x: torch.Tensor):
        """The op function for inputs like ``x`` (Triton or reference, see :mod:`visionfx.kernels.dispatch`)."""
        from visionfx.kernels.dispatch import choose

        return choose(self.op, self.config.backend, x.device.type, x.dtype, self.head_dim, **self.op_options())[0]

    def inference_op(self, name: str, like: torch.Tensor, dtype: torch.dtype | None = None, **options):
        """Op ``name``'s function (its Triton kernel on CUDA when it accepts the inputs, else its reference; this
        mixer's ``config.backend`` decides) for inputs on ``like``'s device in ``dtype`` (default ``like``'s), when no
        autograd graph is built; under ``torch.compile`` only a Triton kernel that compiles (``Op.compiles``). ``None``
        otherwise, and the caller runs its PyTorch composition (which Inductor fuses). For the inference-only ops (no
        backward) around the main one."""
        from visionfx.kernels.dispatch import choose, get_op

        if torch.is_grad_enabled():
            return None
        fn, backend, _ = choose(name, self.config.backend, like.device.type, dtype or like.dtype, self.head_dim,
                                **options)
        if torch.compiler.is_compiling() and not (backend == "triton" and get_op(name).compiles):
            return None
        return fn

    def backend_info(self, like: torch.Tensor | None = None) -> tuple[str, str]:
        """``(backend, reason)`` for inputs on the device and in the dtype of ``like`` (default: this mixer's first
        parameter); shown by ``visionfx.explain``, which passes the host's weights (a mixer may add no parameters)."""
        from visionfx.kernels.dispatch import choose

        if not self.op:
            return "reference", "pure PyTorch method"
        p = like if like is not None else next(self.parameters(), None)
        device, dtype = (p.device.type, p.dtype) if p is not None else ("cpu", torch.float32)
        try:
            return choose(self.op, self.config.backend, device, dtype, self.head_dim, **self.op_options())[1:]
        except ValueError as e:
            return "error", str(e)

    def extra_repr(self) -> str:
        return f"method={self.method}, heads={self.num_heads}, head_dim={self.head_dim}"
