"""``moeca bench diffusers``: MoECa on HiDream-I1's transformer (diffusers) at a scaled-down shape on the CPU.

HiDream-I1's structure with random weights, scaled to 2 CPU cores (``--diffusers-config bench``: 4
double- and 8 single-stream blocks, hidden 192, 4 routed experts top-2 plus a shared expert; 256 image
+ 48 text tokens, CFG batched: 2 rows). The loop a user runs: trace (``moeca trace --diffusers-config
bench``), derive a schedule per FLOPs target at each ``--forecast-level`` (``moeca schedule derive
--target-flops-speedup T --forecast-level L``) and per wall-clock target with the level ``auto`` picks from
the HiDream engine's calibration on this machine (``moeca schedule derive --target-speedup T``), then
sample with the stock forward, moeca's full compute (schedule ``none``: the routed experts through
moeca's dispatch) and each schedule, interleaved ``--repeats`` times after a warm-up (hooks attached and
removed outside the timings). Rows: ms/step (median), speed vs stock (median of per-round ratios), the
FLOPs ratio counted from what ran, speed over FLOPs ratio, max |diff| / relative L2 / PSNR of the final
latents vs stock, the median ms of a refresh step and of a forecast step, each schedule's forecast level,
refreshes and predicted speedup. ``--clock cpu`` times
by the process's CPU time (one thread on a machine shared with other jobs). The machine's load average
is recorded with the results.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

import torch

from moeca.bench.results import check_results_out, markdown_table, pyplot, write_results
from moeca.cli.main import main as moeca_main
from moeca.cli.schedule import load_summary
from moeca.policy.derive import DeriveConfig, derive_schedule
from moeca.policy.schedule import Schedule

NAME = "diffusers"
COLUMNS = ["variant", "ms_step", "speed", "flops_ratio", "speed_over_flops", "refresh_ms", "forecast_ms",
           "max_abs_diff", "rel_l2", "psnr_db", "cache_mb", "repeats"]
CONFIG = "bench"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME,
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="sampling steps (default 10)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds (default 3)")
    p.add_argument("--targets", default="2,3", help="FLOPs speedup targets of the derived schedules (default 2,3)")
    p.add_argument("--forecast-level", default="token",
                   help="forecast level(s) of the FLOPs-target schedules, comma-separated (token, branch, auto; "
                        "default token: what `auto` takes for a wall-clock target on this CPU, see --wallclock-targets)")
    p.add_argument("--always-fold", action="store_true",
                   help="also time the token-level FLOPs-target schedules with the stack sum folded whatever the gates "
                        "do (apply_schedule(fold_tolerance=inf)) next to the default, which folds only while the gates "
                        "move linearly between refreshes")
    p.add_argument("--wallclock-targets", default="2,3",
                   help="wall-clock speedup targets, derived with --forecast-level auto from the HiDream engine's "
                        "calibration on this machine (`moeca schedule derive --target-speedup`); '' for none (default 2,3)")
    p.add_argument("--trace-samples", type=int, default=2, help="samples traced to derive from (default 2)")
    p.add_argument("--size", type=int, default=256, help="image size in pixels; latents are 1/8 (default 256)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="time runs by wall-clock (default) or by the process's CPU time (one thread on a machine "
                        "shared with other jobs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results", help="results folder (default bench/results)")
    p.add_argument("--overwrite", action="store_true", help="replace result files moeca did not record")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # deferred: the optional [diffusers] extra (its import names what is missing)
    from moeca.integrations.diffusers.apply import none_schedule
    from moeca.integrations.diffusers.calibrate import ensure_costs, setting_of_trace
    from moeca.integrations.diffusers.measure import Variant, compare
    from moeca.integrations.diffusers.sampling import (CONFIGS, TEXT_LENGTHS, FlowSampler, build_transformer,
                                                       initial_noise, random_conditioning)
    from moeca.integrations.diffusers.trace import DiffusersTraceConfig, trace_diffusers

    check_results_out(NAME, args.out, True, args.overwrite)
    torch.set_num_threads(args.threads)
    targets = [float(t) for t in args.targets.split(",") if t]
    wall_targets = [float(t) for t in args.wallclock_targets.split(",") if t]
    levels = [lv.strip() for lv in args.forecast_level.split(",") if lv.strip()]
    if not levels or any(lv not in ("token", "branch", "auto") for lv in levels):
        raise ValueError(f"--forecast-level {args.forecast_level!r}: give token, branch or auto (comma-separated)")
    load_before = os.getloadavg()
    model = build_transformer(CONFIG, seed=args.seed)
    cond, uncond = random_conditioning(CONFIGS[CONFIG], max(args.trace_samples, 1), seed=args.seed,
                                       lengths=TEXT_LENGTHS[CONFIG])
    sampler = FlowSampler(num_steps=args.steps)
    latent = (args.size // 8, args.size // 8)
    with tempfile.TemporaryDirectory(prefix="moeca-bench-diffusers-") as tmp:
        trace = Path(tmp) / "trace"
        trace_diffusers(model, trace, DiffusersTraceConfig(sampler=sampler, prompts=tuple(range(args.trace_samples)),
                                                           latent_size=latent, seed=args.seed,
                                                           batch_size=args.trace_samples),
                        cond, uncond, source=f"config:{CONFIG}", model_seed=args.seed)
        schedules = {}
        for level in levels:
            for t in targets:
                path = Path(tmp) / f"schedule-{level}-{t:g}x.json"
                if moeca_main(["schedule", "derive", str(trace), "--target-flops-speedup", str(t), "--forecast-level",
                               level, "--out", str(path)]):
                    raise ValueError(f"moeca schedule derive --target-flops-speedup {t} --forecast-level {level} "
                                     "failed on the bench trace")
                schedules[(level, t)] = Schedule.load(path)
        costs = None
        if wall_targets:     # what `moeca schedule derive --target-speedup T` does, timed by --clock
            summary, meta = load_summary([str(trace)], False)
            costs = ensure_costs(model, setting_of_trace(meta, 1), clock=args.clock,
                                 progress=lambda msg: print(msg, flush=True))
            for t in wall_targets:
                s = derive_schedule(summary, meta, DeriveConfig(target_speedup=t, target="wallclock",
                                                                fold=costs.token_folds), costs)
                schedules[("wall-clock", t)] = s
    image_tokens = latent[0] * latent[1] // 4
    full = none_schedule(model, args.steps, max_tokens=image_tokens + cond.tokens)
    variants = [Variant("stock forward", None), Variant("moeca full compute", full)]
    variants += [Variant(f"MoECa {t:g}x {'wall-clock' if kind == 'wall-clock' else 'FLOPs'} target, "
                         f"{s.provenance.get('forecast_level', kind)} level", s) for (kind, t), s in schedules.items()]
    forced = [(key, s) for key, s in schedules.items() if args.always_fold and key[0] == "token"]
    variants += [Variant(f"MoECa {t:g}x FLOPs target, token level, fold forced", s,
                         options={"fold_tolerance": math.inf}) for (_, t), s in forced]
    noise = initial_noise((model.config.in_channels, *latent), [args.seed])

    def progress(r: int, vs: list) -> None:
        print(f"round {r + 1} of {args.repeats}: " + ", ".join(f"{v.name} {1000 * v.seconds[-1] / args.steps:.0f} ms/step"
                                                                 for v in vs), flush=True)
    rows = compare(model, variants, sampler, noise, cond.select([0]), uncond.select([0]), repeats=args.repeats,
                   progress=progress, clock=args.clock)
    v_stats = {v.name: v.stats for v in variants}
    for row, ((kind, t), s) in zip(rows[2:], list(schedules.items()) + forced):
        row["target"], row["predicted_flops_ratio"] = f"{t:g}x {'wall' if kind == 'wall-clock' else 'FLOPs'}", \
            1 / s.predicted_flops_ratio
        row["level"], row["refreshes"] = s.provenance.get("forecast_level", kind), len(s.sync_refresh_steps)
        row["predicted_speedup"] = s.provenance.get("predicted_speedup")
        row["folded_forwards"] = v_stats.get(row["variant"], {}).get("folded_forwards")
        row["gate_error"] = v_stats.get(row["variant"], {}).get("gate_error")
    meta = {"config": CONFIGS[CONFIG], "steps": args.steps, "repeats": args.repeats, "threads": args.threads,
            "clock": args.clock,
            "latent_size": list(latent), "image_tokens": image_tokens, "text_tokens": cond.tokens, "cfg_rows": 2,
            "parameters": sum(p.numel() for p in model.parameters()),
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "calibration": costs.summary() if costs is not None else None}
    defaults = {"steps": 10, "repeats": 3, "targets": "2,3", "forecast_level": "token", "wallclock_targets": "2,3",
                "always_fold": False, "trace_samples": 2, "size": 256,
                "threads": 2, "clock": "wall", "seed": 0}
    cmd = "moeca bench diffusers" + "".join(
        f" --{k.replace('_', '-')}" + ("" if isinstance(v, bool) else f" {getattr(args, k)}")
        for k, v in defaults.items() if getattr(args, k) != v)
    notes = (f"HiDream-I1's transformer class (diffusers) with random weights at a scaled shape ({CONFIG!r}: "
             f"{meta['parameters'] / 1e6:.0f}M parameters, {image_tokens} image + {cond.tokens} text tokens, CFG "
             f"batched), {args.steps} flow-matching Euler steps, {args.threads} threads, "
             f"{'wall-clock' if args.clock == 'wall' else 'process CPU time'}; load average "
             f"{load_before[0]:.2f} before, {meta['load_average_after'][0]:.2f} after. speed: median per-round ratio "
             "to the stock forward; flops_ratio: full-compute FLOPs over FLOPs run; latents compared with stock.")
    paths = write_results(NAME, rows, args.out, meta=meta, columns=COLUMNS + ["target", "level", "refreshes", "folded_forwards", "gate_error",
                                             "predicted_flops_ratio",
                                             "predicted_speedup"],
                          title="MoECa on HiDream-I1 (diffusers), scaled down, CPU", notes=notes,
                          plot=lambda path: plot(rows, path), command=cmd, overwrite=args.overwrite)
    print(markdown_table(rows, COLUMNS))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def plot(rows: list[dict], path: Path) -> None:
    """Measured speed and FLOPs ratio per variant, side by side."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["speed"] for r in rows], width=0.4, label="measured speed vs stock")
    ax.bar([x + 0.2 for x in xs], [r["flops_ratio"] for r in rows], width=0.4, label="FLOPs ratio")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(list(xs), [r["variant"] for r in rows], rotation=12, fontsize=8)
    ax.set_ylabel("x (higher is faster)")
    ax.set_title("HiDream-I1 transformer, scaled down, CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
