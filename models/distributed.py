"""The process group of a ``torchrun`` launch, for moeca's per-rank commands (``python -m moeca.tracer``,
``python -m moeca.replay sample``): each rank works on its own shards and writes its own files."""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the launch: ``rank`` of ``world`` processes, ``local_rank`` on this host, and
    ``barrier`` (waits for every rank; does nothing in a single process)."""

    rank: int
    world: int
    local_rank: int
    barrier: Callable[[], None]


@contextmanager
def torchrun_group(backend: str = "auto", device: str = "auto") -> Iterator[RankInfo]:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1) and leave it on exit.

    backend: ``auto`` (NCCL when ``device`` is not the CPU and CUDA is available, else gloo), ``gloo`` or
    ``nccl``; with NCCL each rank uses ``cuda:LOCAL_RANK``. A single process gets rank 0 of 1 and no group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world == 1:
        yield RankInfo(rank, world, local_rank, lambda: None)
        return
    if backend == "auto":
        backend = "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    try:
        yield RankInfo(rank, world, local_rank, dist.barrier)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
