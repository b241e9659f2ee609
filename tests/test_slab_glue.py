"""The PyTorch parts around the ops (visionfx.methods.patch_rows, used by slab, inline, rala and agent) against float64
loops, and the patched layers on the Triton path (interpreted on CPU) against the reference path.

Layout contract checked here: the ops return ``[B, h, N, d]`` views of token-layout memory, the mixers keep it (so
the heads merge without a copy) and add their local terms without concatenating full-size tensors.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import visionfx
from families import FAMILIES
from visionfx.methods.agent import bias_basis, pooling_matrix
from visionfx.methods.patch_rows import add_to_patch_rows, depthwise_conv_patch_rows, grid_constant
from dwc_oracle import naive_dwc, packed_qkv

F64 = torch.float64


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("grid,P0,ks", [((4, 5), 1, 3), ((3, 3), 0, 5), ((5, 2), 2, 3)])
def test_depthwise_conv_patch_rows_matches_loops(grid, P0, ks, per_sample):
    B, h, d = 2, 2, 3
    H, W = grid
    _, _, v = packed_qkv(B, P0 + H * W, h, d)
    g = torch.Generator().manual_seed(1)
    if per_sample:
        weight, bias = torch.randn(B, h * d, ks, ks, generator=g, dtype=F64), None
        got = depthwise_conv_patch_rows(v, weight, None, grid, P0)
        want = naive_dwc(v, weight, None, P0, H, W)
    else:
        weight, bias = torch.randn(h * d, 1, ks, ks, generator=g, dtype=F64), torch.randn(h * d, generator=g, dtype=F64)
        got = depthwise_conv_patch_rows(v, weight, bias, grid, P0)
        want = naive_dwc(v, weight[:, 0], bias, P0, H, W)
    assert got.shape == (B, h, H * W, d)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # token layout: channels of one position are adjacent, so adding it to a token-layout output reads it coalesced
    assert got.stride(-1) == 1 and got.stride(1) == d


@pytest.mark.parametrize("inplace", [False, True])
def test_add_to_patch_rows(inplace):
    B, h, N, d, P0 = 2, 3, 7, 4, 2
    o = torch.randn(B, N, h, d, dtype=F64).transpose(1, 2)
    local = torch.randn(B, N - P0, h, d, dtype=F64).transpose(1, 2)
    want = o.clone()
    want[:, :, P0:] += local
    got = add_to_patch_rows(o.clone() if inplace else o, local, P0, inplace=inplace)
    assert torch.equal(got, want)
    assert got.transpose(1, 2).is_contiguous()  # the token layout survives
    # autograd: the out-of-place form gives every row of o and the patch rows of local their gradient
    o2, l2 = o.clone().requires_grad_(), local.clone().requires_grad_()
    add_to_patch_rows(o2, l2, P0, inplace=False).sum().backward()
    assert torch.equal(o2.grad, torch.ones_like(o)) and torch.equal(l2.grad, torch.ones_like(local))


def test_pooling_matrix_matches_adaptive_pooling_bins():
    for (H, W), (ph, pw) in [((14, 14), (9, 9)), ((7, 5), (2, 3)), ((16, 12), (7, 7)), ((3, 3), (3, 3))]:
        P = pooling_matrix((H, W), (ph, pw), "cpu", F64)
        x = torch.randn(H * W, dtype=F64)
        want = []
        for i in range(ph):
            r0, r1 = math.floor(i * H / ph), math.ceil((i + 1) * H / ph)
            for j in range(pw):
                c0, c1 = math.floor(j * W / pw), math.ceil((j + 1) * W / pw)
                want.append(x.view(H, W)[r0:r1, c0:c1].mean())
        torch.testing.assert_close(P @ x, torch.stack(want), rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(P @ x, F.adaptive_avg_pool2d(x.view(1, H, W), (ph, pw)).flatten())


def test_bias_basis_rows():
    """Each parameter's row of the basis: a bilinear/linear resize of a one-hot, or a one-hot prefix column."""
    grid, grid0, b, P0 = (5, 7), (4, 6), 3, 2
    T = bias_basis(grid, grid0, b, P0, "cpu", F64)
    H, W = grid
    assert T.shape == (b * b + 4 + 6 + P0, P0 + H * W)
    up = lambda t, size: F.interpolate(t[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]  # noqa: E731
    lin = lambda t, n: F.interpolate(t[None, None], size=n, mode="linear", align_corners=False)[0, 0]  # noqa: E731
    for i in range(b * b):
        torch.testing.assert_close(T[i, P0:], up(torch.eye(b * b, dtype=F64)[i].view(b, b), grid).flatten())
    for i in range(4):
        torch.testing.assert_close(T[b * b + i, P0:].view(H, W), lin(torch.eye(4, dtype=F64)[i], H)[:, None].expand(H, W))
    for j in range(6):
        torch.testing.assert_close(T[b * b + 4 + j, P0:].view(H, W), lin(torch.eye(6, dtype=F64)[j], W)[None, :].expand(H, W))
    assert torch.equal(T[-P0:, :P0], torch.eye(P0, dtype=F64)) and not T[-P0:, P0:].any() and not T[:-P0, :P0].any()


def test_grid_constant_caches_per_key_and_outside_inference_mode():
    calls = []

    def build():
        calls.append(1)
        return torch.arange(3.0)

    key = ("test_grid_constant", id(calls))
    with torch.inference_mode():
        a = grid_constant(key, build)
    b = grid_constant(key, build)
    assert a is b and len(calls) == 1
    assert not a.is_inference()  # usable by autograd later


# ------------------------------------------------------------------------------------------ patched layers, Triton path
METHODS = {
    "slab": dict(init="official"),
    "inline": dict(init="official"),
    "rala": dict(init="official", cpe=True),
    "agent": dict(init="official", agent_num=9),
    "agentsd": dict(agent_num=9),
}
COPIES = {"cat", "clone", "copy_", "_to_copy", "constant_pad_nd", "slice_scatter", "stack", "index_put", "repeat"}


class FullSizeCopies(TorchDispatchMode):
    """Records copy-like ops whose output has at least ``numel`` elements."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in COPIES and isinstance(out, torch.Tensor) and out.numel() >= self.numel:
            self.seen.append(name)
        return out


def _patched(method, backend):
    torch.manual_seed(0)
    model = FAMILIES["vit"].build()  # 7×7 grid, CLS, 2 heads of 32
    visionfx.patch(model, method, **METHODS[method])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vfx_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    if backend == "triton":
        for m in model.modules():
            if isinstance(m, visionfx.methods.base.TokenMixer):
                m.config = dataclasses.replace(m.config, backend="triton")
    return model


@pytest.mark.parametrize("method", list(METHODS))
def test_triton_path_matches_reference_path(method):
    pytest.importorskip("triton")
    ref = _patched(method, "reference")
    tri = _patched(method, "triton")
    x = FAMILIES["vit"].inputs(0)[0][:1]
    xr, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, out_t = ref(xr), tri(xt)
    torch.testing.assert_close(out_t, out_r, rtol=1e-4, atol=1e-5)
    out_r.square().sum().backward()
    out_t.square().sum().backward()
    torch.testing.assert_close(xt.grad, xr.grad, rtol=1e-4, atol=1e-5)
    grads_r = {n: p.grad for n, p in ref.named_parameters() if "vfx_" in n}
    for n, p in tri.named_parameters():
        if "vfx_" in n:
            torch.testing.assert_close(p.grad, grads_r[n], rtol=1e-4, atol=1e-5, msg=n)


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("method", list(METHODS))
def test_triton_path_keeps_token_layout_and_copies_nothing(method, monkeypatch):
    """One patched layer on the Triton path, inference: the mixer's output is token-layout memory (heads merge as a
    view) and no full-size tensor is concatenated or copied (the local term is one fused op, ``kernels/patch_dwconv``,
    reading V where it is). The kernels are not launched (the interpreter copies their arguments); the host code runs
    as is."""
    pytest.importorskip("triton")
    from visionfx.kernels.agent_attention import triton as agent_triton
    from visionfx.kernels.linear_attention import triton as la_triton
    from visionfx.kernels.patch_dwconv import triton as dwc_triton

    monkeypatch.setattr(la_triton, "_launch", lambda *args, **kwargs: None)
    for name in ("_agg_fwd", "_agg_combine", "_bcast_fwd"):
        monkeypatch.setattr(agent_triton, name, _NoLaunch())
    monkeypatch.setattr(dwc_triton, "_dwconv_add", _NoLaunch())
    model = _patched(method, "triton")
    attn = model.blocks[0].attn
    outputs = []
    attn.vfx_mixer.register_forward_hook(lambda mod, args, out: outputs.append(out))
    x = torch.randn(2, 50, 64)
    counter = FullSizeCopies(numel=2 * 49 * 64)
    with torch.no_grad(), counter:
        attn(x)
    assert outputs[0].transpose(1, 2).is_contiguous()
    allowed = {"rala": 2}.get(method, 0)  # rala: its CPE's channels-last input and zero-prefix term
    assert "cat" not in counter.seen and len(counter.seen) <= allowed, counter.seen
