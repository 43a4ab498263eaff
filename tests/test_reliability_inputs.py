"""Reliability, inputs: facts that contradict each other are refused, naming the input, the field and the fix."""
from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch

from moeca.testing.synthetic_traces import write_synthetic_trace
from moeca.cli.main import main
from moeca.models.checkpoint import CheckpointError, weights_hash
from moeca.models.registry import load_model
from moeca.diffusion.samplers import SamplerConfig, check_sampler_objective
from moeca.policy.schedule import full_schedule
from moeca.tracer.run import TraceConfig, trace_run
from conftest import make_tiny, TINY, tiny_checkpoint

SAMPLER = SamplerConfig(kind="rectified_flow", num_steps=3, cfg_scale=1.5, cfg_mode="batched")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trace") / "tr"
    return trace_run(make_tiny(seed=0), out, TraceConfig(sampler=SAMPLER, labels=(0, 1, 2, 0), batch_size=2, lags=2),
                     progress=False)


def _copy(trace: Path, dest: Path) -> Path:
    shutil.copytree(trace, dest)
    return dest


def _run(argv, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    got = capsys.readouterr()
    assert "Traceback" not in got.err
    return rc, got.out, got.err


# ----------------------------------------------------------------------------- sampler vs objective
def test_sampler_must_match_the_objective():
    check_sampler_objective("rectified_flow", "rectified_flow")
    check_sampler_objective("ddim", "ddpm_eps")
    with pytest.raises(ValueError, match=r"--sampler 'ddim' .*rectified_flow objective.*use rectified_flow"):
        check_sampler_objective("ddim", "rectified_flow")
    with pytest.raises(ValueError, match="use ddpm or ddim"):
        check_sampler_objective("rectified_flow", "ddpm_eps")


def test_sample_refuses_a_sampler_the_model_cannot_use(ckpt, tmp_path, capsys):
    png = tmp_path / "g.png"
    rc, _, err = _run(["sample", "--checkpoint", ckpt, "--sampler", "ddpm", "--steps", 2, "--out", png,
                       "--device", "cpu", "--no-progress"], capsys)
    assert rc == 2 and "--sampler 'ddpm'" in err and "rectified_flow" in err and not png.exists()


def test_trace_refuses_a_sampler_the_model_cannot_use(ckpt, tmp_path, capsys):
    rc, _, err = _run(["trace", "--checkpoint", ckpt, "--sampler", "ddim", "--steps", 2, "--out", tmp_path / "t",
                       "--no-progress", "--device", "cpu"], capsys)
    assert rc == 2 and "--sampler 'ddim'" in err and not (tmp_path / "t").exists()


def test_replay_refuses_a_ddim_schedule_on_a_rectified_flow_model(ckpt, tmp_path, capsys):
    model = load_model(None, ckpt)
    ddim = SamplerConfig(kind="ddim", num_steps=3, cfg_scale=1.5)
    path = full_schedule(TINY, ddim, weights_hash=weights_hash(model)).save(tmp_path / "ddim.json")
    rc, _, err = _run(["replay", "--schedule", path, "--checkpoint", ckpt, "--samples", 1, "--repeats", 1,
                       "--out", tmp_path / "rep", "--no-progress", "--device", "cpu"], capsys)
    assert rc == 2 and "field sampler.kind" in err and str(path) in err and not (tmp_path / "rep").exists()


# ----------------------------------------------------------------------------- run.json vs shards
def _edit_run_json(trace: Path, **changes) -> None:
    meta = json.loads((trace / "run.json").read_text())
    for key, value in changes.items():
        node = meta
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    (trace / "run.json").write_text(json.dumps(meta))


def test_run_json_declaring_more_steps_than_traced_is_refused_everywhere(trace, tmp_path, capsys):
    bad = _copy(trace, tmp_path / "bad")
    _edit_run_json(bad, **{"steps": 5, "sampler.num_steps": 5, "step_t": [1.0, 0.8, 0.6, 0.4, 0.2]})
    rc, _, err = _run(["schedule", "derive", bad, "--target-flops-speedup", 1.5, "--out", tmp_path / "s.json"],
                      capsys)
    assert rc == 2 and "shard-00000.parquet" in err and "run.json implies" in err and "5 steps" in err
    assert not (tmp_path / "s.json").exists() and not list(tmp_path.glob(".s*"))
    rc, _, err = _run(["analyze", bad, "--out", tmp_path / "r", "--quiet", "--no-figures"], capsys)
    assert rc == 2 and "run.json implies" in err and not (tmp_path / "r").exists()
    rc, out, _ = _run(["trace-info", bad], capsys)
    assert rc == 2 and "INVALID" in out and "0/2 complete" in out


def test_run_json_contradicting_itself_is_named(trace, tmp_path, capsys):
    bad = _copy(trace, tmp_path / "bad")
    _edit_run_json(bad, num_samples=9)
    rc, out, _ = _run(["trace-info", bad], capsys)
    assert rc == 2 and "field num_samples is 9 but should be 4" in out


def test_trace_info_and_resume_name_a_truncated_shard(trace, tmp_path, ckpt, capsys):
    bad = _copy(trace, tmp_path / "bad")
    shard = bad / "tokens" / "shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-40])
    rc, out, _ = _run(["trace-info", bad], capsys)
    assert rc == 2 and f"{shard}: cannot read this Parquet file" in out and "1/2 complete" in out
    with pytest.raises(ValueError, match="shard-00001.parquet: cannot read"):
        trace_run(make_tiny(seed=0), bad, TraceConfig(sampler=SAMPLER, labels=(0, 1, 2, 0), batch_size=2, lags=2),
                  resume=True, progress=False)
    assert shard.exists()                                           # reported, not deleted


def test_flipped_bits_and_foreign_columns_are_found(trace, tmp_path, capsys):
    import pyarrow.parquet as pq
    bad = _copy(trace, tmp_path / "bad")
    shard = bad / "branches" / "shard-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x10                                    # inside the data pages, not the footer
    shard.write_bytes(bytes(data))
    rc, out, _ = _run(["trace-info", "--verify", bad], capsys)
    assert rc == 2 and f"{shard}: row group 0 is damaged" in out
    foreign = _copy(trace, tmp_path / "foreign")
    path = foreign / "tokens" / "shard-00001.parquet"
    table = pq.read_table(path)
    pq.write_table(table.append_column("payload", table.column("step")), path)
    rc, out, _ = _run(["trace-info", foreign], capsys)
    assert rc == 2 and "foreign columns ['payload']" in out and str(path) in out


def test_the_same_trace_twice_is_refused_by_derive(trace, tmp_path, capsys):
    rc, _, err = _run(["schedule", "derive", trace, f"{trace}/../tr", "--out", tmp_path / "s.json"], capsys)
    assert rc == 2 and "given twice" in err


def test_derive_reports_nan_metric_values(trace, tmp_path, capsys):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    t = _copy(trace, tmp_path / "nan")
    path = t / "branches" / "shard-00000.parquet"
    table = pq.read_table(path)
    null = table.column("rel_l2_lag1").is_null().to_numpy(zero_copy_only=False)
    col = table.column("rel_l2_lag1").fill_null(0).to_numpy(zero_copy_only=False).astype(np.float16)
    blocks = table.column("block").to_numpy()
    rows = np.flatnonzero(np.isfinite(col) & ~null & (blocks == 1))[:5]
    col[rows] = np.nan
    i = table.schema.get_field_index("rel_l2_lag1")
    table = table.set_column(i, table.schema.field(i), pa.array(col, type=pa.float16(), mask=null))
    pq.write_table(table, path)
    rc, _, _ = _run(["schedule", "derive", trace, "--target-flops-speedup", 1.5, "--out", tmp_path / "s0.json"],
                    capsys)
    before = json.loads((tmp_path / "s0.json").read_text())["provenance"]["nan_metric_values"]  # Inf of a random model
    rc, _, err = _run(["schedule", "derive", t, "--target-flops-speedup", 1.5, "--out", tmp_path / "s.json"],
                      capsys)
    assert rc == 0 and f"warning: {before + 5} NaN/Inf metric values" in err and "expert block 1" in err
    assert json.loads((tmp_path / "s.json").read_text())["provenance"]["nan_metric_values"] == before + 5


def test_derive_refuses_an_output_inside_the_trace_or_a_folder(trace, tmp_path, capsys):
    rc, _, err = _run(["schedule", "derive", trace, "--out", trace / "s.json"], capsys)
    assert rc == 2 and "lies inside the input trace" in err and not (trace / "s.json").exists()
    rc, _, err = _run(["schedule", "derive", trace, "--out", tmp_path], capsys)
    assert rc == 2 and "is a folder" in err


def test_allow_mixed_headline_names_every_model(tmp_path, capsys):
    a = write_synthetic_trace(tmp_path / "a", samples=2, samples_per_shard=1, num_steps=4)
    b = write_synthetic_trace(tmp_path / "b", samples=2, samples_per_shard=1, num_steps=4)
    _edit_run_json(b, **{"model.name": "other"})
    meta = json.loads((b / "run.json").read_text())
    meta["model"]["weights_hash"] = "other-weights"
    (b / "run.json").write_text(json.dumps(meta))
    rc, _, err = _run(["analyze", a, b, "--out", tmp_path / "r", "--quiet", "--no-figures"], capsys)
    assert rc == 2 and "--allow-mixed" in err
    rc, out, _ = _run(["analyze", a, b, "--out", tmp_path / "r", "--quiet", "--no-figures", "--allow-mixed"],
                      capsys)
    head = json.loads((tmp_path / "r" / "headline.json").read_text())["sentence"]
    assert rc == 0 and "synthetic" in head and "other" in head and "pooled" in head


# ----------------------------------------------------------------------------- checkpoints
def test_integer_and_non_finite_checkpoints_are_refused_naming_the_key(tmp_path):
    from safetensors.torch import load_file, save_file
    good = tiny_checkpoint(tmp_path / "good.safetensors")
    state = load_file(str(good))
    key = "blocks.0.moe.gate.weight"
    ints = dict(state, **{key: state[key].round().to(torch.int32)})
    save_file(ints, str(tmp_path / "int.safetensors"), metadata={"moeca_config": json.dumps(TINY.to_dict())})
    with pytest.raises(CheckpointError, match=rf"not floating point: {key} \(int32\)"):
        _load(tmp_path / "int.safetensors")
    nan = dict(state, **{key: torch.full_like(state[key], float("nan"))})
    save_file(nan, str(tmp_path / "nan.safetensors"), metadata={"moeca_config": json.dumps(TINY.to_dict())})
    with pytest.raises(CheckpointError, match=rf"NaN or Inf values: {key}"):
        _load(tmp_path / "nan.safetensors")
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="trunc.safetensors is not a valid safetensors file"):
        _load(trunc)


def _load(path: Path):
    from moeca.models.checkpoint import load_checkpoint
    return load_checkpoint(path, TINY)


def test_checkpoint_problems_reach_the_cli_as_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    rc, _, err = _run(["sample", "--checkpoint", bad, "--out", tmp_path / "g.png", "--device", "cpu"], capsys)
    assert rc == 2 and "bad.safetensors" in err


# ----------------------------------------------------------------------------- numeric options
@pytest.mark.parametrize("argv, message", [
    (["--scale", "0"], "--scale 0 must be in 1..64"),
    (["--scale", "1000"], "--scale 1000 must be in 1..64"),
    (["--seed", "-1"], "--seed -1 must be >= 0"),
    (["--cfg-scale", "nan"], "--cfg-scale nan must be a finite number"),
])
def test_sample_numeric_options_have_ranges(ckpt, tmp_path, capsys, argv, message):
    rc, _, err = _run(["sample", "--checkpoint", ckpt, "--out", tmp_path / "g.png", "--device", "cpu", *argv], capsys)
    assert rc == 2 and message in err and not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "--threads 0 must be an integer in 1..256"),
    (["--memory-limit", "lots"], "cannot parse memory limit"),
])
def test_analyze_numeric_options_have_ranges(trace, tmp_path, capsys, argv, message):
    rc, _, err = _run(["analyze", trace, "--out", tmp_path / "r", "--quiet", *argv], capsys)
    assert rc == 2 and message in err


def test_trace_and_replay_and_derive_options_have_ranges(ckpt, trace, tmp_path, capsys):
    rc, _, err = _run(["trace", "--checkpoint", ckpt, "--samples", "-3", "--out", tmp_path / "t", "--device", "cpu"],
                      capsys)
    assert rc == 2 and "--samples -3 must be >= 1" in err
    rc, _, err = _run(["schedule", "derive", trace, "--min-fraction", "2", "--out", tmp_path / "s.json"], capsys)
    assert rc == 2 and "--min-fraction 2.0 must be a finite number in 0..1" in err
    rc, _, err = _run(["run", "--out", tmp_path / "run", "--trace-samples", "0"], capsys)
    assert rc == 2 and "--trace-samples 0 must be >= 1" in err and not (tmp_path / "run").exists()


def test_replay_refuses_an_output_that_holds_its_schedule(ckpt, tmp_path, capsys):
    model = load_model(None, ckpt)
    path = full_schedule(TINY, SAMPLER, weights_hash=weights_hash(model)).save(tmp_path / "rep" / "s.json")
    rc, _, err = _run(["replay", "--schedule", path, "--checkpoint", ckpt, "--out", tmp_path / "rep",
                       "--no-progress", "--device", "cpu"], capsys)
    assert rc == 2 and "contains the input --schedule" in err and path.exists()


def test_schedule_with_wrong_types_is_a_message(ckpt, tmp_path, capsys):
    model = load_model(None, ckpt)
    data = full_schedule(TINY, SAMPLER, weights_hash=weights_hash(model)).to_json()
    data["sampler"]["num_steps"] = "three"
    (tmp_path / "s.json").write_text(json.dumps(data))
    rc, _, err = _run(["replay", "--schedule", tmp_path / "s.json", "--checkpoint", ckpt, "--out", tmp_path / "r",
                       "--device", "cpu"], capsys)
    assert rc == 2 and "s.json" in err and "num_steps" in err


# ----------------------------------------------------------------------------- explorer
def test_app_on_a_busy_port_fails_before_serving(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        rc, _, err = _run(["app", "--root", tmp_path, "--port", port], capsys)
    assert rc == 2 and f"--port {port} on 127.0.0.1 is already in use" in err and "serving" not in err
    assert f"--port {port + 1}" in err


def test_an_edited_model_config_is_caught_by_its_fingerprint(trace, tmp_path, capsys):
    bad = _copy(trace, tmp_path / "bad")
    _edit_run_json(bad, **{"model.config.objective": "ddpm_eps"})
    rc, out, _ = _run(["trace-info", bad], capsys)
    assert rc == 2 and "field model.config hashes to fingerprint" in out
    rc, _, err = _run(["analyze", bad, "--out", tmp_path / "r", "--quiet", "--no-figures"], capsys)
    assert rc == 2 and "model.fingerprint" in err


def test_an_unreadable_run_json_is_named(trace, tmp_path, monkeypatch, capsys):
    import errno
    import os
    real = Path.read_text

    def denied(self, *a, **k):
        if self.name == "run.json":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", denied)
    rc, _, err = _run(["trace-info", trace], capsys)
    assert rc == 2 and "permission denied" in err and str(trace / "run.json") in err
