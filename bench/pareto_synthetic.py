"""Made-up ``moeca bench pareto`` results, for the explorer's tests and its benchmark (``moeca bench app``).

Rows carry every field of real sweep rows and ``detail: {"synthetic": true}``; they are written by the
sweep's own writer, so the explorer reads exactly the real format. Not measurements.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from moeca.bench import pareto as bp


def synthetic_pareto_rows(seed: int = 0) -> list[dict]:
    """Made-up Pareto sweep rows with every field of ``moeca bench pareto`` rows, for app tests and the app
    benchmark only: each row's ``detail`` says ``{"synthetic": true}``. Not measurements."""
    rng = np.random.default_rng(seed)

    def row(method: str, knob: str | None, value: float, speedup: float, psnr: float, i: int, m: int) -> dict:
        ms_cached = 500.0 / speedup
        params = {} if knob is None else {knob: value}
        setting = ",".join(f"{k}={v:g}" for k, v in params.items()) or "full"
        per_seed = {"psnr": [psnr - 0.2, psnr + 0.2], "ssim": [0.99 - 0.03 * i - 0.01 * m] * 2,
                    "rel_l2": [0.02 * i, 0.02 * i + 0.001], "accuracy": [0.95 - 0.01 * i] * 2,
                    "fd": [1.0 + 0.2 * i + 0.05 * m, 1.1 + 0.2 * i + 0.05 * m]}
        out = {"method": method, "setting": setting, "params": params, "point": f"{method}:{setting}",
               "speedup": round(speedup, 3), "speedup_spread": 0.05, "flops_ratio": round(1.0 / (speedup + 0.2), 4),
               "predicted_flops_ratio": None, "per_seed": per_seed, "ms_full": 500.0, "ms_cached": round(ms_cached, 2),
               "times_full_s": [0.5], "times_cached_s": [round(ms_cached / 1000, 4)], "reuse_attn": round(0.15 * i, 3),
               "reuse_expert": round(0.2 * i, 3), "skipped_forwards": 0.0, "cache_mb": 1.0,
               "detail": {"synthetic": True}}
        for k, (a, b) in per_seed.items():
            out[k], out[f"{k}_spread"] = (a + b) / 2, abs(a - b) / 2
        return out

    rows = [row("none", None, 1.0, 1.0, 100.2, 0, 0)]
    rows[0].update(psnr=100.0, psnr_spread=0.0, per_seed={**rows[0]["per_seed"], "psnr": [100.0, 100.0]})
    for m, (method, knob, quality) in enumerate((("moeca", "target_speedup", 40.0), ("toca", "fresh_threshold", 34.0),
                                                 ("fora", "interval", 31.0), ("teacache", "thresh_x_mean_change", 30.0))):
        for i, value in enumerate((1.5, 2.0, 3.0, 4.0)):
            rows.append(row(method, knob, value, 1.2 + 0.9 * i + 0.1 * m,
                            round(quality - 4.0 * i + float(rng.normal(0, 0.3)), 3), i, m))
    return rows


def write_synthetic_pareto(out_dir: str | os.PathLike) -> Path:
    """``pareto.json/.md/.png`` of :func:`synthetic_pareto_rows`, written by ``moeca bench pareto``'s own writer
    (so the format is exactly the real one, validated against its schema) with the sweep state's calibration
    saying ``synthetic``."""
    rows = synthetic_pareto_rows()
    methods = list(dict.fromkeys(r["method"] for r in rows))
    command = "moeca bench pareto --model demo"
    settings = bp.ParetoSettings()
    grid: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="moeca-synthetic-pareto-") as tmp:
        sampler = {"kind": "rectified_flow", "num_steps": settings.num_steps, "cfg_scale": settings.cfg_scale,
                   "cfg_mode": settings.cfg_mode}
        state = bp.SweepState(Path(tmp) / bp.STATE_FILE, settings, "0" * 16, sampler, resume=False)
        state.set_calibration("reference_metrics", {"accuracy": 0.95, "accuracy_spread": 0.0, "fd": 1.0,
                                                    "fd_spread": 0.05, "fd_floor": 0.5, "samples": 16, "seeds": [0, 1]})
        state.set_calibration("synthetic", "made-up rows written by moeca.bench.pareto_synthetic, not measurements")
        for r in rows:
            grid.setdefault(r["method"], []).append(r["params"])
            state.record(bp.Point(r["method"], tuple(r["params"].items())), r)
        info = bp.SweepInfo(settings, state, "demo", "0" * 16, sampler)
        paths = bp.write(info, rows, methods, out_dir, command, grid)
    bp.validate(json.loads(paths["json"].read_text()))
    return paths["json"]
