"""moeca.models: the DiT-MoE model, its runtime seams, checkpoints and expert dispatch.

Public API (imported lazily, so ``import moeca.models`` stays cheap; ``torch`` loads on first use):

- model: ``DiTMoE`` (:mod:`.dit_moe`), ``DiTMoEConfig``, ``PRESETS``, ``get_preset`` (:mod:`.config`);
- loading: ``load_model(name="demo" | "demo-ddpm" | preset, checkpoint=None, random_init=False, device="auto")``,
  ``pick_device`` (:mod:`.registry`); ``load_checkpoint(path, config)``, ``save_safetensors``,
  ``weights_hash``, ``CheckpointError`` (:mod:`.checkpoint`);
- runtime seams: ``Runtime``, ``ForwardContext`` (:mod:`.runtime`); ``model.use_runtime(rt)`` installs one.

Sampling lives in :mod:`moeca.diffusion`, measures and pictures in :mod:`moeca.evaluation`; their names
imported from here still work, with a ``DeprecationWarning``.
"""
from __future__ import annotations

from moeca.common.lazy import lazy_exports

_EXPORTS = {
    "DiTMoE": "dit_moe",
    "DiTMoEConfig": "config", "PRESETS": "config", "get_preset": "config",
    "load_model": "registry", "pick_device": "registry",
    "load_checkpoint": "checkpoint", "save_safetensors": "checkpoint", "weights_hash": "checkpoint",
    "CheckpointError": "checkpoint",
    "Runtime": "runtime", "ForwardContext": "runtime",
}
_MOVED = {
    **dict.fromkeys(("SamplerConfig", "default_sampler", "sample", "initial_noise"), "moeca.diffusion"),
    **dict.fromkeys(("psnr", "ssim", "relative_l2", "frechet_distance", "DigitsClassifier", "evaluate_samples",
                     "label_grid"), "moeca.evaluation"),
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals(), moved=_MOVED)
