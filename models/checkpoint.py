"""Load and save DiT-MoE weights in the public layout (.pt or .safetensors), safely.

``.pt`` files are always read with ``weights_only=True``: a file that needs arbitrary unpickling is
refused. Nested ``ema`` (preferred) / ``model`` / ``state_dict`` dicts and ``module.`` / ``model.``
prefixes are unwrapped. Key matching is strict; mismatches are listed.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moeca.common.inputs import require_file
from moeca.common.outputs import atomic_file

from .config import DiTMoEConfig
from .dit_moe import DiTMoE

_PREFIXES = ("module.", "model.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the requested configuration."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or ``.pt``/``.pth``/``.bin`` without executing code."""
    path = require_file(path, "checkpoint", "give the weights file (.safetensors or .pt)")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path} is not a valid safetensors file: {exc}") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} needs unpickling of arbitrary Python objects, which moeca refuses for safety "
            f"({str(exc).splitlines()[0]}). Re-save it as a plain state dict "
            f"(torch.save(model.state_dict(), ...)) or convert it to .safetensors.") from exc
    except Exception as exc:
        raise CheckpointError(f"{path} could not be read as a PyTorch checkpoint: {exc}") from exc
    return unwrap_state_dict(obj, str(path))


def safetensors_config(path: str | os.PathLike) -> DiTMoEConfig:
    """The model config a moeca-written ``.safetensors`` carries in its metadata (``moeca_config``)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise CheckpointError(f"{path} is not a valid safetensors file ({exc}); it is truncated or damaged") from None
    if "moeca_config" not in meta:
        raise CheckpointError(f"{path} carries no moeca config in its metadata; name the preset with --model")
    try:
        return DiTMoEConfig.from_dict(json.loads(meta["moeca_config"]))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: metadata field moeca_config is not a valid model config ({exc}); name the "
                              "preset with --model") from None


def unwrap_state_dict(obj: object, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the tensors: ``ema`` before ``model`` before ``state_dict`` before a bare dict; strip prefixes."""
    if isinstance(obj, dict):
        for key in ("ema", "model", "state_dict", "module"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{where} holds no state dict (found {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{where} has no tensors at its top level or under 'ema'/'model'/'state_dict'")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def load_checkpoint(path: str | os.PathLike, config: DiTMoEConfig, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> DiTMoE:
    """Build ``DiTMoE(config)`` and load ``path`` with strict key and shape matching."""
    state = read_state_dict(path)
    model = DiTMoE(config)
    load_state_dict_strict(model, state, str(path))
    return model.to(device=device, dtype=dtype).eval()


def load_state_dict_strict(model: DiTMoE, state: dict[str, torch.Tensor], where: str = "checkpoint") -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]

    def _fmt(items: list[str]) -> str:
        return ", ".join(items[:12]) + (f" ... (+{len(items) - 12} more)" if len(items) > 12 else "")
    common = sorted(set(state) & set(expected))
    not_float = [f"{k} ({str(state[k].dtype).replace('torch.', '')})" for k in common
                 if expected[k].is_floating_point() and not state[k].is_floating_point()]
    if not_float:
        raise CheckpointError(f"{where}: {len(not_float)} tensors are not floating point: {_fmt(not_float)}. Weights "
                              "of a DiT-MoE are floating point; an integer (e.g. quantised) checkpoint would load "
                              "silently and sample noise. Convert it to float16/bfloat16/float32 first")
    not_finite = [k for k in common if state[k].shape == expected[k].shape and not torch.isfinite(state[k]).all()]
    if not_finite:
        raise CheckpointError(f"{where}: {len(not_finite)} tensors hold NaN or Inf values: {_fmt(not_finite)}. The "
                              "checkpoint is damaged or diverged; use another one")
    if missing or unexpected or wrong_shape:
        parts = [f"{where} does not match config {model.config.name!r}:"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
        if wrong_shape:
            parts.append(f"wrong shapes ({len(wrong_shape)}): {_fmt(wrong_shape)}")
        parts.append("Pick the preset that matches the checkpoint (e.g. --model S/2-8E2A) or fix the config.")
        raise CheckpointError("\n  ".join(parts))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def save_safetensors(model: DiTMoE, path: str | os.PathLike, dtype: torch.dtype | None = None,
                     metadata: dict[str, str] | None = None) -> None:
    """Write the state dict atomically (temporary name, then rename). The config goes into metadata."""
    path = Path(path)
    state = {k: (v.to(dtype) if dtype is not None else v).detach().contiguous().cpu()
             for k, v in model.state_dict().items()}
    meta = {"moeca_config": json.dumps(model.config.to_dict()), **(metadata or {})}
    with atomic_file(path, "checkpoint") as tmp:
        save_file(state, str(tmp), metadata=meta)


def weights_hash(model: torch.nn.Module) -> str:
    """16-hex-digit SHA-256 over the parameters (names, shapes, float32 bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
