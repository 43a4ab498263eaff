"""Process-level guarantees: SIGKILL + resume, two-rank torchrun (gloo), bounded memory."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from moeca.tracer import schema
from moeca.tracer.store import complete_shards, open_table, read_run_meta, temporary_files

from conftest import run_torchrun, tiny_checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _trace_cmd(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "moeca.tracer", "--checkpoint", str(ckpt), "--steps", "40", "--samples", "20",
            "--batch-size", "2", "--cfg-scale", "1.5", "--lags", "3", "--seed", "7", "--out", str(out),
            "--no-progress", "--device", "cpu", *extra]


def _tables(out: Path) -> dict:
    got = {}
    for table in ("tokens", "branches"):
        t = open_table(out, table).to_table().drop_columns(["run"])
        got[table] = t.sort_by([(c, "ascending") for c in ("sample", "cfg_branch", "step", "block", "token")])
    return got


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "trace"
    subprocess.run(_trace_cmd(ckpt, out), env=ENV, check=True, capture_output=True, timeout=300)
    return out


def test_sigkill_then_resume_matches_uninterrupted(ckpt, reference, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(_trace_cmd(ckpt, out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = [out / t / schema.shard_file_name(1) for t in ("tokens", "branches")]
    deadline = time.time() + 240
    while not all(p.exists() for p in target):
        assert proc.poll() is None, f"trace exited early: {proc.stderr.read().decode()}"
        assert time.time() < deadline, "shard 1 never appeared"
        time.sleep(0.002)
    assert proc.poll() is None, "the run finished before it could be killed; the test needs a slower run"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    meta = read_run_meta(out)
    done = complete_shards(out, meta)
    assert 2 <= len(done) < meta["num_shards"]
    for table in ("tokens", "branches"):                     # every final file is a complete Parquet file
        for f in (out / table).glob("shard-*.parquet"):
            assert pq.read_metadata(f).num_rows > 0
    # without --resume the directory is refused
    rerun = subprocess.run(_trace_cmd(ckpt, out), env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 2 and "--resume" in rerun.stderr
    resumed = subprocess.run(_trace_cmd(ckpt, out, "--resume"), env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert complete_shards(out) == list(range(meta["num_shards"])) and not temporary_files(out)
    got, ref = _tables(out), _tables(reference)
    for table in got:
        assert got[table].equals(ref[table]), table


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_two_rank_torchrun_gloo(ckpt, reference, tmp_path):
    out = tmp_path / "dist"
    res = run_torchrun("moeca.tracer", _trace_cmd(ckpt, out)[3:], ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rank 0/2: traced shards [0, 2, 4, 6, 8]" in res.stderr
    assert "rank 1/2: traced shards [1, 3, 5, 7, 9]" in res.stderr
    assert complete_shards(out) == list(range(10)) and not temporary_files(out)
    got, ref = _tables(out), _tables(reference)
    for table in got:
        assert got[table].equals(ref[table]), table


MEMORY_SCRIPT = r"""
import resource, sys, torch
from dataclasses import replace
sys.path.insert(0, sys.argv[3])   # the tests folder: conftest's tiny model
from moeca.diffusion.samplers import SamplerConfig
from moeca.tracer.run import TraceConfig, trace_run
from conftest import make_tiny, TINY
model = make_tiny(replace(TINY, input_size=8, hidden_size=64), 0)
sampler = SamplerConfig(kind="rectified_flow", num_steps=20, cfg_scale=1.5)
config = TraceConfig(sampler=sampler, labels=tuple(i % 3 for i in range(int(sys.argv[1]))), batch_size=4)
trace_run(model, sys.argv[2], config, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_peak_memory_does_not_grow_with_samples(tmp_path):
    peaks = {}
    for n in (4, 32):
        res = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(n), str(tmp_path / f"m{n}"),
                              str(Path(__file__).parent)],
                             env=ENV, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        peaks[n] = int(res.stdout.split()[-1])  # KiB
    rows_per_shard = open_table(tmp_path / "m4", "branches").count_rows()
    assert open_table(tmp_path / "m32", "branches").count_rows() == 8 * rows_per_shard
    # keeping every step's records of 8 shards would add ~40 MiB; allow 12 MiB of allocator noise
    assert peaks[32] - peaks[4] < 12 * 1024, peaks
