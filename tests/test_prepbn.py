"""PRepBN (METHODS.md §6) against independent float64 formulas and the oracle of §6.5, then on whole tiny models.

Oracles: the λ mix recomputed from an explicit float64 LayerNorm and BatchNorm (mean and variance over all B·N
tokens written out), the eval affine map from the §6.2 formula, running statistics from float64 means and variances
of the captured norm inputs (prefix tokens included).
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import timm
import torch
from torch import nn

import visionfx
from visionfx.methods.prepbn import FoldedLinear, LinearNorm, PRepBNConfig, RepBN
from visionfx.patches.base import set_submodule
from families import FAMILIES

F64 = torch.float64
TIMM = dict(pretrained=False, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10, img_size=56)


# --------------------------------------------------------------------------------------------------------- helpers
def host_ln(C=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ln = nn.LayerNorm(C, eps=1e-6)
    with torch.no_grad():
        ln.weight.copy_(1 + 0.3 * torch.randn(C, generator=g))
        ln.bias.copy_(0.3 * torch.randn(C, generator=g))
    return ln


def tokens(B=3, N=5, C=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(B, N, C, generator=g) + 0.5


def naive_ln(x, ln):
    x = x.to(F64)
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight.detach().to(F64) + ln.bias.detach().to(F64)


def naive_bn_stats(x):
    """Mean, biased and unbiased variance per channel over every token of x [..., C], in float64."""
    t = x.detach().to(F64).reshape(-1, x.shape[-1])
    mu = t.sum(0) / t.shape[0]
    ss = ((t - mu) ** 2).sum(0)
    return mu, ss / t.shape[0], ss / (t.shape[0] - 1)


def naive_repbn_train(x, rep):
    mu, var, _ = naive_bn_stats(x)
    bn = rep.bn
    xn = (x.to(F64) - mu) / torch.sqrt(var + bn.eps)
    return xn * bn.weight.detach().to(F64) + bn.bias.detach().to(F64) + rep.alpha.detach().to(F64) * x.to(F64)


def randomise_repbn(rep, seed=2):
    g = torch.Generator().manual_seed(seed)
    C = rep.bn.num_features
    with torch.no_grad():
        rep.bn.weight.copy_(1 + 0.5 * torch.randn(C, generator=g))
        rep.bn.bias.copy_(0.5 * torch.randn(C, generator=g))
        rep.bn.running_mean.copy_(torch.randn(C, generator=g))
        rep.bn.running_var.copy_(0.5 + torch.rand(C, generator=g))
        rep.alpha.fill_(0.7)


def perturb_model(model, seed=3):
    """Non-trivial values for everything PRepBN adds (BN affine, α, running statistics) and the added mixers."""
    for m in model.modules():
        if isinstance(m, RepBN):
            seed += 1
            randomise_repbn(m, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vfx_mixer" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def timm_model(name="vit_tiny_patch16_224", **kw):
    torch.manual_seed(0)
    model = timm.create_model(name, **dict(TIMM, **kw)).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # timm zero-initialises the head: give it values so folding into it shows
        model.head.weight.normal_(0, 0.2, generator=g)
        model.head.bias.normal_(0, 0.2, generator=g)
    return model


def image(seed=0, shape=(2, 3, 56, 56)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def norm_modules(model):
    return [m for m in model.modules() if isinstance(m, LinearNorm)]


# --------------------------------------------------------------------------------------------------------- config
def test_missing_total_steps_raises_with_guidance():
    with pytest.raises(ValueError, match=r"0\.8 x"):
        PRepBNConfig()
    with pytest.raises(ValueError, match="total_steps"):
        visionfx.patch(timm_model(), "prepbn")
    with pytest.raises(ValueError, match=r"prepbn_steps.*0\.8 x"):
        visionfx.patch(timm_model(), "slab", norm="prepbn")


@pytest.mark.parametrize("bad", [dict(total_steps=0), dict(total_steps=True), dict(total_steps=10, warmup=-1),
                                 dict(total_steps=10, r0=1.5), dict(total_steps=10, bn_eps=0.0)])
def test_bad_options_raise(bad):
    with pytest.raises(ValueError):
        PRepBNConfig(**bad)


def test_include_fc_norm_patches_fc_norm_and_unpatches():
    import timm

    import visionfx

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=1, num_heads=2, class_token=False, global_pool="avg", fc_norm=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y0 = model(x)
    visionfx.patch(model, "prepbn", total_steps=10)
    assert isinstance(model.fc_norm, torch.nn.LayerNorm)  # off by default (METHODS.md §6.3)
    visionfx.unpatch(model)
    visionfx.patch(model, "prepbn", total_steps=10, include_fc_norm=True)
    assert isinstance(model.fc_norm, LinearNorm) and model.fc_norm.role == "fc_norm"
    visionfx.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(x), y0)


# --------------------------------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("T,r0", [(7, 1.0), (5, 0.5)])
def test_lambda_schedule_and_mix(T, r0):
    ln = host_ln()
    norm = LinearNorm(PRepBNConfig(total_steps=T, r0=r0), ln, "norm1").train()
    randomise_repbn(norm.vfx_bn)
    for t in range(T + 3):
        lam = r0 * max(T - t, 0) / T
        assert norm.lam == pytest.approx(lam, rel=1e-6, abs=1e-12)
        x = tokens(seed=t)
        expect = lam * naive_ln(x, ln) + (1 - lam) * naive_repbn_train(x, norm.vfx_bn)
        y = norm(x)
        torch.testing.assert_close(y.to(F64), expect, rtol=1e-5, atol=1e-5)
        assert int(norm.vfx_iter) == max(T - t - 1, 0)
    assert int(norm.vfx_total) == T


def test_lambda_one_is_the_host_layernorm_bit_for_bit():
    ln = host_ln()
    reference = copy.deepcopy(ln)
    norm = LinearNorm(PRepBNConfig(total_steps=100), ln, "norm2").train()
    x = tokens()
    assert torch.equal(norm(x), reference(x))
    assert norm.weight is ln.weight and norm.bias is ln.bias  # adopted, same names


def test_warmup_is_pure_layernorm_and_leaves_bn_statistics():
    ln = host_ln()
    reference = copy.deepcopy(ln)
    norm = LinearNorm(PRepBNConfig(total_steps=4, warmup=3), ln, "norm1").train()
    bn = norm.vfx_bn.bn
    for t in range(3):
        x = tokens(seed=t).requires_grad_()
        assert norm.lam == 1.0
        y = norm(x)
        assert torch.equal(y, reference(x))
        y.pow(2).sum().backward()  # the statistics kept aside must not break autograd
        assert torch.equal(bn.running_mean, torch.zeros(16)) and int(bn.num_batches_tracked) == 0
        assert int(norm.vfx_iter) == 4 and int(norm.vfx_warm) == 2 - t
    x = tokens(seed=9)
    norm(x)  # first schedule step: λ = 1, BN statistics start moving
    mu, _, var_u = naive_bn_stats(x)
    torch.testing.assert_close(bn.running_mean.to(F64), 0.1 * mu)
    assert int(norm.vfx_iter) == 3 and norm.lam == pytest.approx(0.75)


def test_running_statistics_over_all_tokens():
    norm = LinearNorm(PRepBNConfig(total_steps=10), host_ln(), "norm1").train()
    x = tokens(B=4, N=9)
    norm(x)
    mu, _, var_u = naive_bn_stats(x)
    torch.testing.assert_close(norm.vfx_bn.bn.running_mean.to(F64), 0.1 * mu, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(norm.vfx_bn.bn.running_var.to(F64), 0.9 + 0.1 * var_u, rtol=1e-6, atol=1e-7)


def test_eval_is_repbn_affine_and_warns_while_unfinished():
    norm = LinearNorm(PRepBNConfig(total_steps=3), host_ln(), "norm1").eval()
    randomise_repbn(norm.vfx_bn)
    bn, x = norm.vfx_bn.bn, tokens()
    a = bn.weight.detach().to(F64) / torch.sqrt(bn.running_var.to(F64) + bn.eps) + norm.vfx_bn.alpha.detach().to(F64)
    b = bn.bias.detach().to(F64) - bn.weight.detach().to(F64) * bn.running_mean.to(F64) / torch.sqrt(
        bn.running_var.to(F64) + bn.eps)
    with pytest.warns(UserWarning, match="unfinished"):
        y = norm(x)
    torch.testing.assert_close(y.to(F64), a * x.to(F64) + b, rtol=1e-6, atol=1e-6)
    ra, rb = norm.vfx_bn.affine()
    torch.testing.assert_close(ra, a)
    torch.testing.assert_close(rb, b)
    norm.train()
    for _ in range(3):
        norm(tokens())
    norm.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        norm(x)  # schedule finished: silent


def test_compiled_schedule_matches_eager():
    eager = LinearNorm(PRepBNConfig(total_steps=3, warmup=1), host_ln(), "norm1").train()
    other = copy.deepcopy(eager)
    compiled = torch.compile(other)
    for t in range(5):
        x = tokens(seed=t).requires_grad_()
        y, yc = eager(x), compiled(x)
        torch.testing.assert_close(yc, y, rtol=1e-5, atol=1e-5)
        yc.pow(2).sum().backward()
    for name, buf in eager.named_buffers():
        torch.testing.assert_close(dict(other.named_buffers())[name], buf, rtol=1e-6, atol=1e-6)
    other.eval()
    eager.eval()
    torch.testing.assert_close(compiled(tokens()), eager(tokens()), rtol=1e-5, atol=1e-5)


def test_folded_linear_equals_linear_of_repbn():
    torch.manual_seed(0)
    rep = RepBN(16).eval()
    randomise_repbn(rep)
    for bias in (True, False):
        lin = nn.Linear(16, 24, bias=bias)
        folded = FoldedLinear(lin, *rep.affine())
        x = tokens()
        expect = lin(rep(x))
        torch.testing.assert_close(folded(x), expect, rtol=1e-5, atol=1e-5 * expect.abs().max().item())
        assert folded.original is lin


def test_restore_host_returns_the_layernorm():
    ln = host_ln()
    norm = LinearNorm(PRepBNConfig(total_steps=3), ln, "final")
    with torch.no_grad():
        norm.weight.mul_(2)  # fine-tuned host weights come back
    host = norm.restore_host()
    assert host is ln and host.weight is norm.weight


# --------------------------------------------------------------------------------------------------------- models
def test_prepbn_alone_starts_as_the_host_bit_for_bit():
    model = timm_model()
    x = image()
    model.train()
    with torch.no_grad():
        y0 = model(x)
    visionfx.patch(model, "prepbn", total_steps=10)
    assert len(norm_modules(model)) == 5  # norm1, norm2 of two blocks and the final norm
    with torch.no_grad():
        assert torch.equal(model(x), y0)


def test_slab_prepbn_patches_both_sites():
    model = timm_model()
    visionfx.patch(model, "slab", norm="prepbn", prepbn_steps=5, prepbn_warmup=1, adapter="timm_vit", backend="reference")
    records = visionfx.patching.patch_state(model)["records"]
    assert [(r["method"], r["site"]) for r in records] == [("slab", "attention"), ("prepbn", "norm")]
    norms = norm_modules(model)
    assert len(norms) == 5 and all(int(n.vfx_total) == 5 and int(n.vfx_warm) == 1 for n in norms)


def test_slab_prepbn_without_naming_the_adapter():
    visionfx.patch(timm_model(), "slab", norm="prepbn", prepbn_steps=5)


def test_train_reparameterize_unpatch_roundtrip():
    model = timm_model()
    x = image()
    keys0 = list(model.state_dict())
    visionfx.patch(model, "slab", norm="prepbn", prepbn_steps=3, adapter="timm_vit", backend="reference")
    perturb_model(model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for step in range(4):
        loss = model(image(seed=10 + step)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert torch.isfinite(loss)
    assert all(int(n.vfx_iter) == 0 and n.lam == 0.0 for n in norm_modules(model))
    model.eval()
    trained = {k: v.clone() for k, v in model.state_dict().items() if "vfx_" not in k}
    with torch.no_grad():
        y = model(x)
        visionfx.reparameterize(model)
        yf = model(x)
    assert all(n.folded == "identity" for n in norm_modules(model))
    for blk in model.blocks:
        assert isinstance(blk.attn.qkv, FoldedLinear) and isinstance(blk.mlp.fc1, FoldedLinear)
    assert isinstance(model.head, FoldedLinear)
    torch.testing.assert_close(yf, y, rtol=1e-4, atol=1e-5 * y.abs().max().item())
    assert not torch.allclose(model.blocks[0].attn.qkv.weight, trained["blocks.0.attn.qkv.weight"])
    visionfx.unpatch(model)
    assert list(model.state_dict()) == keys0
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k]), k  # the trained, unfused host weights


@pytest.mark.parametrize("family", ["vit", "deit_distilled", "deit3", "vit_reg", "vit_gap_nonsquare"])
def test_reparameterize_then_unpatch_is_exact(family):
    torch.manual_seed(0)
    model, x = FAMILIES[family].build(), FAMILIES[family].inputs(0)
    with torch.no_grad():
        for head in (model.head, getattr(model, "head_dist", None)):
            if head is not None:
                head.weight.normal_(0, 0.2)
        y0 = model(*x)
    keys0 = list(model.state_dict())
    visionfx.patch(model, "slab", norm="prepbn", prepbn_steps=4, adapter="timm_vit", backend="reference")
    perturb_model(model)
    with torch.no_grad(), pytest.warns(UserWarning, match="unfinished"):
        y = model(*x)
    assert not torch.allclose(y, y0)
    with torch.no_grad():
        visionfx.reparameterize(model)
        visionfx.reparameterize(model)  # idempotent
        torch.testing.assert_close(model(*x), y, rtol=1e-4, atol=1e-5 * y.abs().max().item())
    assert all(n.folded == "identity" for n in norm_modules(model))  # every site of these families folds
    if family == "deit_distilled":
        assert isinstance(model.head_dist, FoldedLinear)
    model.double()  # the originals kept aside follow the move
    visionfx.unpatch(model)
    assert all(p.dtype == F64 for p in model.parameters())
    model.float()
    with torch.no_grad():
        assert torch.equal(model(*x), y0)
    assert list(model.state_dict()) == keys0
    assert not any(isinstance(m, FoldedLinear) for m in model.modules())


def test_explicit_affine_where_folding_is_not_exact():
    model = timm_model(global_pool="max", fc_norm=False)  # max pooling does not commute with a per-channel affine map
    x = image()
    with torch.no_grad():
        y0 = model(x)
    visionfx.patch(model, "slab", norm="prepbn", prepbn_steps=4, adapter="timm_vit", backend="reference")
    perturb_model(model)
    model.blocks[1].attn.vfx_mixer.reads_input = True  # a mixer that reads the normalised input itself
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = model(x)
        visionfx.reparameterize(model)
        torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5 * y.abs().max().item())
    assert model.norm.folded == "affine" and type(model.head) is nn.Linear
    assert model.blocks[1].norm1.folded == "affine" and type(model.blocks[1].attn.qkv) is nn.Linear
    assert model.blocks[0].norm1.folded == "identity" and model.blocks[1].norm2.folded == "identity"
    visionfx.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(x), y0)


def test_fc_norm_role_folds_into_the_head():
    model = timm_model(class_token=False, global_pool="avg")  # fc_norm after the pooling, final norm is Identity
    x = image()
    norm = LinearNorm(PRepBNConfig(total_steps=1, r0=0.0), model.fc_norm, "fc_norm")
    set_submodule(model, "fc_norm", norm)
    randomise_repbn(norm.vfx_bn)
    norm.vfx_iter.zero_()  # a finished schedule: no warning
    model.eval()
    with torch.no_grad():
        y = model(x)
        visionfx.reparameterize(model)
        torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5 * y.abs().max().item())
    assert norm.folded == "identity" and isinstance(model.head, FoldedLinear)


def test_reparameterize_needs_eval_and_prepbn():
    model = timm_model()
    with pytest.raises(ValueError, match="no PRepBN"):
        visionfx.reparameterize(model)
    visionfx.patch(model, "prepbn", total_steps=4)
    model.train()
    with pytest.raises(RuntimeError, match="eval"):
        visionfx.reparameterize(model)


def test_recalibrate_bn_cumulative_average_without_dropout():
    model = timm_model(drop_path_rate=0.5, proj_drop_rate=0.3)
    visionfx.patch(model, "prepbn", total_steps=4)
    perturb_model(model)
    model.train()
    norms = norm_modules(model)
    captured = {id(n): [] for n in norms}
    hooks = [n.register_forward_pre_hook(lambda m, a: captured[id(m)].append(a[0].detach().clone())) for n in norms]
    loader = [(image(seed=s), torch.zeros(2)) for s in range(4)]
    visionfx.recalibrate_bn(model, loader, steps=3)
    for h in hooks:
        h.remove()
    assert model.training and all(n.training for n in norms)  # modes restored
    for n in norms:
        assert len(captured[id(n)]) == 3
        stats = [naive_bn_stats(x) for x in captured[id(n)]]
        mean = sum(s[0] for s in stats) / 3
        var = sum(s[2] for s in stats) / 3
        torch.testing.assert_close(n.vfx_bn.bn.running_mean.to(F64), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(n.vfx_bn.bn.running_var.to(F64), var, rtol=1e-5, atol=1e-6)
        assert n.vfx_bn.bn.momentum == 0.1 and int(n.vfx_iter) == 4  # schedule untouched
    first = [n.vfx_bn.bn.running_var.clone() for n in norms]
    visionfx.recalibrate_bn(model, loader, steps=3)  # dropout and drop path off: deterministic
    assert all(torch.equal(a, n.vfx_bn.bn.running_var) for a, n in zip(first, norms))
    with pytest.raises(ValueError, match="no batches"):
        visionfx.recalibrate_bn(model, [])


def test_save_load_deepcopy_pickle(tmp_path):
    model = timm_model()
    base = copy.deepcopy(model.state_dict())
    x = image()
    visionfx.patch(model, "slab", norm="prepbn", prepbn_steps=6, adapter="timm_vit", backend="reference")
    perturb_model(model)
    model.train()
    model(image(seed=5))  # advance the schedule: the counters must travel too
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = model(x)
        visionfx.save_pretrained(model, tmp_path / "p")
        fresh = timm_model()
        fresh.load_state_dict(base)
        visionfx.load_pretrained(fresh, tmp_path / "p")
        assert torch.equal(fresh(x), y)
        assert all(int(n.vfx_iter) == 5 for n in norm_modules(fresh))
        other = timm_model()
        visionfx.patch(other, "slab", norm="prepbn", prepbn_steps=6, adapter="timm_vit", backend="reference")
        other.load_state_dict(model.state_dict())
        assert torch.equal(other(x), y)
        visionfx.reparameterize(model)
        yf = model(x)
        clone = copy.deepcopy(model)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        for m in (clone, loaded):
            assert torch.equal(m(x), yf)
            visionfx.unpatch(m)
            assert not any(isinstance(mod, FoldedLinear) for mod in m.modules())
            assert torch.equal(m.blocks[0].attn.qkv.weight, base["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("family,method", [("open_clip", "prepbn"), ("open_clip_seq_first", "prepbn"),
                                           ("open_clip", "slab")])
def test_open_clip_folds_in_proj_and_c_fc(family, method):
    torch.manual_seed(0)
    fam = FAMILIES[family]
    model, x = fam.build(), fam.inputs(0)
    with torch.no_grad():
        y0 = model(*x)
    keys0 = list(model.state_dict())
    if method == "slab":
        visionfx.patch(model, "slab", norm="prepbn", prepbn_steps=4, adapter="open_clip", backend="reference")
    else:
        visionfx.patch(model, "prepbn", total_steps=4)
    perturb_model(model)
    blk = model.transformer.resblocks[0]
    in_proj = blk.attn.in_proj_weight
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = model(*x)
        visionfx.reparameterize(model)
        torch.testing.assert_close(model(*x), y, rtol=1e-4, atol=1e-5 * y.abs().max().item())
    roles = {n.role: n.folded for n in norm_modules(model)}
    assert roles == {"norm1": "identity", "norm2": "identity", "final": "affine"}  # proj has no bias to fold into
    assert isinstance(blk.mlp.c_fc, FoldedLinear) and blk.attn.in_proj_weight is not in_proj
    model.double()  # the originals kept aside follow the move
    visionfx.unpatch(model)
    assert blk.attn.in_proj_weight is in_proj and all(p.dtype == F64 for p in model.parameters())
    model.float()
    with torch.no_grad():
        assert torch.equal(model(*x), y0)
    assert list(model.state_dict()) == keys0
    assert type(blk.mlp.c_fc) is nn.Linear


def test_prepbn_refuses_dit():
    torch.manual_seed(0)
    fam = FAMILIES["dit"]
    model, x = fam.build(), fam.inputs(0)
    with torch.no_grad():
        y0 = model(*x)
    with pytest.raises(TypeError, match="DiT"):
        visionfx.patch(model, "prepbn", total_steps=10)
    with pytest.raises(TypeError, match="DiT"):
        visionfx.patch(model, "slab", norm="prepbn", prepbn_steps=10, adapter="timm_vit", backend="reference")
    assert not visionfx.is_patched(model)  # the slab part was rolled back
    with torch.no_grad():
        assert torch.equal(model(*x), y0)
