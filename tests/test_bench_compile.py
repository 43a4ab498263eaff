"""``moeca bench compile``: eager and compiled runs timed in one process (backend ``eager`` here: dynamo
traces the graphs without generating code, so the flow runs in seconds)."""
from __future__ import annotations

import json

from moeca.cli.main import main


def test_bench_compile_times_eager_and_compiled_in_one_process(tmp_path):
    trace, out = tmp_path / "trace", tmp_path / "results"
    assert main(["trace", "--model", "demo", "--steps", "10", "--samples", "4", "--cfg-scale", "1.5",
                 "--out", str(trace), "--no-progress"]) == 0
    assert main(["bench", "compile", "--trace", str(trace), "--target", "1.5", "--timing-samples", "2",
                 "--repeats", "1", "--threads", "1", "--backend", "eager", "--out", str(out)]) == 0
    payload = json.loads((out / "compile.json").read_text())
    full, cached = payload["rows"]
    assert full["run"] == "full compute" and cached["run"].startswith("moeca 1.5x")
    for row in (full, cached):
        assert row["ms_eager"] > 0 and row["ms_compiled"] > 0 and row["compile_speedup"] > 0
        assert row["graphs"] >= 1                     # the warm-up compiled the kinds of step
        assert row["max_abs_diff"] < 1e-4              # the compiled forward gives the eager numbers
    assert cached["speedup_eager"] > 0 and cached["speedup_compiled"] > 0
    assert payload["meta"]["backend"] == "eager" and "--backend eager" in payload["command"]
    assert (out / "compile.md").exists() and (out / "compile.png").exists()
