"""``python -m moeca.tracer`` / ``torchrun --nproc-per-node N -m moeca.tracer``: the ``trace`` command.

Under torchrun (``WORLD_SIZE`` > 1) a process group is initialised (NCCL when the device is CUDA,
gloo otherwise); rank 0 prepares the output directory, every rank traces the shards
``s % WORLD_SIZE == RANK`` and writes its own files (``<table>/shard-NNNNN.parquet``).
"""
from __future__ import annotations

import argparse
import os
import sys

from moeca.common.inputs import check_utf8_arguments
from moeca.models.distributed import torchrun_group

from .cli import add_trace_arguments, run_trace


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moeca.tracer",
                                     description="Trace a sampling run (same options as `moeca trace`); "
                                                 "launch with torchrun to split samples across processes.")
    add_trace_arguments(parser)
    parser.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                        help="torch.distributed backend under torchrun (auto: nccl on CUDA, else gloo)")
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser.parse_args(argv)
    try:
        check_utf8_arguments(argv)
        with torchrun_group(args.backend, args.device):
            return int(run_trace(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, FloatingPointError) as exc:
        rank = os.environ.get("RANK", "0")
        print(f"moeca trace (rank {rank}): error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
