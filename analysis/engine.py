"""One out-of-core pass over a trace: mergeable partial aggregates (counts, sums, histograms).

A trace is read shard by shard (``branches`` and ``tokens`` files of the same sample shard together),
and a shard larger than the memory budget is read in sample ranges, so memory stays bounded whatever
the trace size. Each chunk is reduced with vectorised numpy, in cache-sized blocks of rows
(``np.add.at`` histograms, ``bincount`` / ``reduceat`` sums; float16 columns handled as raw bits
through lookup tables), into fixed-shape arrays (:class:`Partials`); partials of chunks and of traces
are merged by addition in a fixed order, so the local path and the Dask path
(:func:`moeca.analysis.collect.collect`) give bit-identical results.

Histogram conventions
---------------------
- Metric histograms (for p50/p90): float16 values binned by their top 10 bits (``bits >> 6``): 16 bins
  per octave over the normal range, i.e. a relative resolution of 2^-4 (6.25%), down to float16's
  subnormals (bin 0 holds [0, 2^-18)); the last value bin is [256, inf). Two more bins count nulls
  (no value: pair not routed at step - lag, or step < lag) and non-finite values (NaN/Inf in rel_l2
  or cos). Quantiles report the lower edge of the bin.
- Error histograms (token vs branch sweep): float32 relative errors; bin 0 is exactly 0, bin 1 is
  (0, 2^-20), bins 2..161 cover [2^-20, 1) with 8 bins per octave, bin 162 is [1, inf) and NaN, and
  also counts the rows with no value (no cache, or step < lag).
  Budget ``j`` reuses bins ``0..j``, i.e. errors ``< BUDGETS[j]`` (or exactly 0 for ``BUDGETS[0] = 0``).
"""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import queue as queue_mod
import sys
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moeca.tracer.schema import TOKEN_UNITS

from .flops import unit_flops
from .trace import Shard, TraceInfo, branch_columns, open_trace, token_columns

# --- metric histogram (float16 bits) -------------------------------------------------------------
NB = (0x5C00 >> 6) + 1        # value bins: bits >> 6 up to float16 256.0 (last bin: [256, inf))
BIN_NULL = NB                 # null metric
BIN_BAD = NB + 1              # NaN / Inf
NBX = NB + 2


def metric_bin_lower_edges() -> np.ndarray:
    """Lower edge of each metric value bin (length NB), float64."""
    edges = np.zeros(NB)
    bits = (np.arange(1, NB) << 6).astype(np.uint16)
    edges[1:] = bits.view(np.float16).astype(np.float64)
    return edges


# --- error histogram (float32 bits) ---------------------------------------------------------------
_EB_LO = (107 << 3)           # float32 2^-20 >> 20
NEB = 2 + 20 * 8 + 1


def _budgets() -> np.ndarray:
    out = np.zeros(NEB - 1)
    lower = ((np.arange(2, NEB) - 2 + _EB_LO) << 20).astype(np.uint32).view(np.float32)
    out[1:] = lower.astype(np.float64)   # budget j reuses bins 0..j: errors below lower edge of bin j+1
    return out


BUDGETS = _budgets()
"""Error budgets of the sweep (length 162): 0, then 2^-20 .. 1 with 8 steps per octave."""

GATE_BINS = 20
EPS = 1e-12
BLOCK_ROWS = 1 << 18
"""Rows per vectorised pass: temporaries (~2 MB per int64 array) stay in cache. Passes over whole
chunks (millions of rows) are memory-bound: on the 2-core benchmark machine two workers running them
got no speed-up over one; in blocks they get ~1.7x."""


def error_bins(e: np.ndarray) -> np.ndarray:
    """float32 errors [n] -> bin index 0..NEB-1 [n] int16 (see module docstring; NaN, Inf and negative
    values land in the last bin)."""
    e = np.ascontiguousarray(e, dtype=np.float32)
    b = (e.view(np.uint32) >> 20).astype(np.int16)          # sign, exponent, 3 mantissa bits
    b -= _EB_LO - 2
    np.clip(b, 1, NEB - 1, out=b)
    b *= e != 0
    return b


@dataclass(frozen=True)
class Grid:
    """Shape of the aggregate arrays: blocks, steps, experts, lags (union over pooled traces)."""

    depth: int
    num_steps: int
    num_experts: int
    lags: int

    @staticmethod
    def of(traces: list[TraceInfo]) -> "Grid":
        return Grid(max(t.depth for t in traces), max(t.num_steps for t in traces),
                    max(t.num_experts for t in traces), min(t.lags for t in traces))


@dataclass
class Partials:
    """Mergeable aggregates of one or more traces. Shapes use U=4 token units, K lags, B blocks,
    S steps, E experts; ``*_hist`` last axis is NBX (value bins + null + non-finite)."""

    grid: Grid
    tu_hist: np.ndarray      # [U, K, B, S, NBX] int64
    tu_sum_rel: np.ndarray   # [U, K, B, S] float64 (valid rows)
    tu_sum_cos: np.ndarray   # [U, K, B, S]
    ex_hist: np.ndarray      # [K, B, S, E, NBX] int64
    ex_sum_rel: np.ndarray   # [K, B, S, E]
    ex_sum_cos: np.ndarray   # [K, B, S, E]
    ex_routed: np.ndarray    # [B, S, E] int64 routed (token, expert) pairs
    ex_sum_gate: np.ndarray  # [B, S, E] float64
    gw_cnt: np.ndarray       # [K, GATE_BINS] int64 valid branch rows by gate-weight bin (lag 1 only filled)
    gw_sum_rel: np.ndarray   # [K, GATE_BINS] float64
    # token vs branch comparison, per lag (cache age), block, step, error bin
    tok_cnt: np.ndarray      # [K, B, S, NEB] tokens whose whole MoE update has this error
    tok_err: np.ndarray      # [K, B, S, NEB] sum of those errors
    br_cnt: np.ndarray       # [K, B, S, NEB] branches (with a cache) with this error
    br_err: np.ndarray
    sh_cnt: np.ndarray       # [K, B, S, NEB] shared-expert units
    sh_err: np.ndarray
    tok_total: np.ndarray    # [K, B, S] tokens with step >= lag (the comparison's population)
    # FLOPs-weighted versions (per-trace FLOPs applied, so pooled mixed models add up)
    fl_tok: np.ndarray       # [K, B, S, NEB] MoE FLOPs reusable per token policy
    fl_br: np.ndarray        # [K, B, S, NEB] routed-expert FLOPs reusable per branch policy
    fl_sh: np.ndarray        # [K, B, S, NEB] shared-expert FLOPs reusable (branch policy)
    fl_moe_total: np.ndarray  # [K, B, S] MoE FLOPs of the population
    fl_block_total: np.ndarray  # [K, B, S] block FLOPs (attention + router + MoE) of the population
    branch_rows: int = 0
    token_rows: int = 0
    traces: list = field(default_factory=list)

    @staticmethod
    def zeros(grid: Grid) -> "Partials":
        U, K, B, S, E = len(TOKEN_UNITS), grid.lags, grid.depth, grid.num_steps, grid.num_experts
        i, f = np.int64, np.float64
        return Partials(
            grid=grid,
            tu_hist=np.zeros((U, K, B, S, NBX), i), tu_sum_rel=np.zeros((U, K, B, S), f),
            tu_sum_cos=np.zeros((U, K, B, S), f),
            ex_hist=np.zeros((K, B, S, E, NBX), i), ex_sum_rel=np.zeros((K, B, S, E), f),
            ex_sum_cos=np.zeros((K, B, S, E), f), ex_routed=np.zeros((B, S, E), i),
            ex_sum_gate=np.zeros((B, S, E), f), gw_cnt=np.zeros((K, GATE_BINS), i),
            gw_sum_rel=np.zeros((K, GATE_BINS), f),
            tok_cnt=np.zeros((K, B, S, NEB), i), tok_err=np.zeros((K, B, S, NEB), f),
            br_cnt=np.zeros((K, B, S, NEB), i), br_err=np.zeros((K, B, S, NEB), f),
            sh_cnt=np.zeros((K, B, S, NEB), i), sh_err=np.zeros((K, B, S, NEB), f),
            tok_total=np.zeros((K, B, S), i),
            fl_tok=np.zeros((K, B, S, NEB), f), fl_br=np.zeros((K, B, S, NEB), f),
            fl_sh=np.zeros((K, B, S, NEB), f), fl_moe_total=np.zeros((K, B, S), f),
            fl_block_total=np.zeros((K, B, S), f))

    def add(self, other: "Partials") -> "Partials":
        """In-place elementwise sum (same grid); returns self."""
        if other.grid != self.grid:
            raise ValueError(f"cannot merge partials of grids {self.grid} and {other.grid}")
        for f_ in fields(self):
            a = getattr(self, f_.name)
            if isinstance(a, np.ndarray):
                a += getattr(other, f_.name)
        self.branch_rows += other.branch_rows
        self.token_rows += other.token_rows
        self.traces = self.traces + other.traces
        return self


# --- reading ---------------------------------------------------------------------------------------

def _read(path: Path, columns: list[str], lo: int, hi: int, filtered: bool, threads: bool) -> pa.Table:
    try:
        if filtered:
            return pq.read_table(path, columns=columns, filters=[("sample", ">=", lo), ("sample", "<=", hi)],
                                 use_threads=threads)
        return pq.read_table(path, columns=columns, use_threads=threads)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise ValueError(f"{path}: truncated or corrupt Parquet file ({exc}); delete it and re-run "
                         f"`moeca trace --resume` for that trace") from None


def _ints(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name)
    if col.null_count:
        raise ValueError(f"column {name!r} has nulls; key columns must be non-null")
    return col.to_numpy()


def _validity(arr: pa.Array) -> np.ndarray | None:
    """Arrow validity bitmap -> bool [n] (None when there are no nulls)."""
    if not arr.null_count:
        return None
    buf = arr.buffers()[0]
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")
    return bits[arr.offset:arr.offset + len(arr)].view(bool)


def _f16(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """float16 column -> (raw IEEE bits uint16 [n], valid bool [n] or None when there are no nulls).

    Values stay as bits: numpy's float16 arithmetic is slow, so callers use lookup tables and integer
    masks instead (the bits of null slots are arbitrary)."""
    arr = table.column(name).combine_chunks()
    if arr.type != pa.float16():
        arr = arr.cast(pa.float16())
    bits = np.frombuffer(arr.buffers()[1], dtype=np.uint16, count=arr.offset + len(arr))[arr.offset:]
    return bits, _validity(arr)


_F32_LUT = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
"""Value of every float16 bit pattern as float32 [65536] (a gather is ~6x faster than numpy's cast)."""


def _as_f32(bits: np.ndarray) -> np.ndarray:
    """float16 bits [n] uint16 -> values [n] float32 (exact)."""
    return np.take(_F32_LUT, bits)


def _metric_bins(rel: np.ndarray, rel_valid: np.ndarray | None, cos: np.ndarray,
                 cos_valid: np.ndarray | None) -> np.ndarray:
    """float16 bits of rel_l2 and cos [n] -> histogram bin [n] int16 in 0..NBX-1: BIN_NULL where rel is
    null, else BIN_BAD where rel or cos is NaN/Inf or cos is null, else the value bin of rel.

    Masks are applied arithmetically (``b + (c - b) * mask``): masked stores with random masks cost
    ~20x more on half-null columns."""
    b = np.minimum(rel >> 6, NB - 1).view(np.int16)            # top 10 bits
    bad = (rel & 0x7FFF) >= 0x7C00
    bad |= (cos & 0x7FFF) >= 0x7C00
    if cos_valid is not None and (rel_valid is None or (rel_valid & ~cos_valid).any()):
        bad |= ~cos_valid
    if bad.any():
        b += (BIN_BAD - b) * bad
    if rel_valid is not None:
        b += (BIN_NULL - b) * ~rel_valid
    return b


def _masked(bits: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """float16 bits [n] -> values [n] float32 (exact), 0 where not ``ok`` (weights for sums)."""
    return _as_f32(bits * ok)


def _check_range(name: str, values: np.ndarray, lo: int, hi: int, path: Path, what: str) -> None:
    if len(values) and (values.min() < lo or values.max() > hi):
        raise ValueError(f"{path}: {name} values span {values.min()}..{values.max()}, outside {lo}..{hi} "
                         f"({what}); the file does not match its run.json")


def _keep_freed_memory() -> None:
    """Let glibc keep freed chunk-sized arrays (up to 64 MB) for reuse instead of unmapping them, so each
    chunk does not pay page faults again. Best effort; no-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024 * 1024)      # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 * 1024 * 1024)     # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _add_at(acc: np.ndarray, idx: np.ndarray, values=1) -> None:
    """``acc.flat[idx] += values``, repeated indices accumulated in row order; ``acc`` C-contiguous."""
    np.add.at(acc.reshape(-1), idx, values)


def _add_errors(cnt: np.ndarray, err: np.ndarray, g_err: np.ndarray, e: np.ndarray, no_value: np.ndarray) -> None:
    """Add rows to one lag's error histogram ``cnt`` [B, S, NEB] int64 and error sums ``err`` [B, S, NEB].

    ``g_err = (block * S + step) * NEB`` [n]; ``e`` [n] float32 relative errors. Rows with ``no_value``
    [n] bool (no cache, or step < lag) and non-finite errors land in the never-reused bin NEB-1, whose
    errors are not summed."""
    bins = error_bins(e)
    bins += (NEB - 1 - bins) * no_value
    idx = g_err + bins
    _add_at(cnt, idx)
    reused = (e.view(np.uint32) * (bins < NEB - 1)).view(np.float32)
    _add_at(err, idx, reused.astype(np.float64))


def _blocks(tab: pa.Table):
    """-> (row slice, table slice) per block of BLOCK_ROWS rows."""
    for a in range(0, tab.num_rows, BLOCK_ROWS):
        yield slice(a, a + BLOCK_ROWS), tab.slice(a, BLOCK_ROWS)


class _ChunkReducer:
    """Reduces one (shard, sample range) chunk into a :class:`Partials`: the chunk's keys and dense
    per-token arrays (for lookups at ``step - lag``) are built whole, then rows are reduced in blocks
    of BLOCK_ROWS. FLOPs fields are filled per trace by :func:`add_flops`."""

    def __init__(self, info: TraceInfo, grid: Grid):
        self.info, self.grid = info, grid
        self.B, self.S, self.E, self.K = grid.depth, grid.num_steps, grid.num_experts, grid.lags
        self.T = info.tokens

    def reduce(self, shard: Shard, lo: int, hi: int, filtered: bool, threads: bool, p: Partials) -> int:
        """Add the chunk's aggregates into ``p``; returns its branch rows."""
        return self.reduce_tables(self.read(shard, lo, hi, filtered, threads), shard, lo, hi, p)

    def read(self, shard: Shard, lo: int, hi: int, filtered: bool, threads: bool) -> tuple[pa.Table, pa.Table]:
        """The chunk's (tokens, branches) tables, only the columns the reduction uses."""
        return (_read(shard.tokens, token_columns(self.K), lo, hi, filtered, threads),
                _read(shard.branches, branch_columns(self.K), lo, hi, filtered, threads))

    def reduce_tables(self, tables: tuple[pa.Table, pa.Table], shard: Shard, lo: int, hi: int, p: Partials) -> int:
        """Add the aggregates of a chunk read by :meth:`read` into ``p``; returns its branch rows."""
        ttab, btab = tables
        inv_ref_d = self._tokens(ttab, shard.tokens, lo, hi, p)
        del ttab
        self._branches(btab, shard.branches, lo, hi, inv_ref_d, p)
        return btab.num_rows

    def _keys(self, tab: pa.Table, path: Path, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (dense token key [n] int64, step [n] int16, block * S + step [n] int64); range-checked."""
        B, S, T, info = self.B, self.S, self.T, self.info
        raw = {}
        for name in ("sample", "cfg_branch", "step", "block", "token"):
            col = tab.column(name)
            if col.null_count:
                raise ValueError(f"{path}: key column {name!r} has nulls")
            raw[name] = col.to_numpy()
        _check_range("step", raw["step"], 0, info.num_steps - 1, path, f"sampler.num_steps={info.num_steps}")
        _check_range("block", raw["block"], 0, info.depth - 1, path, f"depth={info.depth}")
        _check_range("token", raw["token"], 0, T - 1, path, f"{T} tokens")
        _check_range("cfg_branch", raw["cfg_branch"], 0, 1, path, "0 cond, 1 uncond")
        _check_range("sample", raw["sample"], lo, hi, path, "shard sample range")
        step = raw["step"]
        gts = raw["block"].astype(np.int64)
        gts *= S
        gts += step
        key = raw["sample"].astype(np.int64)
        key -= lo
        key *= 2
        key += raw["cfg_branch"]
        key *= S
        key += step
        key *= B
        key += raw["block"]
        key *= T
        key += raw["token"]
        return key, step, gts

    def _tokens(self, tab: pa.Table, path: Path, lo: int, hi: int, p: Partials) -> np.ndarray:
        """Token units' histograms and sums, and the token / shared-expert side of the comparison.
        Returns 1 / ||MoE + shared output|| per dense token key [nd] float32 (-1: no token row)."""
        p.token_rows += tab.num_rows
        key, step, gts = self._keys(tab, path, lo, hi)
        nd = (hi - lo + 1) * 2 * self.S * self.B * self.T
        moe_norm = _as_f32(_f16(tab, "moe_norm")[0])
        sh_norm = _as_f32(_f16(tab, "shared_norm")[0])
        if not self.info.has_shared:
            sh_norm = np.zeros_like(sh_norm)
        inv_ref = np.float32(1) / (np.sqrt(moe_norm * moe_norm + sh_norm * sh_norm) + np.float32(EPS))
        dense = {}
        for name, values, fill in (("moe", moe_norm, np.nan), ("shared", sh_norm, np.nan), ("inv_ref", inv_ref, -1.0)):
            dense[name] = np.full(nd, fill, np.float32)
            dense[name][key] = values
        del moe_norm, sh_norm
        for rows, blk in _blocks(tab):
            self._token_units(blk, gts[rows], p)
            self._token_errors(blk, key[rows], step[rows], gts[rows], inv_ref[rows], dense, p)
        return dense["inv_ref"]

    def _token_units(self, blk: pa.Table, gts: np.ndarray, p: Partials) -> None:
        """Histograms and sums of every token unit and lag for one block of rows."""
        B, S = self.B, self.S
        runs = _Runs(gts)
        g_hist = gts * NBX
        for u, unit in enumerate(TOKEN_UNITS):
            for li in range(self.K):
                rel, rv = _f16(blk, f"{unit}_rel_l2_lag{li + 1}")
                cos, cv = _f16(blk, f"{unit}_cos_lag{li + 1}")
                b = _metric_bins(rel, rv, cos, cv)
                _add_at(p.tu_hist[u, li], g_hist + b)
                ok = b < NB
                p.tu_sum_rel[u, li] += runs.sum(_masked(rel, ok), B * S).reshape(B, S)
                p.tu_sum_cos[u, li] += runs.sum(_masked(cos, ok), B * S).reshape(B, S)

    def _token_errors(self, blk: pa.Table, key: np.ndarray, step: np.ndarray, gts: np.ndarray, inv_ref: np.ndarray,
                      dense: dict, p: Partials) -> None:
        """Per lag, for one block: relative error of reusing the whole MoE update (token policy) and the
        shared expert (branch policy), against the token's current MoE output norm; float32 as the model
        computes. ``dense``: per dense token key, ``moe`` and ``shared`` output norms [nd] float32."""
        B, S, T = self.B, self.S, self.T
        g_err = gts * NEB
        per_gts = np.bincount(gts, minlength=B * S).reshape(B, S)
        for li in range(self.K):
            lag = li + 1
            p.tok_total[li, :, lag:] += per_gts[:, lag:]                  # the tokens with step >= lag
            bad = step < lag
            k_prev = np.maximum(key - lag * B * T, 0)
            m_rel, mv = _f16(blk, f"moe_rel_l2_lag{lag}")
            d_moe = _as_f32(m_rel) * dense["moe"][k_prev]
            if mv is not None:
                bad |= ~mv
            if self.info.has_shared:
                s_rel, sv = _f16(blk, f"shared_rel_l2_lag{lag}")
                d_sh = _as_f32(s_rel) * dense["shared"][k_prev]
                if sv is not None:
                    bad |= ~sv
                e_sh = d_sh * inv_ref
                e_tok = (d_moe + d_sh) * inv_ref
                _add_errors(p.sh_cnt[li], p.sh_err[li], g_err, e_sh, bad)
            else:
                e_tok = d_moe * inv_ref
            _add_errors(p.tok_cnt[li], p.tok_err[li], g_err, e_tok, bad)

    def _branches(self, tab: pa.Table, path: Path, lo: int, hi: int, inv_ref_d: np.ndarray, p: Partials) -> None:
        """Per-expert histograms and sums, routing counts, gate dependence and the branch side of the
        comparison (per (token, expert) pair with a cache)."""
        B, S, E, T = self.B, self.S, self.E, self.T
        p.branch_rows += tab.num_rows
        key_t, step, gts = self._keys(tab, path, lo, hi)
        exp = _ints(tab, "expert")
        if not len(exp):
            return
        _check_range("expert", exp, 0, self.info.num_experts - 1, path, f"{self.info.num_experts} experts")
        key_b = key_t * E
        key_b += exp
        out_d = np.full((hi - lo + 1) * 2 * S * B * T * E, np.nan, np.float32)
        out_d[key_b] = _as_f32(_f16(tab, "out_norm")[0])
        inv_ref = inv_ref_d[key_t]
        if (inv_ref == -1.0).any():
            raise ValueError(f"{path}: {int((inv_ref == -1.0).sum())} branch rows have no matching row in the "
                             f"tokens table of the same shard; the trace is inconsistent, re-run `moeca trace`")
        del key_t
        g = gts * E
        g += exp
        gate = tab.column("gate_weight").to_numpy().astype(np.float32, copy=False)
        for rows, blk in _blocks(tab):
            self._branch_block(blk, key_b[rows], step[rows], gts[rows], g[rows], gate[rows], inv_ref[rows], out_d, p)

    def _branch_block(self, blk: pa.Table, key_b: np.ndarray, step: np.ndarray, gts: np.ndarray, g: np.ndarray,
                      gate: np.ndarray, inv_ref: np.ndarray, out_d: np.ndarray, p: Partials) -> None:
        """One block of branch rows. ``g = (block * S + step) * E + expert``; ``out_d``: expert output norm
        per dense (token, expert) key [nd * E] float32 (NaN where not routed)."""
        B, S, E, T = self.B, self.S, self.E, self.T
        BSE = B * S * E
        p.ex_routed += np.bincount(g, minlength=BSE).reshape(B, S, E)
        p.ex_sum_gate += np.bincount(g, gate, minlength=BSE).reshape(B, S, E)
        w_over_ref = gate * inv_ref
        g_hist = g * NBX
        g_err = gts * NEB
        for li in range(self.K):
            lag = li + 1
            rel, rv = _f16(blk, f"rel_l2_lag{lag}")
            cos, cv = _f16(blk, f"cos_lag{lag}")
            b = _metric_bins(rel, rv, cos, cv)
            _add_at(p.ex_hist[li], g_hist + b)
            ok = b < NB
            rel_ok = _masked(rel, ok)
            p.ex_sum_rel[li] += np.bincount(g, rel_ok, minlength=BSE).reshape(B, S, E)
            p.ex_sum_cos[li] += np.bincount(g, _masked(cos, ok), minlength=BSE).reshape(B, S, E)
            if li == 0:                                                 # gate dependence: lag 1 only
                _add_gate(gate, ok, rel_ok, p)
            # branch reuse: only pairs routed at step - lag have a cache (non-null metric)
            no_cache = step < lag
            if rv is not None:
                no_cache |= ~rv
            e_br = w_over_ref * _as_f32(rel)
            e_br *= out_d[np.maximum(key_b - lag * B * T * E, 0)]
            _add_errors(p.br_cnt[li], p.br_err[li], g_err, e_br, no_cache)


def _add_gate(gate: np.ndarray, ok: np.ndarray, rel_ok: np.ndarray, p: Partials) -> None:
    """Lag-1 drift by gate-weight bin (GATE_BINS equal bins over [0, 1]) of valid rows."""
    gb = (gate * GATE_BINS).astype(np.int64)
    np.clip(gb, 0, GATE_BINS - 1, out=gb)
    p.gw_cnt[0] += np.bincount(gb + GATE_BINS * ~ok, minlength=2 * GATE_BINS)[:GATE_BINS]
    p.gw_sum_rel[0] += np.bincount(gb, rel_ok, minlength=GATE_BINS)


def add_flops(p: Partials, info: TraceInfo) -> Partials:
    """Fill the FLOPs fields of one trace's partials from its counts and model (in place; returns ``p``).
    FLOPs per unit are integers, so the products are exact whatever the chunking."""
    fl = unit_flops(info.config)
    p.fl_tok[...] = p.tok_cnt * fl["moe_total_per_token"]
    p.fl_br[...] = p.br_cnt * fl["expert"]
    p.fl_sh[...] = p.sh_cnt * fl["shared"]
    p.fl_moe_total[...] = p.tok_total * fl["moe_total_per_token"]
    p.fl_block_total[...] = p.tok_total * fl["block_per_token"]
    return p


class _Runs:
    """Group sums over runs of equal group ids (rows are mostly sorted by group): reduceat, then scatter."""

    def __init__(self, g: np.ndarray):
        self.g = g
        if len(g):
            self.starts = np.concatenate([[0], np.flatnonzero(g[1:] != g[:-1]) + 1])
            self.ids = g[self.starts]
            self.use = len(self.starts) * 8 <= len(g)
        else:
            self.use = False

    def sum(self, w: np.ndarray, size: int) -> np.ndarray:
        if self.use:
            return np.bincount(self.ids, np.add.reduceat(w, self.starts, dtype=np.float64), minlength=size)
        return np.bincount(self.g, w, minlength=size)


def _plan(shard: Shard, info: TraceInfo, budget_bytes: int) -> list[tuple[int, int, bool]]:
    """Sample ranges of a shard such that one range fits the memory budget."""
    lo, hi = shard.sample_min, shard.sample_max
    if hi < lo:
        return []
    nsamp = hi - lo + 1
    per_sample_rows = (shard.branch_rows + shard.token_rows) / nsamp
    dense_per_sample = 2 * info.num_steps * info.depth * info.tokens * (info.num_experts * 4 + 12)
    per_sample = per_sample_rows * 160 + dense_per_sample
    step = max(1, int(budget_bytes // max(per_sample, 1)))
    if step >= nsamp:
        return [(lo, hi, False)]
    return [(a, min(a + step - 1, hi), True) for a in range(lo, hi + 1, step)]


def _reduce_share(info: TraceInfo, grid: Grid, tasks: list, threads: bool, progress) -> Partials:
    """Reduce a list of chunks, in order, into one accumulator; ``progress(rows)`` after each chunk."""
    _keep_freed_memory()
    reducer = _ChunkReducer(info, grid)
    acc = Partials.zeros(grid)
    for shard, lo, hi, filt in tasks:
        rows = reducer.reduce(shard, lo, hi, filt, threads, acc)
        if progress is not None:
            progress(rows)
    return acc


_PROGRESS_QUEUE = None


def _init_worker(queue) -> None:
    global _PROGRESS_QUEUE
    _PROGRESS_QUEUE = queue


def _worker_share(info: TraceInfo, grid: Grid, tasks: list) -> Partials:
    """:func:`_reduce_share` in a worker process, progress through the pool's queue."""
    queue = _PROGRESS_QUEUE
    return _reduce_share(info, grid, tasks, False, queue.put if queue is not None else None)


def trace_partials(trace: str | Path | TraceInfo, grid: Grid | None = None, memory_bytes: int = 2 * 1024**3,
                   threads: int = 2, progress=None, chunk_bytes: int | None = None) -> Partials:
    """Reduce one trace to :class:`Partials` (run locally or on a Dask worker).

    ``memory_bytes`` bounds the working set: chunks are sized to ``memory_bytes / threads``.
    ``threads`` chunks are reduced concurrently, by this process and ``threads - 1`` spawned worker
    processes (``bincount`` and ``add.at`` hold the GIL: two threads reach only ~1.3x on the
    reductions); inside a daemonic process (e.g. a Dask worker) everything runs in-process. Chunks are
    assigned to workers round robin and merged in worker order, so results are deterministic for a
    given ``threads``. ``progress`` (optional) is called with the branch rows of each finished chunk.
    ``chunk_bytes`` overrides the per-chunk budget.
    """
    info = trace if isinstance(trace, TraceInfo) else open_trace(trace)
    grid = grid or Grid.of([info])
    threads = max(1, int(threads))
    budget = chunk_bytes or max(16 * 1024**2, (memory_bytes - 400 * 1024**2) // threads)
    tasks = [(shard, lo, hi, filt) for shard in info.shards for lo, hi, filt in _plan(shard, info, budget)]
    workers = min(threads, len(tasks)) or 1
    if mp.current_process().daemon or info.branch_rows < 2_000_000:
        workers = 1
    if workers == 1:
        total = _reduce_share(info, grid, tasks, threads > 1, progress)
    else:
        total = _reduce_in_processes(info, grid, tasks, workers, progress)
    total.traces = [str(info.path)]
    return add_flops(total, info)


@contextlib.contextmanager
def _main_not_reimported():
    """While worker processes start, hide the path of ``__main__`` from ``multiprocessing`` spawn so the
    workers do not re-run the caller's script (a script without an ``if __name__ == "__main__"`` guard
    would otherwise fail there). The workers only run functions of this module."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None or getattr(main, "__spec__", None) is not None:
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


def _reduce_in_processes(info: TraceInfo, grid: Grid, tasks: list, workers: int, progress) -> Partials:
    """Chunks ``tasks[w::workers]`` reduced by worker ``w``: worker 0 is this process (already started
    and warm), the others are spawned processes. Partials are merged in worker order."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue() if progress is not None else None

    def drain() -> None:
        while q is not None:
            try:
                progress(q.get_nowait())
            except queue_mod.Empty:
                return

    def local_progress(rows: int) -> None:
        progress(rows)
        drain()

    with ProcessPoolExecutor(workers - 1, mp_context=ctx, initializer=_init_worker, initargs=(q,)) as pool:
        with _main_not_reimported():  # workers start here; they need moeca, not the caller's script
            futures = [pool.submit(_worker_share, info, grid, tasks[w::workers]) for w in range(1, workers)]
        total = _reduce_share(info, grid, tasks[0::workers], False, local_progress if q is not None else None)
        while wait(futures, timeout=0.2)[1]:
            drain()
        drain()
        for f in futures:
            total.add(f.result())
    return total
