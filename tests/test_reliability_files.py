"""Whose files are whose: benches remove only what moeca wrote, single files the user owns need
--overwrite, a killed run's temporaries are cleaned (and only those), sampler vs objective is checked on
every replay path, and paths of the wrong kind are named as such."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moeca.testing.synthetic_traces import write_synthetic_trace
from moeca.cli.main import main
from moeca.common.outputs import (FILES_SIDECAR, TMP_MARKER, OutputError, atomic_write_text, output_dir,
                                  remove_stale_temporaries, written_by_moeca)
from moeca.diffusion.samplers import SamplerConfig
from moeca.policy.schedule import Schedule, ScheduleError, ScheduleMismatch, full_schedule
from conftest import make_tiny, TINY, tiny_checkpoint

RF = SamplerConfig(kind="rectified_flow", num_steps=2, cfg_scale=1.5, cfg_mode="batched")


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> Path:
    return write_synthetic_trace(tmp_path_factory.mktemp("r2") / "trace", samples=2, samples_per_shard=1,
                                 num_steps=4)


@pytest.fixture(scope="module")
def real_trace(tmp_path_factory) -> Path:
    from moeca.tracer.run import TraceConfig, trace_run
    return trace_run(make_tiny(seed=0), tmp_path_factory.mktemp("r2real") / "tr",
                     TraceConfig(sampler=RF, labels=(0, 1), batch_size=1, lags=2), progress=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def _run(argv, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    got = capsys.readouterr()
    assert "Traceback" not in got.err
    return rc, got.out, got.err


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- 1. benches remove only their own
def _bench_analyze(work: Path, out: Path, capsys, *extra) -> tuple[int, str]:
    rc, _, err = _run(["bench", "analyze", "--rows", "1000", "--threads", "1", "--work-dir", work, "--out", out,
                       *extra], capsys)
    return rc, err


def _small_trace(monkeypatch, trace: Path) -> None:
    import moeca.bench.analyze as ba
    monkeypatch.setattr(ba, "ensure_trace", lambda work, rows, regenerate=False: trace)


def test_bench_analyze_removes_only_its_report_and_keeps_the_users_files(trace, tmp_path, monkeypatch, capsys):
    _small_trace(monkeypatch, trace)
    work, out = tmp_path / "work", tmp_path / "results"
    (work / "mine").mkdir(parents=True)
    (work / "mine" / "notes.txt").write_text("keep")
    (work / "keep.txt").write_text("keep")
    rc, err = _bench_analyze(work, out, capsys)
    assert rc == 0, err
    assert not (work / "report").exists()                          # its own report is gone ...
    assert _tree(work) == {"keep.txt": b"keep", "mine/notes.txt": b"keep"}   # ... and nothing else
    assert {"analyze.json", "analyze.md", "analyze.png"} <= {p.name for p in out.iterdir()}


def test_bench_analyze_refuses_a_report_folder_it_did_not_write(trace, tmp_path, monkeypatch, capsys):
    _small_trace(monkeypatch, trace)
    work, out = tmp_path / "work", tmp_path / "results"
    (work / "report").mkdir(parents=True)
    (work / "report" / "thesis.tex").write_text("years of work")
    rc, err = _bench_analyze(work, out, capsys)
    assert rc == 2 and "moeca did not write" in err and "report" in err
    assert (work / "report" / "thesis.tex").read_text() == "years of work"
    assert not out.exists()                                          # refused before anything was measured


def test_bench_analyze_keeps_a_users_file_put_into_its_report_during_the_run(trace, tmp_path, monkeypatch, capsys):
    """A file the user drops into the report while the bench runs stays, and so does the folder holding it."""
    import moeca.bench.analyze as ba
    real = ba.analyze

    def analyze_then_user_writes(traces, out, **kw):
        head = real(traces, out, **kw)
        (Path(out) / "notes.txt").write_text("mine")
        return head
    _small_trace(monkeypatch, trace)
    monkeypatch.setattr(ba, "analyze", analyze_then_user_writes)          # the name the bench calls
    work = tmp_path / "work"
    rc, err = _bench_analyze(work, tmp_path / "results", capsys)
    assert rc == 0, err
    assert _tree(work / "report") == {"notes.txt": b"mine"}           # the report went, the user's file stayed


def test_bench_analyze_checks_its_options_and_paths_before_working(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for extra, message in ((["--rows", "nan"], "--rows must be"), (["--rows", "-5"], "--rows must be"),
                           (["--threads", "0"], "--threads must be")):
        rc, _, err = _run(["bench", "analyze", "--work-dir", tmp_path / "w", "--out", tmp_path / "o", *extra], capsys)
        assert rc == 2 and message in err
    rc, _, err = _run(["bench", "analyze", "--rows", "1000", "--work-dir", tmp_path / "file", "--out",
                       tmp_path / "o"], capsys)
    assert rc == 2 and "--work-dir" in err and "is a file, not a folder" in err
    rc, _, err = _run(["bench", "analyze", "--rows", "1000", "--work-dir", tmp_path / "w", "--out",
                       tmp_path / "file"], capsys)
    assert rc == 2 and "is a file, not a folder" in err and "--out" in err
    assert not (tmp_path / "w").exists()                              # nothing generated before the refusal


def test_bench_cache_marker_the_user_owns_is_refused(tmp_path):
    from moeca.bench.analyze import ensure_trace
    work = tmp_path / "w"
    work.mkdir()
    (work / "trace.params.json").write_text("my notes")
    with pytest.raises(OutputError, match="trace.params.json already exists and moeca did not write it"):
        ensure_trace(work, 1000)
    assert (work / "trace.params.json").read_text() == "my notes" and not (work / "trace").exists()


def test_synthetic_trace_writer_keeps_a_users_file_inside_an_earlier_synthetic_trace(tmp_path):
    out = write_synthetic_trace(tmp_path / "syn", samples=1, num_steps=2)
    (out / "branches" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="branches/notes.txt, which moeca did not write"):
        write_synthetic_trace(out, samples=1, num_steps=2)
    assert (out / "branches" / "notes.txt").read_text() == "mine"
    (out / "branches" / "notes.txt").unlink()
    write_synthetic_trace(out, samples=1, num_steps=2)                # its own files alone: replaced


# ----------------------------------------------------------------------------- 2. single files the user owns
def test_sample_never_replaces_a_png_the_user_owns(ckpt, tmp_path, capsys):
    png = tmp_path / "grid.png"
    png.write_bytes(b"my holiday photo")
    argv = ["sample", "--checkpoint", ckpt, "--steps", 2, "--labels", "0", "--out", png, "--device", "cpu",
            "--no-progress"]
    rc, _, err = _run(argv, capsys)
    assert rc == 2 and "moeca did not write it" in err and "--overwrite" in err and str(png) in err
    assert png.read_bytes() == b"my holiday photo"
    rc, _, err = _run(argv + ["--overwrite"], capsys)                # the flag replaces it
    assert rc == 0, err
    assert png.read_bytes().startswith(b"\x89PNG") and written_by_moeca(png)
    rc, _, err = _run(argv, capsys)                                  # moeca's own PNG: replaced without the flag
    assert rc == 0, err
    png.write_bytes(png.read_bytes() + b"edited")                    # edited since: the user's again
    rc, _, err = _run(argv, capsys)
    assert rc == 2 and "--overwrite" in err and png.read_bytes().endswith(b"edited")


def test_schedule_save_replaces_only_its_own_files(tmp_path):
    s = full_schedule(TINY, RF)
    path = tmp_path / "s.json"
    path.write_text("{}")
    with pytest.raises(OutputError, match="schedule .*s.json already exists and moeca did not write it.*--overwrite"):
        s.save(path)
    assert path.read_text() == "{}"
    s.save(path, overwrite=True)
    s.save(path)                                                     # written by moeca: no flag needed
    assert Schedule.load(path) == s
    sidecar = json.loads((tmp_path / FILES_SIDECAR).read_text())
    assert sidecar["written_by"] == "moeca" and set(sidecar["files"]) == {"s.json"}


def test_a_damaged_sidecar_vouches_for_nothing(tmp_path):
    path = atomic_write_text(tmp_path / "a.txt", "moeca's")
    (tmp_path / FILES_SIDECAR).write_text("{not json")
    assert not written_by_moeca(path)
    with pytest.raises(OutputError, match="--overwrite"):
        atomic_write_text(path, "again")


def test_bench_results_never_replace_a_users_file(tmp_path):
    from moeca.bench.results import write_results
    (tmp_path / "x.md").write_text("my notes")
    with pytest.raises(OutputError, match="x.md already exists and moeca did not write it.*move it away"):
        write_results("x", [{"a": 1.0}], tmp_path)
    assert not (tmp_path / "x.json").exists()                        # refused before anything was written
    assert (tmp_path / "x.md").read_text() == "my notes"
    write_results("x", [{"a": 1.0}], tmp_path, overwrite=True)
    write_results("x", [{"a": 2.0}], tmp_path)                       # its own results: replaced


def test_bench_results_committed_without_a_sidecar_are_recognised(tmp_path):
    """Results in the repository (no .moeca-files.json after a clone) are recognised by their JSON."""
    from moeca.bench.results import write_results
    write_results("y", [{"a": 1.0}], tmp_path)
    (tmp_path / FILES_SIDECAR).unlink()
    (tmp_path / "y.md").write_text("edited by hand after the clone")
    write_results("y", [{"a": 3.0}], tmp_path)
    assert json.loads((tmp_path / "y.json").read_text())["rows"] == [{"a": 3.0}]


def test_outputs_through_symbolic_links_are_refused(ckpt, trace, tmp_path, capsys):
    target = tmp_path / "elsewhere.json"
    target.write_text("the user's")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    with pytest.raises(OutputError, match="symbolic link"):
        full_schedule(TINY, RF).save(link, overwrite=True)
    png = tmp_path / "l.png"
    png.symlink_to(target)
    rc, _, err = _run(["sample", "--checkpoint", ckpt, "--steps", 2, "--labels", "0", "--out", png, "--overwrite",
                       "--device", "cpu", "--no-progress"], capsys)
    assert rc == 2 and "symbolic link" in err and target.read_text() == "the user's"


# ----------------------------------------------------------------------------- 3. sampler vs objective everywhere
def test_replay_compare_and_the_explorer_refuse_a_sampler_the_model_cannot_use():
    """The schedule and the sampler agree (DDIM) but the model is rectified flow: refused on every path."""
    from moeca.app.replay_run import ReplaySettings, run_replay
    from moeca.replay.driver import replay_compare
    model = make_tiny(seed=0)
    ddim = SamplerConfig(kind="ddim", num_steps=2, cfg_scale=1.5)
    schedule = full_schedule(TINY, ddim)
    with pytest.raises(ScheduleMismatch, match="schedule field sampler.kind: 'ddim' .*rectified_flow"):
        replay_compare(model, schedule, ddim, [0], repeats=1, warmup=False, progress=False)
    with pytest.raises(ScheduleMismatch, match="schedule field sampler.kind"):
        run_replay(model, schedule, ReplaySettings(samples=1))
    with pytest.raises(ScheduleMismatch, match="schedule field sampler.kind"):
        schedule.check_compatible(TINY)                               # even without a sampler


def test_bench_moeca_shape_study_uses_a_rectified_flow_preset():
    from moeca.bench.targets import _rectified_flow_preset
    from moeca.policy.transfer import retarget
    model = _rectified_flow_preset("S/2-8E2A", seed=0)
    assert model.config.objective == "rectified_flow" and model.config.depth == 12
    retarget(full_schedule(TINY, RF), model.config).check_compatible(model.config, RF)



def test_bench_moeca_reports_the_quartiles_of_its_timed_pairs():
    from moeca.bench.targets import pair_quartiles
    # ratios 2, 3, 4, 5, 10: median 4, quartiles 3 and 5 (an outlier pair moves neither)
    q1, q3 = pair_quartiles([2.0, 3.0, 4.0, 5.0, 10.0], [1.0] * 5)
    assert (q1, q3) == pytest.approx((3.0, 5.0))
    assert pair_quartiles([3.0], [2.0]) == (1.5, 1.5)
    with pytest.raises(ValueError, match="at least one timed pair"):
        pair_quartiles([], [])

# ----------------------------------------------------------------------------- 4. stale temporaries of a killed run
_KILLED = textwrap.dedent("""
    import os, signal, sys
    from moeca.common.outputs import output_dir
    with output_dir(sys.argv[1]) as tmp:
        (tmp / "report.md").write_text("half")
        os.kill(os.getpid(), signal.SIGKILL)
""")


def _killed_run(out: Path) -> list[Path]:
    """Kill a process inside ``output_dir(out)``; returns the temporary folder(s) it left."""
    def temporaries() -> set[Path]:
        return {p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")} \
            if out.parent.is_dir() else set()
    before = temporaries()
    proc = subprocess.run([sys.executable, "-c", _KILLED, str(out)], capture_output=True)
    assert proc.returncode == -9
    return sorted(temporaries() - before)


def test_a_killed_analyze_leaves_a_temporary_the_next_run_removes(trace, tmp_path, capsys):
    out = tmp_path / "report"
    stale = _killed_run(out)
    assert len(stale) == 1 and (stale[0] / TMP_MARKER).is_file()
    foreign = tmp_path / f".{out.name}.tmp-mine"                     # same pattern, no marker: the user's
    foreign.mkdir()
    (foreign / "x").write_text("keep")
    other = _killed_run(tmp_path / "other")                           # another output's temporary
    rc, _, err = _run(["analyze", trace, "--out", out, "--quiet", "--no-figures"], capsys)
    assert rc == 0, err
    assert not stale[0].exists() and (foreign / "x").read_text() == "keep" and other[0].exists()
    assert (out / "report.md").is_file() and TMP_MARKER not in os.listdir(out)


def test_a_temporary_of_a_live_process_or_a_forged_marker_is_kept(tmp_path):
    out = tmp_path / "o"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        keep = []
        for name, marker in (("live", {"written_by": "moeca", "pid": live.pid, "host": os.uname().nodename}),
                             ("host", {"written_by": "moeca", "pid": 2 ** 22 + 7, "host": "another-machine"}),
                             ("forged", {"written_by": "someone", "pid": 2 ** 22 + 7}),
                             ("junk", "not json")):
            d = tmp_path / f".o.tmp-{name}"
            d.mkdir()
            (d / TMP_MARKER).write_text(marker if isinstance(marker, str) else json.dumps(marker))
            keep.append(d)
        dead = _killed_run(out)
        assert remove_stale_temporaries(out) == dead
        assert all(d.exists() for d in keep)
    finally:
        live.kill()
        live.wait()


def test_a_killed_replay_output_is_cleaned_by_the_next_one(tmp_path):
    out = tmp_path / "rep"
    stale = _killed_run(out)
    with output_dir(out, what="replay outputs") as tmp:
        (tmp / "report.json").write_text("{}")
    assert not any(p.exists() for p in stale) and (out / "report.json").is_file()


def test_an_output_name_with_glob_characters_only_matches_itself(tmp_path):
    out = tmp_path / "r[1]"
    stale = _killed_run(out)
    near = _killed_run(tmp_path / "r1")                                # what the glob r[1] would have matched
    assert remove_stale_temporaries(out) == stale and all(p.exists() for p in near)


# ----------------------------------------------------------------------------- 5. the wrong kind of path
def test_schedule_load_on_a_folder_says_it_is_a_folder(tmp_path, capsys):
    with pytest.raises(ScheduleError, match="is a folder, not a schedule file"):
        Schedule.load(tmp_path)
    rc, _, err = _run(["schedule", "show", tmp_path], capsys)
    assert rc == 2 and "is a folder" in err and "does not exist" not in err


def test_a_folder_as_checkpoint_is_named_as_a_folder(tmp_path, capsys):
    (tmp_path / "weights").mkdir()
    rc, _, err = _run(["sample", "--checkpoint", tmp_path / "weights", "--steps", 2, "--out", tmp_path / "a.png",
                       "--device", "cpu", "--no-progress"], capsys)
    assert rc == 2 and f"--checkpoint {tmp_path / 'weights'} is a folder, not a file" in err
    from moeca.models.checkpoint import read_state_dict
    with pytest.raises(IsADirectoryError, match="is a folder, not a file"):
        read_state_dict(tmp_path)


def test_a_file_as_trace_is_named_as_a_file(trace, tmp_path, capsys):
    for cmd in (["trace-info"], ["analyze", "--out", tmp_path / "r", "--quiet", "--no-figures"]):
        rc, _, err = _run([cmd[0], trace / "run.json", *cmd[1:]], capsys)
        assert rc == 2 and "is a file, not a folder" in err and f"holds run.json ({trace})" in err
        assert "does not exist" not in err and "damaged" not in err
    rc, _, err = _run(["trace-info", tmp_path / "nope"], capsys)
    assert rc == 2 and "does not exist" in err


def test_a_trace_whose_run_json_or_table_is_the_wrong_kind_is_damaged(real_trace, tmp_path, capsys):
    import shutil
    a = shutil.copytree(real_trace, tmp_path / "a")
    (a / "run.json").unlink()
    (a / "run.json").mkdir()
    rc, _, err = _run(["trace-info", a], capsys)
    assert rc == 2 and "run.json is a folder, not a file" in err
    b = shutil.copytree(real_trace, tmp_path / "b")
    shutil.rmtree(b / "tokens")
    (b / "tokens").write_text("x")
    rc, out, err = _run(["trace-info", b], capsys)
    assert rc == 2 and "tokens is a file, not the folder of the tokens table" in out


def test_an_unknown_device_is_a_message(ckpt, tmp_path, capsys):
    rc, _, err = _run(["sample", "--checkpoint", ckpt, "--steps", 2, "--out", tmp_path / "a.png", "--device", "foo",
                       "--no-progress"], capsys)
    assert rc == 2 and "--device 'foo' is not a device" in err


def test_a_sample_archive_the_user_owns_needs_overwrite(tmp_path):
    from moeca.common.outputs import atomic_file
    from moeca.replay.sample_ddp import check_output
    out = tmp_path / "samples.npz"
    out.write_bytes(b"the user's archive")
    with pytest.raises(OutputError, match="samples.npz already exists and moeca did not write it.*--overwrite"):
        check_output(out, overwrite=False)
    check_output(out, overwrite=True)
    out.unlink()
    with atomic_file(out, "--out sample archive") as tmp:           # as merge_shards writes it
        tmp.write_bytes(b"moeca's")
    check_output(out, overwrite=False)                               # its own archive: replaced without the flag


def test_overwrite_adopts_a_users_file_for_the_writers_below_and_only_as_it_is(tmp_path):
    """`train-demo/train-classifier --overwrite` adopt their output files first; an edit after that is refused."""
    from moeca.common.outputs import adopt_file
    weights = tmp_path / "demo_model.safetensors"
    weights.write_bytes(b"a public checkpoint")
    with pytest.raises(OutputError, match="--overwrite"):
        atomic_write_text(weights, "new")
    adopt_file(weights)
    atomic_write_text(weights, "new")
    assert weights.read_text() == "new"
    adopt_file(weights)
    weights.write_text("edited after --overwrite")
    with pytest.raises(OutputError, match="--overwrite"):
        atomic_write_text(weights, "newer")


def test_shipped_files_are_recorded_as_moecas():
    """The shipped model, card and classifier files (and the committed MoECa schedules) can be regenerated."""
    from moeca.data import __file__ as data_init
    data = Path(data_init).parent
    for name in ("demo/demo_model.safetensors", "demo/card.json", "demo/training_log.json",
                 "classifier/classifier.safetensors", "classifier/classifier.json"):
        assert written_by_moeca(data / name), name


def test_derive_names_a_file_given_for_a_trace_or_for_the_out_folder(trace, tmp_path, capsys):
    rc, _, err = _run(["schedule", "derive", trace / "run.json", "--target-flops-speedup", 1.5, "--out",
                       tmp_path / "s.json"], capsys)
    assert rc == 2 and "is a file, not a folder" in err and f"({trace})" in err
    (tmp_path / "a").write_text("x")
    rc, _, err = _run(["schedule", "derive", trace, "--target-flops-speedup", 1.5, "--out",
                       tmp_path / "a" / "s.json"], capsys)
    assert rc == 2 and f"the folder {tmp_path / 'a'} is a file, not a folder" in err
