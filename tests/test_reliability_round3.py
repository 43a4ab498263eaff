"""Reliability, third round (issue 28): custom checkpoints everywhere, hostile files in the explorer, schedule JSON
edge cases, leftovers after kills, concurrent writers, cache faults, awkward paths, timings under load, one
cfg_mode rule. Every hostile input is generated here."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from moeca.cli.main import main
from moeca.tracer.testing import TINY, tiny_checkpoint

CUSTOM = dataclasses.replace(TINY, name="my-custom", hidden_size=48, num_heads=3)
"""A model that is neither shipped nor a preset: only its checkpoint's metadata describes it."""


@pytest.fixture(scope="module")
def custom_ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("r3ck") / "my.safetensors", config=CUSTOM)


@pytest.fixture(scope="module")
def custom_trace(tmp_path_factory, custom_ckpt) -> Path:
    out = tmp_path_factory.mktemp("r3tr") / "trace"
    assert main(["trace", "--checkpoint", str(custom_ckpt), "--steps", "4", "--samples", "2", "--out", str(out),
                 "--device", "cpu", "--no-progress"]) == 0
    return out


# ----------------------------------------------------------------------------- 1: custom checkpoints
def test_derive_calibrates_a_custom_checkpoint_from_its_own_metadata(custom_trace, tmp_path, monkeypatch, capsys):
    import moeca.policy.wallclock as wallclock
    from test_derive_wallclock import costs

    loaded = []
    monkeypatch.setattr(wallclock, "costs_provider",
                        lambda: lambda model, sampler, batch, progress: loaded.append(model.config) or costs())
    meta = json.loads((custom_trace / "run.json").read_text())
    assert meta["model"]["name"] == "my-custom" and Path(meta["model"]["checkpoint"]).is_absolute()
    out = tmp_path / "s.json"
    assert main(["schedule", "derive", str(custom_trace), "--target-speedup", "1.3", "--out", str(out),
                 "--device", "cpu"]) == 0, capsys.readouterr().err
    assert loaded == [CUSTOM]
    assert main(["schedule", "derive", str(custom_trace), "--target-speedup", "1.3", "--out", str(out),
                 "--device", "cpu", "--checkpoint", meta["model"]["checkpoint"]]) == 0, capsys.readouterr().err
    assert loaded == [CUSTOM, CUSTOM]


def test_a_custom_checkpoint_loads_under_any_label_and_a_contradicting_preset_is_named(custom_ckpt):
    from moeca.models.registry import load_model
    for name in (None, "my-custom", "whatever-i-called-it"):
        assert load_model(name, custom_ckpt, device="cpu").config == CUSTOM
    with pytest.raises(ValueError, match=r"holds a 'my-custom' model .*--model S/2-8E2A names another architecture; "
                                         r"drop --model"):
        load_model("S/2-8E2A", custom_ckpt, device="cpu")


def test_replay_and_calibrate_and_bench_paths_load_a_custom_checkpoint(custom_trace, custom_ckpt, tmp_path, capsys):
    from moeca.models.registry import load_traced_model

    assert load_traced_model(json.loads((custom_trace / "run.json").read_text()), device="cpu").config == CUSTOM
    schedule = tmp_path / "s.json"
    assert main(["schedule", "derive", str(custom_trace), "--target-flops-speedup", "1.3", "--out",
                 str(schedule)]) == 0
    assert main(["replay", "--schedule", str(schedule), "--checkpoint", str(custom_ckpt), "--samples", "1",
                 "--repeats", "1", "--device", "cpu", "--out", str(tmp_path / "replay")]) == 0, capsys.readouterr().err


# ----------------------------------------------------------------------------- 10: one cfg_mode rule
def test_cfg_mode_default_is_one_rule_whichever_way_the_weights_load(tmp_path, capsys):
    from moeca.models.config import PRESETS
    from moeca.models.registry import demo_weights_path
    from moeca.models.samplers import default_cfg_mode

    modes = []
    for i, flags in enumerate((["--model", "demo"], ["--checkpoint", str(demo_weights_path())],
                               ["--model", "demo", "--checkpoint", str(demo_weights_path())])):
        out = tmp_path / f"t{i}"
        assert main(["trace", *flags, "--steps", "2", "--samples", "1", "--out", str(out), "--device", "cpu",
                     "--no-progress"]) == 0, capsys.readouterr().err
        modes.append(json.loads((out / "run.json").read_text())["sampler"]["cfg_mode"])
    assert modes == ["batched"] * 3
    assert main(["sample", "--checkpoint", str(demo_weights_path()), "--steps", "2", "--labels", "1",
                 "--out", str(tmp_path / "s.png"), "--device", "cpu", "--no-progress"]) == 0
    assert "(batched)" in capsys.readouterr().out
    assert default_cfg_mode(PRESETS["XL/2-8E2A"]) == "separate" and default_cfg_mode(PRESETS["S/2-8E2A"]) == "batched"
