"""Reliability, outputs: nothing moeca did not write is ever removed; outputs never overlap inputs;
a full or read-only disk gives a one-line message and leaves no temporary files."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from moeca.testing.synthetic_traces import write_synthetic_trace
from moeca.cli.main import main
from moeca.common.outputs import (FILES_SIDECAR, MANIFEST, OutputError, atomic_file, atomic_write_text, check_no_overlap, output_dir,
                                  record_manifest, remove_listed)


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> Path:
    return write_synthetic_trace(tmp_path_factory.mktemp("rel") / "trace", samples=2, samples_per_shard=1,
                                 num_steps=4)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _analyze(traces, out, capsys, *extra) -> tuple[int, str]:
    rc = main(["analyze", *map(str, traces), "--out", str(out), "--quiet", "--no-figures", *map(str, extra)])
    return rc, capsys.readouterr().err


# ----------------------------------------------------------------------------- the data-loss bug of issue 14
def test_analyze_never_deletes_a_users_folder_with_a_report_named_file(trace, tmp_path, capsys):
    """The reported bug: one file named like a report file made `analyze --out DIR` replace all of DIR."""
    out = tmp_path / "mine"
    (out / "notes").mkdir(parents=True)
    (out / "report.md").write_text("my own report")
    (out / "notes" / "thesis.tex").write_text("years of work")
    before = _tree(out)
    rc, err = _analyze([trace], out, capsys)
    assert rc == 2 and "moeca did not write" in err and "Traceback" not in err
    assert _tree(out) == before
    assert not list(tmp_path.glob(".mine*"))                        # no temporary sibling left


def test_analyze_refuses_an_output_that_contains_or_lies_inside_the_trace(trace, tmp_path, capsys):
    outer = tmp_path / "outer"
    inner = write_synthetic_trace(outer / "trace", samples=2, samples_per_shard=1, num_steps=4)
    (outer / "report.md").write_text("x")
    before = _tree(outer)
    rc, err = _analyze([inner], outer, capsys)
    assert rc == 2 and "contains the input trace" in err and str(inner) in err
    assert _tree(outer) == before                                    # the trace inside DIR survives
    rc, err = _analyze([trace], trace / "report", capsys)
    assert rc == 2 and "lies inside the input trace" in err
    assert not (trace / "report").exists()
    rc, err = _analyze([trace], trace, capsys)
    assert rc == 2 and "same path as the input trace" in err
    link = tmp_path / "link"                                         # a symbolic link into the trace
    link.symlink_to(trace / "branches", target_is_directory=True)
    rc, err = _analyze([trace], link / "r", capsys)
    assert rc == 2 and "lies inside the input trace" in err


def test_rerun_replaces_only_what_moeca_wrote(trace, tmp_path, capsys):
    out = tmp_path / "report"
    assert _analyze([trace], out, capsys)[0] == 0
    listed = json.loads((out / MANIFEST).read_text())["files"]
    assert "report.md" in listed and "headline.json" in listed
    (out / "my_notes.txt").write_text("keep me")                     # the user's file next to the report
    (out / "report.md").write_text("stale")
    assert _analyze([trace], out, capsys, "--headline-error", "0.05")[0] == 0
    assert (out / "my_notes.txt").read_text() == "keep me"
    assert (out / "report.md").read_text() != "stale"
    assert "my_notes.txt" not in json.loads((out / MANIFEST).read_text())["files"]
    (out / "summary").mkdir()                                        # a user folder named like nothing moeca wrote
    assert _analyze([trace], out, capsys)[0] == 0 and (out / "summary").is_dir()


def test_a_users_file_inside_a_folder_moeca_wrote_blocks_the_replacement(tmp_path):
    out = tmp_path / "o"
    with output_dir(out) as tmp:
        (tmp / "figures").mkdir()
        (tmp / "figures" / "a.png").write_bytes(b"png")
    (out / "figures" / "mine.png").write_bytes(b"user")
    with pytest.raises(OutputError, match="mine.png were not written by moeca"):
        with output_dir(out) as tmp:
            (tmp / "x").write_text("new")
    assert (out / "figures" / "mine.png").read_bytes() == b"user" and not (out / "x").exists()


def test_duplicate_traces_are_refused(trace, tmp_path, capsys):
    alias = tmp_path / "alias"
    alias.symlink_to(trace, target_is_directory=True)
    rc, err = _analyze([trace, alias], tmp_path / "r", capsys)
    assert rc == 2 and "given twice" in err and not (tmp_path / "r").exists()


def test_failure_while_building_leaves_the_old_output_and_no_temporaries(tmp_path):
    out = tmp_path / "o"
    with output_dir(out) as tmp:
        (tmp / "a.txt").write_text("v1")
    with pytest.raises(RuntimeError, match="boom"):
        with output_dir(out) as tmp:
            (tmp / "a.txt").write_text("v2")
            raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_output_path_that_is_a_file_or_a_link_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("data")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        with output_dir(f):
            pass
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputError, match="symbolic link"):
        with output_dir(link):
            pass
    assert f.read_text() == "data"


def test_damaged_manifest_is_refused_not_guessed(tmp_path):
    out = tmp_path / "o"
    with output_dir(out) as tmp:
        (tmp / "a").write_text("1")
    (out / MANIFEST).write_text(json.dumps({"written_by": "moeca", "files": ["../../etc"]}))
    with pytest.raises(OutputError, match="outside the folder"):
        remove_listed(out)
    (out / MANIFEST).write_text("{not json")
    with pytest.raises(OutputError, match="damaged"):
        with output_dir(out):
            pass
    assert (out / "a").read_text() == "1"


def test_record_and_remove_listed_keep_the_users_files(tmp_path):
    (tmp_path / "trace").mkdir()
    (tmp_path / "trace" / "run.json").write_text("{}")
    (tmp_path / "summary.md").write_text("t")
    (tmp_path / "mine.txt").write_text("keep")
    record_manifest(tmp_path, ["trace", "summary.md"])
    assert remove_listed(tmp_path) == ["summary.md", "trace"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]
    with pytest.raises(OutputError, match="no .moeca-manifest.json"):
        remove_listed(tmp_path)


def test_overlap_check_names_both_paths(tmp_path):
    with pytest.raises(OutputError, match=r"--out .*contains the input checkpoint"):
        check_no_overlap(tmp_path, [("checkpoint", tmp_path / "w.safetensors")])
    check_no_overlap(tmp_path / "a", [("trace", tmp_path / "b"), ("schedule", None)])


# ----------------------------------------------------------------------------- disks
def _raise(code: int):
    def fail(*_a, **_k):
        raise OSError(code, os.strerror(code), "somewhere")
    return fail


@pytest.mark.parametrize("code, text", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only"),
                                        (errno.EACCES, "permission denied")])
def test_disk_errors_become_one_line_messages_and_temporaries_go(tmp_path, monkeypatch, code, text):
    target = tmp_path / "s.json"
    with pytest.raises(OutputError, match=text) as info:
        with atomic_file(target) as tmp:
            tmp.write_text("partial")
            _raise(code)()
    assert "s.json" in str(info.value) and not list(tmp_path.iterdir())
    monkeypatch.setattr(os, "replace", _raise(code))
    with pytest.raises(OutputError, match=text):
        with output_dir(tmp_path / "o") as tmp:
            (tmp / "a").write_text("x")
    assert not list(tmp_path.iterdir())


def test_analyze_on_a_read_only_disk_is_a_message_not_a_traceback(trace, tmp_path, monkeypatch, capsys):
    import tempfile
    monkeypatch.setattr(tempfile, "mkdtemp", _raise(errno.EROFS))
    rc, err = _analyze([trace], tmp_path / "report", capsys)
    assert rc == 2 and "the file system is read-only" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_analyze_on_a_full_disk_removes_its_temporary_folder(trace, tmp_path, monkeypatch, capsys):
    import moeca.analysis.report as report
    real = report._atomic_df

    def full(df, parquet, csv):
        real(df, parquet, csv)
        raise OSError(errno.ENOSPC, "No space left on device", str(csv))

    monkeypatch.setattr(report, "_atomic_df", full)
    rc, err = _analyze([trace], tmp_path / "report", capsys)
    assert rc == 2 and "the disk is full" in err and "summary.csv" in err
    assert not list(tmp_path.iterdir())


def test_derive_and_sample_on_a_full_disk_leave_no_temporary_file(tmp_path, monkeypatch, capsys):
    from moeca.diffusion.samplers import SamplerConfig
    from moeca.tracer.run import TraceConfig, trace_run
    from conftest import make_tiny, tiny_checkpoint
    sampler = SamplerConfig(kind="rectified_flow", num_steps=3, cfg_scale=1.5)
    tr = trace_run(make_tiny(seed=0), tmp_path / "tr", TraceConfig(sampler=sampler, labels=(0, 1), lags=2),
                   progress=False)
    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    real_write = Path.write_text

    def full(self, *a, **k):
        if self.parent == out:
            real_write(self, "partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    assert main(["schedule", "derive", str(tr), "--target-flops-speedup", "1.5", "--out", str(out / "s.json")]) == 2
    err = capsys.readouterr().err
    assert "the disk is full" in err and "Traceback" not in err and not list(out.iterdir())
    monkeypatch.undo()
    from PIL import Image

    def full_png(self, fp, *a, **k):
        Path(fp).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", full_png)
    assert main(["sample", "--checkpoint", str(ckpt), "--steps", "2", "--out", str(out / "g.png"), "--device", "cpu",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "the disk is full" in err and "g.png" in err and not list(out.iterdir())


def test_missing_parent_folder_for_a_file_is_named(tmp_path):
    with pytest.raises(OutputError, match="does not exist; create it first"):
        atomic_write_text(tmp_path / "nope" / "x.json", "{}")
    atomic_write_text(tmp_path / "made" / "x.json", "{}", make_parents=True)
    assert (tmp_path / "made" / "x.json").read_text() == "{}"


def test_a_report_rewritten_inside_a_run_folder_still_counts_as_moecas(tmp_path):
    with output_dir(tmp_path / "report") as tmp:
        (tmp / "a.md").write_text("1")
    (tmp_path / "mine.txt").write_text("keep")
    record_manifest(tmp_path, ["report"])
    with output_dir(tmp_path / "report") as tmp:                    # `moeca analyze` again, new file names
        (tmp / "b.md").write_text("2")
    assert remove_listed(tmp_path) == ["report"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_the_current_folder_is_never_an_output_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out in (".", "..", str(tmp_path)):
        with pytest.raises(OutputError, match="current folder or one above it"):
            with output_dir(out):
                pass
    assert Path.cwd() == tmp_path


def test_bench_results_on_a_full_disk_leave_no_temporary_file(tmp_path, monkeypatch):
    from moeca.bench.results import write_results

    def plot(path):
        path.write_bytes(b"png")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with pytest.raises(OutputError, match="benchmark plot .*the disk is full"):
        write_results("x", [{"a": 1.0}], tmp_path, plot=plot)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != FILES_SIDECAR) == ["x.json"]  # no .tmp left


def test_a_synthetic_trace_writer_never_replaces_a_real_trace(tmp_path):
    real = tmp_path / "trace"
    real.mkdir()
    (real / "run.json").write_text(json.dumps({"schema_version": 1}))
    with pytest.raises(FileExistsError, match="not a synthetic trace"):
        write_synthetic_trace(real, samples=1)
    assert (real / "run.json").is_file()
    again = write_synthetic_trace(tmp_path / "syn", samples=1)
    assert write_synthetic_trace(again, samples=2) == again             # an earlier synthetic trace is replaced
