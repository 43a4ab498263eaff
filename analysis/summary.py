"""The tidy summary table (the contract the policy and the app read).

One row per (unit, block, step, expert, lag). Columns:

- ``unit`` in {"attn", "moe", "shared", "update", "expert"}; ``block``, ``step`` (0 = noisiest),
  ``expert`` (-1 unless unit == "expert"), ``lag`` (1..K: the cache age in steps);
- ``n``: rows whose rel_l2 and cos at this lag are both present and finite (the rows the means are
  over); ``nan_count``: rows whose metric is present but NaN/Inf (never dropped silently: counted here);
- ``mean_rel_l2``, ``p50_rel_l2``, ``p90_rel_l2`` (quantiles from 1/16-octave float16 histograms: the
  lower edge of the bin holding the quantile, relative resolution 6.25%, values below 2^-18 report 0),
  ``mean_cos``;
- ``mean_gate_weight``: mean raw softmax gate weight of the routed pairs (expert rows; NaN otherwise);
- ``persist_frac``: expert rows: fraction of routed (token, expert) pairs at this step that were also
  routed at ``step - lag`` (so a cache exists and the branch is reusable); NaN for token units, for
  ``step < lag`` and where the expert received no tokens.

Statistics pool samples, CFG branches and tokens.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from moeca.tracer.schema import TOKEN_UNITS

from .engine import BIN_BAD, NB, Partials, metric_bin_lower_edges

SUMMARY_COLUMNS = ["unit", "block", "step", "expert", "lag", "n", "mean_rel_l2", "p50_rel_l2", "p90_rel_l2",
                   "mean_cos", "mean_gate_weight", "persist_frac", "nan_count"]


def hist_quantile(hist: np.ndarray, q: float) -> np.ndarray:
    """Lower bin edge of the ``q`` quantile of value histograms ``[..., NB]``; NaN where empty."""
    edges = metric_bin_lower_edges()
    cum = np.cumsum(hist, axis=-1)
    total = cum[..., -1:]
    target = np.maximum(np.ceil(q * total), 1)
    idx = np.argmax(cum >= target, axis=-1)
    out = edges[idx]
    return np.where(total[..., 0] > 0, out, np.nan)


def _stats(hist: np.ndarray, sum_rel: np.ndarray, sum_cos: np.ndarray) -> dict[str, np.ndarray]:
    values = hist[..., :NB]
    n = values.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"n": n, "nan_count": hist[..., BIN_BAD], "nonnull": n + hist[..., BIN_BAD],
                "total": hist.sum(-1), "mean_rel_l2": np.where(n > 0, sum_rel / n, np.nan),
                "mean_cos": np.where(n > 0, sum_cos / n, np.nan),
                "p50_rel_l2": hist_quantile(values, 0.5), "p90_rel_l2": hist_quantile(values, 0.9)}


def summary_frame(p: Partials) -> pd.DataFrame:
    """Build the summary table from merged partials (see module docstring for the columns)."""
    g = p.grid
    K, B, S, E = g.lags, g.depth, g.num_steps, g.num_experts
    frames = []
    # token units: arrays [U, K, B, S]
    st = _stats(p.tu_hist, p.tu_sum_rel, p.tu_sum_cos)
    U = len(TOKEN_UNITS)
    u_idx, l_idx, b_idx, s_idx = np.meshgrid(np.arange(U), np.arange(K), np.arange(B), np.arange(S), indexing="ij")
    tok = pd.DataFrame({"unit": np.array(TOKEN_UNITS)[u_idx.ravel()], "block": b_idx.ravel(), "step": s_idx.ravel(),
                        "expert": -1, "lag": l_idx.ravel() + 1, "n": st["n"].ravel(),
                        "mean_rel_l2": st["mean_rel_l2"].ravel(), "p50_rel_l2": st["p50_rel_l2"].ravel(),
                        "p90_rel_l2": st["p90_rel_l2"].ravel(), "mean_cos": st["mean_cos"].ravel(),
                        "mean_gate_weight": np.nan, "persist_frac": np.nan, "nan_count": st["nan_count"].ravel()})
    frames.append(tok)
    # experts: arrays [K, B, S, E]
    st = _stats(p.ex_hist, p.ex_sum_rel, p.ex_sum_cos)
    l_idx, b_idx, s_idx, e_idx = np.meshgrid(np.arange(K), np.arange(B), np.arange(S), np.arange(E), indexing="ij")
    routed = p.ex_routed[None].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        gate = np.where(p.ex_routed > 0, p.ex_sum_gate / p.ex_routed, np.nan)
        persist = np.where(routed > 0, st["nonnull"] / routed, np.nan)
    persist = np.where(s_idx < l_idx + 1, np.nan, persist)
    ex = pd.DataFrame({"unit": "expert", "block": b_idx.ravel(), "step": s_idx.ravel(), "expert": e_idx.ravel(),
                       "lag": l_idx.ravel() + 1, "n": st["n"].ravel(), "mean_rel_l2": st["mean_rel_l2"].ravel(),
                       "p50_rel_l2": st["p50_rel_l2"].ravel(), "p90_rel_l2": st["p90_rel_l2"].ravel(),
                       "mean_cos": st["mean_cos"].ravel(),
                       "mean_gate_weight": np.broadcast_to(gate[None], (K, B, S, E)).ravel(),
                       "persist_frac": persist.ravel(), "nan_count": st["nan_count"].ravel()})
    frames.append(ex)
    df = pd.concat(frames, ignore_index=True)[SUMMARY_COLUMNS]
    for col in ("block", "step", "expert", "lag", "n", "nan_count"):
        df[col] = df[col].astype(np.int64)
    for col in ("mean_rel_l2", "p50_rel_l2", "p90_rel_l2", "mean_cos", "mean_gate_weight", "persist_frac"):
        df[col] = df[col].astype(np.float64)
    df["unit"] = df["unit"].astype(str)
    return df.sort_values(["unit", "block", "step", "expert", "lag"], kind="stable").reset_index(drop=True)


def load_summary(report_dir: str | Path) -> pd.DataFrame:
    """Read ``summary.parquet`` from a report folder written by ``moeca analyze``."""
    path = Path(report_dir) / "summary.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; write the report with `moeca analyze TRACE_DIR --out {report_dir}`")
    df = pd.read_parquet(path)
    missing = [c for c in SUMMARY_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path} lacks summary columns {missing}; regenerate it with `moeca analyze`")
    return df
