"""``moeca bench NAME``: the benchmarks, each a module of this folder that registers its own options.

Only the benchmark that runs is imported: ``moeca --help`` and ``moeca bench --help`` list the names and the
one-line summaries below without loading any benchmark (they import torch, matplotlib and the stages at
module level). ``moeca bench NAME ARGS`` hands ``ARGS`` to the options ``NAME``'s module registers."""
from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Bench:
    """One benchmark: its module (which defines ``register(sub)``) and the summary ``moeca bench --help`` shows."""

    module: str
    summary: str


BENCHES: dict[str, Bench] = {
    "full": Bench("moeca.bench.full", "full-compute ms per sampling step and the expert/attention share"),
    "trace": Bench("moeca.bench.trace", "tracing overhead: traced / untraced sampling time"),
    "analyze": Bench("moeca.bench.analyze",
                     "analysis throughput (branch rows/s, peak memory) on a large synthetic trace"),
    "moeca": Bench("moeca.bench.targets", "MoECa speed/quality targets (demo model) and the S/2-8E2A shape check"),
    "pareto": Bench("moeca.bench.pareto", "MoECa vs baselines: speedup/quality Pareto sweep on one model"),
    "refresh": Bench("moeca.bench.refresh",
                     "replays behind MoECa's refresh rule: forecasting, synchronized refresh, granularity"),
    "ablation": Bench("moeca.bench.ablation", "ablations of MoECa's default rule at equal predicted wall-clock speed"),
    "fit": Bench("moeca.bench.fit", "the wall-clock cost model on a calibration's own steps, with and without "
                                    "new_pair_ms"),
    "trigger": Bench("moeca.bench.trigger", "refresh placement: MoECa's against a run-time route-change trigger"),
    "compile": Bench("moeca.bench.compile", "eager vs --compile in one process: full compute and a MoECa replay"),
    "steps": Bench("moeca.bench.steps", "ms per forecast step at each level (token, branch host/device path) "
                                        "against its floor, with a breakdown"),
    "app": Bench("moeca.bench.app", "explorer page render times over a 10M-branch-row trace"),
    "report": Bench("moeca.bench.report", "generate the docs' results pages (docs/results/) from bench/results/"),
    "diffusers": Bench("moeca.bench.diffusers",
                       "HiDream-I1 (diffusers) scaled down: stock vs moeca full vs MoECa 2x/3x FLOPs (needs the extra)"),
}


def bench_parser(name: str) -> argparse.ArgumentParser:
    """The full parser of ``moeca bench NAME`` (imports ``NAME``'s module, which registers its options)."""
    parser = argparse.ArgumentParser(prog="moeca bench")
    sub = parser.add_subparsers(dest="bench", metavar="NAME")
    importlib.import_module(BENCHES[name].module).register(sub)
    if name not in sub.choices:
        raise RuntimeError(f"{BENCHES[name].module} registers {sorted(sub.choices)}, not the bench {name!r}")
    return parser


def _run(name: str):
    def run(args: argparse.Namespace) -> int:
        full = bench_parser(name).parse_args([name, *args.rest])
        return full.func(full)
    return run


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="run a benchmark; results go to bench/results/ (JSON, Markdown, PNG)",
                            description="Benchmarks. Each writes NAME.json, NAME.md and NAME.png under --out; "
                                        "`moeca bench NAME --help` lists NAME's options.")
    bench_sub = parser.add_subparsers(dest="bench", metavar="NAME")
    for name, bench in BENCHES.items():
        # add_help=False: NAME's own options (and -h) are left over by this parser and parsed by NAME's module
        stub = bench_sub.add_parser(name, help=bench.summary, add_help=False)
        stub.set_defaults(func=_run(name), takes_rest=True)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
