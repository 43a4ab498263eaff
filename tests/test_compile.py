"""models/compile.py and the full-compute forward under torch.compile: no graph breaks (no inductor here)."""
from __future__ import annotations

import pytest
import torch

from moeca.models.compile import CompileOptions, compile_model, is_compiled
from moeca.models.dispatch import prepare_model
from moeca.models.runtime import Runtime
from moeca.diffusion.samplers import SamplerConfig, sample

from conftest import TINY, make_tiny


def _inputs(dtype=torch.float32, batch=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, TINY.in_channels, TINY.input_size, TINY.input_size, generator=g).to(dtype)
    return x, torch.rand(batch, generator=g).to(dtype), torch.arange(batch) % TINY.num_classes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dispatch", ["auto", "grouped"])
def test_full_compute_forward_traces_without_graph_breaks(dtype, dispatch):
    model = make_tiny().to(dtype)
    prepare_model(model)
    x, t, y = _inputs(dtype)
    torch._dynamo.reset()
    with torch.no_grad(), model.use_runtime(Runtime(dispatch=dispatch)):
        explained = torch._dynamo.explain(model.forward_core)(x, t, y)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compiled_forward_gives_the_eager_numbers_and_samples():
    model = make_tiny()
    x, t, y = _inputs()
    with torch.no_grad():
        eager = model(x, t, y)
    torch._dynamo.reset()
    assert compile_model(model, CompileOptions(backend="eager", dynamic=False)) is model and is_compiled(model)
    assert compile_model(model) is model                # once per process: a second call changes nothing
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), eager, rtol=1e-5, atol=1e-6)
    cfg = SamplerConfig(kind="rectified_flow", num_steps=3, cfg_scale=1.5, cfg_mode="batched")
    compiled = sample(model, cfg, torch.tensor([0, 1]), seed=1)
    reference = sample(make_tiny(), cfg, torch.tensor([0, 1]), seed=1)
    torch.testing.assert_close(compiled, reference, rtol=1e-5, atol=1e-5)


def test_compile_options_per_device():
    assert CompileOptions.for_device("cpu").mode is None
    assert CompileOptions.for_device("cuda").mode == "reduce-overhead"


def test_bench_full_times_the_compiled_step():
    from moeca.bench.full import measure, measure_compiled
    model = make_tiny()
    row = measure(model, batch=2, repeats=1)
    assert row["compiled_ms_per_step"] is None
    torch._dynamo.reset()
    compile_model(model, CompileOptions(backend="eager"))
    measure_compiled(model, row, repeats=1)
    assert row["compiled_ms_per_step"] > 0
    assert row["compile_speedup"] == pytest.approx(row["ms_per_step"] / row["compiled_ms_per_step"])
