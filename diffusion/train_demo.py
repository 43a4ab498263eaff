"""Train a shipped DiT-MoE on the scikit-learn digits (seeded, CPU-friendly): one loop, two objectives.

The objective is the model config's ``objective`` (:mod:`moeca.diffusion.losses`): rectified flow
for ``demo`` (the public XL/G recipe), epsilon prediction with learned-range variance and ``L_vb`` for
``demo-ddpm`` (the public S/B recipe). Labels are dropped with probability ``class_dropout_prob`` for
classifier-free guidance. A load-balancing loss (the reference ``alpha * E * sum_e f_e P_e``) keeps every
expert in use. EMA weights are what ships; every ``checkpoint_every`` steps the EMA weights and the log
so far are written, so an interrupted run leaves a usable (partial) model.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from moeca.common.outputs import atomic_write_text
from moeca.data.digits import load_digits_split
from moeca.diffusion.losses import objective_for
from moeca.models.checkpoint import save_safetensors
from moeca.models.config import DiTMoEConfig
from moeca.models.dit_moe import DiTMoE, DiTMoEBlock
from moeca.models.registry import SHIPPED_MODELS, ShippedModel
from moeca.models.runtime import Runtime

TRAINING_LOG = "training_log.json"


@dataclass(frozen=True)
class TrainConfig:
    """Knobs of ``moeca train-demo``. steps x batch_size samples; lr is the peak of a cosine schedule."""

    steps: int = 2000
    batch_size: int = 128
    lr: float = 5e-4
    warmup_steps: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    balance_alpha: float = 0.01
    seed: int = 0
    threads: int = 2
    log_every: int = 25
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "warmup_steps", "threads", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")


# The recipe each shipped model was trained with (``moeca train-demo --model NAME`` reproduces it).
# demo-ddpm: the demo's steps and batch on one thread (600 steps at batch 64 left a model that ignored
# its labels: 10% accuracy); its card reports what this buys.
RECIPES: dict[str, TrainConfig] = {
    "demo": TrainConfig(),
    "demo-ddpm": TrainConfig(threads=1),
}


class BalancedRoutingRuntime(Runtime):
    """Default compute plus the reference load-balancing loss, summed over blocks per forward."""

    def __init__(self, alpha: float):
        self.alpha = alpha
        self.aux_loss: torch.Tensor | None = None

    def reset(self) -> None:
        self.aux_loss = None

    def route(self, block: DiTMoEBlock, h: torch.Tensor):
        probs = block.moe.gate.probabilities(h)
        topk_weight, topk_idx = torch.topk(probs, block.moe.top_k, dim=-1, sorted=True)
        E = block.moe.num_experts
        frac_routed = F.one_hot(topk_idx.reshape(-1), E).float().mean(0) * E
        loss = self.alpha * (probs.mean(0) * frac_routed).sum()
        self.aux_loss = loss if self.aux_loss is None else self.aux_loss + loss
        return topk_idx, topk_weight.to(h.dtype)


def train_demo(out_dir: str | Path, cfg: TrainConfig = TrainConfig(), model_config: DiTMoEConfig | None = None,
               progress: bool = True, shipped: ShippedModel = SHIPPED_MODELS["demo"]) -> dict:
    """Train ``shipped.config`` and write ``shipped.weights`` and ``training_log.json`` into ``out_dir``.

    ``model_config`` replaces the architecture (small models for tests); its ``objective`` picks the
    loss. Returns the log dict (config, loss curve, seconds). Files are written atomically.
    """
    if model_config is not None:
        shipped = replace(shipped, config=model_config)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(Path(out_dir), cfg, shipped, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _train(out_dir: Path, cfg: TrainConfig, shipped: ShippedModel, progress: bool) -> dict:
    torch.manual_seed(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_config = shipped.config
    objective = objective_for(model_config.objective)
    data = load_digits_split()
    x_all, y_all = data.train_images, data.train_labels
    model = DiTMoE(model_config).train()
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    runtime = BalancedRoutingRuntime(cfg.balance_alpha)
    model.runtime = runtime
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    start = time.time()
    bar = tqdm(range(cfg.steps), desc=f"train {shipped.name}", disable=not progress)
    sums: dict[str, float] = {}
    for step in bar:
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=gen)
        x0, y = x_all[idx], y_all[idx]
        t, noise = objective.draw(x0, gen)
        drop = torch.rand(cfg.batch_size, generator=gen) < model_config.class_dropout_prob
        y = torch.where(drop, torch.full_like(y, model_config.num_classes), y)
        runtime.reset()
        terms = objective.loss(model, x0, y, t, noise)
        loss = terms.total + runtime.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        for key, value in {**terms.terms, "aux": runtime.aux_loss}.items():
            sums[key] = sums.get(key, 0.0) + value.item()
        if (step + 1) % cfg.log_every == 0:
            means = {key: value / cfg.log_every for key, value in sums.items()}
            # "loss" is the objective's main term (epsilon or velocity MSE), comparable across runs
            losses.append({"step": step + 1, "loss": means.pop("mse"), **means, "lr": lr,
                           "seconds": time.time() - start})
            bar.set_postfix(loss=f"{losses[-1]['loss']:.4f}")
            sums = {}
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            _write_outputs(out_dir, ema, shipped, cfg, losses, step + 1, time.time() - start, len(x_all))
    return _write_outputs(out_dir, ema, shipped, cfg, losses, cfg.steps, time.time() - start, len(x_all))


def _write_outputs(out_dir: Path, ema: DiTMoE, shipped: ShippedModel, cfg: TrainConfig, losses: list[dict],
                   steps_done: int, seconds: float, train_samples: int) -> dict:
    """Write the EMA weights (float16) and the log, each atomically; ``steps_done < cfg.steps`` marks a
    periodic checkpoint of an unfinished run."""
    log = {"model": shipped.name, "train_config": asdict(cfg), "model_config": shipped.config.to_dict(),
           "objective": shipped.config.objective, "steps_done": steps_done, "complete": steps_done == cfg.steps,
           "seconds": seconds, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "loss_curve": losses, "train_samples": train_samples}
    save_safetensors(ema, out_dir / shipped.weights, dtype=torch.float16,
                     metadata={"moeca_training": json.dumps({"seed": cfg.seed, "steps": steps_done})})
    atomic_write_text(out_dir / TRAINING_LOG, json.dumps(log, indent=1), what="training log")
    return log
