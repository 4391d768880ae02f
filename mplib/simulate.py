"""Time a schedule over per-stage costs and link transfer times: a simulated Timeline, or just the step time.

Every device runs its action list in order, each action as early as `Schedule.deps` allows (the
timing is `mplib.schedule.action_times`). Links are separate copy engines: a copy delays its
receiver but never occupies a device. `step_times` computes the same step for many cost vectors
at once; `mplib.partition.optimal` uses it as its oracle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from mplib.schedule import Action, Schedule, action_times, walk  # noqa: F401  (action_times: one timing, reused)
from mplib.timeline import Timeline

Costs = Sequence[float]


def _stages_on(s: Schedule) -> list[int]:
    """How many stages each device runs (`Schedule.device_of` places them)."""
    count = [0] * s.num_devices
    for j in range(s.num_stages):
        count[s.device_of(j)] += 1
    return count


def _per_stage(costs: Costs, s: Schedule, what: str) -> list[float]:
    """Per-stage costs from per-device (split evenly over the device's stages) or per-stage lists."""
    K, c = s.num_devices, list(costs)
    if len(c) == s.num_stages:
        return [float(x) for x in c]
    if len(c) == K:
        on = _stages_on(s)
        return [float(c[s.device_of(j)]) / on[s.device_of(j)] for j in range(s.num_stages)]
    raise ValueError(f"{what} has {len(c)} entries; give one per device ({K})"
                     + (f" or one per stage ({s.num_stages})" if s.num_stages != K else ""))


def _per_cut(transfer: Costs, s: Schedule) -> list[float]:
    n, t = s.num_stages - 1, [float(x) for x in transfer]
    if len(t) in (0, 1):
        return (t or [0.0]) * max(n, 1)
    if len(t) != n:
        raise ValueError(f"transfer has {len(t)} entries but the pipeline has {n} cuts between stages; "
                         f"give one per cut, one for all, or none")
    return t


def simulate(schedule: Schedule, forward: Costs, backward: Costs, transfer: Costs = (),
             bytes_per_microbatch: float | Sequence[float] | None = None, recompute: bool = False,
             lanes: Sequence[str] | None = None) -> Timeline:
    """Run `schedule` on paper: per-stage costs in seconds per micro-batch in, a Timeline out.

    `forward[s]`/`backward[s]`: per device (an interleaved device's cost is split evenly over its
    stages) or per stage. `transfer[j]`: seconds to send one micro-batch's activation across the
    cut after stage j (its gradient takes as long back); copies appear on link lanes.
    `bytes_per_microbatch` (per device, or one for all) adds memory samples: activations held
    from a forward's end to its backward's end. `recompute=True` runs the forward again (a
    "recompute" event) before each backward, as activation checkpointing does.

    Example:
        tl = simulate(mplib.schedule.build("1f1b", 4, 8), forward=[1] * 4, backward=[2] * 4, transfer=[0.1] * 3)
        tl.bubble_fraction([0, 1, 2, 3]); mplib.plot.timeline(tl)
    """
    K = schedule.num_devices
    f, b = _per_stage(forward, schedule, "forward"), _per_stage(backward, schedule, "backward")
    t = _per_cut(transfer, schedule)
    bwd = [b[j] + (f[j] if recompute else 0.0) for j in range(len(b))]
    times = action_times(schedule, lambda j: f[j], lambda j: bwd[j], lambda c: t[c])
    # one link lane per pair of devices a cut joins (in cut order), when any transfer takes time
    ends = [(schedule.device_of(c), schedule.device_of(c + 1)) for c in range(schedule.num_stages - 1)]
    pairs = list(dict.fromkeys(e for e in ends if e[0] != e[1])) if any(x > 0 for x in t) else []
    names = list(lanes) if lanes is not None else [f"stage {d}" for d in range(K)]
    tl = Timeline(lanes=names + [f"link {a}->{b}" for a, b in pairs], source="simulated", t0=1.0)
    for a, (start, end) in sorted(times.items(), key=lambda kv: kv[1]):
        j = a.stage
        info = dict(microbatch=a.microbatch, stage=j, label=str(a))
        if a.kind == "B" and recompute:
            tl.add(a.device, "recompute", start, start + f[j], **info)
            start += f[j]
        tl.add(a.device, "forward" if a.kind == "F" else "backward", start, end, **info)
        cut = j if a.kind == "F" else j - 1  # forward sends right, backward sends the gradient left
        if 0 <= cut < len(t) and t[cut] > 0 and ends[cut] in pairs:
            tl.add(K + pairs.index(ends[cut]), "copy", end, end + t[cut], **info)
    if bytes_per_microbatch is not None:
        _sample_memory(tl, schedule, times, bytes_per_microbatch)
    return tl


def _sample_memory(tl: Timeline, s: Schedule, times: dict[Action, tuple[float, float]],
                   nbytes: float | Sequence[float]) -> None:
    K = s.num_devices
    per_dev = [float(nbytes)] * K if isinstance(nbytes, (int, float)) else [float(x) for x in nbytes]
    if len(per_dev) != K:
        raise ValueError(f"bytes_per_microbatch has {len(per_dev)} entries; give one per device ({K}) "
                         "or a single number")
    on = _stages_on(s)
    for d in range(K):
        held, changes = 0.0, sorted((end, 1 if a.kind == "F" else -1)
                                    for a, (_, end) in times.items() if a.device == d)
        tl.sample_memory(d, 0, at=0.0)
        for at, sign in changes:
            held += sign * per_dev[d] / max(on[d], 1)
            tl.sample_memory(d, round(held), at=at)


@dataclass
class _Levels:
    """A schedule compiled for vectorised timing: actions grouped by dependency depth.

    Node n (0..N-1) is the n-th action of `walk`; slot N is a zero. Level L holds nodes whose
    predecessors all sit in earlier levels, so one level is one vectorised max-plus step.
    """

    levels: list[np.ndarray]
    preds: np.ndarray  # (N, 1 + most deps): device predecessor, then the dependencies (N when absent)
    cuts: np.ndarray  # same shape: the cut each predecessor's edge crosses (-1: none)
    stage: np.ndarray  # (N,)
    forward: np.ndarray  # (N,) bool
    sink: np.ndarray  # every device's last action
    order: list = field(default_factory=list, repr=False)  # the actions, node n = order[n]


def compile_levels(s: Schedule) -> _Levels:
    """`s` compiled once for `step_times` (worth it when many cost vectors are timed on one schedule)."""
    order = list(walk(s))
    N = len(order)
    index = {a.key: n for n, a in enumerate(order)}
    deps = [s.deps(a) for a in order]
    width = 1 + max((len(d) for d in deps), default=0)  # the device's previous action, then the deps
    preds = np.full((N, width), N, dtype=np.int64)
    cuts = np.full((N, width), -1, dtype=np.int64)
    depth = np.zeros(N + 1, dtype=np.int64)
    last = [N] * s.num_devices
    for n, a in enumerate(order):
        preds[n, 0] = last[a.device]
        for k, dep in enumerate(deps[n], start=1):
            preds[n, k] = index[dep]
            cut = s.crosses(dep, a)
            cuts[n, k] = -1 if cut is None else cut
        depth[n] = 1 + max(depth[p] for p in preds[n])
        last[a.device] = n
    depth[N] = 0
    levels = [np.flatnonzero(depth[:N] == L) for L in range(1, int(depth[:N].max(initial=0)) + 1)]
    return _Levels(levels, preds, cuts, np.array([a.stage for a in order]),
                   np.array([a.kind == "F" for a in order]), np.array([x for x in last if x < N]), order)


def step_times(schedule: Schedule | _Levels, forward: np.ndarray, backward: np.ndarray,
               transfer: np.ndarray | None = None) -> np.ndarray:
    """The simulated step (end of the last action) for a batch of per-stage costs, vectorised.

    `forward`, `backward`: (batch, stages); `transfer`: (batch, stages - 1) or None. Equals
    `simulate(...).duration` for each row (the schedule starts at time 0).

    Example:
        step_times(mplib.schedule.build("1f1b", 4, 8), np.ones((1, 4)), 2 * np.ones((1, 4)))   # array([33.])
    """
    lv = schedule if isinstance(schedule, _Levels) else compile_levels(schedule)
    f, b = np.atleast_2d(np.asarray(forward, float)), np.atleast_2d(np.asarray(backward, float))
    batch, N = f.shape[0], len(lv.stage)
    cost = np.where(lv.forward, f[:, lv.stage], b[:, lv.stage])  # (batch, N)
    cuts = int(lv.stage.max(initial=0))  # stages - 1
    c = np.zeros((batch, cuts)) if transfer is None else np.atleast_2d(np.asarray(transfer, float))
    c = np.concatenate([c, np.zeros((batch, 1))], axis=1)  # column -1: no cut, no delay
    end = np.zeros((batch, N + 1))
    for nodes in lv.levels:
        p, k = lv.preds[nodes], lv.cuts[nodes]  # (L, width)
        ready = (end[:, p] + c[:, k]).max(axis=2)  # (batch, L)
        end[:, nodes] = ready + cost[:, nodes]
    return end[:, lv.sink].max(axis=1)


def critical_path(schedule: Schedule, forward: Costs, backward: Costs, transfer: Costs = (),
                  levels: _Levels | None = None) -> list[Action]:
    """The actions of a longest dependency chain, first to last: what sets the simulated step.

    Each action's start is its device's previous action or a dependency (plus the transfer it
    crosses), whichever ends later (the device's action on a tie, then the first dependency);
    following those back from the action that ends last (the first in `walk` order on a tie)
    gives the path. Costs as in `simulate`. `levels`: `compile_levels(schedule)`, when already
    compiled: the same path, found vectorised.

    Example:
        path = critical_path(mplib.schedule.build("1f1b", 2, 4), [1, 1], [2, 3])
        sum(1 if a.kind == "F" else (2, 3)[a.stage] for a in path)   # the step: 19
    """
    f, b = _per_stage(forward, schedule, "forward"), _per_stage(backward, schedule, "backward")
    t = _per_cut(transfer, schedule)
    if levels is not None:
        return _critical_nodes(levels, f, b, t)
    end: dict = {}
    came_from: dict = {}
    last: list = [None] * schedule.num_devices
    for a in walk(schedule):
        ready, origin = (end[last[a.device].key], last[a.device]) if last[a.device] else (0.0, None)
        for dep in schedule.deps(a):
            cut = schedule.crosses(dep, a)
            at = end[dep] + (0.0 if cut is None else t[cut])
            if at > ready:
                ready, origin = at, dep
        end[a.key] = ready + (f[a.stage] if a.kind == "F" else b[a.stage])
        came_from[a.key] = origin
        last[a.device] = a
    by_key = {a.key: a for acts in schedule.actions for a in acts}
    key = max(end, key=end.get)
    path = []
    while key is not None:
        path.append(by_key[key])
        key = came_from[key]
        key = key.key if isinstance(key, Action) else key
    return path[::-1]


def _critical_nodes(lv: _Levels, f: list[float], b: list[float], t: list[float]) -> list[Action]:
    """`critical_path` over compiled levels: the same max-plus sweep as `step_times`, keeping each
    node's argmax predecessor (argmax takes the first of equals: the device's action, then the deps)."""
    N = len(lv.stage)
    cost = np.where(lv.forward, np.asarray(f)[lv.stage], np.asarray(b)[lv.stage])
    c = np.concatenate([np.asarray(t, float)[: int(lv.stage.max(initial=0))], [0.0]])  # column -1: no cut
    end, came = np.zeros(N + 1), np.full(N, N)
    for nodes in lv.levels:
        p = lv.preds[nodes]
        at = end[p] + c[lv.cuts[nodes]]  # (L, width)
        k = at.argmax(axis=1)
        ready = at[np.arange(len(nodes)), k]
        came[nodes] = p[np.arange(len(nodes)), k]  # N: nothing before it
        end[nodes] = ready + cost[nodes]
    node, path = int(np.argmax(end[:N])), []
    while node < N:
        path.append(lv.order[node])
        node = int(came[node])
    return path[::-1]
