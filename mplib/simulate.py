"""Time a schedule over per-stage costs and link transfer times, producing a simulated Timeline.

Every device runs its action list in order, each action as early as its dependencies allow:
F of micro-batch m on (virtual) stage j waits for F of m on stage j-1 plus the transfer across
that cut; B waits for its own F and for B of m on stage j+1 plus the transfer back. Links are
separate copy engines: a copy delays its receiver but never occupies a device.
"""

from __future__ import annotations

from typing import Callable, Sequence

from mplib.schedule import Action, Schedule, _deps
from mplib.timeline import Timeline

Costs = Sequence[float]


def action_times(s: Schedule, forward: Callable[[int], float], backward: Callable[[int], float],
                 transfer: Callable[[int], float]) -> dict[Action, tuple[float, float]]:
    """(start, end) of every action; `forward(j)`/`backward(j)` cost on virtual stage j, `transfer(j)`
    the delay across the cut after stage j. Works with floats or Fractions (exact arithmetic).

    Example:
        times = action_times(build("gpipe", 2, 2), lambda j: 1, lambda j: 2, lambda j: 0)
        max(end for _, end in times.values())     # 9
    """
    K = s.stages
    end: dict[tuple[int, int, str], float] = {}
    times: dict[Action, tuple[float, float]] = {}
    free = [0] * K
    pos = [0] * K
    while any(pos[d] < len(s.actions[d]) for d in range(K)):
        progressed = False
        for d in range(K):
            while pos[d] < len(s.actions[d]):
                a = s.actions[d][pos[d]]
                deps = _deps(s, a)
                if any(dep not in end for dep in deps):
                    break
                j = s.virtual_stage(a)
                ready = free[d]
                for dj, dm, dk in deps:
                    # a dependency on another stage crosses a cut: the cut after min(j, dj)
                    hop = transfer(min(j, dj)) if dj != j and (dj % K) != (j % K) else 0
                    ready = max(ready, end[(dj, dm, dk)] + hop)
                cost = forward(j) if a.kind == "F" else backward(j)
                times[a] = (ready, ready + cost)
                end[(j, a.microbatch, a.kind)] = free[d] = ready + cost
                pos[d] += 1
                progressed = True
        if not progressed:
            raise ValueError(f"schedule {s.name!r} deadlocks; run mplib.schedule.validate on it for details")
    return times


def _per_stage(costs: Costs, s: Schedule, what: str) -> list[float]:
    """Per-virtual-stage costs from per-device (split over v chunks) or per-virtual-stage lists."""
    K, v, c = s.stages, s.virtual, list(costs)
    if len(c) == K * v:
        return [float(x) for x in c]
    if len(c) == K:
        return [float(c[j % K]) / v for j in range(K * v)]
    raise ValueError(f"{what} has {len(c)} entries; give one per device ({K})"
                     + (f" or one per virtual stage ({K * v})" if v > 1 else ""))


def _per_cut(transfer: Costs, s: Schedule) -> list[float]:
    n, t = s.stages * s.virtual - 1, [float(x) for x in transfer]
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
    chunks) or per virtual stage. `transfer[j]`: seconds to send one micro-batch's activation
    across the cut after stage j (its gradient takes as long back); copies appear on link lanes.
    `bytes_per_microbatch` (per device, or one for all) adds memory samples: activations held
    from a forward's end to its backward's end. `recompute=True` runs the forward again (a
    "recompute" event) before each backward, as activation checkpointing does.

    Example:
        tl = simulate(build("1f1b", 4, 8), forward=[1] * 4, backward=[2] * 4, transfer=[0.1] * 3)
        tl.bubble_fraction([0, 1, 2, 3]); mplib.plot.timeline(tl)
    """
    K = schedule.stages
    f, b = _per_stage(forward, schedule, "forward"), _per_stage(backward, schedule, "backward")
    t = _per_cut(transfer, schedule)
    bwd = [b[j] + (f[j] if recompute else 0.0) for j in range(len(b))]
    times = action_times(schedule, lambda j: f[j], lambda j: bwd[j], lambda j: t[j])
    n_links = (K if schedule.virtual > 1 else K - 1) if any(x > 0 for x in t) and K > 1 else 0
    names = list(lanes) if lanes is not None else [f"stage {d}" for d in range(K)]
    tl = Timeline(lanes=names + [f"link {d}->{(d + 1) % K}" for d in range(n_links)],
                  source="simulated", t0=1.0)
    for a, (start, end) in sorted(times.items(), key=lambda kv: kv[1]):
        j = schedule.virtual_stage(a)
        info = dict(microbatch=a.microbatch, stage=j, label=str(a))
        if a.kind == "B" and recompute:
            tl.add(a.stage, "recompute", start, start + f[j], **info)
            start += f[j]
        tl.add(a.stage, "forward" if a.kind == "F" else "backward", start, end, **info)
        cut = j if a.kind == "F" else j - 1  # forward sends right, backward sends the gradient left
        if n_links and 0 <= cut < len(t) and t[cut] > 0 and (cut % K) != ((cut + 1) % K):
            tl.add(K + cut % K, "copy", end, end + t[cut], **info)
    if bytes_per_microbatch is not None:
        _sample_memory(tl, schedule, times, bytes_per_microbatch)
    return tl


def _sample_memory(tl: Timeline, s: Schedule, times: dict[Action, tuple[float, float]],
                   nbytes: float | Sequence[float]) -> None:
    per_dev = [float(nbytes)] * s.stages if isinstance(nbytes, (int, float)) else [float(x) for x in nbytes]
    if len(per_dev) != s.stages:
        raise ValueError(f"bytes_per_microbatch has {len(per_dev)} entries; give one per device ({s.stages}) "
                         "or a single number")
    for d in range(s.stages):
        held, changes = 0.0, sorted((end, 1 if a.kind == "F" else -1)
                                    for a, (_, end) in times.items() if a.stage == d)
        tl.sample_memory(d, 0, at=0.0)
        for at, sign in changes:
            held += sign * per_dev[d] / s.virtual
            tl.sample_memory(d, round(held), at=at)
