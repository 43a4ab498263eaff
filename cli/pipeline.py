"""``moeca run``: the main job end to end on one model: trace -> analyze -> derive -> replay.

Writes ``OUT/trace``, ``OUT/report`` (analysis), ``OUT/schedule.json``, ``OUT/replay`` and
``OUT/summary.md`` (the speedup/quality table, also printed). Each stage is the same code the
single-stage commands run; this module only wires them together.
"""
from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PipelineConfig:
    """Knobs of ``moeca run``.

    trace_samples: samples traced to measure drift; quality_samples: samples compared full vs cached
    for PSNR/SSIM and (demo) class accuracy / Frechet distance; timing_samples: the timed batch;
    target_speedups: one MoECa schedule is derived and replayed per target (FLOPs speedup).
    """

    model: str = "demo"
    steps: int = 50
    cfg_scale: float = 1.5
    trace_samples: int = 16
    quality_samples: int = 200
    timing_samples: int = 16
    repeats: int = 3
    target_speedups: tuple[float, ...] = (2.5, 4.0, 6.0)
    seed: int = 0
    device: str = "auto"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the main job: trace -> analyze -> schedule -> replay, prints the table",
                       description="Run the whole MoECa chain on the shipped demo model (or a preset with "
                                   "--checkpoint) and print the speedup/quality table. Outputs under --out.")
    p.add_argument("--out", default="out", help="output folder (default: out)")
    p.add_argument("--model", default="demo", help="model name (default: the shipped demo model)")
    p.add_argument("--checkpoint", default=None, help="checkpoint for a preset model")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="guidance scale (default 1.5)")
    p.add_argument("--trace-samples", type=int, default=16, help="samples traced (default 16)")
    p.add_argument("--quality-samples", type=int, default=200, help="samples for quality metrics (default 200)")
    p.add_argument("--timing-samples", type=int, default=16, help="timed batch size (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats, medians reported (default 3)")
    p.add_argument("--target-speedups", default="2.5,4,6", help="comma-separated FLOPs speedup targets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder made by moeca run")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    try:
        targets = tuple(float(v) for v in args.target_speedups.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--target-speedups must be numbers separated by commas, got {args.target_speedups!r}")
    if not targets or min(targets) <= 1:
        raise ValueError("--target-speedups needs at least one value above 1")
    cfg = PipelineConfig(model=args.model, steps=args.steps, cfg_scale=args.cfg_scale,
                         trace_samples=args.trace_samples, quality_samples=args.quality_samples,
                         timing_samples=args.timing_samples, repeats=args.repeats, target_speedups=targets,
                         seed=args.seed, device=args.device)
    table = run_pipeline(Path(args.out), cfg, checkpoint=args.checkpoint, overwrite=args.overwrite)
    print(table)
    return 0


MARKER = ".moeca-run"


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse to touch a folder that ``moeca run`` did not make; replace one it made only with --overwrite."""
    if out.exists():
        if not (out / MARKER).is_file():
            if any(out.iterdir()):
                raise FileExistsError(f"{out} exists and was not written by `moeca run`; choose another --out")
        elif not overwrite:
            raise FileExistsError(f"{out} holds an earlier run; pass --overwrite to replace it")
        else:
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by moeca run\n")


def run_pipeline(out: Path, cfg: PipelineConfig, checkpoint: str | None = None, overwrite: bool = False) -> str:
    """Run every stage; returns the Markdown table (also written to ``OUT/summary.md``)."""
    from moeca.analysis import analyze, drift_summary
    from moeca.models.registry import load_model
    from moeca.models.samplers import SamplerConfig
    from moeca.policy.derive import DeriveConfig, derive_schedule
    from moeca.replay.driver import replay_compare, write_replay_outputs
    from moeca.tracer import TraceConfig, read_run_meta, resolve_labels, trace_run

    prepare_out(out, overwrite)
    model = load_model(cfg.model, checkpoint, device=cfg.device)
    num_classes = model.config.num_classes
    sampler = SamplerConfig(kind="rectified_flow" if model.config.objective == "rectified_flow" else "ddpm",
                            num_steps=cfg.steps, cfg_scale=cfg.cfg_scale, cfg_mode="batched")
    print(f"[1/4] trace: {cfg.trace_samples} samples, {cfg.steps} steps, CFG {cfg.cfg_scale}")
    trace_dir = out / "trace"
    trace_labels = resolve_labels(num_classes, samples=cfg.trace_samples)
    trace_run(model, trace_dir, TraceConfig(sampler=sampler, labels=trace_labels, seed=cfg.seed),
              model_name=cfg.model, checkpoint=checkpoint)
    print("[2/4] analyze: token- vs branch-level redundancy")
    headline = analyze([trace_dir], out / "report", progress=True, command="moeca run")
    print("  " + headline["sentence"])
    print("[3/4] schedule: derive MoECa schedules for targets " + ", ".join(f"{t:g}x" for t in cfg.target_speedups))
    summary, meta = drift_summary([trace_dir]), read_run_meta(trace_dir)
    schedules = []
    for target in cfg.target_speedups:
        schedule = derive_schedule(summary, meta, DeriveConfig(target_speedup=target)).with_provenance(
            traces=[str(trace_dir)])
        path = out / f"schedule-{target:g}x.json"
        schedule.save(path)
        schedules.append((target, path, schedule))
    print("[4/4] replay: full compute vs each schedule, same noise")
    timing_labels = resolve_labels(num_classes, samples=cfg.timing_samples)
    quality_labels = resolve_labels(num_classes, samples=cfg.quality_samples) if cfg.quality_samples else None
    rows, reference = [], None
    for target, path, schedule in schedules:
        result = replay_compare(model, schedule, sampler, timing_labels, seed=cfg.seed, repeats=cfg.repeats,
                                quality_labels=quality_labels, quality_reference=reference, model_name=cfg.model)
        reference = result.quality_full if quality_labels is not None else None
        write_replay_outputs(result, out / f"replay-{target:g}x", schedule_path=str(path))
        rows.append(_row(target, result.report))
    table = _table(rows, cfg)
    tmp = out / "summary.md.tmp"
    tmp.write_text(table)
    os.replace(tmp, out / "summary.md")
    return table


def _row(target: float, r) -> dict:
    get = lambda name: getattr(r, name, None)  # noqa: E731 - optional quality fields
    return {"target": f"{target:g}x", "measured speedup": r.speedup, "FLOPs ratio": r.flops_ratio,
            "PSNR dB": get("psnr_quality_mean") or r.psnr_mean, "SSIM": get("ssim_quality_mean") or r.ssim_mean,
            "acc full": get("accuracy_full"), "acc cached": get("accuracy_cached"),
            "FD full": get("fd_full"), "FD cached": get("fd_cached")}


def _table(rows: list[dict], cfg: PipelineConfig) -> str:
    from moeca.bench.results import markdown_table
    head = (f"# moeca run: {cfg.model}, {cfg.steps} steps, CFG {cfg.cfg_scale}\n\n"
            f"MoECa schedules vs full compute. Speedup: median wall clock of {cfg.repeats} repeats on "
            f"{cfg.timing_samples} samples, same process. Quality: {cfg.quality_samples} samples from the same "
            "noise as full compute (PSNR/SSIM against full compute; accuracy and Frechet distance from the "
            "shipped digits classifier). Analysis report: report/report.md.\n\n")
    return head + markdown_table(rows, floatfmt=".3f")
