"""Synthetic traces with the real schema and answers known by construction (tests, benchmark).

Construction (per sample ``n``, CFG branch, step ``s``, block ``b``, token ``t``):

- routing: slot 0 goes to expert ``e0 = (t + b + n) % E`` at every step (always persists); slot 1
  goes to ``e1 = (e0 + 1 + j) % E`` where ``j = s % 2`` (``routing="alternate"``: the pair persists
  at even lags only) or ``j`` is pseudo-random per (n, s, b, t) (``routing="random"``);
  gate weights: slot 0 ``0.5``, slot 1 ``0.25``; ``out_norm = 2``.
- expert drift: experts in ``const_experts`` have ``rel_l2_lagL = 0`` and ``cos = 1``; the others
  ``rel_l2_lagL = 0.125 * L`` and ``cos = 0.875``; null where the pair was not routed at ``s - L``
  (and for ``s < L``).
- token units at lag L: attention ``0.0625 L`` (cos 0.9375), MoE ``0.125 L`` (cos 0.875), shared
  ``0`` (cos 1), update ``0.03125 L`` (cos 0.96875); every norm is 1.
- ``noise > 0`` multiplies each non-zero rel value by a log-normal factor (``sigma = noise``), sets
  ``cos = 1 - rel^2 / 2``, and draws norms and gate weights at random (tests against a naive
  reference, benchmark realism; the closed-form answers then no longer hold).
- ``nan_rows``: that many branch rows (lag 1, first shard) get a NaN rel_l2 (error-path tests).

All values above are exact in float16, so the analysis must reproduce them exactly.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from moeca.models.config import DiTMoEConfig
from moeca.tracer.schema import SCHEMA_VERSION, TOKEN_UNITS, branch_schema, token_schema

TOKEN_DRIFT = {"attn": (0.0625, 0.9375), "moe": (0.125, 0.875), "shared": (0.0, 1.0), "update": (0.03125, 0.96875)}
EXPERT_DRIFT = (0.125, 0.875)
GATES = (0.5, 0.25)
OUT_NORM = 2.0


def synthetic_config(depth: int = 2, num_experts: int = 4, top_k: int = 2, side: int = 4, hidden: int = 32,
                     shared_ratio: float = 2.0) -> dict:
    return DiTMoEConfig(name="synthetic", input_size=side, patch_size=1, in_channels=1, hidden_size=hidden,
                        depth=depth, num_heads=2, num_experts=num_experts, top_k=top_k,
                        shared_expert_ratio=shared_ratio, num_classes=3, learn_sigma=False,
                        objective="rectified_flow").to_dict()


def routing_table(samples: np.ndarray, steps: int, depth: int, tokens: int, num_experts: int,
                  routing: str, seed: int = 0) -> np.ndarray:
    """Experts ``[n, S, B, T, 2]`` (slot 0, slot 1) for the given sample ids."""
    n = len(samples)
    sm = samples[:, None, None, None]
    st = np.arange(steps)[None, :, None, None]
    bl = np.arange(depth)[None, None, :, None]
    tk = np.arange(tokens)[None, None, None, :]
    e0 = np.broadcast_to((tk + bl + sm) % num_experts, (n, steps, depth, tokens))
    if routing == "alternate":
        j = np.broadcast_to(st % 2, e0.shape)
    elif routing == "random":
        h = (sm * 73856093 + st * 19349663 + bl * 83492791 + tk * 2654435761 + seed * 97) % 1000003
        j = np.broadcast_to(h % max(num_experts - 1, 1), e0.shape)
    else:
        raise ValueError(f"routing must be 'alternate' or 'random', not {routing!r}")
    e1 = (e0 + 1 + j) % num_experts
    return np.stack([e0, e1], axis=-1).astype(np.int16)


def _run_col(n: int) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int8)), pa.array(["run0"]))


def write_synthetic_trace(out: str | Path, *, depth: int = 2, num_steps: int = 6, num_experts: int = 4,
                          side: int = 4, samples: int = 2, samples_per_shard: int = 1, lags: int = 4,
                          cfg: bool = True, routing: str = "alternate", const_experts: tuple[int, ...] = (0, 2),
                          noise: float = 0.0, nan_rows: int = 0, seed: int = 0, row_group_rows: int = 1 << 20,
                          shared_ratio: float = 2.0, hidden: int = 32, progress: bool = False) -> Path:
    """Write a synthetic trace directory (see module docstring); returns its path. top_k is 2."""
    out = Path(out)
    if out.exists():
        _check_synthetic(out)   # only ever replace an earlier synthetic trace, never a real one or user files
        shutil.rmtree(out)
    (out / "branches").mkdir(parents=True)
    (out / "tokens").mkdir()
    top_k, T, S, B, E = 2, side * side, num_steps, depth, num_experts
    C = 2 if cfg else 1
    config = synthetic_config(depth, E, top_k, side, hidden, shared_ratio)
    meta = {"schema_version": SCHEMA_VERSION,
            "model": {"config": config, "fingerprint": DiTMoEConfig.from_dict(config).fingerprint(),
                      "weights_hash": "synthetic", "name": "synthetic"},
            "sampler": {"kind": "rectified_flow", "num_steps": S, "cfg_scale": 1.5 if cfg else 1.0,
                        "cfg_mode": "batched"},
            "seed": seed, "labels": [i % 3 for i in range(samples)], "lags": lags, "dump_vectors": 0,
            "versions": {"moeca": "synthetic"}, "synthetic": {"routing": routing, "const_experts": list(const_experts),
                                                             "noise": noise}}
    const = np.zeros(E, bool)
    const[list(const_experts)] = True
    rng = np.random.default_rng(seed)
    bschema, tschema = branch_schema(lags), token_schema(lags)
    shard_starts = list(range(0, samples, samples_per_shard))
    it = shard_starts
    if progress:
        it = tqdm(shard_starts, desc="synthetic trace", unit="shard")
    t_step = np.linspace(1.0, 0.0, S, endpoint=False).astype(np.float32)
    for si, start in enumerate(it):
        sids = np.arange(start, min(start + samples_per_shard, samples))
        n = len(sids)
        route = routing_table(sids, S, B, T, E, routing, seed)          # [n, S, B, T, 2]
        # rows in order (sample, cfg, step, block, token[, slot])
        shape_t = (n, C, S, B, T)
        smp = np.broadcast_to(sids[:, None, None, None, None], shape_t)
        cfgv = np.broadcast_to(np.arange(C)[None, :, None, None, None], shape_t)
        stp = np.broadcast_to(np.arange(S)[None, None, :, None, None], shape_t)
        blk = np.broadcast_to(np.arange(B)[None, None, None, :, None], shape_t)
        tok = np.broadcast_to(np.arange(T)[None, None, None, None, :], shape_t)
        nt = int(np.prod(shape_t))
        tcols = {"run": _run_col(nt), "sample": smp.ravel().astype(np.int32), "cfg_branch": cfgv.ravel().astype(np.int8),
                 "step": stp.ravel().astype(np.int16), "t": t_step[stp.ravel()], "block": blk.ravel().astype(np.int16),
                 "token": tok.ravel().astype(np.int16),
                 "attn_in_rel_l2_prev": np.full(nt, 0.01, np.float16),
                 "moe_in_rel_l2_prev": np.full(nt, 0.01, np.float16)}
        steps_flat = stp.ravel()
        for unit in TOKEN_UNITS:
            norm = np.ones(nt, np.float32) if noise == 0 else rng.lognormal(0.0, 0.3, nt).astype(np.float32)
            tcols[f"{unit}_norm"] = norm.astype(np.float16)
            base, cosv = TOKEN_DRIFT[unit]
            if noise > 0 and base == 0:
                base = 0.05          # noisy traces: every unit drifts
            for lag in range(1, lags + 1):
                rel = np.full(nt, base * lag, np.float32)
                if noise > 0 and base > 0:
                    rel *= rng.lognormal(0.0, noise, nt).astype(np.float32)
                cos = np.full(nt, cosv, np.float32) if noise == 0 else 1 - rel * rel / 2
                mask = steps_flat < lag
                tcols[f"{unit}_rel_l2_lag{lag}"] = pa.array(rel.astype(np.float16), mask=mask)
                tcols[f"{unit}_cos_lag{lag}"] = pa.array(cos.astype(np.float16), mask=mask)
        _write(out / "tokens" / f"shard-{si:05d}.parquet", tcols, tschema, row_group_rows)
        del tcols
        # branches: [n, C, S, B, T, 2]
        shape_b = shape_t + (2,)
        ex = np.broadcast_to(route[:, None], shape_b)
        nb = int(np.prod(shape_b))
        bcols = {"run": _run_col(nb),
                 "sample": np.broadcast_to(smp[..., None], shape_b).ravel().astype(np.int32),
                 "cfg_branch": np.broadcast_to(cfgv[..., None], shape_b).ravel().astype(np.int8),
                 "step": np.broadcast_to(stp[..., None], shape_b).ravel().astype(np.int16),
                 "t": t_step[np.broadcast_to(stp[..., None], shape_b).ravel()],
                 "block": np.broadcast_to(blk[..., None], shape_b).ravel().astype(np.int16),
                 "token": np.broadcast_to(tok[..., None], shape_b).ravel().astype(np.int16),
                 "slot": np.broadcast_to(np.arange(2, dtype=np.int8), shape_b).ravel(),
                 "expert": ex.ravel().astype(np.int16),
                 "gate_weight": np.broadcast_to(np.array(GATES, np.float32), shape_b).ravel(),
                 "out_norm": np.full(nb, OUT_NORM, np.float16)}
        if noise > 0:
            g0 = rng.uniform(0.3, 0.7, nb // 2).astype(np.float32)
            bcols["gate_weight"] = np.stack([g0, g0 * rng.uniform(0.2, 1.0, nb // 2).astype(np.float32)], -1).ravel()
            bcols["out_norm"] = (OUT_NORM * rng.lognormal(0.0, 0.3, nb)).astype(np.float16)
        exf = bcols["expert"]
        is_const = const[exf]
        stepb = bcols["step"]
        for lag in range(1, lags + 1):
            prev = np.zeros(route.shape, bool)                       # [n, S, B, T, 2] routed at s - lag
            prev[:, lag:] = (route[:, lag:, ..., :, None] == route[:, :-lag, ..., None, :]).any(-1)
            routed_prev = np.broadcast_to(prev[:, None], shape_b).ravel()
            if lag == 1:
                bcols["routed_prev"] = routed_prev.copy()
                bcols["in_rel_l2_prev"] = pa.array(np.full(nb, 0.01, np.float16), mask=stepb < 1)
            rel = np.where(is_const, 0.0, EXPERT_DRIFT[0] * lag).astype(np.float32)
            if noise > 0:
                rel *= rng.lognormal(0.0, noise, nb).astype(np.float32)
            cos = np.where(is_const, 1.0, EXPERT_DRIFT[1]).astype(np.float32) if noise == 0 else 1 - rel * rel / 2
            if lag == 1 and nan_rows and si == 0:
                idx = np.flatnonzero(routed_prev)[:nan_rows]
                rel[idx] = np.nan
            bcols[f"rel_l2_lag{lag}"] = pa.array(rel.astype(np.float16), mask=~routed_prev)
            bcols[f"cos_lag{lag}"] = pa.array(cos.astype(np.float16), mask=~routed_prev)
        _write(out / "branches" / f"shard-{si:05d}.parquet", bcols, bschema, row_group_rows)
        del bcols
    tmp = out / "run.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / "run.json")
    return out


def _check_synthetic(out: Path) -> None:
    """Refuse to replace ``out`` unless it is a synthetic trace this module wrote (run.json ``synthetic``)."""
    try:
        synthetic = out.is_dir() and "synthetic" in json.loads((out / "run.json").read_text())
    except (OSError, ValueError, TypeError):
        synthetic = False
    if not synthetic:
        raise FileExistsError(f"{out} exists and is not a synthetic trace written by moeca.testing.synthetic_traces; "
                              "refusing to replace it. Choose another folder (e.g. another --work-dir)")
    ours = re.compile(r"run\.json(\.tmp)?|(branches|tokens)(/\.?shard-\d{5}\.parquet(\.tmp)?)?")
    foreign = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                     if p.is_symlink() or not ours.fullmatch(p.relative_to(out).as_posix()))
    if foreign:                 # the folder is replaced whole: nothing the writer did not make may be in it
        raise FileExistsError(f"{out} is a synthetic trace but also holds {', '.join(foreign[:5])}, which "
                              "moeca did not write; move them out or choose another folder (e.g. another --work-dir)")


def _write(path: Path, cols: dict, schema: pa.Schema, row_group_rows: int) -> None:
    arrays = [cols[f.name] if isinstance(cols[f.name], pa.Array) else pa.array(cols[f.name], type=f.type)
              for f in schema]
    arrays = [a if a.type == f.type else a.cast(f.type) for a, f in zip(arrays, schema)]
    table = pa.Table.from_arrays(arrays, schema=schema)
    tmp = path.with_name("." + path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_rows, use_dictionary=["run"])
    os.replace(tmp, path)
