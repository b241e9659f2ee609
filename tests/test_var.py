"""VAR on a tiny random LLaVA (MLLM.md §3, §7.3 invariants 1-3 and 17-24).

Oracles: a float64 row-by-row loop of the paper's update, a direct transcription of the official code's update, the
eager model's own attention weights (the inputs of the modified layer are identical), per-sample runs. Sinks are made
by injecting a massive activation (100·RMS(x) in dimension D) into the input of layer 2; on this 64-wide model
|x_d|/RMS ≤ 8, so τ = 5 (§7.3.22).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

import tiny_llava
import visionfx
from tiny_llava import IMAGE_TOKEN, left_pad, prompt, select
from visionfx.methods import var as var_mod
from visionfx.methods.var import VARConfig, find_sink_dims, known_sink_dims, redistribute
from visionfx.patches.llava import LlavaParts, get_handle, layer_hidden, with_layer_hidden
from var_support import D, INJECT, TAU, inject, oracle_row, synthetic
from var_support import batch, cleanup, llava  # noqa: F401 (pytest fixtures, used by name)

L = 4


def greedy(model, data, **kw):
    return tiny_llava.greedy(model, data, suppress_tokens=[IMAGE_TOKEN], **kw)


def same_generation(a, b, row_a=None, row_b=None, len_a=0, len_b=0):
    ra = slice(None) if row_a is None else slice(row_a, row_a + 1)
    rb = slice(None) if row_b is None else slice(row_b, row_b + 1)
    assert torch.equal(a.sequences[ra, len_a:], b.sequences[rb, len_b:])
    torch.testing.assert_close(torch.stack(a.scores)[:, ra], torch.stack(b.scores)[:, rb], atol=1e-5, rtol=0)


# --- oracles (the float64 row oracle of the paper's update is var_support.oracle_row) -------------------------------
def official_update(attn, im: int, pa: int, sink_inds: torch.Tensor, p_code: float, rho_code: float, summ: float):
    """The public code's update (batch 1, prefill rows after the image), transcribed step by step."""
    attn = attn.clone()
    vis = torch.tensor([int(i) for i in sink_inds if im <= i < im + pa], dtype=torch.long)
    if len(vis) == 0:
        return attn
    image_attn = attn[:, :, :, im:im + pa]
    portion = image_attn[:, :, :, vis - im].sum(-1) / (image_attn + 1e-6).sum(-1)
    coords = torch.nonzero((portion <= rho_code) & (image_attn.sum(-1) >= summ))
    text = torch.tensor([int(i) for i in sink_inds if not im <= i < im + pa], dtype=torch.long)
    for h in range(attn.shape[1]):
        rows = coords[coords[:, 1] == h][:, 2]
        rows = rows[rows >= im + pa]
        for q in rows.tolist():
            selected = attn[0, h, q].clone()
            copied = selected.clone()
            selected[text] *= p_code
            selected[vis] *= p_code
            budget = (copied[vis].sum() + copied[text].sum()) * (1 - p_code)
            copied[vis] *= 0
            ratios = copied[im:im + pa] / copied[im:im + pa].sum()
            selected[im:im + pa] += budget * ratios
            attn[0, h, q] = selected
    return attn


# --- config --------------------------------------------------------------------------------------------------------
def test_config_presets_and_known_dims(llava):
    from transformers import LlamaConfig

    cfg = visionfx.load_config(Path(__file__).parents[1] / "configs" / "var.yaml")
    assert isinstance(cfg, VARConfig) and (cfg.tau, cfg.rho, cfg.p, cfg.summ) == (20.0, 0.5, 0.6, 0.2)
    assert (VARConfig(preset="official_code").p, VARConfig(preset="official_code").rho) == (0.4, 0.5)
    assert [VARConfig(preset=n).rho for n in ("hallucination", "general", "vision_centric")] == [0.5, 0.8, 0.9]
    for bad in ({"p": 1.5}, {"rho": -0.1}, {"mode": "sdpa"}, {"preset": "paper"}, {"sink_dims": [3, 3]},
                {"preset": "general", "rho": 0.3}, {"layers": [1]}, {"tau": float("nan")}):
        with pytest.raises(ValueError):
            VARConfig(**bad)
    assert known_sink_dims(LlamaConfig(hidden_size=4096)) == (1415, 2533)
    assert known_sink_dims(LlamaConfig(hidden_size=5120)) == (2100, 4743)
    assert known_sink_dims(LlamaConfig(hidden_size=64)) is None
    with pytest.raises(ValueError, match="sink_dims"):
        visionfx.patch(llava, "var")
    with pytest.raises(ValueError, match="out of range"):
        visionfx.patch(llava, "var", sink_dims=[64])
    assert not visionfx.is_patched(llava)


# --- invariants 17, 18, 19 (unit) and 21 ---------------------------------------------------------------------------
@pytest.mark.parametrize("p,rho,summ", [(0.6, 0.5, 0.2), (0.4, 0.8, 0.1), (1.0, 0.0, 0.0)])
def test_redistribute_against_row_oracle(p, rho, summ):
    attn, image, sinks, rows = synthetic()
    out = redistribute(attn, image, sinks, rows, p, rho, summ)
    selected = 0
    for b in range(attn.shape[0]):
        img = set(image[b].nonzero().flatten().tolist())
        snk = set(sinks[b].nonzero().flatten().tolist())
        for h in range(attn.shape[1]):
            for i in range(attn.shape[2]):
                row = attn[b, h, i]
                if not rows[b, i]:
                    assert torch.equal(out[b, h, i], row)
                    continue
                expected, sel = oracle_row(row, img, snk, p, rho, summ)
                torch.testing.assert_close(out[b, h, i], expected, atol=1e-12, rtol=0)
                if not sel:
                    assert torch.equal(out[b, h, i], row)
                    continue
                selected += 1
                new = out[b, h, i]
                assert abs(float(new.sum() - row.sum())) <= 1e-6  # 17
                sink_cols = sorted(snk)
                receivers = sorted(img - snk)
                moved = float((row[sink_cols] - new[sink_cols]).sum())
                assert moved == pytest.approx(p * float(row[sink_cols].sum()), abs=1e-12)  # 18
                gain = new[receivers] - row[receivers]
                assert float(gain.sum()) == pytest.approx(moved, abs=1e-6)
                torch.testing.assert_close(gain, moved * row[receivers] / row[receivers].sum(), atol=1e-6, rtol=0)
                others = sorted(set(range(len(row))) - img - snk)
                assert torch.equal(new[others], row[others])  # 19
    assert selected > 0


def test_official_code_preset_matches_transcription():
    attn, image, sinks, rows = synthetic(seed=3, B=1)
    # A border row: visual sink share exactly 0.5 — the code's +1e-6 per image weight selects it, the paper's ε not.
    border = torch.zeros(14, dtype=torch.float64)
    border[[0, 11]] = 0.3
    border[4], border[3] = 0.2, 0.2
    attn[0, 0, 12] = border
    sink_inds = sinks[0].nonzero().flatten()
    expected = official_update(attn, 2, 8, sink_inds, p_code=0.6, rho_code=0.5, summ=0.2)
    cfg = VARConfig(preset="official_code")
    out = redistribute(attn, image, sinks, rows, cfg.p, cfg.rho, cfg.summ, official=True)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    assert not torch.equal(out[0, 0, 12], attn[0, 0, 12])
    paper = redistribute(attn, image, sinks, rows, cfg.p, cfg.rho, cfg.summ)
    assert torch.equal(paper[0, 0, 12], attn[0, 0, 12])
    assert bool((out != attn).any(-1).sum() > 1)


# --- model: invariants 1, 19, 20, 22 -------------------------------------------------------------------------------
def test_save_load_round_trip(llava, batch, cleanup, tmp_path):
    hook, _ = inject(llava, batch, INJECT)
    cleanup(hook)
    visionfx.patch(llava, "var", sink_dims=[D], tau=TAU, summ=0.1, preset="general")
    with torch.no_grad():
        logits = llava(**batch).logits
    visionfx.save_pretrained(llava, tmp_path)
    config = visionfx.get_config(llava)
    visionfx.unpatch(llava)
    visionfx.load_pretrained(llava, tmp_path)
    assert visionfx.get_config(llava) == config and config.sink_dims == (D,) and config.rho == 0.8
    with torch.no_grad():
        assert torch.equal(llava(**batch).logits, logits)


def test_unpatch_restores_and_registration(llava, batch, cleanup):
    from transformers.masking_utils import AttentionMaskInterface

    with torch.no_grad():
        ref = llava(**batch).logits
    keys = list(llava.state_dict())
    attn = (llava.config._attn_implementation, llava.config.text_config._attn_implementation,
            llava.config.vision_config._attn_implementation)
    sig = inspect.signature(llava.forward)
    handle = get_handle(visionfx.patch(llava, "var", sink_dims=[D], tau=TAU))
    assert llava.config.text_config._attn_implementation == "visionfx_var"
    assert llava.config.vision_config._attn_implementation == attn[2]
    assert "visionfx_var" in AttentionMaskInterface._global_mapping
    assert inspect.signature(llava.forward) == sig and handle.layers == (2,)
    visionfx.unpatch(llava)
    assert (llava.config._attn_implementation, llava.config.text_config._attn_implementation,
            llava.config.vision_config._attn_implementation) == attn
    assert list(llava.state_dict()) == keys and "forward" not in llava.__dict__
    assert not any(layer.self_attn in var_mod._MODULES for layer in LlavaParts.of(llava).llm_layers)
    assert all(not layer._forward_pre_hooks for layer in LlavaParts.of(llava).llm_layers)
    with torch.no_grad():
        assert torch.equal(llava(**batch).logits, ref)


@pytest.mark.parametrize("overrides", [{"p": 0.0}, {"tau": float("inf")}, {"summ": 1.5}])
def test_disabled_settings_equal_eager_bit_for_bit(llava, batch, cleanup, overrides):
    from transformers.masking_utils import AttentionMaskInterface

    hook, _ = inject(llava, batch, INJECT)
    cleanup(hook)
    with torch.no_grad():
        ref = llava(**batch).logits
    handle = get_handle(visionfx.patch(llava, "var", **{"sink_dims": [D], "tau": TAU, **overrides}))
    with torch.no_grad():
        assert torch.equal(llava(**batch).logits, ref)
    if "tau" not in overrides:
        assert bool((handle.sink_masks[2] & handle.state.image).any())
    # the mask registration is what keeps causal and padding masks: without it the function gets no mask
    saved = AttentionMaskInterface._global_mapping.pop("visionfx_var")
    try:
        with torch.no_grad():
            assert (llava(**batch).logits - ref).abs().max() > 1e-3
    finally:
        AttentionMaskInterface._global_mapping["visionfx_var"] = saved


def test_no_sinks_is_a_no_op(llava, batch, cleanup):
    with torch.no_grad():
        ref = llava(**batch).logits
    assert find_sink_dims(llava, [batch], tau_c=TAU) == []
    handle = get_handle(visionfx.patch(llava, "var", sink_dims=[D], tau=TAU))
    with torch.no_grad():
        assert torch.equal(llava(**batch).logits, ref)
    assert not any(bool(m.any()) for m in handle.sink_masks.values())


def test_sink_detection_with_injected_activation(llava, batch, cleanup):
    text_ids, text_mask = left_pad([prompt([5, 6, 7], [8], 0), prompt([5], [9, 10, 11, 12], 0)])
    text = {"input_ids": text_ids, "attention_mask": text_mask}
    hook_b, targets = inject(llava, batch, INJECT)
    cleanup(hook_b)
    dims, stats = find_sink_dims(llava, [batch], tau_c=TAU, return_stats=True)
    hook_b.remove()
    hook_t, _ = inject(llava, text, [[0, 2], [0, 3]])
    cleanup(hook_t)
    assert find_sink_dims(llava, [text], tau_c=TAU) == [D]
    hook_t.remove()
    assert dims == [D] and stats[D]["layers"] == [2, 3]
    hook_b, _ = inject(llava, batch, INJECT)
    cleanup(hook_b)
    handle = get_handle(visionfx.patch(llava, "var", sink_dims=[D], tau=TAU))
    with torch.no_grad():
        llava(**batch)
    assert [m.nonzero().tolist() for m in [handle.sink_masks[2]]] == [[[b, t] for b in range(2) for t in targets[b]]]


def test_attention_rows_against_eager_oracle(llava, batch, cleanup):
    offsets = [INJECT[0], [0]]  # row 1: a text sink only, so it must stay untouched
    hook, targets = inject(llava, batch, offsets)
    cleanup(hook)
    with torch.no_grad():
        eager = llava(**batch, output_attentions=True).attentions
    visionfx.patch(llava, "var", sink_dims=[D], tau=TAU, summ=0.1)
    layers = LlavaParts.of(llava).llm_layers
    seen = {}
    grab = layers[3].register_forward_pre_hook(lambda m, a, k: seen.__setitem__("x", layer_hidden(a, k)),
                                               with_kwargs=True)
    cleanup(grab)
    with torch.no_grad():
        out = llava(**batch, output_attentions=True).attentions
    grab.remove()
    for layer in (0, 1):
        assert torch.equal(out[layer], eager[layer])
    assert torch.equal(out[2][1], eager[2][1])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    image = set((ids[0] == IMAGE_TOKEN).nonzero().flatten().tolist())
    last_img = max(image)
    modified = 0
    for h in range(out[2].shape[1]):
        for i in range(ids.shape[1]):
            if i <= last_img or not mask[0, i]:
                assert torch.equal(out[2][0, h, i], eager[2][0, h, i])
                continue
            expected, sel = oracle_row(eager[2][0, h, i], image, set(targets[0]), 0.6, 0.5, 0.1)
            torch.testing.assert_close(out[2][0, h, i].double(), expected, atol=1e-6, rtol=0)
            modified += sel
    assert modified > 0
    visionfx.unpatch(llava)
    # the last layer is plain eager attention on its (changed) input
    feed = layers[3].register_forward_pre_hook(lambda m, a, k: with_layer_hidden(a, k, seen["x"]), with_kwargs=True)
    cleanup(feed)
    with torch.no_grad():
        assert torch.equal(llava(**batch, output_attentions=True).attentions[3], out[3])
    feed.remove()
    visionfx.patch(llava, "var", sink_dims=[D], tau=TAU, summ=0.1, except_last_layer=False)
    with torch.no_grad():
        last = llava(**batch, output_attentions=True).attentions
    assert not torch.equal(last[3][0], out[3][0])


# --- invariants 2, 3, 23, 24 ---------------------------------------------------------------------------------------
def test_decoding_uses_prefill_sets_per_sample(llava, batch, cleanup, monkeypatch):
    hook, targets = inject(llava, batch, INJECT)
    cleanup(hook)
    handle = get_handle(visionfx.patch(llava, "var", sink_dims=[D], tau=TAU, summ=0.1))
    calls = []

    def spy(attn, image, sinks, rows, **kw):
        before = attn.clone()  # the weights may be written in place (out=, aliasing attn in an fp32 model)
        new = redistribute(attn, image, sinks, rows, **kw)
        calls.append((before, image.clone(), sinks.clone(), rows.clone(), new.clone()))
        return new

    monkeypatch.setattr(var_mod, "redistribute", spy)
    out = greedy(llava, batch)
    P = batch["input_ids"].shape[1]
    prefill_sinks = handle.sink_masks[2]
    decode = [c for c in calls if c[0].shape[2] == 1]
    assert len(decode) == 7 and any(not torch.equal(c[0], c[4]) for c in decode)
    for t, (attn, image, sinks, rows, new) in enumerate(decode):
        S = attn.shape[-1]
        assert S == P + t + 1
        assert torch.equal(sinks[:, :P], prefill_sinks) and not bool(sinks[:, P:].any())
        assert bool(rows.all())
        for b in range(2):
            img = set(image[b].nonzero().flatten().tolist())
            for h in range(attn.shape[1]):
                expected, _ = oracle_row(attn[b, h, 0], img, set(targets[b]), 0.6, 0.5, 0.1)
                torch.testing.assert_close(new[b, h, 0].double(), expected, atol=1e-6, rtol=0)
    monkeypatch.undo()
    same_generation(out, greedy(llava, batch, use_cache=False))
    hook.remove()
    for row in range(2):
        one = select(batch, row)
        h1, _ = inject(llava, one, [INJECT[row]])
        cleanup(h1)
        same_generation(out, greedy(llava, one), row, 0, P, one["input_ids"].shape[1])
        h1.remove()


def test_hybrid_equals_eager(llava, batch, cleanup):
    hook, _ = inject(llava, batch, INJECT)
    cleanup(hook)
    visionfx.patch(llava, "var", sink_dims=[D], tau=TAU, summ=0.1)
    with torch.no_grad():
        eager = llava(**batch).logits
    eager_gen = greedy(llava, batch)
    visionfx.unpatch(llava)
    visionfx.patch(llava, "var", sink_dims=[D], tau=TAU, summ=0.1, mode="hybrid")
    with torch.no_grad():
        hybrid = llava(**batch).logits
    torch.testing.assert_close(hybrid, eager, atol=1e-5, rtol=0)
    same_generation(greedy(llava, batch), eager_gen)
    visionfx.unpatch(llava)
    with torch.no_grad():
        assert (llava(**batch).logits - eager).abs().max() > 1e-4  # VAR did change something


def test_inputs_embeds_and_text_only(llava, batch, cleanup):
    hook, _ = inject(llava, batch, INJECT)
    cleanup(hook)
    visionfx.patch(llava, "var", sink_dims=[D], tau=TAU, summ=0.1)
    ids = batch["input_ids"]
    with torch.no_grad():
        ref = llava(**batch).logits
        feats = llava.model.get_image_features(pixel_values=batch["pixel_values"])
        feats = torch.cat(list(getattr(feats, "pooler_output", feats)))
        embeds = llava.get_input_embeddings()(ids).masked_scatter((ids == IMAGE_TOKEN)[..., None], feats)
        with pytest.raises(ValueError, match="image_mask"):
            llava(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
        out = llava(inputs_embeds=embeds, attention_mask=batch["attention_mask"], image_mask=ids == IMAGE_TOKEN)
    torch.testing.assert_close(out.logits, ref, atol=1e-6, rtol=0)
    right = torch.flip(batch["attention_mask"], dims=[1])
    with pytest.raises(ValueError, match="padding_side"):
        llava(input_ids=ids, attention_mask=right, pixel_values=batch["pixel_values"])
