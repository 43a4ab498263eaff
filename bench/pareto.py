"""``moeca bench pareto``: MoECa against step-, token- and model-level caching on one model.

Every method runs as a schedule through the same replay runtime (:mod:`moeca.policy.baselines`), on the
same model, noise and labels. The sweep varies each method's main knob (:data:`DEFAULT_GRID`) and, per
point, records:

- ``speedup``: wall-clock of full compute (default runtime) over the cached run, both sampling the same
  ``timing_batch`` samples in this process, medians of ``repeats`` interleaved runs
  (:func:`moeca.replay.driver.replay_compare`, the measurement ``moeca replay`` reports; the process is
  warmed up once with a full-compute run of the timed batch);
- ``flops_ratio``: FLOPs actually computed (rows counted by the replay runtime) over full compute;
- ``psnr`` / ``ssim`` / ``rel_l2``: fidelity of the ``eval_samples`` cached samples against the
  full-compute samples from the same noise and labels (PSNR capped at 100 dB = identical);
- ``accuracy`` / ``fd``: class accuracy and Frechet distance of classifier features to the real test
  digits (the demo model only; ``None`` for other shapes).

Calibration never uses the evaluation noise: TeaCache's polynomial and L2C's routers are fitted on
their own seeds, MoECa's schedule is derived from a trace of its own seeds.

The sweep is resumable: ``WORK/pareto_state.json`` holds the settings and every finished point (written
atomically after each point); ``--resume`` continues a sweep with the same settings. Outputs go to
``OUT/pareto.{json,md,png}`` via :func:`moeca.bench.results.write_results`; :data:`PARETO_SCHEMA` is the
JSON Schema of ``pareto.json`` (:func:`validate`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

NAME = "pareto"
STATE_FILE = "pareto_state.json"
STATE_VERSION = 1
TARGET_SPEEDUPS = (2.0, 2.5, 3.0)
PSNR_CAP_DB = 100.0
METHODS = ("none", "moeca", "fora", "toca", "teacache", "l2c", "moeca-plain", "moeca-budget", "fora-forecast")
ABLATIONS = {
    "moeca-plain": "MoECa's sync rule with plain reuse (forecast none): what forecasting adds",
    "moeca-budget": "MoECa's expert-aware token-budget rule (refresh budget, sync every 10 steps, forecast linear)",
    "fora-forecast": "FORA with MoECa's linear forecast of reused outputs (block level, TaylorSeer-like): what "
                     "branch granularity adds over forecasting alone",
}
"""Ablations: not baselines from the literature, variants that separate MoECa's ingredients."""

DEFAULT_GRID: dict[str, tuple[str, tuple[float, ...]]] = {
    "none": ("full", (1,)),
    "fora": ("interval", (2, 3, 4, 6)),
    "toca": ("fresh_threshold", (2, 4, 3, 8, 16, 32)),
    # thresholds in units of the mean rescaled change per step (the fit gives the unit; see teacache.py)
    "teacache": ("thresh_x_mean_change", (1.5, 6.0, 3.0, 0.6)),
    "l2c": ("reuse_fraction", (0.55, 0.9, 0.75, 0.3)),
    "moeca": ("target_speedup", (2.0, 3.5, 5.0, 7.0, 2.5, 1.5)),
    "moeca-plain": ("target_speedup", (2.0, 3.5, 5.0, 7.0)),
    "moeca-budget": ("target_speedup", (2.0, 3.0, 4.0)),
    "fora-forecast": ("interval", (2, 3, 4, 6)),
}
"""Per method: (knob, values). Each value is one point of the sweep; the order only decides what a sweep
stopped early has measured (points are visited round-robin over methods, in this order)."""

COLUMNS = ["method", "knob", "value", "speedup", "flops_ratio", "psnr", "ssim", "rel_l2", "accuracy", "fd",
           "ms_full", "ms_cached", "reuse_attn", "reuse_expert", "skipped_forwards"]


@dataclass(frozen=True)
class ParetoSettings:
    """Everything that changes the numbers; a resumed sweep must use the same settings.

    model / checkpoint: what to load (``demo`` = the shipped model). num_steps, cfg_scale, cfg_mode: the
    sampler (rectified flow). eval_samples: samples for PSNR/SSIM/accuracy/FD, sampled ``eval_batch`` at
    a time. timing_batch / repeats: samples per timed run and timed repeats per side. seed: evaluation
    noise seed. trace_samples: samples traced for MoECa's derivation. calibration_samples: samples for
    TeaCache's fit and L2C's training. l2c_sparsity / l2c_iterations: L2C's sparsity penalty and Adam
    iterations per step. device: torch device name.
    """

    model: str = "demo"
    checkpoint: str | None = None
    num_steps: int = 50
    cfg_scale: float = 1.5
    cfg_mode: str = "batched"
    eval_samples: int = 100
    eval_batch: int = 50
    timing_batch: int = 16
    repeats: int = 3
    seed: int = 0
    trace_samples: int = 16
    calibration_samples: int = 2
    l2c_sparsity: float = 0.02
    l2c_iterations: int = 10
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("num_steps", "eval_samples", "eval_batch", "timing_batch", "repeats", "trace_samples",
                     "calibration_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"pareto {name} must be >= 1, got {getattr(self, name)}")
        if self.timing_batch > self.eval_samples:
            raise ValueError(f"pareto timing_batch ({self.timing_batch}) must not exceed eval_samples "
                             f"({self.eval_samples}): timing reuses the first evaluation samples")

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def reference_key(self) -> str:
        """Key of the full-compute reference samples: only the settings that change them."""
        keep = ("model", "checkpoint", "num_steps", "cfg_scale", "cfg_mode", "eval_samples", "eval_batch", "seed",
                "device")
        return hashlib.sha256(json.dumps({k: getattr(self, k) for k in keep}, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Point:
    """One sweep point: a method and one value of its main knob."""

    method: str
    knob: str
    value: float

    @property
    def key(self) -> str:
        return f"{self.method}:{self.knob}={self.value:g}"


class SkipPoint(Exception):
    """A point that cannot be built (e.g. a target speedup out of reach); recorded, not fatal."""


def grid_points(methods: Sequence[str], grid: dict[str, tuple[str, tuple[float, ...]]] | None = None) -> list[Point]:
    """The sweep points, round-robin over methods (every method's first point, then every second, ...),
    so a sweep stopped early still covers each method's range."""
    grid = grid or DEFAULT_GRID
    unknown = [m for m in methods if m not in grid]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(grid)}")
    per = [[Point(m, grid[m][0], float(v)) for v in grid[m][1]] for m in methods]
    return [p[i] for i in range(max(map(len, per), default=0)) for p in per if i < len(p)]


# ----------------------------------------------------------------------------- state
def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    os.replace(tmp, path)


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/Inf -> None (the schema allows null), numpy scalars -> Python numbers."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class SweepState:
    """``pareto_state.json``: settings, calibration results and finished points, saved after each change."""

    def __init__(self, path: Path, settings: ParetoSettings, resume: bool):
        self.path = path
        self.settings = settings
        self.data: dict = {"version": STATE_VERSION, "settings": asdict(settings), "key": settings.key(),
                           "calibration": {}, "points": {}, "skipped": {}}
        if resume and path.is_file():
            old = json.loads(path.read_text())
            if old.get("version") != STATE_VERSION:
                raise ValueError(f"{path}: sweep state version {old.get('version')} is not {STATE_VERSION}; "
                                 "rerun without --resume")
            if old.get("key") != settings.key():
                diff = [f"{k}: {old['settings'].get(k)!r} -> {v!r}" for k, v in asdict(settings).items()
                        if old.get("settings", {}).get(k) != v]
                raise ValueError(f"{path}: cannot resume, the settings differ ({'; '.join(diff)}); rerun without "
                                 "--resume or with the same options")
            self.data = old
        path.parent.mkdir(parents=True, exist_ok=True)
        self.save()

    @property
    def points(self) -> dict[str, dict]:
        return self.data["points"]

    def record(self, point: Point, row: dict) -> None:
        self.data["points"][point.key] = _clean(row)
        self.data["skipped"].pop(point.key, None)
        self.save()

    def skip(self, point: Point, reason: str) -> None:
        self.data["skipped"][point.key] = reason
        self.save()

    def calibration(self, name: str) -> Any:
        return self.data["calibration"].get(name)

    def set_calibration(self, name: str, value: Any) -> None:
        self.data["calibration"][name] = _clean(value)
        self.save()

    def save(self) -> None:
        _atomic_json(self.path, self.data)


# ----------------------------------------------------------------------------- the sweep
@dataclass
class SweepContext:
    """The model, sampler and evaluation set shared by all points (built once per process)."""

    model: Any
    sampler: Any
    labels: Any            # [eval_samples] int64
    reference: Any         # full-compute samples [eval_samples, C, H, W] (CPU)
    weights_hash: str | None
    classifier: Any = None
    extra: dict = field(default_factory=dict)


class ParetoSweep:
    """Runs the sweep; ``log(msg)`` receives progress notes, ``progress`` toggles the tqdm bar."""

    def __init__(self, model, settings: ParetoSettings, work_dir: str | os.PathLike, *, resume: bool = False,
                 progress: bool = True, log: Callable[[str], None] = print, model_name: str | None = None):
        self.model, self.settings, self.work = model, settings, Path(work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.state = SweepState(self.work / STATE_FILE, settings, resume)
        self.progress, self.log = progress, log
        self.model_name = model_name or settings.model
        self._ctx: SweepContext | None = None

    # -- shared setup ----------------------------------------------------------------------------
    def context(self) -> SweepContext:
        if self._ctx is not None:
            return self._ctx
        import torch

        from moeca.models.checkpoint import weights_hash
        from moeca.models.samplers import SamplerConfig
        from moeca.replay.driver import sample_batches
        s, model = self.settings, self.model
        mc = model.config
        sampler = SamplerConfig(kind="rectified_flow", num_steps=s.num_steps, cfg_scale=s.cfg_scale, cfg_mode=s.cfg_mode)
        labels = torch.arange(s.eval_samples) % mc.num_classes
        ref_path = self.work / f"reference-{s.reference_key()}.pt"
        if ref_path.is_file():
            reference = torch.load(ref_path, weights_only=True)
        else:
            self.log(f"pareto: full-compute reference for {s.eval_samples} samples")
            # the seeds replay_compare uses for its quality samples (batch at index i: seed + 1 + i)
            reference = sample_batches(model, sampler, labels, s.seed + 1, s.eval_batch)
            tmp = ref_path.with_name(f".{ref_path.name}.tmp")
            torch.save(reference, tmp)
            os.replace(tmp, ref_path)
        classifier = None
        if (mc.in_channels, mc.input_size) == (1, 8):
            from moeca.models.evaluator import DigitsClassifier
            classifier = DigitsClassifier.load_shipped("cpu")
        self._ctx = SweepContext(model, sampler, labels, reference, weights_hash(model), classifier)
        return self._ctx

    # -- calibrations ------------------------------------------------------------------------------
    def teacache_fit(self) -> dict:
        got = self.state.calibration("teacache_fit")
        if got is None:
            import torch

            from moeca.policy.baselines.teacache import fit_rescale_polynomial
            ctx = self.context()
            n = self.settings.calibration_samples
            labels = torch.arange(n) % self.model.config.num_classes
            self.log("pareto: fitting the TeaCache rescaling polynomial")
            fit = fit_rescale_polynomial(self.model, ctx.sampler, labels, seeds=(self.settings.seed + 10_001,))
            got = {"coefficients": list(fit.coefficients), "r2": fit.r2, "mean_change": fit.mean_output_change(),
                   "pairs": len(fit.input_changes)}
            self.state.set_calibration("teacache_fit", got)
        return got

    def l2c_router(self):
        from moeca.policy.baselines.l2c import L2CConfig, L2CRouter, train_router
        cfg = L2CConfig(sparsity=self.settings.l2c_sparsity, iterations=self.settings.l2c_iterations,
                        calibration_samples=self.settings.calibration_samples, calibration_seed=self.settings.seed + 1000)
        path = self.work / f"l2c-router-{self.settings.key()}.json"
        if path.is_file():
            return L2CRouter.load(path), cfg
        ctx = self.context()
        self.log("pareto: training the L2C routers")
        bar = self._bar(ctx.sampler.num_steps - 1, "l2c routers")
        router = train_router(self.model, ctx.sampler, cfg, progress=lambda done, total: bar.update(1))
        bar.close()
        router.save(path)
        return router, cfg

    def moeca_inputs(self) -> tuple[Any, dict]:
        if "moeca" not in (ctx := self.context()).extra:
            from moeca.analysis import drift_summary
            from moeca.tracer.run import TraceConfig, trace_run
            from moeca.tracer.store import complete_shards, read_run_meta
            s = self.settings
            trace_dir = self.work / f"trace-{s.key()}"
            labels = tuple(i % self.model.config.num_classes for i in range(s.trace_samples))
            config = TraceConfig(sampler=ctx.sampler, labels=labels, seed=s.seed + 2000, batch_size=min(8, s.trace_samples))
            exists = trace_dir.is_dir() and any(trace_dir.iterdir())
            if not exists or len(complete_shards(trace_dir)) < config.num_shards:
                self.log(f"pareto: tracing {s.trace_samples} samples for MoECa")
                trace_run(self.model, trace_dir, config, resume=exists, progress=self.progress,
                          model_name=self.model_name)
            summary = drift_summary([trace_dir], threads=1)
            ctx.extra["moeca"] = (summary, read_run_meta(trace_dir))
        return ctx.extra["moeca"]

    # -- schedules -------------------------------------------------------------------------------------
    def schedule_for(self, point: Point):
        from moeca.policy.baselines import fora, l2c, none, teacache, toca
        ctx = self.context()
        mc, sampler, wh = self.model.config, ctx.sampler, ctx.weights_hash
        if point.method == "none":
            return none.build_schedule(none.NoneConfig(), mc, sampler, wh), {}
        if point.method in ("fora", "fora-forecast"):
            schedule = fora.build_schedule(fora.ForaConfig(interval=int(point.value)), mc, sampler, wh)
            if point.method == "fora-forecast":
                from dataclasses import replace
                schedule = replace(schedule, method="custom", forecast="linear",
                                   provenance={**schedule.provenance, "ablation": ABLATIONS["fora-forecast"]})
            return schedule, {}
        if point.method == "toca":
            return toca.build_schedule(toca.TocaConfig(fresh_threshold=int(point.value)), mc, sampler, wh), {}
        if point.method == "teacache":
            fit = self.teacache_fit()
            thresh = point.value * fit["mean_change"]
            cfg = teacache.TeaCacheConfig(rel_l1_thresh=thresh, coefficients=tuple(fit["coefficients"]))
            return teacache.build_schedule(cfg, mc, sampler, wh), {"rel_l1_thresh": thresh}
        if point.method == "l2c":
            router, cfg = self.l2c_router()
            from dataclasses import replace
            cfg = replace(cfg, reuse_fraction=point.value)
            return l2c.build_schedule(router, cfg, mc, sampler, wh), {}
        if point.method in ("moeca", "moeca-plain", "moeca-budget"):
            from moeca.policy.derive import DeriveConfig, derive_schedule
            summary, run_meta = self.moeca_inputs()
            variant = {"moeca": {}, "moeca-plain": {"forecast": "none"}, "moeca-budget": {"refresh": "budget"}}
            try:
                return derive_schedule(summary, run_meta, DeriveConfig(target_speedup=point.value,
                                                                       **variant[point.method])), {}
            except ValueError as exc:
                raise SkipPoint(str(exc)) from None
        raise ValueError(f"unknown method {point.method!r}")

    # -- measurement ------------------------------------------------------------------------------------
    def measure(self, point: Point) -> dict:
        """One row: :func:`moeca.replay.driver.replay_compare` (the measurement ``moeca replay`` uses) with
        the baseline's runtime, against the cached full-compute reference of the evaluation set."""
        from moeca.models.metrics import psnr, relative_l2, ssim
        from moeca.policy.baselines.runtimes import make_runtime
        from moeca.replay.driver import replay_compare
        ctx = self.context()
        schedule, detail = self.schedule_for(point)
        s = self.settings
        if not ctx.extra.get("warm"):  # one warm-up of the timed batch per process, not one per point
            from moeca.models.samplers import sample
            sample(self.model, ctx.sampler, ctx.labels[:s.timing_batch], seed=s.seed)
            ctx.extra["warm"] = True
        result = replay_compare(self.model, schedule, ctx.sampler, ctx.labels[:s.timing_batch], seed=s.seed,
                                repeats=s.repeats, quality_labels=ctx.labels, quality_batch=s.eval_batch,
                                evaluate=False, progress=self.progress, model_name=self.model_name,
                                runtime_factory=make_runtime, quality_reference=ctx.reference, warmup=False)
        rep, images = result.report, result.quality_cached
        counters = rep.counters
        row = {
            "method": point.method, "knob": point.knob, "value": point.value, "point": point.key,
            "speedup": rep.speedup, "flops_ratio": rep.flops_ratio,
            "predicted_flops_ratio": schedule.predicted_flops_ratio,
            "psnr": float(psnr(images, ctx.reference, max_db=PSNR_CAP_DB).mean()),
            "ssim": float(ssim(images, ctx.reference).mean()),
            "rel_l2": float(relative_l2(images, ctx.reference).mean()),
            "accuracy": None, "fd": None,
            "ms_full": 1000 * rep.time_full_s, "ms_cached": 1000 * rep.time_cached_s,
            "times_full_s": list(rep.times_full_s), "times_cached_s": list(rep.times_cached_s),
            "reuse_attn": float(rep.reuse["attn"]), "reuse_expert": float(rep.reuse["expert"]),
            "skipped_forwards": counters["skipped_forwards"] / max(counters["forwards"], 1),
            "cache_mb": rep.cache_bytes / 2 ** 20,
            "detail": detail,
        }
        if ctx.classifier is not None:
            from moeca.models.evaluator import evaluate_samples
            ev = evaluate_samples(images, ctx.labels, ctx.classifier)
            row["accuracy"], row["fd"] = ev["accuracy"], ev["fd"]
        return row

    def reference_metrics(self) -> dict:
        got = self.state.calibration("reference_metrics")
        if got is None:
            ctx = self.context()
            got = {"accuracy": None, "fd": None, "fd_floor": None, "samples": int(ctx.labels.shape[0])}
            if ctx.classifier is not None:
                from moeca.models.evaluator import evaluate_samples
                ev = evaluate_samples(ctx.reference, ctx.labels, ctx.classifier)
                got.update(accuracy=ev["accuracy"], fd=ev["fd"], fd_floor=ev["fd_floor"])
            self.state.set_calibration("reference_metrics", got)
        return got

    def _bar(self, total: int, desc: str):
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, disable=not self.progress, dynamic_ncols=True)

    def run(self, points: Iterable[Point], on_point: Callable[[list[dict]], None] | None = None) -> list[dict]:
        """Measure every point not already in the state (resume); returns all rows in sweep order.

        ``on_point(rows so far)`` runs after every measured point (partial result files)."""
        points = list(points)
        self.context()
        self.reference_metrics()
        todo = [p for p in points if p.key not in self.state.points]
        if len(todo) < len(points):
            self.log(f"pareto: resuming, {len(points) - len(todo)} of {len(points)} points already measured")
        bar = self._bar(len(todo), "pareto sweep")
        for p in todo:
            bar.set_postfix_str(p.key)
            try:
                self.state.record(p, self.measure(p))
            except SkipPoint as exc:
                self.state.skip(p, str(exc))
                self.log(f"pareto: skipped {p.key}: {exc}")
            bar.update(1)
            if on_point is not None:
                on_point([self.state.points[q.key] for q in points if q.key in self.state.points])
        bar.close()
        return [self.state.points[p.key] for p in points if p.key in self.state.points]


# ----------------------------------------------------------------------------- analysis of the curves
def _x(row: dict, axis: str) -> float | None:
    if axis == "flops":
        return 1.0 / row["flops_ratio"] if row.get("flops_ratio") else None
    return row.get("speedup")


def interpolate(rows: Sequence[dict], method: str, metric: str, target: float, axis: str = "speedup") -> float | None:
    """``metric`` of ``method`` at speedup ``target``: linear between the two points that bracket it
    (sorted by speedup); None when the curve does not reach ``target``. ``axis``: ``speedup`` (measured
    wall clock) or ``flops`` (FLOPs speedup ``1 / flops_ratio``, free of timing noise)."""
    pts = sorted((_x(r, axis), r[metric]) for r in rows
                 if r["method"] == method and r.get(metric) is not None and _x(r, axis) is not None)
    for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
        if s0 <= target <= s1:
            return v0 if s1 == s0 else v0 + (v1 - v0) * (target - s0) / (s1 - s0)
    if pts and any(abs(s - target) < 1e-12 for s, _ in pts):
        return next(v for s, v in pts if abs(s - target) < 1e-12)
    return None


def at_speedups(rows: Sequence[dict], methods: Sequence[str], targets: Sequence[float] = TARGET_SPEEDUPS,
                axis: str = "speedup") -> dict:
    """``{method: {"2x": {"psnr": .., "fd": ..}, ...}}`` by interpolation along each curve."""
    return {m: {f"{t:g}x": {"psnr": interpolate(rows, m, "psnr", t, axis), "fd": interpolate(rows, m, "fd", t, axis)}
                for t in targets} for m in methods if m != "none"}


def verdict(table: dict, targets: Sequence[float] = TARGET_SPEEDUPS) -> list[dict]:
    """Issue 6's target per speedup: MoECa's PSNR higher and FD lower than both ToCa and FORA."""
    out = []
    for t in targets:
        key = f"{t:g}x"
        row: dict[str, Any] = {"speedup": key}
        ours = table.get("moeca", {}).get(key, {})
        for metric, better in (("psnr", lambda a, b: a > b), ("fd", lambda a, b: a < b)):
            mine = ours.get(metric)
            others = {m: table.get(m, {}).get(key, {}).get(metric) for m in ("toca", "fora")}
            if mine is None:
                row[metric] = "moeca has no point at this speedup"
            elif any(v is None for v in others.values()):
                missing = [m for m, v in others.items() if v is None]
                row[metric] = f"moeca beats {'/'.join(m for m, v in others.items() if v is not None and better(mine, v)) or 'none'}; " \
                              f"{', '.join(missing)} not reached"
            else:
                row[metric] = "met" if all(better(mine, v) for v in others.values()) else "not met"
            row[f"{metric}_values"] = {"moeca": mine, **others}
        out.append(row)
    return out


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def notes_markdown(meta: dict) -> str:
    ref = meta["reference"]
    lines = [f"Model `{meta['settings']['model']}`, {meta['settings']['num_steps']} rectified-flow steps, CFG "
             f"{meta['settings']['cfg_scale']} ({meta['settings']['cfg_mode']}); timing on "
             f"{meta['settings']['timing_batch']} samples, median of {meta['settings']['repeats']} interleaved "
             f"runs per side; quality on {meta['settings']['eval_samples']} samples (same noise and labels as full "
             f"compute). Full compute: accuracy {_fmt(ref.get('accuracy'))}, FD {_fmt(ref.get('fd'))} "
             f"(real-vs-real floor {_fmt(ref.get('fd_floor'))}). PSNR is capped at {PSNR_CAP_DB:g} dB (identical).",
             "", "Interpolated at measured speedups (PSNR dB / FD):", "",
             "| method | " + " | ".join(f"{t:g}x" for t in TARGET_SPEEDUPS) + " |",
             "|---|" + "---|" * len(TARGET_SPEEDUPS)]
    for m, per in meta["at_speedup"].items():
        cells = [f"{_fmt(v['psnr'])} / {_fmt(v['fd'])}" for v in per.values()]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "The same at FLOPs speedups (``1 / flops_ratio``; counted rows, no timing noise):", "",
              "| method | " + " | ".join(f"{t:g}x" for t in TARGET_SPEEDUPS) + " |",
              "|---|" + "---|" * len(TARGET_SPEEDUPS)]
    for m, per in meta["at_flops_speedup"].items():
        cells = [f"{_fmt(v['psnr'])} / {_fmt(v['fd'])}" for v in per.values()]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for title, key in (("measured", "verdict"), ("FLOPs", "verdict_flops")):
        lines += ["", f"Target (MoECa better than both ToCa and FORA on PSNR and on FD), at {title} speedups:", ""]
        for v in meta[key]:
            lines.append(f"- {v['speedup']}: PSNR {v['psnr']} ({', '.join(f'{k} {_fmt(x)}' for k, x in v['psnr_values'].items())}); "
                         f"FD {v['fd']} ({', '.join(f'{k} {_fmt(x)}' for k, x in v['fd_values'].items())})")
    present = [m for m in ABLATIONS if m in meta["at_speedup"]]
    if present:
        lines += ["", "Ablations (dashed in the plot; not part of the target): "
                  + "; ".join(f"`{m}`: {ABLATIONS[m]}" for m in present) + "."]
    if meta.get("pending"):
        lines += ["", f"**Partial sweep**: {len(meta['pending'])} points not measured yet "
                      f"(rerun with `--resume`): {', '.join(meta['pending'])}"]
    if meta.get("skipped"):
        lines += ["", "Skipped points: " + "; ".join(f"`{k}`: {r}" for k, r in meta["skipped"].items())]
    return "\n".join(lines)


def plot(rows: Sequence[dict], reference: dict, path: Path) -> None:
    """Panels: PSNR and FD against measured speedup (the issue's Pareto plots), PSNR against FLOPs speedup."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("psnr", "speedup", "PSNR vs full compute (dB, higher is better)")]
    if any(r.get("fd") is not None for r in rows):
        panels.append(("fd", "speedup", "Frechet distance to real digits (lower is better)"))
    panels.append(("psnr", "flops", "PSNR vs full compute (dB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.4), squeeze=False)
    for ax, (metric, axis, label) in zip(axes[0], panels):
        for method in METHODS:
            pts = sorted((_x(r, axis), r[metric]) for r in rows
                         if r["method"] == method and r.get(metric) is not None and _x(r, axis) is not None)
            if not pts:
                continue
            xs, ys = zip(*pts)
            style = dict(marker="o", lw=2.2) if method == "moeca" else dict(marker=".", lw=1.2)
            if method in ABLATIONS:
                style["ls"] = "--"
            ax.plot(xs, ys, label=method, **style)
        if metric == "fd" and reference.get("fd") is not None:
            ax.axhline(reference["fd"], color="k", ls="--", lw=0.8, label="full compute")
        for t in TARGET_SPEEDUPS:
            ax.axvline(t, color="0.8", lw=0.6, zorder=0)
        ax.set_xlabel("measured wall-clock speedup (x)" if axis == "speedup" else "FLOPs speedup (1 / FLOPs ratio)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def build_meta(settings: ParetoSettings, state: SweepState, rows: Sequence[dict], methods: Sequence[str],
               grid: dict | None = None) -> dict:
    grid = grid or DEFAULT_GRID
    table = at_speedups(rows, methods)
    pending = [p.key for p in grid_points(methods, grid) if p.key not in state.points and p.key not in state.data["skipped"]]
    return _clean({"settings": asdict(settings), "grid": {m: list(grid[m][1]) for m in methods},
                   "reference": state.calibration("reference_metrics") or {},
                   "calibration": {k: v for k, v in state.data["calibration"].items() if k != "reference_metrics"},
                   "at_speedup": table, "verdict": verdict(table),
                   "at_flops_speedup": at_speedups(rows, methods, axis="flops"),
                   "verdict_flops": verdict(at_speedups(rows, methods, axis="flops")),
                   "skipped": dict(state.data["skipped"]),
                   "pending": pending})


def write(settings: ParetoSettings, state: SweepState, rows: Sequence[dict], methods: Sequence[str],
          out_dir: str | os.PathLike, command: str, grid: dict | None = None) -> dict[str, Path]:
    """Write pareto.json/.md/.png for the rows so far (a partial sweep lists its pending points)."""
    from moeca.bench.results import write_results
    meta = build_meta(settings, state, rows, methods, grid)
    return write_results(NAME, [_clean(r) for r in rows], out_dir, meta=meta, columns=COLUMNS,
                         title="Pareto: MoECa vs FORA, ToCa, TeaCache, L2C", notes=notes_markdown(meta),
                         plot=lambda p: plot(rows, meta["reference"], p), command=command)


_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_AT = {"type": "object", "required": ["psnr", "fd"], "additionalProperties": False,
       "properties": {"psnr": _NUM_OR_NULL, "fd": _NUM_OR_NULL}}

PARETO_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://moeca.invalid/schemas/pareto-v1.json",
    "title": "moeca bench pareto results",
    "description": "Written by `moeca bench pareto` (moeca/bench/pareto.py); one row per sweep point.",
    "type": "object",
    "$defs": {"verdict": {"type": "array", "items": {
        "type": "object", "required": ["speedup", "psnr", "fd", "psnr_values", "fd_values"],
        "properties": {"speedup": {"type": "string"}, "psnr": {"type": "string"}, "fd": {"type": "string"}}}}},
    "required": ["name", "command", "meta", "environment", "rows"],
    "additionalProperties": False,
    "properties": {
        "name": {"const": NAME},
        "command": {"type": ["string", "null"]},
        "environment": {"type": "object", "required": ["python", "torch"]},
        "meta": {
            "type": "object",
            "required": ["settings", "grid", "reference", "calibration", "at_speedup", "verdict",
                         "at_flops_speedup", "verdict_flops", "skipped", "pending"],
            "additionalProperties": False,
            "properties": {
                "settings": {"type": "object", "required": [f.name for f in fields(ParetoSettings)],
                             "additionalProperties": False,
                             "properties": {f.name: {} for f in fields(ParetoSettings)}},
                "grid": {"type": "object", "propertyNames": {"enum": list(METHODS)},
                         "additionalProperties": {"type": "array", "items": _NUM}},
                "reference": {"type": "object", "required": ["accuracy", "fd", "fd_floor", "samples"],
                              "properties": {"accuracy": _NUM_OR_NULL, "fd": _NUM_OR_NULL,
                                             "fd_floor": _NUM_OR_NULL, "samples": {"type": "integer", "minimum": 1}}},
                "calibration": {"type": "object"},
                "at_speedup": {"type": "object", "propertyNames": {"enum": list(METHODS)},
                               "additionalProperties": {"type": "object", "additionalProperties": _AT}},
                "verdict": {"$ref": "#/$defs/verdict"},
                "at_flops_speedup": {"type": "object", "propertyNames": {"enum": list(METHODS)},
                                     "additionalProperties": {"type": "object", "additionalProperties": _AT}},
                "verdict_flops": {"$ref": "#/$defs/verdict"},
                "skipped": {"type": "object", "additionalProperties": {"type": "string"}},
                "pending": {"type": "array", "items": {"type": "string"}},
            },
        },
        "rows": {"type": "array", "items": {
            "type": "object",
            "required": ["method", "knob", "value", "point", "speedup", "flops_ratio", "predicted_flops_ratio",
                         "psnr", "ssim", "rel_l2", "accuracy", "fd", "ms_full", "ms_cached", "times_full_s",
                         "times_cached_s", "reuse_attn", "reuse_expert", "skipped_forwards", "cache_mb", "detail"],
            "additionalProperties": False,
            "properties": {
                "method": {"enum": list(METHODS)},
                "knob": {"type": "string"},
                "value": _NUM,
                "point": {"type": "string"},
                "speedup": {"type": "number", "exclusiveMinimum": 0},
                "flops_ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1.5},
                "predicted_flops_ratio": _NUM_OR_NULL,
                "psnr": {"type": "number", "maximum": PSNR_CAP_DB},
                "ssim": {"type": "number", "minimum": -1, "maximum": 1},
                "rel_l2": {"type": "number", "minimum": 0},
                "accuracy": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                "fd": {"type": ["number", "null"], "minimum": 0},
                "ms_full": {"type": "number", "exclusiveMinimum": 0},
                "ms_cached": {"type": "number", "exclusiveMinimum": 0},
                "times_full_s": {"type": "array", "minItems": 1, "items": {"type": "number", "exclusiveMinimum": 0}},
                "times_cached_s": {"type": "array", "minItems": 1, "items": {"type": "number", "exclusiveMinimum": 0}},
                "reuse_attn": {"type": "number", "minimum": 0, "maximum": 1},
                "reuse_expert": {"type": "number", "minimum": 0, "maximum": 1},
                "skipped_forwards": {"type": "number", "minimum": 0, "maximum": 1},
                "cache_mb": {"type": "number", "minimum": 0},
                "detail": {"type": "object"},
            },
        }},
    },
}
"""JSON Schema (draft 2020-12) of ``pareto.json``."""


def validate(payload: dict) -> None:
    """Raise ``jsonschema.ValidationError`` when ``payload`` (a parsed pareto.json) breaks the schema."""
    import jsonschema
    jsonschema.Draft202012Validator(PARETO_SCHEMA).validate(payload)


# ----------------------------------------------------------------------------- CLI
def register(sub: argparse._SubParsersAction) -> None:
    d = ParetoSettings()
    p = sub.add_parser(NAME, help="MoECa vs baselines: speedup/quality Pareto sweep",
                       description="Sweep each method's main knob; record measured speedup, FLOPs ratio, PSNR/SSIM "
                                   "vs full compute, class accuracy and FD; write pareto.json/.md/.png.")
    p.add_argument("--model", default=d.model, help="model name: 'demo' (shipped) or a preset with --checkpoint")
    p.add_argument("--checkpoint", default=None, help="checkpoint for a preset model")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--out", default="bench/results", help="results folder (pareto.json/.md/.png)")
    p.add_argument("--work", default="out/pareto", help="sweep state, reference samples, traces, routers")
    p.add_argument("--resume", action="store_true", help="continue the sweep in --work (same settings)")
    p.add_argument("--steps", type=int, default=d.num_steps)
    p.add_argument("--cfg-scale", type=float, default=d.cfg_scale)
    p.add_argument("--eval-samples", type=int, default=d.eval_samples, help="samples for PSNR/SSIM/accuracy/FD")
    p.add_argument("--eval-batch", type=int, default=d.eval_batch)
    p.add_argument("--timing-batch", type=int, default=d.timing_batch, help="samples per timed run")
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed runs per side (median)")
    p.add_argument("--trace-samples", type=int, default=d.trace_samples)
    p.add_argument("--calibration-samples", type=int, default=d.calibration_samples)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from moeca.models.registry import load_model
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"--methods: unknown method(s) {bad}; choose from {','.join(METHODS)}")
    if "none" not in methods:
        methods.insert(0, "none")
    settings = ParetoSettings(model=args.model, checkpoint=args.checkpoint, num_steps=args.steps,
                              cfg_scale=args.cfg_scale, eval_samples=args.eval_samples, eval_batch=args.eval_batch,
                              timing_batch=args.timing_batch, repeats=args.repeats, seed=args.seed,
                              trace_samples=args.trace_samples, calibration_samples=args.calibration_samples,
                              device=args.device)
    model = load_model(args.model, args.checkpoint, device=args.device)
    if model.config.objective != "rectified_flow":
        raise ValueError(f"model {args.model!r} is trained for {model.config.objective}; the Pareto sweep samples "
                         "with rectified flow (use the demo model or an XL/G checkpoint)")
    sweep = ParetoSweep(model, settings, args.work, resume=args.resume, progress=not args.no_progress,
                        model_name=args.model)
    command = "moeca " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "moeca bench pareto"
    rows = sweep.run(grid_points(methods),
                     on_point=lambda done: write(settings, sweep.state, done, methods, args.out, command))
    paths = write(settings, sweep.state, rows, methods, args.out, command)
    validate(json.loads(paths["json"].read_text()))
    print(notes_markdown(build_meta(settings, sweep.state, rows, methods)))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
