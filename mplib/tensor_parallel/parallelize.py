"""`parallelize(model, devices_or_group)`: a model split by Megatron-LM's plan, in one process or one rank of many.

Over devices, the model is copied once per device (a rank) with 1/T of every split weight, and
`TensorParallel` runs the T ranks side by side with the call and return of the original. Over a
torch.distributed group, this process's rank of the model is made in place and returned.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mplib.tensor_parallel import plans, sequence
from mplib.tensor_parallel.group import DistGroup, Group
from mplib.tensor_parallel.layers import Split, is_parallel
from mplib.tensor_parallel.local import LocalGroup

Device = torch.device | str


class TensorParallel(nn.Module):
    """T ranks of a model in one process: `ranks[r]` lives on `group.devices[r]` and holds 1/T of
    every split weight; calling it calls every rank (one thread each) and returns rank 0's output,
    which is the unsplit model's. `state_dict()` gathers the unsplit model's keys and values.

    Example:
        from mplib.models.gpt import GPT, GPT_TINY
        tp = parallelize(GPT(GPT_TINY), mplib.env.get_devices(2))
        logits = tp(idx)                    # (B, T, vocab), equal to the unsplit model's
        logits.sum().backward(); unsplit_grads(tp)
    """

    def __init__(self, ranks: list[nn.Module], group: LocalGroup, plan: plans.Plan) -> None:
        super().__init__()
        self.ranks = nn.ModuleList(ranks)
        self.group, self.plan = group, plan
        self._hf = plan.kind.startswith("hf-")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        _check_dropout(self)
        if self._hf and "use_cache" in inspect.signature(self.ranks[0].forward).parameters:
            kwargs.setdefault("use_cache", False)  # a KV cache would hold one rank's heads only
        ranks = self.ranks
        return self.group.run(lambda g, *a, **k: ranks[g.rank](*a, **k), *args, **kwargs)

    def run(self, fn: Callable[..., Any], *args: Any, replicated: bool = True, **kwargs: Any) -> Any:
        """`fn(rank_model, group, *args, **kwargs)` on every rank; rank 0's result (see LocalGroup.run).

        Example:
            from mplib.models.gpt import GPT, GPT_TINY
            tp = parallelize(GPT(GPT_TINY), ["cpu", "cpu"], gather_output=False)   # logits split over the vocabulary
            loss = tp.run(lambda m, g, x, y: vocab_parallel_cross_entropy(m(x), y, g, GPT_TINY.vocab_size), x, y)
        """
        _check_dropout(self)
        ranks = self.ranks
        return self.group.run(lambda g, *a, **k: fn(ranks[g.rank], g, *a, **k), *args,
                              replicated=replicated, **kwargs)

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> dict:
        whole = unsplit_state_dict(self)
        out = destination if destination is not None else {}
        for k, v in whole.items():
            out[prefix + k] = v
        return out

    def load_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True, assign: bool = False) -> Any:
        """Load an unsplit model's state dict: each rank keeps its slice of each split tensor."""
        splits = sequence.splits_of(self.ranks[0])
        results = None
        for r, rank in enumerate(self.ranks):
            mine = {k: splits[k].shard(v, r, len(self.ranks)) if k in splits else v for k, v in state_dict.items()}
            results = rank.load_state_dict(mine, strict=strict)
        return results


def _check_dropout(tp: TensorParallel) -> None:
    if not tp.training:
        return
    active = [n for n, m in tp.ranks[0].named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
    active += [n for n, m in tp.ranks[0].named_modules() if isinstance(getattr(m, "attn_dropout", None), float)
               and m.attn_dropout > 0 or isinstance(getattr(m, "attention_dropout", None), float)
               and m.attention_dropout > 0]
    if active:
        raise ValueError(f"dropout is on in {active[:4]}: the ranks of one process share one random generator, so "
                         "they would draw different masks for the same replicated activation. Build the model with "
                         "dropout=0.0 or call .eval(); over torch.distributed, seed every rank alike instead")


def parallelize(model: nn.Module, group_or_devices: Group | Any | Sequence[Device], *,
                sequence_parallel: bool = False, gather_output: bool = True,
                plan: dict[str, Any] | None = None, vocab_multiple: int = 1) -> nn.Module:
    """Split `model` over T ranks as Megatron-LM does; every check runs before any weight moves.

    `group_or_devices`: T devices (ranks in this process: a `TensorParallel` is returned, `model`
    is left as it was) or a torch.distributed process group / `DistGroup` (this process's rank:
    `model` is changed in place and returned). Embedding and LM head are split over the
    vocabulary; a vocabulary that T does not divide is padded to a multiple of T * vocab_multiple
    (Megatron pads to 128 * T), with zero rows that no token looks up and logits left out.
    `gather_output=False` leaves the logits split over the vocabulary, for
    `vocab_parallel_cross_entropy`. `plan` splits any other model: {name: "column"|"row"|"vocab"}.

    Example:
        tp = parallelize(model, ["cpu", "cpu"], sequence_parallel=True)
        # in each process of a job: parallelize(model, torch.distributed.group.WORLD)
    """
    group, devices = _group(group_or_devices)
    T = group.size if group is not None else len(devices)
    if any(is_parallel(m) for m in model.modules()):
        g = next(m.group for m in model.modules() if is_parallel(m))
        raise ValueError(f"this model is already tensor-parallel over {g}; parallelize the original (unsplit) "
                         "model instead, or use it as it is")
    if isinstance(vocab_multiple, bool) or not isinstance(vocab_multiple, int) or vocab_multiple < 1:
        raise ValueError(f"vocab_multiple must be a positive int (Megatron-LM uses 128), got {vocab_multiple!r}")
    the_plan = plans.from_user(model, plan, T) if plan is not None else \
        plans.build(model, T, sequence_parallel, gather_output, vocab_multiple)
    if sequence_parallel and not the_plan.layers:
        raise ValueError("sequence_parallel=True needs a model whose transformer layers the plan knows; "
                         "a plan given by hand has none: parallelize it without sequence_parallel")
    if the_plan.padded and the_plan.padded != the_plan.vocab:
        multiple = f"T={T}" if vocab_multiple == 1 else f"T x vocab_multiple = {T * vocab_multiple}"
        warnings.warn(f"the vocabulary of {the_plan.vocab} tokens is not a multiple of {multiple}: "
                      f"padded to {the_plan.padded} rows as Megatron-LM does; the {the_plan.padded - the_plan.vocab} "
                      "padding rows are zeros that no token looks up, and they are cut from the logits and the "
                      "loss, so outputs equal the unpadded model's", stacklevel=2)
    if group is not None:
        return _build(model, model, group, the_plan, sequence_parallel, in_place=True)
    world = LocalGroup(devices)
    ranks = [_build(model, _copy_without_split(model, the_plan), world.ranks[r], the_plan, sequence_parallel)
             .to(world.devices[r]) for r in range(T)]
    return TensorParallel(ranks, world, the_plan).train(model.training)


def _group(group_or_devices: Any) -> tuple[Group | None, list | None]:
    g = group_or_devices
    if isinstance(g, Group) and not hasattr(g, "world"):
        return g, None
    if isinstance(g, LocalGroup) or hasattr(g, "world"):
        raise ValueError(f"parallelize takes the devices of a LocalGroup, not {g!r}: pass its .devices "
                         "(it makes a group of its own per model)")
    if dist.is_available() and isinstance(g, dist.ProcessGroup):
        return DistGroup(g), None
    if isinstance(g, (str, torch.device)) or not isinstance(g, Sequence) or not g:
        raise ValueError(f"group_or_devices must be a torch.distributed process group, a DistGroup, or a non-empty "
                         f"list of devices such as mplib.env.get_devices(2); got {g!r}")
    if any(not isinstance(d, (str, torch.device)) for d in g):
        raise ValueError(f"group_or_devices mixes devices and other things: {list(g)!r}; give devices only")
    return None, list(g)


def _copy_without_split(model: nn.Module, plan: plans.Plan) -> nn.Module:
    """A deep copy in which the weights about to be split are empty placeholders (no full copy made)."""
    memo: dict[int, Any] = {}
    for name, style in plan.styles.items():
        if isinstance(style, (plans.Column, plans.Row, plans.Vocab, plans.Heads)):
            for p in model.get_submodule(name).parameters(recurse=isinstance(style, plans.Heads)):
                memo[id(p)] = nn.Parameter(torch.empty(0, dtype=p.dtype, device=p.device), p.requires_grad)
    return copy.deepcopy(model, memo)


def _build(original: nn.Module, replica: nn.Module, group: Group, plan: plans.Plan, sp: bool,
           in_place: bool = False) -> nn.Module:
    for name, style in plan.styles.items():
        new = style.build(original.get_submodule(name), replica, group, name)
        parent, _, attr = name.rpartition(".")
        if new is not replica.get_submodule(name):
            setattr(replica.get_submodule(parent) if parent else replica, attr, new)
    if sp:
        sequence.apply(replica, plan.layers, group)
    if in_place:  # a trace's compute spans start and end with the model's forward
        def begin(mod: nn.Module, args: tuple) -> None:
            for listener in list(group.listeners):
                listener.begin([group.rank], "forward")

        def end(mod: nn.Module, args: tuple, out: Any) -> None:
            for listener in list(group.listeners):
                listener.end(group.rank)
        replica.register_forward_pre_hook(begin)
        replica.register_forward_hook(end)
    return replica


def _ranks_of(model: nn.Module) -> tuple[list[nn.Module], Group | None]:
    if isinstance(model, TensorParallel):
        return list(model.ranks), None
    groups = {id(m.group): m.group for m in model.modules() if is_parallel(m)}
    if not groups:
        raise ValueError(f"this {type(model).__qualname__} is not tensor-parallel: call parallelize(model, ...) first")
    if len(groups) > 1:
        raise ValueError(f"the layers of this model talk on {len(groups)} different groups "
                         f"({list(groups.values())}); parallelize the unsplit model once, over one group")
    return [model], next(iter(groups.values()))


def unsplit_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The unsplit model's state dict (same keys, same values) from a parallelized model.

    In one process the ranks' slices are joined; over torch.distributed each split tensor is
    all-gathered (every rank gets the whole). Padding rows of a vocabulary are cut off.
    """
    ranks, group = _ranks_of(model)
    splits = sequence.splits_of(ranks[0])
    states = [r.state_dict() for r in ranks]
    out = {}
    for k, v in states[0].items():
        if k in splits:
            shards = [s[k] for s in states] if group is None else \
                list(group.all_gather(v.contiguous(), 0, label="state_dict").chunk(group.size, 0))
            v = splits[k].unshard(shards)
        out[k] = v.detach().clone() if group is None else v
    return out


def unsplit_grads(model: nn.Module) -> dict[str, Tensor | None]:
    """{name: gradient of the unsplit parameter} (named as `named_parameters()` of the unsplit model)."""
    ranks, group = _ranks_of(model)
    splits = sequence.splits_of(ranks[0])
    params = [dict(r.named_parameters()) for r in ranks]
    out = {}
    for name, p in params[0].items():
        if p.grad is None:
            out[name] = None
        elif name in splits:
            shards = [ps[name].grad for ps in params] if group is None else \
                list(group.all_gather(p.grad.contiguous(), 0, label="grads").chunk(group.size, 0))
            out[name] = splits[name].unshard(shards)
        else:
            out[name] = p.grad
    return out


def memory(model: nn.Module) -> list[dict[str, int]]:
    """Bytes of parameters each rank really holds (storage sizes), split and replicated apart.

    Example:
        [m["split"] for m in memory(tp)]    # 1/T of the unsplit model's split weights each
    """
    ranks, _ = _ranks_of(model)
    out = []
    for r in ranks:
        splits, seen = sequence.splits_of(r), set()
        count = {"split": 0, "replicated": 0}
        for name, p in r.named_parameters():
            key = p.untyped_storage().data_ptr()
            if key in seen:
                continue
            seen.add(key)
            count["split" if name in splits else "replicated"] += p.untyped_storage().nbytes()
        out.append(count)
    return out


def split_names(model: nn.Module) -> dict[str, Split]:
    """{parameter name: how it is split} for a parallelized model."""
    ranks, _ = _ranks_of(model)
    return sequence.splits_of(ranks[0])
