"""The replay engine's device path (sync-free, static shapes) on CPU tensors: same numbers as the host
path, bit-exact full compute when nothing is reused, and one graph per forward (no graph breaks)."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo

from conftest import TINY, make_tiny
from moeca.models.dispatch import prepare_model
from moeca.models.runtime import ForwardContext, Runtime
from moeca.diffusion.samplers import SamplerConfig, sample
from moeca.policy.methods import Context, fora
from moeca.policy.schedule import (ALWAYS, REUSE, BlockRule, ModelIdentity, Rule, SamplerIdentity, Schedule,
                                   StepRule, full_schedule)
from moeca.replay.runtime import ReplayRuntime
from test_stack_fold import token_schedule

STEPS = 6
SAMPLER = SamplerConfig(kind="rectified_flow", num_steps=STEPS, cfg_scale=1.5)
LABELS = torch.tensor([0, 1, 2, 1])


def moeca_schedule(forecast: str = "linear", order: int = 1, body: BlockRule | None = None) -> Schedule:
    """MoECa's sync rule: full refresh at steps 0 and 3, every unit forecast in between (new pairs computed)."""
    body = body or BlockRule(REUSE, ALWAYS, REUSE, (REUSE,) * TINY.num_experts)
    steps = tuple(StepRule("compute", (body,) * TINY.depth) for _ in range(STEPS))
    return Schedule("moeca", ModelIdentity.of(TINY), SamplerIdentity.of(SAMPLER), steps, (0, 3), forecast=forecast,
                    forecast_order=order)


def run(model, runtime):
    with model.use_runtime(runtime):
        return sample(model, SAMPLER, LABELS, seed=3)


@pytest.mark.parametrize("forecast", ["none", "linear"])
def test_device_path_reuse_nothing_is_bit_exact(tiny_model, forecast):
    ref = sample(tiny_model, SAMPLER, LABELS, seed=3)
    s = full_schedule(TINY, SAMPLER)
    s = Schedule(s.method, s.model, s.sampler, s.steps, forecast=forecast, predicted_flops_ratio=1.0)
    assert torch.equal(run(tiny_model, ReplayRuntime(s, device_path=True)), ref)
    all_sync = Schedule("custom", s.model, s.sampler, moeca_schedule().steps, tuple(range(STEPS)), forecast=forecast)
    assert torch.equal(run(tiny_model, ReplayRuntime(all_sync, device_path=True)), ref)


def test_device_path_matches_host_path_and_really_skips(tiny_model):
    scored = BlockRule(Rule("fraction", 0.5), ALWAYS, Rule("fraction", 0.3),
                       (REUSE, Rule("fraction", 0.5), Rule("threshold", 0.02), ALWAYS))
    for s in (moeca_schedule(), moeca_schedule("taylor", 2), moeca_schedule(body=scored)):
        host_rt, dev_rt = ReplayRuntime(s), ReplayRuntime(s, device_path=True)
        host, dev = run(tiny_model, host_rt), run(tiny_model, dev_rt)
        torch.testing.assert_close(dev, host, rtol=1e-4, atol=1e-5)
        th, td = host_rt.counters.totals(), dev_rt.counters.totals()
        for name in ("attn_q", "attn_kv", "shared", "expert", "router", "tokens", "pairs"):
            assert td[name] == th[name], (s.forecast, name)
        assert th["expert"] < th["pairs"] and th["shared"] < th["tokens"]


def test_device_path_checks_finiteness_once_per_run(tiny_model):
    s = moeca_schedule(body=BlockRule(REUSE, ALWAYS, ALWAYS, (ALWAYS,) * TINY.num_experts))
    rt = ReplayRuntime(s, device_path=True)
    assert rt._check_finite_arg is None            # default: once per run on the device path

    def poison(step):
        if step == 4:
            rt._contexts["batched"].blocks[1].attn.hist.vals[:, 0, 0] = float("nan")

    with tiny_model.use_runtime(rt), pytest.raises(FloatingPointError, match=r"cached attention output of block 1"):
        sample(tiny_model, SAMPLER, LABELS, seed=3, on_step=poison)
    with pytest.raises(ValueError, match="check_finite"):
        ReplayRuntime(s, check_finite="always")


def _graph_breaks(model, runtime, step: int) -> tuple[int, list[str]]:
    """Graph breaks of one forward at ``step`` (the earlier steps run eagerly first to fill the caches)."""
    x, t, y = torch.randn(2, 1, 4, 4), torch.full((2,), 0.5), torch.tensor([0, 1])
    with torch.inference_mode(), model.use_runtime(runtime):
        for s in range(step):
            model(x, t, y, ForwardContext(s, STEPS, "none"))
        dynamo.reset()
        ctx = ForwardContext(step, STEPS, "none")
        runtime.prepare_forward(model, ctx, x)          # host side, outside what --compile compiles
        explained = dynamo.explain(model.forward_core)(x, t, y, ctx)
    dynamo.reset()
    return explained.graph_break_count, [str(r.reason).split("\n")[0] for r in explained.break_reasons]


def test_device_path_forward_has_no_graph_breaks():
    """The default, FORA, MoECa-refresh and MoECa-forecast forwards each trace as one graph (traced with
    dynamo, not compiled: inductor would take minutes here), the folded stack forecast and its rebuild
    after a refresh included."""
    model = make_tiny()
    prepare_model(model)
    fora_s = fora.build(fora.Config(interval=3), Context(TINY, SamplerConfig(num_steps=STEPS, cfg_scale=1.0)))
    token_s = token_schedule(TINY, SAMPLER, (0, 2))
    assert ReplayRuntime(fora_s).fold and ReplayRuntime(token_s).fold
    cases = {"default": (Runtime(dispatch="grouped"), 0),
             "fora reuse step": (ReplayRuntime(fora_s, device_path=True), 1),
             "moeca refresh step": (ReplayRuntime(moeca_schedule(), device_path=True), 3),
             "moeca forecast step": (ReplayRuntime(moeca_schedule(), device_path=True), 2),
             "moeca taylor forecast step": (ReplayRuntime(moeca_schedule("taylor", 3), device_path=True), 5),
             "fora folded reuse step": (ReplayRuntime(fora_s, device_path=True), 4),
             "token-level refresh step (fold rebuilt)": (ReplayRuntime(token_s, device_path=True), 2),
             "token-level folded forecast step": (ReplayRuntime(token_s, device_path=True), 3)}
    for name, (runtime, step) in cases.items():
        assert _graph_breaks(model, runtime, step) == (0, []), name


def test_compiled_sampling_run_has_one_graph_per_kind_of_step():
    """A whole compiled sampling run (dynamo with a counting backend, no inductor) gives the eager numbers
    and compiles one graph per kind of step -- never one per step number (steps 1..2 and 4..5 of the
    MoECa schedule are forecast steps of one kind; the CFG context's first step and a refresh differ)."""
    from moeca.models.compile import CompileOptions, compile_model

    steps = 12
    sampler = SamplerConfig(kind="rectified_flow", num_steps=steps, cfg_scale=1.5)
    body = BlockRule(REUSE, ALWAYS, REUSE, (REUSE,) * TINY.num_experts)
    s = Schedule("moeca", ModelIdentity.of(TINY), SamplerIdentity.of(sampler),
                 tuple(StepRule("compute", (body,) * TINY.depth) for _ in range(steps)), (0, 4, 8), forecast="linear")
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    eager_model, model = make_tiny(), make_tiny()
    eager_rt = ReplayRuntime(s, device_path=True)
    with eager_model.use_runtime(eager_rt):
        eager = sample(eager_model, sampler, LABELS, seed=3)
    dynamo.reset()
    compile_model(model, CompileOptions(backend=counting_backend))
    rt = ReplayRuntime(s)
    with model.use_runtime(rt):
        compiled = sample(model, sampler, LABELS, seed=3)
        assert rt.device_path                      # a compiled forward takes the sync-free path by itself
    n_first = len(graphs)
    with model.use_runtime(rt):
        again = sample(model, sampler, LABELS, seed=3)
    with model.use_runtime(ReplayRuntime(s)):      # a new runtime of the same schedule: the same graphs
        fresh = sample(model, sampler, LABELS, seed=3)
    dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert torch.equal(again, compiled) and torch.equal(fresh, compiled)
    # the first step (nothing cached), refresh steps and forecast steps: three kinds
    assert n_first == 3, n_first
    assert len(graphs) == n_first, len(graphs)     # later runs reuse every graph
    assert rt.counters.totals() == {k: 2 * v for k, v in eager_rt.counters.totals().items()}


def test_compiled_folded_run_gives_the_eager_numbers():
    """A compiled sampling run of a token-level schedule (dynamo with a counting backend, no inductor): the
    folded forecast steps in compiled code (Lagrange weights as tensors) give the eager numbers, and later
    runs reuse every graph (the fold's state adds a few graphs per kind, never one per step number)."""
    from moeca.models.compile import CompileOptions, compile_model

    steps = 12
    sampler = SamplerConfig(kind="rectified_flow", num_steps=steps, cfg_scale=1.5)
    s = token_schedule(TINY, sampler, (0, 3, 6, 9))
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    eager_model, model = make_tiny(), make_tiny()
    with eager_model.use_runtime(ReplayRuntime(s, device_path=True)):
        eager = sample(eager_model, sampler, LABELS, seed=3)
    dynamo.reset()
    compile_model(model, CompileOptions(backend=counting_backend))
    with model.use_runtime(ReplayRuntime(s)):
        compiled = sample(model, sampler, LABELS, seed=3)
    n_first = len(graphs)
    with model.use_runtime(ReplayRuntime(s)):
        again = sample(model, sampler, LABELS, seed=3)
    dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert torch.equal(again, compiled)
    assert n_first <= 6, n_first                   # first step, refreshes and forecast steps, before/after the fold
    assert len(graphs) == n_first, len(graphs)
