"""scripts/bench_llava.py: the tiny CPU mode end to end (complete JSON record), and the sweep machinery (incremental
record, --resume, --time-budget, --report, config selection) with the measurement replaced by a stub."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "bench_llava.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_llava", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_json(tmp_path, capsys):
    bench = load_script()
    out = tmp_path / "llava.json"
    configs = "sdpa,fastervlm-75%,dyvte-exit1,dyvte-routed,dyvte-routed-ref,var-hybrid"
    assert bench.main(["--tiny", "--models", "llava", "--batch-sizes", "2", "--configs", configs, "--reps", "1",
                       "--warmup", "0", "--new-tokens", "3", "--decode-reps", "2", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert {"environment", "settings", "rows", "fastervlm_scoring"} <= set(record)
    assert record["environment"]["transformers"]
    rows = {r["config"]: r for r in record["rows"]}
    assert set(rows) == set(configs.split(","))
    for r in rows.values():
        assert "error" not in r, r
        assert r["batch"] == 2 and r["ttft_ms"] > 0 and r["prefill_ms"] > 0 and r["vision_ms"] > 0
        assert r["decode_steps"] == 2 * (3 - 1) and r["decode_ms"] > 0
        assert r["decode_tok_s"] == pytest.approx(2e3 / r["decode_ms"])
    assert rows["sdpa"]["lm_tokens"] == rows["sdpa"]["prompt_tokens"] == 16 + 65
    assert rows["fastervlm-75%"]["lm_tokens"] == rows["sdpa"]["lm_tokens"] - 12
    layers = bench._llama7b(tiny=True).num_hidden_layers
    assert rows["dyvte-exit1"]["exit_layers"] == [1, 1]
    for name in ("dyvte-routed", "dyvte-routed-ref"):
        assert rows[name]["exit_layers"] == [layers - 1] * 2  # every router ran, none fired
    assert rows["dyvte-routed-ref"]["router_backend"][0] == "reference"
    text = capsys.readouterr().out
    assert "FasterVLM scoring overhead" in text and "rows left" in text


def test_configurations_cover_the_sweep():
    bench = load_script()
    names = [c[0] for c in bench.configurations(32, tiny=False)]
    assert names[:2] == ["eager", "sdpa"]
    assert [n for n in names if n.startswith("fastervlm")] == [f"fastervlm-{p}%" for p in (0, 50, 75, 90, 95)]
    assert [n for n in names if n.startswith("dyvte")] == ["dyvte-exit2", "dyvte-exit8", "dyvte-exit16",
                                                                  "dyvte-routed", "dyvte-routed-ref"]
    assert {"var", "var-all", "var-hybrid"} <= set(names)


class FakeClock:
    """Stands in for the ``time`` module: each stubbed row advances it by ``step`` seconds."""

    def __init__(self):
        self.now, self.step = 0.0, 10.0

    def perf_counter(self):
        return self.now


@pytest.fixture
def stubbed(monkeypatch):
    bench = load_script()
    clock = FakeClock()
    calls = []
    state = SimpleNamespace(bench=bench, calls=calls, fail_at=None)

    def run_one(model, inputs, method, overrides, attn, args, clk, compiled):
        calls.append(method)
        if len(calls) == state.fail_at:
            raise KeyboardInterrupt  # a time limit killing the run mid-row
        clock.now += clock.step
        return {"ttft_ms": 1.0, "prefill_ms": 1.0, "decode_ms": 2.0, "decode_tok_s": 500.0}

    monkeypatch.setattr(bench, "time", clock)
    monkeypatch.setattr(bench, "run_one", run_one)
    monkeypatch.setattr(bench, "scoring_overhead", lambda *a: {"overhead_share": 0.01, "vision_features_ms": 1.0,
                                                               "cls_row_ms": 0.1})
    return state


def test_incremental_record_and_resume(stubbed, tmp_path):
    bench, calls = stubbed.bench, stubbed.calls
    out = tmp_path / "r.json"
    base = ["--tiny", "--models", "llava", "--batch-sizes", "1,2", "--configs", "eager,sdpa,var", "--out", str(out)]
    stubbed.fail_at = 4
    with pytest.raises(KeyboardInterrupt):
        bench.main(base)
    record = json.loads(out.read_text())
    assert [(r["batch"], r["config"]) for r in record["rows"]] == [(1, "eager"), (1, "sdpa"), (1, "var")]
    assert set(record["fastervlm_scoring"]) == {"llava"}
    stubbed.fail_at, calls[:] = None, []
    assert bench.main(base + ["--resume"]) == 0
    assert calls == [None, None, "var"]  # only batch 2's three rows
    record = json.loads(out.read_text())
    assert [(r["batch"], r["config"]) for r in record["rows"]] == [(b, c) for b in (1, 2) for c in ("eager", "sdpa",
                                                                                                     "var")]


def test_time_budget_stops_before_a_row_that_would_not_fit(stubbed, tmp_path, capsys):
    bench, calls = stubbed.bench, stubbed.calls
    out = tmp_path / "r.json"
    # rows take 10 s: after three rows (30 s) a fourth would end at 40 s > 35 s
    assert bench.main(["--tiny", "--models", "llava", "--batch-sizes", "1", "--configs",
                       "eager,sdpa,fastervlm-50%,var,var-all", "--time-budget", "35", "--out", str(out)]) == 0
    assert len(calls) == 3 and len(json.loads(out.read_text())["rows"]) == 3
    assert "--resume" in capsys.readouterr().out


def test_report_merges_records_and_bad_names_fail(stubbed, tmp_path, capsys):
    bench = stubbed.bench
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    bench.main(["--tiny", "--models", "llava", "--batch-sizes", "1", "--configs", "sdpa", "--out", str(a)])
    bench.main(["--tiny", "--models", "next", "--batch-sizes", "1", "--configs", "sdpa", "--out", str(b)])
    capsys.readouterr()
    assert bench.main(["--report", str(a), str(b)]) == 0
    text = capsys.readouterr().out
    assert "llava  1" in text and "next   1" in text and text.count("FasterVLM scoring overhead") == 2
    with pytest.raises(SystemExit, match="unknown"):
        bench.main(["--tiny", "--configs", "sdpa,fastvlm-90%", "--out", str(a)])
    with pytest.raises(SystemExit, match="--models"):
        bench.main(["--tiny", "--models", "llava,qwen", "--out", str(a)])
