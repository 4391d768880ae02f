"""Micro-batches: scatter a nested batch along dim 0 into chunks, gather outputs back."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from mplib.transfer import map_tensors


def _leaves(obj: Any) -> list[Tensor]:
    """Every tensor inside `obj`, in the order `map_tensors` visits them."""
    found: list[Tensor] = []
    map_tensors(obj, lambda t: found.append(t) or t)
    return found


def batch_size(batch: Any) -> int:
    """The one dim-0 size shared by every tensor (ndim >= 1) in a nested batch.

    Example:
        batch_size({"ids": torch.zeros(8, 16), "mask": None})   # 8
        batch_size((torch.zeros(8, 4), torch.zeros(6, 4)))      # ValueError: sizes differ
    """
    sizes = {tuple(t.shape)[0] for t in _leaves(batch) if t.dim() > 0}
    if not sizes:
        raise ValueError("the batch holds no tensor with a batch dimension (dim 0); pass tensors "
                         "shaped (B, ...), alone or inside tuples/lists/dicts")
    if len(sizes) > 1:
        shapes = [tuple(t.shape) for t in _leaves(batch)]
        raise ValueError(f"tensors in one batch must share their dim-0 size, got shapes {shapes}; "
                         "split only per-example tensors, and keep shared ones (masks of shape (1, ...)) "
                         "out of the batch, e.g. as a module attribute")
    return sizes.pop()


def chunk_sizes(batch: int, chunks: int) -> list[int]:
    """Sizes of `chunks` micro-batches of a batch of `batch` examples, as even as possible.

    When `chunks` does not divide `batch`, the first `batch % chunks` micro-batches take one
    example more, so the last ones are the smaller ones and no micro-batch is empty.

    Example:
        chunk_sizes(10, 4)   # [3, 3, 2, 2]
    """
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"chunks must be a positive int (the number of micro-batches), got {chunks!r}")
    if batch < chunks:
        raise ValueError(f"a batch of {batch} examples cannot make {chunks} micro-batches (each needs at "
                         f"least one example); use chunks <= {batch} or a larger batch")
    return [batch // chunks + (1 if i < batch % chunks else 0) for i in range(chunks)]


def scatter(batch: Any, chunks: int) -> list[Any]:
    """Cut a nested batch into `chunks` micro-batches along dim 0, keeping its structure.

    Tensors inside tuples, lists, dicts and dataclasses are sliced (views, no copy); 0-dim
    tensors and plain values (None, ints, strings) are repeated in every micro-batch.

    Example:
        mbs = scatter((ids, {"mask": mask}), chunks=4)    # 4 x (ids[i:j], {"mask": mask[i:j]})
        assert torch.equal(gather([m[0] for m in mbs]), ids)
    """
    sizes = chunk_sizes(batch_size(batch), chunks)
    out, start = [], 0
    for size in sizes:
        out.append(map_tensors(batch, lambda t, a=start, b=start + size: t[a:b] if t.dim() > 0 else t))
        start += size
    return out


def gather(outputs: Sequence[Any]) -> Any:
    """Concatenate per-micro-batch outputs along dim 0 into one output of the same structure.

    Every output must have the same structure; 0-dim tensors (e.g. per-micro-batch losses) are
    stacked into a vector instead.

    Example:
        logits = gather([model(x) for x in scatter(ids, 4)])   # equals model(ids)
    """
    if len(outputs) == 0:
        raise ValueError("gather needs at least one micro-batch output, got an empty list")
    columns = [_leaves(o) for o in outputs]
    if len({len(c) for c in columns}) != 1:
        raise ValueError(f"micro-batch outputs differ in structure: they hold {[len(c) for c in columns]} "
                         "tensors; every micro-batch must return the same nested structure")
    joined = iter([torch.stack(list(ts)) if ts[0].dim() == 0 else torch.cat(list(ts))
                   for ts in zip(*columns)])
    return map_tensors(outputs[0], lambda t: next(joined))
