"""vig: memory layout and copy-freedom of the mixer's glue, and both output paths against the float64 oracle.

The layer oracle is test_vig.naive_layer (METHODS.md §7.1 in float64 with explicit loops). Here it also checks the
autograd path (a reordering concatenation) and the gradients; the other tests pin the layout contract of the module
docstring: gates as two views of one buffer (what the bidir_gla kernel reads without copying), output in [B, N, h, d]
memory, and no copy of a full-size tensor in ``forward`` outside the op.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from test_vig import build_layer, host_info, naive_layer
from visionfx.methods.base import TokenLayout
from visionfx.methods.vig import VigAttention, VigConfig, scan_index, to_scan_order

f64 = torch.float64

COPIES = {"cat", "stack", "flip", "clone", "copy_", "_to_copy", "index", "index_select", "gather", "roll", "contiguous"}

LAYOUTS = [
    dict(grid=(4, 5), P0=1, cfg={}),
    dict(grid=(4, 5), P0=3, cfg=dict(prefix_position="end", out_act=True)),
    dict(grid=(3, 4), P0=2, cfg=dict(prefix_position="front", act_in_conv=True)),
    dict(grid=(3, 3), P0=0, cfg={}),
]


def _ids(case):
    return f"{case['grid'][0]}x{case['grid'][1]}_P0={case['P0']}_{case['cfg'].get('prefix_position', 'middle')}"


def _params(layer):
    mx = layer.vfx_mixer
    return dict(dwc=mx.dwc.weight, w1=mx.gate_down.weight, w2=mx.gate_up.weight, b2=mx.gate_up.bias,
                wg=mx.mix.weight, bg=mx.mix.bias, norm_o=mx.norm_o, norm_l=mx.norm_l, qkv_w=layer.qkv.weight,
                qkv_b=layer.qkv.bias, proj_w=layer.proj.weight, proj_b=layer.proj.bias)


@pytest.mark.parametrize("case", LAYOUTS, ids=_ids)
def test_autograd_path_matches_oracle_and_no_grad_path(case):
    cfg = VigConfig(**case["cfg"])
    (H, W), P0 = case["grid"], case["P0"]
    layer = build_layer(cfg, 16, 2, (H, W), P0, seed=4)
    x = torch.randn(2, P0 + H * W, 16, dtype=f64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    y = layer(x)  # autograd on: the scan-order result is reordered by a concatenation
    with torch.no_grad():
        y_ng = layer(x)  # no autograd: the lerp writes straight into host positions
    assert torch.equal(y.detach(), y_ng)

    p = _params(layer)
    ref = naive_layer(x, p, cfg, 2, P0, H, W)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    cot = torch.randn(y.shape, dtype=f64, generator=torch.Generator().manual_seed(6))
    leaves = [x, *p.values()]
    grads = torch.autograd.grad((y * cot).sum(), leaves)
    grads_ref = torch.autograd.grad((ref * cot).sum(), leaves)
    for name, g, g_ref in zip(["x", *p], grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"d{name}: {m}")


def test_pre_qkv_returns_scan_order_and_log_decays_share_one_buffer():
    cfg = VigConfig(init="official")
    mixer = VigAttention(cfg, host_info(16, 2, (4, 5), 2))
    x = torch.randn(3, 22, 16)
    xs = mixer.pre_qkv(x, TokenLayout((4, 5), 2))
    assert xs.is_contiguous()
    m = scan_index(20, "middle")
    # prefix tokens pass the DWC unchanged and sit at scan index m
    assert torch.equal(xs[:, m : m + 2], x[:, :2])
    assert not torch.equal(xs[:, :m], x[:, 2 : 2 + m])  # the official init's DWC changes the patch tokens
    gf, gb = mixer.log_decays(xs)
    assert gf.shape == gb.shape == (3, 2, 22, 8) and gf.dtype == gb.dtype == torch.float32
    assert gf.untyped_storage().data_ptr() == gb.untyped_storage().data_ptr() and gf.stride() == gb.stride()
    ref = torch.nn.functional.logsigmoid(mixer.gate_up(mixer.gate_down(xs)).double()) / cfg.gate_normalizer
    ref = ref.reshape(3, 22, 2, 2, 8).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(gf.double(), ref[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gb.double(), ref[1], rtol=1e-6, atol=1e-7)


def _logsigmoid(t: torch.Tensor) -> torch.Tensor:
    """The textbook stable form, in float64: min(t, 0) − log(1 + e^−|t|)."""
    t = t.to(f64)
    return torch.minimum(t, torch.zeros_like(t)) - torch.log1p(torch.exp(-t.abs()))


@pytest.mark.parametrize("dtype,tol", [(f64, 1e-14), (torch.float32, 2e-6)])
def test_log_decays_stay_finite_and_exact_for_extreme_logits(dtype, tol):
    n = 4.0
    mixer = VigAttention(VigConfig(gate_normalizer=n), host_info(8, 2, (2, 2), 0)).to(dtype)
    g = torch.tensor([-1e4, -700.0, -45.0, -40.0, -39.0, -3.0, 0.0, 3.0], dtype=f64)
    with torch.no_grad():  # W2 = 0 under the pretrained init, so the logits are b2: forward g, backward -g
        mixer.gate_up.bias.copy_(torch.cat((g, -g)))
    gf, gb = mixer.log_decays(torch.zeros(1, 1, 8, dtype=dtype))
    assert gf.dtype == (f64 if dtype == f64 else torch.float32)
    assert torch.isfinite(gf).all() and torch.isfinite(gb).all()
    torch.testing.assert_close(gf.flatten().to(f64), _logsigmoid(g) / n, rtol=tol, atol=1e-300)
    torch.testing.assert_close(gb.flatten().to(f64), _logsigmoid(-g) / n, rtol=tol, atol=1e-30)


class _CountCopies(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in COPIES:
            self.copies.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", LAYOUTS, ids=_ids)
def test_forward_copies_nothing_and_returns_token_major_memory(case):
    cfg = VigConfig(**case["cfg"])
    (H, W), P0 = case["grid"], case["P0"]
    mixer = VigAttention(cfg, host_info(16, 2, (H, W), P0))
    layout = TokenLayout((H, W), P0)
    B, N = 2, P0 + H * W
    xs = mixer.pre_qkv(torch.randn(B, N, 16), layout)
    qkv = torch.randn(B, N, 3, 2, 8).permute(2, 0, 3, 1, 4)  # views of one buffer, as the host's qkv gives them
    seen = {}
    o = (qkv[0] * 8**-0.5).contiguous()  # stands for the kernel's output: [B, h, N, d], contiguous

    def op(q, k, v, gf, gb, scale):
        seen["gates"] = (gf.untyped_storage().data_ptr() == gb.untyped_storage().data_ptr()
                         and gf.stride() == gb.stride())
        return o

    mixer.kernel = lambda t: op
    counter = _CountCopies()
    with torch.no_grad(), counter:
        y = mixer(*qkv.unbind(0), xs, layout)
    assert seen["gates"]
    assert counter.copies == []
    assert y.shape == (B, 2, N, 8) and y.transpose(1, 2).is_contiguous()

    # the same output as the scan-order computation followed by a reorder to host order
    with torch.no_grad():
        o_hat = torch.nn.functional.rms_norm(o, (8,), mixer.norm_o, cfg.rms_eps).transpose(1, 2)
        l_hat = torch.nn.functional.rms_norm(xs.unflatten(-1, (2, 8)), (8,), mixer.norm_l, cfg.rms_eps)
        gate = torch.sigmoid(mixer.mix(xs)).unflatten(-1, (2, 8))
        ref = o_hat * gate + l_hat * (1 - gate)
        if cfg.out_act:
            ref = torch.nn.functional.silu(ref)
        m = scan_index(H * W, cfg.prefix_position)
        host = to_scan_order(torch.arange(N), P0, m, dim=0)  # host token at each scan position
        ref = ref[:, torch.argsort(host)]
    torch.testing.assert_close(y.transpose(1, 2), ref, rtol=1e-6, atol=1e-6)
