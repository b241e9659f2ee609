"""scripts/bench_dyvte_routing.py on a tiny CPU LLaVA: every variant timed, the JSON and the table written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_dyvte_routing.py"


def test_tiny_run(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_dyvte_routing", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "routing.json"
    assert bench.main(["--tiny", "--rounds", "1", "--batch-sizes", "2", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["in_situ"]["B=2"]
    assert set(row["ttft_ms"]) == {"unpatched", *bench.VARIANTS} and all(v > 0 for v in row["ttft_ms"].values())
    assert row["prefill_ms"] > 0 and row["layers"] >= 2
    for name in bench.VARIANTS:
        want = (row["ttft_ms"][name] - row["ttft_ms"]["unpatched"]) / (row["layers"] - 1) * 1e3
        assert abs(row["per_routed_layer_us"][name] - want) < 1e-6
    assert "sync-only" in capsys.readouterr().out
