"""Trace files: schema round-trip, directory errors, disk-full clean-up, resume in process, trace-info."""
from __future__ import annotations

import errno
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from moeca.cli.main import main as moeca_main
from moeca.diffusion.samplers import SamplerConfig
from moeca.tracer import schema
from moeca.tracer.run import TraceConfig, resolve_labels, trace_run
from moeca.tracer.store import complete_shards, open_table, read_run_meta, temporary_files, trace_summary
from moeca.tracer.writer import TraceWriteError

from conftest import make_tiny, tiny_checkpoint

SAMPLER = SamplerConfig(kind="rectified_flow", num_steps=4, cfg_scale=1.5, cfg_mode="batched")


def _config(**kw):
    base = dict(sampler=SAMPLER, labels=(0, 1, 2, 0, 1), batch_size=2, lags=2)
    base.update(kw)
    return TraceConfig(**base)


def test_schema_round_trip(tmp_path):
    model = make_tiny(seed=0)
    out = trace_run(model, tmp_path / "tr", _config(dump_vectors=3), progress=False)
    meta = read_run_meta(out)
    assert meta["schema_version"] == schema.SCHEMA_VERSION and meta["lags"] == 2 and meta["num_shards"] == 3
    assert meta["labels"] == [0, 1, 2, 0, 1] and len(meta["sample_seeds"]) == 5
    assert meta["model"]["weights_hash"] and meta["model"]["fingerprint"] == model.config.fingerprint()
    assert set(meta["versions"]) >= {"moeca", "torch", "pyarrow"}
    assert complete_shards(out) == [0, 1, 2] and not temporary_files(out)
    for table in schema.TABLES:
        expected = schema.table_schema(table, 2)
        for shard in range(3):
            got = pq.read_schema(out / table / schema.shard_file_name(shard))
            assert got.equals(expected, check_metadata=True), table
        ds_schema = open_table(out, table).schema
        assert ds_schema.equals(expected)
    T, L, k = 16, 2, 2
    tokens = open_table(out, "tokens").to_table().to_pandas()
    branches = open_table(out, "branches").to_table().to_pandas()
    rows = 5 * 2 * SAMPLER.num_steps * L * T
    assert len(tokens) == rows and len(branches) == rows * k
    assert tokens.groupby(["sample", "cfg_branch", "step", "block", "token"]).size().max() == 1
    assert sorted(branches["sample"].unique()) == [0, 1, 2, 3, 4] and set(branches["run"]) == {"tr"}
    # nulls exactly where there is nothing to compare with
    assert tokens.loc[tokens.step < 2, "attn_rel_l2_lag2"].isna().all()
    assert tokens.loc[tokens.step >= 2, "attn_rel_l2_lag2"].notna().all()
    assert (branches["rel_l2_lag1"].isna() == ~branches["routed_prev"]).all()
    assert not branches.loc[branches.step == 0, "routed_prev"].any()
    assert branches.groupby(["sample", "cfg_branch", "step", "block", "token"])["expert"].nunique().eq(k).all()
    # dumped vectors agree with the recorded norms
    vec = open_table(out, "vectors").to_table().to_pandas()
    assert set(vec["kind"]) == {"attn", "moe", "shared", "expert", "moe_in"}
    attn = vec[vec.kind == "attn"].merge(tokens, on=["sample", "cfg_branch", "step", "block", "token"])
    norms = attn["vector"].map(lambda v: float(np.linalg.norm(np.asarray(v, np.float32))))
    np.testing.assert_allclose(norms, attn["attn_norm"].astype(float), rtol=5e-3)
    ex = vec[vec.kind == "expert"].merge(branches, on=["sample", "cfg_branch", "step", "block", "token", "expert"])
    assert len(ex) == (vec.kind == "expert").sum() > 0
    norms = ex["vector"].map(lambda v: float(np.linalg.norm(np.asarray(v, np.float32))))
    np.testing.assert_allclose(norms, ex["out_norm"].astype(float), rtol=5e-3)
    assert trace_summary(out)["tables"]["branches"]["bytes_per_row"] < 64


def test_existing_directory_needs_a_flag(tmp_path):
    model = make_tiny(seed=0)
    out = trace_run(model, tmp_path / "tr", _config(), progress=False)
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        trace_run(model, out, _config(), progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="already contains files"):
        trace_run(model, tmp_path / "other", _config(), progress=False)
    with pytest.raises(ValueError, match="exclude each other"):
        trace_run(model, out, _config(), resume=True, overwrite=True, progress=False)
    before = open_table(out, "tokens").to_table()
    trace_run(model, out, _config(seed=5), overwrite=True, progress=False)
    assert read_run_meta(out)["seed"] == 5
    assert not open_table(out, "tokens").to_table().equals(before)


@pytest.mark.parametrize("change,field", [
    (dict(seed=1), "seed"),
    (dict(sampler=SamplerConfig(kind="rectified_flow", num_steps=5, cfg_scale=1.5)), "sampler.num_steps"),
    (dict(labels=(0, 1, 2, 0, 2)), "labels"),
    (dict(lags=3), "lags"),
])
def test_resume_mismatch_names_the_field(tmp_path, change, field):
    model = make_tiny(seed=0)
    trace_run(model, tmp_path, _config(), progress=False)
    with pytest.raises(ValueError, match=rf"cannot resume .*{field} \(trace has"):
        trace_run(model, tmp_path, _config(**change), resume=True, progress=False)


def test_resume_with_another_model_names_weights(tmp_path):
    trace_run(make_tiny(seed=0), tmp_path, _config(), progress=False)
    with pytest.raises(ValueError, match=r"model\.weights_hash"):
        trace_run(make_tiny(seed=1), tmp_path, _config(), resume=True, progress=False)


def test_unwritable_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="cannot create trace directory"):
        trace_run(make_tiny(seed=0), blocker / "sub", _config(), progress=False)
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(PermissionError, match="cannot write"):
                trace_run(make_tiny(seed=0), ro / "tr", _config(), progress=False)
        finally:
            ro.chmod(0o700)


def test_disk_full_removes_temporaries_and_resume_finishes(tmp_path, monkeypatch):
    model = make_tiny(seed=0)
    calls = {"n": 0}
    real_close = pq.ParquetWriter.close

    def failing_close(self):
        calls["n"] += 1
        if calls["n"] == 3:  # shard 1's first table: shard 0 (two tables) committed already
            real_close(self)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_close(self)

    monkeypatch.setattr(pq.ParquetWriter, "close", failing_close)
    with pytest.raises(TraceWriteError, match="disk is full.*--resume"):
        trace_run(model, tmp_path, _config(), progress=False, background=False)
    monkeypatch.setattr(pq.ParquetWriter, "close", real_close)
    assert complete_shards(tmp_path) == [0]
    assert not temporary_files(tmp_path)
    assert not (tmp_path / "branches" / schema.shard_file_name(1)).exists()
    trace_run(model, tmp_path, _config(), resume=True, progress=False)
    assert complete_shards(tmp_path) == [0, 1, 2]
    fresh = trace_run(model, tmp_path / "fresh", _config(), progress=False)
    for table in ("tokens", "branches"):
        a = open_table(tmp_path, table).to_table().sort_by([("sample", "ascending"), ("step", "ascending")])
        b = open_table(fresh, table).to_table().sort_by([("sample", "ascending"), ("step", "ascending")])
        assert a.drop_columns(["run"]).equals(b.drop_columns(["run"]))


def test_resume_redoes_half_written_shard(tmp_path):
    model = make_tiny(seed=0)
    trace_run(model, tmp_path, _config(), progress=False)
    (tmp_path / "tokens" / schema.shard_file_name(2)).unlink()          # crash between the two renames
    (tmp_path / "tokens" / (schema.shard_file_name(2) + ".tmp")).write_bytes(b"partial")
    assert complete_shards(tmp_path) == [0, 1]
    assert len(open_table(tmp_path, "branches").files) == 2            # readers skip incomplete shards
    trace_run(model, tmp_path, _config(), resume=True, progress=False)
    assert complete_shards(tmp_path) == [0, 1, 2] and not temporary_files(tmp_path)


def test_resolve_labels():
    assert resolve_labels(3, num_per_class=2) == (0, 0, 1, 1, 2, 2)
    assert resolve_labels(3, samples=5, labels=[2, 0]) == (2, 0, 2, 0, 2)
    assert resolve_labels(3, samples=4) == (0, 1, 2, 0)
    with pytest.raises(ValueError, match="outside"):
        resolve_labels(3, labels=[3])
    with pytest.raises(ValueError, match="disagrees"):
        resolve_labels(3, samples=5, num_per_class=2)


def test_cli_trace_and_info(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors")
    out = tmp_path / "tr"
    args = ["trace", "--checkpoint", str(ckpt), "--steps", "3", "--samples", "3", "--labels", "1,2",
            "--cfg-scale", "1.5", "--batch-size", "2", "--lags", "2", "--out", str(out), "--no-progress",
            "--device", "cpu"]
    assert moeca_main(args) == 0
    assert read_run_meta(out)["labels"] == [1, 2, 1]
    assert moeca_main(args) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert moeca_main(args + ["--resume"]) == 0
    capsys.readouterr()
    assert moeca_main(["trace-info", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "1 trace run(s)" in text and "2/2 complete" in text and "schema v1" in text and "B/row" in text
    assert moeca_main(["trace-info", "--json", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)[0]
    assert info["tables"]["branches"]["rows"] == 3 * 2 * 3 * 2 * 16 * 2
    assert moeca_main(["trace-info", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
