"""Balancing: which contiguous blocks each stage runs, from uniform splits to the plan whose simulated step is least.

The step a plan is judged by is the one the schedule gives when run (`mplib.simulate`): stage s
(on device s % K) takes its blocks' forward + backward seconds over its device's speed; a cut
takes bytes / bandwidth + latency each way; memory per device is its blocks' parameters,
gradients and optimizer state plus activations times the micro-batches it holds at its peak
(`Schedule.peak_in_flight`). `optimal` finds the least such step exactly (`mplib._search`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from mplib import _bounds
from mplib._bottleneck import _Solver
from mplib._search import Problem
from mplib.profile import BlockCosts
from mplib.schedule import Schedule, build
from mplib.simulate import critical_path

MAX_NODES = 500  # search nodes `optimal` expands before it settles for a certified gap


def uniform(n: int, k: int) -> list[int]:
    """`n` blocks over `k` stages, as even as counts allow (earlier stages take the remainder).

    Example:
        uniform(10, 4)   # [3, 3, 2, 2]
    """
    _check_nk(n, k)
    return [n // k + (1 if s < n % k else 0) for s in range(k)]


def by_params(costs: BlockCosts, k: int) -> list[int]:
    """The balance whose largest stage holds the fewest parameter bytes (exact min-max).

    Example:
        by_params(costs, 4)   # e.g. [5, 4, 4, 1]: the heavy head stands alone
    """
    return _minmax([float(b) for b in costs.param_bytes], k)


def by_time(costs: BlockCosts, k: int) -> list[int]:
    """The balance whose slowest stage (forward + backward) is as fast as possible (exact min-max).

    Example:
        by_time(costs, 4)
    """
    return _minmax(costs.time, k)


def _minmax(weights: list[float], k: int) -> list[int]:
    _check_nk(len(weights), k)
    solver = _Solver(np.concatenate([[0.0], np.cumsum(weights)]), [1.0] * k, None, None)
    return _balance(solver.bounds(solver.min_bottleneck()))


def _check_nk(n: int, k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"the number of stages must be a positive int, got {k!r}")
    if n < k:
        raise ValueError(f"{n} blocks cannot fill {k} stages (every stage needs at least one block); "
                         f"use at most {n} stages or cut the model into more blocks")


@dataclass
class Plan:
    """A balance and its simulated step; `split(model, plan.devices, plan)` and `Pipeline` take it.

    `forward`, `backward` (seconds per micro-batch per stage) and `transfer` (seconds to send one
    activation across each cut) feed `mplib.simulate.simulate(plan.build(), ...)` directly.
    `memory` and `limits` are per device. `bottleneck` names the stage the critical path spends
    most time in, `path_share` that share of the step.
    """

    balance: list[int]
    devices: list[Any]  # per stage (interleaved: the devices repeated round-robin)
    step_time: float
    forward: list[float]
    backward: list[float]
    transfer: list[float]
    memory: list[int]
    bottleneck: str
    path_share: float
    schedule: str = "1f1b"
    chunks: int = 1
    virtual: int = 1
    limits: list[int] | None = None
    names: list[list[str]] = field(default_factory=list)
    cut_bytes: list[int] = field(default_factory=list)
    costs: BlockCosts | None = field(default=None, repr=False)
    options: dict = field(default_factory=dict, repr=False)
    searched: int = 0  # nodes the exact search expanded (0: evaluated, not searched)
    gap: float = 0.0  # how far above the optimum step this plan may be (0: proven optimal)

    @property
    def fits(self) -> bool:
        return self.limits is None or all(m <= lim for m, lim in zip(self.memory, self.limits))

    @property
    def stage_times(self) -> list[float]:
        return [f + b for f, b in zip(self.forward, self.backward)]

    def build(self) -> Schedule:
        """The schedule this plan was judged under."""
        return build(self.schedule, len(self.balance) // self.virtual, self.chunks, self.virtual)

    def explain(self) -> str:
        """A table of stages (blocks, time, memory, cut bytes), the critical path and why each cut sits where it does."""
        k, m = len(self.balance), self.chunks
        lines = [f"{self.schedule}, {m} micro-batches, {k} stages: simulated step {self.step_time * 1e3:.3f} ms; "
                 f"its critical path spends {self.path_share:.0%} of it in {self.bottleneck}",
                 f"{'stage':<6}{'device':<10}{'blocks':<22}{'time ms':>9}{'memory MiB':>11}{'limit MiB':>10}"
                 f"{'cut MiB':>9}{'cut ms':>9}"]
        K = k // self.virtual
        for s in range(k):
            names = self.names[s] if self.names else []
            span = f"{names[0]}..{names[-1]}" if len(names) > 1 else "".join(names)
            mem = f"{self.memory[s] / 2**20:>11.1f}" if s < K else f"{'':>11}"
            lim = f"{self.limits[s] / 2**20:>10.1f}" if self.limits and s < K else f"{'-':>10}"
            cut = (f"{self.cut_bytes[s] / 2**20:>9.2f}{2 * self.transfer[s] * 1e3:>9.3f}" if s < k - 1 else "")
            lines.append(f"{s:<6}{str(self.devices[s])[:9]:<10}{f'{self.balance[s]}: {span}'[:21]:<22}"
                         f"{self.stage_times[s] * 1e3:>9.3f}{mem}{lim}{cut}")
        if self.costs is not None:
            lines += ["why each cut sits where it does (simulated step if it moved one block):"] + self._why()
        return "\n".join(lines)

    def _why(self) -> list[str]:
        out, k = [], len(self.balance)
        for c in range(k - 1):
            parts = []
            for d, word in ((-1, "earlier"), (1, "later")):
                bal = list(self.balance)
                bal[c], bal[c + 1] = bal[c] + d, bal[c + 1] - d
                if min(bal) < 1:
                    parts.append(f"{word}: a stage would be empty")
                    continue
                p = evaluate(self.costs, bal, self.devices[: k // self.virtual], **self.options)
                if not p.fits:
                    s = next(i for i in range(len(p.memory)) if p.memory[i] > p.limits[i])
                    parts.append(f"{word}: device {s} would need {p.memory[s] / 2**20:.1f} MiB > "
                                 f"{p.limits[s] / 2**20:.1f} MiB")
                else:
                    parts.append(f"{word}: {p.step_time * 1e3:.3f} ms")
            out.append(f"  cut {c} (after block {sum(self.balance[:c + 1]) - 1}): " + "; ".join(parts))
        return out


def evaluate(costs: BlockCosts, balance: Sequence[int] | Any, devices: int | Sequence[Any],
             schedule: str = "1f1b", chunks: int | None = None, speeds: Sequence[float] | None = None,
             links: Any = None, memory: Any = None, virtual: int = 1) -> Plan:
    """The simulated step and memory of a given balance (it may not fit: see `Plan.fits`).

    Example:
        evaluate(costs, uniform(len(costs), 4), devices=4, chunks=8).step_time
    """
    balance = list(getattr(balance, "balance", balance))
    prob = _Problem(costs, devices, schedule, chunks, speeds, links, memory, virtual)
    if len(balance) != prob.S or sum(balance) != prob.n or min(balance) < 1:
        raise ValueError(f"balance {balance} must have {prob.S} positive entries summing to {prob.n} blocks; "
                         f"use mplib.partition.uniform({prob.n}, {prob.S})")
    return prob.plan(np.concatenate([[0], np.cumsum(balance)]).astype(int))


def optimal(costs: BlockCosts, devices: int | Sequence[Any], schedule: str = "1f1b", chunks: int | None = None,
            speeds: Sequence[float] | None = None, links: Any = None, memory: Any = None,
            virtual: int = 1, max_nodes: int | None = MAX_NODES) -> Plan:
    """The contiguous split whose simulated step (`mplib.simulate`) is least, exactly, among those that fit.

    `chunks`: micro-batches per step (default: one per device, the fewest 1F1B runs with).
    `speeds[d]`: relative speed of device d (2.0 = twice as fast as where `costs` was measured).
    `links`: per cut a `mplib.hardware.Link`, a bandwidth in bytes/s or a (bandwidth, latency s)
    pair; one value applies to every cut; None: free transfers. `memory`: bytes per device (one
    value: all devices); None: unlimited. `virtual` > 1 with schedule "interleaved": that many
    stages per device, dealt round-robin.

    Exact up to a relative 1e-9 (float sums in another order): a best-first branch and bound over
    the stages' ends, with lower bounds drawn from the schedule's own dependency paths
    (`mplib._bounds`), every complete split it keeps timed by the simulator. Most problems end in
    a few hundred nodes; one that reaches `max_nodes` returns its best split with a warning and
    `plan.gap`, how far above the optimum it may be (None: search to the end).

    Example:
        plan = optimal(costs, devices=["cuda:0", "cuda:1"], chunks=8)
        print(plan.explain())
    """
    prob = _Problem(costs, devices, schedule, chunks, speeds, links, memory, virtual)
    prob.check_fits()
    bounds, _, expanded, gap = _bounds.for_schedule(prob.search).solve(prob.candidates(), max_nodes)
    plan = prob.plan(np.asarray(bounds))
    plan.searched, plan.gap = expanded, gap
    if gap > 0:
        warnings.warn(f"optimal stopped after {expanded:,} search nodes: its plan is at most {gap:.2%} slower than "
                      "the best one; pass max_nodes=None (or more) to search to the end", stacklevel=2)
    return plan


def _balance(bounds: Sequence[int]) -> list[int]:
    return [int(b - a) for a, b in zip(bounds[:-1], bounds[1:])]


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
        bounds = np.concatenate([[0], np.cumsum(uniform(self.n, self.S))])
        if self._device_fits(bounds):
            return [bounds]
        return []

    def plan(self, bounds: np.ndarray) -> Plan:
        c, S = self.costs, self.S
        bounds = [int(x) for x in bounds]
        f, b, t = (x[0] for x in self.search.stage_costs(np.array(bounds)))
        transfer = [float(x) for x in t]
        step = float(self.search.step(np.array(bounds))[0])
        path = critical_path(self.schedule, f, b, transfer)
        per_stage = [sum((f[a.stage] if a.kind == "F" else b[a.stage]) for a in path if a.stage == s)
                     for s in range(S)]
        worst = int(np.argmax(per_stage))
        spans = list(zip(bounds[:-1], bounds[1:]))
        return Plan(balance=_balance(bounds), devices=[self.devices[s % self.K] for s in range(S)],
                    step_time=step, forward=[float(x) for x in f], backward=[float(x) for x in b],
                    transfer=transfer, memory=self.device_memory(bounds), bottleneck=f"stage {worst}",
                    path_share=per_stage[worst] / step if step > 0 else 0.0, schedule=self.schedule.name,
                    chunks=self.schedule.chunks, virtual=self.schedule.virtual, limits=self.limits,
                    names=[c.names[i:j] for i, j in spans], cut_bytes=[c.boundary_bytes[j - 1] for _, j in spans[:-1]],
                    costs=c, options=self.options)


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
