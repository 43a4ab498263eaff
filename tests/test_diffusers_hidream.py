"""MoECa on HiDream-I1's transformer through diffusers' hooks (issue 25), on tiny random configs (CPU).

Needs the optional extra (``pip install -e ".[test,diffusers]"``); skipped without it.
"""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

pytest.importorskip("diffusers")

from moeca.cli.main import main as moeca_main  # noqa: E402
from moeca.integrations.diffusers import apply_schedule, none_schedule  # noqa: E402
from moeca.integrations.diffusers.compat import check_transformer, check_version, require_diffusers  # noqa: E402
from moeca.integrations.diffusers.hidream import moe_blocks  # noqa: E402
from moeca.integrations.diffusers.sampling import (CONFIGS, FlowSampler, build_transformer, initial_noise,  # noqa: E402
                                                   random_conditioning, sample)
from moeca.models.protocol import MoEBlock  # noqa: E402
from moeca.policy.schedule import REUSE, BlockRule, Schedule, ScheduleMismatch, StepRule  # noqa: E402

LATENT = (16, 16)          # 64 image tokens
TEXT = (4, 4)              # 4 T5 + 2 x 4 Llama tokens
STEPS = 3


def _setup(name: str = "tiny-4e", seed: int = 0):
    model = build_transformer(name, seed=seed)
    cond, uncond = random_conditioning(CONFIGS[name], 1, seed=seed, lengths=TEXT)
    noise = initial_noise((model.config.in_channels, *LATENT), [seed])
    return model, cond, uncond, noise


def _none(model, steps: int = STEPS) -> Schedule:
    return none_schedule(model, steps, max_tokens=LATENT[0] * LATENT[1] // 4 + 12)


def _inputs(model, batch: int = 2, t: float = 700.0):
    g = torch.Generator().manual_seed(1)
    c5, cl = model.config.caption_channels
    layers = max(model.config.llama_layers) + 1
    return dict(hidden_states=torch.randn(batch, model.config.in_channels, *LATENT, generator=g),
                timesteps=torch.full((batch,), t), encoder_hidden_states_t5=torch.randn(batch, 4, c5, generator=g),
                encoder_hidden_states_llama3=torch.randn(layers, batch, 4, cl, generator=g),
                pooled_embeds=torch.randn(batch, model.config.text_emb_dim, generator=g), return_dict=False)


@pytest.mark.parametrize("name", ["tiny", "tiny-4e"])
def test_schedule_none_equals_stock_forward_bit_for_bit(name):
    model, cond, uncond, noise = _setup(name)
    with torch.no_grad():
        ref = model(**_inputs(model))[0]
    stock = sample(model, FlowSampler(num_steps=STEPS), noise, cond, uncond)
    handle = apply_schedule(model, _none(model))
    with torch.no_grad():
        out = model(**_inputs(model))[0]
    ours = sample(model, FlowSampler(num_steps=STEPS), noise, cond, uncond)
    handle.remove()
    assert torch.equal(out, ref), (out - ref).abs().max()
    assert torch.equal(ours, stock), (ours - stock).abs().max()
    assert handle.stats()["flops_ratio"] == pytest.approx(1.0)


def test_grouped_dispatch_matches_stock_within_1e_6():
    model, *_ = _setup()
    with torch.no_grad():
        ref = model(**_inputs(model))[0]
        handle = apply_schedule(model, _none(model), dispatch="grouped")
        out = model(**_inputs(model))[0]
    handle.remove()
    assert (out - ref).abs().max() <= 1e-6


def test_remove_restores_the_stock_forward_and_weight_storage():
    model, cond, uncond, noise = _setup()
    stock = sample(model, FlowSampler(num_steps=STEPS), noise, cond, uncond)
    s = _derived_like(model)
    handle = apply_schedule(model, s)
    cached = sample(model, FlowSampler(num_steps=STEPS), noise, cond, uncond)
    ff = moe_blocks(model)[0].ff
    assert ff.experts[0].w1.weight.untyped_storage().data_ptr() == ff.experts[1].w1.weight.untyped_storage().data_ptr()
    handle.remove()
    assert not torch.equal(cached, stock)               # the schedule did reuse something
    assert torch.equal(sample(model, FlowSampler(num_steps=STEPS), noise, cond, uncond), stock)
    assert model.forward.__func__ is type(model).forward
    assert ff.forward.__func__ is type(ff).forward
    ptrs = {e.w1.weight.untyped_storage().data_ptr() for e in ff.experts}
    assert len(ptrs) == len(ff.experts)                 # own storage again (save_pretrained works)


def _derived_like(model, experts=None, steps: int = STEPS) -> Schedule:
    """A sync-style schedule: step 0 computes all, later steps forecast attention, shared and the experts
    (``experts``: one rule per expert at steps >= 1; default all never)."""
    base = _none(model, steps)
    E = base.model.num_experts
    rule = BlockRule(attn=REUSE, shared=REUSE, experts=tuple(experts or (REUSE,) * E))
    later = StepRule("compute", tuple(rule for _ in range(base.model.depth)))
    return dataclasses.replace(base, method="custom", steps=(base.steps[0],) + (later,) * (steps - 1),
                               sync_refresh_steps=(0,), forecast="linear")


def _token_level(model, steps: int = 8, sync: tuple[int, ...] = (0, 3, 5)) -> Schedule:
    """A token-level sync schedule: ``sync`` steps compute all, the others forecast attention and the whole
    MoE output of every block (no router)."""
    base = _none(model, steps)
    E = base.model.num_experts
    body = StepRule("compute", (BlockRule(attn=REUSE, moe=REUSE, shared=REUSE, experts=(REUSE,) * E),) * base.model.depth)
    return dataclasses.replace(base, method="custom", steps=tuple(base.steps[0] if s in sync else body for s in range(steps)),
                               sync_refresh_steps=sync, forecast="linear")


def _runs(model, schedule, noise, cond, uncond, variants: dict) -> tuple[dict, dict]:
    out, stats = {}, {}
    for name, kw in variants.items():
        handle = apply_schedule(model, schedule, **kw)
        out[name] = sample(model, FlowSampler(num_steps=schedule.num_steps), noise, cond, uncond)
        stats[name] = handle.stats()
        handle.remove()
    return out, stats


def test_token_level_forecast_steps_run_as_one_sum_over_the_stack():
    """A step that forecasts every block's attention and MoE output runs no block: the stack's output is
    the patch embedding plus the gated unit forecasts (image rows), equal to running every block with its
    hooks forecasting each unit; folded after two full refreshes (steps 4, 6, 7 here) unless the gates move
    far from linearly between refreshes, as these random weights' do (then the exact gates)."""
    model, cond, uncond, noise = _setup()
    stock = sample(model, FlowSampler(num_steps=8), noise, cond, uncond)
    s = _token_level(model)
    out, stats = _runs(model, s, noise, cond, uncond, {"blocks": dict(stack=False), "exact": dict(fold=False),
                                                        "folded": dict(fold_tolerance=math.inf), "guarded": {}})
    torch.testing.assert_close(out["exact"], out["blocks"], rtol=1e-5, atol=1e-5)
    assert (stats["blocks"]["stack_forwards"], stats["exact"]["stack_forwards"], stats["folded"]["stack_forwards"]) == (0, 5, 5)
    assert (stats["exact"]["folded_forwards"], stats["folded"]["folded_forwards"]) == (0, 3)
    assert stats["guarded"]["folded_forwards"] == 0 and torch.equal(out["guarded"], out["exact"])
    assert stats["guarded"]["gate_error"] > 0.05 and stats["folded"]["gate_error"] == stats["guarded"]["gate_error"]
    assert stats["folded"]["flops_ratio"] == stats["blocks"]["flops_ratio"] == pytest.approx(8 / 3)
    assert not torch.equal(out["folded"], out["exact"])                   # the gates move with the step
    # random weights move the gates far from linearly; the folded samples stay as close to full compute
    err = {k: float((out[k] - stock).norm() / stock.norm()) for k in ("folded", "exact")}
    assert err["folded"] < 2 * err["exact"] < 0.2, err
    assert torch.equal(sample(model, FlowSampler(num_steps=8), noise, cond, uncond), stock)   # hooks removed


def test_fold_equals_the_exact_sum_when_the_gates_do_not_move():
    model, cond, uncond, noise = _setup()
    D = model.inner_dim
    with torch.no_grad():
        for block in moe_blocks(model):        # gates = their bias, the same at every step
            proj = block.module.adaLN_modulation[-1]
            for chunk in (2, 5):
                proj.weight[chunk * D:(chunk + 1) * D].zero_()
                proj.bias[chunk * D:(chunk + 1) * D].normal_(0.0, 0.5)
    out, stats = _runs(model, _token_level(model), noise, cond, uncond, {"exact": dict(fold=False), "folded": {}})
    assert stats["folded"]["folded_forwards"] == 3          # the default guard folds: the gates are linear
    assert stats["folded"]["gate_error"] < 1e-6
    torch.testing.assert_close(out["folded"], out["exact"], rtol=1e-5, atol=1e-5)


def test_stack_steps_read_nothing_back_to_the_host():
    """A token-level forecast step (step from the caller's ``CacheContext``) runs no operator that reads a
    tensor value back to the host (``.item()``, ``bool()``, slicing by a tensor, ``nonzero``): on a GPU it
    queues without a sync, unlike the stock forward (``bincount().cpu()`` in every MoE, image sizes read in
    ``unpatchify``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    model, *_ = _setup()
    handle = apply_schedule(model, _token_level(model), fold_tolerance=math.inf)
    inputs = [_inputs(model, t=900.0 - 100 * i) for i in range(8)]
    stock = Ops()
    with torch.no_grad(), handle.context("cond", step_index=0, num_inference_steps=8), stock:
        model(**inputs[0])                                               # step 0: a full refresh
    seen = {}
    with torch.no_grad():
        for i in range(1, 8):
            with handle.context("cond", step_index=i, num_inference_steps=8), Ops() as ops:
                model(**inputs[i])
            seen[i] = ops.seen
    stats = handle.stats()
    handle.remove()
    assert stats["stack_forwards"] == 5 and stats["folded_forwards"] == 3
    reads = {"_local_scalar_dense", "nonzero", "item"}
    assert reads & stock.seen               # a full forward does (unpatchify's image sizes, the CPU dispatch's counts)
    for i in (1, 2, 4, 6, 7):                                            # exact, then folded stack steps
        assert not reads & seen[i], (i, reads & seen[i])
        assert "mm" not in seen[i] and "bmm" not in seen[i]             # no block ran


def test_computed_pairs_are_what_the_schedule_says():
    model, *_ = _setup()
    E = 4
    s = _derived_like(model, experts=(REUSE,) + (BlockRule().attn,) * (E - 1))   # expert 0 reused, others computed
    blocks = moe_blocks(model)
    inputs = []
    observers = [b.ff.register_forward_pre_hook(lambda mod, args: inputs.append(args[0])) for b in blocks]
    handle = apply_schedule(model, s)
    try:
        with torch.no_grad():
            model(**_inputs(model, t=900.0))
            cached_before = {b.index: handle.hook.state_manager._state_cache["moeca_default"].pairs[b.index].n.clone() > 0
                             for b in blocks}
            inputs.clear()
            model(**_inputs(model, t=800.0))
        state = handle.hook.state_manager._state_cache["moeca_default"]
        total = 0
        for b, x in zip(blocks, inputs):
            ids, _ = b.moe.gate(x.reshape(-1, x.shape[-1]))
            pair = torch.arange(ids.shape[0]).unsqueeze(1) * E + ids
            expected = (ids != 0) | ~cached_before[b.index][pair]
            pc = state.pairs[b.index]
            computed_now = (pc.s1[pair] == 1.0) & (pc.n[pair] > 0)
            assert torch.equal(computed_now, expected), b.index
            total += int(expected.sum())
        assert handle.counters.pairs == sum(x.shape[0] * x.shape[1] * 2 for x in inputs) + total
    finally:
        handle.remove()
        for o in observers:
            o.remove()


def test_separate_state_per_cfg_context():
    model, *_ = _setup()
    s = _derived_like(model)
    cond, uncond = _inputs(model, batch=1), _inputs(model, batch=1)
    uncond["hidden_states"] = uncond["hidden_states"] * -1.0

    def call(handle, kw, t, name, step):
        with handle.context(name, step_index=step), torch.no_grad():
            return model(**{**kw, "timesteps": torch.full((1,), t)})[0]

    handle = apply_schedule(model, s)
    alone = [call(handle, cond, t, "cond", i) for i, t in enumerate((900.0, 800.0, 700.0))]
    handle.reset()
    mixed = []
    for i, t in enumerate((900.0, 800.0, 700.0)):
        mixed.append(call(handle, cond, t, "cond", i))
        call(handle, uncond, t, "uncond", i)
    assert set(handle.hook.state_manager._state_cache) == {"cond", "uncond"}
    handle.remove()
    for a, m in zip(alone, mixed):
        assert torch.equal(a, m)


def test_steps_are_counted_and_reset_per_pipeline_call():
    model, cond, uncond, noise = _setup()
    handle = apply_schedule(model, _derived_like(model))
    first = sample(model, FlowSampler(num_steps=STEPS), noise, cond, uncond)
    second = sample(model, FlowSampler(num_steps=STEPS), noise, cond, uncond)
    with pytest.raises(ScheduleMismatch, match="sampler.num_steps"):
        sample(model, FlowSampler(num_steps=STEPS + 2), noise, cond, uncond)
    handle.remove()
    assert torch.equal(first, second)


def test_idle_expert_matches_stock():
    model, *_ = _setup()
    block = moe_blocks(model)[2]                         # a single-stream block
    x = torch.randn(1, 400, model.inner_dim, generator=torch.Generator().manual_seed(3))
    ids, _ = block.moe.gate(x.reshape(-1, x.shape[-1]))
    keep = ~(ids == 3).any(dim=1)
    x = x[:, keep]                                       # no token routed to expert 3
    assert x.shape[1] > 20
    with torch.no_grad():
        ref = block.ff(x)
        handle = apply_schedule(model, _none(model))
        out = block.ff(x)
    handle.remove()
    assert torch.equal(out, ref)


def test_adapter_meets_the_model_protocol():
    model, *_ = _setup()
    blocks = moe_blocks(model)
    assert [b.kind for b in blocks] == ["double", "double", "single", "single"]
    assert all(isinstance(b, MoEBlock) for b in blocks)


def test_trace_analyze_derive_apply_round_trip(tmp_path):
    trace, sched = tmp_path / "trace", tmp_path / "s.json"
    assert moeca_main(["trace", "--diffusers-config", "tiny-4e", "--steps", "4", "--samples", "1", "--height", "128",
                       "--out", str(trace), "--no-progress"]) == 0
    from moeca.tracer.store import trace_summary
    summary = trace_summary(trace, deep=True)
    assert summary["problems"] == [] and summary["shards_complete"] == 1
    meta = json.loads((trace / "run.json").read_text())
    assert meta["model"]["family"] == "diffusers"
    assert meta["model"]["diffusers"]["class"] == "HiDreamImageTransformer2DModel"
    import pyarrow.parquet as pq
    layout = pq.read_table(trace / "layout.parquet").to_pandas()
    image = meta["model"]["layout"]["image_tokens"]
    assert set(layout[layout.block_kind == "double"].token_kind) == {"image"}
    assert set(layout[(layout.block_kind == "single") & (layout.token >= image)].token_kind) == {"text"}
    branches = pq.read_table(trace / "branches").to_pandas()
    assert set(branches.expert) <= {0, 1, 2, 3} and branches.block.nunique() == 4
    assert branches[branches.block < 2].token.max() == image - 1
    assert moeca_main(["analyze", str(trace), "--out", str(tmp_path / "report")]) == 0
    assert moeca_main(["schedule", "derive", str(trace), "--target-flops-speedup", "2", "--out", str(sched)]) == 0
    s = Schedule.load(sched)
    model = build_transformer("tiny-4e")
    assert s.model.name.startswith("diffusers.HiDreamImageTransformer2DModel@")
    handle = apply_schedule(model, s)                    # same class, config and weights
    handle.remove()
    other = build_transformer("tiny-4e", seed=1)         # other weights
    with pytest.raises(ScheduleMismatch, match="weights_hash"):
        apply_schedule(other, s)
    with pytest.raises(ScheduleMismatch, match="model.name"):
        apply_schedule(build_transformer("tiny"), s)     # another config


def test_trace_resume_redoes_only_the_missing_shards(tmp_path, capsys):
    import pyarrow.parquet as pq
    out = tmp_path / "trace"
    base = ["trace", "--diffusers-config", "tiny-4e", "--steps", "3", "--samples", "2", "--batch-size", "1",
            "--height", "128", "--out", str(out), "--no-progress"]
    assert moeca_main(base) == 0
    shards = {t: sorted((out / t).glob("*.parquet")) for t in ("branches", "tokens")}
    assert all(len(v) == 2 for v in shards.values())
    before = {t: [pq.read_table(p) for p in v] for t, v in shards.items()}
    kept = shards["branches"][0].stat().st_mtime_ns
    for v in shards.values():
        v[1].unlink()                                  # the second shard was never finished
    assert moeca_main(base) == 2 and "--resume" in capsys.readouterr().err     # an existing trace
    assert moeca_main(base + ["--resume"]) == 0
    assert shards["branches"][0].stat().st_mtime_ns == kept
    for t, v in shards.items():
        assert all(pq.read_table(p).equals(b) for p, b in zip(v, before[t])), t
    other = [a if a != "128" else "96" for a in base] + ["--resume"]
    assert moeca_main(other) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "layout" in err


def test_replay_cli_reports_speed_flops_and_fidelity(tmp_path, capsys):
    model = build_transformer("tiny-4e")
    path = tmp_path / "s.json"
    _derived_like(model).save(path)
    assert moeca_main(["replay", "--diffusers-config", "tiny-4e", "--schedule", str(path), "--samples", "1",
                       "--repeats", "1", "--height", "128", "--out", str(tmp_path / "replay")]) == 0
    report = json.loads((tmp_path / "replay" / "report.json").read_text())
    full, cached = report["rows"][1], report["rows"][2]
    assert full["max_abs_diff"] == 0.0 and full["flops_ratio"] == pytest.approx(1.0)
    assert cached["flops_ratio"] > 1.5 and 0 < cached["rel_l2"] < 0.5


def test_a_transformer_without_moe_is_refused():
    model = build_transformer("tiny")
    cfg = {**CONFIGS["tiny"], "num_routed_experts": 0}
    from diffusers import HiDreamImageTransformer2DModel
    dense = HiDreamImageTransformer2DModel(**cfg)
    with pytest.raises(ValueError, match="num_routed_experts > 0"):
        apply_schedule(dense, _none(model))


def test_unknown_class_and_versions_and_missing_extra_are_clear_errors(monkeypatch):
    with pytest.raises(TypeError, match="supports HiDreamImageTransformer2DModel"):
        check_transformer(torch.nn.Linear(2, 2))
    for bad in ("0.41.2", "0.43.0", "1.0.0"):
        with pytest.raises(ImportError, match=">=0.42,<0.43"):
            check_version(bad)
    check_version("0.42.1")
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(ModuleNotFoundError, match=r"moeca\[diffusers\]"):
        require_diffusers()


def test_cli_errors_name_the_input(tmp_path, capsys):
    assert moeca_main(["trace", "--diffusers", str(tmp_path / "absent"), "--out", str(tmp_path / "t")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert moeca_main(["trace", "--diffusers", str(tmp_path), "--out", str(tmp_path / "t")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_gpu_check_hidream_dry_run_measures_every_variant(tmp_path):
    from moeca.bench.gpu_check_hidream import main
    assert main(["--dry-run", "--out", str(tmp_path), "--repeats", "1", "--intervals", "2"]) == 0
    rows = json.loads((tmp_path / "gpu_check_hidream_dry_run.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["stock forward", "moeca full compute", "MoECa branch level, refresh every 2",
                                            "MoECa token level, refresh every 2"]
    assert rows[1]["max_abs_diff"] == 0.0 and rows[2]["flops_ratio"] > 1.2 and rows[3]["flops_ratio"] > rows[2]["flops_ratio"]
    assert rows[3]["forecast_ms"] < rows[3]["refresh_ms"]


def test_apply_inside_a_hidream_pipeline_call():
    pytest.importorskip("transformers")                 # HiDreamImagePipeline needs it (not the text encoders)
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline
    model, cond, uncond, _ = _setup()
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), latent_channels=4, norm_num_groups=8)   # scale 8
    encoders = {f"{kind}{suffix}": None for kind in ("text_encoder", "tokenizer") for suffix in ("", "_2", "_3", "_4")}
    pipe = HiDreamImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, transformer=model,
                                **encoders)
    text = dict(prompt_embeds_t5=cond.t5, prompt_embeds_llama3=cond.llama, pooled_prompt_embeds=cond.pooled,
                negative_prompt_embeds_t5=uncond.t5, negative_prompt_embeds_llama3=uncond.llama,
                negative_pooled_prompt_embeds=uncond.pooled)

    def call():
        return pipe(**text, height=8 * LATENT[0], width=8 * LATENT[1], num_inference_steps=STEPS, guidance_scale=5.0,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).images
    stock = call()
    handle = apply_schedule(model, _none(model))
    full = call()
    handle.remove()
    handle = apply_schedule(model, _derived_like(model))
    first, second = call(), call()                      # steps counted per call, caches reset between calls
    stats = handle.stats()
    handle.remove()
    assert torch.equal(full, stock)
    assert torch.equal(first, second) and not torch.equal(first, stock)
    assert stats["forwards"] == 2 * STEPS and stats["flops_ratio"] > 1.5
    assert torch.equal(call(), stock)


def test_cli_config_names_are_the_sampling_configs(tmp_path, capsys):
    from moeca.integrations.diffusers_cli import CONFIG_NAMES
    assert set(CONFIG_NAMES) == set(CONFIGS)
    assert moeca_main(["trace", "--diffusers-config", "tiny", "--model", "demo", "--out", str(tmp_path / "t")]) == 2
    assert "leave out --model" in capsys.readouterr().err
