"""Reading a trace directory: run metadata, completed shards, tables as pyarrow datasets, summaries.

Readers only ever see *complete* shards (every table of the shard has its final file); temporary
``*.tmp`` files and half-renamed shards of an interrupted run are ignored.
"""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq

from moeca.common.inputs import require_folder
from moeca.common.jsontext import JSONInputError, read_json
from moeca.models.config import DiTMoEConfig

from .schema import RUN_META_FILE, SCHEMA_VERSION, TABLES, TMP_SUFFIX, parse_shard_file_name, table_schema, tables_for

_REQUIRED_META = ("schema_version", "model", "sampler", "steps", "cfg_scale", "seed", "batch_size", "num_samples",
                  "num_shards", "labels", "lags", "dump_vectors", "step_t")
_NUMBER = (int, float)
_META_TYPES = {"schema_version": int, "model": dict, "sampler": dict, "steps": int, "cfg_scale": _NUMBER, "seed": int,
               "batch_size": int, "num_samples": int, "num_shards": int, "labels": list, "lags": int,
               "dump_vectors": int, "step_t": list, "model.config": dict, "model.config.depth": int,
               "model.config.top_k": int, "model.config.input_size": int, "model.config.patch_size": int,
               "sampler.num_steps": int, "sampler.cfg_scale": _NUMBER, "sampler.kind": str}
"""Field types of run.json; the nested ones are what readers compute with. Minimal (synthetic) traces
have the nested fields, ``schema_version``, ``model``, ``sampler`` and ``lags``."""


def check_meta_types(meta: object, where: Path, full: bool = True) -> None:
    """Raise ValueError naming the first run.json field that is missing or of the wrong type."""
    if not isinstance(meta, dict):
        raise ValueError(f"{where} is not a moeca trace run.json (it holds a {type(meta).__name__}, not an object); "
                         "re-trace with `moeca trace --overwrite`")
    minimal = ("schema_version", "model", "sampler", "lags")
    for field, kind in _META_TYPES.items():
        node: object = meta
        for key in field.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        if node is None and not full and "." not in field and field not in minimal:
            continue
        if not isinstance(node, kind) or isinstance(node, bool):
            names = {dict: "a JSON object", list: "a JSON list", int: "an integer", str: "a string"}.get(
                kind, "a number")
            raise ValueError(f"{where}: field {field} is {node!r}; it must be {names}. The file was edited or "
                             "damaged; re-trace with `moeca trace --overwrite`")


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
    meta = read_json(path, "trace file", "the trace is damaged; re-trace it with `moeca trace --overwrite`")
    missing = [k for k in _REQUIRED_META if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValueError(f"{path} is not a moeca trace run.json (missing fields: {', '.join(missing)})")
    check_meta_types(meta, path)
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


def trace_summary(trace_dir: str | os.PathLike, deep: bool = False) -> dict:
    """Rows, bytes and bytes per row per table, completed vs planned shards, leftover temporaries.

    Every complete shard is validated first (:func:`validate_shards`; ``deep`` also decodes every
    page); an invalid one is not counted as complete and its problem is listed under ``problems``.
    """
    meta = read_run_meta(trace_dir)
    problems = check_run_meta(trace_dir, meta)
    report = validate_shards(trace_dir, meta, deep=deep)
    problems += [p for ps in report.problems.values() for p in ps]
    problems += [f"{Path(trace_dir) / t} is a file, not the folder of the {t} table; the trace is damaged, re-trace "
                 "it with `moeca trace`" for t in tables_for(int(meta.get("dump_vectors", 0)))
                 if (Path(trace_dir) / t).exists() and not (Path(trace_dir) / t).is_dir()]
    done = [s for s in complete_shards(trace_dir, meta) if s not in report.problems]
    tables = {}
    for t in tables_for(int(meta.get("dump_vectors", 0))):
        rows = sum(report.rows[t].get(s, 0) for s in done)
        size = sum(report.bytes[t].get(s, 0) for s in done)
        tables[t] = {"rows": rows, "bytes": size, "bytes_per_row": size / rows if rows else None}
    return {"path": str(trace_dir), "run_name": meta.get("run_name"), "schema_version": meta["schema_version"],
            "model": meta["model"].get("name") or meta["model"]["config"].get("name"),
            "weights_hash": meta["model"]["weights_hash"], "sampler": meta["sampler"]["kind"],
            "steps": meta["steps"], "cfg_scale": meta["cfg_scale"], "samples": meta["num_samples"],
            "lags": meta["lags"], "shards_complete": len(done), "shards_total": meta["num_shards"],
            "temporary_files": len(temporary_files(trace_dir)), "tables": tables, "problems": problems}


# ----------------------------------------------------------------------------- validation
def check_distinct_traces(trace_dirs) -> list[Path]:
    """The trace paths as given, refusing one that is given twice (compared after resolving links)."""
    seen: dict[Path, str] = {}
    out = []
    for t in trace_dirs:
        key = Path(t).expanduser().resolve()
        if key in seen:
            raise ValueError(f"trace {t} is given twice (also as {seen[key]}; both are {key}); pooling it twice "
                             "would count its rows twice. Give each TRACE_DIR once")
        seen[key] = str(t)
        out.append(Path(t))
    return out


class TraceValidationError(ValueError):
    """A trace whose files contradict its run.json or the schema; the message names the file and the fix."""


def check_run_meta(trace_dir: str | os.PathLike, meta: dict) -> list[str]:
    """Contradictions inside a full moeca run.json (steps vs sampler, labels vs samples, shards vs batch)."""
    where = Path(trace_dir) / RUN_META_FILE
    out = []
    sampler = meta.get("sampler") if isinstance(meta.get("sampler"), dict) else {}
    fix = "the file was edited or damaged; re-trace with `moeca trace --overwrite`"
    for field, value, expected in (
            ("steps", meta.get("steps"), sampler.get("num_steps")),
            ("cfg_scale", meta.get("cfg_scale"), sampler.get("cfg_scale")),
            ("num_samples", meta.get("num_samples"), len(meta.get("labels") or [])),
            ("len(step_t)", len(meta.get("step_t") or []), sampler.get("num_steps"))):
        if value != expected:
            out.append(f"{where}: field {field} is {value!r} but should be {expected!r}; {fix}")
    bs, n = meta.get("batch_size"), meta.get("num_samples")
    if not isinstance(bs, int) or bs < 1 or not isinstance(n, int) or n < 1:
        out.append(f"{where}: fields batch_size={bs!r} and num_samples={n!r} must be integers >= 1; {fix}")
    elif meta.get("num_shards") != -(-n // bs):
        out.append(f"{where}: field num_shards is {meta.get('num_shards')!r} but {n} samples in batches of {bs} "
                   f"make {-(-n // bs)}; {fix}")
    if not isinstance(meta.get("lags"), int) or meta["lags"] < 1:
        out.append(f"{where}: field lags is {meta.get('lags')!r}; it must be an integer >= 1; {fix}")
    return out + config_problems(trace_dir, meta)


def config_problems(trace_dir: str | os.PathLike, meta: dict) -> list[str]:
    """The model config in run.json must be valid and hash to the recorded ``model.fingerprint``."""
    where = Path(trace_dir) / RUN_META_FILE
    model = meta.get("model") or {}
    try:
        fingerprint = DiTMoEConfig.from_dict(model.get("config") or {}).fingerprint()
    except (TypeError, ValueError) as exc:
        return [f"{where}: field model.config is not a valid model config ({exc}); the file was edited or damaged; "
                "re-trace with `moeca trace --overwrite`"]
    if "fingerprint" in model and model["fingerprint"] != fingerprint:
        return [f"{where}: field model.config hashes to fingerprint {fingerprint} but model.fingerprint says "
                f"{model['fingerprint']!r}; the config was edited after tracing. Re-trace with "
                "`moeca trace --overwrite`"]
    return []


class ShardReport:
    """What :func:`validate_shards` found: rows and bytes per (table, shard), problems per shard."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[int, int]] = {}
        self.bytes: dict[str, dict[int, int]] = {}
        self.problems: dict[int, list[str]] = {}

    def add(self, shard: int, problem: str) -> None:
        self.problems.setdefault(shard, []).append(problem)


def _facts(meta: dict) -> dict:
    """The numbers a shard's rows must agree with, from run.json (full or minimal)."""
    sampler = meta.get("sampler") or {}
    config = meta["model"]["config"]
    steps = int(sampler.get("num_steps") or meta.get("steps") or 0)
    depth, tokens = int(config["depth"]), (int(config["input_size"]) // int(config["patch_size"])) ** 2
    per_block, blocks_text = depth * tokens, f"{depth} blocks x {tokens} tokens"
    layout = meta["model"].get("layout")
    if layout:  # a family whose blocks see different token counts (HiDream: image only, or image + text)
        counts = [int(layout["image_tokens"]) + (int(layout["text_tokens"]) if kind == "single" else 0)
                  for kind in layout["block_kinds"]]
        tokens, per_block, blocks_text = max(counts), sum(counts), f"{depth} blocks of {min(counts)}..{tokens} tokens"
    return {"steps": steps, "depth": depth, "top_k": int(config["top_k"]), "tokens": tokens,
            "block_tokens": per_block, "blocks_text": blocks_text,
            "cfg_rows": 1 if float(sampler.get("cfg_scale", 1.0)) == 1.0 else 2,
            "lags": int(meta["lags"]), "batch_size": meta.get("batch_size"), "num_samples": meta.get("num_samples")}


def _stat_range(pf: pq.ParquetFile, column: str) -> tuple[int, int] | None:
    """(min, max) of ``column`` from the row-group statistics; None when a row group has none."""
    idx = pf.schema_arrow.get_field_index(column)
    lo = hi = None
    md = pf.metadata
    for rg in range(md.num_row_groups):
        st = md.row_group(rg).column(idx).statistics
        if st is None or not st.has_min_max:
            return None
        lo = st.min if lo is None else min(lo, st.min)
        hi = st.max if hi is None else max(hi, st.max)
    return None if lo is None else (int(lo), int(hi))


def check_shard_file(path: Path, table: str, shard: int, facts: dict, deep: bool = False) -> tuple[int, list[str]]:
    """Validate one shard file: footer, schema, row count and key statistics against run.json.

    Returns ``(rows, problems)``. ``deep`` also reads and decodes every page (catches flipped bits
    inside compressed data, which the footer cannot show).
    """
    fix = f"delete {path} and run `moeca trace --resume` with the same options to recompute that shard"
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged footer
        return 0, [f"{path}: cannot read this Parquet file ({str(exc).splitlines()[0]}); it is truncated or "
                   f"corrupt; {fix}"]
    expected = table_schema(table, facts["lags"])
    missing = [f.name for f in expected if f.name not in schema.names]
    foreign = [n for n in schema.names if n not in expected.names]
    wrong = [f"{f.name} ({schema.field(f.name).type} instead of {f.type})" for f in expected
             if f.name in schema.names and not schema.field(f.name).type.equals(f.type)]
    problems = []
    if missing or foreign or wrong:
        parts = ([f"missing columns {missing}"] if missing else []) + ([f"foreign columns {foreign}"] if foreign
                                                                       else []) + ([f"wrong types {wrong}"] if wrong
                                                                                   else [])
        return 0, [f"{path}: schema does not match the {table} table of tracer/schema.py with lags="
                   f"{facts['lags']} ({'; '.join(parts)}); {fix}"]
    rows = pf.metadata.num_rows
    if table == "vectors":
        return rows, problems
    bs, n = facts["batch_size"], facts["num_samples"]
    srange = _stat_range(pf, "sample")
    if isinstance(bs, int) and isinstance(n, int):
        lo, hi = shard * bs, min((shard + 1) * bs, n) - 1
        if hi < lo:
            return rows, [f"{path}: shard {shard} lies beyond run.json's {n} samples in batches of {bs}; {fix}"]
        samples = hi - lo + 1
        if srange is not None and (srange[0] < lo or srange[1] > hi):
            problems.append(f"{path}: holds samples {srange[0]}..{srange[1]} but shard {shard} is samples "
                            f"{lo}..{hi} per run.json; {fix}")
    else:
        samples = srange[1] - srange[0] + 1 if srange is not None else None
    per_sample = facts["cfg_rows"] * facts["steps"] * facts["block_tokens"] * (
        facts["top_k"] if table == "branches" else 1)
    if samples is not None and rows != samples * per_sample:
        problems.append(f"{path}: has {rows:,} rows but run.json implies {samples * per_sample:,} ({samples} samples"
                        f" x {facts['cfg_rows']} CFG rows x {facts['steps']} steps x {facts['blocks_text']}"
                        + (f" x top-{facts['top_k']}" if table == "branches" else "")
                        + f"); the shard and run.json disagree; {fix}")
    for column, top in (("step", facts["steps"] - 1), ("block", facts["depth"] - 1),
                        ("token", facts["tokens"] - 1), ("cfg_branch", facts["cfg_rows"] - 1)):
        r = _stat_range(pf, column)
        if r is not None and rows and (r[0] != 0 or r[1] != top):
            problems.append(f"{path}: column {column} spans {r[0]}..{r[1]} but run.json implies 0..{top}; "
                            f"the shard and run.json disagree; {fix}")
    if deep and not problems:
        rg = 0
        try:
            checked = pq.ParquetFile(path, page_checksum_verification=True)
            for rg in range(checked.metadata.num_row_groups):
                checked.read_row_group(rg)
        except Exception as exc:  # a page checksum mismatch, or decompression / decoding errors of a damaged page
            problems.append(f"{path}: row group {rg} is damaged ({str(exc).splitlines()[0]}); {fix}")
    return rows, problems


def validate_shards(trace_dir: str | os.PathLike, meta: dict, deep: bool = False) -> ShardReport:
    """Check every final shard file of a trace against ``meta`` (see :func:`check_shard_file`)."""
    facts = _facts(meta)
    report = ShardReport()
    for t in tables_for(int(meta.get("dump_vectors", 0) or 0)):
        report.rows[t], report.bytes[t] = {}, {}
        for shard, path in sorted(shard_files(trace_dir, t).items()):
            rows, problems = check_shard_file(path, t, shard, facts, deep)
            report.rows[t][shard] = rows
            report.bytes[t][shard] = path.stat().st_size
            for p in problems:
                report.add(shard, p)
    return report


def validate_trace(trace_dir: str | os.PathLike, deep: bool = False) -> dict:
    """Raise :class:`TraceValidationError` naming the first problems of a trace; returns its run.json.

    Works on full moeca traces and on minimal ones (run.json with model config, sampler and lags).
    """
    require_trace_folder(trace_dir)
    path = Path(trace_dir) / RUN_META_FILE
    try:
        meta = read_json(path, "trace file", "the trace is damaged; re-trace it with `moeca trace --overwrite`")
    except JSONInputError as exc:
        raise TraceValidationError(str(exc)) from None
    except FileNotFoundError:
        raise FileNotFoundError(f"{trace_dir} is not a trace directory: {RUN_META_FILE} is missing (create one "
                                "with `moeca trace --out DIR`)") from None
    except (OSError, ValueError) as exc:
        raise TraceValidationError(f"{path}: cannot be read ({exc}); the trace is damaged, re-trace it") from None
    full = isinstance(meta, dict) and all(k in meta for k in _REQUIRED_META)
    try:
        check_meta_types(meta, path, full=full)
    except ValueError as exc:
        raise TraceValidationError(str(exc)) from None
    problems = check_run_meta(trace_dir, meta) if full else config_problems(trace_dir, meta)
    report = validate_shards(trace_dir, meta, deep=deep)
    problems += [p for ps in report.problems.values() for p in ps]
    if problems:
        more = f" (and {len(problems) - 3} more problems)" if len(problems) > 3 else ""
        raise TraceValidationError("; ".join(problems[:3]) + more)
    return meta


def require_trace_folder(path: str | os.PathLike) -> Path:
    """``path`` if it is a folder; else an error saying it is missing or a file (e.g. the trace's run.json)."""
    path = Path(path)
    return require_folder(path, "trace", f"give the trace folder that holds {RUN_META_FILE}"
                          + (f" ({path.parent})" if path.name == RUN_META_FILE else ""))


def find_traces(path: str | os.PathLike) -> list[Path]:
    """``path`` itself if it holds a run.json, else its immediate subfolders that do (sorted)."""
    path = Path(path)
    if (path / RUN_META_FILE).is_file():
        read_run_meta(path)  # raises a clear error for a foreign or damaged run.json
        return [path]
    require_trace_folder(path)
    if (path / RUN_META_FILE).is_dir():
        raise IsADirectoryError(f"trace {path}: its {RUN_META_FILE} is a folder, not a file; the trace is damaged, "
                                "re-trace it with `moeca trace`")
    found = sorted(p for p in path.iterdir() if p.is_dir() and is_trace_dir(p))
    if not found:
        raise FileNotFoundError(f"no trace under {path}: neither it nor its subfolders contain {RUN_META_FILE}")
    return found
