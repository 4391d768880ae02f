"""The conjugate operators of Megatron-LM (arXiv 1909.08053, section 3): f, g and their sequence-parallel kin.

Shoeybi et al. split an MLP as Y = GeLU(X A) with A = [A_1, ..., A_T] split by columns, then
Z = Y B with B split by rows, and write two operators around it (their figure 3):

    f: identity forward, all-reduce backward    (the input X is needed whole by every rank)
    g: all-reduce forward, identity backward    (each rank holds a partial sum Y_i B_i of Z)

    X --f--> [X A_i -> GeLU -> (.) B_i] on rank i --g--> Z

Each operator below is a pair of collectives (forward, backward), each the other's transpose.
Sequence parallelism (Korthikanti et al., arXiv 2205.05198) swaps f and g for an all-gather and
a reduce-scatter along the sequence, so the norms and dropouts between them see 1/T of it.

One operator code, two executors. Over a `DistGroup` each rank runs its own autograd node that
calls torch.distributed. In one process (`LocalGroup`), autograd runs every rank's backward on
one thread, so a rank's node could not wait for the others there; the T ranks' tensors instead
meet once, in the forward, and become one node with T inputs and T outputs whose backward runs
the backward collective across the shards.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import torch
from torch import Tensor

from mplib.tensor_parallel.group import Collective, Group, _nbytes
from mplib.tensor_parallel.local import LocalGroup, _LocalRank, across

_COMM = ("all_reduce", "all_gather", "reduce_scatter")


def copy_to_tp(x: Tensor, group: Group, label: str = "") -> Tensor:
    """Megatron's f (`_CopyToModelParallelRegion`): identity forward, all-reduce of the gradient backward."""
    return _conjugate(x, group, "identity", "all_reduce", -1, label)


def reduce_from_tp(x: Tensor, group: Group, label: str = "") -> Tensor:
    """Megatron's g (`_ReduceFromModelParallelRegion`): all-reduce forward, identity backward."""
    return _conjugate(x, group, "all_reduce", "identity", -1, label)


def gather_from_tp(x: Tensor, group: Group, dim: int = -1, label: str = "") -> Tensor:
    """All-gather the ranks' slices along `dim` (e.g. logits over the vocabulary); backward keeps this rank's slice."""
    return _conjugate(x, group, "all_gather", "split", dim, label)


def scatter_to_tp(x: Tensor, group: Group, dim: int = -1, label: str = "") -> Tensor:
    """Keep this rank's slice of a replicated `x` along `dim`; backward all-gathers the gradient."""
    return _conjugate(x, group, "split", "all_gather", dim, label)


def scatter_to_sp(x: Tensor, group: Group, dim: int = 1, label: str = "") -> Tensor:
    """Enter sequence parallelism: keep this rank's 1/T of the sequence; backward all-gathers it."""
    return _conjugate(x, group, "split", "all_gather", dim, label)


def gather_from_sp(x: Tensor, group: Group, dim: int = 1, label: str = "", to_tp: bool = True) -> Tensor:
    """All-gather the sequence. Into a tensor-parallel region (`to_tp`, replacing f) the gradient that
    comes back is a partial sum per rank, so backward reduce-scatters it; out of sequence
    parallelism into replicated code (`to_tp=False`) every rank has the whole gradient: split it."""
    return _conjugate(x, group, "all_gather", "reduce_scatter" if to_tp else "split", dim, label)


def reduce_scatter_to_sp(x: Tensor, group: Group, dim: int = 1, label: str = "") -> Tensor:
    """Megatron's g under sequence parallelism: reduce-scatter the partial sums along the sequence;
    backward all-gathers the gradient."""
    return _conjugate(x, group, "reduce_scatter", "all_gather", dim, label)


def _conjugate(x: Tensor, group: Group, fwd: str, bwd: str, dim: int, label: str) -> Tensor:
    if isinstance(group, _LocalRank):
        def joint(xs: list[Tensor], arrivals: list[float]) -> list[Tensor]:
            return list(_Joint.apply(group.world, fwd, bwd, dim, label, arrivals, *xs))
        return group.exchange((f"{fwd}/{bwd}", tuple(x.shape), str(x.dtype)), x, joint)
    return _OnRank.apply(x, group, fwd, bwd, dim, label)


def _on_rank(kind: str, group: Group, x: Tensor, dim: int, phase: str, label: str) -> Tensor:
    if kind == "identity":
        return x
    if kind == "split":
        return x.chunk(group.size, dim)[group.rank].contiguous()
    if kind == "all_reduce":
        return group.all_reduce(x, phase=phase, label=label)
    if kind == "all_gather":
        return group.all_gather(x, dim, phase=phase, label=label)
    return group.reduce_scatter(x, dim, phase=phase, label=label)


class _OnRank(torch.autograd.Function):
    """One rank's half of an operator over torch.distributed: `fwd` in forward, `bwd` in backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Group, fwd: str, bwd: str, dim: int, label: str) -> Tensor:
        ctx.group, ctx.bwd, ctx.dim, ctx.label = group, bwd, dim, label
        return _on_rank(fwd, group, x, dim, "forward", label)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        return _on_rank(ctx.bwd, ctx.group, grad, ctx.dim, "backward", ctx.label), None, None, None, None, None


def _report(world: LocalGroup, kind: str, xs: list[Tensor], dim: int, phase: str, label: str,
            spans: list[tuple[int, float, float]]) -> None:
    c = Collective(kind, _nbytes(kind, xs[0], world.size), world.size, world.name, phase, label)
    for listener in list(world.listeners):
        listener.on_collective(c, spans)


class _Joint(torch.autograd.Function):
    """All T ranks' halves of an operator as one node (in one process): T tensors in, T out."""

    @staticmethod
    def forward(ctx: Any, world: LocalGroup, fwd: str, bwd: str, dim: int, label: str, arrivals: list[float],
                *xs: Tensor) -> tuple[Tensor, ...]:
        ctx.world, ctx.bwd, ctx.dim, ctx.label = world, bwd, dim, label
        out = across(fwd, list(xs), dim)
        if fwd in _COMM:
            end = time.perf_counter()
            _report(world, fwd, list(xs), dim, "forward", label, [(r, t, end) for r, t in enumerate(arrivals)])
        return tuple(out)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple:
        start = time.perf_counter()
        out = across(ctx.bwd, list(grads), ctx.dim)
        if ctx.bwd in _COMM:
            end = time.perf_counter()
            _report(ctx.world, ctx.bwd, list(grads), ctx.dim, "backward", ctx.label,
                    [(r, start, end) for r in range(ctx.world.size)])
        return (None, None, None, None, None, None, *out)


def map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """`fn` on every tensor in tuples, lists, dicts (HF ModelOutputs too); anything else passes as it is."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        items = {k: map_tensors(v, fn) for k, v in obj.items()}
        return type(obj)(**items) if dataclasses.is_dataclass(obj) else type(obj)(items)  # a ModelOutput
    if isinstance(obj, tuple):
        items = [map_tensors(v, fn) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, list):
        return [map_tensors(v, fn) for v in obj]
    return obj


def enter(world: LocalGroup, obj: Any) -> list[Any]:
    """`obj` (nested args) once per rank on its device; a tensor that needs a gradient gets rank 0's
    back (every rank computes the same one), as each process of a job would for its own copy."""
    copies: dict[int, list[Tensor]] = {}

    def spread(t: Tensor) -> Tensor:
        if t.requires_grad and torch.is_grad_enabled():
            copies[id(t)] = list(_Enter.apply(world, t))
        else:
            copies[id(t)] = [t.to(d) for d in world.devices]
        return t

    map_tensors(obj, spread)
    return [map_tensors(obj, lambda t, r=r: copies[id(t)][r]) for r in range(world.size)]


def leave(world: LocalGroup, results: list[Any]) -> Any:
    """Rank 0's result, whose backward hands the gradient to every rank's (identical) result."""
    leaves: list[list[Tensor]] = [[] for _ in results]
    for r, res in enumerate(results):
        map_tensors(res, lambda t, r=r: leaves[r].append(t) or t)
    if not leaves[0]:
        return results[0]
    if any(len(lv) != len(leaves[0]) for lv in leaves):
        raise RuntimeError("the ranks returned results of different structure; a replicated result must be the "
                           "same on every rank (use group.run(..., replicated=False) for per-rank results)")
    out = iter(_Leave.apply(world, len(leaves[0]), *[t for lv in leaves for t in lv]))
    return map_tensors(results[0], lambda t: next(out))


class _Enter(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, world: LocalGroup, x: Tensor) -> tuple[Tensor, ...]:
        ctx.device = x.device
        return tuple(x.to(d, copy=True) for d in world.devices)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple:
        return None, grads[0].to(ctx.device)


class _Leave(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, world: LocalGroup, n: int, *xs: Tensor) -> tuple[Tensor, ...]:
        ctx.world, ctx.n, ctx.devices = world, n, [x.device for x in xs]
        ctx.differentiable = [x.is_floating_point() or x.is_complex() for x in xs]
        first = tuple(x.view_as(x) for x in xs[:n])
        ctx.mark_non_differentiable(*[t for t in first if not (t.is_floating_point() or t.is_complex())])
        return first

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple:
        for listener in list(ctx.world.listeners):  # backward starts here on every rank
            listener.begin(range(ctx.world.size), "backward")
        T = ctx.world.size
        return (None, None, *[grads[i % ctx.n].to(ctx.devices[i]) if ctx.differentiable[i] else None
                              for i in range(ctx.n * T)])
