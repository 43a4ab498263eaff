"""Analysis end to end on traces written by the real tracer: a tiny random model, and the shipped demo model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moeca.tracer import run as tracer_run


def _check_report(out: Path, trace: Path, *, samples: int, steps: int, depth: int, experts: int, tokens: int,
                  lags: int, cfg: int = 2) -> dict:
    from moeca.analysis import load_summary
    from moeca.analysis.compare import at_error
    import pandas as pd

    head = json.loads((out / "headline.json").read_text())
    nums = head["numbers"]
    for key in ("lag1_branch_reuse_frac", "lag1_token_reuse_frac", f"run{lags}_branch_reuse_frac",
                f"run{lags}_token_reuse_frac"):
        assert 0.0 <= nums[key] <= 1.0, (key, nums[key])
    assert nums["nan_metric_values"] == 0
    s = load_summary(out)
    assert len(s) == 4 * depth * steps * lags + depth * steps * experts * lags
    tok = s[(s.unit != "expert") & (s.step >= s.lag)]
    assert (tok.n == samples * cfg * tokens).all()
    assert (s[(s.unit != "expert") & (s.step < s.lag)].n == 0).all()
    ex = s[(s.unit == "expert") & (s.step >= s.lag) & s.mean_gate_weight.notna()]
    assert ex.persist_frac.between(0, 1).all()
    assert (ex.mean_gate_weight > 0).all() and (ex.mean_gate_weight <= 1).all()
    # every routed pair at a step >= 1: the lag-1 persisting pairs are exactly the rows with a value
    routed = s[(s.unit == "expert") & (s.lag == 1) & (s.step >= 1)]
    assert routed.n.sum() > 0
    curves = pd.read_csv(out / "comparison.csv")
    for (view, span, policy), c in curves.groupby(["view", "span", "policy"]):
        assert np.all(np.diff(c.reuse_frac_moe.to_numpy()) >= -1e-12), (view, span, policy)
        assert np.all(np.diff(c.mean_rel_err.to_numpy()) >= -1e-12), (view, span, policy)
    # the headline numbers are the curves read at the headline error
    assert nums["lag1_branch_reuse_frac"] == pytest.approx(at_error(curves, "lag", 1, "branch", nums["error"]))
    md = (out / "report.md").read_text()
    assert head["sentence"] in md.splitlines()[2]
    return head


def test_tiny_model_trace_end_to_end(tmp_path):
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_tiny

    from moeca.analysis.report import analyze
    from moeca.diffusion.samplers import SamplerConfig

    cfg = tracer_run.TraceConfig(sampler=SamplerConfig(kind="rectified_flow", num_steps=6, cfg_scale=1.5,
                                                       cfg_mode="batched"), labels=(0, 1, 2), batch_size=2, lags=3)
    trace = tracer_run.trace_run(make_tiny(), tmp_path / "trace", cfg, progress=False)
    analyze([trace], tmp_path / "report")
    _check_report(tmp_path / "report", trace, samples=3, steps=6, depth=2, experts=4, tokens=16, lags=3)


def _demo_weights() -> Path | None:
    try:
        from moeca.models.registry import demo_weights_path
        path = demo_weights_path()
    except ImportError:
        from moeca.models.registry import data_dir
        path = data_dir() / "demo" / "demo_model.safetensors"
    return path if path.is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(_demo_weights() is None, reason="demo weights data/demo/demo_model.safetensors not trained yet "
                                                     "(run `moeca train-demo`)")
def test_demo_model_token_vs_branch_end_to_end(tmp_path):
    """`moeca trace --model demo` then `moeca analyze`: the comparison runs and is internally consistent."""
    from moeca.cli.main import main

    trace, out = tmp_path / "trace", tmp_path / "report"
    assert main(["trace", "--model", "demo", "--steps", "10", "--samples", "4", "--cfg-scale", "1.5",
                 "--out", str(trace), "--no-progress", "--device", "cpu"]) == 0
    assert main(["analyze", str(trace), "--out", str(out), "--quiet"]) == 0
    head = _check_report(out, trace, samples=4, steps=10, depth=6, experts=8, tokens=64, lags=4)
    assert "expert branch" in head["sentence"]
