"""What each device did and when: one record type for measured and simulated runs."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

KINDS = ("forward", "backward", "recompute", "copy", "optimizer", "collective", "other")


@dataclass(frozen=True)
class Event:
    """One interval of work on one lane (a device, or a copy engine of one)."""

    lane: int
    kind: str  # one of KINDS
    start: float  # seconds since the timeline began
    end: float
    microbatch: int | None = None
    stage: int | None = None
    label: str = ""

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class MemorySample:
    """Bytes held on one lane at one moment (e.g. activations saved for backward)."""

    lane: int
    time: float
    bytes: int


@dataclass
class Timeline:
    """Events per lane; `pipeline` measures one, `simulate` computes one, `plot` draws both.

    Example:
        tl = Timeline(lanes=["cpu:0", "cpu:1"])
        with tl.record(0, "forward", microbatch=0): y = block(x)
    """

    lanes: list[str]
    events: list[Event] = field(default_factory=list)
    memory: list[MemorySample] = field(default_factory=list)
    source: str = "measured"  # or "simulated"
    clock: Callable[[], float] = field(default=time.perf_counter, repr=False, compare=False)
    t0: float = field(default=0.0, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.t0:
            self.t0 = self.clock()

    def now(self) -> float:
        return self.clock() - self.t0

    def add(self, lane: int, kind: str, start: float, end: float, **info) -> Event:
        if kind not in KINDS:
            raise ValueError(f"event kind {kind!r} is not one of {KINDS}")
        if not 0 <= lane < len(self.lanes):
            raise ValueError(f"lane {lane} does not exist; this timeline has lanes {self.lanes}")
        if end < start:
            raise ValueError(f"event ends at {end} before it starts at {start}")
        event = Event(lane, kind, start, end, **info)
        self.events.append(event)
        return event

    @contextmanager
    def record(self, lane: int, kind: str, sync: Callable[[], None] | None = None, **info) -> Iterator[None]:
        """Time the body as one event; `sync` (e.g. torch.cuda.synchronize) runs before both clock reads."""
        if sync is not None:
            sync()
        start = self.now()
        yield
        if sync is not None:
            sync()
        self.add(lane, kind, start, self.now(), **info)

    def sample_memory(self, lane: int, nbytes: int, at: float | None = None) -> None:
        self.memory.append(MemorySample(lane, self.now() if at is None else at, int(nbytes)))

    @property
    def start(self) -> float:
        return min((e.start for e in self.events), default=0.0)

    @property
    def end(self) -> float:
        return max((e.end for e in self.events), default=0.0)

    @property
    def duration(self) -> float:
        return self.end - self.start

    def busy(self, lane: int, kinds: tuple[str, ...] = ("forward", "backward", "recompute", "optimizer")) -> float:
        """Seconds that `lane` spent computing (copies excluded), overlaps merged."""
        spans = sorted((e.start, e.end) for e in self.events if e.lane == lane and e.kind in kinds)
        total, cur_s, cur_e = 0.0, None, None
        for s, e in spans:
            if cur_e is None or s > cur_e:
                total += 0.0 if cur_e is None else cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        if cur_e is not None:
            total += cur_e - cur_s
        return total

    def utilization(self) -> list[float]:
        """Fraction of the timeline's duration each lane spent computing."""
        d = self.duration
        return [self.busy(i) / d if d > 0 else 0.0 for i in range(len(self.lanes))]

    def bubble_fraction(self, lanes: list[int] | None = None) -> float:
        """Idle share of the device-time: 1 - mean utilization over `lanes` (default: all)."""
        u = self.utilization()
        lanes = list(range(len(self.lanes))) if lanes is None else lanes
        return 1.0 - sum(u[i] for i in lanes) / len(lanes)

    def peak_memory(self, lane: int) -> int:
        return max((m.bytes for m in self.memory if m.lane == lane), default=0)

    def to_chrome_trace(self, path: str | Path | None = None) -> dict:
        """Chrome/Perfetto trace-event JSON (open in ui.perfetto.dev or chrome://tracing)."""
        trace = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": i, "args": {"name": n}}
                 for i, n in enumerate(self.lanes)]
        for e in self.events:
            name = e.label or (e.kind if e.microbatch is None else f"{e.kind[0].upper()}{e.microbatch}")
            trace.append({"name": name, "cat": e.kind, "ph": "X", "pid": 0, "tid": e.lane,
                          "ts": e.start * 1e6, "dur": e.duration * 1e6,
                          "args": {"microbatch": e.microbatch, "stage": e.stage}})
        for m in self.memory:
            trace.append({"name": f"memory {self.lanes[m.lane]}", "ph": "C", "pid": 0, "tid": m.lane,
                          "ts": m.time * 1e6, "args": {"bytes": m.bytes}})
        doc = {"traceEvents": trace, "displayTimeUnit": "ms", "otherData": {"source": self.source}}
        if path is not None:
            Path(path).write_text(json.dumps(doc))
        return doc
