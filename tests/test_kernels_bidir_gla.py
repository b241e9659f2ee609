"""Triton bidirectional GLA (``impl="direct"`` and ``"chunked"``, tensor-core intra-chunk terms) against a float64
materialised oracle.

The oracle builds the full ``[N, N, dk]`` decay tensors from float64 global cumulative sums (METHODS.md §7.1 closed
form), independently of the chunked reference and of the kernels' chunk factorisations. On CPU the kernels run
under TRITON_INTERPRET=1 (conftest.py) in fp32, on tiny odd shapes; gate regimes cover near-zero and exactly zero
decays, strong decays (−20 per token, which must take the exact diagonal path), blocks of mixed decays, and a chunk
just inside the factorised diagonal's limit. GPU tests (bf16/fp16, PERFORMANCE.md shapes) are marked and skipped
without CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

import visionfx.kernels.bidir_gla.triton as kt  # noqa: E402
from visionfx.kernels.bidir_gla.reference import bidir_gla_reference  # noqa: E402
from visionfx.kernels.bidir_gla.triton import bidir_gla_triton  # noqa: E402
from test_kernels_gla import check_low_precision_gpu  # noqa: E402  (the same GPU check, other gates and impls)


def naive(q, k, v, gf, gb, scale):
    """float64, materialised: ``o = scale/2 · W v`` with ``W_ij = Σ_c q_ic k_jc (D_f + D_b)_ijc``,
    ``D_f = exp(A_i − A_j)`` for i ≥ j and ``D_b = exp(Z_i − Z_j)`` for i ≤ j (A prefix, Z suffix sums of the gates)."""
    q, k, v, gf, gb = (t.double() for t in (q, k, v, gf, gb))
    N = q.shape[2]
    A = gf.cumsum(2)
    Z = gb.flip(2).cumsum(2).flip(2)
    i = torch.arange(N, device=q.device)
    lower = (i[:, None] >= i[None, :])[..., None]
    upper = (i[:, None] <= i[None, :])[..., None]
    d_f = torch.where(lower, A[:, :, :, None] - A[:, :, None], float("-inf")).exp()
    d_b = torch.where(upper, Z[:, :, :, None] - Z[:, :, None], float("-inf")).exp()
    w = torch.einsum("bhic,bhjc,bhijc->bhij", q, k, d_f + d_b)
    return 0.5 * scale * (w @ v)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def close(a, b, tol=1e-5):
    """Relative L2 error below ``tol``, or absolute agreement to fp32 rounding of O(1) terms where the reference is
    (near) zero (gate gradients cancel: dA = q⊙dq − k⊙dk)."""
    return rel(a, b) < tol or (a.double() - b.double()).abs().max().item() < 1e-6


def gates(regime, B, H, N, d, g):
    """``[B, H, N, d]`` log-decays (≤ 0) of one regime."""
    if regime == "vig-init":  # logsigmoid(4)/16, the init for a pretrained host
        return F.logsigmoid(4.0 + 0.1 * torch.randn(B, H, N, d, generator=g)) / 16
    if regime == "zero":
        return torch.zeros(B, H, N, d)
    if regime == "moderate":
        return -torch.rand(B, H, N, d, generator=g)
    if regime == "strong":  # −20 per token; a few channels barely decay, one not at all
        t = -20.0 + torch.rand(B, H, N, d, generator=g)
        t[..., :3] = -1e-3 * torch.rand(B, H, N, 3, generator=g)
        t[..., 3] = 0.0
        return t
    if regime == "blocks":  # per 16-token block: 2.4 per token, none, −20, mixed (the first chunk takes the exact walk)
        t = -torch.rand(B, H, N, d, generator=g) * 0.5
        t[:, :, 0:16] = -2.4
        t[:, :, 16:32] = -1e-7
        t[:, :, 32:48] = -20.0
        t[:, :, 48:64, : d // 2] = -20.0
        return t
    raise ValueError(regime)


def make(B, H, N, dk, dv, regime="moderate", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, N, dk, generator=g) for _ in range(2))
    v = torch.randn(B, H, N, dv, generator=g)
    return [q, k, v, gates(regime, B, H, N, dk, g), gates(regime, B, H, N, dk, g).flip(2).contiguous()]


def vig_layout(q, k, v):
    """q, k, v as the vig mixer makes them: slices of one ``[B, N, 3, H, d]`` projection (a leaf), permuted."""
    qkv = torch.stack((q, k, v)).permute(1, 3, 0, 2, 4).detach().contiguous().requires_grad_()
    return list(qkv.permute(2, 0, 3, 1, 4).unbind())


def check(q, k, v, gf, gb, scale=0.3, strided=False, **kw):
    """Forward and all five gradients of the kernel against the float64 oracle and the reference (float64); with
    ``strided``, q, k, v in :func:`vig_layout` and dO a transposed view of ``[B, N, H, dv]`` memory."""
    inputs = [t.clone().requires_grad_() for t in (q, k, v, gf, gb)]
    if strided:
        inputs[:3] = vig_layout(*inputs[:3])
    out = bidir_gla_triton(*inputs, scale=scale, **kw)
    ref = naive(*inputs, scale)
    ref64 = [t.detach().double().requires_grad_() for t in inputs]
    spec = bidir_gla_reference(*ref64, scale=scale)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    assert rel(out, ref) < 1e-5
    assert rel(out, spec) < 1e-5
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    if strided:
        do = do.transpose(1, 2).contiguous().transpose(1, 2)
    got = torch.autograd.grad(out, inputs, do)
    want = torch.autograd.grad(ref, inputs, do.double())
    want_spec = torch.autograd.grad(spec, ref64, do.double())
    for name, a, b, c in zip(("dq", "dk", "dv", "dgf", "dgb"), got, want, want_spec):
        assert torch.isfinite(a).all(), name
        assert close(a, b), (name, rel(a, b))
        assert close(a, c), (name, rel(a, c))


def test_naive_oracle_matches_chunked_reference():
    """The oracle itself agrees with the chunked reference in float64 (two independent formulations)."""
    q, k, v, gf, gb = make(1, 1, 37, 8, 8, "moderate")
    torch.testing.assert_close(naive(q, k, v, gf, gb, 0.3),
                               bidir_gla_reference(*(t.double() for t in (q, k, v, gf, gb)), scale=0.3, chunk_size=16))


@pytest.mark.parametrize("regime", ["vig-init", "zero", "moderate", "strong", "blocks"])
@pytest.mark.parametrize("impl", ["direct", "chunked"])
def test_gate_regimes_forward_and_gradients(regime, impl):
    check(*make(1, 1, 70, 24, 40, regime), impl=impl)


@pytest.mark.parametrize("impl", ["direct", "chunked"])
def test_exact_diagonal_everywhere(impl):
    """DIAG_SPAN_MAX < 0 sends every diagonal block to the exact walk; it agrees with the oracle too."""
    mp = pytest.MonkeyPatch()
    mp.setattr(kt, "DIAG_SPAN_MAX", -1.0)
    try:
        check(*make(1, 1, 40, 16, 16, "moderate"), impl=impl)
    finally:
        mp.undo()


def check_limit_changes_only(q, k, v, g, impl, rows):
    """Run with the diagonal limit at 40 and at 38 (gates ``g`` in both directions): the outputs differ, only in the
    first ``rows`` tokens, and both agree with the float64 oracle."""
    outs = []
    mp = pytest.MonkeyPatch()
    try:
        for limit in (40.0, 38.0):
            mp.setattr(kt, "DIAG_SPAN_MAX", limit)
            outs.append(bidir_gla_triton(q, k, v, g, g, scale=0.3, impl=impl))
    finally:
        mp.undo()
    changed = ((outs[0] - outs[1]).abs().amax(-1)[0, 0] > 0).nonzero().flatten()
    assert len(changed) > 0 and changed.max() < rows
    for out in outs:
        assert rel(out, naive(q, k, v, g, g, 0.3)) < 1e-5


@pytest.mark.parametrize("impl", ["direct", "chunked"])
def test_strong_decays_need_the_exact_diagonal(impl):
    """With the guard lifted, the factorised diagonal forms exp(+300) and breaks: the strong-decay regime above
    therefore exercises the exact fallback, not the factorised path."""
    q, k, v, gf, gb = make(1, 1, 20, 16, 16, "strong")
    mp = pytest.MonkeyPatch()
    mp.setattr(kt, "DIAG_SPAN_MAX", 1e9)
    try:
        out = bidir_gla_triton(q, k, v, gf, gb, scale=0.3, impl=impl)
    finally:
        mp.undo()
    assert not (torch.isfinite(out).all() and rel(out, naive(q, k, v, gf, gb, 0.3)) < 1e-3)


@pytest.mark.parametrize("impl", ["direct", "chunked"])
def test_diagonal_limit_is_per_chunk(impl):
    """A whole 64-token chunk is factorised: chunk 0 decays 38.4 nats per channel (0.6 per token), so under the limit
    40 it is factorised (factors up to e^38), under 38 it takes the exact 64-key walk. Only its rows change (in
    rounding), both agree with the oracle, and the later chunks (slow decays) are factorised in both."""
    q, k, v, gf, _ = make(1, 1, 150, 16, 16, "vig-init", seed=6)
    gf[:, :, :64] = -0.6
    check_limit_changes_only(q, k, v, gf, impl, rows=64)


@pytest.mark.parametrize("N, fwd, bwd", [(131, "direct", "direct"), (197, "direct", "chunked")])
def test_auto_picks_direct_for_short_sequences(N, fwd, bwd):
    """impl="auto" (the default) runs "direct" up to DIRECT_MAX_CHUNKS 64-token chunks forwards and up to
    DIRECT_BWD_MAX_CHUNKS backwards, "chunked" beyond; the two agree with each other and with the oracle."""
    assert kt.IMPL == "auto"
    assert kt._direct_fits(64 * kt.DIRECT_MAX_CHUNKS) and not kt._direct_fits(64 * kt.DIRECT_MAX_CHUNKS + 1)
    assert kt._direct_fits(64 * kt.DIRECT_BWD_MAX_CHUNKS, backward=True)
    assert not kt._direct_fits(64 * kt.DIRECT_BWD_MAX_CHUNKS + 1, backward=True)
    q, k, v, gf, gb = make(1, 2, N, 16, 24, "vig-init", seed=7)
    outs, grads = {}, {}
    for impl in ("direct", "chunked", None):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, gf, gb)]
        out = bidir_gla_triton(*leaves, scale=0.3, impl=impl)
        outs[impl] = out
        grads[impl] = torch.autograd.grad(out, leaves, torch.ones_like(out))
    torch.testing.assert_close(outs[None], outs[fwd], rtol=0, atol=0)  # which implementation ran
    for a, b in zip(grads[None], grads[bwd]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert rel(outs["direct"], outs["chunked"]) < 1e-5 and rel(outs["direct"], naive(q, k, v, gf, gb, 0.3)) < 1e-5
    for a, b in zip(grads["direct"], grads["chunked"]):
        assert close(a, b)


@pytest.mark.parametrize("N, rows", [(1, (16, 16)), (20, (32, 32)), (65, (16, 16)), (81, (32, 32)), (97, (64, 16))])
def test_short_last_chunk(N, rows, monkeypatch):
    """The direct kernels take a short last chunk on a smaller tile (the fewest power-of-two rows ≥ 16 that hold it:
    ``rows`` forwards on 64-token chunks and backwards on ``DIRECT_BWD_CH``-token ones), met by the other chunks in
    both directions; forward and gradients agree with the oracle, with the exact diagonal in the short chunk too."""
    launches = [Launches(kt._chunk_fwd), Launches(kt._chunk_bwd)]
    monkeypatch.setattr(kt, "_chunk_fwd", launches[0])
    monkeypatch.setattr(kt, "_chunk_bwd", launches[1])
    q, k, v, gf, gb = make(1, 2, N, 16, 24, "moderate", seed=N)
    gf[..., -1, :3] = -50.0  # one token that alone exceeds DIAG_SPAN_MAX: the last chunk's exact walk
    check(q, k, v, gf, gb, impl="direct")
    assert tuple(lc.meta[0]["TL"] for lc in launches) == rows


def test_several_chunks_and_split_states():
    """Three chunks (states carried over two boundaries each way); the serial state scan splits the 32 state rows
    over 4 programs of 8 rows (the CPU plans for 132 SMs)."""
    assert kt._scan_rows(2, 32, torch.device("cpu")) == 8
    check(*make(1, 1, 131, 32, 32, "vig-init", seed=2), impl="chunked")


def test_gate_views_and_strided_inputs():
    """Gates as two views of one permuted buffer (as the vig mixer makes them) and non-contiguous q, k, v give the
    same result as separate contiguous tensors."""
    g = torch.Generator().manual_seed(3)
    B, H, N, d = 1, 2, 21, 16
    buf = F.logsigmoid(torch.randn(B, N, 2, H, d, generator=g) + 2.0) / 4
    gf, gb = buf.permute(2, 0, 3, 1, 4)
    qkv = torch.randn(B, N, 3, H, d, generator=g).permute(2, 0, 3, 1, 4)
    out = bidir_gla_triton(qkv[0], qkv[1], qkv[2], gf, gb, scale=0.25)
    want = bidir_gla_triton(*(t.contiguous() for t in (qkv[0], qkv[1], qkv[2], gf, gb)), scale=0.25)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert rel(out, naive(qkv[0], qkv[1], qkv[2], gf, gb, 0.25)) < 1e-5
    assert out.transpose(1, 2).is_contiguous()  # token layout: heads merge without a copy


@pytest.mark.parametrize("impl", ["direct", "chunked"])
@pytest.mark.parametrize("N", [65, 100])
def test_gradients_of_strided_inputs(N, impl):
    """q, k, v sliced from one projection and dO a transposed view (the vig mixer's layouts): the gradients agree with
    the float64 oracle and the reference."""
    check(*make(2, 2, N, 16, 16, "vig-init", seed=8), strided=True, impl=impl)


class Launches:
    """A Triton kernel whose launches record their arguments and meta-parameters."""

    def __init__(self, kernel):
        self.kernel, self.args, self.meta = kernel, [], []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.args.append(args)
            self.meta.append(meta)
            return self.kernel[grid](*args, **meta)

        return launch


@pytest.mark.parametrize("impl", ["direct", "chunked"])
def test_backward_reads_strided_inputs_in_place(impl, monkeypatch):
    """The backward kernel reads q, k, v and dO in the vig mixer's layouts where they are, without copies."""
    q, k, v, gf, gb = make(1, 2, 65, 16, 16, "vig-init", seed=9)
    q, k, v = vig_layout(q, k, v)
    do = torch.randn(1, 65, 2, 16).transpose(1, 2)
    launches = Launches(kt._chunk_bwd)
    monkeypatch.setattr(kt, "_chunk_bwd", launches)
    out = bidir_gla_triton(q, k, v, gf, gb, scale=0.3, impl=impl)
    torch.autograd.grad(out, (q, k, v), do)
    (args,) = launches.args
    for got, want in zip(args[:4], (q, k, v, do)):
        assert got.data_ptr() == want.data_ptr() and got.stride() == want.stride()


def test_output_accepts_in_place_updates_under_autograd():
    """The op's output view may be updated in place with gradients on; the input gradients stay the op's."""
    q, k, v, gf, gb = make(1, 2, 19, 16, 16, "moderate", seed=5)
    leaves = [t.requires_grad_() for t in (q, k, v, gf, gb)]
    out = bidir_gla_triton(*leaves, scale=0.3)
    out[:, :, 1:].add_(1.0)
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, do)
    want = torch.autograd.grad(naive(*leaves, 0.3), leaves, do.double())
    for a, b in zip(got, want):
        assert close(a, b)


def test_chunked_matches_legacy_scan():
    """The legacy scan agrees with the float64 oracle, and with the chunked kernels."""
    q, k, v, gf, gb = make(1, 1, 17, 16, 16, "moderate", seed=4)
    check(q, k, v, gf, gb, impl="scan")
    outs, grads = [], []
    for impl in ("chunked", "scan"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, gf, gb)]
        out = bidir_gla_triton(*leaves, scale=0.3, impl=impl)
        outs.append(out)
        grads.append(torch.autograd.grad(out, leaves, torch.ones_like(out)))
    assert rel(outs[0], outs[1]) < 1e-5
    for a, b in zip(*grads):
        assert close(a, b)


def test_unknown_impl_is_refused():
    q, k, v, gf, gb = make(1, 1, 3, 16, 16)
    with pytest.raises(ValueError, match="impl"):
        bidir_gla_triton(q, k, v, gf, gb, scale=1.0, impl="fast")


def _cuda(ts, dtype):
    return [t.to("cuda", dtype if i < 3 else torch.float32) for i, t in enumerate(ts)]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["direct", "chunked", "scan"])
@pytest.mark.parametrize("N", [65, 197, 577, 1025, 4097, 16385])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gpu_all_impls(N, dtype, impl):
    if impl == "direct" and N > 1025:
        pytest.skip("direct is quadratic in the number of chunks: for short sequences")
    check_low_precision_gpu(*_cuda(make(max(1, 12608 // N), 6, N, 64, 64, "vig-init"), dtype), impl=impl)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["direct", "chunked"])
@pytest.mark.parametrize("N", [65, 197])
def test_strided_inputs_gpu(N, impl):
    """The vig mixer's layouts in bf16 on the GPU: q, k, v sliced from one projection, dO in token layout."""
    q, k, v, gf, gb = _cuda(make(max(1, 12608 // N), 6, N, 64, 64, "vig-init"), torch.bfloat16)
    check_low_precision_gpu(*vig_layout(q, k, v), gf, gb, impl=impl)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["direct", "chunked"])
@pytest.mark.parametrize("regime", ["zero", "moderate", "strong", "blocks"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gate_regimes_gpu(regime, dtype, impl):
    """Compiled kernels (both diagonal paths, all dot precisions) against the float64 oracle, head dims 64 and 128."""
    for d in (64, 128):
        q, k, v, gf, gb = _cuda(make(2, 3, 203, d, d, regime, seed=5), dtype)
        leaves = [t.requires_grad_() for t in (q, k, v, gf, gb)]
        out = bidir_gla_triton(*leaves, scale=d**-0.5, impl=impl)
        ref = naive(*leaves, d**-0.5)  # float64 on the GPU
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        assert rel(out, ref) < tol
        do = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, leaves, do), torch.autograd.grad(ref, leaves, do.double())):
            assert torch.isfinite(a).all()
            assert rel(a, b) < (1e-4 if dtype == torch.float32 else 3e-2)
