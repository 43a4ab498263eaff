"""Open and validate trace directories (layout and conventions: :mod:`moeca.tracer.schema`).

Everything here reads metadata only (``run.json`` and Parquet footers); rows are read by
:mod:`moeca.analysis.engine` in bounded chunks.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from moeca.common.jsontext import read_json
from moeca.tracer.schema import SCHEMA_VERSION, TOKEN_UNITS

KEY_COLUMNS = ("sample", "cfg_branch", "step", "block", "token")


@dataclass(frozen=True)
class Shard:
    """One sample shard: paired ``branches`` and ``tokens`` Parquet files with their sample range."""

    name: str
    branches: Path
    tokens: Path
    branch_rows: int
    token_rows: int
    sample_min: int
    sample_max: int


@dataclass(frozen=True)
class TraceInfo:
    """A validated trace directory.

    ``depth``, ``num_experts``, ``top_k``, ``tokens`` come from the model config in ``run.json``;
    ``num_steps`` from the sampler; ``lags`` is K (metrics ``*_lag1..K``).
    """

    path: Path
    meta: dict
    schema_version: int
    lags: int
    depth: int
    num_experts: int
    top_k: int
    tokens: int
    num_steps: int
    has_shared: bool
    shards: tuple[Shard, ...]

    @property
    def branch_rows(self) -> int:
        return sum(s.branch_rows for s in self.shards)

    @property
    def token_rows(self) -> int:
        return sum(s.token_rows for s in self.shards)

    @property
    def config(self) -> dict:
        return self.meta["model"]["config"]

    @property
    def fingerprint(self) -> str:
        return str(self.meta["model"].get("fingerprint", ""))


def parse_memory_limit(text: str | int | None, default: int = 2 * 1024**3) -> int:
    """``"2GB"``, ``"512MB"``, ``"1.5GiB"``, ``1000000`` -> bytes. None -> ``default``."""
    if text is None:
        return default
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(text))
    if not m:
        raise ValueError(f"cannot parse memory limit {text!r}; use a size such as 2GB, 512MB or 1.5GiB")
    scale = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}[m.group(2).lower()]
    value = int(float(m.group(1)) * scale)
    if value < 64 * 1024**2:
        raise ValueError(f"memory limit {text!r} is below 64MB; the analysis needs at least 64MB")
    return value


def _need(meta: dict, path: Path, *keys: str) -> Any:
    node: Any = meta
    for i, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            raise ValueError(f"{path}: run.json has no {'.'.join(keys[:i + 1])!r}; it is not a complete moeca "
                             f"trace (re-run `moeca trace`)")
        node = node[key]
    return node


def _parquet_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.parquet") if not p.name.startswith("."))


def _open_parquet(path: Path, table: str, lags: int, required: list[str]) -> pq.ParquetFile:
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{path}: truncated or corrupt Parquet file ({exc}); delete it and re-run "
                         f"`moeca trace --resume` for that trace") from None
    md = schema.metadata or {}
    version = md.get(b"moeca_schema_version")
    if version is not None and version.decode() != str(SCHEMA_VERSION):
        raise ValueError(f"{path}: Parquet schema version {version.decode()} is not supported (this moeca "
                         f"reads version {SCHEMA_VERSION}); re-trace with this version of moeca")
    missing = [c for c in required if c not in schema.names]
    if missing:
        raise ValueError(f"{path}: {table} file lacks columns {missing}; not a moeca {table} table of a trace "
                         f"with {lags} lags")
    return pf


def _sample_range(pf: pq.ParquetFile, path: Path) -> tuple[int, int]:
    idx = pf.schema_arrow.get_field_index("sample")
    lo, hi = None, None
    md = pf.metadata
    for rg in range(md.num_row_groups):
        st = md.row_group(rg).column(idx).statistics
        if st is None or not st.has_min_max:
            col = pf.read(columns=["sample"]).column(0)
            mm = pc.min_max(col)
            return int(mm["min"].as_py()), int(mm["max"].as_py())
        lo = st.min if lo is None else min(lo, st.min)
        hi = st.max if hi is None else max(hi, st.max)
    if lo is None:
        return 0, -1
    return int(lo), int(hi)


def branch_columns(lags: int) -> list[str]:
    cols = ["sample", "cfg_branch", "step", "block", "token", "expert", "gate_weight", "out_norm"]
    for lag in range(1, lags + 1):
        cols += [f"rel_l2_lag{lag}", f"cos_lag{lag}"]
    return cols


def token_columns(lags: int) -> list[str]:
    cols = list(KEY_COLUMNS) + ["moe_norm", "shared_norm"]
    for unit in TOKEN_UNITS:
        for lag in range(1, lags + 1):
            cols += [f"{unit}_rel_l2_lag{lag}", f"{unit}_cos_lag{lag}"]
    return cols


def open_trace(path: str | Path) -> TraceInfo:
    """Validate a trace directory and return what the analysis needs to read it.

    Raises FileNotFoundError / ValueError naming the problem: not a trace directory, unknown schema
    version, missing fields in ``run.json``, unpaired shards, a truncated or corrupt Parquet file,
    zero steps.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"trace directory {path} does not exist")
    run_json = path / "run.json"
    if not path.is_dir() or not run_json.is_file():
        raise ValueError(f"{path} is not a trace directory: it has no run.json (create one with "
                         f"`moeca trace --out {path}`)")
    meta = read_json(run_json, "trace file", "the trace is damaged, re-run `moeca trace`")
    if not isinstance(meta, dict) or "schema_version" not in meta:
        raise ValueError(f"{run_json}: no schema_version; not a moeca trace")
    version = meta["schema_version"]
    if version != SCHEMA_VERSION:
        raise ValueError(f"{path}: unknown trace schema_version {version!r}; this moeca reads schema_version "
                         f"{SCHEMA_VERSION}. Re-trace with this moeca or use the moeca version that wrote it")
    config = _need(meta, path, "model", "config")
    lags = int(_need(meta, path, "lags"))
    if lags < 1:
        raise ValueError(f"{path}: run.json lags={lags}; need at least 1")
    sampler = _need(meta, path, "sampler")
    num_steps = int(sampler.get("num_steps", 0) or 0) if isinstance(sampler, dict) else 0
    if num_steps <= 0:
        raise ValueError(f"{path}: trace has zero steps (sampler.num_steps={sampler.get('num_steps')!r}); "
                         f"nothing to analyse, trace with --steps >= 2")
    for key in ("depth", "num_experts", "top_k", "input_size", "patch_size", "hidden_size"):
        _need(meta, path, "model", "config", key)
    tokens = (int(config["input_size"]) // int(config["patch_size"])) ** 2
    has_shared = float(config.get("shared_expert_ratio", 0) or 0) > 0

    bfiles = _parquet_files(path / "branches")
    tfiles = _parquet_files(path / "tokens")
    if not bfiles:
        raise ValueError(f"{path}: no branches/*.parquet; the trace has zero steps recorded (was the tracing "
                         f"run interrupted? finish it with `moeca trace --resume`)")
    tnames = {p.name: p for p in tfiles}
    unpaired = sorted({p.name for p in bfiles} ^ set(tnames))
    if unpaired:
        raise ValueError(f"{path}: shards {unpaired} exist in only one of branches/ and tokens/; the trace is "
                         f"incomplete (finish it with `moeca trace --resume`)")
    expected = meta.get("num_shards")
    if isinstance(expected, int) and len(bfiles) < expected:
        raise ValueError(f"{path}: the trace is incomplete ({len(bfiles)} of {expected} shards written); finish it "
                         f"with `moeca trace --resume --out {path}` before analysing")
    bcols, tcols = branch_columns(lags), token_columns(lags)
    shards = []
    for bpath in bfiles:
        tpath = tnames[bpath.name]
        bpf = _open_parquet(bpath, "branches", lags, bcols)
        tpf = _open_parquet(tpath, "tokens", lags, tcols)
        lo, hi = _sample_range(bpf, bpath)
        shards.append(Shard(bpath.stem, bpath, tpath, bpf.metadata.num_rows, tpf.metadata.num_rows, lo, hi))
    if sum(s.branch_rows for s in shards) == 0 or sum(s.token_rows for s in shards) == 0:
        raise ValueError(f"{path}: the trace has zero steps recorded (all Parquet files are empty)")
    return TraceInfo(path=path, meta=meta, schema_version=int(version), lags=lags, depth=int(config["depth"]),
                     num_experts=int(config["num_experts"]), top_k=int(config["top_k"]), tokens=tokens,
                     num_steps=num_steps, has_shared=has_shared, shards=tuple(shards))


def _diff(a: Any, b: Any, prefix: str) -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            d = _diff(a.get(key), b.get(key), f"{prefix}.{key}")
            if d:
                return d
        return None
    return None if a == b else f"{prefix}: {a!r} vs {b!r}"


def check_compatible(traces: list[TraceInfo], allow_mixed: bool = False) -> list[str]:
    """Refuse to pool traces of different models or samplers unless ``allow_mixed``.

    Compared: model fingerprint, weights hash, the model config, every sampler field and ``lags``.
    Returns the list of differences (empty when all agree); raises ValueError naming the first
    difference when they disagree and ``allow_mixed`` is False.
    """
    diffs = []
    first = traces[0]
    for other in traces[1:]:
        for label, a, b in (("model.fingerprint", first.meta["model"].get("fingerprint"),
                             other.meta["model"].get("fingerprint")),
                            ("model.weights_hash", first.meta["model"].get("weights_hash"),
                             other.meta["model"].get("weights_hash")),
                            ("model.config", first.config, other.config),
                            ("sampler", first.meta["sampler"], other.meta["sampler"]),
                            ("lags", first.lags, other.lags)):
            d = _diff(a, b, label)
            if d:
                diffs.append(f"{first.path} vs {other.path}: {d}")
    if diffs and not allow_mixed:
        raise ValueError(f"refusing to aggregate traces of different models or samplers ({diffs[0]}); "
                         f"pass --allow-mixed to pool them anyway")
    return diffs
