"""Sequence parallelism (Korthikanti et al., arXiv 2205.05198): between the split matmuls, each rank
keeps 1/T of the sequence, so the norms, dropouts and residual adds are split too.

    embedding (whole) --scatter--> [layer 0 ... layer L-1] on 1/T of the tokens --gather--> head (whole)

Inside a layer the column-parallel input all-gathers the sequence and the row-parallel output
reduce-scatters it (`layers.py`). A norm in there sees 1/T of the tokens, so its weight's
gradient on each rank is a partial sum: each layer's replicated parameters go through one f
(identity forward, all-reduce backward) per forward, which sums them, as Megatron-LM all-reduces
its "sequence_parallel" parameters' gradients after the backward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mplib.tensor_parallel.group import Group
from mplib.tensor_parallel.layers import Split, is_parallel
from mplib.tensor_parallel.mappings import copy_to_tp, gather_from_sp, scatter_to_sp
from mplib.tensor_parallel.plans import map_hidden


def _check_length(x: Tensor, group: Group, where: str) -> Tensor:
    if x.shape[1] % group.size:
        n = x.shape[1]
        raise ValueError(f"sequence parallelism splits the {n} tokens of each sequence over T={group.size} ranks "
                         f"({where}), and {n} is not a multiple of {group.size}: pad the batch to "
                         f"{-(-n // group.size) * group.size} tokens or parallelize without sequence_parallel")
    return x


def apply(replica: nn.Module, layers: list[str], group: Group) -> None:
    """Scatter the sequence at the first layer's input, gather it at the last layer's output, and sum
    the gradients of every layer's replicated parameters across the ranks."""
    if not layers:
        raise ValueError("sequence_parallel=True needs a model whose transformer layers the plan knows; "
                         "a plan given by hand has none: parallelize it without sequence_parallel")
    first, last = replica.get_submodule(layers[0]), replica.get_submodule(layers[-1])

    def scatter(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return map_hidden(args, kwargs, lambda x: scatter_to_sp(_check_length(x, group, f"{layers[0]}'s input"),
                                                                group, label="sequence.scatter"))

    def gather(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        fn = lambda x: gather_from_sp(x, group, label="sequence.gather", to_tp=False)  # noqa: E731
        return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)

    first.register_forward_pre_hook(scatter, with_kwargs=True)
    last.register_forward_hook(gather, with_kwargs=True)
    for name in layers:
        _sum_replicated_grads(replica.get_submodule(name), group, f"{name}.replicated")


def _sum_replicated_grads(layer: nn.Module, group: Group, label: str) -> None:
    """During the layer's forward its replicated parameters are views of f(one flat copy of them)."""
    owners = [(mod, n) for mod in layer.modules() if not is_parallel(mod) for n, p in mod.named_parameters(recurse=False)
              if p is not None]
    parallel_bias = [(mod, "bias") for mod in layer.modules() if is_parallel(mod) and getattr(mod, "bias", None)
                     is not None and "bias" not in mod.splits]  # a row-parallel bias is replicated
    owners += parallel_bias
    if not owners:
        return
    saved: list[list[nn.Parameter]] = []

    def swap_in(mod: nn.Module, args: tuple) -> None:
        params = [m._parameters[n] for m, n in owners]
        flat = copy_to_tp(torch.cat([p.reshape(-1) for p in params]), group, label)
        for (m, n), p, view in zip(owners, params, flat.split([p.numel() for p in params])):
            m._parameters[n] = view.view_as(p)  # a tensor, not a Parameter, for this forward only
        saved.append(params)

    def swap_out(mod: nn.Module, args: tuple, out: Any) -> None:
        if saved:
            for (m, n), p in zip(owners, saved.pop()):
                m._parameters[n] = p

    layer.register_forward_pre_hook(swap_in)
    layer.register_forward_hook(swap_out, always_call=True)


def splits_of(replica: nn.Module) -> dict[str, Split]:
    """{parameter name: Split} of every split parameter of a parallelized model (tied names included)."""
    out = {}
    for name, mod in replica.named_modules(remove_duplicate=False):
        for pname, split in getattr(mod, "splits", {}).items():
            if is_parallel(mod):
                out[f"{name}.{pname}" if name else pname] = split
    return out
