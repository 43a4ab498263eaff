"""Sampling a HiDream transformer without its pipeline: named configs, text conditioning, flow-matching Euler.

The sampler is the one the HiDream pipeline uses (``FlowMatchEulerDiscreteScheduler``): sigmas evenly
spaced from 1 to ``1/num_steps``, shifted by ``shift`` (``s' = shift*s / (1 + (shift-1)*s)``; HiDream-I1-Full
ships ``shift=3.0``), timestep ``1000 * sigma``, the model's output negated into a velocity, an Euler
step ``x += (sigma_next - sigma) * v`` to ``sigma = 0``. CFG is batched as in the pipeline: one call on
``cat([latents] * 2)`` with the conditional rows first (moeca's trace convention: ``cfg_branch`` 0),
guidance ``v_u + scale * (v_c - v_u)``. Text conditioning comes from a saved embedding file (the
tensors the pipeline's ``encode_prompt`` returns) or is random for a random-weight config, so no text
encoder is needed.

Shapes: ``B`` samples, latents ``[B, C, H, W]``, T5 embeddings ``[B, L5, C5]``, Llama embeddings
``[layers, B, Ll, Cl]``, pooled ``[B, Cp]``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from .compat import require_diffusers

CONFIGS: dict[str, dict] = {
    # diffusers' own test config (tests/models/transformers/test_models_transformer_hidream.py)
    "tiny": dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                 num_attention_heads=4, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=2,
                 num_activated_experts=2, axes_dims_rope=[4, 2, 2], max_resolution=[32, 32], llama_layers=[0, 1],
                 force_inference_output=True),
    # the same width with HiDream's 4 experts top-2 and two blocks of each kind: routing that changes
    "tiny-4e": dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, num_single_layers=2,
                    attention_head_dim=8, num_attention_heads=4, caption_channels=[8, 4], text_emb_dim=8,
                    num_routed_experts=4, num_activated_experts=2, axes_dims_rope=[4, 2, 2], max_resolution=[32, 32],
                    llama_layers=[0, 1, 2, 3], force_inference_output=True),
    # HiDream-I1's structure scaled to 2 CPU cores (``moeca bench diffusers``): 1:2 double:single, 4 experts top-2
    "bench": dict(patch_size=2, in_channels=16, out_channels=16, num_layers=4, num_single_layers=8,
                  attention_head_dim=64, num_attention_heads=3, caption_channels=[64, 64], text_emb_dim=64,
                  num_routed_experts=4, num_activated_experts=2, axes_dims_rope=[32, 16, 16],
                  max_resolution=[128, 128], llama_layers=list(range(12)), force_inference_output=True),
    # HiDream-I1 (Full/Dev/Fast share the transformer shape): 17B parameters, for a GPU with random weights
    "hidream-i1": dict(patch_size=2, in_channels=16, out_channels=16, num_layers=16, num_single_layers=32,
                       attention_head_dim=128, num_attention_heads=20, caption_channels=[4096, 4096],
                       text_emb_dim=2048, num_routed_experts=4, num_activated_experts=2, axes_dims_rope=[64, 32, 32],
                       max_resolution=[128, 128], llama_layers=list(range(32)) + [31] * 16),
}
"""Named transformer configs for random weights (``--diffusers-config NAME``)."""
TEXT_LENGTHS = {"tiny": (8, 8), "tiny-4e": (8, 8), "bench": (16, 16), "hidream-i1": (128, 128)}
"""(T5 tokens, Llama tokens) of random text conditioning per named config."""
EMBEDDING_KEYS = ("prompt_embeds_t5", "prompt_embeds_llama3", "pooled_prompt_embeds")
"""Keys of an embedding file; ``negative_*`` of each for the unconditional rows (zeros when absent)."""


def build_transformer(name: str, *, seed: int = 0, device: "torch.device | str" = "cpu",
                      dtype: torch.dtype = torch.float32):
    """A ``HiDreamImageTransformer2DModel`` of the named config with random weights (seeded), in eval mode."""
    if name not in CONFIGS:
        raise ValueError(f"--diffusers-config {name!r} is unknown; choose one of {', '.join(CONFIGS)}")
    require_diffusers()
    from diffusers import HiDreamImageTransformer2DModel  # local: the optional extra
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)          # build in the target dtype: no float32 copy of 17B parameters
    try:
        with torch.device(device):
            model = HiDreamImageTransformer2DModel(**CONFIGS[name])
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def load_transformer(path: "str | os.PathLike", *, device: "torch.device | str" = "cpu",
                     dtype: torch.dtype = torch.float32):
    """A transformer from a local ``from_pretrained`` folder: the transformer alone (``config.json`` at the
    top) or a pipeline folder (its ``transformer/`` subfolder). No hub access."""
    require_diffusers()
    from diffusers import HiDreamImageTransformer2DModel  # local: the optional extra
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"--diffusers {root} does not exist or is not a folder; give a local "
                                "from_pretrained folder (the transformer's, or a pipeline's with transformer/)")
    folder = root / "transformer" if (root / "transformer" / "config.json").is_file() else root
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--diffusers {root}: no config.json there nor in {root / 'transformer'}; give the "
                                "folder save_pretrained wrote")
    model = HiDreamImageTransformer2DModel.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
    return model.to(device).eval().requires_grad_(False)


@dataclass(frozen=True)
class TextConditioning:
    """Text embeddings of ``B`` prompts: ``t5 [B, L5, C5]``, ``llama [layers, B, Ll, Cl]``, ``pooled [B, Cp]``."""

    t5: torch.Tensor
    llama: torch.Tensor
    pooled: torch.Tensor

    @property
    def batch(self) -> int:
        return self.t5.shape[0]

    @property
    def tokens(self) -> int:
        """Text tokens a single-stream block adds to the image tokens: T5 + two Llama layers."""
        return self.t5.shape[1] + 2 * self.llama.shape[2]

    def select(self, rows: list[int]) -> "TextConditioning":
        idx = torch.as_tensor(rows, dtype=torch.long)
        return TextConditioning(self.t5[idx], self.llama[:, idx], self.pooled[idx])

    def to(self, device, dtype) -> "TextConditioning":
        return TextConditioning(*(t.to(device=device, dtype=dtype) for t in (self.t5, self.llama, self.pooled)))

    @staticmethod
    def cat(first: "TextConditioning", second: "TextConditioning") -> "TextConditioning":
        return TextConditioning(torch.cat([first.t5, second.t5]), torch.cat([first.llama, second.llama], dim=1),
                                torch.cat([first.pooled, second.pooled]))


def random_conditioning(config: dict, prompts: int, *, seed: int, lengths: tuple[int, int]) -> tuple[TextConditioning, TextConditioning]:
    """Random (conditional, unconditional) embeddings of ``prompts`` prompts for a random-weight config."""
    g = torch.Generator().manual_seed(seed)
    c5, cl = config["caption_channels"]
    layers = max(config["llama_layers"]) + 1

    def one() -> TextConditioning:
        return TextConditioning(torch.randn(prompts, lengths[0], c5, generator=g),
                                torch.randn(layers, prompts, lengths[1], cl, generator=g),
                                torch.randn(prompts, config["text_emb_dim"], generator=g))
    return one(), one()


def load_conditioning(path: "str | os.PathLike") -> tuple[TextConditioning, TextConditioning]:
    """(conditional, unconditional) embeddings from a ``.safetensors`` or ``.pt`` file with the keys of
    :data:`EMBEDDING_KEYS` (as the pipeline's ``encode_prompt`` returns them) and optionally their
    ``negative_`` versions (else zeros, an empty negative prompt's stand-in)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--embeddings {p} does not exist; save the tensors of pipe.encode_prompt(...) there")
    if p.suffix == ".safetensors":
        data = load_file(str(p))
    else:
        data = torch.load(p, map_location="cpu", weights_only=True)
    missing = [k for k in EMBEDDING_KEYS if k not in data]
    if missing:
        raise ValueError(f"--embeddings {p}: missing keys {missing}; expected {', '.join(EMBEDDING_KEYS)} and "
                         "optionally negative_<key>")
    cond = TextConditioning(*(data[k] for k in EMBEDDING_KEYS))
    uncond = TextConditioning(*(data.get(f"negative_{k}", torch.zeros_like(data[k])) for k in EMBEDDING_KEYS))
    return cond, uncond


@dataclass(frozen=True)
class FlowSampler:
    """Flow-matching Euler as HiDream's pipeline runs it: ``num_steps``, ``cfg_scale`` (<= 1: no guidance,
    one row per sample), ``shift`` of the sigma schedule."""

    num_steps: int = 50
    cfg_scale: float = 5.0
    shift: float = 3.0

    @property
    def guided(self) -> bool:
        return self.cfg_scale > 1.0

    def sigmas(self) -> list[float]:
        """``num_steps + 1`` sigmas from the shifted 1 down to 0."""
        S = self.num_steps
        base = [1.0 - i * (1.0 - 1.0 / S) / (S - 1) if S > 1 else 1.0 for i in range(S)]
        return [self.shift * s / (1.0 + (self.shift - 1.0) * s) for s in base] + [0.0]

    def timesteps(self) -> list[float]:
        """Model time per step (``1000 * sigma``), the ``t`` of traces."""
        return [1000.0 * s for s in self.sigmas()[:-1]]

    def with_steps(self, num_steps: int) -> "FlowSampler":
        return replace(self, num_steps=num_steps)


def sample(transformer, sampler: FlowSampler, noise: torch.Tensor, cond: TextConditioning,
           uncond: TextConditioning, *, on_step: Callable[[int], None] | None = None,
           before_forward: Callable[[int], None] | None = None) -> torch.Tensor:
    """Latents ``noise [B, C, H, W]`` -> sampled latents ``[B, C, H, W]``. ``before_forward(step)`` runs
    before each model call, ``on_step(step)`` after each Euler step."""
    p = next(transformer.parameters())
    text = (TextConditioning.cat(cond, uncond) if sampler.guided else cond).to(p.device, p.dtype)
    x = noise.to(device=p.device, dtype=torch.float32)
    sigmas = sampler.sigmas()
    with torch.no_grad():
        for i in range(sampler.num_steps):
            x_in = torch.cat([x, x]) if sampler.guided else x
            t = torch.full((x_in.shape[0],), 1000.0 * sigmas[i], device=p.device, dtype=p.dtype)
            if before_forward is not None:
                before_forward(i)
            out = transformer(hidden_states=x_in.to(p.dtype), timesteps=t, encoder_hidden_states_t5=text.t5,
                              encoder_hidden_states_llama3=text.llama, pooled_embeds=text.pooled,
                              return_dict=False)[0]
            v = -out.float()
            if sampler.guided:
                v_c, v_u = v.chunk(2)
                v = v_u + sampler.cfg_scale * (v_c - v_u)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
            if on_step is not None:
                on_step(i)
    return x


def initial_noise(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """One latent per seed (float32, CPU generator): ``[len(seeds), *shape]``."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
