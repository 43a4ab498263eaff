"""The report's statistical figures are drawn with seaborn (heatmaps, violins) without changing the
matplotlib style of the other figures."""
from __future__ import annotations

import sys

import pytest
from PIL import Image

from moeca.analysis import figures
from moeca.analysis.collect import collect
from moeca.testing.synthetic_traces import write_synthetic_trace


@pytest.fixture(scope="module")
def partials(tmp_path_factory):
    trace = write_synthetic_trace(tmp_path_factory.mktemp("fig") / "trace", samples=2, noise=0.3)
    return collect([trace]).partials


def test_seaborn_heatmaps_and_violins(partials, tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    calls = []
    for name in ("heatmap", "violinplot"):
        original = getattr(sns, name)
        monkeypatch.setattr(sns, name, lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    style = dict(plt.rcParams)
    figures.drift_heatmaps(partials, tmp_path / "heat.png")
    figures.expert_violins(partials, tmp_path / "violins.png")
    assert calls.count("heatmap") == 5 and calls.count("violinplot") == 1   # 4 token units + pooled experts
    assert dict(plt.rcParams) == style, "a seaborn style leaked into the global matplotlib settings"
    assert "seaborn" in sys.modules
    for name in ("heat.png", "violins.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size[0] > 500 and im.size[1] > 300
