"""``moeca bench fit``: how well the wall-clock cost model fits a calibration's own timed steps, by kind of step,
with the newly routed pairs priced on their own (``new_pair_ms``, the calibration) and at one rate with every
other pair (the cost model before it).

One calibration's runs (:func:`moeca.replay.calibrate.time_calibration`: full compute and every calibration
schedule, ``--repeats`` interleaved rounds after a warm-up) are fitted twice, by the same non-negative least squares:
as calibrated, and with each forecast step's new pairs counted as ordinary pairs (so ``new_pair_ms`` stays 0). Rows:
per fit and kind of step (refreshes and full steps; token-level forecast steps; branch-level and routing-aware
forecast steps, whose pairs are new pairs; forecast steps that recompute one unit), the steps fitted and the median
and median absolute relative error of the prediction against the timed step (median over the rounds); and each
fit's coefficients.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics

import numpy as np
import torch

from moeca.bench.results import DEFAULT_OUT, pyplot, write_results
from moeca.diffusion.samplers import SamplerConfig
from moeca.models.registry import SHIPPED_MODELS, load_model
from moeca.replay.calibrate import CALIBRATION_REPEATS, CALIBRATION_STEPS, TimedRuns, new_pair_blocks, time_calibration

NAME = "fit"
KINDS = ("refresh", "token forecast", "branch/routing forecast", "one unit recomputed")
COLUMNS = ["fit", "kind", "steps", "median_error", "median_abs_error", "fit_rel_error", "step_ms", "pair_ms",
           "new_pair_ms", "router_block_ms"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", choices=sorted(SHIPPED_MODELS), help="shipped model (default demo)")
    p.add_argument("--batch", type=int, default=16, help="samples per step (default 16)")
    p.add_argument("--steps", type=int, default=CALIBRATION_STEPS, help=f"steps per run (default {CALIBRATION_STEPS})")
    p.add_argument("--repeats", type=int, default=CALIBRATION_REPEATS,
                   help=f"timed rounds (default {CALIBRATION_REPEATS})")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"results folder (default {DEFAULT_OUT})")
    p.set_defaults(func=run)


def step_kinds(runs: TimedRuns, depth: int) -> dict[int, list[str]]:
    """The kind (:data:`KINDS`) of every step of every calibration schedule."""
    out = {}
    for i, schedule in enumerate(runs.schedules):
        new = new_pair_blocks(schedule, depth).any(axis=1)
        out[i] = [KINDS[0] if schedule.is_sync(s) else KINDS[2] if new[s]
                  else KINDS[1] if runs.works[i][s].routed_blocks == 0 else KINDS[3] for s in range(schedule.num_steps)]
    return out


def one_rate(runs: TimedRuns) -> dict:
    """The runs' step features with every new pair counted as an ordinary pair."""
    return {i: [dataclasses.replace(w, pairs=w.pairs + w.new_pairs, new_pairs=0.0) for w in ws]
            for i, ws in runs.works.items()}


def errors(runs: TimedRuns, works: dict, costs, kinds: dict[int, list[str]]) -> dict[str, list[float]]:
    """Relative errors (predicted / timed - 1) of every fitted step (not a run's first), by kind."""
    out: dict[str, list[float]] = {k: [] for k in KINDS}
    for i, ws in works.items():
        timed = [statistics.median(col) for col in zip(*runs.times[i])]
        for s in range(1, len(timed)):
            out[kinds[i][s]].append(costs.step_ms_of(ws[s]) / timed[s] - 1)
    return out


def run(args: argparse.Namespace) -> int:
    for name, value, low in (("--batch", args.batch, 1), ("--steps", args.steps, 4), ("--repeats", args.repeats, 1),
                             ("--threads", args.threads, 1)):
        if value is not None and value < low:
            raise ValueError(f"{name} {value} must be >= {low}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device)
    kind = "rectified_flow" if model.config.objective == "rectified_flow" else "ddpm"
    sampler = SamplerConfig(kind=kind, cfg_scale=1.5, cfg_mode="batched")
    runs = time_calibration(model, sampler, args.batch, steps=args.steps, repeats=args.repeats,
                            progress=lambda msg: print(msg, flush=True))
    kinds = step_kinds(runs, model.config.depth)
    rows = []
    fits = (("new pairs on their own (new_pair_ms)", runs.works), ("one rate for every pair", one_rate(runs)))
    for fit, works in fits:
        costs = runs.fit(works)
        for k, errs in errors(runs, works, costs, kinds).items():
            if errs:
                rows.append({"fit": fit, "kind": k, "steps": len(errs), "median_error": float(np.median(errs)),
                             "median_abs_error": float(np.median(np.abs(errs))), "fit_rel_error": costs.fit_rel_error,
                             "step_ms": costs.step_ms, "pair_ms": costs.pair_ms, "new_pair_ms": costs.new_pair_ms,
                             "router_block_ms": costs.router_block_ms})
                print(f"{fit:38s} {k:26s} {len(errs):3d} steps  median error {rows[-1]['median_error']:+.1%}",
                      flush=True)
    cmd = (f"moeca bench fit --model {args.model} --batch {args.batch} --steps {args.steps} --repeats {args.repeats}"
           + (f" --threads {args.threads}" if args.threads else ""))
    paths = write_results(f"{NAME}_{args.model}", rows, args.out, columns=COLUMNS, command=cmd,
                          plot=lambda path: plot(rows, path),
                          title=f"The wall-clock cost model on a calibration's own steps ({args.model})",
                          meta={"model": args.model, "batch": args.batch, "key": runs.key,
                                "full_step_ms": statistics.median(statistics.median(c) for c in
                                                                  zip(*runs.times[-1]))},
                          notes="One calibration's timed runs fitted twice by the same non-negative least squares: "
                                "with the newly routed pairs of branch-level and routing-aware forecast steps priced "
                                "on their own (new_pair_ms, what `moeca calibrate` fits) and counted as ordinary "
                                "pairs (one rate, the cost model before it). median_error: predicted / timed - 1 over "
                                "the fitted steps of each kind; coefficients in ms.")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def plot(rows: list[dict], path) -> None:
    """Median relative error per kind of step, one bar per fit."""
    plt = pyplot()
    fits = list(dict.fromkeys(r["fit"] for r in rows))
    kinds = [k for k in KINDS if any(r["kind"] == k for r in rows)]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / max(len(fits), 1)
    for i, fit in enumerate(fits):
        vals = [100 * next((r["median_error"] for r in rows if r["fit"] == fit and r["kind"] == k), np.nan)
                for k in kinds]
        bars = ax.bar(np.arange(len(kinds)) + i * width, vals, width, label=fit)
        ax.bar_label(bars, fmt="%+.1f%%", fontsize=7)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xticks(np.arange(len(kinds)) + width * (len(fits) - 1) / 2, kinds, fontsize=8)
    ax.set_ylabel("median error of the predicted step (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
