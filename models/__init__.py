"""moeca.models: the DiT-MoE model, its runtime seams, samplers, checkpoints, metrics and sample grids.

Public API (imported lazily, so ``import moeca.models`` stays cheap; ``torch`` loads on first use):

- model: ``DiTMoE`` (:mod:`.dit_moe`), ``DiTMoEConfig``, ``PRESETS``, ``get_preset`` (:mod:`.config`);
- loading: ``load_model(name="demo" | "demo-ddpm" | preset, checkpoint=None, random_init=False, device="auto")``,
  ``pick_device`` (:mod:`.registry`); ``load_checkpoint(path, config)``, ``save_safetensors``,
  ``weights_hash``, ``CheckpointError`` (:mod:`.checkpoint`);
- sampling: ``SamplerConfig``, ``default_sampler(objective, **overrides)``,
  ``sample(model, cfg, labels [B], seed) -> [B, C, H, W]``, ``initial_noise`` (:mod:`.samplers`);
- runtime seams: ``Runtime``, ``ForwardContext`` (:mod:`.runtime`); ``model.use_runtime(rt)`` installs one;
- measures: ``psnr``, ``ssim``, ``relative_l2``, ``frechet_distance`` (:mod:`.metrics`);
  ``DigitsClassifier``, ``evaluate_samples`` (:mod:`.evaluator`, the demo model's quality measure);
- pictures: ``label_grid(images, labels, columns)`` (:mod:`.grid`).
"""
from __future__ import annotations

from moeca.common.lazy import lazy_exports

_EXPORTS = {
    "DiTMoE": "dit_moe",
    "DiTMoEConfig": "config", "PRESETS": "config", "get_preset": "config",
    "load_model": "registry", "pick_device": "registry",
    "load_checkpoint": "checkpoint", "save_safetensors": "checkpoint", "weights_hash": "checkpoint",
    "CheckpointError": "checkpoint",
    "SamplerConfig": "samplers", "default_sampler": "samplers", "sample": "samplers", "initial_noise": "samplers",
    "Runtime": "runtime", "ForwardContext": "runtime",
    "psnr": "metrics", "ssim": "metrics", "relative_l2": "metrics", "frechet_distance": "metrics",
    "DigitsClassifier": "evaluator", "evaluate_samples": "evaluator",
    "label_grid": "grid",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
