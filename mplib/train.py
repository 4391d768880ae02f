"""The training loop every notebook shares: steps of (batch -> loss -> backward -> update), a progress bar."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BatchLoss = Callable[[nn.Module, Any], Tensor]  # loss_fn(model, batch) -> scalar (pipeline.LossFn is (output, targets))
EvalFn = Callable[[nn.Module], float]
OPTIMIZERS = ("adamw", "adam", "sgd")
SGD_MOMENTUM = 0.9  # "sgd" keeps one momentum buffer per parameter, as mplib.memory and mplib.profile count it


@dataclass
class History:
    """What `fit` saw: one training loss per step, evaluations as (step, value), wall seconds.

    Example:
        history = fit(model, batches, loss_fn, steps=3, progress=False)
        history.losses[-1], history.mean_last(2)
    """

    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.losses)

    def mean_last(self, k: int = 20) -> float:
        """Mean of the last `k` step losses: a less noisy "final loss" than `losses[-1]`."""
        if not self.losses:
            raise ValueError("this History has no losses yet; run fit(...) with steps >= 1 first")
        tail = self.losses[-k:]
        return sum(tail) / len(tail)


def lm_loss(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Cross entropy of next-token logits (B, T, V) against targets (B, T), averaged over tokens.

    Example:
        logits = model(x)                 # (B, T, V)
        loss = lm_loss(logits, y)         # scalar; targets equal to ignore_index are skipped
    """
    if logits.dim() < 2 or logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be targets {tuple(targets.shape)} plus a "
                         "last vocabulary dimension, e.g. (B, T, V) and (B, T); pass the model's raw logits")
    vocab = logits.size(-1)
    return F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), ignore_index=ignore_index)


def make_optimizer(model: nn.Module, name: str = "adamw", lr: float = 1e-3,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The optimizer `fit` uses by name: "adamw", "adam" or "sgd" over the trainable parameters.

    "sgd" is SGD with momentum 0.9 (`SGD_MOMENTUM`): one state tensor per parameter, the count
    `mplib.memory` and `mplib.profile` charge for it. For plain SGD pass
    `torch.optim.SGD(params, lr)` to `fit` instead.

    Example:
        opt = make_optimizer(model, "sgd", lr=0.1)
        opt.step()
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False); "
                         "unfreeze some with p.requires_grad_(True)")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; use one of {OPTIMIZERS} or pass a torch.optim.Optimizer")


def _batch_stream(batches: Iterable[Any]) -> Iterator[Any]:
    # An iterator (e.g. mplib.data.lm_batches) is consumed as is; a finite iterable (a list of
    # batches) is cycled, so `steps` may exceed its length.
    if iter(batches) is batches:
        yield from batches
        return
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            return


def _evaluate(model: nn.Module, eval_fn: EvalFn) -> float:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            value = eval_fn(model)
    finally:
        model.train(was_training)
    return float(value)


def fit(model: nn.Module, batches: Iterable[Any], loss_fn: BatchLoss, steps: int, lr: float = 1e-3,
        optimizer: str | torch.optim.Optimizer = "adamw", weight_decay: float = 0.0,
        grad_clip: float | None = None, progress: bool = True, log_every: int = 1,
        eval_fn: EvalFn | None = None, eval_every: int | None = None) -> History:
    """Train `model` for `steps` optimizer steps, one batch per step; returns the loss History.

    `loss_fn(model, batch)` returns a scalar loss, so any model and batch layout fits. With
    `eval_fn(model) -> float`, evaluation runs (under no_grad, in eval mode) every `eval_every`
    steps and after the last one. The progress bar (tqdm.auto) shows the running loss, updated
    every `log_every` steps.

    Example:
        loss_fn = lambda m, b: lm_loss(m(b[0]), b[1])
        history = fit(model, mplib.data.lm_batches(ids, 16, 64), loss_fn, steps=20, lr=3e-3)
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}; pass e.g. steps=100")
    if log_every < 1:
        raise ValueError(f"log_every must be at least 1 step, got {log_every}")
    if eval_every is not None and (eval_every < 1 or eval_fn is None):
        raise ValueError(f"eval_every={eval_every} needs eval_fn and must be at least 1; "
                         "pass eval_fn=lambda model: ... or drop eval_every")
    if grad_clip is not None and grad_clip <= 0:
        raise ValueError(f"grad_clip must be positive or None, got {grad_clip}")
    opt = optimizer if isinstance(optimizer, torch.optim.Optimizer) else \
        make_optimizer(model, optimizer, lr=lr, weight_decay=weight_decay)

    history = History()
    stream = _batch_stream(batches)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="training", leave=True)
    model.train()
    start = time.perf_counter()
    try:
        for step in range(1, steps + 1):
            try:
                batch = next(stream)
            except StopIteration:
                raise ValueError(f"batches ran out after {step - 1} of {steps} steps; pass an endless "
                                 "iterator (mplib.data.lm_batches) or a re-iterable list") from None
            loss = loss_fn(model, batch)
            if loss.dim() != 0:
                raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}; "
                                 "reduce it with .mean()")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            history.losses.append(loss.item())
            if eval_fn is not None and ((eval_every and step % eval_every == 0) or step == steps):
                history.evals.append((step, _evaluate(model, eval_fn)))
            if bar is not None:
                bar.update(1)
                if step % log_every == 0 or step == steps:
                    post = {"loss": f"{history.mean_last(log_every):.3f}"}
                    if history.evals:
                        post["eval"] = f"{history.evals[-1][1]:.3f}"
                    bar.set_postfix(post)
    finally:
        history.seconds = time.perf_counter() - start
        if bar is not None:
            bar.close()
    return history
