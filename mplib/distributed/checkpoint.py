"""Distributed checkpoints (torch.distributed.checkpoint) under the unsplit model's keys: saved from one layout, loaded onto any.

Each rank writes the tensors of its stages under the keys of `model.state_dict()`; a tied
weight and the replicas of data parallelism hold one key with one value, which DCP writes once.
Tensor-parallel slices are gathered into whole tensors first (simple and exact, at the cost of
one whole tensor per rank while saving; a DTensor checkpoint would write each slice once). A
checkpoint therefore loads onto any other balance, number of stages, dp or tp, or onto the
unsplit model on one device (`load_model`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn


def _mine(pipe: Any) -> list[tuple[str, Tensor]]:
    """(key, tensor) of every tensor this rank holds, in the model's state_dict order (the same on every tp rank)."""
    held = {id(t) for m in pipe.stage_modules for t in [*m.parameters(), *m.buffers()]}
    return [(k, t) for k, t in pipe.blocks.source.state_dict(keep_vars=True).items() if id(t) in held]


def _splits(pipe: Any) -> dict[str, Any]:
    if pipe.mesh.shape["tp"] == 1:
        return {}
    import mplib.tensor_parallel as tpar

    return tpar.split_names(pipe.blocks.source)


def state_dict(pipe: Any) -> dict[str, Tensor]:
    """This rank's tensors under the unsplit model's keys; tensor-parallel slices gathered whole (collective over tp).

    Example (several processes):
        # pipe: a DistributedPipeline(GPT(GPT_TINY), [2, 2], ...) on 2 ranks
        sd = mplib.distributed.state_dict(pipe)     # rank 0: embed.*, h.0.*, and head.lm_head.weight (tied)
    """
    splits, out = _splits(pipe), {}
    group = pipe.mesh.groups["tp"]
    for key, t in _mine(pipe):
        v = t.detach()
        if key in splits:
            T = pipe.mesh.shape["tp"]
            parts = [torch.empty_like(v) for _ in range(T)]
            torch.distributed.all_gather(parts, v.contiguous(), group=group)
            v = splits[key].unshard(parts)
        out[key] = v
    return out


def save(pipe: Any, path: str | Path) -> None:
    """Write every rank's tensors to the folder `path`; every rank calls it.

    Example (several processes):
        mplib.distributed.save(pipe, "ckpt/step-100")
    """
    dcp.save(state_dict(pipe), checkpoint_id=str(path))


def load(pipe: Any, path: str | Path) -> None:
    """Fill this rank's parameters and buffers from a checkpoint saved by any layout; every rank calls it.

    Example (several processes):
        mplib.distributed.load(pipe, "ckpt/step-100")   # saved by 4 stages, loaded by 2
    """
    splits, sd = _splits(pipe), state_dict(pipe)  # whole tensors: views of ours, gathered copies of tp slices
    dcp.load(sd, checkpoint_id=str(path))
    held = dict(_mine(pipe))
    with torch.no_grad():
        for key, whole in sd.items():
            if key in splits:
                held[key].copy_(splits[key].shard(whole, pipe.mesh.coords["tp"], pipe.mesh.shape["tp"]))


def load_model(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a distributed checkpoint into the unsplit model in this process (no process group needed).

    Example:
        model = mplib.distributed.load_model(GPT(GPT_TINY), "ckpt/step-100")   # every stage's weights, one device
    """
    sd = {k: v for k, v in model.state_dict().items()}
    with warnings.catch_warnings():  # DCP announces the single process it was asked for (no_dist)
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(sd, checkpoint_id=str(path), no_dist=True)  # in place: the values are views of the parameters
    return model
