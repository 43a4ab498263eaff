"""``python -m moeca.replay sample`` / ``torchrun --nproc-per-node N -m moeca.replay sample``.

Samples K images with a schedule (``--schedule s.json``) or full compute (``--schedule none``) into the
ADM evaluation suite's ``.npz`` (see :mod:`moeca.replay.sample_ddp`). Under torchrun (``WORLD_SIZE`` > 1)
a process group is initialised (NCCL when the device is CUDA, gloo otherwise); each rank samples its
share of the shards on ``cuda:LOCAL_RANK`` (or the CPU), and rank 0 merges them.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

from moeca.common.inputs import check_utf8_arguments
from moeca.common.outputs import check_no_overlap
from moeca.diffusion.samplers import SamplerConfig, default_sampler_for
from moeca.models.checkpoint import weights_hash
from moeca.models.distributed import torchrun_group
from moeca.models.model_args import add_model_arguments, load_model_from_args
from moeca.models.registry import pick_device
from moeca.policy.schedule import Schedule

from .sample_ddp import SampleJob, check_output, sample_to_npz

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, FloatingPointError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m moeca.replay",
                                     description="Large-scale sampling with a schedule (DiT/ADM convention).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "sample", help="sample K images with a schedule (or full compute) into an ADM .npz",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Each rank samples its share of K images (shards of --batch-size; sample i's label and noise "
                    "depend only on i and --seed,\nso the images do not depend on the number of ranks), writes each "
                    "shard atomically next to --out,\nand rank 0 merges them into --out: arr_0 uint8 [K, H, W, 3], "
                    "arr_1 labels [K]. Rerun the same command after a kill to resume.",
        epilog="examples:\n"
               "  python -m moeca.replay sample --schedule none --num-samples 1000 --out full.npz\n"
               "  torchrun --nproc-per-node 2 -m moeca.replay sample --schedule s.json --num-samples 50000 "
               "--out samples.npz")
    p.add_argument("--schedule", required=True, help="schedule JSON (from `moeca schedule derive`), or 'none' for "
                                                     "full compute")
    add_model_arguments(p)
    p.add_argument("--num-samples", type=int, required=True, help="K: images in all (across every rank)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: the schedule's; with --schedule none the model's sampler default)")
    p.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (default: the model's, 1.5; 1 when "
                                                                 "the schedule is unguided)")
    p.add_argument("--cfg-mode", choices=("batched", "separate"), default=None,
                   help="with --schedule none: one [cond; uncond] call per step or two calls (default: the model's "
                        "reference sampler); a schedule fixes it")
    p.add_argument("--label-mode", choices=("balanced", "random"), default="balanced",
                   help="balanced: sample i has class i %% num_classes (default); random: uniform classes from --seed")
    p.add_argument("--seed", type=int, default=0, help="base seed of every label and noise draw (default 0)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per shard and sampling call (default 32)")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda, ...")
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                   help="torch.distributed backend under torchrun (auto: nccl on CUDA, else gloo)")
    p.add_argument("--out", required=True, help="output .npz (shards go to OUT.shards/ until the merge)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def resolve_device(name: str, local_rank: int):
    """``auto`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU; ``cuda`` -> ``cuda:LOCAL_RANK``."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = pick_device(name)
    return torch.device(f"cuda:{local_rank}") if device.type == "cuda" and device.index is None else device


def sampler_and_schedule(args: argparse.Namespace, model):
    """The :class:`SamplerConfig` and the schedule (None for ``--schedule none``) from the options."""
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    base = default_sampler_for(model.config)
    if args.schedule == "none":
        overrides = {k: v for k, v in (("num_steps", args.steps), ("cfg_scale", args.cfg_scale),
                                       ("cfg_mode", args.cfg_mode)) if v is not None}
        return replace(base, **overrides), None, None
    path = Path(args.schedule)
    schedule = Schedule.load(path)
    smp = schedule.sampler
    if args.cfg_mode is not None and smp.guided and args.cfg_mode != smp.cfg_mode:
        raise ValueError(f"--cfg-mode {args.cfg_mode} disagrees with the schedule's sampler.cfg_mode "
                         f"{smp.cfg_mode!r}; drop --cfg-mode")
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else (base.cfg_scale if smp.guided else 1.0)
    sampler = SamplerConfig(kind=smp.kind, num_steps=args.steps if args.steps is not None else smp.num_steps,
                            cfg_scale=cfg_scale, cfg_mode=smp.cfg_mode, cfg_channels=base.cfg_channels)
    return sampler, schedule, hashlib.sha256(path.read_bytes()).hexdigest()


def cmd_sample(args: argparse.Namespace, rank: int, world: int, local_rank: int, barrier) -> int:
    job = SampleJob(num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size,
                    label_mode=args.label_mode)

    out = Path(args.out)
    check_output(out, args.overwrite)           # before loading a model: fail fast on a bad --out
    check_no_overlap(out, [("--checkpoint", args.checkpoint),
                           ("--schedule", None if args.schedule == "none" else args.schedule)])
    device = resolve_device(args.device, local_rank)
    _, model = load_model_from_args(args, device)
    sampler, schedule, digest = sampler_and_schedule(args, model)
    if schedule is not None and rank == 0:
        note = schedule.unchecked_weights_note(f"schedule {args.schedule}", weights_hash(model))
        if note:
            print(note, file=sys.stderr)
    result = sample_to_npz(model, sampler, job, out, schedule=schedule, schedule_sha256=digest, rank=rank,
                           world=world, barrier=barrier, overwrite=args.overwrite,
                           progress=not args.no_progress and rank == 0)
    print(f"rank {rank}/{world}: sampled shards {result['sampled']}, verified existing shards {result['reused']}",
          file=sys.stderr)
    if rank == 0:
        arr = result["images"]
        mc = model.config
        note = "" if mc.in_channels in (1, 3) else " (raw latents: first 3 channels, no VAE decoder)"
        what = "full compute" if schedule is None else f"schedule {args.schedule} ({schedule.method})"
        print(f"wrote {out}: arr_0 {arr.dtype} {list(arr.shape)}{note}, arr_1 labels; {what}, {sampler.kind} "
              f"{sampler.num_steps} steps, CFG {sampler.cfg_scale:g} ({sampler.cfg_mode}), seed {args.seed}, "
              f"{world} rank(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        check_utf8_arguments(argv)
        with torchrun_group(args.backend, args.device) as group:
            return cmd_sample(args, group.rank, group.world, group.local_rank, group.barrier)
    except USER_ERRORS as exc:
        print(f"moeca sample (rank {rank}): error: {exc}", file=sys.stderr)
        return 2
