"""The mixers' local term (``kernels/patch_dwconv``): the Triton kernel (TRITON_INTERPRET=1 on CPU, fp32) and the
reference against a float64 loop over the taps (``naive_dwc``), with prefix rows, odd grids, per-sample kernels,
head dims that are not powers of two, strided inputs and in-place updates; the mixers' use of it at inference."""

from __future__ import annotations

import pytest
import torch

from dwc_oracle import naive_dwc, packed_qkv

triton = pytest.importorskip("triton")

from visionfx.kernels.patch_dwconv.reference import patch_dwconv_reference  # noqa: E402
from visionfx.kernels.patch_dwconv.triton import patch_dwconv_triton  # noqa: E402


def make(B, h, d, grid, P0, ks, per_sample, with_bias, seed=0, dtype=torch.float32):
    H, W = grid
    N = P0 + H * W
    _, _, v = packed_qkv(B, N, h, d, seed=seed, dtype=dtype)  # a strided view of one projection
    g = torch.Generator().manual_seed(seed + 1)
    o = torch.randn(B, N, h, d, generator=g, dtype=dtype).transpose(1, 2)  # the ops' token layout
    C = h * d
    shape = (B, C, ks, ks) if per_sample else (C, 1, ks, ks)
    weight = torch.randn(shape, generator=g, dtype=dtype)
    bias = torch.randn(C, generator=g, dtype=dtype) if with_bias else None
    return o, v, weight, bias


CASES = [  # (B, h, d, grid, P0, ks, per_sample, bias)
    (2, 2, 16, (4, 5), 1, 3, False, True),
    (1, 3, 12, (3, 3), 0, 5, False, True),  # d not a power of two, kernel wider than the grid
    (2, 2, 8, (5, 2), 2, 3, True, False),  # per-sample kernels (inline), two prefix tokens
    (2, 1, 16, (9, 9), 1, 5, False, False),  # more rows than one program's block
    (1, 2, 8, (2, 3), 4, 1, True, True),  # 1×1 kernel
]


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}h{c[1]}d{c[2]}_{c[3][0]}x{c[3][1]}_P{c[4]}_k{c[5]}"
                         f"{'_ps' if c[6] else ''}{'_b' if c[7] else ''}")
def test_kernel_and_reference_match_loops(case, inplace):
    B, h, d, grid, P0, ks, per_sample, with_bias = case
    o, v, weight, bias = make(B, h, d, grid, P0, ks, per_sample, with_bias)
    want = o.double().clone()
    want[:, :, P0:] += naive_dwc(v, weight if per_sample else weight[:, 0], bias, P0, *grid)
    for fn in (patch_dwconv_triton, patch_dwconv_reference):
        target = o.clone() if inplace else o
        before = target.clone()
        y = fn(target, v, weight, bias, grid=grid, num_prefix_tokens=P0, inplace=inplace)
        assert y.shape == o.shape and y.dtype == o.dtype
        assert y.transpose(1, 2).is_contiguous()  # token layout kept
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5, msg=fn.__name__)
        if inplace:
            assert y.data_ptr() == target.data_ptr()
        else:
            assert torch.equal(o, before)  # the input is left alone
        torch.testing.assert_close(y[:, :, :P0], before[:, :, :P0], rtol=0, atol=0)  # prefix rows untouched


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_head_shared_kernels_match_loops(inplace, with_bias):
    """``[d, 1, k, k]`` weights and a ``[d]`` bias (slab's kernel, shared by the heads) read per head: the same as
    the repeated ``[h·d, 1, k, k]`` kernel."""
    B, h, d, grid, P0, ks = 2, 3, 8, (5, 4), 1, 5
    o, v, _, _ = make(B, h, d, grid, P0, ks, False, False)
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(d, 1, ks, ks, generator=g)
    bias = torch.randn(d, generator=g) if with_bias else None
    want = o.double().clone()
    want[:, :, P0:] += naive_dwc(v, weight.repeat(h, 1, 1, 1)[:, 0], None if bias is None else bias.repeat(h), P0,
                                 *grid)
    for fn in (patch_dwconv_triton, patch_dwconv_reference):
        target = o.clone()
        y = fn(target, v, weight, bias, grid=grid, num_prefix_tokens=P0, inplace=inplace)
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5, msg=fn.__name__)
    with pytest.raises(ValueError, match=r"bias must be \[8\]"):
        patch_dwconv_triton(o, v, weight, torch.zeros(h * d), grid=grid, num_prefix_tokens=P0)


def test_kernel_rounds_once_into_the_output_dtype():
    """fp16 output and v, fp32 weights (a model under autocast): the sum is formed in fp32 and rounded once."""
    o, v, weight, bias = make(2, 2, 16, (4, 4), 1, 3, False, True)
    o16, v16 = o.half(), v.half()
    y = patch_dwconv_triton(o16, v16, weight, bias, grid=(4, 4), num_prefix_tokens=1)
    want = o16.double().clone()
    want[:, :, 1:] += naive_dwc(v16.double(), weight[:, 0], bias, 1, 4, 4)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.double(), want.half().double(), rtol=0, atol=2e-3)


def test_kernel_rejects_bad_input():
    o, v, weight, bias = make(2, 2, 8, (3, 3), 1, 3, False, True)
    with pytest.raises(ValueError, match="grid"):
        patch_dwconv_triton(o, v, weight, bias, grid=(3, 4), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="weight"):
        patch_dwconv_triton(o, v, weight[:, :, :2, :2], bias, grid=(3, 3), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="weight"):
        patch_dwconv_triton(o, v, torch.randn(3, 16, 3, 3), None, grid=(3, 3), num_prefix_tokens=1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_sample", [False, True])
def test_gpu_low_precision_against_fp32_reference(dtype, per_sample):
    """ViT-S/16 at 224² (14×14 grid, CLS, 6 heads of 64), bf16/fp16 on CUDA: within the 16-bit rounding of the
    output, judged against the fp32 reference's own error when it runs in the low precision."""
    o, v, weight, bias = (t.cuda() if t is not None else None
                          for t in make(8, 6, 64, (14, 14), 1, 5 if not per_sample else 3, per_sample, not per_sample))
    want = patch_dwconv_reference(o, v, weight, bias, grid=(14, 14), num_prefix_tokens=1).double()
    low = [t.to(dtype) if t is not None else None for t in (o, v, weight, bias)]
    got = patch_dwconv_triton(*low, grid=(14, 14), num_prefix_tokens=1).double()
    ref_low = patch_dwconv_reference(*low, grid=(14, 14), num_prefix_tokens=1).double()
    err = ((got - want).norm() / want.norm()).item()
    ref_err = ((ref_low - want).norm() / want.norm()).item()
    assert err <= 1.1 * ref_err + 1e-6, (err, ref_err)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["inline", "slab", "rala", "agent", "vig"])
def test_gpu_compiled_inference_equals_eager(method):
    """ViT-S/16 geometry at 224² in bf16 on CUDA, compiled by Inductor without autograd (the inference ops are custom
    ops there: the local term, vig's gates and output stage) against the same model run eagerly: no further apart
    than the unpatched model's compiled and eager outputs (Inductor rounds the fused glue differently), with a small
    margin."""
    import timm

    import visionfx

    def compiled_vs_eager(model, x):
        torch._dynamo.reset()
        with torch.inference_mode():
            eager = model(x).float()
            compiled = torch.compile(model)(x).float()
        return ((compiled - eager).norm() / eager.norm()).item()

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=4).cuda().to(torch.bfloat16).eval()
    x = torch.randn(8, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    base = compiled_vs_eager(model, x)
    visionfx.patch(model, method)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vfx_" in name:  # a non-zero local term
                p.copy_(0.05 * torch.randn(p.shape, generator=g).to(p))
    err = compiled_vs_eager(model, x)
    assert err <= 2 * base + 5e-3, (err, base)


class _Spy:
    """Records the launches of a Triton kernel and runs them."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("method", ["slab", "inline", "rala", "agent"])
def test_mixers_take_the_op_at_inference_only(method, monkeypatch):
    """A patched ViT with the Triton backend forced (interpreted here): without autograd every layer's local term is
    one launch of the fused kernel and the output equals the reference backend's; with autograd the mixers run the
    composition and the kernel is not launched."""
    from test_slab_glue import _patched

    from families import FAMILIES
    from visionfx.kernels.patch_dwconv import triton as dwc_triton

    spy = _Spy(dwc_triton._dwconv_add)
    monkeypatch.setattr(dwc_triton, "_dwconv_add", spy)
    ref, tri = _patched(method, "reference"), _patched(method, "triton")
    x = FAMILIES["vit"].inputs(0)[0][:2]
    with torch.no_grad():
        want, got = ref(x), tri(x)
    assert len(spy.grids) == len(tri.blocks)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    spy.grids.clear()
    tri(x.clone().requires_grad_()).sum().backward()
    assert spy.grids == []


@pytest.mark.parametrize("method", ["slab", "inline"])
def test_compiled_inference_takes_the_op_in_one_graph(method, monkeypatch):
    """Compiled without autograd, the local term is the custom op ``visionfx::patch_dwconv``: one graph (fullgraph),
    one kernel launch per layer at run time, the output of the same model on the reference backend (the PyTorch
    composition); compiled with autograd it is the composition."""
    from test_slab_glue import _patched

    from families import FAMILIES
    from visionfx.kernels.patch_dwconv import triton as dwc_triton

    spy = _Spy(dwc_triton._dwconv_add)
    monkeypatch.setattr(dwc_triton, "_dwconv_add", spy)
    ref, tri = _patched(method, "reference"), _patched(method, "triton")
    x = FAMILIES["vit"].inputs(0)[0][:2]
    torch._dynamo.reset()
    compiled = torch.compile(tri, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        want = ref(x)
        got = compiled(x)
    assert len(spy.grids) == len(tri.blocks)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    spy.grids.clear()
    torch._dynamo.reset()
    compiled(x.clone().requires_grad_()).sum().backward()
    assert spy.grids == []
