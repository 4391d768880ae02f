"""Per-block costs: forward/backward seconds, parameter, optimizer, activation and boundary bytes.

`measure` times each block on a worker as a pipeline runs it; `analytic` counts FLOPs instead (no
compute, under FakeTensorMode) for models too large to run; `BlockCosts(...)` takes your own numbers.
"""

from __future__ import annotations

import copy
import math
import statistics
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from mplib.layers import blocks as to_blocks
from mplib.memory import OPTIMIZER_STATES, SavedBytes, _param_bytes  # _param_bytes: the tied-weight rule
from mplib.worker import Workers

Device = torch.device | str
LossFn = Callable[[Any, Any], Tensor]


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
    first block is timed until the last one is done. With `loss_fn(output, targets)` the last block
    is timed with its loss, as the last stage runs it. Times are medians of `repeats` runs after a
    warm-up. With one device each block runs alone. Blocks move to `devices[0]`; `.grad`s are kept.

    Why a steady load beside each block rather than whole stages timed inside a real pipeline step:
    what slows a block is what runs beside it (on CPU stand-ins: shared cores, caches and memory
    bandwidth, page faults on big gradients, the GIL), and inside a real step that is the profiled
    split's neighbours and bubbles. A stage that waits for a slower one runs its blocks beside
    constant work, so they look slower than the same blocks on the slow stage and the costs favour
    the split they were measured under. The whole model on every other worker is one load for all
    blocks, and near what a balanced pipeline (the one a partitioner looks for) runs beside a stage.

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
    load = _Load(chain.modules, devs[1:], sample_input, loss_fn, targets)
    params = {id(p): p for m in chain.modules for p in m.parameters()}
    saved_grads = {k: p.grad for k, p in params.items()}
    for p in params.values():
        p.grad = None  # backward would accumulate into an existing .grad in place
    cols: dict[str, list] = {}
    workers = Workers(len(devs), name="profile")
    try:
        timed = partial(_time_blocks, chain.modules, devs[0], sample_input, repeats, loss_fn, targets, load, cols)
        workers.run([partial(_on_worker, threads_per_worker, timed)]
                    + [partial(_on_worker, threads_per_worker, load.run, w) for w in range(len(devs) - 1)],
                    abort=load.stop)  # Ctrl-C stops the load, and the timing at the next block
    finally:
        workers.close()
        for k, p in params.items():
            p.grad = saved_grads[k]
    pbytes = _param_bytes(chain.modules, None)[0]
    return BlockCosts(**cols, param_bytes=pbytes, optimizer_bytes=[states * b for b in pbytes],
                      names=chain.names, source="measured", device=str(devs[0]))


def _on_worker(threads: int | None, task: Callable[..., None], *args: Any) -> None:
    if threads is not None:
        torch.set_num_threads(threads)  # per thread, as each of Pipeline's workers sets its own
    task(*args)


def _time_blocks(mods: list[nn.Module], dev: torch.device, sample_input: Any, repeats: int,
                 loss_fn: LossFn | None, targets: Any, load: "_Load", cols: dict[str, list]) -> None:
    """Worker 0's task: time each block in turn once the load runs; stop the load when done."""
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    for k in ("forward", "backward", "activation_bytes", "boundary_bytes"):
        cols[k] = []
    try:
        load.wait_until_running()
        x = _as_args(sample_input)
        for b, mod in enumerate(mods):
            if load.stopped:
                return  # interrupted: the caller raises
            mod.to(dev)
            x = tree_map(lambda t: _leaf(t.to(dev)) if isinstance(t, Tensor) else t, x)
            finish = None
            if loss_fn is not None and b == len(mods) - 1:
                tgt = tree_map(lambda t: t.to(dev) if isinstance(t, Tensor) else t, targets)
                finish = lambda out: loss_fn(out, tgt)  # noqa: E731
            out, fwd, bwd, act = _measure(mod, x, repeats, sync, finish)
            for k, v in zip(("forward", "backward", "activation_bytes", "boundary_bytes"),
                            (fwd, bwd, act, _output_bytes(out))):
                cols[k].append(v)
            x = (tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, out),)
    finally:
        load.stop()


def _measure(mod: nn.Module, args: tuple, repeats: int, sync: Callable[[], None],
             finish: Callable[[Any], Tensor] | None = None):
    """(output, forward s, backward s, saved activation bytes) of one block: medians after a warm-up.

    `finish` turns the output into a scalar loss inside the timed forward; backward then starts there.
    """
    own = [*mod.parameters(), *mod.buffers()]
    fwd, bwd, act = [], [], 0
    for r in range(repeats + 1):
        sync()
        t0 = time.perf_counter()
        with SavedBytes(exclude=own) as saved:
            out = mod(*args)
            loss = finish(out) if finish is not None else None
        sync()
        t1 = time.perf_counter()
        _backward(out, loss)
        sync()
        t2 = time.perf_counter()
        if r > 0:  # run 0 warms up caches and allocators
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            act = saved.bytes
    return out, statistics.median(fwd), statistics.median(bwd), act


def _backward(out: Any, loss: Tensor | None) -> None:
    """Backward from `loss`, else from every output that requires grad (with gradient one)."""
    roots = [loss] if loss is not None else [t for t in tree_flatten(out)[0]
                                             if isinstance(t, Tensor) and t.requires_grad]
    if roots:
        torch.autograd.backward(roots, [torch.ones_like(t) for t in roots])


class _Load:
    """The other workers' work while blocks are timed: each trains its own copy of the whole model.

    Its own, as each pipeline stage owns its parameters and gradients: the backward accumulates
    into the copy's `.grad`s, allocating and freeing what a stage's backward does (on CPU, big
    gradients fault fresh pages in), and the model's own parameters, buffers and `.grad`s stay out
    of it. Each copy costs the model's parameters and gradients once more.
    """

    def __init__(self, mods: list[nn.Module], devices: list[torch.device], sample_input: Any,
                 loss_fn: LossFn | None, targets: Any) -> None:
        self.loss_fn = loss_fn
        self._copies = [[m.to(d) for m in copy.deepcopy(mods)] for d in devices]
        self._inputs = [tree_map(lambda t: t.to(d) if isinstance(t, Tensor) else t, (_as_args(sample_input), targets))
                        for d in devices]
        self._running = [threading.Event() for _ in devices]
        self._stop = threading.Event()

    def run(self, w: int) -> None:
        """Worker w+1's task: train micro-batch after micro-batch until `stop`."""
        mods, (x, tgt) = self._copies[w], self._inputs[w]
        try:
            while not self.stopped:
                out = mods[0](*x)
                for mod in mods[1:]:
                    out = mod(out)
                _backward(out, self.loss_fn(out, tgt) if self.loss_fn is not None else None)
                self._running[w].set()  # one step done: from now on it runs at its steady pace
        finally:
            self._running[w].set()  # also when it failed: nobody waits for it forever

    def wait_until_running(self) -> None:
        for event in self._running:
            event.wait()

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()


def _as_args(sample_input: Any) -> tuple:
    return tuple(sample_input) if isinstance(sample_input, (tuple, list)) else (sample_input,)


def _leaf(t: Tensor) -> Tensor:
    """A fresh graph input: floating tensors require grad so backward reaches the block's input."""
    t = t.detach()
    return t.requires_grad_(True) if t.is_floating_point() else t


def _output_bytes(out: Any) -> int:
    """Bytes of the storages behind the tensors in `out`, each storage once: what crosses a cut."""
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes()
                for t in tree_flatten(out)[0] if isinstance(t, Tensor)}
    return sum(storages.values())


def analytic(model: Any, sample_input: Any, flops_per_second: float, optimizer: str | None = "adam",
             dtype: torch.dtype | None = None) -> BlockCosts:
    """Costs from counted FLOPs, computing nothing: seconds = FLOPs / `flops_per_second`.

    Runs each block's forward and backward under FakeTensorMode (shapes only, no memory) with
    `torch.utils.flop_counter.FlopCounterMode`, so it works for models too large to run here.
    Bytes come from shapes of a float32 model; `dtype` rescales them (e.g. torch.bfloat16 halves).

    Example:
        costs = mplib.profile.analytic(model, torch.zeros(8, 1024, dtype=torch.long), 300e12)
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
