"""``moeca bench compile`` (eager and compiled runs timed in one process; backend ``eager`` here: dynamo
traces the graphs without generating code, so the flow runs in seconds) and ``moeca bench steps`` (ms per
step of full compute and of MoECa's refresh and forecast steps, folded or not)."""
from __future__ import annotations

import json

import pytest

from moeca.cli.main import main


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench-engine") / "trace"
    assert main(["trace", "--model", "demo", "--steps", "10", "--samples", "4", "--cfg-scale", "1.5",
                 "--out", str(path), "--no-progress"]) == 0
    return path


def test_bench_compile_times_eager_and_compiled_in_one_process(trace, tmp_path):
    out = tmp_path / "results"
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


def test_bench_steps_times_each_kind_of_step(trace, tmp_path):
    out = tmp_path / "results"
    assert main(["bench", "steps", "--trace", str(trace), "--target", "2", "--timing-samples", "2",
                 "--repeats", "1", "--threads", "1", "--out", str(out)]) == 0
    payload = json.loads((out / "steps.json").read_text())
    full, folded, exact = payload["rows"]
    refresh = payload["meta"]["sync_refresh_steps"]
    assert full["run"] == "full compute" and full["ms_step"] > 0
    assert "folded" in folded["run"] and "exact gates" in exact["run"] and len(refresh) >= 3
    for row in (folded, exact):
        assert row["ms_refresh"] > 0 and row["refresh_over_full"] > 0 and row["speedup"] > 0
        assert row["ms_forecast"] is not None and row["ms_forecast"] < row["ms_refresh"]
    assert (out / "steps.md").exists() and (out / "steps.png").exists()
