"""A partitioning problem checked and turned into arrays: costs, schedule, speeds, links, memory per device."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from mplib import _bounds, _gpipe
from mplib._bottleneck import _Solver
from mplib._search import Problem
from mplib.profile import BlockCosts
from mplib.schedule import build


def for_schedule(p: Problem) -> Any:
    """The search with the strongest bounds mplib has for `p.schedule`."""
    if p.schedule.name == "gpipe":
        return _gpipe.GPipe(p)
    if p.schedule.name == "1f1b":
        return _bounds.OneFOneBBound(p)
    return _bounds.SimulatedBound(p)


def _check_nk(n: int, k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"the number of stages must be a positive int, got {k!r}")
    if n < k:
        raise ValueError(f"{n} blocks cannot fill {k} stages (every stage needs at least one block); "
                         f"use at most {n} stages or cut the model into more blocks")


def _uniform_bounds(n: int, k: int) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([n // k + (1 if s < n % k else 0) for s in range(k)])])


class _Problem:
    """Costs and options checked, and turned into the arrays the search and the simulator read."""

    def __init__(self, costs: BlockCosts, devices: int | Sequence[Any], schedule: str, chunks: int,
                 speeds: Sequence[float] | None, links: Any, memory: Any, virtual: int) -> None:
        if not isinstance(costs, BlockCosts):
            raise TypeError(f"costs must be an mplib.profile.BlockCosts, got {type(costs).__name__}; "
                            "measure with mplib.profile.measure(...) or build BlockCosts(forward=..., backward=...)")
        if isinstance(devices, int) and not isinstance(devices, bool):
            devices = [f"device{i}" for i in range(devices)]
        self.devices, self.costs = list(devices), costs
        self.n, self.K = len(costs), len(self.devices)
        if self.K == 0:
            raise ValueError("no devices given; pass a list of devices or their number (at least 1)")
        chunks = self.K if chunks is None else chunks
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"chunks (micro-batches per step) must be an int >= 1, got {chunks!r}")
        self.schedule = build(schedule, self.K, chunks, virtual)  # checks the schedule's own rules
        self.S = self.K * virtual
        _check_nk(self.n, self.S)
        self.options = dict(schedule=self.schedule.name, chunks=chunks, speeds=speeds, links=links,
                            memory=memory, virtual=virtual)
        self.speeds = _per(speeds, self.K, "speeds", 1.0)
        if any(not (0 < v < math.inf) for v in self.speeds):
            raise ValueError(f"speeds must be finite and > 0 (1.0 = the profiled device), got {self.speeds}")
        self.limits = None if memory is None else [int(v) for v in _per(memory, self.K, "memory", None)]
        if self.limits is not None and min(self.limits) <= 0:
            raise ValueError(f"memory limits must be > 0 bytes, got {self.limits}")
        self.links = None if links is None else [_link(v) for v in _per(links, self.S - 1, "links", None)]
        self._memory_model()
        self.search = Problem(self.schedule, _prefix(costs.forward), _prefix(costs.backward),
                              np.array([self.speeds[s % self.K] for s in range(self.S)], dtype=float),
                              self._cuts(), self._mem_hi(), self._device_fits if virtual > 1 else None)

    def _cuts(self) -> np.ndarray:
        cut = np.zeros((max(self.S - 1, 0), self.n + 1))
        for s, (bw, lat) in enumerate(self.links or []):
            cut[s, 1:] = np.asarray(self.costs.boundary_bytes, dtype=float) / bw + lat
        if self.S > 1:
            cut[:, 0] = cut[:, self.n] = math.inf  # cuts sit between blocks
        return cut

    def _memory_model(self) -> None:
        """Per device, after each of its actions, how many micro-batches each of its stages holds."""
        self.held = []
        for acts in self.schedule.actions:
            counts, rows = np.zeros(self.schedule.virtual, dtype=np.int64), []
            for a in acts:
                counts[a.stage // self.K] += 1 if a.kind == "F" else -1
                rows.append(counts.copy())
            self.held.append(np.array(rows))  # (actions, v)
        self.peak = [int(h.max(axis=0).max()) if len(h) else 0 for h in self.held]  # per device, any stage
        self.state = _prefix(self.costs.state_bytes, np.int64)
        self.act = _prefix(self.costs.activation_bytes, np.int64)

    def _mem_hi(self) -> np.ndarray:
        """Per stage and first block, the last end whose blocks alone fit their device."""
        hi = np.full((self.S, self.n + 1), self.n, dtype=np.int64)
        if self.limits is None:
            return hi
        for s in range(self.S):
            d, col = s % self.K, s // self.K
            held = int(self.held[d][:, col].max()) if len(self.held[d]) else 0
            q = self.state + held * self.act
            hi[s] = np.searchsorted(q, q + self.limits[d], side="right") - 1
        return hi

    def device_memory(self, bounds: Sequence[int]) -> list[int]:
        """Bytes each device needs for the stages that `bounds` (a prefix of stage ends) fixes."""
        out = []
        for d in range(self.K):
            stages = [s for s in range(d, len(bounds) - 1, self.K)]
            state = sum(int(self.state[bounds[s + 1]] - self.state[bounds[s]]) for s in stages)
            act = np.zeros(self.schedule.virtual, dtype=np.int64)
            for s in stages:
                act[s // self.K] = self.act[bounds[s + 1]] - self.act[bounds[s]]
            peak = int((self.held[d] @ act).max()) if len(self.held[d]) else 0
            out.append(state + peak)
        return out

    def _device_fits(self, bounds: Sequence[int]) -> bool:
        return self.limits is None or all(m <= lim for m, lim in zip(self.device_memory(bounds), self.limits))

    def check_fits(self) -> None:
        """Raise, naming what would fit, when no split fits the memory limits."""
        if self.limits is None:
            return
        for b in range(self.n):
            need = [int(self.state[b + 1] - self.state[b] + self.peak[d] * (self.act[b + 1] - self.act[b]))
                    for d in range(self.K)]
            if all(need[d] > self.limits[d] for d in range(self.K)) and self.schedule.virtual == 1:
                raise ValueError(f"block {b} ({self.costs.names[b]}) alone fits no device: it needs "
                                 f"{_bytes_list(need)} bytes where the devices have {_bytes_list(self.limits)}; "
                                 "give a device more memory or cut that block into smaller ones")
        if self._fits_somehow(self.limits):
            return
        msg = (f"no split of {self.n} blocks over {self.S} stages fits the memory limits "
               f"{_bytes_list(self.limits)} bytes")
        if self.schedule.virtual == 1:
            low, high = 0, int(self.state[-1] + max(self.peak) * self.act[-1])  # one stage takes all
            while high - low > 1:
                mid = (low + high) // 2
                low, high = (low, mid) if self._fits_somehow([mid] * self.K) else (mid, high)
            msg += (f"; the smallest per-device memory that works is {high:,} bytes ({high / 2**20:.1f} MiB) "
                    "on every device")
        raise ValueError(msg + ". Give the devices more memory, use more devices, or hold fewer micro-batches "
                               "in flight (schedule='1f1b', fewer chunks)")

    def _fits_somehow(self, limits: Sequence[int]) -> bool:
        if self.schedule.virtual > 1:  # shared devices: the search's own feasibility, on a dive
            return True
        mem = np.stack([self.state + self.peak[s] * self.act for s in range(self.K)])
        return _Solver(np.zeros(self.n + 1), [1.0] * self.K, mem, list(limits)).feasible(math.inf)

    def candidates(self) -> list[np.ndarray]:
        """Splits timed before the search starts: the uniform one, when it fits."""
        bounds = _uniform_bounds(self.n, self.S)
        if self._device_fits(bounds):
            return [bounds]
        return []


def _prefix(values: Sequence[float], dtype: Any = float) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.asarray(values, dtype=dtype))]).astype(dtype)


def _bytes_list(values: Sequence[int]) -> str:
    """Per-device byte counts for a message: one number when all are equal."""
    values = list(values)
    return f"{values[0]:,} (each)" if len(set(values)) == 1 else "[" + ", ".join(f"{v:,}" for v in values) + "]"


def _per(value: Any, count: int, what: str, default: Any) -> list:
    """One value per device (or cut): None -> default, a scalar -> repeated, a sequence -> checked."""
    if value is None:
        return [default] * count
    if isinstance(value, (int, float)) or hasattr(value, "bandwidth") or (what == "links" and isinstance(value, tuple)):
        return [value] * count  # one value for all; a tuple of links is one (bandwidth, latency) pair
    value = list(value)
    if len(value) != count:
        raise ValueError(f"{what} has {len(value)} entries but there are {count} "
                         f"{'cuts (stages - 1)' if what == 'links' else 'devices'}; give one per "
                         f"{'cut' if what == 'links' else 'device'} or a single value for all")
    return value


def _link(value: Any) -> tuple[float, float]:
    """(bandwidth bytes/s, latency s) from a number, a pair, or an object with .bandwidth/.latency."""
    if hasattr(value, "bandwidth"):
        bw, lat = value.bandwidth, getattr(value, "latency", 0.0)
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        bw, lat = value
    else:
        bw, lat = value, 0.0
    bw, lat = float(bw), float(lat)
    if not bw > 0 or not 0 <= lat < math.inf:
        raise ValueError(f"a link needs bandwidth > 0 bytes/s and a latency >= 0 s, got {value!r}")
    return bw, lat
