"""Timing blocks as a pipeline runs them (`mplib.profile.measure`): on a worker, beside a steady load."""

from __future__ import annotations

import copy
import statistics
import threading
import time
from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from mplib.memory import SavedBytes
from mplib.worker import Workers

LossFn = Callable[[Any, Any], Tensor]
_COLUMNS = ("forward", "backward", "activation_bytes", "boundary_bytes")


def run(mods: list[nn.Module], devs: list[torch.device], sample_input: Any, repeats: int, loss_fn: LossFn | None,
        targets: Any, threads: int | None) -> dict[str, list]:
    """Columns of `BlockCosts`: `mods` timed on worker 0 (`devs[0]`) while the others run the `Load`.

    Each worker sets `threads` intra-op threads (None: torch's default); the `.grad`s are kept.
    """
    load = Load(mods, devs[1:], sample_input, loss_fn, targets)
    params = {id(p): p for m in mods for p in m.parameters()}
    saved_grads = {k: p.grad for k, p in params.items()}
    for p in params.values():
        p.grad = None  # backward would accumulate into an existing .grad in place
    cols: dict[str, list] = {}
    workers = Workers(len(devs), name="profile")
    try:
        timed = partial(_time_blocks, mods, devs[0], sample_input, repeats, loss_fn, targets, load, cols)
        workers.run([partial(_on_worker, threads, timed)]
                    + [partial(_on_worker, threads, load.run, w) for w in range(len(devs) - 1)],
                    abort=load.stop)  # Ctrl-C stops the load, and the timing at the next block
    finally:
        workers.close()
        for k, p in params.items():
            p.grad = saved_grads[k]
    return cols


class Load:
    """The other workers' work while blocks are timed: each trains its own copy of the whole model.

    Why a steady load beside each block rather than whole stages timed inside a real pipeline step:
    what slows a block is what runs beside it (on CPU stand-ins: shared cores, caches and memory
    bandwidth, page faults on big gradients, the GIL), and inside a real step that is the profiled
    split's neighbours and bubbles. A stage that waits for a slower one runs its blocks beside
    constant work, so they look slower than the same blocks on the slow stage and the costs favour
    the split they were measured under. The whole model on every other worker is one load for all
    blocks, and near what a balanced pipeline (the one a partitioner looks for) runs beside a stage.

    Its own copy, as each pipeline stage owns its parameters and gradients: the backward accumulates
    into the copy's `.grad`s, allocating and freeing what a stage's backward does (on CPU, big
    gradients fault fresh pages in), and the model's own parameters, buffers and `.grad`s stay out
    of it. Each copy costs the model's parameters and gradients once more.
    """

    def __init__(self, mods: list[nn.Module], devices: list[torch.device], sample_input: Any,
                 loss_fn: LossFn | None, targets: Any) -> None:
        self.loss_fn = loss_fn
        self._copies = [[m.to(d) for m in copy.deepcopy(mods)] for d in devices]
        self._inputs = [tree_map(lambda t: t.to(d) if isinstance(t, Tensor) else t, (as_args(sample_input), targets))
                        for d in devices]
        self._running = [threading.Event() for _ in devices]
        self._stop = threading.Event()

    def run(self, w: int) -> None:
        """Worker w+1's task: train micro-batch after micro-batch until `stop`."""
        mods, (x, tgt) = self._copies[w], self._inputs[w]
        try:
            while not self.stopped:
                out = mods[0](*x)
                for mod in mods[1:]:
                    out = mod(out)
                backward(out, self.loss_fn(out, tgt) if self.loss_fn is not None else None)
                self._running[w].set()  # one step done: from now on it runs at its steady pace
        finally:
            self._running[w].set()  # also when it failed: nobody waits for it forever

    def wait_until_running(self) -> None:
        for event in self._running:
            event.wait()

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()


def _on_worker(threads: int | None, task: Callable[..., None], *args: Any) -> None:
    if threads is not None:
        torch.set_num_threads(threads)  # per thread, as each of Pipeline's workers sets its own
    task(*args)


def _time_blocks(mods: list[nn.Module], dev: torch.device, sample_input: Any, repeats: int,
                 loss_fn: LossFn | None, targets: Any, load: Load, cols: dict[str, list]) -> None:
    """Worker 0's task: time the blocks once the load runs, in passes; stop the load when done.

    A warm-up pass runs every block once, each fed by the previous block's output (and keeps those
    inputs); then `repeats` passes each time every block once, and a block's time is its median
    over the passes. Passes rather than one block's repeats in a row: a slow moment of the machine
    (another program, the load's big gradient) then slows one run of every block a little instead
    of every run of one block, which would skew the balance against that block.
    """
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    for k in _COLUMNS:
        cols[k] = []
    try:
        load.wait_until_running()
        runs: list[tuple[nn.Module, tuple, Callable[[Any], Tensor] | None]] = []
        x = as_args(sample_input)
        for b, mod in enumerate(mods):  # the warm-up pass: caches, allocators, each block's input
            if load.stopped:
                return  # interrupted: the caller raises
            mod.to(dev)
            x = tree_map(lambda t: leaf(t.to(dev)) if isinstance(t, Tensor) else t, x)
            finish = None
            if loss_fn is not None and b == len(mods) - 1:
                tgt = tree_map(lambda t: t.to(dev) if isinstance(t, Tensor) else t, targets)
                finish = lambda out, tgt=tgt: loss_fn(out, tgt)  # noqa: E731
            runs.append((mod, x, finish))
            out, _, _, act = _time_block(mod, x, sync, finish)
            cols["activation_bytes"].append(act)
            cols["boundary_bytes"].append(output_bytes(out))
            x = (tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, out),)
        times: list[list[tuple[float, float]]] = [[] for _ in mods]
        for _ in range(repeats):
            for b, (mod, args, finish) in enumerate(runs):
                if load.stopped:
                    return
                _, fwd, bwd, _ = _time_block(mod, args, sync, finish)
                times[b].append((fwd, bwd))
        cols["forward"] = [statistics.median(f for f, _ in t) for t in times]
        cols["backward"] = [statistics.median(b for _, b in t) for t in times]
    finally:
        load.stop()


def _time_block(mod: nn.Module, args: tuple, sync: Callable[[], None],
                finish: Callable[[Any], Tensor] | None = None):
    """(output, forward s, backward s, saved activation bytes) of one run of a block.

    `finish` turns the output into a scalar loss inside the timed forward; backward then starts there.
    """
    own = [*mod.parameters(), *mod.buffers()]
    sync()
    t0 = time.perf_counter()
    with SavedBytes(exclude=own) as saved:
        out = mod(*args)
        loss = finish(out) if finish is not None else None
    sync()
    t1 = time.perf_counter()
    backward(out, loss)
    sync()
    t2 = time.perf_counter()
    return out, t1 - t0, t2 - t1, saved.bytes


def backward(out: Any, loss: Tensor | None) -> None:
    """Backward from `loss`, else from every output that requires grad (with gradient one)."""
    roots = [loss] if loss is not None else [t for t in tree_flatten(out)[0]
                                             if isinstance(t, Tensor) and t.requires_grad]
    if roots:
        torch.autograd.backward(roots, [torch.ones_like(t) for t in roots])


def as_args(sample_input: Any) -> tuple:
    return tuple(sample_input) if isinstance(sample_input, (tuple, list)) else (sample_input,)


def leaf(t: Tensor) -> Tensor:
    """A fresh graph input: floating tensors require grad so backward reaches the block's input."""
    t = t.detach()
    return t.requires_grad_(True) if t.is_floating_point() else t


def output_bytes(out: Any) -> int:
    """Bytes of the storages behind the tensors in `out`, each storage once: what crosses a cut."""
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes()
                for t in tree_flatten(out)[0] if isinstance(t, Tensor)}
    return sum(storages.values())
