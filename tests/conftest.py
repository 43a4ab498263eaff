"""Shared fixtures: tiny random models for mechanics (the one home of the tiny model)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from moeca.models.checkpoint import save_safetensors
from moeca.models.config import DiTMoEConfig
from moeca.models.dit_moe import DiTMoE
from moeca.models.registry import randomize_zero_init

TINY = DiTMoEConfig(name="tiny", input_size=4, patch_size=1, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                    num_experts=4, top_k=2, num_classes=3, learn_sigma=False, objective="rectified_flow")
"""16 tokens, D=32, 2 blocks, 4 experts top-2 plus a shared expert, 3 classes, rectified flow."""


def make_tiny(config: DiTMoEConfig = TINY, seed: int = 0) -> DiTMoE:
    """A random eval-mode model whose adaLN-Zero layers are randomised too, so every seam matters."""
    torch.manual_seed(seed)
    model = DiTMoE(config)
    randomize_zero_init(model, seed)
    return model.eval()


def tiny_checkpoint(path: str | Path, seed: int = 0, config: DiTMoEConfig = TINY) -> Path:
    """Save :func:`make_tiny` as a self-describing moeca ``.safetensors`` (``--checkpoint PATH``)."""
    path = Path(path)
    save_safetensors(make_tiny(config, seed), path)
    return path


@pytest.fixture
def tiny_model() -> DiTMoE:
    return make_tiny()


@pytest.fixture(autouse=True)
def _calibration_cache(tmp_path_factory, monkeypatch):
    """Wall-clock calibrations made by tests (``moeca run``, ``--target-speedup``) go to one temporary
    folder per session, never to the user's cache."""
    monkeypatch.setenv("MOECA_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "moeca-cache"))


def run_torchrun(module: str, args: list[str], env: dict, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node nproc -m module *args --backend gloo`` (CPU ranks), captured."""
    cmd = ["torchrun", "--standalone", "--nproc-per-node", str(nproc), "-m", module, *args, "--backend", "gloo"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
