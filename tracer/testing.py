"""Tiny random DiT-MoE models for tests and examples of the tracer (mechanics, not behaviour)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..models.checkpoint import save_safetensors
from ..models.config import DiTMoEConfig
from ..models.dit_moe import DiTMoE
from ..models.registry import randomize_zero_init

TINY = DiTMoEConfig(name="tiny", input_size=4, patch_size=1, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                    num_experts=4, top_k=2, num_classes=3, learn_sigma=False, objective="rectified_flow")
"""16 tokens, D=32, 2 blocks, 4 experts top-2 plus a shared expert, 3 classes, rectified flow."""


def tiny_model(seed: int = 0, config: DiTMoEConfig = TINY) -> DiTMoE:
    """A random eval-mode model whose adaLN-Zero layers are randomised too, so every seam matters."""
    torch.manual_seed(seed)
    model = DiTMoE(config)
    randomize_zero_init(model, seed)
    return model.eval()


def tiny_checkpoint(path: str | Path, seed: int = 0, config: DiTMoEConfig = TINY) -> Path:
    """Save :func:`tiny_model` as a self-describing moeca ``.safetensors`` (``--checkpoint PATH``)."""
    path = Path(path)
    save_safetensors(tiny_model(seed, config), path)
    return path
