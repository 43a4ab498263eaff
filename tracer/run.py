"""Trace a sampling run into a directory: plan shards, write run.json, resume, split across ranks.

Sample ``i`` has label ``config.labels[i]`` and initial noise from its own seed
(:func:`sample_seed`), so results do not depend on how shards are spread over ranks, and a resumed
run recomputes exactly the missing shards with results identical to an uninterrupted run. Shard
``s`` holds samples ``s*batch_size ..``; under ``torch.distributed`` rank ``r`` of ``W`` traces the
shards with ``s % W == r``.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow
import torch
import torch.distributed as dist
from tqdm import tqdm

from moeca.common.outputs import OutputError, output_lock, replaced_file
from moeca.diffusion.samplers import DiffusionSchedule, SamplerConfig, initial_noise, sample

from ..models.checkpoint import weights_hash
from .recorder import TracingRuntime
from .schema import DEFAULT_LAGS, RUN_META_FILE, SCHEMA_VERSION, TABLES, TMP_SUFFIX, parse_shard_file_name, tables_for
from .store import TraceValidationError, check_run_meta, complete_shards, read_run_meta, shard_files, validate_shards
from .writer import DEFAULT_ROW_GROUP_ROWS, BackgroundWriter, ShardWriter

MAX_LAGS = 32


@dataclass(frozen=True)
class TraceConfig:
    """What to trace. Everything here is recorded in run.json and must match on ``--resume``.

    sampler: how to sample (steps, CFG scale and mode). labels: one class label per sample (the
    number of samples is ``len(labels)``). seed: derives every sample's noise seed. batch_size:
    samples per shard (traced together). lags: compare each unit with 1..lags steps back.
    dump_vectors: full float16 vectors for this many tokens per block (0 = none).
    """

    sampler: SamplerConfig
    labels: tuple[int, ...]
    seed: int = 0
    batch_size: int = 8
    lags: int = DEFAULT_LAGS
    dump_vectors: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(int(v) for v in self.labels))
        if not self.labels:
            raise ValueError("a trace needs at least one sample (labels is empty)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 1 <= self.lags <= MAX_LAGS:
            raise ValueError(f"lags must be in 1..{MAX_LAGS}, got {self.lags}")
        if self.dump_vectors < 0:
            raise ValueError(f"dump_vectors must be >= 0, got {self.dump_vectors}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def shard_samples(self, shard: int) -> range:
        return range(shard * self.batch_size, min((shard + 1) * self.batch_size, self.num_samples))


def resolve_labels(num_classes: int, *, samples: int | None = None, labels: Sequence[int] | None = None,
                   num_per_class: int | None = None) -> tuple[int, ...]:
    """Labels per sample from the CLI options.

    ``num_per_class=M``: M samples of each class in order. ``labels``: the given labels, cycled to
    ``samples`` when that is given. Neither: ``samples`` samples cycling through the classes.
    """
    if num_per_class is not None:
        if labels:
            raise ValueError("give either --labels or --num-per-class, not both")
        if num_per_class < 1:
            raise ValueError(f"--num-per-class must be >= 1, got {num_per_class}")
        out = tuple(c for c in range(num_classes) for _ in range(num_per_class))
        if samples is not None and samples != len(out):
            raise ValueError(f"--samples {samples} disagrees with --num-per-class {num_per_class} x "
                             f"{num_classes} classes = {len(out)}; drop --samples")
        return out
    if labels:
        bad = [v for v in labels if not 0 <= int(v) < num_classes]
        if bad:
            raise ValueError(f"labels {bad} are outside the model's classes 0..{num_classes - 1}")
        n = samples if samples is not None else len(labels)
        return tuple(int(labels[i % len(labels)]) for i in range(n))
    n = samples if samples is not None else num_classes
    if n < 1:
        raise ValueError(f"--samples must be >= 1, got {n}")
    return tuple(i % num_classes for i in range(n))


def _derive(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:7], "little")


def sample_seed(seed: int, sample_id: int) -> int:
    """The noise seed of global sample ``sample_id`` in a run with ``seed``."""
    return _derive("moeca-trace-sample", seed, sample_id)


def shard_seed(seed: int, shard: int) -> int:
    """Seed of the per-step sampler noise (DDPM/DDIM) of shard ``shard``."""
    return _derive("moeca-trace-shard", seed, shard)


def step_times(sampler: SamplerConfig) -> list[float]:
    """Model time fed at each sampling step, as the samplers compute it (the ``t`` column)."""
    n = sampler.num_steps
    if sampler.kind == "rectified_flow":
        return [float(np.float32((n - s) / n)) for s in range(n)]
    ts = DiffusionSchedule.build(sampler.train_timesteps, n).timesteps
    return [float(v) for v in ts[::-1]]


def vector_tokens(seed: int, depth: int, num_tokens: int, n: int) -> dict[int, list[int]]:
    """Tokens whose vectors are dumped: ``n`` distinct tokens per block, drawn from ``seed``."""
    if n <= 0:
        return {}
    n = min(n, num_tokens)
    return {b: sorted(np.random.default_rng([seed, b, 7]).choice(num_tokens, n, replace=False).tolist())
            for b in range(depth)}


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "pyarrow": pyarrow.__version__,
           "numpy": np.__version__}
    try:
        out["moeca"] = version("moeca")
    except PackageNotFoundError:
        out["moeca"] = "unknown"
    return out


def build_run_meta(model: torch.nn.Module, config: TraceConfig, *, model_name: str | None = None,
                   checkpoint: str | None = None, run_name: str = "trace") -> dict:
    """The run.json content for tracing ``model`` with ``config``."""
    mc = model.config
    param = next(model.parameters())
    return {
        "schema_version": SCHEMA_VERSION,
        "run_name": run_name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"name": model_name or mc.name, "checkpoint": checkpoint, "config": mc.to_dict(),
                  "fingerprint": mc.fingerprint(), "weights_hash": weights_hash(model),
                  "dtype": str(param.dtype).replace("torch.", ""), "device": param.device.type},
        "sampler": config.sampler.to_dict(),
        "steps": config.sampler.num_steps,
        "cfg_scale": config.sampler.cfg_scale,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "num_samples": config.num_samples,
        "num_shards": config.num_shards,
        "labels": list(config.labels),
        "sample_seeds": [sample_seed(config.seed, i) for i in range(config.num_samples)],
        "lags": config.lags,
        "dump_vectors": config.dump_vectors,
        "vector_tokens": {str(b): v for b, v in
                          vector_tokens(config.seed, mc.depth, mc.num_tokens, config.dump_vectors).items()},
        "step_t": step_times(config.sampler),
        "tables": list(tables_for(config.dump_vectors)),
        "versions": _versions(),
    }


_RESUME_FIELDS = (("schema_version",), ("model", "fingerprint"), ("model", "weights_hash"), ("model", "dtype"),
                  ("sampler",), ("seed",), ("batch_size",), ("labels",), ("lags",), ("dump_vectors",))


def meta_differences(old: dict, new: dict) -> list[str]:
    """Human-readable list of the run.json fields that must match on resume but differ."""
    out = []
    for path in _RESUME_FIELDS:
        a, b = old, new
        for key in path:
            a = a.get(key) if isinstance(a, dict) else None
            b = b.get(key) if isinstance(b, dict) else None
        if a == b:
            continue
        name = ".".join(path)
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    out.append(f"{name}.{key} (trace has {a.get(key)!r}, this run asks for {b.get(key)!r})")
        elif isinstance(a, list) and isinstance(b, list) and len(a) > 8:
            out.append(f"{name} (trace has {len(a)} entries, this run {len(b)}; first difference at index "
                       f"{next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))})")
        else:
            out.append(f"{name} (trace has {a!r}, this run asks for {b!r})")
    return out


def _write_json_atomic(path: Path, data: dict) -> None:
    with replaced_file(path, path.with_name(path.name + TMP_SUFFIX)) as tmp:
        tmp.write_text(json.dumps(data, indent=1))


def _check_writable(out_dir: Path) -> None:
    probe = out_dir / f".moeca-write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(f"cannot write to trace directory {out_dir}: {exc.strerror or exc}; "
                              "choose a writable --out") from exc


def prepare_out_dir(out_dir: str | os.PathLike, meta: dict, *, resume: bool = False,
                    overwrite: bool = False) -> list[int]:
    """Create or validate ``out_dir`` for ``meta``; returns the shards already complete.

    New or empty directory: created, run.json written. Existing trace: an error unless ``resume``
    (run.json must agree and every finished shard must pass :func:`~moeca.tracer.store.validate_shards`;
    leftover temporaries and half-written shards are removed) or ``overwrite`` (run.json and the shard
    files are deleted; other files are left alone, and a folder without run.json is refused).
    """
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: resume keeps finished shards, "
                         "overwrite deletes them")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PermissionError(f"cannot create trace directory {out}: {exc.strerror or exc}; "
                              "choose a writable --out") from exc
    _check_writable(out)
    has_meta = (out / RUN_META_FILE).is_file()
    entries = [p for p in out.iterdir()]
    if entries and not resume and not overwrite:
        what = "a trace" if has_meta else "files"
        raise FileExistsError(f"output directory {out} already contains {what}; pass --resume to finish it, "
                              "--overwrite to replace it, or choose a new --out")
    if overwrite:
        if entries and not has_meta:
            raise FileExistsError(f"--overwrite {out}: it has no {RUN_META_FILE}, so it is not a trace moeca wrote; "
                                  "moeca replaces only its own traces. Choose a new --out")
        _remove_trace_files(out)
    elif resume and has_meta:
        old = read_run_meta(out)
        diffs = meta_differences(old, meta)
        if diffs:
            raise ValueError(f"cannot resume {out}: it was traced with different settings: " + "; ".join(diffs)
                             + ". Use --overwrite to start over, or a new --out")
        done = complete_shards(out, old)
        found = validate_shards(out, old, deep=True).problems   # finished shards are kept: they must be sound
        problems = check_run_meta(out, old) + [p for s in done for p in found.get(s, [])]
        if problems:
            raise TraceValidationError(f"cannot resume {out}: " + "; ".join(problems[:3])
                                       + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""))
        for t in TABLES:  # a shard missing any table is redone; drop its partial pieces
            for shard, path in shard_files(out, t).items():
                if shard not in done:
                    path.unlink()
            if (out / t).is_dir():
                for p in (out / t).iterdir():
                    if p.name.endswith(TMP_SUFFIX):
                        p.unlink()
        return done
    elif resume and entries:
        raise FileExistsError(f"cannot resume {out}: it has no {RUN_META_FILE}, so it is not a trace; "
                              "choose a new --out")
    _write_json_atomic(out / RUN_META_FILE, meta)
    return []


def _remove_trace_files(out: Path) -> None:
    """Delete what the tracer writes (run.json, shard files and their temporaries), nothing else.

    A table folder is removed only when it is empty afterwards.
    """
    for t in TABLES:
        folder = out / t
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            name = p.name[:-len(TMP_SUFFIX)] if p.name.endswith(TMP_SUFFIX) else p.name
            if parse_shard_file_name(name) is not None and p.is_file():
                p.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()
    (out / RUN_META_FILE).unlink(missing_ok=True)


class _Progress:
    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)

    def update(self, _step: int = 0) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def trace_shard(model: torch.nn.Module, runtime: TracingRuntime, out_dir: str | os.PathLike, config: TraceConfig,
                shard: int, *, run_name: str = "trace", on_step: Callable[[int], None] | None = None,
                background: bool = True, row_group_rows: int = DEFAULT_ROW_GROUP_ROWS) -> torch.Tensor:
    """Sample and record one shard; its files appear under their final names only on success.

    Returns the shard's samples ``[b, C, H, W]`` (identical to untraced sampling of the same noise).
    """
    mc = model.config
    param = next(model.parameters())
    ids = list(config.shard_samples(shard))
    noise = torch.cat([initial_noise((1, mc.in_channels, mc.input_size, mc.input_size),
                                     sample_seed(config.seed, i), param.device, param.dtype) for i in ids])
    labels = torch.tensor([config.labels[i] for i in ids], dtype=torch.long)
    writer = ShardWriter(out_dir, shard, tables=tables_for(config.dump_vectors), lags=config.lags,
                         run_name=run_name, row_group_rows=row_group_rows)
    sink = BackgroundWriter(writer) if background else writer
    put = sink.put if background else sink.write
    runtime.start_shard(ids, put)
    try:
        with model.use_runtime(runtime):
            images = sample(model, config.sampler, labels, seed=shard_seed(config.seed, shard), noise=noise,
                            on_step=on_step)
        sink.commit()
    except BaseException:
        sink.abort()
        raise
    finally:
        runtime.stop_shard()
    return images


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def trace_run(model: torch.nn.Module, out_dir: str | os.PathLike, config: TraceConfig, *, resume: bool = False,
              overwrite: bool = False, progress: bool = True, model_name: str | None = None,
              checkpoint: str | None = None, run_name: str | None = None, background: bool = True) -> Path:
    """Trace ``model`` sampling ``config`` into ``out_dir``; returns the directory.

    Under an initialised ``torch.distributed`` process group, rank 0 prepares the directory and
    every rank traces its share of the shards (``shard % world_size == rank``).
    """
    out = Path(out_dir)
    bad = [v for v in config.labels if not 0 <= v < model.config.num_classes]
    if bad:
        raise ValueError(f"labels {sorted(set(bad))} are outside the model's classes 0..{model.config.num_classes - 1}")
    rank, world = _dist_info()
    meta = build_run_meta(model, config, model_name=model_name, checkpoint=checkpoint,
                          run_name=run_name or out.resolve().name)

    with ExitStack() as held:
        error: Exception | None = None
        if rank == 0:                          # one tracing job per folder (its ranks share rank 0's lock)
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
            except OSError:
                pass                           # prepare_out_dir names the problem
            try:
                held.enter_context(output_lock(out))
            except OutputError as exc:
                error = exc
        return _trace_locked(model, out, config, meta, rank, world, error, resume=resume, overwrite=overwrite,
                             progress=progress, background=background)


def _trace_locked(model: torch.nn.Module, out: Path, config: TraceConfig, meta: dict, rank: int, world: int,
                  error: Exception | None, *, resume: bool, overwrite: bool, progress: bool, background: bool) -> Path:
    """:func:`trace_run` once rank 0 holds the folder's lock (``error``: why it could not)."""
    if rank == 0 and error is None:
        try:
            prepare_out_dir(out, meta, resume=resume, overwrite=overwrite)
        except (ValueError, OSError) as exc:
            error = exc
    if world > 1:
        box = [None if error is None else (type(error).__name__, str(error))]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and error is None:
            kind = {"FileExistsError": FileExistsError, "PermissionError": PermissionError,
                    "FileNotFoundError": FileNotFoundError}.get(box[0][0], ValueError)
            error = kind(f"(rank 0) {box[0][1]}")
    if error is not None:
        raise error
    meta = read_run_meta(out)
    done = set(complete_shards(out, meta))
    todo = [s for s in range(config.num_shards) if s % world == rank and s not in done]
    vt = {int(b): v for b, v in meta["vector_tokens"].items()}
    runtime = TracingRuntime(lags=config.lags, step_t=meta["step_t"], vector_tokens=vt)
    desc = "trace" if world == 1 else f"trace rank {rank}/{world}"
    bar = _Progress(len(todo) * len(meta["step_t"]), desc, progress)
    try:
        for shard in todo:
            trace_shard(model, runtime, out, config, shard, run_name=meta["run_name"], on_step=bar.update,
                        background=background)
    finally:
        bar.close()
        runtime.release()
    if world > 1:
        print(f"moeca trace rank {rank}/{world}: traced shards {todo} ({len(done)} were already complete)",
              file=sys.stderr)
        dist.barrier()
    return out

