"""The Triton linear-attention kernel against the reference and an independent float64 oracle, forward and gradients.

The oracle materialises the ``N×N`` weight matrix in float64 with explicit rotation matrices (METHODS.md §3.9, §4.9,
§5), independent of the reference's factorised formula. Errors use the relative L2 metric ``‖a − b‖ / ‖b‖``. On CPU
the kernels run under ``TRITON_INTERPRET=1`` (tests/conftest.py) on tiny odd shapes; the GPU tests (bf16/fp16 over
PERFORMANCE.md's shape grid) hold the kernel to twice the reference's own low-precision error plus a small floor.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not importable; the kernel cannot run at all")

from visionfx.kernels.dispatch import choose  # noqa: E402
from visionfx.kernels.linear_attention import supports  # noqa: E402
from visionfx.kernels.linear_attention import triton as la_triton  # noqa: E402
from visionfx.kernels.linear_attention.reference import linear_attention_reference  # noqa: E402
from visionfx.kernels.linear_attention.triton import linear_attention_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# every feature x normaliser combination the three methods use, with and without key weights and rope
CASES = {
    "slab": dict(feature="relu", normalizer="divisive"),
    "rala": dict(feature="elu1", normalizer="divisive", key_weights=True, rope=True),
    "rala_no_rope": dict(feature="elu1", normalizer="divisive", key_weights=True),
    "elu1_rope_only": dict(feature="elu1", normalizer="divisive", rope=True),
    "inline": dict(feature="identity", normalizer="subtractive", scale=0.37),
    "inline_relu": dict(feature="relu", normalizer="subtractive", scale=1.7),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()  # the float64 oracle runs on the CPU
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def close(a: torch.Tensor, b: torch.Tensor, tol: float, atol: float = 1e-5) -> bool:
    """Relative L2 error below ``tol``, or every entry within ``atol`` (as flash-linear-attention's tests do: some
    gradients are ~0 by cancellation, e.g. dq with a single token, where a ratio measures only rounding noise)."""
    return (a.detach().cpu().double() - b.detach().cpu().double()).abs().max().item() <= atol or rel_err(a, b) < tol


def rotations(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Explicit block-diagonal rotation matrices ``[N, D, D]`` from tables ``[N, D/2]``."""
    n, half = cos.shape
    R = torch.zeros(n, 2 * half, 2 * half, dtype=torch.float64)
    for p in range(half):
        c, s = cos[:, p].double(), sin[:, p].double()
        R[:, 2 * p, 2 * p], R[:, 2 * p, 2 * p + 1] = c, -s
        R[:, 2 * p + 1, 2 * p], R[:, 2 * p + 1, 2 * p + 1] = s, c
    return R


def oracle(q, k, v, feature="identity", normalizer="divisive", scale=1.0, key_weights=None, rope=None, eps=1e-6):
    """Float64 ``O = W V`` with the ``N×N`` weights written out (differentiable)."""
    q, k, v = q.double(), k.double(), v.double()
    phi = {
        "identity": lambda x: x,
        "relu": lambda x: x.clamp_min(0),
        "elu1": lambda x: torch.where(x > 0, x + 1, torch.exp(x.clamp_max(0))),
    }[feature]
    qf, kf = phi(q), phi(k)
    n = q.shape[-2]
    if normalizer == "subtractive":
        k_mean = kf.mean(-2, keepdim=True)
        W = (scale / n) * (qf @ kf.transpose(-1, -2) - qf @ k_mean.transpose(-1, -2)) + 1.0 / n
        return W @ v
    w = torch.ones(q.shape[:-1], dtype=torch.float64) if key_weights is None else key_weights.double()
    den = (qf @ kf.transpose(-1, -2) * w.unsqueeze(-2)).sum(-1, keepdim=True) + eps
    if rope is not None:
        R = rotations(*rope)
        qf = torch.einsum("nab,...nb->...na", R, qf)
        kf = torch.einsum("nab,...nb->...na", R, kf)
    W = (qf @ kf.transpose(-1, -2)) * w.unsqueeze(-2) / den
    return W @ v


def make_inputs(case, B, H, N, D, dtype=torch.float32, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(dtype) for _ in range(3))
    opts = {key: val for key, val in CASES[case].items() if key not in ("key_weights", "rope")}
    tensors = [q, k, v]
    if CASES[case].get("key_weights"):
        tensors.append(N * torch.softmax(torch.randn(B, H, N, generator=g), -1))  # RALA's N·α: mean weight 1
    if CASES[case].get("rope"):
        ang = torch.rand(N, D // 2, generator=g) * 6.0
        opts["rope"] = (ang.cos().to(device), ang.sin().to(device))
    tensors = [t.to(device).requires_grad_() for t in tensors]
    return tensors, opts


def run(fn, tensors, opts, grad_out):
    q, k, v, *rest = tensors
    o = fn(q, k, v, key_weights=rest[0] if rest else None, **opts)
    return [o, *torch.autograd.grad(o, tensors, grad_out.to(o.dtype))]


def check_fp32(case, B, H, N, D, tol=2e-5):
    tensors, opts = make_inputs(case, B, H, N, D)
    go = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got = run(linear_attention_triton, tensors, opts, go)
    ref = run(linear_attention_reference, tensors, opts, go)
    t64 = [t.detach().cpu().double().requires_grad_() for t in tensors]
    opts64 = dict(opts, rope=tuple(t.cpu() for t in opts["rope"])) if "rope" in opts else opts
    exact = run(oracle, t64, opts64, go.cpu().double())
    names = ["o", "dq", "dk", "dv", "dkey_weights"]
    for name, a, r, x in zip(names, got, ref, exact):
        assert a.dtype == r.dtype and a.shape == r.shape, name
        assert close(a, x, tol), f"{case} {name}: kernel vs float64 {rel_err(a, x):.2e}"
        assert close(a, r, tol), f"{case} {name}: kernel vs reference {rel_err(a, r):.2e}"


@pytest.mark.parametrize("shape", [(2, 1, 1, 16), (1, 2, 33, 72), (1, 1, 70, 32)], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_oracle(case, shape):
    check_fp32(case, *shape)


@pytest.mark.parametrize("case", ["slab", "rala", "inline"])
def test_split_n_path(case, monkeypatch):
    """Several programs per (batch, head), partial states combined by atomics (the GPU path for small B·H)."""
    monkeypatch.setattr(la_triton, "_FORCE_CHUNK", 32)
    check_fp32(case, 1, 2, 70, 16)


def test_strided_inputs_and_no_grad():
    """Views of a packed qkv (as timm makes them) and transposed key weights, forward only (no state saved)."""
    g = torch.Generator().manual_seed(3)
    B, N, H, D = 2, 5, 2, 32
    qkv = torch.randn(B, N, 3, H, D, generator=g).to(DEVICE).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    w = torch.rand(B, N, H, generator=g).to(DEVICE).permute(0, 2, 1) + 0.5
    assert not q.is_contiguous() and not w.is_contiguous()
    opts = dict(feature="elu1", normalizer="divisive", key_weights=w)
    with torch.no_grad():
        got = linear_attention_triton(q, k, v, **opts)
    assert got.transpose(1, 2).is_contiguous()  # token layout: heads merge without a copy
    assert rel_err(got, oracle(q, k, v, **opts)) < 2e-5
    assert rel_err(got, linear_attention_reference(q, k, v, **opts)) < 2e-5


def test_16bit_path_in_the_interpreter():
    """fp16 inputs exercise the hi/lo split products (fp16 operands stand in for bf16 under the interpreter):
    the kernel's error against float64 stays within the reference's own fp16 error."""
    if DEVICE == "cuda":
        pytest.skip("covered by the GPU tests")
    for case in ("slab", "rala", "inline"):
        check_lowp(case, 1, 1, 40, 16, torch.float16)


def check_lowp(case, B, H, N, D, dtype):
    tensors, opts = make_inputs(case, B, H, N, D, dtype=dtype)
    go = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    got = run(linear_attention_triton, tensors, opts, go)
    ref = run(linear_attention_reference, tensors, opts, go)
    t64 = [t.detach().double().requires_grad_() for t in tensors]
    opts64 = dict(opts, rope=tuple(t.double() for t in opts["rope"])) if "rope" in opts else opts
    exact = run(linear_attention_reference, t64, opts64, go.double())
    names = ["o", "dq", "dk", "dv", "dkey_weights"]
    for name, a, r, x in zip(names, got, ref, exact):
        assert a.dtype == r.dtype, name
        # fp32 outputs (key-weight gradients) carry the split products' ~2^-16 error instead of a final rounding
        floor = 2e-4 if a.dtype == torch.float32 else 1e-4
        ea, er = rel_err(a, x), rel_err(r, x)
        assert ea <= 2 * er + floor, f"{case} {dtype} {name}: kernel {ea:.2e} vs reference {er:.2e}"


def test_compile_fullgraph_and_backward():
    """The op is one opaque node: compiling a function around it breaks no graph and keeps the Triton backward."""
    tensors, opts = make_inputs("rala", 1, 1, 9, 16)
    go = torch.randn(1, 1, 9, 16).to(DEVICE)

    def f(q, k, v, key_weights):
        return linear_attention_triton(q, k, v, key_weights=key_weights, **opts) * 2.0

    eager = run(f, tensors, {}, go)
    compiled = run(torch.compile(f, fullgraph=True, backend="aot_eager"), tensors, {}, go)
    for a, b in zip(compiled, eager):
        assert rel_err(a, b) < 1e-6


def test_custom_op_registration():
    """Schema, fake (meta) implementation and autograd registration of the forward op."""
    tensors, opts = make_inputs("rala", 1, 1, 5, 16)
    q, k, v, w = tensors
    cos, sin = opts["rope"]
    torch.library.opcheck(
        torch.ops.visionfx.linear_attention_fwd.default,
        (q, k, v, w, cos, sin, "elu1", "divisive", 1.0, 1e-6, True),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def test_argument_errors():
    q = torch.randn(1, 1, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="divisive normaliser only"):
        linear_attention_triton(q, q, q, normalizer="subtractive", key_weights=q[..., 0])
    with pytest.raises(ValueError, match="unknown feature"):
        linear_attention_triton(q, q, q, feature="softmax")
    with pytest.raises(ValueError, match="rope tables"):
        linear_attention_triton(q, q, q, rope=(torch.ones(4, 7), torch.ones(4, 7)))
    with pytest.raises(ValueError, match="head dim"):
        big = torch.randn(1, 1, 4, 130, device=DEVICE)
        linear_attention_triton(big, big, big)


def test_supports_and_dispatch():
    slab = dict(feature="relu", normalizer="divisive")
    assert supports("cuda", torch.bfloat16, 64, **slab) is None
    assert supports("cuda", torch.float16, 72, feature="elu1", key_weights=True, rope=True) is None
    assert supports("cpu", torch.float32, 80, feature="identity", normalizer="subtractive") is None
    assert "head dim" in supports("cuda", torch.bfloat16, 256, **slab)
    assert "unknown feature" in supports("cuda", torch.bfloat16, 64, feature="gelu")
    assert "unknown normalizer" in supports("cuda", torch.bfloat16, 64, normalizer="softmax")
    assert "even head dim" in supports("cuda", torch.bfloat16, 33, rope=True)
    assert "float32 only" in supports("cpu", torch.bfloat16, 64)
    assert "dtype" in supports("cuda", torch.float64, 64)
    assert supports("cuda", torch.float32, 64, **slab) is None
    assert "float32 with head dim" in supports("cuda", torch.float32, 72, **slab)
    assert "unknown option" in supports("cuda", torch.bfloat16, 64, causal=True)
    fn, backend, _ = choose("linear_attention", "auto", "cuda", torch.bfloat16, 64, **slab)
    assert backend == "triton" and fn is linear_attention_triton
    fn, backend, why = choose("linear_attention", "auto", "cuda", torch.bfloat16, 256, **slab)
    assert backend == "reference" and "head dim" in why


def test_split_plan(monkeypatch):
    """Small B·H splits N across programs; enough (batch, head) pairs, or deterministic mode, keep one kernel."""
    monkeypatch.setattr(la_triton, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    chunk, splits = la_triton._plan(6, 4097, cuda)
    assert splits > 1 and chunk % la_triton._CHUNK_ALIGN == 0 and chunk * splits >= 4097 > chunk * (splits - 1)
    assert la_triton._plan(384, 4097, cuda) == (4097, 1)
    assert la_triton._plan(6, 197, cuda) == (197, 1)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert la_triton._plan(6, 4097, cuda) == (4097, 1)


GPU_SHAPES = [(n, d) for n in (197, 577, 1025, 4097) for d in (64, 72, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,d", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("case", ["slab", "rala", "inline"])
def test_gpu_low_precision(case, n, d, dtype):
    check_lowp(case, 2, 6, n, d, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 72])  # tf32x3 products up to a 64-wide state, "ieee" beyond
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_fp32(case, d):
    check_fp32(case, 1, 6, 1025, d, tol=1e-5)


def test_empty_and_interpreter_dtype():
    q = torch.randn(0, 2, 5, 16, device=DEVICE, requires_grad=True)
    o = linear_attention_triton(q, q, q, feature="relu")
    assert o.shape == q.shape
    o.sum().backward()
    assert q.grad.shape == q.shape
    if DEVICE == "cpu":
        b = torch.randn(1, 1, 4, 16, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="no bfloat16"):
            linear_attention_triton(b, b, b)


def test_kernel_bench_smoke(tmp_path, capsys):
    """The micro-benchmark runs end to end on tiny sizes and records every implementation and the floor ratios."""
    from visionfx.bench_kernels import kernel_bench

    rows = kernel_bench(tokens=(9,), heads=1, head_dim=16, dtype="fp32", device=DEVICE, configs=("slab",),
                        warmup_ms=1, rep_ms=5, json_path=tmp_path / "k.json", progress=False)
    (row,) = rows
    for key in ("sdpa_fwd_ms", "reference_fwd_ms", "triton_fwd_ms", "triton_fwd_bwd_ms"):
        assert row[key] is not None and row[key] > 0, (key, row["notes"])
    assert row["x_floor_fwd"] == pytest.approx(row["triton_fwd_ms"] / row["floor_fwd_ms"])
    assert (tmp_path / "k.json").exists() and "triton fwd" in capsys.readouterr().out


def test_kernel_table_shows_graph_columns_when_measured():
    """CUDA-graph timings (GPU time without launch cost) get their own columns and ratios."""
    from visionfx.bench_kernels import _ratios, format_kernel_rows

    row = dict(N=197, B=64, config="slab", floor_fwd_ms=0.01, floor_fwd_bwd_ms=0.03, notes=[], sdpa_fwd_ms=0.03,
               reference_fwd_ms=0.2, triton_fwd_ms=0.06, sdpa_fwd_graph_ms=0.025, triton_fwd_graph_ms=0.02,
               sdpa_fwd_bwd_graph_ms=0.7, triton_fwd_bwd_graph_ms=0.1)
    _ratios(row)
    assert row["x_floor_fwd_graph"] == pytest.approx(2.0) and row["vs_sdpa_fwd_graph"] == pytest.approx(1.25)
    assert row["x_floor_fwd_bwd_graph"] == pytest.approx(10 / 3) and row["vs_sdpa_fwd_bwd_graph"] == pytest.approx(7)
    table = format_kernel_rows([row])
    assert "graph: sdpa fwd" in table and "1.25x" in table
    assert "graph: sdpa f+b" in table and "7.00x" in table and "3.33x" in table
    row.pop("triton_fwd_bwd_graph_ms")
    assert "graph: sdpa fwd" in format_kernel_rows([row]) and "graph: sdpa f+b" not in format_kernel_rows([row])
    row.pop("triton_fwd_graph_ms")
    assert "graph:" not in format_kernel_rows([row])


def test_output_accepts_in_place_updates_under_autograd():
    """The mixers add their local terms in place to the op's output ([B, N, H, D] memory): with gradients on, that is
    legal and leaves the input gradients those of the op (the in-place term is a constant here)."""
    B, H, N, D = 2, 2, 9, 16
    q, k, v = (torch.randn(B, H, N, D, device=DEVICE) for _ in range(3))
    leaves = [t.requires_grad_() for t in (q, k, v)]
    o = linear_attention_triton(q, k, v, feature="relu", normalizer="divisive")
    assert o.transpose(1, 2).is_contiguous()  # token layout: heads merge without a copy
    o[:, :, 1:].add_(1.0)
    do = torch.randn_like(o)
    got = torch.autograd.grad(o, leaves, do)
    want = torch.autograd.grad(oracle(q, k, v, feature="relu", normalizer="divisive"), leaves, do.double())
    for g, w in zip(got, want):
        assert close(g, w, 2e-5)


def test_patched_model_compiles_before_any_eager_call():
    """The mixers import their kernel when they are built (dispatch.preload), so a patched model compiled before its
    first eager call traces no import: one graph (fullgraph) and no ``lru_cache`` warning from the dispatcher."""
    import warnings

    import timm

    import visionfx
    from visionfx.kernels import dispatch

    dispatch._LOADED.clear()
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, num_classes=3).eval()
    visionfx.patch(model, "slab", backend="triton")
    assert "visionfx.kernels.linear_attention.triton:linear_attention_triton" in dispatch._LOADED
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    model.to(DEVICE)
    torch._dynamo.reset()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        eager = model(x)
    assert not [w for w in caught if "lru_cache" in str(w.message)]
    assert rel_err(compiled, eager) < 1e-6
