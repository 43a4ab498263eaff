"""One out-of-core pass over a trace: mergeable partial aggregates (counts, sums, histograms).

A trace is read shard by shard (``branches`` and ``tokens`` files of the same sample shard together),
and a shard larger than the memory budget is read in sample ranges, so memory stays bounded whatever
the trace size. Each chunk is reduced with vectorised numpy (``bincount``) into fixed-shape arrays
(:class:`Partials`); partials of chunks and of traces are merged by addition in a fixed order, so the
local path and the Dask path (:func:`moeca.analysis.collect.collect`) give bit-identical results.

Histogram conventions
---------------------
- Metric histograms (for p50/p90): float16 values binned by their top 10 bits (``bits >> 6``): 16 bins
  per octave over the normal range, i.e. a relative resolution of 2^-4 (6.25%), down to float16's
  subnormals (bin 0 holds [0, 2^-18)); the last value bin is [256, inf). Two more bins count nulls
  (no value: pair not routed at step - lag, or step < lag) and non-finite values (NaN/Inf in rel_l2
  or cos). Quantiles report the lower edge of the bin.
- Error histograms (token vs branch sweep): float32 relative errors; bin 0 is exactly 0, bin 1 is
  (0, 2^-20), bins 2..161 cover [2^-20, 1) with 8 bins per octave, bin 162 is [1, inf) and NaN.
  Budget ``j`` reuses bins ``0..j``, i.e. errors ``< BUDGETS[j]`` (or exactly 0 for ``BUDGETS[0] = 0``).
"""
from __future__ import annotations

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
_HB_OFFSET = 0


def metric_bin_lower_edges() -> np.ndarray:
    """Lower edge of each metric value bin (length NB), float64."""
    edges = np.zeros(NB)
    bits = ((np.arange(1, NB) + _HB_OFFSET) << 6).astype(np.uint16)
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


def error_bins(e: np.ndarray) -> np.ndarray:
    """float32 errors -> bin index 0..NEB-1 (see module docstring)."""
    e = np.ascontiguousarray(e, dtype=np.float32)
    bits = e.view(np.uint32)
    b = (bits >> 20).astype(np.int32) - (_EB_LO - 2)
    np.clip(b, 1, NEB - 1, out=b)
    b[e == 0] = 0
    b[np.isnan(e)] = NEB - 1
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
    return col.to_numpy().astype(np.int64, copy=False)


def _validity(arr: pa.Array) -> np.ndarray | None:
    """Arrow validity bitmap -> bool [n] (None when there are no nulls)."""
    if not arr.null_count:
        return None
    buf = arr.buffers()[0]
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")
    return bits[arr.offset:arr.offset + len(arr)].view(bool)


def _f16(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """float16 column -> (values float16 [n], valid bool [n] or None when no nulls)."""
    arr = table.column(name).combine_chunks()
    if arr.type != pa.float16():
        arr = arr.cast(pa.float16())
    vals = np.frombuffer(arr.buffers()[1], dtype=np.float16, count=arr.offset + len(arr))[arr.offset:]
    return vals, _validity(arr)


def _luts() -> tuple[np.ndarray, np.ndarray]:
    bits = np.arange(65536, dtype=np.uint32)
    b = (bits >> 6).astype(np.int64) - _HB_OFFSET
    b = np.clip(b, 0, NB - 1).astype(np.int16)
    bad = (bits & 0x7FFF) >= 0x7C00
    b[bad] = BIN_BAD
    return b, bad


_REL_LUT, _BAD_LUT = _luts()


def _metric_state(rel: np.ndarray, rel_valid: np.ndarray | None, cos: np.ndarray,
                  cos_valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """-> (bin [n] int16 in 0..NBX-1, ok [n] bool: finite non-null rel and cos)."""
    b = _REL_LUT[rel.view(np.uint16)]
    cos_bad = _BAD_LUT[cos.view(np.uint16)]
    if cos_valid is not None:
        cos_bad |= ~cos_valid
    if cos_bad.any():
        b[cos_bad] = BIN_BAD
    if rel_valid is not None:
        b[~rel_valid] = BIN_NULL
    return b, b < NB


def _check_range(name: str, values: np.ndarray, lo: int, hi: int, path: Path, what: str) -> None:
    if len(values) and (values.min() < lo or values.max() > hi):
        raise ValueError(f"{path}: {name} values span {values.min()}..{values.max()}, outside {lo}..{hi} "
                         f"({what}); the file does not match its run.json")


def _keep_freed_memory() -> None:
    """Let glibc keep freed chunk-sized arrays (up to 32 MB) for reuse instead of unmapping them, so each
    chunk does not pay page faults again. Best effort; no-op off glibc."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)      # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 * 1024 * 1024)     # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


class _ChunkReducer:
    """Reduces one (shard, sample range) chunk into a :class:`Partials`."""

    def __init__(self, info: TraceInfo, grid: Grid):
        self.info, self.grid = info, grid
        self.flops = unit_flops(info.config)
        self.B, self.S, self.E, self.K = grid.depth, grid.num_steps, grid.num_experts, grid.lags
        self.T = info.tokens

    def reduce(self, shard: Shard, lo: int, hi: int, filtered: bool, threads: bool, p: Partials) -> int:
        """Add the chunk's aggregates into ``p``; returns its branch rows."""
        before = p.branch_rows
        ttab = _read(shard.tokens, token_columns(self.K), lo, hi, filtered, threads)
        dense = self._tokens(ttab, shard.tokens, lo, hi, p)
        del ttab
        btab = _read(shard.branches, branch_columns(self.K), lo, hi, filtered, threads)
        self._branches(btab, shard.branches, lo, hi, dense, p)
        return p.branch_rows - before

    def _keys(self, tab: pa.Table, path: Path, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (dense token key [n] int64, step [n] int64, block * S + step [n] int64); range-checked."""
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
        step = raw["step"].astype(np.int64)
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

    def _tokens(self, tab: pa.Table, path: Path, lo: int, hi: int, p: Partials) -> dict:
        B, S, K, T = self.B, self.S, self.K, self.T
        n = tab.num_rows
        p.token_rows += n
        key, step, gts = self._keys(tab, path, lo, hi)
        nd = (hi - lo + 1) * 2 * S * B * T
        moe_norm = _f16(tab, "moe_norm")[0].astype(np.float32)
        sh_norm = _f16(tab, "shared_norm")[0].astype(np.float32)
        if not self.info.has_shared:
            sh_norm = np.zeros_like(sh_norm)
        moe_d = np.full(nd, np.nan, np.float32)
        sh_d = np.full(nd, np.nan, np.float32)
        moe_d[key] = moe_norm
        sh_d[key] = sh_norm
        inv_ref = np.float32(1) / (np.sqrt(moe_norm * moe_norm + sh_norm * sh_norm) + np.float32(EPS))
        inv_ref_d = np.full(nd, -1.0, np.float32)                         # -1: no token row (checked)
        inv_ref_d[key] = inv_ref
        BS = B * S
        gtsN = gts * NBX
        runs = _Runs(gts)
        for u, unit in enumerate(TOKEN_UNITS):
            for li in range(K):
                rel, rv = _f16(tab, f"{unit}_rel_l2_lag{li + 1}")
                cos, cv = _f16(tab, f"{unit}_cos_lag{li + 1}")
                b, ok = _metric_state(rel, rv, cos, cv)
                p.tu_hist[u, li] += np.bincount(gtsN + b, minlength=BS * NBX).reshape(B, S, NBX)
                p.tu_sum_rel[u, li] += runs.sum(np.where(ok, rel, 0), BS).reshape(B, S)
                p.tu_sum_cos[u, li] += runs.sum(np.where(ok, cos, 0), BS).reshape(B, S)
        fl = self.flops
        gtsE = gts * NEB
        for li in range(K):
            lag = li + 1
            if not (step >= lag).any():
                continue
            bad = step < lag
            k_prev = np.maximum(key - lag * B * T, 0)
            m_rel, mv = _f16(tab, f"moe_rel_l2_lag{lag}")
            d_moe = m_rel * moe_d[k_prev]                                   # float32
            if mv is not None:
                bad |= ~mv
            if self.info.has_shared:
                s_rel, sv = _f16(tab, f"shared_rel_l2_lag{lag}")
                d_sh = s_rel * sh_d[k_prev]
                if sv is not None:
                    bad |= ~sv
                e_sh = d_sh * inv_ref
                e_tok = (d_moe + d_sh) * inv_ref
            else:
                e_sh = None
                e_tok = d_moe * inv_ref
            e_tok[bad] = np.nan                                           # no value: never reused
            self._cmp(p.tok_cnt, p.tok_err, p.fl_tok, li, gtsE, e_tok, fl["moe_total_per_token"])
            if e_sh is not None:
                e_sh[bad] = np.nan
                self._cmp(p.sh_cnt, p.sh_err, p.fl_sh, li, gtsE, e_sh, fl["shared"])
            cnt = np.bincount(gts[step >= lag], minlength=BS).reshape(B, S)
            p.tok_total[li] += cnt
            p.fl_moe_total[li] += cnt * fl["moe_total_per_token"]
            p.fl_block_total[li] += cnt * fl["block_per_token"]
        return {"inv_ref": inv_ref_d}

    def _cmp(self, cnt: np.ndarray, err: np.ndarray, flops: np.ndarray, li: int, gE: np.ndarray, e: np.ndarray,
             unit: float) -> None:
        """Add error histograms; ``gE = (block * S + step) * NEB``; NaN errors land in the never-reused bin
        (rows with no cache and rows before step ``lag`` are passed as NaN and subtracted out here)."""
        B, S = self.B, self.S
        bins = error_bins(e)
        idx = gE + bins
        c = np.bincount(idx, minlength=B * S * NEB).reshape(B, S, NEB)
        w = np.bincount(idx, np.where(bins < NEB - 1, e, 0), minlength=B * S * NEB).reshape(B, S, NEB)
        cnt[li] += c
        err[li] += w
        flops[li] += c * unit

    def _branches(self, tab: pa.Table, path: Path, lo: int, hi: int, dense: dict, p: Partials) -> None:
        B, S, K, E, T = self.B, self.S, self.K, self.E, self.T
        p.branch_rows += tab.num_rows
        key_t, step, gts = self._keys(tab, path, lo, hi)
        exp = _ints(tab, "expert")
        if not len(exp):
            return
        _check_range("expert", exp, 0, self.info.num_experts - 1, path, f"{self.info.num_experts} experts")
        key_b = key_t * E + exp
        gate = tab.column("gate_weight").to_numpy().astype(np.float32, copy=False)
        out_norm = _f16(tab, "out_norm")[0]
        out_d = np.full((hi - lo + 1) * 2 * S * B * T * E, np.nan, np.float16)
        out_d[key_b] = out_norm
        g = gts * E + exp
        gN = g * NBX
        gtsE = gts * NEB
        BSE = B * S * E
        p.ex_routed += np.bincount(g, minlength=BSE).reshape(B, S, E)
        p.ex_sum_gate += np.bincount(g, gate, minlength=BSE).reshape(B, S, E)
        gb = np.clip((gate * GATE_BINS).astype(np.int64), 0, GATE_BINS - 1)
        inv_ref = dense["inv_ref"][key_t]
        if (inv_ref == -1.0).any():
            raise ValueError(f"{path}: {int((inv_ref == -1.0).sum())} branch rows have no matching row in the "
                             f"tokens table of the same shard; the trace is inconsistent, re-run `moeca trace`")
        w_over_ref = gate * inv_ref
        step_stride = B * T * E
        for li in range(K):
            lag = li + 1
            rel, rv = _f16(tab, f"rel_l2_lag{lag}")
            cos, cv = _f16(tab, f"cos_lag{lag}")
            b, ok = _metric_state(rel, rv, cos, cv)
            p.ex_hist[li] += np.bincount(gN + b, minlength=BSE * NBX).reshape(B, S, E, NBX)
            rel_ok = np.where(ok, rel, 0)
            p.ex_sum_rel[li] += np.bincount(g, rel_ok, minlength=BSE).reshape(B, S, E)
            p.ex_sum_cos[li] += np.bincount(g, np.where(ok, cos, 0), minlength=BSE).reshape(B, S, E)
            if li == 0:                                                 # gate dependence: lag 1 only
                p.gw_cnt[li] += np.bincount(gb[ok], minlength=GATE_BINS)
                p.gw_sum_rel[li] += np.bincount(gb, rel_ok, minlength=GATE_BINS)
            # branch reuse: only pairs routed at step - lag have a cache (non-null metric)
            no_cache = step < lag if rv is None else (~rv) | (step < lag)
            if no_cache.all():
                continue
            prev_norm = out_d[np.maximum(key_b - lag * step_stride, 0)]
            e_br = w_over_ref * rel * prev_norm
            e_br[no_cache] = np.nan
            self._cmp(p.br_cnt, p.br_err, p.fl_br, li, gtsE, e_br, self.flops["expert"])


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
    dense_per_sample = 2 * info.num_steps * info.depth * info.tokens * (info.num_experts * 2 + 12)
    per_sample = per_sample_rows * 160 + dense_per_sample
    step = max(1, int(budget_bytes // max(per_sample, 1)))
    if step >= nsamp:
        return [(lo, hi, False)]
    return [(a, min(a + step - 1, hi), True) for a in range(lo, hi + 1, step)]


_PROGRESS_QUEUE = None


def _init_worker(queue) -> None:
    global _PROGRESS_QUEUE
    _PROGRESS_QUEUE = queue


def _run_tasks(info: TraceInfo, grid: Grid, tasks: list, use_threads: bool) -> Partials:
    """Reduce a list of chunks into one accumulator (in a worker process; progress via its queue)."""
    queue = _PROGRESS_QUEUE
    _keep_freed_memory()
    reducer = _ChunkReducer(info, grid)
    acc = Partials.zeros(grid)
    for shard, lo, hi, filt in tasks:
        rows = reducer.reduce(shard, lo, hi, filt, use_threads, acc)
        if queue is not None:
            queue.put(rows)
    return acc


def trace_partials(trace: str | Path | TraceInfo, grid: Grid | None = None, memory_bytes: int = 2 * 1024**3,
                   threads: int = 2, progress=None, chunk_bytes: int | None = None) -> Partials:
    """Reduce one trace to :class:`Partials` (run locally or on a Dask worker).

    ``memory_bytes`` bounds the working set: chunks are sized to ``memory_bytes / threads``.
    ``threads`` chunks are reduced concurrently, in worker processes (numpy reductions hold the GIL);
    inside a daemonic process (e.g. a Dask worker) everything runs in-process. Chunks are assigned to
    workers round robin and merged in worker order, so results are deterministic for a given
    ``threads``. ``progress`` (optional) is called with the branch rows of each finished chunk.
    ``chunk_bytes`` overrides the per-chunk budget.
    """
    import multiprocessing as mp

    info = trace if isinstance(trace, TraceInfo) else open_trace(trace)
    grid = grid or Grid.of([info])
    threads = max(1, int(threads))
    budget = chunk_bytes or max(16 * 1024**2, (memory_bytes - 400 * 1024**2) // threads)
    tasks = [(shard, lo, hi, filt) for shard in info.shards for lo, hi, filt in _plan(shard, info, budget)]
    workers = min(threads, len(tasks)) or 1
    if mp.current_process().daemon or info.branch_rows < 2_000_000:
        workers = 1
    if workers == 1:
        _keep_freed_memory()
        total = Partials.zeros(grid)
        reducer = _ChunkReducer(info, grid)
        for shard, lo, hi, filt in tasks:
            rows = reducer.reduce(shard, lo, hi, filt, threads > 1, total)
            if progress is not None:
                progress(rows)
    else:
        from concurrent.futures import ProcessPoolExecutor, wait
        ctx = mp.get_context("spawn")
        import queue as queue_mod
        q = ctx.Queue() if progress is not None else None
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(q,)) as pool:
            futures = [pool.submit(_run_tasks, info, grid, tasks[w::workers], False) for w in range(workers)]
            while True:
                done, pending = wait(futures, timeout=0.2)
                while q is not None:
                    try:
                        progress(q.get_nowait())
                    except queue_mod.Empty:
                        break
                if not pending:
                    break
            parts = [f.result() for f in futures]
        total = parts[0]
        for part in parts[1:]:
            total.add(part)
    total.traces = [str(info.path)]
    return total
