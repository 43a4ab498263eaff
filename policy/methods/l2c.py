"""L2C (Learning-to-Cache): learned per-step, per-layer reuse, exported as a static schedule.

Published method (Ma et al., "Learning-to-Cache: Accelerating Diffusion Transformer via Layer Caching",
NeurIPS 2024; public code learning-to-cache, DiT): every (step, layer) gets a router weight
``beta = sigmoid(theta) in [0, 1]``; during training a layer's output is ``beta * fresh + (1 - beta) *
cached``, the cache holding that layer's output at the *immediately preceding* step, which is computed in
full: the routers exist for alternating steps only (every other step is a candidate, the step before it a
full step). The routers are trained on calibration samples (the model frozen) against full compute with a
sparsity penalty ``lambda * sum(beta)``; at inference a candidate step's layer is reused where ``beta <
threshold`` (the authors' DiT-256 DDIM setting: ``thres 0.1``). Layers are attention and MLP sub-layers
separately (here: attention and the whole MoE update of each block).

This unit holds the export knobs (:class:`Config`), the router file (:class:`L2CRouter`) and the export
rule; training runs the model and lives with the engine (:func:`moeca.replay.fit.l2c.train_router`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeca.policy.schedule import ALWAYS, REUSE, Schedule, StepRule

from .common import Context, assemble, block_rule

SUMMARY = "L2C: learned per-layer reuse on alternating steps, from the full step before (threshold on the router)"

UNITS = ("attn", "moe")
"""The two cacheable sub-layers of a block, in router order (last axis of the router tensors)."""


@dataclass(frozen=True)
class Config:
    """Export knobs of L2C.

    router: path of a router file written by ``moeca.replay.fit.l2c.train_router`` (``L2CRouter.save``);
        required.
    threshold: reuse a candidate step's (block, unit) where its learned ``beta`` falls below this value, in
        [0, 1] (authors' DiT setting 0.1; 0 reuses nothing).
    alternating: reuse only on alternating steps (odd steps, each from the full step right before it), as
        published; False lets every step after the first be a candidate (reuse chains L2C never trained for).
    """

    router: str = ""
    threshold: float = 0.1
    alternating: bool = True

    def __post_init__(self) -> None:
        if not math.isfinite(self.threshold) or not 0 <= self.threshold <= 1:
            raise ValueError(f"l2c threshold must be in [0, 1], got {self.threshold}")


def candidate_steps(num_steps: int, alternating: bool = True) -> list[int]:
    """Steps where L2C may reuse: the odd steps (alternating; the step before each is full), or every
    step after the first."""
    return list(range(1, num_steps, 2 if alternating else 1))


ROUTER_FORMAT_VERSION = 2
"""Version of the router file: 2 added the per-step loss curves."""


@dataclass(frozen=True)
class L2CRouter:
    """Trained router values ``beta [num_steps, depth, 2]`` (units attn, moe) in [0, 1], float64.

    Step 0 is always 1 (computed). ``losses [S]``: the final relative output error per step.
    ``curves[s]``: the training loss (error + sparsity term) of step ``s`` at every iteration run (empty
    for step 0); its length is the number of iterations the step needed to converge. ``meta`` records
    the training knobs, model fingerprint and weights hash, sampler and convergence summary.
    """

    beta: np.ndarray
    losses: np.ndarray
    meta: dict
    curves: tuple[tuple[float, ...], ...] = ()

    def reuse_mask(self, config: "Config") -> np.ndarray:
        """Boolean ``[S, depth, 2]``: True where the (step, block, unit) is reused: ``beta < threshold`` on
        a candidate step (:func:`candidate_steps`). Step 0 never is."""
        mask = self.beta < config.threshold
        keep = np.zeros(mask.shape[0], dtype=bool)
        keep[candidate_steps(mask.shape[0], config.alternating)] = True
        mask[~keep] = False
        return mask

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON (atomically: temporary sibling, then rename)."""
        path = Path(path)
        payload = {"format": "moeca-l2c-router", "version": ROUTER_FORMAT_VERSION, "beta": self.beta.tolist(),
                   "losses": self.losses.tolist(), "curves": [list(c) for c in self.curves], "meta": self.meta}
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "L2CRouter":
        data = json.loads(Path(path).read_text())
        if data.get("format") != "moeca-l2c-router":
            raise ValueError(f"{path} is not an L2C router file (format {data.get('format')!r})")
        if data.get("version") != ROUTER_FORMAT_VERSION:
            raise ValueError(f"{path}: L2C router file version {data.get('version')!r}, this moeca reads version "
                             f"{ROUTER_FORMAT_VERSION}; retrain the router")
        beta = np.asarray(data["beta"], dtype=np.float64)
        if beta.ndim != 3 or beta.shape[2] != len(UNITS):
            raise ValueError(f"{path}: beta must have shape [steps, depth, {len(UNITS)}], got {beta.shape}")
        return cls(beta, np.asarray(data["losses"], dtype=np.float64), data.get("meta", {}),
                   tuple(tuple(float(v) for v in c) for c in data["curves"]))


def build(config: Config, context: Context) -> Schedule:
    """A reused (step, block, unit) is ``never`` (attention output or whole MoE output of the step before,
    a full step), the rest ``always``; steps without reuse are sync steps. Needs ``config.router``."""
    if not config.router:
        raise ValueError("l2c needs a router file: train one with moeca.replay.fit.l2c.train_router (the Pareto "
                         "benchmark does) and pass --set router=PATH")
    router = L2CRouter.load(config.router)
    mc, sampler = context.model_config, context.sampler_cfg
    S, depth, E = sampler.num_steps, mc.depth, mc.num_experts
    if router.beta.shape != (S, depth, len(UNITS)):
        raise ValueError(f"l2c router has shape {router.beta.shape} but the model/sampler need "
                         f"({S}, {depth}, {len(UNITS)}); retrain it for this model and step count")
    mask = router.reuse_mask(config)
    steps = [StepRule("compute", tuple(block_rule(E, attn=REUSE if mask[s, b, 0] else ALWAYS,
                                                  moe=REUSE if mask[s, b, 1] else ALWAYS) for b in range(depth)))
             for s in range(S)]
    sync = [s for s in range(S) if not mask[s].any()]
    return assemble("l2c", mc, sampler, steps, sync=sync, weights_hash=context.weights_hash,
                    provenance={"method": "l2c", "config": {"router": Path(config.router).name,
                                                            "threshold": config.threshold,
                                                            "alternating": config.alternating},
                                "router": router.meta, "reused_decisions": int(mask.sum())})
