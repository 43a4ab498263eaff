"""The documented Python API: lazy public surfaces of the packages, and the Python examples and the
distributed-sampling command of the README and docs/, executed so the documentation cannot rot."""
from __future__ import annotations

import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README, API_PAGE, DISTRIBUTED_PAGE = ROOT / "README.md", ROOT / "docs" / "api.md", ROOT / "docs" / "distributed.md"
PACKAGES = ("moeca.models", "moeca.diffusion", "moeca.evaluation", "moeca.tracer", "moeca.analysis", "moeca.policy",
            "moeca.replay")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _section(title: str, page: Path = README) -> str:
    text = page.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"{page.name} has no '## {title}' section"
    return match.group(1)


def _blocks(section: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


def test_importing_a_package_loads_no_torch_and_every_public_name_resolves():
    code = ("import sys\n"
            f"for name in {PACKAGES!r}: __import__(name)\n"
            "assert 'torch' not in sys.modules, 'a package imported torch eagerly'\n"
            "from moeca.models import DiTMoE, DiTMoEConfig, load_checkpoint, load_model, PRESETS, get_preset\n"
            "assert 'S/2-8E2A' in PRESETS and get_preset('S/2-8E2A').num_experts == 8\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    assert res.returncode == 0, res.stderr
    for name in PACKAGES:
        module = importlib.import_module(name)
        assert module.__all__ and set(module.__all__) <= set(dir(module)), name
        for attr in module.__all__:
            assert getattr(module, attr) is not None, f"{name}.{attr}"
        with pytest.raises(AttributeError, match="no attribute 'not_there'"):
            module.not_there


@pytest.fixture
def one_thread():
    """One torch thread while the test runs (2 threads on 2 shared cores spin against other jobs)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys, one_thread):
    """The README's Python example, then docs/api.md's own sampling loop that continues it, in one namespace
    as a user would paste them, with the sizes line the example sets made smaller."""
    blocks = _blocks(_section("Python API"), "python") + _blocks(_section("A schedule in your own sampling loop",
                                                                          API_PAGE), "python")
    assert len(blocks) == 2
    sizes = "STEPS, TRACE_SAMPLES, TIMED_SAMPLES, QUALITY_SAMPLES, REPEATS = 20, 8, 10, 50, 3\n"
    assert blocks[0].count(sizes) == 1, "the README example's sizes line changed; update this test"
    first = blocks[0].replace(sizes, "STEPS, TRACE_SAMPLES, TIMED_SAMPLES, QUALITY_SAMPLES, REPEATS = 10, 4, 2, 10, 1\n")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(first, "README.md: Python API (1)", "exec"), namespace)
    printed = capsys.readouterr().out
    assert re.search(r"measured \d+\.\d\dx, FLOPs 0\.\d{3} of full, PSNR \d+\.\d dB, class accuracy", printed), printed
    assert (tmp_path / "api-demo" / "report" / "report.md").is_file()
    report = namespace["r"]
    assert report.flops_ratio < 1 and report.quality_samples == 10 and report.num_samples == 2
    exec(compile(blocks[1], "docs/api.md: A schedule in your own sampling loop", "exec"), namespace)
    reuse = namespace["runtime"].counters.reuse_fractions()
    assert 0 < max(reuse.values()) < 1, reuse
    x = namespace["x"]
    assert x.shape == (8, 1, 8, 8) and bool(x.isfinite().all())
    assert namespace["grid"].shape == (64 + 16 + 4, 8 * 66 + 2, 3)
    # the hand-written loop is the library's sampler: same images as sample() under the same runtime
    import torch
    from moeca.diffusion import sample
    from moeca.replay import ReplayRuntime
    model, sampler, y = namespace["model"], namespace["sampler"], namespace["y"]
    with torch.inference_mode(), model.use_runtime(ReplayRuntime(namespace["schedule"])):
        ref = sample(model, sampler, y, seed=0)
    assert torch.allclose(x, ref, atol=1e-5)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_readme_distributed_sampling_command_runs(tmp_path):
    """The documented full-compute torchrun line, with fewer samples and steps, writes the ADM .npz."""
    lines = [line for block in _blocks(_section("Sampling at scale with a schedule", DISTRIBUTED_PAGE), "bash")
             for line in block.splitlines()]
    line = next(ln for ln in lines if ln.startswith("torchrun") and "--schedule none" in ln)
    argv = shlex.split(line.split("#")[0])
    argv[argv.index("--num-samples") + 1] = "6"
    argv[argv.index("--out") + 1] = str(tmp_path / "full.npz")
    argv[1:1] = ["--standalone"]
    argv += ["--steps", "4", "--batch-size", "2", "--device", "cpu", "--no-progress"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    with np.load(tmp_path / "full.npz") as data:
        assert data["arr_0"].shape == (6, 8, 8, 3) and data["arr_0"].dtype == np.uint8
        assert data["arr_1"].tolist() == [0, 1, 2, 3, 4, 5]
