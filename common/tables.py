"""Markdown tables: the one formatter every report, summary and benchmark page uses."""
from __future__ import annotations

from typing import Sequence


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None, floatfmt: str = ".3g") -> str:
    """``rows`` (dicts) as a Markdown table of ``columns`` (default: the first row's keys), floats formatted
    with ``floatfmt``, ``None`` as an empty cell; ``_no rows_`` for no rows."""
    if not rows:
        return "_no rows_\n"
    columns = list(columns or rows[0].keys())

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return format(v, floatfmt)
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
