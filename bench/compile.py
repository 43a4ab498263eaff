"""``moeca bench compile``: eager against ``--compile`` in one process, full compute and a MoECa replay.

The MoECa schedule is what ``moeca schedule derive --target-speedup T`` gives from ``--trace`` (wall-clock
target, this device's calibration at ``--timing-samples``). The model is loaded once; a compiled copy over
the same weights (:func:`moeca.models.compile.compile_model` with ``in_place=False``) runs the compiled
forward, the original the eager one. One warm-up of each of the four runs (eager full, eager MoECa,
compiled full, compiled MoECa) compiles every kind of step; then ``--repeats`` rounds time the four back to
back, and every ratio is the median of its per-round ratios (a slow spell of the shared machine slows a
whole round). Rows: ms per sampling call eager and compiled, ``compile_speedup`` (eager / compiled), and
for MoECa its speedup over full compute eagerly and compiled and the largest difference between the eager
and compiled samples. A compiled forward takes the replay engine's sync-free device path.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from moeca.bench.derived import add_arguments, command, derive
from moeca.bench.results import pyplot, write_results
from moeca.diffusion.samplers import sample
from moeca.models.compile import CompileOptions, compile_model
from moeca.replay.driver import median_ratio
from moeca.replay.runtime import ReplayRuntime

NAME = "compile"
COLUMNS = ["run", "ms_eager", "ms_compiled", "compile_speedup", "speedup_eager", "speedup_compiled",
           "max_abs_diff", "graphs", "repeats"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME,
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, target=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="inductor",
                   help="torch.compile backend (default inductor; eager traces the graphs without generating code)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    d = derive(args)
    model, device, sampler, labels, schedule = d.model, d.device, d.sampler, d.labels, d.schedule
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    graphs = {"full": 0, "moeca": 0}
    torch._dynamo.reset()
    options = CompileOptions(mode=CompileOptions.for_device(device).mode, backend=args.backend)
    compiled = compile_model(model, options, in_place=False)

    def timed(net, cached: bool) -> tuple[float, torch.Tensor]:
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            if cached:
                with net.use_runtime(ReplayRuntime(schedule)):
                    out = sample(net, sampler, labels, seed=args.seed)
            else:
                out = sample(net, sampler, labels, seed=args.seed)
        sync()
        return time.perf_counter() - start, out

    runs = {("eager", False): model, ("eager", True): model, ("compiled", False): compiled, ("compiled", True): compiled}
    outs = {}
    for (mode, cached), net in runs.items():      # warm-up: compiles every kind of step of the compiled runs
        print(f"warm-up {mode} {'moeca' if cached else 'full'}", flush=True)
        before = _frame_count()
        outs[(mode, cached)] = timed(net, cached)[1]
        if mode == "compiled":
            graphs["moeca" if cached else "full"] = _frame_count() - before
    times = {key: [] for key in runs}
    for r in range(args.repeats):
        for (mode, cached), net in runs.items():
            times[(mode, cached)].append(timed(net, cached)[0])
        print(f"round {r + 1} of {args.repeats}: " + ", ".join(
            f"{m} {'moeca' if c else 'full'} {1e3 * times[(m, c)][-1]:.0f} ms" for m, c in runs), flush=True)
    ms = {key: 1e3 * statistics.median(v) for key, v in times.items()}
    rows = [{"run": "full compute", "ms_eager": ms[("eager", False)], "ms_compiled": ms[("compiled", False)],
             "compile_speedup": median_ratio(times[("eager", False)], times[("compiled", False)]),
             "max_abs_diff": float((outs[("eager", False)] - outs[("compiled", False)]).abs().max()),
             "graphs": graphs["full"], "repeats": args.repeats},
            {"run": f"moeca {args.target:g}x ({len(schedule.sync_refresh_steps)} refreshes)",
             "ms_eager": ms[("eager", True)], "ms_compiled": ms[("compiled", True)],
             "compile_speedup": median_ratio(times[("eager", True)], times[("compiled", True)]),
             "speedup_eager": median_ratio(times[("eager", False)], times[("eager", True)]),
             "speedup_compiled": median_ratio(times[("compiled", False)], times[("compiled", True)]),
             "max_abs_diff": float((outs[("eager", True)] - outs[("compiled", True)]).abs().max()),
             "graphs": graphs["moeca"], "repeats": args.repeats}]
    for row in rows:
        print(row, flush=True)
    cmd = command(NAME, args, f" --backend {args.backend}" if args.backend != "inductor" else "")
    paths = write_results(NAME, rows, args.out, columns=COLUMNS, command=cmd, plot=lambda path: plot(rows, path),
                          title="Eager against --compile in one process",
                          meta={"trace": args.trace, "sampler": sampler.to_dict(), "device": str(device),
                                "backend": args.backend,
                                "timing_samples": args.timing_samples, "schedule_provenance": schedule.provenance,
                                "sync_refresh_steps": list(schedule.sync_refresh_steps)},
                          notes="ms per sampling call (median of the rounds); every ratio is the median of the "
                                "per-round ratios of runs timed back to back; graphs: compiled graphs the "
                                "warm-up made (one per kind of step); max_abs_diff: eager vs compiled samples.")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _frame_count() -> int:
    """Graphs dynamo has compiled so far in this process."""
    return int(counters["stats"]["unique_graphs"])


def plot(rows: list[dict], path) -> None:
    """ms per sampling call, eager and compiled, for full compute and MoECa."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["ms_eager"] for r in rows], width=0.4, label="eager")
    ax.bar([x + 0.2 for x in xs], [r["ms_compiled"] for r in rows], width=0.4, label="--compile")
    for x, r in zip(xs, rows):
        ax.annotate(f"{r['compile_speedup']:.2f}x", (x + 0.2, r["ms_compiled"]), ha="center",
                    textcoords="offset points", xytext=(0, 3), fontsize=8)
    ax.set_xticks(list(xs), [r["run"] for r in rows], fontsize=8)
    ax.set_ylabel("ms per sampling call")
    ax.set_title("eager vs compiled, one process (ratio: eager / compiled)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
