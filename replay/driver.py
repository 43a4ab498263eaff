"""Replay a schedule against full compute and measure it (DESIGN section 5).

:func:`replay_compare` samples the same labels from the same noise with the default runtime (full
compute) and with a :class:`~moeca.replay.runtime.ReplayRuntime`, alternating the two for
``repeats`` timed runs after one warm-up each, in the same process. It reports the wall-clock speedup
as the median of the per-pair ratios ``full_i / cached_i`` (each pair timed back to back, so a slow spell
of a shared machine slows both sides of a pair: a far steadier figure than the ratio of the two medians),
FLOPs computed vs full (analytic, from the rows actually executed), the peak cache memory,
PSNR/SSIM/relative L2 of the cached samples against the full ones, and -- on the digits demo model --
class accuracy and Frechet distance of both sample sets. :func:`write_replay_outputs` writes the
PNG grids, tensors and report.json / report.md.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from moeca.common.outputs import output_dir
from moeca.diffusion.samplers import SamplerConfig, sample
from moeca.evaluation.card import save_png
from moeca.evaluation.evaluator import DigitsClassifier, evaluate_samples
from moeca.evaluation.grid import label_grid
from moeca.evaluation.metrics import mean_finite, psnr, relative_l2, ssim
from moeca.models.checkpoint import weights_hash
from moeca.models.compile import compile_model
from moeca.policy.cost import UnitCosts
from moeca.policy.schedule import Schedule

from .runtime import ReplayRuntime


@dataclass(frozen=True)
class ReplayReport:
    """Measured outcome of one schedule against full compute. Times in seconds per sampling call;
    ``time_full_s`` / ``time_cached_s`` their medians, ``speedup`` the median of the per-pair ratios
    ``times_full_s[i] / times_cached_s[i]`` (see the module docstring), ``speedup_range`` their
    (min, max); ``load_average``: the highest 1-minute load average seen while timing;
    ``timing_warnings``: why the speedup should not be trusted (:func:`timing_warnings`), empty when none."""

    method: str
    model: str
    sampler: dict
    num_samples: int
    repeats: int
    seed: int
    threads: int
    device: str
    time_full_s: float
    time_cached_s: float
    speedup: float
    times_full_s: tuple[float, ...]
    times_cached_s: tuple[float, ...]
    flops_full: float
    flops_computed: float
    flops_ratio: float
    flops_speedup: float
    predicted_flops_ratio: float | None
    reuse: dict
    cache_bytes: int
    activation_bytes_step: int
    psnr_mean: float
    psnr_min: float
    ssim_mean: float
    rel_l2_mean: float
    quality_samples: int = 0
    psnr_quality_mean: float | None = None
    ssim_quality_mean: float | None = None
    accuracy_full: float | None = None
    accuracy_cached: float | None = None
    fd_full: float | None = None
    fd_cached: float | None = None
    fd_floor: float | None = None
    counters: dict = field(default_factory=dict)
    speedup_range: tuple[float, float] | None = None
    load_average: float | None = None
    timing_warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)

    def to_markdown(self) -> str:
        def f(v, fmt=".3f"):
            return "n/a" if v is None else format(v, fmt)
        lines = [
            f"# Replay report: {self.method} on {self.model}", "",
            f"Sampler: {self.sampler.get('kind')} {self.sampler.get('num_steps')} steps, CFG "
            f"{self.sampler.get('cfg_scale')} ({self.sampler.get('cfg_mode')}); {self.num_samples} samples per "
            f"timed call, {self.repeats} repeats, seed {self.seed}, {self.threads} threads on {self.device}.", "",
            "| measure | full compute | cached |", "|---|---|---|",
            f"| wall-clock per call (median, s) | {self.time_full_s:.3f} | {self.time_cached_s:.3f} |",
            f"| **speedup** (measured) | 1.00x | **{self.speedup:.2f}x**{self._spread()} |",
            f"| FLOPs (analytic, from executed rows) | {self.flops_full:.3g} | {self.flops_computed:.3g} "
            f"({self.flops_ratio:.3f} of full, {self.flops_speedup:.2f}x) |",
            f"| predicted FLOPs ratio (schedule) | | {f(self.predicted_flops_ratio)} |",
            f"| cache memory (peak bytes) | | {self.cache_bytes:,} |",
            f"| activation memory of one full step (bytes) | {self.activation_bytes_step:,} | |",
            f"| PSNR vs full (dB, mean / min, {self.num_samples} samples) | | {self.psnr_mean:.2f} / "
            f"{self.psnr_min:.2f} |",
            f"| SSIM vs full (mean) | | {self.ssim_mean:.4f} |",
            f"| relative L2 vs full (mean) | | {self.rel_l2_mean:.4f} |",
        ]
        if self.quality_samples:
            lines += [
                f"| PSNR / SSIM vs full ({self.quality_samples} quality samples) | | "
                f"{f(self.psnr_quality_mean, '.2f')} / {f(self.ssim_quality_mean, '.4f')} |"]
        if self.accuracy_full is not None:
            lines += [
                f"| class accuracy ({self.quality_samples} samples) | {self.accuracy_full:.4f} | "
                f"{self.accuracy_cached:.4f} |",
                f"| Frechet distance to real digits (floor {f(self.fd_floor)}) | {self.fd_full:.3f} | "
                f"{self.fd_cached:.3f} ({self.fd_cached / self.fd_full:.3f}x) |"]
        lines += [""] + [f"**Warning:** {w}" for w in self.timing_warnings] if self.timing_warnings else []
        r = self.reuse
        lines += ["", f"Reused rows: attention {r.get('attn', 0):.1%}, shared expert {r.get('shared', 0):.1%}, "
                      f"routed (token, expert) pairs {r.get('expert', 0):.1%}."]
        return "\n".join(lines) + "\n"


    def _spread(self) -> str:
        lo_hi = self.speedup_range
        mark = " (unreliable, see the warning)" if self.timing_warnings else ""
        return "" if lo_hi is None or self.repeats < 2 else f" (pairs {lo_hi[0]:.2f}x..{lo_hi[1]:.2f}x){mark}"


@dataclass
class ReplayResult:
    """A report plus the sample tensors it was measured on (``[B, C, H, W]``, CPU).

    Both runtimes sample under ``torch.inference_mode`` (the tensors are inference tensors)."""

    report: ReplayReport
    labels: torch.Tensor
    full: torch.Tensor
    cached: torch.Tensor
    quality_labels: torch.Tensor | None = None
    quality_full: torch.Tensor | None = None
    quality_cached: torch.Tensor | None = None


def pair_ratios(full: Sequence[float], cached: Sequence[float]) -> list[float]:
    """The per-pair speedups ``full[i] / cached[i]`` of runs timed back to back."""
    return [f / c for f, c in zip(full, cached)]


def median_ratio(full: Sequence[float], cached: Sequence[float]) -> float:
    """The median of the per-pair ratios ``full[i] / cached[i]`` of runs timed back to back (the module
    docstring's estimator of a speedup)."""
    return statistics.median(pair_ratios(full, cached))


PAIR_SPREAD_WARN = 1.5
"""Largest/smallest per-pair speedup above which the pairs are said to disagree."""
FLOPS_MARGIN_WARN = 1.5
"""A measured speedup more than this many times the FLOPs speedup is implausible (the full runs were slowed)."""


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def timing_warnings(ratios: Sequence[float], flops_speedup: float, load: float | None,
                    cores: int | None = None) -> list[str]:
    """Why a measured speedup (the median of ``ratios``, the per-pair speedups) should not be trusted: the pairs
    disagree widely (largest / smallest > :data:`PAIR_SPREAD_WARN`), the load average exceeded the core count,
    or the speedup exceeds ``flops_speedup`` (what the executed FLOPs allow) by more than
    :data:`FLOPS_MARGIN_WARN` x. Empty when none applies."""
    cores = cores or os.cpu_count() or 1
    speedup = statistics.median(ratios)
    out = []
    if len(ratios) > 1 and max(ratios) > PAIR_SPREAD_WARN * min(ratios):
        out.append(f"the back-to-back pairs disagree: per-pair speedups {min(ratios):.2f}x..{max(ratios):.2f}x "
                   f"(spread {max(ratios) / min(ratios):.2f}x); the machine's speed changed while timing")
    if load is not None and load > cores:
        out.append(f"the load average was {load:.1f} on {cores} cores while timing: other processes competed for "
                   "the CPU")
    if speedup > FLOPS_MARGIN_WARN * flops_speedup:
        out.append(f"the measured {speedup:.2f}x exceeds what the executed FLOPs allow ({flops_speedup:.2f}x) by "
                   f"{speedup / flops_speedup:.1f}x; the full-compute runs were slowed by something else")
    if out:
        out[-1] += ". Measure again on a quiet machine (more --repeats help) before trusting this speedup"
    return out


def activation_bytes_step(config, rows: int, element_size: int = 4) -> int:
    """Bytes of the activations one full forward materialises in its blocks, for ``rows`` samples.

    Per block and token: modulated inputs (2D), qkv (3D), attention pre-projection and output (2D),
    routed experts per pair gate/up/product hidden (3 H_e) and output (D), shared expert (3 H_s + D),
    combine (D), residual updates (2D). This is the memory the computation touches per step (not the
    live peak, which is smaller because intermediates are freed).
    """
    D, T, k = config.hidden_size, config.num_tokens, config.top_k
    per_token = 2 * D + 3 * D + 2 * D + k * (3 * config.expert_hidden + D) + 3 * config.shared_hidden + D + D + 2 * D
    return int(rows * T * config.depth * per_token * element_size)


def _sync(device: torch.device) -> Callable[[], None] | None:
    return torch.cuda.synchronize if device.type == "cuda" else None


def _timed(fn: Callable[[], torch.Tensor], sync) -> tuple[float, torch.Tensor]:
    if sync:
        sync()
    start = time.perf_counter()
    out = fn()
    if sync:
        sync()
    return time.perf_counter() - start, out


def sample_batches(model, cfg: SamplerConfig, labels: torch.Tensor, seed: int, batch: int,
                   runtime: ReplayRuntime | None = None, on_step=None) -> torch.Tensor:
    """Sample ``labels`` in batches of ``batch`` (the batch starting at index ``i`` uses seed ``seed + i``); full compute when
    ``runtime`` is None; -> CPU tensor ``[len(labels), C, H, W]``. :func:`replay_compare` uses
    ``seed + 1`` for its quality samples, so ``sample_batches(model, cfg, q, seed + 1, batch)`` is the
    matching ``quality_reference``."""
    outs = []
    for i in range(0, labels.shape[0], batch):
        lab = labels[i:i + batch]
        with torch.inference_mode():
            if runtime is None:
                outs.append(sample(model, cfg, lab, seed=seed + i, on_step=on_step).cpu())
            else:
                with model.use_runtime(runtime):
                    outs.append(sample(model, cfg, lab, seed=seed + i, on_step=on_step).cpu())
    return torch.cat(outs)


def is_digits_demo(config) -> bool:
    """Whether the shipped digits classifier can score this model's samples (1x8x8, 10 classes)."""
    return config.in_channels == 1 and config.input_size == 8 and config.num_classes == 10


def replay_compare(model: torch.nn.Module, schedule: Schedule, sampler_cfg: SamplerConfig,
                   labels: Sequence[int] | torch.Tensor, seed: int = 0, repeats: int = 3, *,
                   quality_labels: Sequence[int] | torch.Tensor | None = None, quality_batch: int = 100,
                   evaluate: bool | None = None, check_weights: bool = True, progress: bool = True,
                   model_name: str | None = None, warmup: bool = True,
                   runtime_factory: Callable[[Schedule], ReplayRuntime] | None = None,
                   quality_reference: torch.Tensor | None = None,
                   on_step: Callable[[int, int], None] | None = None, compile: bool = False) -> ReplayResult:
    """Measure ``schedule`` against full compute on ``model``.

    labels: the timed batch (e.g. 16 labels); both runtimes sample it ``repeats`` times (after a
    warm-up each, alternating) from the same noise (``seed``). quality_labels: optional larger label
    set sampled once with each runtime (batches of ``quality_batch``, seeds ``seed + 1 + i``) for
    PSNR/SSIM over more samples and, on the digits demo model (``evaluate``: None = auto), class
    accuracy and Frechet distance. Raises ScheduleMismatch when the schedule was derived for another
    model, weights hash (``check_weights``) or sampler. warmup: run each runtime once untimed first
    (else the first timed runs provide the compared samples). runtime_factory: builds the replay
    runtime from the schedule (default :class:`ReplayRuntime`; baselines pass their own).
    quality_reference: full-compute samples of ``quality_labels`` computed earlier with the same
    seeds, to skip recomputing them (several schedules, one reference). on_step(done, total): progress
    over every sampling step this call runs (e.g. a UI progress bar), besides the tqdm bar. compile:
    compile ``model`` in place first (:func:`moeca.models.compile.compile_model`; once per process), so
    the warm-up runs compile and the timed runs do not (use with ``warmup``).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    config = model.config
    schedule.check_compatible(config, sampler_cfg,
                              weights_hash(model) if check_weights and schedule.model.weights_hash else None)
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    if labels.dim() != 1 or labels.numel() == 0:
        raise ValueError("labels must be a non-empty 1-D list of class indices")
    qlabels = None if quality_labels is None else torch.as_tensor(quality_labels, dtype=torch.long).cpu()
    device = next(model.parameters()).device
    sync = _sync(device)
    n_steps = sampler_cfg.num_steps
    make_rt = runtime_factory or ReplayRuntime
    if compile:
        compile_model(model)
    if quality_reference is not None and (qlabels is None or quality_reference.shape[0] != qlabels.numel()):
        raise ValueError("quality_reference must hold one full-compute sample per quality label")
    total = 2 * (repeats + int(warmup)) * n_steps
    if qlabels is not None:
        batches = math.ceil(qlabels.numel() / quality_batch)
        total += n_steps * batches * (1 if quality_reference is not None else 2)
    bar = tqdm(total=total, desc=f"replay {schedule.method}", unit="step", disable=not progress, leave=False)

    done_steps = [0]

    def tick(_step: int) -> None:
        bar.update(1)
        if on_step:
            done_steps[0] += 1
            on_step(done_steps[0], total)

    def run_full() -> torch.Tensor:
        with torch.inference_mode():
            return sample(model, sampler_cfg, labels, seed=seed, on_step=tick)

    last_rt: list[ReplayRuntime] = []

    def run_cached() -> torch.Tensor:
        rt = make_rt(schedule)
        last_rt[:] = [rt]
        with model.use_runtime(rt), torch.inference_mode():
            return sample(model, sampler_cfg, labels, seed=seed, on_step=tick)

    try:
        full = cached = None
        if warmup:                   # warm-up runs (their outputs are the compared samples)
            full = run_full().cpu()
            cached = run_cached().cpu()
        t_full, t_cached = [], []
        loads = [load_average()]
        for _ in range(repeats):
            t, out = _timed(run_full, sync)
            t_full.append(t)
            full = out.cpu() if full is None else full
            t, out = _timed(run_cached, sync)
            t_cached.append(t)
            cached = out.cpu() if cached is None else cached
        loads.append(load_average())
        rt = last_rt[0]
        q_full = q_cached = None
        if qlabels is not None:
            q_full = quality_reference.cpu() if quality_reference is not None else sample_batches(
                model, sampler_cfg, qlabels, seed + 1, quality_batch, None, tick)
            q_cached = sample_batches(model, sampler_cfg, qlabels, seed + 1, quality_batch, make_rt(schedule), tick)
    finally:
        bar.close()

    costs = UnitCosts.of(config)
    done, full_flops = rt.counters.flops(costs)
    mf, mc = statistics.median(t_full), statistics.median(t_cached)
    speedup = median_ratio(t_full, t_cached)
    ratios = pair_ratios(t_full, t_cached)
    load = max((v for v in loads if v is not None), default=None)
    warnings = timing_warnings(ratios, full_flops / done, load)
    p = psnr(cached, full, max_db=100.0)
    extra: dict = {}
    if qlabels is not None:
        extra.update(quality_samples=int(qlabels.numel()),
                     psnr_quality_mean=mean_finite(psnr(q_cached, q_full, max_db=100.0)),
                     ssim_quality_mean=float(ssim(q_cached, q_full).mean()))
        if evaluate or (evaluate is None and is_digits_demo(config)):
            clf = DigitsClassifier.load_shipped("cpu")
            ef, ec = evaluate_samples(q_full, qlabels, clf), evaluate_samples(q_cached, qlabels, clf)
            extra.update(accuracy_full=ef["accuracy"], accuracy_cached=ec["accuracy"], fd_full=ef["fd"],
                         fd_cached=ec["fd"], fd_floor=ef["fd_floor"])
    report = ReplayReport(
        method=schedule.method, model=model_name or config.name, sampler=sampler_cfg.to_dict(),
        num_samples=int(labels.numel()), repeats=repeats, seed=seed, threads=torch.get_num_threads(),
        device=str(device), time_full_s=mf, time_cached_s=mc, speedup=speedup,
        times_full_s=tuple(t_full), times_cached_s=tuple(t_cached),
        flops_full=full_flops, flops_computed=done, flops_ratio=done / full_flops, flops_speedup=full_flops / done,
        predicted_flops_ratio=schedule.predicted_flops_ratio,
        reuse={k: float(v) for k, v in rt.counters.reuse_fractions().items()},
        cache_bytes=int(rt.peak_cache_bytes),
        activation_bytes_step=activation_bytes_step(config, rows=_rows_per_step(labels.numel(), sampler_cfg),
                                                    element_size=next(model.parameters()).element_size()),
        psnr_mean=mean_finite(p), psnr_min=float(p.min()), ssim_mean=float(ssim(cached, full).mean()),
        rel_l2_mean=float(relative_l2(cached, full).mean()), counters=rt.counters.totals(),
        speedup_range=(min(ratios), max(ratios)), load_average=load, timing_warnings=tuple(warnings), **extra)
    return ReplayResult(report, labels, full, cached, qlabels, q_full, q_cached)


def _rows_per_step(samples: int, cfg: SamplerConfig) -> int:
    """Rows the model sees per step: batched CFG doubles the batch; separate CFG runs it twice."""
    return samples * (2 if cfg.guided else 1)


def write_replay_outputs(result: ReplayResult, out_dir: str | os.PathLike, schedule_path: str | None = None,
                         scale: int | None = None) -> dict[str, Path]:
    """Write ``full.png``, ``cached.png``, ``samples.pt`` (plain tensors), ``report.json``, ``report.md``.

    The PNG grids show each sample upscaled ``scale`` x (None: cells of 64 pixels) with its label below.

    The folder is built in a temporary sibling and installed with a manifest
    (:func:`moeca.common.outputs.output_dir`): an existing ``out_dir`` is replaced only where an
    earlier moeca output was; files moeca did not write are never removed.
    """
    out = Path(out_dir)
    nrow = min(8, result.full.shape[0])
    names = {"full_png": "full.png", "cached_png": "cached.png", "tensors": "samples.pt", "json": "report.json",
             "md": "report.md"}
    tensors = {"labels": result.labels, "full": result.full, "cached": result.cached}
    if result.quality_full is not None:
        tensors.update(quality_labels=result.quality_labels, quality_full=result.quality_full,
                       quality_cached=result.quality_cached)
    payload = {"schedule": schedule_path, **result.report.to_dict()}
    with output_dir(out, what="replay outputs") as tmp:
        save_png(label_grid(result.full, result.labels, columns=nrow, scale=scale), tmp / names["full_png"])
        save_png(label_grid(result.cached, result.labels, columns=nrow, scale=scale), tmp / names["cached_png"])
        torch.save(tensors, tmp / names["tensors"])
        (tmp / names["json"]).write_text(json.dumps(payload, indent=1, default=float) + "\n")
        (tmp / names["md"]).write_text(result.report.to_markdown())
    return {key: out / name for key, name in names.items()}
