"""RALA against an independent float64 oracle and the invariants of METHODS.md §4.9.

The oracle builds every rotation R_i as an explicit block-diagonal matrix of 2×2 rotations (angles written out from
§4.1), materialises ``W_ij = α_j ⟨R_i Q̂_i, R_j K̂_j⟩ / (Σ_l α_l ⟨Q̂_i, K̂_l⟩ + eps)`` as an N×N float64 matrix, runs the
LePE and CPE depthwise convolutions as explicit loops over the kernel taps, and applies the gate and proj by hand.
The divisive form of the shared linear-attention reference is checked against the same kind of matrix.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch

import visionfx
from visionfx.config import load_config
from visionfx.kernels.linear_attention.reference import linear_attention_reference
from visionfx.methods.base import HostInfo, TokenLayout
from visionfx.methods.rala import RalaAttention, RalaConfig, rala_key_weights, rope_tables

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
F64 = torch.float64
GRIDS = [((14, 14), 1), ((14, 14), 2), ((16, 12), 1), ((7, 7), 0)]


# --------------------------------------------------------------------------------------------------------- oracle
def elu1(t):
    return torch.where(t > 0, t + 1.0, t.exp())


def naive_alpha(q, k, s):
    """q, k [N, d] -> α [N]: softmax over keys of s·q̄·K̂_j, q̄ the mean ELU+1 query."""
    fq, fk = elu1(q.to(F64)), elu1(k.to(F64))
    qbar = fq.sum(0) / fq.shape[0]
    logits = torch.tensor([s * float(fk[j] @ qbar) for j in range(fk.shape[0])], dtype=F64)
    e = (logits - logits.max()).exp()
    return e / e.sum()


def naive_rotations(H, W, P0, d, theta=10000.0, origin=(0, 0)):
    """R [N, d, d]: identity for prefix tokens; for the patch at (r, c) pair p < d/4 turns by r·θ_p, pair p ≥ d/4 by
    c·θ_{p−d/4}, θ_m = theta^(−m/(M−1))."""
    M = d // 4
    thetas = [theta ** (-m / (M - 1)) if M > 1 else 1.0 for m in range(M)]
    N = P0 + H * W
    R = torch.eye(d, dtype=F64).repeat(N, 1, 1)
    for idx in range(H * W):
        r, c = idx // W + origin[0], idx % W + origin[1]
        for p in range(2 * M):
            a = r * thetas[p] if p < M else c * thetas[p - M]
            R[P0 + idx, 2 * p:2 * p + 2, 2 * p:2 * p + 2] = torch.tensor(
                [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=F64)
    return R


def naive_divisive_weights(fq, fk, w, R, eps):
    """W [N, N] with W_ij = w_j ⟨R_i fq_i, R_j fk_j⟩ / (Σ_l w_l ⟨fq_i, fk_l⟩ + eps); also the denominators."""
    qr = torch.einsum("nij,nj->ni", R, fq)  # R_i fq_i
    kr = torch.einsum("nij,nj->ni", R, fk)
    den = (fq @ fk.T) @ w  # den_i = Σ_l w_l ⟨fq_i, fk_l⟩
    Wm = (qr @ kr.T) * w[None, :] / (den + eps)[:, None]
    return Wm, den


def naive_rala_weights(q, k, s, R, eps):
    fq, fk = elu1(q.to(F64)), elu1(k.to(F64))
    return naive_divisive_weights(fq, fk, naive_alpha(q, k, s), R, eps)


def naive_dwconv(img, kern, bias):
    """Cross-correlation of img [C, H, W] with kern [C, k, k] + bias, zero padding k//2, by explicit tap loops."""
    C, H, W = img.shape
    k = kern.shape[-1]
    p = k // 2
    pad = torch.zeros(C, H + 2 * p, W + 2 * p, dtype=F64)
    pad[:, p:p + H, p:p + W] = img
    out = bias.to(F64)[:, None, None].repeat(1, H, W)
    for u in range(k):
        for v in range(k):
            out += kern[:, u, v, None, None].to(F64) * pad[:, u:u + H, v:v + W]
    return out


def naive_rala(q, k, v, mixer, P0, grid, rope=True):
    """The mixer's forward (before the gate) in float64: q, k, v [B, h, N, d] -> [B, h, N, d]."""
    B, h, N, d = q.shape
    H, W = grid
    R = naive_rotations(H, W, P0, d, mixer.config.rope_theta) if rope else torch.eye(d, dtype=F64).repeat(N, 1, 1)
    v = v.to(F64)
    out = torch.empty(B, h, N, d, dtype=F64)
    for b in range(B):
        for g in range(h):
            out[b, g] = naive_rala_weights(q[b, g], k[b, g], mixer.scale, R, mixer.config.eps)[0] @ v[b, g]
        img = torch.empty(h * d, H, W, dtype=F64)
        for g in range(h):
            for e in range(d):
                img[g * d + e] = v[b, g, P0:, e].reshape(H, W)
        lepe = naive_dwconv(img, mixer.lepe.weight.detach()[:, 0], mixer.lepe.bias.detach())
        for g in range(h):
            for e in range(d):
                out[b, g, P0:, e] += lepe[g * d + e].reshape(H * W)
    return out


def naive_gate(o, x, mixer):
    """o [B, N, C] ⊙ (x W_oᵀ + b_o), entry by entry of the linear map."""
    Wo, bo = mixer.out_gate.weight.detach().to(F64), mixer.out_gate.bias.detach().to(F64)
    return o.to(F64) * (torch.einsum("bnj,cj->bnc", x.to(F64), Wo) + bo)


# -------------------------------------------------------------------------------------------------------- helpers
def make_mixer(grid, P0, h=2, d=8, c_in=None, dtype=F64, perturb=True, **cfg):
    host = HostInfo(dim=c_in or h * d, attn_dim=h * d, num_heads=h, head_dim=d, scale=d ** -0.5, grid=grid,
                    num_prefix_tokens=P0)
    torch.manual_seed(3)
    mixer = RalaAttention(RalaConfig(backend="reference", **cfg), host)
    if perturb:
        with torch.no_grad():
            for p in mixer.parameters():
                p.add_(0.2 * torch.randn_like(p))
    return mixer.to(dtype), TokenLayout(grid, P0)


def inputs(B, h, N, d, c_in, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, N, d, generator=g, dtype=F64) for _ in range(3))
    x = torch.randn(B, N, c_in, generator=g, dtype=F64)
    return q.to(dtype), k.to(dtype), v.to(dtype), x.to(dtype)


def mixer_weights(mixer, q, k, x, layout):
    """W [B, h, N, N] read off the mixer (LePE must be zero) by feeding one-hot value columns."""
    B, h, N, d = q.shape
    cols = []
    for j0 in range(0, N, d):
        n = min(d, N - j0)
        v = torch.zeros(B, h, N, d, dtype=q.dtype)
        for t in range(n):
            v[:, :, j0 + t, t] = 1.0
        cols.append(mixer(q, k, v, x, layout)[..., :n])
    return torch.cat(cols, dim=-1)


def assert_close64(a, b, tol=1e-10):
    err = (a.to(F64) - b.to(F64)).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), err


def merge(o):
    B, h, N, d = o.shape
    return o.transpose(1, 2).reshape(B, N, h * d)


# ------------------------------------------------------------------------------------------------ oracle tests
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("grid,P0", GRIDS, ids=[f"{g[0]}x{g[1]}-P{p}" for g, p in GRIDS])
def test_mixer_matches_naive(grid, P0, dtype):
    h, d = 2, 8
    N = P0 + grid[0] * grid[1]
    mixer, layout = make_mixer(grid, P0, h, d, dtype=dtype)
    q, k, v, x = inputs(2, h, N, d, h * d, dtype)
    with torch.no_grad():
        o = mixer(q, k, v, x, layout)
        y = mixer.post_norm(merge(o), x, layout)
    ref = naive_rala(q, k, v, mixer, P0, grid)
    tol = 1e-10 if dtype == F64 else 2e-5
    assert o.dtype == dtype
    assert_close64(o, ref, tol)
    assert_close64(y, naive_gate(merge(ref), x, mixer), tol)
    no_rope = naive_rala(q, k, v, mixer, P0, grid, rope=False)
    assert (no_rope - ref).abs().max() > 1e-3  # the rotation matters for these inputs


@pytest.mark.parametrize("d", [4, 12])
def test_head_dims(d):
    grid, P0 = (5, 6), 1
    mixer, layout = make_mixer(grid, P0, 2, d)
    q, k, v, x = inputs(2, 2, 31, d, 2 * d)
    with torch.no_grad():
        assert_close64(mixer(q, k, v, x, layout), naive_rala(q, k, v, mixer, P0, grid))


def test_rope_off_and_theta():
    grid, P0 = (5, 6), 2
    q, k, v, x = inputs(2, 2, 32, 6, 12)
    mixer, layout = make_mixer(grid, P0, 2, 6, rope=False)  # d = 6 is fine without RoPE
    with torch.no_grad():
        assert_close64(mixer(q, k, v, x, layout), naive_rala(q, k, v, mixer, P0, grid, rope=False))
    q, k, v, x = inputs(2, 2, 32, 8, 16)
    mixer, layout = make_mixer(grid, P0, 2, 8, rope_theta=50.0, lepe_kernel=3, eps=0.1)
    with torch.no_grad():
        assert_close64(mixer(q, k, v, x, layout), naive_rala(q, k, v, mixer, P0, grid))


def test_cpe_and_patched_timm_attention_match_naive():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, patch_size=8, embed_dim=32, depth=1,
                              num_heads=2, num_classes=4, img_size=(40, 32), reg_tokens=1).eval().double()
    visionfx.patch(model, "rala", backend="reference", cpe=True)  # 2 prefix tokens, 5x4 grid, d = 16
    attn = model.blocks[0].attn
    mixer = attn.vfx_mixer
    assert mixer.reads_input
    assert mixer.op_options() == {"feature": "elu1", "normalizer": "divisive", "key_weights": True, "rope": True}
    x = torch.randn(2, 22, 32, dtype=F64)
    with torch.no_grad():
        assert torch.equal(mixer.pre_qkv(x, attn.vfx_layout), x)  # zero-initialised CPE
        for p in mixer.parameters():
            p.add_(0.2 * torch.randn_like(p))
        y = attn(x)
        img = x[:, 2:].transpose(1, 2).reshape(2, 32, 5, 4)
        xc = x.clone()
        for b in range(2):
            xc[b, 2:] += naive_dwconv(img[b], mixer.cpe.weight[:, 0], mixer.cpe.bias).reshape(32, 20).T
        q, k, v = attn.qkv(xc).reshape(2, 22, 3, 2, 16).permute(2, 0, 3, 1, 4)
        o = naive_rala(q, k, v, mixer, 2, (5, 4))
        ref = attn.proj(naive_gate(merge(o), xc, mixer))
    assert_close64(y, ref)
    with pytest.raises(ValueError, match="mask"):
        attn(x, attn_mask=torch.zeros(22, 22, dtype=F64))
    with pytest.raises(ValueError, match="is_causal"):
        attn(x, is_causal=True)


# ------------------------------------------------------------------------------- the shared reference, divisive
@pytest.mark.parametrize("feature", ["identity", "relu", "elu1"])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "key_weights"])
@pytest.mark.parametrize("rope", [False, True], ids=["norope", "rope"])
def test_reference_divisive_matches_naive_weights(feature, weighted, rope):
    g = torch.Generator().manual_seed(7)
    B, h, H, W, P0, d = 2, 2, 3, 4, 1, 8
    N = P0 + H * W
    q, k, v = (torch.randn(B, h, N, d, generator=g, dtype=F64) for _ in range(3))
    if feature == "identity":  # keep identity denominators away from zero
        q, k = q.abs() + 0.1, k.abs() + 0.1
    w = torch.rand(B, h, N, generator=g, dtype=F64) + 0.1 if weighted else None
    R = naive_rotations(H, W, P0, d) if rope else torch.eye(d, dtype=F64).repeat(N, 1, 1)
    tables = rope_tables((H, W), P0, d, dtype=F64) if rope else None
    out = linear_attention_reference(q, k, v, feature=feature, key_weights=w, rope=tables, eps=0.05)
    phi = {"identity": lambda t: t, "relu": lambda t: torch.where(t > 0, t, 0 * t), "elu1": elu1}[feature]
    for b in range(B):
        for i in range(h):
            wi = w[b, i] if weighted else torch.ones(N, dtype=F64)
            Wm, _ = naive_divisive_weights(phi(q[b, i]), phi(k[b, i]), wi, R, 0.05)
            assert_close64(out[b, i], Wm @ v[b, i], 1e-12)


# ------------------------------------------------------------------------------------------------- invariants
def test_rope_off_weights_nonnegative_and_rows_sum_to_den_ratio():
    grid, P0, eps = (5, 6), 1, 0.5
    mixer, layout = make_mixer(grid, P0, rope=False, eps=eps, perturb=False)
    q, k, _, x = inputs(2, 2, 31, 8, 16)
    with torch.no_grad():
        W = mixer_weights(mixer, q, k, x, layout)
    assert W.min() >= 0
    for b in range(2):
        for g in range(2):
            _, den = naive_rala_weights(q[b, g], k[b, g], mixer.scale, torch.eye(8, dtype=F64).repeat(31, 1, 1), eps)
            assert_close64(W[b, g].sum(-1), den / (den + eps), 1e-12)
    mixer, layout = make_mixer(grid, P0, rope=False, perturb=False)  # eps = 1e-6
    with torch.no_grad():
        rows = mixer_weights(mixer, q, k, x, layout).sum(-1)
    assert (rows <= 1).all() and (1 - rows).max() < 1e-5


def test_rope_keeps_diagonal():
    grid, P0 = (5, 6), 1
    q, k, _, x = inputs(2, 2, 31, 8, 16)
    mixer_on, layout = make_mixer(grid, P0, perturb=False)
    mixer_off, _ = make_mixer(grid, P0, rope=False, perturb=False)
    with torch.no_grad():
        on = mixer_weights(mixer_on, q, k, x, layout)
        off = mixer_weights(mixer_off, q, k, x, layout)
    assert_close64(on.diagonal(dim1=-2, dim2=-1), off.diagonal(dim1=-2, dim2=-1), 1e-12)
    assert (on - off).abs().max() > 1e-3
    assert on.min() < 0  # rotated numerators: not a probability map


def test_tiny_features_half_precision():
    """§4.5: pre-activations near −12 give ELU+1 features ≈ e^-12 and denominators far below eps; 1/(den + eps) ≈ 1e6
    overflows fp16, so z must be formed in fp32. The fp16 layer stays finite and accurate."""
    grid, P0 = (5, 6), 1
    mixer, layout = make_mixer(grid, P0, dtype=torch.float16, perturb=False)  # LePE = 0: attention term only
    q, k, v, x = inputs(2, 2, 31, 8, 16)
    q, k, v, x = (q - 12).half(), (k - 12).half(), v.half(), x.half()
    with torch.no_grad():
        out = mixer(q, k, v, x, layout)
    ref = naive_rala(q.double(), k.double(), v.double(), mixer.double(), P0, grid)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert (out.double() - ref).abs().max() <= 5e-3 * ref.abs().max()


def test_rope_relative_positions_only():
    d = 8
    for P0 in (0, 1):
        q, k, v, _ = inputs(1, 2, P0 + 20, d, 16)
        a = linear_attention_reference(q, k, v, feature="elu1", rope=rope_tables((4, 5), P0, d, dtype=F64))
        b = linear_attention_reference(q, k, v, feature="elu1",
                                       rope=rope_tables((4, 5), P0, d, dtype=F64, origin=(3.0, -7.0)))
        if P0 == 0:
            assert_close64(a, b, 1e-12)
        else:  # prefix tokens keep the identity rotation, so their interaction with patches is not relative
            assert (a - b).abs().max() > 1e-4
    cos, sin = rope_tables((4, 5), 2, d, dtype=F64)
    R = naive_rotations(4, 5, 2, d)
    assert_close64(cos, torch.stack([R[i].diagonal()[0::2] for i in range(22)]), 1e-14)
    assert_close64(sin, torch.stack([R[i].diagonal(-1)[0::2] for i in range(22)]), 1e-14)


def test_key_weights_are_a_softmax():
    q, k, _, _ = inputs(2, 2, 31, 8, 16)
    alpha = rala_key_weights(q, k, 0.7)
    assert alpha.shape == (2, 2, 31) and alpha.dtype == F64
    assert_close64(alpha.sum(-1), torch.ones(2, 2, dtype=F64), 1e-14)
    assert_close64(alpha[1, 0], naive_alpha(q[1, 0], k[1, 0], 0.7), 1e-14)
    equal = rala_key_weights(q, k[:, :, :1].expand_as(k), 0.7)
    assert_close64(equal, torch.full_like(equal, 1 / 31), 1e-14)
    assert rala_key_weights(q.float(), k.float(), 0.7).dtype == torch.float32
    assert rala_key_weights(q.bfloat16(), k.bfloat16(), 0.7).dtype == torch.float32


def test_pretrained_init_gate_identity_and_zero_lepe():
    grid, P0 = (5, 6), 1
    mixer, layout = make_mixer(grid, P0, perturb=False)
    q, k, v, x = inputs(2, 2, 31, 8, 16)
    o = torch.randn(2, 31, 16, dtype=F64)
    with torch.no_grad():
        assert torch.equal(mixer.post_norm(o, x, layout), o)
        out = mixer(q, k, v, x, layout)
    ref = linear_attention_reference(q, k, v, feature="elu1", key_weights=rala_key_weights(q, k, mixer.scale),
                                     rope=rope_tables(grid, P0, 8, dtype=F64))
    assert torch.equal(out, ref)
    official = RalaAttention(RalaConfig(init="official", cpe=True), mixer.host)
    for m in (official.out_gate, official.lepe, official.cpe):
        assert 0.015 < m.weight.std() < 0.025  # trunc_normal(0.02); the cut at ±2 (absolute) is timm's too
        assert torch.count_nonzero(m.bias) == 0


# ------------------------------------------------------------------------------------------ params and configs
@pytest.mark.parametrize("C,h,count", [(192, 3, 42_048), (384, 6, 157_824), (768, 12, 610_560)])
def test_parameter_count(C, h, count):
    host = HostInfo(dim=C, attn_dim=C, num_heads=h, head_dim=C // h, scale=(C // h) ** -0.5, grid=(14, 14),
                    num_prefix_tokens=1)
    assert sum(p.numel() for p in RalaAttention(RalaConfig(), host).parameters()) == count == C * C + 27 * C
    assert sum(p.numel() for p in RalaAttention(RalaConfig(cpe=True), host).parameters()) == count + 10 * C


def test_head_dim_must_be_divisible_by_4():
    host = HostInfo(dim=12, attn_dim=12, num_heads=2, head_dim=6, scale=6 ** -0.5, grid=(4, 4), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="divisible by 4"):
        RalaAttention(RalaConfig(), host)
    RalaAttention(RalaConfig(rope=False), host)
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_tables((4, 4), 1, 6)


def test_yaml_config_and_validation():
    cfg = load_config(CONFIGS / "rala.yaml")
    assert isinstance(cfg, RalaConfig) and cfg == RalaConfig()
    with pytest.raises(ValueError, match="odd"):
        RalaConfig(lepe_kernel=4)
    with pytest.raises(ValueError, match="rope_theta"):
        RalaConfig(rope_theta=0.0)
    with pytest.raises(ValueError, match="eps"):
        RalaConfig(eps=-1.0)
    with pytest.raises(ValueError, match="did you mean"):
        load_config(CONFIGS / "rala.yaml", rope_thetta=100.0)
