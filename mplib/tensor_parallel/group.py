"""Who talks to whom: one rank's view of a tensor-parallel group, and the record of one collective.

Every group offers the same three collectives (all-reduce, all-gather, reduce-scatter) on one
rank's tensor. `DistGroup` calls torch.distributed's own on a process group (gloo on CPU, NCCL
on GPUs); `mplib.tensor_parallel.local.LocalGroup` runs T ranks as threads of this process.
Every collective is reported to the group's listeners (`mplib.tensor_parallel.trace`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

KINDS = ("all_reduce", "all_gather", "reduce_scatter")
Device = torch.device | str


@dataclass(frozen=True)
class Collective:
    """One collective call: `nbytes` is the whole tensor one rank holds (all-reduce), ends with
    (all-gather) or starts from (reduce-scatter); `wire_bytes` is what a ring sends per rank."""

    kind: str  # one of KINDS
    nbytes: int
    ranks: int
    group: str
    phase: str = "forward"  # or "backward"
    label: str = ""  # the module that called it, e.g. "h.0.attn"
    op: str = "sum"

    @property
    def wire_bytes(self) -> int:
        share = (self.ranks - 1) * self.nbytes // self.ranks  # a ring moves (T-1)/T of the tensor per pass
        return 2 * share if self.kind == "all_reduce" else share  # all-reduce = reduce-scatter + all-gather


class Group:
    """One rank's view of a tensor-parallel group: `rank`, `size`, `device`, and the collectives."""

    rank: int
    size: int
    device: torch.device
    name: str
    listeners: list  # shared by every rank of the group

    def all_reduce(self, x: Tensor, op: str = "sum", phase: str = "forward", label: str = "") -> Tensor:
        raise NotImplementedError

    def all_gather(self, x: Tensor, dim: int, phase: str = "forward", label: str = "") -> Tensor:
        raise NotImplementedError

    def reduce_scatter(self, x: Tensor, dim: int, phase: str = "forward", label: str = "") -> Tensor:
        raise NotImplementedError

    def _report(self, c: Collective, spans: list[tuple[int, float, float]]) -> None:
        for listener in list(self.listeners):
            listener.on_collective(c, spans)


def _nbytes(kind: str, x: Tensor, size: int) -> int:
    n = x.numel() * x.element_size()
    return n * size if kind == "all_gather" else n  # all-gather: the gathered tensor


class DistGroup(Group):
    """This process's rank of a torch.distributed process group; the collectives are torch's own.

    Example (several processes):
        dist.init_process_group("gloo")                 # in each process torchrun or mplib.distributed.launch starts
        group = DistGroup()                             # the default (world) group
        model = mplib.tensor_parallel.parallelize(model, group)
    """

    def __init__(self, process_group: Any = None, device: Device | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("DistGroup needs an initialised torch.distributed process group: call "
                             "torch.distributed.init_process_group(...) first, or run under mplib.distributed.launch")
        self.pg = process_group
        self.rank, self.size = dist.get_rank(process_group), dist.get_world_size(process_group)
        backend = dist.get_backend(process_group)
        default = "cpu" if backend == "gloo" else f"cuda:{torch.cuda.current_device()}"
        self.device = torch.device(device if device is not None else default)
        ranks = dist.get_process_group_ranks(process_group) if process_group is not None else list(range(self.size))
        self.name, self.listeners = f"{backend}{ranks}", []

    def __repr__(self) -> str:
        return f"DistGroup(rank {self.rank} of {self.name})"

    def _timed(self, kind: str, x: Tensor, op: str, phase: str, label: str, call: Callable[[], Tensor]) -> Tensor:
        start = time.perf_counter()
        out = call()
        if self.listeners:
            self._report(Collective(kind, _nbytes(kind, x, self.size), self.size, self.name, phase, label, op),
                         [(self.rank, start, time.perf_counter())])
        return out

    def all_reduce(self, x: Tensor, op: str = "sum", phase: str = "forward", label: str = "") -> Tensor:
        def call() -> Tensor:
            y = x.contiguous().clone()
            dist.all_reduce(y, dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=self.pg)
            return y
        return self._timed("all_reduce", x, op, phase, label, call)

    def all_gather(self, x: Tensor, dim: int, phase: str = "forward", label: str = "") -> Tensor:
        def call() -> Tensor:
            parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(self.size)]
            dist.all_gather(parts, x.contiguous(), group=self.pg)
            return torch.cat(parts, dim)
        return self._timed("all_gather", x, "sum", phase, label, call)

    def reduce_scatter(self, x: Tensor, dim: int, phase: str = "forward", label: str = "") -> Tensor:
        def call() -> Tensor:
            parts = [p.contiguous() for p in x.chunk(self.size, dim)]
            out = torch.empty_like(parts[self.rank])
            dist.reduce_scatter(out, parts, group=self.pg)
            return out
        return self._timed("reduce_scatter", x, "sum", phase, label, call)
