"""bench/gpu_check --dry-run: the GPU check's whole flow on the CPU (tiny shape, 2 steps)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_measures_every_method_eager_and_compiled(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path),
                           "--intervals", "2", "--compiled-intervals", "2", "--repeats", "1"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {p.name for p in tmp_path.iterdir()}
    assert {"gpu_check_dry_run.json", "gpu_check_dry_run.md"} <= names and not any(n.startswith("gpu_check.") for n in names)
    payload = json.loads((tmp_path / "gpu_check_dry_run.json").read_text())
    rows = payload["rows"]
    assert {(r["mode"], r["method"]) for r in rows} == {(m, x) for m in ("eager", "compiled")
                                                      for x in ("fora", "taylorseer", "moeca")}
    for r in rows:
        assert not r.get("error"), r
        assert r["full_ms_per_step"] > 0 and r["ms_per_step"] > 0 and r["speedup"] > 0
        assert r["forecast_sync_free"] is None          # checked on CUDA only
    fora = next(r for r in rows if r["method"] == "fora")
    # counted = the predicted compute + the folded stack forecast's rows (2 D FLOPs each), left out of the prediction
    assert fora["predicted_flops_ratio"] < fora["flops_ratio"] < fora["predicted_flops_ratio"] + 0.01
    assert fora["flops_ratio"] < 1
    meta = payload["meta"]
    assert meta["dry_run"] and meta["num_steps"] == 4 and meta["compile"]["backend"] == "eager"
    assert meta["code_version"] and not meta["skipped"]
    assert "Code version" in (tmp_path / "gpu_check_dry_run.md").read_text()
