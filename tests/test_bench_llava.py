"""scripts/bench_llava.py runs end to end on the tiny CPU model (--tiny) and writes a complete JSON record."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "bench_llava.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_llava", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_json(tmp_path, capsys):
    bench = load_script()
    out = tmp_path / "llava.json"
    configs = "sdpa,fastervlm-75%,dyvte-exit1,var-hybrid"
    assert bench.main(["--tiny", "--models", "llava", "--batch-sizes", "2", "--configs", configs, "--reps", "1",
                       "--warmup", "0", "--new-tokens", "2", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert {"environment", "settings", "rows", "fastervlm_scoring"} <= set(record)
    assert record["environment"]["transformers"]
    rows = {r["config"]: r for r in record["rows"]}
    assert set(rows) == set(configs.split(","))
    for r in rows.values():
        assert "error" not in r, r
        assert r["batch"] == 2 and r["ttft_ms"] > 0 and r["prefill_ms"] > 0 and r["vision_ms"] > 0
    assert rows["sdpa"]["lm_tokens"] == rows["sdpa"]["prompt_tokens"] == 16 + 65
    assert rows["fastervlm-75%"]["lm_tokens"] == rows["sdpa"]["lm_tokens"] - 12
    assert "FasterVLM scoring overhead" in capsys.readouterr().out


def test_configurations_cover_the_sweep():
    bench = load_script()
    names = [c[0] for c in bench.configurations(32, tiny=False)]
    assert names[:2] == ["eager", "sdpa"]
    assert [n for n in names if n.startswith("fastervlm")] == [f"fastervlm-{p}%" for p in (0, 50, 75, 90, 95)]
    assert [n for n in names if n.startswith("dyvte")] == ["dyvte-exit2", "dyvte-exit8", "dyvte-exit16"]
    assert {"var", "var-all", "var-hybrid"} <= set(names)
