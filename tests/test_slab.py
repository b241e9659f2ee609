"""SLAB's simplified linear attention (METHODS.md §5) against an independent float64 oracle and the §5.9 invariants.

The oracle materialises the N×N weight matrix W of §5.1 (with the key position term on patch tokens), computes
``O = W V`` and adds the head-shared depthwise convolution by explicit loops over the 5×5 taps of a zero-padded grid.
The mixer runs with its parameters perturbed away from their zero initialisation.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

import visionfx
from visionfx.config import load_config
from visionfx.methods.base import HostInfo, TokenLayout
from visionfx.methods.prepbn import PRepBNConfig
from visionfx.methods.slab import SlabAttention, SlabConfig, resample_grid_param

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
F64 = torch.float64
GRIDS = [((14, 14), 1), ((14, 14), 2), ((16, 12), 1), ((7, 7), 0)]
EPS = 1e-6


# --------------------------------------------------------------------------------------------------------- oracle
def relu(t):
    return torch.where(t > 0, t, torch.zeros_like(t))


def naive_weights(q, k, pe, P0, eps=EPS):
    """q, k [B, h, N, d], pe [H*W, C] (or None) -> W [B, h, N, N] and den [B, h, N] (§5.1 weight form)."""
    q, k = q.to(F64), k.to(F64).clone()
    B, h, N, d = q.shape
    if pe is not None:
        for g in range(h):
            k[:, g, P0:] = k[:, g, P0:] + pe[:, g * d:(g + 1) * d].to(F64)
    qh, kh = relu(q), relu(k)
    S = qh @ kh.transpose(-1, -2)
    den = (qh * kh.sum(dim=2, keepdim=True)).sum(-1)
    return S / (den + eps).unsqueeze(-1), den


def naive_dwc(v, weight, bias, P0, H, W):
    """The shared DWC on each head's patch values by explicit taps: v [B, h, N, d] -> [B, h, H*W, d]."""
    v, weight, bias = v.to(F64), weight.detach().to(F64), bias.detach().to(F64)
    B, h, _, d = v.shape
    ks = weight.shape[-1]
    out = torch.zeros(B, h, H * W, d, dtype=F64)
    for r in range(H):
        for c in range(W):
            acc = bias.expand(B, h, d).clone()
            for u in range(ks):
                for t in range(ks):
                    rr, cc = r + u - ks // 2, c + t - ks // 2
                    if 0 <= rr < H and 0 <= cc < W:
                        acc = acc + weight[:, 0, u, t] * v[:, :, P0 + rr * W + cc]
            out[:, :, r * W + c] = acc
    return out


def naive_sla(q, k, v, pe, dwc, P0, H, W):
    Wm, _ = naive_weights(q, k, pe, P0)
    O = Wm @ v.to(F64)
    O[:, :, P0:] += naive_dwc(v, dwc.weight, dwc.bias, P0, H, W)
    return O


# --------------------------------------------------------------------------------------------------------- helpers
def make_mixer(grid, P0, h=2, d=8, seed=0, init="official"):
    C = h * d
    info = HostInfo(dim=C, attn_dim=C, num_heads=h, head_dim=d, scale=d ** -0.5, grid=grid, num_prefix_tokens=P0)
    mixer = SlabAttention(SlabConfig(backend="reference", init=init), info)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mixer.pe.copy_(0.5 * torch.randn(mixer.pe.shape, generator=g))
        if init == "official":
            mixer.dwc.weight.copy_(0.2 * torch.randn(mixer.dwc.weight.shape, generator=g))
            mixer.dwc.bias.copy_(0.2 * torch.randn(mixer.dwc.bias.shape, generator=g))
    return mixer


def qkv(B, h, N, d, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(B, h, N, d, generator=g) + 0.1).to(dtype) for _ in range(3))


def run(mixer, q, k, v, grid, P0):
    B, h, N, d = q.shape
    return mixer(q, k, v, torch.zeros(B, N, h * d, dtype=q.dtype), TokenLayout(grid, P0))


# --------------------------------------------------------------------------------------------------------- oracle tests
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("grid,P0", GRIDS)
def test_mixer_matches_naive_oracle(grid, P0, dtype):
    H, W = grid
    mixer = make_mixer(grid, P0).to(dtype)
    q, k, v = qkv(2, 2, P0 + H * W, 8, dtype=dtype)
    out = run(mixer, q, k, v, grid, P0)
    assert out.dtype == dtype
    expect = naive_sla(q, k, v, mixer.pe[0], mixer.dwc, P0, H, W)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(out.to(F64), expect, **tol)


def test_patched_layer_matches_naive_with_projections():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, patch_size=8, embed_dim=64, depth=1,
                              num_heads=2, num_classes=10, img_size=56, reg_tokens=1).eval()
    visionfx.patch(model, "slab", backend="reference", init="official")
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.vfx_mixer.pe.normal_(0, 0.5)
        x = torch.randn(2, 2 + 49, 64)
        out = attn(x)
    B, N, C = x.shape
    q, k, v = (x.to(F64) @ attn.qkv.weight.to(F64).T + attn.qkv.bias.to(F64)).reshape(B, N, 3, 2, 32).permute(
        2, 0, 3, 1, 4)
    o = naive_sla(q, k, v, attn.vfx_mixer.pe[0], attn.vfx_mixer.dwc, 2, 7, 7)
    expect = o.transpose(1, 2).reshape(B, N, C) @ attn.proj.weight.to(F64).T + attn.proj.bias.to(F64)
    torch.testing.assert_close(out.to(F64), expect, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------------- invariants
def extract_weights(mixer, q, k, grid, P0):
    """W read off the mixer itself: with the DWC at zero, V = [I_N | 0] gives O[..., :N] = W."""
    B, h, N, d = q.shape
    v = torch.zeros(B, h, N, d, dtype=q.dtype)
    v[..., :N] = torch.eye(N, dtype=q.dtype)
    return run(mixer, q, k, v, grid, P0)[..., :N]


def test_weights_nonnegative_row_sums_dead_rows_and_scale_invariance():
    grid, P0 = (4, 4), 1
    N = P0 + 16
    mixer = make_mixer(grid, P0, d=24, init="pretrained").to(F64)  # DWC = 0
    q, k, _ = qkv(2, 2, N, 24, dtype=F64)
    q[0, 0, 0] = -q[0, 0, 0].abs() - 0.1  # a dead prefix query
    q[1, 1, 7] = -q[1, 1, 7].abs() - 0.1  # a dead patch query
    Wm = extract_weights(mixer, q, k, grid, P0)
    ref, den = naive_weights(q, k, mixer.pe[0], P0)
    torch.testing.assert_close(Wm, ref, rtol=1e-12, atol=1e-14)
    assert (Wm >= 0).all()
    torch.testing.assert_close(Wm.sum(-1), den / (den + EPS), rtol=1e-12, atol=1e-14)
    assert torch.equal(Wm[0, 0, 0], torch.zeros(N, dtype=F64)) and torch.equal(Wm[1, 1, 7], torch.zeros(N, dtype=F64))
    live = den > 0
    assert live.sum() == live.numel() - 2
    W3 = extract_weights(mixer, 3.0 * q, k, grid, P0)
    torch.testing.assert_close(W3, Wm, rtol=1e-5, atol=1e-9)  # equal up to the eps
    assert not torch.equal(W3, Wm)


def test_dead_queries_give_zero_plus_dwc():
    grid, P0 = (5, 6), 2
    mixer = make_mixer(grid, P0).to(F64)
    q, k, v = qkv(2, 2, P0 + 30, 8, dtype=F64)
    dead = [0, 1, 3, 17, 31]  # two prefix tokens and three patch tokens
    q[:, :, dead] = -q[:, :, dead].abs() - 0.1
    out = run(mixer, q, k, v, grid, P0)
    local = naive_dwc(v, mixer.dwc.weight, mixer.dwc.bias, P0, *grid)
    assert torch.equal(out[:, :, [0, 1]], torch.zeros(2, 2, 2, 8, dtype=F64))
    patch_dead = [i - P0 for i in dead if i >= P0]
    torch.testing.assert_close(out[:, :, [i + P0 for i in patch_dead]], local[:, :, patch_dead], rtol=1e-12, atol=1e-13)


def test_one_dwc_kernel_serves_every_head():
    grid, P0 = (6, 5), 1
    mixer = make_mixer(grid, P0, h=3)
    q, k, v = qkv(2, 3, P0 + 30, 8)
    q = -q.abs() - 0.1  # all queries dead: the output is the local term alone
    v[:, 1] = v[:, 0]
    out = run(mixer, q, k, v, grid, P0)
    assert torch.equal(out[:, 1], out[:, 0])
    assert out[:, 0, P0:].abs().min() > 0
    torch.testing.assert_close(out[:, 2, P0:].to(F64), naive_dwc(v, mixer.dwc.weight, mixer.dwc.bias, P0, *grid)[:, 2],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("new_grid", [(8, 6), (10, 10), (5, 5)])
def test_pe_resampling_matches_timm(new_grid):
    mixer = make_mixer((7, 7), 1)
    pe_timm = resample_abs_pos_embed(mixer.pe.detach(), list(new_grid), old_size=[7, 7], num_prefix_tokens=0)
    assert torch.equal(resample_grid_param(mixer.pe.detach(), (7, 7), new_grid, "bicubic"), pe_timm)
    H, W = new_grid
    q, k, v = qkv(2, 2, 1 + H * W, 8)
    out = run(mixer, q, k, v, new_grid, 1)
    torch.testing.assert_close(out.to(F64), naive_sla(q, k, v, pe_timm[0], mixer.dwc, 1, H, W), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dim,heads,expected", [(192, 3, 39_296), (384, 6, 76_928), (768, 12, 152_192)])
def test_parameter_counts(dim, heads, expected):
    info = HostInfo(dim=dim, attn_dim=dim, num_heads=heads, head_dim=dim // heads, scale=1.0, grid=(14, 14),
                    num_prefix_tokens=1)
    mixer = SlabAttention(SlabConfig(), info)
    assert sum(p.numel() for p in mixer.parameters()) == expected


def test_pretrained_init_is_zero_official_keeps_default_dwc():
    info = HostInfo(dim=32, attn_dim=32, num_heads=2, head_dim=16, scale=0.25, grid=(4, 4), num_prefix_tokens=1)
    mixer = SlabAttention(SlabConfig(), info)
    assert not mixer.pe.any() and not mixer.dwc.weight.any() and not mixer.dwc.bias.any()
    official = SlabAttention(SlabConfig(init="official"), info)
    assert not official.pe.any() and official.dwc.weight.any()


# --------------------------------------------------------------------------------------------------------- numerics
def test_attention_stays_fp32_under_autocast():
    grid, P0 = (7, 7), 1
    mixer = make_mixer(grid, P0, init="pretrained")  # DWC = 0: the output is the attention part alone
    q, k, v = qkv(2, 2, 50, 8)
    expect = run(mixer, q, k, v, grid, P0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(mixer, q, k, v, grid, P0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_with_dead_queries_stay_finite(dtype):
    grid, P0 = (4, 4), 1
    mixer = make_mixer(grid, P0, init="pretrained")
    q, k, v = qkv(1, 2, 17, 8, dtype=dtype)
    q[0, 0, 3] = -q[0, 0, 3].abs() - 0.1
    out = run(mixer, q, k, v, grid, P0)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert torch.equal(out[0, 0, 3], torch.zeros(8, dtype=dtype))
    expect = naive_sla(q, k, v, mixer.pe[0], mixer.dwc, P0, *grid)
    torch.testing.assert_close(out.to(F64), expect, rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------------------------------------- config
def test_norm_option_and_companions():
    assert SlabConfig().companions() == ()
    cfg = SlabConfig(norm="prepbn", prepbn_steps=100, prepbn_warmup=5, prepbn_r0=0.5)
    assert cfg.companions() == (PRepBNConfig(total_steps=100, warmup=5, r0=0.5),)
    with pytest.raises(ValueError, match=r"prepbn_steps.*0\.8 x"):
        SlabConfig(norm="prepbn")
    with pytest.raises(ValueError, match="did you mean 'prepbn'"):
        SlabConfig(norm="prepbm", prepbn_steps=10)
    with pytest.raises(ValueError, match="norm='prepbn'"):
        SlabConfig(prepbn_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        SlabConfig(norm="prepbn", prepbn_steps=0)


@pytest.mark.parametrize("name", ["slab.yaml", "slab-prepbn.yaml", "prepbn.yaml"])
def test_yaml_recipes_load(name):
    cfg = load_config(CONFIGS / name)
    if name == "slab.yaml":
        assert cfg == SlabConfig()
    elif name == "slab-prepbn.yaml":
        assert cfg.norm == "prepbn" and cfg.companions()[0].total_steps == cfg.prepbn_steps
    else:
        assert isinstance(cfg, PRepBNConfig) and cfg.total_steps > 0
