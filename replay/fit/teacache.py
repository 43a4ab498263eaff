"""TeaCache's rescaling polynomial, fitted on full-compute runs of the model (engine-side work).

The policy unit :mod:`moeca.policy.methods.teacache` takes the coefficients as a knob; this module runs
the model to find them: per CFG context and pair of consecutive calls, block 0's modulated-input relative
L1 change ``d_in`` and the model output's relative L1 change ``d_out`` (predicted channels only), then a
least-squares polynomial ``d_out ~ f(d_in)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from moeca.diffusion.samplers import sample
from moeca.models.runtime import ForwardContext, Runtime

if TYPE_CHECKING:  # pragma: no cover
    from moeca.diffusion.samplers import SamplerConfig
    from moeca.models.dit_moe import DiTMoE

DEFAULT_DEGREE = 4
"""Degree of the rescaling polynomial; the published TeaCache coefficients are quartics."""


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """``mean|current - previous| / mean|previous|`` over all elements (one host sync)."""
    denom = previous.abs().mean().clamp_min(1e-12)
    return float(((current - previous).abs().mean() / denom).item())


# ----------------------------------------------------------------------------- calibration fit
class _ChangeRecorder(Runtime):
    """Computes everything; per CFG context records ``(d_input, d_output)`` between consecutive calls.

    ``d_output`` is measured on the predicted channels only (see :func:`predicted_output`)."""

    def __init__(self) -> None:
        self.pairs: list[tuple[float, float]] = []
        self._prev: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._ctx: ForwardContext | None = None

    def reset(self) -> None:
        self._prev.clear()

    def begin_forward(self, model, ctx, x_tokens) -> None:
        self._ctx = ctx

    def run_blocks(self, model, x, c):
        mod = model.blocks[0].attention_input(x, c)
        out = super().run_blocks(model, x, c)
        model_out = predicted_output(model, model.final_layer(out, c))
        key = self._ctx.cfg_branch if self._ctx is not None else "none"
        prev = self._prev.get(key)
        if prev is not None and prev[0].shape == mod.shape:
            self.pairs.append((relative_l1(mod, prev[0]), relative_l1(model_out, prev[1])))
        self._prev[key] = (mod.detach(), model_out.detach())
        return out


def predicted_output(model: "DiTMoE", out: torch.Tensor) -> torch.Tensor:
    """The predicted channels of the final layer's output ``out [B, T, p*p*C_out]`` -> ``[B, T, p*p, C]``.

    The last axis is laid out ``(p, p, C_out)`` (see ``DiTMoE.unpatchify``); a ``learn_sigma`` model's
    ``C_out = 2 C`` channels are the prediction (epsilon or velocity) then the variance interpolation,
    and only the first ``C`` are what the sampler integrates.
    """
    cfg = model.config
    p = cfg.patch_size
    return out.reshape(*out.shape[:-1], p * p, cfg.out_channels)[..., :cfg.in_channels]


@dataclass(frozen=True)
class RescaleFit:
    """Result of :func:`fit_rescale_polynomial`.

    coefficients: highest power first; input_changes / output_changes: the calibration pairs
    (dimensionless relative L1 changes between consecutive calls); r2: coefficient of determination.
    """

    coefficients: tuple[float, ...]
    input_changes: tuple[float, ...] = field(repr=False)
    output_changes: tuple[float, ...] = field(repr=False)
    r2: float

    def mean_output_change(self) -> float:
        """Mean rescaled change per call over the calibration pairs (the accumulator's growth per step)."""
        return float(np.mean(np.polyval(self.coefficients, np.asarray(self.input_changes))))


@torch.no_grad()
def fit_rescale_polynomial(model: "DiTMoE", sampler: "SamplerConfig", labels: torch.Tensor,
                           seeds: Sequence[int] = (0,), degree: int = DEFAULT_DEGREE) -> RescaleFit:
    """Fit TeaCache's rescaling polynomial on full-compute runs of ``model``.

    For every seed, samples ``labels [B]`` with full compute and records, per CFG context and for each
    pair of consecutive calls, block 0's modulated-input relative L1 change and the model output's
    relative L1 change (the predicted channels of the final layer's output, :func:`predicted_output`:
    the variance channels of a ``learn_sigma`` model are left out). Fits a least-squares polynomial of
    ``degree``. Needs at least ``degree + 1`` pairs; the published fits use several calibration
    prompts, the Pareto benchmark fits on 16 samples.
    """
    if degree < 1:
        raise ValueError(f"teacache polynomial degree must be >= 1, got {degree}")
    recorder = _ChangeRecorder()
    with model.use_runtime(recorder):
        for seed in seeds:
            sample(model, sampler, labels, seed=seed)
    if len(recorder.pairs) < degree + 1:
        raise ValueError(f"teacache fit needs at least {degree + 1} consecutive-call pairs, got "
                         f"{len(recorder.pairs)}; use more sampling steps or seeds")
    x = np.array([p[0] for p in recorder.pairs])
    y = np.array([p[1] for p in recorder.pairs])
    coeffs = np.polyfit(x, y, degree)
    pred = np.polyval(coeffs, x)
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return RescaleFit(tuple(float(c) for c in coeffs), tuple(x.tolist()), tuple(y.tolist()), r2)
