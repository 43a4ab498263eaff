"""The explorer's data layer: trace aggregation, discovery, uploads, schedule views, replay helper."""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_tiny
from moeca.app import inventory, replay_run, schedule_view, trace_data as td, uploads
from moeca.app.paths import resolve_root
from moeca.testing.explorer_root import SyntheticTraceConfig, write_example_root, write_synthetic_trace
from moeca.bench.pareto_synthetic import write_synthetic_pareto

SMALL = SyntheticTraceConfig(samples=3, samples_per_shard=2, steps=6, blocks=2, tokens=9, experts=4, lags=3)


def _inject_non_finite(path: Path, column: str, values: dict[int, float]) -> None:
    """Rewrite a shard with ``column[i] = v`` for the given rows (NaN/Inf), keeping the schema."""
    table = pq.read_table(path)
    col = table.column(column).to_numpy(zero_copy_only=False).astype(np.float32)
    mask = table.column(column).is_null().to_numpy(zero_copy_only=False)
    for i, v in values.items():
        col[i], mask[i] = v, False
    arr = pa.array(col.astype(np.float16), mask=mask)
    table = table.set_column(table.schema.get_field_index(column), table.schema.field(column), arr)
    pq.write_table(table, path, compression="zstd")


@pytest.fixture(scope="module")
def trace_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("root")
    write_synthetic_trace(root / "t", SMALL)
    first = root / "t" / "branches" / "shard-00000.parquet"
    n = pq.ParquetFile(first).metadata.num_rows
    rows = {n - 1: float("nan"), n - 2: float("inf"), n - 3: float("nan")}   # late steps: not null there
    _inject_non_finite(first, "rel_l2_lag1", rows)
    return resolve_root(root)


def _branches(root: Path) -> pd.DataFrame:
    frames = [pq.read_table(p).to_pandas() for p in sorted((root / "t" / "branches").glob("shard-*.parquet"))]
    df = pd.concat(frames, ignore_index=True)
    for c in df.columns:
        if str(df[c].dtype) == "float16":
            df[c] = df[c].astype(np.float64)
    return df


def test_branch_aggregate_matches_pandas(trace_root):
    info = td.load_trace_info(trace_root, "t")
    assert info.lags == 3 and info.labels == (0, 1, 2) and len(info.branch_files) == 2
    agg = td.branch_aggregate(trace_root, info, threads=1)
    raw = _branches(trace_root)
    raw["label"] = raw["sample"].map(dict(enumerate(info.labels)))
    assert int(agg["rows"].sum()) == len(raw) == SMALL.branch_rows
    # mean rel_l2 lag 1 per (step, block, expert) over finite values
    finite = raw[np.isfinite(raw["rel_l2_lag1"])]
    want = finite.groupby(["step", "block", "expert"])["rel_l2_lag1"].mean()
    got = td.drift_grid(agg, "rel1", by=("step", "block", "expert")).set_index(["step", "block", "expert"])
    got = got[got["n"] > 0]["value"]
    pd.testing.assert_series_equal(got.sort_index(), want.sort_index(), check_names=False, rtol=1e-9)
    # non-finite values are counted, not averaged
    assert int(agg["rel1_nan"].sum()) == 3
    # class filter: label 1 is sample 1 only
    only1 = td.apply_filters(agg, labels=[1])
    assert int(only1["rows"].sum()) == int((raw["sample"] == 1).sum())
    # routing stability = mean routed_prev at steps >= 1
    stab = td.routing_stability(agg).set_index(["step", "block"])["persist_frac"]
    want_stab = raw[raw["step"] > 0].groupby(["step", "block"])["routed_prev"].mean()
    pd.testing.assert_series_equal(stab.sort_index(), want_stab.sort_index(), check_names=False)


def test_token_aggregate_matches_pandas(trace_root):
    info = td.load_trace_info(trace_root, "t")
    agg = td.token_aggregate(trace_root, info, threads=1)
    frames = [pq.read_table(p).to_pandas() for p in sorted((trace_root / "t" / "tokens").glob("shard-*.parquet"))]
    raw = pd.concat(frames, ignore_index=True)
    col = raw["moe_rel_l2_lag2"].astype(np.float64)
    want = raw.assign(v=col)[np.isfinite(col)].groupby(["step", "block"])["v"].mean()
    got = td.drift_grid(td.apply_filters(agg, cfg_branches=[0, 1]), "moe_rel2").set_index(["step", "block"])
    got = got[got["n"] > 0]["value"]
    pd.testing.assert_series_equal(got.sort_index(), want.sort_index(), check_names=False, rtol=1e-9)
    # lag 2 is null at steps 0 and 1
    assert set(td.drift_grid(agg, "moe_rel2").query("n == 0")["step"]) == {0, 1}


def test_histogram_quantiles_close_to_exact(trace_root):
    info = td.load_trace_info(trace_root, "t")
    hist = td.branch_histogram(trace_root, info, 2, threads=1)
    raw = _branches(trace_root)
    q = td.histogram_quantiles(hist).set_index("expert")
    bin_ratio = 10 ** ((td.HIST_LOG10_MAX - td.HIST_LOG10_MIN) / td.HIST_BINS)
    for e, part in raw.groupby("expert"):
        vals = part["rel_l2_lag2"].dropna()
        vals = vals[np.isfinite(vals)]
        assert q.loc[e, "count"] == len(vals)
        exact = float(np.quantile(vals, 0.5))
        assert exact / bin_ratio <= q.loc[e, "q50"] <= exact * bin_ratio
    with pytest.raises(ValueError, match="lag 9 not in this trace"):
        td.branch_histogram(trace_root, info, 9)
    dens = td.histogram_density(hist)
    assert np.allclose(dens.groupby("expert")["density"].sum(), 1.0)


def test_trace_errors(tmp_path):
    root = resolve_root(tmp_path)
    (root / "bad").mkdir()
    (root / "bad" / "run.json").write_text("{not json")
    with pytest.raises(td.TraceError, match="not valid JSON"):
        td.load_trace_info(root, "bad")
    (root / "future").mkdir()
    (root / "future" / "run.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(td.TraceError, match="schema version 99"):
        td.load_trace_info(root, "future")
    (root / "empty" / "branches").mkdir(parents=True)
    (root / "empty" / "run.json").write_text(json.dumps({"schema_version": 1}))
    (root / "empty" / "branches" / "shard-00000.parquet.tmp").write_bytes(b"partial")
    with pytest.raises(td.TraceError, match="no shard files yet"):
        td.load_trace_info(root, "empty")


def test_real_tracer_output_is_readable(tmp_path):
    """A trace written by the real tracer (tiny model) aggregates to its row count with correct keys."""
    from moeca.diffusion.samplers import SamplerConfig
    from moeca.tracer.run import TraceConfig, trace_run

    model = make_tiny()
    sampler = SamplerConfig(kind="rectified_flow", num_steps=4, cfg_scale=1.5, cfg_mode="batched")
    trace_run(model, tmp_path / "tr", TraceConfig(sampler=sampler, labels=(0, 1, 2), batch_size=2, lags=2),
              progress=False, background=False)
    root = resolve_root(tmp_path)
    info = td.load_trace_info(root, "tr")
    agg = td.branch_aggregate(root, info, threads=1)
    assert int(agg["rows"].sum()) == 3 * 2 * 4 * 2 * 16 * 2   # samples x cfg x steps x blocks x tokens x k
    assert sorted(agg["label"].unique()) == [0, 1, 2]
    assert set(agg["cfg_branch"].unique()) == {0, 1}
    tok = td.token_aggregate(root, info, threads=1)
    assert int(tok["rows"].sum()) == 3 * 2 * 4 * 2 * 16
    assert inventory.discover(root).traces == ("tr",)
    # the tracer's float16 BYTE_STREAM_SPLIT columns go through the pyarrow path; the same data rewritten
    # with plain encoding goes through DuckDB's reader: both agree, and agree with pandas
    assert not td.duckdb_can_read(root / info.branch_files[0])
    import shutil
    shutil.copytree(root / "tr", root / "plain")
    for table in ("branches", "tokens"):
        for path in (root / "plain" / table).glob("shard-*.parquet"):
            pq.write_table(pq.read_table(path), path, compression="zstd")
    plain = td.load_trace_info(root, "plain")
    assert td.duckdb_can_read(root / plain.branch_files[0])
    agg_plain = td.branch_aggregate(root, plain, threads=1)
    pd.testing.assert_frame_equal(agg, agg_plain)
    pd.testing.assert_frame_equal(tok, td.token_aggregate(root, plain, threads=1))
    raw = pd.concat([pq.read_table(p).to_pandas() for p in sorted((root / "tr" / "branches").glob("*.parquet"))])
    raw["rel_l2_lag1"] = raw["rel_l2_lag1"].astype(np.float64)
    want = raw.dropna(subset=["rel_l2_lag1"]).groupby(["step", "block"])["rel_l2_lag1"].mean()
    got = td.drift_grid(agg, "rel1").set_index(["step", "block"])
    pd.testing.assert_series_equal(got[got["n"] > 0]["value"], want, check_names=False, rtol=1e-9)


def test_discover_example_root(tmp_path):
    paths = write_example_root(tmp_path / "root")
    write_synthetic_pareto(tmp_path / "root" / "bench" / "results")
    outside = tmp_path / "elsewhere"
    write_synthetic_trace(outside / "t2", SMALL)
    (tmp_path / "root" / "linked").symlink_to(outside)          # a trace reachable only through a link out
    root = resolve_root(tmp_path / "root")
    found = inventory.discover(root)
    assert found.traces == ("out/trace",)
    assert found.reports == ("out/report",)
    assert found.schedules == ("out/schedule.json",)
    assert found.benchmarks == ("bench/results/pareto_demo.json",)
    assert paths["schedule"].is_file()
    assert inventory.discover(resolve_root(tmp_path / "elsewhere" / "t2" / "branches")).empty


# ----------------------------------------------------------------------------- uploads
def test_parse_json_upload():
    assert uploads.parse_json(b'{"a": [1, 2]}', "x.json") == {"a": [1, 2]}
    with pytest.raises(uploads.UploadError, match=r"x.json: not valid JSON: .* line 1, column"):
        uploads.parse_json(b'{"a": ', "x.json")
    with pytest.raises(uploads.UploadError, match="NaN is not valid JSON"):
        uploads.parse_json(b'{"a": NaN}', "x.json")
    with pytest.raises(uploads.UploadError, match="not UTF-8"):
        uploads.parse_json(b"\xff\xfe\x00garbage", "x.json")
    with pytest.raises(uploads.UploadError, match="empty"):
        uploads.parse_json(b"", "x.json")
    with pytest.raises(uploads.UploadError, match="Parquet file, but a JSON file is expected"):
        uploads.parse_json(b"PAR1....PAR1", "x.json")


def test_parse_parquet_upload_never_unpickles():
    buf = io.BytesIO()
    pq.write_table(pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]}), buf)
    frame = uploads.parse_parquet(buf.getvalue(), "t.parquet")
    assert frame["a"].tolist() == [1, 2, 3]

    class Boom:
        def __reduce__(self):
            return (pytest.fail, ("a pickle was executed",))

    payload = pickle.dumps(Boom())
    with pytest.raises(uploads.UploadError, match="not a Parquet file"):
        uploads.parse_parquet(payload, "evil.parquet")
    with pytest.raises(uploads.UploadError, match="not UTF-8 text"):
        uploads.parse_json(payload, "evil.json")
    with pytest.raises(uploads.UploadError, match="only .parquet and .json"):
        uploads.parse_table(payload, "evil.pkl")
    data = buf.getvalue()
    broken = data[:8] + b"\x00" * 40 + data[48:]
    with pytest.raises(uploads.UploadError, match="damaged Parquet file"):
        uploads.parse_parquet(broken, "broken.parquet")
    rows = uploads.parse_table(json.dumps({"rows": [{"a": 1}, {"a": 2}]}).encode(), "r.json")
    assert rows["a"].tolist() == [1, 2]
    with pytest.raises(uploads.UploadError, match="list of row objects"):
        uploads.parse_table(b'{"rows": 3}', "r.json")


# ----------------------------------------------------------------------------- schedules
@pytest.fixture(scope="module")
def derived(tmp_path_factory):
    from moeca.analysis.api import drift_summary
    root = tmp_path_factory.mktemp("sched")
    cfg = SyntheticTraceConfig(samples=2, samples_per_shard=2, steps=12, blocks=2, tokens=9, experts=4)
    trace = write_synthetic_trace(root / "t", cfg)
    summary = drift_summary([trace], threads=1)
    meta = json.loads((trace / "run.json").read_text())
    return summary, meta


def test_reuse_map_and_bias(derived):
    summary, meta = derived
    knobs = schedule_view.Knobs(mode="error budget", error_budget=0.3, refresh="budget", sync_interval=4,
                                warmup_steps=2, final_steps=1)
    sched = schedule_view.derive(summary, meta, knobs)
    rmap = schedule_view.reuse_map(sched)
    assert len(rmap) == 12 * 2 * (3 + 4)
    assert (rmap[rmap["sync"]]["refresh"] == 1.0).all()
    from moeca.policy.derive import sync_steps
    assert sched.sync_refresh_steps == sync_steps(12, schedule_view.derive_config(knobs))
    assert {0, 1, 11} <= set(sched.sync_refresh_steps) and len(sched.sync_refresh_steps) < 12
    free = rmap[~rmap["sync"] & (rmap["unit"] == "expert")]
    assert free["refresh"].between(0, 1).all() and free["refresh"].mean() < 1.0
    # biasing expert 3 up makes it refresh at least as much, everywhere; the others are unchanged
    biased = schedule_view.derive(summary, meta, schedule_view.Knobs(
        mode="error budget", error_budget=0.3, refresh="budget", sync_interval=4, warmup_steps=2, final_steps=1,
        expert_bias=(1, 1, 1, 4.0)))
    bmap = schedule_view.reuse_map(biased)
    e3 = (rmap["unit"] == "expert") & (rmap["expert"] == 3)
    assert (bmap.loc[e3, "refresh"].to_numpy() >= rmap.loc[e3, "refresh"].to_numpy()).all()
    assert bmap.loc[e3, "refresh"].mean() > rmap.loc[e3, "refresh"].mean()
    e0 = (rmap["unit"] == "expert") & (rmap["expert"] == 0)
    assert np.array_equal(bmap.loc[e0, "refresh"].to_numpy(), rmap.loc[e0, "refresh"].to_numpy())
    assert biased.provenance["app_expert_bias"] == [1, 1, 1, 4.0]
    nums = schedule_view.summary_numbers(sched)
    assert nums["predicted_speedup"] == pytest.approx(1 / sched.predicted_flops_ratio)
    with pytest.raises(ValueError, match="expert bias"):
        schedule_view.apply_expert_bias(summary, (1.0, -1.0))


def test_schedule_upload_validation(derived):
    summary, meta = derived
    sched = schedule_view.derive(summary, meta, schedule_view.Knobs(mode="error budget", error_budget=0.3))
    good = json.dumps(sched.to_json()).encode()
    assert schedule_view.parse_schedule_upload(good, "s.json").num_steps == 12
    doc = sched.to_json()
    doc["sampler"]["kind"] = "euler"
    with pytest.raises(uploads.UploadError, match=r"s.json: field sampler.kind"):
        schedule_view.parse_schedule_upload(json.dumps(doc).encode(), "s.json")
    doc = sched.to_json()
    doc["steps"] = doc["steps"][:5]
    with pytest.raises(uploads.UploadError, match="steps"):
        schedule_view.parse_schedule_upload(json.dumps(doc).encode(), "s.json")
    with pytest.raises(uploads.UploadError, match="a schedule is a JSON object"):
        schedule_view.parse_schedule_upload(b"[1, 2]", "s.json")
    with pytest.raises(uploads.UploadError, match="not valid JSON"):
        schedule_view.parse_schedule_upload(b"{", "s.json")


# ----------------------------------------------------------------------------- replay helper
def test_grid():
    imgs = np.stack([np.full((1, 2, 2), v, np.float32) for v in (-1.0, 0.0, 1.0)])
    picture = replay_run.grid(imgs, columns=2, scale=3)
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
    assert picture.min() == 0 and picture.max() == 255


def test_run_replay_no_reuse_is_exact_and_reuse_skips_work():
    from moeca.policy.schedule import REUSE, BlockRule, StepRule, full_schedule

    model = make_tiny()
    cfg = model.config
    from moeca.diffusion.samplers import SamplerConfig
    sc = SamplerConfig(kind="rectified_flow", num_steps=6, cfg_scale=1.5, cfg_mode="batched")
    full = full_schedule(cfg, sc)
    ticks = []
    out = replay_run.run_replay(model, full, replay_run.ReplaySettings(samples=3, repeats=2),
                                on_step=lambda d, t: ticks.append((d, t)))
    assert ticks[-1] == (2 * 2 * 6, 2 * 2 * 6)
    assert np.array_equal(out.full, out.cached)
    assert out.flops_ratio == pytest.approx(1.0) and (out.psnr == 100.0).all()
    assert out.accuracy_full is None and out.full.shape == (3, 1, 4, 4)
    # reuse every expert branch and the shared expert on odd steps: less work, different samples
    steps = list(full.steps)
    for s in (1, 3, 5):
        steps[s] = StepRule("compute", tuple(BlockRule(shared=REUSE, experts=(REUSE,) * 4) for _ in range(2)))
    reuse = type(full)(method="custom", model=full.model, sampler=full.sampler, steps=tuple(steps),
                       predicted_flops_ratio=0.8)
    out2 = replay_run.run_replay(model, reuse, replay_run.ReplaySettings(samples=3, warmup=True))
    assert out2.flops_ratio < 0.95 and out2.reuse["expert"] > 0.1
    assert not np.array_equal(out2.full, out2.cached)
    with pytest.raises(ValueError, match="samples must be in 1..256"):
        replay_run.ReplaySettings(samples=0)


# ----------------------------------------------------------------------------- CLI
def test_app_cli_rejects_bad_arguments(tmp_path, capsys):
    from moeca.app.cli import streamlit_command
    from moeca.cli.main import main

    assert main(["app", "--root", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["app", "--root", str(tmp_path / "file")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["app", "--root", str(tmp_path), "--port", "70000"]) == 2
    assert "--port 70000" in capsys.readouterr().err
    assert main(["app", "--root", str(tmp_path), "--host", "not an address"]) == 2
    cmd = streamlit_command(tmp_path, "127.0.0.1", 8600)
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1" and "--server.headless" in cmd
    assert cmd[cmd.index("--server.maxUploadSize") + 1] == str(uploads.MAX_UPLOAD_BYTES >> 20)


def test_corrupt_shard_is_a_clear_error(tmp_path):
    write_synthetic_trace(tmp_path / "t", SMALL)
    shard = tmp_path / "t" / "branches" / "shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])      # a truncated file
    root = resolve_root(tmp_path)
    with pytest.raises(td.TraceError, match=r"^t/branches/shard-00001.parquet: cannot read this Parquet file .*"
                                            r"truncated or corrupt; delete t/branches/shard-00001.parquet and run "
                                            r"`moeca trace --resume`"):
        td.load_trace_info(root, "t")            # the CLI's check, before any data is read
