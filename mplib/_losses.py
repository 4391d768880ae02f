"""The two loss modes of a pipeline step as strategies: a loss per micro-batch, or one on the gathered output."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import Tensor

from mplib.memory import SavedBytes
from mplib.microbatch import _leaves, gather, scatter
from mplib.transfer import map_tensors, to_device

if TYPE_CHECKING:
    from mplib._runner import Runner

Count = Callable[[Any], int]  # targets of a micro-batch -> how many items its loss is a mean over


class BadLoss(ValueError):
    """loss_fn returned something other than a scalar tensor."""


class InLoss(Exception):
    """Raised from an exception in the gathered loss, so the step reports it as the loss's."""


class MicrobatchLoss:
    """loss_on="microbatch": each micro-batch's loss on the last stage, weighted by its share of the batch.

    The share is of what the loss is a mean over: examples, or with `count` the items counted in each
    micro-batch's targets (tokens whose label is not -100), as HF divides by `num_items_in_batch`. Then the
    weighted sum is the batch's mean over tokens under any schedule, however padding and ignored labels fall.
    """

    def __init__(self, loss_fn: Callable[[Any, Any], Tensor], targets: Any, sizes: list[int],
                 count: Count | None = None) -> None:
        self.fn, self.targets = loss_fn, scatter(targets, len(sizes))
        self.weights = shares([count(t) for t in self.targets] if count is not None else sizes, sizes)
        self.losses: dict[int, Tensor] = {}

    @staticmethod
    def check(schedule: str) -> None:
        pass  # any schedule: each micro-batch's backward starts from its own loss

    def on_output(self, run: Runner, w: int, m: int, y: Any) -> Any:
        """The last stage's output of micro-batch m, inside its forward: becomes what its backward starts from."""
        if self.weights[m] == 0:  # nothing counted here (all labels ignored): its mean is 0/0, its share none
            loss = nothing(y)
        else:  # the full batch's mean, micro-batch by micro-batch
            loss = _scalar(self.fn(y, to_device(self.targets[m], run.devices[w])), "micro-batch") * self.weights[m]
        self.losses[m] = loss.detach()
        return loss

    def after_forward(self, run: Runner, w: int, m: int, y: Any) -> None:
        pass

    def seed(self, m: int, y: Any) -> tuple[list[Tensor], list[Tensor] | None]:
        return ([y] if y.requires_grad else []), None  # y is the micro-batch's weighted loss

    def value(self) -> Tensor:
        return torch.stack([self.losses[m] for m in range(len(self.losses))]).sum()


class GatheredLoss:
    """loss_on="gathered": one loss on the gathered output; its gradient per output starts each backward."""

    def __init__(self, loss_fn: Callable[[Any, Any], Tensor], targets: Any, sizes: list[int],
                 count: Count | None = None) -> None:
        self.fn, self.targets, self.chunks = loss_fn, targets, len(sizes)  # one loss: nothing to weigh
        self.outputs: dict[int, Any] = {}  # the last stage's outputs, as fresh leaves
        self.grads: dict[int, list] = {}  # d loss / d (output of micro-batch m)
        self.loss: Tensor | None = None

    @staticmethod
    def check(schedule: str) -> None:
        if str(schedule).lower() != "gpipe":
            raise ValueError(f"loss_on='gathered' needs every forward before the first backward, which only "
                             f"'gpipe' (fill-drain) gives, but schedule={schedule!r} starts backwards earlier; "
                             "use schedule='gpipe', or loss_on='microbatch' with a loss that is a mean over examples")

    def on_output(self, run: Runner, w: int, m: int, y: Any) -> Any:
        return y  # the loss waits for every micro-batch's output

    def after_forward(self, run: Runner, w: int, m: int, y: Any) -> None:
        self.outputs[m] = map_tensors(y, fresh_leaf)
        if len(self.outputs) == self.chunks:  # the last forward: every output is here
            try:
                self._loss(run, w)
            except BaseException as exc:  # noqa: BLE001 - reported as the loss's failure
                raise InLoss from exc
            self.outputs = {}

    def _loss(self, run: Runner, w: int) -> None:
        outs = [_leaves(self.outputs[m]) for m in range(self.chunks)]
        counter = SavedBytes(run.params, whole_storages=False)
        with run.timeline.record(w, "other", sync=run.sync(w), stage=run.last, label="loss"):
            with counter:
                full = gather([self.outputs[m] for m in range(self.chunks)])
                loss = _scalar(self.fn(full, to_device(self.targets, run.devices[w])), "batch")
            run.account(w, counter.bytes)
            wanted = [t for ts in outs for t in ts if t.requires_grad]
            grads = iter(torch.autograd.grad(loss, wanted, allow_unused=True))
        run.account(w, -counter.bytes)  # autograd.grad freed the loss's graph
        self.grads = {m: [next(grads) if t.requires_grad else None for t in ts] for m, ts in enumerate(outs)}
        self.loss = loss.detach()

    def seed(self, m: int, y: Any) -> tuple[list[Tensor], list[Tensor] | None]:
        return pairs(y, self.grads.pop(m))

    def value(self) -> Tensor:
        return self.loss


LOSSES = {"microbatch": MicrobatchLoss, "gathered": GatheredLoss}


def pairs(y: Any, grads: list) -> tuple[list[Tensor], list[Tensor]]:
    """The outputs that take part in the backward, with their gradients."""
    both = [(o, g) for o, g in zip(_leaves(y), grads) if g is not None and o.requires_grad]
    return [o for o, _ in both], [g for _, g in both]


def shares(counts: list[int], sizes: list[int]) -> list[float]:
    """Each micro-batch's share of the batch's counted items (of its examples when nothing is counted)."""
    total = sum(counts)
    return [c / total for c in counts] if total else [s / sum(sizes) for s in sizes]


def nothing(y: Any) -> Tensor:
    """A zero loss on an output, whose backward sends zero gradients (a loss it carries is left out: 0/0)."""
    parts = [v for k, v in y.items() if k != "loss"] if isinstance(y, Mapping) else y
    grads = [t.sum() for t in _leaves(parts) if t.requires_grad]
    return sum(grads) * 0.0 if grads else torch.zeros(())


def _scalar(loss: Any, over: str) -> Tensor:
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        got = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
        raise BadLoss(f"loss_fn must return a scalar tensor (the loss of the {over}), got {got}; "
                      "reduce it, e.g. with .mean()")
    return loss


def fresh_leaf(t: Tensor) -> Tensor:
    return t.detach().requires_grad_(t.requires_grad and torch.is_grad_enabled())
