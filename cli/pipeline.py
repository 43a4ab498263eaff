"""``moeca run``: the main job end to end on one model: trace -> analyze -> derive -> replay.

Writes ``OUT/trace``, ``OUT/report`` (analysis), ``OUT/schedule.json``, ``OUT/replay`` and
``OUT/summary.md`` (the speedup/quality table, also printed). Each stage is the same code the
single-stage commands run; this module only wires them together.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from moeca.common.outputs import (OutputError, atomic_write_text, check_no_overlap, os_errors, record_manifest,
                                  remove_listed)
from moeca.common.tables import markdown_table
from moeca.policy.derive import DeriveConfig, derive_schedule


@dataclass(frozen=True)
class PipelineConfig:
    """Knobs of ``moeca run``.

    trace_samples: samples traced to measure drift; quality_samples: samples compared full vs cached
    for PSNR/SSIM and (demo) class accuracy / Frechet distance; timing_samples: the timed batch;
    target_speedups: one MoECa schedule is derived and replayed per target: the wall-clock speedup on
    this device at ``timing_samples``, predicted from calibrated unit costs (``moeca calibrate``;
    measured on first use); a target the prediction says is out of reach is reported, not replayed.
    target_kind: ``wallclock`` (above) or ``flops`` (the targets are analytic FLOPs speedups; no calibration).
    compile: replay with the model compiled (torch.compile, once, before the replay warm-ups; tracing
    and calibration stay eager). model: a shipped model or preset; None with a moeca-written checkpoint
    (the checkpoint's metadata names the model).
    """

    model: str | None = "demo"
    steps: int = 50
    cfg_scale: float = 1.5
    trace_samples: int = 16
    quality_samples: int = 200
    timing_samples: int = 16
    repeats: int = 3
    target_speedups: tuple[float, ...] = (1.5, 2.0, 3.0)
    target_kind: str = "wallclock"
    seed: int = 0
    device: str = "auto"
    compile: bool = False


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the main job: trace -> analyze -> schedule -> replay, prints the table",
                       description="Run the whole MoECa chain on the shipped demo model (or a preset with "
                                   "--checkpoint) and print the speedup/quality table. Outputs under --out.")
    p.add_argument("--out", default="out", help="output folder (default: out)")
    p.add_argument("--model", default=None,
                   help="model name (default: the shipped demo model, or the model a moeca-written --checkpoint "
                        "describes in its metadata)")
    p.add_argument("--checkpoint", default=None,
                   help="weights: a moeca-written .safetensors (self-describing), or a public checkpoint of --model")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="guidance scale (default 1.5)")
    p.add_argument("--trace-samples", type=int, default=16, help="samples traced (default 16)")
    p.add_argument("--quality-samples", type=int, default=200, help="samples for quality metrics (default 200)")
    p.add_argument("--timing-samples", type=int, default=16, help="timed batch size (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats, medians reported (default 3)")
    p.add_argument("--target-speedups", default="1.5,2,3",
                   help="comma-separated wall-clock speedup targets on this device (default 1.5,2,3)")
    p.add_argument("--target-flops-speedups", default=None,
                   help="comma-separated analytic FLOPs speedup targets instead (no calibration)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder made by moeca run")
    p.add_argument("--compile", action="store_true",
                   help="replay with the model compiled by torch.compile (compiles once; minutes on a CPU)")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    flops = args.target_flops_speedups is not None
    option, text = ("--target-flops-speedups", args.target_flops_speedups) if flops else \
        ("--target-speedups", args.target_speedups)
    try:
        targets = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{option} must be numbers separated by commas, got {text!r}")
    if not targets or min(targets) <= 1 or not all(t < float("inf") for t in targets):
        raise ValueError(f"{option} needs at least one value above 1, all finite")
    if len(set(targets)) != len(targets):
        raise ValueError(f"{option} {text} names a target twice; give each once")
    for name, value, low in (("--steps", args.steps, 1), ("--trace-samples", args.trace_samples, 1),
                             ("--quality-samples", args.quality_samples, 0),
                             ("--timing-samples", args.timing_samples, 1), ("--repeats", args.repeats, 1),
                             ("--seed", args.seed, 0)):
        if value < low:
            raise ValueError(f"{name} {value} must be >= {low}")
    if not 0 <= args.cfg_scale < float("inf"):
        raise ValueError(f"--cfg-scale {args.cfg_scale} must be a finite number >= 0 (1 disables guidance)")
    cfg = PipelineConfig(model=args.model if args.model or args.checkpoint else "demo", steps=args.steps,
                         cfg_scale=args.cfg_scale, trace_samples=args.trace_samples, quality_samples=args.quality_samples,
                         timing_samples=args.timing_samples, repeats=args.repeats, target_speedups=targets,
                         target_kind="flops" if flops else "wallclock", seed=args.seed, device=args.device,
                         compile=args.compile)
    table = run_pipeline(Path(args.out), cfg, checkpoint=args.checkpoint, overwrite=args.overwrite)
    print(table)
    return 0


MARKER = ".moeca-run"


def prepare_out(out: Path, overwrite: bool, inputs: tuple[tuple[str, str | None], ...] = ()) -> None:
    """Refuse to touch a folder that ``moeca run`` did not make; with --overwrite, remove from one it made
    only what its manifest lists (the user's own files there stay). ``inputs``: (label, path) pairs the
    folder must not overlap."""
    check_no_overlap(out, inputs)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FileExistsError(f"--out {out} exists and is not a folder; choose another --out")
    if out.exists():
        if not (out / MARKER).is_file():
            if any(out.iterdir()):
                raise FileExistsError(f"{out} exists and was not written by `moeca run`; choose another --out")
        elif not overwrite:
            raise FileExistsError(f"{out} holds an earlier run; pass --overwrite to replace it")
        else:
            remove_listed(out)
    with os_errors(f"the run folder {out}"):
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).write_text("written by moeca run\n")
    record_manifest(out, [MARKER], command="moeca run")


def run_entries(cfg: PipelineConfig) -> list[str]:
    """The top-level entries ``moeca run`` writes under OUT (what its manifest may list)."""
    return [MARKER, "trace", "report", "summary.md"] + [f"schedule-{t:g}x.json" for t in cfg.target_speedups] + [
        f"replay-{t:g}x" for t in cfg.target_speedups]


def run_pipeline(out: Path, cfg: PipelineConfig, checkpoint: str | None = None, overwrite: bool = False) -> str:
    """Run every stage; returns the Markdown table (also written to ``OUT/summary.md``).

    Whatever the stages wrote is added to OUT's manifest even when a stage fails, so a later
    ``--overwrite`` removes it (and only it).
    """
    prepare_out(out, overwrite, (("--checkpoint", checkpoint),))
    try:
        return _stages(out, cfg, checkpoint)
    finally:
        try:
            record_manifest(out, run_entries(cfg), command="moeca run")
        except OutputError:
            if sys.exc_info()[0] is None:    # a failing stage's own error matters more than this one
                raise


def _stages(out: Path, cfg: PipelineConfig, checkpoint: str | None) -> str:
    # deferred: loads torch, and this module is imported at `moeca` start-up
    from moeca.analysis import analyze, drift_summary
    # deferred: loads torch, and this module is imported at `moeca` start-up
    from moeca.diffusion.samplers import SamplerConfig
    # deferred: loads torch, and this module is imported at `moeca` start-up
    from moeca.models.registry import load_model
    from moeca.replay.calibrate import ensure_costs
    from moeca.replay.driver import replay_compare, write_replay_outputs
    from moeca.tracer import TraceConfig, read_run_meta, resolve_labels, trace_run

    model = load_model(cfg.model, checkpoint, device=cfg.device)
    cfg = replace(cfg, model=cfg.model or model.config.name)
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
    costs = ensure_costs(model, sampler, cfg.timing_samples, progress=lambda msg: print("  " + msg, flush=True)) \
        if cfg.target_kind == "wallclock" else None
    schedules, unreachable = [], []
    for target in cfg.target_speedups:
        try:
            schedule = derive_schedule(summary, meta, DeriveConfig(target_speedup=target, target=cfg.target_kind),
                                       costs).with_provenance(traces=[str(trace_dir)])
        except ValueError as exc:   # out of reach on this device: reported in the table, not replayed
            print(f"  {target:g}x: {exc}")
            unreachable.append(target)
            continue
        path = out / f"schedule-{target:g}x.json"
        schedule.save(path)
        schedules.append((target, path, schedule))
    print("[4/4] replay: full compute vs each schedule, same noise")
    timing_labels = resolve_labels(num_classes, samples=cfg.timing_samples)
    quality_labels = resolve_labels(num_classes, samples=cfg.quality_samples) if cfg.quality_samples else None
    rows, reference, warnings = [], None, []
    for target, path, schedule in schedules:
        result = replay_compare(model, schedule, sampler, timing_labels, seed=cfg.seed, repeats=cfg.repeats,
                                quality_labels=quality_labels, quality_reference=reference, model_name=cfg.model,
                                compile=cfg.compile)
        reference = result.quality_full if quality_labels is not None else None
        write_replay_outputs(result, out / f"replay-{target:g}x", schedule_path=str(path))
        predicted = schedule.provenance["predicted_speedup"] if costs else 1 / schedule.predicted_flops_ratio
        rows.append(_row(target, predicted, result.report))
        warnings += [f"{target:g}x, measured {result.report.speedup:.2f}x: {w}" for w in result.report.timing_warnings]
    rows += [{"target": f"{t:g}x", "predicted speedup": "out of reach"} for t in unreachable]
    table = _table(rows, cfg) + "".join(f"\n**Warning** ({w})\n" for w in warnings)
    atomic_write_text(out / "summary.md", table, what="run summary")
    return table


def _row(target: float, predicted: float, r) -> dict:
    get = lambda name: getattr(r, name, None)  # noqa: E731 - optional quality fields
    return {"target": f"{target:g}x", "predicted speedup": predicted, "measured speedup": r.speedup,
            "FLOPs ratio": r.flops_ratio,
            "PSNR dB": get("psnr_quality_mean") or r.psnr_mean, "SSIM": get("ssim_quality_mean") or r.ssim_mean,
            "acc full": get("accuracy_full"), "acc cached": get("accuracy_cached"),
            "FD full": get("fd_full"), "FD cached": get("fd_cached")}


def _table(rows: list[dict], cfg: PipelineConfig) -> str:
    kind = ("wall-clock, predicted from this device's calibrated unit costs (`moeca calibrate`)"
            if cfg.target_kind == "wallclock" else "analytic FLOPs")
    head = (f"# moeca run: {cfg.model}, {cfg.steps} steps, CFG {cfg.cfg_scale}\n\n"
            f"MoECa schedules vs full compute. Speedup: median of {cfg.repeats} back-to-back full/cached wall-clock ratios on "
            f"{cfg.timing_samples} samples, same process; targets and predicted speedup: {kind}. Quality: "
            f"{cfg.quality_samples} samples from the same noise as full compute (PSNR/SSIM against full "
            "compute; accuracy and Frechet distance from the shipped digits classifier). Analysis report: report/report.md.\n\n")
    columns = ["target", "predicted speedup", "measured speedup", "FLOPs ratio", "PSNR dB", "SSIM", "acc full",
               "acc cached", "FD full", "FD cached"]
    return head + markdown_table(rows, columns=columns, floatfmt=".3f")
