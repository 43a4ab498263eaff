"""Wall-clock cost model of a replay: calibrated unit costs (milliseconds) -> predicted time and speedup.

Pure numbers: the measurement that produces :class:`WallClockCosts` runs the model and lives in
:mod:`moeca.replay.calibrate` (``moeca calibrate``); this module only stores, loads and evaluates it.

The model is linear per sampling step (all counts are rows summed over the blocks of the step, batched
CFG counting both halves)::

    ms(step) = step_ms + attn_row_ms * attn + shared_row_ms * shared + pair_ms * pairs
               + forecast_term_ms * reused * order + history_term_ms * pushed * order
               + router_block_ms * routed_blocks + stack_term_ms * stack_terms + new_pair_ms * new_pairs

``step_ms`` is a step that reuses every row plainly without routing: the sampler update, patch embedding,
final layer, and per block the norms and modulation (the batch size is part of the calibration key, so
per-row costs of work done for every row fold into it). ``router_block_ms`` is what a block adds when its
router runs over every row with the slot matching and the per-pair combine (a branch-level forecast step
and a full step route in every block; a token-level forecast step, which forecasts each block's whole MoE
output per token, in none).
The row costs are what computing a row adds over reusing it; ``pair_ms`` prices the pairs a step computes with
its experts' GEMMs over many rows each (full compute, a refresh), ``new_pair_ms`` the newly routed pairs of a
branch-level or routing-aware forecast step (``new_pairs``): a few rows per expert, whose GEMMs run far below
full compute's rate and, at one or two rows, cost the time to stream the expert's weights;
``forecast_term_ms`` what forecasting a reused row adds per polynomial term (``order`` 0 = plain reuse, 1 =
linear, ``p`` = Taylor order ``p``);
``history_term_ms`` what pushing a computed row into the forecast history adds per term;
``stack_term_ms`` a row of the folded stack forecast's work (``moeca.replay.units.stack``: rebuilding its
products after a full refresh, ``2 depth (order + 1) + 1`` rows per token; summing them on a folded step,
up to ``2 (order + 1)``), whose forecast steps have no per-unit ``reused`` rows.
``pushed`` = the computed rows kept in a forecast history: every one at the branch level (attention, shared
and pair rows), attention and whole-MoE rows at the token level (one of each per token and block);
``computed`` = attention + shared rows + pairs computed; ``reused`` = the rest of the step's
``2 N + k N`` rows per block, ``2 N`` in a block that does not route (attention and whole-MoE rows); every
such step has the same total, which is why a per-row cost of plain reuse cannot be told apart from
``step_ms``. ``full_step_ms`` is one step of full compute with the default runtime:
the reference every measured speedup is taken against.

The measurement is the replay stage's (:func:`moeca.replay.calibrate.ensure_costs`); policy never imports
replay, and whoever derives a wall-clock schedule passes the costs in (``DeriveConfig(wallclock=...)``;
``moeca schedule derive --target-speedup`` measures them in :mod:`moeca.cli.schedule`).

Calibrations are cached per key (device name, torch version, replay-engine source hash, model weights
hash, batch, dtype, sampler kind and CFG mode, CPU threads) in one JSON file in the user cache folder
(``$XDG_CACHE_HOME/moeca/calibration.json`` or ``~/.cache/moeca/calibration.json``; ``MOECA_CACHE_DIR``
overrides the folder); a calibration made under another key is never used.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from moeca.common.jsontext import JSONInputError, read_json
from moeca.common.outputs import os_errors, replaced_file

CACHE_FORMAT = 1
CACHE_FILE = "calibration.json"
COEFFICIENTS = ("step_ms", "attn_row_ms", "shared_row_ms", "pair_ms", "forecast_term_ms", "history_term_ms",
                "router_block_ms", "stack_term_ms", "new_pair_ms")


class CalibrationError(ValueError):
    """A calibration file or entry that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class StepWork:
    """The work of one sampling step, rows summed over its blocks (see the module docstring).

    attn / shared: rows computed by attention (queries) and the shared expert; pairs: (token, expert)
    pairs run through a routed expert (padding excluded); reused: rows of the three units not computed
    (reused or forecast; in a block that does not route, attention and whole-MoE rows); order: forecast
    order (0 = plain reuse, 1 = linear, p = Taylor order p); routed_blocks: blocks whose router ran;
    stack_terms: rows of the folded stack forecast's work (see the module docstring); pushed: rows pushed
    into a forecast history (None: every computed row, as at the branch level); new_pairs: the newly routed
    pairs a branch-level or routing-aware forecast step computes (not counted in ``pairs``).
    """

    attn: float
    shared: float
    pairs: float
    reused: float
    order: int
    routed_blocks: float
    stack_terms: float = 0.0
    pushed: float | None = None
    new_pairs: float = 0.0

    def features(self) -> tuple[float, ...]:
        """The row vector of the linear model, in the order of :data:`COEFFICIENTS`."""
        pushed = self.attn + self.shared + self.pairs + self.new_pairs if self.pushed is None else self.pushed
        return (1.0, self.attn, self.shared, self.pairs, self.reused * self.order, pushed * self.order,
                self.routed_blocks, self.stack_terms, self.new_pairs)


@dataclass(frozen=True)
class WallClockCosts:
    """Calibrated costs (milliseconds) of one (device, model weights, batch, dtype, sampler) key.

    step_ms .. history_term_ms: the coefficients of the module docstring's model (all >= 0).
    full_step_ms: one full-compute step of the default runtime (the speedup reference).
    rows_per_block: ``N``, the rows a block sees per step at this batch (``batch * T``, x2 for CFG).
    top_k: routed experts per token. key: the calibration key (a mapping of strings).
    fit_rel_error: median relative error of the fit on the calibration steps; created: ISO time.
    token_folds: whether the replay engine folds token-level forecast steps on this model (the native engine
    always does; the HiDream engine only while the gates move linearly, as its calibration runs showed), so
    a derivation prices them folded (``DeriveConfig.fold``).
    new_pair_ms: see the module docstring; None (costs set by hand) prices new pairs as ``pair_ms``.
    refresh_over_full: the calibration runs' own full steps (every unit computed, histories written) over
    ``full_step_ms``, both timed by the same calibration: near 1 when the machine kept its speed while it ran.
    """

    step_ms: float
    attn_row_ms: float
    shared_row_ms: float
    pair_ms: float
    forecast_term_ms: float
    history_term_ms: float
    router_block_ms: float
    full_step_ms: float
    rows_per_block: int
    top_k: int
    key: Mapping[str, str] = field(default_factory=dict)
    fit_rel_error: float = 0.0
    created: str = ""
    stack_term_ms: float = 0.0
    token_folds: bool = True
    new_pair_ms: float | None = None
    refresh_over_full: float = 1.0

    def __post_init__(self) -> None:
        if self.new_pair_ms is None:
            object.__setattr__(self, "new_pair_ms", self.pair_ms)
        for name in (*COEFFICIENTS, "full_step_ms", "fit_rel_error", "refresh_over_full"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise CalibrationError(f"calibration field {name}: {v!r} must be a finite number >= 0; "
                                       "recalibrate with `moeca calibrate`")
        if not self.full_step_ms > 0:
            raise CalibrationError("calibration field full_step_ms must be > 0; recalibrate with `moeca calibrate`")
        if self.rows_per_block < 1 or self.top_k < 1:
            raise CalibrationError("calibration fields rows_per_block and top_k must be >= 1")

    def step_ms_of(self, work: StepWork) -> float:
        """Predicted milliseconds of one step doing ``work``."""
        coef = tuple(getattr(self, c) for c in COEFFICIENTS)
        return float(sum(c * f for c, f in zip(coef, work.features())))

    def full_step(self, depth: int, order: int, folds: bool = False, level: str = "branch") -> StepWork:
        """A synchronized refresh step: every unit of every block computed (``folds``: and the folded stack
        forecast's products rebuilt); ``level`` says what its forecast histories keep (``token``: attention
        and the whole MoE output per token, ``branch``: every computed row, ``routing``: both)."""
        n = self.rows_per_block * depth
        pushed = {"token": 2.0 * n, "branch": None, "routing": (3.0 + self.top_k) * n}[level]
        return StepWork(attn=n, shared=n, pairs=self.top_k * n, reused=0.0, order=order, routed_blocks=depth,
                        stack_terms=2.0 * (order + 1) * n + self.rows_per_block if folds else 0.0, pushed=pushed)

    def forecast_step(self, depth: int, order: int, new_pairs_per_token: float, level: str = "branch",
                      folded: bool = False, moved_per_token: float = 0.0) -> StepWork:
        """A forecast step of the sync rule. ``branch``: the router runs in every block and only the newly
        routed pairs are computed (``new_pairs_per_token``: newly routed pairs per token summed over the
        blocks, from the trace); ``token``: no router, every block's MoE output forecast per token, unit by
        unit or (``folded``) as the folded stack sum; ``routing`` (routing-aware): the router runs and the new
        pairs are computed as at the branch level, attention and the whole MoE output are forecast per token,
        and the tokens whose routed experts changed since the last refresh (``moved_per_token``: such tokens
        per token summed over the blocks) also forecast their ``k`` branches and the shared expert."""
        n = self.rows_per_block
        if level == "token" and folded:
            return StepWork(attn=0.0, shared=0.0, pairs=0.0, reused=0.0, order=order, routed_blocks=0.0,
                            stack_terms=2.0 * (order + 1) * n)
        if level == "token":   # per block: attention and the whole MoE output, one row per token each
            return StepWork(attn=0.0, shared=0.0, pairs=0.0, reused=2 * n * depth, order=order, routed_blocks=0.0)
        pairs = new_pairs_per_token * n
        if level == "routing":
            reused = 2 * n * depth + (1 + self.top_k) * moved_per_token * n
            return StepWork(attn=0.0, shared=0.0, pairs=0.0, reused=reused, order=order, routed_blocks=depth,
                            new_pairs=pairs)
        return StepWork(attn=0.0, shared=0.0, pairs=0.0, reused=(2 + self.top_k) * n * depth - pairs, order=order,
                        routed_blocks=depth, new_pairs=pairs)

    def predicted_speedup(self, steps: list[StepWork]) -> float:
        """Full compute's time over the predicted time of ``steps`` (one entry per sampling step)."""
        return len(steps) * self.full_step_ms / sum(self.step_ms_of(w) for w in steps)

    def summary(self) -> dict:
        """What a results file records of the calibration it used: key, full step, fit error, creation time."""
        return {"key": dict(self.key), "full_step_ms": self.full_step_ms, "fit_rel_error": self.fit_rel_error,
                "created": self.created}

    def to_json(self) -> dict:
        out = asdict(self)
        out["key"] = dict(self.key)
        return out

    @classmethod
    def from_json(cls, data: Any, where: str = "calibration") -> "WallClockCosts":
        if not isinstance(data, Mapping):
            raise CalibrationError(f"{where}: an entry is not a JSON object; recalibrate with `moeca calibrate`")
        names = {f.name for f in fields(cls)}
        missing = sorted(n for n in names - set(data) if n not in ("key", "fit_rel_error", "created"))
        if missing:
            raise CalibrationError(f"{where}: fields {missing} are missing; recalibrate with `moeca calibrate`")
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except CalibrationError as exc:
            raise CalibrationError(f"{where}: {exc}") from None
        except TypeError as exc:
            raise CalibrationError(f"{where}: {exc}; recalibrate with `moeca calibrate`") from None


def key_id(key: Mapping[str, str]) -> str:
    """The cache file's name for ``key``: its fields sorted, ``name=value`` joined by ``|``."""
    return "|".join(f"{k}={key[k]}" for k in sorted(key))


def cache_path() -> Path:
    """``$MOECA_CACHE_DIR/calibration.json``, else under ``$XDG_CACHE_HOME/moeca`` or ``~/.cache/moeca``."""
    base = os.environ.get("MOECA_CACHE_DIR")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = str(Path(xdg) / "moeca") if xdg else str(Path.home() / ".cache" / "moeca")
    return Path(base) / CACHE_FILE


def check_cache_path(path: Path | None = None) -> Path:
    """The cache file's path, refused (before anything is measured) when it or its folder cannot be a file
    moeca reads and replaces: a folder, a link or another non-file where ``calibration.json`` should be, or a
    file where its folder should be."""
    path = path or cache_path()
    fix = "move it away, or set MOECA_CACHE_DIR to another folder"
    if path.is_symlink() or (path.exists() and not path.is_file()):
        kind = "a symbolic link" if path.is_symlink() else "a folder" if path.is_dir() else "not a regular file"
        raise CalibrationError(f"calibration cache {path} is {kind}, not the cache file moeca writes; {fix}")
    for folder in (path.parent, *path.parent.parents):
        if folder.exists():
            if not folder.is_dir():
                raise CalibrationError(f"calibration cache {path}: {folder} is a file, not a folder; {fix}")
            break
    return path


def _read(path: Path) -> dict:
    check_cache_path(path)
    if not path.exists():
        return {"format": CACHE_FORMAT, "entries": {}}
    try:
        data = read_json(path, "calibration cache", "delete it or run `moeca calibrate` to rewrite it")
    except JSONInputError as exc:
        raise CalibrationError(str(exc).replace("not valid JSON", "is not valid JSON", 1)) from None
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("entries"), dict):
        raise CalibrationError(f"calibration cache {path}: field format must be {CACHE_FORMAT} with an 'entries' "
                               "object; delete the file or run `moeca calibrate` to rewrite it")
    return data


def load_costs(key: Mapping[str, str], path: Path | None = None) -> WallClockCosts | None:
    """The cached calibration of ``key``, or None when there is none (another key, or an entry of an older
    cost model that lacks coefficients, is never used)."""
    path = path or cache_path()
    entry = _read(path)["entries"].get(key_id(key))
    if entry is None:
        return None
    if isinstance(entry, Mapping) and not set(COEFFICIENTS) <= set(entry):
        return None        # measured for an older cost model (fewer coefficients): measure again
    costs = WallClockCosts.from_json(entry, where=f"calibration cache {path}")
    return costs if dict(costs.key) == dict(key) else None


@contextmanager
def _exclusive(path: Path):
    """Hold an exclusive lock on ``.<name>.lock`` beside ``path`` (POSIX ``flock``; where there is none,
    no lock), so concurrent processes' read-modify-writes of the cache do not drop each other's entries."""
    try:
        import fcntl  # POSIX only: where it is missing (Windows) there is no lock
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path.with_name(f".{path.name}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def save_costs(costs: WallClockCosts, path: Path | None = None) -> Path:
    """Add or replace the entry of ``costs.key`` in the cache file (under a lock: read, add, write a
    temporary sibling, rename), keeping the entries other processes saved meanwhile."""
    path = check_cache_path(path)
    with os_errors(f"calibration cache {path}"):
        path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(path):
        try:
            data = _read(path)
        except CalibrationError:
            check_cache_path(path)                           # a folder appeared meanwhile: refuse, do not replace
            data = {"format": CACHE_FORMAT, "entries": {}}  # an unreadable cache is rewritten, not merged
        data["entries"][key_id(costs.key)] = costs.to_json()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with os_errors(f"calibration cache {path}", tmp), replaced_file(path, tmp):
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path
