"""What the engine benches share: the model of a trace and the MoECa schedule derived from it for a
wall-clock target on this device (``bench compile``, ``bench steps``)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch

from moeca.bench.results import DEFAULT_OUT
from moeca.cli.schedule import load_summary
from moeca.diffusion.samplers import SamplerConfig
from moeca.models.registry import load_traced_model
from moeca.policy.derive import DeriveConfig, derive_schedule
from moeca.replay.calibrate import ensure_costs
from moeca.tracer import resolve_labels


def add_arguments(p: argparse.ArgumentParser, target: float) -> None:
    """The options of a bench that replays one derived MoECa schedule."""
    p.add_argument("--trace", required=True, help="trace directory of the model (moeca trace)")
    p.add_argument("--target", type=float, default=target, help=f"MoECa wall-clock target speedup (default {target:g})")
    p.add_argument("--timing-samples", type=int, default=16, help="samples per sampling call (default 16)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"results folder (default {DEFAULT_OUT})")


@dataclass(frozen=True)
class Derived:
    """The trace's model (``model``, on ``device``), sampler, timing ``labels [timing_samples]`` and the
    MoECa ``schedule`` derived for ``--target`` (calibrated at ``--timing-samples``)."""

    model: Any
    device: Any
    sampler: Any
    labels: Any
    schedule: Any


def derive(args: argparse.Namespace) -> Derived:
    """Check the options, load the trace's model and derive its MoECa schedule (see :class:`Derived`)."""
    for name, value in (("--timing-samples", args.timing_samples), ("--repeats", args.repeats),
                        ("--threads", args.threads)):
        if value is not None and value < 1:
            raise ValueError(f"{name} {value} must be >= 1")
    if not args.target > 1:
        raise ValueError(f"--target {args.target} must be a speedup above 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    summary, meta = load_summary([args.trace])
    model = load_traced_model(meta, device=args.device)
    device = next(model.parameters()).device
    sampler = SamplerConfig(**meta["sampler"])
    costs = ensure_costs(model, sampler, args.timing_samples, progress=lambda msg: print(msg, flush=True))
    schedule = derive_schedule(summary, meta, DeriveConfig(target_speedup=args.target, target="wallclock"), costs)
    labels = torch.tensor(resolve_labels(model.config.num_classes, samples=args.timing_samples), device=device)
    return Derived(model, device, sampler, labels, schedule)


def command(name: str, args: argparse.Namespace, extra: str = "") -> str:
    """The command line that regenerates a bench's results."""
    return (f"moeca bench {name} --trace {args.trace} --target {args.target:g} --timing-samples {args.timing_samples} "
            f"--repeats {args.repeats}" + (f" --threads {args.threads}" if args.threads else "") + extra)
