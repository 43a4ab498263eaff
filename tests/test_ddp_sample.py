"""Sampling at scale into the ADM .npz (replay/sample_ddp.py, python -m moeca.replay sample):
two gloo ranks vs one process, kill + resume, per-sample determinism, bad input."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from moeca.models.checkpoint import weights_hash
from moeca.diffusion.samplers import SamplerConfig
from moeca.policy.methods import Context, fora, magcache
from moeca.replay.sample_cli import main
from moeca.replay.sample_ddp import JOB_FILE, SampleJob, sample_to_npz, shard_dir, shard_path
from conftest import make_tiny, TINY, tiny_checkpoint
from conftest import run_torchrun

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
STEPS = 8
SAMPLER = SamplerConfig(kind="rectified_flow", num_steps=STEPS, cfg_scale=1.5, cfg_mode="separate")


def _cmd(ckpt: Path, schedule: str, out: Path, *extra: str, n: int = 10, batch: int = 2,
         steps: int = STEPS) -> list[str]:
    return ["sample", "--checkpoint", str(ckpt), "--schedule", schedule, "--num-samples", str(n), "--batch-size",
            str(batch), "--steps", str(steps), "--seed", "3", "--device", "cpu", "--no-progress", "--out", str(out),
            *extra]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="module")
def schedule_path(tmp_path_factory):
    model = make_tiny(seed=0)
    path = tmp_path_factory.mktemp("sched") / "magcache.json"
    # the tiny model's blocks move its 4x4 images by ~1e-5: FORA (which computes the final step since issue 26)
    # rounds to the same uint8 images as full compute; reusing step 0's residual on every later step does not
    config = magcache.Config(mag_ratios=(1.0,) * STEPS, threshold=1.0, max_skip_steps=STEPS, retention_ratio=0.0)
    magcache.build(config, Context(TINY, SAMPLER, weights_hash(model))).save(path)
    return path


@pytest.fixture(scope="module")
def reference(ckpt, schedule_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "single.npz"
    res = subprocess.run([sys.executable, "-m", "moeca.replay", *_cmd(ckpt, str(schedule_path), out)], env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return out


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        assert sorted(data.files) == ["arr_0", "arr_1"]
        return data["arr_0"], data["arr_1"]


def test_single_process_writes_the_adm_npz(reference, ckpt, tmp_path):
    images, labels = _load(reference)
    assert images.dtype == np.uint8 and images.shape == (10, 4, 4, 3)
    assert np.array_equal(images[..., 0], images[..., 1]) and np.array_equal(images[..., 0], images[..., 2])
    assert labels.dtype == np.int64 and labels.tolist() == [i % 3 for i in range(10)]
    assert images.std() > 0
    assert not shard_dir(reference).exists(), "the shards must be removed after the merge"
    # the schedule really changes the computation: full compute differs
    full = tmp_path / "full.npz"
    assert main(_cmd(ckpt, "none", full, "--cfg-mode", "separate")) == 0
    full_images, full_labels = _load(full)
    assert np.array_equal(full_labels, labels) and not np.array_equal(full_images, images)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_two_gloo_ranks_give_the_single_process_images(reference, ckpt, schedule_path, tmp_path):
    out = tmp_path / "dist.npz"
    res = run_torchrun("moeca.replay", _cmd(ckpt, str(schedule_path), out), ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rank 0/2: sampled shards [0, 2, 4]" in res.stderr
    assert "rank 1/2: sampled shards [1, 3]" in res.stderr
    got, ref = _load(out), _load(reference)
    assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])
    assert not shard_dir(out).exists()


def test_kill_then_resume_matches_uninterrupted(ckpt, tmp_path):
    out, ref = tmp_path / "killed.npz", tmp_path / "ref.npz"
    args = _cmd(ckpt, "none", out, n=12, batch=1, steps=40)          # slow enough to be killed mid-run
    proc = subprocess.Popen([sys.executable, "-m", "moeca.replay", *args], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not shard_path(out, 2).exists():
        assert proc.poll() is None, f"sampling exited early: {proc.stderr.read().decode()}"
        assert time.time() < deadline, "shard 2 never appeared"
        time.sleep(0.002)
    assert proc.poll() is None, "the run finished before it could be killed; the test needs a slower run"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    done = sorted(p.name for p in shard_dir(out).glob("shard-*.npz"))
    assert 3 <= len(done) < 12 and (shard_dir(out) / JOB_FILE).is_file() and not out.exists()
    resumed = subprocess.run([sys.executable, "-m", "moeca.replay", *args], env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"verified existing shards {list(range(len(done)))}" in resumed.stderr, resumed.stderr
    assert not shard_dir(out).exists()
    uninterrupted = subprocess.run([sys.executable, "-m", "moeca.replay",
                                    *_cmd(ckpt, "none", ref, n=12, batch=1, steps=40)],
                                   env=ENV, capture_output=True, text=True, timeout=300)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    got, want = _load(out), _load(ref)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_images_do_not_depend_on_the_batch_partition(tmp_path):
    """Sample i's noise and label depend only on i and the seed: other shard sizes give the same images
    (up to float rounding of differently sized batches, at most one uint8 level)."""
    model = make_tiny(seed=0)
    sampler = replace(SAMPLER, num_steps=4)
    a = sample_to_npz(model, sampler, SampleJob(num_samples=7, seed=5, batch_size=7), tmp_path / "a.npz")
    b = sample_to_npz(model, sampler, SampleJob(num_samples=7, seed=5, batch_size=2), tmp_path / "b.npz")
    assert np.abs(a["images"].astype(int) - b["images"].astype(int)).max() <= 1
    c = sample_to_npz(model, sampler, SampleJob(num_samples=7, seed=6, batch_size=7), tmp_path / "c.npz")
    assert not np.array_equal(a["images"], c["images"])
    rnd = sample_to_npz(model, sampler, SampleJob(num_samples=30, seed=5, batch_size=30, label_mode="random"),
                        tmp_path / "r.npz")
    with np.load(tmp_path / "r.npz") as data:
        assert set(data["arr_1"].tolist()) == {0, 1, 2} and data["arr_1"].tolist() != [i % 3 for i in range(30)]
    assert rnd["sampled"] == [0]


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_bad_input_is_refused_with_a_message(ckpt, schedule_path, tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert "--num-samples must be >= 1, got 0" in _error(capsys, _cmd(ckpt, "none", out, n=0))
    assert "--num-samples must be >= 1, got -4" in _error(capsys, _cmd(ckpt, "none", out, n=-4))
    assert "--batch-size must be >= 1" in _error(capsys, _cmd(ckpt, "none", out, batch=0))
    assert "must end in .npz" in _error(capsys, _cmd(ckpt, "none", tmp_path / "s.png"))
    assert "does not exist; create it first" in _error(capsys, _cmd(ckpt, "none", tmp_path / "no" / "s.npz"))
    # a schedule derived for another model (3 blocks instead of 2)
    other = tmp_path / "other.json"
    fora.build(fora.Config(), Context(replace(TINY, depth=3), SAMPLER)).save(other)
    err = _error(capsys, _cmd(ckpt, str(other), out))
    assert "schedule field model.fingerprint" in err and "derive a schedule for this model" in err
    # ... or for another step count
    err = _error(capsys, _cmd(ckpt, str(schedule_path), out)[:-2] + ["--steps", "5", "--out", str(out)])
    assert "sampler.num_steps" in err
    assert "does not exist" in _error(capsys, _cmd(ckpt, str(tmp_path / "missing.json"), out))
    # an existing output needs --overwrite; a foreign or another job's shard folder is refused
    out.write_bytes(b"x")
    assert "--overwrite" in _error(capsys, _cmd(ckpt, "none", out))
    out.unlink()
    shard_dir(out).mkdir()
    (shard_dir(out) / "notes.txt").write_text("mine")
    assert "moeca did not write it" in _error(capsys, _cmd(ckpt, "none", out))
    (shard_dir(out) / "notes.txt").unlink()
    shard_dir(out).rmdir()


def _identity(argv: list[str], **job_changes) -> dict:
    """The job identity the command line ``argv`` computes, with ``job_changes`` applied to its job."""
    from moeca.models.model_args import load_model_from_args
    from moeca.replay.sample_cli import build_parser, sampler_and_schedule
    from moeca.replay.sample_ddp import job_identity

    args = build_parser().parse_args(argv)
    _, model = load_model_from_args(args, "cpu")
    sampler, _, digest = sampler_and_schedule(args, model)
    job = SampleJob(num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size)
    return job_identity(replace(job, **job_changes), model, sampler, digest)


def test_shards_of_another_job_are_refused_and_only_own_files_are_removed(ckpt, tmp_path, capsys):
    out = tmp_path / "s.npz"
    argv = _cmd(ckpt, "none", out, n=4)
    folder = shard_dir(out)
    folder.mkdir()
    (folder / JOB_FILE).write_text(json.dumps(_identity(argv, seed=99)))
    assert "holds shards of another job (field seed: 99 there, 3 now)" in _error(capsys, argv)
    # the same job resumes; a file moeca did not write survives the merge, and so does its folder
    (folder / JOB_FILE).write_text(json.dumps(_identity(argv)))
    (folder / "notes.txt").write_text("mine")
    assert main(argv) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert _load(out)[0].shape == (4, 4, 4, 3)
