"""What a replay runtime executed, per (step, block): rows per unit, padding, forecast and gather work.

Counts are recorded without host syncs and without touching NumPy inside a forward (so a compiled
forward traces them as plain side effects): every count is appended to a pending list -- a Python int
when the host knows it, a 0-dim tensor when only the device does (the pairs a device-path step
selected) -- and summed into the arrays the first time anyone reads them (one sync per read).
"""
from __future__ import annotations

import numpy as np
import torch

from moeca.policy.cost import UnitCosts


class ReplayCounters:
    """Rows executed per (step, block), and what full compute would have executed.

    Arrays are ``[num_steps, depth]`` int64, read as attributes (``counters.expert[step, block]``):

    - ``attn_q`` (query rows), ``attn_kv`` (K/V rows), ``shared``, ``expert`` ((token, expert) pairs),
      ``router`` -- the units' rows that ran;
    - ``padded`` -- of those rows, the ones that ran only to keep shapes static (device path: a
      ``threshold`` rule computes every row and keeps the selected ones); already in their unit's line;
    - ``forecast`` -- forecast terms: rows extrapolated or pushed into a forecast history times the
      forecast degree (one multiply-add per element each, ``2 D`` FLOPs);
    - ``stack`` -- rows of the folded stack forecast's multiply-adds (:mod:`.units.stack`): rebuilding its
      products after a full refresh (filed under each block) and summing them on a folded step (filed
      under block 0), ``2 D`` FLOPs each; a folded step counts no ``forecast`` terms;
    - ``gather`` -- rows gathered, scattered or merged by the cache bookkeeping (memory traffic, reported
      apart from FLOPs);
    - ``tokens`` / ``pairs`` -- the full-compute references (``N`` and ``N*k`` per visited block).

    ``samples`` counts rows fed to forwards (batched CFG counts both halves), ``skipped_forwards`` the
    forwards whose blocks were skipped whole.
    """

    FIELDS = ("attn_q", "attn_kv", "shared", "expert", "router", "tokens", "pairs", "padded", "forecast", "stack", "gather")

    def __init__(self, num_steps: int, depth: int):
        self._arrays = {f: np.zeros((num_steps, depth), dtype=np.int64) for f in self.FIELDS}
        self._pending: list[tuple[str, int, int, "int | torch.Tensor"]] = []
        self.samples = 0
        self.forwards = 0
        self.skipped_forwards = 0

    def add(self, name: str, step: int, block: int, n: "int | torch.Tensor") -> None:
        """Add ``n`` rows of ``name`` at (step, block); ``n`` may be a device scalar (no sync now)."""
        self._pending.append((name, step, block, n))

    def _flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        tensors = [n.reshape(()).to(torch.int64) for *_, n in pending if isinstance(n, torch.Tensor)]
        read = iter(torch.stack(tensors).cpu().tolist() if tensors else [])
        for name, step, block, n in pending:
            self._arrays[name][step, block] += next(read) if isinstance(n, torch.Tensor) else n

    def __getattr__(self, name: str) -> np.ndarray:
        if name in ReplayCounters.FIELDS:
            self._flush()
            return self._arrays[name]
        raise AttributeError(name)

    def totals(self) -> dict[str, int]:
        self._flush()
        out = {f: int(a.sum()) for f, a in self._arrays.items()}
        out.update(samples=self.samples, forwards=self.forwards, skipped_forwards=self.skipped_forwards)
        return out

    def flops(self, costs: UnitCosts) -> tuple[float, float]:
        """(FLOPs computed, FLOPs of full compute) over everything counted so far.

        Computed FLOPs include padded rows (they are in their unit's line), the forecast terms and the
        folded stack's rows (``2 D`` each); gathers move memory and are not FLOPs (see ``gather``)."""
        t = self.totals()
        fixed = self.samples * costs.fixed_per_sample()
        done = (t["attn_q"] * costs.attn_q + t["attn_kv"] * costs.attn_kv + t["shared"] * costs.shared
                + t["expert"] * costs.expert + t["router"] * costs.router + (t["forecast"] + t["stack"]) * costs.forecast_term)
        full = t["tokens"] * (costs.attn + costs.shared + costs.router) + t["pairs"] * costs.expert
        return float(done + fixed), float(full + fixed)

    def reuse_fractions(self) -> dict[str, float]:
        """Share of rows reused (not computed) per unit kind over everything counted."""
        t = self.totals()
        tok, pairs = max(t["tokens"], 1), max(t["pairs"], 1)
        return {"attn": 1 - t["attn_q"] / tok, "shared": 1 - t["shared"] / tok,
                "expert": 1 - t["expert"] / pairs}
