"""Streaming Parquet writer for one sample shard: StepRecords -> Arrow -> row groups (zstd).

Each table goes to ``<table>/shard-NNNNN.parquet.tmp`` while the shard runs; :meth:`ShardWriter.commit`
closes the files and renames them to their final names, so a partial file is never visible under a
final name. :class:`BackgroundWriter` does the Arrow conversion and compression on a thread with a
bounded queue, so memory stays bounded and the sampling loop does not wait for the disk.
"""
from __future__ import annotations

import errno
import os
import queue
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .recorder import StepRecord, VECTOR_UNITS
from .schema import (VECTOR_TYPE, DICTIONARY_COLUMNS, KEY_COLUMNS, TMP_SUFFIX, branch_metric_columns, shard_file_name,
                     table_schema, token_metric_columns)

DEFAULT_ROW_GROUP_ROWS = 1 << 18
VECTOR_KINDS = ("attn", "moe", "shared", "expert", "moe_in")
COMPRESSION_LEVEL = 3


class TraceWriteError(OSError):
    """Writing a trace failed (disk full, directory not writable, ...); temporary files were removed."""


# ----------------------------------------------------------------------------- Arrow conversion
@lru_cache(maxsize=16)
def _grid(shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Flattened C-order index arrays for an array of ``shape`` (one per axis)."""
    return tuple(a.reshape(-1) for a in np.indices(shape, sparse=False, dtype=np.int32))


def _f16(col: np.ndarray) -> pa.Array:
    a = col.astype(np.float16)
    mask = np.isnan(a)
    return pa.array(a, type=pa.float16(), mask=mask if mask.any() else None)


def _keys(run: pa.Array, rec: StepRecord, block: np.ndarray, row: np.ndarray, token: np.ndarray) -> list[pa.Array]:
    """Arrays for the key columns in schema order (run, sample, cfg_branch, step, t, block, token)."""
    n = block.shape[0]
    cfg_rows = rec.cfg_rows.numpy()
    sample_rows = rec.sample_rows.numpy()
    run_col = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int8)), run)
    return [run_col, pa.array(sample_rows[row].astype(np.int32)), pa.array(cfg_rows[row].astype(np.int8)),
            pa.array(np.full(n, rec.step, np.int16)), pa.array(np.full(n, rec.t, np.float32)),
            pa.array(block.astype(np.int16)), pa.array(token.astype(np.int16))]


def record_to_tables(rec: StepRecord, run_name: str, lags: int) -> dict[str, pa.Table]:
    """Convert one record to Arrow tables (``tokens``, ``branches`` and, with dumps, ``vectors``)."""
    run = pa.array([run_name])
    out = {}

    tok = rec.tokens.numpy()
    L, R, T, F = tok.shape
    block, row, token = _grid((L, R, T))
    if rec.blocks is not None:
        block = rec.blocks.numpy()[block]
    flat = tok.reshape(-1, F)
    names = token_metric_columns(lags)
    if len(names) != F:
        raise ValueError(f"token record has {F} features, schema with lags={lags} expects {len(names)}")
    arrays = _keys(run, rec, block, row, token)
    for f, name in enumerate(names):
        col = flat[:, f]
        arrays.append(_f16(col))
    out["tokens"] = pa.Table.from_arrays(arrays, schema=table_schema("tokens", lags))

    br = rec.branches.numpy()
    L, R, T, k, F = br.shape
    block, row, token, slot = _grid((L, R, T, k))
    if rec.blocks is not None:
        block = rec.blocks.numpy()[block]
    flat = br.reshape(-1, F)
    lag_names = branch_metric_columns(lags)
    if F != 5 + len(lag_names):
        raise ValueError(f"branch record has {F} features, schema with lags={lags} expects {5 + len(lag_names)}")
    arrays = _keys(run, rec, block, row, token)
    arrays += [pa.array(slot.astype(np.int8)), pa.array(flat[:, 0].astype(np.int16)),
               pa.array(flat[:, 1].astype(np.float32)), pa.array(flat[:, 2].astype(np.float16), type=pa.float16()),
               pa.array(flat[:, 3] > 0.5), _f16(flat[:, 4])]
    arrays += [_f16(flat[:, 5 + f]) for f in range(len(lag_names))]
    out["branches"] = pa.Table.from_arrays(arrays, schema=table_schema("branches", lags))

    if rec.unit_vectors is not None:
        out["vectors"] = _vector_table(rec, run)
    return out


def _vector_table(rec: StepRecord, run: pa.Array) -> pa.Table:
    units = rec.unit_vectors.numpy()                 # [L, U, R, n, D]
    experts = rec.expert_vectors.numpy()             # [L, R, n, k, D]
    ids = rec.expert_ids.numpy()                     # [L, R, n, k]
    toks = rec.vector_tokens.numpy()                 # [L, n]
    L, U, R, n, D = units.shape
    k = experts.shape[3]
    kind_code = {name: i for i, name in enumerate(VECTOR_KINDS)}
    ub, uu, ur, uj = _grid((L, U, R, n))
    eb, er, ej, es = _grid((L, R, n, k))
    blocks = rec.vector_blocks.numpy()
    block = blocks[np.concatenate([ub, eb])]
    row = np.concatenate([ur, er])
    token = np.concatenate([toks[ub, uj], toks[eb, ej]])
    unit_codes = np.array([kind_code[u] for u in VECTOR_UNITS], np.int8)
    kind = np.concatenate([unit_codes[uu], np.full(eb.shape[0], kind_code["expert"], np.int8)])
    expert = np.concatenate([np.full(ub.shape[0], -1, np.int16), ids.reshape(-1).astype(np.int16)])
    values = np.concatenate([units.reshape(-1), experts.reshape(-1)]).astype(np.float16)
    rows = block.shape[0]
    offsets = pa.array(np.arange(0, (rows + 1) * D, D, dtype=np.int32))
    arrays = _keys(run, rec, block, row, token)
    arrays += [pa.DictionaryArray.from_arrays(pa.array(kind), pa.array(list(VECTOR_KINDS))),
               pa.array(expert), pa.ListArray.from_arrays(offsets, pa.array(values, type=pa.float16()),
                                                      type=VECTOR_TYPE)]
    return pa.Table.from_arrays(arrays, schema=table_schema("vectors"))


# ----------------------------------------------------------------------------- files
def _writer_options(schema: pa.Schema) -> dict:
    names = schema.names
    floats = [f.name for f in schema if pa.types.is_floating(f.type) and f.name != "t"]
    return dict(compression="zstd", compression_level=COMPRESSION_LEVEL,
                use_dictionary=[c for c in names if c in DICTIONARY_COLUMNS or c == "t"],
                use_byte_stream_split=floats,
                write_statistics=[c for c in names if c in KEY_COLUMNS],
                write_page_checksum=True)  # CRC32 per page: `moeca trace-info --verify` finds flipped bits


class ShardWriter:
    """Writes one shard's tables under ``out_dir``. Not thread-safe; see :class:`BackgroundWriter`.

    ``write(record)`` buffers Arrow tables and flushes a row group per table once ``row_group_rows``
    rows are buffered; ``commit()`` flushes, closes and renames; ``abort()`` removes the temporary
    files. Any OSError while writing aborts and raises :class:`TraceWriteError`.
    """

    def __init__(self, out_dir: str | os.PathLike, shard: int, *, tables: tuple[str, ...], lags: int,
                 run_name: str, row_group_rows: int = DEFAULT_ROW_GROUP_ROWS):
        self.out_dir = Path(out_dir)
        self.shard, self.tables, self.lags, self.run_name = shard, tables, lags, run_name
        self.row_group_rows = row_group_rows
        self.final = {t: self.out_dir / t / shard_file_name(shard) for t in tables}
        self.tmp = {t: p.with_name(p.name + TMP_SUFFIX) for t, p in self.final.items()}
        self._writers: dict[str, pq.ParquetWriter] = {}
        self._buffers: dict[str, list[pa.Table]] = {t: [] for t in tables}
        self._buffered: dict[str, int] = {t: 0 for t in tables}
        self.rows: dict[str, int] = {t: 0 for t in tables}
        self._closed = False
        self._guard(self._open)

    def _open(self) -> None:
        for t in self.tables:
            self.tmp[t].parent.mkdir(parents=True, exist_ok=True)
            schema = table_schema(t, self.lags)
            self._writers[t] = pq.ParquetWriter(str(self.tmp[t]), schema, **_writer_options(schema))

    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except OSError as exc:
            self.abort()
            what = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
            raise TraceWriteError(exc.errno, f"cannot write trace shard {self.shard} under {self.out_dir}: {what}. "
                                  "Temporary files were removed; free space or choose another --out, then rerun "
                                  "with --resume") from exc

    def write(self, record: StepRecord) -> None:
        tables = record_to_tables(record, self.run_name, self.lags)
        for t in self.tables:
            if t not in tables:
                continue
            self._buffers[t].append(tables[t])
            self._buffered[t] += tables[t].num_rows
            if self._buffered[t] >= self.row_group_rows:
                self._guard(self._flush, t)

    def _flush(self, t: str) -> None:
        if not self._buffers[t]:
            return
        table = pa.concat_tables(self._buffers[t])
        self._buffers[t], self._buffered[t] = [], 0
        self._writers[t].write_table(table, row_group_size=table.num_rows)
        self.rows[t] += table.num_rows

    def commit(self) -> dict[str, Path]:
        """Flush, close and rename every table file; returns the final paths."""
        def _finish() -> None:
            for t in self.tables:
                self._flush(t)
                self._writers[t].close()
            for t in self.tables:
                os.replace(self.tmp[t], self.final[t])
        self._guard(_finish)
        self._closed = True
        return dict(self.final)

    def abort(self) -> None:
        """Close and delete the temporary files (final files of this shard are left alone)."""
        if self._closed:
            return
        self._closed = True
        for w in self._writers.values():
            try:
                w.close()
            except Exception:  # noqa: BLE001 - best effort on an already failing path
                pass
        for p in self.tmp.values():
            try:
                p.unlink()
            except FileNotFoundError:
                pass


class BackgroundWriter:
    """Runs a :class:`ShardWriter` on a thread; ``put`` blocks when ``depth`` records are queued."""

    _STOP = object()

    def __init__(self, writer: ShardWriter, depth: int = 2):
        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name=f"moeca-trace-writer-{writer.shard}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._STOP:
                return
            if self._error is None:
                try:
                    self.writer.write(item)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                    self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            self.writer.abort()
            raise self._error

    def put(self, record: StepRecord) -> None:
        self._raise()
        self._queue.put(record)

    def commit(self) -> dict[str, Path]:
        self._queue.put(self._STOP)
        self._thread.join()
        self._raise()
        return self.writer.commit()

    def abort(self) -> None:
        if self._thread.is_alive():
            self._error = self._error or RuntimeError("aborted")
            self._queue.put(self._STOP)
            self._thread.join()
        self.writer.abort()
