"""What checkpointing, offload and freezing save, predicted with `mplib.memory.estimate` (nothing allocated).

`mplib.memory.estimate` counts one plain training step; this module runs it on the model with its
blocks wrapped the way the technique runs them (a checkpointed block saves only its inputs, a
frozen prefix runs without a graph) and moves what offload moves to the host.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

import mplib.layers
import mplib.memory
from mplib.memory import OPTIMIZER_STATES, MemoryEstimate


@dataclass
class OffloadEstimate:
    """Bytes of one training step on the device (`device`, a MemoryEstimate) and on the host.

    `recompute` is what a checkpointed step holds on top of `device.activations` while it
    recomputes its largest checkpointed block during backward.

    Example:
        est = estimate(model, batch=8, seq=16, checkpoint=True)
        est.device.activations, est.recompute, est.host
    """

    device: MemoryEstimate
    host: int = 0
    recompute: int = 0
    options: dict = dataclasses.field(default_factory=dict)

    @property
    def peak(self) -> int:
        """Device bytes at the step's peak: parameters, gradients, optimizer, activations, recompute."""
        return self.device.total + self.recompute


def estimate(model: Any, batch: int, seq: int, dtype: torch.dtype = torch.float32, optimizer: str | None = "adam",
             mixed_precision: bool = False, loss: bool = True, inputs: Sequence[Any] | None = None, *,
             checkpoint: bool | Sequence[int] = False, offload_activations: bool = False,
             offload_optimizer: bool = False, frozen: int = 0) -> OffloadEstimate:
    """`mplib.memory.estimate` of a step with checkpointing, offload and/or a frozen prefix.

    `checkpoint`: True for every block but the first and last (as `mplib.speedups.checkpoint`),
    or a list of block indices. `offload_activations`: every saved activation goes to the host.
    `offload_optimizer`: optimizer states and fp32 master weights live on the host
    (`OffloadedOptimizer`). `frozen`: the first n blocks are frozen (`mplib.speedups.freeze`): no
    gradients, optimizer states or saved activations. `model` is an nn.Module or an mplib
    `GPTConfig` / `BERTConfig` (built on the meta device: nothing is allocated).

    Example:
        plain = mplib.memory.estimate(model, 8, 16)
        est = estimate(model, 8, 16, checkpoint=True)
        plain.activations - est.device.activations     # what checkpointing saves
    """
    model = _module(model)
    parts = mplib.layers.blocks(model)
    n = len(parts)
    if isinstance(frozen, bool) or not isinstance(frozen, int) or not 0 <= frozen <= n:
        raise ValueError(f"frozen must count leading blocks, 0 to {n} ({', '.join(parts.names)}), got {frozen!r}")
    chosen = set(_chosen(checkpoint, n, parts.names))
    wrapped = [_NoGrad(m) if i < frozen else _Recompute(m) if i in chosen else m
               for i, m in enumerate(parts.modules)]
    est = mplib.memory.estimate(nn.Sequential(*wrapped), batch, seq, dtype, optimizer, mixed_precision, loss, inputs)
    est.per_block = [dataclasses.replace(b, name=name) for b, name in zip(est.per_block, parts.names)]
    est.label = type(model).__name__
    width = dtype.itemsize
    trainable = sum(b.params // width for b in est.per_block[frozen:])
    states = OPTIMIZER_STATES[optimizer or "none"]
    est.grads = trainable * width
    est.optimizer = trainable * 4 * (states + 1) if mixed_precision else trainable * width * states
    host = 0
    recompute = 0
    if chosen:
        plain = mplib.memory.estimate(nn.Sequential(*[_NoGrad(m) if i < frozen else m
                                                     for i, m in enumerate(parts.modules)]),
                                      batch, seq, dtype, optimizer, mixed_precision, loss, inputs)
        recompute = max(plain.per_block[i].activations for i in chosen)
    if offload_activations:
        host += est.activations
        est.activations, recompute = 0, 0
    if offload_optimizer:
        master = 0 if mixed_precision else trainable * 4  # mixed precision: the master weights are counted already
        host += est.optimizer + master
        est.optimizer = 0
    return OffloadEstimate(est, host, recompute, dict(checkpoint=sorted(chosen), offload_activations=offload_activations,
                                                      offload_optimizer=offload_optimizer, frozen=frozen))


class _Recompute(nn.Module):
    """A block run under torch.utils.checkpoint: it saves its inputs only."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: Any) -> Any:
        return _checkpoint(self.block, *args, use_reentrant=False)


class _NoGrad(nn.Module):
    """A frozen-prefix block: runs without a graph."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: Any) -> Any:
        with torch.no_grad():
            return self.block(*args)


def _chosen(checkpoint: bool | Sequence[int], n: int, names: Sequence[str]) -> list[int]:
    if checkpoint is False:
        return []
    chosen = list(range(1, n - 1)) if checkpoint is True else list(checkpoint)
    if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n for i in chosen):
        raise ValueError(f"checkpoint takes True or indices of the {n} blocks ({', '.join(names)}), got {checkpoint}")
    return chosen


def _module(model: Any) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    name = type(model).__name__
    if name == "GPTConfig":
        from mplib.models.gpt import GPT as build
    elif name == "BERTConfig":
        from mplib.models.bert import BERT as build
    else:
        raise TypeError(f"estimate takes an nn.Module or an mplib GPTConfig / BERTConfig, got {name}; build the "
                        "model on the meta device (with torch.device('meta'): model = ...) and pass it")
    with torch.device("meta"):
        return build(model)
