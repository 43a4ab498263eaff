"""Reading a trace directory: run metadata, completed shards, tables as pyarrow datasets, summaries.

Readers only ever see *complete* shards (every table of the shard has its final file); temporary
``*.tmp`` files and half-renamed shards of an interrupted run are ignored.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .schema import RUN_META_FILE, SCHEMA_VERSION, TABLES, TMP_SUFFIX, parse_shard_file_name, table_schema, tables_for


_REQUIRED_META = ("schema_version", "model", "sampler", "steps", "cfg_scale", "seed", "batch_size", "num_samples",
                  "num_shards", "labels", "lags", "dump_vectors", "step_t")


def is_trace_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a readable moeca ``run.json``."""
    try:
        read_run_meta(path)
    except (OSError, ValueError):
        return False
    return True


def read_run_meta(trace_dir: str | os.PathLike) -> dict:
    """The parsed ``run.json`` of a trace; clear errors for a missing file or a newer schema."""
    path = Path(trace_dir) / RUN_META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{trace_dir} is not a trace directory: {RUN_META_FILE} is missing "
                                "(create one with `moeca trace --out DIR`)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); the trace is damaged, rerun with --overwrite") from exc
    missing = [k for k in _REQUIRED_META if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValueError(f"{path} is not a moeca trace run.json (missing fields: {', '.join(missing)})")
    version = meta.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ValueError(f"{path} has schema_version {version!r}; this moeca reads versions up to {SCHEMA_VERSION}")
    return meta


def shard_files(trace_dir: str | os.PathLike, table: str) -> dict[int, Path]:
    """Final shard files of ``table``: ``{shard: path}`` (temporary files excluded)."""
    folder = Path(trace_dir) / table
    if not folder.is_dir():
        return {}
    out = {}
    for p in folder.iterdir():
        shard = parse_shard_file_name(p.name)
        if shard is not None:
            out[shard] = p
    return out


def complete_shards(trace_dir: str | os.PathLike, meta: dict | None = None) -> list[int]:
    """Shards whose every table (per ``meta['dump_vectors']``) has its final file, sorted."""
    meta = meta if meta is not None else read_run_meta(trace_dir)
    tables = tables_for(int(meta.get("dump_vectors", 0)))
    sets = [set(shard_files(trace_dir, t)) for t in tables]
    return sorted(set.intersection(*sets)) if sets else []


def temporary_files(trace_dir: str | os.PathLike) -> list[Path]:
    """Leftover ``*.tmp`` files of an interrupted run."""
    out = []
    for t in TABLES:
        folder = Path(trace_dir) / t
        if folder.is_dir():
            out += sorted(p for p in folder.iterdir() if p.name.endswith(TMP_SUFFIX))
    return out


def open_table(trace_dir: str | os.PathLike, table: str = "branches") -> ds.Dataset:
    """A :class:`pyarrow.dataset.Dataset` over the complete shards of ``table`` (schema from run.json).

    Example: ``open_table(d, "tokens").to_table(filter=ds.field("block") == 3).to_pandas()``.
    """
    meta = read_run_meta(trace_dir)
    if table not in tables_for(int(meta.get("dump_vectors", 0))):
        raise ValueError(f"trace {trace_dir} has no {table!r} table (written tables: "
                         f"{', '.join(tables_for(int(meta.get('dump_vectors', 0))))}; vectors need --dump-vectors N)")
    files = shard_files(trace_dir, table)
    paths = [str(files[s]) for s in complete_shards(trace_dir, meta)]
    return ds.dataset(paths, schema=table_schema(table, int(meta["lags"])), format="parquet")


def trace_summary(trace_dir: str | os.PathLike) -> dict:
    """Rows, bytes and bytes per row per table, completed vs planned shards, leftover temporaries."""
    meta = read_run_meta(trace_dir)
    done = complete_shards(trace_dir, meta)
    tables = {}
    for t in tables_for(int(meta.get("dump_vectors", 0))):
        files = shard_files(trace_dir, t)
        rows = size = 0
        for s in done:
            rows += pq.ParquetFile(files[s]).metadata.num_rows
            size += files[s].stat().st_size
        tables[t] = {"rows": rows, "bytes": size, "bytes_per_row": size / rows if rows else None}
    return {"path": str(trace_dir), "run_name": meta.get("run_name"), "schema_version": meta["schema_version"],
            "model": meta["model"].get("name") or meta["model"]["config"].get("name"),
            "weights_hash": meta["model"]["weights_hash"], "sampler": meta["sampler"]["kind"],
            "steps": meta["steps"], "cfg_scale": meta["cfg_scale"], "samples": meta["num_samples"],
            "lags": meta["lags"], "shards_complete": len(done), "shards_total": meta["num_shards"],
            "temporary_files": len(temporary_files(trace_dir)), "tables": tables}


def find_traces(path: str | os.PathLike) -> list[Path]:
    """``path`` itself if it holds a run.json, else its immediate subfolders that do (sorted)."""
    path = Path(path)
    if (path / RUN_META_FILE).is_file():
        read_run_meta(path)  # raises a clear error for a foreign or damaged run.json
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist")
    found = sorted(p for p in path.iterdir() if p.is_dir() and is_trace_dir(p))
    if not found:
        raise FileNotFoundError(f"no trace under {path}: neither it nor its subfolders contain {RUN_META_FILE}")
    return found
