"""CLI of the models stage: ``sample``, ``train-demo``, ``train-classifier``, ``evaluate-demo``.

Heavy imports happen inside the command functions so ``moeca --help`` stays fast.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from moeca.common.outputs import adopt_file, check_no_overlap, check_replace_file
from moeca.models.model_args import SHIPPED_MODEL_NAMES, add_model_arguments, load_model_from_args


def register(sub: argparse._SubParsersAction) -> None:
    _register_sample(sub)
    _register_train_demo(sub)
    _register_train_classifier(sub)
    _register_evaluate_demo(sub)


# ----------------------------------------------------------------------------- sample
def _register_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample", help="sample images from a DiT-MoE and save them as a PNG grid",
        description="Sample class-conditional images and write a PNG grid (one row per class with "
                    "--num-per-class). Sampler defaults follow the model's training objective "
                    "(rectified flow for the demo model, DDPM for the S/B presets).",
        epilog="examples:\n  moeca sample --model demo --num-per-class 4 --out grid.png\n"
               "  moeca sample --model S/2-8E2A --random-init --steps 10 --labels 1,2 --out latents.png",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, model_seed=False)
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's reference sampler)")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale; 1 disables guidance")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--labels", help="comma-separated class labels, e.g. 0,1,2")
    group.add_argument("--num-per-class", type=int, help="K samples of every class (one grid row per class)")
    p.add_argument("--sampler", choices=("rectified_flow", "ddpm", "ddim"),
                   help="default: from the model's objective")
    p.add_argument("--cfg-mode", choices=("batched", "separate"),
                   help="one [cond; uncond] call per step, or two calls (default: batched, separate for the public "
                        "XL/G architectures; see moeca.diffusion.samplers.default_cfg_mode)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file moeca did not write (a PNG it wrote is replaced anyway)")
    p.add_argument("--scale", type=int, default=None,
                   help="nearest-neighbour upscale factor of the grid (default: cells of 64 pixels, 8x for the digits)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--compile", action="store_true",
                   help="compile the model with torch.compile first (pays off for many steps; minutes on a CPU)")
    p.set_defaults(func=cmd_sample)


def parse_labels(text: str, num_classes: int) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; every label must lie in ``0..num_classes-1``."""
    try:
        labels = [int(part) for part in text.split(",") if part.strip() != ""]
    except ValueError:
        raise ValueError(f"--labels must be comma-separated integers like 0,1,2; got {text!r}") from None
    if not labels:
        raise ValueError("--labels is empty; give comma-separated class labels like 0,1,2")
    bad = [y for y in labels if not 0 <= y < num_classes]
    if bad:
        raise ValueError(f"labels {bad} are out of range: this model has {num_classes} classes, so labels must lie "
                         f"in 0..{num_classes - 1}")
    return labels


def resolve_labels(args: argparse.Namespace, num_classes: int) -> tuple[list[int], int]:
    """Labels to sample and the grid's images per row."""
    if args.labels is not None:
        labels = parse_labels(args.labels, num_classes)
        return labels, min(len(labels), 10)
    k = args.num_per_class
    if k is None:
        return list(range(min(num_classes, 10))), min(num_classes, 10)
    if k < 1:
        raise ValueError(f"--num-per-class must be >= 1, got {k}")
    return [c for c in range(num_classes) for _ in range(k)], k


MAX_GRID_SAMPLES = 10_000
MAX_SCALE = 64


def check_sample_options(args: argparse.Namespace) -> None:
    """Numeric options of ``moeca sample`` within their valid ranges (before any model is loaded)."""
    if args.scale is not None and not 1 <= args.scale <= MAX_SCALE:
        raise ValueError(f"--scale {args.scale} must be in 1..{MAX_SCALE} (pixels per sample pixel); omit it for "
                         "readable cells")
    if args.seed < 0:
        raise ValueError(f"--seed {args.seed} must be >= 0")
    if args.cfg_scale is not None and not (math.isfinite(args.cfg_scale) and args.cfg_scale >= 0):
        raise ValueError(f"--cfg-scale {args.cfg_scale} must be a finite number >= 0 (1 disables guidance)")


def cmd_sample(args: argparse.Namespace) -> int:
    # deferred: loads torch, and this module is imported at `moeca` start-up
    import torch

    # deferred: loads torch, and this module is imported at `moeca` start-up
    from moeca.diffusion.samplers import check_sampler_objective, default_sampler_for
    # deferred: loads torch, and this module is imported at `moeca` start-up
    from moeca.evaluation.card import save_png
    from moeca.evaluation.grid import label_grid

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {out} must be a .png path")
    if not out.parent.exists():
        raise FileNotFoundError(f"output folder {out.parent} does not exist; create it first")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    check_sample_options(args)
    check_no_overlap(out, [("--checkpoint", args.checkpoint)])
    check_replace_file(out, "PNG image", args.overwrite)   # before sampling, not after
    _, model = load_model_from_args(args, args.device, seed=args.seed)
    mc = model.config
    labels, per_row = resolve_labels(args, mc.num_classes)
    if len(labels) > MAX_GRID_SAMPLES:
        raise ValueError(f"{len(labels)} samples do not fit one PNG grid (at most {MAX_GRID_SAMPLES}); lower "
                         "--num-per-class or give fewer --labels")
    overrides = {k: v for k, v in (("kind", args.sampler), ("num_steps", args.steps), ("cfg_scale", args.cfg_scale),
                                   ("cfg_mode", args.cfg_mode)) if v is not None}
    cfg = default_sampler_for(mc, **overrides)
    check_sampler_objective(cfg.kind, mc.objective, "--sampler" if args.sampler else "the default sampler")
    # deferred: loads torch, and this module is imported at `moeca` start-up
    from moeca.diffusion.samplers import sample
    if args.compile:
        from moeca.models.compile import compile_model  # deferred: as above
        compile_model(model)
    y = torch.tensor(labels, dtype=torch.long)
    with tqdm(total=cfg.num_steps, desc=f"sample {mc.name}", unit="step", disable=args.no_progress) as bar:
        images = sample(model, cfg, y, seed=args.seed, on_step=lambda _s: bar.update(1))
    save_png(label_grid(images.cpu(), labels, columns=per_row, scale=args.scale), out,  # atomic, OS errors named
             overwrite=args.overwrite)
    note = "" if mc.in_channels in (1, 3) else " (raw latents, first 3 channels as RGB; no VAE decoder)"
    print(f"wrote {len(labels)} samples to {out}{note}: {cfg.kind}, {cfg.num_steps} steps, CFG {cfg.cfg_scale:g} "
          f"({cfg.cfg_mode}), seed {args.seed}")
    return 0


# ----------------------------------------------------------------------------- training
def _register_train_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-demo", help="train a shipped digits DiT-MoE (demo or demo-ddpm; CPU, ~1 hour)",
                       description="Reproduce a shipped model from a seed on the 8x8 digits with a load-balancing "
                                   "loss: demo = rectified flow, demo-ddpm = DDPM epsilon + learned-range variance "
                                   "(L_vb). Writes the weights and training_log.json (also every few hundred steps, "
                                   "so an interrupted run is usable). Afterwards run `moeca evaluate-demo "
                                   "[--model demo-ddpm]` to rebuild its card.")
    p.add_argument("--model", default="demo", choices=SHIPPED_MODEL_NAMES,
                   help="which shipped model: demo (rectified flow) or demo-ddpm (DDPM epsilon + learned variance)")
    p.add_argument("--out", help="output folder (default: the model's shipped data folder)")
    p.add_argument("--steps", type=int, help="training steps (default: the shipped recipe, train_demo.RECIPES)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0, the shipped model's)")
    p.add_argument("--threads", type=int, help="CPU threads (default: the recipe's, TrainConfig.threads)")
    p.add_argument("--overwrite", action="store_true", help="replace existing weights in --out")
    p.set_defaults(func=cmd_train_demo)


def _default_dir(sub: str) -> Path:
    # deferred: loads torch, and this module is imported at `moeca` start-up
    from moeca.models.registry import data_dir
    return data_dir() / sub


def cmd_train_demo(args: argparse.Namespace) -> int:
    # deferred: loads torch, and this module is imported at `moeca` start-up
    from moeca.diffusion.train_demo import RECIPES, train_demo
    # deferred: loads torch, and this module is imported at `moeca` start-up
    from moeca.models.registry import shipped_model

    shipped = shipped_model(args.model)
    recipe = RECIPES[shipped.name]
    out = Path(args.out) if args.out else _default_dir(shipped.folder)
    steps = args.steps if args.steps is not None else recipe.steps
    threads = args.threads if args.threads is not None else recipe.threads
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    weights = out / shipped.weights
    if weights.exists() and not args.overwrite:
        raise FileExistsError(f"{weights} already exists; pass --overwrite to replace it or --out DIR to train "
                              "elsewhere")
    if args.overwrite:                           # the user allows replacing these two, whoever wrote them
        from moeca.diffusion.train_demo import TRAINING_LOG  # deferred: loads torch (module imported at start-up)
        adopt_file(weights)
        adopt_file(out / TRAINING_LOG)
    log = train_demo(out, replace(recipe, steps=steps, seed=args.seed, threads=threads), shipped=shipped)
    print(f"wrote {weights} and {out / 'training_log.json'} "
          f"({log['seconds'] / 60:.1f} min, final loss {log['loss_curve'][-1]['loss']:.4f})"
          if log.get("loss_curve") else f"wrote {out}")
    extra = (f" --model {shipped.name}" if shipped.name != "demo" else "") + (
        "" if not args.out else f" --checkpoint {weights} --out {out}")
    print(f"next: run `moeca evaluate-demo{extra}` to rebuild the model card")
    return 0


def _register_train_classifier(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-classifier", help="train the digits classifier used to evaluate samples (~15 s)",
                       description="Train the evaluator CNN on the real train digits; writes "
                                   "classifier.safetensors and classifier.json (held-out accuracy, seed, time).")
    p.add_argument("--out", help="output folder (default: the shipped data/classifier folder)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0, the shipped classifier's)")
    p.add_argument("--epochs", type=int, help="epochs (default: ClassifierTrainConfig.epochs)")
    p.add_argument("--overwrite", action="store_true", help="replace existing weights in --out")
    p.set_defaults(func=cmd_train_classifier)


def cmd_train_classifier(args: argparse.Namespace) -> int:
    # deferred: loads torch, and this module is imported at `moeca` start-up
    from moeca.evaluation.evaluator import CLASSIFIER_WEIGHTS, ClassifierTrainConfig, train_classifier

    out = Path(args.out) if args.out else _default_dir("classifier")
    epochs = args.epochs if args.epochs is not None else ClassifierTrainConfig().epochs
    if epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    if (out / CLASSIFIER_WEIGHTS).exists() and not args.overwrite:
        raise FileExistsError(f"{out / CLASSIFIER_WEIGHTS} already exists; pass --overwrite to replace it or "
                              "--out DIR to train elsewhere")
    if args.overwrite:                           # the user allows replacing these two, whoever wrote them
        # deferred: loads torch, and this module is imported at `moeca` start-up
        from moeca.evaluation.evaluator import CLASSIFIER_CARD
        adopt_file(out / CLASSIFIER_WEIGHTS)
        adopt_file(out / CLASSIFIER_CARD)
    card = train_classifier(out, seed=args.seed, config=ClassifierTrainConfig(epochs=epochs), progress=True)
    print(f"wrote {out / CLASSIFIER_WEIGHTS}: held-out accuracy {card['test_accuracy']:.2%}, "
          f"FD floor {card['fd_floor_train_vs_test']:.2f}, {card['train_seconds']:.0f} s")
    return 0


# ----------------------------------------------------------------------------- evaluation
def _register_evaluate_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate-demo", help="evaluate a shipped digits model and write its model card",
                       description="Sample N per class at CFG 3 and 1.5 (the model's sampler: rectified flow "
                                   "for demo, respaced DDPM for demo-ddpm; batched CFG), score "
                                   "them with the shipped classifier (class accuracy, Frechet distance vs the "
                                   "real-vs-real floor), measure expert load and router sharpness, and write "
                                   "MODEL_CARD.md, card.json and PNGs next to the weights.")
    p.add_argument("--model", default="demo", choices=SHIPPED_MODEL_NAMES,
                   help="which shipped model (default demo); its sampler follows its objective")
    p.add_argument("--samples-per-class", type=int, default=100, help="samples per class (default 100)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--checkpoint", help="demo-like weights to evaluate (default: the shipped demo model)")
    p.add_argument("--training-log", help="training_log.json (default: next to the weights)")
    p.add_argument("--out", help="card folder (default: next to the weights)")
    p.add_argument("--chunk", type=int, default=250, help="samples per sampling batch (default 250)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_evaluate_demo)


def cmd_evaluate_demo(args: argparse.Namespace) -> int:
    # deferred: loads torch, and this module is imported at `moeca` start-up
    from moeca.evaluation.card import CARD_MD, CardConfig, build_card
    # deferred: loads torch, and this module is imported at `moeca` start-up
    from moeca.models.registry import shipped_model

    config = CardConfig(samples_per_class=args.samples_per_class, steps=args.steps, seed=args.seed, chunk=args.chunk)
    card = build_card(args.checkpoint, args.out, args.training_log, config, device=args.device,
                      progress=not args.no_progress, model_name=args.model)
    for ev in card["evaluations"]:
        bar = "" if ev["bar"] is None else f" (bar {ev['bar']:.0%}: {'met' if ev['meets_bar'] else 'MISSED'})"
        print(f"CFG {ev['cfg_scale']:g}: class accuracy {ev['accuracy']:.1%}{bar}, FD {ev['fd']:.2f} "
              f"(real-vs-real floor {ev['fd_floor']:.2f})")
    rt = card["routing"]
    print(f"expert load min {rt['min_load']:.1%} / max {rt['max_load']:.1%}; mean top-1 weight "
          f"{rt['mean_top1']:.3f}, top-2 {rt['mean_top2']:.3f}")
    out = Path(args.out) if args.out else (Path(args.checkpoint).parent if args.checkpoint
                                           else _default_dir(shipped_model(args.model).folder))
    print(f"wrote {out / CARD_MD}")
    return 0
