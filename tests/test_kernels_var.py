"""VAR's redistribution kernel (``kernels/var_redistribute``) against the float64 row oracle of tests/var_support.py
and against the PyTorch reference: masses, head test, update, unchanged rows, in-place cast output, the official
code's arithmetic, rows as expanded views, rows longer than one block. On CPU it runs under TRITON_INTERPRET=1
(conftest.py) in fp32; the bf16 output and the model path on CUDA are marked GPU tests."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import visionfx  # noqa: E402
from visionfx.kernels.dispatch import choose  # noqa: E402
from visionfx.kernels.var_redistribute import redistribute  # noqa: E402
from visionfx.kernels.var_redistribute.triton import redistribute_triton  # noqa: E402
from var_support import D, INJECT, TAU, check_rows, inject, synthetic  # noqa: E402
from var_support import batch, cleanup, llava  # noqa: E402,F401 (pytest fixtures, used by name)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("p,rho,summ", [(0.6, 0.5, 0.1), (0.3, 0.8, 0.0), (1.0, 0.0, 0.5)])
def test_kernel_against_row_oracle_and_reference(p, rho, summ):
    attn, image, sinks, rows = synthetic(seed=3)
    a32 = attn.float()
    out = redistribute_triton(a32, image, sinks, rows, p, rho, summ)
    assert check_rows(out, a32, image, sinks, rows, p, rho, summ) > 0
    torch.testing.assert_close(out, redistribute(a32, image, sinks, rows, p, rho, summ), atol=1e-7, rtol=0)


def test_official_arithmetic_matches_reference():
    attn, image, sinks, rows = synthetic(seed=8)
    a32 = attn.float()
    for official in (True, False):
        got = redistribute_triton(a32, image, sinks, rows, 0.4, 0.5, 0.2, official=official)
        want = redistribute(a32, image, sinks, rows, 0.4, 0.5, 0.2, official=official)
        torch.testing.assert_close(got, want, atol=1e-7, rtol=0)


def test_in_place_cast_into_a_row_slice_with_wide_masks_and_expanded_rows():
    """As the eager path calls it: ``out`` a slice of the cast weights (fp16 here: the interpreter has no bf16), masks
    wider than S (kept for decoding), rows an expanded view (decoding)."""
    attn, image, sinks, _ = synthetic(seed=4)
    a32 = attn.float()
    rows = torch.ones(2, 1, dtype=torch.bool).expand(2, 14)
    wide = [torch.nn.functional.pad(t, (0, 9)) for t in (image, sinks)]
    weights = a32.half()
    before = weights[:, :, :5].clone()
    redistribute_triton(a32[:, :, 5:], *wide, rows[:, 5:], 0.6, 0.5, 0.1, out=weights[:, :, 5:])
    want = redistribute(a32[:, :, 5:], image, sinks, rows[:, 5:], 0.6, 0.5, 0.1).half()
    assert torch.equal(weights[:, :, :5], before)
    torch.testing.assert_close(weights[:, :, 5:], want, atol=1e-3, rtol=0)


def test_rows_longer_than_one_block():
    g = torch.Generator().manual_seed(0)
    S = 2300  # > the 2048-column block: both passes loop
    attn = torch.randn(1, 2, 3, S, generator=g).softmax(-1)
    image = torch.zeros(1, S, dtype=torch.bool)
    image[:, 5:2200] = True
    sinks = torch.zeros(1, S, dtype=torch.bool)
    sinks[:, [0, 40, 2100]] = True
    rows = torch.ones(1, 3, dtype=torch.bool)
    got = redistribute_triton(attn, image, sinks, rows, 0.6, 0.5, 0.1)
    want = redistribute(attn, image, sinks, rows, 0.6, 0.5, 0.1)
    assert not torch.equal(want, attn)  # rows were selected
    torch.testing.assert_close(got, want, atol=1e-8, rtol=0)
    torch.testing.assert_close(got.double().sum(-1), attn.double().sum(-1), atol=1e-6, rtol=0)


def test_refusals_and_dispatch():
    attn, image, sinks, rows = synthetic()
    with pytest.raises(ValueError, match="fp32"):
        redistribute_triton(attn, image, sinks, rows, 0.6, 0.5, 0.1)  # float64
    with pytest.raises(ValueError, match="no backward"):
        redistribute_triton(attn.float().requires_grad_(), image, sinks, rows, 0.6, 0.5, 0.1)
    fn, used, why = choose("var_redistribute", "auto", "cuda", torch.float32, 0, requires_grad=True)
    assert used == "reference" and "gradients" in why
    fn, used, why = choose("var_redistribute", "auto", "cpu", torch.float32, 0)
    assert used == "reference" and "cpu" in why


def test_model_with_forced_kernel_equals_reference(llava, batch, cleanup):
    """The patched tiny LLaVA with ``backend="triton"`` (interpreter on CPU) gives the reference backend's logits."""
    hook, _ = inject(llava, batch, INJECT)
    cleanup(hook)
    with torch.no_grad():
        outs = {"none": llava(**batch, output_attentions=True)}
    for backend in ("reference", "triton"):
        visionfx.patch(llava, "var", sink_dims=[D], tau=TAU, summ=0.1, backend=backend)
        with torch.no_grad():
            outs[backend] = llava(**batch, output_attentions=True)
        visionfx.unpatch(llava)
    torch.testing.assert_close(outs["triton"].attentions[2], outs["reference"].attentions[2], atol=1e-6, rtol=0)
    torch.testing.assert_close(outs["triton"].logits, outs["reference"].logits, atol=1e-5, rtol=1e-5)
    assert not torch.equal(outs["triton"].attentions[2], outs["none"].attentions[2])  # VAR acted


@pytest.mark.gpu
@pytest.mark.parametrize("S", [700, 2900])
def test_gpu_bf16_out_matches_reference(S):
    g = torch.Generator(device="cuda").manual_seed(0)
    attn = torch.randn(2, 32, 40, S, generator=g, device="cuda").softmax(-1)
    image = torch.zeros(2, S, dtype=torch.bool, device="cuda")
    image[:, 35:S - 40] = True
    sinks = torch.rand(2, S, generator=g, device="cuda") < 0.01
    rows = torch.ones(2, 40, dtype=torch.bool, device="cuda")
    out = torch.empty_like(attn, dtype=torch.bfloat16)
    redistribute_triton(attn, image, sinks, rows, 0.6, 0.5, 0.2, out=out)
    want = redistribute(attn, image, sinks, rows, 0.6, 0.5, 0.2)
    torch.testing.assert_close(out, want.bfloat16(), atol=0, rtol=0)  # same fp32 values, one rounding each


def test_bench_script_needs_cuda(capsys):
    """scripts/bench_var_redistribute.py parses its shapes and refuses to time anything without a GPU."""
    import importlib.util
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("has a GPU: the script would run")
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_var_redistribute.py"
    spec = importlib.util.spec_from_file_location("bench_var_redistribute", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--shapes", "3x17"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
