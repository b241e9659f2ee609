"""Model-family adapters (timm_vit incl. DiT, open_clip): detection, site selection, token layouts, masks, patch
dropout, call signatures, and the wrappers' plumbing against independent oracles.

The plumbing oracle: a wrapper fed a naive float64 softmax mixer (explicit exp / sum, no SDPA) must reproduce the
host's own attention (timm ``Attention``, ``nn.MultiheadAttention``, open_clip ``Attention``) on whole models; that
checks the qkv split, head order, q/k norms, head scaling, merge, output projection and seq-first transposes without
trusting any visionfx method. Registered mixers run on the PyTorch reference backend: kernels are tested elsewhere.
"""

from __future__ import annotations

import copy
import io
from types import SimpleNamespace

import open_clip
import pytest
import timm
import torch
from open_clip.transformer import VisionTransformer as OpenClipViT
from torch import nn

import visionfx
from visionfx.methods.base import TokenMixer
from visionfx.patches.base import PatchedAttention
from visionfx.registry import find_adapter, get_adapter
from families import CLIP_CONFIG, FAMILIES, OPEN_CLIP_TOWER, dit_inputs


class NaiveSoftmax(TokenMixer):
    """Softmax attention written out in float64: ``o_i = Σ_j exp(s q_i·k_j) v_j / Σ_j exp(s q_i·k_j)``."""

    method = "naive_softmax"

    def forward(self, q, k, v, x, layout):
        q64, k64, v64 = q.double(), k.double(), v.double()
        logits = self.scale * (q64.unsqueeze(3) * k64.unsqueeze(2)).sum(-1)  # [B, h, N, N]
        w = torch.exp(logits - logits.amax(-1, keepdim=True))
        return ((w / w.sum(-1, keepdim=True)) @ v64).to(q.dtype)


def apply_mixer(model, adapter: str, mixer_cls, layers=None):
    """Patch through the adapter directly with a test-only mixer (not a registered method)."""
    spec = SimpleNamespace(name="naive", site="attention", module_cls=mixer_cls)
    ad = get_adapter(adapter).adapter
    return ad, ad.apply(model, spec, SimpleNamespace(layers=layers))


def build(family):
    torch.manual_seed(0)
    return FAMILIES[family].build(), FAMILIES[family].inputs(0)


def patched_paths(model):
    return [n for n, m in model.named_modules() if isinstance(m, PatchedAttention)]


def custom_tower(**kw):
    """An open_clip tower of CustomResidualAttentionBlocks (open_clip's own Attention)."""
    args = dict(OPEN_CLIP_TOWER, qk_norm=True, scale_heads=True, scale_attn_inner=True)
    args.update(kw)
    torch.manual_seed(0)
    tower = OpenClipViT(**args).eval()
    with torch.no_grad():  # head_scale and the inner/q/k norms start at 1/0: make them matter
        for name, p in tower.named_parameters():
            if "head_scale" in name or ".ln_" in name:
                p.add_(0.3 * torch.randn_like(p))
    return tower


def record_layouts(model):
    """Forward pre-hooks on every mixer recording ``(P0, grid, N)`` per call."""
    seen = []

    def hook(module, args):
        q, layout = args[0], args[4]
        seen.append((layout.num_prefix_tokens, layout.grid, q.shape[2]))

    for m in model.modules():
        if isinstance(m, TokenMixer):
            m.register_forward_pre_hook(hook)
    return seen


# --- detection --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_detects_family(family):
    model, _ = build(family)
    assert find_adapter(model, "attention").name == FAMILIES[family].adapter


def test_detects_whole_clip_models_and_skips_text_tower():
    clip = open_clip.CLIP(**CLIP_CONFIG)
    text_cfg = dict(CLIP_CONFIG["text_cfg"])
    custom = open_clip.CustomTextCLIP(CLIP_CONFIG["embed_dim"], CLIP_CONFIG["vision_cfg"], text_cfg)
    for model in (clip, custom):
        assert find_adapter(model, "attention").name == "open_clip"
        visionfx.patch(model, "slab", backend="reference")
        assert patched_paths(model) == [f"visual.transformer.resblocks.{i}.attn" for i in range(2)]
        text_attn = [m for n, m in model.named_modules() if not n.startswith("visual.") and n.endswith(".attn")]
        assert text_attn and all(type(m) is nn.MultiheadAttention for m in text_attn)
        visionfx.unpatch(model)


def _swin():
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, embed_dim=16,
                             depths=(1, 1), num_heads=(1, 1), window_size=7, num_classes=10)


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Linear(4, 4)),
    lambda: timm.create_model("resnet10t", pretrained=False, num_classes=10),
    _swin,
], ids=["sequential", "resnet", "swin"])
def test_unsupported_model_lists_families(make):
    model = make()
    with pytest.raises(TypeError, match="Supported model families") as err:
        visionfx.patch(model, "slab", backend="reference")
    assert "timm_vit" in str(err.value) and "open_clip" in str(err.value)
    assert not visionfx.is_patched(model) and not patched_paths(model)


class TwoTowers(nn.Module):
    """Matches both adapters: an open_clip tower at ``.visual`` and timm blocks beside a ``patch_embed``."""

    def __init__(self):
        super().__init__()
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=56, patch_size=8, embed_dim=64,
                                depth=2, num_heads=2)
        self.visual = OpenClipViT(**OPEN_CLIP_TOWER)
        self.patch_embed, self.blocks = vit.patch_embed, vit.blocks

    def forward(self, x):
        return self.visual(x)


def test_adapter_override():
    model = TwoTowers()
    with pytest.raises(TypeError, match="several adapters match"):
        visionfx.patch(model, "slab", backend="reference")
    visionfx.patch(model, "slab", backend="reference", adapter="open_clip")
    assert patched_paths(model) == ["visual.transformer.resblocks.0.attn", "visual.transformer.resblocks.1.attn"]
    assert visionfx.patching.patch_state(model)["records"][0]["adapter"] == "open_clip"
    visionfx.unpatch(model)
    visionfx.patch(model, "slab", backend="reference", adapter="timm_vit")
    assert patched_paths(model) == ["blocks.0.attn", "blocks.1.attn"]
    visionfx.unpatch(model)
    # a forced adapter is used even where it cannot work, and says so; the model is left as it was
    tower, _ = build("open_clip")
    with pytest.raises(TypeError, match="timm_vit"):
        visionfx.patch(tower, "slab", backend="reference", adapter="timm_vit")
    vit, _ = build("vit")
    with pytest.raises(TypeError, match="open_clip"):
        visionfx.patch(vit, "slab", backend="reference", adapter="open_clip")
    assert not patched_paths(tower) and not patched_paths(vit) and not visionfx.is_patched(vit)
    with pytest.raises(ValueError, match="did you mean 'open_clip'"):
        visionfx.patch(tower, "slab", backend="reference", adapter="open_clp")


# --- site selection and explain ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,path", [
    ("vit", "blocks.{}.attn"),
    ("dit", "blocks.{}.attn"),
    ("open_clip", "transformer.resblocks.{}.attn"),
    ("open_clip_clip", "visual.transformer.resblocks.{}.attn"),
])
def test_layers_selects_sites(family, path):
    model, x = build(family)
    with torch.no_grad():
        y0 = model(*x)
    visionfx.patch(model, "slab", layers=[1], backend="reference")
    assert patched_paths(model) == [path.format(1)]
    assert not isinstance(model.get_submodule(path.format(0)), PatchedAttention)
    visionfx.unpatch(model)
    with pytest.raises(ValueError, match=r"out of range"):
        visionfx.patch(model, "slab", layers=[0, 2], backend="reference")
    assert not visionfx.is_patched(model) and not patched_paths(model)
    with torch.no_grad():
        assert torch.equal(model(*x), y0)


def test_explain_lists_patched_sites():
    model, _ = build("open_clip_clip")
    visionfx.patch(model, "slab", backend="reference")
    out = io.StringIO()
    rows = visionfx.explain(model, file=out)
    paths = ["visual.transformer.resblocks.0.attn", "visual.transformer.resblocks.1.attn"]
    assert [r["path"] for r in rows] == paths and all(r["method"] == "slab" for r in rows)
    table = [line.split()[0] for line in out.getvalue().splitlines() if "resblocks" in line]
    assert table == paths  # the text tower's transformer.resblocks.*.attn are not listed
    assert all(r["params_added"] == sum(p.numel() for p in model.get_submodule(r["path"]).vfx_mixer.parameters())
               for r in rows)


# --- masks, call signatures ------------------------------------------------------------------------------------------


def test_masks_raise_in_timm_wrapper():
    for family in ("vit", "dit"):
        model, _ = build(family)
        visionfx.patch(model, "slab", backend="reference")
        attn = model.blocks[0].attn
        n = attn.vfx_layout.num_tokens
        x = torch.randn(2, n, 64)
        attn(x)
        with pytest.raises(ValueError, match="attention mask"):
            attn(x, attn_mask=torch.zeros(n, n))
        with pytest.raises(ValueError, match="is_causal"):
            attn(x, is_causal=True)


def test_masks_raise_in_open_clip_wrappers():
    tower, _ = build("open_clip")
    visionfx.patch(tower, "slab", backend="reference")
    attn = tower.transformer.resblocks[0].attn
    x, other = torch.randn(2, 50, 64), torch.randn(2, 50, 64)
    out, weights = attn(x, x, x)
    assert out.shape == x.shape and weights is None
    with pytest.raises(ValueError, match="attention mask"):
        attn(x, x, x, attn_mask=torch.zeros(50, 50))
    with pytest.raises(ValueError, match="key_padding_mask"):
        attn(x, x, x, key_padding_mask=torch.zeros(2, 50, dtype=torch.bool))
    with pytest.raises(ValueError, match="is_causal"):
        attn(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match="self-attention only"):
        attn(x, other, other)
    with pytest.raises(ValueError, match="attention mask"):  # through the host's own call path
        tower.transformer(x, attn_mask=torch.zeros(50, 50))
    custom = custom_tower()
    visionfx.patch(custom, "slab", backend="reference")
    with pytest.raises(ValueError, match="attention mask"):
        custom.transformer.resblocks[0].attn(x, attn_mask=torch.zeros(50, 50))


# --- patch dropout ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make,size", [
    (lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=56, patch_size=8, embed_dim=64,
                               depth=2, num_heads=2, patch_drop_rate=0.5), 56),
    (lambda: OpenClipViT(**dict(OPEN_CLIP_TOWER, patch_dropout=0.5)), 56),
], ids=["timm", "open_clip"])
def test_active_patch_dropout_raises_in_training(make, size):
    model = make()
    x = torch.randn(2, 3, size, size)
    visionfx.patch(model, "slab", backend="reference")
    model.train()
    with pytest.raises(RuntimeError, match="patch dropout|patch_dropout"):
        model(x)
    if isinstance(model, OpenClipViT):
        with pytest.raises(RuntimeError, match="patch_dropout"):
            model.forward_intermediates(x)
    model.eval()
    assert torch.isfinite(model(x)).all()


# --- grid and prefix tokens come from the model ----------------------------------------------------------------------


def _vit(**kw):
    args = dict(pretrained=False, img_size=56, patch_size=8, embed_dim=64, depth=2, num_heads=2)
    args.update(kw)
    return lambda: timm.create_model("vit_tiny_patch16_224", **args)


LAYOUT_CASES = {
    # (builder, input, expected P0, expected grid); N = P0 + H*W
    "two_prefix_7x7": (lambda: FAMILIES["deit_distilled"].build(), (2, 3, 56, 56), 2, (7, 7)),
    "registers": (lambda: FAMILIES["vit_reg"].build(), (2, 3, 56, 56), 3, (7, 7)),
    # N = 1 + 8*6 = 49 is a perfect square: int(sqrt(N)) would claim a 7x7 grid without prefix
    "cls_8x6_square_n": (_vit(img_size=(64, 48)), (2, 3, 64, 48), 1, (8, 6)),
    "no_prefix_8x6": (lambda: FAMILIES["vit_gap_nonsquare"].build(), (2, 3, 64, 48), 0, (8, 6)),
    "dit": (lambda: FAMILIES["dit"].build(), None, 0, (8, 8)),
    "open_clip": (lambda: FAMILIES["open_clip"].build(), (2, 3, 56, 56), 1, (7, 7)),
    "open_clip_seq_first_8x6": (lambda: FAMILIES["open_clip_seq_first"].build(), (2, 3, 64, 48), 1, (8, 6)),
}


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_layout_comes_from_model(case):
    make, shape, p0, grid = LAYOUT_CASES[case]
    torch.manual_seed(0)
    model = make().eval()
    inputs = dit_inputs(0) if shape is None else (torch.randn(*shape),)
    visionfx.patch(model, "slab", backend="reference")
    mixers = [m for m in model.modules() if isinstance(m, TokenMixer)]
    assert mixers and all((m.host.num_prefix_tokens, tuple(m.host.grid)) == (p0, grid) for m in mixers)
    seen = record_layouts(model)
    with torch.no_grad():
        model(*inputs)
    assert seen == [(p0, grid, p0 + grid[0] * grid[1])] * len(mixers)


def test_dynamic_image_size_refreshes_grid_per_call():
    model = FAMILIES["vit_dynamic"].build()
    visionfx.patch(model, "slab", backend="reference")
    seen = record_layouts(model)
    for (h, w), grid in (((56, 56), (7, 7)), ((64, 48), (8, 6)), ((40, 72), (5, 9)), ((56, 56), (7, 7))):
        seen.clear()
        with torch.no_grad():
            model(torch.randn(1, 3, h, w))
        assert seen == [(1, grid, 1 + grid[0] * grid[1])] * 2


# --- call signatures and plumbing against the hosts' own attention --------------------------------------------------


def test_dit_attention_called_positionally():
    model, (x, t, y) = build("dit")
    visionfx.patch(model, "slab", backend="reference")
    calls = []
    for block in model.blocks:
        block.attn.register_forward_pre_hook(lambda m, a, k: calls.append((len(a), dict(k))), with_kwargs=True)
    with torch.no_grad():
        out = model(x, t, y)
    assert calls == [(1, {})] * 2 and out.shape == (2, 8, 16, 16)


PLUMBING = {name: FAMILIES[name].build for name in FAMILIES}
PLUMBING["open_clip_custom_blocks"] = custom_tower


@pytest.mark.parametrize("family", list(PLUMBING))
def test_naive_softmax_mixer_reproduces_host(family):
    torch.manual_seed(0)
    model = PLUMBING[family]()
    adapter = FAMILIES[family].adapter if family in FAMILIES else "open_clip"
    inputs = FAMILIES[family].inputs(0) if family in FAMILIES else (torch.randn(2, 3, 56, 56),)
    with torch.no_grad():
        y0 = model(*inputs)
        ad, record = apply_mixer(model, adapter, NaiveSoftmax)
        assert len(record["paths"]) == 2
        torch.testing.assert_close(model(*inputs), y0, rtol=1e-4, atol=1e-5)
        ad.remove(model, record)
        assert not patched_paths(model) and torch.equal(model(*inputs), y0)


def test_open_clip_mha_wrapper_unbatched_and_seq_first_match_host():
    torch.manual_seed(0)
    for batch_first in (True, False):
        host = nn.MultiheadAttention(64, 4, batch_first=batch_first).eval()
        x = torch.randn(2, 5, 64) if batch_first else torch.randn(5, 2, 64)
        x1 = torch.randn(5, 64)
        ref = host(x, x, x, need_weights=False)[0]
        ref1 = host(x1, x1, x1, need_weights=False)[0]
        holder = nn.Module()
        holder.visual = OpenClipViT(**dict(OPEN_CLIP_TOWER, width=64, heads=4))
        holder.visual.transformer.resblocks[0].attn = host
        ad, record = apply_mixer(holder, "open_clip", NaiveSoftmax, layers=[0])
        wrapper = holder.visual.transformer.resblocks[0].attn
        wrapper.vfx_layout.grid, wrapper.vfx_layout.num_prefix_tokens = (2, 2), 1  # N = 5 tokens
        with torch.no_grad():
            torch.testing.assert_close(wrapper(x, x, x)[0], ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(wrapper(x1, x1, x1)[0], ref1, rtol=1e-5, atol=1e-6)


def _reference_patched_mha(wrapper, x):
    """The patched open_clip attention on batch-first ``x [B, N, C]``, written per head with explicit slices of
    ``in_proj_weight``: q, k, v of head g are rows ``g·d``, ``C + g·d``, ``2C + g·d`` (+ d); the mixer's math is the
    wrapper's own, the plumbing around it is not."""
    W, b = wrapper.in_proj_weight, wrapper.in_proj_bias
    C, h = W.shape[1], wrapper.num_heads
    d = C // h
    heads = [[x @ W[part * C + g * d: part * C + (g + 1) * d].T + b[part * C + g * d: part * C + (g + 1) * d]
              for g in range(h)] for part in range(3)]
    q, k, v = (torch.stack(p, dim=1) for p in heads)  # [B, h, N, d]
    o = wrapper.vfx_mixer(q, k, v, x, wrapper.vfx_layout)
    merged = torch.cat([o[:, g] for g in range(h)], dim=-1)
    return merged @ wrapper.out_proj.weight.T + wrapper.out_proj.bias


def test_open_clip_batch_first_and_seq_first_equal_reference():
    torch.manual_seed(0)
    seq_first = FAMILIES["open_clip_seq_first"].build()
    batch_first = OpenClipViT(**dict(OPEN_CLIP_TOWER, image_size=(64, 48))).eval()
    batch_first.load_state_dict(seq_first.state_dict())
    assert not seq_first.transformer.batch_first and batch_first.transformer.batch_first
    for model in (seq_first, batch_first):
        visionfx.patch(model, "slab", backend="reference")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in seq_first.named_parameters():
            if "vfx_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    batch_first.load_state_dict(seq_first.state_dict())
    image = torch.randn(2, 3, 64, 48)
    x = torch.randn(2, 49, 64)
    with torch.no_grad():
        torch.testing.assert_close(seq_first(image), batch_first(image), rtol=1e-5, atol=1e-6)
        for model in (seq_first, batch_first):
            attn = model.transformer.resblocks[1].attn
            xin = x if attn.batch_first else x.transpose(0, 1)
            out, _ = attn(xin, xin, xin, need_weights=False)
            out = out if attn.batch_first else out.transpose(0, 1)
            torch.testing.assert_close(out, _reference_patched_mha(attn, x), rtol=1e-5, atol=1e-6)


def _attention_under_test(kind):
    """``(model, get site, call host-style, call softmax_attention)`` for one attention site of each wrapper."""
    if kind in ("timm", "dit"):
        model = build("vit" if kind == "timm" else "dit")[0]
        x = torch.randn(2, 50 if kind == "timm" else 64, 64)
        return model, lambda m: m.blocks[0].attn, lambda a: a(x), lambda a: a.softmax_attention(x)
    x = torch.randn(2, 50, 64)
    get = lambda m: m.transformer.resblocks[0].attn  # noqa: E731
    if kind == "open_clip":
        return (build("open_clip")[0], get, lambda a: a(x, x, x, need_weights=False)[0],
                lambda a: a.softmax_attention(x, x, x, need_weights=False)[0])
    return custom_tower(), get, lambda a: a(x), lambda a: a.softmax_attention(x)


@pytest.mark.parametrize("kind", ["timm", "dit", "open_clip", "open_clip_custom"])
def test_softmax_attention_equals_unpatched_layer(kind):
    torch.manual_seed(0)
    model, get, call, soft = _attention_under_test(kind)
    host = get(model)
    twin = copy.deepcopy(host)
    with torch.no_grad():
        y0 = call(host)
        visionfx.patch(model, "slab", backend="reference")
        wrapper = get(model)
        assert isinstance(wrapper, PatchedAttention)
        assert torch.equal(soft(wrapper), y0)
        # the host's weights are shared, not copied: a change through the wrapper shows in the softmax path
        proj = wrapper.proj if kind in ("timm", "dit") else wrapper.out_proj
        twin_proj = twin.proj if kind in ("timm", "dit") else twin.out_proj
        proj.weight.mul_(1.5)
        twin_proj.weight.mul_(1.5)
        assert torch.equal(soft(wrapper), call(twin))
        visionfx.unpatch(model)
        assert get(model) is host and torch.equal(call(host), call(twin))


def test_state_dict_keys_unchanged_for_open_clip():
    for model in (build("open_clip")[0], build("open_clip_seq_first")[0], custom_tower()):
        keys = set(model.state_dict())
        visionfx.patch(model, "slab", backend="reference")
        patched = set(model.state_dict())
        assert keys <= patched and all(".vfx_" in k for k in patched - keys)


# --- open_clip custom blocks and norm sites --------------------------------------------------------------------------


def test_open_clip_custom_blocks_patch_and_unpatch():
    model = custom_tower()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        y0 = model(x)
    visionfx.patch(model, "slab", backend="reference")
    assert patched_paths(model) == ["transformer.resblocks.0.attn", "transformer.resblocks.1.attn"]
    model.train()
    model(x).pow(2).mean().backward()
    assert model.transformer.resblocks[0].attn.head_scale.grad is not None
    visionfx.unpatch(model)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), y0)


def test_open_clip_scaled_cosine_blocks_refused():
    model = OpenClipViT(**dict(OPEN_CLIP_TOWER, scaled_cosine_attn=True))
    with pytest.raises(TypeError, match="CustomResidualAttentionBlock with scaled-cosine attention"):
        visionfx.patch(model, "slab", backend="reference")
    assert not visionfx.is_patched(model) and not patched_paths(model)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_open_clip_norm_sites():
    ad = get_adapter("open_clip").adapter
    clip = open_clip.CLIP(**CLIP_CONFIG)
    sites = ad.norm_sites(clip)
    expected = [(f"visual.transformer.resblocks.{i}.{ln}", role) for i in range(2)
                for ln, role in (("ln_1", "norm1"), ("ln_2", "norm2"))] + [("visual.ln_post", "final")]
    assert [(p, r) for p, _, r in sites] == expected
    assert all(clip.get_submodule(p) is m for p, m, _ in sites)
    after_pool = OpenClipViT(**dict(OPEN_CLIP_TOWER, final_ln_after_pool=True))
    assert [r for _, _, r in ad.norm_sites(after_pool)] == ["norm1", "norm2"] * 2
