"""Measure the wall-clock unit costs of the replay engine on this device (``moeca calibrate``).

:func:`measure_costs` samples a short run (``steps`` steps of the schedule's sampler) with the default
runtime and with eleven calibration schedules that each exercise a different mix of units -- every step
full, with and without a forecast history; everything forecast (linear) or reused plainly between full
steps; only attention, only the shared expert or only the routed experts recomputed between full steps;
every other step full; token-level forecast steps (no router, the stack forecast folded after the
second refresh) between full steps, every 5th and every 3rd step full; routing-aware forecast steps
(``moe`` rule ``routing``) between full steps every 5th -- times every step (median of ``repeats`` interleaved runs, after a warm-up; the
device is synchronised at each step on CUDA), counts what each step executed (:class:`~moeca.replay.counters.ReplayCounters`) and fits
the non-negative coefficients of :class:`~moeca.policy.wallclock.WallClockCosts` by least squares, except
the refresh-side bookkeeping (``history_term_ms``, ``stack_term_ms``), which is timed directly
(:func:`bookkeeping_ms`). The first step of a run (cache allocation) is not fitted.

:func:`ensure_costs` returns the cached calibration of the current key
(:func:`calibration_key`: device, torch version, a hash of the replay engine's and the model code's
sources, a hash of the cost model and this measurement, weights hash, batch, dtype, sampler kind and CFG mode, CPU threads) and measures it when the
cache has none -- so a changed engine, torch, device or model is recalibrated automatically.
"""
from __future__ import annotations

import hashlib
import os
import platform
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy.optimize import nnls

import moeca.models as models_pkg
import moeca.policy.wallclock as wallclock_mod
from moeca.diffusion.samplers import SamplerConfig, sample
from moeca.models.checkpoint import weights_hash
from moeca.policy.schedule import ALWAYS, REUSE, ROUTING, BlockRule, ModelIdentity, SamplerIdentity, Schedule, StepRule
from moeca.policy.wallclock import (COEFFICIENTS, CalibrationError, StepWork, WallClockCosts, check_cache_path,
                                    load_costs, save_costs)

from .forecast import History
from .runtime import ReplayRuntime

CALIBRATION_STEPS = 10
CALIBRATION_REPEATS = 3
NOT_ENGINE = ("calibrate.py", "calibrate_cli.py", "cli.py", "__main__.py")
"""Sources that never run while sampling (this measurement and the command lines): not hashed."""


def sources_hash(files: list[tuple[str, Path]]) -> str:
    """16 hex digits of SHA-256 over ``(name, path)`` pairs: each name, then the file's bytes."""
    h = hashlib.sha256()
    for name, path in files:
        h.update(name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def engine_hash() -> str:
    """Hash of the source of the replay engine and the model code (every ``.py`` file under ``replay/``
    and ``models/`` except :data:`NOT_ENGINE`): any change recalibrates."""
    return sources_hash([(p.relative_to(root).as_posix(), p)
                          for root in (Path(__file__).parent, Path(models_pkg.__file__).parent)
                          for p in sorted(q for q in root.rglob("*.py") if q.name not in NOT_ENGINE)])


def cost_model_hash() -> str:
    """Hash of the cost model (``policy/wallclock.py``) and this measurement: a calibration fitted with
    other features or schedules is never reused."""
    return sources_hash([(p.name, p) for p in (Path(wallclock_mod.__file__), Path(__file__))])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{platform.machine()}:{platform.processor() or 'cpu'}:{os.cpu_count()} cores"


def rows_per_block(config, sampler_cfg: SamplerConfig, batch: int) -> int:
    """Rows one block sees per step (both CFG halves)."""
    return batch * config.num_tokens * (2 if sampler_cfg.guided else 1)


def calibration_key(model: torch.nn.Module, sampler_cfg: SamplerConfig, batch: int) -> dict[str, str]:
    """The fields a calibration is valid for (all strings)."""
    param = next(model.parameters())
    return {"device": device_name(param.device), "torch": torch.__version__, "engine": engine_hash(),
            "cost_model": cost_model_hash(),
            "weights": weights_hash(model), "model": model.config.fingerprint(), "batch": str(batch),
            "dtype": str(param.dtype).replace("torch.", ""), "sampler": sampler_cfg.kind,
            "cfg_mode": sampler_cfg.cfg_mode if sampler_cfg.guided else "none",
            "threads": str(torch.get_num_threads()) if param.device.type == "cpu" else "-"}


def calibration_plan(model: ModelIdentity, sampler: SamplerIdentity, num_steps: int, *,
                     routing: bool = True) -> list[Schedule]:
    """The schedules whose steps the fit uses (see the module docstring), for any model family: full compute
    with and without forecast history, branch-level forecast steps every 5 and every 2 steps (linear and plain
    reuse), each unit computed alone, token-level forecast steps every 5 and every 3, and (``routing``, for an
    engine that runs it) routing-aware forecast steps every 5."""
    S, L, E = num_steps, model.depth, model.num_experts
    full = BlockRule.full(E)

    def make(body: BlockRule | None, forecast: str, every: int = S) -> Schedule:
        sync = tuple(range(0, S, every)) if body is not None else tuple(range(S))
        steps = tuple(StepRule("compute", (full if body is None or s in sync else body,) * L) for s in range(S))
        return Schedule(method="custom", model=model, sampler=sampler, steps=steps, sync_refresh_steps=sync,
                        forecast=forecast, provenance={"calibration": True})

    branch = BlockRule(attn=REUSE, shared=REUSE, experts=(REUSE,) * E)
    token = BlockRule(attn=REUSE, moe=REUSE, shared=REUSE, experts=(REUSE,) * E)
    plan = [
        make(None, "linear"),
        make(None, "none"),
        make(branch, "linear", every=5),
        make(branch, "none", every=5),
        make(BlockRule(attn=ALWAYS, shared=REUSE, experts=(REUSE,) * E), "linear", every=5),
        make(BlockRule(attn=REUSE, shared=ALWAYS, experts=(REUSE,) * E), "linear", every=5),
        make(BlockRule(attn=REUSE, shared=REUSE, experts=(ALWAYS,) * E), "linear", every=5),
        make(branch, "linear", every=2),
        make(token, "linear", every=5),
        make(token, "linear", every=3),
    ]
    if routing:
        plan.append(make(BlockRule(attn=REUSE, moe=ROUTING, shared=REUSE, experts=(REUSE,) * E), "linear", every=5))
    return plan


def calibration_schedules(config, sampler_cfg: SamplerConfig) -> list[Schedule]:
    """The eleven schedules of a native model's calibration (:func:`calibration_plan`)."""
    return calibration_plan(ModelIdentity.of(config), SamplerIdentity.of(sampler_cfg), sampler_cfg.num_steps)


DIRECT = ("history_term_ms", "stack_term_ms")
"""Coefficients timed directly (:func:`bookkeeping_ms`) instead of fitted: they act on refresh steps only,
where they add a few ms to a step whose run-to-run noise on a shared machine is larger (fitted, they came
out anywhere from 0 to 4x their directly timed values and moved predictions by 20%)."""


def bookkeeping_ms(rows: int, width: int, device: torch.device, repeats: int = 30) -> tuple[float, float]:
    """Per-row costs (ms) of the refresh-side bookkeeping, each timed on ``rows x width`` float32 with the
    caches cold (a 32 MiB scratch buffer written before every timing, as a refresh step's own work does):
    a push into a forecast history (``history_term_ms``, per row and term) and one multiply-add of the
    folded stack forecast (``stack_term_ms``, per row). Medians of ``repeats``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    scratch = torch.empty(8 << 20, device=device)
    values = torch.randn(rows, width, device=device)
    gate = torch.randn(1, width, device=device)
    acc = torch.zeros(rows, width, device=device)
    history = History.empty(1, rows, width, device)

    def timed(op) -> float:
        out = []
        for _ in range(repeats + 2):
            scratch.add_(1.0)
            sync()
            start = time.perf_counter()
            op()
            sync()
            out.append(1e3 * (time.perf_counter() - start))
        return statistics.median(out[2:])

    step = iter(range(10**9))
    push = timed(lambda: history.push_all(values, float(next(step)))) / rows
    stack = timed(lambda: acc.addcmul_(values, gate)) / rows
    return push, stack


def new_pair_blocks(schedule: Schedule, depth: int) -> np.ndarray:
    """``[S, L]`` bool: the block computes only newly routed pairs at that step (a branch-level or routing-aware
    forecast step: not a refresh, the MoE routed or routing-aware, every expert's rule ``reuse``)."""
    S = schedule.num_steps
    return np.array([[not schedule.is_sync(s) and (r := schedule.rule(s, b)).moe.mode in ("always", "routing")
                      and bool(r.experts) and all(e.mode == "reuse" for e in r.experts) for b in range(depth)]
                     for s in range(S)], dtype=bool).reshape(S, depth)


def step_work(counters, schedule: Schedule) -> list[StepWork]:
    """What each step of a replay executed, from its counters (rows summed over blocks); the pairs of blocks
    that compute only newly routed pairs (:func:`new_pair_blocks`) are its ``new_pairs``."""
    routes = counters.router > 0                                              # [S, L] blocks that routed
    attn_b, shared_b = counters.attn_q, counters.shared
    pairs_b = counters.expert - counters.padded
    # a block that routes forecasts attention, shared and pair rows; one that does not, attention and MoE rows
    # (unit by unit: a folded stack step forecasts none per unit, its work is the stack rows)
    reused_b = np.where(routes, 2 * counters.tokens + counters.pairs - attn_b - shared_b - pairs_b,
                        2 * counters.tokens - attn_b)
    stack = counters.stack.sum(1)
    folded = (stack > 0) & ~routes.any(1)
    reused_b = np.where(folded[:, None], 0, reused_b)
    # a routing-aware forecast block forecasts attention and the whole MoE output per token, and the branches and
    # shared expert of its moved tokens only: its forecast rows, less the new pairs' pushes
    order = schedule.forecast_degree
    routing = np.array([[not schedule.is_sync(s) and schedule.rule(s, b).moe.mode == "routing"
                         for b in range(counters.router.shape[1])] for s in range(counters.router.shape[0])])
    if order and routing.any():
        reused_b = np.where(routing & routes, counters.forecast / order - pairs_b, reused_b)
    new_b = np.where(new_pair_blocks(schedule, routes.shape[1]), pairs_b, 0)
    attn, shared, pairs, reused = attn_b.sum(1), shared_b.sum(1), pairs_b.sum(1), reused_b.sum(1)
    new = new_b.sum(1)
    routed = routes.sum(1)
    # on a step that reuses nothing, the forecast terms are the rows pushed into a history times the order
    # (a token-level refresh keeps attention and the MoE output per token, not every computed row); on a
    # forecast step they also count the forecast rows, so its pushes are taken as its computed rows
    computed = attn + shared + pairs
    pushed = np.where(reused == 0, counters.forecast.sum(1) / order, computed) if order else computed
    return [StepWork(float(a), float(s), float(p - n), float(r), order, float(b), float(k), float(h), float(n))
            for a, s, p, r, b, k, h, n in zip(attn, shared, pairs, reused, routed, stack, pushed, new)]


def timed_steps(model, sampler_cfg: SamplerConfig, labels: torch.Tensor, runtime,
                clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Milliseconds of each sampling step of one run (``runtime`` None: full compute; the device
    synchronised at every step). ``clock``: seconds, wall-clock by default (``time.process_time``: the
    process's CPU time, for a CPU run on a machine shared with other jobs)."""
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    marks: list[float] = []

    def on_step(_step: int) -> None:
        sync()
        marks.append(clock())

    sync()
    start = clock()
    with torch.inference_mode():
        if runtime is None:
            sample(model, sampler_cfg, labels, seed=0, on_step=on_step)
        else:
            with model.use_runtime(runtime):
                sample(model, sampler_cfg, labels, seed=0, on_step=on_step)
    edges = [start, *marks]
    return [1e3 * (b - a) for a, b in zip(edges, edges[1:])]


@dataclass(frozen=True)
class TimedRuns:
    """The calibration's measurements: ``times[i]`` the per-step milliseconds of each timed run of calibration
    schedule ``i`` (``-1``: full compute), ``works[i]`` what each of its steps executed, ``fixed`` the directly
    timed coefficients (:data:`DIRECT`), the ``schedules`` and the fit's ``rows_per_block``, ``top_k`` and ``key``."""

    times: dict[int, list[list[float]]]
    works: dict[int, list[StepWork]]
    fixed: dict[str, float]
    schedules: list[Schedule]
    rows_per_block: int
    top_k: int
    key: dict[str, str]

    def fit(self, works: dict[int, list[StepWork]] | None = None) -> WallClockCosts:
        """:func:`fit_costs` of these runs (``works``: other features of the same steps)."""
        return fit_costs(self.times, works or self.works, self.fixed, rows_per_block=self.rows_per_block,
                         top_k=self.top_k, key=self.key)


def time_calibration(model: torch.nn.Module, sampler_cfg: SamplerConfig, batch: int, *,
                     steps: int = CALIBRATION_STEPS, repeats: int = CALIBRATION_REPEATS,
                     progress: Callable[[str], None] | None = None) -> TimedRuns:
    """Time full compute and every calibration schedule (the module docstring) on ``model`` at ``batch`` samples,
    ``repeats`` interleaved rounds after a warm-up round."""
    if batch < 1 or steps < 4 or repeats < 1:
        raise ValueError(f"calibration needs batch >= 1, steps >= 4 and repeats >= 1 (got {batch}, {steps}, {repeats})")
    config = model.config
    short = SamplerConfig(**{**sampler_cfg.to_dict(), "num_steps": steps})
    labels = torch.arange(batch) % config.num_classes
    schedules = calibration_schedules(config, short)
    say = progress or (lambda _msg: None)
    times: dict[int, list[list[float]]] = {i: [] for i in range(-1, len(schedules))}
    works: dict[int, list[StepWork]] = {}
    for r in range(repeats + 1):   # round 0 is the warm-up
        say(f"calibrating: round {r + 1} of {repeats + 1} ({len(schedules) + 1} runs of {steps} steps, batch {batch})")
        for i in range(-1, len(schedules)):
            rt = None if i < 0 else ReplayRuntime(schedules[i])
            t = timed_steps(model, short, labels, rt)
            if r:
                times[i].append(t)
            if rt is not None:
                works[i] = step_work(rt.counters, schedules[i])
    device = next(model.parameters()).device
    rows = rows_per_block(config, sampler_cfg, batch)
    fixed = dict(zip(DIRECT, bookkeeping_ms(rows, config.hidden_size, device)))
    return TimedRuns(times, works, fixed, schedules, rows, config.top_k, calibration_key(model, sampler_cfg, batch))


def measure_costs(model: torch.nn.Module, sampler_cfg: SamplerConfig, batch: int, *,
                  steps: int = CALIBRATION_STEPS, repeats: int = CALIBRATION_REPEATS,
                  progress: Callable[[str], None] | None = None) -> WallClockCosts:
    """Calibrate the unit costs of ``model`` at ``batch`` samples for ``sampler_cfg``'s kind and CFG mode."""
    return time_calibration(model, sampler_cfg, batch, steps=steps, repeats=repeats, progress=progress).fit()


def fit_costs(times: dict[int, list[list[float]]], works: dict[int, list[StepWork]], fixed: dict[str, float], *,
              rows_per_block: int, top_k: int, key: dict[str, str]) -> WallClockCosts:
    """The calibration from timed runs, for any model family: ``times[i]`` the per-step milliseconds of each
    timed run of calibration schedule ``i`` (``-1``: full compute, the speedup reference), ``works[i]`` what
    each of its steps executed; ``fixed`` the directly timed coefficients (:data:`DIRECT`). The first step of
    a run (cache allocation) is not fitted; the others' medians over the runs are fitted by non-negative least
    squares (each feature scaled to its largest value)."""
    med = {i: [statistics.median(col) for col in zip(*runs)] for i, runs in times.items()}
    full_step_ms = statistics.median(med[-1][1:])
    rows, obs = [], []
    for i in sorted(k for k in works if k >= 0):
        for s in range(1, len(med[i])):
            rows.append(works[i][s].features())
            obs.append(med[i][s])
    a, b = np.asarray(rows, dtype=float), np.asarray(obs, dtype=float)
    cols = [COEFFICIENTS.index(c) for c in DIRECT]
    free = [j for j in range(len(COEFFICIENTS)) if j not in cols]
    rest = b - a[:, cols] @ np.array([fixed[c] for c in DIRECT])
    scale = np.where(a[:, free].max(axis=0) > 0, a[:, free].max(axis=0), 1.0)
    fitted, _ = nnls(a[:, free] / scale, rest)
    coef = np.zeros(len(COEFFICIENTS))
    coef[free] = fitted / scale
    coef[cols] = [fixed[c] for c in DIRECT]
    rel = np.abs(a @ coef - b) / b
    full_steps = [med[i][s] for i in works if i >= 0 for s in range(1, len(med[i]))      # every unit computed,
                  if works[i][s].reused == 0 and works[i][s].stack_terms == 0]       # nothing reused or folded
    refresh_over_full = statistics.median(full_steps) / full_step_ms if full_steps else 1.0
    return WallClockCosts(**dict(zip(COEFFICIENTS, (float(c) for c in coef))), full_step_ms=float(full_step_ms),
                          refresh_over_full=float(refresh_over_full),
                          rows_per_block=rows_per_block, top_k=top_k, key=key, fit_rel_error=float(np.median(rel)),
                          created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))


MAX_FIT_ERROR = 0.2
"""Largest median per-step error of a calibration's fit that wall-clock targets are derived from (fits on a quiet
machine: 2-7%; a busy one gives 30-90%, and schedules derived from them miss their targets)."""


SPEED_DRIFT = 0.3
"""Largest relative difference between a calibration's own full steps and its full-compute reference (both every
unit computed; the replay's also writes its histories: 0-10% more on a quiet machine) before the machine is taken
to have changed speed while it ran. One such calibration priced refreshes 44% above its reference, so the first
``moeca run`` after it overshot its 1.5x / 2x / 3x targets at 1.93x / 2.61x / 4.11x."""


def _fit_problem(costs: WallClockCosts, max_fit_error: float) -> str | None:
    """Why ``costs`` are too noisy to derive from, or None. ``max_fit_error`` also widens the speed-drift check
    (:data:`SPEED_DRIFT`) when above it."""
    load, cores = os.getloadavg()[0] if hasattr(os, "getloadavg") else None, os.cpu_count() or 1
    busy = f", load average {load:.1f} on {cores} cores" if load is not None and load > cores else ""
    if costs.fit_rel_error > max_fit_error:
        return (f"its fit misses the timed steps by {costs.fit_rel_error:.1%} (median), more than the "
                f"{max_fit_error:.0%} a wall-clock target can be derived from{busy}")
    drift = max(SPEED_DRIFT, max_fit_error)
    if not 1 / (1 + drift) <= costs.refresh_over_full <= 1 + drift:
        return (f"its full steps took {costs.refresh_over_full:.2f}x its full-compute reference "
                f"({costs.full_step_ms:.1f} ms), beyond the {drift:.0%} a quiet machine stays within: the machine "
                f"changed speed while it was timed{busy}")
    return None


def ensure_costs(model: torch.nn.Module, sampler_cfg: SamplerConfig, batch: int, *, recalibrate: bool = False,
                 cache: Path | None = None, progress: Callable[[str], None] | None = print,
                 max_fit_error: float = MAX_FIT_ERROR, **measure) -> WallClockCosts:
    """The cached calibration of this key, measured (and cached) first when there is none, when ``recalibrate``,
    or when the cached one fits worse than ``max_fit_error``. A measurement that fits worse is repeated once;
    a second one is refused (:class:`CalibrationError`, saying why and what to do) and not cached."""
    return ensure_measured(calibration_key(model, sampler_cfg, batch), batch,
                           lambda: measure_costs(model, sampler_cfg, batch, progress=progress, **measure),
                           recalibrate=recalibrate, cache=cache, progress=progress, max_fit_error=max_fit_error)


def ensure_measured(key: dict[str, str], batch: int, measure: Callable[[], WallClockCosts], *,
                    recalibrate: bool = False, cache: Path | None = None,
                    progress: Callable[[str], None] | None = print,
                    max_fit_error: float = MAX_FIT_ERROR) -> WallClockCosts:
    """:func:`ensure_costs` for any model family: the cached calibration of ``key``, else ``measure()``d (once
    more when too noisy, then refused) and cached."""
    say = progress or (lambda _msg: None)
    check_cache_path(cache)                    # before measuring: a folder where the file should be is refused
    costs = None if recalibrate else load_costs(key, cache)
    if costs is not None and _fit_problem(costs, max_fit_error):
        say(f"the cached calibration for {key['device']} (batch {batch}) is too noisy: "
            f"{_fit_problem(costs, max_fit_error)}; measuring it again")
        costs = None
    if costs is None:
        say(f"no wall-clock calibration for {key['device']} (batch {batch}, {key['dtype']}, engine "
            f"{key['engine']}); measuring it once (moeca calibrate redoes it)")
        for attempt in (1, 2):
            costs = measure()
            problem = _fit_problem(costs, max_fit_error)
            if problem is None:
                break
            if attempt == 1:
                say(f"the calibration is too noisy: {problem}; measuring once more")
        else:
            raise CalibrationError(
                f"the wall-clock calibration for {key['device']} (batch {batch}) was measured twice and {problem}: "
                "the machine was too busy to time it, and a schedule derived from it would miss its target. Run "
                "`moeca calibrate` on a quiet machine (or with --max-fit-error to accept a noisier fit), or use an "
                "analytic FLOPs target (--target-flops-speedup / --target-flops-speedups)")
        path = save_costs(costs, cache)
        say(f"calibration cached in {path} (fit error {costs.fit_rel_error:.1%} per step)")
    return costs


def prediction_line(schedule: Schedule, measured: float, model: torch.nn.Module, sampler_cfg: SamplerConfig,
                    batch: int) -> str | None:
    """``predicted X vs measured Y`` for a schedule derived with a wall-clock prediction, naming the
    calibration fields that differ from this replay's (then the prediction was for another setting);
    None when the schedule carries no prediction."""
    predicted = schedule.provenance.get("predicted_speedup")
    if predicted is None:
        return None
    line = (f"wall-clock speedup: predicted {predicted:.2f}x, measured {measured:.2f}x "
            f"({measured / predicted - 1:+.1%})")
    made = {k: v for k, v in dict(schedule.provenance.get("calibration", {})).items() if k != "created"}
    now = calibration_key(model, sampler_cfg, batch)
    differ = [f"{k} {made.get(k)!r} -> {now[k]!r}" for k in sorted(now) if made.get(k) != now[k]]
    if differ:
        line += ("; the prediction was calibrated for another setting (" + ", ".join(differ)
                 + "): derive again with the replay's --batch/--device for a matching prediction")
    return line
