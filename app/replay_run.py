"""Run a schedule on a model from the Replay page: full vs cached samples from the same noise.

A thin adapter over :func:`moeca.replay.driver.replay_compare` (the same measurement as ``moeca
replay``): wall-clock medians of full compute and of the replay, PSNR and SSIM of each cached sample
against its full-compute twin, class accuracy of both sets with the shipped digits classifier (demo
model), the FLOPs ratio actually computed and the peak cache memory, as numpy arrays for the page,
with progress reported through the driver's ``on_step`` callback.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from moeca.app.inventory import load_small_json
from moeca.app.paths import is_within, resolve_under
from moeca.diffusion.samplers import SamplerConfig
from moeca.evaluation.grid import label_grid
from moeca.evaluation.metrics import psnr, ssim
from moeca.replay.driver import is_digits_demo, replay_compare


@dataclass(frozen=True)
class ReplaySettings:
    """samples: images per run (labels cycle over the classes); seed: noise seed; cfg_scale: guidance
    scale; repeats: timed runs of each variant (the median is reported); warmup: one untimed run of each
    variant first (steadier timings, twice the work for ``repeats=1``)."""

    samples: int = 8
    seed: int = 0
    cfg_scale: float = 1.5
    repeats: int = 1
    warmup: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.samples <= 256:
            raise ValueError(f"samples must be in 1..256, got {self.samples}")
        if not 1 <= self.repeats <= 10:
            raise ValueError(f"repeats must be in 1..10, got {self.repeats}")


@dataclass(frozen=True)
class ReplayOutcome:
    """full, cached: images ``[N, C, H, W]`` in [-1, 1] (float32 numpy); labels ``[N]``; seconds are
    medians; speedup the replay report's (the median of the back-to-back full/cached ratios); psnr ``[N]`` dB (capped at 100); accuracies in [0, 1] or None without a classifier."""

    full: np.ndarray
    cached: np.ndarray
    labels: np.ndarray
    full_seconds: float
    cached_seconds: float
    speedup: float
    psnr: np.ndarray
    ssim_mean: float
    accuracy_full: float | None
    accuracy_cached: float | None
    flops_ratio: float
    reuse: dict
    cache_bytes: int
    device: str


def grid(images: np.ndarray, labels: np.ndarray | None = None, columns: int = 8, scale: int | None = None) -> np.ndarray:
    """``[N, C, H, W]`` images in [-1, 1] -> a uint8 RGB picture, each image upscaled (None: 64-pixel cells)
    and captioned with its label ``[N]`` when given (``models.grid.label_grid``)."""
    return label_grid(images, labels, columns=columns, scale=scale)


def sampler_for(schedule, cfg_scale: float):
    """The :class:`SamplerConfig` a schedule was derived for (kind, steps, CFG mode) with ``cfg_scale``."""
    s = schedule.sampler
    return SamplerConfig(kind=s.kind, num_steps=s.num_steps, cfg_scale=cfg_scale if s.guided else 1.0,
                         cfg_mode=s.cfg_mode)


def run_replay(model, schedule, settings: ReplaySettings, on_step: Callable[[int, int], None] | None = None,
               classifier=None) -> ReplayOutcome:
    """Sample ``settings.samples`` images with full compute and with ``schedule``; see the module docstring.

    ``on_step(done, total)`` reports progress over all timed runs. Raises ``ScheduleMismatch`` (a
    ValueError naming the field) when the schedule was derived for another model or sampler.
    """
    sampler_cfg = sampler_for(schedule, settings.cfg_scale)
    device = next(model.parameters()).device
    labels = torch.arange(settings.samples) % model.config.num_classes
    result = replay_compare(model, schedule, sampler_cfg, labels, seed=settings.seed, repeats=settings.repeats,
                            warmup=settings.warmup, progress=False, on_step=on_step)
    report, full, cached = result.report, result.full.float(), result.cached.float()
    acc_full = acc_cached = None
    if classifier is not None and is_digits_demo(model.config):     # the digits classifier scores 1x8x8 digits
        acc_full = float((classifier.predict(full) == labels).float().mean())
        acc_cached = float((classifier.predict(cached) == labels).float().mean())
    return ReplayOutcome(
        full=full.numpy(), cached=cached.numpy(), labels=labels.numpy(),
        full_seconds=report.time_full_s, cached_seconds=report.time_cached_s, speedup=report.speedup,
        psnr=psnr(cached, full, max_db=100.0).numpy(), ssim_mean=float(ssim(cached, full).mean()),
        accuracy_full=acc_full, accuracy_cached=acc_cached, flops_ratio=report.flops_ratio,
        reuse=dict(report.reuse), cache_bytes=report.cache_bytes, device=str(device))


def schedule_checkpoint(root: Path, schedule) -> str | None:
    """The root-relative path of the moeca-written weights a schedule was derived for, found through its
    provenance (the traces it was derived from, whose run.json field ``model.checkpoint`` names the weights);
    None when no trace under the root names weights under the root. Every path goes through the root guard."""
    for trace in schedule.provenance.get("traces") or []:
        if not isinstance(trace, str):
            continue
        where = Path(trace)
        rel = where.relative_to(root).as_posix() if where.is_absolute() and is_within(root, where) else trace
        try:
            meta = load_small_json(resolve_under(root, f"{rel}/run.json"), f"{rel}/run.json")
            checkpoint = Path(meta["model"]["checkpoint"])
            if is_within(root, checkpoint.resolve()):
                found = checkpoint.resolve().relative_to(root).as_posix()
                resolve_under(root, found)
                return found
        except (ValueError, OSError, KeyError, TypeError):
            continue
    return None
