"""``moeca bench full``: full-compute speed of one sampling step, and where its time goes.

A step is one guided model call for the batch: batched CFG, so ``batch`` samples make one forward of
``2 * batch`` rows. For each model and batch size it reports the median wall-clock ms per step
(plain runtime) and, from separate runs through :class:`TimingRuntime`, the share of step time spent
in the routed experts (grouped dispatch: gather, expert MLPs, scatter), the shared expert, attention
and the router; "other" is the rest (adaLN, norms, embedders, slot combine, final layer, guidance).
The timing runtime synchronises CUDA around every seam, so its own step time is reported too.
With ``--compile`` the same model is then compiled (:func:`moeca.models.compile.compile_model`, once per
process) and each batch size is timed again after a warm-up that compiles it: ``compiled_ms_per_step``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from functools import lru_cache

import torch

from moeca.bench.results import DEFAULT_OUT, median_time, pyplot, write_results
from moeca.common.outputs import atomic_write_text
from moeca.common.tables import markdown_table
from moeca.diffusion.samplers import GuidedDenoiser, SamplerConfig, default_sampler, initial_noise
from moeca.models.compile import compile_model
from moeca.models.registry import load_model, pick_device
from moeca.models.runtime import Runtime

SEAMS = ("routed_experts", "shared_expert", "attention", "route")
COLUMNS = ["model", "batch", "rows_per_call", "tokens_per_row", "device", "ms_per_step", "ms_per_sample_step",
           "pct_routed_experts", "pct_shared_expert", "pct_attention", "pct_router", "pct_other",
           "timed_ms_per_step", "compiled_ms_per_step", "compile_speedup", "repeats"]


@lru_cache(maxsize=None)
def _timing_runtime_class():
    """Built on first use so registering ``moeca bench`` does not import torch."""
    class TimingRuntime(Runtime):
        """Default compute with wall-clock totals per seam (seconds), ``time.perf_counter`` based.

        ``sync`` (e.g. ``torch.cuda.synchronize``) runs before and after each timed seam so asynchronous
        device work is charged to the seam that launched it. Seams are leaves: ``routed_experts`` includes
        the per-expert calls it makes, which are not timed separately.
        """

        def __init__(self, sync=None):
            self.sync = sync or (lambda: None)
            self.totals: dict[str, float] = defaultdict(float)

        def clear(self) -> None:
            self.totals = defaultdict(float)

        def _timed(self, name: str, fn, *args):
            self.sync()
            start = time.perf_counter()
            out = fn(*args)
            self.sync()
            self.totals[name] += time.perf_counter() - start
            return out

        def attention(self, block, x_mod):
            return self._timed("attention", super().attention, block, x_mod)

        def route(self, block, h):
            return self._timed("route", super().route, block, h)

        def routed_experts(self, block, flat, topk_idx):
            return self._timed("routed_experts", super().routed_experts, block, flat, topk_idx)

        def shared_expert(self, block, h):
            return self._timed("shared_expert", super().shared_expert, block, h)

    return TimingRuntime


def __getattr__(name: str):
    if name == "TimingRuntime":
        return _timing_runtime_class()
    raise AttributeError(name)


def step_fn(model, batch: int, seed: int = 0):
    """A full-compute guided step of ``batch`` samples (one batched-CFG call) as a no-argument function."""
    mc = model.config
    device = next(model.parameters()).device
    kind = default_sampler(mc.objective).kind
    cfg = SamplerConfig(kind=kind, num_steps=50, cfg_scale=1.5, cfg_mode="batched")
    denoise = GuidedDenoiser(model, cfg)
    x = initial_noise((batch, mc.in_channels, mc.input_size, mc.input_size), seed, device)
    y = (torch.arange(batch) % mc.num_classes).to(device)
    t = (torch.full((batch,), 0.5, device=device) if kind == "rectified_flow"
         else torch.full((batch,), 500, device=device, dtype=torch.long))

    def step() -> None:
        with torch.no_grad():
            denoise(x, t, y, 25)
    return step


def measure(model, batch: int, repeats: int, seed: int = 0) -> dict:
    """One row: median ms per guided step (plain) and seam shares (timing runtime) for ``batch`` samples."""
    mc = model.config
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    step = step_fn(model, batch, seed)
    median_s, _ = median_time(step, repeats, warmup=1, sync=sync)
    timer = _timing_runtime_class()(sync)
    timed = []
    with model.use_runtime(timer):
        step()  # warm-up through the timing runtime
        timer.clear()
        for _ in range(repeats):
            if sync:
                sync()
            start = time.perf_counter()
            step()
            if sync:
                sync()
            timed.append(time.perf_counter() - start)
    total = sum(timed)
    shares = {name: timer.totals[name] / total for name in SEAMS}
    return {"model": mc.name, "batch": batch, "rows_per_call": 2 * batch, "tokens_per_row": mc.num_tokens,
            "device": str(device), "ms_per_step": median_s * 1e3, "ms_per_sample_step": median_s * 1e3 / batch,
            "pct_routed_experts": 100 * shares["routed_experts"], "pct_shared_expert": 100 * shares["shared_expert"],
            "pct_attention": 100 * shares["attention"], "pct_router": 100 * shares["route"],
            "pct_other": 100 * max(0.0, 1 - sum(shares.values())),
            "timed_ms_per_step": statistics.median(timed) * 1e3, "compiled_ms_per_step": None,
            "compile_speedup": None, "repeats": repeats}


def measure_compiled(model, row: dict, repeats: int, seed: int = 0) -> None:
    """Add the compiled model's median ms per step to ``row`` (``model`` compiled already; the warm-up compiles)."""
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    median_s, _ = median_time(step_fn(model, row["batch"], seed), repeats, warmup=2, sync=sync)
    row["compiled_ms_per_step"] = median_s * 1e3
    row["compile_speedup"] = row["ms_per_step"] / row["compiled_ms_per_step"]


def plot_shares(rows: list[dict]):
    def plot(path) -> None:
        plt = pyplot()
        parts = [("pct_routed_experts", "routed experts"), ("pct_shared_expert", "shared expert"),
                 ("pct_attention", "attention"), ("pct_router", "router"), ("pct_other", "other")]
        labels = [f"{r['model']} b{r['batch']}\n{r['ms_per_step']:.1f} ms/step" for r in rows]
        fig, ax = plt.subplots(figsize=(7, 0.7 * len(rows) + 1.5))
        left = [0.0] * len(rows)
        for key, name in parts:
            vals = [r[key] for r in rows]
            ax.barh(labels, vals, left=left, label=name)
            left = [a + b for a, b in zip(left, vals)]
        ax.set_xlabel("% of step time (full compute)")
        ax.set_xlim(0, 100)
        ax.invert_yaxis()
        ax.legend(ncol=3, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.25 if len(rows) > 2 else -0.4))
        ax.set_title("Where a full-compute sampling step spends its time")
        fig.savefig(path, dpi=110, bbox_inches="tight", format="png")
        plt.close(fig)
    return plot


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    try:
        batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--batch-sizes must be comma-separated integers like 2,8; got {args.batch_sizes!r}") from None
    if not batches or min(batches) < 1:
        raise ValueError(f"--batch-sizes needs positive integers, got {args.batch_sizes!r}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise ValueError("--models is empty; e.g. --models demo,S/2-8E2A")
    device = pick_device(args.device)
    rows = []
    for name in models:
        model = (load_model("demo", device=device) if name == "demo"
                 else load_model(name, random_init=True, seed=0, device=device))
        model_rows = []
        for batch in batches:
            row = measure(model, batch, args.repeats)
            print(f"{name} batch {batch}: {row['ms_per_step']:.1f} ms/step; routed experts "
                  f"{row['pct_routed_experts']:.0f}%, shared {row['pct_shared_expert']:.0f}%, attention "
                  f"{row['pct_attention']:.0f}%, router {row['pct_router']:.1f}%", flush=True)
            model_rows.append(row)
        if args.compile:
            compile_model(model)
            for row in model_rows:
                measure_compiled(model, row, args.repeats)
                print(f"{name} batch {row['batch']}: compiled {row['compiled_ms_per_step']:.1f} ms/step "
                      f"({row['compile_speedup']:.2f}x eager)", flush=True)
        rows.extend(model_rows)
        del model
    command = "moeca bench full" + "".join(
        f" --{flag} {value}" for flag, value, default in (("repeats", args.repeats, 5),
                                                          ("batch-sizes", args.batch_sizes, "2,8"),
                                                          ("models", args.models, "demo,S/2-8E2A"))
        if value != default) + (" --compile" if args.compile else "")
    notes = (f"Full-compute sampling step = one batched-CFG model call for the batch (rows = 2 x batch), fp32, "
             f"{device}, {torch.get_num_threads()} torch threads; median of {args.repeats} repeats after a warm-up. "
             "The demo model uses its trained weights; the S/2-8E2A shape uses random weights (256 tokens, "
             "12 blocks, D=384, 8 experts top-2 + shared expert). Shares come from separate runs through a "
             "timing runtime that brackets each seam with perf_counter (and CUDA syncs); `timed_ms_per_step` "
             "is that runtime's own step time. Routed experts include the dispatch (sort, gather, scatter; "
             "moeca.models.dispatch, the per-expert loop on the CPU, grouped_mm on CUDA in bf16). With --compile, "
             "`compiled_ms_per_step` is the same step after torch.compile (inductor; CUDA graphs on CUDA), timed "
             "after warm-up calls that compile it; the shares are from the eager runs.")
    load = [round(x, 2) for x in os.getloadavg()]
    notes += (f" System load average (1/5/15 min) at the end of the run: {load[0]}/{load[1]}/{load[2]} on "
              f"{os.cpu_count()} CPUs; a load above the CPU count means other processes shared the cores and the "
              "absolute ms are inflated (the shares are less affected).")
    paths = write_results("full", rows, args.out, meta={"repeats": args.repeats, "batch_sizes": batches,
                                                        "models": models, "dtype": "float32",
                                                        "loadavg_1_5_15": load},
                          columns=COLUMNS, title="Full-compute speed per sampling step", notes=notes,
                          plot=plot_shares(rows), command=command)
    _reformat_table(paths["md"], rows)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _reformat_table(md_path, rows: list[dict]) -> None:
    """Rewrite the Markdown table with two decimals (the generic 3-significant-digit format prints
    thousands of ms in exponent notation); the JSON keeps full precision."""
    text = md_path.read_text()
    text = text.replace(markdown_table(rows, COLUMNS), markdown_table(rows, COLUMNS, floatfmt=".2f"))
    atomic_write_text(md_path, text, what="benchmark results")       # just written by write_results: moeca's


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("full",
                       description="Median ms per full-compute sampling step (one batched-CFG call) for the demo "
                                   "model and the S/2-8E2A shape (random weights), and the share of step time "
                                   "in routed experts, shared expert, attention and router.")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per configuration (default 5)")
    p.add_argument("--batch-sizes", default="2,8", help="comma-separated batch sizes (default 2,8)")
    p.add_argument("--models", default="demo,S/2-8E2A", help="comma-separated: demo and/or presets "
                                                              "(random weights) (default demo,S/2-8E2A)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
    p.add_argument("--compile", action="store_true",
                   help="also time each step compiled with torch.compile (compiles once per shape: minutes on a CPU)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"results folder (default {DEFAULT_OUT})")
    p.set_defaults(func=run)
