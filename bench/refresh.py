"""``moeca bench refresh``: the replays behind MoECa's refresh rule (README "Why this rule").

Demo model, 50 rectified-flow steps, CFG 1.5 batched; PSNR of each schedule's samples against full
compute from the same noise (``--samples`` samples) and the counted FLOPs ratio. Three groups:

- ``forecast``: FORA every ``N`` steps with plain reuse vs with the linear forecast (same FLOPs);
- ``sync``: full refreshes every 6 steps; in between attention reused or recomputed, and the shared
  and routed experts reused, 30% of their tokens recomputed, or recomputed in full (plain reuse): does
  refreshing the MoE while attention stays cached help?
- ``granularity``: the same refresh steps (every ``N``) with everything forecast per block (FORA +
  forecast) or per branch with current gates and newly routed pairs computed (MoECa's sync rule).
"""
from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from moeca.bench.results import pyplot, write_results
from moeca.diffusion.samplers import SamplerConfig
from moeca.evaluation.metrics import psnr
from moeca.models.registry import load_model
from moeca.policy.cost import UnitCosts
from moeca.policy.methods import Context, fora
from moeca.policy.methods.common import assemble
from moeca.policy.schedule import ALWAYS, REUSE, BlockRule, Rule, StepRule
from moeca.replay.driver import sample_batches
from moeca.replay.runtime import ReplayRuntime

NAME = "refresh"
COLUMNS = ["group", "setting", "flops_ratio", "flops_speedup", "psnr"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME,
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results", help="results folder (default bench/results)")
    p.add_argument("--samples", type=int, default=32, help="samples compared with full compute (default 32)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=run)


def schedules(config, sampler) -> list[tuple[str, str, object]]:
    """``(group, setting, schedule)`` for every replay of the benchmark."""
    S, L, E = sampler.num_steps, config.depth, config.num_experts

    def every(n: int, body: BlockRule, forecast: str = "none", method: str = "custom"):
        sync = set(fora.refresh_steps(fora.Config(interval=n), S))   # FORA's refresh steps, so groups pair up
        steps = [StepRule("compute", (BlockRule.full(E) if s in sync else body,) * L) for s in range(S)]
        return replace(assemble(method, config, sampler, steps, sync=sync), forecast=forecast)

    out = []
    for n in (3, 5):
        plain = fora.build(fora.Config(interval=n), Context(config, sampler))
        out += [("forecast", f"FORA every {n}, plain reuse", plain),
                ("forecast", f"FORA every {n}, linear forecast", replace(plain, forecast="linear"))]
    part = Rule.fraction(0.3)
    for attn in (REUSE, ALWAYS):
        for label, shared, expert in (("MoE reused", REUSE, REUSE), ("30% of shared+expert tokens", part, part),
                                      ("MoE recomputed", ALWAYS, ALWAYS)):
            if attn is ALWAYS and expert is ALWAYS:
                continue  # that is full compute
            out.append(("sync", f"attention {'reused' if attn is REUSE else 'recomputed'}, {label}",
                        every(6, BlockRule(attn=attn, shared=shared, experts=(expert,) * E))))
    branch = BlockRule(attn=REUSE, shared=REUSE, experts=(REUSE,) * E)
    for n in (3, 4, 5):
        block = fora.build(fora.Config(interval=n), Context(config, sampler))
        out += [("granularity", f"every {n}, block-level forecast", replace(block, forecast="linear")),
                ("granularity", f"every {n}, branch-level forecast", every(n, branch, "linear", "moeca"))]
    return out


def run(args: argparse.Namespace) -> int:
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    torch.set_num_threads(args.threads)
    model = load_model("demo", device="cpu")
    sampler = SamplerConfig(kind="rectified_flow", num_steps=50, cfg_scale=1.5, cfg_mode="batched")
    labels = torch.arange(args.samples) % model.config.num_classes
    full = sample_batches(model, sampler, labels, args.seed, 64)
    costs = UnitCosts.of(model.config)
    rows = []
    for group, setting, schedule in schedules(model.config, sampler):
        runtime = ReplayRuntime(schedule)
        cached = sample_batches(model, sampler, labels, args.seed, 64, runtime=runtime)
        done, total = runtime.counters.flops(costs)
        rows.append({"group": group, "setting": setting, "flops_ratio": done / total, "flops_speedup": total / done,
                     "psnr": float(psnr(cached, full).mean())})
        print(f"{group:12s} {setting:48s} FLOPs x{total / done:5.2f}  PSNR {rows[-1]['psnr']:6.2f} dB")
    cmd = f"moeca bench refresh --samples {args.samples} --seed {args.seed}"
    paths = write_results(NAME, rows, args.out, columns=COLUMNS, command=cmd,
                          title="Replays behind MoECa's refresh rule (demo model)",
                          meta={"samples": args.samples, "seed": args.seed, "sampler": sampler.to_dict()},
                          notes=f"Demo model, 50 rectified-flow steps, CFG 1.5 batched; PSNR against full compute "
                                f"from the same noise on {args.samples} samples; FLOPs ratio from counted rows.",
                          plot=lambda path: _plot(rows, path))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _plot(rows, path) -> None:
    plt = pyplot()
    groups = list(dict.fromkeys(r["group"] for r in rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.6), squeeze=False)
    for ax, g in zip(axes[0], groups):
        sub = [r for r in rows if r["group"] == g]
        ax.barh(range(len(sub)), [r["psnr"] for r in sub], color="tab:orange")
        ax.set_yticks(range(len(sub)), [f"{r['setting']} ({r['flops_speedup']:.2f}x)" for r in sub], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("PSNR vs full compute (dB)")
        ax.set_title(g, fontsize=10)
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
