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
    forced, routed = bench.exit_variants(row["exit_layer"])
    assert row["exit_layer"] == row["layers"] - 2  # --exit-layer 8 clamped to the tiny model's last routed layer
    assert row["prefill_ms"] == row["lm_ms"]["unpatched"] > 0 and row["layers"] >= 2
    for clock in ("ttft", "lm"):
        ms, extra = row[f"{clock}_ms"], row[f"{clock}_per_routed_layer_us"]
        assert set(ms) == {"unpatched", *bench.VARIANTS, forced, routed} and all(v > 0 for v in ms.values())
        for name in bench.VARIANTS:
            assert abs(extra[name] - (ms[name] - ms["unpatched"]) / (row["layers"] - 1) * 1e3) < 1e-6
        assert abs(extra[routed] - (ms[routed] - ms[forced]) / (row["exit_layer"] + 1) * 1e3) < 1e-6
        share = row[f"{clock}_share_of_layer"]
        assert abs(share["routed"] - extra["routed"] / (row["prefill_ms"] / row["layers"] * 1e3)) < 1e-9
    assert "routed-sync" in capsys.readouterr().out
