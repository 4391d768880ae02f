"""Long-lived worker threads, one per device, that run the parts of a pipeline step side by side.

Why not a fresh thread per step: on CPU its first allocations fault fresh pages in. On the
benchmark GPT (benchmarks/bench_pipeline.py) a step cost about 24,000 minor page faults with new
threads and 100 to 3,700 with workers that live as long as the pipeline, and the pipeline's
speed-up over the naive split went from 1.29x to 1.42x. Workers also keep per-thread state (the
current CUDA device) from step to step.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Sequence

Task = Callable[[], None]


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
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self.threads = [threading.Thread(target=_serve, args=(box, self._done), daemon=True, name=f"{name}-{w}")
                        for w, box in enumerate(self._inboxes)]
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
        for box, task in zip(self._inboxes, tasks):
            box.put(task)
        pending, errors = len(tasks), []
        try:
            while pending:
                err = self._done.get()
                pending -= 1
                if err is not None:
                    errors.append(err)
        except BaseException:
            if abort is not None:
                abort()
            for _ in range(pending):
                self._done.get()
            raise
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Let every thread finish its current task and exit (idempotent)."""
        for box in self._inboxes:
            box.put(None)


def _serve(inbox: queue.SimpleQueue, done: queue.SimpleQueue) -> None:
    while (task := inbox.get()) is not None:
        try:
            task()
        except BaseException as exc:  # noqa: BLE001 - reaches the caller of run, never lost
            done.put(exc)
        else:
            done.put(None)
        task = None  # hold no reference between steps: the pipeline behind it can be collected
