"""Train the demo DiT-MoE on the scikit-learn digits with rectified flow (seeded, CPU-friendly).

Objective: rectified flow with logit-normal time sampling (as the public XL/G training code):
``x_t = (1 - t) x0 + t noise``, the model predicts ``v = noise - x0``. Labels are dropped with
probability ``class_dropout_prob`` for classifier-free guidance. A load-balancing loss (the reference
``alpha * E * sum_e f_e P_e``) keeps every expert in use. EMA weights are what ships.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import save_safetensors
from .config import DiTMoEConfig, get_preset
from .digits import load_digits_split
from .dit_moe import DiTMoE, DiTMoEBlock
from .runtime import Runtime


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
               progress: bool = True) -> dict:
    """Train and write ``demo_model.safetensors`` and ``training_log.json`` into ``out_dir``.

    Returns the log dict (config, loss curve, seconds). Files are written atomically.
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(out_dir, cfg, model_config, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _train(out_dir: str | Path, cfg: TrainConfig, model_config: DiTMoEConfig | None, progress: bool) -> dict:
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_config = model_config or get_preset("demo")
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
    bar = tqdm(range(cfg.steps), desc="train-demo", disable=not progress)
    run_loss = run_aux = 0.0
    for step in bar:
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=gen)
        x0, y = x_all[idx], y_all[idx]
        t = torch.sigmoid(torch.randn(cfg.batch_size, generator=gen))
        noise = torch.randn(x0.shape, generator=gen)
        drop = torch.rand(cfg.batch_size, generator=gen) < model_config.class_dropout_prob
        y = torch.where(drop, torch.full_like(y, model_config.num_classes), y)
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        runtime.reset()
        pred = model(xt, t, y)[:, :model_config.in_channels]
        mse = F.mse_loss(pred, noise - x0)
        loss = mse + runtime.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        run_loss += mse.item()
        run_aux += runtime.aux_loss.item()
        if (step + 1) % cfg.log_every == 0:
            losses.append({"step": step + 1, "loss": run_loss / cfg.log_every, "aux": run_aux / cfg.log_every,
                           "lr": lr, "seconds": time.time() - start})
            bar.set_postfix(loss=f"{run_loss / cfg.log_every:.4f}")
            run_loss = run_aux = 0.0
    seconds = time.time() - start
    model.runtime = ema.runtime
    log = {"train_config": asdict(cfg), "model_config": model_config.to_dict(), "seconds": seconds,
           "threads": torch.get_num_threads(), "torch": torch.__version__, "loss_curve": losses,
           "train_samples": len(x_all)}
    save_safetensors(ema, out_dir / "demo_model.safetensors", dtype=torch.float16,
                     metadata={"moeca_training": json.dumps({"seed": cfg.seed, "steps": cfg.steps})})
    tmp = out_dir / "training_log.json.tmp"
    tmp.write_text(json.dumps(log, indent=1))
    os.replace(tmp, out_dir / "training_log.json")
    return log
