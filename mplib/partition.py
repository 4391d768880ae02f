"""Balancing: which contiguous blocks each device runs, from uniform to the exact optimal plan.

Cost model (the one `optimal` minimises, and `Plan.explain()` prints). Blocks [i, j) on stage s:
    t_s = sum over its blocks of (forward + backward) / speeds[s]             per micro-batch
    c_s = 2 * (boundary_bytes[j-1] / bandwidth_s + latency_s)   cut after stage s: the
          activation crosses it forward, its gradient crosses it back
    step = (M - 1) * max(t_0..t_{K-1}, c_0..c_{K-2}) + sum(t) + sum(c)
    memory_s = params + grads + optimizer state + activation_bytes * in_flight_s  <= memory[s]
with M micro-batches (chunks) and in_flight_s = M for GPipe, min(M, K - s) for 1F1B.

Where the step formula comes from: a pipeline is a flow line of stations (stages and links);
the first micro-batch visits all of them once (fill + drain: sum(t) + sum(c)) and each of the
other M - 1 leaves the line one bottleneck time after the previous one. Against
`mplib.simulate.simulate` fed with the plan's forward/backward/transfer (tests/test_partition.py):
GPipe's simulated step is (M-1)(max forward + max backward) + sum(t) + sum(c), so it equals this
one when backward is the same multiple of forward on every block and lies above it otherwise;
1F1B without transfers hides the last micro-batch's work on stages after the bottleneck, so its
simulated step lies at or below this one (equal when the last stage is the slowest). A link is
a station here (it carries one activation at a time); the simulator lets copies overlap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from mplib._bottleneck import _Solver  # the exact search, kept apart from the cost model
from mplib.profile import BlockCosts

SCHEDULES = ("gpipe", "1f1b")


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
    solver = _Solver(np.concatenate([[0.0], np.cumsum(weights)]), [1.0] * k, None, None, None)
    return _balance(solver.bounds(solver.min_bottleneck()))


def _check_nk(n: int, k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"the number of stages must be a positive int, got {k!r}")
    if n < k:
        raise ValueError(f"{n} blocks cannot fill {k} stages (every stage needs at least one block); "
                         f"use at most {n} devices or cut the model into more blocks")


def in_flight(schedule: str, stages: int, chunks: int) -> list[int]:
    """Micro-batches whose activations each stage holds at its peak: GPipe M, 1F1B min(M, K - s).

    Example:
        in_flight("1f1b", stages=4, chunks=8)   # [4, 3, 2, 1]
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not one of {SCHEDULES}; the interleaved schedule "
                         "places several chunks per device, which a contiguous split cannot express")
    return [chunks if schedule == "gpipe" else min(chunks, stages - s) for s in range(stages)]


@dataclass
class Plan:
    """A balance and what the cost model predicts for it; `split(model, devices, balance=plan)` takes it.

    `forward`, `backward` (seconds per micro-batch per stage) and `transfer` (seconds to send one
    activation across each cut) feed `mplib.simulate.simulate(schedule, ...)` directly.
    """

    balance: list[int]
    devices: list[Any]
    step_time: float
    forward: list[float]
    backward: list[float]
    transfer: list[float]
    memory: list[int]
    bottleneck: str  # "stage s" or "cut s" (the link after stage s)
    bottleneck_time: float
    schedule: str = "1f1b"
    chunks: int = 1
    limits: list[int] | None = None
    names: list[list[str]] = field(default_factory=list)
    cut_bytes: list[int] = field(default_factory=list)
    costs: BlockCosts | None = field(default=None, repr=False)
    options: dict = field(default_factory=dict, repr=False)

    @property
    def fits(self) -> bool:
        return self.limits is None or all(m <= lim for m, lim in zip(self.memory, self.limits))

    @property
    def stage_times(self) -> list[float]:
        return [f + b for f, b in zip(self.forward, self.backward)]

    def explain(self) -> str:
        """A table of stages (blocks, time, memory, cut bytes), the bottleneck and why each cut sits where it does."""
        k, m = len(self.balance), self.chunks
        fill = sum(self.stage_times) + 2 * sum(self.transfer)
        lines = [f"{self.schedule}, {m} micro-batches, {k} stages: step {self.step_time * 1e3:.3f} ms = "
                 f"({m} - 1) x bottleneck {self.bottleneck_time * 1e3:.3f} ms + fill/drain {fill * 1e3:.3f} ms",
                 f"{'stage':<6}{'device':<10}{'blocks':<22}{'time ms':>9}{'memory MB':>11}{'limit MB':>10}"
                 f"{'cut MB':>9}{'cut ms':>9}"]
        for s in range(k):
            names = self.names[s] if self.names else []
            span = f"{names[0]}..{names[-1]}" if len(names) > 1 else "".join(names)
            lim = f"{self.limits[s] / 2**20:>10.1f}" if self.limits else f"{'-':>10}"
            cut = (f"{self.cut_bytes[s] / 2**20:>9.2f}{2 * self.transfer[s] * 1e3:>9.3f}" if s < k - 1 else "")
            lines.append(f"{s:<6}{str(self.devices[s])[:9]:<10}{f'{self.balance[s]}: {span}'[:21]:<22}"
                         f"{self.stage_times[s] * 1e3:>9.3f}{self.memory[s] / 2**20:>11.1f}{lim}{cut}")
        lines.append(f"bottleneck: {self.bottleneck} ({self.bottleneck_time * 1e3:.3f} ms per micro-batch)")
        if self.costs is not None:
            lines += ["why each cut sits where it does (step time if it moved one block):"] + self._why()
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
                p = evaluate(self.costs, bal, self.devices, **self.options)
                if not p.fits:
                    s = next(i for i in range(k) if p.memory[i] > p.limits[i])
                    parts.append(f"{word}: stage {s} would need {p.memory[s] / 2**20:.1f} MB > "
                                 f"{p.limits[s] / 2**20:.1f} MB")
                else:
                    parts.append(f"{word}: {p.step_time * 1e3:.3f} ms ({p.bottleneck} "
                                 f"{p.bottleneck_time * 1e3:.3f} ms)")
            out.append(f"  cut {c} (after block {sum(self.balance[:c + 1]) - 1}): " + "; ".join(parts))
        return out


def evaluate(costs: BlockCosts, balance: Sequence[int] | Any, devices: int | Sequence[Any],
             schedule: str = "1f1b", chunks: int = 1, speeds: Sequence[float] | None = None,
             links: Any = None, memory: Any = None) -> Plan:
    """The cost model's verdict on a given balance (it may not fit: see `Plan.fits`).

    Example:
        evaluate(costs, uniform(len(costs), 4), devices=4, chunks=8).step_time
    """
    balance = list(getattr(balance, "balance", balance))
    prob = _Problem(costs, devices, schedule, chunks, speeds, links, memory)
    if len(balance) != prob.k or sum(balance) != prob.n or min(balance) < 1:
        raise ValueError(f"balance {balance} must have {prob.k} positive entries summing to {prob.n} blocks; "
                         f"use mplib.partition.uniform({prob.n}, {prob.k})")
    return prob.plan(np.concatenate([[0], np.cumsum(balance)]).astype(int).tolist())


def optimal(costs: BlockCosts, devices: int | Sequence[Any], schedule: str = "1f1b", chunks: int = 1,
            speeds: Sequence[float] | None = None, links: Any = None, memory: Any = None) -> Plan:
    """The contiguous split minimising the cost model's step time (module docstring), exactly.

    `speeds[s]`: relative speed of device s (2.0 = twice as fast as where `costs` was measured).
    `links`: a list with per cut a bandwidth in bytes/s or a (bandwidth, latency s) tuple; a single
    number or tuple applies to every cut; None: free transfers.
    `memory`: bytes per device (one value: all devices); None: unlimited.

    Why it is exact. For a bound B let g(B) be the least sum(t) + sum(c) over splits whose every
    stage and cut takes <= B and that fit in memory; a DP over (stage, last block) computes it
    with the split. g only drops at values B that are the time of some stage or cut (candidates).
    The best split P* has bottleneck B* (a candidate) and step (M-1) B* + sum(P*) >= (M-1) B* +
    g(B*); the split found for B* has bottleneck <= B* and sum g(B*), so it is optimal too.
    Hence min over candidates of (M-1) B + g(B) is the optimum; only candidates up to
    (best step so far - g(inf)) / (M-1) can improve on it. A best-first branch and bound over B
    finds it without visiting every candidate: g never rises, so no B in (x, y] beats
    (M-1) x + g(y), and none beats x itself where g(x) == g(y) (`mplib._bottleneck`).

    Example:
        plan = optimal(costs, devices=["cuda:0", "cuda:1"], chunks=8)
        print(plan.explain())
    """
    prob = _Problem(costs, devices, schedule, chunks, speeds, links, memory)
    prob.check_fits()
    return prob.plan(prob.best_bounds())


def _balance(bounds: Sequence[int]) -> list[int]:
    return [int(b - a) for a, b in zip(bounds[:-1], bounds[1:])]


class _Problem:
    """Costs and options checked and turned into the arrays `_Solver` searches."""

    def __init__(self, costs: BlockCosts, devices: int | Sequence[Any], schedule: str, chunks: int,
                 speeds: Sequence[float] | None, links: Any, memory: Any) -> None:
        if not isinstance(costs, BlockCosts):
            raise TypeError(f"costs must be an mplib.profile.BlockCosts, got {type(costs).__name__}; "
                            "measure with mplib.profile.blocks(...) or build BlockCosts(forward=..., backward=...)")
        if isinstance(devices, int) and not isinstance(devices, bool):
            devices = [f"device{i}" for i in range(devices)]
        self.devices, self.costs = list(devices), costs
        self.n, self.k = len(costs), len(self.devices)
        if self.k == 0:
            raise ValueError("no devices given; pass a list of devices or their number (at least 1)")
        _check_nk(self.n, self.k)
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"chunks (micro-batches per step) must be an int >= 1, got {chunks!r}")
        self.options = dict(schedule=schedule, chunks=chunks, speeds=speeds, links=links, memory=memory)
        self.schedule, self.chunks = schedule, chunks
        self.in_flight = in_flight(schedule, self.k, chunks)
        self.speeds = _per(speeds, self.k, "speeds", 1.0)
        if any(not (0 < v < math.inf) for v in self.speeds):
            raise ValueError(f"speeds must be finite and > 0 (1.0 = the profiled device), got {self.speeds}")
        self.limits = None if memory is None else [int(v) for v in _per(memory, self.k, "memory", None)]
        if self.limits is not None and min(self.limits) <= 0:
            raise ValueError(f"memory limits must be > 0 bytes, got {self.limits}")
        self.links = None if links is None else [_link(v) for v in _per(links, self.k - 1, "links", None)]
        state = np.cumsum([0] + costs.state_bytes, dtype=np.int64)
        act = np.cumsum([0] + costs.activation_bytes, dtype=np.int64)
        self.mem = np.stack([state + f * act for f in self.in_flight])  # (k, n + 1) bytes
        self.one_way = np.zeros((max(self.k - 1, 0), self.n + 1))
        for s, (bw, lat) in enumerate(self.links or []):
            self.one_way[s, 1:] = np.asarray(costs.boundary_bytes, dtype=float) / bw + lat
        cut = None
        if self.links is not None and self.k > 1:
            cut = 2 * self.one_way
            cut[:, 0] = cut[:, self.n] = math.inf  # cuts sit between blocks
        self.solver = _Solver(np.concatenate([[0.0], np.cumsum(costs.time)]), self.speeds, cut, self.mem, self.limits)

    def check_fits(self) -> None:
        if self.limits is None or self.solver.feasible(math.inf):
            return
        for b in range(self.n):
            need = [int(self.mem[s][b + 1] - self.mem[s][b]) for s in range(self.k)]
            if all(need[s] > self.limits[s] for s in range(self.k)):
                raise ValueError(f"block {b} ({self.costs.names[b]}) alone fits no device: it needs "
                                 f"{_bytes_list(need)} bytes where the devices have {_bytes_list(self.limits)}; "
                                 "give a device more memory or cut that block into smaller ones")
        low, high = 0, int(self.mem[:, -1].max())  # low does not fit, high does (one stage takes all)
        while high - low > 1:
            mid = (low + high) // 2
            fits = _Solver(self.solver.P, self.speeds, None, self.mem, [mid] * self.k).feasible(math.inf)
            low, high = (low, mid) if fits else (mid, high)
        raise ValueError(f"no split of {self.n} blocks over {self.k} devices fits the memory limits "
                         f"{_bytes_list(self.limits)} bytes; the smallest per-device memory that works is "
                         f"{high:,} bytes "
                         f"({high / 2**20:.1f} MiB) on every device. Give the devices more memory, use more "
                         "devices, or hold fewer micro-batches in flight (schedule='1f1b', fewer chunks)")

    def best_bounds(self) -> list[int]:
        return self.solver.best(self.chunks)

    def plan(self, bounds: Sequence[int]) -> Plan:
        c, k, m = self.costs, self.k, self.chunks
        spans = [(bounds[s], bounds[s + 1]) for s in range(k)]
        times = [self.solver.time(s, i, j) for s, (i, j) in enumerate(spans)]
        transfer = [float(self.one_way[s][bounds[s + 1]]) for s in range(k - 1)]
        terms = [(t, f"stage {s}") for s, t in enumerate(times)] + [(2 * t, f"cut {s}") for s, t in enumerate(transfer)]
        worst, where = max(terms, key=lambda x: x[0])
        return Plan(balance=_balance(bounds), devices=self.devices,
                    step_time=float((m - 1) * worst + sum(times) + 2 * sum(transfer)),
                    forward=[sum(c.forward[i:j]) / self.speeds[s] for s, (i, j) in enumerate(spans)],
                    backward=[sum(c.backward[i:j]) / self.speeds[s] for s, (i, j) in enumerate(spans)],
                    transfer=transfer, memory=[int(self.mem[s][j] - self.mem[s][i]) for s, (i, j) in enumerate(spans)],
                    bottleneck=where, bottleneck_time=float(worst), schedule=self.schedule, chunks=m,
                    limits=self.limits,
                    names=[c.names[i:j] for i, j in spans], cut_bytes=[c.boundary_bytes[j - 1] for _, j in spans[:-1]],
                    costs=c, options=self.options)


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
                         f"{'cuts (devices - 1)' if what == 'links' else 'devices'}; give one per "
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

