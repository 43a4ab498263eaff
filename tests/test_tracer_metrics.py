"""The tracer records what the model computed: offline recomputation, bit-identical samples."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moeca.models.dit_moe import modulate
from moeca.diffusion.samplers import SamplerConfig, initial_noise, sample
from moeca.tracer.metrics import match_slots, rel_and_cos
from moeca.tracer.recorder import TracingRuntime
from moeca.tracer.run import (TraceConfig, build_run_meta, prepare_out_dir, sample_seed, shard_seed, step_times,
                              trace_shard)
from moeca.tracer.store import open_table

from conftest import make_tiny

LAGS = 2


def test_rel_and_cos_match_reference():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 16, generator=gen), torch.randn(50, 16, generator=gen)
    b[:10] = a[:10] + 1e-4 * torch.randn(10, 16, generator=gen)   # tiny changes: no cancellation
    rel, cos = rel_and_cos(a, a.norm(dim=-1), b, b.norm(dim=-1))
    a64, b64 = a.double(), b.double()
    torch.testing.assert_close(rel.double(), (a64 - b64).norm(dim=-1) / b64.norm(dim=-1), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(cos.double(), F.cosine_similarity(a64, b64, dim=-1), rtol=1e-5, atol=1e-6)
    z = torch.zeros(3, 16)
    rel0, cos0 = rel_and_cos(a[:3], a[:3].norm(dim=-1), z, z.norm(dim=-1))
    assert torch.all(cos0 == 0) and torch.all(rel0 > 1e6)


def test_match_slots():
    now = torch.tensor([[1, 3], [0, 2], [2, 1]])
    then = torch.tensor([[3, 0], [1, 3], [1, 2]])
    routed, slot = match_slots(now, then)
    assert routed.tolist() == [[False, True], [False, False], [True, True]]
    assert slot[0, 1] == 0 and slot[2, 0] == 1 and slot[2, 1] == 0


class Capture:
    """Captures each block's input, condition and output, and each model call's context, with hooks."""

    def __init__(self, model):
        self.calls: list[dict] = []
        self.handles = [model.register_forward_pre_hook(self._model_pre)]
        for block in model.blocks:
            self.handles.append(block.register_forward_hook(self._block_post))

    def _model_pre(self, module, args):
        self.calls.append({"ctx": args[3], "blocks": []})

    def _block_post(self, block, args, out):
        x, c = args[0], args[1]
        self.calls[-1]["blocks"].append((block.index, x.detach().clone(), c.detach().clone(), out.detach().clone()))

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def offline_units(model64, calls, sample_ids):
    """Recompute every unit per (sample, cfg, step, block, token) in float64, one token at a time for experts."""
    B = len(sample_ids)
    units, experts = {}, {}
    for call in calls:
        ctx = call["ctx"]
        for b, x, c, out in call["blocks"]:
            blk = model64.blocks[b]
            x, c, out = x.double(), c.double(), out.double()
            sm, cm, gm, sp, cp, gp = blk.adaLN_modulation(c).chunk(6, dim=1)
            x_mod = modulate(blk.norm1(x), sm, cm)
            attn = blk.attn(x_mod)
            x1 = x + gm.unsqueeze(1) * attn
            h = modulate(blk.norm2(x1), sp, cp)
            for r in range(x.shape[0]):
                cfg = int(ctx.cfg_branch == "uncond" or (ctx.cfg_branch == "batched" and r >= B))
                sample = sample_ids[r % B]
                probs = blk.moe.gate.probabilities(h[r]).detach()
                w, idx = torch.topk(probs, blk.moe.top_k, dim=-1)
                for tok in range(x.shape[1]):
                    key = (sample, cfg, ctx.step, b, tok)
                    outs = {int(e): blk.moe.experts[int(e)](h[r, tok:tok + 1])[0] for e in idx[tok]}
                    routed = sum(wt.item() * outs[int(e)] for wt, e in zip(w[tok], idx[tok]))
                    units[key] = {"attn": attn[r, tok], "moe": routed, "shared": blk.moe.shared_experts(h[r, tok:tok + 1])[0],
                                  "update": out[r, tok] - x[r, tok], "attn_in": x_mod[r, tok], "moe_in": h[r, tok]}
                    for slot, e in enumerate(idx[tok].tolist()):
                        experts[key + (e,)] = (slot, float(w[tok, slot]), outs[e])
    return units, experts


def _rel(a, b):
    return float((a - b).norm() / (b.norm() + 1e-12))


def _cos(a, b):
    return float(F.cosine_similarity(a, b, dim=0))


@pytest.mark.parametrize("cfg_mode", ["batched", "separate"])
def test_metrics_equal_offline_recomputation(tmp_path, cfg_mode):
    model = make_tiny(seed=1)
    model64 = copy.deepcopy(model).double()
    sampler = SamplerConfig(kind="rectified_flow", num_steps=5, cfg_scale=2.0, cfg_mode=cfg_mode)
    config = TraceConfig(sampler=sampler, labels=(0, 2, 1, 1, 0), batch_size=2, lags=LAGS)  # reuses buffers
    prepare_out_dir(tmp_path, build_run_meta(model, config, run_name="t"))
    runtime = TracingRuntime(lags=LAGS, step_t=step_times(sampler))
    units, experts = {}, {}
    for shard in range(config.num_shards):
        cap = Capture(model)
        trace_shard(model, runtime, tmp_path, config, shard, run_name="t", background=shard == 0)
        cap.remove()
        u, e = offline_units(model64, cap.calls, list(config.shard_samples(shard)))
        units.update(u)
        experts.update(e)

    tokens = open_table(tmp_path, "tokens").to_table().to_pandas()
    branches = open_table(tmp_path, "branches").to_table().to_pandas()
    T, depth, k = model.config.num_tokens, model.config.depth, model.config.top_k
    assert len(tokens) == len(units) == 5 * 2 * 5 * depth * T
    assert len(branches) == len(experts) == len(units) * k
    assert set(tokens["cfg_branch"]) == {0, 1}

    exp_rows, got_rows = [], []
    for row in tokens.itertuples(index=False):
        key = (row.sample, row.cfg_branch, row.step, row.block, row.token)
        cur = units[key]
        assert row.t == pytest.approx(1.0 - row.step / 5)
        for unit in ("attn", "moe", "shared", "update"):
            exp_rows.append(float(cur[unit].norm()))
            got_rows.append(getattr(row, f"{unit}_norm"))
            for lag in range(1, LAGS + 1):
                rel, cos = getattr(row, f"{unit}_rel_l2_lag{lag}"), getattr(row, f"{unit}_cos_lag{lag}")
                if row.step < lag:
                    assert math.isnan(rel) and math.isnan(cos)
                    continue
                old = units[(row.sample, row.cfg_branch, row.step - lag, row.block, row.token)][unit]
                exp_rows += [_rel(cur[unit], old), _cos(cur[unit], old)]
                got_rows += [rel, cos]
        for unit in ("attn_in", "moe_in"):
            got = getattr(row, f"{unit}_rel_l2_prev")
            if row.step == 0:
                assert math.isnan(got)
            else:
                exp_rows.append(_rel(cur[unit], units[(row.sample, row.cfg_branch, row.step - 1, row.block,
                                                        row.token)][unit]))
                got_rows.append(got)
    np.testing.assert_allclose(got_rows, exp_rows, rtol=2e-3, atol=2e-3)

    exp_rows, got_rows, routed_seen = [], [], 0
    for row in branches.itertuples(index=False):
        key = (row.sample, row.cfg_branch, row.step, row.block, row.token)
        slot, weight, out = experts[key + (row.expert,)]
        assert slot == row.slot
        exp_rows += [weight, float(out.norm())]
        got_rows += [row.gate_weight, row.out_norm]
        prev_key = (row.sample, row.cfg_branch, row.step - 1, row.block, row.token, row.expert)
        assert row.routed_prev == (prev_key in experts)
        for lag in range(1, LAGS + 1):
            old = experts.get((row.sample, row.cfg_branch, row.step - lag, row.block, row.token, row.expert))
            rel, cos = getattr(row, f"rel_l2_lag{lag}"), getattr(row, f"cos_lag{lag}")
            if old is None:
                assert math.isnan(rel) and math.isnan(cos)
            else:
                routed_seen += 1
                exp_rows += [_rel(out, old[2]), _cos(out, old[2])]
                got_rows += [rel, cos]
        if row.step > 0:
            exp_rows.append(_rel(units[key]["moe_in"], units[(row.sample, row.cfg_branch, row.step - 1, row.block,
                                                              row.token)]["moe_in"]))
            got_rows.append(row.in_rel_l2_prev)
    assert routed_seen > len(branches) // 2
    assert not branches["routed_prev"].all() and branches["routed_prev"].any()
    np.testing.assert_allclose(got_rows, exp_rows, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("cfg_mode,scale", [("batched", 1.5), ("separate", 1.5), ("batched", 1.0)])
def test_tracing_does_not_change_samples(tmp_path, cfg_mode, scale):
    model = make_tiny(seed=2)
    sampler = SamplerConfig(kind="rectified_flow", num_steps=6, cfg_scale=scale, cfg_mode=cfg_mode)
    config = TraceConfig(sampler=sampler, labels=(0, 1, 2, 1), batch_size=4, lags=3, dump_vectors=3)
    prepare_out_dir(tmp_path, build_run_meta(model, config))
    runtime = TracingRuntime(lags=3, step_t=step_times(sampler), vector_tokens={1: [0, 2, 7]})
    traced = trace_shard(model, runtime, tmp_path, config, 0)
    noise = torch.cat([initial_noise((1, 1, 4, 4), sample_seed(0, i), "cpu") for i in range(4)])
    plain = sample(model, sampler, torch.tensor([0, 1, 2, 1]), seed=shard_seed(0, 0), noise=noise)
    assert torch.equal(traced, plain)
    vec = open_table(tmp_path, "vectors").to_table().to_pandas()
    assert set(vec["block"]) == {1} and set(vec["token"]) == {0, 2, 7}
    # the same again on a DDPM model (eps objective, learned sigma, per-step noise)
    from dataclasses import replace
    from conftest import TINY
    ddpm_model = make_tiny(replace(TINY, objective="ddpm_eps", learn_sigma=True), 3)
    ddpm = SamplerConfig(kind="ddpm", num_steps=4, cfg_scale=scale, cfg_mode=cfg_mode, cfg_channels=1)
    config = replace(config, sampler=ddpm)
    prepare_out_dir(tmp_path / "ddpm", build_run_meta(ddpm_model, config))
    traced = trace_shard(ddpm_model, TracingRuntime(lags=3, step_t=step_times(ddpm)), tmp_path / "ddpm", config, 0)
    plain = sample(ddpm_model, ddpm, torch.tensor([0, 1, 2, 1]), seed=shard_seed(0, 0), noise=noise)
    assert torch.equal(traced, plain)
    t = open_table(tmp_path / "ddpm", "tokens").to_table(columns=["step", "t"]).to_pandas()
    assert t.groupby("step")["t"].first().tolist() == step_times(ddpm)[::1] and step_times(ddpm)[0] > step_times(ddpm)[-1]


def test_untraced_calls_pass_through():
    """Calls without a context or outside a shard are computed plainly and record nothing."""
    model = make_tiny(seed=0)
    runtime = TracingRuntime(lags=1)
    x = torch.randn(2, 1, 4, 4)
    t, y = torch.tensor([0.5, 0.5]), torch.tensor([0, 1])
    with torch.no_grad():
        ref = model(x, t, y)
        with model.use_runtime(runtime):
            got = model(x, t, y)
    assert torch.equal(ref, got) and not runtime._states
