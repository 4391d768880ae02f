"""Long-lived worker threads, one per device, that run the parts of a pipeline step side by side.

Threads that outlive a step keep their memory pages and per-thread state (the current CUDA device).
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Sequence

Task = Callable[[], None]
_POLL_S = 0.1  # the caller waits in slices: a Ctrl-C that lands just before a blocking wait still gets through


class Workers:
    """`n` daemon threads, each waiting (blocked, no CPU) for the next task handed to it.

    Example:
        workers = Workers(2)
        workers.run([lambda: print("stage 0"), lambda: print("stage 1")])   # both at once
        workers.close()
    """

    def __init__(self, n: int, name: str = "worker") -> None:
        if n < 1:
            raise ValueError(f"Workers needs at least one thread, got n={n}")
        self._inboxes: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(n)]
        # set while worker w has no task: the workers keep this state, so an interrupted caller cannot lose it
        self._idle = [threading.Event() for _ in range(n)]
        self._errors: list[BaseException | None] = [None] * n
        for idle in self._idle:
            idle.set()
        self.threads = [threading.Thread(target=_serve, args=(w, box, self._idle[w], self._errors), daemon=True,
                                         name=f"{name}-{w}") for w, box in enumerate(self._inboxes)]
        for t in self.threads:
            t.start()

    def __len__(self) -> int:
        return len(self._inboxes)

    def run(self, tasks: Sequence[Task], abort: Task | None = None) -> None:
        """Run `tasks[w]` on worker `w`, all at the same time; return once every task has ended.

        An exception that escapes a task is re-raised here (the first one, its traceback kept).
        If the caller is interrupted while it waits (Ctrl-C in a notebook), `abort()` is called to
        tell the tasks to stop, they are waited for, and the interruption goes on: no task is
        left running into the next step.
        """
        if len(tasks) != len(self):
            raise ValueError(f"{len(tasks)} tasks for {len(self)} workers; give one task per worker")
        _wait(self._idle)  # a run left by a second Ctrl-C: its tasks end before new ones start
        for box, idle, task in zip(self._inboxes, self._idle, tasks):
            idle.clear()
            box.put(task)
        try:
            _wait(self._idle)
        except BaseException:
            if abort is not None:
                abort()
            _wait(self._idle)
            raise
        errors = [e for e in self._errors if e is not None]
        self._errors[:] = [None] * len(self)  # hold no exception (nor the frames of its traceback) between runs
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Let every thread finish its current task and exit (idempotent)."""
        for box in self._inboxes:
            box.put(None)


def _wait(events: list[threading.Event]) -> None:
    for event in events:
        while not event.wait(_POLL_S):
            pass


def _serve(w: int, inbox: queue.SimpleQueue, idle: threading.Event, errors: list) -> None:
    while (task := inbox.get()) is not None:
        try:
            task()
        except BaseException as exc:  # noqa: BLE001 - reaches the caller of run, never lost
            errors[w] = exc
        task = None  # hold no reference between steps: the pipeline behind it can be collected
        idle.set()
