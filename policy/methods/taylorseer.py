"""TaylorSeer: step-level caching that forecasts cached features by a finite-difference Taylor expansion.

Published method (Liu et al., "From Reusing to Forecasting: Accelerating Diffusion Models with
TaylorSeers", ICCV 2025; public code TaylorSeer-DiT, also diffusers' ``TaylorSeerCacheConfig``): the
first ``first_enhance = 2`` steps run in full, then every ``N``-th step (a counter: full again ``N``
steps after the last full step). At a full step every layer's attention and MLP outputs ``F`` are
stored with derivative estimates up to order ``m``::

    d_0(s_n) = F(s_n),   d_{i+1}(s_n) = (d_i(s_n) - d_i(s_{n-1})) / (s_n - s_{n-1})

(``d_i(s_{n-1})``: the estimate stored at the previous full step; a derivative is only formed once the
previous step has the order below it, so the order grows with the full steps seen). On the ``N - 1``
steps in between each layer's output is predicted as ``sum_i d_i(s_n) k^i / i!``, ``k`` the distance
to the last full step. Authors' DiT setting (DDIM 50): ``N = 4``, ``m = 4`` (3.57x FLOPs); ``N = 3, m = 3``
as the near-lossless one.

Here the MLP is the whole MoE update (router, routed experts and shared expert), as in :mod:`.fora`;
the expansion is the schedule format's ``forecast: taylor`` of order ``m`` (format version 4), which the
replay engine evaluates exactly so (:func:`moeca.replay.forecast.taylor_weights`). The interpolating
polynomial through the same values is a different forecast (``forecast: polynomial``): equal at order 1,
different from order 2 on.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from moeca.policy.schedule import MAX_FORECAST_ORDER, REUSE, Schedule, StepRule

from .common import Context, assemble, block_rule, full_blocks

SUMMARY = "TaylorSeer: full every N steps after the first ones, finite-difference Taylor forecast of order m between"


@dataclass(frozen=True)
class Config:
    """Knobs of TaylorSeer (defaults: the authors' DiT DDIM-50 setting).

    interval: ``N``; after the first steps a full step every ``N`` steps (``N - 1`` forecast steps in
        between); ``1`` forecasts nothing. Authors' DiT default 4; the sweep covers 2..8.
    order: ``m``, the Taylor order, 1..4 (authors' DiT default 4; ``1`` is the linear forecast).
    first_steps: steps computed in full at the start (published ``first_enhance = 2``).
    """

    interval: int = 4
    order: int = 4
    first_steps: int = 2

    def __post_init__(self) -> None:
        for name, low in (("interval", 1), ("first_steps", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"taylorseer {name} must be an integer >= {low}, got {v!r}")
        if not isinstance(self.order, int) or isinstance(self.order, bool) or not 1 <= self.order <= MAX_FORECAST_ORDER:
            raise ValueError(f"taylorseer order must be an integer in 1..{MAX_FORECAST_ORDER}, got {self.order!r}")


def refresh_steps(config: Config, num_steps: int) -> list[int]:
    """Steps (0 = noisiest) computed in full: the first ``first_steps``, then every ``interval``-th step
    counted from the last of them (TaylorSeer-DiT's counter)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    first = min(config.first_steps, num_steps)
    return sorted(set(range(first)) | set(range(first - 1, num_steps, config.interval)))


def build(config: Config, context: Context) -> Schedule:
    """Refresh steps are sync steps; every other step forecasts every block's attention and whole MoE
    output (``never`` + ``forecast: taylor``, ``forecast_order: m``)."""
    mc, sampler = context.model_config, context.sampler_cfg
    S, depth, E = sampler.num_steps, mc.depth, mc.num_experts
    sync = refresh_steps(config, S)
    reuse = tuple(block_rule(E, attn=REUSE, moe=REUSE) for _ in range(depth))
    steps = [StepRule("compute", full_blocks(depth, E) if s in sync else reuse) for s in range(S)]
    schedule = assemble("taylorseer", mc, sampler, steps, sync=sync, weights_hash=context.weights_hash,
                        provenance={"method": "taylorseer", "config": {"interval": config.interval,
                                                                        "order": config.order,
                                                                        "first_steps": config.first_steps}})
    return replace(schedule, forecast="taylor", forecast_order=config.order)
