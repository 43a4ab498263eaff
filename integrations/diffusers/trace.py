"""Tracing a HiDream transformer into moeca's trace format (``moeca trace --diffusers``).

The tracer's own recorder (:class:`~moeca.tracer.recorder.TracingRuntime`) computes the change metrics;
:class:`TraceEngine` feeds it from diffusers hooks (:mod:`.hooks`): per MoE block the attention input
and (image-stream) output, the MoE input, routed sum, shared expert, router choices and unweighted
expert outputs, and the block's update. The Parquet tables are the tracer's (``branches``, ``tokens``);
HiDream's top-k is unsorted, so ``slot`` is the router's slot and branches are matched by ``expert``.
What moeca's native tables cannot say sits next to them in ``layout.parquet`` (one row per (block,
token): ``block_kind`` double/single, ``token_kind`` image/text), to join on ``(block, token)``; and
``run.json``'s ``model`` carries ``family``, the diffusers class, config and version.

Token order of a single-stream block (the model's own): image tokens, then T5, then the two Llama
layers; a double-stream block's MoE sees the image tokens only.
"""
from __future__ import annotations

import hashlib
import os
import platform
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from moeca.diffusion.samplers import SamplerConfig
from moeca.models.runtime import ForwardContext
from moeca.tracer.recorder import TracingRuntime
from moeca.tracer.run import prepare_out_dir
from moeca.tracer.store import read_run_meta
from moeca.tracer.schema import DEFAULT_LAGS, SCHEMA_VERSION, tables_for
from moeca.tracer.writer import ShardWriter

from .compat import require_diffusers
from .hidream import (HiDreamBlock, architecture, config_hash, identity_name, moe_blocks, moe_full, view_config,
                      weights_hash)
from .hooks import attach, detach
from .sampling import FlowSampler, TextConditioning, initial_noise, sample

HOOK_NAME = "moeca_trace"
LAYOUT_FILE = "layout.parquet"


class TraceEngine:
    """The hooks' engine while tracing: computes every unit (the stock arithmetic, moeca's dispatch for
    the routed experts) and hands each block's tensors to the recorder. ``step`` is set by the sampler
    before each forward."""

    def __init__(self, recorder: TracingRuntime, num_steps: int, guided: bool, dispatch: str = "auto"):
        self.recorder, self.num_steps, self.guided, self.dispatch = recorder, num_steps, guided, dispatch
        self.step = 0
        self._ctx: ForwardContext | None = None
        self._scratch: dict = {}

    def begin(self, cs, step, num_steps, batch: int, timestep) -> None:
        self._ctx = ForwardContext(self.step, self.num_steps, "batched" if self.guided else "none")
        self.recorder.begin_forward(None, self._ctx, torch.empty(batch, 0))

    def end(self) -> None:
        self.recorder.end_forward(None, self._ctx)
        self._ctx = None

    def forward(self, module, call: dict, compute):
        return compute()

    def stack_input(self, x: torch.Tensor) -> None:
        pass

    def stack_output(self, x: torch.Tensor) -> None:
        pass

    def block(self, block: HiDreamBlock, x_in: torch.Tensor, compute):
        self._scratch = {}
        out = compute()
        x_out = out[0] if isinstance(out, tuple) else out
        s = self._scratch
        self.recorder.record_block(block, x_out - x_in, attn_in=s["attn_in"], attn=s["attn"], moe_in=s["moe_in"],
                                   moe=s["moe"], shared=s["shared"], ids=s["ids"], weights=s["weights"],
                                   slot_out=s["slot_out"])
        return out

    def attention(self, block: HiDreamBlock, inputs, compute):
        out = compute()
        self._scratch.update(attn_in=inputs[0], attn=out[0] if isinstance(out, tuple) else out)
        return out

    def dense(self, block: HiDreamBlock, x: torch.Tensor, compute) -> torch.Tensor:
        return compute()

    def moe(self, block: HiDreamBlock, x: torch.Tensor) -> torch.Tensor:
        res = moe_full(block, x, self.dispatch)
        self._scratch.update(moe_in=x, moe=res.routed.view(x.shape), shared=res.shared, ids=res.ids,
                             weights=res.weights, slot_out=res.slot_out)
        return res.out


@dataclass(frozen=True)
class DiffusersTraceConfig:
    """What to trace: ``sampler``; ``prompts`` (prompt index of each sample, into the conditioning);
    ``latent_size`` (H, W of the latents); ``seed`` (sample ``i``'s noise seed is ``seed + i``);
    ``batch_size`` samples per shard; ``lags``."""

    sampler: FlowSampler
    prompts: tuple[int, ...]
    latent_size: tuple[int, int]
    seed: int = 0
    batch_size: int = 2
    lags: int = DEFAULT_LAGS

    def __post_init__(self) -> None:
        if not self.prompts or self.batch_size < 1 or self.lags < 1:
            raise ValueError("a diffusers trace needs at least one sample, --batch-size >= 1 and --lags >= 1")

    @property
    def num_shards(self) -> int:
        return -(-len(self.prompts) // self.batch_size)


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "pyarrow": pa.__version__,
           "numpy": np.__version__}
    for pkg in ("moeca", "diffusers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def run_meta(transformer, config: DiffusersTraceConfig, text: TextConditioning, *, source: str,
             run_name: str, model_seed: int = 0) -> dict:
    """run.json: the tracer's fields, with the model as moeca's analysis sees it (``config``: the
    :func:`~.hidream.view_config`) plus ``family``, ``model_seed`` (of a ``config:NAME`` source's random
    weights), ``diffusers`` {class, config, config_hash, version} and ``layout`` {block_kinds, image_tokens,
    text_tokens, latent_size, text_lengths (T5, Llama)}."""
    blocks = moe_blocks(transformer)
    arch = architecture(transformer, blocks)
    p = transformer.config.patch_size
    image_tokens = (config.latent_size[0] // p) * (config.latent_size[1] // p)
    view = view_config(transformer, image_tokens + text.tokens, arch)
    param = next(transformer.parameters())
    s = config.sampler
    sampler = SamplerConfig(kind="rectified_flow", num_steps=s.num_steps, cfg_scale=s.cfg_scale, cfg_mode="batched")
    versions = _versions()
    return {
        "schema_version": SCHEMA_VERSION, "run_name": run_name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"name": identity_name(transformer), "checkpoint": source, "config": view.to_dict(),
                  "fingerprint": view.fingerprint(), "weights_hash": weights_hash(transformer),
                  "dtype": str(param.dtype).replace("torch.", ""), "device": param.device.type,
                  "family": "diffusers", "model_seed": model_seed,
                  "diffusers": {"class": type(transformer).__name__, "config_hash": config_hash(transformer),
                                "config": {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")},
                                "version": versions["diffusers"]},
                  "layout": {"block_kinds": [b.kind for b in blocks], "image_tokens": image_tokens,
                             "text_tokens": text.tokens, "latent_size": list(config.latent_size),
                             "text_lengths": [int(text.t5.shape[1]), int(text.llama.shape[2])]}},
        "sampler": sampler.to_dict(),
        "flow_shift": s.shift,
        "steps": s.num_steps, "cfg_scale": s.cfg_scale, "seed": config.seed, "batch_size": config.batch_size,
        "num_samples": len(config.prompts), "num_shards": config.num_shards, "labels": list(config.prompts),
        "sample_seeds": [config.seed + i for i in range(len(config.prompts))], "lags": config.lags,
        "dump_vectors": 0, "vector_tokens": {}, "step_t": s.timesteps(), "tables": list(tables_for(0)),
        "versions": versions,
    }


RESUME_FIELDS = (("model", "name"), ("model", "layout"), ("model", "model_seed"), ("flow_shift",), ("text_hash",))
"""Fields of a diffusers trace's run.json that must also agree on ``--resume`` (beyond the tracer's own)."""


def text_hash(cond: TextConditioning, uncond: TextConditioning) -> str:
    """16 hex digits of SHA-256 over the text conditioning's tensors (float32 bytes)."""
    h = hashlib.sha256()
    for t in (cond.t5, cond.llama, cond.pooled, uncond.t5, uncond.llama, uncond.pooled):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _check_resume(out: Path, meta: dict) -> None:
    """Refuse to resume a trace made with another transformer config, layout, sampler shift or text."""
    old, diffs = read_run_meta(out), []
    for path in RESUME_FIELDS:
        a, b = old, meta
        for key in path:
            a = a.get(key) if isinstance(a, dict) else None
            b = b.get(key) if isinstance(b, dict) else None
        if a != b:
            diffs.append(f"{'.'.join(path)} (trace has {a!r}, this run asks for {b!r})")
    if diffs:
        raise ValueError(f"cannot resume {out}: it was traced with different settings: " + "; ".join(diffs)
                         + ". Use --overwrite to start over, or a new --out")


def write_layout(out_dir: Path, block_kinds: list[str], image_tokens: int, text_tokens: int) -> Path:
    """``layout.parquet``: (block, block_kind, token, token_kind) for every token each block's MoE sees."""
    rows = {"block": [], "block_kind": [], "token": [], "token_kind": []}
    for b, kind in enumerate(block_kinds):
        n = image_tokens if kind == "double" else image_tokens + text_tokens
        rows["block"] += [b] * n
        rows["block_kind"] += [kind] * n
        rows["token"] += list(range(n))
        rows["token_kind"] += ["image" if t < image_tokens else "text" for t in range(n)]
    table = pa.table({"block": pa.array(rows["block"], pa.int16()),
                      "block_kind": pa.array(rows["block_kind"]).dictionary_encode(),
                      "token": pa.array(rows["token"], pa.int16()),
                      "token_kind": pa.array(rows["token_kind"]).dictionary_encode()})
    path = out_dir / LAYOUT_FILE
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def trace_diffusers(transformer, out_dir: "str | os.PathLike", config: DiffusersTraceConfig, cond: TextConditioning,
                    uncond: TextConditioning, *, source: str, run_name: str = "trace", overwrite: bool = False,
                    resume: bool = False, on_step=None, model_seed: int = 0) -> Path:
    """Sample every shard with the hooks attached, write run.json, the shards and ``layout.parquet``.
    The samples are the stock transformer's (the hooks compute the same numbers); returns ``out_dir``.
    ``resume``: finish an interrupted trace in ``out_dir`` (the native tracer's rule: run.json must agree,
    the diffusers fields and the text conditioning included; finished shards are validated and kept, the
    others redone; a sample's noise and text do not depend on its shard, so the result is the same)."""
    require_diffusers()
    meta = run_meta(transformer, config, cond, source=source, run_name=run_name, model_seed=model_seed)
    meta["text_hash"] = text_hash(cond, uncond)
    out = Path(out_dir)
    if resume and (out / "run.json").is_file():
        _check_resume(out, meta)
    done = set(prepare_out_dir(out, meta, resume=resume, overwrite=overwrite))
    lay = meta["model"]["layout"]
    blocks = moe_blocks(transformer)
    recorder = TracingRuntime(lags=config.lags, step_t=config.sampler.timesteps())
    engine = TraceEngine(recorder, config.sampler.num_steps, config.sampler.guided)
    attach(transformer, blocks, engine, HOOK_NAME, attention=True, block_level=True)
    try:
        C = transformer.config.in_channels
        for shard in range(config.num_shards):
            if shard in done:
                continue
            ids = list(range(shard * config.batch_size, min(len(config.prompts), (shard + 1) * config.batch_size)))
            prompts = [config.prompts[i] for i in ids]
            noise = initial_noise((C, *config.latent_size), [config.seed + i for i in ids])
            writer = ShardWriter(out, shard, tables=tables_for(0), lags=config.lags, run_name=run_name)
            recorder.start_shard(ids, writer.write)
            try:
                sample(transformer, config.sampler, noise, cond.select(prompts), uncond.select(prompts),
                       before_forward=lambda i: setattr(engine, "step", i), on_step=on_step)
                writer.commit()
            except BaseException:
                writer.abort()
                raise
            finally:
                recorder.stop_shard()
    finally:
        detach(transformer, HOOK_NAME)
    write_layout(out, lay["block_kinds"], lay["image_tokens"], lay["text_tokens"])
    return out
