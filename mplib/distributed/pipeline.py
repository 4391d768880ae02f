"""An mplib plan run by torch.distributed.pipelining over processes: stages, schedule, tied and data-parallel gradients.

`DistributedPipeline` holds the configuration and this rank's stages; each `step` builds a
`_Step` (its timeline and losses) and drops it. Each micro-batch's loss is weighted by its
share of the global batch's items (`weighting`). After torch's schedule has run every backward, the
gradients of tied weights are summed between the stages that hold them, then every gradient is
summed over the data-parallel replicas, so they equal those of the unsplit model on the whole batch.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.pipelining.schedules import PipelineScheduleSingle

from mplib.distributed import checks, clock, schedules, weighting
from mplib.distributed.mesh import Mesh, mesh as make_mesh, subgroup
from mplib import _hf_split
from mplib.distributed.stages import Structure, TimedStage, build, placement
from mplib.hf import IGNORE, is_hf
from mplib.layers import blocks as blocks_of
from mplib.pipeline import _model_loss
from mplib.timeline import Timeline

Batch = Tensor | Sequence[Tensor] | Mapping[str, Any]  # the model's positional inputs, or an HF model's keyword ones


class DistributedPipeline(nn.Module):
    """This rank's share of a model pipelined over processes by an mplib plan; `step` trains on a batch.

    `plan`: an `mplib.partition.Plan` (its balance, schedule, chunks and virtual stages are used)
    or a balance such as `[2, 2]`. `schedule`, `chunks`, `virtual` override or complete it; the
    schedule names are mplib's plus the zero-bubble ones of torch (`schedules.SCHEDULES`). `dp`,
    `tp`: data-parallel replicas and tensor-parallel ranks (`mplib.tensor_parallel.parallelize`
    over the mesh's tp group); the world must hold pp x dp x tp processes, pp = stages / virtual.
    Every rank builds the same model from the same seed and calls this alike; a fingerprint
    compares them first. `example`: one micro-batch of inputs to build the stages now (else the
    first step's first micro-batch is used).

    Each micro-batch's `loss_fn` is weighted by its share of what the loss is a mean over, in the
    whole batch of every replica, as `mplib.Pipeline` weighs it: its examples (`items="examples"`,
    the default), or its counted tokens, targets not -100 (`items="tokens"`, or a function of its
    targets returning the count), as HF divides by `num_items_in_batch`; the replicas sum their
    counts in one all-reduce. So the loss and every gradient equal the unsplit model's mean over
    the counted items, also when chunks x dp does not divide the batch (torch's stages receive into
    buffers of one shape, so a smaller micro-batch is padded with copies of its first row, and the
    padding is cut from the last stage's output, every tensor whose dim 0 is the padded size,
    before the loss) and however ignored labels fall. An HF model takes a dict batch (its keyword
    inputs, e.g. a tokenizer's BatchEncoding). With "labels" in it and no `loss_fn`, the model's own
    loss runs on the last stage, micro-batch by micro-batch, weighted by its counted labels (a
    causal LM's shifted by one), and padding rows get labels -100 so that the loss ignores them;
    with a `loss_fn`, the labels are its targets, as in `mplib.Pipeline`.

    Example (several processes):
        # on every rank of launch(fn, 2); x, y: a batch (8, 16) of token ids, the same on every rank
        torch.manual_seed(0)                   # every rank builds the same model
        pipe = DistributedPipeline(GPT(GPT_TINY), [2, 2], loss_fn=lm_loss, chunks=4, example=x[:2])
        optimizer = torch.optim.SGD(pipe.parameters(), lr=0.1)   # this rank's stage's parameters
        loss = pipe.step(x, y); optimizer.step()    # every rank passes the whole batch
        tokens = DistributedPipeline(GPT(GPT_TINY), [2, 2], loss_fn=lm_loss, chunks=3, items="tokens")
        loss = tokens.step(x, y.masked_fill(y == 0, -100))   # the mean over the tokens not -100
        hf = DistributedPipeline(GPT2LMHeadModel(config), [2, 2], chunks=4)   # an HF model: its own loss
        loss = hf.step({"input_ids": x, "attention_mask": mask, "labels": x})
    """

    def __init__(self, model: Any, plan: Any, loss_fn: Callable[[Any, Any], Tensor] | None = None, *,
                 chunks: int | None = None,
                 schedule: str | None = None, virtual: int | None = None, dp: int = 1, tp: int = 1,
                 mesh: Mesh | None = None, example: Batch | None = None, device: Any = None,
                 timeout: float = 120.0, items: str | Callable[[Any], int] | None = None) -> None:
        super().__init__()
        self.items, self._count = items, weighting.check_items(items)
        self._hf = is_hf(model)
        if loss_fn is None and not self._hf:
            raise ValueError("DistributedPipeline needs loss_fn(output, targets); only an HF model, given dict batches "
                             "with 'labels', can use its own loss instead")
        # the model's own loss: what it is a mean over (a causal LM's labels shifted by one), and a check of
        # the labels' shape; functions, not the model itself, which would become a submodule of this rank's
        self._own_items = _hf_split.items(model) if self._hf else None
        self._check_labels = (lambda call: _hf_split.check_labels(model, call)) if self._hf else None
        blocks = blocks_of(model)
        balance = checks.check_balance(getattr(plan, "balance", plan), len(blocks))
        self.schedule_name = str(schedule or getattr(plan, "schedule", None) or "1f1b").lower()
        self.chunks = chunks or getattr(plan, "chunks", None)
        if not isinstance(self.chunks, int) or isinstance(self.chunks, bool) or self.chunks < 1:
            raise ValueError(f"chunks (micro-batches per step) must be a positive int, got {self.chunks!r}; pass "
                             "chunks=M with a balance, or a Plan from mplib.partition")
        per_rank = schedules.SCHEDULES.get(self.schedule_name, (None, None, 1))[2]
        v = per_rank or virtual or getattr(plan, "virtual", 1) or 1
        v = 2 if self.schedule_name == "interleaved" and v == 1 else v
        self.K = len(balance) // v if len(balance) % v == 0 else len(balance)
        self.torch_class, style, self.virtual = schedules.check(self.schedule_name, len(balance), self.K, self.chunks)
        self.balance, self.timeout, self.loss_fn = balance, timeout, loss_fn
        if not dist.is_initialized():
            raise RuntimeError("DistributedPipeline runs one rank of a torch.distributed job: call it under "
                               "mplib.distributed.launch(fn, N), or after mplib.distributed.init() under torchrun")
        world = dist.get_world_size()
        if mesh is None and self.K * dp * tp != world:
            raise ValueError(f"the plan has {len(balance)} stages, {self.virtual} per rank: {self.K} pipeline ranks "
                             f"x dp={dp} x tp={tp} = {self.K * dp * tp} processes, but this job has {world}; start "
                             f"{self.K * dp * tp} (torchrun --nproc-per-node {self.K * dp * tp}) or plan "
                             f"{world // (dp * tp) * self.virtual} stages (mplib.partition.optimal(costs, "
                             f"{world // (dp * tp)}, ...))")
        self.mesh = mesh or make_mesh(pp=self.K, dp=dp, tp=tp, timeout=timeout)
        if self.mesh.shape["pp"] != self.K:
            raise ValueError(f"the mesh has pp={self.mesh.shape['pp']} pipeline ranks but the plan needs {self.K}")
        settings = {"balance": balance, "schedule": self.schedule_name, "chunks": self.chunks,
                    "virtual": self.virtual, "mesh": dict(self.mesh.shape), "world": world}
        checks.agree(checks.fingerprint(blocks, settings))
        if self.mesh.shape["tp"] > 1:
            import mplib.tensor_parallel as tpar

            tpar.parallelize(model, tpar.DistGroup(self.mesh.groups["tp"]))  # this rank's slices, in place
            blocks = blocks_of(model)  # the HF adapters hold the modules parallelize replaced
        self.blocks, self.style = blocks, style
        self.where = placement(len(balance), self.K, style)  # pipeline rank of each stage
        self.pp_rank = self.mesh.coords["pp"]
        self.device = torch.device(device) if device is not None else _default_device()
        self.stages: list[TimedStage] = []
        self.stage_modules = nn.ModuleList()  # filled by _build; parameters() are this rank's
        self._stage_blocks(balance)
        self._ties = self._tie_groups()
        self.epoch = clock.common_start()  # rank 0's moment on this rank's clock: the timelines line up
        self.timeline: Timeline | None = None
        self._schedule: Any = None
        self._shape: list[tuple] | None = None
        self._call: Structure | None = None  # a dict batch's keys (and constants) around its tensors
        if example is not None:
            self._build(*self._flat(example))

    # -- building ---------------------------------------------------------------------------------
    def _stage_blocks(self, balance: list[int]) -> None:
        edges = [0]
        for n in balance:
            edges.append(edges[-1] + n)
        self.edges = edges
        self.mine = [s for s in range(len(balance)) if self.where[s] == self.pp_rank]
        for s in self.mine:
            self.stage_modules.append(nn.ModuleList(self.blocks.modules[edges[s]:edges[s + 1]]).to(self.device))

    def _tie_groups(self) -> list[tuple[Any, nn.Parameter | None]]:
        """Per tie spanning ranks: the group of the pipeline ranks that hold it (every rank makes every
        group, in the same order) and this rank's parameter (None if it holds none)."""
        out = []
        for tie in self.blocks.tied:
            ranks = sorted({self.where[self._stage_of(b)] for b, _ in tie})
            if len(ranks) < 2:
                continue  # one process holds every user: one Parameter, autograd adds both uses
            group = subgroup(self.mesh, "pp", ranks, self.timeout)
            mine = [(b, n) for b, n in tie if self.where[self._stage_of(b)] == self.pp_rank]
            param = self.blocks.modules[mine[0][0]].get_parameter(mine[0][1]) if mine else None
            out.append((group, param))
        return out

    def _stage_of(self, block: int) -> int:
        return next(s for s in range(len(self.balance)) if self.edges[s] <= block < self.edges[s + 1])

    def _build(self, example: tuple[Tensor, ...], call: Structure | None = None) -> None:
        ranks = self.mesh.along("pp")
        self.stages = build(self.blocks, self.balance, self.pp_rank, ranks, self.mesh.groups["pp"], example,
                            self.device, self.style, call)
        last = next((st.submod for st in self.stages if st.is_last), None)
        self._loss = weighting.WeightedLoss(self.loss_fn or _model_loss,
                                            last.output_of if last is not None else lambda out: out)
        single = issubclass(self.torch_class, PipelineScheduleSingle)  # takes one stage, not a list
        target = self.stages[0] if single else self.stages
        self._schedule = self.torch_class(target, n_microbatches=self.chunks, loss_fn=self._loss, scale_grads=False)
        self._shape, self._call = [tuple(t.shape) for t in example], call

    def _flat(self, batch: Batch) -> tuple[tuple[Tensor, ...], Structure | None]:
        """A batch's tensors, and for a dict batch its structure (keys, constants) around them."""
        if not isinstance(batch, Mapping):
            return _as_tuple(batch), None
        if not self._hf:
            raise TypeError("a dict batch is an HF model's keyword inputs; give this model a tensor or a tuple of "
                            "its positional inputs")
        call, tensors = Structure.of(dict(batch))
        if len({t.shape[0] if t.dim() else None for t in tensors} - {None}) != 1 or any(t.dim() == 0 for t in tensors):
            shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in dict(batch).items() if isinstance(v, Tensor))
            raise ValueError(f"every tensor of a dict batch is cut into micro-batches along dim 0, so all need one "
                             f"batch size; got {shapes}")
        return tuple(tensors), call

    # -- one step ---------------------------------------------------------------------------------
    def step(self, batch: Batch, targets: Tensor | None = None) -> Tensor:
        """Forward and backward of the whole batch; gradients accumulate in this rank's parameters.

        Every rank passes the same whole batch: data-parallel replica i takes the i-th of dp parts
        of its rows (as `mplib.microbatch.chunk_sizes` cuts them, the first ones one row larger)
        and cuts it into `chunks` micro-batches alike. Returns the loss of the whole batch (the mean
        over its items, as `loss_fn`'s over it) on every rank. An HF model's dict batch may carry
        its "labels" instead of `targets` (the class says how they are used).

        Example (several processes):
            pipe.zero_grad(); loss = pipe.step(x, y); optimizer.step()   # pipe, optimizer: as in the class's
        """
        batch, targets, own = self._targets(batch, targets)
        inputs, call = self._flat(batch)
        rows, sizes = weighting.rows(inputs[0].shape[0], self.mesh.shape["dp"], self.mesh.coords["dp"], self.chunks)
        labels = batch["labels"] if own else None  # padding rows ignore the model's own loss: labels -100
        if own and max(sizes) * len(sizes) != sum(sizes) and labels.is_floating_point():
            raise ValueError(f"micro-batches of {sizes} rows are padded to one shape, and a model's own loss on float "
                             "labels (regression, multi-label) cannot ignore padding rows; use a batch of a multiple "
                             f"of {self.chunks * self.mesh.shape['dp']} rows, or pass loss_fn")
        inputs = tuple(weighting.pad(t[rows].to(self.device), sizes, fill=IGNORE if t is labels else None)
                       for t in inputs)  # equal micro-batches
        if self._schedule is None:
            self._build(tuple(t[: max(sizes)] for t in inputs), call)
        mb = [(max(sizes), *t.shape[1:]) for t in inputs]
        if mb != self._shape or call != self._call:
            raise ValueError(f"this step's micro-batches have shapes {mb}{_keys(call)} but the stages were built for "
                             f"{self._shape}{_keys(self._call)}; torch's stages receive into buffers of one shape: keep "
                             "the batch's shape and keys fixed (pad, or build another DistributedPipeline)")
        count = self._count if not own or self.items is not None else self._own_items
        return _Step(self, inputs, targets[rows].to(self.device), sizes, self.loss_fn or _model_loss, count).run()

    def _targets(self, batch: Batch, targets: Tensor | None) -> tuple[Batch, Tensor, bool]:
        """(batch, targets, whether the model's own loss runs): a dict batch's labels are the targets when none
        are given, popped for a loss_fn (as mplib.Pipeline does), kept in the batch for the model's own loss."""
        labelled = isinstance(batch, Mapping) and "labels" in batch
        if targets is not None:
            if self.loss_fn is None:
                raise ValueError("targets go to loss_fn, and this pipeline has none: pass loss_fn, or give the labels "
                                 "in the dict batch for the model's own loss")
            return batch, targets, False
        if not labelled:
            raise ValueError("step needs targets: pipe.step(batch, targets), or an HF model's dict batch with 'labels'")
        batch = dict(batch)  # a BatchEncoding is a Mapping too; the step's own copy
        if self.loss_fn is not None:
            return batch, batch.pop("labels"), False
        self._check_labels(batch)
        return batch, batch["labels"], True

    def gather_timeline(self, dst: int = 0) -> Timeline | None:
        """Every rank's timeline of the last step on `dst` (None on the others), one lane per rank, on one clock.

        Example (several processes):
            tl = pipe.gather_timeline();  mplib.plot.timeline(tl) if tl else None
        """
        tl = self.timeline
        mine = (self.lane_name(), [] if tl is None else [(e.kind, e.start, e.end, e.microbatch, e.stage, e.label)
                                                         for e in tl.events])
        every: list[Any] = [None] * dist.get_world_size() if dist.get_rank() == dst else None
        dist.gather_object(mine, every, dst=dst)
        if every is None:
            return None
        t0 = min((e[1] for _, events in every for e in events), default=0.0)
        out = Timeline(lanes=[name for name, _ in every], t0=1.0)
        for lane, (_, events) in enumerate(every):
            for kind, start, end, m, s, label in events:
                out.add(lane, kind, start - t0, end - t0, microbatch=m, stage=s, label=label)
        return out

    def lane_name(self) -> str:
        stages = ", ".join(str(s) for s in self.mine)
        coords = "" if self.mesh.size == self.K else f" (dp {self.mesh.coords['dp']}, tp {self.mesh.coords['tp']})"
        return f"rank {self.mesh.rank}: stage{'s' if len(self.mine) > 1 else ''} {stages}{coords}"


class _Step:
    """One step of `pipe`: its timeline and its losses; built by `step`, run once, then dropped."""

    def __init__(self, pipe: DistributedPipeline, inputs: tuple[Tensor, ...], targets: Tensor,
                 sizes: list[int], loss_fn: Callable[[Any, Any], Tensor], count: Any) -> None:
        self.pipe, self.inputs, self.targets, self.sizes = pipe, inputs, targets, sizes
        self.loss_fn, self.count = loss_fn, count
        self.timeline = Timeline(lanes=[pipe.lane_name()], t0=pipe.epoch)
        self.losses: list[Tensor] = []

    def record(self, kind: str, stage: int, m: int, start: float, end: float) -> None:
        label = {"forward": "F", "backward": "B", "weight": "W"}[kind] + str(m)
        self.timeline.add(0, "forward" if kind == "forward" else "backward", start - self.pipe.epoch,
                          end - self.pipe.epoch, microbatch=m, stage=stage, label=label)

    def run(self) -> Tensor:
        pipe = self.pipe
        first = any(st.is_first for st in pipe.stages)
        last = any(st.is_last for st in pipe.stages)
        if last:  # mplib.Pipeline's weights, over every replica's items; the dp group shares this pp rank
            pipe._loss.loss_fn = self.loss_fn
            pipe._loss.begin(self.targets, self.sizes, self.count,
                             pipe.mesh.groups["dp"] if pipe.mesh.shape["dp"] > 1 else None, pipe.device)
        for st in pipe.stages:
            st.recorder = self.record
        try:
            pipe._schedule.step(*(self.inputs if first else ()), target=torch.arange(pipe.chunks) if last else None,
                                losses=self.losses if last else None, return_outputs=False)
        finally:
            for st in pipe.stages:
                st.recorder = None
            pipe.timeline = self.timeline
        with self.timeline.record(0, "collective", label="grads"):
            self._reduce_grads()
        return self._loss(last)

    def _reduce_grads(self) -> None:
        pipe = self.pipe
        for group, param in pipe._ties:  # the embedding's and the head's share of one tied weight
            if param is not None:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                dist.all_reduce(param.grad, group=group)
        if pipe.mesh.shape["dp"] > 1:
            _all_reduce([p for p in pipe.parameters() if p.requires_grad], pipe.mesh.groups["dp"])

    def _loss(self, last: bool) -> Tensor:
        pipe = self.pipe
        loss = torch.stack([x.detach() for x in self.losses]).sum().float() if last else \
            torch.zeros((), device=pipe.device)
        src = pipe.mesh.along("pp")[pipe.where[-1]]
        if pipe.K > 1:
            dist.broadcast(loss, src=src, group=pipe.mesh.groups["pp"])
        if pipe.mesh.shape["dp"] > 1:
            dist.all_reduce(loss, group=pipe.mesh.groups["dp"])
        return loss


def _all_reduce(params: list[nn.Parameter], group: Any) -> None:
    """Sum every parameter's gradient over `group` in one flat buffer (one collective, not one per tensor)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(reduced)


def _as_tuple(batch: Batch) -> tuple[Tensor, ...]:
    if isinstance(batch, Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch and all(isinstance(t, Tensor) for t in batch):
        return tuple(batch)
    raise TypeError(f"a batch is a tensor or a tuple of tensors (the model's positional inputs), got "
                    f"{type(batch).__name__}")


def _keys(call: Structure | None) -> str:
    return f" (keys {sorted(call.template)})" if call is not None else ""


def _default_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
