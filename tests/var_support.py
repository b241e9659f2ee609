"""Shared pieces of the VAR tests (tests/test_var.py, tests/test_var_fast_path.py): the tiny LLaVA and its batch,
sink injection, and the float64 row oracle of the paper's update.

Sinks are made by injecting a massive activation (100·RMS(x) in dimension D) into the input of layer 2; on this
64-wide model |x_d|/RMS ≤ 8, so τ = 5 (MLLM.md §7.3.22). The fixtures are imported by name into the test modules.
"""

from __future__ import annotations

import pytest
import torch

import visionfx
from tiny_llava import build_llava, llava_batch
from visionfx.patches.llava import LlavaParts, layer_hidden, with_layer_hidden

D = 13  # the injected sink dimension
TAU = 5.0
TEXTS = [([5, 6], [7, 8, 9, 10]), ([5, 6, 9, 10, 11], [7, 3, 4])]
INJECT = [[0, 6], [0, 12]]  # per row, offsets from its first real token: BOS and one image token


@pytest.fixture(scope="module")
def llava():
    return build_llava(attn_implementation="eager")


@pytest.fixture(scope="module")
def batch():
    return llava_batch(TEXTS)


@pytest.fixture
def cleanup(llava):
    hooks = []
    yield hooks.append
    for h in hooks:
        h.remove()
    if visionfx.is_patched(llava):
        visionfx.unpatch(llava)


def inject(model, data, offsets):
    """Pre-hook on layer 2 (run first) adding 100·RMS(x) to dimension D at the given tokens of each row."""
    P = data["input_ids"].shape[1]
    pads = (data["attention_mask"] == 0).sum(1)
    targets = [[int(pads[b]) + o for o in offs] for b, offs in enumerate(offsets)]

    def hook(module, args, kwargs):
        x = layer_hidden(args, kwargs)
        if x.shape[1] < P:  # a decoding step
            return None
        delta = torch.zeros_like(x)  # out of place, so the hook also works with autograd
        with torch.no_grad():
            for b, ts in enumerate(targets):
                for t in ts:
                    delta[b, t, D] = 100 * x[b, t].pow(2).mean().sqrt()
        return with_layer_hidden(args, kwargs, x + delta)

    layer = LlavaParts.of(model).llm_layers[2]
    return layer.register_forward_pre_hook(hook, with_kwargs=True, prepend=True), targets


def oracle_row(alpha, image: set, sinks: set, p, rho, summ, eps=1e-6):
    """Paper update of one row (float64 loop); returns (row, selected)."""
    a = alpha.double()
    s_img = sum(float(a[j]) for j in image)
    s_vs = sum(float(a[j]) for j in image & sinks)
    if not image & sinks or not (s_img >= summ and (s_img - s_vs) / (s_img + eps) >= rho):
        return a, False
    omega = p * sum(float(a[j]) for j in sinks)
    receivers = image - sinks
    denom = sum(float(a[j]) for j in receivers)
    new = a.clone()
    for j in sinks:
        new[j] = (1 - p) * a[j]
    for j in receivers:
        new[j] = a[j] + omega * a[j] / max(denom, eps)
    return new, True


def check_rows(out, a32, image, sinks, rows, p, rho, summ) -> int:
    """Every row of ``out`` (a redistribution of the fp32 weights ``a32``) against :func:`oracle_row`: rows not
    allowed by ``rows`` and rows the head test rejects are unchanged bit for bit, the others equal the oracle and
    keep their sum. Returns how many rows were selected."""
    selected = 0
    for b in range(a32.shape[0]):
        img, snk = set(image[b].nonzero().flatten().tolist()), set(sinks[b].nonzero().flatten().tolist())
        for h in range(a32.shape[1]):
            for i in range(a32.shape[2]):
                if not rows[b, i]:
                    assert torch.equal(out[b, h, i], a32[b, h, i])
                    continue
                expected, sel = oracle_row(a32[b, h, i], img, snk, p, rho, summ)
                torch.testing.assert_close(out[b, h, i].double(), expected, atol=1e-7, rtol=0)
                assert abs(float(out[b, h, i].double().sum() - a32[b, h, i].double().sum())) <= 1e-6
                if not sel:
                    assert torch.equal(out[b, h, i], a32[b, h, i])
                selected += sel
    return selected


def synthetic(seed=0, B=2, H=3, S=14):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, H, S, S, generator=g, dtype=torch.float64)
    scores[..., 2:10] += 1.0  # image span [2, 10) gets a good share
    attn = scores.softmax(-1)
    image = torch.zeros(B, S, dtype=torch.bool)
    image[:, 2:10] = True
    sinks = torch.zeros(B, S, dtype=torch.bool)
    sinks[0, [0, 4, 7]] = True  # a text sink and two visual sinks
    if B > 1:
        sinks[1, [0, 5]] = True
    rows = torch.zeros(B, S, dtype=torch.bool)
    rows[:, 10:] = True
    return attn, image, sinks, rows

