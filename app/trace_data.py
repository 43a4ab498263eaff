"""Trace aggregation for the Traces page: one DuckDB scan per table, then filters on small frames.

A 10-million-row trace is scanned once per (trace, lag set) into a few tens of thousands of partial
sums grouped by (cfg_branch, label, step, block[, expert]); every filter the page offers (class, CFG
branch, block, unit, lag) is then a pandas group-by over those sums, so widget changes cost
milliseconds. Means are always ``sum / count`` over *finite* values; NaN/Inf metrics are counted
(``nan_*`` columns) and shown, never silently averaged.

Shapes: ``branch_aggregate`` -> one row per (cfg_branch, label, step, block, expert);
``token_aggregate`` -> one row per (cfg_branch, label, step, block); ``branch_histogram`` -> one row per
(cfg_branch, label, block, expert, bin) where bin indexes :data:`HIST_EDGES` (log10 of relative L2).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from moeca.app.paths import redact, resolve_under
from moeca.common.jsontext import read_json
from moeca.tracer import schema
from moeca.tracer.store import validate_trace

HIST_LOG10_MIN, HIST_LOG10_MAX, HIST_BINS = -4.0, 1.0, 50
HIST_EDGES = np.linspace(HIST_LOG10_MIN, HIST_LOG10_MAX, HIST_BINS + 1)
"""Bin edges (log10 of relative L2) of the per-expert drift histograms; values outside are clamped."""

UNIT_LABELS = {"attn": "attention", "moe": "MoE (routed sum)", "shared": "shared expert",
               "update": "block update"}


class TraceError(ValueError):
    """A trace folder is unusable (no run.json, no shards, unknown schema version...)."""


@dataclass(frozen=True)
class TraceInfo:
    """What the page needs from ``run.json`` and the shard list.

    files: root-relative Parquet paths per table; lags: lag metrics present (from the Parquet schema);
    labels: class label per sample index (``None`` when run.json has none).
    """

    rel: str
    meta: dict
    branch_files: tuple[str, ...]
    token_files: tuple[str, ...]
    lags: int
    labels: tuple[int, ...] | None
    schema_version: int

    @property
    def num_steps(self) -> int | None:
        sampler = self.meta.get("sampler") or {}
        return sampler.get("num_steps") if isinstance(sampler, dict) else None


def _shards(root: Path, trace_rel: str, table: str) -> tuple[str, ...]:
    folder = resolve_under(root, f"{trace_rel}/{table}", must_exist=False)
    if not folder.is_dir():
        return ()
    out = []
    for path in sorted(folder.iterdir()):
        if schema.parse_shard_file_name(path.name) is None:
            continue  # temporary files of a writer still running, or foreign files
        rel = f"{trace_rel}/{table}/{path.name}"
        try:
            resolve_under(root, rel)
        except (ValueError, FileNotFoundError):
            continue  # symlink out of the root, or vanished
        out.append(rel)
    return tuple(out)


def _labels_from_meta(meta: dict) -> tuple[int, ...] | None:
    labels = meta.get("labels")
    if isinstance(labels, list) and all(isinstance(v, int) for v in labels):
        return tuple(labels)
    return None


def _lags_in(root: Path, files: tuple[str, ...], prefix: str) -> int:
    try:
        names = pq.read_schema(resolve_under(root, files[0])).names
    except (pa.ArrowException, OSError) as exc:
        raise TraceError(f"{files[0]} is not a readable Parquet file ({exc}); the trace is damaged") from None
    lag = 0
    while f"{prefix}rel_l2_lag{lag + 1}" in names:
        lag += 1
    return lag


def load_trace_info(root: Path, trace_rel: str) -> TraceInfo:
    """Validate the trace as the CLI does (:func:`moeca.tracer.store.validate_trace`: run.json, every shard's
    footer, schema, row count and key statistics against run.json) and list its shards; raises
    :class:`TraceError` with the CLI's message, paths relative to the root. Nothing is read beyond the
    footers here, so a footer that lies about its row count is refused before any data is."""
    folder = resolve_under(root, trace_rel)
    try:
        first = read_json(resolve_under(root, f"{trace_rel}/run.json"), "trace file",
                          "the trace is damaged; re-trace it with `moeca trace --overwrite`")
        version = first.get("schema_version", schema.SCHEMA_VERSION) if isinstance(first, dict) else None
        if version != schema.SCHEMA_VERSION and isinstance(version, int):
            raise TraceError(f"{trace_rel} has trace schema version {version!r}; this app reads version "
                             f"{schema.SCHEMA_VERSION}. Re-trace with this moeca version.")
        branch_files = _shards(root, trace_rel, "branches")
        token_files = _shards(root, trace_rel, "tokens")
        if not branch_files and not token_files:
            raise TraceError(f"{trace_rel} has no shard files yet under branches/ or tokens/ "
                             "(the trace may still be running)")
        meta = validate_trace(folder)
    except TraceError:
        raise
    except (ValueError, OSError) as exc:
        raise TraceError(redact(root, str(exc))) from None
    lags = _lags_in(root, branch_files, "") if branch_files else _lags_in(root, token_files, "attn_")
    return TraceInfo(trace_rel, meta, branch_files, token_files, lags, _labels_from_meta(meta),
                     int(meta.get("schema_version", schema.SCHEMA_VERSION)))


def _connect(threads: int | None = None):
    con = duckdb.connect(":memory:")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    return con


def duckdb_can_read(path: Path) -> bool:
    """Whether DuckDB's own Parquet reader can decode every column of ``path``.

    DuckDB (2.0) cannot decode BYTE_STREAM_SPLIT on FIXED_LEN_BYTE_ARRAY columns, which is how the tracer
    stores float16 metrics; such files are read with pyarrow and streamed to DuckDB as float32 instead.
    """
    meta = pq.ParquetFile(path).metadata
    for rg in range(min(meta.num_row_groups, 1)):
        group = meta.row_group(rg)
        for c in range(group.num_columns):
            col = group.column(c)
            if col.physical_type == "FIXED_LEN_BYTE_ARRAY" and "BYTE_STREAM_SPLIT" in col.encodings:
                return False
    return True


def _arrow_stream(paths: list[str], columns: list[str]) -> pa.RecordBatchReader:
    """Batches of ``columns`` with float16 widened to float32 and dictionaries decoded (DuckDB-friendly)."""
    dataset = ds.dataset(paths, format="parquet")
    fields = []
    for name in columns:
        typ = dataset.schema.field(name).type
        if pa.types.is_dictionary(typ):
            typ = typ.value_type
        if pa.types.is_float16(typ):
            typ = pa.float32()
        fields.append(pa.field(name, typ))
    out = pa.schema(fields)

    def batches():
        for batch in dataset.to_batches(columns=columns, batch_size=1 << 20, use_threads=True):
            yield pa.RecordBatch.from_arrays([batch.column(i).cast(out.field(i).type) for i in range(len(columns))],
                                             schema=out)

    return pa.RecordBatchReader.from_batches(out, batches())


def _source(con, root: Path, files: tuple[str, ...], labels: tuple[int, ...] | None,
            columns: list[str]) -> tuple[str, dict]:
    """SQL ``FROM`` clause over the shard files with a ``label`` column, and its parameters.

    The label comes from run.json's per-sample list (a DuckDB list parameter indexed by ``sample``); -1
    where the trace has no labels. Only files resolved under the root are read. ``columns`` are the
    columns the query uses (projected when the pyarrow path is taken).
    """
    paths = [str(resolve_under(root, f)) for f in files]
    params: dict = {}
    if labels is None:
        label_expr = "-1"
    else:
        params["labels"] = list(labels)
        label_expr = "coalesce(($labels)[sample + 1], -1)"
    try:
        plain = all(duckdb_can_read(Path(p)) for p in paths)
    except (pa.ArrowException, OSError) as exc:
        raise TraceError(f"cannot read a shard footer ({exc}); the file is truncated or corrupt") from None
    if plain:
        params["files"] = paths
        scan = "read_parquet($files)"
    else:
        con.register("shards", _arrow_stream(paths, sorted(set(columns) | {"sample"})))
        scan = "shards"
    return f"(SELECT *, CAST({label_expr} AS INTEGER) AS label FROM {scan})", params


def _query(con, sql: str, params: dict, info: "TraceInfo", table: str, root: Path) -> pd.DataFrame:
    """Run an aggregation; unreadable shards (truncated, corrupt) become a :class:`TraceError` naming the trace."""
    try:
        return con.execute(sql, params).df()
    except (duckdb.Error, pa.ArrowException, OSError) as exc:
        detail = redact(root, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise TraceError(f"cannot read the {table} shards of trace {info.rel}: a shard is damaged inside its data "
                         f"pages ({detail}); `moeca trace-info --verify {info.rel}` names the file, and "
                         "`moeca trace --resume` recomputes it once it is deleted") from None


def _finite_sum(col: str, alias: str) -> str:
    # CASE rather than FILTER: DuckDB runs a hundred CASE aggregates in one pass ~15x faster
    finite = f"CASE WHEN isfinite({col}) THEN {col} END"
    return (f"sum({finite}) AS {alias}_sum, count({finite}) AS {alias}_n, "
            f"count({col}) - count({finite}) AS {alias}_nan")


def branch_aggregate(root: Path, info: TraceInfo, threads: int | None = None) -> pd.DataFrame:
    """Partial sums per (cfg_branch, label, step, block, expert).

    Columns: keys, ``rows``, ``routed_prev_true``, ``gate_sum``, ``in_sum/in_n/in_nan`` and per lag L
    ``rel{L}_sum/_n/_nan`` and ``cos{L}_sum/_n/_nan``.
    """
    if not info.branch_files:
        return pd.DataFrame()
    con = _connect(threads)
    columns = ["cfg_branch", "step", "block", "expert", "routed_prev", "gate_weight", "in_rel_l2_prev"]
    columns += [f"{m}_lag{lag}" for lag in range(1, info.lags + 1) for m in ("rel_l2", "cos")]
    src, params = _source(con, root, info.branch_files, info.labels, columns)
    aggs = ["count(*) AS rows", "count(CASE WHEN routed_prev THEN 1 END) AS routed_prev_true",
            "sum(gate_weight) AS gate_sum", _finite_sum("in_rel_l2_prev", "in")]
    for lag in range(1, info.lags + 1):
        aggs += [_finite_sum(f"rel_l2_lag{lag}", f"rel{lag}"), _finite_sum(f"cos_lag{lag}", f"cos{lag}")]
    sql = (f"SELECT cfg_branch, label, step, block, expert, {', '.join(aggs)} FROM {src} "
           "GROUP BY ALL ORDER BY cfg_branch, label, step, block, expert")
    return _query(con, sql, params, info, "branches", root)


def token_aggregate(root: Path, info: TraceInfo, threads: int | None = None) -> pd.DataFrame:
    """Partial sums per (cfg_branch, label, step, block) for every token unit and lag.

    Columns: keys, ``rows`` and per unit U in ``schema.TOKEN_UNITS`` and lag L ``U_rel{L}_sum/_n/_nan``
    and ``U_cos{L}_sum/_n/_nan``.
    """
    if not info.token_files:
        return pd.DataFrame()
    con = _connect(threads)
    columns = ["cfg_branch", "step", "block"] + [f"{u}_{m}_lag{lag}" for u in schema.TOKEN_UNITS
                                                 for lag in range(1, info.lags + 1) for m in ("rel_l2", "cos")]
    src, params = _source(con, root, info.token_files, info.labels, columns)
    aggs = ["count(*) AS rows"]
    for unit in schema.TOKEN_UNITS:
        for lag in range(1, info.lags + 1):
            aggs += [_finite_sum(f"{unit}_rel_l2_lag{lag}", f"{unit}_rel{lag}"),
                     _finite_sum(f"{unit}_cos_lag{lag}", f"{unit}_cos{lag}")]
    sql = (f"SELECT cfg_branch, label, step, block, {', '.join(aggs)} FROM {src} "
           "GROUP BY ALL ORDER BY cfg_branch, label, step, block")
    return _query(con, sql, params, info, "tokens", root)


def branch_histogram(root: Path, info: TraceInfo, lag: int, threads: int | None = None) -> pd.DataFrame:
    """Counts of log10(rel_l2_lag{lag}) in :data:`HIST_EDGES` bins per (cfg_branch, label, block, expert, bin)."""
    if not info.branch_files:
        return pd.DataFrame()
    if not 1 <= lag <= info.lags:
        raise ValueError(f"lag {lag} not in this trace (lags 1..{info.lags})")
    con = _connect(threads)
    col = f"rel_l2_lag{lag}"
    src, params = _source(con, root, info.branch_files, info.labels, ["cfg_branch", "block", "expert", col])
    width = (HIST_LOG10_MAX - HIST_LOG10_MIN) / HIST_BINS
    bin_expr = (f"least({HIST_BINS - 1}, greatest(0, CAST(floor((log10(greatest({col}, 1e-30)) - "
                f"({HIST_LOG10_MIN})) / {width}) AS INTEGER)))")
    sql = (f"SELECT cfg_branch, label, block, expert, {bin_expr} AS bin, count(*) AS count FROM {src} "
           f"WHERE {col} IS NOT NULL AND isfinite({col}) GROUP BY ALL ORDER BY ALL")
    return _query(con, sql, params, info, "branches", root)


# ----------------------------------------------------------------------------- filtering (pandas)

def apply_filters(frame: pd.DataFrame, cfg_branches=None, labels=None, blocks=None) -> pd.DataFrame:
    """Rows of an aggregate frame matching the selections (``None`` = no filter on that key)."""
    if frame.empty:
        return frame
    mask = np.ones(len(frame), dtype=bool)
    for col, values in (("cfg_branch", cfg_branches), ("label", labels), ("block", blocks)):
        if values is not None:
            mask &= frame[col].isin(list(values)).to_numpy()
    return frame[mask]


def drift_grid(frame: pd.DataFrame, prefix: str, by: tuple[str, ...] = ("step", "block")) -> pd.DataFrame:
    """Mean (finite) metric per ``by`` group from ``{prefix}_sum/_n/_nan`` columns.

    Returns columns ``by + (value, n, nan)``; ``value`` is NaN where a group has no finite sample.
    """
    if frame.empty:
        return pd.DataFrame(columns=[*by, "value", "n", "nan"])
    g = frame.groupby(list(by), as_index=False)[[f"{prefix}_sum", f"{prefix}_n", f"{prefix}_nan"]].sum()
    n = g[f"{prefix}_n"].to_numpy(dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = np.where(n > 0, g[f"{prefix}_sum"].to_numpy(dtype=float) / np.maximum(n, 1), np.nan)
    return pd.DataFrame({**{k: g[k] for k in by}, "value": value, "n": n.astype(np.int64),
                         "nan": g[f"{prefix}_nan"].astype(np.int64)})


def routing_stability(branch_agg: pd.DataFrame) -> pd.DataFrame:
    """Fraction of routed (token, expert) pairs that were also routed at the previous step, per (step, block).

    Step 0 is excluded (there is no previous step). Columns: step, block, persist_frac, rows.
    """
    if branch_agg.empty:
        return pd.DataFrame(columns=["step", "block", "persist_frac", "rows"])
    g = branch_agg[branch_agg["step"] > 0].groupby(["step", "block"], as_index=False)[
        ["routed_prev_true", "rows"]].sum()
    g["persist_frac"] = g["routed_prev_true"] / g["rows"].clip(lower=1)
    return g[["step", "block", "persist_frac", "rows"]]


def histogram_quantiles(hist: pd.DataFrame, qs=(0.05, 0.25, 0.5, 0.75, 0.95), by: str = "expert") -> pd.DataFrame:
    """Quantiles of relative L2 per ``by`` value from binned counts (bin centres, geometric).

    Columns: ``by``, ``q05``... (relative L2, not log), ``count``.
    """
    cols = [f"q{int(round(q * 100)):02d}" for q in qs]
    if hist.empty:
        return pd.DataFrame(columns=[by, *cols, "count"])
    centres = 10 ** ((HIST_EDGES[:-1] + HIST_EDGES[1:]) / 2)
    rows = []
    for key, part in hist.groupby(by):
        counts = np.bincount(part["bin"].to_numpy(dtype=np.int64), weights=part["count"].to_numpy(dtype=float),
                             minlength=HIST_BINS)
        total = counts.sum()
        if total <= 0:
            continue
        cdf = np.cumsum(counts) / total
        row = {by: key, "count": int(total)}
        for name, q in zip(cols, qs):
            row[name] = float(centres[min(int(np.searchsorted(cdf, q)), HIST_BINS - 1)])
        rows.append(row)
    return pd.DataFrame(rows, columns=[by, *cols, "count"])


def histogram_density(hist: pd.DataFrame, by: str = "expert") -> pd.DataFrame:
    """Normalised bin densities per ``by`` value (for violin-like plots). Columns: by, rel_l2, density."""
    if hist.empty:
        return pd.DataFrame(columns=[by, "rel_l2", "density"])
    centres = 10 ** ((HIST_EDGES[:-1] + HIST_EDGES[1:]) / 2)
    g = hist.groupby([by, "bin"], as_index=False)["count"].sum()
    totals = g.groupby(by)["count"].transform("sum")
    return pd.DataFrame({by: g[by], "rel_l2": centres[g["bin"].to_numpy()], "density": g["count"] / totals})
