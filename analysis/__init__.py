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
:mod:`moeca.analysis.synthetic` writes traces with known answers.

Module map: ``trace`` (open/validate trace dirs), ``engine`` (one out-of-core pass -> mergeable
aggregates), ``collect`` (many traces, local or Dask), ``summary`` (the tidy table), ``compare`` (token
vs branch), ``figures``, ``report`` (the report folder), ``cli`` (``moeca analyze``).
"""
from __future__ import annotations

from .flops import unit_flops

__all__ = ["drift_summary", "load_summary", "analyze", "unit_flops"]


def __getattr__(name: str):
    if name == "drift_summary":
        from .api import drift_summary
        return drift_summary
    if name == "load_summary":
        from .summary import load_summary
        return load_summary
    if name == "analyze":
        from .report import analyze
        return analyze
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
