"""TaylorSeer baseline: step-level caching that forecasts cached features instead of reusing them.

Original method (Liu et al., "From Reusing to Forecasting: Accelerating Diffusion Models with
TaylorSeers", 2025; public code TaylorSeer, also a cache hook in the common diffusion libraries): the
first steps run in full (``first_enhance = 2`` in the public DiT code); after that the model runs in
full every ``N`` steps and every layer's attention and MLP outputs are stored together with their
finite differences up to order ``m`` (differences between the outputs at consecutive full steps,
divided by the step distance). On the ``N - 1`` steps in between each layer's output is *predicted*
by the Taylor expansion ``F(s) = sum_i Delta^i F / i! * (s - s_last)^i`` instead of computed (the
residual stream, adaLN modulation, embedders and final layer still run). ``m = 0`` is FORA's plain
reuse, ``m = 1`` the linear forecast. The paper sweeps ``N`` = 3..7 and orders up to 4 on DiT-XL/2.

Here the MLP is the whole MoE update (router, routed experts and shared expert), as in :mod:`.fora`.
The expansion is the schedule format's ``forecast: taylor`` of order ``m`` (format version 3): the
replay engine predicts every reused output by the interpolating polynomial through the unit's last
``m + 1`` computed values (float32). With equally spaced full steps this is the published expansion up
to how the derivatives are estimated: the two agree exactly at order 1; at order 2 and above the
interpolating polynomial is exact on a polynomial trajectory of degree ``m``, where the published
backward-difference derivatives carry an ``O(N)`` bias. A unit with fewer than ``m + 1`` computed values
is forecast with the order its history allows.
"""
from __future__ import annotations

from dataclasses import dataclass

from moeca.policy.schedule import MAX_FORECAST_ORDER as MAX_ORDER  # highest order the schedule format carries


@dataclass(frozen=True)
class TaylorSeerConfig:
    """Knobs of TaylorSeer.

    interval: ``N``; after the first steps, every ``N``-th step is computed in full (``N - 1`` forecast
        steps in between). ``1`` forecasts nothing (full compute). The paper sweeps 3..7 on DiT; 4 here.
    order: ``m``, the Taylor order of the forecast, 1..:data:`MAX_ORDER` (the paper uses up to 4; 2
        here). Order 1 is the schedule format's linear forecast (bit for bit).
    first_steps: steps computed in full at the start (published ``first_enhance = 2``), so the first
        forecast has two computed values to difference.
    """

    interval: int = 4
    order: int = 2
    first_steps: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"taylorseer interval must be an integer >= 1 (1 = no reuse), got {self.interval!r}")
        if not isinstance(self.order, int) or not 1 <= self.order <= MAX_ORDER:
            raise ValueError(f"taylorseer order must be an integer in 1..{MAX_ORDER}, got {self.order!r}")
        if not isinstance(self.first_steps, int) or self.first_steps < 1:
            raise ValueError(f"taylorseer first_steps must be an integer >= 1 (step 0 has no cache), got "
                             f"{self.first_steps!r}")

    def to_dict(self) -> dict:
        return {"interval": self.interval, "order": self.order, "first_steps": self.first_steps}


def refresh_steps(config: TaylorSeerConfig, num_steps: int) -> list[int]:
    """Steps (0 = noisiest) computed in full: the first ``first_steps``, then every ``interval``-th
    step counted from the last of them."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    first = min(config.first_steps, num_steps)
    return sorted(set(range(first)) | set(range(first - 1, num_steps, config.interval)))


def build_schedule(config: TaylorSeerConfig, model_config, sampler_cfg, weights_hash: str | None = None):
    """The TaylorSeer schedule: refresh steps are sync steps; every other step reuses every block's
    attention and whole MoE output, forecast by the order-``m`` Taylor expansion
    (``forecast: taylor``, ``forecast_order: m``). -> :class:`moeca.policy.schedule.Schedule`."""
    from dataclasses import replace

    from moeca.policy.schedule import NEVER, StepRule
    from .common import assemble, block_rule, full_blocks
    S, depth, E = sampler_cfg.num_steps, model_config.depth, model_config.num_experts
    sync = refresh_steps(config, S)
    reuse = tuple(block_rule(E, attn=NEVER, moe=NEVER) for _ in range(depth))
    steps = [StepRule("compute", full_blocks(depth, E) if s in sync else reuse) for s in range(S)]
    schedule = assemble("taylorseer", model_config, sampler_cfg, steps, sync=sync, weights_hash=weights_hash,
                        provenance={"baseline": "taylorseer", "config": config.to_dict()})
    return replace(schedule, forecast="taylor", forecast_order=config.order)
