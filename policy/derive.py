"""Derive the MoECa schedule from a trace drift summary.

Input: the analysis summary (``moeca.analysis.drift_summary``): one row per (unit, block, step, expert,
lag) with ``mean_rel_l2`` (relative L2 change of the unit's output against ``lag`` steps back),
``mean_gate_weight``, ``persist_frac`` (share of routed pairs also routed ``lag`` steps back) and ``n``.

Two refresh rules (``DeriveConfig.refresh``); both forecast reused outputs linearly by default
(``forecast="linear"``: a reused branch is extrapolated from its last two computed outputs, see
:mod:`moeca.policy.schedule`) and combine routed branches with the *current* gate weights.

``refresh="sync"`` (default), synchronized refresh with branch-level forecasting:

1. Step 0 (``warmup_steps``), the last ``final_steps`` steps and ``n`` more steps recompute every
   unit of every block together. ``placement="drift"`` places the ``n`` steps on the traced per-step
   drift ``d`` (the FLOPs-weighted mean lag-1 drift of attention, shared and routed experts) times the
   share of the step's update the model decides (:func:`moeca.diffusion.samplers.model_share`: 1 for Euler
   and deterministic DDIM, rising to 1 over the last DDPM steps): a step refreshes when that weight,
   accumulated since the last refresh, reaches a threshold (:func:`drift_sync_steps`), so refreshes are
   denser where the features move fastest and a step that moves far refreshes itself; ``placement="even"``
   spaces them evenly (``round(i * S / n)``).
2. Every other step forecasts. At the ``branch`` level it runs the router in every block, computes the
   newly routed (token, expert) pairs (they have no cache entry) and forecasts every other branch, the
   shared expert and attention, combining branches with the current gates. At the ``token`` level it
   skips the router and forecasts each block's whole MoE output and attention per token: less quality per
   step (0.5-0.7 dB PSNR at the same refreshes on the demo model), much less bookkeeping, so on a device
   where the bookkeeping is dear a wall-clock target fits more refreshes. ``forecast_level="auto"``
   (default) takes the level that fits more refreshes into a wall-clock target. The ``routing`` level
   (routing-aware) runs the router and computes the new pairs as the branch level does, but forecasts the
   whole MoE output per token of every token whose routed experts did not change since the last refresh;
   only tokens whose routing moved get their branches forecast with the current gates.
3. ``n`` is the largest count whose predicted speedup reaches ``target_speedup``: with
   ``target="flops"`` the FLOPs ratio (router + the traces' newly routed share of pairs on forecast
   steps), with ``target="wallclock"`` the wall-clock time predicted from the calibrated unit costs of
   the replaying device (:class:`~moeca.policy.wallclock.WallClockCosts`: a full step, and a forecast
   step with the traced newly routed pairs, bookkeeping included). With ``error_budget`` ``tau`` the
   count is the smallest with ``max(d) * (S / n)**alpha <= tau``.

Why not refresh single branches between those steps: replaying the demo model shows that recomputing
experts (even every expert of a block) while the block's attention stays cached *raises* image error,
because the cached attention and MoE updates of a block are correlated and partly cancel; a whole
synchronized refresh keeps them consistent. The per-expert budget rule below stays available.

``refresh="budget"`` (one error budget ``tau`` for every unit), expert-aware token budgets:

1. **Full steps.** The first ``warmup_steps`` and the last ``final_steps`` steps, and a synchronized
   refresh every ``sync_interval`` steps in between, recompute every unit of every block
   (``sync_refresh_steps``), so attention and MoE caches never drift apart for long.
2. **Staleness error.** Reusing an output computed ``j`` steps ago costs about ``d * j**alpha`` where
   ``d`` is the unit's per-step drift (lag-1 ``mean_rel_l2`` at that step and block, weighted by the
   expert's gate weight relative to the block mean) and ``alpha`` is fitted per unit kind from the
   lag profile (``rel_l2(lag) ~ lag**alpha``; ``alpha = 1`` is linear drift, ``0.5`` a random walk).
3. **Experts and shared expert: token budgets.** Recomputing a fraction ``f`` of a unit's cached
   tokens per step refreshes each token every ``1/f`` steps, so keeping the staleness error under
   ``tau`` needs ``f = (d / tau) ** (1/alpha)``. Each (step, block, expert) gets that refresh
   fraction; faster-drifting experts (and phases) refresh more. At run time the online score
   (accumulated input drift since the branch was computed plus ``staleness_weight * age``) picks
   *which* tokens; newly routed pairs are always computed.
4. **Attention: whole refresh.** Attention is recomputed for all tokens of a block when its
   accumulated staleness error since its last refresh exceeds ``tau``, else reused whole (partial
   attention still needs K/V of every token, so it saves little).
5. **Budget.** With ``target_speedup`` the ``tau`` whose predicted FLOPs ratio equals
   ``1 / target_speedup`` is found by bisection; with ``error_budget`` ``tau`` is given.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from moeca.models.config import DiTMoEConfig
from moeca.policy.cost import UnitCosts
from moeca.policy.schedule import (ALWAYS, REUSE, ROUTING, BlockRule, ModelIdentity, Rule, SamplerIdentity, Schedule,
                                   ScoreConfig, StepRule)
from moeca.policy.wallclock import StepWork, WallClockCosts

if TYPE_CHECKING:  # pragma: no cover
    from moeca.diffusion.samplers import SamplerConfig

SUMMARY_COLUMNS = ("unit", "block", "step", "expert", "lag", "n", "mean_rel_l2", "mean_gate_weight",
                   "persist_frac")


FORECAST_LEVELS = ("auto", "branch", "routing", "token")
"""``DeriveConfig.forecast_level`` values; ``auto`` tries the others in this order (a later level must fit strictly
more refreshes to be taken)."""


@dataclass(frozen=True)
class DeriveConfig:
    """Knobs of the MoECa derivation (see the module docstring for the rule).

    target_speedup: predicted speedup (full / cached) to reach; the error budget is searched.
    target: what ``target_speedup`` means: ``flops`` (analytic FLOPs speedup) or ``wallclock`` (the
    speedup predicted from calibrated unit costs, :class:`~moeca.policy.wallclock.WallClockCosts`,
    which :func:`derive_schedule` then needs; ``sync`` rule only).
    placement: ``sync`` rule: where the synchronized refreshes go: ``drift`` (a threshold on the traced
    drift accumulated since the last refresh, :func:`drift_sync_steps` on :func:`placement_weight`) or
    ``even`` (evenly spaced).
    forecast_level: ``sync`` rule: what a forecast step forecasts. ``branch``: the router runs, newly
    routed (token, expert) pairs are computed, every other branch is forecast and combined with the current
    gates; ``routing`` (routing-aware): the router runs and the new pairs are computed, tokens whose routed
    experts changed since the last refresh are forecast per branch as at ``branch``, every other token's whole
    MoE output per token; ``token``: no router, each block's whole MoE output is forecast per token (cheapest
    per step); ``auto``: with a wall-clock target, the level that fits the most refreshes into the target
    (on a tie the first of ``branch``, ``routing``, ``token``; with a FLOPs target or an error budget, where
    the per-step bookkeeping is not priced, ``branch``).
    error_budget: the budget ``tau`` (max staleness error, relative L2) instead of a target speedup.
    refresh: ``sync`` (evenly spaced synchronized full refreshes, everything forecast in between) or
    ``budget`` (fixed ``sync_interval`` plus per-expert token budgets); see the module docstring.
    forecast: ``linear`` (extrapolate reused outputs from their last two computations) or ``none``.
    warmup_steps / final_steps: steps computed in full at the start / end of sampling.
    sync_interval: ``budget`` rule only: a synchronized full refresh every this many steps after
    warm-up (0 = none); the ``sync`` rule derives its spacing.
    attn_weight / shared_weight / expert_weight: importance multipliers on each unit kind's drift.
    gate_weighting: weight an expert's drift by its mean gate weight relative to the block mean.
    min_fraction: lower bound of the per-token refresh fraction of experts and shared expert.
    staleness_weight: the online score is ``accumulated input drift + staleness_weight * age``.
    fit_alpha: fit the lag exponent per unit kind (else ``alpha = 1``, linear accumulation).
    fold: the wall-clock prediction prices token-level forecast steps as the replay engine runs them by
    default, the folded stack sum (``moeca.replay.units.stack``); False prices the exact per-unit sum
    (``ReplayRuntime(fold=False)``: the ablation's ``- folded stack``).
    """

    target_speedup: float | None = 3.0
    error_budget: float | None = None
    target: str = "flops"
    refresh: str = "sync"
    placement: str = "drift"
    forecast_level: str = "auto"
    forecast: str = "linear"
    warmup_steps: int = 1
    final_steps: int = 0
    sync_interval: int = 10
    attn_weight: float = 1.0
    shared_weight: float = 1.0
    expert_weight: float = 1.0
    gate_weighting: bool = True
    min_fraction: float = 0.0
    staleness_weight: float = 0.02
    fit_alpha: bool = True
    fold: bool = True

    def __post_init__(self) -> None:
        if (self.target_speedup is None) == (self.error_budget is None):
            raise ValueError("give exactly one of target_speedup (e.g. 3.0) and error_budget (e.g. 0.2)")
        if self.target_speedup is not None and not self.target_speedup > 1.0:
            raise ValueError(f"target_speedup must be > 1, got {self.target_speedup}")
        if self.error_budget is not None and not self.error_budget > 0:
            raise ValueError(f"error_budget must be > 0, got {self.error_budget}")
        if self.warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1 (the first step has nothing cached), got {self.warmup_steps}")
        if self.refresh not in ("sync", "budget"):
            raise ValueError(f"refresh must be 'sync' or 'budget', got {self.refresh!r}")
        if self.target not in ("flops", "wallclock"):
            raise ValueError(f"target must be 'flops' or 'wallclock', got {self.target!r}")
        if self.target == "wallclock" and self.refresh != "sync":
            raise ValueError("a wall-clock target needs refresh='sync' (the budget rule predicts FLOPs only); "
                             "use a FLOPs target (--target-flops-speedup) with --refresh budget")
        if self.forecast_level not in FORECAST_LEVELS:
            raise ValueError(f"forecast_level must be one of {', '.join(FORECAST_LEVELS)}, got {self.forecast_level!r}")
        if self.placement not in ("even", "drift"):
            raise ValueError(f"placement must be 'even' or 'drift', got {self.placement!r}")
        if self.forecast not in ("none", "linear"):
            raise ValueError(f"forecast must be 'none' or 'linear', got {self.forecast!r}")
        if self.final_steps < 0 or self.sync_interval < 0:
            raise ValueError("final_steps and sync_interval must be >= 0")
        if not 0 <= self.min_fraction <= 1:
            raise ValueError(f"min_fraction must lie in [0, 1], got {self.min_fraction}")
        for name in ("attn_weight", "shared_weight", "expert_weight", "staleness_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")


@dataclass(frozen=True)
class DriftTables:
    """Lag-1 drift as dense arrays (NaN where the trace has no value).

    attn, shared: ``[S, L]``; expert, gate, persist, share: ``[S, L, E]``; alpha per unit kind.
    """

    attn: np.ndarray
    shared: np.ndarray
    expert: np.ndarray
    gate: np.ndarray
    persist: np.ndarray
    share: np.ndarray
    alpha: dict


def _edge_steps(num_steps: int, cfg: DeriveConfig) -> set[int]:
    """The first ``warmup_steps`` and the last ``final_steps`` steps (always computed in full)."""
    return set(range(min(cfg.warmup_steps, num_steps))) | set(range(max(num_steps - cfg.final_steps, 0), num_steps))


def sync_steps(num_steps: int, cfg: DeriveConfig) -> tuple[int, ...]:
    """Warm-up steps, final steps and every ``sync_interval``-th step in between."""
    steps = _edge_steps(num_steps, cfg)
    if cfg.sync_interval > 0:  # the last warm-up step counts as the first refresh
        steps |= set(range(cfg.warmup_steps - 1 + cfg.sync_interval, num_steps, cfg.sync_interval))
    return tuple(sorted(steps))


def _fill(a: np.ndarray, axis_mean: tuple[int, ...], default: float) -> np.ndarray:
    """Fill NaNs: first with the mean over ``axis_mean`` (e.g. over steps), then ``default``."""
    out = a.copy()
    with np.errstate(all="ignore"), _quiet():
        m = np.nanmean(out, axis=axis_mean, keepdims=True)
    out = np.where(np.isnan(out), np.broadcast_to(m, out.shape), out)
    return np.where(np.isnan(out), default, out)


class _quiet:
    def __enter__(self):
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


def _fit_alpha(df, unit: str) -> float:
    """Exponent of ``rel_l2(lag) ~ lag**alpha``, clipped to [0.5, 1].

    Each lag-L value is compared with the lag-1 value of the same (block, step, expert), so the fall
    of drift over sampling does not bias the fit; the median of ``log(ratio) / log(L)`` is returned.
    """
    sub = df[(df["unit"] == unit) & np.isfinite(df["mean_rel_l2"]) & (df["mean_rel_l2"] > 0)]
    keys = ["block", "step", "expert"]
    one = sub[sub["lag"] == 1][keys + ["mean_rel_l2"]].rename(columns={"mean_rel_l2": "d1"})
    more = sub[sub["lag"] > 1].merge(one, on=keys)
    if more.empty:
        return 1.0
    est = np.log(more["mean_rel_l2"].to_numpy(float) / more["d1"].to_numpy(float)) / np.log(more["lag"].to_numpy(float))
    return float(min(max(float(np.median(est)), 0.5), 1.0))


def drift_tables(summary, num_steps: int, depth: int, num_experts: int, fit_alpha: bool = True) -> DriftTables:
    """Dense lag-1 drift arrays from the summary DataFrame (validated columns)."""
    missing = [c for c in SUMMARY_COLUMNS if c not in summary.columns]
    if missing:
        raise ValueError(f"drift summary lacks columns {missing}; expected the output of moeca.analysis.drift_summary")
    df = summary
    lag1 = df[df["lag"] == 1]
    if lag1.empty:
        raise ValueError("drift summary has no lag-1 rows; trace with --lags >= 1")
    S, L, E = num_steps, depth, num_experts
    bad = lag1[(lag1["step"] >= S) | (lag1["block"] >= L) | (lag1["expert"] >= E)]
    if len(bad):
        r = bad.iloc[0]
        raise ValueError(f"drift summary row (unit {r['unit']}, block {r['block']}, step {r['step']}, expert "
                         f"{r['expert']}) is outside the model/sampler ({L} blocks, {S} steps, {E} experts): the "
                         "trace was made with another model or sampler")

    def token_table(unit: str) -> np.ndarray:
        a = np.full((S, L), np.nan)
        u = lag1[lag1["unit"] == unit]
        a[u["step"].to_numpy(int), u["block"].to_numpy(int)] = u["mean_rel_l2"].to_numpy(float)
        return a

    ex = lag1[lag1["unit"] == "expert"]
    idx = (ex["step"].to_numpy(int), ex["block"].to_numpy(int), ex["expert"].to_numpy(int))
    expert, gate, persist, count = (np.full((S, L, E), np.nan) for _ in range(4))
    expert[idx] = ex["mean_rel_l2"].to_numpy(float)
    gate[idx] = ex["mean_gate_weight"].to_numpy(float)
    persist[idx] = ex["persist_frac"].to_numpy(float)
    count[idx] = ex["n"].to_numpy(float)
    if ex.empty:
        raise ValueError("drift summary has no expert rows; the derivation needs per-expert drift")
    attn = token_table("attn")
    shared = token_table("shared")
    # missing values (e.g. step 0 has no lag-1 value): mean over steps, then over everything
    attn = _fill(attn, (0,), float(np.nanmean(attn)) if np.isfinite(attn).any() else 1.0)
    shared = _fill(shared, (0,), float(np.nanmean(shared)) if np.isfinite(shared).any() else 1.0)
    expert_f = _fill(_fill(expert, (2,), np.nan), (0,), float(np.nanmean(expert)))
    gate_f = _fill(_fill(gate, (2,), np.nan), (0,), float(np.nanmean(gate)))
    persist_f = _fill(_fill(persist, (2,), np.nan), (0,), float(np.nanmean(persist)))
    routed = np.where(np.isfinite(count), count / np.maximum(np.nan_to_num(persist, nan=1.0), 0.05), 0.0)
    tot = routed.sum(axis=2, keepdims=True)
    share = np.where(tot > 0, routed / np.where(tot > 0, tot, 1.0), 1.0 / E)
    alpha = {u: (_fit_alpha(df, u) if fit_alpha else 1.0) for u in ("attn", "shared", "expert")}
    return DriftTables(attn, shared, expert_f, gate_f, persist_f, share, alpha)


@dataclass(frozen=True)
class _Plan:
    steps: tuple[StepRule, ...]
    ratio: float


def _plan(tables: DriftTables, tau: float, cfg: DeriveConfig, sync: frozenset[int], costs: UnitCosts) -> _Plan:
    S, L, E = tables.expert.shape
    a_attn, a_sh, a_ex = tables.alpha["attn"], tables.alpha["shared"], tables.alpha["expert"]
    full_token = costs.block_per_token()
    fixed = costs.fixed_per_sample() / costs.num_tokens / costs.depth  # spread per block and token
    if cfg.gate_weighting:
        gmean = tables.gate.mean(axis=2, keepdims=True)
        gw = np.where(gmean > 0, tables.gate / np.where(gmean > 0, gmean, 1.0), 1.0)
    else:
        gw = np.ones_like(tables.gate)
    d_ex = cfg.expert_weight * tables.expert * gw
    f_ex = np.clip((d_ex / tau) ** (1.0 / a_ex), cfg.min_fraction, 1.0)
    f_sh = np.clip((cfg.shared_weight * tables.shared / tau) ** (1.0 / a_sh), cfg.min_fraction, 1.0)
    d_attn = cfg.attn_weight * tables.attn
    steps, done, full = [], 0.0, 0.0
    attn_acc = np.zeros(L)  # sum of d**(1/alpha) since the last refresh
    for s in range(S):
        blocks = []
        for b in range(L):
            full += full_token + fixed
            if s in sync:
                attn_acc[b] = 0.0
                blocks.append(BlockRule.full(E))
                done += full_token + fixed
                continue
            attn_acc[b] += d_attn[s, b] ** (1.0 / a_attn)
            if attn_acc[b] ** a_attn > tau:
                attn_rule, attn_acc[b] = ALWAYS, 0.0
            else:
                attn_rule = REUSE
            ex_rules = tuple(Rule.fraction(f) for f in f_ex[s, b])
            sh_rule = Rule.fraction(f_sh[s, b])
            p = tables.persist[s, b]
            computed_pairs = costs.top_k * float(np.sum(tables.share[s, b] * ((1 - p) + p * np.array(
                [r.expected_refresh() for r in ex_rules]))))
            done += (fixed + costs.router + (costs.attn if attn_rule is ALWAYS else 0.0)
                     + sh_rule.expected_refresh() * costs.shared + computed_pairs * costs.expert)
            blocks.append(BlockRule(attn=attn_rule, moe=ALWAYS, shared=sh_rule, experts=ex_rules))
        steps.append(StepRule("compute", tuple(blocks)))
    return _Plan(tuple(steps), done / full)


def _plan_sync(tables: DriftTables, sync: frozenset[int], costs: UnitCosts, level: str = "branch") -> _Plan:
    """The ``sync`` rule's plan: full blocks on ``sync`` steps, everything forecast elsewhere: per branch
    with the router and the newly routed pairs computed (``level="branch"``), the same with the tokens whose
    routing did not move forecast per token (``"routing"``: the same FLOPs), or per token with no router
    (``"token"``)."""
    S, L, E = tables.expert.shape
    full_token = costs.block_per_token()
    fixed = costs.fixed_per_sample() / costs.num_tokens / costs.depth
    moe = {"token": REUSE, "branch": ALWAYS, "routing": ROUTING}[level]
    body = tuple(BlockRule(attn=REUSE, moe=moe, shared=REUSE, experts=(REUSE,) * E) for _ in range(L))
    full_blocks = tuple(BlockRule.full(E) for _ in range(L))
    new_pairs = costs.top_k * np.sum(tables.share * (1 - tables.persist), axis=2)     # [S, L] per token
    steps, done = [], 0.0
    for s in range(S):
        if s in sync:
            steps.append(StepRule("compute", full_blocks))
            done += L * (full_token + fixed)
        else:
            steps.append(StepRule("compute", body))
            done += L * fixed if level == "token" else float(np.sum(fixed + costs.router + new_pairs[s] * costs.expert))
    return _Plan(tuple(steps), done / (S * L * (full_token + fixed)))


def even_sync_steps(num_steps: int, count: int, cfg: DeriveConfig) -> frozenset[int]:
    """Warm-up and final steps plus ``count`` evenly spaced steps ``round(i * S / count)``."""
    steps = _edge_steps(num_steps, cfg)
    steps |= {min(round(i * num_steps / count), num_steps - 1) for i in range(count)}
    return frozenset(steps)


def drift_sync_steps(weight: np.ndarray, count: int, cfg: DeriveConfig) -> frozenset[int]:
    """Warm-up and final steps plus ``count`` refresh steps placed on the per-step ``weight [S]``.

    Step 0 refreshes; after it a step refreshes when the weight accumulated since the last refresh, its
    own included, reaches a threshold (the accumulate-and-reset rule TeaCache applies at run time, here on
    the traced drift): a step whose own drift is large refreshes itself, and refreshes are closer where the
    drift is high. The threshold is the smallest that gives at most ``count`` refreshes (bisection); when no
    threshold gives exactly ``count``, the interval carrying the most weight is split at its weight midpoint
    until it does (as many as ``S`` allows).
    """
    S = len(weight)
    w = np.clip(np.nan_to_num(np.asarray(weight, dtype=float)), 0.0, None)
    count = min(count, S)
    if not w[1:].sum() > 0:
        return even_sync_steps(S, count, cfg)

    def placed(threshold: float) -> list[int]:
        steps, acc = [0], 0.0
        for s in range(1, S):
            acc += w[s]
            if acc >= threshold:
                steps.append(s)
                acc = 0.0
        return steps

    lo, hi = 0.0, float(w.sum()) * 2   # placed(hi) = [0] and more (up to S) as the threshold falls
    for _ in range(60):
        mid = (lo + hi) / 2
        if len(placed(mid)) > count:
            lo = mid
        else:
            hi = mid
    steps = placed(hi)
    while len(steps) < count:   # split the heaviest interval (then the longest) after a refresh
        ends = steps[1:] + [S]
        j = max((i for i in range(len(steps)) if ends[i] - steps[i] > 1),
                key=lambda i: (w[steps[i] + 1:ends[i]].sum(), ends[i] - steps[i]))
        a, b = steps[j], ends[j]
        cum = np.cumsum(w[a + 1:b])
        at = int(np.searchsorted(cum, cum[-1] / 2)) if cum[-1] > 0 else (b - a - 2) // 2
        steps.insert(j + 1, a + 1 + min(at, b - a - 2))
    return frozenset(steps) | _edge_steps(S, cfg)


def placement_weight(drift: np.ndarray, sampler: "SamplerConfig") -> np.ndarray:
    """``[S]``: the per-step weight the ``drift`` placement accumulates: the traced per-step ``drift [S]``
    (:func:`step_drift`) times the share of the step's update the model decides
    (:func:`moeca.diffusion.samplers.model_share`: 1 for Euler and deterministic DDIM; on DDPM it rises from
    ~0.5 to 1 over the last steps, whose errors later steps no longer correct)."""
    # deferred: loads torch, and this module is imported at `moeca` start-up
    from moeca.diffusion.samplers import model_share
    return drift * model_share(sampler)


def step_drift(tables: DriftTables, costs: UnitCosts) -> np.ndarray:
    """``[S]``: the FLOPs-weighted mean lag-1 drift of attention, shared and routed experts per step."""
    unit = np.array([costs.attn, costs.shared, costs.top_k * costs.expert])
    drift = (tables.attn * unit[0] + tables.shared * unit[1]
             + np.sum(tables.expert * tables.share, axis=2) * unit[2]) / unit.sum()           # [S, L]
    return drift.mean(axis=1)


def sync_work(tables: DriftTables, sync: frozenset[int], wallclock: WallClockCosts, order: int,
              level: str = "branch", fold: bool = True) -> list[StepWork]:
    """What each step of the ``sync`` rule's plan executes, for the wall-clock prediction. A token-level
    plan forecasts the stack folded (``moeca.replay.units.stack``): every refresh rebuilds the fold's
    products, and forecast steps after the second refresh sum them (``fold=False``: unit by unit)."""
    S, L, _ = tables.expert.shape
    new_pairs = wallclock.top_k * np.sum(tables.share * (1 - tables.persist), axis=(1, 2))   # [S] per token
    folds = fold and level == "token"
    refreshed = np.cumsum([s in sync for s in range(S)])      # refreshes up to and including each step
    moved = moved_since_refresh(new_pairs / L, sync) * L
    return [wallclock.full_step(L, order, folds, level) if s in sync
            else wallclock.forecast_step(L, order, float(new_pairs[s]), level,
                                         folded=folds and refreshed[s] >= FOLD_REFRESHES, moved_per_token=float(moved[s]))
            for s in range(S)]


def moved_since_refresh(new_pairs: np.ndarray, sync: frozenset[int]) -> np.ndarray:
    """``[S]``: the share of a block's tokens whose routed experts changed since the last refresh, estimated from
    the traced newly routed pairs per token and block of each step (``new_pairs [S]``: a pair routed now and not
    at the step before): their sum since the last refresh, at most 1 (an upper bound: a token counts once per new
    pair, and one that returns to its experts still counts)."""
    out, acc = np.zeros(len(new_pairs)), 0.0
    for s, n in enumerate(new_pairs):
        acc = 0.0 if s in sync else min(1.0, acc + float(n))
        out[s] = acc
    return out


FOLD_REFRESHES = 2
"""Full refreshes after which the replay engine folds the stack forecast (it forecasts the gates through
their last two values: ``moeca.replay.units.stack.GATE_DEGREE + 1``)."""


@dataclass(frozen=True)
class _SyncChoice:
    plan: _Plan
    sync: frozenset
    tau: float
    wallclock_speedup: float | None
    level: str
    levels: dict | None = None


def _derive_sync(tables: DriftTables, cfg: DeriveConfig, sampler: "SamplerConfig", costs: UnitCosts,
                 wallclock: WallClockCosts | None) -> _SyncChoice:
    """The ``sync`` rule: the refresh steps, forecast level and plan that meet the target (tau: predicted
    staleness error)."""
    S = sampler.num_steps
    d = step_drift(tables, costs)
    weight = placement_weight(d, sampler)
    alpha = (tables.alpha["attn"] + tables.alpha["shared"] + tables.alpha["expert"]) / 3
    order = {"none": 0, "linear": 1}[cfg.forecast]

    placements: dict[int, frozenset[int]] = {}

    def steps_of(count: int) -> frozenset[int]:
        if count not in placements:   # the same for every forecast level
            placements[count] = (drift_sync_steps(weight, count, cfg) if cfg.placement == "drift"
                                 else even_sync_steps(S, count, cfg))
        return placements[count]

    def choice(count: int, level: str) -> _SyncChoice:
        sync = steps_of(count)
        speed = None if wallclock is None else wallclock.predicted_speedup(
            sync_work(tables, sync, wallclock, order, level, cfg.fold))
        return _SyncChoice(_plan_sync(tables, sync, costs, level), sync, float(np.max(d) * (S / count) ** alpha),
                           speed, level)

    if cfg.forecast_level != "auto":
        levels = (cfg.forecast_level,)
    elif cfg.target == "wallclock" and cfg.error_budget is None:   # only a wall-clock target prices them all
        levels = FORECAST_LEVELS[1:]
    else:
        levels = ("branch",)
    if cfg.error_budget is not None:
        count = next((n for n in range(1, S + 1) if np.max(d) * (S / n) ** alpha <= cfg.error_budget), S)
        return replace(choice(count, levels[0]), tau=cfg.error_budget)
    best, per_level = None, {}
    for level in levels:   # in FORECAST_LEVELS order: a later level must fit strictly more refreshes to be chosen
        for count in range(1, S + 1):  # more refreshes = better quality; keep the most that fit the target
            c = choice(count, level)
            reached = c.wallclock_speedup >= cfg.target_speedup if cfg.target == "wallclock" \
                else c.plan.ratio <= 1.0 / cfg.target_speedup
            if reached and (level not in per_level or len(c.sync) > len(per_level[level].sync)):
                per_level[level] = c
            if reached and (best is None or len(c.sync) > len(best.sync)):
                best = c
    if best is None:
        floors = [choice(1, level) for level in levels]
        what, most = (("wall-clock", max(f.wallclock_speedup for f in floors)) if cfg.target == "wallclock"
                      else ("FLOPs", max(1 / f.plan.ratio for f in floors)))
        work = " or ".join({"branch": "the router plus newly routed pairs computed",
                            "routing": "the router plus newly routed pairs computed (routing-aware)",
                            "token": "every block's MoE output forecast per token"}[lv] for lv in levels)
        raise ValueError(
            f"target speedup {cfg.target_speedup:g}x is out of reach: with warm-up {cfg.warmup_steps} and final "
            f"{cfg.final_steps} steps in full and {work} on every other step, the predicted {what} speedup is at "
            f"most {most:.2f}x; lower the target or --warmup-steps")
    if wallclock is not None:
        best = replace(best, levels={lv: level_choice(c, tables, wallclock, order, cfg.fold) for lv, c in per_level.items()})
    return best


def level_choice(c: "_SyncChoice", tables: DriftTables, wallclock: WallClockCosts, order: int, fold: bool) -> dict:
    """Why a forecast level was or was not taken: the refreshes its best plan fits into the target, that
    plan's predicted wall-clock speedup and its predicted milliseconds per forecast step (median over the
    steps after the second refresh, this device's calibrated unit costs)."""
    work = sync_work(tables, c.sync, wallclock, order, c.level, fold)
    second = sorted(c.sync)[1] if len(c.sync) > 1 else 0
    ms = [wallclock.step_ms_of(w) for s, w in enumerate(work) if s not in c.sync and s > second]
    return {"refreshes": len(c.sync), "predicted_speedup": round(c.wallclock_speedup, 4),
            "forecast_step_ms": round(float(np.median(ms)), 4) if ms else None}


def derive_schedule(summary, run_meta: dict, cfg: DeriveConfig, wallclock: WallClockCosts | None = None) -> Schedule:
    """The MoECa schedule for the model and sampler in ``run_meta`` (a trace's run.json) from ``summary``.

    wallclock: calibrated unit costs of the device that will replay (``moeca calibrate``); needed for a
    ``cfg.target == "wallclock"`` target, and with the ``sync`` rule recorded as the predicted
    wall-clock speedup (``provenance.predicted_speedup``) whatever the target.
    Raises ValueError when ``target_speedup`` is out of reach (the message gives the reachable maximum).
    """
    # deferred: loads torch, and this module is imported at `moeca` start-up
    from moeca.diffusion.samplers import SamplerConfig

    try:
        config = DiTMoEConfig.from_dict(run_meta["model"]["config"])
        sampler = SamplerConfig(**run_meta["sampler"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"run metadata lacks the model config or sampler ({exc}); pass a trace's run.json") from None
    if cfg.target == "wallclock" and cfg.target_speedup is not None and wallclock is None:
        raise ValueError("a wall-clock target needs the calibrated unit costs of the replaying device: pass "
                         "wallclock= (moeca.replay.calibrate.ensure_costs) or use target='flops'")
    if wallclock is not None and wallclock.top_k != config.top_k:
        raise ValueError(f"the wall-clock calibration has top_k {wallclock.top_k} but the model {config.name} has "
                         f"{config.top_k}: calibrate this model (`moeca calibrate`)")
    S, L, E = sampler.num_steps, config.depth, config.num_experts
    tables = drift_tables(summary, S, L, E, cfg.fit_alpha)
    costs = UnitCosts.of(config)
    sync = frozenset(sync_steps(S, cfg))
    timing: dict = {}
    if cfg.refresh == "sync":
        chosen = _derive_sync(tables, cfg, sampler, costs, wallclock)
        plan, sync, tau = chosen.plan, chosen.sync, chosen.tau
        timing["forecast_level"] = chosen.level
        if chosen.levels:
            timing["levels"] = chosen.levels
        if wallclock is not None:
            timing.update(predicted_speedup=round(chosen.wallclock_speedup, 4),
                          calibration={**dict(wallclock.key), "created": wallclock.created})
    elif cfg.error_budget is not None:
        tau = cfg.error_budget
        plan = _plan(tables, tau, cfg, sync, costs)
    else:
        goal = 1.0 / cfg.target_speedup
        floor = _plan(tables, 1e9, cfg, sync, costs).ratio
        if floor > goal:
            raise ValueError(
                f"target speedup {cfg.target_speedup:g}x is out of reach: with {len(sync)} full steps "
                f"(warm-up {cfg.warmup_steps}, final {cfg.final_steps}, sync every {cfg.sync_interval}) and the "
                f"router plus newly routed pairs always computed, the predicted FLOPs speedup is at most "
                f"{1 / floor:.2f}x; lower the target or raise --sync-interval / lower --warmup-steps")
        lo, hi = 1e-6, 1.0
        while _plan(tables, hi, cfg, sync, costs).ratio > goal and hi < 1e9:
            hi *= 4
        for _ in range(40):  # bisection in log space: ratio decreases with tau
            mid = math.sqrt(lo * hi)
            if _plan(tables, mid, cfg, sync, costs).ratio > goal:
                lo = mid
            else:
                hi = mid
        tau = hi
        plan = _plan(tables, tau, cfg, sync, costs)
    model = run_meta["model"]
    identity = replace(ModelIdentity.of(config, model.get("weights_hash")), name=model.get("name") or config.name)
    score = ScoreConfig(drift_weight=1.0, staleness_weight=cfg.staleness_weight)
    return Schedule(
        method="moeca", model=identity, sampler=SamplerIdentity.of(sampler), steps=plan.steps,
        sync_refresh_steps=tuple(sorted(sync)),
        scores={"attn": score, "moe": score, "shared": score, "expert": score}, forecast=cfg.forecast,
        predicted_flops_ratio=round(plan.ratio, 6),
        provenance={"derived_by": "moeca.policy.derive", "config": asdict(cfg), "tau": tau,
                    "alpha": tables.alpha, "trace_run": run_meta.get("run_name"),
                    "trace_created": run_meta.get("created"), **timing},
    )
