"""Model mechanics: public state-dict layout, strict loading, grouped dispatch, seams."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moeca.models.checkpoint import CheckpointError, load_checkpoint, read_state_dict, save_safetensors
from moeca.models.config import PRESETS, DiTMoEConfig, get_preset
from moeca.models.dit_moe import DiTMoE
from moeca.models.runtime import Runtime

from conftest import TINY, make_tiny

QK_TINY = dataclasses.replace(TINY, name="tiny-qk", qk_norm=True, learn_sigma=True, objective="ddpm_eps")


def _inputs(config: DiTMoEConfig, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, config.num_classes, (batch,), generator=g)
    return x, t, y


def test_public_key_layout_small_and_xl_variants():
    keys = set(DiTMoE(get_preset("S/2-8E2A")).state_dict())
    for key in ["x_embedder.proj.weight", "pos_embed", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias",
                "y_embedder.embedding_table.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias",
                "blocks.0.moe.gate.weight", "blocks.0.moe.experts.7.down_proj.weight",
                "blocks.11.moe.shared_experts.gate_proj.weight", "blocks.0.adaLN_modulation.1.weight",
                "final_layer.adaLN_modulation.1.weight", "final_layer.linear.bias"]:
        assert key in keys, key
    assert not any(k.endswith("moe.gate.bias") or "experts.0.gate_proj.bias" in k for k in keys)
    xl = DiTMoE(QK_TINY).state_dict()
    for key in ["blocks.0.attn.Wqkv.weight", "blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.bias",
                "blocks.0.attn.out_proj.weight"]:
        assert key in xl
    s = get_preset("S/2-8E2A")
    sd = DiTMoE(s).state_dict()
    assert sd["y_embedder.embedding_table.weight"].shape == (1001, 384)
    assert sd["blocks.0.moe.experts.0.gate_proj.weight"].shape == (4 * 384, 384)
    assert sd["blocks.0.moe.shared_experts.up_proj.weight"].shape == (2 * 384, 384)
    assert sd["final_layer.linear.weight"].shape == (2 * 2 * 8, 384)  # p*p*2C with learn_sigma


@pytest.mark.parametrize("wrap", ["bare", "ema", "model", "module_prefix", "model_prefix"])
def test_pt_checkpoint_variants_reproduce_forward(tmp_path, wrap):
    model = make_tiny(QK_TINY)
    sd = model.state_dict()
    obj = {"bare": sd, "ema": {"ema": sd, "model": {k: torch.zeros_like(v) for k, v in sd.items()}, "opt": {}},
           "model": {"model": sd, "args": {"lr": 1e-4}},
           "module_prefix": {f"module.{k}": v for k, v in sd.items()},
           "model_prefix": {"ema": {f"model.{k}": v for k, v in sd.items()}}}[wrap]
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    loaded = load_checkpoint(path, QK_TINY)
    x, t, y = _inputs(QK_TINY)
    with torch.no_grad():
        assert torch.equal(model(x, t * 999, y), loaded(x, t * 999, y))


def test_safetensors_roundtrip_exact(tmp_path):
    model = make_tiny()
    save_safetensors(model, tmp_path / "m.safetensors")
    loaded = load_checkpoint(tmp_path / "m.safetensors", TINY)
    x, t, y = _inputs(TINY)
    with torch.no_grad():
        assert torch.equal(model(x, t, y), loaded(x, t, y))
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    sd = make_tiny().state_dict()
    sd.pop("blocks.1.moe.gate.weight")
    sd["blocks.0.mlp.fc1.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "bad.pt", TINY)
    msg = str(err.value)
    assert "missing keys (1): blocks.1.moe.gate.weight" in msg
    assert "unexpected keys (1): blocks.0.mlp.fc1.weight" in msg


def test_wrong_shapes_are_named(tmp_path):
    sd = make_tiny().state_dict()
    sd["blocks.0.moe.gate.weight"] = torch.zeros(5, 32)
    torch.save(sd, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"blocks.0.moe.gate.weight: checkpoint \(5, 32\) vs model \(4, 32\)"):
        load_checkpoint(tmp_path / "shape.pt", TINY)


class _Evil:
    pass


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"ema": make_tiny().state_dict(), "thing": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="unpickling of arbitrary Python objects"):
        read_state_dict(tmp_path / "evil.pt")


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="unknown model preset 'S/4'.*S/2-8E2A"):
        get_preset("S/4")


def test_bad_inputs_are_explained(tiny_model):
    x, t, y = _inputs(TINY)
    with pytest.raises(ValueError, match="expects \\[B, 1, 4, 4\\]"):
        tiny_model(torch.zeros(2, 3, 4, 4), t[:2], y[:2])
    with pytest.raises(ValueError, match="labels must lie in 0..2"):
        tiny_model(x, t, torch.tensor([0, 1, 7]))


def test_samplers_check_labels_once_per_run_before_any_forward(tiny_model):
    """A run's labels are read on the host once, before the first forward (so a forward on a GPU never
    waits for them), and the CPU router's transposed softmax is a softmax."""
    from moeca.diffusion.samplers import SamplerConfig, sample

    calls = []
    orig = tiny_model.check_labels
    tiny_model.check_labels = lambda y: (calls.append(y.device.type), orig(y))[1]
    try:
        with pytest.raises(ValueError, match="labels must lie in 0..2"):
            sample(tiny_model, SamplerConfig(kind="rectified_flow", num_steps=2), torch.tensor([0, 9]))
        assert calls == ["cpu"]
    finally:
        del tiny_model.check_labels
    h = torch.randn(50, TINY.hidden_size)
    gate = tiny_model.blocks[0].moe.gate
    p = gate.probabilities(h)
    torch.testing.assert_close(p, F.linear(h, gate.weight).softmax(-1), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(p.sum(-1), torch.ones(50), rtol=1e-6, atol=1e-6)


def _dense_moe_reference(block, h):
    """Every expert on every token, then select: the naive reference for grouped dispatch."""
    B, T, D = h.shape
    flat = h.reshape(-1, D)
    probs = F.linear(flat, block.moe.gate.weight).float().softmax(-1)
    w, idx = torch.topk(probs, block.moe.top_k, dim=-1)
    all_out = torch.stack([e(flat) for e in block.moe.experts], dim=1)  # [N, E, D]
    picked = torch.gather(all_out, 1, idx.unsqueeze(-1).expand(-1, -1, D))
    out = (picked * w.unsqueeze(-1)).sum(1) + block.moe.shared_experts(flat)
    return out.view(B, T, D)


def test_grouped_dispatch_equals_dense_reference(tiny_model):
    block = tiny_model.blocks[0]
    h = torch.randn(3, TINY.num_tokens, TINY.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        grouped = Runtime().moe(block, h)
        dense = _dense_moe_reference(block, h)
    torch.testing.assert_close(grouped, dense, rtol=1e-5, atol=1e-6)


class _CountingRuntime(Runtime):
    def __init__(self):
        self.rows = {}

    def expert(self, block, e, h_rows):
        self.rows[(block.index, e)] = self.rows.get((block.index, e), 0) + h_rows.shape[0]
        return super().expert(block, e, h_rows)


def test_each_expert_runs_only_on_its_routed_rows(tiny_model):
    x, t, y = _inputs(TINY, batch=4)
    rt = _CountingRuntime()
    with torch.no_grad(), tiny_model.use_runtime(rt):
        tiny_model(x, t, y)
    assert tiny_model.runtime is not rt  # restored
    n_rows = 4 * TINY.num_tokens
    for b in range(TINY.depth):
        assert sum(v for (blk, _), v in rt.rows.items() if blk == b) == n_rows * TINY.top_k


def test_gate_weights_are_raw_softmax_not_renormalised(tiny_model):
    h = torch.randn(10, TINY.hidden_size)
    idx, w = tiny_model.blocks[0].moe.gate(h)
    probs = F.linear(h, tiny_model.blocks[0].moe.gate.weight).softmax(-1)
    torch.testing.assert_close(w, torch.gather(probs, 1, idx))
    assert (w.sum(-1) < 1).all()


def test_all_presets_build_configs():
    for name, cfg in PRESETS.items():
        assert cfg.num_tokens == (cfg.input_size // cfg.patch_size) ** 2
    assert get_preset("demo").num_tokens >= 64
    assert get_preset("XL/2-8E2A").qk_norm and get_preset("XL/2-8E2A").objective == "rectified_flow"
