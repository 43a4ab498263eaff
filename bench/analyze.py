"""``moeca bench analyze``: analysis throughput on a large synthetic trace with the real schema.

Generates (once, cached under --work-dir) a synthetic trace of at least --rows branch rows with the
tracer's exact Parquet schemas: S/2-like shape (12 blocks, 256 tokens, 8 experts top-2, CFG, 50 steps,
4 lags), random routing and log-normal drift, shards of 4 samples. Then times, in this process:

- ``decode only``: reading and decoding the columns the analysis uses (pyarrow on all cores, nothing
  reduced), the floor under the other two;
- ``reduce``: the out-of-core pass (``moeca.analysis.collect.collect``) that every product reads;
- ``full analyze``: the whole ``moeca analyze`` (pass + summary table + sweep + figures + report).

Reports branch rows per second and peak RSS of this process plus its children (worker processes),
sampled every 20 ms. Targets (issue 4): >= 5 million branch rows/s on 2 cores, peak < 2 GB.
The machine may be shared: the load average at start and end is recorded beside the numbers.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq

from moeca.analysis.collect import collect
from moeca.analysis.report import analyze
from moeca.analysis.trace import branch_columns, open_trace, parse_memory_limit, token_columns
from moeca.bench.results import check_results_out, pyplot, write_results
from moeca.common.outputs import (OutputError, atomic_write_text, check_output_dir, check_replace_file, os_errors,
                                  remove_listed)
from moeca.testing.synthetic_traces import write_synthetic_trace

ROWS_PER_SAMPLE = 2 * 50 * 12 * 256 * 2          # cfg x steps x blocks x tokens x top-k
TARGET_ROWS_PER_S = 5e6
TARGET_PEAK_GB = 2.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=float, default=50e6, help="minimum branch rows (default 50e6)")
    p.add_argument("--work-dir", default=None,
                   help="where the synthetic trace is cached (default: $TMPDIR/moeca-bench-analyze)")
    p.add_argument("--regenerate", action="store_true", help="rewrite the cached synthetic trace")
    p.add_argument("--memory-limit", default="2GB", help="analysis memory limit (default 2GB)")
    p.add_argument("--threads", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--out", default="bench/results", help="results folder (analyze.json/.md/.png)")
    p.set_defaults(func=run)


class PeakRSS:
    """Samples RSS of this process plus all its children every ``interval`` seconds (a thread)."""

    def __init__(self, interval: float = 0.02):
        self.proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> int:
        total = 0
        for p in [self.proc] + self.proc.children(recursive=True):
            try:
                total += p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def ensure_trace(work: Path, rows: float, regenerate: bool = False) -> Path:
    """The cached synthetic trace with >= ``rows`` branch rows (regenerated when parameters differ)."""
    samples = max(4, math.ceil(rows / ROWS_PER_SAMPLE))
    params = {"depth": 12, "num_steps": 50, "num_experts": 8, "side": 16, "samples": samples,
              "samples_per_shard": 4, "lags": 4, "routing": "random", "noise": 0.5, "seed": 0,
              "row_group_rows": 1 << 19, "format": 1}
    trace = work / "trace"
    marker = work / "trace.params.json"
    if work.exists() and not work.is_dir():
        raise OutputError(f"--work-dir {work} is a file, not a folder; give a folder (it is created if absent)")
    if not regenerate and _cached_params(marker) == params and (trace / "run.json").is_file():
        return trace
    check_replace_file(marker, "benchmark cache marker", overwrite=_cached_params(marker) is not None, flag=None)
    with os_errors(f"--work-dir {work}"):
        work.mkdir(parents=True, exist_ok=True)
    write_synthetic_trace(trace, progress=True, **params_for_writer(params))  # replaces only a synthetic trace
    atomic_write_text(marker, json.dumps(params), what="benchmark cache marker", overwrite=True)
    return trace


def _cached_params(marker: Path) -> dict | None:
    """The parameters recorded by :func:`ensure_trace` in ``marker``; None when absent or not such a file."""
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == 1 and "samples_per_shard" in data else None


def params_for_writer(params: dict) -> dict:
    return {k: v for k, v in params.items() if k != "format"}


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its reaped children (the worker processes)."""
    t = psutil.Process().cpu_times()
    return t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def decode_only(trace: Path) -> None:
    """Read and decode every shard's analysed columns (pyarrow, all cores) and drop them."""
    info = open_trace(trace)
    for shard in info.shards:
        pq.read_table(shard.tokens, columns=token_columns(info.lags), use_threads=True)
        pq.read_table(shard.branches, columns=branch_columns(info.lags), use_threads=True)


def _row(stage: str, n_branch: int, n_token: int, seconds: float, cpu: float, peak: int) -> dict:
    """One stage's throughput; a rate is NaN where its clock measured no time (a stage shorter than the
    clock's resolution, e.g. the CPU-time clock on a tiny trace)."""
    nan = float("nan")
    return {"stage": stage, "branch_rows": n_branch, "token_rows": n_token, "seconds": seconds,
            "branch_rows_per_s": n_branch / seconds if seconds > 0 else nan, "cpu_seconds": cpu,
            "branch_rows_per_cpu_s": n_branch / cpu if cpu > 0 else nan, "peak_rss_gb": peak / 1e9}


def check_options(args: argparse.Namespace) -> None:
    """Refuse --rows and --threads outside their ranges, naming the option."""
    if not math.isfinite(args.rows) or not 1 <= args.rows <= 1e12:
        raise ValueError(f"--rows must be a number of branch rows between 1 and 1e12, got {args.rows}")
    if not 1 <= args.threads <= 256:
        raise ValueError(f"--threads must be between 1 and 256 worker processes, got {args.threads}")


def run(args: argparse.Namespace) -> int:
    check_options(args)
    check_results_out("analyze", args.out, with_plot=True)          # before minutes of work, not after
    memory = parse_memory_limit(args.memory_limit)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.gettempdir()) / "moeca-bench-analyze"
    t0 = time.perf_counter()
    trace = ensure_trace(work, args.rows, args.regenerate)
    gen_s = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in trace.rglob("*.parquet"))
    rows = []
    load_start = _load()
    # 0) reading and decoding alone
    with PeakRSS() as mem:
        t, c = time.perf_counter(), _cpu_seconds()
        decode_only(trace)
        decode_s, decode_cpu, decode_peak = time.perf_counter() - t, _cpu_seconds() - c, mem.peak
    # 1) the out-of-core pass alone
    with PeakRSS() as mem:
        t, c = time.perf_counter(), _cpu_seconds()
        col = collect([trace], memory_limit=memory, threads=args.threads, progress=True)
        reduce_s, reduce_cpu = time.perf_counter() - t, _cpu_seconds() - c
    n_branch, n_token = col.partials.branch_rows, col.partials.token_rows
    del col
    rows.append(_row("decode only", n_branch, n_token, decode_s, decode_cpu, decode_peak))
    rows.append(_row("reduce", n_branch, n_token, reduce_s, reduce_cpu, mem.peak))
    # 2) the whole command: pass + summary + sweep + figures + report
    report = work / "report"
    check_output_dir(report, [("trace", trace)], option="the report folder under --work-dir")
    with PeakRSS() as mem:
        t, c = time.perf_counter(), _cpu_seconds()
        analyze([trace], report, memory_limit=memory, threads=args.threads, progress=True)
        full_s, full_cpu = time.perf_counter() - t, _cpu_seconds() - c
    rows.append(_row("full analyze", n_branch, n_token, full_s, full_cpu, mem.peak))
    load_end = _load()
    for r in rows:
        r["meets_rows_target"] = r["branch_rows_per_s"] >= TARGET_ROWS_PER_S
        r["meets_memory_target"] = r["peak_rss_gb"] < TARGET_PEAK_GB
    meta = {"trace": str(trace), "trace_bytes": size, "bytes_per_branch_row_incl_tokens": size / n_branch,
            "generation_seconds_this_run": gen_s, "threads": args.threads, "memory_limit": args.memory_limit,
            "loadavg_1min_start": load_start, "loadavg_1min_end": load_end, "cpu_count": os.cpu_count(),
            "targets": {"branch_rows_per_s": TARGET_ROWS_PER_S, "peak_rss_gb": TARGET_PEAK_GB}}
    notes = (f"Synthetic trace with the tracer's schema: {n_branch:,} branch rows + {n_token:,} token rows, "
             f"{size / 1e9:.2f} GB of zstd Parquet. Throughput counts branch rows; the token table is read and "
             f"reduced in the same pass; `decode only` just reads and decodes the same columns (pyarrow on all "
             f"cores). 1-minute load average {load_start:.1f} at start, {load_end:.1f} at end on "
             f"{os.cpu_count()} cores (a shared machine lowers the wall-clock numbers). `branch_rows_per_cpu_s` divides "
             f"by the CPU seconds of this process and its worker processes, a load-insensitive measure of the work per "
             f"row (on {args.threads} otherwise idle cores the wall-clock rate could at best be {args.threads}x it). "
             f"Targets: >= 5M branch rows/s, peak < 2 GB.")
    cmd = "moeca bench analyze " + " ".join(shlex.quote(a) for a in sys.argv[3:]) if len(sys.argv) > 3 else \
        "moeca bench analyze"

    def plot(path: Path) -> None:
        plt = pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        names = [r["stage"] for r in rows]
        axes[0].bar(names, [r["branch_rows_per_s"] / 1e6 for r in rows], color="tab:blue")
        axes[0].axhline(TARGET_ROWS_PER_S / 1e6, color="r", ls="--", label="target")
        axes[0].set_ylabel("million branch rows / s")
        axes[0].legend()
        axes[1].bar(names, [r["peak_rss_gb"] for r in rows], color="tab:orange")
        axes[1].axhline(TARGET_PEAK_GB, color="r", ls="--", label="target")
        axes[1].set_ylabel("peak RSS incl. children (GB)")
        axes[1].legend()
        fig.suptitle(f"moeca analyze on {n_branch / 1e6:.0f}M branch rows", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    paths = write_results("analyze", rows, args.out, meta=meta, title="Analysis throughput (moeca analyze)",
                          notes=notes, plot=plot, command=cmd,
                          columns=["stage", "branch_rows", "seconds", "branch_rows_per_s", "cpu_seconds",
                                   "branch_rows_per_cpu_s", "peak_rss_gb", "meets_rows_target", "meets_memory_target"])
    for r in rows:
        print(f"{r['stage']}: {r['branch_rows']:,} branch rows in {r['seconds']:.1f} s = "
              f"{r['branch_rows_per_s'] / 1e6:.2f}M rows/s ({r['branch_rows_per_cpu_s'] / 1e6:.2f}M rows per CPU-s), "
              f"peak RSS {r['peak_rss_gb']:.2f} GB")
    print(f"results: {paths['md']}")
    remove_listed(report, option="the report folder under --work-dir")   # only what analyze wrote there
    if not any(report.iterdir()):
        report.rmdir()
    return 0
