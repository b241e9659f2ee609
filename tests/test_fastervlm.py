"""FasterVLM / VTC-CLS on tiny random LLaVA and LLaVA-NeXT (MLLM.md §1, §7.3 invariants 1-10).

Oracles: eager CLIP ``attentions`` for the CLS rows, a hand-built ``inputs_embeds`` through the unpatched model for the
pruned prompt, the HF processor's token-count formula and an independent re-derivation of the anyres packing order.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

import visionfx
from tiny_llava import (IMAGE_TOKEN, NUM_PATCHES, PINPOINTS, build_llava, build_llava_next, count_host_syncs, greedy,
                        left_pad, llava_batch, llava_next_batch, llava_next_tokens, prompt, select)
from visionfx.methods.fastervlm import FasterVLMConfig, VTCCLSConfig, cls_row_scores
from visionfx.patches.llava import LlavaParts, get_handle, shrink_placeholders

FEATURE_LAYER = 2  # vision_feature_layer=-2 on a 4-layer tower
TEXTS = [([5, 6], [7, 8]), ([5, 6, 9, 10, 11], [7])]



@pytest.fixture(scope="module")
def llava():
    return build_llava()


@pytest.fixture(scope="module")
def llava_eager():
    return build_llava(attn_implementation="eager")  # same seed: same weights as `llava`


@pytest.fixture(scope="module")
def batch():
    return llava_batch(TEXTS)


@pytest.fixture(scope="module")
def reference(llava, batch):
    with torch.no_grad():
        logits = llava(**batch).logits
    return {"logits": logits, "gen": greedy(llava, batch)}


@pytest.fixture
def patched(llava):
    def apply(method="fastervlm", **kw):
        visionfx.patch(llava, method, **kw)
        return get_handle(llava)

    yield apply
    if visionfx.is_patched(llava):
        visionfx.unpatch(llava)


def eager_cls_rows(model, pixel_values):
    """Oracle: ``[Lv, C, N]`` head-mean CLS rows of every layer, from eager attention weights."""
    with torch.no_grad():
        att = model.model.vision_tower(pixel_values, output_attentions=True).attentions
    return torch.stack([a[:, :, 0, 1:].mean(1) for a in att])


def features(out):
    """Per-image features of ``get_image_features`` (``pooler_output`` in 5.x, the list itself in 4.x)."""
    return list(getattr(out, "pooler_output", out))


def oracle_topk(rows, keep):
    return rows.topk(keep, dim=-1).indices.sort(-1).values


# --- config ------------------------------------------------------------------------------------------------------
def test_config_counts_and_errors():
    assert FasterVLMConfig().kept_tokens(576) == 144
    assert [FasterVLMConfig(reduction=r).kept_tokens(576) for r in (0.25, 0.5, 0.75, 0.9, 0.95)] == [432, 288, 144,
                                                                                                    58, 29]
    assert FasterVLMConfig(keep=0.25).kept_tokens(576) == 144 and FasterVLMConfig(keep=1.0).kept_tokens(576) == 576
    assert FasterVLMConfig(score_layers=range(16, 23)).score_layers == tuple(range(16, 23))
    for bad in ({"keep": 10, "reduction": 0.5}, {"keep": 0}, {"keep": 1.5}, {"keep": True}, {"reduction": 1.0},
                {"score_dtype": "fp16"}, {"score_layers": [3, 3]}, {"layers": [0]}):
        with pytest.raises(ValueError):
            FasterVLMConfig(**bad)
    with pytest.raises(ValueError, match="exceeds"):
        FasterVLMConfig(keep=600).kept_tokens(576)
    with pytest.raises(ValueError, match="did you mean"):
        visionfx.get_config("fastervlm").replace(kep=3)
    cfg = visionfx.load_config(Path(__file__).parents[1] / "configs" / "fastervlm.yaml")
    assert isinstance(cfg, FasterVLMConfig) and cfg.keep == 144
    assert VTCCLSConfig().resolve_score_layers(24, 22) == tuple(range(16, 23))
    assert VTCCLSConfig().resolve_score_layers(4, 2) == (2,)


# --- common invariants 1-3 and FasterVLM 4 --------------------------------------------------------------------------
def test_keep_all_is_bit_identical(llava, batch, reference, patched):
    for keep in (1.0, NUM_PATCHES):
        patched(keep=keep)
        with torch.no_grad():
            assert torch.equal(llava(**batch).logits, reference["logits"])
        gen = greedy(llava, batch)
        assert torch.equal(gen.sequences, reference["gen"].sequences)
        assert all(torch.equal(a, b) for a, b in zip(gen.scores, reference["gen"].scores))
        visionfx.unpatch(llava)


def test_unpatch_restores_everything(llava, batch, reference, patched):
    keys = list(llava.state_dict())
    attn = (llava.config._attn_implementation, llava.config.text_config._attn_implementation)
    signatures = {n: inspect.signature(getattr(o, n)) for o, n in
                  [(llava, "forward"), (llava, "generate"), (llava.model, "get_image_features")]}
    handle = patched(keep=8)
    for name, sig in signatures.items():  # transformers routes kwargs by these signatures
        owner = llava.model if name == "get_image_features" else llava
        assert name in owner.__dict__ and inspect.signature(getattr(owner, name)) == sig
    handle.set_attn_implementation({"text_config": "eager"})
    assert llava.config.text_config._attn_implementation == "eager"
    with torch.no_grad():
        assert llava(**batch).logits.shape[1] == batch["input_ids"].shape[1] - 8
    visionfx.unpatch(llava)
    assert not any(n in llava.__dict__ for n in ("forward", "generate"))
    assert "get_image_features" not in llava.model.__dict__
    assert all(not layer._forward_pre_hooks for layer in LlavaParts.of(llava).vision_layers)
    assert (llava.config._attn_implementation, llava.config.text_config._attn_implementation) == attn
    assert list(llava.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(llava(**batch).logits, reference["logits"])


def test_existing_instance_wrappers_and_save_load(llava, batch, reference, patched, tmp_path):
    calls = []

    def outer(*args, **kwargs):  # stands in for accelerate's device hook, an instance attribute on forward
        calls.append(1)
        return type(llava).forward(llava, *args, **kwargs)

    llava.forward = outer
    try:
        patched(keep=8)
        with torch.no_grad():
            logits = llava(**batch).logits
        assert calls and logits.shape[1] == batch["input_ids"].shape[1] - 8
        visionfx.unpatch(llava)
        assert llava.__dict__["forward"] is outer
    finally:
        del llava.forward
    patched("vtc_cls", keep=8, score_layers=[1, 2])
    visionfx.save_pretrained(llava, tmp_path)
    twin = build_llava()
    visionfx.load_pretrained(twin, tmp_path)
    assert visionfx.get_config(twin) == visionfx.get_config(llava)
    with torch.no_grad():
        assert torch.equal(twin(**batch).logits, llava(**batch).logits)


def test_cached_equals_uncached(llava, batch, patched):
    patched(keep=6)
    cached, uncached = greedy(llava, batch), greedy(llava, batch, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores), atol=1e-5, rtol=0)


@pytest.mark.parametrize("images_per_row", [[1, 1], [2, 1]])
def test_batch_equals_per_sample(llava, patched, images_per_row):
    data = llava_batch(TEXTS, images_per_row)
    handle = patched(keep=7)
    out = greedy(llava, data)
    kept = handle.kept_indices
    assert kept.shape == (sum(images_per_row), 7)
    L = data["input_ids"].shape[1]
    start = 0
    for row, k in enumerate(images_per_row):
        one = select(data, row, images_per_row)
        ref = greedy(llava, one)
        assert torch.equal(out.sequences[row, L:], ref.sequences[0, one["input_ids"].shape[1]:])
        torch.testing.assert_close(torch.stack(out.scores)[:, row], torch.stack(ref.scores)[:, 0], atol=1e-5, rtol=0)
        assert torch.equal(handle.kept_indices, kept[start:start + k])
        start += k


# --- FasterVLM invariants 5-8 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method,kw,layers", [("fastervlm", {}, [FEATURE_LAYER]), ("vtc_cls", {}, [FEATURE_LAYER]),
                                              ("vtc_cls", {"score_layers": [1, 2]}, [1, 2]),
                                              ("fastervlm", {"score_layers": [0, 3]}, [0, 3])])
def test_cls_row_equals_eager_attentions(llava, llava_eager, batch, patched, method, kw, layers):
    handle = patched(method, keep=5, **kw)
    assert handle.score_layers == tuple(layers)
    with torch.no_grad():
        llava.model.get_image_features(pixel_values=batch["pixel_values"])
    oracle = eager_cls_rows(llava_eager, batch["pixel_values"])[layers].sum(0)
    torch.testing.assert_close(handle.scores, oracle, atol=1e-6, rtol=0)
    assert torch.equal(handle.kept_indices, oracle_topk(oracle, 5))


def test_cls_row_scores_model_dtype():
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    torch.manual_seed(0)
    layer = CLIPEncoderLayer(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4)).eval()
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        ref = cls_row_scores(layer, x)
        low = cls_row_scores(layer.to(torch.bfloat16), x.bfloat16(), "model")
    assert ref.dtype == torch.float32 and low.dtype == torch.bfloat16 and ref.shape == (2, 16)
    torch.testing.assert_close(low.float(), ref, atol=2e-2, rtol=0)


def test_pruned_prompt_matches_hand_built_oracle(llava, llava_eager, batch, patched):
    handle = patched(keep=6)
    with torch.no_grad():
        out = llava(**batch, labels=batch["input_ids"])
    logits = out.logits
    kept = handle.kept_indices
    assert kept.shape == (2, 6) and bool((kept.diff(dim=-1) > 0).all())
    prepared = handle.prepare_inputs(batch)
    with torch.no_grad():
        feats = torch.cat(features(llava.model.get_image_features(pixel_values=batch["pixel_values"])))
    assert int((prepared["input_ids"] == IMAGE_TOKEN).sum()) == feats.shape[0] == 2 * 6
    ids, mask = prepared["input_ids"], prepared["attention_mask"]
    visionfx.unpatch(llava)
    # Oracle: unpatched features of the eager-chosen patches, written into the embedded shortened prompt by hand.
    chosen = oracle_topk(eager_cls_rows(llava_eager, batch["pixel_values"])[FEATURE_LAYER], 6)
    with torch.no_grad():
        hidden = llava.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
        full = llava.model.multi_modal_projector(hidden)
        embeds = llava.get_input_embeddings()(ids).clone()
        for b in range(2):
            embeds[b, (ids[b] == IMAGE_TOKEN).nonzero().flatten()] = full[b, chosen[b]]
        expected = llava(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    labels = torch.where((ids == IMAGE_TOKEN) | (mask == 0), -100, ids)  # image and padding positions ignored
    loss = torch.nn.functional.cross_entropy(expected[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, loss, atol=1e-5, rtol=0)


def test_forgetting_to_shrink_raises(llava, batch, patched):
    handle = patched(keep=8)
    with pytest.raises(ValueError, match="do not match"), torch.no_grad():
        llava.model(**batch)  # the inner model is not wrapped: the placeholder runs are still 16 long
    with torch.no_grad():
        out = llava.model(**handle.prepare_inputs(batch))
    assert out.last_hidden_state.shape[1] == batch["input_ids"].shape[1] - 8


def test_shrink_is_idempotent_and_generate_keeps_prompt(llava, batch, patched):
    handle = patched(keep=4)
    once = handle.prepare_inputs(batch)
    twice = handle.prepare_inputs({**batch, "input_ids": once["input_ids"], "attention_mask": once["attention_mask"]})
    assert torch.equal(once["input_ids"], twice["input_ids"])
    again = shrink_placeholders(once["input_ids"], once["attention_mask"], IMAGE_TOKEN, [16, 16], [4, 4])
    assert again[0] is once["input_ids"]
    out = greedy(llava, batch)
    L = batch["input_ids"].shape[1]
    assert torch.equal(out.sequences[:, :L], batch["input_ids"])
    assert torch.equal(out.sequences[:, L:], greedy(llava, once).sequences[:, once["input_ids"].shape[1]:])
    plain = llava.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(plain[:, :L], batch["input_ids"]) and plain.shape[1] == L + 3


def test_shrink_placeholders_against_lists():
    I = IMAGE_TOKEN
    rows = [[1, 5] + [I] * 6 + [7] + [I] * 3, [1, 5, 6, 7] + [I] * 9 + [8]]  # row 1: three 3-token images back to back
    ids, mask = left_pad(rows)
    labels = torch.where(ids == I, torch.full_like(ids, -100), ids)
    new_ids, new_mask, new_labels = shrink_placeholders(ids, mask, I, [6, 3, 3, 3, 3], [2, 1, 1, 1, 1], 0, labels)
    expect = [[1, 5, I, I, 7, I], [1, 5, 6, 7, I, I, I, 8]]
    exp_ids, exp_mask = left_pad(expect)
    assert torch.equal(new_ids, exp_ids) and torch.equal(new_mask, exp_mask)
    assert torch.equal(new_labels, torch.where((exp_ids == I) | (exp_mask == 0), -100, exp_ids))
    with pytest.raises(ValueError, match="does not match"):
        shrink_placeholders(ids, mask, I, [6, 4, 2, 6], [1, 1, 1, 1])
    with pytest.raises(ValueError, match="image tokens"):
        shrink_placeholders(ids, mask, I, [6, 3], [1, 1])


# --- LLaVA-NeXT (invariants 9-10) ---------------------------------------------------------------------------------
def _best_resolution(h, w):
    best, key = None, None
    for ph, pw in PINPOINTS:
        scale = min(pw / w, ph / h)
        eff = min(int(w * scale) * int(h * scale), w * h)
        cand = (eff, -(ph * pw - eff))
        if key is None or cand > key:
            best, key = (ph, pw), cand
    return best


def packed_sources(h, w, offset=0):
    """Oracle packing order of one image: source id (crop * 16 + patch, plus offset) per position, -1 for newline."""
    ph, pw = _best_resolution(h, w)
    nph, npw, g = ph // 32, pw // 32, 4
    H, W = nph * g, npw * g
    rows, cols = range(H), range(W)
    if w / h > W / H:
        pad = (H - int(round(h * W / w, 7))) // 2
        rows = range(pad, H - pad)
    else:
        pad = (W - int(round(w * H / h, 7))) // 2
        cols = range(pad, W - pad)
    out = list(range(NUM_PATCHES))
    for r in rows:
        out += [(1 + (r // g) * npw + c // g) * NUM_PATCHES + (r % g) * g + c % g for c in cols] + [-1]
    return [s + offset if s >= 0 else s for s in out], 1 + nph * npw, len(rows)


SIZES = [(40, 70), (64, 32)]


@pytest.fixture(scope="module")
def nxt():
    return build_llava_next()


@pytest.fixture(scope="module")
def nxt_batch(nxt):
    return llava_next_batch(nxt, TEXTS, SIZES)


@pytest.fixture
def nxt_patched(nxt):
    yield lambda **kw: (visionfx.patch(nxt, "fastervlm", **kw), get_handle(nxt))[1]
    if visionfx.is_patched(nxt):
        visionfx.unpatch(nxt)


def test_llava_next_keep_all_and_counts(nxt, nxt_batch, nxt_patched):
    with torch.no_grad():
        ref_logits = nxt(**nxt_batch).logits
        ref_feats = features(nxt.model.get_image_features(nxt_batch["pixel_values"], nxt_batch["image_sizes"]))
    handle = nxt_patched(keep=1.0)
    with torch.no_grad():
        assert torch.equal(nxt(**nxt_batch).logits, ref_logits)
    assert handle.full_counts == [llava_next_tokens(*hw) for hw in SIZES] == [f.shape[0] for f in ref_feats]
    assert all(bool(p.all()) for p in handle.kept_positions)


def test_llava_next_pruning_oracle(nxt, nxt_batch, nxt_patched):
    keep, pv, sizes = 4, nxt_batch["pixel_values"], nxt_batch["image_sizes"]
    eager = build_llava_next(attn_implementation="eager")
    sources, crops, offset = [], [], 0
    for hw in SIZES:
        src, c, _ = packed_sources(*hw, offset=offset)
        sources.append(src)
        crops.append(c)
        offset += c * NUM_PATCHES
    flat = torch.cat([pv[b, :c] for b, c in enumerate(crops)])
    chosen = oracle_topk(eager_cls_rows(eager, flat)[FEATURE_LAYER], keep)
    kept_src = set((chosen + torch.arange(len(chosen))[:, None] * NUM_PATCHES).flatten().tolist())
    with torch.no_grad():
        full = features(nxt.model.get_image_features(pv, sizes))
    handle = nxt_patched(keep=keep)
    with torch.no_grad():
        pruned = features(nxt.model.get_image_features(pv, sizes))
    base = 0
    for b, (hw, src) in enumerate(zip(SIZES, sources)):
        sel = torch.tensor([s < 0 or s in kept_src for s in src])
        inside = sum(1 for s in src if s >= base + NUM_PATCHES and s in kept_src)
        rows = packed_sources(*hw)[2]
        assert handle.kept_counts[b] == keep + inside + rows == int(sel.sum())
        assert torch.equal(handle.kept_positions[b], sel)
        assert torch.equal(pruned[b], full[b][sel])
        base += crops[b] * NUM_PATCHES


def test_llava_next_packing_syncs_once_per_call(nxt, nxt_batch, nxt_patched, monkeypatch):
    """Pruning the packed features of a batch of images reads the device once (the kept counts), not per image."""
    from visionfx.methods import fastervlm as fastervlm_mod

    handle = nxt_patched(keep=4)
    syncs = count_host_syncs(monkeypatch, fastervlm_mod)
    with torch.no_grad():
        nxt.model.get_image_features(nxt_batch["pixel_values"], nxt_batch["image_sizes"])
    monkeypatch.undo()
    assert syncs.count("_prune_packed") == 1 and len(handle.kept_counts) == len(SIZES)


def test_llava_next_batch_equals_per_sample(nxt, nxt_batch, nxt_patched):
    nxt_patched(keep=5)
    out = greedy(nxt, nxt_batch)
    L = nxt_batch["input_ids"].shape[1]
    assert torch.equal(out.sequences[:, :L], nxt_batch["input_ids"])
    for row in range(2):
        one = select(nxt_batch, row)
        ref = greedy(nxt, one)
        assert torch.equal(out.sequences[row, L:], ref.sequences[0, one["input_ids"].shape[1]:])
        torch.testing.assert_close(torch.stack(out.scores)[:, row], torch.stack(ref.scores)[:, 0], atol=1e-5, rtol=0)


def test_llava_next_encoder_output_and_embeds_paths(nxt, nxt_batch, nxt_patched):
    handle = nxt_patched(keep=5)
    pixel = greedy(nxt, nxt_batch)
    L = nxt_batch["input_ids"].shape[1]
    prepared = handle.prepare_inputs(nxt_batch)
    if handle.parts.supports_mm_encoder_outputs():  # transformers >= 5.18
        assert "pixel_values" not in prepared and "mm_encoder_outputs" in prepared
    via_mm = greedy(nxt, prepared)
    assert torch.equal(via_mm.sequences[:, prepared["input_ids"].shape[1]:], pixel.sequences[:, L:])
    embeds = handle.prepare_inputs(nxt_batch, as_embeds=True)
    via_embeds = greedy(nxt, embeds)
    assert torch.equal(via_embeds.sequences, pixel.sequences[:, L:])
    torch.testing.assert_close(torch.stack(via_embeds.scores), torch.stack(pixel.scores), atol=1e-5, rtol=0)
    cached_free = greedy(nxt, nxt_batch, use_cache=False)
    assert torch.equal(cached_free.sequences, pixel.sequences)


# --- bad input ----------------------------------------------------------------------------------------------------
def test_bad_inputs(llava, batch, patched):
    from transformers import LlamaConfig, LlamaForCausalLM

    with pytest.raises(TypeError, match="Supported model families"):
        visionfx.patch(LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, vocab_size=32)), "fastervlm")
    with pytest.raises(ValueError, match="exceeds"):
        visionfx.patch(llava, "fastervlm", keep=NUM_PATCHES + 1)
    assert not visionfx.is_patched(llava) and "forward" not in llava.__dict__
    assert all(not layer._forward_pre_hooks for layer in LlavaParts.of(llava).vision_layers)
    with pytest.raises(ValueError, match="out of range"):
        visionfx.patch(llava, "fastervlm", score_layers=[4])
    llava.config.vision_feature_select_strategy = "full"
    try:
        with pytest.raises(NotImplementedError, match="default"):
            visionfx.patch(llava, "fastervlm")
    finally:
        llava.config.vision_feature_select_strategy = "default"
    patched(keep=8)
    with pytest.raises(RuntimeError, match="already patched"):
        visionfx.patch(llava, "fastervlm")
    text_only, mask = left_pad([prompt([5, 6], [7], 0), prompt([5], [7, 8, 9], 0)])
    with pytest.raises(ValueError, match="no image token"):
        llava(input_ids=text_only, attention_mask=mask, pixel_values=batch["pixel_values"])
    right = torch.flip(batch["attention_mask"], dims=[1])
    with pytest.raises(ValueError, match="padding_side = 'left'"):
        llava.generate(input_ids=batch["input_ids"], attention_mask=right, pixel_values=batch["pixel_values"])
    with pytest.raises(ValueError, match="pass input_ids"):
        llava(inputs_embeds=torch.zeros(2, 5, 64), pixel_values=batch["pixel_values"])
    with pytest.raises(NotImplementedError, match="full"), torch.no_grad():
        llava.model.get_image_features(batch["pixel_values"], vision_feature_select_strategy="full")
    with pytest.raises(ValueError, match="re-patch"), torch.no_grad():
        llava.model.get_image_features(batch["pixel_values"], vision_feature_layer=-1)
    with torch.no_grad():  # text-only prompts pass through untouched
        assert llava(input_ids=text_only, attention_mask=mask).logits.shape[1] == text_only.shape[1]


def test_true_first_partitions_stably():
    """The True positions of each row in ascending order, then the False ones (what FasterVLM's packing and DyVTE's
    spans and kept positions slice), against a list-built oracle, for a batch and a single row."""
    from visionfx.patches.llava import true_first

    mask = torch.rand(3, 17, generator=torch.Generator().manual_seed(0)) > 0.6
    mask[1] = False
    mask[2] = True
    want = [[i for i in range(17) if row[i]] + [i for i in range(17) if not row[i]] for row in mask.tolist()]
    assert true_first(mask).tolist() == want
    assert true_first(mask[0]).tolist() == want[0]
