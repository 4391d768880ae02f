"""Checks at the start of a distributed job: every process must run the same plan on the same model.

A fingerprint (settings, block names, parameter shapes, a checksum of the values per block) is
gathered from every rank; the first that differs from rank 0 is named, with what differs, before
any stage waits for another.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch
import torch.distributed as dist

from mplib.layers import Blocks


def check_balance(balance: Sequence[int], n: int) -> list[int]:
    """The balance as a list of ints, or a ValueError saying the rule, the values and the fix.

    Example:
        n = len(mplib.layers.blocks(GPT(GPT_TINY)))   # 4 blocks: embed, h.0, h.1, head
        check_balance([2, 2], n)                      # [2, 2]
        check_balance([1, 1, 1, 1, 1], n)             # ValueError: 5 stages need at least 5 blocks
    """
    from mplib.partition import uniform

    balance = list(balance)
    if not balance or any(isinstance(b, bool) or not isinstance(b, int) for b in balance):
        raise ValueError(f"balance must be a non-empty list of ints (blocks per stage), got {balance!r}")
    if len(balance) > n:
        raise ValueError(f"a plan of {len(balance)} stages needs at least {len(balance)} blocks, but the model has {n}; "
                         f"use at most {n} stages, e.g. balance={uniform(n, min(n, 2))}, or cut the model into more "
                         "blocks")
    if min(balance) < 1 or sum(balance) != n:
        raise ValueError(f"balance {balance} must be positive and sum to the model's {n} blocks (it sums to "
                         f"{sum(balance)}); use mplib.partition.uniform({n}, {len(balance)}) = "
                         f"{uniform(n, len(balance))}")
    return balance


def fingerprint(blocks: Blocks, settings: dict[str, Any]) -> dict[str, Any]:
    """What every rank must agree on; cheap (one pass over the parameters, no communication).

    Example:
        fp = fingerprint(mplib.layers.blocks(GPT(GPT_TINY)), {"balance": [2, 2], "chunks": 4})
    """
    values, shapes = [], hashlib.sha256()
    for name, module in zip(blocks.names, blocks.modules):
        h = hashlib.sha256()
        for pname, p in module.state_dict(keep_vars=True).items():
            shapes.update(f"{name}.{pname}:{tuple(p.shape)}:{p.dtype};".encode())
            if p.numel() and (p.is_floating_point() or p.dtype in (torch.int64, torch.int32)):
                t = p.detach().double()
                h.update(f"{t.sum().item():.17g},{t.abs().sum().item():.17g},{t.flatten()[0].item():.17g}".encode())
        values.append(h.hexdigest()[:16])
    return {"settings": settings, "blocks": list(blocks.names), "shapes": shapes.hexdigest()[:16], "values": values}


def agree(mine: dict[str, Any], group: Any = None) -> None:
    """Gather every rank's fingerprint; raise the same ValueError on every rank if one differs.

    Example (several processes):
        # on every rank of the job, before any stage waits for another
        agree(fingerprint(mplib.layers.blocks(GPT(GPT_TINY)), {"balance": [2, 2], "chunks": 4}))
    """
    world = dist.get_world_size(group)
    every: list[Any] = [None] * world
    dist.all_gather_object(every, mine, group=group)
    ref = every[0]
    for r, fp in enumerate(every[1:], start=1):
        if fp == ref:
            continue
        start = ("processes were started with different plans or models (detected at start by comparing a "
                 f"fingerprint): rank {r}")
        fix = "start every process with the same command, model and seed"
        if fp["settings"] != ref["settings"]:
            diff = {k: (ref["settings"].get(k), fp["settings"].get(k)) for k in ref["settings"].keys() | fp["settings"]
                    if ref["settings"].get(k) != fp["settings"].get(k)}
            detail = "; ".join(f"{k} {b!r} where rank 0 has {a!r}" for k, (a, b) in sorted(diff.items()))
            raise ValueError(f"{start} has {detail}; {fix}")
        if fp["blocks"] != ref["blocks"] or fp["shapes"] != ref["shapes"]:
            raise ValueError(f"{start} has a different model (blocks {fp['blocks'][:4]}..., or parameter shapes) "
                             f"than rank 0 ({ref['blocks'][:4]}...); {fix}")
        block = next(n for n, a, b in zip(ref["blocks"], ref["values"], fp["values"]) if a != b)
        raise ValueError(f"{start}'s parameters of block {block!r} differ from rank 0's: the processes built their "
                         f"models from different seeds or weights; call torch.manual_seed(same) before building the "
                         f"model on every rank, or load the same checkpoint; {fix}")
