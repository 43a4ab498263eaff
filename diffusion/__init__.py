"""moeca.diffusion: sampling and training objectives of the DiT-MoE models (the model is in moeca.models).

Public API (imported lazily, so ``import moeca.diffusion`` stays cheap):

- ``SamplerConfig``, ``default_sampler(objective, **overrides)``,
  ``sample(model, cfg, labels [B], seed) -> [B, C, H, W]``, ``initial_noise``, ``model_share``
  (:mod:`.samplers`: DDPM with respacing and learned-range variance, DDIM, rectified-flow Euler; CFG);
- ``objective_for`` (:mod:`.losses`: the training loss of each objective);
- ``train_demo`` (:mod:`.train_demo`: train a shipped digits model).
"""
from __future__ import annotations

from moeca.common.lazy import lazy_exports

_EXPORTS = {
    "SamplerConfig": "samplers", "default_sampler": "samplers", "sample": "samplers", "initial_noise": "samplers",
    "model_share": "samplers", "objective_for": "losses", "train_demo": "train_demo",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
