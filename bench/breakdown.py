"""Where a replay step's time goes: the profiled CPU time of its operators, by the engine part that ran them.

One sampling run under :mod:`torch.profiler` with Python function events (``with_stack``), each step in a
labelled range. Every operator's *self* CPU time is filed under the innermost enclosing Python frame
that a rule of :data:`RULES` names: the router (the runtime's ``route`` seam), the routed experts'
GEMMs (:mod:`moeca.models.dispatch` and the replay's device-path dispatch), forecasts (the Lagrange sums
of :mod:`moeca.replay.forecast` and the stack forecast), gathers and scatters (slot matching, selection
and index copies of the routed unit, history writes); operators under no named frame are the rest
(norms, modulation, residual adds, the sampler, the embedders, the final layer). The profiler slows every
operator by a similar amount, so a part's *share* of the profiled step is what is reported; times the
unprofiled step's milliseconds it gives the part's milliseconds.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Callable

from torch.profiler import ProfilerActivity, profile, record_function

PARTS = ("router", "new pairs", "forecasts", "gathers/scatters", "rest")
FRAME = re.compile(r"^(?P<file>[^()]+)\((?P<line>\d+)\): (?P<func>\S+)$")
HISTORY_WRITES = frozenset({"push_all", "push_rows", "push_where", "forget"})
RULES: tuple[tuple[str, frozenset[str] | None, str], ...] = (
    ("models/runtime.py", frozenset({"route"}), "router"),
    ("models/dispatch.py", None, "new pairs"),
    ("replay/units/dispatch.py", None, "new pairs"),
    ("replay/forecast.py", HISTORY_WRITES, "gathers/scatters"),
    ("replay/forecast.py", None, "forecasts"),
    ("replay/units/stack.py", None, "forecasts"),
    ("replay/units/branch.py", frozenset({"few_pairs", "sorted_swiglu"}), "new pairs"),
    ("replay/units/branch.py", frozenset({"shared_forecast", "routing_forecast", "_rows_forecast"}), "forecasts"),
    ("replay/units/branch.py", frozenset({"branch_block"}), "rest"),
    ("replay/units/routed.py", None, "gathers/scatters"),
    ("replay/units/branch.py", None, "gathers/scatters"),
    ("replay/units/selection.py", None, "gathers/scatters"),
    ("replay/state.py", None, "gathers/scatters"),
)
"""``(path suffix, functions or None for any, part)``; the innermost frame a rule names decides."""


def frame_part(name: str) -> str | None:
    """The part a Python function event (``"path(line): func"``) names, or None."""
    m = FRAME.match(name)
    if m is None:
        return None
    path, func = m["file"].replace("\\", "/"), m["func"]
    for suffix, funcs, part in RULES:
        if path.endswith(suffix) and (funcs is None or func in funcs):
            return part
    return None


def attribute(events) -> dict[int, dict[str, float]]:
    """Self CPU time (µs) per step and part from profiler ``events`` (steps in ``moeca-step-<i>`` ranges)."""
    spans = sorted(((e.time_range.start, -e.time_range.end, e) for e in events), key=lambda t: (t[0], t[1]))
    frames: list[tuple[int, str | None]] = []     # (end, part) of the enclosing Python frames and step ranges
    steps: list[tuple[int, int]] = []
    out: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for start, neg_end, e in spans:
        end = -neg_end
        while frames and frames[-1][0] <= start:
            frames.pop()
        while steps and steps[-1][0] <= start:
            steps.pop()
        if e.name.startswith("moeca-step-"):
            steps.append((end, int(e.name.rsplit("-", 1)[1])))
            continue
        if FRAME.match(e.name):
            frames.append((end, frame_part(e.name)))
            continue
        if not steps:
            continue
        part = next((p for _, p in reversed(frames) if p is not None), "rest")
        out[steps[-1][1]][part] += e.self_cpu_time_total
    return out


def profile_steps(run: Callable[[Callable[[int], None]], None], steps: set[int]) -> dict[str, float]:
    """Profile ``run(on_step)`` -- one sampling run that calls ``on_step(step)`` after each step -- and return
    each part's share (:data:`PARTS`) of the operators' self CPU time over ``steps``."""
    label: list = []

    def on_step(step: int) -> None:
        label.pop().__exit__(None, None, None)
        label.append(record_function(f"moeca-step-{step + 1}"))
        label[-1].__enter__()

    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        label.append(record_function("moeca-step-0"))
        label[-1].__enter__()
        run(on_step)
        label.pop().__exit__(None, None, None)
    per_step = attribute(prof.events())
    totals = {p: sum(per_step[s].get(p, 0.0) for s in steps if s in per_step) for p in PARTS}
    whole = sum(totals.values()) or 1.0
    return {p: totals[p] / whole for p in PARTS}
