"""``moeca bench app``: render time of every explorer page over a root holding a 10-million-branch-row trace.

A synthetic trace with the real schema (demo model shape, written like the tracer writes) is generated
under a temporary root together with a real analysis report of it, a derived schedule, a replay output
(random weights) and a synthetic Pareto result. Each page is rendered with
``streamlit.testing.v1.AppTest`` in this process: once (the first load: DuckDB scans, caches filled),
then ``--repeats`` more times (median = "after the first load"), then once after changing a widget.
Target: every page under 3 s after the first load.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import streamlit
from streamlit.testing.v1 import AppTest
from tqdm import tqdm

from moeca.app.common import ROOT_ENV
from moeca.bench.pareto_synthetic import write_synthetic_pareto
from moeca.bench.results import DEFAULT_OUT, pyplot, write_results
from moeca.testing.explorer_root import SyntheticTraceConfig, samples_for_rows, write_example_root

TARGET_S = 3.0
PAGES = (("Overview", "page_overview.py", None),
         ("Traces", "page_traces.py", ("selectbox", "trace_unit", "each routed expert")),
         ("Token vs branch", "page_token_branch.py", ("radio", "tvb_view", "run")),
         ("Schedule", "page_schedule.py", ("slider", "sched_sync", 5)),
         ("Replay", "page_replay.py", ("slider", "replay_samples", 4)),
         ("Benchmarks", "page_benchmarks.py", ("selectbox", "bench_y", "fd")))


def _timed_run(at) -> float:
    start = time.perf_counter()
    at.run()
    elapsed = time.perf_counter() - start
    if at.exception or at.error:
        raise RuntimeError(f"page failed: {[e.message for e in at.exception]} {[e.value for e in at.error]}")
    return elapsed


def _content(at) -> dict:
    """What the page showed (so a fast render of an empty or warning-only page is visible in the results)."""
    return {"charts": len(at.get("vega_lite_chart")), "images": len(at.get("image")), "tables": len(at.dataframe),
            "warnings": len(at.warning), "warning_text": " | ".join(str(w.value)[:120] for w in at.warning)}


def measure_pages(root: Path, repeats: int, progress: bool = True) -> list[dict]:
    script = Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"
    os.environ[ROOT_ENV] = str(root)
    at = AppTest.from_file(str(script), default_timeout=900)
    at.run()
    rows = []
    for name, page, widget in tqdm(PAGES, desc="app pages", disable=not progress):
        if page != "page_overview.py":
            at.switch_page(page)
        first = _timed_run(at)
        again = [_timed_run(at) for _ in range(repeats)]
        change = None
        if widget:
            kind, key, value = widget
            getattr(at, kind)(key=key).set_value(value)
            change = _timed_run(at)
        median = statistics.median(again)
        rows.append({"page": name, "first_load_s": round(first, 4), "rerender_median_s": round(median, 4),
                     "rerender_max_s": round(max(again), 4),
                     "widget_change_s": None if change is None else round(change, 4),
                     "target_s": TARGET_S, "meets_target": bool(median < TARGET_S), **_content(at)})
    return rows


def _plot(rows: list[dict]):
    def plot(path: Path) -> None:
        plt = pyplot()
        names = [r["page"] for r in rows]
        x = np.arange(len(names))
        fig, ax = plt.subplots(figsize=(8, 3.6))
        ax.bar(x - 0.27, [r["first_load_s"] for r in rows], 0.27, label="first load")
        ax.bar(x, [r["rerender_median_s"] for r in rows], 0.27, label="after first load (median)")
        ax.bar(x + 0.27, [r["widget_change_s"] or 0.0 for r in rows], 0.27, label="after a widget change")
        ax.axhline(TARGET_S, color="red", lw=1, ls="--", label=f"target {TARGET_S:g} s")
        ax.set_xticks(x, names, rotation=15)
        ax.set_ylabel("seconds")
        ax.set_title("moeca explorer page render time, 10M branch rows")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110, format="png")
        plt.close(fig)
    return plot


def run(args: argparse.Namespace) -> int:
    if args.rows < 1000:
        raise ValueError(f"--rows {args.rows} is too small; use at least 1000 (default 10000000)")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    shape = SyntheticTraceConfig.for_preset("demo", steps=50, samples_per_shard=16)
    cfg = SyntheticTraceConfig.for_preset("demo", steps=50, samples_per_shard=16,
                                          samples=samples_for_rows(args.rows, shape))
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="moeca-bench-app-"))
    if args.keep and root.exists() and any(root.iterdir()):
        raise FileExistsError(f"--keep {root} exists and is not empty; pass a new folder")
    try:
        start = time.perf_counter()
        write_example_root(root, cfg, replay=True)
        write_synthetic_pareto(root / "bench" / "results")
        setup_s = time.perf_counter() - start
        trace = root / "out" / "trace"
        trace_bytes = sum(p.stat().st_size for p in trace.rglob("*.parquet"))
        rows = measure_pages(root, args.repeats, progress=not args.no_progress)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    meta = {"branch_rows": cfg.branch_rows, "token_rows": cfg.branch_rows // cfg.top_k, "samples": cfg.samples,
            "trace_bytes": trace_bytes, "shape": "demo (6 blocks, 64 tokens, 8 experts top-2, 50 steps, CFG)",
            "repeats": args.repeats, "setup_s": round(setup_s, 1), "streamlit": streamlit.__version__,
            "duckdb": duckdb.__version__, "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    notes = (f"Synthetic trace with the real schema (written like the tracer writes it: float16 metrics with "
             f"BYTE_STREAM_SPLIT, zstd): {cfg.branch_rows:,} branch rows, {trace_bytes / 2**20:.0f} MiB, plus a real "
             f"`moeca analyze` report of it, a derived schedule, a `moeca replay` output of it (random weights) "
             f"and a synthetic Pareto result. Each page rendered with "
             f"streamlit.testing AppTest: first load (DuckDB scans fill the caches), then {args.repeats} reruns "
             f"(median reported: the 'after the first load' figure, target < {TARGET_S:g} s), then one rerun after "
             f"changing a widget. The Replay row is the page render (with an earlier replay output shown), not a "
             f"replay run.")
    columns = ["page", "first_load_s", "rerender_median_s", "rerender_max_s", "widget_change_s", "target_s",
               "meets_target", "charts", "images", "tables", "warnings"]
    write_results("app", rows, args.out, meta=meta, columns=columns, title="Explorer page render time", notes=notes,
                  plot=_plot(rows), command=f"moeca bench app --rows {args.rows} --repeats {args.repeats}")
    for r in rows:
        print(f"{r['page']:>16}: first {r['first_load_s']:.2f} s, after {r['rerender_median_s']:.2f} s, widget "
              f"change {r['widget_change_s'] if r['widget_change_s'] is not None else '-'} s")
    return 0 if all(r["meets_target"] for r in rows) else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("app",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000, help="branch rows of the synthetic trace (default 10M)")
    p.add_argument("--repeats", type=int, default=5, help="renders after the first load (median reported)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results folder (default bench/results)")
    p.add_argument("--keep", default=None, help="write the synthetic root here and keep it (default: a temp "
                                                "folder, removed afterwards)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
