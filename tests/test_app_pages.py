"""Every explorer page under streamlit.testing: widgets change, nothing raises, bad uploads are refused."""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from streamlit.testing.v1 import AppTest

from moeca.app.common import ROOT_ENV
from moeca.testing.explorer_root import SyntheticTraceConfig, write_example_root, write_synthetic_trace
from moeca.bench.pareto_synthetic import write_synthetic_pareto
from moeca.models.registry import demo_weights_path

SCRIPT = str(Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py")
PAGES = ("page_overview.py", "page_traces.py", "page_token_branch.py", "page_schedule.py", "page_replay.py",
         "page_benchmarks.py")


@pytest.fixture(scope="module")
def example_root(tmp_path_factory) -> Path:
    """A root shaped like the main job's output: demo-shaped synthetic trace, real report/schedule, pareto."""
    root = tmp_path_factory.mktemp("explorer")
    cfg = SyntheticTraceConfig.for_preset("demo", samples=2, samples_per_shard=2, steps=50, lags=3)
    write_example_root(root, cfg)
    write_synthetic_pareto(root / "bench" / "results")
    outside = tmp_path_factory.mktemp("outside")
    write_synthetic_trace(outside / "secret_trace", SyntheticTraceConfig(samples=1, steps=4, blocks=1, tokens=4))
    (root / "sneaky").symlink_to(outside)
    return root


def open_app(root: Path, monkeypatch, page: str | None = None) -> AppTest:
    monkeypatch.setenv(ROOT_ENV, str(root))
    at = AppTest.from_file(SCRIPT, default_timeout=120)
    at.run()
    if page:
        at.switch_page(page)
        at.run()
    assert_ok(at)
    return at


def assert_ok(at: AppTest) -> None:
    assert not at.exception, [e.message for e in at.exception]


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def charts(at: AppTest) -> int:
    return len(at.get("vega_lite_chart"))


def test_empty_root_shows_exact_commands(tmp_path, monkeypatch):
    expected = {
        "page_overview.py": f"moeca trace --model demo --out {tmp_path / 'out' / 'trace'}",
        "page_traces.py": f"moeca trace --model demo --out {tmp_path / 'out' / 'trace'}",
        "page_token_branch.py": f"moeca analyze {tmp_path / 'out' / 'trace'} --out {tmp_path / 'out' / 'report'}",
        "page_schedule.py": f"moeca schedule derive {tmp_path / 'out' / 'trace'} --target-speedup 1.5",
        "page_replay.py": f"--out {tmp_path / 'out' / 'schedule.json'}",
        "page_benchmarks.py": f"moeca bench pareto --model demo --out {tmp_path / 'bench' / 'results'}",
    }
    at = open_app(tmp_path, monkeypatch)
    for page, command in expected.items():
        at.switch_page(page).run()
        assert_ok(at)
        assert command in texts(at.code), (page, texts(at.code))
        assert "No " in texts(at.info)
        assert not at.error


def test_missing_root_is_a_message_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv(ROOT_ENV, str(tmp_path / "does-not-exist"))
    at = AppTest.from_file(SCRIPT, default_timeout=60).run()
    assert_ok(at)
    assert "does not exist" in texts(at.error)


def test_overview(example_root, monkeypatch):
    at = open_app(example_root, monkeypatch)
    assert [m.value for m in at.metric] == ["1", "1", "1", "1"]
    assert "sneaky" not in texts(at.markdown)


def test_traces_page_widgets(example_root, monkeypatch):
    at = open_app(example_root, monkeypatch, "page_traces.py")
    assert at.selectbox(key="trace_run").options == ["out/trace"]      # the symlinked trace outside is not offered
    assert charts(at) == 3
    assert "2" == at.metric[2].value                                    # samples
    for unit in at.selectbox(key="trace_unit").options:
        at.selectbox(key="trace_unit").set_value(unit).run()
        assert_ok(at)
        assert charts(at) == 3
    at.slider(key="trace_lag").set_value(3).run()
    assert_ok(at)
    at.radio(key="trace_metric").set_value("cosine").run()
    assert_ok(at)
    assert "lag 3" in texts(at.caption) or charts(at) == 3
    at.multiselect(key="trace_cfg").set_value([1]).run()
    at.multiselect(key="trace_class").set_value([1]).run()
    at.multiselect(key="trace_blocks").set_value([0, 5]).run()
    assert_ok(at)
    assert charts(at) == 3
    at.multiselect(key="trace_blocks").set_value([]).run()
    assert_ok(at)
    assert "Select at least one" in texts(at.warning)


def test_token_vs_branch_page(example_root, monkeypatch):
    at = open_app(example_root, monkeypatch, "page_token_branch.py")
    assert "expert branch" in texts(at.success)                        # the analysis' headline sentence
    assert charts(at) == 1
    at.radio(key="tvb_view").set_value("run").run()
    at.select_slider(key="tvb_span").set_value(3).run()
    at.radio(key="tvb_of").set_value("block FLOPs").run()
    assert_ok(at)
    assert charts(at) == 1
    at.selectbox(key="tvb_figure").set_value("drift_heatmaps.png").run()
    at.multiselect(key="tvb_units").set_value(["expert"]).run()
    assert_ok(at)
    # uploads: a pickle disguised as Parquet is refused with a message; the page keeps rendering
    at.file_uploader(key="tvb_upload").upload("evil.parquet", pickle.dumps({"x": 1})).run()
    assert_ok(at)
    assert "not a Parquet file" in texts(at.error)
    assert charts(at) == 1
    buf = io.BytesIO()
    pq.write_table(pa.table({"a": [1, 2]}), buf)
    at.file_uploader(key="tvb_upload").set_value(("ok.parquet", buf.getvalue(), "application/octet-stream")).run()
    assert_ok(at)
    assert "ok.parquet: 2 rows" in texts(at.success)


def test_schedule_page(example_root, monkeypatch):
    at = open_app(example_root, monkeypatch, "page_schedule.py")
    assert at.selectbox(key="sched_source").value == "report: out/report"
    at.slider(key="sched_target").set_value(1.5).run()
    assert_ok(at)
    if at.warning:  # a target out of reach is explained, not raised
        assert "out of reach" in texts(at.warning)
    at.radio(key="sched_mode").set_value("error budget").run()
    at.select_slider(key="sched_budget").set_value(0.3).run()
    assert_ok(at)
    assert not at.warning, texts(at.warning)
    assert "predicted FLOPs ratio" in [m.label for m in at.metric]
    assert len(at.get("download_button")) == 1
    for unit in ("attention", "shared expert", "routed experts"):
        at.radio(key="derived_unit").set_value(unit).run()
        assert_ok(at)
    assert at.session_state["derived_schedule"]["schedule"].forecast == "linear"
    at.radio(key="sched_refresh").set_value("budget").run()
    before = at.session_state["derived_schedule"]["schedule"].to_json()
    at.slider(key="sched_sync").set_value(4).run()
    at.slider(key="sched_bias_7").set_value(3.0).run()
    assert_ok(at)
    after = at.session_state["derived_schedule"]["schedule"].to_json()
    assert after != before and after["provenance"]["app_expert_bias"][7] == 3.0
    from moeca.policy.derive import DeriveConfig, sync_steps
    cfg = DeriveConfig(target_speedup=None, error_budget=0.3, refresh="budget", sync_interval=4)
    assert after["provenance"]["config"]["sync_interval"] == 4
    assert tuple(after["sync_refresh_steps"]) == sync_steps(50, cfg)
    at.button(key="sched_use_derived").click().run()
    assert_ok(at)
    assert at.session_state["chosen_schedule"]["schedule"].to_json() == after
    # inspect tab: a file under the root, then bad uploads
    at.selectbox(key="sched_file").set_value("out/schedule.json").run()
    assert_ok(at)
    assert "out/schedule.json: valid schedule" in texts(at.success)
    at.file_uploader(key="sched_upload").upload("broken.json", b'{"format_version": 1,').run()
    assert_ok(at)
    assert "not valid JSON" in texts(at.error)
    bad = dict(after)
    bad["sampler"] = {**after["sampler"], "kind": "euler"}
    at.file_uploader(key="sched_upload").set_value(("bad.json", json.dumps(bad).encode(), "application/json")).run()
    assert_ok(at)
    assert "field sampler.kind" in texts(at.error)
    at.file_uploader(key="sched_upload").set_value(("good.json", json.dumps(after).encode(), "application/json")).run()
    assert_ok(at)
    assert "uploaded good.json: valid schedule" in texts(at.success)


def test_replay_page(example_root, monkeypatch):
    at = open_app(example_root, monkeypatch, "page_replay.py")
    assert at.selectbox(key="replay_source").options == ["file: out/schedule.json"]
    assert "Run replay" in texts(at.info)
    at.slider(key="replay_samples").set_value(2).run()
    at.button(key="replay_run").click().run()
    assert_ok(at)
    if not demo_weights_path().is_file():
        assert "demo model weights are missing" in texts(at.warning)
        return
    assert not at.warning, texts(at.warning)
    labels = [m.label for m in at.metric]
    assert {"measured speedup", "mean PSNR vs full", "accuracy (full)", "accuracy (cached)"} <= set(labels)
    assert len(at.get("image")) == 2
    at.slider(key="replay_cfg").set_value(2.0).run()      # a changed widget keeps the last result on screen
    assert_ok(at)


def test_replay_page_shows_earlier_replay_outputs(tmp_path, monkeypatch):
    """A `moeca replay --out` folder under the root (report.json + PNG grids) is listed and shown."""
    write_example_root(tmp_path, SyntheticTraceConfig(samples=2, steps=8, blocks=2, tokens=4, experts=4),
                       report=False, replay=True)
    (tmp_path / "out" / "replay" / "samples.pt").write_bytes(pickle.dumps(object()))  # never opened
    at = open_app(tmp_path, monkeypatch, "page_replay.py")
    assert at.selectbox(key="replay_earlier").options == ["out/replay"]
    assert "measured speedup" in [m.label for m in at.metric] and len(at.get("image")) == 2
    assert not at.warning and not at.error


def test_benchmarks_page(example_root, monkeypatch):
    at = open_app(example_root, monkeypatch, "page_benchmarks.py")
    assert at.selectbox(key="bench_result").value == "bench/results/pareto_demo.json"
    assert charts(at) == 1
    assert at.selectbox(key="bench_x").value == "speedup" and at.selectbox(key="bench_y").value == "psnr"
    at.selectbox(key="bench_y").set_value("fd").run()
    assert_ok(at)
    assert charts(at) == 1
    at.file_uploader(key="bench_upload").upload("r.json", b"\x80\x04\x95 not json").run()
    assert_ok(at)
    assert "Upload rejected" in texts(at.error)
    assert charts(at) == 1


def test_replay_page_runs_and_refuses_foreign_schedules(example_root, tmp_path, monkeypatch):
    """Run replay end to end (demo architecture, random weights standing in for the shipped ones), then a
    schedule derived for another model is refused with the field that disagrees."""
    import streamlit as st
    import torch

    from moeca.models import registry
    from moeca.models.checkpoint import save_safetensors
    from moeca.models.config import get_preset
    from moeca.models.dit_moe import DiTMoE

    torch.manual_seed(0)
    model = DiTMoE(get_preset("demo"))
    registry.randomize_zero_init(model, 0)
    weights = tmp_path / "demo_model.safetensors"
    save_safetensors(model, weights)
    monkeypatch.setattr(registry, "demo_weights_path", lambda: weights)
    st.cache_resource.clear()
    try:
        at = open_app(example_root, monkeypatch, "page_replay.py")
        at.slider(key="replay_samples").set_value(2).run()
        at.button(key="replay_run").click().run()
        assert_ok(at)
        assert not at.warning, texts(at.warning)
        metrics = {m.label: m.value for m in at.metric}
        assert metrics["measured speedup"].endswith("x") and metrics["mean PSNR vs full"].endswith("dB")
        assert metrics["FLOPs computed"].endswith("%") and float(metrics["FLOPs computed"][:-1]) < 100
        assert "accuracy (cached)" in metrics
        assert len(at.get("image")) == 2
        # a schedule for the tiny synthetic model cannot run on the demo model: the field is named
        from moeca.policy.schedule import Schedule
        other = write_example_root(tmp_path / "other", SyntheticTraceConfig(samples=2, steps=50, blocks=2, tokens=4,
                                                                             experts=4), report=False)
        at.session_state["chosen_schedule"] = {"label": "foreign", "schedule": Schedule.load(other["schedule"])}
        at.run()
        at.selectbox(key="replay_source").set_value("foreign").run()
        at.button(key="replay_run").click().run()
        assert_ok(at)
        assert "is for model `synthetic`, not the demo model, and none of the traces" in texts(at.warning)
    finally:
        st.cache_resource.clear()


def test_token_vs_branch_without_report_computes_from_trace(tmp_path, monkeypatch):
    write_example_root(tmp_path, SyntheticTraceConfig(samples=2, steps=8, blocks=2, tokens=4, experts=4, lags=2),
                       report=False, schedule=False)
    at = open_app(tmp_path, monkeypatch, "page_token_branch.py")
    assert "moeca analyze" in texts(at.code)
    at.button(key="tvb_compute").click().run()
    assert_ok(at)
    assert "deciding reuse per expert branch" in texts(at.success)
    assert charts(at) == 1
    at.radio(key="tvb_view").set_value("run").run()
    assert_ok(at)
    assert charts(at) == 1


def test_traces_page_with_a_corrupt_shard_warns(tmp_path, monkeypatch):
    write_synthetic_trace(tmp_path / "t", SyntheticTraceConfig(samples=4, samples_per_shard=2, steps=4, blocks=2,
                                                               tokens=4, experts=4))
    shard = tmp_path / "t" / "tokens" / "shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    at = open_app(tmp_path, monkeypatch, "page_traces.py")
    assert "truncated or corrupt" in texts(at.warning)
