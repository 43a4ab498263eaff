"""``moeca bench ablation``: each component of MoECa's default rule, with and without it, at equal speed.

For every wall-clock target (``--targets``, the speedup predicted from this device's calibrated unit
costs, ``moeca calibrate``) the default rule and one variant per component are derived from the same
trace, so each pair has the same predicted wall-clock speedup, and replayed against full compute in this
process (measured speedup: median of the ``--repeats`` back-to-back full/cached ratios on ``--timing-samples`` samples; PSNR/SSIM against
full compute from the same noise on ``--quality-samples`` samples; on the demo model also class accuracy
and Frechet distance). Variants:

- ``moeca``: the default (drift-placed synchronized refreshes, linear forecast, the forecast level that
  fits more refreshes: ``forecast_level="auto"``);
- ``- drift placement``: the same rule with evenly spaced refreshes;
- ``- forecast``: the same rule reusing cached outputs plainly (its cheaper forecast steps buy it more
  refreshes at the same predicted speed);
- ``branch level`` / ``routing level`` / ``token level``: the rule with its forecast level fixed (router and
  newly routed pairs computed, branches forecast with the current gates / the same, but only tokens whose
  routed experts changed since the last refresh forecast per branch, the others per token / no router, each
  block's MoE output forecast per token);
- ``- folded stack``: the engine forecasts the token-level steps unit by unit with the exact gates
  (``ReplayRuntime(fold=False)``, priced so by the derivation) instead of the folded stack sum.

A variant whose target is out of reach on this device is listed with the reachable maximum.
"""
from __future__ import annotations

import argparse

import torch

from moeca.bench.results import parse_targets, pyplot, write_results
from moeca.cli.schedule import load_summary
from moeca.diffusion.samplers import SamplerConfig
from moeca.models.registry import load_traced_model
from moeca.policy.derive import DeriveConfig, derive_schedule
from moeca.replay.calibrate import ensure_costs
from moeca.replay.driver import replay_compare
from moeca.replay.runtime import ReplayRuntime
from moeca.tracer import resolve_labels

NAME = "ablation"
COLUMNS = ["target", "variant", "level", "refreshes", "predicted_speedup", "speedup", "flops_speedup", "psnr", "ssim",
           "accuracy_cached", "fd_full", "fd_cached", "levels", "note"]
VARIANTS = (("moeca", {}), ("- drift placement", {"placement": "even"}), ("- forecast", {"forecast": "none"}),
            ("branch level", {"forecast_level": "branch"}), ("routing level", {"forecast_level": "routing"}),
            ("token level", {"forecast_level": "token"}),
            ("- folded stack", {"fold": False}))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME,
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", required=True, help="trace directory of the model (moeca trace)")
    p.add_argument("--checkpoint", default=None, help="the model's weights when run.json names none")
    p.add_argument("--targets", default="1.5,2", help="wall-clock speedup targets (comma-separated; default 1.5,2)")
    p.add_argument("--variants", default=",".join(v for v, _ in VARIANTS),
                   help="the variants to run, comma-separated (default: all of " + ", ".join(v for v, _ in VARIANTS) + ")")
    p.add_argument("--timing-samples", type=int, default=16, help="timed batch (default 16)")
    p.add_argument("--quality-samples", type=int, default=128, help="samples compared with full compute (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats, medians (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true",
                   help="time full compute and every variant with the model compiled by torch.compile (each new "
                        "schedule compiles its kinds of step in its warm-up: minutes per variant on a CPU)")
    p.add_argument("--out", default="bench/results", help="results folder (default bench/results)")
    p.add_argument("--name", default=NAME, help=f"results file name, NAME.json/.md/.png (default {NAME}; e.g. one per "
                                                "model, so both are kept)")
    p.set_defaults(func=run)


def _variants(text: str) -> list[tuple[str, dict]]:
    known = dict(VARIANTS)
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in known]
    if unknown or not names:
        raise ValueError(f"--variants {text!r}: {', '.join(unknown) or 'none given'}; choose from "
                         + ", ".join(known))
    return [(v, known[v]) for v in names]


def level_note(levels: dict | None) -> str | None:
    """``token 23 refreshes, 1.2 ms/forecast step; branch 14, 6.3 ms`` from a schedule's ``provenance.levels``."""
    if not levels:
        return None
    return "; ".join(f"{lv} {c['refreshes']} refreshes, {c['forecast_step_ms']:.3g} ms/forecast step"
                     if c.get("forecast_step_ms") is not None else f"{lv} {c['refreshes']} refreshes"
                     for lv, c in levels.items())


def run(args: argparse.Namespace) -> int:
    if not args.name or any(ch in args.name for ch in "/\\") or args.name.startswith("."):
        raise ValueError(f"--name {args.name!r}: give a plain file name without folders (e.g. ablation_demo)")
    targets = parse_targets(args.targets)
    chosen = _variants(args.variants)
    for name, value, low in (("--timing-samples", args.timing_samples, 1), ("--quality-samples", args.quality_samples, 1),
                             ("--repeats", args.repeats, 1), ("--threads", args.threads, 1)):
        if value is not None and value < low:
            raise ValueError(f"{name} {value} must be >= {low}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    summary, meta = load_summary([args.trace])
    model = load_traced_model(meta, args.checkpoint, device=args.device)
    sampler = SamplerConfig(**meta["sampler"])
    costs = ensure_costs(model, sampler, args.timing_samples, progress=lambda msg: print(msg, flush=True))
    n_cls = model.config.num_classes
    timing = resolve_labels(n_cls, samples=args.timing_samples)
    quality = resolve_labels(n_cls, samples=args.quality_samples)
    rows, reference = [], None
    for target in targets:
        for variant, knobs in chosen:
            row = {"target": f"{target:g}x", "variant": variant}
            try:
                schedule = derive_schedule(summary, meta, DeriveConfig(target_speedup=target, target="wallclock",
                                                                       **knobs), costs)
            except ValueError as exc:
                rows.append({**row, "note": str(exc).split(";")[0]})
                print(f"{target:g}x {variant}: {exc}", flush=True)
                continue
            engine = {"runtime_factory": lambda s: ReplayRuntime(s, fold=False)} if knobs.get("fold") is False else {}
            result = replay_compare(model, schedule, sampler, timing, seed=args.seed, repeats=args.repeats,
                                    quality_labels=quality, quality_reference=reference, progress=False,
                                    compile=args.compile, **engine)
            reference = result.quality_full
            r = result.report
            rows.append({**row, "level": schedule.provenance.get("forecast_level"),
                         "refreshes": len(schedule.sync_refresh_steps),
                         "predicted_speedup": schedule.provenance["predicted_speedup"], "speedup": r.speedup,
                         "flops_speedup": r.flops_speedup, "psnr": r.psnr_quality_mean, "ssim": r.ssim_quality_mean,
                         "accuracy_cached": r.accuracy_cached, "fd_full": r.fd_full, "fd_cached": r.fd_cached,
                         "levels": level_note(schedule.provenance.get("levels"))})
            print(f"{target:g}x {variant:20s} {rows[-1]['level']:6s} refreshes {rows[-1]['refreshes']:2d} predicted "
                  f"{rows[-1]['predicted_speedup']:.2f}x measured {r.speedup:.2f}x PSNR {r.psnr_quality_mean:.2f} dB",
                  flush=True)
    cmd = (f"moeca bench ablation --trace {args.trace} --targets {args.targets}"
           + (f" --variants '{args.variants}'" if len(chosen) < len(VARIANTS) else "") + f" --timing-samples "
           f"{args.timing_samples} --quality-samples {args.quality_samples} --repeats {args.repeats}"
           + (f" --threads {args.threads}" if args.threads else "") + (" --compile" if args.compile else "")
           + (f" --name {args.name}" if args.name != NAME else ""))
    paths = write_results(args.name, rows, args.out, columns=COLUMNS, command=cmd, plot=lambda path: plot(rows, path),
                          title="Ablations of MoECa's default rule at equal predicted wall-clock speed",
                          meta={"trace": args.trace, "sampler": sampler.to_dict(), "calibration": dict(costs.key),
                                "compiled": args.compile,
                                "timing_samples": args.timing_samples, "quality_samples": args.quality_samples},
                          notes="Each target's variants are derived for the same predicted wall-clock speedup "
                                "(this device's calibrated unit costs) and replayed against full compute from the "
                                "same noise; PSNR/SSIM on the quality samples. levels: what the derivation priced "
                                "for each forecast level it tried (`auto` tries branch, routing and token and takes "
                                "the one that fits the most refreshes, the first of them on a tie): refreshes that fit the target and predicted ms "
                                "per forecast step.")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def plot(rows: list[dict], path) -> None:
    """PSNR against measured speedup, one marker per variant and target (targets joined per variant), so
    a component's worth reads as the vertical gap at equal measured speed. Rows without a measurement
    (target out of reach) are left out."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = dict(zip([v for v, _ in VARIANTS], "o^sDXvP"))
    for variant, _ in VARIANTS:
        pts = sorted((r["speedup"], r["psnr"], r["target"]) for r in rows
                     if r["variant"] == variant and r.get("speedup") is not None and r.get("psnr") is not None)
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[variant], lw=2.2 if variant == "moeca" else 1.2,
                ls="-" if variant == "moeca" else "--", label=variant)
        if variant == "moeca":
            for x, y, target in pts:
                ax.annotate(f"target {target}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("measured speedup over full compute (x)")
    ax.set_ylabel("PSNR vs full compute (dB)")
    ax.set_title("MoECa's components at equal predicted wall-clock speed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)

