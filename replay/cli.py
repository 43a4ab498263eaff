"""``moeca replay --schedule FILE --model NAME --samples K --out DIR``."""
from __future__ import annotations

import argparse
import math
import sys

from moeca.common.outputs import check_output_dir
from moeca.models.model_args import add_model_arguments, load_model_from_args
from moeca.policy.schedule import Schedule


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replay", help="sample with a schedule and compare against full compute (speed, FLOPs, memory, quality)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sample the same labels from the same noise with full compute and with the schedule's "
                    "cache reuse, in this process,\nand report the measured wall-clock speedup (median of "
                    "the --repeats back-to-back full/cached ratios), FLOPs computed vs full, cache memory, PSNR/SSIM vs full and,\non the demo "
                    "model with --quality-samples, class accuracy and Frechet distance of both sample sets.",
        epilog="example:\n  moeca replay --schedule out/schedule.json --model demo --samples 16 --out out/replay")
    p.add_argument("--schedule", required=True, help="schedule JSON (from `moeca schedule derive`)")
    add_model_arguments(p)
    p.add_argument("--samples", type=int, default=16, help="samples in the timed batch (default 16)")
    p.add_argument("--quality-samples", type=int, default=0,
                   help="extra samples (classes cycled) for accuracy / Frechet distance / PSNR (default 0)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; medians are reported (default 3)")
    p.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (default: the model's, 1.5)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--out", required=True, help="output directory (PNG grids, samples.pt, report.json/md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compile", action="store_true",
                   help="compile the model (torch.compile, once) before the warm-up runs; timings exclude compiling")
    p.set_defaults(func=cmd_replay)


def cmd_replay(args: argparse.Namespace) -> int:
    # deferred: loads torch, and this module is imported at `moeca` start-up
    import torch

    # deferred: loads torch, and this module is imported at `moeca` start-up
    from moeca.diffusion.samplers import SamplerConfig, check_sampler_objective, default_sampler_for
    # deferred: loads torch, and this module is imported at `moeca` start-up
    from moeca.models.checkpoint import weights_hash

    from .calibrate import prediction_line
    from .driver import replay_compare, write_replay_outputs

    if args.samples < 1 or args.repeats < 1 or args.quality_samples < 0:
        raise ValueError("--samples and --repeats must be >= 1 and --quality-samples >= 0")
    if args.cfg_scale is not None and not (math.isfinite(args.cfg_scale) and args.cfg_scale >= 0):
        raise ValueError(f"--cfg-scale {args.cfg_scale} must be a finite number >= 0 (1 disables guidance)")
    check_output_dir(args.out, [("--schedule", args.schedule), ("--checkpoint", args.checkpoint)])
    if args.threads is not None:
        if not 1 <= args.threads <= 1024:
            raise ValueError(f"--threads must be in 1..1024, got {args.threads}")
        torch.set_num_threads(args.threads)
    schedule = Schedule.load(args.schedule)
    name, model = load_model_from_args(args, args.device)
    note = schedule.unchecked_weights_note(f"schedule {args.schedule}", weights_hash(model))
    if note:
        print(note, file=sys.stderr)
    check_sampler_objective(schedule.sampler.kind, model.config.objective,
                            f"schedule {args.schedule}: field sampler.kind")
    base = default_sampler_for(model.config)
    smp = schedule.sampler
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else (base.cfg_scale if smp.guided else 1.0)
    sampler = SamplerConfig(kind=smp.kind, num_steps=smp.num_steps, cfg_scale=cfg_scale, cfg_mode=smp.cfg_mode,
                            cfg_channels=base.cfg_channels)
    n_cls = model.config.num_classes
    labels = [i % n_cls for i in range(args.samples)]
    quality = [i % n_cls for i in range(args.quality_samples)] if args.quality_samples else None
    result = replay_compare(model, schedule, sampler, labels, seed=args.seed, repeats=args.repeats,
                            quality_labels=quality, progress=not args.no_progress,
                            model_name=name or str(args.checkpoint), compile=args.compile)
    paths = write_replay_outputs(result, args.out, schedule_path=str(args.schedule))
    print(result.report.to_markdown())
    for warning in result.report.timing_warnings:
        print(f"warning: measured speedup {result.report.speedup:.2f}x: {warning}", file=sys.stderr)
    line = prediction_line(schedule, result.report.speedup, model, sampler, args.samples)
    if line:
        print(line)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
