"""``moeca bench steps``: what one step costs -- full compute, a MoECa refresh, a forecast step.

The MoECa schedule is what ``moeca schedule derive --target-speedup T`` gives from ``--trace`` (wall-clock
target, this device's calibration at ``--timing-samples``). Full compute and the replay (the stack forecast
folded, as by default, and unit by unit with the exact gates: ``ReplayRuntime(fold=False)``) run
interleaved, ``--repeats`` times after one warm-up each, with every step timed (the device synchronised at
each step on CUDA). Rows: the median over runs of each step, then the median over step kinds -- full
compute's steps, the replay's refresh steps (and their ratio to full compute's step of the same index:
the bookkeeping a refresh adds), the forecast steps before the second refresh (always unit by unit) and
after it -- and the minor page faults of one run of each.
"""
from __future__ import annotations

import argparse
import statistics

NAME = "steps"
COLUMNS = ["run", "ms_step", "ms_refresh", "refresh_over_full", "ms_forecast_first", "ms_forecast", "ms_total",
           "speedup", "page_faults", "repeats"]


def register(sub: argparse._SubParsersAction) -> None:
    from .derived import add_arguments
    p = sub.add_parser(NAME, help="ms per step: full compute, MoECa refresh and forecast steps (folded or not)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, target=3.5)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import resource

    from moeca.replay.calibrate import timed_steps
    from moeca.replay.driver import median_ratio
    from moeca.replay.runtime import ReplayRuntime

    from .derived import command, derive
    from .results import write_results

    d = derive(args)
    refresh = sorted(d.schedule.sync_refresh_steps)

    def steps(fold: bool | None) -> list[float]:
        """ms of each step of one sampling call (``fold`` None: full compute)."""
        return timed_steps(d.model, d.sampler, d.labels, None if fold is None else ReplayRuntime(d.schedule, fold=fold))

    kinds = {"full compute": None, "moeca, folded stack": True, "moeca, exact gates": False}
    faults, times = {}, {k: [] for k in kinds}
    for name, fold in kinds.items():                   # warm-up, and the page faults of a run
        steps(fold)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        steps(fold)
        faults[name] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    for r in range(args.repeats):
        for name, fold in kinds.items():
            times[name].append(steps(fold))
        print(f"run {r + 1} of {args.repeats}: " + ", ".join(f"{k} {sum(v[-1]):.0f} ms" for k, v in times.items()),
              flush=True)
    med = {k: [statistics.median(col) for col in zip(*v)] for k, v in times.items()}
    full = med["full compute"]
    totals = {k: [sum(run) for run in v] for k, v in times.items()}
    rows = [{"run": "full compute", "ms_step": statistics.median(full[1:]),
             "ms_total": statistics.median(totals["full compute"]), "page_faults": faults["full compute"],
             "repeats": args.repeats}]
    second = refresh[1] if len(refresh) > 1 else len(full)
    for name in ("moeca, folded stack", "moeca, exact gates"):
        m = med[name]
        first = [m[s] for s in range(len(m)) if s not in refresh and s < second]
        later = [m[s] for s in range(len(m)) if s not in refresh and s > second]
        rows.append({"run": f"{name} ({args.target:g}x, {len(refresh)} refreshes)",
                     "ms_refresh": statistics.median(m[s] for s in refresh[1:]),
                     "refresh_over_full": statistics.median(m[s] / full[s] for s in refresh[1:]),
                     "ms_forecast_first": statistics.median(first) if first else None,
                     "ms_forecast": statistics.median(later) if later else None,
                     "ms_total": statistics.median(totals[name]),
                     "speedup": median_ratio(totals["full compute"], totals[name]),
                     "page_faults": faults[name], "repeats": args.repeats})
    for row in rows:
        print(row, flush=True)
    cmd = command(NAME, args)
    paths = write_results(NAME, rows, args.out, columns=COLUMNS, command=cmd,
                          plot=lambda path: plot(med, refresh, path),
                          title="What one step costs: full compute, MoECa refresh and forecast steps",
                          meta={"trace": args.trace, "sampler": d.sampler.to_dict(), "device": str(d.device),
                                "timing_samples": args.timing_samples, "sync_refresh_steps": refresh,
                                "schedule_provenance": d.schedule.provenance},
                          notes="ms: medians over the runs of each step, then over the steps of a kind; "
                                "refresh_over_full: a refresh step over full compute's step of the same index; "
                                "ms_forecast_first: forecast steps before the second refresh (unit by unit in "
                                "both runs); speedup: median of the per-run full/cached ratios of runs timed "
                                "back to back; page_faults: minor faults of one run.")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def plot(med: dict[str, list[float]], refresh: list[int], path) -> None:
    """ms of each step, full compute and the two replays (log scale), refresh steps marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for name, m in med.items():
        ax.plot(range(len(m)), m, marker=".", lw=1, label=name)
    for s in refresh:
        ax.axvline(s, color="0.85", lw=0.8, zorder=0)
    ax.set_yscale("log")
    ax.set_xlabel("sampling step (grey: MoECa refresh steps)")
    ax.set_ylabel("ms per step (median over runs)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
