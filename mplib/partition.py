"""Balancing: which contiguous blocks each stage runs, from uniform splits to the plan whose simulated step is least.

The step a plan is judged by is the one the schedule gives when run (`mplib.simulate`): stage s
(on device s % K) takes its blocks' forward + backward seconds over its device's speed; a cut
takes bytes / bandwidth + latency each way; memory per device is its blocks' parameters,
gradients and optimizer state plus activations times the micro-batches it holds at its peak
(`Schedule.peak_in_flight`). `optimal` finds the least such step exactly (`mplib._search`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from mplib._bottleneck import _Solver
from mplib._problem import _check_nk, _Problem, for_schedule
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
    return _plan(prob, np.concatenate([[0], np.cumsum(balance)]).astype(int))


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
    bounds, _, expanded, gap = for_schedule(prob.search).solve(prob.candidates(), max_nodes)
    plan = _plan(prob, np.asarray(bounds))
    plan.searched, plan.gap = expanded, gap
    if gap > 0:
        warnings.warn(f"optimal stopped after {expanded:,} search nodes: its plan is at most {gap:.2%} slower than "
                      "the best one; pass max_nodes=None (or more) to search to the end", stacklevel=2)
    return plan


def _balance(bounds: Sequence[int]) -> list[int]:
    return [int(b - a) for a, b in zip(bounds[:-1], bounds[1:])]


def _plan(self: _Problem, bounds: np.ndarray) -> Plan:
    """The Plan of a split: its simulated step, per-stage costs, device memory, critical path."""
    c, S = self.costs, self.S
    bounds = [int(x) for x in bounds]
    f, b, t = (x[0] for x in self.search.stage_costs(np.array(bounds)))
    transfer = [float(x) for x in t]
    step = float(self.search.step(np.array(bounds))[0])
    path = critical_path(self.schedule, f, b, transfer, levels=self.search.levels)
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
