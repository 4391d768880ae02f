"""T ranks in one process: rank r is a thread working on device r, and the collectives meet across them.

A collective is computed once, across the shards' devices, by the last rank to arrive; a rank
that fails or never arrives releases the others with an error instead of a hang.
"""

from __future__ import annotations

import threading
import time
import weakref
from contextlib import ExitStack
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

import mplib.env
from mplib.tensor_parallel.group import KINDS, Collective, Device, Group, _nbytes
from mplib.worker import Workers


def across(kind: str, xs: list[Tensor], dim: int = -1, op: str = "sum") -> list[Tensor]:
    """One collective computed across T shards in one process: xs[r] lives on rank r's device.

    Also the local mappings' "identity" and "split" (no communication) and "first" (rank 0's value
    everywhere). Sums run in rank order on rank 0's device, so every rank gets the same bits.
    """
    T, devs = len(xs), [x.device for x in xs]
    if kind == "identity":
        return list(xs)
    if kind == "split":
        return [x.chunk(T, dim)[r].contiguous() for r, x in enumerate(xs)]
    if kind == "first":
        return [xs[0].to(d, copy=True) for d in devs]
    if kind == "all_gather":
        full = torch.cat([x.to(devs[0]) for x in xs], dim)
        return [full] + [full.to(d, copy=True) for d in devs[1:]]
    total = xs[0].clone()
    for x in xs[1:]:
        total = torch.maximum(total, x.to(devs[0])) if op == "max" else total + x.to(devs[0])
    if kind == "all_reduce":
        return [total] + [total.to(d, copy=True) for d in devs[1:]]
    if kind == "reduce_scatter":
        return [part.to(d, copy=True).contiguous() for part, d in zip(total.chunk(T, dim), devs)]
    raise ValueError(f"unknown collective {kind!r}; use one of {KINDS}, 'identity', 'split' or 'first'")


class _Rendezvous:
    """Where the T rank threads of one `LocalGroup.run` meet at each collective (per-call state)."""

    def __init__(self, size: int, timeout: float) -> None:
        self.size, self.timeout = size, timeout
        self.cv = threading.Condition()
        self.slots: list[Any] = [None] * size
        self.arrived, self.generation, self.result = 0, 0, None
        self.error: BaseException | None = None

    def exchange(self, rank: int, what: tuple, value: Any, compute: Callable[[list, list[float]], list]) -> Any:
        """Deposit `value`; the last rank to arrive runs `compute(values, arrival times)`; returns result[rank]."""
        with self.cv:
            if self.error is not None:
                raise _Aborted()
            arrive = time.perf_counter()
            gen = self.generation
            self.slots[rank] = (what, value, arrive)
            self.arrived += 1
            if self.arrived == self.size:
                whats = [s[0] for s in self.slots]
                if any(w != whats[0] for w in whats):
                    calls = ", ".join(f"rank {r}: {w[0]} of {w[1]}" for r, w in enumerate(whats))
                    self.fail(RuntimeError(f"the ranks called different collectives ({calls}); every rank must "
                                           "run the same code on equally shaped inputs"))
                    raise self.error  # type: ignore[misc]
                try:
                    self.result = compute([s[1] for s in self.slots], [s[2] for s in self.slots])
                except BaseException as exc:
                    self.fail(exc)
                    raise
                self.slots, self.arrived, self.generation = [None] * self.size, 0, gen + 1
                self.cv.notify_all()
                return self.result[rank]
            done = self.cv.wait_for(lambda: self.generation != gen or self.error is not None, self.timeout)
            if self.error is not None:
                raise _Aborted()
            if not done:
                missing = [r for r, s in enumerate(self.slots) if s is None]
                self.fail(TimeoutError(f"rank {rank} waited {self.timeout:.0f} s at a {what[0]} for ranks {missing}, "
                                       "which never arrived; raise LocalGroup(timeout=...) if they are only slow"))
                raise self.error  # type: ignore[misc]
            return self.result[rank]  # stable: the next exchange cannot complete without this rank

    def fail(self, exc: BaseException) -> None:
        with self.cv:
            if self.error is None:
                self.error = exc
            self.cv.notify_all()


class _Aborted(Exception):
    """Another rank failed first; this rank stops at its next collective."""


class LocalGroup:
    """T ranks in one process: rank r is a thread working on `devices[r]` (a GPU or a CPU stand-in).

    `run(fn, *args)` calls `fn(group.ranks[r], *args)` on every rank at once and returns rank 0's
    result; the collectives that `fn` calls meet across the threads. A rank that raises stops the
    others at their next collective, and `run` raises its exception (the rank is named in a note).

    Example:
        group = LocalGroup(["cpu", "cpu"])
        group.run(lambda g, x: g.all_reduce(x * (g.rank + 1)), torch.ones(2))   # tensor([3., 3.])
    """

    def __init__(self, devices: Sequence[Device], timeout: float = 120.0, threads: int | None = None) -> None:
        devs = [mplib.env.check_device(d) for d in devices]
        if not devs:
            raise ValueError("a LocalGroup needs at least one device, e.g. LocalGroup(mplib.env.get_devices(2))")
        cuda = [str(d) for d in devs if d.type == "cuda"]
        if len(set(cuda)) < len(cuda):
            raise ValueError(f"devices {[str(d) for d in devs]} repeat a GPU; each rank needs its own (autograd runs "
                             "one backward thread per GPU), so use one GPU per rank or CPU stand-ins ['cpu'] * T")
        self.devices, self.size, self.timeout, self.threads = devs, len(devs), float(timeout), threads
        self.name = f"local[{', '.join(str(d) for d in devs)}]"
        self.listeners: list = []
        self.ranks = [_LocalRank(self, r) for r in range(self.size)]
        self._rdv: _Rendezvous | None = None
        self._lock = threading.Lock()
        self._workers: Workers | None = None

    def __repr__(self) -> str:
        return f"LocalGroup({[str(d) for d in self.devices]})"

    def run(self, fn: Callable[..., Any], *args: Any, replicated: bool = True, **kwargs: Any) -> Any:
        """`fn(rank_group, *args, **kwargs)` on every rank; rank 0's result (or all, `replicated=False`).

        Tensors in `args`/`kwargs` reach each rank on its device. With `replicated=True` the result
        must be the same on every rank (a loss, gathered logits): a backward through it hands its
        gradient to every rank, as when each process of a job calls `loss.backward()` on its own.
        """
        from mplib.tensor_parallel.mappings import enter, leave

        if not self._lock.acquire(blocking=False):
            raise RuntimeError(f"{self} is already running a step; call run() again once it returns")
        try:
            per_rank = enter(self, (args, kwargs))
            results: list[Any] = [None] * self.size
            failures: list[tuple[float, int, BaseException]] = []
            grad, regions = torch.is_grad_enabled(), _autocast_regions()
            self._rdv = rdv = _Rendezvous(self.size, self.timeout)
            for listener in list(self.listeners):
                listener.begin(range(self.size), "forward")

            def task(r: int) -> Callable[[], None]:
                def work() -> None:
                    try:
                        with _rank_context(self.devices[r], grad, regions, self.threads):
                            a, k = per_rank[r]
                            results[r] = fn(self.ranks[r], *a, **k)
                        for listener in list(self.listeners):
                            listener.end(r)
                    except BaseException as exc:  # noqa: BLE001 - re-raised by run, naming the rank
                        if not isinstance(exc, _Aborted):
                            failures.append((time.perf_counter(), r, exc))
                        rdv.fail(exc)
                return work

            if self._workers is None:
                self._workers = Workers(self.size, name="tp-rank")
                weakref.finalize(self, self._workers.close)
            self._workers.run([task(r) for r in range(self.size)], abort=lambda: rdv.fail(KeyboardInterrupt()))
        finally:
            self._rdv = None
            self._lock.release()
        if failures:
            _, r, exc = min(failures, key=lambda f: f[0])
            if hasattr(exc, "add_note"):
                exc.add_note(f"(raised on tensor-parallel rank {r} of {self.size}, device {self.devices[r]})")
            raise exc
        return leave(self, results) if replicated else results

    def exchange(self, rank: int, what: tuple, value: Any, compute: Callable[[list, list[float]], list]) -> Any:
        if self._rdv is None:
            raise RuntimeError(f"rank {rank} of {self} called a collective outside a step: call the parallel model, "
                               "or run your function on every rank with group.run(fn, ...)")
        return self._rdv.exchange(rank, what, value, compute)


class _LocalRank(Group):
    """Rank r's handle on a LocalGroup: what its layers hold and call."""

    def __init__(self, world: LocalGroup, rank: int) -> None:
        self.world, self.rank, self.size = world, rank, world.size
        self.device, self.name, self.listeners = world.devices[rank], world.name, world.listeners

    def __repr__(self) -> str:
        return f"rank {self.rank} of {self.world}"

    def _collective(self, kind: str, x: Tensor, dim: int, op: str, phase: str, label: str) -> Tensor:
        def compute(xs: list[Tensor], arrivals: list[float]) -> list[Tensor]:
            out = across(kind, xs, dim, op)
            end = time.perf_counter()
            self._report(Collective(kind, _nbytes(kind, xs[0], self.size), self.size, self.name, phase, label, op),
                         [(r, t, end) for r, t in enumerate(arrivals)])
            return out
        return self.exchange((kind, tuple(x.shape), str(x.dtype)), x, compute)

    def exchange(self, what: tuple, value: Any, compute: Callable[[list, list[float]], list]) -> Any:
        """Meet the other ranks: the last to arrive runs `compute(values, arrival times)`; each gets its entry."""
        return self.world.exchange(self.rank, what, value, compute)

    def all_reduce(self, x: Tensor, op: str = "sum", phase: str = "forward", label: str = "") -> Tensor:
        return self._collective("all_reduce", x, -1, op, phase, label)

    def all_gather(self, x: Tensor, dim: int, phase: str = "forward", label: str = "") -> Tensor:
        return self._collective("all_gather", x, dim, "sum", phase, label)

    def reduce_scatter(self, x: Tensor, dim: int, phase: str = "forward", label: str = "") -> Tensor:
        return self._collective("reduce_scatter", x, dim, "sum", phase, label)


def _autocast_regions() -> list[tuple[str, torch.dtype]]:
    return [(t, torch.get_autocast_dtype(t)) for t in ("cpu", "cuda") if torch.is_autocast_enabled(t)]


class _rank_context:
    """On a rank thread: the caller's grad mode and autocast (both thread-local), its GPU, its threads."""

    def __init__(self, device: torch.device, grad: bool, regions: list, threads: int | None) -> None:
        self.device, self.grad, self.regions, self.threads = device, grad, regions, threads
        self.stack = ExitStack()

    def __enter__(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.stack.enter_context(torch.set_grad_enabled(self.grad))
        for device_type, dtype in self.regions:
            self.stack.enter_context(torch.autocast(device_type, dtype=dtype))

    def __exit__(self, *exc: Any) -> None:
        self.stack.close()
