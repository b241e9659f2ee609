"""DyVTE's router op (``kernels/dyvte_router``): the Triton kernels (TRITON_INTERPRET=1 on CPU, fp32) and the
reference against a float64 oracle written from MLLM.md §2.1-2.2 with loops over the span's positions:
``x = [mean of the span's rows ‖ the final prompt row]``, ``logits = W2·GELU(W1·x)`` with the exact-erf GELU."""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")

from visionfx.kernels.dyvte_router.reference import router_logits_reference, span_features_reference  # noqa: E402
from visionfx.kernels.dyvte_router.triton import router_logits_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the small cases run on the GPU too, in fp32


def oracle(hidden, spans, ends, w1, w2):
    h, w1, w2 = hidden.double(), w1.double(), w2.double()
    out = []
    for b, (span, end) in enumerate(zip(spans, ends)):
        mean = sum((h[b, p] for p in span), torch.zeros(h.shape[-1], dtype=torch.float64)) / max(len(span), 1)
        x = torch.cat([mean, h[b, end]])
        u = w1 @ x
        act = torch.tensor([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in u.tolist()], dtype=torch.float64)
        out.append(w2 @ act)
    return torch.stack(out)


def span_inputs(spans, ends, L, seed):
    """``(index, weights, count)`` as :class:`TextSpan` lays them out: positions padded to the longest span with
    weight-0 entries that point at arbitrary valid positions, then the final position."""
    g = torch.Generator().manual_seed(seed)
    S = max(len(s) for s in spans)
    index = torch.randint(0, L, (len(spans), S + 1), generator=g)
    weights = torch.zeros(len(spans), S, 1)
    for b, (span, end) in enumerate(zip(spans, ends)):
        index[b, :len(span)] = torch.tensor(span, dtype=torch.long)
        weights[b, :len(span)] = 1
        index[b, S] = end
    count = torch.tensor([[max(len(s), 1)] for s in spans], dtype=torch.float32)
    return index, weights, count


CASES = [  # (B, L, D, hidden units, span lengths)
    (3, 17, 40, 37, [3, 0, 5]),  # an empty span (mean 0), units not a multiple of the block
    (2, 30, 300, 16, [7, 1]),  # channels over one block
    (70, 9, 8, 20, [2] * 70),  # samples over one block of 64
    (1, 12, 24, 48, [0]),  # every span empty (S = 0)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}_D{c[2]}_H{c[3]}_S{max(c[4])}")
def test_kernel_and_reference_match_oracle(case):
    B, L, D, HD, lengths = case
    g = torch.Generator().manual_seed(B + D)
    hidden = torch.randn(B, L, D + 3, generator=g)[..., 2:D + 2]  # a strided view
    spans = [sorted(torch.randperm(L - 1, generator=g)[:n].tolist()) for n in lengths]
    ends = [L - 1 - (b % 2) for b in range(B)]
    index, weights, count = span_inputs(spans, ends, L, seed=B)
    w1 = torch.randn(HD, 2 * D, generator=g) / math.sqrt(2 * D)
    w2 = torch.randn(2, HD, generator=g)
    want = oracle(hidden, spans, ends, w1, w2)
    args = [t.to(DEVICE) for t in (hidden, index, weights, count, w1, w2)]
    for fn in (router_logits_triton, router_logits_reference):
        got = fn(*args)
        assert got.shape == (B, 2) and got.dtype == torch.float32
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_low_precision_on_gpu(dtype):
    """LLaVA-1.5-7B widths (D = 4096, 2048 units), batch 8, 40-token spans: the kernel against the fp32 reference on
    the same 16-bit inputs, within the reference's own 16-bit error (the module's forward, which rounds its
    activations to the weights' dtype) plus a margin."""
    g = torch.Generator(device="cuda").manual_seed(0)
    B, L, D, HD = 8, 640, 4096, 2048
    hidden = torch.randn(B, L, D, device="cuda", generator=g).to(dtype)
    spans = [list(range(600, 600 + 40 - 3 * b)) for b in range(B)]
    index, weights, count = (t.cuda() for t in span_inputs(spans, [L - 1] * B, L, seed=0))
    w1 = (torch.randn(HD, 2 * D, device="cuda", generator=g) / math.sqrt(2 * D)).to(dtype)
    w2 = (torch.randn(2, HD, device="cuda", generator=g) / math.sqrt(HD)).to(dtype)
    want = router_logits_reference(hidden, index, weights, count, w1, w2)
    got = router_logits_triton(hidden, index, weights, count, w1, w2)
    x = torch.nn.functional.gelu(span_features_reference(hidden, index, weights, count) @ w1.t())
    rounded = (x @ w2.t()).float()  # every step in the 16-bit dtype
    bound = 2 * (rounded - want).abs().max().item() + 1e-3
    assert (got - want).abs().max().item() <= bound
