"""vig: the bidir_gla op and the ViG mixer against float64 oracles written from METHODS.md §7 (oracle: §7.9).

Oracles: a token-by-token loop of both scans, the materialised weight form with explicit decay products, and a naive
float64 version of the whole layer (§7.1: DWC by explicit loops, gates, scans by loops, RMSNorms, mix).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Attention

from visionfx.config import load_config
from visionfx.kernels.bidir_gla import bidir_gla_reference as op
from visionfx.methods.base import HostInfo, TokenLayout
from visionfx.methods.vig import VigAttention, VigConfig, from_scan_order, to_scan_order
from visionfx.patches.timm_vit import TimmPatchedAttention

ROOT = Path(__file__).resolve().parents[1]
f64 = torch.float64


# --- oracles ---------------------------------------------------------------------------------------------------------
def scan_loop(q, k, v, gf, gb, scale):
    """Both scans token by token in float64: S_t = diag(α_t) S_{t∓1} + k_tᵀ v_t, o_t = scale · q_t S_t."""
    q, k, v, af, ab = q.to(f64), k.to(f64), v.to(f64), gf.to(f64).exp(), gb.to(f64).exp()
    B, H, N, dk = q.shape
    out = torch.zeros(B, H, N, v.shape[-1], dtype=f64)
    for alpha, order in ((af, range(N)), (ab, range(N - 1, -1, -1))):
        S = torch.zeros(B, H, dk, v.shape[-1], dtype=f64)
        for t in order:
            S = alpha[:, :, t, :, None] * S + k[:, :, t, :, None] * v[:, :, t, None, :]
            out[:, :, t] += 0.5 * scale * (q[:, :, t, :, None] * S).sum(-2)
    return out


def weight_form(q, k, v, gf, gb, scale):
    """Materialised weights: W_ij = Σ_c q_ic k_jc (Π_{t=j+1..i} α_f,tc [j≤i] + Π_{t=i..j−1} α_b,tc [j≥i])."""
    q, k, v, af, ab = q.to(f64), k.to(f64), v.to(f64), gf.to(f64).exp(), gb.to(f64).exp()
    B, H, N, dk = q.shape
    D = torch.zeros(B, H, N, N, dk, dtype=f64)
    for i in range(N):
        for j in range(N):
            if j <= i:
                D[:, :, i, j] += af[:, :, j + 1 : i + 1].prod(2)
            if j >= i:
                D[:, :, i, j] += ab[:, :, i:j].prod(2)
    W = torch.einsum("bhic,bhjc,bhijc->bhij", q, k, D)
    return 0.5 * scale * W @ v


def inputs(N, dk=6, dv=5, B=2, H=3, dtype=torch.float32, seed=0, gate_scale=3.0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, N, dk, generator=g, dtype=f64) for _ in range(2))
    v = torch.randn(B, H, N, dv, generator=g, dtype=f64)
    gf, gb = (F.logsigmoid(gate_scale * torch.randn(B, H, N, dk, generator=g, dtype=f64)) / 4 for _ in range(2))
    return [t.to(dtype) for t in (q, k, v, gf, gb)]


def close(a, b, dtype):
    tol = 1e-11 if dtype == f64 else 2e-5
    torch.testing.assert_close(a.to(f64), b.to(f64), rtol=tol, atol=tol)


# --- the op ------------------------------------------------------------------------------------------------------------
def test_oracles_agree():
    args = inputs(13, dtype=f64, seed=1)
    torch.testing.assert_close(scan_loop(*args, 0.7), weight_form(*args, 0.7), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, f64])
@pytest.mark.parametrize("N", [1, 5, 50, 197])
def test_op_matches_loop(N, dtype):
    args = inputs(N, dtype=dtype, seed=N)
    ref = scan_loop(*args, 0.4)
    for chunk in (1, 7, 16, 64):
        o = op(*args, scale=0.4, chunk_size=chunk)
        assert o.dtype == dtype and o.shape == ref.shape
        close(o, ref, dtype)


@pytest.mark.parametrize("chunk", [1, 4, 8, 64])
def test_op_matches_weight_form(chunk):
    args = inputs(21, dk=4, dv=7, dtype=f64, seed=3)
    close(op(*args, scale=1.3, chunk_size=chunk), weight_form(*args, 1.3), f64)


@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_chunk_size_independence(dtype):
    args = inputs(197, dtype=dtype, seed=5)
    outs = [op(*args, scale=0.5, chunk_size=c) for c in (1, 3, 16, 64, 100, 256)]
    for o in outs[1:]:
        close(o, outs[0], dtype)


@pytest.mark.parametrize("logdecay", ["g=-100", "mixed", "-100", "-100 random"])
def test_extreme_gates_do_not_overflow(logdecay):
    q, k, v, gf, gb = inputs(70, seed=7)
    g = torch.Generator().manual_seed(0)
    a = F.logsigmoid(torch.tensor(-100.0)).item() / 16  # §7.5: g = -100 gives -6.25 per token, -100 over 16 tokens
    tol = 2e-5
    if logdecay == "g=-100":
        gf = gb = torch.full_like(gf, a)
    elif logdecay == "mixed":
        gf = torch.where(torch.rand(gf.shape, generator=g) < 0.5, a, 0.0)
        gb = a * torch.rand(gb.shape, generator=g)
    elif logdecay == "-100":
        gf = gb = torch.full_like(gf, -100.0)
    else:
        # in-chunk sums reach -3000: fp32 exponent differences then carry ~|A|·2^-24 absolute error
        gf, gb = (-100.0 * torch.rand(gf.shape, generator=g) for _ in range(2))
        tol = 1e-3
    leaves = [t.clone().requires_grad_() for t in (q, k, v, gf, gb)]
    ref = scan_loop(q, k, v, gf, gb, 0.4)
    for chunk in (16, 64):
        o = op(*leaves, scale=0.4, chunk_size=chunk)
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o.to(f64), ref, rtol=tol, atol=tol)
        grads = torch.autograd.grad(o.sum(), leaves)
        assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_all_gates_one(dtype):
    q, k, v, gf, gb = inputs(40, dk=5, dv=5, dtype=dtype, seed=11)
    zero = torch.zeros_like(gf)
    s = 0.3
    qd, kd, vd = q.to(f64), k.to(f64), v.to(f64)
    expect = (s / 2) * (qd @ (kd.transpose(-1, -2) @ vd) + (qd * kd).sum(-1, keepdim=True) * vd)
    close(op(q, k, v, zero, zero, scale=s, chunk_size=16), expect, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_gates_to_zero(dtype):
    q, k, v, gf, gb = inputs(40, dtype=dtype, seed=12)
    tiny = torch.full_like(gf, -1e4)
    s = 0.3
    expect = s * (q.to(f64) * k.to(f64)).sum(-1, keepdim=True) * v.to(f64)
    close(op(q, k, v, tiny, tiny, scale=s, chunk_size=16), expect, dtype)


def test_direction_symmetry():
    q, k, v, gf, gb = inputs(37, dtype=f64, seed=13)
    o = op(q, k, v, gf, gb, scale=0.6, chunk_size=8)
    rev = lambda t: t.flip(2)  # noqa: E731
    o_rev = op(rev(q), rev(k), rev(v), rev(gb), rev(gf), scale=0.6, chunk_size=8)
    close(o_rev, rev(o), f64)
    # the swap matters: with distinct gates, reversing without swapping gives another output
    assert not torch.allclose(op(rev(q), rev(k), rev(v), rev(gf), rev(gb), scale=0.6, chunk_size=8), rev(o))


@pytest.mark.parametrize("chunk", [4, 64])
def test_gradients_match_loop(chunk):
    leaves = [t.requires_grad_() for t in inputs(23, dk=4, dv=3, dtype=f64, seed=17)]
    cot = torch.randn(2, 3, 23, 3, dtype=f64, generator=torch.Generator().manual_seed(0))
    g_op = torch.autograd.grad((op(*leaves, scale=0.8, chunk_size=chunk) * cot).sum(), leaves)
    g_ref = torch.autograd.grad((scan_loop(*leaves, 0.8) * cot).sum(), leaves)
    for a, b in zip(g_op, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_low_precision_returns_input_dtype():
    args = inputs(50, dtype=torch.bfloat16, seed=19)
    o = op(*args, scale=0.4)
    assert o.dtype == torch.bfloat16
    ref = scan_loop(*args, 0.4)
    assert (o.to(f64) - ref).norm() / ref.norm() < 1e-2


def test_op_rejects_bad_inputs():
    q, k, v, gf, gb = inputs(5)
    with pytest.raises(ValueError, match="chunk_size"):
        op(q, k, v, gf, gb, scale=1.0, chunk_size=0)
    with pytest.raises(ValueError, match="gf"):
        op(q, k, v, gf[..., :2], gb, scale=1.0)
    with pytest.raises(ValueError, match="v must be"):
        op(q, k, v[:, :, :3], gf, gb, scale=1.0)


# --- prefix move -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("P0,P", [(0, 49), (1, 196), (2, 49), (3, 192), (1, 1), (4, 0)])
def test_prefix_move_is_an_exact_round_trip(P0, P):
    N, m = P0 + P, P // 2
    t = torch.randn(2, 3, N, 4)
    moved = to_scan_order(t, P0, m)
    expected_order = list(range(P0, P0 + m)) + list(range(P0)) + list(range(P0 + m, N))
    assert torch.equal(moved, t[:, :, expected_order])
    assert torch.equal(from_scan_order(moved, P0, m), t)


# --- the mixer ---------------------------------------------------------------------------------------------------------
def naive_layer(x, p, cfg, h, P0, H, W, host_norm=None, host_gate=None):
    """§7.1 in float64 with explicit loops, on a host with qkv and proj (bias), optional norm and gate."""
    B, N, C = x.shape
    d, kk = C // h, cfg.dwc_kernel
    xs = x.clone()
    for row in range(H):
        for col in range(W):
            acc = torch.zeros(B, C, dtype=f64)
            for u in range(kk):
                for w in range(kk):
                    r, c = row + u - kk // 2, col + w - kk // 2
                    if 0 <= r < H and 0 <= c < W:
                        acc = acc + p["dwc"][:, 0, u, w] * x[:, P0 + r * W + c]
            xs[:, P0 + row * W + col] = F.silu(acc) if cfg.act_in_conv else acc
    qkv = xs @ p["qkv_w"].T + p["qkv_b"]
    q, k, v = qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :]
    a = F.logsigmoid((xs @ p["w1"].T) @ p["w2"].T + p["b2"]) / cfg.gate_normalizer
    alpha_f, alpha_b = a[..., :C].exp(), a[..., C:].exp()
    P = H * W
    m = {"middle": P // 2, "front": 0, "end": P}[cfg.prefix_position]
    order = list(range(P0, P0 + m)) + list(range(P0)) + list(range(P0 + m, N))
    o = torch.zeros(B, N, C, dtype=f64)
    for head in range(h):
        sl = slice(head * d, (head + 1) * d)
        for alpha, seq in ((alpha_f, order), (alpha_b, order[::-1])):
            S = torch.zeros(B, d, d, dtype=f64)
            for t in seq:
                S = alpha[:, t, sl, None] * S + k[:, t, sl, None] * v[:, t, None, sl]
                o[:, t, sl] += 0.5 * d**-0.5 * (q[:, t, sl, None] * S).sum(1)

    def rms(t, weight):
        t = t.reshape(B, N, h, d)
        return (t / (t.pow(2).mean(-1, keepdim=True) + cfg.rms_eps).sqrt() * weight).reshape(B, N, C)

    G = torch.sigmoid(xs @ p["wg"].T + p["bg"])
    y = rms(o, p["norm_o"]) * G + rms(xs, p["norm_l"]) * (1 - G)
    if cfg.out_act:
        y = F.silu(y)
    if host_norm is not None:
        y = F.layer_norm(y, (C,), *host_norm, eps=1e-5)
    if host_gate is not None:
        y = y * torch.sigmoid(x @ host_gate[0].T + host_gate[1])
    return y @ p["proj_w"].T + p["proj_b"]


def host_info(C, h, grid, P0):
    return HostInfo(dim=C, attn_dim=C, num_heads=h, head_dim=C // h, scale=(C // h) ** -0.5, grid=grid,
                    num_prefix_tokens=P0)


def build_layer(cfg, C, h, grid, P0, seed=0, **host_kw):
    torch.manual_seed(seed)
    host = Attention(C, num_heads=h, qkv_bias=True, **host_kw).to(f64)
    mixer = VigAttention(cfg, host_info(C, h, grid, P0)).to(f64)
    layout = TokenLayout(grid, P0)
    layer = TimmPatchedAttention(host, mixer, layout)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, prm in layer.named_parameters():
            prm.add_((0.5 if "vfx_" in name else 0.2) * torch.randn(prm.shape, generator=g, dtype=f64))
    return layer


CASES = [
    dict(grid=(14, 14), P0=1),
    dict(grid=(14, 14), P0=2),
    dict(grid=(16, 12), P0=1, cfg=dict(act_in_conv=True, out_act=True, prefix_position="end")),
    dict(grid=(16, 12), P0=3, cfg=dict(prefix_position="front", dwc_kernel=5, gate_rank=4, gate_normalizer=4.0),
         host=dict(scale_norm=True, gated=True, norm_layer=torch.nn.LayerNorm)),
    dict(grid=(7, 7), P0=0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['grid'][0]}x{c['grid'][1]}_P0={c['P0']}")
def test_mixer_matches_naive_layer(case):
    cfg = VigConfig(**case.get("cfg", {}))
    C, h, (H, W), P0 = 16, 2, case["grid"], case["P0"]
    layer = build_layer(cfg, C, h, (H, W), P0, **case.get("host", {}))
    mx = layer.vfx_mixer
    p = dict(dwc=mx.dwc.weight, w1=mx.gate_down.weight, w2=mx.gate_up.weight, b2=mx.gate_up.bias,
             wg=mx.mix.weight, bg=mx.mix.bias, norm_o=mx.norm_o, norm_l=mx.norm_l, qkv_w=layer.qkv.weight,
             qkv_b=layer.qkv.bias, proj_w=layer.proj.weight, proj_b=layer.proj.bias)
    host_norm = (layer.norm.weight, layer.norm.bias) if isinstance(layer.norm, torch.nn.LayerNorm) else None
    host_gate = (layer.gate.weight, layer.gate.bias) if layer._modules.get("gate") is not None else None
    x = torch.randn(2, P0 + H * W, C, dtype=f64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = layer(x)
        ref = naive_layer(x, {n: t.detach() for n, t in p.items()}, cfg, h, P0, H, W, host_norm, host_gate)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


def test_pretrained_init_starts_as_long_memory_global_mixing():
    cfg = VigConfig()
    mixer = VigAttention(cfg, host_info(32, 4, (5, 6), 1))
    layout = TokenLayout((5, 6), 1)
    x = torch.randn(2, 31, 32)
    xs = mixer.pre_qkv(x, layout)
    # the identity DWC leaves every token unchanged; pre_qkv returns them in scan order (CLS before patch 15)
    torch.testing.assert_close(xs, x[:, [*range(1, 16), 0, *range(16, 31)]], rtol=0, atol=0)
    gf, gb = mixer.log_decays(x)
    alpha = torch.sigmoid(torch.tensor(4.0)) ** (1 / 16)
    torch.testing.assert_close(gf.exp(), alpha.expand_as(gf))
    torch.testing.assert_close(gb.exp(), alpha.expand_as(gb))
    torch.testing.assert_close(torch.sigmoid(mixer.mix(x)), torch.sigmoid(torch.tensor(4.0)).expand(2, 31, 32))
    assert torch.equal(mixer.norm_o, torch.ones(8)) and torch.equal(mixer.norm_l, torch.ones(8))


def test_official_init():
    mixer = VigAttention(VigConfig(init="official"), host_info(64, 4, (6, 6), 0))
    x = torch.randn(4, 36, 64)
    gf, gb = mixer.log_decays(x)
    for a in (gf, gb):  # α ≈ 0.5^(1/16) ≈ 0.958
        assert abs(a.exp().mean().item() - 0.5 ** (1 / 16)) < 5e-3
    assert abs(torch.sigmoid(mixer.mix(x)).mean().item() - 0.5) < 0.02
    assert mixer.dwc.weight.abs().sum() > 0 and not torch.equal(mixer.pre_qkv(x, TokenLayout((6, 6), 0)), x)


@pytest.mark.parametrize("C,h,expected", [(192, 3, 48_512), (384, 6, 170_624), (768, 12, 636_032)])
def test_parameter_count(C, h, expected):
    mixer = VigAttention(VigConfig(), host_info(C, h, (14, 14), 1))
    assert sum(p.numel() for p in mixer.parameters()) == expected


def test_yaml_loads():
    cfg = load_config(ROOT / "configs" / "vig.yaml")
    assert cfg == VigConfig()
    assert load_config(ROOT / "configs" / "vig.yaml", out_act=True).out_act is True


def test_masks_raise():
    layer = build_layer(VigConfig(), 16, 2, (3, 3), 1)
    x = torch.randn(1, 10, 16, dtype=f64)
    with pytest.raises(ValueError, match="mask"):
        layer(x, attn_mask=torch.zeros(10, 10, dtype=f64))
    with pytest.raises(ValueError, match="is_causal"):
        layer(x, is_causal=True)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(expand_k=0.5), "expand_k"),
        (dict(gate_rank=0), "gate_rank"),
        (dict(gate_normalizer=0.0), "gate_normalizer"),
        (dict(dwc_kernel=4), "dwc_kernel"),
        (dict(prefix_position="left"), "prefix_position"),
        (dict(rms_eps=-1.0), "rms_eps"),
    ],
)
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        VigConfig(**kw)


def test_attn_dim_must_equal_input_width():
    info = HostInfo(dim=64, attn_dim=32, num_heads=2, head_dim=16, scale=0.25, grid=(4, 4), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="attn_dim"):
        VigAttention(VigConfig(), info)
