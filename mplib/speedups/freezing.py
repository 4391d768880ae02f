"""Freezing: the first n blocks stop training; their backward disappears and the pipeline is re-planned.

FreezeOut (Brock et al. 2017) freezes layers one after another during training; PipeTransformer
(He et al. 2021) re-plans the pipeline as they freeze. A frozen prefix builds no graph at all: its
parameters and inputs need no gradient, so autograd never reaches it, and the first trainable
block skips its input gradient too.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

from torch import Tensor

import mplib.layers
import mplib.partition
from mplib.profile import BlockCosts

INPUT_GRAD_SHARE = 0.5  # of a block's backward: dX = dY W^T and dW = X^T dY cost the same matmuls


def freeze(model: Any, n: int) -> list[str]:
    """Freeze the first `n` blocks of `model` (`mplib.layers.blocks`): no gradient, no optimizer state.

    Only `requires_grad` changes: the blocks keep their mode (dropout still runs in training, as
    in FreezeOut). A tied parameter is one tensor, so it freezes in every block that uses it.
    Returns the names of the frozen blocks.

    Example:
        freeze(model, 2)    # ['embed', 'layers.0']
        # autograd now stops at layers.1
    """
    parts = mplib.layers.blocks(model)
    _check_n(n, len(parts), parts.names)
    for mod in parts.modules[:n]:
        mod.requires_grad_(False)
    return parts.names[:n]


def unfreeze(model: Any) -> None:
    """Every parameter of every block trains again.

    Example:
        unfreeze(model)
    """
    for mod in mplib.layers.blocks(model).modules:
        mod.requires_grad_(True)


def frozen_blocks(model: Any) -> int:
    """How many leading blocks have no trainable parameter (a block without parameters counts as frozen).

    Example:
        freeze(model, 2); frozen_blocks(model)   # 2
    """
    mods = mplib.layers.blocks(model).modules
    return next((i for i, m in enumerate(mods) if any(p.requires_grad for p in m.parameters())), len(mods))


def frozen_costs(costs: BlockCosts, n: int, input_grad_share: float = INPUT_GRAD_SHARE) -> BlockCosts:
    """The costs of the same blocks once the first `n` are frozen: the input of every balancer.

    A frozen prefix runs forward only: no backward seconds, no gradients, no optimizer state, no
    saved activations (no graph is built). Block n, the first trainable one, computes its weight
    gradients but not its input's: its backward shrinks by `input_grad_share` (half, for blocks made
    of matmuls). Parameters stay where they are.

    Example:
        plan = mplib.partition.optimal(frozen_costs(costs, 5), devices=2, chunks=4)
    """
    _check_n(n, len(costs), costs.names)
    if not 0 <= input_grad_share <= 1:
        raise ValueError(f"input_grad_share is the share of a block's backward spent on its input gradient, "
                         f"between 0 and 1, got {input_grad_share}")
    backward = [0.0] * n + list(costs.backward[n:])
    if 0 < n < len(costs):
        backward[n] *= 1 - input_grad_share
    zero = [0] * n
    return replace(costs, backward=backward, grad_bytes=zero + costs.grad_bytes[n:],
                   optimizer_bytes=zero + costs.optimizer_bytes[n:],
                   activation_bytes=zero + costs.activation_bytes[n:], flops=[])


def replan(costs: BlockCosts, n: int, devices: int | Sequence[Any], **options: Any) -> mplib.partition.Plan:
    """`mplib.partition.optimal` for the model with its first `n` blocks frozen.

    Lighter stages get more blocks: the frozen prefix costs only its forward.

    Example:
        plan = replan(costs, n=5, devices=["cpu", "cpu"], chunks=4)   # costs of the 10 `blocks`
        pipe = Pipeline(split(blocks, plan.devices, plan), chunks=4, schedule="1f1b")
    """
    return mplib.partition.optimal(frozen_costs(costs, n, options.pop("input_grad_share", INPUT_GRAD_SHARE)),
                                   devices, **options)


@dataclass
class FreezeSchedule:
    """How many leading blocks are frozen from which step on: `milestones` of (step, frozen blocks).

    Example:
        s = FreezeSchedule.linear(blocks=10, steps=1000, start=0.5)
        s.frozen(0), s.frozen(999)     # (0, 9)
        # the last block always trains
    """

    milestones: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.milestones = sorted((int(s), int(n)) for s, n in self.milestones)
        counts = [n for _, n in self.milestones]
        if counts != sorted(counts) or any(n < 0 for n in counts):
            raise ValueError(f"frozen counts must not decrease over training (a frozen block stays frozen), "
                             f"got {self.milestones}")

    @classmethod
    def linear(cls, blocks: int, steps: int, start: float = 0.5, last: int | None = None) -> "FreezeSchedule":
        """FreezeOut's linear schedule: block 0 freezes at `start` of training, block `last - 1` at the end.

        Blocks 0 .. last-1 freeze one after another, evenly spaced between step `start * steps` and
        `steps`; default `last = blocks - 1`, so the head always trains.
        """
        last = blocks - 1 if last is None else last
        if not 0 <= start < 1 or not 0 < last <= blocks:
            raise ValueError(f"start must be in [0, 1) and last in 1..{blocks}, got start={start}, last={last}")
        t0 = start * steps
        return cls([(round(t0 + (steps - t0) * i / last), i + 1) for i in range(last)])

    def frozen(self, step: int) -> int:
        """Blocks frozen at `step`."""
        return max((n for s, n in self.milestones if s <= step), default=0)

    def phases(self, steps: int) -> Iterator[tuple[int, int, int]]:
        """(first step, last step + 1, frozen blocks) of each stretch of training with one frozen count."""
        cuts = sorted({0, *(s for s, _ in self.milestones if 0 < s < steps), steps})
        for a, b in zip(cuts[:-1], cuts[1:]):
            yield a, b, self.frozen(a)


def replan_phases(schedule: FreezeSchedule, costs: BlockCosts, steps: int, devices: int | Sequence[Any],
                  **options: Any) -> list[tuple[int, int, int, mplib.partition.Plan]]:
    """PipeTransformer's re-planning: for each phase of `schedule`, (first step, end, frozen blocks, plan).

    Each plan is `replan(costs, frozen, devices, **options)`; split the model by it when its phase
    begins (`mplib.split(model, plan.devices, plan)`), the pipeline skips the frozen stages' backward.

    Example:
        for first, end, n, plan in replan_phases(FreezeSchedule.linear(10, 1000), costs, 1000, 2, chunks=8):
            print(first, end, n, plan.balance)
    """
    plans: dict[int, mplib.partition.Plan] = {}
    out = []
    for first, end, n in schedule.phases(steps):
        if n not in plans:
            plans[n] = replan(costs, n, devices, **dict(options))
        out.append((first, end, n, plans[n]))
    return out


class BackwardCounter:
    """Within `with`: autograd nodes each block's backward runs, counted by hooks on its graph.

    A forward hook on every block walks the graph its output grew inside the block (down to the
    nodes of its inputs) and puts a pre-hook on each node. A frozen prefix grows no graph, so its
    count stays 0: proof that no backward ran there.

    Example:
        freeze(model, 2)
        with BackwardCounter(model) as counter:
            model(ids, mask).sum().backward()
        counter.counts[:2]    # [0, 0]
        # the frozen embedding and layers.0 ran no backward; layers.1 and the head did
    """

    def __init__(self, model: Any) -> None:
        self.modules = mplib.layers.blocks(model).modules
        self.counts = [0] * len(self.modules)
        self._lock, self._handles = threading.Lock(), []

    def __enter__(self) -> "BackwardCounter":
        for i, mod in enumerate(self.modules):
            self._handles.append(mod.register_forward_hook(lambda m, args, out, i=i: self._mark(i, args, out)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _mark(self, i: int, args: Any, out: Any) -> None:
        stop = {id(t.grad_fn) for t in _tensors(args) if t.grad_fn is not None}  # earlier blocks' nodes
        todo = [t.grad_fn for t in _tensors(out) if t.grad_fn is not None]
        seen: set[int] = set()
        while todo:
            node = todo.pop()
            if node is None or id(node) in seen or id(node) in stop:
                continue
            seen.add(id(node))
            if type(node).__name__ != "AccumulateGrad":  # a parameter's lives on; count computations only
                node.register_prehook(lambda grads, i=i: self._hit(i))
            todo.extend(fn for fn, _ in node.next_functions)

    def _hit(self, i: int) -> None:
        with self._lock:  # pipeline workers run backwards on several threads
            self.counts[i] += 1


def _tensors(x: Any) -> list[Tensor]:
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(x)[0] if isinstance(t, Tensor)]


def _check_n(n: Any, total: int, names: Sequence[str]) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0 or n > total:
        raise ValueError(f"cannot freeze {n!r} blocks: the model has {total} ({', '.join(names)}); "
                         f"pass an int from 0 to {total}, e.g. {total // 2} to freeze the first half")
