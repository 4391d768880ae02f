"""One clock for every rank's timeline: rank 0's moment of start, read on each rank's own clock.

On one machine `time.perf_counter` is one system-wide monotonic clock, so ranks there need no
correction (exact). A rank on another machine estimates its offset to rank 0's clock from the
fastest of a few round trips (Cristian's algorithm: rank 0's reading sits at the midpoint of the
trip, to within half its length).
"""

from __future__ import annotations

import socket
import time
from typing import Callable

import torch
import torch.distributed as dist


def offset(clock: Callable[[], float] = time.perf_counter, trips: int = 5) -> float:
    """Seconds to add to this rank's `clock` to read rank 0's; collective over the world.

    Example (several processes):
        rank0_now = time.perf_counter() + mplib.distributed.clock.offset()   # 0.0 on rank 0's machine
    """
    hosts: list = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    rank, buf, out = dist.get_rank(), torch.zeros(1, dtype=torch.float64), 0.0
    for r in (r for r in range(1, len(hosts)) if hosts[r] != hosts[0]):  # one rank at a time, with rank 0
        best = float("inf")
        for _ in range(trips):
            if rank == 0:
                dist.recv(buf, src=r)
                buf.fill_(clock())
                dist.send(buf, dst=r)
            elif rank == r:
                start = clock()
                dist.send(buf, dst=0)
                dist.recv(buf, src=0)
                end = clock()
                if end - start < best:  # the shortest trip bounds the error best
                    best, out = end - start, buf.item() - (start + end) / 2
    return out


def common_start(clock: Callable[[], float] = time.perf_counter) -> float:
    """Rank 0's present moment on this rank's `clock`: every rank's timeline counts from it; collective.

    Example (several processes):
        t0 = common_start()   # then Timeline(lanes, t0=t0) on every rank lines up with rank 0's
    """
    shift = offset(clock)
    dist.barrier()
    now = torch.tensor([clock()], dtype=torch.float64)
    dist.broadcast(now, src=0)
    return now.item() - shift
