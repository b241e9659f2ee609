"""Agent attention and the agentsd preset against an independent float64 oracle (METHODS.md §2.9).

The oracle pools with explicit loops over PyTorch's adaptive-pooling bin edges, builds B1 [n, N] and B2 [N, n]
token by token from hand-written linear-interpolation weights, materialises both softmax matrices and runs the
depthwise convolution as explicit kernel loops.
"""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import visionfx
from families import FAMILIES
from visionfx.config import load_config
from visionfx.kernels.agent_attention import agent_attention_reference
from visionfx.methods.agent import AgentAttention, AgentConfig, AgentSDConfig, agent_grid
from visionfx.methods.base import HostInfo, TokenLayout

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
F64 = torch.float64


# --------------------------------------------------------------------------------------------------------- oracle
def bins(length: int, parts: int) -> list[tuple[int, int]]:
    """PyTorch adaptive-pooling bins: [floor(i·L/p), ceil((i+1)·L/p))."""
    return [(math.floor(i * length / parts), math.ceil((i + 1) * length / parts)) for i in range(parts)]


def naive_agents(qp, H, W, ph, pw):
    """qp [B, h, H·W, d] (row-major patches) -> [B, h, ph·pw, d]."""
    out = []
    for r0, r1 in bins(H, ph):
        for c0, c1 in bins(W, pw):
            acc = torch.zeros_like(qp[:, :, 0])
            for r in range(r0, r1):
                for c in range(c0, c1):
                    acc = acc + qp[:, :, r * W + c]
            out.append(acc / ((r1 - r0) * (c1 - c0)))
    return torch.stack(out, dim=2)


def lin_weights(src: int, dst: int) -> torch.Tensor:
    """[dst, src] weights of 1-D linear interpolation, align_corners=False (source index clamped at 0 and src-1)."""
    m = torch.zeros(dst, src, dtype=F64)
    for o in range(dst):
        x = max((o + 0.5) * src / dst - 0.5, 0.0)
        i0 = min(int(math.floor(x)), src - 1)
        i1 = min(i0 + 1, src - 1)
        lam = x - i0
        m[o, i0] += 1 - lam
        m[o, i1] += lam
    return m


def naive_biases(p: dict, P0: int, H: int, W: int):
    """B1 [h, n, N], B2 [h, N, n] filled token by token."""
    h, n, b, _ = p["an_bias"].shape
    H0, W0 = p["ah_bias"].shape[-1], p["aw_bias"].shape[-1]
    bh, bw, lh, lw = lin_weights(b, H), lin_weights(b, W), lin_weights(H0, H), lin_weights(W0, W)
    N = P0 + H * W
    b1, b2 = torch.zeros(h, n, N, dtype=F64), torch.zeros(h, N, n, dtype=F64)
    for t in range(P0):
        b1[:, :, t] = p["ac_bias"][:, :, t]
        b2[:, t, :] = p["ca_bias"][:, t, :]
    for r in range(H):
        for c in range(W):
            j = P0 + r * W + c
            b1[:, :, j] = (torch.einsum("u,v,hnuv->hn", bh[r], bw[c], p["an_bias"])
                           + torch.einsum("u,hnu->hn", lh[r], p["ah_bias"])
                           + torch.einsum("v,hnv->hn", lw[c], p["aw_bias"]))
            b2[:, j, :] = (torch.einsum("u,v,hnuv->hn", bh[r], bw[c], p["na_bias"])
                           + torch.einsum("u,hun->hn", lh[r], p["ha_bias"])
                           + torch.einsum("v,hvn->hn", lw[c], p["wa_bias"]))
    return b1, b2


def softmax(z):
    e = torch.exp(z - z.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def naive_dwc(vmap, weight, bias):
    """vmap [B, C, H, W]; weight [C, 1, k, k]; cross-correlation with zero padding k//2."""
    B, C, H, W = vmap.shape
    k = weight.shape[-1]
    out = bias.view(1, C).expand(B, C).clone().unsqueeze(-1).unsqueeze(-1).repeat(1, 1, H, W)
    for r in range(H):
        for c in range(W):
            for u in range(k):
                for w in range(k):
                    rr, cc = r + u - k // 2, c + w - k // 2
                    if 0 <= rr < H and 0 <= cc < W:
                        out[:, :, r, c] += weight[:, 0, u, w] * vmap[:, :, rr, cc]
    return out


def naive_agent(q, k, v, p: dict, *, P0, grid, agent_hw, scale, scale2, lam=0.0):
    """The whole mixer in float64. q, k, v [B, h, N, d]; p: the mixer's parameters by name (missing = unused)."""
    q, k, v = q.to(F64), k.to(F64), v.to(F64)
    p = {name: t.detach().to(F64) for name, t in p.items()}
    B, h, N, d = q.shape
    H, W = grid
    A = naive_agents(q[:, :, P0:], H, W, *agent_hw)
    n = A.shape[2]
    if "an_bias" in p:
        b1, b2 = naive_biases(p, P0, H, W)
    else:
        b1, b2 = torch.zeros(h, n, N, dtype=F64), torch.zeros(h, N, n, dtype=F64)
    P1 = softmax(scale * A @ k.transpose(-1, -2) + b1)
    P2 = softmax(scale2 * q @ A.transpose(-1, -2) + b2)
    o = P2 @ (P1 @ v)
    if "dwc.weight" in p:
        vmap = torch.zeros(B, h * d, H, W, dtype=F64)
        for g in range(h):
            for e in range(d):
                vmap[:, g * d + e] = v[:, g, P0:, e].reshape(B, H, W)
        local = naive_dwc(vmap, p["dwc.weight"], p["dwc.bias"])
        for g in range(h):
            for e in range(d):
                o[:, g, P0:, e] += local[:, g * d + e].reshape(B, H * W)
    return o + lam * v


# ------------------------------------------------------------------------------------------------------- helpers
def make_mixer(config, grid0, P0, h=2, d=8, scale=0.3, attn_drop=0.0, perturb=True, seed=0):
    host = HostInfo(dim=h * d, attn_dim=h * d, num_heads=h, head_dim=d, scale=scale, grid=grid0,
                    num_prefix_tokens=P0, attn_drop=attn_drop)
    m = AgentAttention(config, host)
    if perturb:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for t in m.parameters():
                t.copy_(0.5 * torch.randn(t.shape, generator=g))
    return m.eval()


def qkv(B, h, N, d, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple((2.0 * torch.randn(B, h, N, d, generator=g, dtype=F64)).to(dtype) for _ in range(3))


def run(m, q, k, v, grid, P0):
    x = torch.zeros(q.shape[0], q.shape[2], m.host.dim, dtype=q.dtype)
    return m(q, k, v, x, TokenLayout(grid, P0))


def oracle(m, q, k, v, grid, P0):
    return naive_agent(q, k, v, dict(m.named_parameters()), P0=P0, grid=grid, agent_hw=m.agent_hw,
                       scale=m.host.scale, scale2=m.host.scale ** m.config.scale2_exponent,
                       lam=m.config.v_shortcut)


# grid at forward, prefix count, agent grid, grid at patch time, bias base
CASES = [
    ((14, 14), 1, (7, 7), (14, 14), 7),
    ((14, 14), 2, (9, 9), (14, 14), 7),  # overlapping bins (2 or 3 rows), as Agent-DeiT-B
    ((16, 12), 1, (5, 5), (16, 12), 7),  # non-square grid
    ((7, 7), 0, (2, 3), (7, 7), 7),  # no prefix tokens, non-square agent grid
    ((10, 12), 1, (3, 4), (14, 14), 5),  # changed grid: biases interpolated down from the patch-time grid
    ((16, 20), 1, (4, 4), (12, 10), 6),  # changed grid: interpolated up
]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("grid,P0,agent_hw,grid0,base", CASES)
def test_mixer_matches_oracle(grid, P0, agent_hw, grid0, base, dtype, tol):
    m = make_mixer(AgentConfig(agent_shape=agent_hw, bias_base=base), grid0, P0).to(dtype)
    q, k, v = qkv(2, 2, P0 + grid[0] * grid[1], 8, dtype=dtype)
    out = run(m, q, k, v, grid, P0)
    assert out.dtype == dtype
    ref = oracle(m, q, k, v, grid, P0)
    torch.testing.assert_close(out.to(F64), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("grid,P0", [((14, 14), 1), ((16, 12), 2)])
def test_agentsd_matches_oracle(grid, P0):
    m = make_mixer(AgentSDConfig(agent_num=12), grid, P0).double()
    assert m.agent_hw == (3, 4) and len(list(m.parameters())) == 0
    q, k, v = qkv(2, 2, P0 + grid[0] * grid[1], 8, dtype=F64)
    ref = oracle(m, q, k, v, grid, P0)
    torch.testing.assert_close(run(m, q, k, v, grid, P0), ref, rtol=1e-10, atol=1e-10)
    # the oracle is sensitive to κ and λ: the trained-scale form is far from it
    plain = naive_agent(q, k, v, {}, P0=P0, grid=grid, agent_hw=(3, 4), scale=0.3, scale2=0.3)
    assert (plain - ref).abs().max() > 1e-2


def test_bf16_inputs_fp32_accumulation():
    grid, P0 = (14, 14), 1
    m = make_mixer(AgentConfig(), grid, P0)
    q, k, v = qkv(2, 2, 197, 8, dtype=torch.bfloat16)
    out = run(m, q, k, v, grid, P0)
    assert out.dtype == torch.bfloat16
    ref = oracle(m, q, k, v, grid, P0)
    rel = (out.to(F64) - ref).norm() / ref.norm()
    assert rel < 1e-2


def test_official_init_and_pretrained_init():
    host = HostInfo(64, 64, 2, 32, 32 ** -0.5, (7, 7), 1)
    off = AgentAttention(AgentConfig(init="official"), host)
    for name, p in off.named_parameters():
        assert p.abs().max() > 0, name
        if name.endswith("_bias"):
            assert 0.015 < p.std() < 0.025 and abs(p.mean()) < 0.005
    pre = AgentAttention(AgentConfig(), host)
    assert all(torch.count_nonzero(p) == 0 for p in pre.parameters())


# ---------------------------------------------------------------------------------------------------- invariants
def _op_inputs(B=2, h=2, N=30, n=6, d=5, seed=3):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    return r(B, h, N, d), r(B, h, N, d), r(B, h, n, d), r(h, n, N), r(h, N, n)


def test_effective_matrix_row_stochastic_low_rank():
    q, k, a, b1, b2 = _op_inputs()
    B, h, N, _ = q.shape
    n = a.shape[2]
    eye = torch.eye(N, dtype=F64).expand(B, h, N, N)
    M = agent_attention_reference(q, k, eye, a, b1, b2, scale1=0.7, scale2=0.4)  # = P2·P1
    assert (M >= 0).all()
    torch.testing.assert_close(M.sum(-1), torch.ones(B, h, N, dtype=F64))
    assert all(torch.linalg.matrix_rank(M[i, j]) <= n for i in range(B) for j in range(h))


def test_each_probability_matrix_row_stochastic():
    q, k, a, b1, b2 = _op_inputs()
    B, h, N, _ = q.shape
    n = a.shape[2]
    eye = torch.eye(N, dtype=F64).expand(B, h, N, N)
    big = -1e30
    # P2 forced one-hot on agent i mod n: row i of the output is row (i mod n) of P1
    sel2 = torch.full((h, N, n), big, dtype=F64)
    sel2[:, torch.arange(N), torch.arange(N) % n] = 0
    P1 = agent_attention_reference(q, k, eye, a, b1, sel2, scale1=0.7, scale2=0.4)
    assert (P1 >= 0).all()
    torch.testing.assert_close(P1.sum(-1), torch.ones(B, h, N, dtype=F64))
    torch.testing.assert_close(P1[:, :, :n], P1[:, :, n:2 * n])
    # P1 forced one-hot on token a: P1·V = V[:n] = I[:n], so the output's first n columns are P2
    sel1 = torch.full((h, n, N), big, dtype=F64)
    sel1[:, torch.arange(n), torch.arange(n)] = 0
    P2 = agent_attention_reference(q, k, eye, a, sel1, b2, scale1=0.7, scale2=0.4)
    assert (P2 >= 0).all() and torch.count_nonzero(P2[..., n:]) == 0
    torch.testing.assert_close(P2.sum(-1), torch.ones(B, h, N, dtype=F64))


@pytest.mark.parametrize("method,factor", [("agent", 1.0), ("agentsd", 1.075)])
def test_constant_v_returned(method, factor):
    grid, P0 = (14, 14), 1
    cfg = AgentConfig() if method == "agent" else AgentSDConfig()
    m = make_mixer(cfg, grid, P0, perturb=False).double()
    q, k, _ = qkv(2, 2, 197, 8, dtype=F64)
    v = torch.randn(2, 2, 1, 8, dtype=F64).expand(2, 2, 197, 8)
    torch.testing.assert_close(run(m, q, k, v, grid, P0), factor * v, rtol=1e-12, atol=1e-12)


def test_one_agent_gives_one_output():
    grid, P0 = (16, 12), 2
    q, k, v = qkv(2, 2, P0 + 192, 8, dtype=F64)
    m = make_mixer(AgentConfig(agent_num=1), grid, P0, perturb=False).double()
    out = run(m, q, k, v, grid, P0)
    a = q[:, :, P0:].mean(dim=2, keepdim=True)
    expected = softmax(0.3 * a @ k.transpose(-1, -2)) @ v  # [B, h, 1, d]
    torch.testing.assert_close(out, expected.expand_as(out), rtol=1e-12, atol=1e-12)
    # with biases (but no DWC) every token still reads the same single agent
    m = make_mixer(AgentConfig(agent_num=1, use_dwc=False), grid, P0).double()
    out = run(m, q, k, v, grid, P0)
    torch.testing.assert_close(out, out[:, :, :1].expand_as(out), rtol=1e-12, atol=1e-12)
    assert (out - expected).abs().max() > 1e-3  # B1 changed the agent's aggregation


def test_separable_interpolation_equals_interpolated_sum():
    m = make_mixer(AgentConfig(agent_num=9), (14, 14), 1).double()
    H, W = 10, 17
    b1, b2 = m.position_biases((H, W), F64)
    assert b1.shape == (2, 9, 1 + H * W) and b2.shape == (2, 1 + H * W, 9)  # no batch dimension
    up = lambda t: F.interpolate(t, size=(H, W), mode="bilinear", align_corners=False)  # noqa: E731
    s1 = up(m.an_bias) + up(m.ah_bias[..., :, None] + m.aw_bias[..., None, :])
    s2 = up(m.na_bias) + up((m.ha_bias[:, :, None, :] + m.wa_bias[:, None, :, :]).permute(0, 3, 1, 2))
    torch.testing.assert_close(b1[:, :, 1:], s1.reshape(2, 9, H * W), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b2[:, 1:], s2.reshape(2, 9, H * W).transpose(1, 2), rtol=1e-12, atol=1e-12)


def test_bias_layout_for_the_kernel():
    """B1 comes as a view of rows padded to 16 tokens, which the Triton op loads up to that bound; B2 is
    agent-contiguous. Values are those of the interpolation (test above)."""
    pytest.importorskip("triton")
    from visionfx.kernels.agent_attention.triton import _bias_args

    m = make_mixer(AgentConfig(agent_num=9), (14, 14), 1)
    N = 1 + 10 * 17
    b1, b2 = m.position_biases((10, 17), torch.float32)
    q = torch.zeros(1, 2, N, 8)
    assert b1.stride() == (9 * 176, 176, 1) and _bias_args(b1, 2, q)[2] == 176
    assert b2.stride(2) == 1 and _bias_args(b2, 1, q)[2] == N


def test_zero_init_agent_equals_agentsd_kappa1_lambda0():
    model = FAMILIES["vit_reg"].build()
    x = FAMILIES["vit_reg"].inputs(0)
    a, sd, sd_default = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    visionfx.patch(a, "agent")
    visionfx.patch(sd, "agentsd", scale2_exponent=1.0, v_shortcut=0.0)
    visionfx.patch(sd_default, "agentsd")
    with torch.no_grad():
        ya, ysd, ydef, y0 = a(*x), sd(*x), sd_default(*x), model(*x)
    torch.testing.assert_close(ya, ysd, rtol=1e-6, atol=1e-6)
    assert (ya - ydef).abs().max() > 1e-4 and (ya - y0).abs().max() > 1e-4


def test_dropout_on_both_probability_matrices():
    grid, P0, p = (7, 7), 1, 0.3
    m = make_mixer(AgentConfig(agent_num=4, use_dwc=False), grid, P0, attn_drop=p).double()
    q, k, v = qkv(2, 2, 50, 8, dtype=F64)
    ref = oracle(m, q, k, v, grid, P0)
    torch.testing.assert_close(run(m, q, k, v, grid, P0), ref)  # eval: no dropout
    m.train()
    torch.manual_seed(7)
    out = run(m, q, k, v, grid, P0)
    # the masks the op draws, in its order: first P1 [B, h, n, N], then P2 [B, h, N, n]
    torch.manual_seed(7)
    m1 = F.dropout(torch.ones(2, 2, 4, 50, dtype=F64), p, True)
    m2 = F.dropout(torch.ones(2, 2, 50, 4, dtype=F64), p, True)
    A = naive_agents(q[:, :, P0:], 7, 7, 2, 2)
    b1, b2 = naive_biases({n: t.detach() for n, t in m.named_parameters()}, P0, 7, 7)
    P1 = softmax(0.3 * A @ k.transpose(-1, -2) + b1) * m1
    P2 = softmax(0.3 * q @ A.transpose(-1, -2) + b2) * m2
    torch.testing.assert_close(out, P2 @ (P1 @ v), rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------ through visionfx.patch
def _attention_io(model, x):
    seen = {}

    def hook(mod, args, out):
        seen["x"], seen["y"] = args[0], out

    h = model.blocks[0].attn.register_forward_hook(hook)
    with torch.no_grad():
        model(*x)
    h.remove()
    return seen["x"], seen["y"]


@pytest.mark.parametrize("family,method", [("deit_distilled", "agent"), ("vit_gap_nonsquare", "agent"),
                                           ("vit_dynamic", "agent"), ("vit", "agentsd")])
def test_patched_layer_matches_oracle(family, method):
    torch.manual_seed(0)
    model = FAMILIES[family].build().double()
    x = tuple(t.double() for t in FAMILIES[family].inputs(0))
    visionfx.patch(model, method, agent_num=6)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vfx_" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=F64))
    attn = model.blocks[0].attn
    layout = attn.vfx_layout
    xin, y = _attention_io(model, x)
    B, N, _ = xin.shape
    h = attn.num_heads
    d = attn.head_dim
    t = F.linear(xin, attn.qkv.weight, attn.qkv.bias).reshape(B, N, 3, h, d).permute(2, 0, 3, 1, 4)
    mixer = attn.vfx_mixer
    params = {n.removeprefix("vfx_mixer."): p for n, p in attn.named_parameters() if n.startswith("vfx_mixer.")}
    scale = d ** -0.5
    kappa, lam = (1.0, 0.0) if method == "agent" else (0.3, 0.075)
    o = naive_agent(t[0], t[1], t[2], params, P0=layout.num_prefix_tokens, grid=layout.grid, agent_hw=(2, 3),
                    scale=scale, scale2=scale ** kappa, lam=lam)
    expected = F.linear(o.transpose(1, 2).reshape(B, N, h * d), attn.proj.weight, attn.proj.bias)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    assert mixer.host.grid != layout.grid or family != "vit_dynamic"


def test_agentsd_tiny_vit_runs():
    model = FAMILIES["vit"].build()
    x = FAMILIES["vit"].inputs(0)
    with torch.no_grad():
        y0 = model(*x)
    visionfx.patch(model, "agentsd")
    rows = visionfx.explain(model, file=io.StringIO())
    assert [r["params_added"] for r in rows] == [0, 0] and {r["method"] for r in rows} == {"agentsd"}
    with torch.no_grad():
        y = model(*x)
    assert y.shape == y0.shape and torch.isfinite(y).all() and not torch.allclose(y, y0)


def test_dispatch_options():
    from visionfx.kernels.agent_attention import _supports

    m = make_mixer(AgentConfig(), (7, 7), 1, attn_drop=0.1)
    assert m.op == "agent_attention" and m.op_options() == {"bias": True, "dropout": False}
    m.train()
    assert m.op_options()["dropout"] is True
    assert "dropout" in _supports("cuda", torch.float32, 64, **m.op_options())
    assert "dtype" in _supports("cuda", torch.float64, 64, bias=True, dropout=False)
    assert _supports("cuda", torch.bfloat16, 64, bias=True, dropout=False) is None
    assert m.kernel(torch.zeros(1)) is agent_attention_reference  # no Triton kernel registered yet


def test_prefix_count_mismatch_raises():
    m = make_mixer(AgentConfig(), (7, 7), 1)
    q, k, v = qkv(1, 2, 51, 8)
    with pytest.raises(ValueError, match="prefix tokens"):
        run(m, q, k, v, (7, 7), 2)


# ------------------------------------------------------------------------------ parameters, configs, validation
@pytest.mark.parametrize("C,h,n,expected", [(192, 3, 49, 24_852), (384, 6, 49, 49_704), (768, 12, 81, 159_312)])
def test_parameter_counts(C, h, n, expected):
    m = AgentAttention(AgentConfig(agent_num=n), HostInfo(C, C, h, C // h, (C // h) ** -0.5, (14, 14), 1))
    assert sum(p.numel() for p in m.parameters()) == expected
    m = AgentAttention(AgentConfig(agent_num=n), HostInfo(C, C, h, C // h, (C // h) ** -0.5, (14, 14), 0))
    assert sum(p.numel() for p in m.parameters()) == expected - 2 * h * n  # no prefix biases without prefix tokens


def test_explain_counts_deit():
    model = timm.create_model("deit_small_patch16_224", pretrained=False, depth=1)
    visionfx.patch(model, "agent")
    rows = visionfx.explain(model, file=io.StringIO())
    assert [r["params_added"] for r in rows] == [49_704]
    model = timm.create_model("deit_base_patch16_224", pretrained=False, depth=5)
    visionfx.patch(model, CONFIGS / "agent-deit-b.yaml")
    rows = visionfx.explain(model, file=io.StringIO())
    assert [r["path"] for r in rows] == [f"blocks.{i}.attn" for i in range(4)]
    assert [r["params_added"] for r in rows] == [159_312] * 4
    assert type(model.blocks[4].attn).__name__ == "Attention"


def test_yaml_configs_load():
    assert load_config(CONFIGS / "agent.yaml") == AgentConfig()
    assert load_config(CONFIGS / "agentsd.yaml") == AgentSDConfig()
    b = load_config(CONFIGS / "agent-deit-b.yaml")
    assert isinstance(b, AgentConfig) and b.agent_num == 81 and b.layers == (0, 1, 2, 3) and b.agent_grid == (9, 9)
    sd = AgentSDConfig()
    assert (sd.use_bias, sd.use_dwc, sd.scale2_exponent, sd.v_shortcut) == (False, False, 0.3, 0.075)


def test_agent_grid_choice():
    assert [agent_grid(n) for n in (49, 81, 12, 13, 18, 1)] == [(7, 7), (9, 9), (3, 4), (1, 13), (3, 6), (1, 1)]
    c = AgentConfig(agent_shape=[4, 8])
    assert c.agent_shape == (4, 8) and c.agent_num == 32 and c.agent_grid == (4, 8)


@pytest.mark.parametrize("kwargs,match", [
    ({"agent_num": 0}, "agent_num"), ({"agent_num": 257}, "agent_num"), ({"agent_num": 4.0}, "agent_num"),
    ({"agent_shape": (0, 3)}, "agent_shape"), ({"agent_shape": (3,)}, "agent_shape"),
    ({"agent_shape": (16, 17)}, "agent_num"), ({"dwc_kernel": 4}, "dwc_kernel"), ({"bias_base": 0}, "bias_base"),
    ({"use_bias": "yes"}, "use_bias"), ({"scale2_exponent": 0.0}, "scale2_exponent"),
    ({"v_shortcut": float("nan")}, "v_shortcut"), ({"init": "random"}, "init"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AgentConfig(**kwargs)


def test_unknown_option_suggests():
    with pytest.raises(ValueError, match="agent_num"):
        visionfx.patch(FAMILIES["vit"].build(), "agent", agent_nums=49)
