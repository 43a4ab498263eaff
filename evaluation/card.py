"""The card of a shipped digits model (``demo``, ``demo-ddpm``): config, training, loss curve, samples,
routing statistics and evaluation.

``build_card`` samples the model with its objective's sampler (rectified-flow Euler or respaced DDPM
with learned-range variance; batched CFG) at each evaluation CFG scale while a
:class:`RoutingStatsRuntime` observes the router, scores the samples with the shipped digits
classifier, and writes ``MODEL_CARD.md``, ``card.json`` and the PNGs next to the weights, each file
atomically (temporary name, then rename).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from moeca.common.outputs import atomic_file, atomic_write_text
from moeca.data.digits import to_uint8
from moeca.diffusion.samplers import default_sampler, initial_noise, sample
from moeca.evaluation.evaluator import DigitsClassifier, evaluate_samples
from moeca.models.checkpoint import weights_hash
from moeca.models.registry import load_model, pick_device, shipped_model
from moeca.models.runtime import Runtime

CARD_MD = "MODEL_CARD.md"
CARD_JSON = "card.json"
LOSS_PNG = "loss_curve.png"
SAMPLES_PNG = "samples.png"
LOAD_PNG = "expert_load.png"
MIN_EXPERT_LOAD = 0.02
BAR = {3.0: 0.95, 1.5: 0.85}  # issue 2: class accuracy at CFG 3 >= 95%, at CFG 1.5 >= 85%
# How each objective's card names its main loss term and its extra terms in the training log.
LOSS_LABELS = {"rectified_flow": "flow-matching (velocity) MSE", "ddpm_eps": "epsilon MSE"}
EXTRA_LOSS_LABELS = {"vb": "variational bound L_vb (variance)", "aux": "load-balancing loss"}


# ----------------------------------------------------------------------------- routing statistics
class RoutingStatsRuntime(Runtime):
    """Default compute; counts, per block, routed (token, slot) pairs per expert and sums gate weights.

    Statistics accumulate across forwards and sampling runs (``reset()``, which samplers call around
    each run, keeps them); ``clear()`` drops them. ``cond_only=True`` counts only the conditional half
    of batched-CFG calls and skips ``uncond`` calls.
    """

    def __init__(self, cond_only: bool = False):
        self.cond_only = cond_only
        self._branch: str | None = None
        self.clear()

    def clear(self) -> None:
        self.counts: dict[int, torch.Tensor] = {}      # block -> [E] routed slots per expert
        self.weight_sums: dict[int, torch.Tensor] = {}  # block -> [k] sum of the slot-th largest gate weight
        self.rows: dict[int, int] = {}                 # block -> routed rows (tokens)

    def begin_forward(self, model, ctx, x_tokens) -> None:
        self._branch = ctx.cfg_branch if ctx is not None else None

    def route(self, block, h):
        topk_idx, topk_weight = super().route(block, h)
        idx, w = topk_idx, topk_weight
        if self.cond_only:
            if self._branch == "uncond":
                return topk_idx, topk_weight
            if self._branch == "batched":
                idx, w = idx[: idx.shape[0] // 2], w[: w.shape[0] // 2]
        i = block.index
        counts = torch.bincount(idx.reshape(-1), minlength=block.moe.num_experts).double()
        sums = w.double().sum(dim=0)
        self.counts[i] = self.counts[i] + counts if i in self.counts else counts
        self.weight_sums[i] = self.weight_sums[i] + sums if i in self.weight_sums else sums
        self.rows[i] = self.rows.get(i, 0) + idx.shape[0]
        return topk_idx, topk_weight

    def summary(self) -> dict:
        """``load[block][e]``: fraction of the block's routed slots sent to expert ``e`` (rows sum to 1);
        ``mean_topk_weight[block]``: mean gate weight of the 1st, 2nd, ... choice; overall means."""
        if not self.counts:
            raise ValueError("no routing was observed; run a forward through this runtime first")
        blocks = sorted(self.counts)
        load = [(self.counts[b] / self.counts[b].sum()).cpu().tolist() for b in blocks]
        topk = [(self.weight_sums[b] / self.rows[b]).cpu().tolist() for b in blocks]
        flat = [x for row in load for x in row]
        mean_topk = np.mean(np.array(topk), axis=0).tolist()
        return {"blocks": blocks, "load": load, "mean_topk_weight": topk, "min_load": min(flat),
                "max_load": max(flat), "mean_top1": mean_topk[0],
                "mean_top2": mean_topk[1] if len(mean_topk) > 1 else None,
                "mean_topk_sum": float(sum(mean_topk)), "routed_rows_per_block": self.rows[blocks[0]]}


# ----------------------------------------------------------------------------- images
def image_grid(images: torch.Tensor, nrow: int, scale: int = 4, pad: int = 2) -> np.ndarray:
    """``[N, C, H, W]`` in [-1, 1] -> uint8 grid ``[rows*(H*scale+pad)+pad, ..., 3]`` with ``nrow``
    images per row, each upscaled ``scale`` x (nearest). One channel is shown as grey, three as RGB;
    other channel counts (raw latents) show their first three channels as RGB."""
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"image_grid expects a non-empty batch [N, C, H, W], got {tuple(images.shape)}")
    arr = to_uint8(images)  # [N, H, W, C]
    C = arr.shape[-1]
    arr = np.repeat(arr, 3, axis=-1) if C == 1 else (arr[..., :3] if C >= 3 else
                                                     np.concatenate([arr, arr[..., :1]], axis=-1))
    arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, _ = arr.shape
    ncol = max(1, min(nrow, n))
    rows = -(-n // ncol)
    grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = arr[i]
    return grid


def save_png(array: np.ndarray, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a uint8 ``[H, W, 3]`` array as PNG atomically (Pillow); an existing file moeca did not write is
    replaced only with ``overwrite`` (:func:`moeca.common.outputs.atomic_file`)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"output {path} must end in .png")
    if not path.parent.exists():
        raise FileNotFoundError(f"output folder {path.parent} does not exist; create it first")
    with atomic_file(path, "PNG image", overwrite=overwrite) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return path


def _save_figure(fig, path: Path) -> None:
    try:
        with atomic_file(path, "figure") as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)


def plot_loss_curve(log: dict, path: Path) -> None:
    matplotlib.use("Agg")
    curve = log.get("loss_curve") or []
    if not curve:
        raise ValueError("the training log has an empty loss_curve; retrain with `moeca train-demo`")
    steps = [p["step"] for p in curve]
    objective = (log.get("model_config") or {}).get("objective", "rectified_flow")
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot(steps, [p["loss"] for p in curve], label=LOSS_LABELS.get(objective, "loss"))
    for key, label in EXTRA_LOSS_LABELS.items():
        if key in curve[0]:
            ax.plot(steps, [p[key] for p in curve], label=label, alpha=0.7)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss (mean over log interval)")
    ax.set_title(f"{log.get('model', 'demo')} DiT-MoE training")
    ax.grid(alpha=0.3)
    ax.legend()
    _save_figure(fig, path)


def plot_expert_load(routing: dict, path: Path) -> None:
    matplotlib.use("Agg")
    load = np.array(routing["load"]) * 100
    fig, ax = plt.subplots(figsize=(6, 3.4))
    im = ax.imshow(load, cmap="viridis", aspect="auto")
    for (b, e), v in np.ndenumerate(load):
        ax.text(e, b, f"{v:.0f}", ha="center", va="center", color="w" if v < load.max() * 0.6 else "k",
                fontsize=7)
    ax.set_xlabel("expert")
    ax.set_ylabel("block")
    ax.set_title("% of routed (token, slot) pairs per expert")
    fig.colorbar(im, ax=ax)
    _save_figure(fig, path)


# ----------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class CardConfig:
    """What ``moeca evaluate-demo`` measures: ``samples_per_class`` x 10 samples, ``steps`` sampling
    steps of the model's own sampler (rectified-flow Euler, or DDPM respaced from 1000 steps), batched
    CFG at each of ``cfg_scales``, in chunks of ``chunk`` samples. Every scale starts from the same
    seeded noise."""

    samples_per_class: int = 100
    steps: int = 50
    cfg_scales: tuple[float, ...] = (3.0, 1.5)
    seed: int = 0
    chunk: int = 250
    grid_per_class: int = 10

    def __post_init__(self) -> None:
        if self.samples_per_class < 1:
            raise ValueError(f"--samples-per-class must be >= 1, got {self.samples_per_class}")
        if self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")


def sample_with_stats(model, labels: torch.Tensor, cfg_scale: float, steps: int, seed: int, chunk: int,
                      runtime: Runtime | None = None, progress: bool = True, desc: str = "sample") -> torch.Tensor:
    """Samples ``[N, C, H, W]`` for ``labels [N]`` with the model's own sampler
    (:func:`card_sampler`), in chunks of ``chunk`` from one seeded noise tensor, through ``runtime``
    if given. The DDPM step noise of the chunk starting at sample ``i`` is seeded with ``seed + i``, so
    chunks do not share it. One tqdm tick per step per chunk."""
    mc = model.config
    device = next(model.parameters()).device
    noise = initial_noise((labels.shape[0], mc.in_channels, mc.input_size, mc.input_size), seed, device)
    cfg = card_sampler(mc.objective, steps, cfg_scale)
    chunks = range(0, labels.shape[0], chunk)
    out = []
    with tqdm(total=len(chunks) * steps, desc=desc, unit="step", disable=not progress) as bar:
        for i in chunks:
            def tick(_step: int) -> None:
                bar.update(1)
            if runtime is not None:
                with model.use_runtime(runtime):
                    x = sample(model, cfg, labels[i:i + chunk], seed=seed + i, noise=noise[i:i + chunk],
                               on_step=tick)
            else:
                x = sample(model, cfg, labels[i:i + chunk], seed=seed + i, noise=noise[i:i + chunk], on_step=tick)
            out.append(x.cpu())
    return torch.cat(out)


def card_sampler(objective: str, steps: int, cfg_scale: float):
    """The sampler a card evaluates with: the objective's reference sampler (rectified-flow Euler, or
    DDPM with learned-range variance guiding the predicted channels) at ``steps``, batched CFG."""
    return default_sampler(objective, num_steps=steps, cfg_scale=cfg_scale, cfg_mode="batched")


def build_card(weights: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None,
               training_log: str | os.PathLike | None = None, config: CardConfig = CardConfig(),
               device: str | None = "auto", progress: bool = True, model_name: str = "demo") -> dict:
    """Evaluate a shipped digits model and write its card into ``out_dir`` (default: next to the weights).

    model_name: ``demo`` or ``demo-ddpm``; weights: a moeca-written ``.safetensors`` of that model
    (default: the shipped weights); training_log: ``training_log.json`` (default: next to the weights).
    Returns the card dict (also ``card.json``).
    """
    shipped = shipped_model(model_name)
    flag = "" if model_name == "demo" else f" --model {model_name}"
    weights = Path(weights) if weights is not None else shipped.weights_path
    if not weights.is_file():
        raise FileNotFoundError(f"{model_name} model weights not found at {weights}; train them with "
                                f"`moeca train-demo{flag}` (or pass --checkpoint PATH)")
    log_path = Path(training_log) if training_log is not None else weights.with_name("training_log.json")
    if not log_path.is_file():
        raise FileNotFoundError(f"training log not found at {log_path}; `moeca train-demo{flag}` writes it next "
                                "to the weights (or pass --training-log PATH)")
    out_dir = Path(out_dir) if out_dir is not None else weights.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    log = json.loads(log_path.read_text())
    dev = pick_device(device)
    model = load_model(None, checkpoint=weights, device=dev)
    mc = model.config
    if (mc.objective, mc.learn_sigma) != (shipped.config.objective, shipped.config.learn_sigma):
        raise ValueError(f"{weights} is not a {model_name} model (its config says objective {mc.objective}, "
                         f"learn_sigma {mc.learn_sigma}); pass the matching --model")
    classifier = DigitsClassifier.load_shipped(dev)

    labels = torch.arange(mc.num_classes).repeat_interleave(config.samples_per_class)
    evaluations, routing, grid_images = [], None, None
    for scale in config.cfg_scales:
        stats = RoutingStatsRuntime()
        start = time.time()
        images = sample_with_stats(model, labels, scale, config.steps, config.seed, config.chunk, stats,
                                   progress, desc=f"evaluate {model_name} cfg {scale:g}")
        seconds = time.time() - start
        scores = evaluate_samples(images, labels, classifier)
        bar = BAR.get(float(scale))
        evaluations.append({"cfg_scale": float(scale), **scores, "sampling_seconds": round(seconds, 1),
                            "bar": bar, "meets_bar": None if bar is None else scores["accuracy"] >= bar,
                            "routing": stats.summary()})
        if routing is None or float(scale) == 1.5:  # the card shows the demo's default guidance
            routing = {"cfg_scale": float(scale), **stats.summary()}
            pick = torch.cat([torch.arange(c * config.samples_per_class,
                                           c * config.samples_per_class + min(config.grid_per_class,
                                                                              config.samples_per_class))
                              for c in range(mc.num_classes)])
            grid_images = images[pick]

    paths = {name: out_dir / name for name in (CARD_MD, CARD_JSON, LOSS_PNG, SAMPLES_PNG, LOAD_PNG)}
    plot_loss_curve(log, paths[LOSS_PNG])
    save_png(image_grid(grid_images, nrow=min(config.grid_per_class, config.samples_per_class), scale=4),
             paths[SAMPLES_PNG])
    plot_expert_load(routing, paths[LOAD_PNG])
    card = {
        "model": {"name": model_name, "weights": weights.name, "weights_hash": weights_hash(model),
                  "weights_bytes": weights.stat().st_size,
                  "parameters": sum(p.numel() for p in model.parameters()), "config": mc.to_dict()},
        "training": {k: log.get(k) for k in ("seconds", "threads", "torch", "train_samples", "train_config",
                                             "steps_done", "complete")}
        | {"final_loss": log["loss_curve"][-1]["loss"] if log.get("loss_curve") else None,
           "steps_logged": len(log.get("loss_curve") or [])},
        "evaluation_config": asdict(config) | {"sampler": card_sampler(mc.objective, config.steps, 1.0).kind,
                                               "cfg_mode": "batched", "bench_steps": shipped.bench_steps},
        "classifier": {k: classifier.info.get(k) for k in ("test_accuracy", "seed", "feature_dim")},
        "evaluations": evaluations,
        "routing": routing,
        "min_expert_load_required": MIN_EXPERT_LOAD,
        "device": str(dev),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": f"moeca evaluate-demo{flag}" + (f" --samples-per-class {config.samples_per_class}"
                                            if config.samples_per_class != 100 else "")
        + (f" --steps {config.steps}" if config.steps != 50 else ""),
    }
    _write_text(paths[CARD_JSON], json.dumps(card, indent=1) + "\n")
    _write_text(paths[CARD_MD], render_markdown(card))
    return card


def _write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text, what="model card")


def render_markdown(card: dict) -> str:
    """The human-readable card from the card dict."""
    mc, tr, rt = card["model"]["config"], card["training"], card["routing"]
    tc = tr.get("train_config") or {}
    ev_cfg = card["evaluation_config"]
    name = card["model"].get("name", "demo")
    flag = "" if name == "demo" else f" --model {name}"
    ddpm = mc["objective"] == "ddpm_eps"
    sampler_text = (f"DDPM respaced from 1000 to {ev_cfg['steps']} steps with learned-range variance, CFG on the "
                    "predicted (epsilon) channel" if ev_cfg["sampler"] == "ddpm" else
                    f"rectified flow, Euler, {ev_cfg['steps']} steps")
    lines = [
        f"# moeca {name} model card", "",
        "A class-conditional DiT-MoE trained by moeca on scikit-learn's 8x8 handwritten digits "
        "(1797 real scans, 10 classes; fixed 80/20 stratified split, trained on the 80%). "
        f"Regenerate this card with `{card['command']}`; the weights with `moeca train-demo{flag}`.", "",
    ]
    if ddpm:
        lines += [
            "The recipe of the public DiT-MoE S/B checkpoints: DDPM with linear betas 1e-4..0.02 over 1000 "
            "steps, epsilon prediction plus learned-range variance (`learn_sigma=True`, 2 output channels), "
            "loss = epsilon MSE + the variational bound L_vb with the mean's gradient stopped (improved DDPM, "
            "`LEARNED_RANGE`), classifier-free label dropout, the demo model's load-balancing loss and EMA. "
            f"Sample it with `moeca sample --model {name}` (the reference sampler: DDPM respaced to 250 steps, "
            f"batched CFG); the benchmarks use {ev_cfg.get('bench_steps', ev_cfg['steps'])} respaced steps "
            f"(`--steps {ev_cfg.get('bench_steps', ev_cfg['steps'])}`), as this card's evaluation does.", "",
        ]
    lines += [
        "## Model", "",
        "| field | value |", "|---|---|",
        f"| tokens | {(mc['input_size'] // mc['patch_size']) ** 2} ({mc['input_size']}x{mc['input_size']}x"
        f"{mc['in_channels']}, patch {mc['patch_size']}) |",
        f"| blocks / hidden / heads | {mc['depth']} / {mc['hidden_size']} / {mc['num_heads']} |",
        f"| routed experts / top-k | {mc['num_experts']} / {mc['top_k']} (SwiGLU, hidden "
        f"{int(mc['hidden_size'] * mc['mlp_ratio'])}) + 1 shared expert (hidden "
        f"{int(mc['hidden_size'] * mc['shared_expert_ratio'])}) |",
        f"| objective | {mc['objective']} |",
        f"| parameters | {card['model']['parameters']:,} |",
        f"| weights | `{card['model']['weights']}`, {card['model']['weights_bytes'] / 1e6:.2f} MB, hash "
        f"`{card['model']['weights_hash']}` |", "",
        "## Training", "",
        f"{tc.get('steps', '?')} steps of batch {tc.get('batch_size', '?')}, peak lr {tc.get('lr', '?')}, "
        f"seed {tc.get('seed', '?')}, EMA {tc.get('ema_decay', '?')}, load-balancing alpha "
        f"{tc.get('balance_alpha', '?')}; {tr['seconds'] / 60 if tr.get('seconds') else float('nan'):.1f} minutes "
        f"on {tr.get('threads', '?')} CPU threads (torch {tr.get('torch', '?')}). Final logged "
        f"{LOSS_LABELS.get(mc['objective'], 'loss')} {tr['final_loss']:.4f}."
        + ("" if tr.get("complete", True) else f" **Unfinished run: {tr.get('steps_done')} steps done.**")
        if tr.get("final_loss") is not None else "No loss logged.",
        "", f"![loss curve]({LOSS_PNG})", "",
        "## Samples", "",
        f"Rows are classes 0-9; {sampler_text}, batched CFG scale {rt['cfg_scale']:g}.",
        "", f"![samples]({SAMPLES_PNG})", "",
        "## Evaluation", "",
        f"{ev_cfg['samples_per_class']} samples per class ({ev_cfg['samples_per_class'] * mc['num_classes']} in "
        f"all) at each CFG scale, {sampler_text}, seed {ev_cfg['seed']}, scored by the shipped digits classifier "
        f"(held-out accuracy {card['classifier']['test_accuracy']:.2%}). FD: Frechet distance of the "
        "classifier's penultimate features to the real held-out test digits; the floor is real train vs "
        "real test digits.", "",
        "| CFG scale | class accuracy | bar | meets bar | FD | FD floor (real vs real) | sampling time |",
        "|---|---|---|---|---|---|---|",
    ]
    for ev in card["evaluations"]:
        bar = "-" if ev["bar"] is None else f">= {ev['bar']:.0%}"
        meets = "-" if ev["meets_bar"] is None else ("yes" if ev["meets_bar"] else "**no**")
        lines.append(f"| {ev['cfg_scale']:g} | {ev['accuracy']:.1%} | {bar} | {meets} | {ev['fd']:.2f} | "
                     f"{ev['fd_floor']:.2f} | {ev['sampling_seconds']:.0f} s |")
    chance = 1.0 / mc["num_classes"]
    if all(ev["accuracy"] < 2 * chance for ev in card["evaluations"]):
        lines += ["", f"**Not usable for quality measurements: class accuracy is within 2x of chance "
                      f"({chance:.0%}) at every CFG scale, so the samples are not yet digits. Train longer "
                      f"(`moeca train-demo{flag} --steps N`) and rebuild this card.**"]
    lines += ["", "Per-class accuracy:", "", "| CFG | " + " | ".join(str(c) for c in range(mc["num_classes"]))
              + " |", "|---|" + "---|" * mc["num_classes"]]
    for ev in card["evaluations"]:
        pc = ev["per_class_accuracy"]
        lines.append(f"| {ev['cfg_scale']:g} | " + " | ".join(
            f"{pc.get(c, pc.get(str(c), float('nan'))):.0%}" for c in range(mc["num_classes"])) + " |")
    E = mc["num_experts"]
    ok = rt["min_load"] >= card["min_expert_load_required"]
    lines += [
        "", "## Routing", "",
        f"Measured over the evaluation run at CFG {rt['cfg_scale']:g} (both CFG halves, every step; "
        f"{rt['routed_rows_per_block']:,} routed tokens per block). Load = share of a block's routed "
        f"(token, slot) pairs that go to each expert (uniform = {1 / E:.1%}). Smallest load "
        f"{rt['min_load']:.1%} ({'every expert above' if ok else '**below**'} the "
        f"{card['min_expert_load_required']:.0%} requirement), largest {rt['max_load']:.1%}.",
        "",
        f"Router sharpness: mean top-1 gate weight {rt['mean_top1']:.3f}, mean top-2 gate weight "
        f"{rt['mean_top2']:.3f} (sum {rt['mean_topk_sum']:.3f}; a uniform router gives "
        f"{mc['top_k'] / E:.3f}).", "",
        "| block | " + " | ".join(f"e{e}" for e in range(E)) + " | top-1 w | top-2 w |",
        "|---|" + "---|" * (E + 2),
    ]
    for b, load, w in zip(rt["blocks"], rt["load"], rt["mean_topk_weight"]):
        lines.append(f"| {b} | " + " | ".join(f"{x:.1%}" for x in load) + f" | {w[0]:.3f} | "
                     f"{w[1] if len(w) > 1 else float('nan'):.3f} |")
    lines += ["", f"![expert load]({LOAD_PNG})", "",
              f"Evaluated on {card['device']} at {card['created']}.", ""]
    return "\n".join(lines)
