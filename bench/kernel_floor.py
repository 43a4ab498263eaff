"""What the unavoidable work of an expert-aware forecast step costs with this core's own kernels.

``moeca bench steps``'s *floor* prices the router and the newly routed pairs at full compute's FLOP rate. Two
things it leaves out cannot be engineered away by bookkeeping, so the bench measures them on the device it runs
on and adds a second floor, estimated with its own kernels (``ms_kernels``):

- **The new pairs run as GEMMs of a few rows per expert.** :func:`pair_gemm_ms` times every MoE layer's experts
  (the model's own stacked weights, from wherever they live after the step's other work) on ``j`` rows each, for
  every ``j`` a touched expert gets when the step's new pairs fall on the experts at random (:func:`pairs_ms`):
  one gate-up GEMM, the SwiGLU activation and one down GEMM, what the lean step runs per expert
  (:func:`moeca.replay.units.branch.sorted_swiglu`). At ~10 rows such GEMMs run far below full compute's rate, and
  at 1-2 rows an expert costs the time to stream its weights.
- **Every forecast value is read once.** A branch step reads, per block, each kept value of the attention's,
  the shared expert's and the ``k`` routed branches' histories (``[N, D]`` float32 each); a routing-aware step at
  least the attention's and the whole MoE output's. :func:`read_bandwidth` measures the core's read rate on a
  buffer larger than the last-level cache.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from moeca.models.dispatch import expert_stack

BANDWIDTH_BYTES = 256 * 2 ** 20
"""The read-bandwidth buffer: larger than any last-level cache of the machines this runs on."""


def read_bandwidth(device: torch.device, clock: Callable[[], float] = time.perf_counter, repeats: int = 7) -> float:
    """Bytes per second one pass of a reduction reads from a ``BANDWIDTH_BYTES`` float32 buffer (median; ``clock``:
    seconds, the bench's clock)."""
    buf = torch.ones(BANDWIDTH_BYTES // 4, device=device)
    times = []
    for _ in range(repeats + 1):
        t0 = clock()
        float(buf.sum())
        times.append(clock() - t0)
    return BANDWIDTH_BYTES / statistics.median(times[1:])


def pair_gemm_ms(model, rows: int, clock: Callable[[], float] = time.perf_counter, repeats: int = 5) -> float | None:
    """ms to run every expert of every MoE layer of ``model`` once on ``rows`` rows (median of ``repeats`` passes
    over all layers, so each expert's weights are read from memory as on a step); per expert: the gate-up GEMM,
    SiLU times up, the down GEMM. None when the experts cannot be stacked (not bias-free SwiGLU)."""
    stacks = [expert_stack(block.moe) for block in model.blocks]
    if any(s is None for s in stacks):
        return None
    p = stacks[0].gate_up
    D, H = p.shape[2], stacks[0].hidden
    x = torch.randn(rows, D, device=p.device, dtype=p.dtype)
    gu = x.new_empty(rows, 2 * H)
    y = x.new_empty(rows, D)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            t0 = clock()
            for s in stacks:
                for e in range(s.gate_up.shape[0]):
                    torch.mm(x, s.gate_up[e].t(), out=gu)
                    torch.mm(F.silu(gu[:, :H]).mul_(gu[:, H:]), s.down[e].t(), out=y)
            if p.device.type == "cuda":
                torch.cuda.synchronize(p.device)
            times.append(clock() - t0)
    return statistics.median(times[1:]) * 1e3


def history_bytes(config, rows: int, level: str, kept: int = 2) -> int:
    """Bytes of forecast history one forecast step reads at least: ``kept`` values (2 for a linear forecast) of
    ``[rows, D]`` float32 per unit and block; units: attention, shared expert (if any) and the ``k`` routed branches
    (``branch``), or attention and the whole MoE output (``routing``: a lower bound, the moved tokens' branches
    left out)."""
    shared = 1 if config.shared_expert_ratio > 0 else 0
    units = {"branch": 1 + shared + config.top_k, "routing": 2}[level]
    return config.depth * units * kept * rows * config.hidden_size * 4


def pairs_ms(model, new_pairs: float, clock: Callable[[], float] = time.perf_counter,
             coverage: float = 0.999) -> tuple[float, float] | None:
    """``(ms, mean rows per touched expert)``: ``new_pairs`` newly routed pairs of one step, ``m = new_pairs / depth``
    a block, spread uniformly at random over the ``E`` experts, through GEMMs of the rows each expert gets: an
    expert gets ``j`` rows with the binomial probability ``P(j) = C(m, j) p^j (1 - p)^(m - j)``, ``p = 1 / E``, so
    the step costs ``sum_j P(j) T(j)``, ``T(j)`` = :func:`pair_gemm_ms` at ``j`` rows (every expert of every block),
    over the ``j >= 1`` that hold ``coverage`` of the probability. None when the experts cannot be stacked."""
    config = model.config
    E, L = config.num_experts, config.depth
    m = new_pairs / L
    if m <= 0:
        return 0.0, 0.0
    p = 1.0 / E
    pmf = [math.exp(math.lgamma(m + 1) - math.lgamma(j + 1) - math.lgamma(m - j + 1)
                    + j * math.log(p) + (m - j) * math.log1p(-p)) for j in range(0, int(m) + 1)]
    total, ms = pmf[0], 0.0
    for j in range(1, len(pmf)):
        if total >= coverage:
            break
        t = pair_gemm_ms(model, j, clock)
        if t is None:
            return None
        ms += pmf[j] * t
        total += pmf[j]
    touched = E * (1 - pmf[0])
    return ms, m / touched
