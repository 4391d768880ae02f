"""One pipeline step: its mailbox, saved activations, loss, timeline and seed, built per call and then dropped."""

from __future__ import annotations

import threading
from contextlib import ExitStack, contextmanager, nullcontext
from functools import partial
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from mplib import _batchnorm
from mplib._losses import LOSSES, InLoss, fresh_leaf, pairs
from mplib._mailbox import Failure, Mailbox, _Aborted, consumers, frozen_prefix
from mplib.memory import SavedBytes
from mplib.microbatch import _leaves, batch_size, gather, scatter
from mplib.schedule import Action
from mplib.timeline import Timeline
from mplib.transfer import map_tensors, to_device
from mplib.worker import Workers

_RNG_LOCK = threading.Lock()  # one global generator: forwards that draw from it, and recomputes, take turns


# -- the step ------------------------------------------------------------------------------------

class Runner:
    """Everything of one step (or one inference call) of `pipe`; `run` it once, read `result`, `close` it.

    Each stage's graph is its own: stage j+1 receives stage j's output detached (a fresh leaf), and
    the backward of micro-batch m on stage j is `torch.autograd.backward(output, grad)` with the
    gradient stage j+1 computed for that leaf. An action takes what it waits for (`Schedule.deps`)
    from the mailbox, where the producing action left it under its own key.
    """

    def __init__(self, pipe: Any, batch: Any, targets: Any = None, train: bool = False,
                 loss_fn: Callable[[Any, Any], Tensor] | None = None, count: Callable[[Any], int] | None = None) -> None:
        self.schedule, self.stages, self.devices = pipe.schedule, pipe._stages, pipe.devices
        self.checkpoint, self.threads, self.moves = pipe.checkpoint, pipe.threads, pipe._moves
        self.non_blocking, self.train, self.last = pipe._non_blocking, train, len(pipe._stages) - 1
        self.mbs = scatter(batch, pipe.chunks)
        sizes = [batch_size(m) for m in self.mbs]
        self.loss = LOSSES[pipe.loss_on](loss_fn, targets, sizes, count) if train else None
        # frozen stages (mplib.speedups.freeze): forward without a graph, and no backward action at all
        self.frozen = frozen_prefix(self.stages, self.mbs[0]) if train else frozenset()
        self.box, self.outputs = Mailbox(consumers(self.schedule, train, self.frozen) if self.frozen
                                         else pipe._consumers[train]), {}
        self.autocast = [(t, torch.get_autocast_dtype(t)) for t in ("cpu", "cuda") if torch.is_autocast_enabled(t)]
        self.random = pipe._seeds is not None or (pipe.model.training and _has_dropout(pipe.model))
        self.step_seed = None  # one draw per step: reproducible under torch.manual_seed, new masks every step
        if self.random:
            self.step_seed = int(torch.randint(2**62, (1,), generator=pipe._seeds).item())
        self.params = list(pipe.model.parameters())  # not activations: SavedBytes skips them
        names = [("stage" if pipe.virtual == 1 else "device") + f" {w}: {d}" for w, d in enumerate(self.devices)]
        self.timeline, self.held = Timeline(lanes=names), [0] * len(self.devices)
        for w in range(len(self.devices)):
            self.timeline.sample_memory(w, 0, at=0.0)
        self.in_backward: dict[int, tuple[int, int]] = {}  # stage -> (worker, micro-batch) while its backward runs
        self.recomputes: dict[int, list[list[float]]] = {}
        self.deferred = (_batchnorm.Deferred(pipe._norms, pipe.chunks, self.in_backward.__contains__)
                         if pipe.batch_norm == "deferred" else None)

    def run(self, workers: Workers) -> Failure | None:
        """Run every device's actions on its worker; the first failure, or None."""
        box, hooks = self.box, []
        if self.train and self.checkpoint != "never":  # only while this step runs: a recompute's span
            for j, stage in enumerate(self.stages):
                hooks.append(stage.register_forward_pre_hook(partial(self._recompute_begins, j), prepend=True))
                hooks.append(stage.register_forward_hook(partial(self._recompute_ends, j), prepend=True))
        try:
            with self.deferred or nullcontext():
                workers.run([partial(self._work, w) for w in range(len(self.devices))],
                            abort=lambda: box.fail(Failure(None, None, "interrupted", None)))
        finally:
            for hook in hooks:
                hook.remove()
        if self.deferred is not None and box.error is None:
            self.deferred.commit()  # batch norms: the whole batch's statistics, once
        return box.error

    def result(self) -> Any:
        if self.loss is not None:
            return self.loss.value()
        return gather([self.outputs[m] for m in range(len(self.outputs))])

    def close(self) -> None:
        """Drop every tensor of the step, also when a caller keeps the exception (and with it this runner)."""
        self.box.clear()
        self.box.error = None  # the caller raised its own exception, chained to this one
        self.mbs, self.loss, self.outputs, self.params = [], None, {}, []

    def _work(self, w: int) -> None:
        enter_worker(self.threads, self.devices[w], self.train)
        for a in self.schedule.actions[w]:
            if self.box.error is not None:
                return  # another stage failed: stop at once, the caller raises its error
            if a.kind == "B" and (not self.train or a.stage in self.frozen):
                continue
            try:
                if a.kind == "F":
                    with _autocast(self.autocast):  # the caller's: thread-local, so not inherited
                        self._forward(w, a)
                else:
                    self._backward(w, a)  # backward runs in the dtypes its forward chose
            except _Aborted:
                return
            except InLoss as exc:
                self.box.fail(Failure(a.stage, a.microbatch, "L", exc.__cause__))
                return
            except BaseException as exc:  # noqa: BLE001 - every failure must reach the caller, never hang
                self.box.fail(Failure(a.stage, a.microbatch, a.kind, exc))
                return

    def _forward(self, w: int, a: Action) -> None:
        j, m, stage, tl, sync = a.stage, a.microbatch, self.stages[a.stage], self.timeline, self.sync(w)
        kwargs: dict = {}
        if j == 0:  # the batch: a tuple is positional inputs, a dict (an HF batch) keyword ones
            x = to_device(self.mbs[m], stage.device)
            args, kwargs = ((), x) if isinstance(x, dict) else (x if isinstance(x, tuple) else (x,), {})
        for dep in self.schedule.deps(a):  # F of the stage before: its output
            _, x, _ = self.box.get(dep)
            cut = self.schedule.crosses(dep, a)
            if cut is not None and self.moves[cut]:
                with tl.record(w, "copy", sync=sync, stage=j, microbatch=m, label=f"copy {j - 1}->{j}"):
                    x = to_device(x, stage.device, self.non_blocking)  # CUDA: on a side stream
            args = (map_tensors(x, fresh_leaf),)
        frozen = j in self.frozen
        ckpt = self.train and not frozen and self._checkpointed(m)
        # per view: a micro-batch is a view of the batch; a checkpointed forward saves only its inputs
        counter = SavedBytes(self.params, whole_storages=False)
        with tl.record(w, "forward", sync=sync, stage=j, microbatch=m, label=f"F{m}"), self._rng(j, m), counter, \
                torch.no_grad() if frozen else nullcontext():
            # early_stop=False: the recompute runs the whole stage, so its end is a recorded event
            y = (_checkpoint(stage, *args, use_reentrant=False, early_stop=False, **kwargs) if ckpt
                 else stage(*args, **kwargs))
            if j == self.last and self.loss is not None:
                y = self.loss.on_output(self, w, m, y)
        if not self.train:
            if j == self.last:
                self.outputs[m] = y
            self.box.put(a.key, (None, y, 0))
            return
        self.account(w, counter.bytes)
        self.box.put(a.key, (args, y, counter.bytes))  # for F of the next stage and B of this one
        if j == self.last:
            self.loss.after_forward(self, w, m, y)

    def _backward(self, w: int, a: Action) -> None:
        j, m, stage, tl = a.stage, a.microbatch, self.stages[a.stage], self.timeline
        record = grads = None
        for dep in self.schedule.deps(a):
            if dep[2] == "F":  # this stage's forward of m: its inputs, output and the bytes it saved
                record = self.box.get(dep)
            else:  # B of the next stage: the gradient of the loss with respect to this stage's output
                grads = to_device(self.box.get(dep), stage.device, self.non_blocking)
        args, y, held = record
        outs, grads = self.loss.seed(m, y) if grads is None else pairs(y, grads)
        sync = self.sync(w)
        if sync is not None:
            sync()
        self.in_backward[j], self.recomputes[j] = (w, m), []
        start = tl.now()
        lock = _RNG_LOCK if (self.random and self._checkpointed(m)) else nullcontext()
        with lock:  # a recompute restores the global RNG state: no other forward may draw meanwhile
            if outs:
                torch.autograd.backward(outs, grads)
            if sync is not None:
                sync()
        del self.in_backward[j]
        spans = self.recomputes.pop(j)
        tl.add(w, "backward", max([start] + [e for _, e in spans]), tl.now(), stage=j, microbatch=m, label=f"B{m}")
        self.account(w, -held)
        if self.box.wanted(a.key):
            self.box.put(a.key, [t.grad if t.requires_grad else None for t in _leaves(args)])

    def sync(self, w: int) -> Callable[[], None] | None:
        dev = self.devices[w]  # on CUDA, time the work itself, not its launch; outputs complete before sharing
        return (lambda: torch.cuda.current_stream(dev).synchronize()) if dev.type == "cuda" else None

    def account(self, w: int, delta: int) -> None:
        self.held[w] += delta
        self.timeline.sample_memory(w, self.held[w])

    def _checkpointed(self, m: int) -> bool:
        return self.checkpoint == "always" or (self.checkpoint == "except_last" and m < self.schedule.chunks - 1)

    def _rng(self, j: int, m: int) -> Any:
        if not self.random:
            return nullcontext()
        return _seeded_rng(microbatch_seed(self.step_seed, j, m), self.devices)

    # recompute events: a checkpointed stage's forward running inside its backward (on CUDA the
    # autograd engine runs it on its own thread, so the context is kept per stage, not per thread)
    def _recompute_begins(self, j: int, module: nn.Module, inputs: Any) -> None:
        if j in self.in_backward:
            self.recomputes[j].append([self.timeline.now(), 0.0])

    def _recompute_ends(self, j: int, module: nn.Module, inputs: Any, output: Any) -> None:
        ctx = self.in_backward.get(j)
        if ctx is not None and self.recomputes[j]:
            span = self.recomputes[j][-1]
            span[1] = self.timeline.now()
            self.timeline.add(ctx[0], "recompute", span[0], span[1], stage=j, microbatch=ctx[1], label=f"R{ctx[1]}")


def enter_worker(threads: int | None, device: torch.device, train: bool) -> None:
    """A worker thread's settings for one step: its intra-op threads, its GPU, and whether autograd records."""
    if threads is not None:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_grad_enabled(train)


def microbatch_seed(step_seed: int, stage: int, microbatch: int) -> int:
    """The seed the forward of (`stage`, `microbatch`) draws its dropout masks from in one step.

    Example:
        loss = pipe.step(x, y)
        torch.manual_seed(microbatch_seed(pipe.step_seed, 0, 0)); ...  # replays stage 0 on micro-batch 0
    """
    return (step_seed * 1_000_003 + stage * 10_007 + microbatch) % 2**63


@contextmanager
def _seeded_rng(seed: int, devices: list[torch.device]) -> Iterator[None]:
    """Hold the RNG lock and draw from the global generator seeded for one (stage, micro-batch)."""
    with _RNG_LOCK, torch.random.fork_rng(devices=sorted({d.index or 0 for d in devices if d.type == "cuda"})):
        torch.manual_seed(seed)  # fork_rng restores the caller's generator state afterwards
        yield


@contextmanager
def _autocast(regions: list[tuple[str, torch.dtype]]) -> Iterator[None]:
    """Enter, on a worker thread, the autocast regions (device type, dtype) its caller is in."""
    with ExitStack() as stack:
        for device_type, dtype in regions:
            stack.enter_context(torch.autocast(device_type, dtype=dtype))
        yield


def _has_dropout(model: nn.Module) -> bool:
    """Whether a forward may draw random numbers: dropout modules, or a float `attn_dropout` rate."""
    return any((isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p > 0)
               or (isinstance(getattr(mod, "attn_dropout", None), float) and mod.attn_dropout > 0)
               for mod in model.modules())
