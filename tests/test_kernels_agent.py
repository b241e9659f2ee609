"""Triton agent-attention kernel vs a float64 materialised computation and the PyTorch reference.

On CPU the kernel runs under TRITON_INTERPRET=1 (set by conftest.py) in fp32 on small odd shapes; GPU tests (bf16,
fp16, the PERFORMANCE.md shapes) are marked and skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from visionfx.kernels.agent_attention.triton import agent_attention_triton  # noqa: E402


def naive(q, k, v, a, b1, b2, s1, s2):
    """float64: explicit n×N and N×n softmax matrices."""
    q, k, v, a = (t.double() for t in (q, k, v, a))
    z1 = s1 * a @ k.transpose(-1, -2) + (b1.double() if b1 is not None else 0)
    z2 = s2 * q @ a.transpose(-1, -2) + (b2.double() if b2 is not None else 0)
    return torch.softmax(z2, -1) @ (torch.softmax(z1, -1) @ v)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make(B, H, N, D, n, bias, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    a = torch.randn(B, H, n, D, generator=g)
    b1 = torch.randn(H, n, N, generator=g) if bias else None
    b2 = torch.randn(H, N, n, generator=g) if bias else None
    conv = lambda t: None if t is None else t.to(device=device, dtype=dtype if t.dim() == 4 else torch.float32)
    return [conv(t) for t in (q, k, v, a, b1, b2)]


SHAPES = [(1, 2, 5, 16, 3), (2, 1, 33, 32, 9), (1, 2, 70, 24, 49), (1, 1, 300, 16, 20)]


@pytest.mark.parametrize("B,H,N,D,n", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_forward_backward_interpreted(B, H, N, D, n, bias):
    q, k, v, a, b1, b2 = make(B, H, N, D, n, bias)
    s1, s2 = D**-0.5, 0.7 * D**-0.5
    leaves = [t.requires_grad_() for t in (q, k, v, a, b1, b2) if t is not None]
    out = agent_attention_triton(q, k, v, a, b1, b2, scale1=s1, scale2=s2)
    ref = naive(q, k, v, a, b1, b2, s1, s2)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert rel(out, ref) < 1e-5
    do = torch.randn_like(out)
    g_out = torch.autograd.grad(out, leaves, do)
    g_ref = torch.autograd.grad(ref, leaves, do.double())
    for got, want in zip(g_out, g_ref):
        assert rel(got, want) < 1e-5


def padded_views(b1, b2):
    """Both biases as token-contiguous views of ``[H, n, N']`` buffers with rows padded to a multiple of 16 tokens
    (B1's layout in the agent mixer; B2 there is agent-contiguous, and a token-contiguous B2 exercises the other
    side of the kernels' strided loads). The padding holds NaN, which the kernels must never let through."""
    H, n, N = b1.shape
    bufs = torch.full((2, H, n, N + (-N % 16)), float("nan"), dtype=b1.dtype, device=b1.device)
    bufs[0, :, :, :N] = b1
    bufs[1, :, :, :N] = b2.transpose(1, 2)
    return bufs[0, :, :, :N], bufs[1, :, :, :N].transpose(1, 2)


@pytest.mark.parametrize("B,H,N,D,n", [(1, 2, 5, 16, 3), (2, 1, 70, 24, 49)])
def test_padded_bias_views_interpreted(B, H, N, D, n):
    """Biases as views of padded buffers (the layout whose loads run to a 16-aligned bound) give the same values
    and gradients as contiguous tables, and do take the padded bound."""
    from visionfx.kernels.agent_attention.triton import _bias_args

    q, k, v, a, b1, b2 = make(B, H, N, D, n, True)
    p1, p2 = padded_views(b1, b2)
    padded = N + (-N % 16)
    assert _bias_args(p1, 2, q)[2] == padded and _bias_args(p2, 1, q)[2] == padded
    assert _bias_args(b1, 2, q)[2] == N and _bias_args(b2, 1, q)[2] == N
    s1, s2 = D**-0.5, 0.7 * D**-0.5
    p1, p2 = p1.requires_grad_(), p2.requires_grad_()  # views of buffers that need no gradient: leaves here
    shared = [t.requires_grad_() for t in (q, k, v, a)]
    out = agent_attention_triton(q, k, v, a, p1, p2, scale1=s1, scale2=s2)
    b1, b2 = b1.requires_grad_(), b2.requires_grad_()
    ref = naive(q, k, v, a, b1, b2, s1, s2)
    assert rel(out, ref) < 1e-5
    do = torch.randn_like(out)
    g_out = torch.autograd.grad(out, shared + [p1, p2], do)
    g_ref = torch.autograd.grad(ref, shared + [b1, b2], do.double())
    for got, want in zip(g_out, g_ref):
        assert torch.isfinite(got).all() and rel(got, want) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("N", [197, 577, 1025, 4097])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "padded"])
def test_low_precision_gpu(N, dtype, layout):
    B = max(1, 12608 // N)
    q, k, v, a, b1, b2 = make(B, 6, N, 64, 49, True, dtype=dtype, device="cuda")
    s1 = s2 = 64**-0.5
    leaves = [t.requires_grad_() for t in (q, k, v, a, b1, b2)]
    kb1, kb2 = (b1, b2) if layout == "contiguous" else padded_views(b1, b2)  # views: gradients reach b1, b2
    out = agent_attention_triton(q, k, v, a, kb1, kb2, scale1=s1, scale2=s2)
    exact = naive(q, k, v, a, b1, b2, s1, s2)
    # the same math in the low precision with PyTorch ops: the error budget of this dtype
    lowp = torch.softmax(s2 * q @ a.transpose(-1, -2) + b2.to(dtype), -1) @ (
        torch.softmax(s1 * a @ k.transpose(-1, -2) + b1.to(dtype), -1) @ v)
    budget = rel(lowp, exact)
    assert rel(out, exact) <= 2 * budget + 1e-3
    do = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, leaves, do), torch.autograd.grad(exact, leaves, do.double())):
        assert torch.isfinite(got).all()
        assert rel(got, want) < 2e-2


def test_compile_fullgraph_and_backward():
    """The kernel is a custom op: a compiled caller has no graph break and matches eager and the float64 oracle,
    gradients included (the compiled path runs the custom op, eager the autograd Function)."""
    q, k, v, a, b1, b2 = make(1, 2, 33, 16, 9, True)
    leaves = [t.requires_grad_() for t in (q, k, v, a, b1, b2)]

    def f(q, k, v, a, b1, b2):
        return agent_attention_triton(q, k, v, a, b1, b2, scale1=0.25, scale2=0.25) * 2.0

    eager = f(*leaves)
    compiled = torch.compile(f, fullgraph=True)(*leaves)
    torch.testing.assert_close(compiled, eager)
    ref = naive(*leaves, 0.25, 0.25) * 2.0
    assert rel(compiled, ref) < 1e-5
    do = torch.randn_like(eager)
    g_ref = torch.autograd.grad(ref, leaves, do.double())
    g_eager = torch.autograd.grad(eager, leaves, do)
    for got, want, exact in zip(torch.autograd.grad(compiled, leaves, do), g_eager, g_ref):
        torch.testing.assert_close(got, want)
        assert rel(got, exact) < 1e-5


def test_output_accepts_in_place_updates_without_grad_and_keeps_token_layout():
    """The op's output is the [B, h, N, d] view of [B, N, h, d] memory; without autograd the mixers add in place."""
    q, k, v, a, b1, b2 = make(1, 2, 11, 16, 4, True)
    with torch.no_grad():
        out = agent_attention_triton(q, k, v, a, b1, b2, scale1=0.25, scale2=0.25)
        assert out.transpose(1, 2).is_contiguous()
        out[:, :, 1:].add_(1.0)
    ref = naive(q, k, v, a, b1, b2, 0.25, 0.25)
    ref[:, :, 1:] += 1.0
    assert rel(out, ref) < 1e-5


def test_backward_after_a_view_of_the_output_is_updated_out_of_place():
    """Gradients flow through the token-layout view (the op keeps its output for the backward)."""
    q, k, v, a, b1, b2 = make(1, 2, 11, 16, 4, False)
    leaves = [t.requires_grad_() for t in (q, k, v, a)]
    out = agent_attention_triton(q, k, v, a, scale1=0.25, scale2=0.25)
    merged = out.transpose(1, 2).reshape(1, 11, 32)
    do = torch.randn_like(merged)
    got = torch.autograd.grad(merged, leaves, do)
    ref = naive(q, k, v, a, None, None, 0.25, 0.25).transpose(1, 2).reshape(1, 11, 32)
    want = torch.autograd.grad(ref, leaves, do.double())
    for g, w in zip(got, want):
        assert rel(g, w) < 1e-5
