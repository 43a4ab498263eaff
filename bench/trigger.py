"""``moeca bench trigger``: would a run-time, expert-aware refresh trigger place refreshes better than MoECa?

A run-time trigger refreshes when the share of routed (token, expert) pairs that changed since the last refresh
crosses a threshold (one host decision per step). This bench measures the best such a trigger could do: it reads
the routes of full compute's own trajectory on the evaluated samples (an oracle signal: at run time a trigger sees
the cached trajectory's routes, and at the token level only those of block 0, whose input is exact), places the
refreshes greedily (refresh at step ``s`` when the share of the pairs routed at ``s`` that were not routed at the
last refresh exceeds the threshold; the threshold searched so that it places exactly as many refreshes as MoECa's
schedule for the target), and replays every placement with MoECa's rule and forecast level. Equal refreshes,
equal cost: the trigger's router is not priced (at the token level block 0's router on every forecast step), which
favours it.

Placements per ``--targets`` wall-clock target (MoECa's schedule derived from ``--trace`` with this device's
calibration): ``moeca`` (its drift placement from the trace), ``route trigger, block 0``, ``route trigger, all
blocks`` and ``even`` (evenly spaced). Rows: refreshes, the placement, FLOPs speedup and PSNR/SSIM against full
compute on ``--quality-samples`` samples (the demo models also class accuracy).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from moeca.bench.results import DEFAULT_OUT, parse_targets, pyplot, write_results
from moeca.bench.steps import level_schedule
from moeca.cli.schedule import load_summary
from moeca.diffusion.samplers import SamplerConfig, sample
from moeca.models.registry import load_traced_model
from moeca.models.runtime import Runtime
from moeca.policy.derive import DeriveConfig, derive_schedule
from moeca.replay.calibrate import ensure_costs
from moeca.replay.driver import replay_compare
from moeca.tracer import resolve_labels

NAME = "trigger"
COLUMNS = ["target", "placement", "refreshes", "refresh_steps", "flops_speedup", "psnr", "ssim", "accuracy_cached",
           "threshold"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", required=True, help="trace directory of the model (moeca trace)")
    p.add_argument("--checkpoint", default=None, help="the model's weights when run.json names none")
    p.add_argument("--targets", default="2,3", help="wall-clock speedup targets (comma-separated; default 2,3)")
    p.add_argument("--timing-samples", type=int, default=16,
                   help="the batch this device's calibration prices (default 16)")
    p.add_argument("--quality-samples", type=int, default=32, help="samples compared with full compute (default 32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"results folder (default {DEFAULT_OUT})")
    p.set_defaults(func=run)


class RouteRecorder(Runtime):
    """Full compute that keeps every block's routed experts: ``routes[step][block]`` ``[N, k]`` int64 (host)."""

    def __init__(self):
        super().__init__()
        self.routes: dict[int, list[np.ndarray]] = {}
        self._step = 0

    def prepare_forward(self, model, ctx, x) -> None:
        self._step = 0 if ctx is None else ctx.step
        self.routes[self._step] = []

    def route(self, block, h):
        idx, w = super().route(block, h)
        self.routes[self._step].append(idx.cpu().numpy())
        return idx, w


def changed_share(now: list[np.ndarray], ref: list[np.ndarray], blocks: slice) -> float:
    """Share of the routed pairs in ``now`` (per block ``[N, k]``) that ``ref`` did not route (per token, as sets)."""
    changed = total = 0
    for a, b in zip(now[blocks], ref[blocks]):
        kept = (a[:, :, None] == b[:, None, :]).any(axis=2)
        changed += int((~kept).sum())
        total += kept.size
    return changed / max(total, 1)


def place(routes: dict[int, list[np.ndarray]], threshold: float, blocks: slice,
          shares: dict[tuple[int, int], float] | None = None) -> tuple[int, ...]:
    """Refresh steps a trigger with ``threshold`` places: step 0, then every step whose changed share since the
    last refresh exceeds it. ``shares``: the changed share of each ``(step, last refresh)`` met so far, filled in
    (one dict across thresholds computes each pair once)."""
    shares = {} if shares is None else shares
    steps, last = [0], 0
    for s in range(1, len(routes)):
        if (s, last) not in shares:
            shares[s, last] = changed_share(routes[s], routes[last], blocks)
        if shares[s, last] > threshold:
            steps.append(s)
            last = s
    return tuple(steps)


def placement_with(routes, count: int, blocks: slice) -> tuple[tuple[int, ...], float]:
    """The trigger's refresh steps closest to ``count`` refreshes (threshold by bisection) and the threshold."""
    lo, hi = 0.0, 1.0
    shares: dict[tuple[int, int], float] = {}
    best = (place(routes, hi, blocks, shares), hi)
    for _ in range(40):
        mid = (lo + hi) / 2
        steps = place(routes, mid, blocks, shares)
        if abs(len(steps) - count) < abs(len(best[0]) - count) or (len(steps) == count and mid > best[1]):
            best = (steps, mid)
        if len(steps) > count:
            lo = mid
        elif len(steps) < count:
            hi = mid
        else:
            break
    return best


def even(num_steps: int, count: int) -> tuple[int, ...]:
    """``count`` evenly spaced refresh steps from step 0."""
    return tuple(sorted({int(round(i * num_steps / count)) for i in range(count)}))


def run(args: argparse.Namespace) -> int:
    for name, value in (("--timing-samples", args.timing_samples), ("--quality-samples", args.quality_samples),
                        ("--threads", args.threads)):
        if value is not None and value < 1:
            raise ValueError(f"{name} {value} must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    targets = parse_targets(args.targets)
    summary, meta = load_summary([args.trace])
    model = load_traced_model(meta, args.checkpoint, device=args.device)
    device = next(model.parameters()).device
    sampler = SamplerConfig(**meta["sampler"])
    costs = ensure_costs(model, sampler, args.timing_samples, progress=lambda msg: print(msg, flush=True))
    quality = resolve_labels(model.config.num_classes, samples=args.quality_samples)
    recorder = RouteRecorder()
    with torch.inference_mode(), model.use_runtime(recorder):        # the quality batch replay_compare samples first
        sample(model, sampler, torch.tensor(quality, device=device), seed=args.seed + 1)
    routes = recorder.routes
    S = sampler.num_steps
    rows, reference = [], None
    for target in targets:
        schedule = derive_schedule(summary, meta, DeriveConfig(target_speedup=target, target="wallclock"), costs)
        level = schedule.provenance.get("forecast_level", "token")
        refresh = tuple(sorted(schedule.sync_refresh_steps))
        n = len(refresh)
        placements = [("moeca", refresh, None)]
        for name, blocks in (("route trigger, block 0", slice(0, 1)), ("route trigger, all blocks", slice(None))):
            steps, threshold = placement_with(routes, n, blocks)
            placements.append((name, steps, threshold))
        placements.append(("even", even(S, n), None))
        for name, steps, threshold in placements:
            sched = level_schedule(model, sampler, steps, level)
            result = replay_compare(model, sched, sampler, quality[:1], seed=args.seed, repeats=1,
                                    quality_labels=quality, quality_reference=reference, progress=False,
                                    warmup=False)
            reference = result.quality_full
            r = result.report
            rows.append({"target": f"{target:g}x", "placement": name, "refreshes": len(steps),
                         "refresh_steps": " ".join(map(str, steps)), "flops_speedup": r.flops_speedup,
                         "psnr": r.psnr_quality_mean, "ssim": r.ssim_quality_mean,
                         "accuracy_cached": r.accuracy_cached, "threshold": threshold})
            print(f"{target:g}x {name:26s} {level} refreshes {len(steps):2d} PSNR {r.psnr_quality_mean:.2f} dB",
                  flush=True)
    cmd = (f"moeca bench trigger --trace {args.trace} --targets {args.targets} --timing-samples {args.timing_samples} "
           f"--quality-samples {args.quality_samples}" + (f" --threads {args.threads}" if args.threads else ""))
    paths = write_results(f"{NAME}_{model.config.name}", rows, args.out, columns=COLUMNS, command=cmd,
                          plot=lambda path: plot(rows, path),
                          title=f"Refresh placement: MoECa's against a route-change trigger ({model.config.name})",
                          meta={"trace": args.trace, "sampler": sampler.to_dict(), "calibration": dict(costs.key),
                                "quality_samples": args.quality_samples},
                          notes="Every placement replays MoECa's rule and forecast level with the same number of "
                                "refreshes; the triggers read full compute's routes on the evaluated samples (an "
                                "oracle signal) and their router is not priced. threshold: the share of changed "
                                "routed pairs since the last refresh above which the trigger refreshes.")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def plot(rows: list[dict], path) -> None:
    """PSNR per placement (labelled), one group of bars per target."""
    plt = pyplot()
    targets = list(dict.fromkeys(r["target"] for r in rows))
    names = list(dict.fromkeys(r["placement"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(names)
    values = []
    for i, name in enumerate(names):
        vals = [next((r["psnr"] for r in rows if r["target"] == t and r["placement"] == name), np.nan) for t in targets]
        bars = ax.bar(np.arange(len(targets)) + i * width, vals, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        values += [v for v in vals if np.isfinite(v)]
    if values:
        ax.set_ylim(min(values) - 5, max(values) + 3)
    refreshes = {t: next(r["refreshes"] for r in rows if r["target"] == t) for t in targets}
    ax.set_xticks(np.arange(len(targets)) + 0.4 - width / 2, [f"{t} target ({refreshes[t]} refreshes)" for t in targets])
    ax.set_ylabel("PSNR vs full compute (dB)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
