"""GPU speed check (issues 6 and 11): full compute vs FORA, TaylorSeer and MoECa, eager and compiled.

Run through ``bench/gpu_check.sh`` on a machine with one CUDA GPU (H100/H200 class); it is not part of
the tests or CI. For each shape (S/2-8E2A and XL/2-8E2A, random weights built directly on the GPU, bf16),
batch 8 with batched CFG (16 rows per call), 50 rectified-flow steps, and each refresh interval ``N``
(2, 3, 4: every ``N``-th step recomputes everything):

- ``fora``: FORA with interval ``N`` (cached outputs reused as they are);
- ``taylorseer``: TaylorSeer-style forecasting of every block's attention and MoE output (order 2,
  the published first two steps computed);
- ``moeca``: the shape of a derived MoECa schedule (sync rule) with FORA's refresh steps: between them the
  router runs in every block, newly routed (token, expert) pairs are computed and every other branch,
  the shared expert and attention are forecast linearly with the current gate weights.

Random weights have no meaningful drift, so this checks speed, not quality.

Each (method, interval) is timed against full compute *interleaved*: after a warm-up of both,
``repeats`` rounds of one full-compute run then one cached run, CUDA-synchronised; the speedup is the
ratio of the medians, so both see the same machine state. ``--compile`` repeats the measurement with the
model compiled (``torch.compile``, mode ``reduce-overhead``: CUDA graphs) for the intervals in
``--compiled-intervals`` (compiling every runtime costs minutes). Each cached method's forecast steps
also run once with ``torch.cuda.set_sync_debug_mode("error")`` around the model call (eager):
``forecast_sync_free`` is False, with the first error in the JSON, when one waited for the device.
Writes ``gpu_check.json`` / ``.md`` (``moeca.bench.results.write_results``) with the code version.
Exits 2 with a message when CUDA is absent, except with ``--dry-run``: tiny shapes, 4 steps (FORA at N = 2
reuses one: its phase computes the last step), on the CPU (compiled = traced with the ``eager`` backend, no code generation), written as
``gpu_check_dry_run.*``, so the script is known to work before a GPU is at hand. ``--max-seconds``
bounds the run: measurements that would start after it are skipped and listed in the JSON.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile

from moeca.bench.results import write_results
from moeca.diffusion.samplers import SamplerConfig, sample
from moeca.models.compile import CompileOptions, compile_model
from moeca.models.config import DiTMoEConfig, get_preset
from moeca.models.dit_moe import DiTMoE
from moeca.models.registry import randomize_zero_init
from moeca.policy.cost import UnitCosts
from moeca.policy.methods import Context, fora, taylorseer, toca
from moeca.policy.methods.common import assemble
from moeca.policy.schedule import REUSE, BlockRule, StepRule
from moeca.replay.runtime import ReplayRuntime

SHAPES = ("S/2-8E2A", "XL/2-8E2A")
INTERVALS = (2, 3, 4)
"""Refresh intervals; reuse fractions 1/2, 2/3, 3/4."""
METHODS = ("fora", "taylorseer", "moeca")
COLUMNS = ["shape", "mode", "method", "interval", "predicted_flops_ratio", "flops_ratio", "full_ms_per_step",
           "ms_per_step", "speedup", "speedup_vs_flops", "forecast_sync_free", "cudagraph_skips", "cache_mb", "error"]
DRY_RUN_SHAPE = "dry-run"


class NoCuda(RuntimeError):
    pass


def require_cuda():
    """The CUDA device, or :class:`NoCuda` with a message saying what to do."""
    if not torch.cuda.is_available():
        raise NoCuda("gpu_check needs a CUDA GPU (H100/H200 class) and none is visible to torch "
                     f"(torch {torch.__version__}, cuda build {torch.version.cuda}); run it on a GPU machine, "
                     "or pass --dry-run to check the script on the CPU. It is a manual check, not part of the tests.")
    return torch.device("cuda")


# ----------------------------------------------------------------------------- schedules (CPU-side, tested)
def sampler_config(num_steps: int = 50):
    return SamplerConfig(kind="rectified_flow", num_steps=num_steps, cfg_scale=1.5, cfg_mode="batched")


def moeca_shaped(config, sampler, interval: int):
    """A MoECa schedule of the sync rule with refreshes every ``interval`` steps: those steps compute
    every unit; the others forecast every unit linearly (the router and newly routed pairs computed)."""
    S, L, E = sampler.num_steps, config.depth, config.num_experts
    sync = set(range(0, S, interval))
    body = tuple(BlockRule(attn=REUSE, shared=REUSE, experts=(REUSE,) * E) for _ in range(L))
    full = tuple(BlockRule.full(E) for _ in range(L))
    steps = [StepRule("compute", full if s in sync else body) for s in range(S)]
    return replace(assemble("moeca", config, sampler, steps, sync=sync,
                            provenance={"gpu_check": f"MoECa sync rule, refresh every {interval} steps"}),
                   forecast="linear")


def matched_schedules(config, sampler, interval: int) -> dict:
    """``{method: (schedule, knob)}``: FORA ``interval``, FORA + forecast and MoECa with the same refresh
    steps, and ToCa with the fresh threshold whose predicted FLOPs ratio is closest to FORA's."""
    ctx = Context(config, sampler)
    f_sched = fora.build(fora.Config(interval=interval), ctx)
    goal = f_sched.predicted_flops_ratio
    best = min(range(2, 25), key=lambda n: abs(toca.build(toca.Config(fresh_threshold=n), ctx).predicted_flops_ratio
                                               - goal))
    t_sched = toca.build(toca.Config(fresh_threshold=best), ctx)
    ff_sched = replace(f_sched, method="custom", forecast="linear")
    return {"fora": (f_sched, f"interval={interval}"), "fora-forecast": (ff_sched, f"interval={interval}"),
            "toca": (t_sched, f"fresh_threshold={best}"),
            "moeca": (moeca_shaped(config, sampler, interval), f"interval={interval}")}


def timed_schedules(config, sampler, interval: int) -> dict:
    """``{method: (schedule, knob)}`` of :data:`METHODS` refreshing every ``interval`` steps."""
    ctx = Context(config, sampler)
    ts = taylorseer.Config(interval=interval, order=2)
    return {"fora": (fora.build(fora.Config(interval=interval), ctx), f"interval={interval}"),
            "taylorseer": (taylorseer.build(ts, ctx), f"interval={interval}, order={ts.order}"),
            "moeca": (moeca_shaped(config, sampler, interval), f"interval={interval}")}


# ----------------------------------------------------------------------------- GPU part
def dry_run_config():
    """The ``--dry-run`` shape: 16 tokens, D=64, 2 blocks, 8 experts top-2 (every seam, in a second)."""
    return DiTMoEConfig(name=DRY_RUN_SHAPE, input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2,
                        num_heads=2, num_experts=8, top_k=2, num_classes=10, objective="rectified_flow")


def build_model(name: str, device, dtype, seed: int = 0):
    """Random-weight model of preset ``name`` initialised directly on ``device`` (no CPU copy of XL)."""
    config = dry_run_config() if name == DRY_RUN_SHAPE else replace(get_preset(name), objective="rectified_flow")
    torch.manual_seed(seed)
    with torch.device(device):
        model = DiTMoE(config)
    randomize_zero_init(model, seed)
    return model.to(dtype=dtype).eval()


def _timer(device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start
    return timed


def interleaved(full, cached, repeats: int, timed) -> tuple[float, float]:
    """Median seconds of ``full()`` and ``cached()`` over ``repeats`` alternating rounds after a warm-up of each."""
    full()
    cached()
    t_full, t_cached = [], []
    for _ in range(repeats):
        t_full.append(timed(full))
        t_cached.append(timed(cached))
    return statistics.median(t_full), statistics.median(t_cached)


def forecast_sync_error(model, schedule, run) -> str | None:
    """Run ``run()`` with ``torch.cuda.set_sync_debug_mode("error")`` around every model call of a step that
    ``schedule`` does not refresh; the first error (a host sync inside a forecast step), or None."""
    def before(_module, args, kwargs):
        ctx = args[3] if len(args) > 3 else kwargs.get("ctx")
        if ctx is not None and not schedule.is_sync(ctx.step):
            torch.cuda.set_sync_debug_mode("error")

    def after(_module, _args, _kwargs, _out):
        torch.cuda.set_sync_debug_mode("default")

    hooks = [model.register_forward_pre_hook(before, with_kwargs=True),
             model.register_forward_hook(after, with_kwargs=True, always_call=True)]
    try:
        run()
        return None
    except RuntimeError as exc:
        return str(exc).splitlines()[0][:300]
    finally:
        torch.cuda.set_sync_debug_mode("default")
        for h in hooks:
            h.remove()


def code_version() -> str:
    """``git describe`` of the checkout this runs from (``-dirty`` with uncommitted changes), or ``unknown``."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run(shapes=SHAPES, intervals=INTERVALS, batch: int = 8, num_steps: int = 50, repeats: int = 3,
        max_seconds: float = 420.0, compile_intervals=(4,), dry_run: bool = False, log=print
        ) -> tuple[list[dict], dict]:
    """The measurements (see the module docstring) -> ``(rows, meta)``."""
    device = torch.device("cpu") if dry_run else require_cuda()
    options = CompileOptions(backend="eager") if dry_run else CompileOptions.for_device(device)
    # a compiled forward is specialised per runtime object and kind of step (not per step number)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    timed = _timer(device)
    start = time.perf_counter()
    sampler = sampler_config(num_steps)
    rows, skipped, sync_errors = [], [], {}
    for shape in shapes:
        if time.perf_counter() - start > max_seconds:
            skipped.append(f"{shape}: whole shape (time budget)")
            continue
        model = build_model(shape, device, torch.bfloat16)
        labels = torch.arange(batch) % model.config.num_classes
        costs = UnitCosts.of(model.config)
        modes = {"eager": (model, intervals)}
        if compile_intervals:
            modes["compiled"] = (compile_model(model, options, in_place=False), compile_intervals)
        for mode, (net, mode_intervals) in modes.items():
            def full(net=net):
                sample(net, sampler, labels, seed=0)

            for interval in mode_intervals:
                for method, (schedule, knob) in timed_schedules(model.config, sampler, interval).items():
                    if time.perf_counter() - start > max_seconds:
                        skipped.append(f"{shape} {mode} {method} {knob} (time budget)")
                        continue
                    rt = ReplayRuntime(schedule)

                    def cached(net=net, rt=rt):
                        with net.use_runtime(rt):
                            sample(net, sampler, labels, seed=0)

                    row = {"shape": shape, "mode": mode, "method": method, "interval": interval,
                           "predicted_flops_ratio": schedule.predicted_flops_ratio, "forecast_sync_free": None,
                           "error": None}
                    skips_before = cudagraph_skips()
                    try:
                        t_full, t_cached = interleaved(full, cached, repeats, timed)
                    except Exception as exc:  # a runtime that cannot run here is reported, not fatal
                        rows.append({**row, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
                        log(f"{shape}: {mode} {method} N={interval} failed: {rows[-1]['error']}")
                        continue
                    done, total = rt.counters.flops(costs)
                    if mode == "eager" and device.type == "cuda":
                        err = forecast_sync_error(model, schedule, cached)
                        row["forecast_sync_free"] = err is None
                        if err:
                            sync_errors[f"{shape} {method} {knob}"] = err
                    row.update(flops_ratio=done / total, full_ms_per_step=1000 * t_full / num_steps,
                               ms_per_step=1000 * t_cached / num_steps, speedup=t_full / t_cached,
                               speedup_vs_flops=(t_full / t_cached) * (done / total),
                               cache_mb=rt.peak_cache_bytes / 2 ** 20,
                               cudagraph_skips=cudagraph_skips() - skips_before if mode == "compiled" else None)
                    rows.append(row)
                    log(f"{shape}: {mode:8s} {method:10s} N={interval}: full {row['full_ms_per_step']:.2f} ms/step, "
                        f"cached {row['ms_per_step']:.2f} ms/step, speedup {row['speedup']:.2f}x at FLOPs ratio "
                        f"{row['flops_ratio']:.3f} ({row['speedup_vs_flops']:.2f} of the FLOPs reduction)")
        model = modes = None  # free the device memory before the next shape
        if device.type == "cuda":
            torch.cuda.empty_cache()
    meta = {"batch": batch, "num_steps": num_steps, "repeats": repeats, "dtype": "bfloat16", "cfg": "batched 1.5",
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (dry run)",
            "compile": {"intervals": list(compile_intervals), "mode": options.mode, "backend": options.backend},
            "code_version": code_version(), "elapsed_s": time.perf_counter() - start, "skipped": skipped,
            "forecast_sync_errors": sync_errors, "dry_run": dry_run}
    return rows, meta


def cudagraph_skips() -> int:
    """Graphs inductor compiled without CUDA graphs so far in this process (e.g. because a graph mutates a
    tensor that is neither a parameter nor a static address, such as a replay cache allocated outside the
    graphs); a compiled row reports how many its runs added, so a CUDA-graph gap is seen, not guessed."""
    return int(counters["inductor"].get("cudagraph_skips", 0))


def profile(shape: str, batch: int = 8, num_steps: int = 12, interval: int = 2, log=print) -> None:
    """Where a MoECa replay spends its time on the GPU: per-step wall time of refresh and forecast steps
    (CUDA-synchronised), then ``torch.profiler`` tables (host and device time per op) of one run."""
    model = build_model(shape, require_cuda(), torch.bfloat16)
    sampler = sampler_config(num_steps)
    schedule = moeca_shaped(model.config, sampler, interval)
    labels = torch.arange(batch) % model.config.num_classes
    runtime = ReplayRuntime(schedule)
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
    p.add_argument("--intervals", default=",".join(map(str, INTERVALS)), help="refresh intervals (reuse 1 - 1/N)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3, help="interleaved full/cached rounds per measurement")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the compiled model (default on; --no-compile skips it)")
    p.add_argument("--compiled-intervals", default="4", help="intervals measured compiled (default 4)")
    p.add_argument("--max-seconds", type=float, default=420.0, help="start no measurement after this many seconds")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes, 2 steps, on the CPU: checks the script, measures nothing meaningful")
    p.add_argument("--profile", metavar="SHAPE", default=None,
                   help="instead of the sweep: profile a 12-step MoECa replay of SHAPE (refresh every 2 steps)")
    args = p.parse_args(argv)
    try:
        intervals = [int(v) for v in args.intervals.split(",") if v.strip()]
        compiled = [int(v) for v in args.compiled_intervals.split(",") if v.strip()] if args.compile else []
    except ValueError:
        print(f"gpu_check: error: --intervals/--compiled-intervals take comma-separated integers like 2,3,4; got "
              f"{args.intervals!r} / {args.compiled_intervals!r}", file=sys.stderr)
        return 2
    if min(intervals + compiled, default=2) < 2 or args.repeats < 1 or args.batch < 1 or args.steps < 1:
        print("gpu_check: error: intervals must be >= 2 and --repeats, --batch, --steps >= 1", file=sys.stderr)
        return 2
    if args.dry_run:
        torch.set_num_threads(1)           # tiny shapes: threads only add contention on a shared CPU
        shapes, steps, batch, name = [DRY_RUN_SHAPE], 4, 2, "gpu_check_dry_run"
    else:
        try:
            require_cuda()
        except NoCuda as exc:
            print(f"gpu_check: error: {exc}", file=sys.stderr)
            return 2
        shapes, steps, batch, name = [s for s in args.shapes.split(",") if s], args.steps, args.batch, "gpu_check"
    if args.profile:
        profile(args.profile, args.batch)
        return 0
    rows, meta = run(shapes, intervals, batch, steps, args.repeats, args.max_seconds, compiled, args.dry_run)
    paths = write_results(name, rows, args.out, meta=meta, columns=COLUMNS,
                          title="GPU check: full compute vs FORA, TaylorSeer and MoECa, eager and compiled",
                          notes=f"Code version {meta['code_version']}; {meta['device']}; elapsed "
                                f"{meta['elapsed_s']:.0f} s. Speedups are over full compute measured interleaved "
                                "with each cached run in the same mode; `speedup_vs_flops` = speedup x FLOPs ratio.",
                          command="bench/gpu_check.sh " + " ".join(argv if argv is not None else sys.argv[1:]))
    print("wrote " + ", ".join(str(v) for v in paths.values()))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
