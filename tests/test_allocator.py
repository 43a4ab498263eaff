"""Freed CPU memory stays in the process once sampling starts: a step's tensors reuse the last step's
pages instead of page-faulting fresh ones (glibc only)."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

PROBE = """
import ctypes, resource, sys, torch
from moeca.models.allocator import keep_freed_memory
libc = ctypes.CDLL("libc.so.6")
libc.mallopt(-3, 128 << 10)     # glibc's initial thresholds, held fixed (its dynamic threshold may or may
libc.mallopt(-1, 128 << 10)     # not have risen by the time a step runs): M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()          # once per process, then cached
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():                                                      # a step's tensors: 2-8 MB each, then freed
    return sum(float(t.sum()) for t in [torch.ones(n << 18) for n in (4, 8, 2, 6, 8, 3)])
for _ in range(3):
    step()
before = faults()
for _ in range(3):
    step()
print(faults() - before)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
def test_kept_memory_stops_the_page_faults_of_repeated_large_tensors():
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.strip())

    default, kept = faults("default"), faults("keep")
    assert default > 3 * 2_000           # glibc's defaults: the pages of each step are faulted in afresh
    assert kept < 100


def test_sampling_keeps_freed_memory(tiny_model):
    from moeca.models import allocator
    from moeca.diffusion.samplers import SamplerConfig, sample
    import torch
    sample(tiny_model, SamplerConfig(num_steps=2), torch.tensor([0]))
    assert allocator._done is GLIBC
