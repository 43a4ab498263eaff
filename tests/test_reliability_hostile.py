"""Hostile inputs: custom checkpoints everywhere, hostile files in the explorer, schedule JSON
edge cases, leftovers after kills, concurrent writers, cache faults, awkward paths, timings under load, one
cfg_mode rule. Every hostile input is generated here."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from moeca.cli.main import main
from conftest import TINY, tiny_checkpoint

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
    from test_derive_wallclock import costs

    loaded = []
    monkeypatch.setattr("moeca.replay.calibrate.ensure_costs",
                        lambda model, sampler, batch, progress: loaded.append(model.config) or costs())
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
    from moeca.diffusion.samplers import default_cfg_mode

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


# ----------------------------------------------------------------------------- 4: schedule JSON edge cases
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("r3tiny") / "tiny.safetensors")


def _schedule_text(weights_hash: str | None = None) -> str:
    from moeca.diffusion.samplers import SamplerConfig
    from moeca.policy.schedule import full_schedule
    sampler = SamplerConfig(kind="rectified_flow", num_steps=4, cfg_scale=1.5, cfg_mode="batched")
    return json.dumps(full_schedule(TINY, sampler, weights_hash).to_json(), indent=1)


def _replay(schedule: Path, ckpt: Path, out: Path) -> int:
    return main(["replay", "--schedule", str(schedule), "--checkpoint", str(ckpt), "--samples", "1", "--repeats",
                 "1", "--device", "cpu", "--out", str(out), "--no-progress"])


def _ddp_sample(schedule: Path, ckpt: Path, out: Path) -> int:
    from moeca.replay.sample_cli import main as ddp_main
    return ddp_main(["sample", "--schedule", str(schedule), "--checkpoint", str(ckpt), "--num-samples", "2",
                     "--batch-size", "2", "--device", "cpu", "--out", str(out), "--no-progress"])


def test_a_duplicate_key_in_a_schedule_is_refused_naming_the_key(tmp_path, tiny_ckpt, capsys):
    text = _schedule_text()
    assert '"forecast": "none"' in text
    path = tmp_path / "dup.json"
    path.write_text(text.replace('"forecast": "none"', '"forecast": "none",\n "forecast": "linear"'))
    for run in (lambda: main(["schedule", "show", str(path)]), lambda: _replay(path, tiny_ckpt, tmp_path / "r"),
                lambda: _ddp_sample(path, tiny_ckpt, tmp_path / "s.npz")):
        assert run() == 2
        err = capsys.readouterr().err
        assert f"schedule {path}: key 'forecast' appears twice in one JSON object" in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob("*.npz*"))


def test_a_deeply_nested_schedule_is_one_line_everywhere(tmp_path, tiny_ckpt, capsys):
    path = tmp_path / "deep.json"
    path.write_text("[" * 10_000 + "]" * 10_000)
    for run in (lambda: main(["schedule", "show", str(path)]), lambda: _replay(path, tiny_ckpt, tmp_path / "r"),
                lambda: _ddp_sample(path, tiny_ckpt, tmp_path / "s.npz")):
        assert run() == 2
        err = capsys.readouterr().err
        assert f"schedule {path}: JSON nested more than 64 levels deep" in err, err
        assert "Traceback" not in err and "RecursionError" not in err


def test_sync_refresh_steps_that_contradict_the_predicted_ratio_are_refused(tmp_path, capsys):
    doc = json.loads(_schedule_text())
    for rule in doc["steps"][1:]:                      # rules and ratio as if derived for 2x ...
        rule["model"] = "reuse"
    doc["predicted_flops_ratio"] = 0.25
    doc["method"] = "moeca"
    path = tmp_path / "s.json"
    path.write_text(json.dumps(doc))
    assert main(["schedule", "show", str(path)]) == 0
    doc["sync_refresh_steps"] = [0, 1, 2, 3]            # ... but every step synchronized
    path.write_text(json.dumps(doc))
    assert main(["schedule", "show", str(path)]) == 2
    err = capsys.readouterr().err
    assert ("field predicted_flops_ratio is 0.250 (4.00x) but its sync_refresh_steps (4 of 4 steps) and step rules "
            "compute at least 1.000 of the FLOPs (1.00x at most)") in err, err


def test_a_schedule_without_a_weights_hash_is_replayed_with_a_warning(tmp_path, tiny_ckpt, capsys):
    path = tmp_path / "s.json"
    path.write_text(_schedule_text(weights_hash=None))
    assert _replay(path, tiny_ckpt, tmp_path / "r") == 0
    err = capsys.readouterr().err
    assert (f"warning: schedule {path} records no weights hash (field model.weights_hash is null), so moeca cannot "
            "check that it was derived for these weights") in err
    path.write_text(_schedule_text(weights_hash="0" * 16))
    assert _replay(path, tiny_ckpt, tmp_path / "r2") == 2
    assert "weights" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 2-3: hostile files in the explorer
APP_SCRIPT = str(Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py")
APP_PAGES = ("page_overview.py", "page_traces.py", "page_token_branch.py", "page_schedule.py", "page_replay.py",
             "page_benchmarks.py")


def _zigzag_varint(value: int) -> bytes:
    z, out = (value << 1) ^ (value >> 63), bytearray()
    while True:
        low, z = z & 0x7F, z >> 7
        out.append(low | 0x80 if z else low)
        if not z:
            return bytes(out)


def lie_about_rows(path: Path, rows: int = 10**12) -> None:
    """Rewrite the Parquet footer's FileMetaData.num_rows (thrift field 3, right before the row groups)."""
    import pyarrow.parquet as pq
    data = path.read_bytes()
    n = pq.ParquetFile(path).metadata.num_rows
    size = int.from_bytes(data[-8:-4], "little")
    footer = data[-8 - size:-8]
    old = b"\x16" + _zigzag_varint(n) + b"\x19"
    assert footer.count(old) == 1
    footer = footer.replace(old, b"\x16" + _zigzag_varint(rows) + b"\x19")
    path.write_bytes(data[:-8 - size] + footer + len(footer).to_bytes(4, "little") + b"PAR1")
    assert pq.ParquetFile(path).metadata.num_rows == rows


@pytest.fixture(scope="module")
def hostile_root(tmp_path_factory) -> Path:
    import shutil

    import pyarrow.parquet as pq

    from moeca.testing.explorer_root import SyntheticTraceConfig, write_example_root
    root = tmp_path_factory.mktemp("hostile")
    write_example_root(root, SyntheticTraceConfig(samples=2, samples_per_shard=2, steps=6, blocks=2, tokens=4,
                                                  experts=4, lags=2))
    shutil.copytree(root / "out" / "trace", root / "out" / "lying")
    lie_about_rows(root / "out" / "lying" / "branches" / "shard-00000.parquet")
    shutil.copytree(root / "out" / "trace", root / "out" / "foreign")
    shard = root / "out" / "foreign" / "tokens" / "shard-00000.parquet"
    pq.write_table(pq.read_table(shard).rename_columns(
        ["Token" if c == "token" else c for c in pq.read_table(shard).column_names]), shard)
    (root / "deep.json").write_text("[" * 10_000 + "]" * 10_000)
    text = (root / "out" / "schedule.json").read_text()
    (root / "out" / "dup.json").write_text(text.replace('"forecast": ', '"forecast": "none",\n "forecast": ', 1))
    shutil.copytree(root / "out" / "report", root / "out" / "report2")
    lie_about_rows(root / "out" / "report2" / "summary.parquet")
    return root


def _app(root: Path, monkeypatch, page: str):
    from streamlit.testing.v1 import AppTest

    from moeca.app.common import ROOT_ENV
    monkeypatch.setenv(ROOT_ENV, str(root))
    at = AppTest.from_file(APP_SCRIPT, default_timeout=120)
    at.run()
    at.switch_page(page).run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def _shown(at) -> str:
    return "\n".join(str(e.value) for kind in (at.warning, at.error, at.info, at.markdown, at.caption) for e in kind)


def test_every_explorer_page_survives_hostile_files_and_names_each(hostile_root, monkeypatch):
    for page in APP_PAGES:
        at = _app(hostile_root, monkeypatch, page)
        shown = _shown(at)
        if page in ("page_overview.py", "page_schedule.py", "page_replay.py", "page_benchmarks.py"):
            assert "2 JSON file(s) under the root could not be read" in shown, (page, shown)
            assert "deep.json: JSON nested more than 64 levels deep" in shown
            assert "out/dup.json: key 'forecast' appears twice in one JSON object" in shown
        assert str(hostile_root) not in "\n".join(str(e.value) for e in (*at.warning, *at.error)), page
    at = _app(hostile_root, monkeypatch, "page_overview.py")
    assert [m.value for m in at.metric][0] == "3"


def test_the_explorer_refuses_a_lying_footer_and_a_foreign_schema_with_the_clis_message(hostile_root, monkeypatch):
    import resource

    at = _app(hostile_root, monkeypatch, "page_traces.py")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    at.selectbox(key="trace_run").set_value("out/lying").run()
    assert not at.exception
    shown = "\n".join(str(w.value) for w in at.warning)
    assert ("Cannot read trace `out/lying`: out/lying/branches/shard-00000.parquet: has 1,000,000,000,000 rows but "
            "run.json implies") in shown, shown
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 512 * 1024     # KiB: nothing allocated
    at.selectbox(key="trace_run").set_value("out/foreign").run()
    shown = "\n".join(str(w.value) for w in at.warning)
    assert ("out/foreign/tokens/shard-00000.parquet: schema does not match the tokens table of tracer/schema.py "
            "with lags=2 (missing columns ['token']; foreign columns ['Token'])") in shown, shown
    assert "SELECT" not in shown and str(hostile_root) not in shown
    at.selectbox(key="trace_run").set_value("out/trace").run()
    assert not at.exception and not at.warning and len(at.get("vega_lite_chart")) == 3


def test_a_report_table_whose_footer_lies_is_refused_unread(hostile_root):
    from moeca.app import results_data as rd
    from moeca.app.paths import resolve_root
    with pytest.raises(ValueError, match=r"out/report2/summary.parquet: its footer claims 1,000,000,000,000 rows, "
                                         r"more than the 5,000,000 the explorer shows"):
        rd.read_table(resolve_root(hostile_root), "out/report2/summary.parquet")


# ----------------------------------------------------------------------------- 5: leftovers after a kill
def _python(code: str, *args: str) -> int:
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300).returncode


_KILL_AT_INSTALL = """
import os, signal, sys
from pathlib import Path
import moeca.common.outputs as o
o._install = lambda tmp, out, listed, option: os.kill(os.getpid(), signal.SIGKILL)   # killed at the final rename
with o.output_dir(Path(sys.argv[1]), command="test") as tmp:
    (tmp / "report.md").write_text("complete")
"""


def test_a_temporary_killed_at_the_final_rename_is_removed_by_the_next_run(tmp_path, capsys):
    from moeca.testing.synthetic_traces import write_synthetic_trace
    trace = write_synthetic_trace(tmp_path / "trace", samples=2, samples_per_shard=1, num_steps=4)
    out = tmp_path / "report"
    assert _python(_KILL_AT_INSTALL, str(out)) == -9
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".report.tmp-")]
    assert len(left) == 1 and (left[0] / "report.md").read_text() == "complete"      # a complete output, marked
    assert main(["analyze", str(trace), "--out", str(out), "--quiet", "--no-figures"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "trace"]          # no temporary, no lock
    assert not any(n.startswith(".moeca-temporary") for n in (p.name for p in out.iterdir()))


_KILL_NPZ = """
import os, signal, sys
import moeca.common.outputs as o
real = o._record_file
def record(path, pending_from=None):
    if sys.argv[1] == "before-rename" and pending_from is not None and path.suffix == ".npz":
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, pending_from)
    if sys.argv[1] == "before-sidecar" and pending_from is not None and path.suffix == ".npz":
        os.replace(pending_from, path)
        os.kill(os.getpid(), signal.SIGKILL)
o._record_file = record
from moeca.replay.sample_cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_killed_npz_export_leaves_nothing_and_its_rerun_recognises_its_own_archive(tmp_path, tiny_ckpt, capsys):
    import numpy as np

    from moeca.replay.sample_cli import main as ddp_main
    out = tmp_path / "samples.npz"
    argv = ["sample", "--schedule", "none", "--checkpoint", str(tiny_ckpt), "--num-samples", "2", "--batch-size", "2",
            "--steps", "2", "--device", "cpu", "--out", str(out), "--no-progress"]
    assert _python(_KILL_NPZ, "before-rename", *argv) == -9
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]                   # its temporary is left
    assert ddp_main(argv) == 0, capsys.readouterr().err                                 # the rerun removes it
    assert sorted(p.name for p in tmp_path.iterdir()) == [".moeca-files.json", "samples.npz"]
    first = np.load(out)["arr_0"]
    assert _python(_KILL_NPZ, "before-sidecar", *argv) == -9                            # renamed, not yet recorded
    assert ddp_main(argv) == 0, capsys.readouterr().err                                 # its own archive: replaced
    assert np.array_equal(np.load(out)["arr_0"], first)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".moeca-files.json", "samples.npz"]
    out.write_bytes(b"the user's")                                                      # a user's file still needs
    assert ddp_main(argv) == 2 and "--overwrite" in capsys.readouterr().err             # --overwrite


# ----------------------------------------------------------------------------- 6: concurrent writers
_HOLD = """
import sys, time
from moeca.common.outputs import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_of_one_output_is_told_the_folder_is_in_use(tmp_path, tiny_ckpt, capsys):
    import subprocess
    import sys

    trace = tmp_path / "trace"
    assert main(["trace", "--checkpoint", str(tiny_ckpt), "--steps", "2", "--samples", "2", "--out", str(trace),
                 "--device", "cpu", "--no-progress"]) == 0
    other = trace
    for out, argv in ((trace, ["trace", "--checkpoint", str(tiny_ckpt), "--steps", "2", "--samples", "2", "--out",
                               str(trace), "--device", "cpu", "--no-progress", "--resume"]),
                      (tmp_path / "report", ["analyze", str(other), "--out", str(tmp_path / "report"), "--quiet"]),
                      (tmp_path / "s.json", ["schedule", "derive", str(other), "--target-flops-speedup", "1.5",
                                             "--out", str(tmp_path / "s.json")])):
        holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert f"{out} is in use by another moeca process (pid {holder.pid}); wait for it to finish" in err, err
            assert "free space" not in err and "No such file" not in err
        finally:
            holder.kill()
            holder.wait()
        assert main(argv) == 0, capsys.readouterr().err                # the lock of a killed holder is taken over
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".lock")]


# ----------------------------------------------------------------------------- 7: cache faults
def test_a_folder_where_the_calibration_file_should_be_is_refused_before_measuring(tmp_path, tiny_ckpt,
                                                                                   monkeypatch, capsys):
    monkeypatch.setenv("MOECA_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache" / "calibration.json").mkdir(parents=True)
    assert main(["calibrate", "--checkpoint", str(tiny_ckpt), "--batch", "1", "--device", "cpu"]) == 2
    got = capsys.readouterr()
    path = tmp_path / "cache" / "calibration.json"
    assert (f"calibration cache {path} is a folder, not the cache file moeca writes; move it away, or set "
            "MOECA_CACHE_DIR to another folder") in got.err
    assert "calibrating" not in got.out and ".tmp" not in got.err
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["calibration.json"]


def test_a_nan_cost_in_the_calibration_file_names_the_file_and_the_field(tmp_path):
    from moeca.policy.wallclock import CalibrationError, key_id, load_costs
    from test_derive_wallclock import costs
    key = {"device": "cpu", "batch": "1"}
    entry = {**costs(key=key).to_json(), "pair_ms": float("nan")}
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"format": 1, "entries": {key_id(key): entry}}))
    from moeca.policy.wallclock import CACHE_FORMAT
    path.write_text(json.dumps({"format": CACHE_FORMAT, "entries": {key_id(key): entry}}))
    with pytest.raises(CalibrationError, match=rf"^calibration cache {path}: calibration field pair_ms: nan must be a "
                                               r"finite number >= 0; recalibrate with `moeca calibrate`"):
        load_costs(key, path)


# ----------------------------------------------------------------------------- 8: paths
def test_a_non_utf8_out_is_named_and_nothing_is_written(tmp_path, tiny_ckpt, capsys):
    import os
    bad = os.fsdecode(bytes(tmp_path) + b"/out\xff")
    for argv in (["trace", "--checkpoint", str(tiny_ckpt), "--steps", "2", "--out", bad, "--device", "cpu"],
                 ["analyze", str(tmp_path), "--out", bad], ["run", f"--out={bad}"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"--out {tmp_path}/out\\xff: the path holds the byte 0xff, which is not UTF-8" in err, err
        assert "codec" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_names_at_the_length_limit_get_temporaries_within_it(tmp_path, tiny_ckpt, capsys):
    from moeca.common.outputs import NAME_MAX, sibling_prefix
    trace = tmp_path / "trace"
    assert main(["trace", "--checkpoint", str(tiny_ckpt), "--steps", "4", "--samples", "2", "--out", str(trace),
                 "--device", "cpu", "--no-progress"]) == 0
    for length in (245, NAME_MAX):
        report, schedule = tmp_path / ("r" * length), tmp_path / ("s" * (length - 5) + ".json")
        assert main(["analyze", str(trace), "--out", str(report), "--quiet", "--no-figures"]) == 0, \
            capsys.readouterr().err
        assert main(["analyze", str(trace), "--out", str(report), "--quiet", "--no-figures"]) == 0    # replaced
        assert main(["schedule", "derive", str(trace), "--target-flops-speedup", "1.5", "--out", str(schedule)]) == 0
        assert (report / "report.md").is_file() and schedule.is_file()
        assert len(sibling_prefix("x" * length, "tmp", 8)) + 8 <= NAME_MAX
    names = sorted(p.name for p in tmp_path.iterdir())
    assert all(not n.startswith(".") or n == ".moeca-files.json" for n in names), names


# ----------------------------------------------------------------------------- 9: timings you can trust
def test_timing_warnings_name_the_spread_the_load_and_the_flops_bound():
    from moeca.replay.driver import timing_warnings
    got = timing_warnings([9.0, 36.2, 40.4], flops_speedup=3.1, load=7.5, cores=2)
    assert got[0] == ("the back-to-back pairs disagree: per-pair speedups 9.00x..40.40x (spread 4.49x); the "
                      "machine's speed changed while timing")
    assert got[1] == "the load average was 7.5 on 2 cores while timing: other processes competed for the CPU"
    assert got[2].startswith("the measured 36.20x exceeds what the executed FLOPs allow (3.10x) by 11.7x; the "
                             "full-compute runs were slowed by something else. Measure again on a quiet machine")
    assert timing_warnings([2.0, 2.1, 1.9], flops_speedup=2.5, load=0.5, cores=2) == []


def test_replay_prints_and_records_the_spread_and_the_warning(tmp_path, tiny_ckpt, monkeypatch, capsys):
    import moeca.replay.driver as driver
    times = iter([1.0, 0.1, 4.0, 0.1, 1.0, 0.5])                 # full, cached, ...: pairs 10x, 40x, 2x
    monkeypatch.setattr(driver, "_timed", lambda fn, sync: (next(times), fn()))
    monkeypatch.setattr(driver, "load_average", lambda: 0.1)
    schedule = tmp_path / "s.json"
    schedule.write_text(_schedule_text())
    assert main(["replay", "--schedule", str(schedule), "--checkpoint", str(tiny_ckpt), "--samples", "1", "--repeats",
                 "3", "--device", "cpu", "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    got = capsys.readouterr()
    assert "**10.00x** (pairs 2.00x..40.00x) (unreliable, see the warning)" in got.out
    assert "**Warning:** the back-to-back pairs disagree: per-pair speedups 2.00x..40.00x" in got.out
    assert "warning: measured speedup 10.00x: the measured 10.00x exceeds what the executed FLOPs allow" in got.err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["speedup_range"] == [2.0, 40.0] and report["load_average"] == 0.1
    assert len(report["timing_warnings"]) == 2


def test_a_calibration_that_fits_badly_is_measured_again_then_refused(tmp_path, monkeypatch):
    import moeca.replay.calibrate as cal
    from moeca.diffusion.samplers import SamplerConfig
    from moeca.policy.wallclock import CalibrationError
    from conftest import make_tiny
    from test_derive_wallclock import costs

    model, sampler = make_tiny(), SamplerConfig(kind="rectified_flow", num_steps=4, cfg_scale=1.5)
    key = cal.calibration_key(model, sampler, 1)
    errors, said = [0.425, 0.41], []
    monkeypatch.setattr(cal, "measure_costs", lambda *a, **k: costs(key=key, fit_rel_error=errors.pop(0)))
    cache = tmp_path / "calibration.json"
    with pytest.raises(CalibrationError, match=r"measured twice and its fit misses the timed steps by 41.0% "
                                               r"\(median\), more than the 20% a wall-clock target can be derived from"):
        cal.ensure_costs(model, sampler, 1, cache=cache, progress=said.append)
    assert any("too noisy: its fit misses the timed steps by 42.5%" in m and "measuring once more" in m for m in said)
    assert not cache.exists()                                               # nothing noisy is cached
    errors[:] = [0.5, 0.04]
    assert cal.ensure_costs(model, sampler, 1, cache=cache, progress=said.append).fit_rel_error == 0.04
    cache.write_text(cache.read_text().replace('"fit_rel_error": 0.04', '"fit_rel_error": 0.3'))
    errors[:] = [0.05]
    assert cal.ensure_costs(model, sampler, 1, cache=cache, progress=said.append).fit_rel_error == 0.05
    assert "the cached calibration for" in said[-3] and "is too noisy" in said[-3]


def test_a_calibration_timed_while_the_machine_changed_speed_is_measured_again_then_refused(tmp_path, monkeypatch):
    """A calibration whose own full steps took far longer (or shorter) than its full-compute reference was timed
    while the machine changed speed: its refreshes would be mispriced and every target missed. It is measured again,
    then refused; ``max_fit_error`` widens the check as it widens the fit's."""
    import moeca.replay.calibrate as cal
    from moeca.diffusion.samplers import SamplerConfig
    from moeca.policy.wallclock import CalibrationError
    from conftest import make_tiny
    from test_derive_wallclock import costs

    model, sampler = make_tiny(), SamplerConfig(kind="rectified_flow", num_steps=4, cfg_scale=1.5)
    key = cal.calibration_key(model, sampler, 1)
    ratios, said = [1.44, 0.7], []
    monkeypatch.setattr(cal, "measure_costs", lambda *a, **k: costs(key=key, fit_rel_error=0.05,
                                                                     refresh_over_full=ratios.pop(0)))
    cache = tmp_path / "calibration.json"
    with pytest.raises(CalibrationError, match=r"its full steps took 0.70x its full-compute reference .* the machine "
                                               r"changed speed while it was timed"):
        cal.ensure_costs(model, sampler, 1, cache=cache, progress=said.append)
    assert any("took 1.44x" in m and "measuring once more" in m for m in said) and not cache.exists()
    ratios[:] = [1.44, 1.08]
    assert cal.ensure_costs(model, sampler, 1, cache=cache, progress=said.append).refresh_over_full == 1.08
    ratios[:] = [1.44]
    assert cal.ensure_costs(model, sampler, 1, cache=tmp_path / "other.json", progress=said.append,
                            max_fit_error=0.5).refresh_over_full == 1.44                  # within a 50% allowance


def test_the_explorer_replays_a_custom_checkpoint_its_schedule_names(tmp_path, monkeypatch, capsys):
    root = tmp_path / "root"
    root.mkdir()
    ckpt = tiny_checkpoint(root / "my.safetensors", config=CUSTOM)
    assert main(["trace", "--checkpoint", str(ckpt), "--steps", "4", "--samples", "2", "--out", str(root / "trace"),
                 "--device", "cpu", "--no-progress"]) == 0
    assert main(["schedule", "derive", str(root / "trace"), "--target-flops-speedup", "1.3", "--out",
                 str(root / "s.json")]) == 0, capsys.readouterr().err
    at = _app(root, monkeypatch, "page_replay.py")
    at.slider(key="replay_samples").set_value(2).run()
    at.button(key="replay_run").click().run()
    assert not at.exception and not at.warning, [str(w.value) for w in at.warning]
    assert "measured speedup" in {m.label for m in at.metric} and len(at.get("image")) == 2
