"""Run a pipeline schedule over a `SplitModel` in one process: a long-lived thread per device.

Each stage's graph is its own: stage j+1 receives stage j's output detached (a fresh leaf), and
the backward of micro-batch m on stage j is `torch.autograd.backward(output, grad)` with the
gradient stage j+1 computed for that leaf. Devices therefore work at the same time, each on its
own micro-batch, in the order the schedule (`mplib.schedule`) gives.

Randomness (dropout): workers share the global generator, so thread timing would decide who
draws which numbers. Instead each run draws one `step_seed` (from the global generator, or from
its own generator when built with `seed=`), and the forward of (stage j, micro-batch m) draws
from `manual_seed(microbatch_seed(step_seed, j, m))`: reproducible, different every step, and
the same for every schedule and checkpoint mode. Forwards that draw random numbers, and
recomputes, hold one lock (the generator is global), so with dropout they do not overlap.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import ExitStack, contextmanager, nullcontext
from functools import partial
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from mplib.memory import SavedBytes
from mplib.microbatch import _leaves, batch_size, gather, scatter
from mplib.schedule import NAMES, Action, build
from mplib.timeline import Timeline
from mplib.transfer import map_tensors, to_device
from mplib.worker import Workers

CHECKPOINT_MODES = ("never", "except_last", "always")
LOSS_ON = ("microbatch", "gathered")
LossFn = Callable[[Any, Any], Tensor]
_RNG_LOCK = threading.Lock()


class PipelineError(RuntimeError):
    """A stage raised on one micro-batch; the original exception is chained as `__cause__`."""


class _Aborted(Exception):
    pass


class _BadLoss(ValueError):
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


def microbatch_seed(step_seed: int, stage: int, microbatch: int) -> int:
    """The seed the forward of (`stage`, `microbatch`) draws its dropout masks from in one run.

    Example:
        loss = pipe.step(x, y)
        torch.manual_seed(microbatch_seed(pipe.step_seed, 0, 0)); ...  # replays stage 0 on micro-batch 0
    """
    return (step_seed * 1_000_003 + stage * 10_007 + microbatch) % 2**63


class Pipeline(nn.Module):
    """A SplitModel run micro-batch by micro-batch under a schedule; gradients equal the unsplit model's.

    `step(batch, targets)` runs forward and backward (gradients accumulate in the parameters) and
    returns the loss `loss_fn(output, targets)`. `loss_on="microbatch"` (the default) computes it
    per micro-batch on the last stage, weighted by micro-batch size: exact for a loss that is a
    mean over examples, also when the last micro-batch is smaller, but not for a sum, nor for a
    mean over tokens when `ignore_index` leaves micro-batches with different token counts.
    `loss_on="gathered"` is exact for any loss: every forward runs, the last stage's outputs are
    gathered, the loss is computed once on the full output, and its gradient with respect to each
    micro-batch's output starts that micro-batch's backward. It needs every forward before the
    first backward, so it runs only under "gpipe" (fill-drain). `pipeline(batch)` is
    inference (no graph) and returns the gathered output. A tuple batch is unpacked into stage 0's
    positional inputs. `.timeline` holds the last run's events and the activation bytes each
    device held (counted with saved_tensors_hooks, parameters excluded).

    `checkpoint`: "never" keeps every activation until its backward; "always" keeps only each
    stage's inputs and recomputes the forward during backward; "except_last" checkpoints every
    micro-batch but the last, whose backward follows its forward at once (torchgpipe's default).
    `seed`: draw each step's dropout seed from a generator of its own (else from torch's global
    one). `threads_per_worker`: intra-op threads per worker, e.g. 1 when CPU stand-ins share cores.

    Example:
        pipe = Pipeline(split(GPT(GPT_TINY), ["cpu", "cpu"]), chunks=4, schedule="1f1b", loss_fn=lm_loss)
        loss = pipe.step(x, y); optimizer.step()
        # targets with ignored (-100) tokens, or a summed loss: one loss on the gathered output, GPipe only
        exact = Pipeline(split(GPT(GPT_TINY), ["cpu", "cpu"]), chunks=4, loss_fn=lm_loss, loss_on="gathered")
    """

    def __init__(self, split_model: nn.Module, chunks: int, schedule: str = "gpipe", checkpoint: str = "never",
                 loss_fn: LossFn | None = None, virtual: int = 1, seed: int | None = None,
                 threads_per_worker: int | None = None, loss_on: str = "microbatch") -> None:
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
        # plain lists for the hot path: nn.Module attribute lookup and ModuleList indexing cost microseconds
        self._stages, self._last = list(split_model.stages), n - 1
        self._cross = [j > 0 and torch.device(split_model.devices[j - 1]) != torch.device(d)
                       for j, d in enumerate(split_model.devices)]  # stage j's input comes from another device
        if loss_on not in LOSS_ON:
            raise ValueError(f"unknown loss_on {loss_on!r}; use one of {', '.join(LOSS_ON)}")
        if loss_on == "gathered" and str(schedule).lower() != "gpipe":
            raise ValueError(f"loss_on='gathered' needs every forward before the first backward, which only "
                             f"'gpipe' (fill-drain) gives, but schedule={schedule!r} starts backwards earlier; "
                             "use schedule='gpipe', or loss_on='microbatch' with a loss that is a mean over examples")
        self.loss_on = loss_on
        self.chunks, self.checkpoint, self.loss_fn = chunks, checkpoint, loss_fn
        self.threads, self._non_blocking = threads_per_worker, bool(getattr(split_model, "non_blocking", False))
        self._seeds = None if seed is None else torch.Generator().manual_seed(seed)
        self.step_seed: int | None = None
        self.timeline: Timeline | None = None
        self._in_backward: dict[int, tuple[int, int]] = {}  # stage -> (worker, micro-batch) while its backward runs
        self._recompute: dict[int, list[float]] = {}
        self._workers: Workers | None = None  # one thread per device, started by the first run
        for j, stage in enumerate(split_model.stages):
            stage.register_forward_pre_hook(partial(self._recompute_begins, j))
            stage.register_forward_hook(partial(self._recompute_ends, j))

    # -- public ----------------------------------------------------------------------------------
    def forward(self, batch: Any) -> Any:
        """Inference: the gathered output of every micro-batch, computed without a graph.

        Example:
            logits = pipe(ids)          # equals the unsplit model's model(ids)
        """
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
        if not torch.is_grad_enabled():
            raise RuntimeError("step runs backward, but gradients are disabled here (torch.no_grad); "
                               "call pipe(batch) for inference, or step outside torch.no_grad()")
        _, losses = self._run(batch, targets, train=True)
        return torch.stack([losses[m] for m in range(len(losses))]).sum()

    def __getstate__(self) -> dict:
        # threads and locks are not state: a copy (copy.deepcopy, pickle) starts workers of its own
        return {**self.__dict__, "_workers": None, "_box": None}

    # -- execution -----------------------------------------------------------------------------
    def _run(self, batch: Any, targets: Any, train: bool) -> tuple[dict, dict]:
        mbs = scatter(batch, self.chunks)
        self._targets, self._tgts = targets, (scatter(targets, self.chunks) if train else None)
        self._gathered = train and self.loss_on == "gathered"
        self._final: dict[int, Any] = {}  # gathered: the last stage's outputs, as fresh leaves
        self._grads_out: dict[int, list] = {}  # gathered: d loss / d (output of micro-batch m)
        self._in_loss = False
        self._sizes, self._total = [batch_size(m) for m in mbs], batch_size(batch)
        self._mbs, self._box, self._saved, self._outputs, self._losses = mbs, _Mailbox(), {}, {}, {}
        self._held = [0] * self.K
        self._autocast = [(t, torch.get_autocast_dtype(t)) for t in ("cpu", "cuda") if torch.is_autocast_enabled(t)]
        self._random = self._seeds is not None or (self.model.training and _has_dropout(self.model))
        self.step_seed = None
        if self._random:  # one draw per run: reproducible under torch.manual_seed, new masks every step
            self.step_seed = int(torch.randint(2**62, (1,), generator=self._seeds).item())
        self._params = list(self.model.parameters())  # not activations: SavedBytes skips them
        names = [("stage" if self.virtual == 1 else "device") + f" {w}: {d}" for w, d in enumerate(self.devices)]
        tl = self.timeline = Timeline(lanes=names)
        for w in range(self.K):
            tl.sample_memory(w, 0, at=0.0)
        if self._workers is None:  # started once, closed when the pipeline is collected
            self._workers = Workers(self.K, name="pipeline")
            weakref.finalize(self, self._workers.close)
        box = self._box
        self._workers.run([partial(self._work, w, train) for w in range(self.K)],
                          abort=lambda: box.fail((None, None, "interrupted", None)))
        if self._box.error is not None:
            j, m, kind, exc = self._box.error
            where = f"stage {j} failed on micro-batch {m} during its {'forward' if kind == 'F' else 'backward'}"
            if kind == "L":
                where = f"the loss on the gathered output failed on stage {j}"
            if isinstance(exc, _BadLoss):
                raise ValueError(f"{exc} ({where})") from exc
            raise PipelineError(f"{where}: {type(exc).__name__}: {exc}") from exc
        return self._outputs, self._losses

    def _work(self, w: int, train: bool) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        dev = self.devices[w]
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        torch.set_grad_enabled(train)
        for a in self.schedule.actions[w]:
            if self._box.error is not None:
                return  # another stage failed: stop at once, the caller raises its error
            if a.kind == "B" and not train:
                continue
            j = a.stage
            try:
                if a.kind == "F":
                    with _autocast(self._autocast):  # the caller's: thread-local, so not inherited
                        self._forward(w, j, a, train)
                else:
                    self._backward(w, j, a, train)  # backward runs in the dtypes its forward chose
            except _Aborted:
                return
            except BaseException as exc:  # noqa: BLE001 - every failure must reach the caller, never hang
                self._box.fail((j, a.microbatch, "L" if self._in_loss else a.kind, exc))
                return

    def _sync(self, w: int) -> Callable[[], None] | None:
        dev = self.devices[w]  # on CUDA, time the work itself, not its launch; outputs complete before sharing
        return (lambda: torch.cuda.current_stream(dev).synchronize()) if dev.type == "cuda" else None

    def _checkpointed(self, m: int) -> bool:
        return self.checkpoint == "always" or (self.checkpoint == "except_last" and m < self.chunks - 1)

    def _forward(self, w: int, j: int, a: Action, train: bool) -> None:
        m, stage, tl, sync = a.microbatch, self._stages[j], self.timeline, self._sync(w)
        last = j == self._last
        if j == 0:
            x = to_device(self._mbs[m], stage.device)
            args = x if isinstance(x, tuple) else (x,)
        else:
            x = self._box.get(("act", j - 1, m))
            if self._cross[j]:
                with tl.record(w, "copy", sync=sync, stage=j, microbatch=m, label=f"copy {j - 1}->{j}"):
                    x = to_device(x, stage.device, self._non_blocking)  # CUDA: on a side stream
            args = (map_tensors(x, _fresh_leaf),)
        ckpt = train and self._checkpointed(m)
        # per view: a micro-batch is a view of the batch; a checkpointed forward saves only its inputs
        counter = SavedBytes(self._params, whole_storages=False)
        with tl.record(w, "forward", sync=sync, stage=j, microbatch=m, label=f"F{m}"), self._rng(j, m), counter:
            # early_stop=False: the recompute runs the whole stage, so its end is a recorded event
            y = _checkpoint(stage, *args, use_reentrant=False, early_stop=False) if ckpt else stage(*args)
            if train and last and not self._gathered:
                y = self._loss(y, m, stage.device)
        if not train:
            if last:
                self._outputs[m] = y
            else:
                self._box.put(("act", j, m), y)
            return
        self._saved[(j, m)] = (args, y, counter.bytes)
        self._account(w, counter.bytes)
        if not last:
            self._box.put(("act", j, m), y)
        elif self._gathered:
            self._final[m] = map_tensors(y, _fresh_leaf)
            if len(self._final) == self.chunks:  # the last forward: every output is here
                self._in_loss = True
                self._gathered_loss(w, j, stage.device)
                self._in_loss, self._final = False, {}

    def _gathered_loss(self, w: int, j: int, device: torch.device) -> None:
        """One loss on the gathered output; its gradient per micro-batch output seeds each backward."""
        outs = [_leaves(self._final[m]) for m in range(self.chunks)]
        counter = SavedBytes(self._params, whole_storages=False)
        with self.timeline.record(w, "other", sync=self._sync(w), stage=j, label="loss"):
            with counter:
                full = gather([self._final[m] for m in range(self.chunks)])
                loss = self._check_scalar(self.loss_fn(full, to_device(self._targets, device)), "batch")
            self._account(w, counter.bytes)
            wanted = [t for ts in outs for t in ts if t.requires_grad]
            grads = iter(torch.autograd.grad(loss, wanted, allow_unused=True))
        self._account(w, -counter.bytes)  # autograd.grad freed the loss's graph
        self._grads_out = {m: [next(grads) if t.requires_grad else None for t in ts] for m, ts in enumerate(outs)}
        self._losses[0] = loss.detach()

    def _loss(self, y: Any, m: int, device: torch.device) -> Tensor:
        loss = self._check_scalar(self.loss_fn(y, to_device(self._tgts[m], device)), "micro-batch")
        loss = loss * (self._sizes[m] / self._total)  # the full batch's mean, micro-batch by micro-batch
        self._losses[m] = loss.detach()
        return loss

    @staticmethod
    def _check_scalar(loss: Any, over: str) -> Tensor:
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            got = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
            raise _BadLoss(f"loss_fn must return a scalar tensor (the loss of the {over}), got {got}; "
                           "reduce it, e.g. with .mean()")
        return loss

    def _backward(self, w: int, j: int, a: Action, train: bool) -> None:
        m, stage, tl = a.microbatch, self._stages[j], self.timeline
        args, y, held = self._saved.pop((j, m))
        last = j == self._last
        if last and not self._gathered:
            outs, grads = [y], None  # y is this micro-batch's weighted loss
        else:
            g = (self._grads_out.pop(m) if last  # gathered: this micro-batch's share of the loss's gradient
                 else to_device(self._box.get(("grad", j, m)), stage.device, self._non_blocking))
            pairs = [(o, gi) for o, gi in zip(_leaves(y), g) if gi is not None and o.requires_grad]
            outs, grads = [o for o, _ in pairs], [gi for _, gi in pairs]
        sync = self._sync(w)
        if sync is not None:
            sync()
        self._in_backward[j], self._recompute[j] = (w, m), []
        start = tl.now()
        lock = _RNG_LOCK if (self._random and self._checkpointed(m)) else nullcontext()
        with lock:  # a recompute restores the global RNG state: no other forward may draw meanwhile
            if outs:
                torch.autograd.backward(outs, grads)
            if sync is not None:
                sync()
        del self._in_backward[j]
        spans = self._recompute.pop(j)
        tl.add(w, "backward", max([start] + [e for _, e in spans]), tl.now(), stage=j, microbatch=m, label=f"B{m}")
        self._account(w, -held)
        if j > 0:
            self._box.put(("grad", j - 1, m), [t.grad if t.requires_grad else None for t in _leaves(args)])

    def _account(self, w: int, delta: int) -> None:
        self._held[w] += delta
        self.timeline.sample_memory(w, self._held[w])

    def _rng(self, j: int, m: int) -> Any:
        if not self._random:
            return nullcontext()
        return _seeded_rng(microbatch_seed(self.step_seed, j, m), self.devices)

    # recompute events: a checkpointed stage's forward running inside its backward (on CUDA the
    # autograd engine runs it on its own thread, so the context is kept per stage, not per thread)
    def _recompute_begins(self, j: int, module: nn.Module, inputs: Any) -> None:
        if j in self._in_backward:
            self._recompute[j].append([self.timeline.now(), 0.0])

    def _recompute_ends(self, j: int, module: nn.Module, inputs: Any, output: Any) -> None:
        ctx = self._in_backward.get(j)
        if ctx is not None and self._recompute[j]:
            w, m = ctx
            span = self._recompute[j][-1]
            span[1] = self.timeline.now()
            self.timeline.add(w, "recompute", span[0], span[1], stage=j, microbatch=m, label=f"R{m}")


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
