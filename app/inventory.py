"""Find what the explorer can show under its root: traces, analysis reports, schedules, benchmark results.

Everything is returned as root-relative POSIX paths (strings), so results are cache keys and every later
read goes through :func:`moeca.app.paths.resolve_under` again.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moeca.app.paths import relative_to_root, walk
from moeca.common.jsontext import JSONInputError, parse_json

MAX_JSON_BYTES = 4 << 20
"""JSON files larger than this are not opened during discovery (schedules and results are small)."""

REPORT_MARKERS = ("headline.json", "summary.parquet", "summary.csv")
REPLAY_MARKERS = ("report.json", "full.png", "cached.png")
"""A folder written by ``moeca replay --out`` (its samples.pt is a pickle and is never opened)."""


@dataclass(frozen=True)
class Inventory:
    """Root-relative paths of everything found; each list is sorted.

    unreadable: ``(path, reason)`` of each JSON file discovery could not parse (damaged, not UTF-8, a key
    twice, nested too deeply), so the pages can say which files they skipped and why. Files over
    :data:`MAX_JSON_BYTES` are not opened (nor listed)."""

    traces: tuple[str, ...] = ()
    reports: tuple[str, ...] = ()
    schedules: tuple[str, ...] = ()
    benchmarks: tuple[str, ...] = ()
    replays: tuple[str, ...] = ()
    unreadable: tuple[tuple[str, str], ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.traces or self.reports or self.schedules or self.benchmarks or self.replays)


def load_small_json(path: Path, rel: str) -> object:
    """Parse ``path`` (root-relative ``rel``) as JSON of at most :data:`MAX_JSON_BYTES`, nesting and duplicate
    keys checked; raises :class:`~moeca.common.jsontext.JSONInputError` (a ValueError) naming ``rel`` and the
    problem, or OSError."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise JSONInputError(f"{rel}: {size:,} bytes, more than the {MAX_JSON_BYTES:,} the explorer opens while "
                             "looking for schedules and results (moeca's are far smaller)")
    return parse_json(path.read_bytes(), rel, "fix the file, or move it out of the explorer's root")


def is_schedule(doc: object) -> bool:
    """A MoECa schedule: a JSON object with ``format_version`` and ``method`` (DESIGN section 4)."""
    return isinstance(doc, dict) and "format_version" in doc and "method" in doc and "pareto" not in doc


def is_bench_result(doc: object) -> bool:
    """A ``moeca bench`` result written by ``bench.results.write_results``."""
    return isinstance(doc, dict) and isinstance(doc.get("rows"), list) and "environment" in doc and "name" in doc


def discover(root: Path, max_depth: int = 5) -> Inventory:
    """Walk ``root`` (resolved) and classify folders and JSON files."""
    traces, reports, schedules, benches, replays = [], [], [], [], []
    unreadable: list[tuple[str, str]] = []
    for current, dirs, files in walk(root, max_depth=max_depth):
        names = set(files)
        rel = relative_to_root(root, current)
        if "run.json" in names and ({"branches", "tokens"} & set(dirs)):
            traces.append(rel)
        in_trace = "run.json" in names
        if any(m in names for m in REPORT_MARKERS):
            reports.append(rel)
        if all(m in names for m in REPLAY_MARKERS):
            replays.append(rel)
        if in_trace:
            dirs[:] = []  # a trace's shard folders hold only Parquet files
            continue
        for name in files:
            if not name.endswith(".json") or name in ("run.json", "headline.json") or \
                    (name == "report.json" and all(m in names for m in REPLAY_MARKERS)):
                continue
            path_rel = relative_to_root(root, current / name)
            try:
                if (current / name).stat().st_size > MAX_JSON_BYTES:
                    continue                  # not opened: moeca's schedules and results are far smaller
                doc = load_small_json(current / name, path_rel)
            except (ValueError, OSError) as exc:
                unreadable.append((path_rel, str(exc) if isinstance(exc, ValueError)
                                   else f"{path_rel}: cannot be read ({exc.strerror or type(exc).__name__})"))
                continue
            if is_schedule(doc):
                schedules.append(path_rel)
            elif is_bench_result(doc):
                benches.append(path_rel)
    return Inventory(tuple(sorted(traces)), tuple(sorted(reports)), tuple(sorted(schedules)),
                     tuple(sorted(benches)), tuple(sorted(replays)), tuple(sorted(unreadable)))
