"""Library entry points that return tables (no files written)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from .collect import collect
from .summary import summary_frame


def drift_summary(trace_dirs: Sequence[str | Path], allow_mixed: bool = False, memory_limit: str | None = None,
                  scheduler: Any = None, threads: int = 2, progress: bool = False) -> pd.DataFrame:
    """The summary table over one or more traces (one row per unit, block, step, expert, lag).

    ``trace_dirs`` may also be a single path. See :mod:`moeca.analysis.summary` for the columns.
    """
    if isinstance(trace_dirs, (str, Path)):
        trace_dirs = [trace_dirs]
    result = collect(list(trace_dirs), allow_mixed=allow_mixed, memory_limit=memory_limit, scheduler=scheduler,
                     threads=threads, progress=progress)
    return summary_frame(result.partials)
