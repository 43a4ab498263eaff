"""moeca.tracer: record token- and expert-branch-level activity across sampling steps into Parquet.

Public API (imported lazily, so ``import moeca.tracer`` stays cheap):
- ``TraceConfig``, ``trace_run(model, out_dir, config, ...) -> Path``, ``trace_shard``, ``resolve_labels``
  (:mod:`moeca.tracer.run`);
- ``read_run_meta(dir)``, ``open_table(dir, table) -> pyarrow.dataset.Dataset``, ``complete_shards``,
  ``trace_summary``, ``find_traces`` (:mod:`moeca.tracer.store`);
- ``TracingRuntime``, ``StepRecord`` (:mod:`moeca.tracer.recorder`); the format in :mod:`moeca.tracer.schema`.
"""
from __future__ import annotations

from moeca.common.lazy import lazy_exports

_EXPORTS = {
    "TraceConfig": "run", "trace_run": "run", "trace_shard": "run", "resolve_labels": "run",
    "build_run_meta": "run", "prepare_out_dir": "run", "sample_seed": "run", "step_times": "run",
    "read_run_meta": "store", "open_table": "store", "complete_shards": "store", "trace_summary": "store",
    "find_traces": "store", "shard_files": "store",
    "TracingRuntime": "recorder", "StepRecord": "recorder",
    "ShardWriter": "writer", "TraceWriteError": "writer",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
