"""Memory a model needs to train: parameters, gradients, optimizer states and saved activations.

Estimates run under `FakeTensorMode` (shapes and dtypes, no storage), so nothing is allocated.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.autograd.graph import saved_tensors_hooks

import mplib.layers
from mplib import _fake
from mplib.transfer import map_tensors

# State tensors per parameter: Adam/AdamW keep two moments, "sgd" is SGD with momentum (one buffer),
# "none" plain SGD (no state). The one table of them: mplib.profile reads it too.
OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "sgd": 1, "none": 0}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class BlockMemory:
    """Bytes one block holds: its own parameters and the activations it saves for backward."""

    name: str
    params: int
    activations: int


@dataclass
class MemoryEstimate:
    """Bytes needed for one training step. `optimizer` includes fp32 master weights under mixed precision.

    Example:
        est = mplib.memory.estimate(GPT2_SMALL, batch=8, seq=1024)
        print(f"{est.total / 2**30:.1f} GiB")
    """

    params: int
    grads: int
    optimizer: int
    activations: int
    per_block: list[BlockMemory] = field(default_factory=list)
    num_parameters: int = 0
    label: str = ""

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations

    def gib(self) -> dict[str, float]:
        """Each part and the total in GiB (2**30 bytes), for tables and plots."""
        parts = {k: getattr(self, k) for k in ("params", "grads", "optimizer", "activations", "total")}
        return {k: v / 2**30 for k, v in parts.items()}


def estimate(model_or_config: Any, batch: int, seq: int, dtype: torch.dtype = torch.float32,
             optimizer: str | None = "adam", mixed_precision: bool = False, loss: bool = True,
             inputs: Sequence[Tensor] | None = None) -> MemoryEstimate:
    """Estimate the memory of one training step without allocating any of it.

    Parameters and gradients take `dtype`; Adam keeps 2 states per parameter, SGD with momentum
    1, "none" (plain SGD) 0. With `mixed_precision` the parameters and gradients are in `dtype`
    (e.g. bf16) and the optimizer keeps fp32 master weights and fp32 states (ZeRO's 2+2+12 bytes
    per parameter). Activations are the bytes autograd saves for backward (and, with `loss`,
    those of a cross-entropy on the output), counted once per storage, parameters excluded.

    `model_or_config` is an nn.Module (its blocks per `mplib.layers.blocks`), an mplib
    `GPTConfig`/`BERTConfig`, or an HF `GPT2Config`/`BertConfig`. Configs are built under
    FakeTensorMode with one layer whose cost is repeated n_layer times (see `mplib._fake.build`).
    Token models get (batch, seq) ids; other models need `inputs` (real or meta tensors).

    Example:
        from transformers import GPT2Config
        est = mplib.memory.estimate(GPT2Config(), batch=8, seq=1024, optimizer="adam")
        est.params, est.activations, est.total   # bytes
    """
    _check_args(batch, seq, dtype, optimizer, mixed_precision)
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    repeat = 1
    if isinstance(model_or_config, nn.Module):
        model = model_or_config
    else:
        model, repeat = _fake.build(model_or_config, mode, seq)
    blocks = mplib.layers.blocks(model)
    param_bytes, counts = _param_bytes(blocks.modules, dtype)
    acts = _activation_bytes(blocks.modules, mode, batch, seq, dtype, loss, inputs)
    per_block = [BlockMemory(n, p, a) for n, p, a in zip(blocks.names, param_bytes, acts)]
    if repeat > 1:  # blocks are [embed, layer, head]: the one layer stands for all n_layer of them
        layer = per_block[1]
        per_block = [per_block[0], *[BlockMemory(f"layer.{i}", layer.params, layer.activations)
                                     for i in range(repeat)], per_block[2]]
        counts = [counts[0], *[counts[1]] * repeat, counts[2]]
    n = sum(counts)
    width = dtype.itemsize
    states = OPTIMIZER_STATES[optimizer or "none"]
    opt = n * 4 * (states + 1) if mixed_precision else n * width * states  # +1: fp32 master weights
    return MemoryEstimate(params=n * width, grads=n * width, optimizer=opt,
                          activations=sum(b.activations for b in per_block), per_block=per_block,
                          num_parameters=n, label=type(model_or_config).__name__)


def measure(model: nn.Module, *inputs: Tensor, optimizer: str | None = "adam", loss: bool = True) -> MemoryEstimate:
    """Bytes one real training step holds, counted on real tensors: the reference for `estimate`.

    Runs forward (saved activations counted with `saved_tensors_hooks`, once per storage, as
    `estimate` counts them), backward and one optimizer step on a deep copy of `model`, then
    counts the bytes of the parameters, their `.grad`s and the optimizer's state tensors.
    `optimizer` as in `estimate` ("sgd": SGD with momentum). Works on any device.

    Example:
        real = mplib.memory.measure(GPT(GPT_TINY), torch.zeros(2, 16, dtype=torch.long))
        real.total / estimate(GPT_TINY, batch=2, seq=16).total   # about 1.0
    """
    if (optimizer or "none") not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_STATES)}, got {optimizer!r}")
    parts = mplib.layers.blocks(copy.deepcopy(model))
    params = list({id(p): p for m in parts.modules for p in m.parameters()}.values())  # tied weights once
    with _train_mode(parts.modules):
        acts, out = _run_counting(parts.modules, inputs, loss, parts.modules)
    if not isinstance(out, Tensor):
        raise ValueError("the model's output has no tensor that requires grad; measure needs a trainable model")
    out.backward()
    opt_bytes = 0
    if (optimizer or "none") != "none":
        opt = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}.get(
            optimizer, lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9))(params)
        opt.step()  # states are created on the first step
        opt_bytes = sum(t.nbytes for st in opt.state.values() for t in st.values() if isinstance(t, Tensor))
    param_bytes, _ = _param_bytes(parts.modules, None)
    return MemoryEstimate(params=sum(p.nbytes for p in params),
                          grads=sum(p.grad.nbytes for p in params if p.grad is not None), optimizer=opt_bytes,
                          activations=sum(acts), num_parameters=sum(p.numel() for p in params),
                          per_block=[BlockMemory(*row) for row in zip(parts.names, param_bytes, acts)],
                          label=type(model).__name__)


def measure_activations(model: nn.Module | Sequence[nn.Module], *inputs: Tensor, loss: bool = True) -> int:
    """Bytes autograd really saves running `model` forward on real tensors (`measure`'s activations).

    Example:
        nbytes = mplib.memory.measure_activations(GPT(GPT_TINY), torch.zeros(2, 16, dtype=torch.long))
        nbytes > 0
    """
    mods = mplib.layers.blocks(model).modules
    with _train_mode(mods):
        return sum(_run_counting(mods, inputs, loss, mods)[0])


# --- parameters -----------------------------------------------------------------------------

def _param_bytes(mods: list[nn.Module], dtype: torch.dtype | None) -> tuple[list[int], list[int]]:
    """Per block: bytes (in `dtype`, or their own) and count of the parameters it owns (a tied weight
    counts in its first block)."""
    seen: set[int] = set()
    counts, nbytes = [], []
    for mod in mods:
        new = [p for p in mod.parameters() if id(p) not in seen]
        seen.update(id(p) for p in new)
        counts.append(sum(p.numel() for p in new))
        nbytes.append(sum(p.numel() * (dtype or p.dtype).itemsize for p in new))
    return nbytes, counts


# --- activations ----------------------------------------------------------------------------

def _activation_bytes(mods: list[nn.Module], mode: FakeTensorMode, batch: int, seq: int,
                      dtype: torch.dtype, loss: bool, inputs: Sequence[Tensor] | None) -> list[int]:
    """Run the chain under `mode` on fake copies of every parameter, counting saved bytes per block."""
    fakes: dict[int, Tensor] = {}
    with _train_mode(mods):
        for mod in mods:
            for t in mod.parameters():
                fakes.setdefault(id(t), _fake.to_fake(t, mode, dtype, t.requires_grad))
            for t in mod.buffers():
                fakes.setdefault(id(t), _fake.to_fake(t, mode, dtype, False))
        fakes_in = _fake.fake_inputs(mods[0], mode, batch, seq, dtype, inputs)
        calls = [_fake.functional(mod, fakes) for mod in mods]
        with mode:
            return _run_counting(calls, fakes_in, loss, fakes.values())[0]


class SavedBytes(saved_tensors_hooks):
    """Within `with`: bytes of the tensors autograd saves for backward (the activations).

    Each storage counts once, whole (a view shares its base's storage, so a transposed weight is
    the weight); storages of `exclude` (tensors or modules: parameters and buffers) are skipped.
    Storages are told apart by their C++ object, so real and fake tensors count alike. With
    `whole_storages=False` each distinct view counts its own bytes instead: `mplib.pipeline` counts
    so, because a micro-batch is a view of the whole batch, whose storage is not the micro-batch's.
    `estimate`, `measure`, `mplib.profile` and `mplib.pipeline` all count with this.

    Example:
        with mplib.memory.SavedBytes(exclude=model) as saved:
            loss = model(x).logsumexp(-1).mean()
        saved.bytes   # what backward will need
    """

    def __init__(self, exclude: Any = (), whole_storages: bool = True) -> None:
        self.bytes, skip, seen = 0, _storage_keys(exclude), set()

        def pack(t: Tensor) -> Tensor:
            storage = t.untyped_storage()
            key = storage._cdata if whole_storages else (storage._cdata, t.storage_offset(), t.shape, t.stride())
            if storage._cdata not in skip and key not in seen:
                seen.add(key)
                self.bytes += storage.nbytes() if whole_storages else t.nbytes
            return t

        super().__init__(pack, lambda t: t)

    def __enter__(self) -> "SavedBytes":
        super().__enter__()
        return self


def _run_counting(calls: Sequence[Callable], inputs: Sequence[Tensor], loss: bool,
                  exclude: Any) -> tuple[list[int], Tensor]:
    """Chain `calls` on `inputs`; per call, bytes of storages first saved for backward during it.

    Also returns the scalar to call backward on: the loss, or the output's sum (which saves nothing).
    """
    per_call, out = [], None
    with SavedBytes(exclude) as saved:
        x = calls[0](*inputs)
        for call in calls[1:]:
            per_call.append(saved.bytes - sum(per_call))
            x = call(x)
        if loss and isinstance(x, Tensor) and x.is_floating_point() and x.dim() >= 2:
            logits = x.flatten(0, -2)  # (B*T, V): an LM loss, or (B, C) for a classifier
            out = F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=x.device))
        per_call.append(saved.bytes - sum(per_call))  # the last call's, its loss included
    return per_call, out if out is not None else sum(t.float().sum() for t in _tensors(x) if t.requires_grad)


def _tensors(x: Any) -> list[Tensor]:
    found: list[Tensor] = []
    map_tensors(x, lambda t: found.append(t) or t)
    return found


def _storage_keys(tensors_or_mods: Any) -> set[int]:
    """The storages (C++ objects) of tensors, or of modules' parameters and buffers."""
    items = [tensors_or_mods] if isinstance(tensors_or_mods, nn.Module) else list(tensors_or_mods)
    tensors = [t for x in items for t in ((*x.parameters(), *x.buffers()) if isinstance(x, nn.Module) else (x,))]
    return {t.untyped_storage()._cdata for t in tensors}


@contextlib.contextmanager
def _train_mode(mods: Sequence[nn.Module]):
    """Training mode (dropout on: its masks are saved) for the duration, then each module's own mode."""
    before = [(m, m.training) for mod in mods for m in mod.modules()]
    for mod in mods:
        mod.train()
    try:
        yield
    finally:
        for m, training in before:
            m.training = training


def _check_args(batch: int, seq: int, dtype: torch.dtype, optimizer: str | None, mixed_precision: bool) -> None:
    for name, value in (("batch", batch), ("seq", seq)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int (a count of sequences / tokens), got {value!r}")
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be a floating dtype the parameters are stored in, one of "
                         f"{[str(d) for d in _FLOAT_DTYPES]}, got {dtype!r}")
    if (optimizer or "none") not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_STATES)} (sgd means SGD with momentum; "
                         f"'none' plain SGD), got {optimizer!r}")
    if mixed_precision and dtype.itemsize != 2:
        raise ValueError(f"mixed precision keeps parameters in a 16-bit dtype and fp32 master weights, but "
                         f"dtype is {dtype}; pass dtype=torch.bfloat16 (or float16), or mixed_precision=False")
