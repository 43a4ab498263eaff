"""Run the per-trace reduction over many traces, locally or on a Dask distributed cluster.

Each trace is reduced independently by :func:`moeca.analysis.engine.trace_partials` (locally, or as one
Dask task per trace with ``scheduler``); the partials are merged in the order the traces were given,
so both paths return identical numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from distributed import Client
from tqdm import tqdm

from .engine import Grid, Partials, trace_partials
from .trace import TraceInfo, check_compatible, open_trace, parse_memory_limit


@dataclass(frozen=True)
class Collected:
    """Merged partials plus the validated traces they came from and any pooled differences."""

    partials: Partials
    traces: tuple[TraceInfo, ...]
    mixed: tuple[str, ...]


def _client(scheduler: Any):
    if isinstance(scheduler, Client):
        return scheduler, False
    if hasattr(scheduler, "scheduler_address"):        # a LocalCluster or similar
        return Client(scheduler), True
    return Client(str(scheduler), timeout="30s"), True


def collect(trace_dirs: Sequence[str | Path], allow_mixed: bool = False, memory_limit: str | int | None = None,
            scheduler: Any = None, threads: int = 2, progress: bool = False) -> Collected:
    """Validate ``trace_dirs``, refuse mixed models/samplers unless ``allow_mixed``, reduce and merge.

    memory_limit: bytes or a size string ("2GB") bounding the working set per trace reduction.
    scheduler: None (local), a Dask scheduler address, a ``distributed.Client`` or a cluster object.
    """
    if not trace_dirs:
        raise ValueError("no trace directories given; pass one or more TRACE_DIR written by `moeca trace`")
    traces = [open_trace(t) for t in trace_dirs]
    mixed = check_compatible(traces, allow_mixed)
    grid = Grid.of(traces)
    memory = parse_memory_limit(memory_limit)
    total_rows = sum(t.branch_rows for t in traces)
    bar = None
    if progress:
        bar = tqdm(total=total_rows, unit="row", unit_scale=True, desc="analyze", smoothing=0.1)
    try:
        if scheduler is None:
            parts = [trace_partials(t, grid, memory, threads, progress=bar.update if bar else None) for t in traces]
        else:
            client, owned = _client(scheduler)
            try:
                futures = [client.submit(trace_partials, str(t.path), grid, memory, threads, pure=False)
                           for t in traces]
                parts = []
                for fut, t in zip(futures, traces):
                    parts.append(fut.result())
                    if bar:
                        bar.update(t.branch_rows)
            finally:
                if owned:
                    client.close()
    finally:
        if bar:
            bar.close()
    total = Partials.zeros(grid)
    for part in parts:
        total.add(part)
    return Collected(total, tuple(traces), tuple(mixed))
