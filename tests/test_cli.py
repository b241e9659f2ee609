"""The command line, run in-process: ``visionfx list`` and ``visionfx bench`` (tiny arguments), and its errors."""

from __future__ import annotations

import json
import sys

import pytest
import timm
import torch

import visionfx
import visionfx.bench
import visionfx.registry
from visionfx.cli import main
from visionfx.registry import list_adapters, list_methods, method_specs

TINY = ["--model", "test_vit", "--device", "cpu", "--sizes", "32", "--batch-size", "1", "--warmup", "0", "--repeat", "1",
        "--no-progress"]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.split("  ") if c.strip()]


def test_list_shows_every_method_and_adapter(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    adapters = list_adapters()
    lines = out.splitlines()
    header = _cells(lines[1])
    assert header[:2] == ["method", "site"]
    assert [c.strip() for c in header[2:2 + len(adapters)]] == [a.name for a in adapters]
    for spec in method_specs():
        row = next((_cells(ln) for ln in lines if ln.startswith(spec.name + " ")), None)
        assert row is not None, f"method {spec.name} missing from 'visionfx list'"
        assert row[1].strip() == spec.site
        marks = [c.strip() for c in row[2:2 + len(adapters)]]
        assert marks == ["yes" if spec.site in a.sites else "-" for a in adapters], spec.name
        assert row[2 + len(adapters)].strip() == spec.regime
    for a in adapters:
        assert any(ln.startswith(a.name + " ") and a.family in ln for ln in lines), a.name
    assert set(list_methods()) == {s.name for s in method_specs()}


def test_list_reports_import_errors(capsys, monkeypatch):
    broken = {"visionfx.methods.broken": "ImportError: No module named 'missing_dependency'"}
    monkeypatch.setattr(visionfx.registry, "import_errors", lambda: broken)
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "failed to import" in out and "visionfx.methods.broken: ImportError" in out
    assert main(["list", "--strict"]) == 1


def test_bench_prints_table_and_writes_json(capsys, tmp_path):
    path = tmp_path / "out" / "bench.json"
    threads = torch.get_num_threads()
    assert main(["bench", *TINY, "--methods", "slab", "--threads", "1", "--json", str(path)]) == 0
    assert torch.get_num_threads() == threads  # restored after the run
    out = capsys.readouterr().out
    table = out.splitlines()
    assert any(ln.split()[:3] == ["32", "5", "original"] for ln in table)  # 2x2 grid + CLS
    assert any(ln.split()[:3] == ["32", "5", "slab"] for ln in table)
    assert "speed vs original" in out
    assert table[0].startswith("test_vit, batch 1, fp32 on ") and "1 thread" in table[0]

    data = json.loads(path.read_text())
    env = data["environment"]
    for key in ("date", "torch", "timm", "triton", "device", "device_name", "cpu_count", "git", "python"):
        assert key in env, key
    assert env["torch"] == torch.__version__ and env["timm"] == timm.__version__
    assert data["settings"]["methods"] == ["slab"] and data["settings"]["sizes"] == [32]
    assert "memory_note" in data
    rows = data["rows"]
    assert [r["method"] for r in rows] == ["original", "slab"]
    for r in rows:
        assert r["error"] is None
        assert r["size"] == 32 and r["tokens"] == 5 and r["grid"] == [2, 2] and r["batch_size"] == 1
        assert r["threads"] == 1 and r["dtype"] == "fp32" and r["device"] == "cpu" and r["compiled"] is False
        assert len(r["latencies_ms"]) == 1 and r["latency_ms"] == r["latencies_ms"][0] > 0
        assert r["images_per_s"] == pytest.approx(1e3 / r["latency_ms"])
    base, slab = rows
    assert base["speedup"] == 1.0
    assert slab["speedup"] == pytest.approx(base["latency_ms"] / slab["latency_ms"])

    # parameter counts against a model patched here
    torch.manual_seed(0)
    ref = timm.create_model("test_vit", pretrained=False, img_size=32)
    n0 = sum(p.numel() for p in ref.parameters())
    visionfx.patch(ref, "slab")
    added = sum(p.numel() for n, p in ref.named_parameters() if "vfx_" in n)
    assert base["params"] == n0 and slab["params"] == n0 + added and slab["params_added"] == added > 0
    # the peak includes at least the weights and the input
    floor = (n0 * 4 + 3 * 32 * 32 * 4) / 2**20
    assert base["peak_memory_mib"] >= floor and slab["peak_memory_mib"] >= floor


def test_bench_failing_method_is_a_row_not_a_crash(capsys, tmp_path):
    recipe = tmp_path / "far.yaml"
    recipe.write_text("method: slab\nlayers: [99]\n")
    rows = visionfx.bench.run_bench("test_vit", [str(recipe)], sizes=[32], batch_size=1, warmup=0,
                                    repeat=1, memory=False, progress=False)
    assert [r["method"] for r in rows] == ["original", "slab:far"]
    assert rows[0]["error"] is None and rows[0]["peak_memory_mib"] is None
    assert "out of range" in rows[1]["error"] and rows[1]["speedup"] is None
    text = visionfx.bench.format_rows(rows)
    assert "failed" in text and "slab:far at 32px" in text


@pytest.mark.parametrize(
    "args,message",
    [
        (["--methods", "slabb"], "did you mean 'slab'"),
        (["--model", "vit_tiny_patch16_22"], "did you mean 'vit_tiny_patch16_224'"),
        (["--model", "resnet18"], "resnet18"),
        (["--sizes", "32,big"], "--sizes"),
        (["--sizes", "0"], "sizes must be positive"),
        (["--repeat", "0"], "repeat >= 1"),
        (["--threads", "0"], "threads must be an integer >= 1"),
        (["--threads", "many"], "--threads"),
        (["--dtype", "fp8"], "invalid choice"),
    ],
)
def test_bench_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *TINY, *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where CUDA is missing")
def test_bench_cuda_missing(capsys):
    with pytest.raises(SystemExit):
        main(["bench", *TINY, "--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_bench_kernels_flag(monkeypatch, capsys):
    monkeypatch.delattr(visionfx.bench, "kernel_bench", raising=False)
    monkeypatch.setitem(sys.modules, "visionfx.bench_kernels", None)  # makes the import fail
    assert main(["bench", "--kernels"]) == 2
    assert "not available" in capsys.readouterr().err

    seen = {}

    def kernel_bench(device, dtype="bf16", json_path=None):
        seen.update(device=device, dtype=dtype, json_path=json_path)
        return [{"N": 9}]

    monkeypatch.setattr(visionfx.bench, "kernel_bench", kernel_bench, raising=False)
    assert main(["bench", "--kernels", "--device", "cpu"]) == 0
    assert seen == {"device": "cpu", "dtype": "bf16", "json_path": None}  # its own dtype default kept
    assert main(["bench", "--kernels", "--dtype", "fp32", "--json", "k.json"]) == 0
    assert seen == {"device": "auto", "dtype": "fp32", "json_path": "k.json"}


def test_auto_threads_follow_the_load(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(visionfx.bench, "_cpus", lambda: 8)
    monkeypatch.setattr(visionfx.bench.os, "getloadavg", lambda: (0.3, 0.3, 0.3))
    assert visionfx.bench.auto_threads() == 8
    monkeypatch.setattr(visionfx.bench.os, "getloadavg", lambda: (5.2, 5.0, 5.0))
    assert visionfx.bench.auto_threads() == 3
    monkeypatch.setattr(visionfx.bench.os, "getloadavg", lambda: (30.0, 30.0, 30.0))
    assert visionfx.bench.auto_threads() == 1


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "bench" in capsys.readouterr().out
