"""CLI of the models stage: ``sample``, ``train-demo``, ``train-classifier``, ``evaluate-demo``.

Heavy imports happen inside the command functions so ``moeca --help`` stays fast.
"""
from __future__ import annotations

import argparse

from moeca.models.model_args import add_model_arguments
from pathlib import Path


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
                   help="one [cond; uncond] call per step, or two calls (default: the reference sampler's)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument("--scale", type=int, default=4, help="pixel upscale factor of the grid (default 4)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
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


def cmd_sample(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from .card import image_grid, save_png
    from .model_args import load_model_from_args
    from .samplers import default_sampler

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {out} must be a .png path")
    if not out.parent.exists():
        raise FileNotFoundError(f"output folder {out.parent} does not exist; create it first")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    _, model = load_model_from_args(args, args.device, seed=args.seed)
    mc = model.config
    labels, per_row = resolve_labels(args, mc.num_classes)
    overrides = {k: v for k, v in (("kind", args.sampler), ("num_steps", args.steps), ("cfg_scale", args.cfg_scale),
                                   ("cfg_mode", args.cfg_mode)) if v is not None}
    cfg = default_sampler(mc.objective, **overrides)
    from .samplers import sample
    y = torch.tensor(labels, dtype=torch.long)
    with tqdm(total=cfg.num_steps, desc=f"sample {mc.name}", unit="step", disable=args.no_progress) as bar:
        images = sample(model, cfg, y, seed=args.seed, on_step=lambda _s: bar.update(1))
    save_png(image_grid(images.cpu(), nrow=per_row, scale=args.scale), out)
    note = "" if mc.in_channels in (1, 3) else " (raw latents, first 3 channels as RGB; no VAE decoder)"
    print(f"wrote {len(labels)} samples to {out}{note}: {cfg.kind}, {cfg.num_steps} steps, CFG {cfg.cfg_scale:g} "
          f"({cfg.cfg_mode}), seed {args.seed}")
    return 0


# ----------------------------------------------------------------------------- training
def _register_train_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-demo", help="train the demo DiT-MoE on the scikit-learn digits (CPU, ~1 hour)",
                       description="Reproduce the shipped demo model from a seed: rectified flow on the 8x8 "
                                   "digits with a load-balancing loss; writes demo_model.safetensors and "
                                   "training_log.json. Afterwards run `moeca evaluate-demo` to rebuild its card.")
    p.add_argument("--out", help="output folder (default: the shipped data/demo folder)")
    p.add_argument("--steps", type=int, help="training steps (default: the shipped recipe, TrainConfig.steps)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0, the shipped model's)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--overwrite", action="store_true", help="replace existing weights in --out")
    p.set_defaults(func=cmd_train_demo)


def _default_dir(sub: str) -> Path:
    from .registry import data_dir
    return data_dir() / sub


def cmd_train_demo(args: argparse.Namespace) -> int:
    from .train_demo import TrainConfig, train_demo

    out = Path(args.out) if args.out else _default_dir("demo")
    steps = args.steps if args.steps is not None else TrainConfig().steps
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if (out / "demo_model.safetensors").exists() and not args.overwrite:
        raise FileExistsError(f"{out / 'demo_model.safetensors'} already exists; pass --overwrite to replace it "
                              "or --out DIR to train elsewhere")
    log = train_demo(out, TrainConfig(steps=steps, seed=args.seed, threads=args.threads))
    print(f"wrote {out / 'demo_model.safetensors'} and {out / 'training_log.json'} "
          f"({log['seconds'] / 60:.1f} min, final loss {log['loss_curve'][-1]['loss']:.4f})"
          if log.get("loss_curve") else f"wrote {out}")
    extra = "" if not args.out else f" --checkpoint {out / 'demo_model.safetensors'} --out {out}"
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
    from .evaluator import CLASSIFIER_WEIGHTS, ClassifierTrainConfig, train_classifier

    out = Path(args.out) if args.out else _default_dir("classifier")
    epochs = args.epochs if args.epochs is not None else ClassifierTrainConfig().epochs
    if epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    if (out / CLASSIFIER_WEIGHTS).exists() and not args.overwrite:
        raise FileExistsError(f"{out / CLASSIFIER_WEIGHTS} already exists; pass --overwrite to replace it or "
                              "--out DIR to train elsewhere")
    card = train_classifier(out, seed=args.seed, config=ClassifierTrainConfig(epochs=epochs), progress=True)
    print(f"wrote {out / CLASSIFIER_WEIGHTS}: held-out accuracy {card['test_accuracy']:.2%}, "
          f"FD floor {card['fd_floor_train_vs_test']:.2f}, {card['train_seconds']:.0f} s")
    return 0


# ----------------------------------------------------------------------------- evaluation
def _register_evaluate_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate-demo", help="evaluate the demo model and write its model card",
                       description="Sample N per class at CFG 3 and 1.5 (rectified flow, batched CFG), score "
                                   "them with the shipped classifier (class accuracy, Frechet distance vs the "
                                   "real-vs-real floor), measure expert load and router sharpness, and write "
                                   "MODEL_CARD.md, card.json and PNGs next to the weights.")
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
    from .card import CARD_MD, CardConfig, build_card

    config = CardConfig(samples_per_class=args.samples_per_class, steps=args.steps, seed=args.seed, chunk=args.chunk)
    card = build_card(args.checkpoint, args.out, args.training_log, config, device=args.device,
                      progress=not args.no_progress)
    for ev in card["evaluations"]:
        bar = "" if ev["bar"] is None else f" (bar {ev['bar']:.0%}: {'met' if ev['meets_bar'] else 'MISSED'})"
        print(f"CFG {ev['cfg_scale']:g}: class accuracy {ev['accuracy']:.1%}{bar}, FD {ev['fd']:.2f} "
              f"(real-vs-real floor {ev['fd_floor']:.2f})")
    rt = card["routing"]
    print(f"expert load min {rt['min_load']:.1%} / max {rt['max_load']:.1%}; mean top-1 weight "
          f"{rt['mean_top1']:.3f}, top-2 {rt['mean_top2']:.3f}")
    out = Path(args.out) if args.out else (Path(args.checkpoint).parent if args.checkpoint else _default_dir("demo"))
    print(f"wrote {out / CARD_MD}")
    return 0
