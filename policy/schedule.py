"""The schedule format (DESIGN section 4): what a replay runtime computes and what it reuses.

A schedule is versioned JSON validated against the published JSON Schema ``schedule.schema.json``
(next to this file) and then against the model it claims to describe. In Python it is a tree of frozen
dataclasses:

- :class:`Schedule` -- identity (``method``: a name of the method registry
  :mod:`moeca.policy.methods`, or ``custom``; :class:`ModelIdentity`, :class:`SamplerIdentity`), the
  per-step rules ``steps[s]`` (:class:`StepRule`), ``sync_refresh_steps`` (steps where every block
  recomputes everything), the token scores (:class:`ScoreConfig` per unit kind), an optional
  whole-model skip rule (:class:`ModelSkip`: TeaCache's or First-Block Cache's indicator), the
  ``forecast`` mode of reused outputs and the predicted FLOPs ratio;
- :class:`StepRule` -- ``model`` (``compute`` | ``reuse`` | ``adaptive``) and one :class:`BlockRule`
  per transformer block;
- :class:`BlockRule` -- one :class:`Rule` for each unit of a block: ``attn`` (attention output per
  token), ``moe`` (the whole MoE output per token: ``always`` means "decide per branch", ``routing``
  means routing-aware: the router runs, a token whose routed experts changed since the last synchronized
  refresh is decided per branch (its newly routed pairs computed, its kept branches forecast) and every other
  token's whole MoE output is forecast per token; anything else is token-level reuse of the whole MoE output,
  ToCa/FORA-like), ``shared`` (shared expert output per
  token) and ``experts[e]`` (routed expert ``e``'s unweighted output per (token, expert) pair);
- :class:`Rule` -- ``always`` (recompute every token), ``never`` (reuse every cached token),
  ``fraction f`` (recompute the ``ceil(f * n)`` cached tokens with the highest score, reuse the rest),
  ``threshold x`` (recompute the cached tokens whose score exceeds ``x``). Tokens without a cache
  entry (first step, a batch-size change, a newly routed (token, expert) pair) are always computed.

JSON encoding of a rule: the strings ``"always"`` (recompute) / ``"reuse"`` (reuse or forecast the cached
output) / ``"routing"`` (a ``moe`` rule only, see above) or ``{"fraction": f}`` / ``{"threshold": x}``.

``forecast`` says what a reused output is: ``none`` -- the cached output as last computed (plain
reuse); ``linear`` -- the first-order extrapolation from the unit's last two computed outputs,
``y1 + (y1 - y0) * (s - s1) / (s1 - s0)`` per token (or per (token, expert) pair), where ``s1``/``s0``
are the steps at which they were computed and ``s`` is the current step; ``taylor`` -- TaylorSeer's
finite-difference Taylor expansion of order ``m = forecast_order``: derivative estimates
``d_0 = y[s_n]``, ``d_{i+1}(s_n) = (d_i(s_n) - d_i(s_n-1)) / (s_n - s_n-1)`` (each divided by the spacing
*at the step it was formed*), evaluated as ``sum_i d_i(s_n) k^i / i!`` with ``k = s - s_n``;
``polynomial`` -- the interpolating (Newton / Lagrange) polynomial through the last ``m + 1`` computed
outputs, evaluated at ``s``. The two agree at order 1 (both are ``linear``, bit for bit) and differ from
order 2 on, *also* with equally spaced refreshes ``N``: at order 2 ``taylor = polynomial - (k N / 2) d_2``
(the Taylor form estimates the second derivative one refresh back). ``forecast_order`` (1..4) is the
order of ``taylor`` and ``polynomial``; ``none`` ignores it. A row computed fewer than ``m + 1`` times
so far uses the order its history allows (computed once: plain reuse), as TaylorSeer does while its
derivative table fills. Forecast state is float32 whatever the model dtype.

``token_selection`` names how a scored rule picks its tokens (a hook the replay engine implements, so a
caching method never needs its own runtime): ``{"kind": "moeca_score"}`` (default; the highest online
scores over the whole batch) or ``{"kind": "toca", "soft_fresh_weight", "fresh_threshold",
"spatial_bonus", "spatial_grid"}`` (ToCa's ``similarity`` score: per sample ``normalize_L2(1 - cos(x, c))``,
``x`` the unit's input and ``c`` its cached output, plus ``soft_fresh_weight * age / fresh_threshold``, then
the 2x2 spatial bonus; applies to the whole-MoE ``fraction`` rules, other rules keep the MoECa score).

Format versions: 2 added ``forecast``; 3 added ``taylor``, ``forecast_order`` and ``token_selection``;
4 renamed version 3's ``taylor`` (the interpolating polynomial) to ``polynomial``, made ``taylor``
TaylorSeer's finite-difference expansion and added ``model_skip.indicator`` / ``first_blocks`` /
``last_blocks``; 5 renamed the rule ``never`` (which meant: always reuse) to ``reuse``; 6 added the ``moe``
rule ``routing``. Version-1 files are
read as ``forecast: none``, version-1/2 files as order 1 and ``moeca_score``, version-3 ``taylor`` as
``polynomial`` (what those files were replayed with), version-1..4 ``never`` rules as ``reuse``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

from moeca.analysis.flops import block_unit_flops
from moeca.common.jsontext import JSONInputError, read_json

FORMAT_VERSION = 6
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6)
FORECASTS = ("none", "linear", "taylor", "polynomial")
MAX_FORECAST_ORDER = 4
TOKEN_SELECTIONS = ("moeca_score", "toca")
SCHEMA_FILE = "schedule.schema.json"
MODEL_SKIP_INDICATORS = ("modulated_input", "first_blocks_residual")
RuleMode = Literal["always", "reuse", "fraction", "threshold", "routing"]
ModelMode = Literal["compute", "reuse", "adaptive"]
UNIT_KINDS = ("attn", "moe", "shared", "expert")


class ScheduleError(ValueError):
    """A malformed schedule file; the message names the bad field."""


class ScheduleMismatch(ValueError):
    """A well-formed schedule used with a model or sampler it was not derived for; names the field."""


# ----------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class Rule:
    """Refresh rule of one unit at one (step, block[, expert]).

    mode: ``always`` | ``reuse`` | ``fraction`` | ``threshold`` | ``routing`` (a block's ``moe`` rule only:
    routing-aware, see the module docstring). value: for ``fraction`` the share in
    [0, 1] of cached tokens recomputed (the highest scores); for ``threshold`` the score above which a
    cached token is recomputed (>= 0); unused otherwise.
    """

    mode: RuleMode = "always"
    value: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in ("always", "reuse", "fraction", "threshold", "routing"):
            raise ScheduleError(f"rule mode {self.mode!r} must be always, reuse, fraction, threshold or routing "
                                "(routing: a block's moe rule only)")
        if self.mode == "fraction" and not 0.0 <= self.value <= 1.0:
            raise ScheduleError(f"fraction rule value {self.value} must lie in [0, 1]")
        if self.mode == "threshold" and not (self.value >= 0 and math.isfinite(self.value)):
            raise ScheduleError(f"threshold rule value {self.value} must be a finite number >= 0")

    @property
    def scored(self) -> bool:
        """Whether this rule needs the online token score."""
        return self.mode in ("fraction", "threshold")

    def expected_refresh(self) -> float:
        """Expected share of cached tokens recomputed (threshold rules count as 0.5, a guess)."""
        return {"always": 1.0, "reuse": 0.0, "fraction": self.value, "threshold": 0.5, "routing": 0.0}[self.mode]

    def to_json(self) -> Any:
        if self.mode in ("always", "reuse", "routing"):
            return self.mode
        return {self.mode: self.value}

    @classmethod
    def from_json(cls, data: Any) -> "Rule":
        if isinstance(data, str):
            return cls(data)  # type: ignore[arg-type]
        ((mode, value),) = data.items()
        return cls(mode, float(value))

    @classmethod
    def fraction(cls, f: float) -> "Rule":
        """``fraction f`` with the degenerate ends written as ``reuse`` / ``always``."""
        f = min(max(float(f), 0.0), 1.0)
        return cls("reuse") if f <= 0.0 else cls("always") if f >= 1.0 else cls("fraction", round(f, 6))


ALWAYS = Rule("always")
REUSE = Rule("reuse")
ROUTING = Rule("routing")


@dataclass(frozen=True)
class BlockRule:
    """Rules of one block at one step (see the module docstring for the unit semantics)."""

    attn: Rule = ALWAYS
    moe: Rule = ALWAYS
    shared: Rule = ALWAYS
    experts: tuple[Rule, ...] = ()

    def __post_init__(self) -> None:
        for unit, rules in (("attn", (self.attn,)), ("shared", (self.shared,)), ("experts", self.experts)):
            if any(r.mode == "routing" for r in rules):
                raise ScheduleError(f"block rule field {unit}: the rule routing applies to the moe rule only")
        if self.moe.mode == "routing" and any(r.mode != "reuse" for r in (self.attn, self.shared, *self.experts)):
            raise ScheduleError("block rule field moe: the rule routing forecasts every unit it does not have to "
                                "compute, so attn, shared and every expert rule must be reuse")

    @property
    def computes_all(self) -> bool:
        return all(r.mode == "always" for r in (self.attn, self.moe, self.shared, *self.experts))

    def to_json(self) -> dict:
        return {"attn": self.attn.to_json(), "moe": self.moe.to_json(), "shared": self.shared.to_json(),
                "experts": [r.to_json() for r in self.experts]}

    @classmethod
    def from_json(cls, data: Mapping) -> "BlockRule":
        return cls(Rule.from_json(data["attn"]), Rule.from_json(data["moe"]), Rule.from_json(data["shared"]),
                   tuple(Rule.from_json(r) for r in data["experts"]))

    @classmethod
    def full(cls, num_experts: int) -> "BlockRule":
        return cls(experts=(ALWAYS,) * num_experts)


@dataclass(frozen=True)
class StepRule:
    """Rules of one sampling step: the whole-model mode and one :class:`BlockRule` per block.

    model: ``compute`` (run the blocks under their rules), ``reuse`` (skip all blocks and add the
    cached residual of the last computed step) or ``adaptive`` (decide with :class:`ModelSkip`).
    """

    model: ModelMode = "compute"
    blocks: tuple[BlockRule, ...] = ()

    def to_json(self) -> dict:
        return {"model": self.model, "blocks": [b.to_json() for b in self.blocks]}

    @classmethod
    def from_json(cls, data: Mapping) -> "StepRule":
        return cls(data["model"], tuple(BlockRule.from_json(b) for b in data["blocks"]))


@dataclass(frozen=True)
class ScoreConfig:
    """Online token score of one unit kind: ``drift_weight * D + staleness_weight * age``.

    ``D`` is the relative L2 change of the unit's *input* (attention: the modulated ``norm1`` output;
    MoE, shared and routed experts: the modulated ``norm2`` output) accumulated over the steps since
    the token's cached output was last computed; ``age`` is the number of steps since then.
    """

    drift_weight: float = 1.0
    staleness_weight: float = 0.0

    def __post_init__(self) -> None:
        for name in ("drift_weight", "staleness_weight"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ScheduleError(f"score {name} must be a finite number >= 0, got {v}")

    def to_json(self) -> dict:
        return {"drift_weight": self.drift_weight, "staleness_weight": self.staleness_weight}


@dataclass(frozen=True)
class ModelSkip:
    """Whole-model skip, used on steps whose ``model`` mode is ``adaptive``; ``indicator`` names the rule.

    ``modulated_input`` (TeaCache): each forward computes the first block's modulated attention input
    ``m`` and its relative L1 change ``r = mean|m - m_prev| / mean|m_prev|`` against the previous forward,
    rescaled by the polynomial ``poly`` (coefficients, highest power first, as ``numpy.polyval``). The
    rescaled changes accumulate since the last computed step; while the sum stays below ``threshold`` the
    blocks are skipped and the cached residual (output minus input of all blocks at the last computed
    step) is added instead.

    ``first_blocks_residual`` (First-Block Cache; DBCache's ``Fn`` / ``Bn``): each forward runs the first
    ``first_blocks`` blocks and compares their residual ``r`` (output minus input) with the one of the last
    *computed* forward, ``d = mean|r - r_prev| / mean|r_prev|`` (no accumulation, ``poly`` unused); when
    ``d < threshold`` the middle blocks are skipped and their cached residual is added, else they run and
    their residual and ``r`` are cached. The last ``last_blocks`` blocks always run.
    """

    threshold: float
    poly: tuple[float, ...] = (1.0, 0.0)
    indicator: str = "modulated_input"
    first_blocks: int = 1
    last_blocks: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise ScheduleError(f"model_skip.threshold must be a finite number >= 0, got {self.threshold}")
        if not self.poly or not all(math.isfinite(c) for c in self.poly):
            raise ScheduleError("model_skip.poly must be a non-empty list of finite coefficients")
        if self.indicator not in MODEL_SKIP_INDICATORS:
            raise ScheduleError(f"field model_skip.indicator: {self.indicator!r} is not one of "
                                f"{', '.join(MODEL_SKIP_INDICATORS)}")
        if not isinstance(self.first_blocks, int) or self.first_blocks < 1 or not isinstance(self.last_blocks, int) \
                or self.last_blocks < 0:
            raise ScheduleError(f"field model_skip: first_blocks must be an integer >= 1 and last_blocks >= 0, got "
                                f"{self.first_blocks!r} and {self.last_blocks!r}")

    @classmethod
    def from_json(cls, data: Mapping) -> "ModelSkip":
        return cls(float(data["threshold"]), tuple(data["poly"]), data.get("indicator", "modulated_input"),
                   data.get("first_blocks", 1), data.get("last_blocks", 0))

    def rescale(self, r: float) -> float:
        out = 0.0
        for c in self.poly:
            out = out * r + c
        return out

    def to_json(self) -> dict:
        return {"threshold": self.threshold, "poly": list(self.poly), "indicator": self.indicator,
                "first_blocks": self.first_blocks, "last_blocks": self.last_blocks}


@dataclass(frozen=True)
class TokenSelection:
    """How scored rules pick tokens (the engine's named selection hook; see the module docstring).

    kind: ``moeca_score`` (highest online score over the batch) or ``toca`` (per sample; the other
    fields are ToCa's knobs: ``soft_fresh_weight`` and ``fresh_threshold`` weight the staleness term,
    ``spatial_bonus`` is the s4 bonus of the best token of each ``spatial_grid`` x ``spatial_grid`` patch).
    """

    kind: str = "moeca_score"
    soft_fresh_weight: float = 0.25
    fresh_threshold: int = 4
    spatial_bonus: float = 0.6
    spatial_grid: int = 2

    def __post_init__(self) -> None:
        if self.kind not in TOKEN_SELECTIONS:
            raise ScheduleError(f"field token_selection.kind: {self.kind!r} is not one of {', '.join(TOKEN_SELECTIONS)}")
        if not (math.isfinite(self.soft_fresh_weight) and self.soft_fresh_weight >= 0):
            raise ScheduleError(f"field token_selection.soft_fresh_weight: must be a finite number >= 0, got "
                                f"{self.soft_fresh_weight}")
        if not (math.isfinite(self.spatial_bonus) and self.spatial_bonus >= 0):
            raise ScheduleError(f"field token_selection.spatial_bonus: must be a finite number >= 0, got "
                                f"{self.spatial_bonus}")
        for name in ("fresh_threshold", "spatial_grid"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ScheduleError(f"field token_selection.{name}: must be an integer >= 1, got {v!r}")

    def to_json(self) -> dict:
        if self.kind == "moeca_score":
            return {"kind": self.kind}
        return {"kind": self.kind, "soft_fresh_weight": self.soft_fresh_weight,
                "fresh_threshold": self.fresh_threshold, "spatial_bonus": self.spatial_bonus,
                "spatial_grid": self.spatial_grid}

    @classmethod
    def from_json(cls, data: Mapping | None) -> "TokenSelection":
        return cls() if data is None else cls(**data)


# ----------------------------------------------------------------------------- identities
@dataclass(frozen=True)
class ModelIdentity:
    """The model a schedule was derived for. ``weights_hash`` None = any weights of this architecture."""

    name: str
    fingerprint: str
    weights_hash: str | None
    depth: int
    num_experts: int
    top_k: int
    num_tokens: int
    hidden_size: int
    expert_hidden: int
    shared_hidden: int

    @classmethod
    def of(cls, config, weights_hash: str | None = None) -> "ModelIdentity":
        """From a :class:`~moeca.models.config.DiTMoEConfig` (and optionally its weights hash)."""
        return cls(config.name, config.fingerprint(), weights_hash, config.depth, config.num_experts,
                   config.top_k, config.num_tokens, config.hidden_size, config.expert_hidden, config.shared_hidden)

    def unit_flops(self) -> dict[str, float]:
        """FLOPs per token of attention, shared expert and router, and per (token, expert) pair."""
        unit = block_unit_flops(self.hidden_size, self.expert_hidden, self.shared_hidden, self.num_tokens,
                                self.num_experts)
        return {k: unit[k] for k in ("attn", "shared", "expert", "router")}

    def to_json(self) -> dict:
        return {"name": self.name, "fingerprint": self.fingerprint, "weights_hash": self.weights_hash,
                "depth": self.depth, "num_experts": self.num_experts, "top_k": self.top_k,
                "num_tokens": self.num_tokens, "hidden_size": self.hidden_size,
                "expert_hidden": self.expert_hidden, "shared_hidden": self.shared_hidden}


@dataclass(frozen=True)
class SamplerIdentity:
    """The sampler a schedule was derived for: ``kind``, ``num_steps``, ``cfg_mode``, ``guided``."""

    kind: str
    num_steps: int
    cfg_mode: str = "batched"
    guided: bool = True

    @classmethod
    def of(cls, sampler_cfg) -> "SamplerIdentity":
        """From a :class:`~moeca.diffusion.samplers.SamplerConfig`."""
        return cls(sampler_cfg.kind, sampler_cfg.num_steps, sampler_cfg.cfg_mode, bool(sampler_cfg.guided))

    def to_json(self) -> dict:
        return {"kind": self.kind, "num_steps": self.num_steps, "cfg_mode": self.cfg_mode, "guided": self.guided}


# ----------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class Schedule:
    """A complete replay schedule. ``steps`` has one entry per sampling step (step 0 = noisiest)."""

    method: str
    model: ModelIdentity
    sampler: SamplerIdentity
    steps: tuple[StepRule, ...]
    sync_refresh_steps: tuple[int, ...] = ()
    scores: Mapping[str, ScoreConfig] = field(default_factory=lambda: {k: ScoreConfig() for k in UNIT_KINDS})
    model_skip: ModelSkip | None = None
    forecast: str = "none"
    predicted_flops_ratio: float | None = None
    forecast_order: int = 1
    token_selection: TokenSelection = field(default_factory=TokenSelection)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        check_structure(self)
        object.__setattr__(self, "_sync", frozenset(self.sync_refresh_steps))  # fast lookups, not fields
        object.__setattr__(self, "_full", BlockRule.full(self.model.num_experts))

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def is_sync(self, step: int) -> bool:
        return step in self._sync

    def rule(self, step: int, block: int) -> BlockRule:
        """The effective rule of ``block`` at ``step`` (a sync step computes everything)."""
        if self.is_sync(step):
            return self._full
        return self.steps[step].blocks[block]

    @property
    def forecast_degree(self) -> int:
        """Order of the forecast: 0 for ``none`` (plain reuse), 1 for ``linear``, else ``forecast_order``.
        The engine keeps ``degree + 1`` computed values per cached row."""
        return {"none": 0, "linear": 1}.get(self.forecast, self.forecast_order)

    @property
    def forecast_kind(self) -> str:
        """How the engine weighs the kept values: ``taylor`` (finite differences) or ``polynomial``
        (interpolation; also ``linear`` and ``none``, where the two coincide)."""
        return "taylor" if self.forecast == "taylor" else "polynomial"

    def score(self, kind: str) -> ScoreConfig:
        return self.scores.get(kind, ScoreConfig())

    def uses_scores(self, block: int, kind: str) -> bool:
        """Whether any step scores tokens of this unit kind in this block (drift must be tracked)."""
        for s, step in enumerate(self.steps):
            if self.is_sync(s):
                continue
            b = step.blocks[block]
            rules = b.experts if kind == "expert" else (getattr(b, kind),)
            if any(r.scored for r in rules):
                return True
        return False

    @property
    def uses_model_skip(self) -> bool:
        return any(st.model != "compute" for s, st in enumerate(self.steps) if not self.is_sync(s))

    def computed_share_floor(self) -> float:
        """The least share (0..1) of the blocks' FLOPs the rules compute: synchronized steps and ``always`` rules
        in full, ``fraction f`` rules ``f``; ``threshold`` and ``never`` rules and ``reuse``/``adaptive`` steps
        nothing; a routed (``always``) or routing-aware (``routing``) MoE its router and its experts' rules. Newly
        routed pairs and forecasts only add to it, so a ``predicted_flops_ratio`` below it contradicts the rules."""
        flops, k = self.model.unit_flops(), self.model.top_k
        moe_full = flops["router"] + flops["shared"] + k * flops["expert"]
        full = flops["attn"] + moe_full
        floor = {"always": 1.0, "fraction": None, "threshold": 0.0, "reuse": 0.0}

        def least(rule: Rule) -> float:
            value = floor[rule.mode]
            return float(rule.value) if value is None else value

        total = 0.0
        for s, step in enumerate(self.steps):
            if self.is_sync(s):
                total += 1.0
                continue
            if step.model != "compute":
                continue
            for b in step.blocks:
                moe = least(b.moe) * moe_full if b.moe.mode not in ("always", "routing") else (
                    flops["router"] + least(b.shared) * flops["shared"]
                    + k * flops["expert"] * sum(least(r) for r in b.experts) / len(b.experts))
                total += (least(b.attn) * flops["attn"] + moe) / full / len(step.blocks)
        return total / max(len(self.steps), 1)

    def check_predicted_ratio(self, where: str = "schedule") -> None:
        """Refuse a ``predicted_flops_ratio`` the rules and ``sync_refresh_steps`` cannot have (below
        :meth:`computed_share_floor`): the file was edited, and replay would not do what it advertises."""
        ratio = self.predicted_flops_ratio
        if ratio is None:
            return
        least = self.computed_share_floor()
        if ratio < least - 0.01:
            raise ScheduleError(
                f"{where}: field predicted_flops_ratio is {ratio:.3f} ({1 / ratio:.2f}x) but its sync_refresh_steps "
                f"({len(self.sync_refresh_steps)} of {self.num_steps} steps) and step rules compute at least "
                f"{least:.3f} of the FLOPs ({1 / least:.2f}x at most); the fields contradict each other (the file "
                "was edited). Derive the schedule again with `moeca schedule derive`")

    def unchecked_weights_note(self, where: str, weights_hash: str) -> str | None:
        """A warning when the schedule records no weights hash (``model.weights_hash`` null): replay then cannot
        check it was derived for the weights ``weights_hash``. None when it records one (then it is checked)."""
        if self.model.weights_hash:
            return None
        return (f"warning: {where} records no weights hash (field model.weights_hash is null), so moeca cannot check "
                f"that it was derived for these weights ({weights_hash}); it is replayed on them as for any weights "
                f"of model fingerprint {self.model.fingerprint}. Derive it from a trace of these weights to have "
                "them checked")

    # -- serialisation -----------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "format_version": self.format_version,
            "method": self.method,
            "model": self.model.to_json(),
            "sampler": self.sampler.to_json(),
            "sync_refresh_steps": list(self.sync_refresh_steps),
            "scores": {k: v.to_json() for k, v in self.scores.items()},
            "model_skip": None if self.model_skip is None else self.model_skip.to_json(),
            "forecast": self.forecast,
            "forecast_order": self.forecast_order,
            "token_selection": self.token_selection.to_json(),
            "predicted_flops_ratio": self.predicted_flops_ratio,
            "provenance": dict(self.provenance),
            "steps": [s.to_json() for s in self.steps],
        }

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write JSON atomically (temporary name, then rename); validates against the schema first.

        An existing file is replaced only if moeca wrote it (``moeca.common.outputs.written_by_moeca``)
        or ``overwrite``."""
        path = Path(path)
        data = self.to_json()
        validate_json(data, where=str(path))
        from moeca.common.outputs import atomic_write_text  # temp sibling + fsync + rename; OSError -> message
        return atomic_write_text(path, json.dumps(data, indent=1, sort_keys=False) + "\n", what="schedule",
                                 make_parents=True, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Schedule":
        """Read and validate a schedule file; a malformed file raises :class:`ScheduleError` naming the field."""
        path = Path(path)
        if path.is_dir():
            raise ScheduleError(f"schedule {path} is a folder, not a schedule file; give the JSON file inside it "
                                "(e.g. the --out of `moeca schedule derive`)")
        if not path.is_file():
            raise FileNotFoundError(f"schedule file {path} does not exist; create one with `moeca schedule derive`")
        try:
            data = read_json(path, "schedule", "derive it again with `moeca schedule derive`")
        except JSONInputError as exc:
            raise ScheduleError(str(exc)) from None
        return cls.from_json(data, where=str(path))

    @classmethod
    def from_json(cls, data: Any, where: str = "schedule") -> "Schedule":
        data = _rules_renamed(data)
        validate_json(data, where=where)
        try:
            schedule = cls(
                method=data["method"],
                model=ModelIdentity(**data["model"]),
                sampler=SamplerIdentity(**data["sampler"]),
                steps=tuple(StepRule.from_json(s) for s in data["steps"]),
                sync_refresh_steps=tuple(data["sync_refresh_steps"]),
                scores={k: ScoreConfig(**v) for k, v in data["scores"].items()},
                model_skip=None if data["model_skip"] is None else ModelSkip.from_json(data["model_skip"]),
                forecast=_forecast_of(data),
                forecast_order=data.get("forecast_order", 1),
                token_selection=TokenSelection.from_json(data.get("token_selection")),
                predicted_flops_ratio=data["predicted_flops_ratio"],
                provenance=data.get("provenance", {}),
                format_version=FORMAT_VERSION,  # older readable versions are a subset of this one
            )
        except (ScheduleError, TypeError) as exc:
            raise ScheduleError(f"{where}: {exc}") from None
        schedule.check_predicted_ratio(where)
        return schedule

    # -- compatibility ------------------------------------------------------------------------
    def check_compatible(self, config, sampler_cfg=None, weights_hash: str | None = None) -> None:
        """Refuse a model/sampler this schedule was not derived for; the message names the field.

        config: the model's ``DiTMoEConfig``; sampler_cfg: a ``SamplerConfig`` (optional);
        weights_hash: the model's weights hash (checked only when both sides have one).
        """
        m = self.model
        if config.fingerprint() != m.fingerprint:
            raise ScheduleMismatch(
                f"schedule field model.fingerprint: the schedule was derived for model {m.name!r} (fingerprint "
                f"{m.fingerprint}, depth {m.depth}, {m.num_experts} experts) but the model is {config.name!r} "
                f"(fingerprint {config.fingerprint()}, depth {config.depth}, {config.num_experts} experts); "
                "derive a schedule for this model with `moeca schedule derive`")
        # deferred: loads torch, and this module is imported at `moeca` start-up
        from moeca.diffusion.samplers import check_sampler_objective
        try:                                     # every path (CLI, replay_compare, the explorer) passes here
            check_sampler_objective(self.sampler.kind, config.objective, "schedule field sampler.kind:")
        except ValueError as exc:
            raise ScheduleMismatch(f"{exc}; derive the schedule from a trace sampled with a sampler this model "
                                   "was trained for") from None
        if weights_hash is not None and m.weights_hash is not None and weights_hash != m.weights_hash:
            raise ScheduleMismatch(
                f"schedule field model.weights_hash: the schedule was derived for weights {m.weights_hash} but "
                f"the loaded weights hash to {weights_hash}; derive a schedule from traces of these weights")
        if sampler_cfg is not None:
            s = self.sampler
            ours = SamplerIdentity.of(sampler_cfg)
            for name in ("kind", "num_steps", "guided"):
                if getattr(ours, name) != getattr(s, name):
                    raise ScheduleMismatch(
                        f"schedule field sampler.{name}: the schedule was derived for {name}={getattr(s, name)!r} "
                        f"but the sampler has {name}={getattr(ours, name)!r}; derive a schedule for this sampler")
            if s.guided and ours.cfg_mode != s.cfg_mode:
                raise ScheduleMismatch(
                    f"schedule field sampler.cfg_mode: the schedule was derived for cfg_mode={s.cfg_mode!r} but "
                    f"the sampler has cfg_mode={ours.cfg_mode!r}")

    def with_provenance(self, **extra: Any) -> "Schedule":
        return replace(self, provenance={**self.provenance, **extra})


def _rules_renamed(data: Any) -> Any:
    """A format 1-4 file with its ``never`` rules (always reuse) written as format 5's ``reuse``; others as
    they are (a format-5 file saying ``never`` is refused by the schema, naming the field)."""
    if not (isinstance(data, dict) and isinstance(data.get("format_version"), int) and data["format_version"] < 5
            and isinstance(data.get("steps"), list)):
        return data

    def rename(value: Any) -> Any:
        if value == "never":
            return "reuse"
        if isinstance(value, list):
            return [rename(v) for v in value]
        if isinstance(value, dict):
            return {k: rename(v) for k, v in value.items()}
        return value

    return {**data, "steps": rename(data["steps"])}


def _forecast_of(data: Mapping) -> str:
    """The file's forecast in this version's names (version 3's ``taylor`` was the interpolating polynomial)."""
    forecast = data.get("forecast", "none")
    return "polynomial" if forecast == "taylor" and data.get("format_version") == 3 else forecast


# ----------------------------------------------------------------------------- validation
def schema() -> dict:
    """The published JSON Schema of the schedule format."""
    return json.loads(resources.files("moeca.policy").joinpath(SCHEMA_FILE).read_text())


def _path(parts: Iterable) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def validate_json(data: Any, where: str = "schedule") -> None:
    """Validate parsed JSON against the schema; raise :class:`ScheduleError` naming the bad field."""
    # deferred: loads jsonschema, and this module is imported at `moeca` start-up
    import jsonschema

    if isinstance(data, dict) and data.get("format_version") not in (None, *READABLE_VERSIONS) \
            and isinstance(data.get("format_version"), int):
        raise ScheduleError(f"{where}: field format_version: this moeca reads schedule format versions "
                            f"{', '.join(map(str, READABLE_VERSIONS))}, the file has {data['format_version']}; "
                            "re-derive the schedule with this moeca")
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: (len(list(e.absolute_path)), str(e.absolute_path)))
    if errors:
        err = jsonschema.exceptions.best_match(errors)
        field_path = _path(err.absolute_path)
        raise ScheduleError(f"{where}: field {field_path}: {err.message}")


def check_structure(s: Schedule) -> None:
    """Semantic checks the JSON Schema cannot express (lengths against the model, step ranges)."""
    m, n = s.model, len(s.steps)
    if s.format_version != FORMAT_VERSION:
        raise ScheduleError(f"field format_version: expected {FORMAT_VERSION}, got {s.format_version}")
    if s.forecast not in FORECASTS:
        raise ScheduleError(f"field forecast: {s.forecast!r} is not one of {', '.join(FORECASTS)}")
    if not isinstance(s.forecast_order, int) or isinstance(s.forecast_order, bool) \
            or not 1 <= s.forecast_order <= MAX_FORECAST_ORDER:
        raise ScheduleError(f"field forecast_order: {s.forecast_order!r} must be an integer in 1..{MAX_FORECAST_ORDER}")
    if s.forecast == "linear" and s.forecast_order != 1:
        raise ScheduleError(f"field forecast_order: forecast 'linear' is order 1, got {s.forecast_order}; use "
                            "forecast 'taylor' or 'polynomial' for higher orders")
    if not isinstance(s.token_selection, TokenSelection):
        raise ScheduleError("field token_selection: expected a TokenSelection (JSON: {\"kind\": \"moeca_score\"})")
    from moeca.policy.methods import METHOD_NAMES  # the registry (imports this module: import here)
    if s.method not in (*METHOD_NAMES, "custom"):
        raise ScheduleError(f"field method: {s.method!r} is not one of {', '.join((*METHOD_NAMES, 'custom'))}")
    if n != s.sampler.num_steps:
        raise ScheduleError(f"field steps: {n} step rules but sampler.num_steps is {s.sampler.num_steps}")
    for i, step in enumerate(s.steps):
        if step.model not in ("compute", "reuse", "adaptive"):
            raise ScheduleError(f"field steps[{i}].model: {step.model!r} must be compute, reuse or adaptive")
        if len(step.blocks) != m.depth:
            raise ScheduleError(f"field steps[{i}].blocks: {len(step.blocks)} block rules but model.depth is {m.depth}")
        for b, block in enumerate(step.blocks):
            if len(block.experts) != m.num_experts:
                raise ScheduleError(f"field steps[{i}].blocks[{b}].experts: {len(block.experts)} expert rules but "
                                    f"model.num_experts is {m.num_experts}")
    for j, st in enumerate(s.sync_refresh_steps):
        if not 0 <= st < n:
            raise ScheduleError(f"field sync_refresh_steps[{j}]: step {st} is outside 0..{n - 1}")
    if list(s.sync_refresh_steps) != sorted(set(s.sync_refresh_steps)):
        raise ScheduleError("field sync_refresh_steps: must be strictly increasing step indices")
    unknown = sorted(set(s.scores) - set(UNIT_KINDS))
    if unknown:
        raise ScheduleError(f"field scores: unknown unit kinds {unknown}; known: {', '.join(UNIT_KINDS)}")
    if any(st.model == "adaptive" for st in s.steps) and s.model_skip is None:
        raise ScheduleError("field model_skip: steps use model 'adaptive' but no model_skip rule is given")
    if s.steps and s.steps[0].model != "compute" and 0 not in s.sync_refresh_steps:
        raise ScheduleError("field steps[0].model: the first step has nothing cached and must be 'compute'")
    if s.predicted_flops_ratio is not None and not (0 < s.predicted_flops_ratio <= 1.5):
        raise ScheduleError(f"field predicted_flops_ratio: {s.predicted_flops_ratio} must lie in (0, 1.5]")


# ----------------------------------------------------------------------------- constructors
def full_schedule(config, sampler_cfg, weights_hash: str | None = None, method: str = "none") -> Schedule:
    """A schedule that computes everything (the ``none`` policy; replay must equal full compute)."""
    steps = tuple(StepRule("compute", tuple(BlockRule.full(config.num_experts) for _ in range(config.depth)))
                  for _ in range(sampler_cfg.num_steps))
    return Schedule(method=method, model=ModelIdentity.of(config, weights_hash),
                    sampler=SamplerIdentity.of(sampler_cfg), steps=steps, sync_refresh_steps=(),
                    predicted_flops_ratio=1.0)
