"""Per-block costs: forward/backward seconds, parameter, optimizer, activation and boundary bytes.

`measure` times blocks as a pipeline runs them, `analytic` counts FLOPs, `BlockCosts` takes your own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

from mplib import _timing
from mplib._timing import as_args as _as_args, leaf as _leaf, output_bytes as _output_bytes
from mplib.layers import blocks as to_blocks
from mplib.memory import OPTIMIZER_STATES, SavedBytes, _param_bytes  # _param_bytes: the tied-weight rule

Device = torch.device | str
LossFn = _timing.LossFn  # (output, targets) -> scalar loss


@dataclass
class BlockCosts:
    """What each block costs; the input of every `mplib.partition` balancer.

    Times are seconds per micro-batch (on the device profiled, speed 1.0); bytes are bytes.
    `activation_bytes` is what one micro-batch leaves saved for backward inside the block,
    `boundary_bytes` what its output weighs, i.e. what crosses a cut placed after it.
    `grad_bytes` defaults to `param_bytes` (one gradient per parameter). A tied parameter counts
    in the first block that uses it only, the block whose stage holds it.

    Example:
        costs = BlockCosts(forward=[1e-3, 2e-3], backward=[2e-3, 4e-3])
        mplib.partition.optimal(costs, devices=2, chunks=4)
    """

    forward: list[float]
    backward: list[float]
    param_bytes: list[int] | None = None
    optimizer_bytes: list[int] | None = None
    activation_bytes: list[int] | None = None
    boundary_bytes: list[int] | None = None
    names: list[str] | None = None
    grad_bytes: list[int] | None = None
    source: str = "given"  # "measured", "analytic" or "given"
    device: str = "cpu"
    flops: list[float] = field(default_factory=list)  # forward + backward FLOPs, when counted

    def __post_init__(self) -> None:
        n = len(self.forward)
        if n == 0:
            raise ValueError("BlockCosts needs at least one block; forward=[] was given")
        self.forward = _checked("forward", self.forward, n, float)
        self.backward = _checked("backward", self.backward, n, float)
        for name in ("param_bytes", "optimizer_bytes", "activation_bytes", "boundary_bytes"):
            setattr(self, name, _checked(name, getattr(self, name) or [0] * n, n, int))
        self.grad_bytes = _checked("grad_bytes", self.grad_bytes or self.param_bytes, n, int)
        self.names = [str(x) for x in self.names] if self.names is not None else [str(i) for i in range(n)]
        if len(self.names) != n:
            raise ValueError(f"names has {len(self.names)} entries but forward has {n} blocks; "
                             "give one name per block")

    def __len__(self) -> int:
        return len(self.forward)

    @property
    def time(self) -> list[float]:
        """Forward + backward seconds of each block."""
        return [f + b for f, b in zip(self.forward, self.backward)]

    @property
    def state_bytes(self) -> list[int]:
        """Bytes a block holds whatever the schedule: parameters, gradients, optimizer state."""
        return [p + g + o for p, g, o in zip(self.param_bytes, self.grad_bytes, self.optimizer_bytes)]

    def __str__(self) -> str:
        rows = [f"{'block':<10}{'fwd ms':>9}{'bwd ms':>9}{'params MiB':>12}{'optim MiB':>11}"
                f"{'activ MiB':>11}{'bound MiB':>11}"]
        for i, name in enumerate(self.names):
            rows.append(f"{name[:9]:<10}{self.forward[i] * 1e3:>9.3f}{self.backward[i] * 1e3:>9.3f}"
                        f"{self.param_bytes[i] / 2**20:>12.2f}{self.optimizer_bytes[i] / 2**20:>11.2f}"
                        f"{self.activation_bytes[i] / 2**20:>11.2f}{self.boundary_bytes[i] / 2**20:>11.2f}")
        return "\n".join(rows)


def _checked(name: str, values: Sequence[Any], n: int, kind: type) -> list:
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries but forward has {n} blocks; "
                         "every per-block list must have one entry per block")
    for i, v in enumerate(values):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v) or v < 0 or math.isinf(v):
            raise ValueError(f"{name}[{i}] = {v!r}: costs must be finite numbers >= 0; "
                             "measure again or pass 0 for a block that costs nothing")
    return [kind(v) for v in values]


def _optimizer_states(optimizer: str | None) -> int:
    """State tensors per parameter (`mplib.memory.OPTIMIZER_STATES`); None means "none" (plain SGD)."""
    key = "none" if optimizer is None else optimizer
    if key not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer {optimizer!r} is not one of {sorted(OPTIMIZER_STATES)} ('sgd' is SGD with "
                         "momentum, 'none' or None plain SGD without state)")
    return OPTIMIZER_STATES[key]


def measure(model: Any, sample_input: Any, devices: Device | Sequence[Device] = "cpu", repeats: int = 5,
            optimizer: str | None = "adam", loss_fn: LossFn | None = None, targets: Any = None, *,
            threads_per_worker: int | None = None) -> BlockCosts:
    """Measure each block as a pipeline over `devices` runs it: on a worker, beside the others' work.

    As in `mplib.pipeline.Pipeline`, every device gets a long-lived worker thread with
    `threads_per_worker` intra-op threads (None: torch's default). Worker 0 runs the blocks in
    turn on `devices[0]`, each fed by the previous block's output (`sample_input`: one micro-batch
    for block 0, a tensor or a tuple of its positional inputs); meanwhile every other worker trains
    its own copy of the whole model on its device, micro-batch after micro-batch, from before the
    first block is timed until the last one is done (why: `mplib._timing.Load`). With
    `loss_fn(output, targets)` the last block is timed with its loss, as the last stage runs it.
    Times are medians over `repeats` passes, each timing every block once, after a warm-up pass (a
    slow moment then touches every block alike). With one device each block runs alone.
    Blocks move to `devices[0]`; `.grad`s are kept.

    Bytes: activations are the tensors autograd saves for backward (saved_tensors_hooks, per
    thread: the load is not counted), once per storage, without the block's parameters; a tied
    parameter counts in the first block that uses it (where `mplib.split` keeps it), as in `mplib.memory`.

    Example:
        costs = mplib.profile.measure(model, x[:4], ["cpu", "cpu"], loss_fn=mplib.train.lm_loss,
                                      targets=y[:4], threads_per_worker=1)
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    states = _optimizer_states(optimizer)
    if (loss_fn is None) != (targets is None):
        raise ValueError("loss_fn and targets go together: give both (the last block is then timed with "
                         "its loss) or neither")
    devs = [torch.device(d) for d in ([devices] if isinstance(devices, (str, torch.device)) else devices)]
    if not devs:
        raise ValueError("devices is empty; give the device(s) the pipeline will run on, e.g. ['cpu', 'cpu']")
    chain = to_blocks(model)
    cols = _timing.run(chain.modules, devs, sample_input, repeats, loss_fn, targets, threads_per_worker)
    pbytes = _param_bytes(chain.modules, None)[0]
    return BlockCosts(**cols, param_bytes=pbytes, optimizer_bytes=[states * b for b in pbytes],
                      names=chain.names, source="measured", device=str(devs[0]))


def analytic(model: Any, sample_input: Any, flops_per_second: float, optimizer: str | None = "adam",
             dtype: torch.dtype | None = None) -> BlockCosts:
    """Costs from counted FLOPs, computing nothing: seconds = FLOPs / `flops_per_second`.

    Runs each block's forward and backward under FakeTensorMode (shapes only, no memory) with
    `torch.utils.flop_counter.FlopCounterMode`, so it works for models too large to run here.
    Bytes come from shapes of a float32 model; `dtype` rescales them (e.g. torch.bfloat16 halves).

    Example:
        costs = mplib.profile.analytic(model, torch.zeros(8, 64, dtype=torch.long), 300e12)
        mplib.partition.optimal(costs, devices=4, chunks=8)
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    if not flops_per_second > 0:
        raise ValueError(f"flops_per_second must be > 0 (e.g. 312e12 for an A100 in bf16), got {flops_per_second}")
    states = _optimizer_states(optimizer)
    chain = to_blocks(model)
    scale = torch.empty((), dtype=dtype).element_size() / 4 if dtype else 1  # bytes relative to float32
    cols: dict[str, list] = {k: [] for k in ("forward", "backward", "activation_bytes", "boundary_bytes", "flops")}
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = tree_map(lambda t: _leaf(mode.from_tensor(t)) if isinstance(t, Tensor) else t, _as_args(sample_input))
        for mod in chain.modules:
            # the block runs on fake copies of its parameters: their storages are known (and excluded
            # from activations), and the fake gradients land on them, never on the real parameters
            own = {name: _leaf(mode.from_tensor(p)) for name, p in mod.named_parameters()}
            with FlopCounterMode(display=False) as fc_f, SavedBytes(exclude=own.values()) as saved:
                out = torch.func.functional_call(mod, own, x)
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor) and t.requires_grad]
            with FlopCounterMode(display=False) as fc_b:
                if outs:
                    torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
            f, b = fc_f.get_total_flops(), fc_b.get_total_flops()
            acts = saved.bytes * scale
            bound = _output_bytes(out) * scale
            for k, v in zip(cols, (f / flops_per_second, b / flops_per_second, int(acts), int(bound),
                                   float(f + b))):
                cols[k].append(v)
            x = (tree_map(lambda t: _leaf(t) if isinstance(t, Tensor) else t, out),)
    pbytes = [int(b * scale) for b in _param_bytes(chain.modules, None)[0]]  # a tied weight in its first block
    return BlockCosts(**cols, param_bytes=pbytes, optimizer_bytes=[states * b for b in pbytes],
                      names=chain.names, source="analytic", device=f"{flops_per_second:.3g} FLOP/s")
