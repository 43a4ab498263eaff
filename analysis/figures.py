"""Report figures (matplotlib, Agg backend; seaborn for the statistical ones: the drift heatmaps and the
per-expert violins). Each function saves one PNG and returns nothing."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from moeca.tracer.schema import TOKEN_UNITS

from .engine import BIN_BAD, GATE_BINS, NB, Partials, metric_bin_lower_edges


def _plt():
    matplotlib.use("Agg", force=False)
    return plt


def _sns():
    """seaborn, imported on first use (it loads scipy.stats); its styles are applied per figure with
    ``sns.axes_style``, never globally, so the matplotlib figures keep their look."""
    _plt()
    return sns


def _save(fig, path: Path) -> None:
    """Lay out, write the PNG (110 dpi) and free the figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def _line_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    """Labels, grid, legend and title of a line plot."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)


def _mean(sum_: np.ndarray, n: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, sum_ / np.maximum(n, 1), np.nan)


def drift_heatmaps(p: Partials, path: Path, lag: int = 1) -> None:
    """Mean rel_l2 at ``lag`` over steps (x) x blocks (y) for each token unit and the routed experts
    (seaborn heatmaps, one colour scale per panel, block 0 at the bottom)."""
    sns = _sns()
    plt = _plt()
    li = lag - 1
    panels = []
    for u, unit in enumerate(TOKEN_UNITS):
        n = p.tu_hist[u, li, :, :, :NB].sum(-1)
        panels.append((unit, _mean(p.tu_sum_rel[u, li], n)))
    n = p.ex_hist[li, ..., :NB].sum(-1).sum(-1)                       # [B, S]
    panels.append(("routed experts (pooled)", _mean(p.ex_sum_rel[li].sum(-1), n)))
    steps, blocks = panels[0][1].shape[1], panels[0][1].shape[0]
    xticks, yticks = np.arange(0, steps, max(1, steps // 10)), np.arange(0, blocks, max(1, blocks // 6))
    with sns.axes_style("white"):
        fig, axes = plt.subplots(len(panels), 1, figsize=(9, 1.7 * len(panels) + 1), sharex=True)
    for ax, (name, m) in zip(axes, panels):
        frame = pd.DataFrame(m, index=pd.RangeIndex(m.shape[0], name="block"))
        # tick labels set afterwards: seaborn redraws the whole figure per heatmap to rotate its own
        sns.heatmap(frame, ax=ax, cmap="magma", mask=np.isnan(m), xticklabels=False, yticklabels=False,
                    cbar_kws={"fraction": 0.03, "label": "rel. L2"})
        ax.set_xticks(xticks + 0.5, [str(v) for v in xticks])
        ax.set_yticks(yticks + 0.5, [str(v) for v in yticks])
        ax.invert_yaxis()
        ax.set_ylabel("block")
        ax.set_title(f"{name}: mean rel. L2 change vs {lag} step(s) back", fontsize=9)
    axes[-1].set_xlabel("sampling step (0 = noisiest)")
    _save(fig, path)


def reuse_vs_error(curves: pd.DataFrame, path: Path, lags: int) -> None:
    """Reusable MoE-FLOP fraction vs resulting mean relative error, token vs branch, per cache age."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    cmap = plt.get_cmap("viridis")
    for ax, view, title in ((axes[0], "lag", "cache exactly L steps old"),
                            (axes[1], "run", "reuse runs of up to N steps (ages 1..N pooled)")):
        for span in range(1, lags + 1):
            color = cmap((span - 1) / max(lags - 1, 1))
            for policy, style in (("branch", "-"), ("token", "--")):
                c = curves[(curves.view == view) & (curves.span == span) & (curves.policy == policy)]
                if c.empty:
                    continue
                x = np.maximum(c.mean_rel_err.to_numpy(), 1e-5)
                ax.plot(x, c.reuse_frac_moe, style, color=color,
                        label=f"{policy}, {'L' if view == 'lag' else 'N'}={span}")
        ax.set_xscale("log")
        ax.set_xlabel("resulting mean relative error of the MoE output")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    axes[0].set_ylabel("fraction of MoE FLOPs reusable")
    fig.suptitle("token-level (dashed) vs expert-branch-level (solid) reuse", fontsize=11)
    _save(fig, path)


def expert_violins(p: Partials, path: Path, lag: int = 1, max_points: int = 4000) -> None:
    """Per-expert distributions of log10 rel_l2 at ``lag`` (pooled over blocks and steps), as seaborn
    violins with quartiles. The distributions come from the pass's histograms: each expert contributes
    ``max_points`` bin centres repeated in proportion to its bin counts."""
    sns = _sns()
    plt = _plt()
    edges = metric_bin_lower_edges()
    centers = np.append((edges[:-1] + edges[1:]) / 2, edges[-1])
    hist = p.ex_hist[lag - 1, ..., :NB].sum(axis=(0, 1))              # [E, NB]
    parts = []
    for e in range(hist.shape[0]):
        h = hist[e]
        if h.sum() == 0:
            continue
        reps = np.round(h / h.sum() * max_points).astype(int)
        vals = np.repeat(centers, reps)
        if len(vals) < 2:
            vals = np.repeat(centers[np.argmax(h)], 2)
        parts.append(pd.DataFrame({"expert": str(e), "value": np.log10(np.maximum(vals, 1e-7))}))
    with sns.axes_style("whitegrid"):
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(parts) + 2), 4))
    if parts:
        sns.violinplot(data=pd.concat(parts, ignore_index=True), x="expert", y="value", hue="expert",
                       palette="viridis", inner="quart", cut=0, density_norm="width", linewidth=0.8, ax=ax,
                       legend=False)
    ax.set_xlabel("expert")
    ax.set_ylabel(f"log10 rel. L2 change vs {lag} step(s) back")
    ax.set_title("per-expert drift distributions (all blocks and steps)", fontsize=10)
    _save(fig, path)


def persistence(p: Partials) -> np.ndarray:
    """``[K, B, S]`` fraction of routed (token, expert) pairs also routed ``lag`` steps back (NaN if none)."""
    nonnull = p.ex_hist[..., :NB].sum(-1) + p.ex_hist[..., BIN_BAD]        # [K, B, S, E]
    routed = p.ex_routed.sum(-1)[None].astype(np.float64)                   # [1, B, S]
    out = _mean(nonnull.sum(-1).astype(np.float64), routed)
    steps = np.arange(p.grid.num_steps)
    for li in range(p.grid.lags):
        out[li, :, steps < li + 1] = np.nan
    return out


def routing_stability(p: Partials, path: Path) -> None:
    """Fraction of routed (token, expert) pairs also routed ``lag`` steps back, per step."""
    plt = _plt()
    pers = persistence(p)
    routed = p.ex_routed.sum(-1)                                              # [B, S]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for b in range(pers.shape[1]):
        axes[0].plot(np.arange(pers.shape[2]), pers[0, b], label=f"block {b}", lw=1)
    axes[0].set_title("lag 1, per block", fontsize=10)
    for li in range(pers.shape[0]):
        w = routed.sum(0)
        num = np.nansum(pers[li] * routed, axis=0)
        y = np.where(np.isnan(pers[li]).all(0), np.nan, num / np.maximum(w, 1))
        axes[1].plot(np.arange(pers.shape[2]), y, label=f"lag {li + 1}")
    axes[1].set_title("all blocks, per lag", fontsize=10)
    for ax in axes:
        ax.set_xlabel("sampling step")
        ax.set_ylabel("fraction of routed pairs also routed then")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def accumulated_drift(p: Partials, path: Path) -> None:
    """Mean rel_l2 vs cache age (lag) per unit: how drift accumulates over a reuse run."""
    plt = _plt()
    K = p.grid.lags
    lags = np.arange(1, K + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    for u, unit in enumerate(TOKEN_UNITS):
        n = p.tu_hist[u, :, :, :, :NB].sum(axis=(1, 2, 3))
        ax.plot(lags, _mean(p.tu_sum_rel[u].sum(axis=(1, 2)), n), "o-", label=unit)
    n = p.ex_hist[..., :NB].sum(axis=(1, 2, 3, 4))
    ax.plot(lags, _mean(p.ex_sum_rel.sum(axis=(1, 2, 3)), n), "s-", color="k", label="routed expert (unweighted)")
    ax.set_xticks(lags)
    _line_axes(ax, "cache age L (steps since last refresh)", "mean relative L2 change",
               "accumulated drift over reuse runs")
    _save(fig, path)


def gate_dependence(p: Partials, path: Path) -> None:
    """Mean expert rel_l2 (lag 1) vs the pair's gate weight."""
    plt = _plt()
    centers = (np.arange(GATE_BINS) + 0.5) / GATE_BINS
    fig, ax = plt.subplots(figsize=(6, 4))
    for li in range(p.grid.lags):
        m = _mean(p.gw_sum_rel[li], p.gw_cnt[li])
        ok = p.gw_cnt[li] > 0
        if ok.any():
            ax.plot(centers[ok], m[ok], "o-", label=f"lag {li + 1}")
    _line_axes(ax, "gate weight (raw softmax probability)", "mean rel. L2 change of the unweighted expert output",
               "expert drift vs gate weight")
    _save(fig, path)
