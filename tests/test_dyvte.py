"""DyVTE on tiny random LLaVA / LLaVA-NeXT (MLLM.md §2, §7.3 invariants 1-3 and 11-16).

Oracles: a text-only reference run layer by layer (layers 0..k on the full prompt, the non-image positions gathered,
layers k+1..L−1 with their original RoPE positions and a causal + padding mask built here, final norm and head);
per-sample runs for batches; hand-computed router features; synthetic logits for the label rule.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import pytest
import torch

import tiny_llava
import visionfx
from tiny_llava import (IMAGE_TOKEN, NUM_PATCHES, build_llava, build_llava_next, left_pad, llava_batch,
                        llava_next_batch, prompt, select)
from visionfx.methods.dyvte import DyVTEConfig, Router, exit_decision, router_features
from visionfx.methods.dyvte_io import routers_from_official, save_routers
from visionfx.methods.dyvte_train import answer_start, branch_logits, exit_labels, train_routers
from visionfx.patches.llava import LlavaParts, get_handle

TEXTS = [([5, 6], [7, 8, 9]), ([5, 6, 9, 10, 11], [7, 3])]
L = 4



@pytest.fixture(scope="module", params=["eager", "sdpa"])
def llava(request):
    return build_llava(attn_implementation=request.param)


@pytest.fixture(scope="module")
def sdpa_llava():
    return build_llava(attn_implementation="sdpa")


@pytest.fixture(scope="module")
def batch():
    return llava_batch(TEXTS)


def patch(model, **kw):
    visionfx.patch(model, "dyvte", **kw)
    return get_handle(model)


@pytest.fixture
def unpatch_after():
    models = []
    yield models.append
    for m in models:
        if visionfx.is_patched(m):
            visionfx.unpatch(m)


def greedy(model, data, **kw):
    """8 greedy tokens; the image token is never generated (it would be a placeholder without a cache)."""
    return tiny_llava.greedy(model, data, suppress_tokens=[IMAGE_TOKEN], **kw)


def same_generation(a, b, row_a=slice(None), row_b=slice(None), len_a=0, len_b=0):
    row_a, row_b = (slice(r, r + 1) if isinstance(r, int) else r for r in (row_a, row_b))
    assert torch.equal(a.sequences[row_a, len_a:], b.sequences[row_b, len_b:])
    torch.testing.assert_close(torch.stack(a.scores)[:, row_a], torch.stack(b.scores)[:, row_b], atol=1e-5, rtol=0)


def text_only_reference(model, data, k):
    """Independent reference (§7.3.11): last-position logits with the image gone after layer k."""
    parts = LlavaParts.of(model)
    out = {}
    hook = parts.llm_layers[k].register_forward_hook(
        lambda m, a, o: out.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            model(**data)
    finally:
        hook.remove()
    ids, mask = data["input_ids"], data["attention_mask"]
    B = ids.shape[0]
    keep = [(ids[b] != IMAGE_TOKEN).nonzero().flatten() for b in range(B)]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    h = torch.stack([out["h"][b, keep[b]] for b in range(B)])
    pos = torch.stack([positions[b, keep[b]] for b in range(B)])
    valid = torch.stack([mask[b, keep[b]] for b in range(B)]).bool()
    M = h.shape[1]
    allowed = torch.zeros(B, 1, M, M, dtype=torch.bool)
    for b in range(B):
        for i in range(M):
            for j in range(M):
                allowed[b, 0, i, j] = (j <= i and bool(valid[b, j])) or i == j
    if model.config.text_config._attn_implementation == "eager":
        attn_mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    else:
        attn_mask = allowed
    lm = parts.language_model
    with torch.no_grad():
        cos, sin = lm.rotary_emb(h, pos)
        for layer in parts.llm_layers[k + 1:]:
            h = layer(h, attention_mask=attn_mask, position_embeddings=(cos, sin), position_ids=pos)
            h = h[0] if isinstance(h, tuple) else h
        return model.get_output_embeddings()(lm.norm(h))[:, -1]


def cache_lengths(cache) -> list[int]:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [int(layer.keys.shape[-2]) for layer in layers]
    return [int(k.shape[-2]) for k in cache.key_cache]


# --- config, router, registration ------------------------------------------------------------------------------
def test_config_and_router_shapes():
    cfg = visionfx.load_config(Path(__file__).parents[1] / "configs" / "dyvte.yaml")
    assert isinstance(cfg, DyVTEConfig) and cfg.threshold == 0.5 and cfg.batch_policy == "exact"
    for bad in ({"threshold": 1.0}, {"threshold": 0}, {"exit_layer": -1}, {"batch_policy": "first"},
                {"router_hidden": 0}, {"layers": [1]}, {"exit_layer": True}):
        with pytest.raises(ValueError):
            DyVTEConfig(**bad)
    r = Router(64)
    assert r.w1.weight.shape == (2048, 128) and r.w2.weight.shape == (2, 2048)
    assert r.w1.bias is None and r.w2.bias is None and r.act.approximate == "none"
    assert sum(p.numel() for p in Router(4096).parameters()) == 2 * 4096 * 2048 + 4096  # 16.78 M per layer
    x = torch.randn(3, 128)
    expected = torch.nn.functional.gelu(x @ r.w1.weight.T) @ r.w2.weight.T
    torch.testing.assert_close(r(x), expected)


def test_unpatch_restores_everything(sdpa_llava, batch):
    model = sdpa_llava
    with torch.no_grad():
        ref = model(**batch).logits
    keys = list(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    attn = model.config.text_config._attn_implementation
    sigs = {n: inspect.signature(getattr(model, n)) for n in ("forward", "generate")}
    handle = patch(model, exit_layer=1)
    assert all(inspect.signature(getattr(model, n)) == s for n, s in sigs.items())
    added = [k for k in model.state_dict() if k not in keys]
    assert added and all(k.startswith("vfx_routers.") for k in added) and len(added) == 2 * L
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in added}
    assert len(handle.routers) == L
    with torch.no_grad():
        assert model(**batch).logits.shape[1] == batch["input_ids"].shape[1] - NUM_PATCHES
    visionfx.unpatch(model)
    assert list(model.state_dict()) == keys
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.config.text_config._attn_implementation == attn
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in LlavaParts.of(model).llm_layers)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref)


# --- invariant 11: forced exit equals the text-only reference ------------------------------------------------------
@pytest.mark.parametrize("k", [0, 1, 2])
def test_forced_exit_equals_text_only_reference(llava, batch, unpatch_after, k):
    expected = text_only_reference(llava, batch, k)
    handle = patch(llava, exit_layer=k)
    unpatch_after(llava)
    with torch.no_grad():
        logits = llava(**batch).logits
    assert handle.compact_from == k + 1 and handle.exit_layers.tolist() == [k, k]
    assert logits.shape[1] == batch["input_ids"].shape[1] - NUM_PATCHES
    torch.testing.assert_close(logits[:, -1], expected, atol=1e-5, rtol=0)
    kept = handle.kept_positions
    assert torch.equal(kept, torch.stack([(r != IMAGE_TOKEN).nonzero().flatten() for r in batch["input_ids"]]))
    with torch.no_grad():
        full = llava(**batch, restore_length=True).logits
    image = batch["input_ids"] == IMAGE_TOKEN
    assert full.shape[:2] == batch["input_ids"].shape and bool((full[image] == 0).all())
    assert torch.equal(full[~image].view(2, -1, full.shape[-1]), logits)


# --- invariant 12: no exit is bit-identical -------------------------------------------------------------------------
def test_last_layer_exit_and_silent_routers_are_bit_identical(llava, batch, unpatch_after):
    with torch.no_grad():
        ref = llava(**batch).logits
    ref_gen = greedy(llava, batch)
    patch(llava, exit_layer=L - 1)
    unpatch_after(llava)
    with torch.no_grad():
        assert torch.equal(llava(**batch).logits, ref)
    visionfx.unpatch(llava)
    handle = patch(llava)
    with torch.no_grad():
        for r in handle.routers:
            r.w2.weight.zero_()  # logit_exit == logit_keep: the strict rule never exits
        assert torch.equal(llava(**batch).logits, ref)
    assert handle.exit_layers.tolist() == [L - 1, L - 1] and handle.compact_from is None
    same_generation(greedy(llava, batch), ref_gen)


def test_routed_prefill_syncs_once_per_routed_layer(sdpa_llava, batch, unpatch_after, monkeypatch):
    """Each routed layer's decision is read once (it shapes the next layer), and only after the next layer's first
    work (its input norm) is queued; nothing else per layer reads the device."""
    from visionfx.methods import dyvte as dyvte_mod, dyvte_prefill

    handle = patch(sdpa_llava)
    unpatch_after(sdpa_llava)
    with torch.no_grad():
        for r in handle.routers:
            r.w2.weight.zero_()  # never exits: every layer ≤ L−2 routes
    syncs = tiny_llava.count_host_syncs(monkeypatch, dyvte_mod, dyvte_prefill)
    order = []
    hooks = [layer.input_layernorm.register_forward_pre_hook(lambda m, a, i=i: order.append(("norm", i)))
             for i, layer in enumerate(handle.parts.llm_layers)]
    original = dyvte_mod.exit_decision
    monkeypatch.setattr(dyvte_mod, "exit_decision", lambda *a: (order.append(("read",)), original(*a))[1])
    try:
        with torch.no_grad():
            sdpa_llava(**batch)
    finally:
        monkeypatch.undo()
        for h in hooks:
            h.remove()
    assert syncs.count("read") == L - 1  # layers 0..L−2; the others are the prefill's setup, once
    assert set(syncs) == {"_on_inner", "keep_indices", "read"} and len(syncs) <= L + 3
    assert order == [("norm", 0)] + [e for i in range(1, L) for e in (("norm", i), ("read",))]
    assert handle.exit_layers.tolist() == [L - 1, L - 1]


# --- invariant 13: cache lengths per layer --------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 1])
def test_cache_lengths_per_layer(sdpa_llava, batch, unpatch_after, k):
    patch(sdpa_llava, exit_layer=k)
    unpatch_after(sdpa_llava)
    P = batch["input_ids"].shape[1]
    with torch.no_grad():
        out = sdpa_llava(**batch, use_cache=True)
        lengths = [P if i <= k else P - NUM_PATCHES for i in range(L)]
        assert cache_lengths(out.past_key_values) == lengths
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(nxt)], 1)
        step = sdpa_llava(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
        assert cache_lengths(step.past_key_values) == [n + 1 for n in lengths]
    gen = sdpa_llava.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                              suppress_tokens=[IMAGE_TOKEN], return_dict_in_generate=True)
    assert cache_lengths(gen.past_key_values) == [n + 3 for n in lengths]


# --- invariants 2, 3 and 14 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 2])
def test_batch_cache_and_virtual_exit(llava, batch, unpatch_after, k):
    handle = patch(llava, exit_layer=k)
    unpatch_after(llava)
    P = batch["input_ids"].shape[1]
    out = greedy(llava, batch)
    same_generation(out, greedy(llava, batch, use_cache=False))
    for row in range(2):
        one = select(batch, row)
        same_generation(out, greedy(llava, one), row, slice(0, 1), P, one["input_ids"].shape[1])
    handle.compaction = False  # virtual exit everywhere
    same_generation(out, greedy(llava, batch))
    assert handle.compact_from is None


def test_mixed_exits_exact_and_last(llava, batch, unpatch_after):
    handle = patch(llava)
    unpatch_after(llava)
    P = batch["input_ids"].shape[1]
    handle.forced_exits = [0, 2]
    mixed = greedy(llava, batch)
    assert handle.exit_layers.tolist() == [0, 2] and handle.compact_from == 3
    same_generation(mixed, greedy(llava, batch, use_cache=False))
    for row, k in enumerate([0, 2]):
        one = select(batch, row)
        handle.forced_exits = k
        same_generation(mixed, greedy(llava, one), row, slice(0, 1), P, one["input_ids"].shape[1])
    visionfx.unpatch(llava)
    handle = patch(llava, batch_policy="last")
    handle.forced_exits = [0, 2]
    last = greedy(llava, batch)
    handle.forced_exits = 2
    same_generation(last, greedy(llava, batch))


def test_different_image_counts_per_row(sdpa_llava, unpatch_after):
    data = llava_batch([([5], [7, 8]), ([5, 6, 9], [7, 3, 4])], images_per_row=[2, 1])
    handle = patch(sdpa_llava, exit_layer=1)
    unpatch_after(sdpa_llava)
    out = greedy(sdpa_llava, data)
    kept = handle.kept_positions
    assert kept.shape[1] == int((data["input_ids"][1] != IMAGE_TOKEN).sum()) and bool((kept[0] == -1).any())
    same_generation(out, greedy(sdpa_llava, data, use_cache=False))
    P = data["input_ids"].shape[1]
    for row in range(2):
        one = select(data, row, [2, 1])
        same_generation(out, greedy(sdpa_llava, one), row, slice(0, 1), P, one["input_ids"].shape[1])


def test_llava_next_batch_equals_per_sample(unpatch_after):
    nxt = build_llava_next(attn_implementation="sdpa")
    data = llava_next_batch(nxt, TEXTS, [(40, 70), (64, 32)])
    patch(nxt, exit_layer=0)
    unpatch_after(nxt)
    out = greedy(nxt, data)
    P = data["input_ids"].shape[1]
    for row in range(2):
        one = select(data, row)
        same_generation(out, greedy(nxt, one), row, slice(0, 1), P, one["input_ids"].shape[1])


# --- invariant 15: router I/O ----------------------------------------------------------------------------------------
def test_router_features_oracle_and_strict_decision():
    torch.manual_seed(0)
    ids, mask = left_pad([prompt([5, 6], [7, 8, 9], 3), prompt([5], [7, 3, 4, 9, 8], 3), prompt([5], [7], 3)])
    h = torch.randn(*ids.shape, 6, dtype=torch.float64)
    end = torch.full((3,), ids.shape[1] - 1)
    feat, defined = router_features(h, ids == IMAGE_TOKEN, mask.bool(), end)
    for b in range(3):
        row = ids[b].tolist()
        last_img = max(i for i, t in enumerate(row) if t == IMAGE_TOKEN)
        span = [i for i in range(last_img + 1, len(row) - 1) if mask[b, i]]
        assert bool(defined[b]) == bool(span)
        mean = sum(h[b, i] for i in span) / len(span) if span else torch.zeros(6, dtype=torch.float64)
        torch.testing.assert_close(feat[b], torch.cat([mean, h[b, -1]]), atol=1e-12, rtol=0)
    assert not bool(defined[2])  # "[7]" alone: nothing between the image and the final position
    logits = torch.tensor([[0.0, 0.0], [0.0, 1e-6], [1.0, 0.5], [2.0, 2.0 + 1e-3]])
    assert exit_decision(logits) == [False, True, False, True]
    assert exit_decision(logits.tolist()) == [False, True, False, True]  # the host copy the handle reads
    assert exit_decision(torch.tensor([[0.0, 1.0]]), threshold=0.8) == [False]  # sigmoid(1) = 0.73
    assert exit_decision(torch.tensor([[0.0, 1.5]]), threshold=0.8) == [True]  # 0.82
    assert exit_decision([[0.5, 0.5 - 1e-9]], threshold=0.4) == [True]  # margin log(0.4/0.6) < 0


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_router_decisions_match_oracle(sdpa_llava, batch, unpatch_after, backend):
    """The handle's decisions against routers applied by hand to the hooked layer outputs; ``triton`` runs the
    router op's kernels (interpreted on CPU)."""
    if backend == "triton":
        pytest.importorskip("triton")
        if torch.cuda.is_available():  # the compiled kernels (the interpreter runs them on CPU elsewhere)
            sdpa_llava = build_llava(attn_implementation="sdpa").cuda()
            batch = {k: v.cuda() for k, v in batch.items()}
    handle = patch(sdpa_llava, backend=backend)
    unpatch_after(sdpa_llava)
    outputs = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o[0] if isinstance(o, tuple)
                                                                                      else o))
             for i, layer in enumerate(handle.parts.llm_layers)]
    try:
        patterns = set()
        for seed in range(8):
            randomise_routers(handle, seed)
            handle.compaction = False  # keep full-length outputs for the oracle
            with torch.no_grad():
                sdpa_llava(**batch)
            expected = []
            image, valid = batch["input_ids"] == IMAGE_TOKEN, batch["attention_mask"].bool()
            for b in range(2):
                exit_at = L - 1
                for i in range(L - 1):
                    last_img = int(image[b].nonzero().max())
                    span = [j for j in range(last_img + 1, image.shape[1] - 1) if valid[b, j]]
                    feat = torch.cat([outputs[i][b, span].mean(0), outputs[i][b, -1]])
                    logit = handle.routers[i](feat)
                    if logit[1] > logit[0]:
                        exit_at = i
                        break
                expected.append(exit_at)
            assert handle.exit_layers.tolist() == expected
            assert handle.router_backend[0] == backend
            patterns.add(tuple(expected))
        assert len(patterns) >= 3
    finally:
        for h in hooks:
            h.remove()


def randomise_routers(handle, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for r in handle.routers:
            r.w1.weight.normal_(0, 0.05)
            r.w2.weight.normal_(0, 0.05)


PATTERNS = {"one_never": lambda e: sorted(e)[1] == L - 1 and sorted(e)[0] < L - 1,
            "mixed": lambda e: e[0] != e[1] and max(e) < L - 1}


@pytest.mark.parametrize("kind", sorted(PATTERNS))
def test_learned_routers_batch_cache_invariance(sdpa_llava, batch, unpatch_after, kind):
    handle = patch(sdpa_llava)
    unpatch_after(sdpa_llava)
    P = batch["input_ids"].shape[1]
    for seed in range(40):  # routers whose decisions on this batch have the wanted pattern
        randomise_routers(handle, seed)
        with torch.no_grad():
            sdpa_llava(**batch)
        if PATTERNS[kind](handle.exit_layers.tolist()):
            break
    else:
        pytest.fail(f"no router seed gives the pattern {kind}")
    expected = handle.exit_layers.tolist()
    out = greedy(sdpa_llava, batch)
    exits = handle.exit_layers.tolist()
    assert exits == expected
    same_generation(out, greedy(sdpa_llava, batch, use_cache=False))
    assert handle.exit_layers.tolist() == exits
    for row in range(2):
        one = select(batch, row)
        same_generation(out, greedy(sdpa_llava, one), row, slice(0, 1), P, one["input_ids"].shape[1])
        assert handle.exit_layers.tolist() == [exits[row]]


@pytest.mark.parametrize("policy", ["exact", "last"])
def test_routed_exits_equal_forced_exits(llava, batch, unpatch_after, policy):
    """A router decision is read before the next layer's attention and restarts that layer: the routed forward (and
    its cache) equals forcing the same exit layers, which test_forced_exit_equals_text_only_reference checks against
    the text-only reference."""
    routed_equals_forced(llava, batch, unpatch_after, policy)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["exact", "last"])
def test_routed_exits_equal_forced_exits_on_gpu(batch, unpatch_after, policy):
    """The same on CUDA, where the router op's kernels run and the decision comes through a pinned copy and its
    event."""
    model = build_llava(attn_implementation="sdpa").cuda()
    handle = routed_equals_forced(model, {k: v.cuda() for k, v in batch.items()}, unpatch_after, policy)
    assert handle.router_backend[0] == "triton"


def routed_equals_forced(model, batch, unpatch_after, policy):
    handle = patch(model, batch_policy=policy)
    unpatch_after(model)
    seen = set()
    for seed in range(40):
        randomise_routers(handle, seed)
        handle.forced_exits = None
        with torch.no_grad():
            routed = model(**batch, use_cache=True)
        exits = handle.exit_layers.tolist()
        if tuple(exits) in seen or max(exits) == L - 1:
            continue
        seen.add(tuple(exits))
        compact = handle.compact_from
        forced_exits = exits if policy == "exact" else [max(exits)] * len(exits)
        handle.forced_exits = forced_exits
        with torch.no_grad():
            forced = model(**batch, use_cache=True)
        assert handle.exit_layers.tolist() == forced_exits and handle.compact_from == compact
        torch.testing.assert_close(routed.logits, forced.logits, rtol=0, atol=1e-6)
        assert cache_lengths(routed.past_key_values) == cache_lengths(forced.past_key_values)
        if len(seen) == 3:
            break
    assert len(seen) >= 2, "too few router seeds exit before the last layer"
    handle.forced_exits = None
    return handle


# --- invariant 16 and training ---------------------------------------------------------------------------------------
def _synthetic(agree: float, ratio: float, n: int = 100):
    """Logits over 2 classes whose argmax agrees on round(agree·n) answer positions and whose mean CE ratio is ratio."""
    target = torch.ones(1, n + 1, dtype=torch.long)
    target[0, 0] = -100
    ce_a = 0.3
    x_a = -torch.log(torch.expm1(torch.tensor(ce_a)))  # CE of target 1 for logits [0, x] is log(1 + e^-x)
    a = torch.zeros(1, n + 1, 2)
    a[0, :, 1] = x_a
    b = a.clone()
    flips = n - round(agree * n)
    mean_b = ratio * ce_a
    ce_flip = torch.log1p(torch.exp(torch.tensor(0.1)))  # flipped positions: x = -0.1 (argmax 0)
    rest = (mean_b * n - flips * ce_flip) / (n - flips)
    b[0, :, 1] = -torch.log(torch.expm1(rest))
    b[0, :flips, 1] = -0.1
    return a, b, target


def test_label_rule_on_synthetic_logits():
    for agree, ratio, label in ((1.0, 1.02, 1), (0.98, 1.0, 0), (1.0, 1.04, 0), (0.995, 1.0, 1)):
        a, b, target = _synthetic(agree, ratio, n=200)
        out = exit_labels(a, b, target)
        assert out["agree"].item() == pytest.approx(agree)
        assert (out["loss_b"] / out["loss_a"]).item() == pytest.approx(ratio, rel=1e-4)
        assert out["label"].tolist() == [label] and out["has_answer"].tolist() == [True]
    assert answer_start(torch.tensor([[-100, -100, 5, 6], [-100, -100, -100, -100]])).tolist() == [2, 4]


def _train_batches():
    rows = [prompt([5, 6], [7, 8, 9]) + [11, 12, 2], prompt([5], [7, 3, 4]) + [13, 2]]
    ids, mask = left_pad(rows)
    labels = torch.full_like(ids, -100)
    labels[0, -3:] = ids[0, -3:]
    labels[1, -2:] = ids[1, -2:]
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": ids, "attention_mask": mask, "labels": labels,
             "pixel_values": torch.randn(2, 3, 32, 32, generator=g)} for _ in range(3)]


def test_branches_match_independent_paths(llava, unpatch_after):
    data = _train_batches()[0]
    inputs = {k: v for k, v in data.items() if k != "labels"}
    with torch.no_grad():
        ref = llava(**inputs).logits
    handle = patch(llava)
    unpatch_after(llava)
    for k in (1, L - 1):
        out = branch_logits(handle, data, k)
        assert torch.equal(out["logits_a"], ref)
        handle.forced_exits, handle.compaction = k, False
        with torch.no_grad():
            virtual = llava(**inputs).logits
        handle.forced_exits, handle.compaction = None, True
        text = data["input_ids"] != IMAGE_TOKEN
        torch.testing.assert_close(out["logits_b"][text], virtual[text], atol=1e-5, rtol=0)


def test_train_routers_only_routers_change(sdpa_llava, unpatch_after):
    from accelerate import Accelerator

    handle = patch(sdpa_llava)
    unpatch_after(sdpa_llava)
    base = {n: p.detach().clone() for n, p in sdpa_llava.named_parameters() if not n.startswith("vfx_")}
    before = [[p.detach().clone() for p in r.parameters()] for r in handle.routers]
    loader = torch.utils.data.DataLoader(_train_batches(), batch_size=None)
    lines = []
    result = train_routers(sdpa_llava, loader, lr=1e-3, accelerator=Accelerator(cpu=True), log_every=1,
                           log=lines.append, seed=1)
    assert result["steps"] == 3 and len(result["history"]) == 3
    trained = {r["layer"] for r in result["history"] if r["samples"] > 0}
    assert trained and set(result["layers"]) == {r["layer"] for r in result["history"]}
    for i, r in enumerate(handle.routers):
        changed = any(not torch.equal(p.float(), q.float()) for p, q in zip(r.parameters(), before[i]))
        assert changed == (i in trained)
    assert all(torch.equal(p, base[n]) for n, p in sdpa_llava.named_parameters() if n in base)
    assert any("accuracy" in line for line in lines)
    assert set(result["layers"]) == trained
    assert all(st["samples"] > 0 and 0 <= st["accuracy"] <= 1 for st in result["layers"].values())


# --- checkpoints -----------------------------------------------------------------------------------------------------
def test_router_checkpoint_round_trip_and_refusals(sdpa_llava, batch, tmp_path, unpatch_after):
    handle = patch(sdpa_llava, prompt_template="plain")
    unpatch_after(sdpa_llava)
    torch.manual_seed(5)
    with torch.no_grad():
        for r in handle.routers:
            r.w1.weight.normal_(0, 0.05)
            r.w2.weight.normal_(0, 0.05)
        logits = sdpa_llava(**batch).logits
    exits = handle.exit_layers.tolist()
    save_routers(sdpa_llava, tmp_path / "r", base_model="tiny", revision="abc")
    assert (tmp_path / "r" / "dyvte_routers.safetensors").is_file()
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "r" / "dyvte_routers.safetensors")))
    assert keys == {f"routers.{i}.{n}.weight" for i in range(L) for n in ("w1", "w2")}
    visionfx.unpatch(sdpa_llava)
    twin = patch(sdpa_llava, routers=str(tmp_path / "r"), prompt_template="plain")
    with torch.no_grad():
        assert torch.equal(sdpa_llava(**batch).logits, logits)
    assert twin.exit_layers.tolist() == exits
    visionfx.save_pretrained(sdpa_llava, tmp_path / "full")
    visionfx.unpatch(sdpa_llava)
    visionfx.load_pretrained(sdpa_llava, tmp_path / "full")
    with torch.no_grad():
        assert torch.equal(sdpa_llava(**batch).logits, logits)
    visionfx.unpatch(sdpa_llava)
    with pytest.warns(UserWarning, match="prompt template"):
        patch(sdpa_llava, routers=str(tmp_path / "r"), prompt_template="vicuna_v1")
    visionfx.unpatch(sdpa_llava)
    for change in ({"num_hidden_layers": 3}, {"hidden_size": 32, "intermediate_size": 64}):
        other = _tiny_with(**change)
        with pytest.raises(ValueError, match="num_layers|text_hidden_size"):
            patch(other, routers=str(tmp_path / "r"))
        assert not visionfx.is_patched(other) and "vfx_routers" not in other._modules
    official = {f"model.visual_gates_router.{i}.{n}.weight": torch.zeros(1) for i in range(2) for n in ("w1", "w2")}
    official["model.layers.0.mlp.weight"] = torch.zeros(1)
    assert set(routers_from_official(official)) == {f"routers.{i}.{n}.weight" for i in range(2) for n in ("w1", "w2")}


def _tiny_with(**text_changes):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision, text = tiny_llava._sub_configs()
    for k, v in text_changes.items():
        setattr(text, k, v)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                         image_seq_length=NUM_PATCHES, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(config).eval()


# --- inputs and unsupported cases ------------------------------------------------------------------------------------
def test_embeds_path_and_text_only(sdpa_llava, batch, unpatch_after):
    handle = patch(sdpa_llava, exit_layer=1)
    unpatch_after(sdpa_llava)
    with torch.no_grad():
        ref = sdpa_llava(**batch).logits
        feats = sdpa_llava.model.get_image_features(pixel_values=batch["pixel_values"])
        feats = torch.cat(list(getattr(feats, "pooler_output", feats)))
        ids = batch["input_ids"]
        embeds = sdpa_llava.get_input_embeddings()(ids).masked_scatter((ids == IMAGE_TOKEN)[..., None], feats)
        with pytest.raises(ValueError, match="image_mask"):
            sdpa_llava(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
        out = sdpa_llava(inputs_embeds=embeds, attention_mask=batch["attention_mask"], image_mask=ids == IMAGE_TOKEN)
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=0)
    assert handle.compact_from == 2
    text, mask = left_pad([prompt([5, 6], [7], 0), prompt([5], [7, 8, 9], 0)])
    with torch.no_grad():
        plain = sdpa_llava(input_ids=text, attention_mask=mask).logits
    assert plain.shape[1] == text.shape[1] and handle.exit_layers is None


def test_unsupported_cases_raise(sdpa_llava, batch, unpatch_after):
    patch(sdpa_llava, exit_layer=1)
    unpatch_after(sdpa_llava)
    with pytest.raises(NotImplementedError, match="inference-only"):
        sdpa_llava(**batch, labels=batch["input_ids"])
    with pytest.raises(NotImplementedError, match="beam"):
        sdpa_llava.generate(**batch, num_beams=2, max_new_tokens=2)
    with pytest.raises(NotImplementedError, match="dynamic cache"):
        sdpa_llava.generate(**batch, cache_implementation="static", max_new_tokens=2)
    right = torch.flip(batch["attention_mask"], dims=[1])
    with pytest.raises(ValueError, match="padding_side"):
        sdpa_llava(input_ids=batch["input_ids"], attention_mask=right, pixel_values=batch["pixel_values"])
    text, mask = left_pad([prompt([5, 6], [7], 0), prompt([5], [7, 8, 9], 0)])
    with pytest.raises(ValueError, match="no image token"):
        sdpa_llava(input_ids=text, attention_mask=mask, pixel_values=batch["pixel_values"])
    cfg = sdpa_llava.config.text_config
    saved = cfg._attn_implementation
    try:
        cfg._attn_implementation = "flash_attention_2"
        with pytest.raises(NotImplementedError, match="batch_policy='last'"):
            sdpa_llava(**batch)
    finally:
        cfg._attn_implementation = saved
    lm = sdpa_llava.model.language_model
    sdpa_llava.model.language_model = torch.compile(lm, backend="eager")
    try:
        with pytest.raises(RuntimeError, match="torch.compile"):
            sdpa_llava(**batch)
    finally:
        sdpa_llava.model.language_model = lm
    visionfx.unpatch(sdpa_llava)
    with pytest.raises(ValueError, match="out of range"):
        patch(sdpa_llava, exit_layer=L)
    assert not visionfx.is_patched(sdpa_llava)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle = patch(sdpa_llava)
    with torch.no_grad():
        for r in handle.routers:
            r.w2.weight.zero_()
            r.w2.weight[1].fill_(1.0)  # exit logit > keep logit whenever the GELU features sum positive
    short, smask = left_pad([prompt([5], [7])])
    with pytest.warns(UserWarning, match="undefined"), torch.no_grad():
        sdpa_llava(input_ids=short, attention_mask=smask, pixel_values=batch["pixel_values"][:1])
