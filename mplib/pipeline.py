"""Run a pipeline schedule over a `SplitModel` in one process, a long-lived worker thread per device.

`Pipeline` holds the configuration and the workers; each call builds a runner (`mplib._runner`) for that step.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from mplib import _batchnorm, _hf_split
from mplib._losses import LOSSES, BadLoss, Count
from mplib._mailbox import Failure, consumers
from mplib._runner import Runner, microbatch_seed
from mplib.schedule import NAMES, build
from mplib.timeline import Timeline
from mplib.worker import Workers

__all__ = ["BATCH_NORM", "CHECKPOINT_MODES", "ITEMS", "LOSS_ON", "LossFn", "Pipeline", "PipelineError", "microbatch_seed"]

CHECKPOINT_MODES = ("never", "except_last", "always")
LOSS_ON = tuple(LOSSES)  # "microbatch", "gathered"
BATCH_NORM = ("refuse", "deferred")
ITEMS = ("examples", "tokens")  # what a micro-batch's loss is a mean over, for its weight
LossFn = Callable[[Any, Any], Tensor]  # loss_fn(output, targets) -> scalar


class PipelineError(RuntimeError):
    """A stage raised on one micro-batch; the original exception is chained as `__cause__`."""


class Pipeline(nn.Module):
    """A SplitModel run micro-batch by micro-batch under a schedule; gradients equal the unsplit model's.

    `step(batch, targets)` runs forward and backward (gradients accumulate in the parameters) and
    returns the loss `loss_fn(output, targets)`. `loss_on="microbatch"` (the default) computes it
    per micro-batch on the last stage, weighted by the micro-batch's share of what the loss is a
    mean over: its examples (`items="examples"`, the default for a loss_fn), or its counted tokens,
    those whose target is not -100 (`items="tokens"`, or a function of the targets returning the
    count), as HF divides by `num_items_in_batch`. Either is exact under every schedule for a mean
    over those items, also when the last micro-batch is smaller or padding and ignored labels fall
    unevenly; a sum is not. `loss_on="gathered"` is exact for any loss: every forward runs, the last
    stage's outputs are gathered, the loss is computed once on the full output, and its gradient
    with respect to each micro-batch's output starts that micro-batch's backward. It needs every
    forward before the first backward, so it runs only under "gpipe" (fill-drain). `pipeline(batch)`
    is inference (no graph) and returns the gathered output. A tuple batch is unpacked into stage
    0's positional inputs, a dict into its keyword inputs. An HF split model's batch may hold its
    "labels": without a loss_fn, the model's own loss runs per micro-batch on the last stage, its
    items the model's (a causal LM's labels shifted by one, a classifier's examples).
    `.timeline` holds the last run's events and the activation bytes each device held (counted
    with saved_tensors_hooks, parameters excluded).

    `checkpoint`: "never" keeps every activation until its backward; "always" keeps only each
    stage's inputs and recomputes the forward during backward; "except_last" checkpoints every
    micro-batch but the last, whose backward follows its forward at once (torchgpipe's default).
    Frozen stages (`mplib.speedups.freeze`): the leading stages none of whose parameters requires
    grad, fed by a batch that needs no gradient, run their forward without a graph and no backward
    action at all; they are found at each step, so blocks may freeze during training.
    `seed`: draw each step's dropout seed from a generator of its own (else from torch's global
    one); the forward of (stage j, micro-batch m) draws from `microbatch_seed(step_seed, j, m)`, so
    dropout is reproducible and the same for every schedule and checkpoint mode, whatever the
    threads' timing. `threads_per_worker`: intra-op threads per worker, e.g. 1 when CPU stand-ins
    share cores.

    `batch_norm`: a BatchNorm in training mode normalises by the statistics of what it sees, so
    micro-batches change its results. "refuse" (the default) raises a ValueError naming the module
    when it would see micro-batches (chunks > 1, or checkpoint="always", whose recompute updates
    its running statistics twice). "deferred" (torchgpipe's) normalises each micro-batch by its own
    statistics but updates running_mean, running_var and num_batches_tracked once per step, after
    the last micro-batch, from the whole batch's statistics (a failed step updates none). For a
    batch norm whose inputs no earlier one has normalised they then equal the unsplit model's
    (momentum=None's cumulative average included); a later one sees different inputs. The
    training-mode outputs, loss and gradients still differ: a micro-batch's mean and variance come
    from n values per channel (its examples x positions), so they miss the batch's by about
    1/sqrt(n) of a standard deviation, and the normalised outputs move by about 1/sqrt(n) of their
    unit scale (~10% at n = 100, ~3% at n = 1000), as in training with the smaller batch.
    Evaluation mode uses the running statistics and is exact.

    Example:
        pipe = Pipeline(split(GPT(GPT_TINY), ["cpu", "cpu"]), chunks=4, schedule="1f1b", loss_fn=lm_loss)
        loss = pipe.step(x, y); optimizer.step()
        # targets with ignored (-100) tokens, or a summed loss: one loss on the gathered output, GPipe only
        exact = Pipeline(split(GPT(GPT_TINY), ["cpu", "cpu"]), chunks=4, loss_fn=lm_loss, loss_on="gathered")
    """

    def __init__(self, split_model: nn.Module, chunks: int, schedule: str = "gpipe", checkpoint: str = "never",
                 loss_fn: LossFn | None = None, virtual: int = 1, seed: int | None = None,
                 threads_per_worker: int | None = None, loss_on: str = "microbatch",
                 batch_norm: str = "refuse", items: str | Count | None = None) -> None:
        super().__init__()
        if not hasattr(split_model, "stages") or not hasattr(split_model, "devices"):
            raise TypeError(f"Pipeline runs a SplitModel (with .stages and .devices), got "
                            f"{type(split_model).__name__}; build one with mplib.split.split(model, devices)")
        _check_choice("checkpoint mode", checkpoint, CHECKPOINT_MODES)
        if str(schedule).lower() not in NAMES:
            raise ValueError(f"unknown schedule {schedule!r}; the known schedules are {', '.join(NAMES)}")
        n = len(split_model.stages)
        virtual = 2 if str(schedule).lower() == "interleaved" and virtual == 1 else virtual
        self.devices = _worker_devices(split_model, virtual)
        self.model, self.K, self.virtual = split_model, n // virtual, virtual
        self.schedule = build(schedule, self.K, chunks, virtual)  # checks chunks against the schedule
        _check_choice("loss_on", loss_on, LOSS_ON)
        LOSSES[loss_on].check(schedule)
        _check_choice("batch_norm", batch_norm, BATCH_NORM)
        if not (items is None or callable(items)):
            _check_choice("items", items, ITEMS)
        self.items = items
        self.chunks, self.checkpoint, self.loss_fn, self.loss_on, self.batch_norm = \
            chunks, checkpoint, loss_fn, loss_on, batch_norm
        self.threads, self._non_blocking = threads_per_worker, bool(getattr(split_model, "non_blocking", False))
        # plain lists for the hot path: nn.Module attribute lookup and ModuleList indexing cost microseconds
        self._stages = list(split_model.stages)
        self._moves = [torch.device(a) != torch.device(b)  # cut c (after stage c) crosses devices
                       for a, b in zip(split_model.devices, split_model.devices[1:])]
        self._consumers = {train: consumers(self.schedule, train) for train in (True, False)}
        self._norms = _batchnorm.find(split_model)
        self._check_batch_norm(train=True)
        self._seeds = None if seed is None else torch.Generator().manual_seed(seed)
        self.step_seed: int | None = None
        self.timeline: Timeline | None = None
        self._workers: Workers | None = None  # one thread per device, started by the first run
        self._finalizer: weakref.finalize | None = None

    # -- public ----------------------------------------------------------------------------------
    def forward(self, batch: Any) -> Any:
        """Inference: the gathered output of every micro-batch, computed without a graph.

        Example:
            logits = pipe(ids)          # equals the unsplit model's model(ids)
        """
        self._check_batch_norm(train=False)
        with torch.no_grad():
            return self._run(Runner(self, dict(batch) if isinstance(batch, Mapping) else batch))

    def step(self, batch: Any, targets: Any = None) -> Tensor:
        """Forward and backward of one batch; gradients accumulate into `.grad`. Returns the loss.

        An HF batch (a dict with "labels") needs no targets: without a loss_fn the model's own loss
        runs on each micro-batch, weighted by its share of the batch's counted labels.

        Example:
            pipe.zero_grad(); loss = pipe.step(x, y); optimizer.step()
            loss = Pipeline(split(llama, devices), chunks=4, schedule="1f1b").step(tokenizer_batch)
        """
        batch = dict(batch) if isinstance(batch, Mapping) else batch  # a BatchEncoding is a dict, too
        fn, targets, count = self._loss_of(batch, targets)
        if not torch.is_grad_enabled():
            raise RuntimeError("step runs backward, but gradients are disabled here (torch.no_grad); "
                               "call pipe(batch) for inference, or step outside torch.no_grad()")
        self._check_batch_norm(train=True)
        return self._run(Runner(self, batch, targets, train=True, loss_fn=fn, count=count))

    def _loss_of(self, batch: Any, targets: Any) -> tuple[LossFn, Any, Count | None]:
        """(loss_fn, targets, count): the model's own loss for an HF batch without a loss_fn, else loss_fn."""
        model = getattr(self.model, "hf", None)
        labelled = targets is None and isinstance(batch, dict) and "labels" in batch
        if labelled and model is not None:
            _hf_split.check_labels(model, batch)
        if labelled and self.loss_fn is None and model is not None:
            if self.loss_on == "gathered":
                raise ValueError("the model's own loss runs per micro-batch, weighted by its share of the counted "
                                 "labels, exact under every schedule: use loss_on='microbatch', or pass loss_fn")
            return _model_loss, batch["labels"], _count(self.items, _hf_split.items(model))
        if labelled:
            targets = batch.pop("labels")  # batch is the step's own copy
        if self.loss_fn is None:
            raise ValueError("step needs a loss: build Pipeline(..., loss_fn=fn) with fn(output, targets) "
                             "returning a scalar, e.g. mplib.train.lm_loss (an HF split model brings its own "
                             "loss: pass it a dict batch with 'labels')")
        if targets is None:
            raise ValueError("step needs targets: pipe.step(batch, targets), or a dict batch with 'labels'")
        return self.loss_fn, targets, _count(self.items, None)

    def close(self) -> None:
        """End the worker threads now (a later step starts new ones); collecting the pipeline does the same.

        Example:
            pipe.step(x, y); pipe.close()
        """
        if self._finalizer is not None:
            self._finalizer()
        self._workers = self._finalizer = None

    def __getstate__(self) -> dict:
        # threads are not state: a copy (copy.deepcopy, pickle) starts workers of its own
        return {**self.__dict__, "_workers": None, "_finalizer": None}

    # -- execution -----------------------------------------------------------------------------
    def _run(self, runner: Runner) -> Any:
        if self._workers is None:  # started once; the finalizer holds the workers, not the pipeline
            self._workers = Workers(self.K, name="pipeline")
            self._finalizer = weakref.finalize(self, self._workers.close)
        try:
            failure = runner.run(self._workers)
            if failure is not None:
                raise _error(failure)
            return runner.result()
        finally:
            self.timeline, self.step_seed = runner.timeline, runner.step_seed
            runner.close()  # nothing of the step stays, also when the caller keeps the exception

    def _check_batch_norm(self, train: bool) -> None:
        if self.batch_norm == "refuse" and (self.chunks > 1 or (train and self.checkpoint == "always")):
            for norm in self._norms:
                if norm[2].training:
                    raise _batchnorm.refusal(norm, self.chunks)


def _model_loss(output: Any, labels: Any) -> Tensor:
    return output.loss  # the HF model's own, computed on the last stage from this micro-batch's labels


def _count(items: str | Count | None, default: Count | None) -> Count | None:
    """What a micro-batch's loss is a mean over: None for its examples, else a count of its targets."""
    if items is None:
        return default
    if items == "tokens":
        return lambda targets: int((targets != _hf_split.IGNORE).sum())
    return None if items == "examples" else items


def _check_choice(what: str, value: str, known: tuple[str, ...]) -> None:
    if value not in known:
        raise ValueError(f"unknown {what} {value!r}; use one of {', '.join(known)}")


def _worker_devices(split_model: nn.Module, virtual: int) -> list[torch.device]:
    """The device of each worker: stage j sits on worker j % K, K = stages / virtual."""
    n = len(split_model.stages)
    if n % virtual:
        raise ValueError(f"{n} stages cannot be dealt to devices {virtual} chunks each; split the model "
                         f"into a multiple of {virtual} stages")
    devices = [torch.device(d) for d in split_model.devices[: n // virtual]]
    for j, d in enumerate(split_model.devices):
        if torch.device(d) != devices[j % len(devices)]:
            raise ValueError(f"interleaving puts stage {j} on device {j % len(devices)}, but it sits on {d}; "
                             f"split over devices repeated round-robin, e.g. {devices * virtual}")
    return devices


def _error(failure: Failure) -> Exception:
    """The exception a caller sees for a failed step: the rule for a bad loss, else where it failed."""
    exc, where = failure.exc, failure.where()
    err = ValueError(f"{exc} ({where})") if isinstance(exc, BadLoss) else \
        PipelineError(f"{where}: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err
