"""``moeca bench steps``: what one forecast step costs at each level, against its floor.

The refresh steps are those of the MoECa schedule ``moeca schedule derive --target-speedup T`` gives from
``--trace`` (wall-clock target, this device's calibration at ``--timing-samples``), or, for a model shape
with random weights (``--model PRESET --random-init``, no trace), every ``--interval``-th step of a
``--steps``-step run. With those refresh steps the bench replays one schedule per forecast level
(:data:`LEVELS`): ``token`` (no router; each block's attention and whole MoE output forecast, the stack
sum folded after the second refresh), ``branch`` (every block routes, the newly routed (token, expert)
pairs are computed, every other branch, the shared expert and attention forecast, branches combined with
the current gates) on the host path and on the device path (fixed shapes, no host sync, tested here on
the CPU), each through the lean forecast step (:mod:`moeca.replay.units.branch`) and through the general
selection path (``general``: the branch level before it), and ``routing`` (routing-aware: every block routes and
computes the new pairs; tokens whose routed experts changed since the last refresh are forecast per branch,
the others' whole MoE output per token) on both paths. Full compute and the replays run interleaved,
``--repeats`` times after one warm-up each, every step timed.

Rows: full compute's step; per level its forecast steps after the second refresh (median over runs of
each step, then over the steps), their FLOPs (counted from what ran, GFLOP per step) and for the branch
level its *floor*: the token level's forecast step plus the router and the newly routed pairs at full
compute's FLOP rate (``ms_full * FLOPs(router + new pairs) / FLOPs(full step)``; the routing level has the
same floor), and the ratio to it; the floor with this device's own kernels (``ms_kernels``,
:mod:`.kernel_floor`: the token step, the router at full compute's rate, the new pairs as GEMMs of the rows each
touched expert gets at random (binomial), timed on the model's own weights, and every kept forecast value the
level reads, once, at the measured read bandwidth), and the ratio to it;
the share of newly routed pairs; where the branch step's time goes (:mod:`.breakdown`: router, new
pairs, forecasts, gathers/scatters, rest, in ms: shares of one profiled run times the measured step);
and the refresh step over full compute's step.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from moeca.bench.derived import derive
from moeca.bench.results import DEFAULT_OUT, pyplot, write_results
from moeca.diffusion.samplers import default_sampler, sample
from moeca.models.registry import SHIPPED_MODELS, load_model
from moeca.policy.cost import UnitCosts
from moeca.policy.schedule import ALWAYS, REUSE, ROUTING, BlockRule, ModelIdentity, SamplerIdentity, Schedule, StepRule
from moeca.replay.calibrate import timed_steps
from moeca.replay.runtime import ReplayRuntime
from moeca.tracer import resolve_labels

from .breakdown import PARTS, profile_steps
from .kernel_floor import history_bytes, pairs_ms, read_bandwidth

NAME = "steps"
LEVELS = (("token", "token", False, True),
          ("branch, host path, general", "branch", False, False), ("branch, device path, general", "branch", True, False),
          ("branch, host path", "branch", False, True), ("branch, device path", "branch", True, True),
          ("routing, host path", "routing", False, True), ("routing, device path", "routing", True, True))
"""``(row name, forecast level, device path, lean)`` of the replays; ``general``: the branch step through the
general selection path (``ReplayRuntime(lean=False)``, the branch level before the lean step), timed in the
same runs as the lean one; ``routing``: the routing-aware level (``moe`` rule ``routing``)."""
PARTS_MS = ("ms_router", "ms_new_pairs", "ms_forecasts", "ms_gathers", "ms_rest")
COLUMNS = ["run", "ms_step", "gflop_step", "ms_floor", "over_floor", "ms_kernels", "over_kernels", "ms_pair_gemms",
           "ms_history_reads", "new_pair_share", *PARTS_MS, "ms_refresh", "refresh_over_full", "repeats"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME,
                       description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("what to replay (a trace, or a model shape with random weights)")
    src.add_argument("--trace", default=None, help="trace directory of the model (moeca trace)")
    src.add_argument("--target", type=float, default=3.5,
                     help="with --trace: the MoECa wall-clock target whose refresh steps are used (default 3.5)")
    src.add_argument("--model", default=None, help="without --trace: a shipped model (its weights and bench sampler) "
                                                   "or a preset (e.g. S/2-8E2A) with random weights")
    src.add_argument("--steps", type=int, default=20, help="without --trace: sampling steps (default 20)")
    src.add_argument("--interval", type=int, default=4, help="without --trace: refresh every N steps (default 4)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="what a step's time is: wall-clock (default) or the process's CPU time (CPU devices only: "
                        "on a machine shared with other jobs, with --threads 1, it leaves out the time other jobs "
                        "take the cores)")
    p.add_argument("--timing-samples", type=int, default=16, help="samples per sampling call (default 16)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"results folder (default {DEFAULT_OUT})")
    p.set_defaults(func=run)


@dataclass(frozen=True)
class Setup:
    """The model (on ``device``), sampler, timing ``labels``, refresh steps, a results-file name and whether the
    weights are random."""

    model: Any
    device: Any
    sampler: Any
    labels: Any
    refresh: tuple[int, ...]
    name: str
    random_init: bool


def setup(args: argparse.Namespace) -> Setup:
    """Check the options; load the trace's model and its derived refresh steps, or the random model shape."""
    for name, value in (("--timing-samples", args.timing_samples), ("--repeats", args.repeats),
                        ("--threads", args.threads), ("--steps", args.steps), ("--interval", args.interval)):
        if value is not None and value < 1:
            raise ValueError(f"{name} {value} must be >= 1")
    if (args.trace is None) == (args.model is None):
        raise ValueError("give --trace (a traced model) or --model (a preset shape with random weights), not both")
    if args.trace is not None:
        d = derive(args)
        return Setup(d.model, d.device, d.sampler, d.labels, tuple(sorted(d.schedule.sync_refresh_steps)), NAME, False)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.interval >= args.steps:
        raise ValueError(f"--interval {args.interval} must be below --steps {args.steps}")
    shipped = args.model in SHIPPED_MODELS
    model = load_model(args.model, random_init=not shipped, device=args.device)
    device = next(model.parameters()).device
    sampler = default_sampler(model.config.objective, num_steps=args.steps, cfg_scale=1.5, cfg_mode="batched")
    labels = torch.tensor(resolve_labels(model.config.num_classes, samples=args.timing_samples), device=device)
    refresh = tuple(range(0, args.steps, args.interval))
    return Setup(model, device, sampler, labels, refresh, f"{NAME}_{args.model.replace('/', '')}", not shipped)


def level_schedule(model, sampler, refresh: tuple[int, ...], level: str):
    """The ``sync`` rule's schedule with ``refresh`` steps and forecast ``level`` (``token``, ``branch`` or
    ``routing``), linear forecast (what ``moeca schedule derive --forecast-level LEVEL`` gives for these refresh
    steps)."""
    config = model.config
    E, L = config.num_experts, config.depth
    moe = {"token": REUSE, "branch": ALWAYS, "routing": ROUTING}[level]
    body = BlockRule(attn=REUSE, moe=moe, shared=REUSE, experts=(REUSE,) * E)
    steps = tuple(StepRule("compute", (BlockRule.full(E) if s in refresh else body,) * L)
                  for s in range(sampler.num_steps))
    return Schedule(method="moeca", model=ModelIdentity.of(config), sampler=SamplerIdentity.of(sampler), steps=steps,
                    sync_refresh_steps=refresh, forecast="linear", provenance={"forecast_level": level})


def step_flops(counters, costs, step: int, rows: int) -> dict[str, float]:
    """FLOPs of ``step`` from a replay's counters: ``total`` (units run, forecast and stack terms, the fixed
    per-sample work of ``rows`` samples), ``router`` and ``pairs`` (routed experts), and ``full`` (what full
    compute runs at that step); also ``new_pairs`` (routed pairs computed) and ``new_pair_share``."""
    c = counters
    s = step
    fixed = rows * costs.fixed_per_sample()
    total = (c.attn_q[s].sum() * costs.attn_q + c.attn_kv[s].sum() * costs.attn_kv + c.shared[s].sum() * costs.shared
             + c.expert[s].sum() * costs.expert + c.router[s].sum() * costs.router
             + (c.forecast[s].sum() + c.stack[s].sum()) * costs.forecast_term + fixed)
    full = c.tokens[s].sum() * (costs.attn + costs.shared + costs.router) + c.pairs[s].sum() * costs.expert + fixed
    return {"total": float(total), "router": float(c.router[s].sum() * costs.router),
            "pairs": float(c.expert[s].sum() * costs.expert), "full": float(full),
            "new_pairs": float(c.expert[s].sum()),
            "new_pair_share": float(c.expert[s].sum() / max(c.pairs[s].sum(), 1))}


def run(args: argparse.Namespace) -> int:
    st = setup(args)
    model, sampler, labels, refresh = st.model, st.sampler, st.labels, st.refresh
    if args.clock == "cpu" and st.device.type != "cpu":
        raise ValueError(f"--clock cpu times the process's CPU time: a {st.device.type} run needs --clock wall")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    S = sampler.num_steps
    schedules = {name: level_schedule(model, sampler, refresh, level) for name, level, _, _ in LEVELS}
    engine = {name: {"device_path": dev, "lean": lean} for name, _, dev, lean in LEVELS}

    def runtime(name: str | None):
        return None if name is None else ReplayRuntime(schedules[name], **engine[name])

    names: list[str | None] = [None, *schedules]
    times: dict[str | None, list[list[float]]] = {n: [] for n in names}
    for n in names:                                       # warm-up
        timed_steps(model, sampler, labels, runtime(n), clock)
    for r in range(args.repeats):
        for n in names:
            times[n].append(timed_steps(model, sampler, labels, runtime(n), clock))
        print(f"run {r + 1} of {args.repeats}: " + ", ".join(f"{n or 'full'} {sum(v[-1]):.0f} ms"
                                                             for n, v in times.items()), flush=True)
    med = {n: [statistics.median(col) for col in zip(*v)] for n, v in times.items()}
    full = med[None]
    second = refresh[1] if len(refresh) > 1 else S
    forecast = [s for s in range(S) if s not in refresh and s > second]
    if not forecast:
        raise ValueError(f"no forecast step after the second refresh (refresh steps {list(refresh)}); use more steps")
    costs = UnitCosts.of(model.config)
    rows_per_step = len(labels) * (2 if sampler.guided else 1)
    ms_full = statistics.median(full[1:])
    counted = {}
    for n in schedules:                                   # what each replay ran, per step
        rt = runtime(n)
        with torch.inference_mode(), model.use_runtime(rt):
            sample(model, sampler, labels, seed=0)
        counted[n] = [step_flops(rt.counters, costs, s, rows_per_step) for s in range(S)]
    full_flops = statistics.median(c["full"] for c in counted["token"])
    rows = [{"run": "full compute", "ms_step": ms_full, "gflop_step": full_flops / 1e9, "repeats": args.repeats}]
    token_ms = statistics.median(med["token"][s] for s in forecast)
    bandwidth = read_bandwidth(st.device, clock)
    tokens = rows_per_step * model.config.num_tokens
    kernel_meta = {"read_gb_per_s": bandwidth / 1e9}
    kernel_pairs: dict[str, tuple[float, float] | None] = {}
    for name, level, _, _ in LEVELS:
        m = med[name]
        ms = statistics.median(m[s] for s in forecast)
        row = {"run": f"{name} forecast", "ms_step": ms,
               "gflop_step": statistics.median(counted[name][s]["total"] for s in forecast) / 1e9,
               "ms_refresh": statistics.median(m[s] for s in refresh[1:]),
               "refresh_over_full": statistics.median(m[s] / full[s] for s in refresh[1:]), "repeats": args.repeats}
        if level in ("branch", "routing"):
            extra = statistics.median((counted[name][s]["router"] + counted[name][s]["pairs"]) / full_flops
                                      for s in forecast)
            row.update(ms_floor=token_ms + ms_full * extra, new_pair_share=statistics.median(
                counted[name][s]["new_pair_share"] for s in forecast))
            row["over_floor"] = ms / row["ms_floor"]
            if level not in kernel_pairs:      # one estimate per level: its rows (host, device, general) share it
                new_pairs = statistics.median(counted[name][s]["new_pairs"] for s in forecast)
                kernel_pairs[level] = pairs_ms(model, new_pairs, clock)
            pairs = kernel_pairs[level]
            if pairs is not None:
                reads = history_bytes(model.config, tokens, level) / bandwidth * 1e3
                router = ms_full * statistics.median(counted[name][s]["router"] / full_flops for s in forecast)
                row.update(ms_pair_gemms=pairs[0], ms_history_reads=reads,
                           ms_kernels=token_ms + router + pairs[0] + reads)
                row["over_kernels"] = ms / row["ms_kernels"]
                kernel_meta[f"new_pair_rows_per_touched_expert_{level}"] = round(pairs[1], 2)

            def one_run(on_step, name=name):
                with torch.inference_mode(), model.use_runtime(runtime(name)):
                    sample(model, sampler, labels, seed=0, on_step=on_step)

            shares = profile_steps(one_run, set(forecast))
            row.update({col: shares[part] * ms for col, part in zip(PARTS_MS, PARTS)})
        rows.append(row)
    for row in rows:
        print(row, flush=True)
    load = os.getloadavg()
    src = (f"--trace {args.trace} --target {args.target:g}" if args.trace else
           f"--model {args.model} --steps {args.steps} --interval {args.interval}")
    cmd = (f"moeca bench steps {src} --timing-samples {args.timing_samples} --repeats {args.repeats}"
           + (" --clock cpu" if args.clock == "cpu" else "")
           + (f" --threads {args.threads}" if args.threads else ""))
    out = write_results(st.name, rows, args.out, columns=COLUMNS, command=cmd,
                        plot=lambda path: plot(med, refresh, path),
                        title=f"What a forecast step costs at each level, against its floor ({model.config.name})",
                        meta={"trace": args.trace, "model": model.config.name, "random_init": st.random_init, "clock": args.clock,
                              "sampler": sampler.to_dict(), "device": str(st.device),
                              "timing_samples": args.timing_samples, "sync_refresh_steps": list(refresh),
                              "forecast_steps": forecast, "load_average": [round(v, 2) for v in load],
                              **kernel_meta},
                        notes=("Times are the process's CPU time (--clock cpu). " if args.clock == "cpu" else "") + "ms: medians over the runs of each step, then over the forecast steps after the "
                              "second refresh (refresh: over the refresh steps after the first); gflop_step: "
                              "FLOPs counted from what ran; ms_floor: the token forecast step plus the router and "
                              "the newly routed pairs at full compute's FLOP rate; over_floor: ms_step / ms_floor; "
                              "ms_kernels: the floor with this core's own kernels (the token forecast step, the router "
                              "at full compute's rate, ms_pair_gemms: the new pairs as GEMMs of their rows per expert "
                              "over the model's own expert weights, ms_history_reads: every kept forecast value the "
                              "level must read, once, at the measured read bandwidth: "
                              f"{bandwidth / 1e9:.1f} GB/s; bench/kernel_floor.py); over_kernels: ms_step / "
                              "ms_kernels; "
                              "new_pair_share: newly routed pairs / all routed pairs; ms_router .. ms_rest: where "
                              "the step's time goes (shares of the operators' self CPU time in one profiled run, "
                              f"times ms_step). Load average while it ran: {load[0]:.1f} / {load[1]:.1f} / "
                              f"{load[2]:.1f}.")
    print("wrote " + ", ".join(str(p) for p in out.values()))
    return 0


def plot(med: dict, refresh: tuple[int, ...], path) -> None:
    """ms of each step, full compute and each level's replay (log scale), refresh steps marked."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(8, 4))
    for name, m in med.items():
        ax.plot(range(len(m)), m, marker=".", lw=1, label=name or "full compute")
    for s in refresh:
        ax.axvline(s, color="0.85", lw=0.8, zorder=0)
    ax.set_yscale("log")
    ax.set_xlabel("sampling step (grey: refresh steps)")
    ax.set_ylabel("ms per step (median over runs)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
