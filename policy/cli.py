"""``moeca schedule show FILE`` and ``moeca schedule derive TRACE_DIR... --out FILE``."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("schedule", help="inspect or derive a replay schedule (versioned JSON)",
                       description="Schedules say, per step, block and expert, what replay recomputes and what it "
                                   "reuses. The format is published as policy/schedule.schema.json.")
    ssub = p.add_subparsers(dest="schedule_command", metavar="SUBCOMMAND")

    show = ssub.add_parser("show", help="summarise a schedule: reuse per step and block, predicted FLOPs ratio")
    show.add_argument("file", help="schedule JSON file")
    show.set_defaults(func=cmd_show)

    d = ssub.add_parser(
        "derive", help="derive the MoECa schedule from traces",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Derive a MoECa schedule from the drift of each unit in one or more traces of the same "
                    "model and sampler.\n\nRule --refresh sync (default): evenly spaced steps recompute every "
                    "unit of every block together; on the other steps the router runs, newly routed\n"
                    "(token, expert) pairs are computed and every other branch, the shared expert and attention "
                    "are forecast linearly from their last two computed outputs\n(--forecast linear) and combined "
                    "with the current gate weights. The number of refresh steps is the most that reaches "
                    "--target-speedup\n(predicted FLOPs, using the traces' share of newly routed pairs), or "
                    "follows from --error-budget.\n\nRule --refresh budget: warm-up, final and every "
                    "--sync-interval-th step compute everything; otherwise each expert (and the shared expert)\n"
                    "recomputes the fraction of its cached tokens that keeps the staleness error under a budget "
                    "tau (faster-drifting experts refresh more),\nand attention is recomputed whole when its "
                    "accumulated drift exceeds tau; tau is searched to reach --target-speedup or given as "
                    "--error-budget.",
        epilog="example:\n  moeca schedule derive out/trace --target-speedup 3 --out out/schedule.json")
    d.add_argument("traces", nargs="+", metavar="TRACE_DIR", help="trace directories (same model and sampler)")
    goal = d.add_mutually_exclusive_group()
    goal.add_argument("--target-speedup", type=float, default=None,
                      help="predicted FLOPs speedup to reach (default 3.0 when --error-budget is not given)")
    goal.add_argument("--error-budget", type=float, default=None,
                      help="staleness error budget tau (relative L2 of a reused output) instead of a target")
    d.add_argument("--out", required=True, help="schedule JSON to write")
    d.add_argument("--refresh", choices=("sync", "budget"), default="sync",
                   help="refresh rule: sync = evenly spaced synchronized full refreshes, everything forecast in "
                        "between (default); budget = per-expert token budgets between --sync-interval refreshes")
    d.add_argument("--forecast", choices=("linear", "none"), default="linear",
                   help="reused outputs: linear = extrapolated from their last two computations (default); "
                        "none = the cached output as is")
    d.add_argument("--warmup-steps", type=int, default=1, help="first steps computed in full (default 1)")
    d.add_argument("--final-steps", type=int, default=0, help="last steps computed in full (default 0)")
    d.add_argument("--sync-interval", type=int, default=10,
                   help="--refresh budget only: synchronized full refresh every N steps after warm-up; 0 = none "
                        "(default 10)")
    d.add_argument("--staleness-weight", type=float, default=0.02,
                   help="online score = accumulated input drift + W * age in steps (default 0.02)")
    d.add_argument("--min-fraction", type=float, default=0.0,
                   help="lower bound of each expert's per-step refresh fraction (default 0)")
    d.add_argument("--attn-weight", type=float, default=1.0, help="importance multiplier on attention drift")
    d.add_argument("--allow-mixed", action="store_true", help="pool traces of different models/samplers")
    d.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    d.set_defaults(func=cmd_derive)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def cmd_show(args: argparse.Namespace) -> int:
    from .schedule import Schedule
    from .summary import describe

    print(describe(Schedule.load(args.file)))
    return 0


def load_summary(traces: list[str], allow_mixed: bool = False):
    """``(drift summary DataFrame, run.json of the first trace)`` via the analysis stage."""
    from pathlib import Path

    for t in traces:
        if not (Path(t) / "run.json").is_file():
            raise FileNotFoundError(f"{t} is not a trace directory (no run.json); create one with `moeca trace`")
    try:
        from moeca.analysis import drift_summary
    except ImportError as exc:
        raise ValueError(f"the analysis stage is not available ({exc}); it provides moeca.analysis.drift_summary") \
            from None
    from moeca.tracer.store import read_run_meta

    summary = drift_summary([str(t) for t in traces], allow_mixed=allow_mixed)
    return summary, read_run_meta(traces[0])


def cmd_derive(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .derive import DeriveConfig, derive_schedule
    from .summary import describe

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    target = args.target_speedup if args.target_speedup is not None or args.error_budget is not None else 3.0
    cfg = DeriveConfig(target_speedup=target, error_budget=args.error_budget, refresh=args.refresh,
                       forecast=args.forecast, warmup_steps=args.warmup_steps,
                       final_steps=args.final_steps, sync_interval=args.sync_interval,
                       staleness_weight=args.staleness_weight, min_fraction=args.min_fraction,
                       attn_weight=args.attn_weight)
    summary, meta = load_summary(args.traces, args.allow_mixed)
    schedule = derive_schedule(summary, meta, cfg).with_provenance(traces=[str(t) for t in args.traces])
    schedule.save(out)
    head = describe(schedule).split("\n\n")[0]
    print(head)
    print(f"refresh rule: {args.refresh}; forecast: {schedule.forecast}; {len(schedule.sync_refresh_steps)} full "
          f"refresh steps; error budget tau: {schedule.provenance['tau']:.4g}; lag exponents: "
          f"{schedule.provenance['alpha']}")
    print(f"wrote {out}")
    return 0
