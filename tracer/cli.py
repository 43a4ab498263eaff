"""``moeca trace`` and ``moeca trace-info``; also the entry point of ``python -m moeca.tracer``.

Distributed: ``torchrun --nproc-per-node N -m moeca.tracer --model demo --out DIR ...`` takes the
same options; each rank traces the shards ``s % N == rank`` and writes its own shard files.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from moeca.models.model_args import add_model_arguments

from ..models.model_args import load_model_from_args


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2; got {text!r}") from None


def add_trace_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``moeca trace`` (shared with ``python -m moeca.tracer``)."""
    m = p.add_argument_group("model")
    add_model_arguments(m)
    m.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    s = p.add_argument_group("sampling")
    s.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's sampler default)")
    s.add_argument("--samples", type=int, default=None, help="number of samples (default: one per class)")
    s.add_argument("--labels", type=_int_list, default=None, help="class labels, comma-separated; cycled to "
                                                                   "--samples when that is given")
    s.add_argument("--num-per-class", type=int, default=None, help="this many samples of every class")
    s.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (1 = none)")
    s.add_argument("--cfg-mode", choices=("batched", "separate"), default=None,
                   help="one [cond; uncond] call per step or two calls (default: batched, except separate for "
                        "the public XL/G architectures; the same whether the weights come from --model or "
                        "--checkpoint)")
    s.add_argument("--sampler", choices=("ddpm", "ddim", "rectified_flow"), default=None,
                   help="sampler kind (default: the model objective's reference sampler)")
    s.add_argument("--seed", type=int, default=0, help="run seed; every sample's noise seed derives from it")
    s.add_argument("--batch-size", type=int, default=8, help="samples per shard, traced together (default 8)")
    t = p.add_argument_group("trace")
    t.add_argument("--out", required=True, help="trace directory to create")
    t.add_argument("--lags", type=int, default=None, help="compare with 1..LAGS steps back (default 4)")
    t.add_argument("--dump-vectors", type=int, default=0, metavar="N",
                   help="also store full float16 vectors of N sampled tokens per block")
    t.add_argument("--resume", action="store_true", help="finish an interrupted trace in --out")
    t.add_argument("--overwrite", action="store_true", help="replace an existing trace in --out")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="sample while recording token- and expert-branch-level changes (Parquet)",
                       description="Sample with the tracing runtime and write a trace directory: run.json plus "
                                   "branches/, tokens/ (and vectors/) Parquet shards. Multi-process: "
                                   "torchrun --nproc-per-node N -m moeca.tracer (same options).")
    add_trace_arguments(p)
    p.set_defaults(func=run_trace)
    i = sub.add_parser("trace-info", help="summarise trace directories (runs, rows, size, schema version)")
    i.add_argument("paths", nargs="+", help="trace directories, or folders holding several")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    i.add_argument("--verify", action="store_true",
                   help="also decode every page of every shard (slower; finds damage inside compressed data)")
    i.set_defaults(func=run_trace_info)


def _sampler(args: argparse.Namespace, model):
    # deferred: loads torch, and this module is imported at `moeca` start-up
    from moeca.diffusion.samplers import default_sampler_for
    base = default_sampler_for(model.config)
    overrides = {}
    if args.sampler is not None:
        overrides["kind"] = args.sampler
    if args.steps is not None:
        overrides["num_steps"] = args.steps
    if args.cfg_scale is not None:
        overrides["cfg_scale"] = args.cfg_scale
    if args.cfg_mode is not None:
        overrides["cfg_mode"] = args.cfg_mode
    return replace(base, **overrides)


def _device(name: str):
    # deferred: loads torch, and this module is imported at `moeca` start-up
    import torch

    # deferred: loads torch, and this module is imported at `moeca` start-up
    from ..models.registry import pick_device
    device = pick_device(name)
    local_rank = os.environ.get("LOCAL_RANK")
    if device.type == "cuda" and device.index is None and local_rank is not None:
        device = torch.device("cuda", int(local_rank))
    return device


def run_trace(args: argparse.Namespace) -> int:
    # deferred: loads torch, and this module is imported at `moeca` start-up
    from moeca.diffusion.samplers import check_sampler_objective

    # deferred: loads torch, and this module is imported at `moeca` start-up
    from .run import TraceConfig, resolve_labels, trace_run
    # deferred: loads pyarrow, and this module is imported at `moeca` start-up
    from .schema import DEFAULT_LAGS

    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if args.samples is not None and args.samples < 1:
        raise ValueError(f"--samples {args.samples} must be >= 1")
    name, model = load_model_from_args(args, _device(args.device))
    sampler = _sampler(args, model)
    check_sampler_objective(sampler.kind, model.config.objective,
                            "--sampler" if args.sampler else "the default sampler")
    labels = resolve_labels(model.config.num_classes, samples=args.samples, labels=args.labels,
                            num_per_class=args.num_per_class)
    config = TraceConfig(sampler=sampler, labels=labels, seed=args.seed, batch_size=args.batch_size,
                         lags=args.lags if args.lags is not None else DEFAULT_LAGS, dump_vectors=args.dump_vectors)
    try:
        out = trace_run(model, args.out, config, resume=args.resume, overwrite=args.overwrite,
                        progress=not args.no_progress, model_name=name,
                        checkpoint=str(Path(args.checkpoint).resolve()) if args.checkpoint else None)
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, FileExistsError, PermissionError)):
            raise
        raise ValueError(str(exc)) from exc
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(out))
    return 0


def format_summary(trace_dir, summary: dict | None = None) -> str:
    # deferred: loads pyarrow, and this module is imported at `moeca` start-up
    from .store import trace_summary
    s = summary if summary is not None else trace_summary(trace_dir)
    lines = [f"{s['path']}: run {s['run_name']!r}, schema v{s['schema_version']}, model {s['model']} "
             f"(weights {s['weights_hash']}), {s['sampler']} {s['steps']} steps, cfg {s['cfg_scale']}, "
             f"{s['samples']} samples, lags {s['lags']}",
             f"  shards: {s['shards_complete']}/{s['shards_total']} complete"
             + (f", {s['temporary_files']} leftover temporary files (finish with --resume)"
                if s["temporary_files"] else "")]
    total = 0
    for name, t in s["tables"].items():
        total += t["bytes"]
        bpr = f"{t['bytes_per_row']:.1f} B/row" if t["bytes_per_row"] else "-"
        lines.append(f"  {name:9s} {t['rows']:>12,d} rows  {t['bytes'] / 2**20:9.2f} MiB  {bpr}")
    lines.append(f"  total     {total / 2**20:9.2f} MiB")
    lines += [f"  INVALID: {p}" for p in s.get("problems", [])]
    return "\n".join(lines)


def run_trace_info(args: argparse.Namespace) -> int:
    """Print each trace's summary; exit code 2 (as every command's refusal) when any trace contradicts itself
    (problems listed)."""
    # deferred: loads pyarrow, and this module is imported at `moeca` start-up
    from .store import find_traces, trace_summary
    traces = list(dict.fromkeys(t.resolve() for p in args.paths for t in find_traces(p)))
    summaries = [trace_summary(t, deep=args.verify) for t in traces]
    if args.json:
        print(json.dumps(summaries, indent=1))
    else:
        print(f"{len(traces)} trace run(s)")
        for t, s in zip(traces, summaries):
            print(format_summary(t, s))
        if not args.verify:
            print("checked: footers, schema, row counts and statistics against run.json; --verify also reads every "
                  "page and checks its CRC")
    bad = sum(len(s["problems"]) for s in summaries)
    if bad:
        print(f"moeca trace-info: {bad} problem(s) found; the shards named above are not counted as complete",
              file=sys.stderr)
        return 2
    return 0
