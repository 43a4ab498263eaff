"""``moeca calibrate``: (re)measure the replay engine's wall-clock unit costs on this device."""
from __future__ import annotations

import argparse

from moeca.models.model_args import add_model_arguments, load_model_from_args
from moeca.policy.wallclock import COEFFICIENTS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate", help="measure the replay engine's wall-clock unit costs on this device (for --target-speedup)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time short replays of eight calibration schedules and full compute on this device and fit "
                    "the cost per step,\nper attention / shared-expert row, per routed pair, per reused row and "
                    "per forecast term (milliseconds, bookkeeping included).\n`moeca schedule derive "
                    "--target-speedup` predicts wall-clock time from them. The result is cached per device, torch "
                    "version,\nreplay-engine source, model weights, batch, dtype, sampler and threads in "
                    "$XDG_CACHE_HOME/moeca/calibration.json\n(~/.cache/moeca without XDG_CACHE_HOME; "
                    "MOECA_CACHE_DIR overrides); derive measures it on first use, this command redoes it.",
        epilog="example:\n  moeca calibrate --model demo --batch 16")
    add_model_arguments(p)
    p.add_argument("--batch", type=int, default=None,
                   help="samples per sampling call (moeca replay --samples; default 16, 1 with --diffusers)")
    p.add_argument("--sampler", choices=("rectified_flow", "ddpm", "ddim"), default=None,
                   help="sampler kind (default: the model's: rectified_flow or ddpm)")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="guidance scale; 1 = unguided (default 1.5)")
    p.add_argument("--cfg-mode", choices=("batched", "separate"), default="batched",
                   help="CFG as one batched call or two calls per step (default batched)")
    p.add_argument("--steps", type=int, default=10, help="steps of each calibration run (default 10)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; medians per step are fitted (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--max-fit-error", type=float, default=None,
                   help="largest median per-step error of the fit to accept (default 0.2; a noisier one is measured "
                        "again once, then refused)")
    p.set_defaults(func=cmd_calibrate)


def check_options(args: argparse.Namespace, default_batch: int) -> None:
    """Fill in ``--batch`` (``default_batch`` when not given) and refuse out-of-range options before anything
    loads; shared by ``moeca calibrate`` and ``moeca calibrate --diffusers``."""
    if args.batch is None:
        args.batch = default_batch
    for name, value, low in (("--batch", args.batch, 1), ("--steps", args.steps, 4), ("--repeats", args.repeats, 1),
                             ("--threads", args.threads, 1)):
        if value is not None and value < low:
            raise ValueError(f"{name} {value} must be >= {low}")
    if args.max_fit_error is not None and not args.max_fit_error > 0:
        raise ValueError(f"--max-fit-error {args.max_fit_error} must be a number > 0 (e.g. 0.3 for 30%)")


def print_costs(header: str, costs) -> None:
    """``header``, then each fitted coefficient of ``costs`` (a :class:`~moeca.policy.wallclock.WallClockCosts`)."""
    print(header)
    for c in COEFFICIENTS:
        print(f"  {c:18s} {getattr(costs, c):.6g}")
    print(f"  {'refresh_over_full':18s} {costs.refresh_over_full:.3g}  (its own full steps / full compute: ~1 on a "
          "machine that kept its speed)")


def cmd_calibrate(args: argparse.Namespace) -> int:
    # deferred: loads torch, and this module is imported at `moeca` start-up
    import torch

    from moeca.diffusion.samplers import SamplerConfig

    from .calibrate import ensure_costs

    check_options(args, default_batch=16)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    name, model = load_model_from_args(args, args.device)
    kind = args.sampler or ("rectified_flow" if model.config.objective == "rectified_flow" else "ddpm")
    sampler = SamplerConfig(kind=kind, cfg_scale=args.cfg_scale, cfg_mode=args.cfg_mode)
    limit = {} if args.max_fit_error is None else {"max_fit_error": args.max_fit_error}
    costs = ensure_costs(model, sampler, args.batch, recalibrate=True, steps=args.steps, repeats=args.repeats,
                         progress=lambda msg: print(msg, flush=True), **limit)
    print_costs(f"{name or args.checkpoint} on {costs.key['device']}, batch {args.batch}: full step "
                f"{costs.full_step_ms:.2f} ms; fit error {costs.fit_rel_error:.1%} per step", costs)
    return 0
