"""Sampling at scale with a schedule (or full compute) into the ADM evaluation suite's ``.npz``.

The DiT convention (DESIGN section 6): ``torchrun`` ranks each sample their share and the result is one
``.npz`` that the ADM evaluation suite reads (``arr_0``: uint8 ``[K, H, W, 3]``; ``arr_1``: int64 class
labels ``[K]``, as ADM writes for class-conditional samples).

Determinism: the K samples are cut into shards of ``batch_size`` consecutive indices, sampled together.
Sample ``i``'s label and initial noise depend only on ``i`` and the base seed; a shard's sampler step
noise (DDPM/DDIM) only on the shard index and the seed. Rank ``r`` of ``N`` samples the shards
``s % N == r``, so the images are the same for any number of ranks (and identical bit for bit on the
same device and thread count, because every shard is the same batch).

Files: shard ``s`` is written to ``<out>.shards/shard-NNNNN.npz`` through a temporary sibling renamed
into place, so a shard file exists only when complete. ``<out>.shards/job.json`` records the job's
identity (model fingerprint and weights hash, schedule hash, sampler, seed, K, batch size, label mode);
a rerun of the same job after a kill verifies the shards already there and samples only the missing
ones. Rank 0 then merges the shards into ``out`` (temporary sibling + rename) and deletes the shard
files and ``job.json`` it wrote (the folder too, when nothing else is left in it).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from tqdm import tqdm

from moeca.common.outputs import atomic_file, check_replace_file, replaced_file
from moeca.diffusion.samplers import initial_noise, sample
from moeca.evaluation.grid import to_rgb_uint8
from moeca.models.checkpoint import weights_hash
from moeca.replay import ReplayRuntime

JOB_FORMAT = 1
JOB_FILE = "job.json"
LabelMode = Literal["balanced", "random"]


@dataclass(frozen=True)
class SampleJob:
    """What to sample.

    num_samples: K images in all; seed: base seed of every label and noise draw; batch_size: samples per
    shard (one sampling call); label_mode: ``balanced`` (sample ``i`` has class ``i % num_classes``) or
    ``random`` (uniform classes drawn from the seed, as the DiT sampling script does).
    """

    num_samples: int
    seed: int = 0
    batch_size: int = 32
    label_mode: LabelMode = "balanced"

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if self.label_mode not in ("balanced", "random"):
            raise ValueError(f"--label-mode must be 'balanced' or 'random', got {self.label_mode!r}")

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def shard_indices(self, shard: int) -> range:
        """Global sample indices of ``shard``."""
        return range(shard * self.batch_size, min((shard + 1) * self.batch_size, self.num_samples))


def _derive(*parts: object) -> int:
    """A 56-bit seed from ``parts`` (stable across processes, platforms and Python versions)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:7], "little")


def sample_seed(seed: int, index: int) -> int:
    """Seed of the initial noise of global sample ``index``."""
    return _derive("moeca-sample-noise", seed, index)


def shard_step_seed(seed: int, shard: int) -> int:
    """Seed of the per-step sampler noise (DDPM/DDIM) of ``shard``."""
    return _derive("moeca-sample-steps", seed, shard)


def sample_labels(job: SampleJob, num_classes: int) -> np.ndarray:
    """Class label of every sample ``[K]`` int64 (see :class:`SampleJob`)."""
    if job.label_mode == "balanced":
        return np.arange(job.num_samples, dtype=np.int64) % num_classes
    gen = torch.Generator().manual_seed(_derive("moeca-sample-labels", job.seed))
    return torch.randint(0, num_classes, (job.num_samples,), generator=gen).numpy().astype(np.int64)


def job_identity(job: SampleJob, model, sampler_cfg, schedule_sha256: str | None) -> dict:
    """Everything that determines the images; equal identities give equal shards."""
    return {"format": JOB_FORMAT, **asdict(job), "model_fingerprint": model.config.fingerprint(),
            "weights_hash": weights_hash(model), "schedule_sha256": schedule_sha256,
            "sampler": sampler_cfg.to_dict()}


def shard_dir(out: Path) -> Path:
    """The folder of ``out``'s shards: ``samples.npz`` -> ``samples.npz.shards``."""
    return out.with_name(out.name + ".shards")


def shard_path(out: Path, shard: int) -> Path:
    return shard_dir(out) / f"shard-{shard:05d}.npz"


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an output path that is not a ``.npz`` in an existing folder, or an existing file moeca did not
    write (without ``overwrite``; see :func:`moeca.common.outputs.check_replace_file`)."""
    if out.suffix != ".npz":
        raise ValueError(f"--out {out} must end in .npz (the ADM evaluation suite reads .npz files), "
                         f"e.g. --out {out.with_suffix('.npz').name}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: the folder {out.parent} does not exist; create it first")
    if out.exists() and not out.is_file():
        raise FileExistsError(f"--out {out} exists and is not a file; choose another path")
    check_replace_file(out, "--out sample archive", overwrite)


def check_shard_dir(out: Path, identity: dict) -> None:
    """A shard folder left by an earlier run must belong to the same job (resume) or not exist."""
    folder = shard_dir(out)
    if not folder.exists():
        return
    job_file = folder / JOB_FILE
    if not job_file.is_file():
        raise FileExistsError(f"{folder} exists but holds no {JOB_FILE}, so moeca did not write it; move it away "
                              "or choose another --out")
    try:
        earlier = json.loads(job_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FileExistsError(f"{job_file} is unreadable ({exc}); delete {folder} to start over") from None
    for key in sorted(set(identity) | set(earlier)):
        if earlier.get(key) != identity.get(key):
            raise FileExistsError(
                f"{folder} holds shards of another job (field {key}: {earlier.get(key)!r} there, "
                f"{identity.get(key)!r} now); rerun with the same options to resume it, or delete {folder} "
                "to start over")


def write_job_file(out: Path, identity: dict) -> None:
    folder = shard_dir(out)
    folder.mkdir(exist_ok=True)
    _atomic_write(folder / JOB_FILE, (json.dumps(identity, indent=1, sort_keys=True) + "\n").encode())


def _atomic_write(path: Path, data: bytes) -> None:
    with replaced_file(path, path.with_name(f".{path.name}.tmp-{os.getpid()}")) as tmp:
        tmp.write_bytes(data)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez`` through a temporary sibling renamed into place."""
    with replaced_file(path, path.with_name(f".{path.name}.tmp-{os.getpid()}")) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def read_shard(out: Path, shard: int, job: SampleJob, labels: np.ndarray, image_shape: tuple[int, int]) -> \
        np.ndarray | None:
    """A complete, valid shard's images ``[b, H, W, 3]`` uint8, or None when it is missing or does not
    hold exactly this shard's samples (then it is sampled again)."""
    path = shard_path(out, shard)
    if not path.is_file():
        return None
    ids = job.shard_indices(shard)
    try:
        with np.load(path) as data:
            images, got_labels, got_ids = data["images"], data["labels"], data["indices"]
    except (OSError, KeyError, ValueError, EOFError):
        return None
    if (images.dtype != np.uint8 or images.shape != (len(ids), *image_shape, 3)
            or not np.array_equal(got_ids, np.asarray(ids)) or not np.array_equal(got_labels, labels[ids.start:ids.stop])):
        return None
    return images


def sample_shard(model, sampler_cfg, job: SampleJob, labels: np.ndarray, shard: int,
                 runtime_factory: Callable[[], object] | None = None,
                 on_step: Callable[[int], None] | None = None) -> np.ndarray:
    """Sample ``shard`` -> uint8 ``[b, H, W, 3]`` (one channel replicated to three; raw latents show their
    first three channels). Full compute when ``runtime_factory`` is None, else under a fresh runtime."""
    mc = model.config
    param = next(model.parameters())
    ids = job.shard_indices(shard)
    noise = torch.cat([initial_noise((1, mc.in_channels, mc.input_size, mc.input_size),
                                     sample_seed(job.seed, i), param.device, param.dtype) for i in ids])
    y = torch.from_numpy(labels[ids.start:ids.stop])
    seed = shard_step_seed(job.seed, shard)
    with torch.inference_mode():
        if runtime_factory is None:
            images = sample(model, sampler_cfg, y, seed=seed, noise=noise, on_step=on_step)
        else:
            with model.use_runtime(runtime_factory()):
                images = sample(model, sampler_cfg, y, seed=seed, noise=noise, on_step=on_step)
    return to_rgb_uint8(images.float().cpu())


def sample_my_shards(model, sampler_cfg, job: SampleJob, labels: np.ndarray, out: Path, rank: int, world: int,
                     runtime_factory=None, progress: bool = False) -> tuple[list[int], list[int]]:
    """Sample this rank's missing shards (``s % world == rank``) and write each atomically.

    Returns ``(sampled, reused)`` shard indices."""
    mc = model.config
    mine = list(range(rank, job.num_shards, world))
    image_shape = (mc.input_size, mc.input_size)
    todo = [s for s in mine if read_shard(out, s, job, labels, image_shape) is None]
    reused = [s for s in mine if s not in todo]
    bar = tqdm(total=len(todo) * sampler_cfg.num_steps, desc=f"sample rank {rank}/{world}", unit="step",
               disable=not progress, leave=False)
    try:
        for s in todo:
            images = sample_shard(model, sampler_cfg, job, labels, s, runtime_factory, lambda _s: bar.update(1))
            ids = job.shard_indices(s)
            _save_npz(shard_path(out, s), images=images, labels=labels[ids.start:ids.stop],
                      indices=np.asarray(ids, dtype=np.int64))
    finally:
        bar.close()
    return todo, reused


def merge_shards(out: Path, job: SampleJob, labels: np.ndarray, image_shape: tuple[int, int],
                 overwrite: bool = False) -> np.ndarray:
    """Rank 0: read every shard (each verified), write ``out`` (``arr_0`` images, ``arr_1`` labels) through
    a temporary sibling (replacing an existing file only if moeca wrote it or ``overwrite``), then delete
    the shard files and the job file (and the folder when it is empty). Returns the images ``[K, H, W, 3]``."""
    parts = []
    for s in range(job.num_shards):
        images = read_shard(out, s, job, labels, image_shape)
        if images is None:
            raise RuntimeError(f"shard {s} is missing or incomplete in {shard_dir(out)} after every rank finished; "
                               "rerun the same command to resume")
        parts.append(images)
    arr = np.concatenate(parts)
    with atomic_file(out, "--out sample archive", overwrite=overwrite) as tmp, open(tmp, "wb") as f:
        np.savez(f, arr_0=arr, arr_1=labels)
    folder = shard_dir(out)
    for s in range(job.num_shards):
        shard_path(out, s).unlink(missing_ok=True)
    for tmp in folder.glob(".shard-*.npz.tmp-*"):      # left by a killed rank
        tmp.unlink(missing_ok=True)
    (folder / JOB_FILE).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:                     # something else lives there: leave it
        pass
    return arr


def sample_to_npz(model, sampler_cfg, job: SampleJob, out: str | os.PathLike, *, schedule=None,
                  schedule_sha256: str | None = None, runtime_factory: Callable[[], object] | None = None,
                  rank: int = 0, world: int = 1, barrier: Callable[[], None] = lambda: None,
                  overwrite: bool = False, progress: bool = False) -> dict:
    """Sample ``job`` into the ADM ``.npz`` at ``out``, as rank ``rank`` of ``world`` (one process: 0 of 1).

    schedule: a :class:`~moeca.policy.schedule.Schedule` to follow (None: full compute); it is checked
    against the model, its weights and ``sampler_cfg`` first. runtime_factory: builds the replay
    runtime for each shard (default: :class:`moeca.replay.ReplayRuntime` of ``schedule``). barrier: the
    process group's barrier under torchrun. Every rank validates the same inputs before the first
    barrier, so a bad input stops all ranks with the same message. Returns a summary dict (rank 0:
    ``images`` ``[K, H, W, 3]`` uint8 too).
    """
    out = Path(out)
    check_output(out, overwrite)
    if schedule is not None:
        schedule.check_compatible(model.config, sampler_cfg,
                                  weights_hash(model) if schedule.model.weights_hash else None)
        if runtime_factory is None:
            runtime_factory = lambda: ReplayRuntime(schedule)  # noqa: E731 - one fresh runtime per shard
    labels = sample_labels(job, model.config.num_classes)
    identity = job_identity(job, model, sampler_cfg, schedule_sha256)
    check_shard_dir(out, identity)
    barrier()                                    # every rank has validated before anything is written
    if rank == 0:
        write_job_file(out, identity)
    barrier()
    sampled, reused = sample_my_shards(model, sampler_cfg, job, labels, out, rank, world, runtime_factory,
                                       progress)
    barrier()
    summary = {"rank": rank, "world": world, "sampled": sampled, "reused": reused}
    if rank == 0:
        mc = model.config
        summary["images"] = merge_shards(out, job, labels, (mc.input_size, mc.input_size), overwrite)
    barrier()
    return summary
