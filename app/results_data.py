"""Reading analysis reports and benchmark results (small files) for the app, path-guarded.

Report folder (``moeca analyze --out DIR``): ``headline.json`` {sentence, numbers}, ``summary.parquet``
/ ``summary.csv`` (tidy table: unit, block, step, expert, lag, n, mean_rel_l2, ...), PNG figures and
the token-vs-branch reuse-vs-error curve table ``comparison.csv`` (``analysis.compare.sweep``: view, span,
policy, budget, reuse_frac_moe, reuse_frac_block, mean_rel_err, tokens), figures in ``figures/``. Benchmark result (``bench.results.write_results``):
``NAME.json`` {name, command, meta, environment, rows} with ``NAME.md`` and ``NAME.png`` beside it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from moeca.app.inventory import load_small_json
from moeca.app.paths import resolve_under
from moeca.app.uploads import MAX_UPLOAD_BYTES, read_parquet_bounded

CURVE_FILE_STEMS = ("comparison", "curves", "token_vs_branch")
"""Names (without extension) of the reuse-vs-error curve table; ``moeca analyze`` writes comparison.csv."""


@dataclass(frozen=True)
class Report:
    """What a report folder holds (root-relative paths; missing parts are None / empty)."""

    rel: str
    headline: dict | None
    summary: str | None
    curves: str | None
    figures: tuple[str, ...]
    markdown: str | None


def _read_json(root: Path, rel: str) -> object:
    try:
        return load_small_json(resolve_under(root, rel), rel)
    except OSError as exc:
        raise ValueError(f"{rel}: cannot be read ({exc.strerror or type(exc).__name__})") from None


def load_report(root: Path, report_rel: str) -> Report:
    folder = resolve_under(root, report_rel)
    names = {p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}
    fig_dir = folder / "figures"
    if fig_dir.is_dir() and not fig_dir.is_symlink():
        names |= {f"figures/{p.name}" for p in fig_dir.iterdir() if p.is_file() and not p.name.startswith(".")}

    def rel(name: str) -> str:
        return f"{report_rel}/{name}" if report_rel != "." else name

    def guarded(name: str) -> str | None:
        try:
            resolve_under(root, rel(name))
        except (ValueError, FileNotFoundError):
            return None
        return rel(name)

    headline = None
    if "headline.json" in names and guarded("headline.json"):
        doc = _read_json(root, rel("headline.json"))
        headline = doc if isinstance(doc, dict) else None
    summary = next((guarded(n) for n in ("summary.parquet", "summary.csv") if n in names), None)
    curves = None
    for stem in CURVE_FILE_STEMS:
        for ext in (".parquet", ".csv"):
            if stem + ext in names and curves is None:
                curves = guarded(stem + ext)
    figures = tuple(r for r in (guarded(n) for n in sorted(names) if n.lower().endswith(".png")) if r)
    markdown = guarded("report.md") if "report.md" in names else None
    return Report(report_rel, headline, summary, curves, figures, markdown)


def read_table(root: Path, rel: str) -> pd.DataFrame:
    """A Parquet or CSV table under the root."""
    path = resolve_under(root, rel)
    if path.suffix == ".parquet":
        return read_parquet_bounded(path, rel)
    if path.suffix == ".csv":
        size = path.stat().st_size
        if size > MAX_UPLOAD_BYTES:
            raise ValueError(f"{rel}: {size:,} bytes, more than the {MAX_UPLOAD_BYTES:,} the explorer reads as a table")
        return pd.read_csv(path)
    raise ValueError(f"{rel}: only .parquet and .csv tables are read")


def read_bytes(root: Path, rel: str) -> bytes:
    return resolve_under(root, rel).read_bytes()


@dataclass(frozen=True)
class BenchResult:
    rel: str
    name: str
    command: str | None
    meta: dict
    environment: dict
    rows: tuple[dict, ...]
    png: str | None
    markdown: str | None


def load_bench(root: Path, rel: str) -> BenchResult:
    doc = _read_json(root, rel)
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise ValueError(f"{rel} is not a moeca bench result (no 'rows' list)")
    stem = rel[:-len(".json")] if rel.endswith(".json") else rel

    def sibling(ext: str) -> str | None:
        try:
            resolve_under(root, stem + ext)
        except (ValueError, FileNotFoundError):
            return None
        return stem + ext

    return BenchResult(rel, str(doc.get("name", Path(rel).stem)), doc.get("command"),
                       doc.get("meta") if isinstance(doc.get("meta"), dict) else {},
                       doc.get("environment") if isinstance(doc.get("environment"), dict) else {},
                       tuple(r for r in doc["rows"] if isinstance(r, dict)), sibling(".png"), sibling(".md"))


@dataclass(frozen=True)
class ReplayOutput:
    """A ``moeca replay --out`` folder: its report.json and the two PNG grids (samples.pt is never read)."""

    rel: str
    report: dict
    full_png: str
    cached_png: str


def load_replay(root: Path, rel: str) -> ReplayOutput:
    prefix = "" if rel == "." else rel + "/"
    doc = _read_json(root, prefix + "report.json")
    if not isinstance(doc, dict):
        raise ValueError(f"{prefix}report.json is not a replay report (a JSON object)")
    for name in ("full.png", "cached.png"):
        resolve_under(root, prefix + name)
    return ReplayOutput(rel, doc, prefix + "full.png", prefix + "cached.png")


def flat_rows(rows) -> pd.DataFrame:
    """Result rows as a table: scalars kept, nested values (lists, dicts) shown as compact JSON text."""
    def cell(v):
        if isinstance(v, (list, dict, tuple)):
            return json.dumps(v, default=str, separators=(",", ":"))[:200]
        return v
    return pd.DataFrame([{k: cell(v) for k, v in r.items()} for r in rows])


def pick_column(columns, *needles: str) -> str | None:
    """First column whose lower-case name contains one of ``needles`` (tried in order)."""
    cols = list(columns)
    for needle in needles:
        for c in cols:
            if needle in str(c).lower():
                return c
    return None
