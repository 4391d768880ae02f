"""Several processes under torch.distributed: `launch(fn, nprocs)` runs and bounds them here; `init` joins torchrun's.

Each process is spawned fresh (torch.multiprocessing), joins a gloo process group through a
TCPStore that this process serves on 127.0.0.1 (a port the OS picks free when it binds, so no
other job can take it in between; a timeout on every collective), runs `fn(rank, world_size, *args)` and sends its
return value back. A rank that raises or dies ends the whole job within `grace` seconds, and the
whole job ends by `timeout`: `launch` raises naming the rank and why, and never hangs.
Under `torchrun` (one machine or several), each process calls `init()` instead.
"""

from __future__ import annotations

import datetime
import io
import multiprocessing.connection
import os
import pickle
import queue
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class LaunchError(RuntimeError):
    """A rank raised, died or ran out of time; `rank` says which (None: the whole job timed out)."""

    def __init__(self, message: str, rank: int | None) -> None:
        super().__init__(message)
        self.rank = rank


def launch(fn: Callable[..., Any], nprocs: int, *args: Any, timeout: float = 120.0, backend: str = "gloo",
           threads: int | None = 1, grace: float = 2.0) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `nprocs` local processes; their return values in rank order.

    `fn` must be importable by a fresh process (defined in a module, not in a notebook cell), and
    its arguments and result picklable (tensors are fine). `timeout` bounds the whole run and
    every collective; `threads`: intra-op threads per process (1 suits CPU stand-ins). When a rank
    fails, the others (often stuck in a collective with it) get `grace` seconds, then are stopped.

    Example (several processes):
        # job.py (a module, importable by a fresh process): def step(rank, world, n): return rank * n
        results = launch(job.step, 2, 10, timeout=60)   # [0, 10]: rank 0's result, then rank 1's
    """
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"nprocs must be a positive int (processes to start), got {nprocs!r}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout!r}")
    _check_importable(fn)
    ctx = _context()
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=timeout),
                          wait_for_workers=False)  # port 0: the OS picks a free one as it binds
    inbox, port, got, errors = ctx.Queue(), store.port, {}, {}
    procs = [ctx.Process(target=_worker, args=(r, fn, args, nprocs, port, backend, timeout, threads, inbox),
                         name=f"rank-{r}", daemon=True) for r in range(nprocs)]
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.start()
        while len(got) < nprocs:
            _drain(inbox, got, errors)
            failed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if failed:
                raise _failure(procs, failed, inbox, got, errors, grace)
            if all(p.exitcode == 0 for p in procs):
                _drain(inbox, got, errors, wait=5.0, want=nprocs)  # what they sent may still be in the pipe
                break
            if time.monotonic() > deadline:
                running = [r for r, p in enumerate(procs) if p.is_alive()]
                raise LaunchError(f"the job ran past its timeout of {timeout:.0f} s; ranks {running} were still "
                                  "running and were stopped (a rank waiting for another, or just slow: raise "
                                  "timeout=...)", None)
            multiprocessing.connection.wait([p.sentinel for p in procs], timeout=0.05)
    finally:
        _stop(procs, grace)
        inbox.close()
        del store
    missing = [r for r in range(nprocs) if r not in got]
    if missing:
        raise LaunchError(f"ranks {missing} exited without sending a result", missing[0])
    return [torch.load(io.BytesIO(got[r]), weights_only=False) for r in range(nprocs)]


def _worker(rank: int, fn: Callable[..., Any], args: tuple, world: int, port: int, backend: str,
            timeout: float, threads: int | None, inbox: Any) -> None:
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=timeout))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
        out = fn(rank, world, *args)
    except BaseException as exc:  # noqa: BLE001 - reported (with the time, to find the first) before the group closes
        inbox.put(("error", rank, time.time(), f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        raise SystemExit(1) from None
    buf = io.BytesIO()
    torch.save(out, buf)  # bytes through the pipe: no shared memory that dies with this process
    inbox.put(("result", rank, buf.getvalue()))
    dist.destroy_process_group()


def _drain(inbox: Any, got: dict, errors: dict, wait: float = 0.0, want: int | None = None) -> None:
    end = time.monotonic() + wait
    while want is None or len(got) < want:
        try:
            msg = inbox.get(timeout=0.05) if wait else inbox.get_nowait()
        except queue.Empty:
            if time.monotonic() >= end:
                return
            continue
        if msg[0] == "result":
            got[msg[1]] = msg[2]
        else:
            errors[msg[1]] = msg[2:]


def _failure(procs: list, failed: list[int], inbox: Any, got: dict, errors: dict, grace: float) -> LaunchError:
    """The root cause: a rank killed by a signal, else the rank that raised first (the others raise after
    it, their collectives broken); collected for up to `grace` seconds while the others stop."""
    killed = [r for r in failed if procs[r].exitcode < 0]
    _drain(inbox, got, errors, wait=min(grace, 1.0))
    n = len(procs)
    if killed:
        r = killed[0]
        import signal

        name = signal.Signals(-procs[r].exitcode).name
        return LaunchError(f"rank {r} of {n} died (process {r} terminated with signal {name}) before returning; "
                           "the other ranks were stopped", r)
    if errors:
        r = min(errors, key=lambda k: errors[k][0])
        _, message, tb = errors[r]
        return LaunchError(f"rank {r} of {n} raised {message}; the other ranks were stopped.\n\n{tb}", r)
    r = failed[0]
    return LaunchError(f"rank {r} of {n} exited with code {procs[r].exitcode} before returning; the other ranks "
                       "were stopped", r)


def _stop(processes: list, grace: float) -> None:
    """Give every process still alive `grace` seconds, then terminate, then kill, and reap them all."""
    end = time.monotonic() + grace
    for p in processes:
        if p.is_alive():
            p.join(max(0.0, end - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + grace
    for p in processes:
        if p.pid is None:
            continue
        p.join(max(0.0, end - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def _check_importable(fn: Callable[..., Any]) -> None:
    in_notebook = getattr(fn, "__module__", None) == "__main__" and not hasattr(__import__("__main__"), "__file__")
    if in_notebook or "<" in getattr(fn, "__qualname__", ""):
        raise ValueError(f"{getattr(fn, '__qualname__', fn)!r} cannot be started in a fresh process: it is defined in "
                         "a notebook or is a lambda/local function. Define it at the top level of a .py module "
                         "(for a notebook: write it to a file and import it)")
    try:
        pickle.dumps(fn)
    except Exception as exc:  # noqa: BLE001 - the reason is in the message
        raise ValueError(f"{fn!r} cannot be sent to a fresh process ({exc}); define it at the top level of a module")


def init(backend: str | None = None, timeout: float = 120.0) -> tuple[int, int]:
    """Join the process group that `torchrun` set up (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); (rank, world size).

    `backend`: "nccl" when this machine has a GPU, else "gloo"; `timeout` bounds the rendezvous and
    every collective. A rendezvous that cannot be reached raises within `timeout` naming the address.

    Example (several processes):
        rank, world = mplib.distributed.init(timeout=60)   # in a script started by torchrun --nproc-per-node 2
    """
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"init() joins a job started by torchrun, but {', '.join(missing)} is not set; start this "
                           "script with `torchrun --nproc-per-node N script.py`, or call mplib.distributed.launch("
                           "fn, N) from Python")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout))
    except Exception as exc:  # noqa: BLE001 - the store's errors (DistStoreError, timeouts) say little alone
        raise RuntimeError(f"rank {rank} of {world} could not join the rendezvous at {where} within {timeout:.0f} s "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); start the first "
                           "node (rank 0) too, check the address and port (MASTER_ADDR/MASTER_PORT, torchrun's "
                           "--rdzv-endpoint) and that no firewall blocks it") from exc
    return rank, world


def _context() -> Any:
    """A forkserver that imported torch once: each rank forks from it in a fraction of a second, instead of
    a fresh interpreter importing torch again (seconds per rank on a small machine). Fork is safe there:
    the server has run no torch code (no threads, no CUDA); "spawn" where forkserver does not exist."""
    try:
        ctx = mp.get_context("forkserver")
    except ValueError:
        return mp.get_context("spawn")
    # transformers too: mplib.layers asks it whether a model is an HF one (seconds to import)
    ctx.set_forkserver_preload(["torch", "torch.distributed", "transformers.modeling_utils", "mplib.distributed",
                                "mplib.layers"])
    return ctx
