"""The mailbox the actions of one step hand their outputs through, and what a failed action leaves in it."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

from torch import nn

from mplib.microbatch import _leaves
from mplib.schedule import Key, Schedule


class _Aborted(Exception):
    pass


@dataclass
class Failure:
    """Where a step failed: stage, micro-batch, part ("F", "B", or "L", the gathered loss) and the exception."""

    stage: int | None
    microbatch: int | None
    part: str
    exc: BaseException | None

    def where(self) -> str:
        if self.part == "L":
            return f"the loss on the gathered output failed on stage {self.stage}"
        return (f"stage {self.stage} failed on micro-batch {self.microbatch} during its "
                f"{'forward' if self.part == 'F' else 'backward'}")


def consumers(schedule: Schedule, train: bool, frozen: frozenset[int] = frozenset()) -> Counter:
    """How many actions wait for each key (`Schedule.deps`); inference runs the forwards only, and a
    step no backward of the `frozen` stages."""
    return Counter(dep for acts in schedule.actions for a in acts
                   if a.kind == "F" or (train and a.stage not in frozen) for dep in schedule.deps(a))


def frozen_prefix(stages: list[nn.Module], first_inputs: Any) -> frozenset[int]:
    """The leading stages (never the last) with no parameter that trains and an input needing no gradient."""
    if any(t.requires_grad for t in _leaves(first_inputs)):
        return frozenset()
    n = 0
    while n < len(stages) - 1 and not any(p.requires_grad for p in stages[n].parameters()):
        n += 1
    return frozenset(range(n))


class Mailbox:
    """What an action hands on, keyed by its `Action.key`; the last of its `consumers` to take it removes it."""

    def __init__(self, consumers: Counter) -> None:
        self._cv, self._items, self._consumers = threading.Condition(), {}, consumers
        self.error: Failure | None = None

    def wanted(self, key: Key) -> bool:
        return self._consumers[key] > 0

    def put(self, key: Key, value: Any) -> None:
        if self.wanted(key):  # nobody waits for B of stage 0, nor, in inference, for the last forward
            with self._cv:
                self._items[key] = [value, self._consumers[key]]
                self._cv.notify_all()

    def get(self, key: Key) -> Any:
        with self._cv:
            self._cv.wait_for(lambda: key in self._items or self.error is not None)
            if self.error is not None:
                raise _Aborted
            entry = self._items[key]
            entry[1] -= 1
            if not entry[1]:
                del self._items[key]
            return entry[0]

    def fail(self, failure: Failure) -> None:
        with self._cv:
            if self.error is None:
                self.error = failure
            self._cv.notify_all()

    def clear(self) -> None:
        with self._cv:
            self._items.clear()
