"""Wall-clock calibration of the HiDream engine: ``moeca schedule derive --target-speedup X`` on a HiDream trace.

The native calibration (:mod:`moeca.replay.calibrate`) times moeca's own model under ten calibration
schedules and fits the unit costs of :class:`~moeca.policy.wallclock.WallClockCosts`; this does the same for
a HiDream transformer under the HiDream engine (:class:`~.engine.ScheduleEngine`): the same ten schedules
(every step full, with and without a forecast history; branch-level forecast steps, linear and plain, every
5th and every 2nd step full; only attention, only the shared expert or only the routed experts recomputed
between full steps; token-level forecast steps, the stack sum folded after the second refresh, every 5th
and every 3rd step full), each step timed (median of ``repeats`` interleaved runs after a warm-up), what each
forward executed counted by the engine (:class:`~.engine.ForwardWork`), and the same non-negative least
squares fit (:func:`moeca.replay.calibrate.fit_costs`). Whether the token-level runs folded their forecast
steps (the engine folds only while the gates move linearly) is recorded as ``token_folds``, so a derivation
prices those steps as they will run. The speedup reference (``full_step_ms``) is the stock
diffusers forward, which ``moeca replay --diffusers`` and ``moeca bench diffusers`` measure against.

A HiDream block's rows are ``N_b = B * T_b`` (the tokens its MoE sees: image tokens in a double-stream block,
image and text tokens in a single-stream one), so ``rows_per_block`` is their mean over the blocks.

Calibrations are cached with the native ones (one file, :func:`moeca.policy.wallclock.cache_path`) under a key
naming the device, torch, a hash of this engine's sources, the cost model, the transformer's identity and
weights, batch, dtype, sampler, CFG, tokens and CPU threads (:func:`calibration_key`).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

import moeca.models.dispatch as dispatch
import moeca.policy.wallclock as wallclock
import moeca.replay.calibrate as native
import moeca.replay.forecast as forecast
import moeca.replay.state as state
import moeca.replay.units.stack as stack
from moeca.policy.schedule import Schedule
from moeca.policy.wallclock import StepWork, WallClockCosts
from moeca.replay.calibrate import (DIRECT, MAX_FIT_ERROR, bookkeeping_ms, calibration_plan, device_name,
                                    ensure_measured, fit_costs, new_pair_blocks, sources_hash)

from .apply import apply_schedule, none_schedule
from .engine import ForwardWork
from .hidream import identity_name, moe_blocks, weights_hash
from .sampling import (FlowSampler, TextConditioning, build_transformer, initial_noise, load_transformer,
                       random_conditioning, sample)

CALIBRATION_STEPS = 10
CALIBRATION_REPEATS = 3
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass(frozen=True)
class Setting:
    """What a calibration is for: ``batch`` samples per sampling call (CFG doubles the rows when
    ``cfg_scale > 1``), ``latent_size`` (H, W of the latents) and ``text_lengths`` (T5, Llama tokens)."""

    batch: int
    latent_size: tuple[int, int]
    text_lengths: tuple[int, int]
    cfg_scale: float = 5.0

    def __post_init__(self) -> None:
        if self.batch < 1 or min(self.latent_size) < 1 or min(self.text_lengths) < 1:
            raise ValueError(f"a HiDream calibration needs batch >= 1, latents and text tokens >= 1; got {self}")

    @property
    def guided(self) -> bool:
        return self.cfg_scale > 1.0


def _files_hash(paths: list[Path]) -> str:
    """:func:`moeca.replay.calibrate.sources_hash` of ``paths`` in path order, each named by its file name."""
    return sources_hash([(p.name, p) for p in sorted(paths)])


def engine_hash() -> str:
    """Hash of what runs while a schedule replays on HiDream: this integration's engine, caches and hooks, and
    the native forecast, stack and dispatch code it shares (any change recalibrates)."""
    here = Path(__file__).parent
    own = [here / n for n in ("engine.py", "cache.py", "hooks.py", "hidream.py", "apply.py", "sampling.py")]
    return _files_hash(own + [Path(m.__file__) for m in (dispatch, forecast, state, stack)])


def cost_model_hash() -> str:
    """Hash of the cost model, the fit and this measurement."""
    return _files_hash([Path(wallclock.__file__), Path(native.__file__), Path(__file__)])


def calibration_key(transformer: torch.nn.Module, setting: Setting, clock: str = "wall") -> dict[str, str]:
    """The fields a HiDream calibration is valid for (all strings; ``clock``: what timed it, :data:`CLOCKS`)."""
    p = next(transformer.parameters())
    patch = int(transformer.config.patch_size)
    image = (setting.latent_size[0] // patch) * (setting.latent_size[1] // patch)
    return {"device": device_name(p.device), "torch": torch.__version__, "engine": engine_hash(),
            "cost_model": cost_model_hash(), "weights": weights_hash(transformer), "model": identity_name(transformer),
            "batch": str(setting.batch), "dtype": str(p.dtype).replace("torch.", ""), "sampler": "rectified_flow",
            "cfg_mode": "batched" if setting.guided else "none",
            "tokens": f"{image} image + {setting.text_lengths[0]}/{setting.text_lengths[1]} text",
            "threads": str(torch.get_num_threads()) if p.device.type == "cpu" else "-", "clock": clock}


def calibration_schedules(transformer: torch.nn.Module, num_steps: int, max_tokens: int,
                          cfg_scale: float = 5.0) -> list[Schedule]:
    """The ten calibration schedules of the native plan (:func:`moeca.replay.calibrate.calibration_plan`; the
    HiDream engine has no routing-aware step), for this transformer and step count."""
    base = none_schedule(transformer, num_steps, max_tokens=max_tokens, cfg_scale=cfg_scale)
    return calibration_plan(base.model, base.sampler, num_steps, routing=False)


TOKEN_SCHEDULES = (8, 9)
"""Indices of :func:`calibration_schedules`' token-level schedules (every 5th and every 3rd step full)."""


def step_work(work: ForwardWork, order: int, new_pairs_only: bool = False) -> StepWork:
    """One forward's :class:`~.engine.ForwardWork` as the cost model's :class:`StepWork`; ``new_pairs_only``: its
    blocks computed only newly routed pairs (a branch-level forecast step), which are then its ``new_pairs``."""
    new = work.pairs if new_pairs_only else 0.0
    return StepWork(attn=work.attn, shared=work.shared, pairs=work.pairs - new, reused=work.reused, order=order,
                    routed_blocks=work.routed_blocks, stack_terms=work.stack_terms, pushed=work.pushed, new_pairs=new)


def timed_steps(transformer: torch.nn.Module, schedule: Schedule | None, sampler: FlowSampler, noise: torch.Tensor,
                cond: TextConditioning, uncond: TextConditioning, clock: str = "wall",
                **options) -> tuple[list[float], list[StepWork] | None]:
    """Milliseconds of each sampling step of one run (``schedule`` None: the stock forward; the device
    synchronised at every step) and, under a schedule, what each step executed. ``options``: keyword
    arguments of :func:`~.apply.apply_schedule` (``fold_tolerance``, ...)."""
    device = next(transformer.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    now = CLOCKS[clock]
    handle = (apply_schedule(transformer, schedule, check_weights=False, record=True, **options)
              if schedule is not None else None)
    marks: list[float] = []

    def on_step(_step: int) -> None:
        sync()
        marks.append(now())

    try:
        sync()
        start = now()
        sample(transformer, sampler, noise, cond, uncond, on_step=on_step)
    finally:
        if handle is not None:
            handle.remove()
    edges = [start, *marks]
    ms = [1e3 * (b - a) for a, b in zip(edges, edges[1:])]
    if handle is None:
        return ms, None
    work = handle.counters.work
    if len(work) != len(ms):
        raise RuntimeError(f"the HiDream engine recorded {len(work)} forwards for {len(ms)} steps: one a step expected")
    new = new_pair_blocks(schedule, schedule.model.depth).any(axis=1)
    works = [step_work(w, schedule.forecast_degree, bool(n)) for w, n in zip(work, new)]
    return ms, works


def measure_costs(transformer: torch.nn.Module, setting: Setting, *, steps: int = CALIBRATION_STEPS,
                  repeats: int = CALIBRATION_REPEATS, clock: str = "wall", seed: int = 0,
                  progress: Callable[[str], None] | None = None) -> WallClockCosts:
    """Calibrate the HiDream engine's unit costs on ``transformer`` for ``setting`` (random noise and text of
    the setting's shapes: the costs depend on shapes, not values)."""
    if steps < 4 or repeats < 1:
        raise ValueError(f"calibration needs steps >= 4 and repeats >= 1 (got {steps}, {repeats})")
    if clock not in CLOCKS:
        raise ValueError(f"clock {clock!r} is not one of {', '.join(CLOCKS)}")
    say = progress or (lambda _msg: None)
    p = next(transformer.parameters())
    config = {"caption_channels": list(transformer.config.caption_channels),
              "llama_layers": list(transformer.config.llama_layers), "text_emb_dim": transformer.config.text_emb_dim}
    cond, uncond = random_conditioning(config, setting.batch, seed=seed, lengths=setting.text_lengths)
    noise = initial_noise((int(transformer.config.in_channels), *setting.latent_size),
                          [seed + i for i in range(setting.batch)])
    sampler = FlowSampler(num_steps=steps, cfg_scale=setting.cfg_scale)
    patch = int(transformer.config.patch_size)
    image = (setting.latent_size[0] // patch) * (setting.latent_size[1] // patch)
    schedules = calibration_schedules(transformer, steps, image + cond.tokens, setting.cfg_scale)
    times: dict[int, list[list[float]]] = {i: [] for i in range(-1, len(schedules))}
    works: dict[int, list[StepWork]] = {}
    for r in range(repeats + 1):   # round 0 is the warm-up
        say(f"calibrating HiDream: round {r + 1} of {repeats + 1} ({len(schedules) + 1} runs of {steps} steps, "
            f"batch {setting.batch})")
        for i in range(-1, len(schedules)):
            ms, w = timed_steps(transformer, None if i < 0 else schedules[i], sampler, noise, cond, uncond, clock)
            if r:
                times[i].append(ms)
            if w is not None:
                works[i] = w
    rows_per_block = max(1, round(_rows(transformer, setting) / len(moe_blocks(transformer))))
    fixed = dict(zip(DIRECT, bookkeeping_ms(rows_per_block, int(transformer.inner_dim), p.device)))
    costs = fit_costs(times, works, fixed, rows_per_block=rows_per_block,
                      top_k=int(transformer.config.num_activated_experts),
                      key=calibration_key(transformer, setting, clock))
    # whether the token-level calibration runs folded their forecast steps (the engine's gate check)
    folded = any(w.stack_terms > 0 and w.attn == 0 and w.reused == 0 for i in TOKEN_SCHEDULES for w in works[i])
    return replace(costs, token_folds=folded)


def _rows(transformer: torch.nn.Module, setting: Setting) -> int:
    """Rows of every block summed (``N_b = B * T_b``, CFG rows included)."""
    patch = int(transformer.config.patch_size)
    image = (setting.latent_size[0] // patch) * (setting.latent_size[1] // patch)
    text = setting.text_lengths[0] + 2 * setting.text_lengths[1]
    B = setting.batch * (2 if setting.guided else 1)
    return sum(B * (image if b.kind == "double" else image + text) for b in moe_blocks(transformer))


def ensure_costs(transformer: torch.nn.Module, setting: Setting, *, recalibrate: bool = False,
                 cache: Path | None = None, progress: Callable[[str], None] | None = print,
                 max_fit_error: float = MAX_FIT_ERROR, **measure) -> WallClockCosts:
    """The cached HiDream calibration of this key, measured (and cached) first when there is none, when
    ``recalibrate`` or when the cached one fits worse than ``max_fit_error`` (the native rule:
    :func:`moeca.replay.calibrate.ensure_measured`)."""
    return ensure_measured(calibration_key(transformer, setting, measure.get("clock", "wall")), setting.batch,
                           lambda: measure_costs(transformer, setting, progress=progress, **measure),
                           recalibrate=recalibrate, cache=cache, progress=progress, max_fit_error=max_fit_error)


def setting_of_trace(meta: dict, batch: int) -> Setting:
    """The :class:`Setting` of a replay of a HiDream trace's model and sampler at ``batch`` samples: its latent
    size and text lengths (read from ``run.json``; a trace written before they were recorded: a square latent
    and the text split into T5 + 2 Llama parts of its token count)."""
    lay = meta["model"].get("layout") or {}
    patch = int(meta["model"]["diffusers"]["config"]["patch_size"])
    latent = lay.get("latent_size")
    if latent is None:
        side = math.isqrt(int(lay["image_tokens"])) * patch
        latent = (side, side)
    text = lay.get("text_lengths")
    if text is None:
        t = int(lay["text_tokens"])
        text = (t - 2 * (t // 3), t // 3)
    return Setting(batch=batch, latent_size=(int(latent[0]), int(latent[1])), text_lengths=(int(text[0]), int(text[1])),
                   cfg_scale=float(meta["sampler"].get("cfg_scale", 5.0)))


def transformer_of_trace(meta: dict, path: "str | os.PathLike | None" = None, device: str = "auto"):
    """The traced transformer, rebuilt: a named random config (``config:NAME`` with its ``model_seed``) or a
    local ``from_pretrained`` folder (the trace's, or ``path``), checked against the trace's weights hash."""
    model = meta["model"]
    source = str(path or model.get("checkpoint") or "")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device)
    dtype = getattr(torch, model.get("dtype", "float32"))
    if source.startswith("config:") and path is None:
        transformer = build_transformer(source.split(":", 1)[1], seed=int(model.get("model_seed", 0)), device=dev,
                                        dtype=dtype)
    else:
        transformer = load_transformer(source, device=dev, dtype=dtype)
    ours = weights_hash(transformer)
    if model.get("weights_hash") not in (None, ours):
        raise ValueError(f"the trace's transformer ({source}) has weights {model['weights_hash']} but the one rebuilt "
                         f"here hashes to {ours}; pass --checkpoint with the traced transformer's folder")
    return transformer
