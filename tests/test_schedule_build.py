"""``moeca schedule build METHOD --set KNOB=VALUE --trace T --out s.json`` (issue 26): every registered
method exports its schedule; --help lists methods and knobs; bad names and values name the valid ones."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeca.cli.main import main
from moeca.policy.methods import REGISTRY, fora
from moeca.policy.schedule import Schedule


STEPS = 8


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> Path:
    from moeca.diffusion.samplers import SamplerConfig
    from moeca.tracer.run import TraceConfig, trace_run
    from conftest import make_tiny
    sampler = SamplerConfig(kind="rectified_flow", num_steps=STEPS, cfg_scale=1.5)
    out = tmp_path_factory.mktemp("build") / "trace"
    trace_run(make_tiny(seed=0), out, TraceConfig(sampler=sampler, labels=(0, 1), lags=2), progress=False)
    return out


def test_help_lists_every_method_and_its_knobs(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["schedule", "build", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for m in REGISTRY.values():
        assert f"  {m.name}: " in out
        for k in m.knobs():
            assert f"{k.name}=" in out


def test_build_exports_a_method_with_its_knobs(trace, tmp_path, capsys):
    out = tmp_path / "fora.json"
    assert main(["schedule", "build", "fora", "--set", "interval=4", "--trace", str(trace), "--out", str(out)]) == 0
    s = Schedule.load(out)
    assert s.method == "fora" and list(s.sync_refresh_steps) == fora.refresh_steps(fora.Config(interval=4), STEPS)
    assert s.provenance["config"] == {"interval": 4} and s.provenance["trace"] == str(trace)
    out = tmp_path / "ts.json"
    assert main(["schedule", "build", "taylorseer", "--trace", str(trace), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert (data["forecast"], data["forecast_order"]) == ("taylor", 4)        # the authors' default order
    out = tmp_path / "m.json"
    assert main(["schedule", "build", "moeca", "--set", "target=flops", "--set", "target_speedup=1.5",
                 "--trace", str(trace), "--out", str(out)]) == 0
    assert Schedule.load(out).method == "moeca"
    out = tmp_path / "mag.json"
    assert main(["schedule", "build", "magcache", "--set", "mag_ratios=1,1.001,1.001,1.001,1.001,1.001,1.001,1.001",
                 "--trace", str(trace), "--out", str(out)]) == 0
    assert any(st.model == "reuse" for st in Schedule.load(out).steps)


@pytest.mark.parametrize("argv, message", [
    (["fora", "--set", "intervl=4"], "valid knobs: interval"),
    (["fora", "--set", "interval=four"], "knob interval takes an integer"),
    (["fora", "--set", "interval"], "expected KNOB=VALUE"),
    (["toca", "--set", "ratio_scheduler=ToCa"], "ToCa-ddim50, ToCa-ddpm250"),
    (["foca"], "registered methods: none, moeca, fora"),
    (["l2c"], "router"),
    (["magcache"], "mag_ratios"),
])
def test_bad_names_and_values_name_the_valid_ones(trace, tmp_path, capsys, argv, message):
    rc = main(["schedule", "build", *argv, "--trace", str(trace), "--out", str(tmp_path / "s.json")])
    assert rc != 0 and message in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()
