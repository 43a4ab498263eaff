"""The model-choosing command-line options shared by ``sample``, ``trace`` and ``replay``."""
from __future__ import annotations

import argparse

from moeca.common.inputs import require_file

SHIPPED_MODEL_NAMES = ("demo", "demo-ddpm")
"""The shipped digits models (``moeca.models.registry.SHIPPED_MODELS`` holds their specs; this module stays
torch-free so building the CLI is cheap)."""


def add_model_arguments(parser, *, model_seed: bool = True) -> None:
    """Add ``--model``, ``--checkpoint``, ``--random-init`` (and ``--model-seed``) to a parser or group."""
    parser.add_argument("--model", default=None,
                        help="a shipped model: 'demo' (rectified flow, default) or 'demo-ddpm' (DDPM, learned "
                             "variance); or a preset name (S/2-8E2A, ...) with --checkpoint or --random-init")
    parser.add_argument("--checkpoint", default=None,
                        help="weights file (.pt/.safetensors) to load into --model; without --model it must be a "
                             "moeca-written .safetensors")
    parser.add_argument("--random-init", action="store_true", help="random weights for a preset (shape/speed studies)")
    if model_seed:
        parser.add_argument("--model-seed", type=int, default=0, help="seed of --random-init weights (default 0)")


def load_model_from_args(args: argparse.Namespace, device, seed: int | None = None):
    """Resolve the options of :func:`add_model_arguments` into an eval-mode model on ``device``.

    ``seed`` seeds ``--random-init`` weights (default ``args.model_seed``). Returns ``(name, model)``.
    """
    # deferred: loads torch, and this module is imported at `moeca` start-up
    from .registry import load_model

    if args.checkpoint:
        require_file(args.checkpoint, "--checkpoint", "give the weights file (.safetensors or .pt)")
    if args.random_init and args.checkpoint:
        raise ValueError("--random-init and --checkpoint exclude each other; pick one")
    name = args.model if args.model is not None else (None if args.checkpoint else "demo")
    seed = args.model_seed if seed is None else seed
    return name, load_model(name, args.checkpoint, random_init=args.random_init, seed=seed, device=device)
