"""Routed-expert dispatch: one implementation for full compute, tracing and replay (DESIGN section 6a).

:func:`run_experts` runs each row through the expert assigned to it and returns the *unweighted*
outputs; :func:`run_routed` is the same for a router's ``[N, k]`` choices without copying each row
``k`` times. Both pick a path per device:

- ``"loop"`` (eager on the CPU, where it is fastest: a host-side count is free there and on 2 cores
  per-expert GEMMs beat ``grouped_mm``): rows sorted by expert, rows per expert counted on the host,
  one pair of GEMMs per expert with rows.
- ``"grouped"`` (CUDA, and whenever the forward is being compiled): rows sorted by expert *on the
  device*, end offsets by ``searchsorted``, so the dispatch never waits for the device (no
  ``.tolist()``, ``.item()``, ``bincount`` or ``nonzero``; static shapes; no padding) and traces as one
  graph. The GEMMs are two ``torch.nn.functional.grouped_mm`` with device-side offsets in bfloat16
  (``"auto"`` takes this path on CUDA where grouped_mm has its own kernels: bfloat16, compute
  capability 9.x/10.x; elsewhere torch's grouped_mm copies the offsets to the host, so ``"auto"`` takes
  ``"loop"``); other dtypes run the loop's GEMMs inside one opaque operator
  (:func:`swiglu_segments`), so a compiled CPU forward is one graph with the CPU's fastest GEMMs. The
  path can be forced on CPU tensors (``path="grouped"``) to test it.

Expert weights are stacked once per MoE layer into :class:`ExpertStack` (gate and up projections
fused ``[E, 2H, D]``, down projections ``[E, D, H]``) and the experts' parameters are made views of the
stack, so the stack costs no memory and an in-place update (``load_state_dict``, an optimizer step)
reaches it. Anything that gives a parameter new storage or replaces it (``model.to``,
``load_state_dict(assign=True)``, a new expert module) is noticed at the next eager dispatch and the
stack is rebuilt. With gradients enabled on trainable experts the dispatch calls the expert modules,
so autograd reaches the parameters. A caller's ``expert`` function (a runtime's overridden seam) is
called once per expert with rows, on either path.

Shapes: ``M`` rows, ``D`` hidden size, ``H`` expert hidden size, ``E`` experts, ``k`` slots per row.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

DispatchPath = Literal["auto", "loop", "grouped"]
PATHS: tuple[str, ...] = ("auto", "loop", "grouped")
ExpertFn = Callable[[int, torch.Tensor], torch.Tensor]
"""``expert(e, rows [n, D]) -> unweighted output [n, D]`` (a runtime's ``expert`` seam, bound to a block)."""


@dataclass(frozen=True)
class ExpertStack:
    """Routed SwiGLU weights of one MoE layer, stacked; the experts' parameters are views of these.

    gate_up ``[E, 2H, D]``: rows ``:H`` are ``gate_proj.weight``, rows ``H:`` ``up_proj.weight`` of each
    expert. down ``[E, D, H]``: ``down_proj.weight``. ``experts``, ``linears`` and ``addresses`` record which
    modules were linked with their weights at which address, to notice a replaced module or parameter and
    a parameter that got new storage.
    """

    gate_up: torch.Tensor
    down: torch.Tensor
    experts: tuple[nn.Module, ...]
    linears: tuple[nn.Linear, ...]
    addresses: tuple[int, ...]

    @property
    def hidden(self) -> int:
        return self.down.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes of the stacked weights (shared with the parameters, not added to them)."""
        return (self.gate_up.numel() + self.down.numel()) * self.gate_up.element_size()

    def linked(self, moe: nn.Module) -> bool:
        """True while ``moe`` holds the same experts and every weight still lives at its place in the stack."""
        return (len(moe.experts) == len(self.experts) and all(a is b for a, b in zip(moe.experts, self.experts))
                and all(lin.weight.data_ptr() == a for lin, a in zip(self.linears, self.addresses)))


SWIGLU_NAMES: tuple[tuple[str, str, str], ...] = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
"""Module names of a SwiGLU expert's ``(gate, up, down)`` projections: DiT-MoE's, then HiDream-I1's
(``w2(silu(w1(h)) * w3(h))``), so both families share the stacked dispatch."""


def _swiglu_linears(expert: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear] | None:
    """``(gate, up, down)`` of a bias-free SwiGLU expert under one of :data:`SWIGLU_NAMES`, else None."""
    for names in SWIGLU_NAMES:
        lins = tuple(getattr(expert, name, None) for name in names)
        if all(isinstance(lin, nn.Linear) and lin.bias is None for lin in lins):
            return lins
    return None


def _swiglu_projections(moe: nn.Module) -> list[tuple[nn.Linear, nn.Linear, nn.Linear]] | None:
    """``(gate_proj, up_proj, down_proj)`` per expert when every expert is a bias-free SwiGLU of one
    shape and dtype on one device, else None (other expert types run through their modules)."""
    projections = []
    for ex in moe.experts:
        lins = _swiglu_linears(ex)
        if lins is None:
            return None
        projections.append(lins)
    first = projections[0][0].weight
    if any(lin.weight.shape != ref.weight.shape or lin.weight.dtype != first.dtype or lin.weight.device != first.device
           for lins in projections for lin, ref in zip(lins, projections[0])):
        return None
    return projections


def stack_experts(moe: nn.Module) -> ExpertStack | None:
    """Stack the routed experts of ``moe`` (a module with ``experts``) and make their weights views of
    the stack; stored as ``moe.expert_stack``. None (and nothing changed) for other expert types."""
    projections = _swiglu_projections(moe)
    if projections is None:
        moe.expert_stack = None
        return None
    H, D = projections[0][0].weight.shape
    E = len(projections)
    ref = projections[0][0].weight
    # inference_mode(False): a stack built inside inference mode would turn the weights into inference tensors
    with torch.inference_mode(False), torch.no_grad():
        gate_up = torch.empty(E, 2 * H, D, dtype=ref.dtype, device=ref.device)
        down = torch.empty(E, D, H, dtype=ref.dtype, device=ref.device)
        linears, views = [], []
        for e, (gate, up, dn) in enumerate(projections):
            for lin, view in ((gate, gate_up[e, :H]), (up, gate_up[e, H:]), (dn, down[e])):
                view.copy_(lin.weight)
                linears.append(lin)
                views.append(view)
        for lin, view in zip(linears, views):
            lin.weight.data = view          # the parameter object stays; its storage is now the stack's
    stack = ExpertStack(gate_up, down, tuple(moe.experts), tuple(linears),
                        tuple(lin.weight.data_ptr() for lin in linears))
    moe.expert_stack = stack
    return stack


def unstack_experts(moe: nn.Module) -> None:
    """Undo :func:`stack_experts`: every linked weight gets its own storage again (same values) and the
    stack is dropped, so the experts' parameters no longer share memory (a foreign model handed back)."""
    stack = getattr(moe, "expert_stack", None)
    if stack is not None and stack.linked(moe):
        with torch.inference_mode(False), torch.no_grad():
            for lin in stack.linears:
                lin.weight.data = lin.weight.data.clone()
    moe.expert_stack = None


def expert_stack(moe: nn.Module) -> ExpertStack | None:
    """The layer's :class:`ExpertStack`, rebuilt when a parameter got new storage. While compiling,
    the stack prepared before (:func:`prepare_model`) is used as it is."""
    stack = getattr(moe, "expert_stack", None)
    if torch.compiler.is_compiling():
        return stack
    if stack is None or not stack.linked(moe):
        stack = stack_experts(moe)
    return stack


def prepare_model(model: nn.Module) -> int:
    """Stack the experts of every MoE layer of ``model`` now (before compiling or timing); returns the
    bytes of stacked weights, all shared with the parameters."""
    total = 0
    for module in model.modules():
        if isinstance(getattr(module, "experts", None), nn.ModuleList):
            stack = expert_stack(module)
            total += stack.nbytes if stack is not None else 0
    return total


@functools.lru_cache(maxsize=None)
def _grouped_mm_native(device_type: str, index: int | None, dtype: torch.dtype) -> bool:
    """Whether ``grouped_mm`` runs its own kernels (no host copy of the offsets) for this device/dtype."""
    if device_type != "cuda" or dtype != torch.bfloat16:
        return False
    return torch.cuda.get_device_capability(index)[0] in (9, 10)


def resolve_path(path: str, rows: torch.Tensor) -> str:
    """``"auto"`` -> ``"grouped"`` while compiling or where grouped_mm is native for ``rows``' device and
    dtype, else ``"loop"``."""
    if path not in PATHS:
        raise ValueError(f"dispatch path {path!r} is not one of {', '.join(PATHS)}; use 'auto' unless testing")
    if path != "auto":
        return path
    if torch.compiler.is_compiling():
        return "grouped"          # sync-free: one graph for the whole forward
    return "grouped" if _grouped_mm_native(rows.device.type, rows.device.index, rows.dtype) else "loop"


def run_experts(block: nn.Module, rows: torch.Tensor, expert_of_row: torch.Tensor, *,
                path: DispatchPath = "auto", expert: ExpertFn | None = None) -> torch.Tensor:
    """Unweighted output of expert ``expert_of_row[i]`` on ``rows[i]``: ``[M, D]``, ``[M]`` int64 -> ``[M, D]``.

    ``block`` is a DiT-MoE block (its ``moe``) or the MoE layer itself. ``expert``, when given, computes
    one expert's rows (a runtime's overridden seam) and forces the per-expert loop.
    """
    if rows.dim() != 2 or expert_of_row.dim() != 1 or expert_of_row.shape[0] != rows.shape[0]:
        raise ValueError(f"run_experts: rows must be [M, D] and expert_of_row [M]; got rows {tuple(rows.shape)}, "
                         f"expert_of_row {tuple(expert_of_row.shape)}")
    return _dispatch(getattr(block, "moe", block), rows, expert_of_row, 1, path, expert)


def run_routed(block: nn.Module, flat: torch.Tensor, topk_idx: torch.Tensor, *,
               path: DispatchPath = "auto", expert: ExpertFn | None = None) -> torch.Tensor:
    """Unweighted outputs per (row, slot) of a router's choices: ``flat [N, D]``, ``topk_idx [N, k]``
    -> ``[N, k, D]``; the same as :func:`run_experts` on ``flat`` repeated ``k`` times, without the copy."""
    if flat.dim() != 2 or topk_idx.dim() != 2 or topk_idx.shape[0] != flat.shape[0]:
        raise ValueError(f"run_routed: flat must be [N, D] and topk_idx [N, k]; got flat {tuple(flat.shape)}, "
                         f"topk_idx {tuple(topk_idx.shape)}")
    N, k = topk_idx.shape
    out = _dispatch(getattr(block, "moe", block), flat, topk_idx.reshape(-1), k, path, expert)
    return out.view(N, k, flat.shape[1])


def _dispatch(moe: nn.Module, src: torch.Tensor, ids: torch.Tensor, k: int, path: str,
              expert: ExpertFn | None) -> torch.Tensor:
    """Output row ``i`` = expert ``ids[i]`` on ``src[i // k]``: ``src [M / k, D]``, ``ids [M]`` -> ``[M, D]``."""
    M, D = ids.shape[0], src.shape[1]
    if M == 0:
        return src.new_empty(0, D)
    path = resolve_path(path, src)
    if ids.dtype != torch.int64:
        ids = ids.long()
    # autograd through the experts: trainable experts, or inputs that need gradients (L2C's frozen model)
    training = torch.is_grad_enabled() and (src.requires_grad or any(p.requires_grad for p in moe.experts[0].parameters()))
    stack = None if expert is not None or training else expert_stack(moe)
    if path == "grouped" and stack is not None:
        return _grouped(stack, src, ids, k)
    if expert is None and stack is None:
        experts = moe.experts
        expert = lambda e, x: experts[e](x)  # noqa: E731  (autograd-visible module calls)
    return _loop(stack, src, ids, k, moe.num_experts, expert)


def _sorted_rows(src: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sorted expert ids [M], order [M], rows sorted by expert [M, D])``; stable, so each expert's rows
    keep their order (and their bits, whichever subset of rows a caller passes)."""
    sorted_ids, order = torch.sort(ids, stable=True)
    return sorted_ids, order, src.index_select(0, order // k if k > 1 else order)


def _loop(stack: ExpertStack | None, src: torch.Tensor, ids: torch.Tensor, k: int, num_experts: int,
          expert: ExpertFn | None) -> torch.Tensor:
    """Per-expert GEMMs over contiguous slices of the sorted rows (one host sync for the counts)."""
    _, order, xs = _sorted_rows(src, ids, k)
    counts = torch.bincount(ids, minlength=num_experts).tolist()
    if len(counts) > num_experts:
        raise ValueError(f"expert_of_row holds expert id {len(counts) - 1}, but the layer has {num_experts} experts "
                         f"(ids 0..{num_experts - 1})")
    ys = xs.new_empty(xs.shape)                     # experts map D -> D
    start = 0
    for e, n in enumerate(counts):
        if n:
            seg = xs[start:start + n]
            if expert is not None:
                ys[start:start + n] = expert(e, seg)
            else:
                _swiglu(stack, e, seg, out=ys[start:start + n])
        start += n
    return ys.new_empty(ys.shape).index_copy_(0, order, ys)


def _swiglu(stack: ExpertStack, e: int, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Expert ``e`` of the stack on rows ``x [n, D]`` -> ``[n, D]`` (into ``out`` when given)."""
    H = stack.hidden
    w = stack.gate_up[e]
    act = F.silu(F.linear(x, w[:H])).mul_(F.linear(x, w[H:]))
    if out is None:
        return F.linear(act, stack.down[e])
    return torch.mm(act, stack.down[e].t(), out=out)


def expert_forward(block: nn.Module, e: int, rows: torch.Tensor) -> torch.Tensor:
    """One routed expert on ``rows [n, D]`` -> unweighted ``[n, D]``: the same GEMMs as :func:`run_experts`'s
    loop (stacked weights), or the module when gradients are needed or the experts are not SwiGLU."""
    moe = getattr(block, "moe", block)
    training = torch.is_grad_enabled() and (rows.requires_grad or any(p.requires_grad for p in moe.experts[e].parameters()))
    stack = None if training else expert_stack(moe)
    return moe.experts[e](rows) if stack is None else _swiglu(stack, e, rows)


def grouped_swiglu(stack: ExpertStack, xs: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Expert ``g`` on rows ``offs[g-1]:offs[g]`` of expert-sorted rows ``xs [M, D]`` -> ``[M, D]``; ``offs [E]``
    int32 cumulative group ends on the device (rows past ``offs[-1]`` are not computed). bfloat16 runs two
    ``grouped_mm`` (what the compiler knows); other dtypes :func:`swiglu_segments` (one opaque operator)."""
    if xs.dtype != torch.bfloat16:
        return swiglu_segments(xs, stack.gate_up, stack.down, offs)
    H = stack.hidden
    gu = F.grouped_mm(xs, stack.gate_up.transpose(1, 2), offs=offs)                          # [M, 2H]
    return F.grouped_mm(F.silu(gu[:, :H]) * gu[:, H:], stack.down.transpose(1, 2), offs=offs)  # [M, D]


def _grouped(stack: ExpertStack, src: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Device-side dispatch: sort on the device, end offsets by ``searchsorted``, then
    :func:`grouped_swiglu`. Expert ids must lie in ``0..E-1``: checking would need a host sync (the loop
    path checks)."""
    E = stack.gate_up.shape[0]
    sorted_ids, order, xs = _sorted_rows(src, ids, k)
    experts = torch.arange(E, device=ids.device, dtype=ids.dtype)
    offs = torch.searchsorted(sorted_ids, experts, right=True).to(torch.int32)     # [E] end of each group
    ys = grouped_swiglu(stack, xs, offs)
    return ys.new_empty(ys.shape).index_copy_(0, order, ys)


@torch.library.custom_op("moeca::swiglu_segments", mutates_args=())
def swiglu_segments(xs: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows ``xs [M, D]`` sorted by expert, group ``e`` ending at ``offs[e]``, through the stacked SwiGLU
    experts ``gate_up [E, 2H, D]``, ``down [E, D, H]`` -> ``[M, D]``: the loop path's GEMMs as one operator
    the compiler treats as opaque (``grouped_mm``'s compiled form takes only bfloat16). It reads
    ``offs`` on the host: free on the CPU, a sync on CUDA, where ``"auto"`` never takes it."""
    ys = torch.empty_like(xs)
    H = down.shape[2]
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            x, w = xs[start:end], gate_up[e]
            torch.mm(F.silu(F.linear(x, w[:H])).mul_(F.linear(x, w[H:])), down[e].t(), out=ys[start:end])
        start = end
    return ys


@swiglu_segments.register_fake
def _swiglu_segments_shape(xs: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                           offs: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(xs)
