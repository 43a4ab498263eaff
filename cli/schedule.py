"""``moeca schedule show FILE``, ``moeca schedule derive TRACE_DIR... --out FILE`` and
``moeca schedule build METHOD --set KNOB=VALUE ... --trace TRACE_DIR --out FILE``."""
from __future__ import annotations

import argparse
import math
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

from moeca.common.inputs import require_folder
from moeca.common.outputs import check_no_overlap, check_replace_file
from moeca.models.config import DiTMoEConfig
from moeca.policy.derive import DeriveConfig, derive_schedule
from moeca.policy.schedule import Schedule
from moeca.policy.summary import describe


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
                    "model and sampler.\n\nRule --refresh sync (default): synchronized refresh steps recompute every "
                    "unit of every block together; on the other steps the router runs, newly routed\n"
                    "(token, expert) pairs are computed and every other branch, the shared expert and attention "
                    "are forecast linearly from their last two computed outputs\n(--forecast linear) and combined "
                    "with the current gate weights. The refresh steps go where the traced drift is\n"
                    "(--placement drift: a refresh when the drift accumulated since the last one reaches a\n"
                    "threshold) or are evenly spaced (--placement even). Their number is the most that reaches\n"
                    "--target-speedup (wall-clock on the device that "
                    "replays, predicted from unit costs measured once per device, model and batch:\n`moeca "
                    "calibrate`; measured on first use) or --target-flops-speedup (analytic FLOPs), or follows "
                    "from --error-budget.\n\nRule --refresh budget: warm-up, final and every "
                    "--sync-interval-th step compute everything; otherwise each expert (and the shared expert)\n"
                    "recomputes the fraction of its cached tokens that keeps the staleness error under a budget "
                    "tau (faster-drifting experts refresh more),\nand attention is recomputed whole when its "
                    "accumulated drift exceeds tau; tau is searched to reach --target-flops-speedup or given as "
                    "--error-budget.",
        epilog="example:\n  moeca schedule derive out/trace --target-speedup 2 --out out/schedule.json")
    d.add_argument("traces", nargs="+", metavar="TRACE_DIR", help="trace directories (same model and sampler)")
    goal = d.add_mutually_exclusive_group()
    goal.add_argument("--target-speedup", type=float, default=None,
                      help="wall-clock speedup to reach when `moeca replay` runs on this device (--device) at "
                           "--batch samples; predicted from calibrated unit costs (default 2.0 when no other "
                           "target is given)")
    goal.add_argument("--target-flops-speedup", type=float, default=None,
                      help="analytic FLOPs speedup to reach instead (no calibration)")
    goal.add_argument("--error-budget", type=float, default=None,
                      help="staleness error budget tau (relative L2 of a reused output) instead of a target")
    d.add_argument("--out", required=True, help="schedule JSON to write")
    d.add_argument("--refresh", choices=("sync", "budget"), default="sync",
                   help="refresh rule: sync = evenly spaced synchronized full refreshes, everything forecast in "
                        "between (default); budget = per-expert token budgets between --sync-interval refreshes")
    d.add_argument("--placement", choices=("drift", "even"), default="drift",
                   help="--refresh sync: a refresh step wherever the traced drift accumulated since the last "
                        "refresh reaches a threshold (default; on DDPM weighted toward the last steps, whose "
                        "errors stay in the sample) or evenly spaced")
    d.add_argument("--forecast-level", choices=("auto", "branch", "routing", "token"), default="auto",
                   help="--refresh sync: forecast steps run the router and the newly routed pairs and forecast per "
                        "(token, expert) branch (branch); the same, but only tokens whose routed experts changed "
                        "since the last refresh are forecast per branch, the others' MoE output per token (routing: "
                        "routing-aware); or skip the router and forecast each block's MoE output per token (token); "
                        "auto (default): the level that fits the most refreshes into a wall-clock target, as this "
                        "device's calibration prices each (branch for FLOPs targets)")
    d.add_argument("--batch", type=int, default=None,
                   help="--target-speedup: samples per sampling call of the replay the schedule is for "
                        "(`moeca replay --samples`; default 16, 1 for a diffusers trace)")
    d.add_argument("--device", default="auto", help="--target-speedup: the device that replays (default auto)")
    d.add_argument("--threads", type=int, default=None,
                   help="--target-speedup: torch CPU threads of the replay (default: torch's choice)")
    d.add_argument("--checkpoint", default=None,
                   help="--target-speedup: the model's weights, when the trace's run.json names none")
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
    d.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file moeca did not write (a schedule it wrote is replaced anyway)")
    d.set_defaults(func=cmd_derive)
    _register_build(ssub)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def methods_help() -> str:
    """Every registered method with its summary and knobs (name=default: doc), for ``--help``."""
    # deferred: loads torch, and this module is imported at `moeca` start-up
    from moeca.policy.methods import REGISTRY
    lines = ["methods and their knobs (--set NAME=VALUE; defaults are the authors'):"]
    for m in REGISTRY.values():
        lines.append(f"\n  {m.name}: {m.summary}")
        for k in m.knobs():
            default = ",".join(map(str, k.default)) if isinstance(k.default, tuple) else k.default
            text = f"{k.name}={default!s} ({k.type}): {k.doc}"
            lines += textwrap.wrap(text, width=110, initial_indent="    ", subsequent_indent="        ")
    return "\n".join(lines)


def _register_build(ssub) -> None:
    b = ssub.add_parser(
        "build", help="export any registered caching method's schedule (moeca, fora, taylorseer, toca, ...)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build the schedule of one registered caching method for the model and sampler of a trace "
                    "(its run.json), the same file `moeca replay` and the diffusers integration apply.\n\n"
                    + methods_help(),
        epilog="examples:\n  moeca schedule build taylorseer --set interval=4 --set order=4 --trace out/trace "
               "--out ts.json\n  moeca schedule build moeca --set target_speedup=2.5 --trace out/trace --out m.json")
    b.add_argument("method", metavar="METHOD", help="a registered method (listed above)")
    b.add_argument("--set", dest="knobs", action="append", default=[], metavar="KNOB=VALUE",
                   help="a knob value (repeatable); tuples as comma-separated numbers")
    b.add_argument("--trace", required=True, metavar="TRACE_DIR",
                   help="a trace (`moeca trace`): the model and sampler the schedule is for; moeca also reads its drift")
    b.add_argument("--out", required=True, help="schedule JSON to write")
    b.add_argument("--batch", type=int, default=16, help="moeca with target=wallclock: samples per replay call")
    b.add_argument("--device", default="auto", help="moeca with target=wallclock: the device that replays")
    b.add_argument("--threads", type=int, default=None, help="moeca with target=wallclock: torch CPU threads")
    b.add_argument("--checkpoint", default=None, help="moeca with target=wallclock: the model's weights")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --out file moeca did not write")
    b.set_defaults(func=cmd_build)


def parse_knobs(pairs: list[str]) -> dict[str, str]:
    """``["a=1", "b=x,y"]`` -> ``{"a": "1", "b": "x,y"}``; a pair without ``=`` is an error."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--set {pair!r}: expected KNOB=VALUE, e.g. --set interval=4")
        out[name.strip()] = value.strip()
    return out


def cmd_build(args: argparse.Namespace) -> int:
    # deferred: loads torch, and this module is imported at `moeca` start-up
    from moeca.diffusion.samplers import SamplerConfig
    # deferred: loads torch, and this module is imported at `moeca` start-up
    from moeca.policy.methods import Context, method

    unit = method(args.method)
    config = unit.config(parse_knobs(args.knobs))
    out = Path(args.out)
    if out.is_dir():
        raise FileExistsError(f"--out {out} is a folder; give the schedule's file path, e.g. {out / 'schedule.json'}")
    check_replace_file(out, "schedule", args.overwrite)
    if args.method == "moeca":
        summary, meta = load_summary([args.trace])
    else:
        # deferred: loads pyarrow, and this module is imported at `moeca` start-up
        from moeca.tracer.store import read_run_meta, require_trace_folder
        require_trace_folder(args.trace)
        summary, meta = None, read_run_meta(args.trace)
    costs = replay_costs(meta, args) if args.method == "moeca" and config.target == "wallclock" else None
    context = Context(DiTMoEConfig.from_dict(meta["model"]["config"]), SamplerConfig(**meta["sampler"]),
                      meta["model"].get("weights_hash"), summary, meta, costs)
    schedule = unit.build(config, context).with_provenance(trace=str(args.trace))
    schedule.save(out, overwrite=args.overwrite)
    print(describe(schedule).split("\n\n")[0])
    print(f"wrote {out}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    print(describe(Schedule.load(args.file)))
    return 0


def load_summary(traces: list[str], allow_mixed: bool = False):
    """``(drift summary DataFrame, run.json of the first trace)`` via the analysis stage.

    Every trace is validated first: given once, run.json agreeing with its shards, and its sampler one
    the model's training objective can use.
    """
    # deferred: loads torch, and this module is imported at `moeca` start-up
    from moeca.diffusion.samplers import check_sampler_objective
    # deferred: loads pyarrow, and this module is imported at `moeca` start-up
    from moeca.tracer.store import check_distinct_traces, read_run_meta, require_trace_folder, validate_trace

    for t in traces:
        require_trace_folder(t)                  # missing, or a file (e.g. its run.json) given for the folder
        if not (Path(t) / "run.json").is_file():
            raise FileNotFoundError(f"{t} is not a trace directory (no run.json); create one with `moeca trace`")
    check_distinct_traces(traces)
    for t in traces:
        meta = validate_trace(t)
        objective = meta["model"]["config"].get("objective", "ddpm_eps")
        check_sampler_objective(meta["sampler"].get("kind"), objective, f"trace {t}: run.json field sampler.kind")
    # deferred: loads pandas and duckdb, and this module is imported at `moeca` start-up
    from moeca.analysis import drift_summary
    summary = drift_summary([str(t) for t in traces], allow_mixed=allow_mixed)
    return summary, read_run_meta(traces[0])


def nan_report(summary) -> str | None:
    """Where the traces hold NaN/Inf metric values (excluded from the drift estimates), or None."""
    bad = summary[summary["nan_count"] > 0]
    if bad.empty:
        return None
    total = int(bad["nan_count"].sum())
    where = (bad.groupby(["unit", "block"])["nan_count"].sum().sort_values(ascending=False).head(5))
    steps = sorted(int(v) for v in bad["step"].unique())
    span = f"steps {steps[0]}..{steps[-1]}" if len(steps) > 1 else f"step {steps[0]}"
    return (f"{total} NaN/Inf metric values in the traces were excluded from the drift estimates ({span}; most in "
            + ", ".join(f"{u} block {b}: {int(n)}" for (u, b), n in where.items())
            + "); check the model's numerics (dtype, checkpoint) if the schedule looks wrong")


def check_derive_options(args: argparse.Namespace) -> None:
    """Numeric options of ``schedule derive`` within their valid ranges (before any trace is read)."""
    for name, value, ok, rng in (
            ("--target-speedup", args.target_speedup, lambda v: v > 1, "> 1"),
            ("--target-flops-speedup", args.target_flops_speedup, lambda v: v > 1, "> 1"),
            ("--error-budget", args.error_budget, lambda v: v > 0, "> 0"),
            ("--staleness-weight", args.staleness_weight, lambda v: v >= 0, ">= 0"),
            ("--min-fraction", args.min_fraction, lambda v: 0 <= v <= 1, "in 0..1"),
            ("--attn-weight", args.attn_weight, lambda v: v > 0, "> 0")):
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise ValueError(f"{name} {value} must be a finite number {rng}")
    for name, value in (("--warmup-steps", args.warmup_steps), ("--final-steps", args.final_steps),
                        ("--sync-interval", args.sync_interval)):
        if value < 0:
            raise ValueError(f"{name} {value} must be >= 0")
    for name, value in (("--batch", args.batch), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise ValueError(f"{name} {value} must be >= 1")


def cmd_derive(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_no_overlap(out, [("trace", t) for t in args.traces])
    if out.is_dir():
        raise FileExistsError(f"--out {out} is a folder; give the schedule's file path, e.g. {out / 'schedule.json'}")
    check_replace_file(out, "schedule", args.overwrite)  # a schedule moeca wrote may be replaced; others need the flag
    require_folder(out.parent, f"--out {out}: the folder", "create it first or fix the path")
    check_derive_options(args)
    flops = args.target_flops_speedup is not None
    target = args.target_flops_speedup if flops else args.target_speedup
    if target is None and args.error_budget is None:
        target = 2.0
    cfg = DeriveConfig(target_speedup=target, error_budget=args.error_budget,
                       target="flops" if flops or args.error_budget is not None else "wallclock",
                       refresh=args.refresh, placement=args.placement, forecast_level=args.forecast_level,
                       forecast=args.forecast, warmup_steps=args.warmup_steps,
                       final_steps=args.final_steps, sync_interval=args.sync_interval,
                       staleness_weight=args.staleness_weight, min_fraction=args.min_fraction,
                       attn_weight=args.attn_weight)
    summary, meta = load_summary(args.traces, args.allow_mixed)
    if args.batch is None:      # the replay's samples per call: one HiDream image, 16 of moeca's own models
        args.batch = 1 if meta.get("model", {}).get("family") == "diffusers" else 16
    nans = nan_report(summary)
    if nans:
        print(f"warning: {nans}", file=sys.stderr)
    wallclock = replay_costs(meta, args) if cfg.target == "wallclock" else None
    if wallclock is not None and not wallclock.token_folds:   # the engine sums the stack with the exact gates here
        cfg = replace(cfg, fold=False)
    schedule = derive_schedule(summary, meta, cfg, wallclock).with_provenance(
        traces=[str(t) for t in args.traces], nan_metric_values=int(summary["nan_count"].sum()))
    schedule.save(out, overwrite=args.overwrite)
    head = describe(schedule).split("\n\n")[0]
    print(head)
    level = schedule.provenance.get("forecast_level")
    print(f"refresh rule: {args.refresh}; forecast: {schedule.forecast}"
          f"{f' at the {level} level' if level else ''}; {len(schedule.sync_refresh_steps)} full "
          f"refresh steps; error budget tau: {schedule.provenance['tau']:.4g}; lag exponents: "
          f"{schedule.provenance['alpha']}")
    for lv, c in (schedule.provenance.get("levels") or {}).items():
        ms = c.get("forecast_step_ms")
        print(f"  level {lv}: {c['refreshes']} refreshes fit, predicted {c['predicted_speedup']:.2f}x"
              + (f", {ms:.3g} ms per forecast step" if ms is not None else "") + (" (chosen)" if lv == level else ""))
    if "predicted_speedup" in schedule.provenance:
        print(f"predicted wall-clock speedup: {schedule.provenance['predicted_speedup']:.2f}x on "
              f"{wallclock.key['device']} at batch {args.batch} (`moeca replay --samples {args.batch}` measures it)")
    print(f"wrote {out}")
    return 0


def replay_costs(meta: dict, args: argparse.Namespace):
    """The calibrated unit costs of the trace's model replayed on ``args.device`` at ``args.batch`` samples
    (measured and cached on first use by :func:`moeca.replay.calibrate.ensure_costs`; a diffusers trace's by
    its engine's calibration, :mod:`moeca.integrations.diffusers.calibrate`)."""
    # deferred: loads torch, and this module is imported at `moeca` start-up
    import torch

    from moeca.diffusion.samplers import SamplerConfig
    from moeca.models.registry import load_traced_model
    from moeca.replay.calibrate import ensure_costs

    model_meta = meta["model"]
    checkpoint = args.checkpoint or model_meta.get("checkpoint")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if model_meta.get("family") == "diffusers":      # HiDream through diffusers: its own engine's calibration
        from moeca.integrations.diffusers_cli import trace_costs  # deferred: loads torch (start-up module)
        return trace_costs(meta, args)
    try:
        model = load_traced_model(meta, args.checkpoint, device=args.device)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        raise ValueError(f"--target-speedup calibrates the trace's model ({model_meta.get('name')!r}, checkpoint "
                         f"{checkpoint!r}) on the replaying device, which failed: {exc}. Pass --checkpoint, or use "
                         "--target-flops-speedup (no calibration)") from None
    return ensure_costs(model, SamplerConfig(**meta["sampler"]), args.batch, progress=lambda msg: print(msg, flush=True))
