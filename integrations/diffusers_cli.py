"""``moeca trace --diffusers ...`` and ``moeca replay --diffusers ...``: the HiDream family's commands.

:func:`register` (listed in ``moeca.cli.main``) adds the family's options to the ``trace`` and
``replay`` commands the tracer and the replay engine register, and runs the family's version of the
command when ``--diffusers`` or ``--diffusers-config`` is given (the stages themselves know nothing of
it). The integration, and so diffusers (an optional extra), is imported only then, inside the
functions: building the CLI never imports diffusers, and a missing or unsupported extra or an unknown
transformer class becomes one clear error line instead of a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
from typing import Callable, Iterator

from moeca.common.outputs import atomic_write_text, output_dir
from moeca.policy.schedule import Schedule
from moeca.replay.calibrate_cli import check_options, print_costs
from moeca.tracer.cli import format_summary

CONFIG_NAMES = ("tiny", "tiny-4e", "bench", "hidream-i1")
"""Named random-weight configs (``moeca.integrations.diffusers.sampling.CONFIGS``)."""


def add_diffusers_arguments(parser: argparse.ArgumentParser) -> None:
    """``--diffusers``, ``--diffusers-config`` and the HiDream sampling options, in their own group."""
    g = parser.add_argument_group("diffusers: HiDream-I1 (needs the extra: pip install \"moeca[diffusers]\")")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--diffusers", metavar="PATH", default=None,
                     help="a local from_pretrained folder of HiDreamImageTransformer2DModel (the transformer's, or "
                          "a pipeline's with transformer/); no hub access")
    src.add_argument("--diffusers-config", metavar="NAME", choices=CONFIG_NAMES, default=None,
                     help=f"random weights of a named config: {', '.join(CONFIG_NAMES)} (tiny = diffusers' own test "
                          "config; hidream-i1 = the real shape, GPU only)")
    g.add_argument("--embeddings", metavar="FILE", default=None,
                   help="text conditioning: .safetensors/.pt with prompt_embeds_t5, prompt_embeds_llama3, "
                        "pooled_prompt_embeds (and negative_*) from pipe.encode_prompt; default: random (named configs)")
    g.add_argument("--height", type=int, default=None, help="image height in pixels (latents are 1/8; default: "
                                                            "256 for tiny configs, 1024 otherwise)")
    g.add_argument("--width", type=int, default=None, help="image width in pixels (default: as --height)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="model dtype (default: float32 on the CPU, bfloat16 on CUDA)")
    g.add_argument("--flow-shift", type=float, default=3.0, help="sigma shift of the Euler sampler (HiDream-I1-Full: 3.0)")


def wants_diffusers(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "diffusers", None) or getattr(args, "diffusers_config", None))


def register(sub: argparse._SubParsersAction) -> None:
    """Extend ``moeca trace``, ``moeca replay`` and ``moeca calibrate`` (registered before this) with the
    diffusers family."""
    for command, run in (("trace", run_trace), ("replay", run_replay), ("calibrate", run_calibrate)):
        parser = sub.choices[command]
        add_diffusers_arguments(parser)
        parser.set_defaults(func=_either(parser.get_default("func"), run))


def _either(native: Callable, family: Callable) -> Callable:
    def run(args: argparse.Namespace) -> int:
        if not wants_diffusers(args):
            return native(args)
        if args.model or args.checkpoint or args.random_init:
            raise ValueError("--diffusers/--diffusers-config name the model; leave out --model, --checkpoint and "
                             "--random-init (they are for moeca's own DiT-MoE models)")
        return family(args)
    return run


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """The integration's ImportError (missing extra, unsupported version) and TypeError (unknown transformer
    class) as ValueError, which the CLI prints as ``moeca CMD: error: ...``."""
    try:
        yield
    except (ImportError, TypeError) as exc:
        raise ValueError(str(exc)) from None


def _load(args: argparse.Namespace, samples: int):
    """(transformer, source, conditional text, unconditional text, latent size) from the options."""
    # deferred: loads torch, and this module is imported at `moeca` start-up
    import torch

    # deferred: the optional [diffusers] extra
    from moeca.integrations.diffusers.sampling import (CONFIGS, TEXT_LENGTHS, build_transformer, load_conditioning,
                                                       load_transformer, random_conditioning)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.diffusers:
        transformer, source = load_transformer(args.diffusers, device=device, dtype=dtype), str(args.diffusers)
    else:
        seed = getattr(args, "model_seed", 0) or 0
        transformer, source = build_transformer(args.diffusers_config, seed=seed, device=device, dtype=dtype), \
            f"config:{args.diffusers_config}"
    if args.embeddings:
        cond, uncond = load_conditioning(args.embeddings)
    elif args.diffusers_config:
        cond, uncond = random_conditioning(CONFIGS[args.diffusers_config], samples, seed=getattr(args, "seed", 0),
                                           lengths=TEXT_LENGTHS[args.diffusers_config])
    else:
        raise ValueError("--diffusers with real weights needs --embeddings FILE (the tensors of pipe.encode_prompt); "
                         "random text conditioning is only for --diffusers-config")
    tiny = (args.diffusers_config or "").startswith("tiny")
    height = args.height or (256 if tiny else 1024)
    width = args.width or height
    patch = 8 * int(transformer.config.patch_size)
    if height % patch or width % patch or height < patch or width < patch:
        raise ValueError(f"--height/--width {height}x{width} must be positive multiples of {patch} (VAE 8 x patch "
                         f"{transformer.config.patch_size})")
    return transformer, source, cond, uncond, (height // 8, width // 8)


def run_trace(args: argparse.Namespace) -> int:
    # deferred: loads pyarrow, and this module is imported at `moeca` start-up
    from moeca.tracer.schema import DEFAULT_LAGS
    if args.samples is not None and args.samples < 1:
        raise ValueError(f"--samples {args.samples} must be >= 1")
    with _user_errors():
        # deferred: the optional [diffusers] extra
        from moeca.integrations.diffusers.sampling import FlowSampler
        from moeca.integrations.diffusers.trace import DiffusersTraceConfig, trace_diffusers
        if args.resume and args.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        samples = args.samples or 2
        transformer, source, cond, uncond, latent = _load(args, samples)
        prompts = tuple(i % cond.batch for i in range(samples))
        sampler = FlowSampler(num_steps=args.steps or 50, cfg_scale=5.0 if args.cfg_scale is None else args.cfg_scale,
                              shift=args.flow_shift)
        config = DiffusersTraceConfig(sampler=sampler, prompts=prompts, latent_size=latent, seed=args.seed,
                                      batch_size=min(args.batch_size, samples),
                                      lags=args.lags if args.lags is not None else DEFAULT_LAGS)
        out = trace_diffusers(transformer, args.out, config, cond, uncond, source=source, overwrite=args.overwrite,
                              resume=args.resume)
    print(format_summary(out))
    return 0


def run_replay(args: argparse.Namespace) -> int:
    # deferred: loads torch, and this module is imported at `moeca` start-up
    import torch

    if args.samples < 1 or args.repeats < 1:
        raise ValueError("--samples and --repeats must be >= 1")
    with _user_errors():
        # deferred: the optional [diffusers] extra
        from moeca.integrations.diffusers.apply import check_identity, none_schedule
        from moeca.integrations.diffusers.hidream import moe_blocks
        from moeca.integrations.diffusers.measure import Variant, compare
        from moeca.integrations.diffusers.sampling import FlowSampler, initial_noise
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        schedule = Schedule.load(args.schedule)
        transformer, _, cond, uncond, latent = _load(args, args.samples)
        check_identity(schedule, transformer, moe_blocks(transformer))
        sampler = FlowSampler(num_steps=schedule.num_steps, shift=args.flow_shift,
                              cfg_scale=(args.cfg_scale if args.cfg_scale is not None else 5.0) if schedule.sampler.guided
                              else 1.0)
        prompts = [i % cond.batch for i in range(args.samples)]
        noise = initial_noise((transformer.config.in_channels, *latent), [args.seed + i for i in range(args.samples)])
        full = none_schedule(transformer, schedule.num_steps, max_tokens=schedule.model.num_tokens,
                             cfg_scale=sampler.cfg_scale)
        variants = [Variant("stock forward", None), Variant("moeca full compute", full),
                    Variant(f"{schedule.method} schedule", schedule)]
        rows = compare(transformer, variants, sampler, noise, cond.select(prompts), uncond.select(prompts),
                       repeats=args.repeats)
    report = {"schedule": str(args.schedule), "model": schedule.model.name, "samples": args.samples,
              "steps": schedule.num_steps, "cfg_scale": sampler.cfg_scale, "latent_size": list(latent),
              "device": str(next(transformer.parameters()).device), "rows": rows}
    cols = ("variant", "ms_step", "speed", "flops_ratio", "speed_over_flops", "refresh_ms", "forecast_ms",
            "max_abs_diff", "rel_l2", "psnr_db", "cache_mb")
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |"
           for r in rows]
    text = "\n".join(md)
    with output_dir(args.out, inputs=[("--schedule", args.schedule)], command="moeca replay --diffusers") as tmp:
        atomic_write_text(tmp / "report.json", json.dumps(report, indent=1, default=float))
        atomic_write_text(tmp / "report.md", f"# moeca replay on {schedule.model.name}\n\n{text}\n")
    print(text)
    predicted = schedule.provenance.get("predicted_speedup")
    if predicted is not None:     # a wall-clock target: the calibrated prediction against this replay
        measured = rows[2]["speed"]
        print(f"wall-clock speedup: predicted {predicted:.2f}x, measured {measured:.2f}x ({measured / predicted - 1:+.1%}) "
              f"against the stock forward")
    print(f"wrote {args.out}/report.json, {args.out}/report.md")
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    """``moeca calibrate --diffusers PATH | --diffusers-config NAME``: (re)measure the HiDream engine's unit
    costs for a replay at ``--batch`` samples of ``--height`` x ``--width`` (the text lengths of
    ``--embeddings``, or the named config's random text)."""
    # deferred: loads torch, and this module is imported at `moeca` start-up
    import torch

    check_options(args, default_batch=1)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with _user_errors():
        # deferred: the optional [diffusers] extra
        from moeca.integrations.diffusers.calibrate import Setting, ensure_costs
        transformer, source, cond, _, latent = _load(args, args.batch)
        setting = Setting(batch=args.batch, latent_size=latent,
                          text_lengths=(int(cond.t5.shape[1]), int(cond.llama.shape[2])), cfg_scale=args.cfg_scale)
        limit = {} if args.max_fit_error is None else {"max_fit_error": args.max_fit_error}
        costs = ensure_costs(transformer, setting, recalibrate=True, steps=args.steps, repeats=args.repeats,
                             progress=lambda msg: print(msg, flush=True), **limit)
    print_costs(f"{source} on {costs.key['device']}, batch {args.batch}, {costs.key['tokens']} tokens: stock "
                f"step {costs.full_step_ms:.2f} ms; fit error {costs.fit_rel_error:.1%} per step", costs)
    return 0


def trace_costs(meta: dict, args: argparse.Namespace):
    """``moeca schedule derive --target-speedup`` on a diffusers trace: the HiDream engine's calibrated unit
    costs for a replay at ``args.batch`` samples on ``args.device`` (measured and cached on first use,
    :mod:`moeca.integrations.diffusers.calibrate`); the transformer is rebuilt from the trace (``--checkpoint``:
    its ``from_pretrained`` folder when the trace's is elsewhere)."""
    with _user_errors():
        # deferred: the optional [diffusers] extra
        from moeca.integrations.diffusers.calibrate import ensure_costs, setting_of_trace, transformer_of_trace
        transformer = transformer_of_trace(meta, args.checkpoint, device=args.device)
        return ensure_costs(transformer, setting_of_trace(meta, args.batch),
                            progress=lambda msg: print(msg, flush=True))
