"""Synthetic traces with the real schema (``moeca.tracer.schema``), for the app's tests and benchmark.

The numbers are not from a model: drift is a smooth function of step, block and expert (experts with a
higher index drift faster, drift falls towards the end of sampling) with multiplicative noise, and
routing persists with a probability that grows with the step. That is enough structure for every page
to have something to show, and the sizes are exact: a trace with ``S`` samples has
``S * C * steps * blocks * tokens * top_k`` branch rows (``C`` = 2 with CFG, else 1).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from moeca.analysis.api import drift_summary
from moeca.analysis.report import analyze
from moeca.analysis.summary import load_summary
from moeca.diffusion.samplers import SamplerConfig
from moeca.models.config import DiTMoEConfig, get_preset
from moeca.models.dit_moe import DiTMoE
from moeca.models.registry import randomize_zero_init
from moeca.policy.derive import DeriveConfig, derive_schedule
from moeca.policy.schedule import Schedule
from moeca.replay.driver import replay_compare, write_replay_outputs
from moeca.tracer import schema


@dataclass(frozen=True)
class SyntheticTraceConfig:
    """Shape of a synthetic trace.

    samples: number of samples; samples_per_shard: samples per Parquet file; steps, blocks, tokens,
    experts, top_k: model/sampler shape; cfg: two CFG branches (cond, uncond) when True; lags: lag
    metrics per unit; num_classes: labels cycle over 0..num_classes-1; seed: RNG seed.
    """

    samples: int = 4
    samples_per_shard: int = 2
    steps: int = 10
    blocks: int = 3
    tokens: int = 16
    experts: int = 4
    top_k: int = 2
    cfg: bool = True
    lags: int = schema.DEFAULT_LAGS
    num_classes: int = 10
    seed: int = 0
    run_name: str = "synthetic"
    preset: str | None = None

    @classmethod
    def for_preset(cls, preset: str, **overrides) -> "SyntheticTraceConfig":
        """The shape of a named model preset (``moeca.models.config.PRESETS``, e.g. "demo")."""
        mc = get_preset(preset)
        shape = dict(blocks=mc.depth, tokens=mc.num_tokens, experts=mc.num_experts, top_k=mc.top_k,
                     num_classes=mc.num_classes, preset=preset)
        return cls(**{**shape, **overrides})

    @property
    def cfg_branches(self) -> int:
        return 2 if self.cfg else 1

    @property
    def branch_rows(self) -> int:
        return self.samples * self.cfg_branches * self.steps * self.blocks * self.tokens * self.top_k


def samples_for_rows(rows: int, cfg: SyntheticTraceConfig) -> int:
    """Smallest sample count whose trace has at least ``rows`` branch rows with ``cfg``'s shape."""
    per_sample = cfg.cfg_branches * cfg.steps * cfg.blocks * cfg.tokens * cfg.top_k
    return -(-rows // per_sample)


def _labels(cfg: SyntheticTraceConfig) -> list[int]:
    return [i % cfg.num_classes for i in range(cfg.samples)]


def model_config(cfg: SyntheticTraceConfig):
    """A :class:`~moeca.models.config.DiTMoEConfig` with the synthetic trace's shape (square token grid)."""
    if cfg.preset is not None:
        mc = get_preset(cfg.preset)
        if (mc.depth, mc.num_tokens, mc.num_experts, mc.top_k) != (cfg.blocks, cfg.tokens, cfg.experts, cfg.top_k):
            raise ValueError(f"shape does not match preset {cfg.preset!r}; use SyntheticTraceConfig.for_preset")
        return mc
    side = int(round(cfg.tokens ** 0.5))
    if side * side != cfg.tokens:
        raise ValueError(f"tokens={cfg.tokens} must be a square number (a side x side patch grid)")
    return DiTMoEConfig(name="synthetic", input_size=side, patch_size=1, in_channels=1, hidden_size=32,
                        depth=cfg.blocks, num_heads=2, num_experts=cfg.experts, top_k=cfg.top_k,
                        num_classes=cfg.num_classes, learn_sigma=False, objective="rectified_flow")


def run_meta(cfg: SyntheticTraceConfig) -> dict:
    """A ``run.json`` payload with the fields the tracer writes (``tracer.run.build_run_meta``)."""
    mc = model_config(cfg)
    sampler = {"kind": "rectified_flow", "num_steps": cfg.steps, "cfg_scale": 1.5 if cfg.cfg else 1.0,
               "cfg_mode": "batched", "cfg_channels": None, "train_timesteps": 1000, "eta": 0.0}
    shards = -(-cfg.samples // cfg.samples_per_shard)
    return {"schema_version": schema.SCHEMA_VERSION, "run_name": cfg.run_name, "created": "synthetic",
            "model": {"name": mc.name, "checkpoint": None, "config": mc.to_dict(),
                      "fingerprint": mc.fingerprint(), "weights_hash": None, "dtype": "float32",
                      "device": "cpu"},
            "sampler": sampler, "steps": cfg.steps, "cfg_scale": sampler["cfg_scale"], "seed": cfg.seed,
            "batch_size": cfg.samples_per_shard, "num_samples": cfg.samples, "num_shards": shards,
            "labels": _labels(cfg), "sample_seeds": list(range(cfg.samples)), "lags": cfg.lags,
            "dump_vectors": 0, "vector_tokens": {}, "step_t": [float(v) for v in _step_times(cfg.steps)],
            "tables": ["branches", "tokens"], "versions": {"synthetic": "moeca.testing.explorer_root"},
            "synthetic": True}


def _step_times(steps: int) -> np.ndarray:
    return np.linspace(1.0, 1.0 / steps, steps, dtype=np.float32)


def _shard_tables(cfg: SyntheticTraceConfig, first: int, count: int, rng: np.random.Generator
                  ) -> tuple[pa.Table, pa.Table]:
    C, S, B, T, K, E = cfg.cfg_branches, cfg.steps, cfg.blocks, cfg.tokens, cfg.top_k, cfg.experts
    # token-level grid in the tracer's row order: [S, B, C, count, T]
    shape = (S, B, C, count, T)
    n_tok = int(np.prod(shape))
    idx = np.indices(shape).reshape(5, -1)
    step = idx[0].astype(np.int16)
    block = idx[1].astype(np.int16)
    cfg_b = idx[2].astype(np.int8)
    sample = (idx[3] + first).astype(np.int32)
    token = idx[4].astype(np.int16)
    t = _step_times(S)[step]
    phase = 1.0 - step / max(S - 1, 1)                      # 1 at the first step, 0 at the last
    base = 0.02 + 0.25 * phase ** 2 + 0.01 * block / max(B, 1)
    run_dict = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n_tok, np.int8)), pa.array([cfg.run_name]))

    def lagged(scale: np.ndarray, n: int, steps: np.ndarray, valid: np.ndarray | None = None) -> dict:
        cols = {}
        for lag in range(1, cfg.lags + 1):
            rel = scale * lag ** 0.8 * rng.lognormal(0.0, 0.35, n)
            cos = np.clip(1.0 - rel ** 2 / 2.0, -1.0, 1.0)
            mask = steps < lag
            if valid is not None and lag == 1:
                mask = mask | ~valid
            cols[f"rel_l2_lag{lag}"] = pa.array(rel.astype(np.float16), mask=mask)
            cols[f"cos_lag{lag}"] = pa.array(cos.astype(np.float16), mask=mask)
        return cols

    tok_cols: dict[str, pa.Array] = {"run": run_dict, "sample": pa.array(sample), "cfg_branch": pa.array(cfg_b),
                                     "step": pa.array(step), "t": pa.array(t), "block": pa.array(block),
                                     "token": pa.array(token)}
    tok_cols["attn_in_rel_l2_prev"] = pa.array((base * 0.8).astype(np.float16), mask=step < 1)
    tok_cols["moe_in_rel_l2_prev"] = pa.array((base * 0.9).astype(np.float16), mask=step < 1)
    for u, unit in enumerate(schema.TOKEN_UNITS):
        tok_cols[f"{unit}_norm"] = pa.array(rng.uniform(0.5, 2.0, n_tok).astype(np.float16))
        for name, arr in lagged(base * (0.8 + 0.3 * u), n_tok, step).items():
            tok_cols[f"{unit}_{name}"] = arr
    tokens = pa.Table.from_pydict(tok_cols).cast(schema.token_schema(cfg.lags))

    # branch level: repeat each token row K times (slots)
    n_br = n_tok * K
    rep = np.repeat(np.arange(n_tok), K)
    slot = np.tile(np.arange(K, dtype=np.int8), n_tok)
    # experts: token-dependent preference, occasionally re-routed as sampling goes on
    pref = (token[rep].astype(np.int64) * 7 + block[rep] * 3 + slot) % E
    reroute = rng.random(n_br) < 0.25 * phase[rep]
    expert = np.where(reroute, rng.integers(0, E, n_br), pref).astype(np.int16)
    if K > 1:  # keep the K experts of a token distinct
        ex = expert.reshape(n_tok, K)
        for k in range(1, K):
            clash = (ex[:, k:k + 1] == ex[:, :k]).any(axis=1)
            ex[clash, k] = (ex[clash, :k].max(axis=1) + 1) % E
            clash = (ex[:, k:k + 1] == ex[:, :k]).any(axis=1)
            while clash.any():
                ex[clash, k] = (ex[clash, k] + 1) % E
                clash = (ex[:, k:k + 1] == ex[:, :k]).any(axis=1)
        expert = ex.reshape(-1)
    gate = np.sort(rng.dirichlet(np.ones(E), n_tok)[:, :K], axis=1)[:, ::-1].reshape(-1).astype(np.float32)
    routed_prev = (step[rep] > 0) & ~reroute
    scale = base[rep] * (0.5 + expert / max(E - 1, 1))
    br_cols: dict[str, pa.Array] = {
        "run": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n_br, np.int8)), pa.array([cfg.run_name])),
        "sample": pa.array(sample[rep]), "cfg_branch": pa.array(cfg_b[rep]), "step": pa.array(step[rep]),
        "t": pa.array(t[rep]), "block": pa.array(block[rep]), "token": pa.array(token[rep]),
        "slot": pa.array(slot), "expert": pa.array(expert), "gate_weight": pa.array(gate),
        "out_norm": pa.array(rng.uniform(0.5, 3.0, n_br).astype(np.float16)),
        "routed_prev": pa.array(routed_prev),
        "in_rel_l2_prev": pa.array((base[rep] * 0.9).astype(np.float16), mask=step[rep] < 1),
    }
    br_cols.update(lagged(scale, n_br, step[rep], valid=routed_prev))
    branches = pa.Table.from_pydict(br_cols).cast(schema.branch_schema(cfg.lags))
    return branches, tokens


def _write_atomic(table: pa.Table, path: Path, row_group: int) -> None:
    """Write like the tracer does (zstd; dictionary keys; BYTE_STREAM_SPLIT floats but ``t``; key statistics)."""
    tmp = path.with_name(path.name + schema.TMP_SUFFIX)
    names = table.schema.names
    floats = [f.name for f in table.schema if pa.types.is_floating(f.type) and f.name != "t"]
    pq.write_table(table, tmp, compression="zstd", row_group_size=row_group,
                   use_dictionary=[c for c in names if c in schema.DICTIONARY_COLUMNS or c == "t"],
                   use_byte_stream_split=floats,
                   write_statistics=[c for c in names if c in schema.KEY_COLUMNS])
    os.replace(tmp, path)


def write_synthetic_trace(out_dir: str | os.PathLike, cfg: SyntheticTraceConfig = SyntheticTraceConfig(),
                          progress: bool = False) -> Path:
    """Write a trace directory (``run.json``, ``branches/``, ``tokens/``) and return its path.

    Files are written under temporary names and renamed. ``out_dir`` must not already hold a trace.
    """
    out = Path(out_dir)
    if (out / "run.json").exists():
        raise FileExistsError(f"{out} already holds a trace (run.json exists); pick an empty folder")
    for table in ("branches", "tokens"):
        (out / table).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    shards = range(0, cfg.samples, cfg.samples_per_shard)
    if progress:
        shards = tqdm(shards, desc="synthetic trace", unit="shard")
    for i, first in enumerate(shards):
        count = min(cfg.samples_per_shard, cfg.samples - first)
        branches, tokens = _shard_tables(cfg, first, count, rng)
        _write_atomic(branches, out / "branches" / schema.shard_file_name(i), 1 << 20)
        _write_atomic(tokens, out / "tokens" / schema.shard_file_name(i), 1 << 20)
    tmp = out / ("run.json" + schema.TMP_SUFFIX)
    tmp.write_text(json.dumps(run_meta(cfg), indent=1))
    os.replace(tmp, out / "run.json")
    return out


def write_example_root(root: str | os.PathLike, trace: SyntheticTraceConfig | None = None, *,
                       report: bool = True, schedule: bool = True, replay: bool = False) -> dict[str, Path]:
    """An explorer root (benchmark results: :func:`moeca.bench.pareto_synthetic.write_synthetic_pareto`): ``out/trace`` (synthetic), ``out/report`` (real ``moeca analyze`` of it),
    ``out/schedule.json`` (real ``moeca schedule derive`` from the report) and, with ``replay``, ``out/replay`` (a real ``moeca replay`` of the
    schedule on a *randomly initialised* model of the trace's shape). Returns the written paths by kind.
    """
    root = Path(root)
    cfg = trace or SyntheticTraceConfig(samples=4, samples_per_shard=2, steps=20, blocks=3, tokens=16, experts=4)
    paths = {"trace": write_synthetic_trace(root / "out" / "trace", cfg)}
    if report:
        analyze([paths["trace"]], root / "out" / "report", threads=1)
        paths["report"] = root / "out" / "report"
    if schedule:
        if report:
            summary = load_summary(paths["report"])
        else:
            summary = drift_summary([paths["trace"]], threads=1)
        meta = json.loads((paths["trace"] / "run.json").read_text())
        sched = derive_schedule(summary, meta, DeriveConfig(target_speedup=3.0))
        paths["schedule"] = sched.save(root / "out" / "schedule.json")
    if replay:
        if not schedule:
            raise ValueError("replay=True needs schedule=True (the replay runs the derived schedule)")
        paths["replay"] = _write_random_replay(cfg, paths["schedule"], root / "out" / "replay")
    return paths


def _write_random_replay(cfg: SyntheticTraceConfig, schedule_path: Path, out: Path) -> Path:
    sched = Schedule.load(schedule_path)
    torch.manual_seed(cfg.seed)
    model = DiTMoE(model_config(cfg))
    randomize_zero_init(model, cfg.seed)
    model.eval()
    s = sched.sampler
    sampler = SamplerConfig(kind=s.kind, num_steps=s.num_steps, cfg_scale=1.5 if s.guided else 1.0,
                            cfg_mode=s.cfg_mode)
    result = replay_compare(model, sched, sampler, labels=[0, 1], repeats=1, evaluate=False, progress=False,
                            model_name=f"{model.config.name} (random weights)")
    write_replay_outputs(result, out, schedule_path=str(schedule_path))
    return out
