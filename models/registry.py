"""Resolve a model by name: a shipped model (``demo``, ``demo-ddpm``), a preset with a checkpoint, or
random weights."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from moeca.common.inputs import require_file

from .checkpoint import (CheckpointError, load_checkpoint, load_state_dict_strict, read_state_dict, safetensors_config,
                         weights_hash)
from .config import PRESETS, DiTMoEConfig, get_preset
from .dit_moe import DiTMoE


@dataclass(frozen=True)
class ShippedModel:
    """A model the project trains and ships under ``data/<folder>/``.

    config: the architecture and objective it is trained with (the weights' metadata carries it too);
    bench_steps: the sampling steps the benchmarks use for it (its reference sampler may use more).
    """

    name: str
    folder: str
    weights: str
    config: DiTMoEConfig
    bench_steps: int
    summary: str

    @property
    def weights_path(self) -> Path:
        return data_dir() / self.folder / self.weights


_DEMO = get_preset("demo")
SHIPPED_MODELS: dict[str, ShippedModel] = {
    "demo": ShippedModel("demo", "demo", "demo_model.safetensors", _DEMO, 50,
                         "rectified flow (velocity), Euler sampler"),
    # Same architecture, the public S/B recipe: epsilon prediction + learned-range variance, DDPM sampler.
    "demo-ddpm": ShippedModel("demo-ddpm", "demo_ddpm", "demo_ddpm_model.safetensors",
                              dataclasses.replace(_DEMO, name="demo-ddpm", learn_sigma=True, objective="ddpm_eps"),
                              50, "DDPM epsilon prediction with learned-range variance, respaced DDPM sampler"),
}


def data_dir() -> Path:
    """The shipped data folder (``moeca.data``)."""
    return Path(str(resources.files("moeca.data")))


def demo_weights_path() -> Path:
    return SHIPPED_MODELS["demo"].weights_path


def shipped_model(name: str) -> ShippedModel:
    """The shipped model called ``name``; an unknown name lists the shipped ones."""
    try:
        return SHIPPED_MODELS[name]
    except KeyError:
        raise ValueError(f"no shipped model {name!r}; shipped models: {', '.join(SHIPPED_MODELS)}") from None


def model_config(name: str) -> DiTMoEConfig:
    """The architecture of a shipped model or a preset, by name."""
    if name in SHIPPED_MODELS:
        return SHIPPED_MODELS[name].config
    if name not in PRESETS:
        presets = ", ".join(p for p in PRESETS if p not in SHIPPED_MODELS)
        raise ValueError(f"unknown model preset {name!r}; choose a shipped model ({', '.join(SHIPPED_MODELS)}) "
                         f"or a preset ({presets})")
    return get_preset(name)


def pick_device(name: str | None = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was requested but CUDA is not available; use --device cpu")
    return device


def load_model(name: str | None = "demo", checkpoint: str | Path | None = None, *, random_init: bool = False,
               seed: int = 0, device: str | torch.device | None = "auto",
               dtype: torch.dtype = torch.float32) -> DiTMoE:
    """Return an eval-mode model.

    - ``name="demo"`` / ``"demo-ddpm"``: a shipped trained model (config read from the weights' metadata);
    - ``checkpoint=PATH`` of a moeca-written ``.safetensors`` (its config in the metadata): that config,
      whatever ``name`` says, unless ``name`` is a shipped model or preset of another architecture (refused:
      :func:`self_describing_config` is the one rule, so a custom model loads the same way from every command);
    - ``name=PRESET`` or a shipped name, ``checkpoint=PATH`` of any other file: weights loaded strictly into
      that architecture;
    - ``name=PRESET`` or a shipped name, ``random_init=True``: random weights from ``seed`` (shape
      benchmarks, tests).
    """
    device = pick_device(device) if not isinstance(device, torch.device) else device
    if name in SHIPPED_MODELS and checkpoint is None and not random_init:
        shipped = SHIPPED_MODELS[name]
        path = shipped.weights_path
        if not path.is_file():
            flag = "" if name == "demo" else f" --model {name}"
            raise FileNotFoundError(f"the {name} model weights are missing at {path}; run `moeca train-demo{flag}` "
                                    "to rebuild them")
        model = load_demo_like(path, device, dtype)
        if model.config.fingerprint() != shipped.config.fingerprint():
            raise CheckpointError(f"{path} does not hold the {name!r} architecture ({shipped.summary}); "
                                  f"rebuild it with `moeca train-demo --model {name}`")
        return model
    if checkpoint is not None:
        own = self_describing_config(checkpoint, name)
        if own is not None or name is None:
            return load_demo_like(Path(checkpoint), device, dtype)
    config = model_config(name or "demo")
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


def load_traced_model(meta: dict, checkpoint: str | Path | None = None,
                      device: str | torch.device | None = "auto") -> DiTMoE:
    """The model a trace or schedule was made with, from its run.json ``meta`` (field ``model``: name,
    checkpoint, config, weights_hash): ``checkpoint`` (else the recorded one) loaded by :func:`load_model`'s
    rule (a moeca-written checkpoint describes itself, whatever the recorded name), then checked against the
    recorded weights hash. Used by ``schedule derive --target-speedup`` and the benches that re-derive."""
    model_meta = meta.get("model") or {}
    name, checkpoint = model_meta.get("name"), checkpoint or model_meta.get("checkpoint")
    if checkpoint is None and name not in SHIPPED_MODELS:
        raise ValueError(f"the trace's model {name!r} is neither shipped nor loadable without its weights and its "
                         "run.json field model.checkpoint is empty; pass --checkpoint PATH (the weights it was "
                         "traced with)")
    model = load_model(name if checkpoint is None else (name if name in SHIPPED_MODELS or name in PRESETS else None),
                       checkpoint, device=device)
    traced = model_meta.get("weights_hash")
    if traced and weights_hash(model) != traced:
        raise ValueError(f"checkpoint {checkpoint or name}: the loaded weights hash to {weights_hash(model)} but the "
                         f"trace was made with weights {traced} (run.json field model.weights_hash); pass the traced "
                         "model's checkpoint with --checkpoint")
    return model


def self_describing_config(checkpoint: str | Path, name: str | None = None) -> DiTMoEConfig | None:
    """The config a moeca-written ``.safetensors`` carries in its metadata, or None for any other file.

    ``name`` (``--model``, or the model name a trace or schedule recorded) must not contradict it: a name
    that is a shipped model or preset of another architecture is refused; any other name (the custom
    model's own, or one a user picked when tracing) is only a label.
    """
    path = require_file(checkpoint, "checkpoint", "give the weights file (.safetensors or .pt)")
    if path.suffix != ".safetensors":
        return None
    try:
        config = safetensors_config(path)
    except CheckpointError:
        if name is None:
            raise
        return None                  # not moeca's (or damaged): strict loading into ``name`` says what is wrong
    known = SHIPPED_MODELS[name].config if name in SHIPPED_MODELS else PRESETS.get(name) if name else None
    if known is not None and known.fingerprint() != config.fingerprint():
        raise CheckpointError(f"{path} holds a {config.name!r} model (its metadata field moeca_config: depth "
                              f"{config.depth}, hidden size {config.hidden_size}, {config.num_experts} experts) but "
                              f"--model {name} names another architecture; drop --model (the file describes "
                              f"itself) or give the checkpoint of a {name} model")
    return config


def load_demo_like(path: Path, device: torch.device, dtype: torch.dtype) -> DiTMoE:
    """Load a safetensors file written by moeca (its config lives in the metadata)."""
    require_file(path, "checkpoint", "give the weights file (.safetensors)")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: without --model PRESET only moeca-written .safetensors files are "
                              "self-describing; name the preset with --model")
    model = DiTMoE(safetensors_config(path))
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
