"""Run a pipeline schedule over a `SplitModel` in one process: one worker thread per device.

Each stage's graph is its own: stage j+1 receives stage j's output detached (a fresh leaf), and
the backward of micro-batch m on stage j is `torch.autograd.backward(output, grad)` with the
gradient stage j+1 computed for that leaf. Devices therefore work at the same time, each on its
own micro-batch, in the order the schedule (`mplib.schedule`) gives.

Randomness (dropout): workers share the global generator, so with dropout active the masks
depend on thread timing. Pass `seed=` to make every forward of (stage j, micro-batch m) draw
from `manual_seed(seed + 1009 * j + m)`: reproducible run to run and equal for every schedule
and checkpoint mode. Forwards that draw random numbers, and recomputes, then hold one lock.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from mplib.microbatch import _leaves, batch_size, gather, scatter
from mplib.schedule import NAMES, Action, build
from mplib.timeline import Timeline
from mplib.transfer import map_tensors, to_device

CHECKPOINT_MODES = ("never", "except_last", "always")
LossFn = Callable[[Any, Any], Tensor]
_RNG_LOCK = threading.Lock()


class PipelineError(RuntimeError):
    """A stage raised on one micro-batch; the original exception is chained as `__cause__`."""


class _Aborted(Exception):
    pass


class _Mailbox:
    """Activations and gradients handed between workers, keyed (kind, stage, micro-batch)."""

    def __init__(self) -> None:
        self._cv, self._items, self.error = threading.Condition(), {}, None

    def put(self, key: tuple, value: Any) -> None:
        with self._cv:
            self._items[key] = value
            self._cv.notify_all()

    def get(self, key: tuple) -> Any:
        with self._cv:
            self._cv.wait_for(lambda: key in self._items or self.error is not None)
            if self.error is not None:
                raise _Aborted
            return self._items.pop(key)

    def fail(self, info: tuple) -> None:
        with self._cv:
            if self.error is None:
                self.error = info
            self._cv.notify_all()


def _fresh_leaf(t: Tensor) -> Tensor:
    return t.detach().requires_grad_(t.requires_grad and torch.is_grad_enabled())


class Pipeline(nn.Module):
    """A SplitModel run micro-batch by micro-batch under a schedule; gradients equal the unsplit model's.

    `step(batch, targets)` runs forward and backward (gradients accumulate in the parameters) and
    returns the loss, `loss_fn(output, targets)` being computed per micro-batch on the last stage
    and weighted by micro-batch size, so a mean-over-examples loss gives the full batch's gradients.
    `pipeline(batch)` is forward only (no graph) and returns the gathered output. A tuple batch is
    unpacked into stage 0's positional inputs. `.timeline` holds the last run's events and the
    activation bytes each device held (counted with saved_tensors_hooks, parameters excluded).

    Example:
        pipe = Pipeline(split(GPT(GPT_TINY), ["cpu", "cpu"]), chunks=4, schedule="1f1b", loss_fn=lm_loss)
        loss = pipe.step(x, y); optimizer.step()
    """

    def __init__(self, split_model: nn.Module, chunks: int, schedule: str = "gpipe", checkpoint: str = "never",
                 loss_fn: LossFn | None = None, virtual: int = 1, seed: int | None = None,
                 threads_per_worker: int | None = None) -> None:
        super().__init__()
        if not hasattr(split_model, "stages") or not hasattr(split_model, "devices"):
            raise TypeError(f"Pipeline runs a SplitModel (with .stages and .devices), got "
                            f"{type(split_model).__name__}; build one with mplib.split.split(model, devices)")
        if checkpoint not in CHECKPOINT_MODES:
            raise ValueError(f"unknown checkpoint mode {checkpoint!r}; use one of {', '.join(CHECKPOINT_MODES)}")
        if str(schedule).lower() not in NAMES:
            raise ValueError(f"unknown schedule {schedule!r}; the known schedules are {', '.join(NAMES)}")
        n = len(split_model.stages)
        virtual = 2 if str(schedule).lower() == "interleaved" and virtual == 1 else virtual
        if n % virtual:
            raise ValueError(f"{n} stages cannot be dealt to devices {virtual} chunks each; split the model "
                             f"into a multiple of {virtual} stages")
        self.model, self.K, self.virtual = split_model, n // virtual, virtual
        self.devices = [torch.device(d) for d in split_model.devices[: self.K]]
        for j, d in enumerate(split_model.devices):
            if torch.device(d) != self.devices[j % self.K]:
                raise ValueError(f"interleaving puts stage {j} on device {j % self.K}, but it sits on {d}; "
                                 f"split over devices repeated round-robin, e.g. {self.devices * virtual}")
        self.schedule = build(schedule, self.K, chunks, virtual)  # checks chunks against the schedule
        self.chunks, self.checkpoint, self.loss_fn = chunks, checkpoint, loss_fn
        self.seed, self.threads = seed, threads_per_worker
        self.timeline: Timeline | None = None
        self._tls = threading.local()
        for j, stage in enumerate(split_model.stages):
            stage.register_forward_pre_hook(self._recompute_begins)
            stage.register_forward_hook(self._recompute_ends)

    # -- public ----------------------------------------------------------------------------------
    def forward(self, batch: Any) -> Any:
        with torch.no_grad():
            outputs, _ = self._run(batch, None, train=False)
        return gather([outputs[m] for m in range(len(outputs))])

    def step(self, batch: Any, targets: Any) -> Tensor:
        """Forward and backward of one batch; gradients accumulate into `.grad`. Returns the loss.

        Example:
            pipe.zero_grad(); loss = pipe.step(x, y); optimizer.step()
        """
        if self.loss_fn is None:
            raise ValueError("step needs a loss: build Pipeline(..., loss_fn=fn) with fn(output, targets) "
                             "returning a scalar, e.g. mplib.train.lm_loss")
        _, losses = self._run(batch, targets, train=True)
        return torch.stack([losses[m] for m in range(len(losses))]).sum()

    # -- execution -----------------------------------------------------------------------------
    def _run(self, batch: Any, targets: Any, train: bool) -> tuple[dict, dict]:
        mbs = scatter(batch, self.chunks)
        self._tgts = scatter(targets, self.chunks) if train else None
        self._sizes, self._total = [batch_size(m) for m in mbs], batch_size(batch)
        self._mbs, self._box, self._saved, self._outputs, self._losses = mbs, _Mailbox(), {}, {}, {}
        self._held = [0] * self.K
        self._random = self.seed is not None or (self.model.training and _has_dropout(self.model))
        self._params = {p.data_ptr() for p in self.model.parameters()}
        names = [("stage" if self.virtual == 1 else "device") + f" {w}: {d}" for w, d in enumerate(self.devices)]
        tl = self.timeline = Timeline(lanes=names)
        for w in range(self.K):
            tl.sample_memory(w, 0, at=0.0)
        grad = torch.is_grad_enabled()
        workers = [threading.Thread(target=self._work, args=(w, train, grad), daemon=True, name=f"pipeline-{w}")
                   for w in range(self.K)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        if self._box.error is not None:
            j, m, kind, exc = self._box.error
            raise PipelineError(f"stage {j} failed on micro-batch {m} during its "
                                f"{'forward' if kind == 'F' else 'backward'}: {type(exc).__name__}: {exc}") from exc
        return self._outputs, self._losses

    def _work(self, w: int, train: bool, grad: bool) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        dev = self.devices[w]
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        torch.set_grad_enabled(grad)
        for a in self.schedule.actions[w]:
            if a.kind == "B" and not train:
                continue
            j = self.schedule.virtual_stage(a)
            try:
                (self._forward if a.kind == "F" else self._backward)(w, j, a, train)
                if dev.type == "cuda":
                    torch.cuda.current_stream(dev).synchronize()  # outputs complete before another worker reads them
            except _Aborted:
                return
            except BaseException as exc:  # noqa: BLE001 - every failure must reach the caller, never hang
                self._box.fail((j, a.microbatch, a.kind, exc))
                return

    def _checkpointed(self, m: int) -> bool:
        return self.checkpoint == "always" or (self.checkpoint == "except_last" and m < self.chunks - 1)

    def _forward(self, w: int, j: int, a: Action, train: bool) -> None:
        m, stage, tl = a.microbatch, self.model.stages[j], self.timeline
        last = j == len(self.model.stages) - 1
        if j == 0:
            x = to_device(self._mbs[m], stage.device)
            args = x if isinstance(x, tuple) else (x,)
        else:
            x = self._box.get(("act", j - 1, m))
            if torch.device(self.model.devices[j - 1]) != stage.device:
                with tl.record(w, "copy", stage=j, microbatch=m, label=f"copy {j - 1}->{j}"):
                    x = to_device(x, stage.device)
            x = map_tensors(x, _fresh_leaf)
            args = (x,)
        ckpt = train and self._checkpointed(m)
        counter = _SavedBytes(self._params)
        with tl.record(w, "forward", stage=j, microbatch=m, label=f"F{m}"), self._rng(j, m), counter:
            y = _checkpoint(stage, *args, use_reentrant=False) if ckpt else stage(*args)
            if train and last:
                loss = self.loss_fn(y, to_device(self._tgts[m], stage.device))
                if not isinstance(loss, Tensor) or loss.dim() != 0:
                    raise ValueError(f"loss_fn must return a scalar tensor, got "
                                     f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}; "
                                     "reduce it, e.g. with .mean()")
                y = loss * (self._sizes[m] / self._total)  # the full batch's mean, micro-batch by micro-batch
                self._losses[m] = y.detach()
        if not train:
            if last:
                self._outputs[m] = y
            else:
                self._box.put(("act", j, m), y)
            return
        held = counter.bytes + (sum(t.nbytes for t in _leaves(args)) if ckpt else 0)
        self._saved[(j, m)] = (args, y, held)
        self._account(w, held)
        if not last:
            self._box.put(("act", j, m), y)

    def _backward(self, w: int, j: int, a: Action, train: bool) -> None:
        m, stage, tl = a.microbatch, self.model.stages[j], self.timeline
        args, y, held = self._saved.pop((j, m))
        if j == len(self.model.stages) - 1:
            outs, grads = [y], None
        else:
            g = to_device(self._box.get(("grad", j, m)), stage.device)
            pairs = [(o, gi) for o, gi in zip(_leaves(y), g) if gi is not None and o.requires_grad]
            outs, grads = [o for o, _ in pairs], [gi for _, gi in pairs]
        self._tls.ctx = (w, j, m)
        start = tl.now()
        lock = _RNG_LOCK if (self._random and self._checkpointed(m)) else _NoLock()
        with lock:  # a recompute restores the global RNG state: no other forward may draw meanwhile
            if outs:
                torch.autograd.backward(outs, grads)
        self._tls.ctx = None
        begin = getattr(self._tls, "recompute_end", None) or start
        self._tls.recompute_end = None
        tl.add(w, "backward", max(start, begin), tl.now(), stage=j, microbatch=m, label=f"B{m}")
        self._account(w, -held)
        if j > 0:
            self._box.put(("grad", j - 1, m), [t.grad if t.requires_grad else None for t in _leaves(args)])

    def _account(self, w: int, delta: int) -> None:
        self._held[w] += delta
        self.timeline.sample_memory(w, self._held[w])

    def _rng(self, j: int, m: int) -> Any:
        if not self._random:
            return _NoLock()
        return _SeededRng(None if self.seed is None else self.seed + 1009 * j + m, self.devices)

    # recompute events: a checkpointed stage's forward running inside its backward
    def _recompute_begins(self, module: nn.Module, inputs: Any) -> None:
        if getattr(self._tls, "ctx", None) is not None:
            self._tls.recompute_start = self.timeline.now()

    def _recompute_ends(self, module: nn.Module, inputs: Any, output: Any) -> None:
        ctx = getattr(self._tls, "ctx", None)
        if ctx is not None:
            w, j, m = ctx
            end = self.timeline.now()
            self.timeline.add(w, "recompute", self._tls.recompute_start, end, stage=j, microbatch=m, label=f"R{m}")
            self._tls.recompute_end = end


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


class _SeededRng:
    """Hold the RNG lock; with a seed, draw from a forked generator seeded for this (stage, micro-batch)."""

    def __init__(self, seed: int | None, devices: list[torch.device]) -> None:
        self.seed, self.cuda = seed, sorted({d.index or 0 for d in devices if d.type == "cuda"})

    def __enter__(self) -> None:
        _RNG_LOCK.acquire()
        if self.seed is not None:
            self._fork = torch.random.fork_rng(devices=self.cuda)
            self._fork.__enter__()
            torch.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.seed is not None:
                self._fork.__exit__(*exc)
        finally:
            _RNG_LOCK.release()


class _SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Count bytes of tensors autograd saves for backward (activations), each once, parameters excluded."""

    def __init__(self, params: set[int]) -> None:
        self.bytes, seen = 0, set()

        def pack(t: Tensor) -> Tensor:
            key = (t.data_ptr(), tuple(t.shape))
            if t.data_ptr() not in params and key not in seen:
                seen.add(key)
                self.bytes += t.nbytes
            return t

        super().__init__(pack, lambda t: t)


def _has_dropout(model: nn.Module) -> bool:
    """Whether a forward may draw random numbers: dropout modules, or a float `attn_dropout` rate."""
    return any((isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p > 0)
               or (isinstance(getattr(mod, "attn_dropout", None), float) and mod.attn_dropout > 0)
               for mod in model.modules())
