"""Run a schedule on a model from the Replay page: full vs cached samples from the same noise.

Measures, in the same process and with the conventions of :func:`moeca.replay.driver.replay_compare`
(optionally one untimed warm-up run of each variant, then ``repeats`` alternating timed runs; the
samples of the first run of each variant are the ones compared): wall-clock seconds of full compute and of the replay (medians), their ratio (speedup), PSNR and
SSIM of each cached sample against its full-compute twin, class accuracy of both sets with the shipped
digits classifier (demo model), the FLOPs ratio actually computed (replay counters) and the peak cache
memory. Unlike the driver it reports progress through a callback, for the page's progress bar.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np


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
    medians; psnr ``[N]`` dB (capped at 100); accuracies in [0, 1] or None without a classifier."""

    full: np.ndarray
    cached: np.ndarray
    labels: np.ndarray
    full_seconds: float
    cached_seconds: float
    psnr: np.ndarray
    ssim_mean: float
    accuracy_full: float | None
    accuracy_cached: float | None
    flops_ratio: float
    reuse: dict
    cache_bytes: int
    device: str

    @property
    def speedup(self) -> float:
        return self.full_seconds / self.cached_seconds if self.cached_seconds > 0 else float("nan")


def grid(images: np.ndarray, columns: int = 8, scale: int = 12) -> np.ndarray:
    """``[N, C, H, W]`` images in [-1, 1] -> a uint8 RGB picture (``models.card.image_grid``)."""
    import torch

    from moeca.models.card import image_grid
    return image_grid(torch.from_numpy(np.asarray(images, dtype=np.float32)), nrow=columns, scale=scale)


def replay_unavailable() -> str | None:
    """None when the replay runtime can be imported, else a message saying what is missing."""
    try:
        import moeca.replay.runtime  # noqa: F401
    except ImportError as exc:
        return (f"The replay runtime (moeca.replay) is not available in this installation ({exc}). "
                "Install moeca with its replay stage to run schedules from the app.")
    return None


def sampler_for(schedule, cfg_scale: float):
    """The :class:`SamplerConfig` a schedule was derived for (kind, steps, CFG mode) with ``cfg_scale``."""
    from moeca.models.samplers import SamplerConfig
    s = schedule.sampler
    return SamplerConfig(kind=s.kind, num_steps=s.num_steps, cfg_scale=cfg_scale if s.guided else 1.0,
                         cfg_mode=s.cfg_mode)


def run_replay(model, schedule, settings: ReplaySettings, on_step: Callable[[int, int], None] | None = None,
               classifier=None) -> ReplayOutcome:
    """Sample ``settings.samples`` images with full compute and with ``schedule``; see the module docstring.

    ``on_step(done, total)`` reports progress over all timed runs. Raises ``ScheduleMismatch`` (a
    ValueError naming the field) when the schedule was derived for another model or sampler.
    """
    import torch

    from moeca.models.checkpoint import weights_hash
    from moeca.models.metrics import psnr, ssim
    from moeca.models.samplers import sample
    from moeca.policy.cost import UnitCosts
    from moeca.replay.runtime import ReplayRuntime

    sampler_cfg = sampler_for(schedule, settings.cfg_scale)
    schedule.check_compatible(model.config, sampler_cfg,
                              weights_hash(model) if schedule.model.weights_hash else None)
    device = next(model.parameters()).device
    labels = torch.arange(settings.samples, device=device) % model.config.num_classes
    total = 2 * (settings.repeats + int(settings.warmup)) * sampler_cfg.num_steps
    done = [0]

    def tick(_step: int) -> None:
        done[0] += 1
        if on_step:
            on_step(done[0], total)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    runtimes = []

    def run_full():
        return sample(model, sampler_cfg, labels, seed=settings.seed, on_step=tick)

    def run_cached():
        runtimes.append(ReplayRuntime(schedule))
        with model.use_runtime(runtimes[-1]):
            return sample(model, sampler_cfg, labels, seed=settings.seed, on_step=tick)

    def timed(fn) -> tuple[float, torch.Tensor]:
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - start, out

    outputs: dict[str, torch.Tensor] = {}
    if settings.warmup:
        outputs["full"], outputs["cached"] = run_full(), run_cached()
    full_times, cached_times = [], []
    for _ in range(settings.repeats):
        t, out = timed(run_full)
        full_times.append(t)
        outputs.setdefault("full", out)
        t, out = timed(run_cached)
        cached_times.append(t)
        outputs.setdefault("cached", out)
    full, cached = outputs["full"], outputs["cached"]
    runtime = runtimes[-1]
    done_flops, full_flops = runtime.counters.flops(UnitCosts.of(model.config))
    acc_full = acc_cached = None
    if classifier is not None:
        acc_full = float((classifier.predict(full.float().cpu()) == labels.cpu()).float().mean())
        acc_cached = float((classifier.predict(cached.float().cpu()) == labels.cpu()).float().mean())
    return ReplayOutcome(
        full=full.float().cpu().numpy(), cached=cached.float().cpu().numpy(), labels=labels.cpu().numpy(),
        full_seconds=statistics.median(full_times), cached_seconds=statistics.median(cached_times),
        psnr=psnr(cached.float().cpu(), full.float().cpu(), max_db=100.0).numpy(),
        ssim_mean=float(ssim(cached.float().cpu(), full.float().cpu()).mean()),
        accuracy_full=acc_full, accuracy_cached=acc_cached,
        flops_ratio=done_flops / full_flops if full_flops else float("nan"),
        reuse={k: float(v) for k, v in runtime.counters.reuse_fractions().items()},
        cache_bytes=int(runtime.peak_cache_bytes), device=str(device))
