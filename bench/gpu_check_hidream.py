"""GPU check of MoECa on HiDream-I1's real transformer shape (``bench/gpu_check.sh --hidream``), bf16.

``HiDreamImageTransformer2DModel`` with HiDream-I1's config (16 double + 32 single-stream blocks,
hidden 2560, 4 routed experts top-2 + shared: 17B parameters) and random weights built directly on the
GPU in bfloat16, one prompt with batched CFG (2 rows per call), ``--size`` pixels (default 768: the
caches fit an 80 GB H100 next to the 34 GB of weights; 1024 needs an H200), 128 T5 + 2 x 128 Llama text
tokens, ``--steps`` flow-matching Euler steps. Variants, interleaved after a warm-up of each
(:func:`moeca.integrations.diffusers.measure.compare`): the stock forward, moeca's full compute (the
routed experts through moeca's sync-free grouped dispatch instead of the stock per-expert loop with a
host sync) and the MoECa sync rule refreshing every ``N`` steps (``--intervals``) at each forecast level
(``--levels``: ``branch`` forecast steps run the router and the newly routed pairs and forecast the rest
linearly; ``token`` forecast steps run no block, one folded sum over the stack). Random weights: speed,
not quality. Needs diffusers (the extra) and CUDA; it is not part of the tests. ``--dry-run`` runs the
same flow on the CPU at the ``tiny-4e`` config (float32, 3 steps) and writes ``gpu_check_hidream_dry_run.*``.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

import torch

from moeca.bench.gpu_check import NoCuda, moeca_shaped, require_cuda
from moeca.bench.results import write_results
from moeca.diffusion.samplers import SamplerConfig
from moeca.policy.schedule import REUSE, StepRule


def token_level(schedule):
    """The same refresh steps with token-level forecast steps: every block's attention and whole MoE output
    forecast (no router), which the HiDream engine runs as one folded sum over the stack."""
    sync = set(schedule.sync_refresh_steps)
    steps = tuple(st if s in sync else StepRule(st.model, tuple(replace(r, moe=REUSE) for r in st.blocks))
                  for s, st in enumerate(schedule.steps))
    return replace(schedule, steps=steps)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/gpu_check.sh --hidream", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results", help="folder for gpu_check_hidream.json / .md")
    p.add_argument("--size", type=int, default=768, help="image size in pixels (latents 1/8; default 768)")
    p.add_argument("--steps", type=int, default=30, help="sampling steps (default 30)")
    p.add_argument("--intervals", default="2,3", help="MoECa refresh intervals (default 2,3)")
    p.add_argument("--levels", default="branch,token", help="forecast levels of the MoECa variants (default branch,token)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved timed rounds (default 2)")
    p.add_argument("--dry-run", action="store_true", help="tiny config on the CPU: checks the script only")
    args = p.parse_args(argv)

    # deferred: the optional [diffusers] extra
    from moeca.integrations.diffusers.apply import none_schedule
    from moeca.integrations.diffusers.hidream import view_config
    from moeca.integrations.diffusers.measure import Variant, compare
    from moeca.integrations.diffusers.sampling import (CONFIGS, FlowSampler, build_transformer, initial_noise,
                                                       random_conditioning)

    if args.dry_run:
        config, device, dtype, size, steps, lengths, name = "tiny-4e", torch.device("cpu"), torch.float32, 128, 3, \
            (4, 4), "gpu_check_hidream_dry_run"
    else:
        try:
            device = require_cuda()
        except NoCuda as exc:
            print(f"gpu_check --hidream: error: {exc}", file=sys.stderr)
            return 2
        config, dtype, size, steps, lengths, name = "hidream-i1", torch.bfloat16, args.size, args.steps, (128, 128), \
            "gpu_check_hidream"
    intervals = [int(v) for v in args.intervals.split(",") if v.strip()]
    start = time.perf_counter()
    model = build_transformer(config, device=device, dtype=dtype)
    cond, uncond = random_conditioning(CONFIGS[config], 1, seed=0, lengths=lengths)
    latent = (size // 8, size // 8)
    tokens = latent[0] * latent[1] // 4 + cond.tokens
    sampler = FlowSampler(num_steps=steps)
    view = view_config(model, tokens)
    smp = SamplerConfig(kind="rectified_flow", num_steps=steps, cfg_scale=sampler.cfg_scale, cfg_mode="batched")
    variants = [Variant("stock forward", None), Variant("moeca full compute", none_schedule(model, steps, max_tokens=tokens))]
    levels = [v.strip() for v in args.levels.split(",") if v.strip()]
    if not levels or any(v not in ("branch", "token") for v in levels):
        raise SystemExit(f"--levels {args.levels!r}: give branch and/or token")
    variants += [Variant(f"MoECa {level} level, refresh every {n}", token_level(moeca_shaped(view, smp, n))
                         if level == "token" else moeca_shaped(view, smp, n)) for level in levels for n in intervals]
    rows = compare(model, variants, sampler, initial_noise((model.config.in_channels, *latent), [0]), cond, uncond,
                   repeats=args.repeats, progress=lambda r, vs: print(f"round {r + 1} done", flush=True))
    meta = {"config": config, "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
            "dtype": str(dtype), "size": size, "steps": steps, "tokens": tokens, "repeats": args.repeats,
            "parameters": sum(q.numel() for q in model.parameters()), "elapsed_s": time.perf_counter() - start,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
            "dry_run": args.dry_run}
    paths = write_results(name, rows, args.out, meta=meta,
                          title="GPU check: HiDream-I1 transformer (random weights), stock vs moeca vs MoECa",
                          notes=f"{meta['device']}, {dtype}, {size}x{size} px, {steps} steps, {tokens} tokens per "
                                "single-stream block, CFG batched.",
                          command="bench/gpu_check.sh --hidream " + " ".join(argv if argv is not None else sys.argv[1:]))
    print("wrote " + ", ".join(str(v) for v in paths.values()))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
