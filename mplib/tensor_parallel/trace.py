"""Counting a tensor-parallel step: every collective (kind, bytes, group, layer) and a timeline per rank.

    with trace(tp) as tr:
        tp(x).sum().backward()
    tr.counts()            # Counter({('forward', 'all_reduce'): ..., ('backward', 'all_reduce'): ...})
    mplib.plot.timeline(tr.timeline)    # compute and collectives per rank

Compute spans are the time a rank spent between two collectives. In one process, autograd runs
every rank's backward on one thread, so a backward span there covers the work of all ranks.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from mplib.tensor_parallel.group import Collective, Group
from mplib.tensor_parallel.local import LocalGroup
from mplib.timeline import Timeline


class Trace:
    """What the ranks of one group did while the trace was on: `collectives` and `timeline`."""

    def __init__(self, lanes: list[str], lane_of: dict[int, int], t0: float | None = None) -> None:
        self.collectives: list[Collective] = []
        self.timeline = Timeline(lanes=lanes, clock=time.perf_counter, t0=t0 or time.perf_counter())
        self._lane_of, self._mark, self._phase = lane_of, {}, {}
        self._lock, self._backward_pending = threading.Lock(), False

    def begin(self, ranks: Iterable[int], phase: str) -> None:
        now = time.perf_counter()
        with self._lock:
            for r in ranks:
                self._mark[r], self._phase[r] = now, phase

    def end(self, rank: int) -> None:
        """A rank's forward returned: its last compute span ends now."""
        with self._lock:
            self._span(rank, "forward", time.perf_counter())

    def on_collective(self, c: Collective, spans: Sequence[tuple[int, float, float]]) -> None:
        with self._lock:
            self.collectives.append(c)
            for rank, start, end in spans:
                self._span(rank, c.phase, start)
                lane = self._lane_of[rank]
                t0 = self.timeline.t0
                self.timeline.add(lane, "collective", start - t0, max(end, start) - t0, microbatch=0,
                                  label=f"{c.kind} {c.label}")
                self._mark[rank], self._phase[rank] = end, c.phase
            if c.phase == "backward" and not self._backward_pending:
                self._backward_pending = True  # close the last backward span when autograd finishes
                torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)

    def _backward_done(self) -> None:
        now = time.perf_counter()
        with self._lock:
            self._backward_pending = False
            for rank in list(self._mark):
                if self._phase.get(rank) == "backward":
                    self._span(rank, "backward", now)

    def _span(self, rank: int, kind: str, until: float) -> None:
        start = self._mark.pop(rank, None)
        if start is not None and until > start:
            t0 = self.timeline.t0
            self.timeline.add(self._lane_of[rank], kind, start - t0, until - t0, microbatch=0)  # one batch per step

    def counts(self, phase: str | None = None) -> Counter:
        """Collectives by (phase, kind), or by kind for one `phase`."""
        if phase is not None:
            return Counter(c.kind for c in self.collectives if c.phase == phase)
        return Counter((c.phase, c.kind) for c in self.collectives)

    def by_layer(self) -> dict[str, Counter]:
        """{layer: Counter((phase, kind))}, a layer being a label's prefix up to its first number ("h.0")."""
        out: dict[str, Counter] = {}
        for c in self.collectives:
            m = re.match(r"(.*?\.\d+)(\.|$)", c.label)
            out.setdefault(m.group(1) if m else c.label, Counter())[(c.phase, c.kind)] += 1
        return out

    def bytes(self, phase: str | None = None) -> int:
        return sum(c.nbytes for c in self.collectives if phase is None or c.phase == phase)


def _group_of(obj: nn.Module | Group | LocalGroup) -> Group | LocalGroup:
    from mplib.tensor_parallel.parallelize import TensorParallel, _ranks_of

    if isinstance(obj, TensorParallel):
        return obj.group
    if isinstance(obj, (Group, LocalGroup)):
        return getattr(obj, "world", obj)
    return _ranks_of(obj)[1]  # type: ignore[return-value]


@contextmanager
def trace(model_or_group: nn.Module | Group | LocalGroup, t0: float | None = None) -> Iterator[Trace]:
    """Record every collective of a parallelized model (or a group) and a timeline, while inside.

    Over torch.distributed each process records its own rank; give every rank the same `t0`
    (a `time.perf_counter()` of the parent: one clock on one machine) and `merge` their timelines.

    Example:
        with trace(tp) as tr:
            loss = tp(x).sum(); loss.backward()
        print(tr.by_layer()["h.0"])
    """
    group = _group_of(model_or_group)
    if isinstance(group, LocalGroup):
        lanes, lane_of = [f"rank {r} ({d})" for r, d in enumerate(group.devices)], {r: r for r in range(group.size)}
    else:
        lanes, lane_of = [f"rank {group.rank} ({group.device})"], {group.rank: 0}
    tr = Trace(lanes, lane_of, t0)
    group.listeners.append(tr)
    try:
        yield tr
    finally:
        group.listeners.remove(tr)


def merge(timelines: Sequence[Timeline]) -> Timeline:
    """One timeline with the lanes of several (e.g. one per process, on one clock), starting at the
    first event of any of them."""
    base = min(tl.t0 + tl.start for tl in timelines if tl.events)
    out = Timeline(lanes=[lane for tl in timelines for lane in tl.lanes], source=timelines[0].source, t0=base)
    offset = 0
    for tl in timelines:
        for e in tl.events:
            shift = tl.t0 - base
            out.add(e.lane + offset, e.kind, e.start + shift, e.end + shift, microbatch=e.microbatch,
                    stage=e.stage, label=e.label)
        offset += len(tl.lanes)
    return out
