"""Each micro-batch's loss weighted by its share of the global batch's items, as `mplib.Pipeline` weighs it.

Micro-batches of unequal size are padded to one shape (torch's stages receive into fixed buffers)
and the padding rows are cut from the last stage's output before the loss, so they weigh nothing.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

from mplib._losses import nothing
from mplib.microbatch import chunk_sizes, scatter
from mplib.pipeline import ITEMS, Count, _count
from mplib.transfer import map_tensors


def check_items(items: Any) -> Count | None:
    """The count of a micro-batch's items from its targets (None: its examples), as `mplib.Pipeline` reads `items`.

    Example:
        check_items("tokens")(torch.tensor([[1, -100, 2]]))   # 2
        # the targets that are not -100
    """
    if not (items is None or callable(items) or items in ITEMS):
        raise ValueError(f"unknown items {items!r}; use one of {', '.join(ITEMS)}, or a function of a "
                         "micro-batch's targets returning how many items its loss is a mean over")
    return _count(items, None)


def rows(batch: int, dp: int, replica: int, chunks: int) -> tuple[slice, list[int]]:
    """Replica `replica`'s rows of the batch and the sizes of its `chunks` micro-batches (first ones larger).

    Example:
        rows(10, 2, 1, 2) == (slice(5, 10), [3, 2])   # True
        # replica 1 of 2 takes rows 5 to 9, in micro-batches of 3 and 2
    """
    if batch < dp * chunks:
        raise ValueError(f"a batch of {batch} rows cannot give dp={dp} replicas {chunks} micro-batches of at least "
                         f"one row each; use a batch of at least {dp * chunks} rows, or fewer chunks")
    parts = chunk_sizes(batch, dp)
    start = sum(parts[:replica])
    return slice(start, start + parts[replica]), chunk_sizes(parts[replica], chunks)


def pad(t: Tensor, sizes: list[int], fill: float | None = None) -> Tensor:
    """`t`'s micro-batches (of `sizes` rows) each filled up to the largest with copies of its first row
    (with `fill`: with rows of that value, e.g. labels -100 that a model's own loss ignores).

    Example:
        pad(torch.arange(5), [3, 2])   # [0, 1, 2, 3, 4, 3]
        # torch's stages receive micro-batches of one shape
    """
    n, index, start = max(sizes), [], 0
    for s in sizes:
        index += list(range(start, start + s)) + [start] * (n - s)
        start += s
    if n * len(sizes) == t.shape[0]:
        return t
    out = t[torch.tensor(index, device=t.device)]
    if fill is not None:
        real = torch.tensor([i < s for s in sizes for i in range(n)], device=t.device)
        out[~real] = fill
    return out


def weights(counts: list[int], sizes: list[int], group: Any = None, device: Any = None) -> list[float]:
    """Each micro-batch's share of the global batch's items: its count over all replicas' (one all-reduce).

    Of the examples when nothing is counted anywhere, as `mplib._losses.shares` does in one process.
    `device`: where the counts are summed (a GPU's for NCCL, which reduces no CPU tensor).

    Example:
        weights([3, 1], [2, 2])   # [0.75, 0.25]
        # on one replica; over `group`, the counts are shares of every replica's sum
    """
    total = torch.tensor([float(sum(counts)), float(sum(sizes))], dtype=torch.float64, device=device)
    if group is not None:
        dist.all_reduce(total, group=group)
    items, examples = total.tolist()
    return [c / items for c in counts] if items else [s / examples for s in sizes]


class WeightedLoss:
    """torch's loss_fn: micro-batch m's `loss_fn(output, targets)` on its own rows, times its weight.

    torch's schedule is given `target=torch.arange(M)`, so micro-batch m's "target" is its index;
    `begin` sets the step's real targets, sizes and weights. A micro-batch with no counted item
    (every label ignored) weighs nothing: its loss is a zero that sends zero gradients back.
    """

    def __init__(self, loss_fn: Callable[[Any, Any], Tensor], output_of: Callable[[Any], Any]) -> None:
        self.loss_fn, self.output_of = loss_fn, output_of
        self.targets: list[Any] = []
        self.sizes: list[int] = []
        self.weights: list[float] = []

    def begin(self, targets: Any, sizes: list[int], count: Count | None, group: Any = None,
              device: Any = None) -> None:
        """The step's targets (this replica's), its micro-batch sizes, and their weights over `group`'s replicas."""
        self.targets, self.sizes = scatter(targets, len(sizes)), sizes
        counts = [count(t) for t in self.targets] if count is not None else sizes
        self.weights = weights(counts, sizes, group, device)

    def __call__(self, output: Any, index: Tensor) -> Tensor:
        m = int(index.reshape(-1)[0])
        y, n, s = self.output_of(output), max(self.sizes), self.sizes[m]
        if s < n:  # cut the padding rows: the loss (and so every gradient) sees only the real ones
            y = map_tensors(y, lambda t: t[:s] if t.dim() > 0 and t.shape[0] == n else t)
        if self.weights[m] == 0:
            return nothing(y)
        loss = self.loss_fn(y, self.targets[m])
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            got = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar tensor (the loss of the micro-batch), got {got}; "
                             "reduce it, e.g. with .mean()")
        return loss * self.weights[m]
