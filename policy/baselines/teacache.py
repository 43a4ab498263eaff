"""TeaCache baseline: skip the whole transformer stack when the first block's input barely moved.

Original method (Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion
Model", CVPR 2025): before each model call, compute block 0's timestep-modulated input ``m_s`` and its
relative L1 change against the previous call, ``d_s = mean|m_s - m_{s-1}| / mean|m_{s-1}|``. A
polynomial ``f`` fitted offline maps ``d_s`` to the expected relative L1 change of the model *output*.
The rescaled changes accumulate, ``A += f(d_s)``; while ``A`` stays below a threshold the call skips
every block and adds the residual cached at the last computed call (``blocks(x) - x``) to the current
block input; when ``A`` reaches the threshold the blocks run, the residual is refreshed and ``A`` is
reset to 0. The first step(s) and the last step are always computed.

This module holds the knobs (:class:`TeaCacheConfig`), the polynomial fit on full-compute calibration
runs (:func:`fit_rescale_polynomial`) and the schedule builder (:func:`build_schedule`): the rule is the
schedule format's whole-model skip (:class:`~moeca.policy.schedule.ModelSkip`), executed by the replay
runtime (:meth:`moeca.replay.runtime.ReplayRuntime.run_blocks`, which compares every call with the
previous call, computed or skipped).

Units: relative L1 changes are dimensionless ratios; the accumulator is in the same units.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from moeca.models.runtime import ForwardContext, Runtime

if TYPE_CHECKING:  # pragma: no cover
    from moeca.models.dit_moe import DiTMoE
    from moeca.diffusion.samplers import SamplerConfig

DEFAULT_DEGREE = 4
"""Degree of the rescaling polynomial; the published TeaCache coefficients are quartics."""


@dataclass(frozen=True)
class TeaCacheConfig:
    """Knobs of the TeaCache rule.

    rel_l1_thresh: skip while the accumulated rescaled relative L1 change stays below this value
        (dimensionless). 0 disables skipping (every call computed). The published settings are
        0.1-0.3 for video models ("slow" to "fast"); the right value depends on the model, so the Pareto
        benchmark sweeps it.
    coefficients: rescaling polynomial, highest power first (``numpy.polyval`` order), mapping the input
        change ``d`` to the predicted output change. Empty tuple = identity (``f(d) = d``). Fit it with
        :func:`fit_rescale_polynomial` on the model you cache.
    compute_first_steps: number of initial sampling steps always computed (published: 1, the first
        call has nothing to compare against).
    compute_last_steps: number of final steps always computed (published: 1).
    """

    rel_l1_thresh: float = 0.1
    coefficients: tuple[float, ...] = ()
    compute_first_steps: int = 1
    compute_last_steps: int = 1

    def __post_init__(self) -> None:
        if not math.isfinite(self.rel_l1_thresh) or self.rel_l1_thresh < 0:
            raise ValueError(f"teacache rel_l1_thresh must be a finite number >= 0, got {self.rel_l1_thresh}")
        if any(not math.isfinite(c) for c in self.coefficients):
            raise ValueError(f"teacache coefficients must be finite numbers, got {self.coefficients}")
        if self.compute_first_steps < 1:
            raise ValueError(f"teacache compute_first_steps must be >= 1 (step 0 has no cache), got "
                             f"{self.compute_first_steps}")
        if self.compute_last_steps < 0:
            raise ValueError(f"teacache compute_last_steps must be >= 0, got {self.compute_last_steps}")

    def forced(self, step: int, num_steps: int) -> bool:
        """Is ``step`` (0 = noisiest) always computed?"""
        return step < self.compute_first_steps or step >= num_steps - self.compute_last_steps

    def to_dict(self) -> dict:
        return {"rel_l1_thresh": self.rel_l1_thresh, "coefficients": list(self.coefficients),
                "compute_first_steps": self.compute_first_steps, "compute_last_steps": self.compute_last_steps}


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

    def config(self, rel_l1_thresh: float, **overrides) -> TeaCacheConfig:
        """A :class:`TeaCacheConfig` using this fit (coefficients and fit range)."""
        return TeaCacheConfig(rel_l1_thresh=rel_l1_thresh, coefficients=self.coefficients, **overrides)

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
    from moeca.diffusion.samplers import sample
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


def build_schedule(config: TeaCacheConfig, model_config, sampler_cfg, weights_hash: str | None = None):
    """The TeaCache schedule: forced steps ``compute``, the others ``adaptive`` under a
    :class:`~moeca.policy.schedule.ModelSkip` with ``config``'s threshold and polynomial (identity when
    unfitted). ``rel_l1_thresh == 0`` computes every step. -> ``Schedule``."""
    from moeca.policy.schedule import ModelSkip, StepRule
    from .common import assemble, full_blocks
    S, depth, E = sampler_cfg.num_steps, model_config.depth, model_config.num_experts
    blocks = full_blocks(depth, E)
    skip = config.rel_l1_thresh > 0
    steps = [StepRule("adaptive" if skip and not config.forced(s, S) else "compute", blocks) for s in range(S)]
    poly = config.coefficients or (1.0, 0.0)
    model_skip = ModelSkip(config.rel_l1_thresh, tuple(poly)) if skip else None
    schedule = assemble("teacache", model_config, sampler_cfg, steps, model_skip=model_skip,
                        weights_hash=weights_hash, provenance={"baseline": "teacache", "config": config.to_dict()})
    from dataclasses import replace
    return replace(schedule, predicted_flops_ratio=None if skip else 1.0)
