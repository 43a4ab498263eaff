"""``moeca bench moeca``: MoECa's speed/quality targets on the demo model and the S/2-8E2A shape check.

Demo model (CPU, ``--threads``): trace ``--trace-samples`` samples (50 rectified-flow steps, CFG 1.5
batched), summarise drift, derive one MoECa schedule per ``--targets`` entry the way ``moeca schedule
derive --target-speedup`` does (``--target-kind wallclock``: speedups predicted from this device's
calibrated unit costs, forecast level ``auto``; ``flops``: analytic FLOPs speedups), then for each
schedule measure, in this process, full vs cached wall-clock on
``--timing-samples`` samples (median of the ``--repeats`` back-to-back full/cached ratios; ``speedup_q1`` /
``speedup_q3``: their quartiles, the machine's run-to-run noise behind the median), FLOPs computed, cache memory,
PSNR/SSIM vs full on ``--quality-samples`` samples (classes cycled, same noise), class accuracy and
Frechet distance of full and cached samples. Targets: some setting with measured speedup >= 2.83x,
FD <= 1.10x full's and accuracy within 1 point of full's; at every setting, measured speedup >= 0.85 of
the FLOPs reduction the counters report (``speedup_vs_flops``: what the engine's bookkeeping keeps of
the work it skips).

S/2-8E2A shape (random weights, batch 8): the schedule of ``--shape-from`` target retargeted to the
shape and resampled to ``--shape-steps`` steps (same reuse fractions); target: measured speedup >=
0.85x of the FLOPs reduction, cache memory < 2x the activation memory of one step.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from moeca.analysis import drift_summary
from moeca.bench.results import parse_targets, pyplot, write_results
from moeca.diffusion.samplers import SamplerConfig
from moeca.models.config import get_preset
from moeca.models.dit_moe import DiTMoE
from moeca.models.registry import load_model, randomize_zero_init
from moeca.policy.derive import DeriveConfig, derive_schedule
from moeca.policy.transfer import resample_steps, retarget
from moeca.replay.calibrate import ensure_costs
from moeca.replay.driver import pair_ratios, replay_compare, sample_batches
from moeca.tracer.run import TraceConfig, trace_run
from moeca.tracer.store import read_run_meta

NAME = "moeca"
RATIO_TARGET = 0.85
"""Measured speedup over the FLOPs reduction that every setting (and the S/2 shape) should reach."""
COLUMNS = ["setting", "model", "target", "forecast_level", "predicted_speedup", "predicted_flops_ratio", "flops_ratio",
           "flops_speedup", "speedup", "speedup_q1", "speedup_q3", "speedup_vs_flops", "reuse_attn", "reuse_shared",
           "reuse_expert", "psnr", "ssim", "psnr_16", "accuracy_full", "accuracy_cached", "fd_full", "fd_cached",
           "fd_ratio", "cache_mb", "activation_mb", "ms_full", "ms_cached"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME,
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results", help="results folder (default bench/results)")
    p.add_argument("--checkpoint", default=None,
                   help="demo-shaped moeca .safetensors to use instead of the shipped demo weights")
    p.add_argument("--trace", default=None, help="existing demo trace (default: trace into OUT/moeca_trace)")
    p.add_argument("--trace-samples", type=int, default=40, help="samples traced for the drift summary")
    p.add_argument("--targets", default="2,2.5,3,3.5,4",
                   help="target speedups, one schedule each (comma-separated; see --target-kind)")
    p.add_argument("--target-kind", choices=("wallclock", "flops"), default="wallclock",
                   help="wallclock: predicted from this device's calibrated unit costs (cached; what moeca schedule "
                        "derive --target-speedup does); flops: analytic FLOPs speedups")
    p.add_argument("--refresh", choices=("sync", "budget"), default="sync", help="derivation rule (schedule derive)")
    p.add_argument("--forecast", choices=("linear", "none"), default="linear", help="forecast of reused outputs")
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--sync-interval", type=int, default=10, help="--refresh budget only")
    p.add_argument("--timing-samples", type=int, default=16)
    p.add_argument("--quality-samples", type=int, default=500)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape-from", type=float, default=None,
                   help="target whose schedule the shape check reuses (default: the best passing one, else the "
                        "fastest)")
    p.add_argument("--shape-steps", type=int, default=10)
    p.add_argument("--shape-repeats", type=int, default=2)
    p.add_argument("--skip-shape", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="compile the demo model first (torch.compile; one graph per kind of step, compiled in the "
                        "warm-up runs, minutes on a CPU); full compute and MoECa are both timed compiled")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def pair_quartiles(times_full: list[float], times_cached: list[float]) -> tuple[float, float]:
    """First and third quartiles of the per-pair ratios ``full[i] / cached[i]`` (runs timed back to back):
    the spread behind their median, the reported speedup (one pair: its ratio twice)."""
    ratios = pair_ratios(times_full, times_cached)
    if not ratios:
        raise ValueError("pair_quartiles needs at least one timed pair")
    if len(ratios) == 1:
        return ratios[0], ratios[0]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q1, q3


def _row(setting: str, model: str, target, schedule, rep) -> dict:
    fd_ratio = (rep.fd_cached / rep.fd_full) if rep.fd_full else None
    q1, q3 = pair_quartiles(rep.times_full_s, rep.times_cached_s)
    return {"setting": setting, "model": model, "target": target,
            "forecast_level": schedule.provenance.get("forecast_level"),
            "predicted_speedup": schedule.provenance.get("predicted_speedup"),
            "predicted_flops_ratio": schedule.predicted_flops_ratio, "flops_ratio": rep.flops_ratio,
            "flops_speedup": rep.flops_speedup, "speedup": rep.speedup,
            "speedup_q1": q1, "speedup_q3": q3, "speedup_vs_flops": rep.speedup / rep.flops_speedup,
            "reuse_attn": rep.reuse["attn"], "reuse_shared": rep.reuse["shared"], "reuse_expert": rep.reuse["expert"],
            "psnr": rep.psnr_quality_mean if rep.psnr_quality_mean is not None else rep.psnr_mean,
            "ssim": rep.ssim_quality_mean if rep.ssim_quality_mean is not None else rep.ssim_mean,
            "psnr_16": rep.psnr_mean, "accuracy_full": rep.accuracy_full, "accuracy_cached": rep.accuracy_cached,
            "fd_full": rep.fd_full, "fd_cached": rep.fd_cached, "fd_ratio": fd_ratio,
            "cache_mb": rep.cache_bytes / 2**20, "activation_mb": rep.activation_bytes_step / 2**20,
            "ms_full": rep.time_full_s * 1e3, "ms_cached": rep.time_cached_s * 1e3}


def _passes(row: dict) -> bool:
    return (row["speedup"] >= 2.83 and row["fd_ratio"] is not None and row["fd_ratio"] <= 1.10
            and abs(row["accuracy_cached"] - row["accuracy_full"]) <= 0.01)


def _rectified_flow_preset(name: str, seed: int):
    """Random-weight CPU model of preset ``name`` declared a rectified-flow model, so the Euler sampler and
    the schedule's ``sampler.kind`` match its objective (S/B presets are DDPM-trained; with random weights
    only the shape and the cost matter, as in ``bench/gpu_check.py``)."""
    torch.manual_seed(seed)
    model = DiTMoE(replace(get_preset(name), objective="rectified_flow"))
    randomize_zero_init(model, seed)
    return model.eval()


def run(args: argparse.Namespace) -> int:
    targets = parse_targets(args.targets)
    if args.target_kind == "wallclock" and args.refresh != "sync":
        raise ValueError("--target-kind wallclock needs --refresh sync (the budget rule predicts FLOPs only); "
                         "use --target-kind flops with --refresh budget")
    configs = {t: DeriveConfig(target_speedup=t, target=args.target_kind, refresh=args.refresh, forecast=args.forecast,
                               warmup_steps=args.warmup_steps, sync_interval=args.sync_interval)
               for t in targets}        # bad knobs fail here, before the trace and the calibration
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    started = time.time()
    model = load_model(None if args.checkpoint else "demo", args.checkpoint, device="cpu")
    sampler = SamplerConfig(kind="rectified_flow", num_steps=50, cfg_scale=1.5, cfg_mode="batched")

    # 1. trace + drift summary
    trace_dir = Path(args.trace) if args.trace else out / "moeca_trace"
    if args.trace is None and not (trace_dir / "run.json").is_file():
        labels = tuple(i % 10 for i in range(args.trace_samples))
        trace_run(model, trace_dir, TraceConfig(sampler=sampler, labels=labels, seed=args.seed + 100, batch_size=8),
                  progress=progress, model_name="demo", overwrite=True)
    summary = drift_summary([str(trace_dir)])
    meta = read_run_meta(trace_dir)

    # 2. one schedule per target, one shared full-compute quality reference
    timing_labels = [i % 10 for i in range(args.timing_samples)]
    quality_labels = torch.tensor([i % 10 for i in range(args.quality_samples)])
    reference = sample_batches(model, sampler, quality_labels, args.seed + 1, 100) if args.quality_samples else None
    rows, schedules = [], {}
    costs = ensure_costs(model, sampler, args.timing_samples) if args.target_kind == "wallclock" else None
    for target, cfg in configs.items():
        try:
            schedule = derive_schedule(summary, meta, cfg, costs)
        except ValueError as exc:
            print(f"target {target}: {exc}")
            continue
        schedule.save(out / f"moeca_schedule_{target:g}x.json")
        schedules[target] = schedule
        res = replay_compare(model, schedule, sampler, timing_labels, seed=args.seed, repeats=args.repeats,
                             quality_labels=quality_labels if args.quality_samples else None, quality_batch=100,
                             quality_reference=reference, progress=progress, model_name="demo",
                             compile=args.compile)
        row = _row(f"moeca {target:g}x", "demo", target, schedule, res.report)
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    if not rows:
        raise ValueError("no target could be derived; lower --targets")
    passing = [r for r in rows if _passes(r)]

    # 3. S/2-8E2A shape check with the same reuse pattern
    shape = None
    if not args.skip_shape:
        pick = args.shape_from if args.shape_from is not None else (
            max(passing, key=lambda r: r["speedup"])["target"] if passing else max(rows, key=lambda r: r["speedup"])["target"])
        if pick not in schedules:
            raise ValueError(f"--shape-from {pick} is not one of the derived targets {sorted(schedules)}")
        big = _rectified_flow_preset("S/2-8E2A", seed=0)
        big_sampler = SamplerConfig(kind="rectified_flow", num_steps=args.shape_steps, cfg_scale=1.5, cfg_mode="batched")
        big_schedule = resample_steps(retarget(schedules[pick], big.config), args.shape_steps)
        big_schedule.save(out / "moeca_schedule_S2-8E2A.json")
        res = replay_compare(big, big_schedule, big_sampler, [i % 1000 for i in range(8)], seed=args.seed,
                             repeats=args.shape_repeats, warmup=False, progress=progress, model_name="S/2-8E2A")
        shape = _row(f"S/2-8E2A shape ({pick:g}x pattern, {args.shape_steps} steps)", "S/2-8E2A", pick,
                     big_schedule, res.report)
        rows.append(shape)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in shape.items()})

    notes = _notes(rows, passing, shape, args)
    cmd = (f"moeca bench moeca {'--trace ' + args.trace + ' ' if args.trace else ''}--targets {args.targets} "
           f"--target-kind {args.target_kind} --refresh {args.refresh} --forecast {args.forecast} "
           f"--quality-samples {args.quality_samples} "
           f"--shape-steps {args.shape_steps} --shape-repeats {args.shape_repeats} "
           f"--timing-samples {args.timing_samples} --repeats {args.repeats} --threads {args.threads}"
           + (" --compile" if args.compile else ""))
    meta_out = {"trace": str(trace_dir), "trace_samples": meta.get("num_samples"), "sampler": sampler.to_dict(),
                "targets": targets, "target_kind": args.target_kind,
                "calibration": None if costs is None else costs.summary(),
                "passing_settings": [r["setting"] for r in passing],
                "speedup_vs_flops_met": _ratio_met(rows),
                "demo_target_met": bool(passing), "wall_s": time.time() - started,
                "shape_target_met": None if shape is None else bool(
                    shape["speedup_vs_flops"] >= RATIO_TARGET and shape["cache_mb"] < 2 * shape["activation_mb"])}
    paths = write_results(NAME, rows, out, meta=meta_out, columns=COLUMNS, title="MoECa on the demo model",
                          notes=notes, plot=lambda path: _plot(rows, path), command=cmd)
    print(notes)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _ratio_met(rows) -> bool:
    """Whether every demo setting's measured speedup is >= RATIO_TARGET of its FLOPs reduction."""
    return all(r["speedup_vs_flops"] >= RATIO_TARGET for r in rows if r["model"] == "demo")


def _notes(rows, passing, shape, args) -> str:
    demo = [r for r in rows if r["model"] == "demo"]
    lines = [f"Demo model, 50 rectified-flow steps, CFG 1.5 batched, {args.timing_samples} samples per timed call "
             f"(median of {args.repeats} back-to-back full/cached ratios in one process, {args.threads} threads"
             f"{'; both compiled with torch.compile' if args.compile else ''}); "
             f"quality on {args.quality_samples} samples from the same noise as full compute."]
    if passing:
        best = max(passing, key=lambda r: r["speedup"])
        lines.append(f"**Demo target met** by {', '.join(r['setting'] for r in passing)}; fastest passing: "
                     f"{best['speedup']:.2f}x measured, FD {best['fd_cached']:.3f} vs {best['fd_full']:.3f} "
                     f"({best['fd_ratio']:.3f}x), accuracy {best['accuracy_cached']:.3f} vs {best['accuracy_full']:.3f}, "
                     f"PSNR {best['psnr']:.1f} dB.")
    else:
        fastest = max(demo, key=lambda r: r["speedup"])
        lines.append(f"**Demo target NOT met**: no setting reached speedup >= 2.83x with FD <= 1.10x and accuracy "
                     f"within 1 point; fastest setting {fastest['setting']}: {fastest['speedup']:.2f}x, FD ratio "
                     f"{fastest['fd_ratio']}, accuracy {fastest['accuracy_cached']} vs {fastest['accuracy_full']}.")
    kind = ("wall-clock speedups predicted from this device's calibrated unit costs" if args.target_kind == "wallclock"
            else "analytic FLOPs speedups")
    ratios = ", ".join(f"{r['target']:g}x: {r['speedup']:.2f}x measured / {r['flops_speedup']:.2f}x FLOPs = "
                       f"{r['speedup_vs_flops']:.3f} (pairs' quartiles {r['speedup_q1'] / r['flops_speedup']:.3f}-"
                       f"{r['speedup_q3'] / r['flops_speedup']:.3f})" for r in demo)
    met = _ratio_met(rows)
    lines.append(f"Targets are {kind}. Measured speedup over the FLOPs reduction (target >= {RATIO_TARGET} at every "
                 f"setting: {'met' if met else 'NOT met'}): {ratios}.")
    if shape is not None:
        ok = shape["speedup_vs_flops"] >= RATIO_TARGET
        mem = shape["cache_mb"] < 2 * shape["activation_mb"]
        lines.append(f"S/2-8E2A shape (random weights, batch 8): measured {shape['speedup']:.2f}x vs FLOPs reduction "
                     f"{shape['flops_speedup']:.2f}x = {shape['speedup_vs_flops']:.2f} of it (target >= "
                     f"{RATIO_TARGET}: {'met' if ok else 'NOT met'}); cache {shape['cache_mb']:.1f} MiB vs one step's activations "
                     f"{shape['activation_mb']:.1f} MiB ({'below' if mem else 'NOT below'} 2x).")
    return "\n\n".join(lines)


def _plot(rows, path) -> None:
    plt = pyplot()

    demo = sorted((r for r in rows if r["model"] == "demo"), key=lambda r: r["speedup"])
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    xs = [1.0] + [r["speedup"] for r in demo]
    a.plot(xs[1:], [r["psnr"] for r in demo], "o-", label="MoECa")
    a.set_xlabel("measured speedup (x)")
    a.set_ylabel("PSNR vs full compute (dB)")
    a.axvline(2.83, color="grey", ls=":", label="2.83x target")
    a.legend()
    b.plot(xs, [demo[0]["fd_full"] if demo else None] + [r["fd_cached"] for r in demo], "o-", label="MoECa")
    if demo and demo[0]["fd_full"] is not None:
        b.axhline(1.10 * demo[0]["fd_full"], color="red", ls="--", label="1.10x full FD")
    b.axvline(2.83, color="grey", ls=":")
    b.set_xlabel("measured speedup (x)")
    b.set_ylabel("Frechet distance to real digits")
    b.legend()
    flops = [r["flops_speedup"] for r in demo]
    c.errorbar(flops, [r["speedup"] for r in demo], fmt="o-", capsize=3,
               yerr=[[r["speedup"] - r["speedup_q1"] for r in demo], [r["speedup_q3"] - r["speedup"] for r in demo]],
               label="MoECa measured (bars: quartiles of the pairs)")
    top = max(flops, default=1.0)
    c.plot([1, top], [1, top], color="grey", ls=":", label="= FLOPs reduction")
    c.plot([1, top], [RATIO_TARGET, RATIO_TARGET * top], color="red", ls="--",
           label=f"{RATIO_TARGET} x FLOPs reduction")
    c.set_xlabel("FLOPs reduction (x)")
    c.set_ylabel("measured speedup (x)")
    c.legend(fontsize=8, loc="upper left")
    for r in demo:
        a.annotate(r["setting"].split()[-1], (r["speedup"], r["psnr"]), fontsize=7)
        c.annotate(r["setting"].split()[-1], (r["flops_speedup"], r["speedup"]), fontsize=7)
    fig.suptitle("MoECa on the demo model (50 steps, CFG 1.5)")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
