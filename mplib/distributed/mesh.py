"""Where this process sits on a pp x dp x tp grid of ranks, and the process groups along each axis.

    ranks 0..7 as pp=2 x dp=2 x tp=2 (pp outermost, tp innermost, as torchtitan orders them):

        stage 0: replica 0 [0 1]  replica 1 [2 3]      <- tp pairs: neighbours, the fastest link
        stage 1: replica 0 [4 5]  replica 1 [6 7]      <- a pp group: ranks 0 and 4, 1 and 5, ...

Tensor parallelism talks the most (every layer), so it gets neighbouring ranks (one machine,
NVLink); pipeline stages talk the least (one activation per cut), so they span machines.
Every group is made with the job's timeout, so no collective on it waits forever.
"""

from __future__ import annotations

import datetime
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

AXES = ("pp", "dp", "tp")


@dataclass
class Mesh:
    """This rank's coordinates on the grid (`coords["pp"]` is its pipeline rank) and its groups.

    `device_mesh` is the same grid as a torch `DeviceMesh` (dims "pp", "dp", "tp"), for torch's
    own APIs (DTensor, FSDP); `groups[axis]` is the process group of the ranks that differ from
    this one only along `axis`.

    Example:
        # what mesh(pp=2, dp=2, tp=2) returns on rank 5 (its groups left out here)
        m = Mesh(shape={"pp": 2, "dp": 2, "tp": 2}, rank=5, coords={"pp": 1, "dp": 0, "tp": 1}, groups={})
        m.rank_at(pp=1, dp=1, tp=0), m.along("pp"), m.describe()   # (6, [1, 5], 'rank 5 (pp 1, dp 0, tp 1)')
    """

    shape: dict[str, int]
    rank: int
    coords: dict[str, int]
    groups: dict[str, Any] = field(repr=False)
    device_mesh: Any = field(repr=False, default=None)

    @property
    def size(self) -> int:
        return self.shape["pp"] * self.shape["dp"] * self.shape["tp"]

    def rank_at(self, pp: int, dp: int, tp: int) -> int:
        """The global rank at these coordinates."""
        return (pp * self.shape["dp"] + dp) * self.shape["tp"] + tp

    def along(self, axis: str) -> list[int]:
        """The global ranks of this rank's group along `axis`, in order."""
        return [self.rank_at(**{**self.coords, axis: i}) for i in range(self.shape[axis])]

    def describe(self, rank: int | None = None) -> str:
        """`"rank 5 (pp 1, dp 0, tp 1)"`."""
        r = self.rank if rank is None else rank
        pp, rest = divmod(r, self.shape["dp"] * self.shape["tp"])
        dp, tp = divmod(rest, self.shape["tp"])
        return f"rank {r} (pp {pp}, dp {dp}, tp {tp})"


def mesh(pp: int, dp: int = 1, tp: int = 1, timeout: float = 120.0, device_type: str | None = None) -> Mesh:
    """Make the pp x dp x tp grid over the initialised world; every rank must call it, alike.

    Example (several processes):
        m = mplib.distributed.mesh(pp=2, dp=2, tp=2)     # under launch(fn, 8) or torchrun --nproc-per-node 8
        m.coords                                        # {'pp': 1, 'dp': 0, 'tp': 1} on rank 5
        m.along("tp"), m.groups["tp"]                   # [4, 5] and their ProcessGroup, on rank 5
    """
    if not dist.is_initialized():
        raise RuntimeError("mesh() needs an initialised torch.distributed process group: run under "
                           "mplib.distributed.launch(fn, N), or call mplib.distributed.init() under torchrun")
    for name, value in (("pp", pp), ("dp", dp), ("tp", tp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    world, rank = dist.get_world_size(), dist.get_rank()
    if pp * dp * tp != world:
        raise ValueError(f"a pp={pp} x dp={dp} x tp={tp} grid needs {pp * dp * tp} processes, but this job has {world}; "
                         f"start {pp * dp * tp} (torchrun --nproc-per-node {pp * dp * tp}, launch(fn, {pp * dp * tp})) "
                         f"or choose sizes whose product is {world}")
    shape = {"pp": pp, "dp": dp, "tp": tp}
    grid = torch.arange(world).reshape(pp, dp, tp)
    pp_i, rest = divmod(rank, dp * tp)
    coords = {"pp": pp_i, "dp": rest // tp, "tp": rest % tp}
    wait = datetime.timedelta(seconds=timeout)
    groups = {}
    for a, axis in enumerate(AXES):
        # every rank creates every group of the axis, in the same order (new_group is collective)
        others = [range(n) for b, n in enumerate(grid.shape) if b != a]
        for fixed in itertools.product(*others):
            index = list(fixed)
            index.insert(a, slice(None))
            ranks = grid[tuple(index)].tolist()
            group = dist.new_group(ranks, timeout=wait)
            if rank in ranks:
                groups[axis] = group
    device = device_type or ("cuda" if dist.get_backend() == "nccl" else "cpu")
    device_mesh = dist.device_mesh.DeviceMesh.from_group([groups[a] for a in AXES], device, mesh=grid,
                                                         mesh_dim_names=AXES)
    return Mesh(shape, rank, coords, groups, device_mesh)


def subgroup(m: Mesh, axis: str, indices: list[int], timeout: float = 120.0) -> Any:
    """The group of the ranks at `indices` along `axis` that share this rank's other coordinates
    (None when this rank is not among them). Collective: every rank calls it with the same indices.

    Example (several processes):
        m = mplib.distributed.mesh(pp=4, dp=2)               # under launch(fn, 8)
        ties = subgroup(m, "pp", [0, m.shape["pp"] - 1])   # the first and last stage of each pipeline
        # ranks 0 and 6 (replica 0), 1 and 7 (replica 1); None on ranks 2 to 5
    """
    mine, wait = None, datetime.timedelta(seconds=timeout)
    rest = [a for a in AXES if a != axis]
    for fixed in itertools.product(*(range(m.shape[a]) for a in rest)):
        coords = dict(zip(rest, fixed))
        ranks = [m.rank_at(**{**coords, axis: i}) for i in indices]
        group = dist.new_group(ranks, timeout=wait)
        if m.rank in ranks:
            mine = group
    return mine
