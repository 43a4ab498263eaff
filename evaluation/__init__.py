"""moeca.evaluation: how samples are judged -- fidelity metrics, the digits classifier, model cards, grids.

Public API (imported lazily, so ``import moeca.evaluation`` stays cheap):

- ``psnr``, ``ssim``, ``relative_l2``, ``frechet_distance`` (:mod:`.metrics`);
- ``DigitsClassifier``, ``evaluate_samples`` (:mod:`.evaluator`: the demo models' quality measure);
- ``label_grid(images, labels, columns)`` (:mod:`.grid`);
- ``build_card`` (:mod:`.card`: the card of a shipped model).
"""
from __future__ import annotations

from moeca.common.lazy import lazy_exports

_EXPORTS = {
    "psnr": "metrics", "ssim": "metrics", "relative_l2": "metrics", "frechet_distance": "metrics",
    "DigitsClassifier": "evaluator", "evaluate_samples": "evaluator", "label_grid": "grid", "build_card": "card",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
