"""``moeca bench NAME``: each benchmark module in ``BENCH_MODULES`` registers one NAME."""
from __future__ import annotations

import argparse
import importlib

BENCH_MODULES = (
    "moeca.bench.full",       # full-compute ms/step and expert/attention share
    "moeca.bench.trace",      # tracing overhead
    "moeca.bench.analyze",    # analysis throughput on a large synthetic trace
    "moeca.bench.targets",    # `bench moeca`: MoECa speed/quality targets
    "moeca.bench.pareto",     # MoECa vs baselines Pareto sweep
    "moeca.bench.refresh",    # replays behind MoECa's refresh rule
    "moeca.bench.ablation",   # MoECa's default rule with and without each component, equal wall-clock speed
    "moeca.bench.compile",    # eager vs --compile in one process, full compute and a MoECa replay
    "moeca.bench.steps",      # ms per step: full compute, MoECa refresh and forecast steps
    "moeca.bench.app",        # explorer page render times
    "moeca.bench.report",     # docs/results/ pages from bench/results/
    "moeca.bench.diffusers",  # HiDream-I1 (diffusers) scaled down: stock vs moeca full vs MoECa (needs the extra)
)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="run a benchmark; results go to bench/results/ (JSON, Markdown, PNG)",
                            description="Benchmarks. Each writes NAME.json, NAME.md and NAME.png under --out.")
    bench_sub = parser.add_subparsers(dest="bench", metavar="NAME")
    for name in BENCH_MODULES:
        importlib.import_module(name).register(bench_sub)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
