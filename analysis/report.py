"""``moeca analyze``: the report folder (report.md, figures, summary table, headline), written atomically.

REPORT_DIR/
  report.md            headline sentence first, then the estimator, tables and figures
  headline.json        {"sentence": str, "numbers": {...}}
  summary.parquet/.csv the tidy summary table (:mod:`moeca.analysis.summary`)
  comparison.csv       token vs branch reuse-vs-error curves (:func:`moeca.analysis.compare.sweep`)
  figures/*.png

Everything is written into a temporary sibling folder that is renamed into place at the end, so a
reader never sees a half-written report (:func:`moeca.common.outputs.output_dir`: the folder carries a
``.moeca-manifest.json``, and an existing REPORT_DIR is replaced only where that manifest says moeca
wrote it). The traces are validated first (:func:`moeca.tracer.store.validate_trace`), given once each,
and REPORT_DIR may not contain or lie inside one of them.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from moeca.common.outputs import check_output_dir, output_dir
from moeca.tracer.schema import TOKEN_UNITS
from moeca.tracer.store import check_distinct_traces, validate_trace

from . import compare, figures
from .collect import Collected, collect
from .engine import BIN_BAD, NB
from .flops import unit_flops
from .summary import summary_frame


def _model_name(t) -> str:
    return str(t.meta["model"].get("name") or t.config.get("name", "model"))


def _label(traces) -> str:
    """What the headline is about; pooled traces of different models or samplers name every one."""
    n_samples = sum(len(x.meta.get("labels", []) or []) for x in traces)
    extra = f" over {len(traces)} traces" if len(traces) > 1 else ""
    runs = list(dict.fromkeys((_model_name(t), str(t.meta["model"].get("weights_hash", "?")),
                               t.meta["sampler"].get("kind", "?"), t.num_steps, t.meta["sampler"].get("cfg_scale", "?"))
                              for t in traces))
    if len(runs) == 1:
        model, _, kind, steps, cfg = runs[0]
        return f"the {model} model ({kind}, {steps} steps, CFG {cfg}, {n_samples} samples{extra})"
    names = [n for n, *_ in runs]
    parts = [f"{n}" + (f" weights {w}" if names.count(n) > 1 else "") + f" ({k}, {s} steps, CFG {c})"
             for n, w, k, s, c in runs]
    return f"{len(runs)} pooled models/samplers: {'; '.join(parts)} ({n_samples} samples{extra}, --allow-mixed)"


def _md_table(df: pd.DataFrame, floatfmt: str = ".3g") -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            cells.append(format(v, floatfmt) if isinstance(v, (float, np.floating)) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _unit_table(p) -> pd.DataFrame:
    rows = []
    K = p.grid.lags
    for u, unit in enumerate(TOKEN_UNITS):
        row = {"unit": unit}
        for li in range(K):
            n = p.tu_hist[u, li, ..., :NB].sum()
            row[f"lag {li + 1}"] = p.tu_sum_rel[u, li].sum() / n if n else float("nan")
        row["NaN/Inf values"] = int(p.tu_hist[u, ..., BIN_BAD].sum())
        rows.append(row)
    row = {"unit": "routed expert (unweighted)"}
    for li in range(K):
        n = p.ex_hist[li, ..., :NB].sum()
        row[f"lag {li + 1}"] = p.ex_sum_rel[li].sum() / n if n else float("nan")
    row["NaN/Inf values"] = int(p.ex_hist[..., BIN_BAD].sum())
    rows.append(row)
    return pd.DataFrame(rows)


def _expert_table(p) -> pd.DataFrame:
    rows = []
    for e in range(p.grid.num_experts):
        routed = int(p.ex_routed[..., e].sum())
        n1 = p.ex_hist[0, ..., e, :NB].sum()
        rows.append({"expert": e, "routed pairs": routed,
                     "mean gate weight": p.ex_sum_gate[..., e].sum() / routed if routed else float("nan"),
                     "mean rel L2 lag 1": p.ex_sum_rel[0, ..., e].sum() / n1 if n1 else float("nan"),
                     f"mean rel L2 lag {p.grid.lags}": (p.ex_sum_rel[-1, ..., e].sum()
                                                         / max(p.ex_hist[-1, ..., e, :NB].sum(), 1)),
                     "persist lag 1": (p.ex_hist[0, ..., e, :NB].sum() + p.ex_hist[0, ..., e, BIN_BAD].sum())
                     / max(p.ex_routed[:, 1:, e].sum(), 1)})
    return pd.DataFrame(rows)


def _run_all(jobs) -> None:
    for job in jobs:
        job()


def _draw_figures(jobs: list) -> None:
    """Run the figure-drawing callables, half of them in a forked child process where the platform
    forks and two or more CPUs are free (matplotlib is single-threaded; this halves the ~1 s the figures
    add after the reduction); sequentially otherwise. A failing child raises RuntimeError."""
    if len(jobs) < 2 or (os.cpu_count() or 1) < 2 or "fork" not in mp.get_all_start_methods():
        _run_all(jobs)
        return
    figures._plt()  # import matplotlib once, before the fork, so the child inherits it
    child = mp.get_context("fork").Process(target=_run_all, args=(jobs[1::2],), name="moeca-figures")
    child.start()
    try:
        _run_all(jobs[0::2])
    finally:
        child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"drawing the report figures failed in the worker process (exit code {child.exitcode}); "
                           "see its traceback above")


def build_report(col: Collected, out_tmp: Path, headline_error: float | None = None, command: str = "",
                 make_figures: bool = True) -> dict:
    """Write every report file into ``out_tmp``; returns the headline dict."""
    p = col.partials
    K = p.grid.lags
    figdir = out_tmp / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    summary = summary_frame(p)
    _atomic_df(summary, out_tmp / "summary.parquet", out_tmp / "summary.csv")
    curves = compare.sweep(p)
    curves.to_csv(out_tmp / "comparison.csv", index=False)
    label = _label(col.traces)
    head = compare.headline(curves, K, headline_error, label)
    e0 = head["numbers"]["error"]
    levels = sorted({float(f"{e0 * m:.3g}") for m in (0.25, 0.5, 1, 2)} | set(compare.HEADLINE_ERRORS))
    table = compare.comparison_table(curves, K, levels)
    nan_total = int(summary.nan_count.sum())
    head["numbers"]["nan_metric_values"] = nan_total
    head["numbers"]["branch_rows"] = int(p.branch_rows)
    head["numbers"]["token_rows"] = int(p.token_rows)
    if make_figures:
        _draw_figures([lambda: figures.drift_heatmaps(p, figdir / "drift_heatmaps.png"),
                       lambda: figures.reuse_vs_error(curves, figdir / "reuse_vs_error.png", K),
                       lambda: figures.expert_violins(p, figdir / "expert_violins.png"),
                       lambda: figures.routing_stability(p, figdir / "routing_stability.png"),
                       lambda: figures.accumulated_drift(p, figdir / "accumulated_drift.png"),
                       lambda: figures.gate_dependence(p, figdir / "gate_dependence.png")])
    pers = figures.persistence(p)
    fl = unit_flops(col.traces[0].config)

    t0 = col.traces[0]
    lines = ["# Token- vs expert-branch-level redundancy", "", f"**{head['sentence']}**", ""]
    if nan_total:
        lines += [f"> **Warning:** {nan_total} metric values in the trace(s) are NaN or Inf. They are counted in "
                  f"`nan_count` of the summary table and excluded from means and quantiles; a unit with a "
                  f"NaN error is never counted as reusable.", ""]
    if col.mixed:
        lines += ["> **Mixed traces pooled (--allow-mixed):** " + "; ".join(col.mixed[:5]), ""]
    models = list(dict.fromkeys((_model_name(t), t.fingerprint, str(t.meta["model"].get("weights_hash", "?")))
                                for t in col.traces))
    samplers = list(dict.fromkeys(json.dumps(t.meta["sampler"], sort_keys=True) for t in col.traces))
    lines += ["## Setup", "",
              f"- traces: {', '.join(str(t.path) for t in col.traces)}",
              f"- model{'s' if len(models) > 1 else ''}: "
              + "; ".join(f"`{n}` fingerprint `{f}`, weights `{w}`" for n, f, w in models)
              + f"; depth {t0.depth}, {t0.num_experts} experts top-{t0.top_k}, "
              f"{t0.tokens} tokens, shared expert: {'yes' if t0.has_shared else 'no'}",
              f"- sampler{'s' if len(samplers) > 1 else ''}: " + "; ".join(f"`{x}`" for x in samplers),
              f"- rows: {p.branch_rows:,} branch rows, {p.token_rows:,} token rows; lags 1..{K}",
              f"- FLOPs per block (2 per multiply-add): routed expert {fl['expert']:.3g} per (token, expert), shared "
              f"{fl['shared']:.3g} per token, attention {fl['attn']:.3g} per token, router {fl['router']:.3g} per "
              f"token; MoE = {fl['moe_total_per_token'] / fl['block_per_token']:.1%} of a block's FLOPs",
              "", "## How reuse is estimated", "",
              "Both policies reuse values cached `L` steps earlier (cache age `L`, the tracer's lag metrics). "
              "For each token the reference is the norm of its MoE output, `R = sqrt(||moe||^2 + ||shared||^2)`.",
              "",
              "- **Token level** (ToCa-like): the token's whole MoE update (all routed branches with their old gate "
              "weights, and the shared expert) is reused when `e_tok = (||Δmoe|| + ||Δshared||) / R` is within the "
              "budget, with `||Δmoe|| = moe_rel_l2_lagL · ||moe_{s-L}||` measured by the tracer (it includes "
              "routing changes). It saves `k · expert + shared` FLOPs.",
              "- **Branch level** (MoECa): each routed (token, expert) pair that was also routed `L` steps back "
              "has a cache of its *unweighted* output, multiplied by the *current* gate weight, so its error is "
              "`e_br = w_s · rel_l2_lagL · out_norm_{s-L} / R`; it is reused when within the budget and saves "
              "`expert` FLOPs. Newly routed pairs have no cache. The shared expert is a separate per-token unit.",
              "- A token's resulting error is the sum of its reused units' errors (triangle inequality: an upper "
              "bound of the relative MoE-output error, for both policies). A branch-level token can reuse up to "
              "k+1 units each within the budget, so the two are compared at **equal resulting mean error**, "
              "interpolating linearly between budget points (reusing part of the next budget's units).",
              "- The step-to-step view (`L = 1`) overstates what a cache reused for several steps can save; the "
              f"'runs of up to N' rows pool cache ages 1..N (N ≤ {K}).",
              "- Caveats: errors are per token and per block, relative to that block's MoE output; how they "
              "propagate through later blocks and sampling steps is not modelled here (replay measures the image "
              "error). Attention reuse is the same at both granularities and is left out of the comparison; the "
              "`*_block` columns give the same reuse as a share of the whole block's FLOPs. A NaN error is never "
              "reused.",
              "", "## Token vs branch at equal resulting error", "",
              "Fraction of MoE FLOPs reusable (and of whole-block FLOPs) at a given mean relative MoE-output error.",
              "", _md_table(table), "",
              "![reuse vs error](figures/reuse_vs_error.png)", "",
              "## Drift per unit and cache age", "",
              "Mean relative L2 change of each unit's output against its value `L` steps back "
              "(experts: unweighted output of routed pairs present at both steps).", "",
              _md_table(_unit_table(p)), "",
              "![accumulated drift](figures/accumulated_drift.png)", "",
              "![drift heatmaps](figures/drift_heatmaps.png)", "",
              "## Experts", "", _md_table(_expert_table(p)), "",
              "![per-expert drift](figures/expert_violins.png)", "",
              "![drift vs gate weight](figures/gate_dependence.png)", "",
              "## Routing stability", "",
              f"Fraction of routed (token, expert) pairs that were also routed 1 step back (a newly routed pair "
              f"cannot be reused): mean {np.nanmean(pers[0]):.3f}, min over (step, block) {np.nanmin(pers[0]):.3f}."
              if np.isfinite(pers[0]).any() else "No step has a previous step to compare with.", "",
              "![routing stability](figures/routing_stability.png)", "",
              "## Files", "",
              "- `summary.parquet` / `summary.csv`: one row per (unit, block, step, expert, lag); columns documented "
              "in `moeca.analysis.summary` (p50/p90 have a relative resolution of 6.25%).",
              "- `comparison.csv`: the full reuse-vs-error sweep (162 budgets, per cache age and run length).",
              "- `headline.json`: the sentence above and its numbers.", ""]
    if command:
        lines += [f"Regenerate: `{command}`", ""]
    lines += [f"_Generated {time.strftime('%Y-%m-%d %H:%M:%S')}._", ""]
    if not make_figures:
        lines = [ln for ln in lines if not ln.startswith("![")]
        figdir.rmdir()
    (out_tmp / "report.md").write_text("\n".join(lines))
    (out_tmp / "headline.json").write_text(json.dumps(head, indent=1, default=float))
    return head


def _atomic_df(df: pd.DataFrame, parquet: Path, csv: Path) -> None:
    df.to_parquet(parquet, index=False)
    df.to_csv(csv, index=False)


def analyze(trace_dirs: Sequence[str | Path], out: str | Path, allow_mixed: bool = False,
            memory_limit: str | int | None = None, scheduler: Any = None, threads: int = 2,
            headline_error: float | None = None, progress: bool = False, command: str = "",
            make_figures: bool = True) -> dict:
    """Analyse traces and write the report folder ``out`` atomically; returns the headline dict.

    ``headline_error``: mean relative MoE-output error at which the headline compares the policies;
    None picks it from the data (:func:`moeca.analysis.compare.auto_error`). An existing ``out`` is
    replaced only if it is a previous report (or empty).
    """
    if isinstance(trace_dirs, (str, Path)):
        trace_dirs = [trace_dirs]
    if headline_error is not None and not 0 < headline_error < 1:
        raise ValueError(f"headline error {headline_error} must be in (0, 1) (a relative error, e.g. 0.05)")
    if not isinstance(threads, int) or not 1 <= threads <= 256:
        raise ValueError(f"--threads {threads} must be an integer in 1..256")
    trace_dirs = check_distinct_traces(trace_dirs)
    inputs = [("trace", t) for t in trace_dirs]
    check_output_dir(out, inputs)                    # refuse before the reduction, not after it
    for t in trace_dirs:
        validate_trace(t)
    col = collect(list(trace_dirs), allow_mixed=allow_mixed, memory_limit=memory_limit, scheduler=scheduler,
                  threads=threads, progress=progress)
    with output_dir(out, what="analysis report", inputs=inputs, command=command) as tmp:
        head = build_report(col, tmp, headline_error, command, make_figures)
    return head
