"""models/dispatch.py: one routed-expert dispatch, its two paths, and the stacked weights kept in sync."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from moeca.models.dispatch import expert_forward, prepare_model, run_experts, run_routed, stack_experts
from moeca.models.runtime import Runtime

from conftest import TINY, make_tiny


def _reference(moe, rows, ids):
    """Each row through its expert module, one row group at a time (the definition)."""
    out = torch.zeros_like(rows)
    for e in range(moe.num_experts):
        sel = (ids == e).nonzero().flatten()
        if sel.numel():
            out[sel] = moe.experts[e](rows[sel])
    return out


def _rows(n=37, seed=0, num_experts=TINY.num_experts, skip=2):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, TINY.hidden_size, generator=g)
    ids = torch.randint(0, num_experts, (n,), generator=g)
    ids[ids == skip] = 0            # one expert without rows
    return rows, ids


@pytest.mark.parametrize("path", ["auto", "loop", "grouped"])
def test_run_experts_equals_each_row_through_its_expert(tiny_model, path):
    moe = tiny_model.blocks[1].moe
    rows, ids = _rows()
    with torch.no_grad():
        got = run_experts(tiny_model.blocks[1], rows, ids, path=path)
        ref = _reference(moe, rows, ids)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_grouped_path_gives_the_loop_paths_numbers(tiny_model):
    """float32: the same GEMMs behind device-side offsets (bit for bit); bfloat16: grouped_mm itself."""
    flat = torch.randn(48, TINY.hidden_size, generator=torch.Generator().manual_seed(1))
    idx, _ = tiny_model.blocks[0].moe.gate(flat)
    with torch.no_grad():
        loop = run_routed(tiny_model.blocks[0], flat, idx, path="loop")
        grouped = run_routed(tiny_model.blocks[0], flat, idx, path="grouped")
        assert torch.equal(grouped, loop)
        bf = make_tiny().to(torch.bfloat16)
        loop = run_routed(bf.blocks[0], flat.bfloat16(), idx, path="loop")
        grouped = run_routed(bf.blocks[0], flat.bfloat16(), idx, path="grouped")
    torch.testing.assert_close(grouped.float(), loop.float(), rtol=2e-2, atol=2e-2)
    assert (grouped.float() - loop.float()).abs().mean() < 2e-3


def test_run_routed_is_run_experts_on_repeated_rows_bit_for_bit(tiny_model):
    block = tiny_model.blocks[0]
    flat = torch.randn(40, TINY.hidden_size, generator=torch.Generator().manual_seed(2))
    idx, _ = block.moe.gate(flat)
    with torch.no_grad():
        routed = run_routed(block, flat, idx)
        repeated = run_experts(block, flat.repeat_interleave(idx.shape[1], 0), idx.reshape(-1))
    assert routed.shape == (40, idx.shape[1], TINY.hidden_size)
    assert torch.equal(routed.reshape(-1, TINY.hidden_size), repeated)


def test_grouped_model_forward_matches_the_default_runtime(tiny_model):
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    t, y = torch.rand(3), torch.tensor([0, 1, 2])
    with torch.no_grad():
        ref = tiny_model(x, t, y)
        with tiny_model.use_runtime(Runtime(dispatch="grouped")):
            got = tiny_model(x, t, y)
    assert torch.equal(got, ref)


def test_grouped_path_traces_without_graph_breaks_in_float32_and_bfloat16(tiny_model):
    """A host sync (``.tolist()``, ``.item()``, ``nonzero``) would be a graph break: fullgraph=True fails on it."""
    block = tiny_model.blocks[0]
    flat = torch.randn(32, TINY.hidden_size, generator=torch.Generator().manual_seed(5))
    idx, _ = block.moe.gate(flat)
    for dtype in (torch.float32, torch.bfloat16):
        model = make_tiny().to(dtype)
        prepare_model(model)
        fn = torch.compile(lambda f, i: run_routed(model.blocks[0], f, i, path="grouped"), fullgraph=True,
                           backend="eager")
        with torch.no_grad():
            torch._dynamo.reset()
            got = fn(flat.to(dtype), idx)
            ref = run_routed(model.blocks[0], flat.to(dtype), idx, path="loop")
        torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6,
                                   atol=1e-2 if dtype == torch.bfloat16 else 1e-7)


def test_stack_shares_the_parameters_memory(tiny_model):
    moe = tiny_model.blocks[0].moe
    params_before = {id(p) for p in tiny_model.parameters()}
    stack = stack_experts(moe)
    assert {id(p) for p in tiny_model.parameters()} == params_before          # same parameter objects
    storage = stack.gate_up.untyped_storage().data_ptr()
    for ex in moe.experts:
        assert ex.gate_proj.weight.untyped_storage().data_ptr() == storage
        assert ex.up_proj.weight.untyped_storage().data_ptr() == storage
        assert ex.down_proj.weight.untyped_storage().data_ptr() == stack.down.untyped_storage().data_ptr()
        assert ex.gate_proj.weight.is_contiguous() and ex.down_proj.weight.is_contiguous()
    n_expert_bytes = sum(p.numel() * p.element_size() for p in moe.experts.parameters())
    assert stack.nbytes == n_expert_bytes
    assert prepare_model(tiny_model) == TINY.depth * n_expert_bytes
    assert set(tiny_model.state_dict()) == set(make_tiny().state_dict())   # the stack is not in the state dict


def _check_against_modules(model, seed):
    block = model.blocks[0]
    rows, ids = _rows(seed=seed)
    rows = rows.to(next(model.parameters()).dtype)
    with torch.no_grad():
        torch.testing.assert_close(run_experts(block, rows, ids), _reference(block.moe, rows, ids),
                                   rtol=1e-5, atol=1e-6)


def test_in_place_load_state_dict_reaches_the_stack(tiny_model):
    _check_against_modules(tiny_model, 0)                  # builds the stack
    other = make_tiny(seed=7)
    tiny_model.load_state_dict(other.state_dict())        # copies in place
    assert tiny_model.blocks[0].moe.expert_stack.linked(tiny_model.blocks[0].moe)
    _check_against_modules(tiny_model, 1)
    rows, ids = _rows(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(run_experts(tiny_model.blocks[0], rows, ids),
                                   _reference(other.blocks[0].moe, rows, ids), rtol=1e-5, atol=1e-6)


def test_optimizer_step_reaches_the_stack_and_gradients_reach_the_experts(tiny_model):
    _check_against_modules(tiny_model, 0)
    rows, ids = _rows(seed=3)
    out = run_experts(tiny_model.blocks[0], rows, ids)     # grad enabled: through the modules
    out.square().sum().backward()
    grads = [p.grad for p in tiny_model.blocks[0].moe.experts.parameters()]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) >= 3 * (TINY.num_experts - 1)
    torch.optim.SGD(tiny_model.parameters(), lr=0.1).step()
    _check_against_modules(tiny_model, 2)


def test_new_storage_is_noticed_and_restacked(tiny_model):
    _check_against_modules(tiny_model, 0)
    old = tiny_model.blocks[0].moe.expert_stack
    tiny_model.to(torch.float64)
    moe = tiny_model.blocks[0].moe
    assert not old.linked(moe)
    _check_against_modules(tiny_model, 1)
    new = moe.expert_stack
    assert new is not old and new.gate_up.dtype == torch.float64 and new.linked(moe)
    tiny_model.float()
    _check_against_modules(tiny_model, 2)
    replacement = {k: v.clone() for k, v in make_tiny(seed=3).state_dict().items()}
    tiny_model.load_state_dict(replacement, assign=True)          # new parameter objects, same dtype
    assert not moe.expert_stack.linked(moe)
    _check_against_modules(tiny_model, 3)
    moe.experts[1] = make_tiny(seed=4).blocks[0].moe.experts[1]   # a replaced expert module
    _check_against_modules(tiny_model, 4)


def test_gradients_match_the_module_reference(tiny_model):
    rows, ids = _rows(seed=6)
    grads = []
    for fn in (lambda r: run_experts(tiny_model.blocks[1], r, ids), lambda r: _reference(tiny_model.blocks[1].moe, r, ids)):
        tiny_model.zero_grad()
        r = rows.clone().requires_grad_(True)
        fn(r).sin().sum().backward()
        grads.append((r.grad, [p.grad for p in tiny_model.blocks[1].moe.experts.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    assert sum(g is not None for g in grads[0][1]) == 3 * (TINY.num_experts - 1)    # expert 2 has no rows
    for a, b in zip(grads[0][1], grads[1][1]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_inference_mode_stack_leaves_normal_parameters(tiny_model):
    rows, ids = _rows()
    with torch.inference_mode():
        run_experts(tiny_model.blocks[0], rows, ids)
    assert not any(p.is_inference() for p in tiny_model.parameters())
    run_experts(tiny_model.blocks[0], rows, ids).sum().backward()     # still trainable


def test_overridden_expert_seam_sees_every_row_on_both_paths(tiny_model):
    seen = []
    rows, ids = _rows()
    for path in ("loop", "grouped"):
        seen.clear()
        with torch.no_grad():
            run_experts(tiny_model.blocks[0], rows, ids, path=path,
                        expert=lambda e, x: seen.append((e, x.shape[0])) or expert_forward(tiny_model.blocks[0], e, x))
        assert sum(n for _, n in seen) == rows.shape[0]
        assert {e for e, _ in seen} == set(ids.tolist())


def test_experts_that_are_not_swiglu_run_through_their_modules():
    class Moe(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_experts = 3
            self.experts = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))

    moe = Moe()
    rows, ids = torch.randn(10, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1, 1])
    with torch.no_grad():
        for path in ("auto", "grouped"):
            torch.testing.assert_close(run_experts(moe, rows, ids, path=path), _reference(moe, rows, ids))
    assert moe.expert_stack is None


def test_empty_input_and_bad_input_errors(tiny_model):
    block = tiny_model.blocks[0]
    empty = run_experts(block, torch.empty(0, TINY.hidden_size), torch.empty(0, dtype=torch.long))
    assert empty.shape == (0, TINY.hidden_size)
    with pytest.raises(ValueError, match=r"expert_of_row \[M\]"):
        run_experts(block, torch.randn(4, TINY.hidden_size), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="layer has 4 experts"):
        with torch.no_grad():
            run_experts(block, torch.randn(2, TINY.hidden_size), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="not one of auto, loop, grouped"):
        run_experts(block, torch.randn(2, TINY.hidden_size), torch.tensor([0, 1]), path="fast")
    with pytest.raises(ValueError, match=r"Runtime\(dispatch='fast'\)"):
        Runtime(dispatch="fast")
