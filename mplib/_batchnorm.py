"""Batch norm under micro-batches: find it, refuse it, or defer its running statistics to the step's end."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

Norm = tuple[str, int, _BatchNorm]  # (qualified name in the unsplit model, stage, module)


def find(split_model: nn.Module) -> list[Norm]:
    """Every batch norm of a SplitModel's stages, named as in the unsplit model (block name, then the path)."""
    plan = getattr(split_model, "plan", None)
    found = []
    for j, stage in enumerate(split_model.stages):
        for path, mod in stage.named_modules():
            if isinstance(mod, _BatchNorm):
                found.append((_unsplit_name(plan, j, path), j, mod))
    return found


def _unsplit_name(plan: Any, j: int, path: str) -> str:
    parts = path.split(".")  # "blocks.<k>.<path inside block k>" within stage j
    if plan is None or len(parts) < 2 or parts[0] != "blocks":
        return f"stages.{j}.{path}"
    return ".".join([plan.blocks[j][int(parts[1])], *parts[2:]])


def refusal(norm: Norm, chunks: int) -> ValueError:
    """The error for a batch norm in training mode that would see micro-batches (or its forward twice)."""
    name, j, bn = norm
    why = (f"with chunks={chunks} each micro-batch is normalised by its own statistics and updates the running "
           "ones" if chunks > 1 else "checkpoint='always' runs its forward again in the backward, updating the "
           "running statistics twice")
    return ValueError(f"{type(bn).__name__} '{name}' (stage {j}) is in training mode: {why}, so the loss, the "
                      "gradients and the running statistics differ from the unsplit model's. Fix: "
                      "Pipeline(..., batch_norm='deferred') (running statistics of the whole batch, updated once "
                      "per step; outputs still per micro-batch), or model.eval(), or chunks=1, or replace it with "
                      "nn.LayerNorm / nn.GroupNorm, which do not mix examples")


class Deferred:
    """One step's batch statistics of every training batch norm, combined micro-batch by micro-batch.

    Inside `with`, the norms run with `track_running_stats=False`: each micro-batch is normalised by its
    own mean and variance and nothing touches the running statistics. A forward pre-hook folds each
    micro-batch's count, mean and sum of squared deviations into the step's (Chan, Golub and LeVeque's
    pairwise update, stable where E[x^2] - E[x]^2 is not). `commit()`, once the step has succeeded, makes
    the one update the unsplit model's forward makes: the unbiased variance, `momentum` or the cumulative
    average when momentum is None, `num_batches_tracked + 1`. A failed step commits nothing.
    `recomputing(stage)` tells a checkpointed forward run again inside the backward: it is not counted.
    """

    def __init__(self, norms: list[Norm], chunks: int, recomputing: Callable[[int], bool]) -> None:
        self.chunks, self.recomputing = chunks, recomputing
        self.norms = [(j, bn) for _, j, bn in norms if bn.training and bn.track_running_stats]
        self.stats: dict[int, tuple[int, int, Tensor, Tensor]] = {}  # norm -> (micro-batches, count, mean, m2)
        self.handles: list[Any] = []

    def __enter__(self) -> "Deferred":
        for i, (j, bn) in enumerate(self.norms):
            bn.track_running_stats = False
            self.handles.append(bn.register_forward_pre_hook(partial(self._observe, i, j)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle, (_, bn) in zip(self.handles, self.norms):
            handle.remove()
            bn.track_running_stats = True
        self.handles = []

    def commit(self) -> None:
        """Update every norm's running statistics from the whole batch's."""
        for i, (_, bn) in enumerate(self.norms):
            if i in self.stats:  # a norm the forward did not reach keeps its statistics, as unsplit
                _update(bn, *self.stats[i][1:])
        self.stats = {}

    @torch.no_grad()
    def _observe(self, i: int, j: int, bn: _BatchNorm, inputs: tuple) -> None:
        if self.recomputing(j):
            return
        x = inputs[0].detach()  # (B, C, ...): statistics per channel C
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        var, mean = torch.var_mean(x, dim=[d for d in range(x.dim()) if d != 1], correction=0)
        n, mean, m2 = x.numel() // x.size(1), mean.double(), var.double() * (x.numel() // x.size(1))
        if i in self.stats:
            seen, n0, mean0, m20 = self.stats[i]
            total, delta = n0 + n, mean - mean0
            n, mean, m2 = total, mean0 + delta * (n / total), m20 + m2 + delta.square() * (n0 * n / total)
        else:
            seen = 0
        self.stats[i] = (seen + 1, n, mean, m2)


@torch.no_grad()
def _update(bn: _BatchNorm, n: int, mean: Tensor, m2: Tensor) -> None:
    """The running-statistics update of `bn`'s training forward, for a batch of `n` values per channel."""
    bn.num_batches_tracked.add_(1)
    f = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    var = m2 / max(n - 1, 1)  # unbiased, as BatchNorm's running_var
    bn.running_mean.copy_(f * mean.to(bn.running_mean.dtype) + (1 - f) * bn.running_mean)
    bn.running_var.copy_(f * var.to(bn.running_var.dtype) + (1 - f) * bn.running_var)
