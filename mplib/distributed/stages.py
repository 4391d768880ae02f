"""This rank's `torch.distributed.pipelining.PipelineStage`s, cut from a model's blocks by a balance, no tracer.

A stage is blocks [lo, hi) of `mplib.layers.blocks(model)`, run as they are (no `torch.export`,
so HF models, their masks and an LSTM's loops all work). torch sends only flat tuples of tensors
between stages, so each stage flattens what its last block returns and the next one rebuilds it
(`Structure`: tuples, dicts, dataclasses such as mplib.hf's Carry, None and constants survive the trip).
Stage s runs on pipeline rank `placement(S, K, style)[s]`: s % K ("loop", Megatron's interleaving)
or the V of the zero-bubble schedules (rank r holds stages r and 2K-1-r).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.pipelining import PipelineStage

from mplib.layers import Blocks

Tensors = tuple[Tensor, ...]


class StageError(RuntimeError):
    """A stage raised on one micro-batch: the message names the rank, stage, micro-batch and part."""


@dataclass(frozen=True)
class _Slot:
    index: int  # where a tensor sat: the index-th tensor of the flat tuple


@dataclass(frozen=True)
class Structure:
    """A nested value with its tensors taken out: tuples, lists, dicts and dataclasses (an HF ModelOutput,
    mplib.hf's Carry) are walked, other leaves (None, ints, strings) kept as constants.

    Example:
        s, tensors = Structure.of({"hidden": torch.ones(2, 3), "past": None, "n": 3})
        len(tensors), s.build(tensors)["n"]   # (1, 3)
    """

    template: Any

    @staticmethod
    def of(value: Any) -> tuple["Structure", list[Tensor]]:
        tensors: list[Tensor] = []
        return Structure(_take(value, tensors)), tensors

    def build(self, tensors: Sequence[Tensor]) -> Any:
        return _put(self.template, tensors)


def _take(value: Any, tensors: list[Tensor]) -> Any:
    if isinstance(value, Tensor):
        tensors.append(value)
        return _Slot(len(tensors) - 1)
    return _walk(value, lambda v: _take(v, tensors))


def _put(value: Any, tensors: Sequence[Tensor]) -> Any:
    if isinstance(value, _Slot):
        return tensors[value.index]
    return _walk(value, lambda v: _put(v, tensors))


def _walk(value: Any, fn: Callable[[Any], Any]) -> Any:
    """`value` rebuilt with `fn` applied to each of its items; a leaf is returned as it is."""
    if type(value) in (tuple, list):
        return type(value)(fn(v) for v in value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(fn(v) for v in value))
    if type(value) is dict:
        return {k: fn(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: fn(getattr(value, f.name)) for f in dataclasses.fields(value)
                                             if f.init})
    return value


class StageModule(nn.Module):
    """Blocks [lo, hi) of a model as one module: flat tensors in, flat tensors out.

    Stage 0 takes the model's positional inputs as they are; a later stage rebuilds the previous
    stage's output from `inputs` (a Structure) first. The output is flattened into `outputs`;
    the last stage's is rebuilt for the loss by `output_of`.
    """

    def __init__(self, blocks: Sequence[nn.Module], names: Sequence[str], index: int, lo: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.names, self.index, self.lo = list(names), index, lo
        self.inputs: Structure | None = None  # None: the model's own positional inputs (stage 0)
        self.call: Structure | None = None  # stage 0 of a dict batch: its keyword inputs around the tensors
        self.outputs: Structure | None = None

    def forward(self, *flat: Tensor) -> Tensor | Tensors:
        if self.inputs is not None:
            x = self.blocks[0](self.inputs.build(flat))
        else:
            x = self.blocks[0](*flat) if self.call is None else self.blocks[0](**self.call.build(flat))
        for block in self.blocks[1:]:
            x = block(x)
        structure, tensors = Structure.of(x)
        if self.outputs is None:
            self.outputs = structure
        return tensors[0] if len(tensors) == 1 else tuple(tensors)

    def output_of(self, out: Tensor | Tensors) -> Any:
        """The last block's own return value, from what `forward` returned."""
        return self.outputs.build((out,) if isinstance(out, Tensor) else out)


def placement(num_stages: int, ranks: int, style: str = "loop") -> list[int]:
    """The pipeline rank of each stage: "loop" puts stage s on s % ranks; "v" walks there and back.

    Example:
        placement(4, 2, "loop"), placement(4, 2, "v")   # ([0, 1, 0, 1], [0, 1, 1, 0])
    """
    if style == "loop":
        return [s % ranks for s in range(num_stages)]
    out = []
    for s in range(num_stages):
        lap, i = divmod(s, ranks)
        out.append(i if lap % 2 == 0 else ranks - 1 - i)
    return out


class TimedStage(PipelineStage):
    """torch's PipelineStage that records its forwards and backwards on `self.recorder` while a step
    runs, and names rank, stage and micro-batch when one raises."""

    recorder: Callable[..., None] | None = None

    def _timed(self, kind: str, m: int, run: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            out = run()
        except StageError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised with where it happened
            cause = exc.__cause__ if isinstance(exc, RuntimeError) and exc.__cause__ is not None else exc
            part = {"forward": "forward", "backward": "backward", "weight": "weight backward"}[kind]
            raise StageError(f"stage {self.stage_index} on rank {dist.get_rank()} failed on micro-batch {m} during "
                             f"its {part}: {type(cause).__name__}: {cause}") from cause
        if self.recorder is not None:
            self.recorder(kind, self.stage_index, m, start, time.perf_counter())
        return out

    def forward_one_chunk(self, fwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
        return self._timed("forward", fwd_chunk_id, lambda: super(TimedStage, self).forward_one_chunk(
            fwd_chunk_id, *args, **kwargs))

    def backward_one_chunk(self, bwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
        return self._timed("backward", bwd_chunk_id, lambda: super(TimedStage, self).backward_one_chunk(
            bwd_chunk_id, *args, **kwargs))

    def backward_weight_one_chunk(self, bwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
        return self._timed("weight", bwd_chunk_id, lambda: super(TimedStage, self).backward_weight_one_chunk(
            bwd_chunk_id, *args, **kwargs))


def build(blocks: Blocks, balance: Sequence[int], pp_rank: int, ranks: list[int], group: Any, example: Tensors,
          device: torch.device, style: str = "loop", call: Structure | None = None) -> list[TimedStage]:
    """The stages of pipeline rank `pp_rank` (global ranks of the pipeline: `ranks`), in stage order.

    `call`: for a dict batch, its keyword structure around the tensors of `example` (stage 0 calls
    its first block with those keywords). Runs `example` (one micro-batch of the model's positional
    inputs, or of the dict's tensors) through the stages once, stage
    after stage across the ranks, so each stage learns the structure and shapes it receives and
    sends: torch's PipelineStage then starts in its static mode, with no inference at the first step.
    """
    edges = [0]
    for n in balance:
        edges.append(edges[-1] + n)
    where = placement(len(balance), len(ranks), style)
    mine = [s for s in range(len(balance)) if where[s] == pp_rank]
    modules = {s: StageModule(blocks.modules[edges[s]:edges[s + 1]], blocks.names[edges[s]:edges[s + 1]], s,
                              edges[s]).to(device) for s in mine}
    stages, passed = [], None
    for s in mine:  # stage order is a topological order on every rank: no send waits on a later recv
        if s == 0:
            structure, inputs = None, [t.to(device) for t in example]
        elif where[s - 1] == pp_rank:
            structure, inputs = passed
        else:
            structure, inputs = _recv((None, None), ranks[where[s - 1]], group, device)
        module = modules[s]
        module.inputs = structure
        module.call = call if s == 0 else None
        with torch.enable_grad():  # which outputs need a gradient back is part of what torch must know
            out = module(*inputs)
        out_t = [_leaf(t, t.requires_grad) for t in ((out,) if isinstance(out, Tensor) else out)]
        passed = (module.outputs, out_t)
        if s + 1 < len(balance) and where[s + 1] != pp_rank:
            _send(passed, ranks[where[s + 1]], group, device)
        stages.append(TimedStage(module, s, len(balance), device, input_args=tuple(inputs), output_args=tuple(out_t),
                                 group=group))
    return stages


def _leaf(t: Tensor, requires_grad: bool) -> Tensor:
    return t.detach().requires_grad_(requires_grad)


def _send(obj: tuple, dst: int, group: Any, device: torch.device) -> None:
    structure, tensors = obj
    payload = (structure, [t.detach().cpu() for t in tensors], [t.requires_grad for t in tensors])
    dist.send_object_list([payload], dst=dst, group=group, device=device if device.type != "cpu" else None)


def _recv(empty: tuple, src: int, group: Any, device: torch.device) -> tuple:
    box = [empty]
    dist.recv_object_list(box, src=src, group=group, device=device if device.type != "cpu" else None)
    structure, tensors, grads = box[0]
    return structure, [_leaf(t.to(device), g) for t, g in zip(tensors, grads)]


def stages(model: Any, plan: Any, example: Any, group: Any = None, schedule: str | None = None,
           device: Any = None) -> list[TimedStage]:
    """This rank's PipelineStages of `model` cut by `plan` (an mplib Plan or a balance), for torch's schedules.

    `group`: the pipeline's process group (default: the world); `example`: one micro-batch of the
    model's positional inputs (a tensor or a tuple). Collective: every rank of `group` calls it.
    Tied weights on several ranks are not summed here: `DistributedPipeline` does that.

    Example (several processes):
        # each of 2 ranks (launch(fn, 2)); ids, y: (8, 16) token ids and targets, the same on both
        from torch.distributed.pipelining import ScheduleGPipe
        mine = stages(GPT(GPT_TINY), [2, 2], ids[:2])           # rank 0: stage 0, rank 1: stage 1
        schedule = ScheduleGPipe(mine[0], n_microbatches=4, loss_fn=lm_loss)   # torch's own
        schedule.step(ids, target=y) if mine[0].is_first else schedule.step(target=y)
    """
    from mplib.distributed.checks import check_balance
    from mplib.distributed.schedules import SCHEDULES
    from mplib.layers import blocks as blocks_of

    b = blocks_of(model)
    balance = check_balance(getattr(plan, "balance", plan), len(b))
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    style = SCHEDULES.get(str(schedule or getattr(plan, "schedule", "1f1b")).lower(), (None, "loop"))[1]
    if device is None:
        device = "cpu" if dist.get_backend(group) == "gloo" else f"cuda:{torch.cuda.current_device()}"
    example = (example,) if isinstance(example, Tensor) else tuple(example)
    return build(b, balance, dist.get_rank(group), ranks, group, example, torch.device(device), style)
