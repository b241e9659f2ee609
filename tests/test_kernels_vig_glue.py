"""vig's glue ops, the Triton kernels (TRITON_INTERPRET=1 on CPU, fp32) and the references, against float64 oracles
written from the formulas.

``kernels/vig_output``: ``y[host(s)] = l̂_s + sigmoid(g_s)·(ô_s − l̂_s)`` (then SiLU), ``ô = o / sqrt(mean_d o² + eps)
· w_o`` and ``l̂`` likewise from the layer input, per head; ``host`` maps scan order ``[patches < m, prefix, patches ≥
m]`` to ``[prefix, patches]`` (the oracle builds its own permutation). ``kernels/vig_gates``: ``log σ(z W2ᵀ + b2) /
n``, checked relative to each value (saturated logits included).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from visionfx.kernels.vig_output.reference import vig_output_reference  # noqa: E402
from visionfx.kernels.vig_output.triton import vig_output_triton  # noqa: E402


def oracle(o, xs, logits, w_o, w_l, eps, num_prefix, scan_index, silu):
    B, h, N, d = o.shape
    o, xs, logits, w_o, w_l = (t.double() for t in (o, xs, logits, w_o, w_l))
    o = o.transpose(1, 2)  # [B, N, h, d]
    x = xs.reshape(B, N, h, d)
    o_hat = o / (o.square().mean(-1, keepdim=True) + eps).sqrt() * w_o
    l_hat = x / (x.square().mean(-1, keepdim=True) + eps).sqrt() * w_l
    g = torch.sigmoid(logits.reshape(B, N, h, d))
    y = l_hat + g * (o_hat - l_hat)
    if silu:
        y = y * torch.sigmoid(y)
    host = []
    for s in range(N):  # host position of each scan position
        if s < scan_index:
            host.append(num_prefix + s)
        elif s < scan_index + num_prefix:
            host.append(s - scan_index)
        else:
            host.append(s)
    out = torch.empty_like(y)
    out[:, host] = y
    return out


def make(B, h, N, d, token_layout, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    if token_layout:  # the GLA op's output: a [B, h, N, d] view of [B, N, h, d] memory
        o = torch.randn(B, N, h, d, generator=g).transpose(1, 2)
    else:
        o = torch.randn(B, h, N, d, generator=g)
    xs = torch.randn(B, N, h * d, generator=g)
    logits = 2 * torch.randn(B, N, h * d, generator=g)
    w_o, w_l = 1 + 0.1 * torch.randn(d, generator=g), 1 + 0.1 * torch.randn(d, generator=g)
    return [t.to(device, dtype) for t in (o, xs, logits, w_o, w_l)]


CASES = [  # (B, h, N, d, num_prefix, scan_index, silu, token_layout)
    (2, 2, 21, 16, 1, 10, False, True),
    (1, 3, 70, 24, 2, 34, True, False),  # d not a power of two, rows over one block
    (2, 2, 13, 8, 0, 0, True, True),
    (1, 2, 9, 16, 1, 0, False, True),  # prefix scanned first
    (1, 2, 9, 16, 1, 8, False, True),  # prefix scanned last
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[2]}_d{c[3]}_P{c[4]}_m{c[5]}_silu{int(c[6])}")
def test_kernel_and_reference_match_oracle(case):
    B, h, N, d, P0, m, silu, token_layout = case
    args = make(B, h, N, d, token_layout)
    kw = dict(eps=1e-6, num_prefix=P0, scan_index=m, silu=silu)
    want = oracle(*args, **kw)
    for fn in (vig_output_triton, vig_output_reference):
        y = fn(*args, **kw)
        assert y.shape == (B, N, h, d) and y.is_contiguous() and y.dtype == torch.float32
        torch.testing.assert_close(y.double(), want, rtol=2e-5, atol=2e-5)


def test_mixer_uses_the_op_without_autograd_only(monkeypatch):
    """The vig mixer routes its output stage through the op (forced Triton here) without autograd and through the
    PyTorch composition with it; both agree."""
    import visionfx.kernels.vig_output.triton as kv
    from test_kernels_bidir_gla import Launches
    from test_vig import build_layer
    from visionfx.methods.vig import VigConfig

    layer = build_layer(VigConfig(backend="triton"), 16, 2, (3, 4), 1, seed=2).float()
    layer.vfx_mixer.kernel = lambda t: (lambda q, k, v, gf, gb, scale: q * scale)  # keep the GLA op out of it
    x = torch.randn(2, 13, 16, generator=torch.Generator().manual_seed(3))
    launches = Launches(kv._vig_output)
    monkeypatch.setattr(kv, "_vig_output", launches)
    with torch.no_grad():
        y_ng = layer(x)
    y = layer(x.requires_grad_())
    assert len(launches.args) == 1
    torch.testing.assert_close(y.detach(), y_ng, rtol=1e-5, atol=1e-5)


def test_compiled_mixer_takes_both_ops_in_one_graph(monkeypatch):
    """Compiled without autograd (fullgraph), the vig mixer's gates and output stage are the custom ops
    ``visionfx::vig_gates`` and ``visionfx::vig_output``: each kernel launched once at run time, the output of the
    same layer on the reference backend (the PyTorch compositions)."""
    import visionfx.kernels.vig_gates.triton as kg
    import visionfx.kernels.vig_output.triton as kv
    from test_kernels_bidir_gla import Launches
    from test_vig import build_layer
    from visionfx.methods.vig import VigConfig

    def stand_in(t):  # no GLA op here: a function of all its inputs
        return lambda q, k, v, gf, gb, scale: q * scale + gf + gb

    layers = [build_layer(VigConfig(backend=b), 16, 2, (3, 4), 1, seed=2).float() for b in ("reference", "triton")]
    for m in layers:
        m.vfx_mixer.kernel = stand_in
    ref, layer = layers
    x = torch.randn(2, 13, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(x)
    launches = {name: Launches(getattr(mod, name)) for mod, name in ((kv, "_vig_output"), (kg, "_vig_gates"))}
    monkeypatch.setattr(kv, "_vig_output", launches["_vig_output"])
    monkeypatch.setattr(kg, "_vig_gates", launches["_vig_gates"])
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    assert [len(v.args) for v in launches.values()] == [1, 1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gpu(dtype):
    """ViT-S shapes (h = 6, d = 64, one prefix token in the middle of 4096 patches), against the float64 oracle."""
    B, h, N, d = 2, 6, 4097, 64
    args = make(B, h, N, d, True, dtype=dtype, device="cuda")
    kw = dict(eps=1e-6, num_prefix=1, scan_index=2048, silu=False)
    y = vig_output_triton(*args, **kw)
    want = oracle(*args, **kw)
    err = ((y.double() - want).norm() / want.norm()).item()
    ref_err = ((vig_output_reference(*args, **kw).double() - want).norm() / want.norm()).item()
    assert err <= max(2 * ref_err, 4e-3), (err, ref_err)


# --- vig's log-decays (kernels/vig_gates) ---------------------------------------------------------------------------

from visionfx.kernels.vig_gates.reference import vig_gates_reference  # noqa: E402
from visionfx.kernels.vig_gates.triton import vig_gates_triton  # noqa: E402


def gates_oracle(z, weight, bias, n):
    """float64: ``log σ(g) / n`` with ``log σ(g) = −log(1 + e^−g)``, written per sign so nothing overflows."""
    g = z.double() @ weight.double().T + bias.double()
    return torch.where(g >= 0, -torch.log1p(torch.exp(-g)), g - torch.log1p(torch.exp(g))) / n


@pytest.mark.parametrize("shape, r, nc", [((2, 37), 16, 48), ((130,), 5, 200)])
def test_gates_kernel_and_reference_match_oracle(shape, r, nc):
    g = torch.Generator().manual_seed(4)
    z = torch.randn(*shape, r, generator=g)
    weight, bias = 3 * torch.randn(nc, r, generator=g), torch.randn(nc, generator=g)
    bias[:4] = torch.tensor([60.0, -60.0, 0.0, 30.0])  # saturated both ways: |log σ| tiny or ≈ −g
    want = gates_oracle(z, weight, bias, 16.0)
    for fn in (vig_gates_triton, vig_gates_reference):
        a = fn(z, weight, bias, 16.0)
        assert a.shape == (*shape, nc) and a.dtype == torch.float32
        # relative to each value: the tiny ones (large positive g) must keep their digits too
        torch.testing.assert_close(a.double(), want, rtol=1e-5, atol=1e-30)


@pytest.mark.gpu
def test_gates_gpu_bf16_input():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(16 * 4097, 16, generator=g).to("cuda", torch.bfloat16)
    weight = (0.3 * torch.randn(768, 16, generator=g)).to("cuda", torch.bfloat16)
    bias = torch.randn(768, generator=g).to("cuda", torch.bfloat16)
    want = gates_oracle(z, weight, bias, 16.0)
    torch.testing.assert_close(vig_gates_triton(z, weight, bias, 16.0).double(), want, rtol=1e-5, atol=1e-30)
