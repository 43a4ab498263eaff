"""Replay runtime: exactness, real skipping (counted rows), CFG contexts, resets, NaN, refusals, driver, CLI."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import TINY, make_tiny
from moeca.models.config import DiTMoEConfig
from moeca.diffusion.samplers import SamplerConfig, sample
from moeca.policy.schedule import (ALWAYS, REUSE, BlockRule, ModelIdentity, ModelSkip, Rule, SamplerIdentity,
                                   Schedule, ScheduleMismatch, ScoreConfig, StepRule, full_schedule)
from moeca.replay.partial_attention import partial_attention
from moeca.replay.forecast import History
from moeca.replay.runtime import ReplayRuntime

STEPS = 6
LABELS = torch.tensor([0, 1, 2, 1])


def sampler(mode: str = "batched", scale: float = 1.5, steps: int = STEPS) -> SamplerConfig:
    return SamplerConfig(kind="rectified_flow", num_steps=steps, cfg_scale=scale, cfg_mode=mode)


def make_schedule(block: BlockRule, cfg: SamplerConfig, sync=(0,), config: DiTMoEConfig = TINY, model="compute",
                  model_skip=None, scores=None, forecast="none") -> Schedule:
    steps = tuple(StepRule(model if s not in sync else "compute", (block,) * config.depth)
                  for s in range(cfg.num_steps))
    return Schedule("custom", ModelIdentity.of(config), SamplerIdentity.of(cfg), steps, tuple(sync),
                    scores=scores or {k: ScoreConfig(1.0, 0.01) for k in ("attn", "moe", "shared", "expert")},
                    model_skip=model_skip, forecast=forecast)


class CountingReplay(ReplayRuntime):
    """Counts rows that really reach each routed expert and records the routing per step (one call per
    expert, so every computed row passes the ``expert`` seam)."""

    def __init__(self, schedule):
        super().__init__(schedule)
        self.expert_rows: dict[tuple[int, int, int], int] = {}
        self.routes: dict[tuple[int, int], torch.Tensor] = {}

    def expert(self, block, e, h_rows):
        key = (self._ctx.step, block.index, e)
        self.expert_rows[key] = self.expert_rows.get(key, 0) + h_rows.shape[0]
        return super().expert(block, e, h_rows)

    def route(self, block, h):
        idx, w = super().route(block, h)
        self.routes[(self._ctx.step, block.index)] = idx.clone()
        return idx, w


def replay(model, schedule, cfg, labels=LABELS, seed=3, runtime=None):
    rt = runtime or ReplayRuntime(schedule)
    with model.use_runtime(rt):
        out = sample(model, cfg, labels, seed=seed)
    return out, rt


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("mode,scale", [("batched", 1.5), ("separate", 1.5), ("batched", 1.0)])
def test_reuse_nothing_is_bit_exact(tiny_model, mode, scale):
    cfg = sampler(mode, scale)
    ref = sample(tiny_model, cfg, LABELS, seed=3)
    out, rt = replay(tiny_model, full_schedule(TINY, cfg), cfg)
    assert torch.equal(out, ref)
    t = rt.counters.totals()
    assert t["expert"] == t["pairs"] and t["attn_q"] == t["tokens"] and t["shared"] == t["tokens"]
    # a reusing schedule whose steps are all sync steps computes everything too
    busy = make_schedule(BlockRule(REUSE, ALWAYS, REUSE, (REUSE,) * 4), cfg, sync=tuple(range(STEPS)))
    out2, _ = replay(tiny_model, busy, cfg)
    assert torch.equal(out2, ref)


def test_forecast_schedule_that_reuses_nothing_is_bit_exact(tiny_model):
    cfg = sampler()
    ref = sample(tiny_model, cfg, LABELS, seed=3)
    out, _ = replay(tiny_model, dataclasses.replace(full_schedule(TINY, cfg), forecast="linear"), cfg)
    assert torch.equal(out, ref)
    busy = make_schedule(BlockRule(REUSE, ALWAYS, REUSE, (REUSE,) * 4), cfg, sync=tuple(range(STEPS)), forecast="linear")
    assert torch.equal(replay(tiny_model, busy, cfg)[0], ref)


def test_reuse_changes_output_but_stays_close(tiny_model):
    cfg = sampler()
    ref = sample(tiny_model, cfg, LABELS, seed=3)
    s = make_schedule(BlockRule(REUSE, ALWAYS, Rule("fraction", 0.5), (REUSE, Rule("fraction", 0.5),
                                                                      Rule("threshold", 0.05), ALWAYS)), cfg)
    out, rt = replay(tiny_model, s, cfg)
    assert not torch.equal(out, ref)
    assert float((out - ref).norm() / ref.norm()) < 0.2
    assert rt.peak_cache_bytes > 0


# ----------------------------------------------------------------------------- forecasting
def test_linear_history_follows_each_rows_last_two_computations():
    y0, y1, z = torch.randn(3, 2, 4).unbind(0)
    c = History.empty(1, 2, 4, torch.device("cpu"))
    c.push_all(y0, step=0)
    assert torch.equal(c.forecast(1), y0)                     # one computation: plain reuse
    c.push_all(y1, step=2)
    c.push_rows(torch.tensor([1]), z[1:], step=3)             # row 1 recomputed at step 3
    got = c.forecast(5)
    torch.testing.assert_close(got[0], y1[0] + (y1[0] - y0[0]) * (5 - 2) / (2 - 0))
    torch.testing.assert_close(got[1], z[1] + (z[1] - y1[1]) * (5 - 3) / (3 - 2))
    assert torch.equal(c.forecast(3)[1], z[1])                # a row at its own step is its computed value


class RecordingReplay(ReplayRuntime):
    """Records, after each MoE, the cached experts per storage slot and the unweighted expert / shared
    outputs the MoE combined (the caches' values at the step), per (step, block)."""

    def __init__(self, schedule):
        super().__init__(schedule)
        self.routes, self.slots, self.shared_out = {}, {}, {}

    def moe(self, block, h):
        out = super().moe(block, h)
        st, step = self._cs.blocks[block.index], self._ctx.step
        key = (step, self._ctx.cfg_branch, block.index)
        k = block.moe.top_k
        self.routes[key] = st.experts.ids.clone()
        self.slots[key] = st.experts.hist.forecast(step).view(-1, k, h.shape[-1]).clone()
        self.shared_out[key] = st.shared.hist.forecast(step).clone()
        return out


def test_linear_forecast_of_reused_branches_and_shared_expert(tiny_model):
    """Steps 0 and 1 compute everything; at step 2 a persisting (token, expert) branch is reused as
    ``2 v1 - v0`` (its outputs at steps 1 and 0, wherever its slot was), newly routed pairs are computed."""
    cfg = sampler()
    s = make_schedule(BlockRule(REUSE, ALWAYS, REUSE, (REUSE,) * 4), cfg, sync=(0, 1, STEPS - 1), forecast="linear")
    rt = RecordingReplay(s)
    replay(tiny_model, s, cfg, runtime=rt)
    checked = 0
    for b in range(TINY.depth):
        key = lambda step: (step, "batched", b)  # noqa: E731
        torch.testing.assert_close(rt.shared_out[key(2)], 2 * rt.shared_out[key(1)] - rt.shared_out[key(0)])
        ids = [rt.routes[key(t)] for t in (0, 1, 2)]
        vals = [rt.slots[key(t)] for t in (0, 1, 2)]
        for row in range(ids[2].shape[0]):
            for slot, e in enumerate(ids[2][row].tolist()):
                where = [(ids[t][row] == e).nonzero() for t in (0, 1)]
                if all(w.numel() for w in where):
                    v0, v1 = (vals[t][row, int(w[0, 0])] for t, w in zip((0, 1), where))
                    torch.testing.assert_close(vals[2][row, slot], 2 * v1 - v0)
                    checked += 1
    assert checked > 0
    plain = make_schedule(BlockRule(REUSE, ALWAYS, REUSE, (REUSE,) * 4), cfg, sync=(0, 1, STEPS - 1))
    assert not torch.equal(replay(tiny_model, plain, cfg)[0], replay(tiny_model, s, cfg)[0])


# ----------------------------------------------------------------------------- real skipping
def test_expert_marked_never_runs_only_on_new_pairs(tiny_model):
    cfg = sampler()
    rule = BlockRule(ALWAYS, ALWAYS, ALWAYS, (REUSE, ALWAYS, Rule("fraction", 0.5), ALWAYS))
    rt = CountingReplay(make_schedule(rule, cfg, sync=(0, 3)))
    replay(tiny_model, rt.schedule, cfg, runtime=rt)
    for step in range(STEPS):
        for b in range(TINY.depth):
            idx = rt.routes[(step, b)]
            n0 = int((idx == 0).sum())
            got = rt.expert_rows.get((step, b, 0), 0)
            if step in (0, 3):
                assert got == n0
                continue
            prev = rt.routes[(step - 1, b)]
            persisted = int(((idx == 0).any(1) & (prev == 0).any(1)).sum())
            assert got == n0 - persisted            # only newly routed pairs of expert 0 were computed
            n2 = int((idx == 2).sum())
            cand2 = int(((idx == 2).any(1) & (prev == 2).any(1)).sum())
            assert rt.expert_rows.get((step, b, 2), 0) == n2 - cand2 + -(-cand2 // 2)
    assert sum(rt.expert_rows.values()) == rt.counters.totals()["expert"]
    assert rt.counters.totals()["expert"] < rt.counters.totals()["pairs"]


def test_device_path_computes_the_same_rows_as_the_host_path(tiny_model):
    """The sync-free device path (forced on CPU tensors) selects and computes the same pairs as the host
    path and the per-expert seam calls, and gives the same numbers."""
    cfg = sampler()
    rule = BlockRule(REUSE, ALWAYS, Rule("threshold", 0.02), (REUSE, ALWAYS, Rule("fraction", 0.5), Rule("threshold", 0.01)))
    s = make_schedule(rule, cfg, sync=(0, 3), forecast="linear")
    host, rt_h = replay(tiny_model, s, cfg)
    per_expert, rt_p = replay(tiny_model, s, cfg, runtime=CountingReplay(s))
    device, rt_d = replay(tiny_model, s, cfg, runtime=ReplayRuntime(s, device_path=True))
    assert torch.equal(host, per_expert)
    torch.testing.assert_close(device, host, rtol=1e-4, atol=1e-5)
    th, tp, td = (r.counters.totals() for r in (rt_h, rt_p, rt_d))
    assert th == tp
    assert sum(rt_p.expert_rows.values()) == tp["expert"] < tp["pairs"]
    for name in ("attn_q", "attn_kv", "router", "tokens", "pairs", "expert"):
        assert td[name] == th[name], name
    # the shared expert's threshold rule runs every row on the device path and keeps the selected ones
    assert th["padded"] == 0 < td["padded"] and td["shared"] - td["padded"] == th["shared"] < th["tokens"]


def test_attention_and_shared_marked_never_are_not_executed(tiny_model):
    cfg = sampler()
    calls = {"attn": 0, "shared": 0}
    hooks = [tiny_model.blocks[0].attn.register_forward_hook(lambda *a: calls.__setitem__("attn", calls["attn"] + 1)),
             tiny_model.blocks[0].moe.shared_experts.register_forward_hook(
                 lambda *a: calls.__setitem__("shared", calls["shared"] + 1))]
    try:
        s = make_schedule(BlockRule(REUSE, ALWAYS, REUSE, (ALWAYS,) * 4), cfg, sync=(0, 4))
        _, rt = replay(tiny_model, s, cfg)
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"attn": 2, "shared": 2}
    t = rt.counters.totals()
    assert t["attn_q"] == t["shared"] == 2 * TINY.depth * 2 * LABELS.numel() * TINY.num_tokens
    computed, full = rt.counters.flops(__import__("moeca.policy.cost", fromlist=["UnitCosts"]).UnitCosts.of(TINY))
    assert computed < full


def test_partial_attention_matches_full_rows(tiny_model):
    from moeca.models.dit_moe import Attention, QKNormAttention
    torch.manual_seed(0)
    x = torch.randn(3, 16, 32)
    idx = torch.tensor([[0, 5, 7], [1, 2, 15], [3, 4, 9]])
    for attn in (Attention(32, 2), QKNormAttention(32, 2)):
        with torch.no_grad():
            full = attn(x)
            part = partial_attention(attn, x, idx)
        want = torch.gather(full, 1, idx.unsqueeze(-1).expand(3, 3, 32))
        assert torch.allclose(part, want, atol=1e-5)


def test_partial_attention_rule_counts_query_rows(tiny_model):
    cfg = sampler()
    s = make_schedule(BlockRule(Rule("fraction", 0.25), ALWAYS, ALWAYS, (ALWAYS,) * 4), cfg)
    _, rt = replay(tiny_model, s, cfg)
    rows = 2 * LABELS.numel()
    T = TINY.num_tokens
    assert rt.counters.attn_q[0].sum() == TINY.depth * rows * T
    assert rt.counters.attn_q[1].sum() == TINY.depth * rows * (T // 4)
    assert rt.counters.attn_kv[1].sum() == TINY.depth * rows * T


def test_token_level_moe_and_whole_model_skip(tiny_model):
    cfg = sampler()
    fora = make_schedule(BlockRule(REUSE, REUSE, ALWAYS, (ALWAYS,) * 4), cfg, sync=(0, 3))
    rt = CountingReplay(fora)
    replay(tiny_model, fora, cfg, runtime=rt)
    assert {s for s, _, _ in rt.expert_rows} == {0, 3}
    toca = make_schedule(BlockRule(REUSE, Rule("fraction", 0.25), ALWAYS, (ALWAYS,) * 4), cfg)
    _, rt = replay(tiny_model, toca, cfg)
    N = 2 * LABELS.numel() * TINY.num_tokens
    assert rt.counters.router[2, 0] == -(-N // 4) and rt.counters.expert[2, 0] == TINY.top_k * -(-N // 4)
    tea = make_schedule(BlockRule.full(4), cfg, sync=(0, 3), model="reuse")
    out, rt = replay(tiny_model, tea, cfg)
    assert rt.counters.skipped_forwards == STEPS - 2 and rt.counters.attn_q[1].sum() == 0
    adaptive = make_schedule(BlockRule.full(4), cfg, sync=(0,), model="adaptive",
                             model_skip=ModelSkip(threshold=1e9))
    _, rt = replay(tiny_model, adaptive, cfg)
    assert rt.counters.skipped_forwards == STEPS - 1  # the indicator is tracked from step 0 on
    never = make_schedule(BlockRule.full(4), cfg, sync=(0,), model="adaptive", model_skip=ModelSkip(threshold=0.0))
    out_never, rt = replay(tiny_model, never, cfg)
    assert rt.counters.skipped_forwards == 0
    assert torch.equal(out_never, sample(tiny_model, cfg, LABELS, seed=3))


# ----------------------------------------------------------------------------- state handling
def test_cfg_contexts_are_separate_and_reset_between_calls(tiny_model):
    cfg = sampler("separate")
    s = make_schedule(BlockRule(REUSE, ALWAYS, REUSE, (REUSE,) * 4), cfg)
    rt = ReplayRuntime(s)
    seen = {}

    class Spy(ReplayRuntime):
        def end_forward(self, model, ctx):
            seen[ctx.cfg_branch] = self._cs.blocks[0].attn.hist.vals.data_ptr()
            super().end_forward(model, ctx)

    spy = Spy(s)
    with tiny_model.use_runtime(spy):
        sample(tiny_model, cfg, LABELS, seed=3)
    assert set(seen) == {"cond", "uncond"} and seen["cond"] != seen["uncond"]
    assert not spy._contexts  # the sampler reset the runtime after the run
    # a second call gives the same samples as a fresh runtime (nothing leaks between calls)
    a, _ = replay(tiny_model, s, cfg, runtime=rt)
    b, _ = replay(tiny_model, s, cfg, runtime=rt)
    assert torch.equal(a, b)
    # a batch-size change between calls (and within a context without reset) is handled
    c, _ = replay(tiny_model, s, cfg, labels=LABELS[:3], runtime=rt)
    d, _ = replay(tiny_model, s, cfg, labels=LABELS[:3])
    assert torch.equal(c, d)
    with tiny_model.use_runtime(rt):
        from moeca.models.runtime import ForwardContext
        x, t = torch.randn(4, 1, 4, 4), torch.ones(4)
        tiny_model(x, t, LABELS, ForwardContext(0, STEPS, "cond"))
        tiny_model(x[:2], t[:2], LABELS[:2], ForwardContext(1, STEPS, "cond"))  # smaller batch: fresh cache
        assert rt._contexts["cond"].batch == 2


def test_nan_in_cached_output_stops_with_message(tiny_model):
    cfg = sampler()
    s = make_schedule(BlockRule(REUSE, ALWAYS, ALWAYS, (ALWAYS,) * 4), cfg)
    rt = ReplayRuntime(s)

    def poison(step):
        if step == 1:
            rt._contexts["batched"].blocks[1].attn.hist.vals[:, 0, 0] = float("nan")

    with tiny_model.use_runtime(rt), pytest.raises(FloatingPointError, match=r"cached attention output of block 1"):
        sample(tiny_model, cfg, LABELS, seed=3, on_step=poison)


def test_schedule_for_other_steps_or_model_is_refused(tiny_model):
    cfg = sampler()
    s = full_schedule(TINY, cfg)
    with pytest.raises(ScheduleMismatch, match="sampler.num_steps"):
        replay(tiny_model, s, sampler(steps=STEPS + 1))
    other = make_tiny(dataclasses.replace(TINY, hidden_size=16))
    with pytest.raises(ScheduleMismatch, match="model.fingerprint"):
        replay(other, s, cfg)
    with pytest.raises(ValueError, match="ForwardContext"):
        with tiny_model.use_runtime(ReplayRuntime(s)):
            tiny_model(torch.randn(2, 1, 4, 4), torch.ones(2), LABELS[:2])


# ----------------------------------------------------------------------------- driver and CLI
def test_replay_compare_and_outputs(tmp_path, tiny_model):
    from moeca.replay.driver import replay_compare, write_replay_outputs
    cfg = sampler()
    s = make_schedule(BlockRule(REUSE, ALWAYS, REUSE, (Rule("fraction", 0.3),) * 4), cfg, sync=(0, 3))
    res = replay_compare(tiny_model, s, cfg, [0, 1, 2, 0], seed=1, repeats=2, quality_labels=[0, 1, 2] * 3,
                         quality_batch=4, progress=False)
    r = res.report
    assert len(r.times_full_s) == 2 and r.speedup > 0 and 0 < r.flops_ratio < 1
    assert r.reuse["attn"] == pytest.approx(4 / 6) and r.cache_bytes > 0
    assert r.quality_samples == 9 and r.accuracy_full is None  # not the digits model: no classifier scores
    assert res.quality_full.shape == (9, 1, 4, 4)
    paths = write_replay_outputs(res, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["speedup"] == r.speedup and "speedup" in paths["md"].read_text()
    blob = torch.load(paths["tensors"])
    assert torch.equal(blob["full"], res.full)
    assert paths["full_png"].stat().st_size > 0 and not list((tmp_path / "out").glob(".*tmp"))


def test_cli_replay(tmp_path, capsys):
    from moeca.cli.main import main
    from moeca.models.checkpoint import save_safetensors, weights_hash

    model = make_tiny()
    ckpt = tmp_path / "tiny.safetensors"
    save_safetensors(model, ckpt)
    cfg = sampler(steps=4)
    s = dataclasses.replace(full_schedule(TINY, cfg, weights_hash=weights_hash(model)))
    path = s.save(tmp_path / "s.json")
    out = tmp_path / "rep"
    assert main(["replay", "--schedule", str(path), "--checkpoint", str(ckpt), "--samples", "3", "--repeats", "1",
                 "--out", str(out), "--no-progress", "--cfg-scale", "1.5"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["flops_ratio"] == pytest.approx(1.0) and rep["psnr_mean"] == 100.0
    bad = dataclasses.replace(s, model=dataclasses.replace(s.model, weights_hash="ffffffffffffffff")).save(
        tmp_path / "bad.json")
    assert main(["replay", "--schedule", str(bad), "--checkpoint", str(ckpt), "--out", str(out),
                 "--no-progress"]) == 2
    assert "model.weights_hash" in capsys.readouterr().err


def test_attention_reuse_shortcut_matches_the_block_path(tiny_model):
    """Reused attention skips norm1/modulate in the runtime's block loop: same numbers as block.forward."""
    cfg = sampler()
    s = make_schedule(BlockRule(REUSE, ALWAYS, Rule("fraction", 0.5), (Rule("fraction", 0.5),) * 4), cfg, sync=(0, 3))

    class Plain(ReplayRuntime):
        def _blocks(self, model, x, c):
            for block in model.blocks:
                x = block(x, c, self)
            return x

    a, ra = replay(tiny_model, s, cfg)
    b, rb = replay(tiny_model, s, cfg, runtime=Plain(s))
    assert torch.equal(a, b)
    assert ra.counters.totals() == rb.counters.totals()
