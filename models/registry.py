"""Resolve a model by name: the shipped demo model, a preset with a checkpoint, or random weights."""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_checkpoint, read_state_dict, load_state_dict_strict
from .config import DiTMoEConfig, get_preset, PRESETS
from .dit_moe import DiTMoE

DEMO_WEIGHTS_NAME = "demo_model.safetensors"


def data_dir() -> Path:
    """The shipped data folder (``moeca.data``)."""
    return Path(str(resources.files("moeca.data")))


def demo_weights_path() -> Path:
    return data_dir() / "demo" / DEMO_WEIGHTS_NAME


def pick_device(name: str | None = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was requested but CUDA is not available; use --device cpu")
    return device


def load_model(name: str | None = "demo", checkpoint: str | Path | None = None, *, random_init: bool = False,
               seed: int = 0, device: str | torch.device | None = "auto",
               dtype: torch.dtype = torch.float32) -> DiTMoE:
    """Return an eval-mode model.

    - ``name="demo"``: the shipped trained demo model (config read from the weights' metadata);
    - ``name=PRESET, checkpoint=PATH``: a public checkpoint loaded strictly into that preset;
    - ``name=PRESET, random_init=True``: random weights from ``seed`` (shape benchmarks, tests).
    """
    device = pick_device(device) if not isinstance(device, torch.device) else device
    if name == "demo" and checkpoint is None:
        path = demo_weights_path()
        if not path.is_file():
            raise FileNotFoundError(f"the demo model weights are missing at {path}; run `moeca train-demo` to "
                                    "rebuild them")
        return load_demo_like(path, device, dtype)
    if name is None and checkpoint is not None:
        return load_demo_like(Path(checkpoint), device, dtype)
    config = get_preset(name or "demo")
    if checkpoint is not None:
        return load_checkpoint(checkpoint, config, device=device, dtype=dtype)
    if not random_init:
        raise ValueError(f"model {name!r} has no shipped weights: pass --checkpoint PATH to load a public "
                         f"checkpoint, or --random-init for random weights (shape and speed studies). "
                         f"Presets: {', '.join(PRESETS)}")
    torch.manual_seed(seed)
    model = DiTMoE(config)
    randomize_zero_init(model, seed)
    return model.to(device=device, dtype=dtype).eval()


def load_demo_like(path: Path, device: torch.device, dtype: torch.dtype) -> DiTMoE:
    """Load a safetensors file written by moeca (its config lives in the metadata)."""
    from safetensors import safe_open
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: without --model PRESET only moeca-written .safetensors files are "
                              "self-describing; name the preset with --model")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "moeca_config" not in meta:
        raise CheckpointError(f"{path} carries no moeca config in its metadata; name the preset with --model")
    config = DiTMoEConfig.from_dict(json.loads(meta["moeca_config"]))
    model = DiTMoE(config)
    load_state_dict_strict(model, read_state_dict(path), str(path))
    return model.to(device=device, dtype=dtype).eval()


def randomize_zero_init(model: DiTMoE, seed: int) -> None:
    """adaLN-Zero starts with zero gates and a zero output layer, which makes a random model an identity.
    For shape and caching studies give those layers small random values so every seam matters."""
    gen = torch.Generator().manual_seed(seed + 12345)
    with torch.no_grad():
        for block in model.blocks:
            w = block.adaLN_modulation[-1].weight
            w.copy_(torch.randn(w.shape, generator=gen) * 0.02)
        for p in (model.final_layer.adaLN_modulation[-1].weight, model.final_layer.linear.weight):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
