"""``moeca run``: the main job end to end on the shipped demo model (small settings), and its guards."""
from __future__ import annotations

import pytest

from moeca.cli.main import main
from moeca.cli.pipeline import MARKER, prepare_out
from moeca.models.registry import demo_weights_path

pytestmark = pytest.mark.skipif(not demo_weights_path().is_file(), reason="demo weights not shipped")


def test_main_job_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--out", str(out), "--steps", "10", "--trace-samples", "2", "--quality-samples", "4",
                 "--timing-samples", "2", "--repeats", "1", "--target-flops-speedups", "1.4", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| 1.4x |" in printed and "measured speedup" in printed
    assert (out / "summary.md").read_text().count("| 1.4x |") == 1
    assert (out / "report" / "report.md").is_file()
    assert (out / "schedule-1.4x.json").is_file()
    assert (out / "replay-1.4x" / "report.json").is_file()
    assert (out / "trace" / "run.json").is_file()
    # a second run without --overwrite is refused and leaves the first intact
    assert main(["run", "--out", str(out), "--steps", "10"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (out / "summary.md").is_file()


def test_foreign_folder_is_never_touched(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not written by `moeca run`"):
        prepare_out(tmp_path, overwrite=True)
    assert (tmp_path / "keep.txt").read_text() == "user data"
    fresh = tmp_path / "new"
    prepare_out(fresh, overwrite=False)
    assert (fresh / MARKER).is_file()


def test_bad_targets_are_explained(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "x"), "--target-speedups", "fast"]) == 2
    assert "--target-speedups must be numbers" in capsys.readouterr().err
