"""``moeca analyze TRACE_DIR... --out REPORT_DIR``: token- vs branch-level redundancy report."""
from __future__ import annotations

import argparse
import sys


def _run(args: argparse.Namespace) -> int:
    # deferred: loads distributed, matplotlib, pandas, pyarrow, seaborn, and this module is imported at `moeca` start-up
    from .report import analyze
    command = "moeca analyze " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else ""
    head = analyze(args.traces, args.out, allow_mixed=args.allow_mixed, memory_limit=args.memory_limit,
                   scheduler=args.scheduler, threads=args.threads, headline_error=args.headline_error,
                   progress=not args.quiet, command=command, make_figures=not args.no_figures)
    print(head["sentence"])
    print(f"report: {args.out}/report.md")
    if head["numbers"].get("nan_metric_values"):
        print(f"warning: {head['numbers']['nan_metric_values']} NaN/Inf metric values were counted and excluded "
              f"(see nan_count in summary.csv)", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="token- vs expert-branch-level redundancy report from traces",
                       description="Analyse one or more trace directories (written by `moeca trace`) out of core "
                                   "and write REPORT_DIR with report.md (headline first), figures, summary.parquet/"
                                   ".csv, comparison.csv and headline.json.")
    p.add_argument("traces", nargs="+", metavar="TRACE_DIR", help="trace directories to pool")
    p.add_argument("--out", required=True, metavar="REPORT_DIR", help="report folder: built aside and renamed into place; an existing one is replaced only where "
                        "its .moeca-manifest.json says moeca wrote it (other files stay)")
    p.add_argument("--allow-mixed", action="store_true",
                   help="pool traces of different models or samplers (refused by default)")
    p.add_argument("--memory-limit", default="2GB", help="working-set bound, e.g. 2GB or 512MB (default 2GB)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="Dask distributed scheduler address (tcp://host:8786): one task per trace")
    p.add_argument("--threads", type=int, default=2,
                   help="worker processes per trace, 1..256 (default 2; traces under 2M branch rows run in-process)")
    p.add_argument("--headline-error", type=float, default=None,
                   help="mean relative MoE-output error at which the headline compares (default: the error at "
                        "which token-level reuse saves half of the MoE FLOPs, taken from the data)")
    p.add_argument("--no-figures", action="store_true", help="tables, summary and headline only (faster)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
