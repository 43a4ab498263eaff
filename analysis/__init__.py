"""moeca.analysis: token- vs expert-branch-level redundancy across timesteps, from traces.

Public API (imports are lazy so ``moeca --help`` stays fast):

- ``drift_summary(trace_dirs, allow_mixed=False, memory_limit=None, scheduler=None) -> DataFrame``
  (the summary table, columns in :mod:`moeca.analysis.summary`);
- ``load_summary(report_dir) -> DataFrame``;
- ``analyze(trace_dirs, out, ...) -> dict`` (writes the report folder);
- ``unit_flops(config) -> dict`` (:mod:`moeca.analysis.flops`).

Lower level: :func:`moeca.analysis.collect.collect` returns the merged aggregates
(:class:`moeca.analysis.engine.Partials`, including per (lag, block, step) error histograms of both
policies), :func:`moeca.analysis.compare.sweep` the reuse-vs-error curves,
:mod:`moeca.testing.synthetic_traces` writes traces with known answers.

Module map: ``trace`` (open/validate trace dirs), ``engine`` (one out-of-core pass -> mergeable
aggregates), ``collect`` (many traces, local or Dask), ``summary`` (the tidy table), ``compare`` (token
vs branch), ``figures``, ``report`` (the report folder), ``cli`` (``moeca analyze``).
"""
from __future__ import annotations

from moeca.common.lazy import lazy_exports

_EXPORTS = {"drift_summary": "api", "load_summary": "summary", "analyze": "report", "unit_flops": "flops"}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
