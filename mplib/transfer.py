"""Move nested activations between devices, overlapping copies with compute, autograd-aware."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import Tensor

Device = torch.device | str

# Leaves that are not tensors and travel unchanged: masks of None, flags, sizes, names.
_PLAIN = (type(None), bool, int, float, str)


def to_device(obj: Any, device: Device, non_blocking: bool = False, *, path: str = "obj") -> Any:
    """Return `obj` with every tensor inside it on `device`; gradients flow back to the source.

    Walks tuples (named ones too), lists, dicts, dataclasses and HF `ModelOutput`s. None,
    bools, ints, floats and strings pass through; any other leaf is a TypeError naming where
    it sits, starting from `path`. A tensor already on `device` is returned as is (no copy, same
    autograd node). With `non_blocking=True` and a CUDA target, CPU tensors go through pinned
    memory and the copy runs on a side stream that the compute stream waits for (`_StreamCopy`).

    Example:
        devices = mplib.env.get_devices(2)                      # [cuda:0, cuda:1], or CPU stand-ins
        hidden, mask = to_device((hidden, mask), devices[1], non_blocking=True)
        out = to_device(model_output, "cpu")   # a ModelOutput stays a ModelOutput
    """
    dev = torch.device(device)
    return map_tensors(obj, lambda t: _move(t, dev, non_blocking), path)


def map_tensors(obj: Any, fn: Callable[[Tensor], Tensor], path: str = "obj") -> Any:
    """Apply `fn` to every tensor in a nested structure, rebuilding containers of the same type.

    Example:
        halves = map_tensors({"x": x, "mask": None}, lambda t: t.half())
        map_tensors(object(), str)   # TypeError naming the type and its path
    """
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, _PLAIN):
        return obj
    if _is_model_output(obj):  # an OrderedDict and a dataclass at once: rebuild from its set keys
        return type(obj)(**{k: map_tensors(v, fn, f"{path}.{k}") for k, v in obj.items()})
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: map_tensors(getattr(obj, f.name), fn, f"{path}.{f.name}")
                   for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, tuple):
        items = [map_tensors(v, fn, f"{path}[{i}]") for i, v in enumerate(obj)]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, list):
        return [map_tensors(v, fn, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        return type(obj)((k, map_tensors(v, fn, f"{path}[{k!r}]")) for k, v in obj.items())
    raise TypeError(f"cannot move a {type(obj).__qualname__} at {path}: it moves tensors inside "
                    "tuples, lists, dicts, dataclasses and ModelOutputs, and passes None/bool/int/float/str "
                    "through; convert that value to a tensor or keep it out of the activations")


def _is_model_output(obj: Any) -> bool:
    try:
        from transformers.utils import ModelOutput
    except ImportError:  # transformers is optional for the transfer logic
        return False
    return isinstance(obj, ModelOutput)


def _move(t: Tensor, device: torch.device, non_blocking: bool) -> Tensor:
    if _same_device(t.device, device):
        return t
    if non_blocking and device.type == "cuda":
        return _StreamCopy.apply(t, device)
    return t.to(device)  # differentiable: its backward copies the gradient to t.device


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":  # "cuda" means the current GPU
        return _cuda_index(a) == _cuda_index(b)
    return a.index is None or b.index is None or a.index == b.index


def _cuda_index(d: torch.device) -> int:
    return torch.cuda.current_device() if d.index is None else d.index


_copy_streams: dict[int, torch.cuda.Stream] = {}


def copy_stream(device: Device) -> torch.cuda.Stream:
    """The side stream on a GPU that carries copies into it (one per GPU, created once)."""
    index = _cuda_index(torch.device(device))
    if index not in _copy_streams:
        _copy_streams[index] = torch.cuda.Stream(device=index)
    return _copy_streams[index]


def _copy_async(src: Tensor, device: torch.device) -> Tensor:
    """Copy `src` to `device` on a side stream; the compute streams wait only where they must.

    Ordering, with events so no compute stream blocks the host:
      1. the copy stream waits until `src` is ready on its producer's current stream;
      2. the copy is issued there, from pinned memory when `src` is on the CPU (a pageable copy
         would be synchronous anyway); a GPU-to-GPU copy PyTorch runs on the source GPU's
         current stream, itself ordered after and before the copy stream with events;
      3. the destination device's current stream waits for the copy before it reads `out`;
      4. `record_stream` tells the caching allocators that `src` and `out` are used by the copy
         stream, so neither block is reused while the copy is still in flight.
    A CPU target copies synchronously: the host would read the tensor right away.
    """
    if device.type != "cuda":
        return src.to(device)
    stream = copy_stream(device)
    if src.is_cuda:
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(src.device))
        stream.wait_event(ready)
    elif not src.is_pinned():
        src = src.pin_memory()
    with torch.cuda.stream(stream):
        out = src.to(device, non_blocking=True)
    done = torch.cuda.Event()
    done.record(stream)
    compute = torch.cuda.current_stream(device)
    compute.wait_event(done)
    if src.is_cuda:
        src.record_stream(stream)
    out.record_stream(compute)
    return out


class _StreamCopy(torch.autograd.Function):
    """Identity across devices: forward copies to `device`, backward copies the gradient home."""

    @staticmethod
    def forward(ctx, t: Tensor, device: torch.device) -> Tensor:
        ctx.source = t.device
        return _copy_async(t.detach(), device)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _copy_async(grad, ctx.source), None
