"""Memory and storage: recompute activations (checkpointing), keep them on the host (offload), and the optimizer too.

Checkpointing trades one more forward for the activations (Chen et al. 2016: sqrt(n) memory);
offload moves what autograd saves to host memory and back for backward (pinned on CUDA, so the
copies overlap compute); ZeRO-Offload (Ren et al. 2021) keeps optimizer states and fp32 master
weights on the host and runs the update there.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.graph import saved_tensors_hooks

import mplib.layers


def checkpoint(model: Any, blocks: Sequence[int] | None = None) -> list[str]:
    """Recompute the chosen blocks' activations during backward instead of saving them (in place).

    Each chosen block is wrapped in torch's `checkpoint_wrapper` (non-reentrant
    `torch.utils.checkpoint`): it saves only its inputs, and runs its forward again when its
    backward comes. `state_dict` keys do not change. `blocks`: indices (default: all but the first
    and the last, the embedding and head of mplib models). Returns the wrapped blocks' names.

    Example:
        checkpoint(model)                   # ['layers.0', 'layers.1']
        # every layer of a BERT: gradients as before, saved activations / n_layer
        loss = F.cross_entropy(model(ids, mask), y); loss.backward()
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl,
                                                                             apply_activation_checkpointing,
                                                                             checkpoint_wrapper)

    parts = mplib.layers.blocks(model)
    chosen = _indices(blocks, len(parts), parts.names)
    if not isinstance(model, nn.Module):
        raise TypeError(f"checkpoint wraps the blocks inside a module, got {type(model).__name__}; "
                        "pass the model (an nn.Module whose blocks() are its submodules)")
    targets = {id(parts.modules[i]) for i in chosen}
    apply_activation_checkpointing(
        model, check_fn=lambda m: id(m) in targets,
        checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT))
    wrapped = mplib.layers.blocks(model)
    if sum(_is_checkpointed(m) for m in wrapped.modules) < len(chosen):
        raise TypeError("checkpoint found the blocks but could not replace them inside the model (they must be "
                        "its submodules, e.g. model.layers[i]); wrap them yourself with "
                        "torch.utils.checkpoint.checkpoint")
    return [parts.names[i] for i in chosen]


def uncheckpoint(model: nn.Module) -> None:
    """Undo `checkpoint`: every wrapped block is its own module again.

    Example:
        checkpoint(model); uncheckpoint(model)
    """
    for name, mod in list(model.named_modules()):
        if _is_checkpointed(mod):
            model.set_submodule(name, mod._checkpoint_wrapped_module)


def _is_checkpointed(mod: nn.Module) -> bool:
    return type(mod).__name__ == "CheckpointWrapper"


def _indices(blocks: Sequence[int] | None, n: int, names: Sequence[str]) -> list[int]:
    chosen = list(range(1, n - 1)) if blocks is None else sorted(set(blocks))
    bad = [i for i in chosen if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
    if bad or not chosen:
        raise ValueError(f"blocks must be indices of the model's {n} blocks ({', '.join(names)}), got {blocks}; "
                         f"e.g. blocks={list(range(1, max(n - 1, 2)))}")
    return chosen


class OffloadActivations(saved_tensors_hooks):
    """Within `with`: every activation autograd saves goes to `host` memory, and comes back for backward.

    torch's `save_on_cpu` does the same; this one also skips parameters and buffers (they stay
    resident anyway), copies each storage once (as `mplib.memory.estimate` counts them), and counts:
    `host_bytes` moved, `device_bytes` kept (storages under `min_bytes`). Host buffers are pinned
    when the activation sits on CUDA, so the copies run asynchronously. On CPU stand-ins host and
    device are one memory: the counts say what would leave the device.

    Example:
        with OffloadActivations(exclude=model) as off:
            loss = F.cross_entropy(model(ids, mask), y)
        loss.backward(); off.host_bytes     # the bytes that would have left the GPU
    """

    def __init__(self, exclude: Any = (), host: str | torch.device = "cpu", min_bytes: int = 0) -> None:
        self.host, self.min_bytes = torch.device(host), min_bytes
        self.host_bytes = self.device_bytes = 0
        skip = _storages(exclude)
        # One host copy per storage, whole: q, k and v save the same input, a head view and its flat
        # view share a storage. An address names a storage only while it lives (a freed one's is
        # reused), so a hit needs the storage alive: storages keep their Python object, so a weak
        # reference to it dies with it.
        copies: dict[int, tuple[Any, Tensor]] = {}
        restored: dict[int, Any] = {}

        def pack(t: Tensor) -> Any:
            storage = t.untyped_storage()
            if storage._cdata in skip:
                return t  # a parameter or buffer: resident anyway
            if storage.nbytes() < self.min_bytes:
                self.device_bytes += storage.nbytes()
                return t
            hit = copies.get(storage._cdata)
            if hit is None or hit[0]() is not storage:
                raw = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
                host_copy = torch.empty(raw.shape, dtype=torch.uint8, device=self.host, pin_memory=t.is_cuda)
                hit = copies[storage._cdata] = (weakref.ref(storage), host_copy.copy_(raw, non_blocking=t.is_cuda))
                self.host_bytes += storage.nbytes()
            return t.device, hit[1], t.dtype, t.storage_offset(), t.shape, t.stride()

        def unpack(packed: Any) -> Tensor:
            if isinstance(packed, Tensor):
                return packed
            device, host_copy, dtype, offset, shape, stride = packed
            # the views of one storage come back onto one device copy, while any of them is alive
            back = restored.get(id(host_copy))
            back = back() if back is not None else None
            if back is None:
                back = host_copy.to(device, non_blocking=host_copy.is_pinned()).untyped_storage()
                restored[id(host_copy)] = weakref.ref(back)
            return torch.empty(0, dtype=dtype, device=device).set_(back, offset, shape, stride)

        super().__init__(pack, unpack)

    def __enter__(self) -> "OffloadActivations":
        super().__enter__()
        return self


class OffloadedOptimizer:
    """An optimizer whose states and fp32 master weights live on the host; the update runs there.

    `step()` copies each gradient to its host master weight, runs `optimizer_cls` on the host, and
    copies the new weights back (ZeRO-Offload). The device holds only parameters and gradients. The
    result equals `optimizer_cls` run on the device, in fp32.

    Example:
        opt = OffloadedOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)
        F.cross_entropy(model(ids, mask), y).backward(); opt.step(); opt.zero_grad()
    """

    def __init__(self, params: Iterable[nn.Parameter], optimizer_cls: Callable[..., torch.optim.Optimizer]
                 = torch.optim.AdamW, host: str | torch.device = "cpu", **options: Any) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("OffloadedOptimizer got no trainable parameters (all have requires_grad=False)")
        self.host = torch.device(host)
        pin = any(p.is_cuda for p in self.params)
        self.master = [torch.empty(p.shape, dtype=torch.float32, device=self.host, pin_memory=pin)
                       .copy_(p.detach()).requires_grad_(True) for p in self.params]
        self.optimizer = optimizer_cls(self.master, **options)

    @torch.no_grad()
    def step(self) -> None:
        for p, m in zip(self.params, self.master):
            m.grad = None if p.grad is None else p.grad.to(self.host, torch.float32)
        self.optimizer.step()
        for p, m in zip(self.params, self.master):
            if m.grad is not None:
                p.copy_(m, non_blocking=m.is_pinned())

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_bytes(self) -> int:
        """Bytes of the optimizer states on the host (the master weights not included)."""
        return sum(t.nbytes for st in self.optimizer.state.values() for t in st.values() if isinstance(t, Tensor))

    def master_bytes(self) -> int:
        return sum(m.nbytes for m in self.master)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


def _storages(tensors_or_mods: Any) -> set[int]:
    items = [tensors_or_mods] if isinstance(tensors_or_mods, nn.Module) else list(tensors_or_mods)
    tensors = [t for x in items for t in ((*x.parameters(), *x.buffers()) if isinstance(x, nn.Module) else (x,))]
    return {t.untyped_storage()._cdata for t in tensors}
