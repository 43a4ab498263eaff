"""Schedule helpers for the app: derive with the page's knobs, tabulate the reuse map, parse uploads.

The reuse map is the *expected refresh fraction* of every unit at every (step, block[, expert]):
1 = recomputed for every token, 0 = reused whole, ``f`` for a ``fraction f`` rule, 0.5 for a threshold
rule (its share is decided at run time), and 1 on sync steps. Forwards skipped whole (``model`` mode
``reuse``) count as 0; ``adaptive`` steps (decided at run time) as NaN.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from moeca.app.uploads import UploadError, parse_json
from moeca.policy.derive import DeriveConfig, derive_schedule
from moeca.policy.schedule import Schedule


@dataclass(frozen=True)
class Knobs:
    """The Schedule page's sliders.

    mode: "target speedup" or "error budget"; target_speedup: predicted FLOPs speedup; error_budget:
    the staleness error budget tau (relative L2); refresh: the derivation rule ("sync" or "budget");
    forecast: "linear" or "none"; sync_interval (budget rule), warmup_steps, final_steps: full-refresh
    steps; expert_bias: per-expert multiplier on that expert's measured drift (>1 refreshes it more,
    <1 less; empty = all 1); attn_weight, shared_weight, staleness_weight: see ``DeriveConfig``.
    """

    mode: str = "target speedup"
    target_speedup: float = 3.0
    error_budget: float = 0.2
    refresh: str = "sync"
    forecast: str = "linear"
    sync_interval: int = 10
    warmup_steps: int = 1
    final_steps: int = 0
    expert_bias: tuple[float, ...] = ()
    attn_weight: float = 1.0
    shared_weight: float = 1.0
    staleness_weight: float = 0.02


def derive_config(knobs: Knobs):
    target = knobs.target_speedup if knobs.mode == "target speedup" else None
    budget = knobs.error_budget if knobs.mode != "target speedup" else None
    return DeriveConfig(target_speedup=target, error_budget=budget, refresh=knobs.refresh, forecast=knobs.forecast,
                        warmup_steps=knobs.warmup_steps,
                        final_steps=knobs.final_steps, sync_interval=knobs.sync_interval,
                        attn_weight=knobs.attn_weight, shared_weight=knobs.shared_weight,
                        staleness_weight=knobs.staleness_weight)


def apply_expert_bias(summary: pd.DataFrame, bias: tuple[float, ...]) -> pd.DataFrame:
    """Scale routed expert ``e``'s drift (``mean_rel_l2`` of ``unit == "expert"`` rows) by ``bias[e]``.

    The derivation turns drift into refresh fractions, so a bias > 1 makes that expert refresh more
    often and < 1 less often; the other units are untouched. Raises ValueError on a negative bias.
    """
    if not bias or all(b == 1.0 for b in bias):
        return summary
    if any(not np.isfinite(b) or b < 0 for b in bias):
        raise ValueError(f"expert bias values must be finite and >= 0, got {list(bias)}")
    out = summary.copy()
    rows = (out["unit"] == "expert") & out["expert"].between(0, len(bias) - 1)
    factor = np.asarray(bias, dtype=float)[out.loc[rows, "expert"].to_numpy(int)]
    out.loc[rows, "mean_rel_l2"] = out.loc[rows, "mean_rel_l2"].to_numpy(float) * factor
    return out


def derive(summary: pd.DataFrame, run_meta: dict, knobs: Knobs):
    """A MoECa :class:`~moeca.policy.schedule.Schedule` from a drift summary and a trace's run.json."""
    biased = apply_expert_bias(summary, knobs.expert_bias)
    schedule = derive_schedule(biased, run_meta, derive_config(knobs))
    if knobs.expert_bias and any(b != 1.0 for b in knobs.expert_bias):
        schedule = schedule.with_provenance(app_expert_bias=list(knobs.expert_bias))
    return schedule


def reuse_map(schedule) -> pd.DataFrame:
    """Expected refresh fraction per (step, block, unit, expert); expert = -1 for attn/moe/shared.

    Columns: step, block, unit ("attn" | "moe" | "shared" | "expert"), expert, refresh, sync.
    """
    rows = []
    for s, step in enumerate(schedule.steps):
        sync = schedule.is_sync(s)
        mode = "compute" if sync else step.model
        for b in range(schedule.model.depth):
            rule = schedule.rule(s, b)

            def value(r) -> float:
                if mode == "reuse":
                    return 0.0
                if mode == "adaptive":
                    return float("nan")
                return float(r.expected_refresh())

            for unit in ("attn", "moe", "shared"):
                rows.append((s, b, unit, -1, value(getattr(rule, unit)), sync))
            for e, r in enumerate(rule.experts):
                rows.append((s, b, "expert", e, value(r), sync))
    return pd.DataFrame(rows, columns=["step", "block", "unit", "expert", "refresh", "sync"])


def summary_numbers(schedule) -> dict:
    """Headline numbers of a schedule: method, steps, sync steps, mean refresh per unit, predicted FLOPs."""
    m = reuse_map(schedule)
    mean = m.groupby("unit")["refresh"].mean()
    ratio = schedule.predicted_flops_ratio
    return {"method": schedule.method, "model": schedule.model.name, "steps": schedule.num_steps,
            "sync_steps": len(schedule.sync_refresh_steps),
            "predicted_flops_ratio": ratio, "predicted_speedup": (1.0 / ratio) if ratio else None,
            **{f"mean_refresh_{u}": float(mean.get(u, np.nan)) for u in ("attn", "shared", "expert")}}


def parse_schedule_upload(data: bytes, name: str):
    """Parse and validate an uploaded schedule (JSON only) -> Schedule; :class:`UploadError` on any problem."""
    doc = parse_json(data, name)
    if not isinstance(doc, dict):
        raise UploadError(f"{name}: a schedule is a JSON object, got {type(doc).__name__}")
    try:
        return Schedule.from_json(doc, where=name)
    except ValueError as exc:  # ScheduleError names the field
        raise UploadError(str(exc)) from None
    except (KeyError, TypeError) as exc:
        raise UploadError(f"{name}: malformed schedule ({exc!r})") from None


def with_knobs_note(schedule, knobs: Knobs):
    return schedule.with_provenance(app_knobs={k: (list(v) if isinstance(v, tuple) else v)
                                               for k, v in knobs.__dict__.items()})
