"""GPU speed check (issue 6): full compute vs MoECa vs ToCa vs FORA at matched reuse fractions.

Run through ``bench/gpu_check.sh`` on a machine with one CUDA GPU (H100/H200 class); it is not part of
the tests or CI. For each shape (S/2-8E2A and XL/2-8E2A, random weights built directly on the GPU, bf16),
batch 8 with batched CFG (16 rows per call), 50 rectified-flow steps, and each target reuse fraction
``R`` (share of block work reused, FORA interval ``N`` gives ``R = 1 - 1/N``):

- ``fora``: interval ``N``;
- ``toca``: the published ToCa schedule with the ``fresh_threshold`` whose predicted FLOPs ratio is
  closest to FORA's;
- ``moeca``: the shape of a derived MoECa schedule (``moeca schedule derive``, sync rule) with FORA's
  refresh steps: every ``N``-th step recomputes every unit; on the others the router runs in every
  block, newly routed (token, expert) pairs are computed and every other branch, the shared expert and
  attention are forecast linearly and combined with the current gate weights (its FLOPs ratio is
  FORA's plus the router and the new pairs, measured);
- ``fora-forecast`` (ablation): FORA with the same linear forecast of reused outputs.

Random weights have no meaningful drift, so this checks speed, not quality.

Every schedule runs through the replay runtime; timings are medians of ``repeats`` runs after one
warm-up, CUDA-synchronised, full compute measured in the same process. Prints ms per step and
speedups, writes ``gpu_check.json`` / ``.md`` (``moeca.bench.results.write_results``). Exits 2 with a
message when CUDA is absent. ``--max-seconds`` bounds the run: measurements that would start after it
are skipped and listed in the JSON.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace

SHAPES = ("S/2-8E2A", "XL/2-8E2A")
INTERVALS = (2, 3, 4)
"""FORA intervals; reuse fractions 1/2, 2/3, 3/4."""
COLUMNS = ["shape", "method", "target_reuse", "knob", "predicted_flops_ratio", "flops_ratio", "ms_per_step",
           "speedup", "reuse_attn", "reuse_expert", "cache_mb"]


class NoCuda(RuntimeError):
    pass


def require_cuda():
    """The CUDA device, or :class:`NoCuda` with a message saying what to do."""
    import torch
    if not torch.cuda.is_available():
        raise NoCuda("gpu_check needs a CUDA GPU (H100/H200 class) and none is visible to torch "
                     f"(torch {torch.__version__}, cuda build {torch.version.cuda}); run it on a GPU machine. "
                     "It is a manual check, not part of the tests.")
    return torch.device("cuda")


# ----------------------------------------------------------------------------- schedules (CPU-side, tested)
def sampler_config(num_steps: int = 50):
    from moeca.models.samplers import SamplerConfig
    return SamplerConfig(kind="rectified_flow", num_steps=num_steps, cfg_scale=1.5, cfg_mode="batched")


def moeca_shaped(config, sampler, interval: int):
    """A MoECa schedule of the sync rule with refreshes every ``interval`` steps: those steps compute
    every unit; the others forecast every unit linearly (the router and newly routed pairs computed)."""
    from moeca.policy.baselines.common import assemble
    from moeca.policy.schedule import NEVER, BlockRule, StepRule
    S, L, E = sampler.num_steps, config.depth, config.num_experts
    sync = set(range(0, S, interval))
    body = tuple(BlockRule(attn=NEVER, shared=NEVER, experts=(NEVER,) * E) for _ in range(L))
    full = tuple(BlockRule.full(E) for _ in range(L))
    steps = [StepRule("compute", full if s in sync else body) for s in range(S)]
    from dataclasses import replace
    return replace(assemble("moeca", config, sampler, steps, sync=sync,
                            provenance={"gpu_check": f"MoECa sync rule, refresh every {interval} steps"}),
                   forecast="linear")


def matched_schedules(config, sampler, interval: int) -> dict:
    """``{method: (schedule, knob)}``: FORA ``interval``, FORA + forecast and MoECa with the same refresh
    steps, and ToCa with the fresh threshold whose predicted FLOPs ratio is closest to FORA's."""
    from dataclasses import replace

    from moeca.policy.baselines import fora, toca
    f_sched = fora.build_schedule(fora.ForaConfig(interval=interval), config, sampler)
    goal = f_sched.predicted_flops_ratio
    best = min(range(2, 25), key=lambda n: abs(toca.build_schedule(
        toca.TocaConfig(fresh_threshold=n), config, sampler).predicted_flops_ratio - goal))
    t_sched = toca.build_schedule(toca.TocaConfig(fresh_threshold=best), config, sampler)
    ff_sched = replace(f_sched, method="custom", forecast="linear")
    return {"fora": (f_sched, f"interval={interval}"), "fora-forecast": (ff_sched, f"interval={interval}"),
            "toca": (t_sched, f"fresh_threshold={best}"),
            "moeca": (moeca_shaped(config, sampler, interval), f"interval={interval}")}


# ----------------------------------------------------------------------------- GPU part
def build_model(name: str, device, dtype, seed: int = 0):
    """Random-weight model of preset ``name`` initialised directly on ``device`` (no CPU copy of XL)."""
    import torch

    from moeca.models.config import get_preset
    from moeca.models.dit_moe import DiTMoE
    from moeca.models.registry import randomize_zero_init
    config = replace(get_preset(name), objective="rectified_flow")
    torch.manual_seed(seed)
    with torch.device(device):
        model = DiTMoE(config)
    randomize_zero_init(model, seed)
    return model.to(dtype=dtype).eval()


def time_runs(fn, repeats: int) -> float:
    import torch
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(shapes=SHAPES, intervals=INTERVALS, batch: int = 8, num_steps: int = 50, repeats: int = 3,
        max_seconds: float = 420.0, log=print) -> tuple[list[dict], dict]:
    import torch

    from moeca.models.samplers import sample
    from moeca.policy.baselines.runtimes import make_runtime
    from moeca.policy.cost import UnitCosts
    device = require_cuda()
    start = time.perf_counter()
    sampler = sampler_config(num_steps)
    rows, skipped = [], []
    for shape in shapes:
        if time.perf_counter() - start > max_seconds:
            skipped.append(f"{shape}: whole shape (time budget)")
            continue
        model = build_model(shape, device, torch.bfloat16)
        labels = torch.arange(batch) % model.config.num_classes
        full_s = time_runs(lambda: sample(model, sampler, labels, seed=0), repeats)
        rows.append({"shape": shape, "method": "full", "target_reuse": 0.0, "knob": "", "predicted_flops_ratio": 1.0,
                     "flops_ratio": 1.0, "ms_per_step": 1000 * full_s / num_steps, "speedup": 1.0,
                     "reuse_attn": 0.0, "reuse_expert": 0.0, "cache_mb": 0.0})
        log(f"{shape}: full compute {1000 * full_s / num_steps:.2f} ms/step (batch {batch}, bf16)")
        for interval in intervals:
            for method, (schedule, knob) in matched_schedules(model.config, sampler, interval).items():
                if time.perf_counter() - start > max_seconds:
                    skipped.append(f"{shape} {method} {knob} (time budget)")
                    continue
                rt = make_runtime(schedule)

                def cached():
                    with model.use_runtime(rt):
                        sample(model, sampler, labels, seed=0)

                t = time_runs(cached, repeats)
                done, total = rt.counters.flops(UnitCosts.of(model.config))
                reuse = rt.counters.reuse_fractions()
                row = {"shape": shape, "method": method, "target_reuse": round(1 - 1 / interval, 4), "knob": knob,
                       "predicted_flops_ratio": schedule.predicted_flops_ratio, "flops_ratio": done / total,
                       "ms_per_step": 1000 * t / num_steps, "speedup": full_s / t,
                       "reuse_attn": float(reuse["attn"]), "reuse_expert": float(reuse["expert"]),
                       "cache_mb": rt.peak_cache_bytes / 2 ** 20}
                rows.append(row)
                log(f"{shape}: {method:6s} R={row['target_reuse']:.2f} ({knob}) {row['ms_per_step']:.2f} ms/step, "
                    f"speedup {row['speedup']:.2f}x, FLOPs ratio {row['flops_ratio']:.3f} "
                    f"(FLOPs speedup {1 / row['flops_ratio']:.2f}x)")
        model = None  # free the GPU memory before the next shape
        torch.cuda.empty_cache()
    meta = {"batch": batch, "num_steps": num_steps, "repeats": repeats, "dtype": "bfloat16", "cfg": "batched 1.5",
            "device": torch.cuda.get_device_name(0), "elapsed_s": time.perf_counter() - start, "skipped": skipped}
    return rows, meta


def profile(shape: str, batch: int = 8, num_steps: int = 12, interval: int = 2, log=print) -> None:
    """Where a MoECa replay spends its time on the GPU: per-step wall time of refresh and forecast steps
    (CUDA-synchronised), then ``torch.profiler`` tables (host and device time per op) of one run."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from moeca.models.samplers import sample
    from moeca.policy.baselines.runtimes import make_runtime
    model = build_model(shape, require_cuda(), torch.bfloat16)
    sampler = sampler_config(num_steps)
    schedule = moeca_shaped(model.config, sampler, interval)
    labels = torch.arange(batch) % model.config.num_classes
    runtime = make_runtime(schedule)
    per_step: dict[int, list[float]] = {}
    forward = model.forward

    def timed_forward(x, t, y, ctx=None):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = forward(x, t, y, ctx)
        torch.cuda.synchronize()
        per_step.setdefault(ctx.step, []).append(time.perf_counter() - start)
        return out

    model.forward = timed_forward
    for _ in range(2):
        with model.use_runtime(runtime):
            sample(model, sampler, labels, seed=0)
    model.forward = forward
    ms = {s: 1000 * statistics.median(v) for s, v in sorted(per_step.items())}
    log(f"{shape}: refresh steps ms {[round(v, 1) for s, v in ms.items() if schedule.is_sync(s)]}")
    log(f"{shape}: forecast steps ms {[round(v, 1) for s, v in ms.items() if not schedule.is_sync(s)]}")
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with model.use_runtime(runtime):
            sample(model, sampler, labels, seed=0)
        torch.cuda.synchronize()
    log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    log(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=10))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results", help="folder for gpu_check.json / .md")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--intervals", default=",".join(map(str, INTERVALS)), help="FORA intervals (reuse 1 - 1/N)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=420.0, help="start no measurement after this many seconds")
    p.add_argument("--profile", metavar="SHAPE", default=None,
                   help="instead of the sweep: profile a 12-step MoECa replay of SHAPE (refresh every 2 steps)")
    args = p.parse_args(argv)
    try:
        require_cuda()
    except NoCuda as exc:
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        return 2
    if args.profile:
        profile(args.profile, args.batch)
        return 0
    from moeca.bench.results import write_results
    rows, meta = run([s for s in args.shapes.split(",") if s], [int(v) for v in args.intervals.split(",") if v],
                     args.batch, args.steps, args.repeats, args.max_seconds)
    paths = write_results("gpu_check", rows, args.out, meta=meta, columns=COLUMNS,
                          title="GPU check: full vs MoECa vs ToCa vs FORA at matched reuse fractions",
                          command="bench/gpu_check.sh " + " ".join(argv if argv is not None else sys.argv[1:]))
    print("wrote " + ", ".join(str(v) for v in paths.values()))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
