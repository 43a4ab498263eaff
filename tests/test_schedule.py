"""Schedule format (load / validate / save / compatibility), derivation and the `schedule` CLI."""
from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pandas as pd
import pytest

from conftest import TINY
from moeca.models.config import get_preset
from moeca.diffusion.samplers import SamplerConfig
from moeca.policy.derive import DeriveConfig, derive_schedule, even_sync_steps, sync_steps
from moeca.policy.schedule import (ALWAYS, FORMAT_VERSION, REUSE, BlockRule, ModelIdentity, Rule, SamplerIdentity, Schedule,
                                   ScheduleError, ScheduleMismatch, ScoreConfig, StepRule, schema, TokenSelection)
from moeca.policy.summary import reuse_grid
from moeca.policy.transfer import retarget

SAMPLER = SamplerConfig(kind="rectified_flow", num_steps=12, cfg_scale=1.5, cfg_mode="batched")
COLUMNS = ["unit", "block", "step", "expert", "lag", "n", "mean_rel_l2", "p50_rel_l2", "p90_rel_l2", "mean_cos",
           "mean_gate_weight", "persist_frac", "nan_count"]


def synthetic_summary(config=TINY, num_steps: int = 12, lags: int = 3, fast_expert: int = 3,
                      fast_factor: float = 4.0, seed: int = 0) -> pd.DataFrame:
    """A drift summary with the analysis stage's columns: drift falls over sampling; one expert is fast."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(1, num_steps):
        base = 0.3 * (1 - s / num_steps) + 0.02
        for b in range(config.depth):
            for lag in range(1, lags + 1):
                if s - lag < 0:
                    continue
                for unit in ("attn", "moe", "shared", "update"):
                    v = base * lag ** 0.8 * (1.2 if unit == "attn" else 1.0)
                    rows.append(dict(unit=unit, block=b, step=s, expert=-1, lag=lag, n=64, mean_rel_l2=v,
                                     p50_rel_l2=v, p90_rel_l2=1.5 * v, mean_cos=1 - v, mean_gate_weight=np.nan,
                                     persist_frac=np.nan, nan_count=0))
                for e in range(config.num_experts):
                    v = base * lag ** 0.8 * (fast_factor if e == fast_expert else 1.0) * rng.uniform(0.9, 1.1)
                    rows.append(dict(unit="expert", block=b, step=s, expert=e, lag=lag, n=20, mean_rel_l2=v,
                                     p50_rel_l2=v, p90_rel_l2=1.5 * v, mean_cos=1 - v, mean_gate_weight=0.3,
                                     persist_frac=0.9, nan_count=0))
    return pd.DataFrame(rows, columns=COLUMNS)


def run_meta(config=TINY, sampler=SAMPLER, weights_hash="0123456789abcdef") -> dict:
    return {"run_name": "t", "model": {"name": config.name, "config": config.to_dict(),
                                       "fingerprint": config.fingerprint(), "weights_hash": weights_hash},
            "sampler": sampler.to_dict()}


def mixed_schedule(config=TINY, sampler=SAMPLER) -> Schedule:
    br = BlockRule(attn=REUSE, moe=ALWAYS, shared=Rule("fraction", 0.25),
                   experts=tuple([REUSE, Rule("fraction", 0.5), Rule("threshold", 0.1)] + [ALWAYS] *
                                 (config.num_experts - 3)))
    steps = tuple(StepRule("compute", (br,) * config.depth) for _ in range(sampler.num_steps))
    return Schedule("moeca", ModelIdentity.of(config, "0123456789abcdef"), SamplerIdentity.of(sampler), steps,
                    sync_refresh_steps=(0, 1, 6, sampler.num_steps - 1),
                    scores={"expert": ScoreConfig(1.0, 0.05), "shared": ScoreConfig(1.0, 0.0)},
                    predicted_flops_ratio=0.6)


# ----------------------------------------------------------------------------- format
def test_round_trip_and_published_schema(tmp_path):
    import jsonschema
    from importlib import resources

    s = mixed_schedule()
    path = s.save(tmp_path / "s.json")
    assert not list(tmp_path.glob(".*.tmp"))
    data = json.loads(path.read_text())
    published = json.loads(resources.files("moeca.policy").joinpath("schedule.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(published)
    jsonschema.validate(data, published)
    assert published == schema()
    assert data["format_version"] == FORMAT_VERSION and data["forecast"] == "none" and data["steps"][2]["blocks"][0]["experts"][1] == {"fraction": 0.5}
    assert Schedule.load(path) == s


def _bad(tmp_path, mutate) -> str:
    data = mixed_schedule().to_json()
    mutate(data)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(data))
    with pytest.raises(ScheduleError) as exc:
        Schedule.load(p)
    return str(exc.value)


def test_malformed_schedule_names_the_field(tmp_path):
    msg = _bad(tmp_path, lambda d: d["steps"][3]["blocks"][1]["experts"].__setitem__(2, {"fraction": 1.5}))
    assert "steps[3].blocks[1].experts[2]" in msg
    msg = _bad(tmp_path, lambda d: d["model"].pop("fingerprint"))
    assert "fingerprint" in msg
    msg = _bad(tmp_path, lambda d: d["steps"][0]["blocks"][0]["experts"].pop())
    assert "steps[0].blocks[0].experts" in msg and "num_experts" in msg
    msg = _bad(tmp_path, lambda d: d["steps"].pop())
    assert "field steps" in msg and "num_steps" in msg
    msg = _bad(tmp_path, lambda d: d.__setitem__("format_version", 7))
    assert "format_version" in msg
    msg = _bad(tmp_path, lambda d: d["steps"][2].__setitem__("model", "sometimes"))
    assert "steps[2].model" in msg
    msg = _bad(tmp_path, lambda d: d.__setitem__("sync_refresh_steps", [0, 40]))
    assert "sync_refresh_steps[1]" in msg
    p = tmp_path / "notjson.json"
    p.write_text("{")
    with pytest.raises(ScheduleError, match="not valid JSON"):
        Schedule.load(p)
    with pytest.raises(FileNotFoundError, match="schedule derive"):
        Schedule.load(tmp_path / "missing.json")


def test_version_1_files_read_as_plain_reuse_and_bad_forecast_is_named(tmp_path):
    data = mixed_schedule().to_json()
    data["format_version"] = 1
    for key in ("forecast", "forecast_order", "token_selection"):
        del data[key]
    p = tmp_path / "v1.json"
    p.write_text(json.dumps(data))
    old = Schedule.load(p)
    assert old.forecast == "none" and old.format_version == FORMAT_VERSION and old.steps == mixed_schedule().steps
    assert old.forecast_order == 1 and old.token_selection == TokenSelection()
    assert "forecast" in _bad(tmp_path, lambda d: d.__setitem__("forecast", "cubic"))


def test_version_2_files_load_and_v3_forecast_fields_round_trip(tmp_path):
    v2 = mixed_schedule().to_json()
    v2["format_version"], v2["forecast"] = 2, "linear"
    for key in ("forecast_order", "token_selection"):
        del v2[key]
    p = tmp_path / "v2.json"
    p.write_text(json.dumps(v2))
    old = Schedule.load(p)
    assert (old.forecast, old.forecast_order, old.forecast_degree) == ("linear", 1, 1)
    toca_sel = TokenSelection("toca", soft_fresh_weight=0.3, fresh_threshold=5, spatial_bonus=0.0, spatial_grid=2)
    s = dataclasses.replace(mixed_schedule(), forecast="taylor", forecast_order=3, token_selection=toca_sel)
    again = Schedule.load(s.save(tmp_path / "t.json"))
    assert again == s and again.forecast_degree == 3 and again.forecast_kind == "taylor"
    poly = dataclasses.replace(s, forecast="polynomial")
    assert Schedule.load(poly.save(tmp_path / "p.json")).forecast_kind == "polynomial"
    assert json.loads((tmp_path / "t.json").read_text())["token_selection"]["kind"] == "toca"
    assert dataclasses.replace(s, forecast="none").forecast_degree == 0
    # bad values name the field
    assert "forecast_order" in _bad(tmp_path, lambda d: d.__setitem__("forecast_order", 5))
    assert "forecast_order" in _bad(tmp_path, lambda d: d.update(forecast="linear", forecast_order=2))
    assert "token_selection" in _bad(tmp_path, lambda d: d.__setitem__("token_selection", {"kind": "random"}))
    with pytest.raises(ScheduleError, match="token_selection.fresh_threshold"):
        TokenSelection("toca", fresh_threshold=0)


def test_incompatible_model_or_sampler_is_refused_naming_the_field():
    s = mixed_schedule()
    s.check_compatible(TINY, SAMPLER, "0123456789abcdef")
    with pytest.raises(ScheduleMismatch, match="model.fingerprint"):
        s.check_compatible(get_preset("demo"), SAMPLER)
    with pytest.raises(ScheduleMismatch, match="model.weights_hash"):
        s.check_compatible(TINY, SAMPLER, "ffffffffffffffff")
    with pytest.raises(ScheduleMismatch, match="sampler.num_steps"):
        s.check_compatible(TINY, SamplerConfig(num_steps=13, cfg_scale=1.5))
    with pytest.raises(ScheduleMismatch, match="sampler.kind"):
        s.check_compatible(TINY, SamplerConfig(kind="ddim", num_steps=12, cfg_scale=1.5))
    with pytest.raises(ScheduleMismatch, match="sampler.cfg_mode"):
        s.check_compatible(TINY, SamplerConfig(num_steps=12, cfg_scale=1.5, cfg_mode="separate"))
    with pytest.raises(ScheduleMismatch, match="sampler.guided"):
        s.check_compatible(TINY, SamplerConfig(num_steps=12, cfg_scale=1.0))


def test_rules_and_sync_steps():
    assert Rule.fraction(0.0) == REUSE and Rule.fraction(1.0) == ALWAYS and Rule.fraction(0.3).value == 0.3
    with pytest.raises(ScheduleError):
        Rule("fraction", -0.1)
    s = mixed_schedule()
    assert s.rule(6, 0).computes_all and not s.rule(5, 0).computes_all
    grid = reuse_grid(s)
    assert grid.shape == (12, TINY.depth)
    assert np.all(grid[[0, 1, 6, 11]] == 0) and np.all(grid[2] > 0.3)
    assert sync_steps(50, DeriveConfig(warmup_steps=3, sync_interval=10, final_steps=1)) == (0, 1, 2, 12, 22, 32,
                                                                                              42, 49)


# ----------------------------------------------------------------------------- derivation
def test_derive_hits_target_and_refreshes_fast_experts_more():
    cfg = DeriveConfig(target_speedup=2.0, refresh="budget", warmup_steps=2, sync_interval=5, final_steps=1)
    s = derive_schedule(synthetic_summary(), run_meta(), cfg)
    assert s.method == "moeca" and s.model.fingerprint == TINY.fingerprint()
    assert s.model.weights_hash == "0123456789abcdef" and s.sampler.num_steps == 12
    assert s.predicted_flops_ratio == pytest.approx(0.5, abs=0.01)
    assert s.sync_refresh_steps == sync_steps(12, cfg)
    for st in s.sync_refresh_steps:
        assert all(b.computes_all for b in s.steps[st].blocks)
    fast, slow = [], []
    for st in range(12):
        if s.is_sync(st):
            continue
        for b in s.steps[st].blocks:
            f = [r.expected_refresh() for r in b.experts]
            fast.append(f[3])
            slow.append(np.mean(f[:3] + f[4:]))
    assert np.mean(fast) > 1.5 * np.mean(slow)
    # the alpha fit sees rel_l2 ~ lag**0.8
    assert s.provenance["alpha"]["expert"] == pytest.approx(0.8, abs=0.05)


def test_derive_sync_rule_keeps_the_most_even_refreshes_that_fit_the_target():
    summ, meta = synthetic_summary(), run_meta()
    s = derive_schedule(summ, meta, DeriveConfig(target_speedup=2.0, placement="even"))
    assert s.forecast == "linear" and s.provenance["config"]["refresh"] == "sync"
    assert s.predicted_flops_ratio <= 0.5
    n = len(s.sync_refresh_steps)
    assert s.sync_refresh_steps == tuple(sorted(even_sync_steps(12, n, DeriveConfig())))
    more = derive_schedule(summ, meta, DeriveConfig(target_speedup=1.5, placement="even"))
    assert len(more.sync_refresh_steps) > n and more.predicted_flops_ratio > s.predicted_flops_ratio
    for st in range(12):   # between refreshes: every unit forecast, only new pairs and the router computed
        for b in s.steps[st].blocks if not s.is_sync(st) else ():
            assert b.attn == REUSE and b.shared == REUSE and set(b.experts) == {REUSE} and b.moe == ALWAYS
    gaps = np.diff(s.sync_refresh_steps)
    assert gaps.max() - gaps.min() <= 1
    plain = derive_schedule(summ, meta, DeriveConfig(target_speedup=2.0, forecast="none", placement="even"))
    assert plain.forecast == "none" and plain.steps == s.steps


def test_derive_error_budget_is_monotonic_and_target_limits():
    summ, meta = synthetic_summary(), run_meta()
    for refresh, budgets in (("budget", (0.05, 0.2, 1.0)), ("sync", (0.5, 1.0, 2.0))):
        ratios = [derive_schedule(summ, meta, DeriveConfig(target_speedup=None, error_budget=e, refresh=refresh))
                  .predicted_flops_ratio for e in budgets]
        assert ratios[0] > ratios[1] > ratios[2], refresh
    with pytest.raises(ValueError, match="out of reach"):
        derive_schedule(summ, meta, DeriveConfig(target_speedup=50.0))
    with pytest.raises(ValueError, match="exactly one"):
        DeriveConfig(target_speedup=2.0, error_budget=0.1)
    with pytest.raises(ValueError, match="lacks columns"):
        derive_schedule(summ.drop(columns=["persist_frac"]), meta, DeriveConfig())
    with pytest.raises(ValueError, match="outside the model"):
        derive_schedule(synthetic_summary(num_steps=20), meta, DeriveConfig())


def test_retarget_keeps_reuse_pattern():
    s = derive_schedule(synthetic_summary(), run_meta(), DeriveConfig(target_speedup=2.0))
    big = dataclasses.replace(get_preset("S/2-8E2A"), objective="rectified_flow")  # SAMPLER is Euler
    t = retarget(s, big)
    assert t.model.depth == 12 and t.model.weights_hash is None and t.predicted_flops_ratio is None
    assert t.steps[5].blocks[11].experts[:4] == s.steps[5].blocks[1].experts
    t.check_compatible(big, SAMPLER)
    ddpm = retarget(s, get_preset("S/2-8E2A"))          # the DDPM-trained preset cannot read Euler's velocity
    with pytest.raises(ValueError, match="schedule field sampler.kind: 'rectified_flow' .*ddpm_eps"):
        ddpm.check_compatible(get_preset("S/2-8E2A"), SAMPLER)


# ----------------------------------------------------------------------------- CLI
def test_cli_show_and_derive(tmp_path, capsys, monkeypatch):
    from moeca.cli.main import main
    import moeca.cli.schedule as pcli

    path = mixed_schedule().save(tmp_path / "s.json")
    assert main(["schedule", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "predicted FLOPs ratio: 0.600" in out and "sync*" in out and "reuse fraction per step" in out

    trace = tmp_path / "trace"
    trace.mkdir()
    (trace / "run.json").write_text("{}")
    monkeypatch.setattr(pcli, "load_summary", lambda traces, allow_mixed=False: (synthetic_summary(), run_meta()))
    out_file = tmp_path / "derived.json"
    assert main(["schedule", "derive", str(trace), "--target-flops-speedup", "1.8", "--out", str(out_file),
                 "--warmup-steps", "2", "--sync-interval", "4", "--refresh", "budget"]) == 0
    out = capsys.readouterr().out
    assert "predicted FLOPs ratio: 0.55" in out
    assert Schedule.load(out_file).predicted_flops_ratio == pytest.approx(1 / 1.8, abs=0.01)
    assert main(["schedule", "derive", str(trace), "--target-flops-speedup", "2", "--out", str(out_file),
                 "--overwrite"]) == 0
    assert "refresh rule: sync; forecast: linear" in capsys.readouterr().out
    assert Schedule.load(out_file).predicted_flops_ratio <= 0.5
    users = tmp_path / "mine.json"                    # a file moeca did not write needs --overwrite
    users.write_text("{}")
    assert main(["schedule", "derive", str(trace), "--out", str(users)]) == 2
    assert "moeca did not write it" in capsys.readouterr().err and users.read_text() == "{}"
    assert main(["schedule", "show", str(tmp_path / "nope.json")]) == 2


def test_derive_from_a_real_trace_and_replay(tmp_path, capsys):
    """trace (tracer) -> drift_summary (analysis) -> `schedule derive` -> replay: the chain on a tiny model."""
    import torch
    from conftest import make_tiny
    from moeca.cli.main import main
    from moeca.diffusion.samplers import sample
    from moeca.replay.runtime import ReplayRuntime
    from moeca.tracer.run import TraceConfig, trace_run

    model = make_tiny()
    trace_run(model, tmp_path / "trace", TraceConfig(sampler=SAMPLER, labels=(0, 1, 2, 0), batch_size=4),
              progress=False)
    out = tmp_path / "s.json"
    assert main(["schedule", "derive", str(tmp_path / "trace"), "--target-flops-speedup", "1.6",
                 "--warmup-steps", "2", "--sync-interval", "5", "--out", str(out)]) == 0
    ratio = float(re.search(r"predicted FLOPs ratio: ([0-9.]+)", capsys.readouterr().out).group(1))
    assert 0.45 < ratio <= 1 / 1.6       # the most evenly spaced refreshes that fit the target
    s = Schedule.load(out)
    s.check_compatible(model.config, SAMPLER)
    rt = ReplayRuntime(s)
    labels = torch.tensor([0, 1, 2, 0])
    with model.use_runtime(rt):
        cached = sample(model, SAMPLER, labels, seed=5)
    full = sample(model, SAMPLER, labels, seed=5)
    assert float((cached - full).norm() / full.norm()) < 0.1
    done, ref = rt.counters.flops(__import__("moeca.policy.cost", fromlist=["UnitCosts"]).UnitCosts.of(TINY))
    assert done / ref < 0.85


def test_the_reuse_rule_was_called_never_before_format_5(tmp_path):
    """Format 1-4 files wrote ``never`` for what format 5 calls ``reuse`` (always reuse or forecast): they load
    as ``reuse``; a format-5 file saying ``never`` is refused naming the field."""
    data = mixed_schedule().to_json()
    assert '"reuse"' in json.dumps(data["steps"]) and '"never"' not in json.dumps(data)
    old = {**data, "format_version": 4, "steps": json.loads(json.dumps(data["steps"]).replace('"reuse"', '"never"'))}
    assert Schedule.from_json(old).steps == mixed_schedule().steps
    bad = {**data, "steps": old["steps"]}
    with pytest.raises(ScheduleError, match=r"field steps\["):
        Schedule.from_json(bad)

