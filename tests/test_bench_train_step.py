"""scripts/bench_train_step.py: a CPU smoke run writes a complete JSON record; bad input is refused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "bench_train_step.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_run_writes_json(script, tmp_path, capsys):
    out = tmp_path / "step.json"
    assert script.main(["--device", "cpu", "--batch-size", "2", "--steps", "2", "--warmup", "0",
                        "--methods", "none,slab", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [r["method"] for r in record["rows"]] == ["none", "slab"]
    none, slab = record["rows"]
    assert none["ms"] > 0 and slab["ms"] > 0
    assert none["vs_unpatched"] == 1.0 and slab["vs_unpatched"] == pytest.approx(slab["ms"] / none["ms"])
    assert record["batch_size"] == 2 and record["compile"] is False and record["environment"]["torch"]
    assert "| slab |" in capsys.readouterr().out


def test_unknown_method_is_refused(script):
    with pytest.raises(SystemExit):
        script.main(["--device", "cpu", "--methods", "slab,flash"])
