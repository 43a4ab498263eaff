"""Measuring MoECa on a HiDream transformer: stock forward, moeca full compute and schedules, interleaved.

Every variant samples the same latents from the same noise and text. Timed runs are interleaved
(stock, moeca full, each schedule, then again ``repeats`` times) after one warm-up run of each, hooks
attached before and removed after each run (outside the timed region); a variant's ms/step is the median
over runs, its speed the median of its per-run ratios to the stock run of the same round. FLOPs are
counted by the engine from what ran (:class:`~.engine.Counters`); fidelity is the final latents' relative
L2 and PSNR (peak = the stock latents' largest magnitude) against the stock run.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import torch

from moeca.policy.schedule import Schedule

from .apply import apply_schedule
from .sampling import FlowSampler, TextConditioning, sample


@dataclass
class Variant:
    """One timed variant: ``name``, ``schedule`` (None: the stock forward, no hooks), its runs' seconds,
    ``ratios`` to the stock run of the same round, each run's milliseconds per step (``step_ms``), the last
    run's latents and engine stats; ``options``: keyword arguments of :func:`~.apply.apply_schedule` (``fold``,
    ``stack``)."""

    name: str
    schedule: Schedule | None
    seconds: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    step_ms: list[list[float]] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    latents: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)


def _computes_all(schedule: Schedule, step: int) -> bool:
    """Whether ``step`` of ``schedule`` computes every unit of every block (a refresh)."""
    if schedule.is_sync(step):
        return True
    return all(r.attn.mode == "always" and r.moe.mode == "always" and r.shared.mode == "always"
               and all(e.mode == "always" for e in r.experts) for r in schedule.steps[step].blocks)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
"""Clocks a run can be timed by: wall-clock, or the process's CPU time (one thread on a CPU shared with other
jobs: leaves out the time others hold the core, not their share of caches and memory bandwidth)."""


def run_variant(transformer, variant: Variant, sampler: FlowSampler, noise: torch.Tensor, cond: TextConditioning,
                uncond: TextConditioning, dispatch: str = "auto", clock: str = "wall") -> float:
    """One sampling call of ``variant``; returns its seconds by ``clock`` (:data:`CLOCKS`; hooks attached
    outside the timing)."""
    device = next(transformer.parameters()).device
    handle = apply_schedule(transformer, variant.schedule, dispatch=dispatch, check_weights=False, **variant.options) \
        if variant.schedule is not None else None
    try:
        now = CLOCKS[clock]
        marks: list[float] = []

        def on_step(_step: int) -> None:
            _sync(device)
            marks.append(now())

        _sync(device)
        start = now()
        latents = sample(transformer, sampler, noise, cond, uncond, on_step=on_step)
        _sync(device)
        seconds = now() - start
        edges = [start, *marks]
        variant.step_ms.append([1e3 * (b - a) for a, b in zip(edges, edges[1:])])
        variant.latents = latents
        if handle is not None:
            variant.stats = handle.stats()
    finally:
        if handle is not None:
            handle.remove()
    return seconds


def compare(transformer, variants: list[Variant], sampler: FlowSampler, noise: torch.Tensor,
            cond: TextConditioning, uncond: TextConditioning, *, repeats: int, dispatch: str = "auto",
            progress=None, clock: str = "wall") -> list[dict]:
    """Time ``variants`` interleaved (the first must be the stock one, ``schedule=None``); rows per variant:
    ``ms_step`` (median), ``speed`` (median ratio to stock), ``flops_ratio``, ``speed_over_flops``,
    ``max_abs_diff``, ``rel_l2`` and ``psnr_db`` of the latents vs stock, ``cache_mb``, and the median
    milliseconds of a refresh step (``refresh_ms``: a step that computes everything; every step of the stock
    and full-compute runs) and of a forecast step (``forecast_ms``). ``clock``: ``wall``
    or ``cpu`` (:data:`CLOCKS`)."""
    if clock not in CLOCKS:
        raise ValueError(f"clock {clock!r} is not one of {', '.join(CLOCKS)}")
    if not variants or variants[0].schedule is not None:
        raise ValueError("compare: the first variant must be the stock forward (schedule None)")
    for v in variants:                                    # warm-up, and the latents to compare
        run_variant(transformer, v, sampler, noise, cond, uncond, dispatch, clock)
    for r in range(repeats):
        stock = None
        for v in variants:
            s = run_variant(transformer, v, sampler, noise, cond, uncond, dispatch, clock)
            v.seconds.append(s)
            stock = s if v.schedule is None else stock
            v.ratios.append(stock / s)
        if progress is not None:
            progress(r, variants)
    ref = variants[0].latents.float()
    peak = float(ref.abs().max())
    rows = []
    for v in variants:
        diff = v.latents.float() - ref
        mse = float(diff.pow(2).mean())
        flops = v.stats.get("flops_ratio", 1.0)
        speed = statistics.median(v.ratios)
        timed = v.step_ms[-len(v.seconds):] if v.seconds else []
        sync = set(range(sampler.num_steps)) if v.schedule is None else \
            {i for i in range(sampler.num_steps) if _computes_all(v.schedule, i)}

        def steps_ms(refresh: bool) -> float:
            per_run = [statistics.median(ms[s] for s in range(len(ms)) if (s in sync) == refresh)
                       for ms in timed if any((s in sync) == refresh for s in range(len(ms)))]
            return statistics.median(per_run) if per_run else math.nan
        rows.append({"variant": v.name, "refresh_ms": steps_ms(True), "forecast_ms": steps_ms(False), "ms_step": 1000 * statistics.median(v.seconds) / sampler.num_steps,
                     "speed": speed, "flops_ratio": flops, "speed_over_flops": speed / flops,
                     "max_abs_diff": float(diff.abs().max()), "rel_l2": float(diff.norm() / (ref.norm() + 1e-12)),
                     "psnr_db": math.inf if mse == 0 else 10 * math.log10(peak * peak / mse),
                     "pairs_computed": v.stats.get("pairs_computed"), "pairs_routed": v.stats.get("pairs_routed"),
                     "cache_mb": v.stats.get("cache_bytes", 0) / 2**20, "repeats": len(v.seconds)})
    return rows
