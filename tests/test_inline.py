"""InLine attention against an independent float64 oracle and the invariants of METHODS.md §3.9.

The oracle materialises the N×N weight matrix W of §3.1 (weight form, uncentred), runs the kernel predictor as an
explicit per-head MLP with a hand-written erf GELU, and the dynamic depthwise convolution as explicit loops over the
kernel taps on a zero-padded image. The subtractive form of the shared linear-attention reference is checked against
the same W.
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
from visionfx.methods.inline import InlineAttention, InlineConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
F64 = torch.float64
GRIDS = [((14, 14), 1), ((14, 14), 2), ((16, 12), 1), ((7, 7), 0)]


# --------------------------------------------------------------------------------------------------------- oracle
def phi(t, kernel):
    if kernel == "identity":
        return t
    if kernel == "relu":
        return torch.where(t > 0, t, torch.zeros_like(t))
    if kernel == "leakyrelu":
        return torch.where(t > 0, t, 0.01 * t)
    if kernel == "exp":
        return t.exp()
    raise AssertionError(kernel)


def naive_weights(q, k, s, kernel="identity"):
    """q, k [N, d] -> W [N, N] with w_ij = (s/N)(φq_i·φk_j − φq_i·k̄) + 1/N, entry by entry of two matrices."""
    N = q.shape[0]
    fq, fk = phi(q.to(F64), kernel), phi(k.to(F64), kernel)
    kbar = fk.sum(0) / N
    qk = fq @ fk.T
    qkbar = (fq * kbar).sum(-1)
    W = torch.empty(N, N, dtype=F64)
    for i in range(N):
        W[i] = (s / N) * (qk[i] - qkbar[i]) + 1.0 / N
    return W


def naive_kernels(xb, W1, b1, W2, b2, h, ks):
    """Explicit per-head predictor: xb [N, C_in] -> kernels [C, ks, ks]."""
    W1, b1, W2, b2 = (t.detach().to(F64) for t in (W1, b1, W2, b2))
    m = xb.to(F64).mean(0)
    C = W1.shape[0]
    d, din = C // h, xb.shape[1] // h
    kern = torch.empty(C, ks, ks, dtype=F64)
    for g in range(h):
        pre = W1[g * d:(g + 1) * d, :, 0] @ m[g * din:(g + 1) * din] + b1[g * d:(g + 1) * d]
        u = 0.5 * pre * (1.0 + torch.erf(pre / math.sqrt(2.0)))
        rows = slice(g * ks * ks * d, (g + 1) * ks * ks * d)
        kap = W2[rows, :, 0] @ u + b2[rows]
        for e in range(d):
            kern[g * d + e] = kap[ks * ks * e:ks * ks * (e + 1)].reshape(ks, ks)
    return kern


def naive_dwconv(img, kern, bias=None):
    """Cross-correlation of img [C, H, W] with kern [C, k, k], zero padding k//2, by explicit tap loops."""
    C, H, W = img.shape
    k = kern.shape[-1]
    p = k // 2
    pad = torch.zeros(C, H + 2 * p, W + 2 * p, dtype=F64)
    pad[:, p:p + H, p:p + W] = img
    out = torch.zeros(C, H, W, dtype=F64)
    if bias is not None:
        out += bias.to(F64)[:, None, None]
    for u in range(k):
        for v in range(k):
            out += kern[:, u, v, None, None] * pad[:, u:u + H, v:v + W]
    return out


def naive_inline(q, k, v, x, mixer, P0, grid, kernel="identity"):
    """The whole mixer in float64: q, k, v [B, h, N, d], x [B, N, C_in] -> [B, h, N, d]."""
    B, h, N, d = q.shape
    H, W = grid
    s = mixer.scale
    v = v.to(F64)
    out = torch.empty(B, h, N, d, dtype=F64)
    for b in range(B):
        for g in range(h):
            out[b, g] = naive_weights(q[b, g], k[b, g], s, kernel) @ v[b, g]
    if not mixer.use_local:
        return out
    ks = mixer.config.local_kernel
    for b in range(B):
        kern = naive_kernels(x[b], mixer.pred_fc1.weight, mixer.pred_fc1.bias, mixer.pred_fc2.weight,
                             mixer.pred_fc2.bias, h, ks)
        img = torch.empty(h * d, H, W, dtype=F64)
        for g in range(h):
            for e in range(d):
                img[g * d + e] = v[b, g, P0:, e].reshape(H, W)
        r = naive_dwconv(img, kern)
        for g in range(h):
            for e in range(d):
                out[b, g, P0:, e] += r[g * d + e].reshape(H * W)
    return out


# -------------------------------------------------------------------------------------------------------- helpers
def make_mixer(grid, P0, h=2, d=8, c_in=None, scale=None, dtype=F64, perturb=True, **cfg):
    host = HostInfo(dim=c_in or h * d, attn_dim=h * d, num_heads=h, head_dim=d,
                    scale=d ** -0.5 if scale is None else scale, grid=grid, num_prefix_tokens=P0)
    torch.manual_seed(3)
    mixer = InlineAttention(InlineConfig(backend="reference", **cfg), host)
    if perturb and mixer.use_local:
        with torch.no_grad():
            mixer.pred_fc2.weight.normal_(0, 0.3)
            mixer.pred_fc2.bias.normal_(0, 0.3)
    return mixer.to(dtype), TokenLayout(grid, P0)


def inputs(B, h, N, d, c_in, dtype=F64, seed=0, qk_std=1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, N, d, generator=g, dtype=F64) for _ in range(3))
    x = torch.randn(B, N, c_in, generator=g, dtype=F64)
    return (qk_std * q).to(dtype), (qk_std * k).to(dtype), v.to(dtype), x.to(dtype)


def mixer_weights(mixer, q, k, x, layout):
    """W [B, h, N, N] read off the mixer's global term by feeding one-hot value columns (mixer without local term)."""
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


# ------------------------------------------------------------------------------------------------ oracle tests
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("grid,P0", GRIDS, ids=[f"{g[0]}x{g[1]}-P{p}" for g, p in GRIDS])
def test_mixer_matches_naive(grid, P0, dtype):
    h, d = 2, 8
    N = P0 + grid[0] * grid[1]
    mixer, layout = make_mixer(grid, P0, h, d, dtype=dtype)
    q, k, v, x = inputs(2, h, N, d, h * d, dtype)
    with torch.no_grad():
        out = mixer(q, k, v, x, layout)
    ref = naive_inline(q, k, v, x, mixer, P0, grid)
    assert out.dtype == dtype and out.shape == ref.shape
    local = out.to(F64) - naive_inline(q, k, v, x, make_mixer(grid, P0, h, d, use_local=False)[0], P0, grid)
    assert local[:, :, P0:].abs().max() > 0.1  # the local term is really on
    assert_close64(out, ref, 1e-10 if dtype == F64 else 2e-5)


@pytest.mark.parametrize("kernel", ["relu", "leakyrelu", "exp"])
def test_kernel_functions_match_naive(kernel):
    grid, P0, h, d = (7, 7), 1, 2, 8
    mixer, layout = make_mixer(grid, P0, h, d, kernel=kernel)
    q, k, v, x = inputs(2, h, 50, d, h * d, qk_std=0.5)
    with torch.no_grad():
        out = mixer(q, k, v, x, layout)
    assert_close64(out, naive_inline(q, k, v, x, mixer, P0, grid, kernel))
    assert mixer.op_options()["feature"] == ("relu" if kernel == "relu" else "identity")


def test_exp_kernel_fp32_and_dtype():
    grid, P0 = (7, 7), 1
    mixer, layout = make_mixer(grid, P0, kernel="exp", dtype=torch.float32)
    q, k, v, x = inputs(1, 2, 50, 8, 16, torch.float32, qk_std=0.5)
    with torch.no_grad():
        out = mixer(q, k, v, x, layout)
    assert out.dtype == torch.float32
    assert_close64(out, naive_inline(q, k, v, x, mixer, P0, grid, "exp"), 2e-5)


def test_input_width_differs_from_attention_width():
    grid, P0, h, d = (5, 6), 2, 2, 8
    mixer, layout = make_mixer(grid, P0, h, d, c_in=24)
    q, k, v, x = inputs(2, h, 32, d, 24)
    with torch.no_grad():
        assert_close64(mixer(q, k, v, x, layout), naive_inline(q, k, v, x, mixer, P0, grid))
    with pytest.raises(ValueError, match="divide"):
        make_mixer(grid, P0, h, d, c_in=25)
    make_mixer(grid, P0, h, d, c_in=25, use_local=False)  # no predictor, no constraint


def test_local_kernel_5():
    grid, P0, h, d = (6, 5), 1, 2, 4
    mixer, layout = make_mixer(grid, P0, h, d, local_kernel=5)
    q, k, v, x = inputs(2, h, 31, d, h * d)
    with torch.no_grad():
        assert_close64(mixer(q, k, v, x, layout), naive_inline(q, k, v, x, mixer, P0, grid))


def test_pretrained_init_is_pure_global_term():
    grid, P0, h, d = (7, 7), 1, 2, 8
    mixer, layout = make_mixer(grid, P0, h, d, perturb=False)
    assert torch.count_nonzero(mixer.pred_fc2.weight) == 0 and torch.count_nonzero(mixer.pred_fc2.bias) == 0
    assert torch.count_nonzero(mixer.pred_fc1.weight) > 0
    q, k, v, x = inputs(2, h, 50, d, h * d)
    with torch.no_grad():
        out = mixer(q, k, v, x, layout)
        assert torch.count_nonzero(mixer.predict_kernels(x)) == 0  # so the local term is zero
    glob = make_mixer(grid, P0, h, d, use_local=False)[0]
    assert_close64(out, naive_inline(q, k, v, x, glob, P0, grid))
    official = InlineAttention(InlineConfig(init="official"), mixer.host)
    assert torch.count_nonzero(official.pred_fc2.weight) > 0


def test_prefix_rows_get_no_local_term_and_predictor_sees_prefix():
    grid, P0, h, d = (7, 7), 2, 2, 8
    mixer, layout = make_mixer(grid, P0, h, d)
    q, k, v, x = inputs(1, h, 51, d, h * d)
    with torch.no_grad():
        out = mixer(q, k, v, x, layout)
        x2 = x.clone()
        x2[:, :P0] += 3.0  # prefix tokens enter the mean m of the predictor
        out2 = mixer(q, k, v, x2, layout)
    assert torch.equal(out[:, :, :P0], out2[:, :, :P0])
    assert (out2[:, :, P0:] - out[:, :, P0:]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- the shared reference, subtractive
@pytest.mark.parametrize("feature", ["identity", "relu"])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["fp64", "fp32"])
def test_reference_subtractive_matches_naive_weights(feature, dtype):
    g = torch.Generator().manual_seed(5)
    B, h, N, d, s = 2, 3, 37, 8, 0.3
    q, k, v = (torch.randn(B, h, N, d, generator=g, dtype=F64) for _ in range(3))
    out = linear_attention_reference(q.to(dtype), k.to(dtype), v.to(dtype), feature=feature,
                                     normalizer="subtractive", scale=s)
    assert out.dtype == dtype
    ref = torch.stack([torch.stack([naive_weights(q[b, i], k[b, i], s, feature) @ v[b, i] for i in range(h)])
                       for b in range(B)])
    assert_close64(out, ref, 1e-12 if dtype == F64 else 2e-6)


# ------------------------------------------------------------------------------------------------- invariants
def _global(grid=(6, 6), P0=1, h=2, d=8, scale=None):
    return make_mixer(grid, P0, h, d, use_local=False, scale=scale)


def test_rows_sum_to_one_and_match_naive():
    mixer, layout = _global()
    q, k, _, x = inputs(2, 2, 37, 8, 16, qk_std=2.0)
    with torch.no_grad():
        W = mixer_weights(mixer, q, k, x, layout)
    assert (W.sum(-1) - 1).abs().max() < 1e-12
    assert W.min() < 0  # not a probability map (§3.8)
    assert_close64(W[1, 0], naive_weights(q[1, 0], k[1, 0], mixer.scale), 1e-12)


def test_constant_values_are_returned():
    mixer, layout = _global()
    q, k, _, x = inputs(2, 2, 37, 8, 16, qk_std=2.0)
    c = torch.randn(2, 2, 1, 8, dtype=F64)
    with torch.no_grad():
        out = mixer(q, k, c.expand(2, 2, 37, 8), x, layout)
    assert_close64(out, c.expand_as(out), 1e-12)


def test_first_order_taylor_of_softmax():
    mixer, layout = _global()
    q, k, _, x = inputs(1, 2, 37, 8, 16)
    errs = []
    for eps in (0.1, 0.01):
        with torch.no_grad():
            W = mixer_weights(mixer, eps * q, k, x, layout)
        soft = torch.softmax(mixer.scale * eps * q @ k.transpose(-1, -2), dim=-1)
        errs.append((soft - W).abs().max().item())
    assert 70 < errs[0] / errs[1] < 130, errs


def test_injective_normalisation():
    mixer, layout = _global()
    q, k, _, x = inputs(1, 2, 37, 8, 16)
    with torch.no_grad():
        W1 = mixer_weights(mixer, q, k, x, layout)
        W2 = mixer_weights(mixer, 2.0 * q, k, x, layout)
    assert (W1 - W2).abs().max() > 1e-3
    # the divisive form (§5) cannot tell cQ from Q: W(cQ) = W(Q) up to eps
    v = torch.randn(1, 2, 37, 8, dtype=F64)
    d1 = linear_attention_reference(q, k, v, feature="relu", eps=0.0)
    d2 = linear_attention_reference(2.0 * q, k, v, feature="relu", eps=0.0)
    assert_close64(d1, d2, 1e-12)


def test_quadratic_and_uncentred_orders_agree():
    mixer, layout = _global(scale=0.4)
    q, k, v, x = inputs(2, 2, 37, 8, 16, qk_std=2.0)
    s, N = mixer.scale, 37
    with torch.no_grad():
        out = mixer(q, k, v, x, layout)
    quad = ((s / N) * (q @ k.transpose(-1, -2) - (q @ k.mean(-2, keepdim=True).transpose(-1, -2))) + 1.0 / N) @ v
    kv = (s / N) * k.transpose(-1, -2) @ v
    kbar, vbar = k.mean(-2, keepdim=True), v.mean(-2, keepdim=True)
    uncentred = q @ kv + (1 - s * (q * kbar).sum(-1, keepdim=True)) * vbar
    assert_close64(out, quad, 1e-12)
    assert_close64(out, uncentred, 1e-12)


def test_fp32_centred_form_survives_large_key_offsets():
    """§3.5: with a large common offset on k the uncentred products nearly cancel; the fp32 output stays accurate."""
    mixer, layout = make_mixer((6, 6), 1, use_local=False, dtype=torch.float32)
    q, k, v, x = inputs(2, 2, 37, 8, 16)
    qf, kf, vf, xf = q.float(), (k + 300.0).float(), (v + 30.0).float(), x.float()
    with torch.no_grad():
        out = mixer(qf, kf, vf, xf, layout)
    ref = naive_inline(qf.double(), kf.double(), vf.double(), xf.double(), mixer, 1, (6, 6))
    s, N = mixer.scale, 37
    uncentred32 = qf @ ((s / N) * kf.transpose(-1, -2) @ vf) + (1 - s * qf @ kf.mean(-2).unsqueeze(-1)) * vf.mean(-2, True)
    err = (out.double() - ref).abs().max().item()
    assert err < 1e-4 * ref.abs().max().item(), err
    assert (uncentred32.double() - ref).abs().max().item() > 3 * err  # the uncentred order loses more to cancellation


# ------------------------------------------------------------------------------------------ params and configs
@pytest.mark.parametrize("C,h,count", [(192, 3, 124_800), (192, 6, 63_360), (384, 6, 249_600), (768, 12, 499_200)])
def test_parameter_count(C, h, count):
    host = HostInfo(dim=C, attn_dim=C, num_heads=h, head_dim=C // h, scale=(C // h) ** -0.5, grid=(14, 14),
                    num_prefix_tokens=1)
    mixer = InlineAttention(InlineConfig(), host)
    assert sum(p.numel() for p in mixer.parameters()) == count == 10 * C * C // h + 10 * C
    assert sum(p.numel() for p in InlineAttention(InlineConfig(use_local=False), host).parameters()) == 0


def test_yaml_config_and_validation():
    cfg = load_config(CONFIGS / "inline.yaml")
    assert isinstance(cfg, InlineConfig) and cfg == InlineConfig()
    with pytest.raises(ValueError, match="leakyrelu"):
        InlineConfig(kernel="leaky_relu")
    with pytest.raises(ValueError, match="odd"):
        InlineConfig(local_kernel=4)
    with pytest.raises(ValueError, match="did you mean"):
        load_config(CONFIGS / "inline.yaml", local_kernal=3)


def _tiny_vit(P0_reg=0):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, patch_size=8, embed_dim=32, depth=1,
                             num_heads=2, num_classes=4, img_size=(40, 32), reg_tokens=P0_reg).eval()


def test_patched_timm_attention_matches_naive():
    model = _tiny_vit(P0_reg=1).double()  # 2 prefix tokens, 5x4 grid
    visionfx.patch(model, "inline", backend="reference")
    attn = model.blocks[0].attn
    mixer = attn.vfx_mixer
    assert mixer.reads_input and mixer.op_options() == {"feature": "identity", "normalizer": "subtractive"}
    with torch.no_grad():
        mixer.pred_fc2.weight.normal_(0, 0.3)
        mixer.pred_fc2.bias.normal_(0, 0.3)
    x = torch.randn(2, 22, 32, dtype=F64)
    with torch.no_grad():
        y = attn(x)
        q, k, v = attn.qkv(x).reshape(2, 22, 3, 2, 16).permute(2, 0, 3, 1, 4)
        o = naive_inline(q, k, v, x, mixer, 2, (5, 4))
        ref = attn.proj(o.transpose(1, 2).reshape(2, 22, 32))
    assert_close64(y, ref)
    with pytest.raises(ValueError, match="mask"):
        attn(x, attn_mask=torch.zeros(22, 22, dtype=F64))
    with pytest.raises(ValueError, match="is_causal"):
        attn(x, is_causal=True)
