"""One wavefront call: the stages as units that run one time chunk from a given state, and the per-call runner."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from mplib._losses import fresh_leaf
from mplib._mailbox import Failure, Mailbox, _Aborted, consumers
from mplib._runner import _has_dropout, enter_worker, microbatch_seed
from mplib.microbatch import _leaves, batch_size, chunk_sizes, gather, scatter
from mplib.schedule import Action
from mplib.models.rnn import StackedLayer
from mplib.timeline import Timeline
from mplib.transfer import map_tensors, to_device
from mplib.wavefront import GNMT, POINTWISE, Bidirectional

# -- the stages as units --------------------------------------------------------------------------
# An op is (kind, module): "each" runs on every time step alone; "rnn" is a StackedLayer (state in,
# state out); "rev" runs a Bidirectional's right-to-left RNN over the flipped chunk and hands on
# (its input, its output); "fwd" runs the left-to-right RNN on that input and concatenates both.


@dataclass
class Unit:
    """One stage of the schedule: ops on one worker's device, walking time in `direction`."""

    worker: int
    device: torch.device
    direction: int
    ops: list[tuple[str, nn.Module]] = field(default_factory=list)
    layers: list[tuple[int, int | None]] = field(default_factory=list)  # per state: (recurrent layer, slot)

    def run(self, x: Any, states: list[Any], drop: Any) -> tuple[Any, list[Any]]:
        new, k = [], 0
        for kind, mod in self.ops:
            if kind == "each":
                x = drop(mod, x) if isinstance(mod, nn.Dropout) else mod(x)
            elif kind == "rnn":
                out, s = mod.rnn(x, states[k])
                x = drop(mod.drop, out)
            elif kind == "rev":
                out, s = mod.rev(x.flip(1), states[k])  # the chunk read from its right end
                x = (x, out.flip(1))
            else:  # "fwd"
                e, right = x
                out, s = mod.fwd(e, states[k])
                x = torch.cat([out, right], dim=-1)  # (B, Tc, 2H)
            if kind != "each":
                new.append(s)
                k += 1
        return x, new


def units_of(split_model: nn.Module) -> list[Unit]:
    """The wavefront's stages: one per device, plus the right-to-left half of a bidirectional bottom layer."""
    units, layer, names = [], 0, _names(split_model)
    seen_recurrent = None
    for w, stage in enumerate(split_model.stages):
        if getattr(stage, "borrowed", None):
            raise ValueError(f"stage {w} reads tied weights of an earlier stage, which the wavefront does not "
                             "run; untie them or keep the blocks that share them on one device")
        unit = Unit(w, torch.device(split_model.devices[w]), 1)
        for b, block in enumerate(stage.blocks):
            name = names.get(id(block), f"{w}.{b}")
            if isinstance(block, Bidirectional):
                if seen_recurrent is not None:
                    raise ValueError(
                        f"block '{name}' is bidirectional but sits above the recurrent layer '{seen_recurrent}': "
                        "its right-to-left half needs the whole output sequence of the layers below before it "
                        f"can hand on its first chunk, which would serialise the wavefront. {GNMT}: make only "
                        "the bottom recurrent layer bidirectional")
                rev = Unit(w, unit.device, -1, unit.ops + [("rev", block)], [(layer, 1)])
                units.append(rev)
                unit.ops, unit.layers = [("fwd", block)], [(layer, 0)]
            elif isinstance(block, StackedLayer):
                unit.ops.append(("rnn", block))
                unit.layers.append((layer, None))
            elif isinstance(block, POINTWISE):
                unit.ops.append(("each", block))
                continue
            else:
                raise TypeError(
                    f"block '{name}' ({type(block).__module__}.{type(block).__qualname__}) is neither a recurrent "
                    "layer (mplib StackedLayer, mplib.wavefront.Bidirectional) nor applied to each time step alone "
                    "(" + ", ".join(f"nn.{c.__name__}" for c in POINTWISE) + "); the wavefront cuts the sequence "
                    "into time chunks and runs each block chunk by chunk, which is exact only for those. Split a "
                    "recurrent stack (StackedRNN's .layers, CharRNN), or pipeline other models with mplib.Pipeline")
            seen_recurrent, layer = name, layer + 1
        units.append(unit)
    if seen_recurrent is None:
        raise ValueError("the split model has no recurrent layer: nothing is carried from one time chunk to the "
                         "next, so there is no wavefront; pipeline it over micro-batches with mplib.Pipeline")
    return units



def _names(split_model: nn.Module) -> dict[int, str]:
    plan = getattr(split_model, "plan", None)
    if plan is None:
        return {}
    return {id(block): name for stage, names in zip(split_model.stages, plan.blocks)
            for block, name in zip(stage.blocks, names)}


def _dropout(gen: torch.Generator | None, module: nn.Dropout, x: Tensor) -> Tensor:
    """nn.Dropout's computation with its mask drawn from `gen`, a generator of this cell's own."""
    if not module.training or module.p == 0:
        return x
    if gen is None:
        return module(x)
    keep = torch.empty_like(x).bernoulli_(1 - module.p, generator=gen)
    return x * keep / (1 - module.p)


# -- one call -------------------------------------------------------------------------------------

@dataclass
class Record:
    """What F(j, c) hands on: its input leaves, state-in leaves, output and state out (with their graph)."""

    x: Any
    states: list[Any]
    y: Any
    new: list[Any]


class Step:
    """Everything of one call of a `Wavefront`: inputs cut into cells, mailbox, losses, outputs, timeline."""

    def __init__(self, wf: Any, x: Tensor, targets: Any, train: bool) -> None:
        s, T = wf.schedule, wf.time_chunks
        if not isinstance(x, Tensor) or x.dim() < 2:
            raise ValueError(f"the wavefront takes a batch-first sequence (B, T, ...) as one tensor, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        L = x.size(1)
        if T > L:
            raise ValueError(f"time_chunks={T} but the sequence has only {L} time steps; every chunk needs at "
                             f"least one: use time_chunks <= {L}")
        self.schedule, self.units, self.train, self.threads = s, wf.units, train, wf.threads
        self.devices, self.T, self.loss_fn = wf.devices, T, wf.loss_fn
        sizes = chunk_sizes(L, T)  # as even as possible, the last ones one step shorter
        self.bounds = [(sum(sizes[:t]), sum(sizes[:t + 1])) for t in range(T)]
        self.mbs = scatter(x, s.microbatches)
        self.sizes = [batch_size(m) for m in self.mbs]
        self.targets = scatter(targets, s.microbatches) if train else None
        self.box = Mailbox(consumers(s, train))
        self.outs: dict[int, dict[int, Any]] = {m: {} for m in range(s.microbatches)}
        self.final: dict[tuple[int, int], list[Any]] = {}  # (unit, micro-batch) -> its last chunk's states
        self.seeds: dict[int, list[Tensor]] = {}  # micro-batch -> d loss / d output of each of its chunks
        self.losses: dict[int, Tensor] = {}
        self.random = wf._seeds is not None or (wf.model.training and _has_dropout(wf.model))
        self.step_seed = int(torch.randint(2**62, (1,), generator=wf._seeds).item()) if self.random else None
        self.timeline = Timeline(lanes=[f"stage {w}: {d}" for w, d in enumerate(self.devices)])
        self.moves = [j > 0 and self.units[j - 1].device != u.device for j, u in enumerate(self.units)]

    def run(self, workers: Any) -> Failure | None:
        """Every device's actions on its worker; the first failure (stage, cell, part, exception), or None."""
        box = self.box
        workers.run([partial(self._work, w) for w in range(len(self.devices))],
                    abort=lambda: box.fail(Failure(None, None, "interrupted", None)))
        return box.error

    def result(self) -> Any:
        if self.train:
            return torch.stack([self.losses[m] for m in range(len(self.mbs))]).sum()
        out = gather([torch.cat([self.outs[m][t] for t in range(self.T)], dim=1) for m in range(len(self.mbs))])
        states: list[Any] = []
        for j, unit in enumerate(self.units):
            per_mb = [self.final[j, m] for m in range(len(self.mbs))]
            for k, (layer, slot) in enumerate(unit.layers):
                state = gather([p[k] for p in per_mb])  # (B, H) or (h, c), micro-batches joined
                if slot is None:
                    states.append(state)
                else:  # a bidirectional layer: (left to right, right to left)
                    while len(states) <= layer:
                        states.append([None, None])
                    states[layer][slot] = state
        return out, [tuple(s) if isinstance(s, list) else s for s in states]

    def close(self) -> None:
        self.box.clear()
        self.mbs, self.targets, self.outs, self.final, self.seeds = [], None, {}, {}, {}

    def _work(self, w: int) -> None:
        enter_worker(self.threads, self.devices[w], self.train)
        for a in self.schedule.actions[w]:
            if self.box.error is not None:
                return
            if a.kind == "B" and not self.train:
                continue
            try:
                (self._forward if a.kind == "F" else self._backward)(w, a)
            except _Aborted:
                return
            except BaseException as exc:  # noqa: BLE001 - every failure reaches the caller, never a hang
                self.box.fail(Failure(a.stage, a.microbatch, a.kind, exc))  # the first one is kept
                return

    def _sync(self, w: int) -> Any:
        dev = self.devices[w]
        return (lambda: torch.cuda.current_stream(dev).synchronize()) if dev.type == "cuda" else None

    def _forward(self, w: int, a: Action) -> None:
        j, c, unit, tl, sync = a.stage, a.microbatch, self.units[a.stage], self.timeline, self._sync(w)
        m, t = self.schedule.cell(c)
        x, states = None, [None] * len(unit.layers)
        if j == 0:
            lo, hi = self.bounds[t]
            x = to_device(self.mbs[m][:, lo:hi], unit.device)  # (B, Tc, ...) a view: no copy on one device
        for dep in self.schedule.deps(a):
            rec = self.box.get(dep)
            if dep[0] == j:  # this stage's previous chunk: its state, on this device already
                states = map_tensors(rec.new, fresh_leaf)
            else:  # the stage below, same chunk: its output
                y = rec.y
                if self.moves[j]:
                    with tl.record(w, "copy", sync=sync, stage=j, microbatch=c, label=f"copy {j - 1}->{j}"):
                        y = to_device(y, unit.device)
                x = map_tensors(y, fresh_leaf)
        gen = None
        if self.random:
            gen = torch.Generator(device=unit.device).manual_seed(microbatch_seed(self.step_seed, j, c))
        with tl.record(w, "forward", sync=sync, stage=j, microbatch=c, label=str(a)):
            y, new = unit.run(x, states, partial(_dropout, gen))
        self.box.put(a.key, Record(x, states, y, new))
        if t == (self.T - 1 if unit.direction == 1 else 0):
            self.final[j, m] = map_tensors(new, torch.Tensor.detach)
        if j == len(self.units) - 1:
            self.outs[m][t] = y if self.train else y.detach()
            if self.train and t == self.T - 1:
                self._loss(w, m)

    def _loss(self, w: int, m: int) -> None:
        """Micro-batch m's loss on its whole output sequence; its gradient per chunk starts each backward."""
        leaves = [fresh_leaf(self.outs[m][t]) for t in range(self.T)]
        with self.timeline.record(w, "other", sync=self._sync(w), stage=len(self.units) - 1, microbatch=m,
                                  label="loss"):
            loss = self.loss_fn(torch.cat(leaves, dim=1), to_device(self.targets[m], self.devices[w]))
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                raise ValueError(f"loss_fn must return a scalar tensor, got "
                                 f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}")
            loss = loss * (self.sizes[m] / sum(self.sizes))  # the batch mean, micro-batch by micro-batch
            self.seeds[m] = list(torch.autograd.grad(loss, leaves, allow_unused=True))
        self.losses[m] = loss.detach()

    def _backward(self, w: int, a: Action) -> None:
        j, c, unit, tl = a.stage, a.microbatch, self.units[a.stage], self.timeline
        m, t = self.schedule.cell(c)
        rec, gy, gs = None, None, None
        for dep in self.schedule.deps(a):
            if dep[2] == "F":
                rec = self.box.get(dep)
            elif dep[0] == j:  # the chunk that read this one's state: the gradient of that state
                gs = self.box.get(dep)[1]
            else:  # the stage above: the gradient of this stage's output
                gy = to_device(self.box.get(dep)[0], unit.device)
        if j == len(self.units) - 1:
            gy = [self.seeds[m][t]]
        outs = _leaves(rec.y) + _leaves(rec.new)
        grads = list(gy) + (list(gs) if gs is not None else [None] * len(_leaves(rec.new)))
        both = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        sync = self._sync(w)
        with tl.record(w, "backward", sync=sync, stage=j, microbatch=c, label=str(a)):
            if both:
                torch.autograd.backward([o for o, _ in both], [g for _, g in both])
        if self.box.wanted(a.key):
            self.box.put(a.key, ([x.grad for x in _leaves(rec.x)] if j > 0 else None,  # for B of the stage below
                                 [s.grad for s in _leaves(rec.states)]))  # for B of the chunk before
