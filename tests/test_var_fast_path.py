"""VAR's fast path (MLLM.md §3.6): work restricted to the rows that can change, masses from 0/1-mask matmuls,
cached padded masks for decoding, sink scores without an fp32 copy of the residual stream.

Oracles: float64 naive formulas, the full-matrix application of :func:`redistribute`, the eager model's weights and
a no-grad run (for the autograd-safe path). The tiny model, sink injection and row oracle are tests/var_support.py's.
"""

from __future__ import annotations

import torch

import visionfx
from visionfx.methods import var as var_mod
from visionfx.methods.var import column_masks, redistribute, sink_scores
from visionfx.patches.llava import get_handle
from var_support import D, INJECT, TAU, check_rows, inject, synthetic
from var_support import batch, cleanup, llava  # noqa: F401 (pytest fixtures, used by name)


def test_sink_scores_against_naive_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 48, generator=g)
    x[0, 1, 7] = 300.0
    x[1, 3, 20] = -90.0
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        naive = torch.empty(2, 5, dtype=torch.float64)
        for b in range(2):
            for t in range(5):
                row = xd[b, t].double()
                rms = (sum(float(v) ** 2 for v in row) / len(row) + 1e-6) ** 0.5
                naive[b, t] = max(abs(float(row[d])) for d in (7, 20)) / rms
        torch.testing.assert_close(sink_scores(xd, [7, 20]).double(), naive, atol=0, rtol=1e-5)
        torch.testing.assert_close(sink_scores(xd, torch.tensor([7, 20])), sink_scores(xd, (7, 20)), atol=0, rtol=0)


def test_column_masks_and_fp32_rows_against_oracle():
    attn, image, sinks, rows = synthetic(seed=5)
    reduce, update = column_masks(image, sinks, 0.6, torch.float32, torch.float64)
    assert reduce.shape == (2, 14, 4) and update.shape == (2, 2, 14) and reduce.dtype == torch.float64
    f = lambda m: m.double()  # noqa: E731
    torch.testing.assert_close(reduce, torch.stack([f(image), f(image & sinks), 0.6 * f(sinks), f(image & ~sinks)],
                                                   -1), atol=0, rtol=0)
    torch.testing.assert_close(update, torch.stack([-0.6 * sinks.float(), (image & ~sinks).float()], 1), atol=0,
                               rtol=0)
    # the caller's masks may be wider than S (capacity kept for decoding): only the first S columns count
    wide = column_masks(torch.nn.functional.pad(image, (0, 6)), torch.nn.functional.pad(sinks, (0, 6)),
                        0.6, torch.float32, torch.float64)
    a32 = attn.float()
    out = redistribute(a32, image, sinks, rows, 0.6, 0.5, 0.1, masks=wide)
    assert torch.equal(out, redistribute(a32, image, sinks, rows, 0.6, 0.5, 0.1))
    assert check_rows(out, a32, image, sinks, rows, 0.6, 0.5, 0.1) > 0


def test_only_rows_after_the_image_are_touched(llava, batch, cleanup, monkeypatch):
    hook, _ = inject(llava, batch, INJECT)
    cleanup(hook)
    visionfx.patch(llava, "var", sink_dims=[D], tau=TAU, summ=0.1)
    shapes = []

    def spy(attn, *args, **kw):
        shapes.append(attn.shape)
        return redistribute(attn, *args, **kw)

    monkeypatch.setattr(var_mod, "redistribute", spy)
    with torch.no_grad():
        llava(**batch)
    P = batch["input_ids"].shape[1]
    last_image = (batch["input_ids"] == llava.config.image_token_index).int().cumsum(1).argmax(1)
    assert len(shapes) == 1  # layer 2 only; rows from the earliest row after any sample's last image token
    assert shapes[0][2] == P - 1 - int(last_image.min())


def test_grad_path_equals_no_grad(llava, batch, cleanup):
    hook, _ = inject(llava, batch, INJECT)
    cleanup(hook)
    visionfx.patch(llava, "var", sink_dims=[D], tau=TAU, summ=0.1)
    with torch.no_grad():
        ref = llava(**batch, output_attentions=True)
    out = llava(**batch, output_attentions=True)
    assert torch.equal(out.logits.detach(), ref.logits)
    assert torch.equal(out.attentions[2].detach(), ref.attentions[2])
    out.logits.float().pow(2).mean().backward()
    grads = [p.grad for p in llava.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    llava.zero_grad(set_to_none=True)


def test_decoding_masks_grow_beyond_capacity(llava, batch, cleanup):
    hook, _ = inject(llava, batch, INJECT)
    cleanup(hook)
    handle = get_handle(visionfx.patch(llava, "var", sink_dims=[D], tau=TAU, summ=0.1))
    with torch.no_grad():
        llava(**batch)
    P = batch["input_ids"].shape[1]
    first = handle._layer_masks(2, P + 1)
    big = handle._layer_masks(2, first["capacity"] + 5)
    assert big["capacity"] >= first["capacity"] + 5
    for entry in (first, big):
        n = entry["capacity"]
        assert torch.equal(entry["sinks"], torch.nn.functional.pad(handle.sink_masks[2], (0, n - P)))
        assert torch.equal(entry["image"], torch.nn.functional.pad(handle.state.image, (0, n - P)))
        ref = column_masks(entry["image"], entry["sinks"], 0.6, torch.float32, torch.float64)
        assert all(torch.equal(a, b) for a, b in zip(entry["masks"], ref))
    ctx = handle._context(2, P, P)  # a prefill holds the whole prompt
    assert ctx["image"].shape == ctx["sinks"].shape == (2, P) and ctx["rows"].shape == (2, P)
    handle._prefill = False  # as the next decoding step would set it
    ctx = handle._context(2, 1, P + 1)
    assert ctx["image"].shape == ctx["sinks"].shape == (2, P + 1) and ctx["rows"].shape == (2, 1)


def test_host_syncs_per_prefill_and_generation_do_not_grow_with_layers(batch, cleanup, monkeypatch):
    """One device sync per prefill and one per generation (at its first decoding step), whatever the number of
    layers VAR acts on (a sync per layer drained the GPU's queue at batch 1)."""
    from tiny_llava import build_llava, count_host_syncs

    model = build_llava(attn_implementation="eager", text_layers=8)  # VAR layers 2..6
    hook, _ = inject(model, batch, INJECT)
    syncs = count_host_syncs(monkeypatch, var_mod)
    try:
        handle = get_handle(visionfx.patch(model, "var", sink_dims=[D], tau=TAU, summ=0.1))
        assert len(handle.layers) == 5
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=5, do_sample=False)
        assert out.shape[1] == batch["input_ids"].shape[1] + 5
        assert len(syncs) == 2, syncs
        assert set(handle._decode_layers) == set(handle.layers)  # the injected sinks persist in the residual stream
    finally:
        hook.remove()
        visionfx.unpatch(model)
