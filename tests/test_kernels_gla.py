"""Triton bidirectional GLA kernel vs a float64 token-by-token loop and the chunked PyTorch reference.

On CPU the kernel runs under TRITON_INTERPRET=1 (set by conftest.py) in fp32 on small odd shapes; GPU tests (bf16,
fp16, the PERFORMANCE.md shapes) are marked and skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from visionfx.kernels.bidir_gla.reference import bidir_gla_reference  # noqa: E402
from visionfx.kernels.bidir_gla.triton import bidir_gla_triton  # noqa: E402


def loop(q, k, v, gf, gb, scale):
    """float64, token by token, both scans (METHODS.md §7.1 step 4)."""
    q, k, v, gf, gb = (t.double() for t in (q, k, v, gf, gb))
    B, H, N, dk = q.shape
    of = torch.zeros(B, H, N, v.shape[-1], dtype=torch.float64)
    ob = torch.zeros_like(of)
    S = torch.zeros(B, H, dk, v.shape[-1], dtype=torch.float64)
    for t in range(N):
        S = gf[:, :, t].exp().unsqueeze(-1) * S + k[:, :, t].unsqueeze(-1) * v[:, :, t].unsqueeze(-2)
        of[:, :, t] = scale * (q[:, :, t].unsqueeze(-2) @ S).squeeze(-2)
    S = torch.zeros_like(S)
    for t in reversed(range(N)):
        S = gb[:, :, t].exp().unsqueeze(-1) * S + k[:, :, t].unsqueeze(-1) * v[:, :, t].unsqueeze(-2)
        ob[:, :, t] = scale * (q[:, :, t].unsqueeze(-2) @ S).squeeze(-2)
    return (of + ob) / 2


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def close(a, b, tol=1e-5):
    """Relative L2 error below ``tol``, or, where the reference is (near) zero, as for the gate gradients of a single
    token, absolute agreement to fp32 rounding of O(1) terms (dA = q⊙dq − k⊙dk cancels there)."""
    return rel(a, b) < tol or (a.double() - b.double()).abs().max().item() < 1e-6


def make(B, H, N, dk, dv, strength=1.0, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, N, dk, generator=g) for _ in range(2))
    v = torch.randn(B, H, N, dv, generator=g)
    gf = F.logsigmoid(strength * torch.randn(B, H, N, dk, generator=g) + 2.0) / 4
    gb = F.logsigmoid(strength * torch.randn(B, H, N, dk, generator=g) + 2.0) / 4
    return [t.to(device=device, dtype=dtype if i < 3 else torch.float32) for i, t in enumerate((q, k, v, gf, gb))]


SHAPES = [(1, 1, 1, 16, 16), (1, 2, 5, 16, 16), (2, 1, 33, 32, 16), (1, 1, 70, 24, 40)]


@pytest.mark.parametrize("B,H,N,dk,dv", SHAPES)
def test_forward_backward_interpreted(B, H, N, dk, dv):
    q, k, v, gf, gb = make(B, H, N, dk, dv)
    scale = dk**-0.5
    leaves = [t.requires_grad_() for t in (q, k, v, gf, gb)]
    out = bidir_gla_triton(q, k, v, gf, gb, scale=scale)
    ref = loop(q, k, v, gf, gb, scale)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert rel(out, ref) < 1e-5
    assert rel(out, bidir_gla_reference(q, k, v, gf, gb, scale=scale)) < 1e-5
    do = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, leaves, do), torch.autograd.grad(ref, leaves, do.double())):
        assert close(got, want)


def test_strong_decay_does_not_overflow():
    """Log-decays of -6.25 per token (gate logit -100, normaliser 16) reach -100 within a 16-token chunk."""
    q, k, v, _, _ = make(1, 1, 40, 16, 16)
    gf = torch.full_like(q, -6.25)
    gb = torch.full_like(q, -6.25)
    gf[..., 20:, :3] = -1e-3
    out = bidir_gla_triton(q, k, v, gf, gb, scale=0.25)
    assert torch.isfinite(out).all()
    assert rel(out, loop(q, k, v, gf, gb, 0.25)) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("N", [197, 577, 1025, 4097])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gpu(N, dtype):
    check_low_precision_gpu(*make(max(1, 12608 // N), 6, N, 64, 64, device="cuda", dtype=dtype))


def check_low_precision_gpu(q, k, v, gf, gb, **kw):
    """16-bit inputs on the GPU: the output within twice the error of the reference run in the same dtype (fp32
    states) against float64; every gradient finite and within 2e-2 of the float64 reference's, or within twice the
    same-dtype reference's own gradient error (gate gradients sum over the whole sequence and lose digits by
    cancellation at long N, in the reference as in the kernel)."""
    scale = q.shape[-1] ** -0.5
    leaves = [t.requires_grad_() for t in (q, k, v, gf, gb)]
    out = bidir_gla_triton(q, k, v, gf, gb, scale=scale, **kw)
    exact = bidir_gla_reference(*(t.double() for t in (q, k, v, gf, gb)), scale=scale)
    lowp = bidir_gla_reference(q, k, v, gf, gb, scale=scale)  # fp32 states, inputs and output in dtype
    assert rel(out, exact) <= 2 * rel(lowp, exact) + 1e-3
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, do)
    want = torch.autograd.grad(bidir_gla_reference(*(t.double() for t in leaves), scale=scale), leaves, do.double())
    base = torch.autograd.grad(lowp, leaves, do)
    for got, w, b in zip(grads, want, base):
        assert torch.isfinite(got).all()
        assert rel(got, w) < max(2e-2, 2 * rel(b, w)), (rel(got, w), rel(b, w))


def test_compile_fullgraph_and_backward():
    """The kernel is a custom op: a compiled caller has no graph break and matches eager and the float64 loop,
    gradients included (the compiled path runs the custom op, eager the autograd Function)."""
    q, k, v, gf, gb = make(1, 2, 20, 16, 16)
    leaves = [t.requires_grad_() for t in (q, k, v, gf, gb)]

    def f(q, k, v, gf, gb):
        return bidir_gla_triton(q, k, v, gf, gb, scale=0.25) * 2.0

    eager = f(*leaves)
    compiled = torch.compile(f, fullgraph=True)(*leaves)
    torch.testing.assert_close(compiled, eager)
    ref = loop(*leaves, 0.25) * 2.0
    assert rel(compiled, ref) < 1e-5
    do = torch.randn_like(eager)
    g_ref = torch.autograd.grad(ref, leaves, do.double())
    g_eager = torch.autograd.grad(eager, leaves, do)
    for got, want, exact in zip(torch.autograd.grad(compiled, leaves, do), g_eager, g_ref):
        torch.testing.assert_close(got, want)
        assert close(got, exact)
