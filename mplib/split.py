"""`SplitModel`: a model's blocks placed on devices, activations moved between them.

This is the book's split by hand, automated: stage i runs its blocks on devices[i] and hands
its output to stage i+1. One device computes at a time; `pipeline` fills the idle ones.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

from mplib import _hf_split
from mplib._unsplit_keys import from_unsplit_keys, key_map, to_unsplit_keys
from mplib.env import check_device
from mplib.layers import blocks as to_blocks
from mplib.timeline import Timeline
from mplib.transfer import map_tensors, to_device

Device = torch.device | str


class Stage(nn.Module):
    """The blocks one device runs, in order. Tied weights owned by an earlier stage are borrowed.

    A borrowed weight is not a parameter here: each forward reads a differentiable copy of
    the owner's parameter (`param.to(device)`), so its gradient flows back and accumulates
    into the one `.grad` alongside the owner's own use.
    """

    def __init__(self, mods: Sequence[nn.Module], device: torch.device, index: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(mods)
        self.device, self.index = device, index
        self.borrowed: list[tuple[nn.Module, str, nn.Parameter]] = []  # (module, attribute, owner's param)

    def borrow(self, module: nn.Module, name: str, param: nn.Parameter) -> None:
        del module._parameters[name]  # no longer registered here: one parameter, one owner
        module.__dict__[name] = param  # still readable as module.<name> between forwards
        self.borrowed.append((module, name, param))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = to_device((args, kwargs), self.device)  # no-op when already here
        for module, name, param in self.borrowed:
            module.__dict__[name] = param.to(self.device)  # autograd-aware copy (the same tensor on one device)
        try:
            x = self.blocks[0](*args, **kwargs)
            for block in self.blocks[1:]:
                x = block(x)
        finally:
            for module, name, param in self.borrowed:
                module.__dict__[name] = param
        return x


@dataclass
class SplitPlan:
    """What sits where: blocks, parameter counts and device of every stage."""

    devices: list[torch.device]
    balance: list[int]
    blocks: list[list[str]]
    params: list[int]
    borrowed: list[list[str]]

    def __str__(self) -> str:
        rows = [f"{'stage':<6}{'device':<9}{'blocks':>7}{'params':>10}  names"]
        for i, dev in enumerate(self.devices):
            names = ", ".join(self.blocks[i])
            extra = f"  (reads tied {', '.join(self.borrowed[i])})" if self.borrowed[i] else ""
            rows.append(f"{i:<6}{str(dev):<9}{self.balance[i]:>7}{self.params[i]:>10,}  {names}{extra}")
        return "\n".join(rows)

    __repr__ = __str__


class SplitModel(nn.Module):
    """A model cut into stages on devices; `forward` equals the unsplit model's.

    `SplitModel(model, devices, balance)` is `split(model, devices, balance)`. `state_dict()`
    uses the unsplit model's keys, so weights load into the single-device model and back
    exactly. The output stays on the last device. `record=True` keeps the timeline of the last
    forward (and its backward) in `.last_timeline`; `with model.timeline() as tl:` records a span.

    A Hugging Face model keeps its interface: keyword inputs (`labels` too), its own `ModelOutput`
    with `.loss` and `.logits`, `use_cache` (each layer's keys and values stay on its stage's
    device), `generate()` and `save_pretrained()`; `.hf` is the model, `.config` its config.
    """

    def __init__(self, model_or_blocks: Any, devices: Sequence[Device], balance: Sequence[int] | Any = None,
                 record: bool = False, non_blocking: bool = True) -> None:
        super().__init__()
        parts = to_blocks(model_or_blocks)  # everything is checked before a weight moves
        self.devices = _check_devices(devices)
        self.balance = _check_balance(balance, len(parts), len(self.devices))
        self.record, self.non_blocking = record, non_blocking
        self.last_timeline: Timeline | None = None
        self._timeline: Timeline | None = None
        source = parts.source if parts.source is not None else nn.Sequential(*parts.modules)
        source_state = source.state_dict(keep_vars=True)  # before borrowing changes what is registered
        stage_of = [i for i, n in enumerate(self.balance) for _ in range(n)]  # block index -> stage
        self.stages = nn.ModuleList(
            Stage([m for b, m in enumerate(parts.modules) if stage_of[b] == i], dev, i)
            for i, dev in enumerate(self.devices))
        borrowed = self._share_tied(parts, stage_of)
        self._keys, self._aliases = key_map(source_state, super().state_dict(keep_vars=True))
        self.plan = SplitPlan(self.devices, self.balance,
                              [[name for b, name in enumerate(parts.names) if stage_of[b] == i]
                               for i in range(len(self.stages))],
                              [sum(p.numel() for p in s.parameters()) for s in self.stages], borrowed)
        for stage in self.stages:
            stage.to(stage.device)
        self.register_state_dict_post_hook(to_unsplit_keys)
        self.register_load_state_dict_pre_hook(from_unsplit_keys)
        object.__setattr__(self, "hf", parts.hf)  # not a submodule: its modules are the stages'
        self.config = getattr(parts.hf, "config", None)
        self._owner = _Owner()  # marks the KV caches this split fills (a deep copy gets its own)

    def _share_tied(self, parts: Any, stage_of: list[int]) -> list[list[str]]:
        """A tied weight stays on the first stage that uses it; later stages borrow it."""
        borrowed: list[list[str]] = [[] for _ in self.stages]
        for group in parts.tied:
            owner = stage_of[group[0][0]]
            for b, name in group[1:]:
                if stage_of[b] == owner:
                    continue
                module_name, _, attr = name.rpartition(".")
                module = parts.modules[b].get_submodule(module_name)
                self.stages[stage_of[b]].borrow(module, attr, getattr(module, attr))
                borrowed[stage_of[b]].append(f"{parts.names[b]}.{name} from stage {owner}")
        return borrowed

    def lanes(self) -> list[str]:
        return [f"stage {i}: {d}" for i, d in enumerate(self.devices)]

    @contextmanager
    def timeline(self) -> Iterator[Timeline]:
        """Record every forward (and its backward) run inside the `with` block into one Timeline.

        Example:
            with model.timeline() as tl: model(x).sum().backward()
            print(tl.utilization())   # about 1/N each: one stage computes at a time
        """
        tl, previous = Timeline(lanes=self.lanes()), self._timeline
        self._timeline = tl
        try:
            yield tl
        finally:
            self._timeline = previous

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.hf is None:
            return self._chain(args, kwargs)
        return _hf_split.call(self, args, kwargs)  # keyword inputs, labels, caches; its own ModelOutput

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The HF model's own `generate` (greedy, sampling, ...), every forward running through the stages.

        Example:
            tokens = split(llama, ["cpu", "cpu"]).generate(ids, max_new_tokens=8, do_sample=False)
        """
        if self.hf is None:
            raise TypeError("generate is the HF model's own; this SplitModel was not built from an HF model")
        return _hf_split.generate(self, args, kwargs)

    def save_pretrained(self, path: str, **kwargs: Any) -> None:
        """Save in HF format from every stage, so that `from_pretrained(path)` loads it on one device.

        Example:
            split_model.save_pretrained("out"); LlamaForCausalLM.from_pretrained("out")
        """
        if self.hf is None:
            raise TypeError("save_pretrained is the HF model's own; save this SplitModel's state_dict() instead")
        _hf_split.save_pretrained(self, path, kwargs)

    def train(self, mode: bool = True) -> SplitModel:
        if self.hf is not None:
            self.hf.train(mode)  # the HF model's own flag too: its forward may read self.training
        return super().train(mode)

    def _chain(self, args: tuple, kwargs: dict) -> Any:
        tl = self._timeline
        if tl is None and self.record:
            tl = self.last_timeline = Timeline(lanes=self.lanes())
        if tl is not None:
            return self._forward_recorded(tl, args, kwargs)
        x = self.stages[0](*args, **kwargs)  # a stage moves its inputs to its device
        for stage in self.stages[1:]:
            x = stage(self._send(x, stage.index))
        return x

    def _send(self, x: Any, i: int) -> Any:
        """Stage i-1's output on stage i's device; a value that cannot cross the cut is a TypeError."""
        last = self.plan.blocks[i - 1][-1]
        try:
            return to_device(x, self.devices[i], self.non_blocking, path=f"the output of stage {i - 1}")
        except TypeError as e:
            raise TypeError(f"the cut between stage {i - 1} (ending with block '{last}') and stage {i} can only "
                            f"pass tensors and tuples/lists/dicts/dataclasses of them: {e}. Make block '{last}' "
                            "return tensors, or move the cut with balance=[...]") from None

    def _forward_recorded(self, tl: Timeline, args: tuple, kwargs: dict) -> Any:
        gpus = list(dict.fromkeys(d for d in self.devices if d.type == "cuda"))
        sync = (lambda: [torch.cuda.synchronize(d) for d in gpus]) if gpus else None  # every GPU of the split
        x = None
        for i, stage in enumerate(self.stages):
            clock = _BackwardClock(tl, i, sync)
            if i > 0:
                with tl.record(i, "copy", sync=sync, stage=i, microbatch=0, label=f"copy {i - 1}->{i}"):
                    x = self._send(x, i)
                x = clock.mark(x, clock.finish)
            if not clock.marked_input:
                clock.finish_with_backward = True
            with tl.record(i, "forward", sync=sync, stage=i, microbatch=0):  # the whole batch is one
                x = stage(*args, **kwargs) if i == 0 else stage(x)
            x = clock.mark(x, clock.begin)
        return x

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load weights saved under the unsplit model's keys; errors name keys in that vocabulary."""
        present = {own for key, own in self._keys.items() if key in state_dict}  # tied: one key is enough
        missing = [key for key, own in self._keys.items() if own not in present]
        unexpected = [k for k in state_dict if k not in self._keys]
        if strict and (missing or unexpected):
            raise RuntimeError(f"state_dict does not match the unsplit model's keys: missing {missing}, "
                               f"unexpected {unexpected}; pass strict=False to load what matches")
        known = {k: v for k, v in state_dict.items() if k in self._keys}
        super().load_state_dict(known, strict=False, assign=assign)
        return _IncompatibleKeys(missing, unexpected)


class _Owner:
    """A token of one SplitModel, set on the caches it fills."""


class _BackwardClock:
    """Times one stage's backward: from its output's gradient to its input's gradient."""

    def __init__(self, tl: Timeline, lane: int, sync: Any) -> None:
        self.tl, self.lane, self.sync = tl, lane, sync
        self.start: float | None = None
        self.done = self.marked_input = self.finish_with_backward = False

    def _now(self) -> float:
        if self.sync is not None:
            self.sync()
        return self.tl.now()

    def begin(self) -> None:
        if self.start is None:
            self.start = self._now()
            if self.finish_with_backward:  # no input gradient to wait for: stop when backward ends
                torch.autograd.Variable._execution_engine.queue_callback(self.finish)

    def finish(self) -> None:
        if not self.done and self.start is not None:
            self.done = True
            self.tl.add(self.lane, "backward", self.start, self._now(), stage=self.lane, microbatch=0)

    def mark(self, x: Any, callback: Any) -> Any:
        def wrap(t: Tensor) -> Tensor:
            if not (torch.is_grad_enabled() and t.requires_grad):
                return t
            if callback == self.finish:
                self.marked_input = True
            return _Mark.apply(t, callback)
        return map_tensors(x, wrap)


class _Mark(torch.autograd.Function):
    """Identity that calls `callback` when its gradient arrives (a timestamp in backward)."""

    @staticmethod
    def forward(ctx, t: Tensor, callback: Any) -> Tensor:
        ctx.callback = callback
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        ctx.callback()
        return grad, None


def split(model_or_blocks: Any, devices: Sequence[Device], balance: Sequence[int] | Any = None,
          record: bool = False) -> SplitModel:
    """Place the blocks of a model on devices, `balance[i]` consecutive blocks on `devices[i]`.

    Everything is checked before a weight moves. Default balance: as even as possible, earlier
    stages taking the extra block. `balance` may also be a plan with a `.balance` list.

    Example:
        model = split(GPT(GPT_TINY), ["cpu", "cpu", "cpu"])      # or mplib.env.get_devices(3)
        print(model.plan); logits = model(ids)                    # equal to the unsplit logits
    """
    return SplitModel(model_or_blocks, devices, balance, record=record)


def _check_devices(devices: Sequence[Device]) -> list[torch.device]:
    if isinstance(devices, (str, torch.device)) or not isinstance(devices, Sequence):
        raise TypeError(f"devices must be a list of devices, one per stage, got {devices!r}; "
                        "e.g. ['cpu', 'cpu'] or mplib.env.get_devices(2)")
    if len(devices) == 0:
        raise ValueError("devices is empty; give one device per stage, e.g. mplib.env.get_devices(2)")
    return [check_device(d) for d in devices]


def _check_balance(balance: Any, n: int, k: int) -> list[int]:
    if k > n:
        raise ValueError(f"{k} devices means {k} stages, but the model has only {n} blocks and every stage "
                         f"needs at least one; use at most {n} devices")
    if balance is None:
        return [n // k + (1 if i < n % k else 0) for i in range(k)]
    if hasattr(balance, "balance"):
        balance = balance.balance
    if not isinstance(balance, Sequence) or not all(isinstance(b, int) and not isinstance(b, bool)
                                                   for b in balance):
        raise TypeError(f"balance must be a list of ints (blocks per stage) or a plan with .balance, "
                        f"got {balance!r}")
    bal = list(balance)
    if len(bal) != k:
        raise ValueError(f"balance {bal} has {len(bal)} stages but there are {k} devices; give one entry "
                         f"per device, e.g. mplib.partition.uniform({n}, {k})")
    if any(b < 1 for b in bal):
        raise ValueError(f"balance {bal} has an entry below 1; every stage needs at least one block, "
                         f"e.g. mplib.partition.uniform({n}, {k})")
    if sum(bal) != n:
        raise ValueError(f"balance {bal} sums to {sum(bal)} but the model has {n} blocks; "
                         f"use mplib.partition.uniform({n}, {k})")
    return bal
