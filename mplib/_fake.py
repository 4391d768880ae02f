"""Fake twins for `mplib.memory`: models built from configs, parameters and inputs under FakeTensorMode."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode


def to_fake(t: Tensor, mode: FakeTensorMode, dtype: torch.dtype, requires_grad: bool) -> Tensor:
    """A fake twin of `t` (no storage) in `dtype` when floating; a fake of `mode` stays as it is."""
    if not isinstance(t, FakeTensor):
        t = mode.from_tensor(t.detach(), static_shapes=True)  # shape and dtype only: no copy of the data
    with mode:
        t = t.detach()
        if t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        return t.requires_grad_(requires_grad)


def functional(mod: nn.Module, fakes: dict[int, Tensor]) -> Callable:
    """`mod` called with its parameters and buffers swapped for their fake twins."""
    named = {**dict(mod.named_parameters(remove_duplicate=False)), **dict(mod.named_buffers(remove_duplicate=False))}
    swapped = {name: fakes[id(t)] for name, t in named.items()}
    return lambda *args: torch.func.functional_call(mod, swapped, args)


def fake_inputs(first: nn.Module, mode: FakeTensorMode, batch: int, seq: int, dtype: torch.dtype,
                inputs: Sequence[Tensor] | None) -> list[Tensor]:
    """Fakes of `inputs` (floating ones in `dtype`), or (batch, seq) token ids for a model that embeds."""
    device = next((p.device for p in first.parameters()), torch.device("cpu"))
    if inputs is None:
        if not any(isinstance(m, nn.Embedding) for m in first.modules()):
            raise TypeError(f"estimate makes token ids (batch, seq) for models that start with an embedding, "
                            f"but block 0 ({type(first).__name__}) has none; pass the inputs, e.g. "
                            f"inputs=[torch.empty({batch}, {seq}, 64, device='meta')]")
        with mode:
            return [torch.zeros(batch, seq, dtype=torch.long, device=device)]
    out = []
    for t in inputs:
        if not isinstance(t, Tensor):
            raise TypeError(f"inputs must be tensors (real or on the meta device), got {type(t).__name__}")
        with mode:
            fake = torch.empty(t.shape, dtype=t.dtype, device=device)  # only shape and dtype matter
            out.append(fake.to(dtype) if fake.is_floating_point() else fake)
    return out


# --- building configs under FakeTensorMode ----------------------------------------------------

def build(config: Any, mode: FakeTensorMode, seq: int) -> tuple[nn.Module, int]:
    """Build a one-layer model of `config` with fake parameters; return it and the real layer count.

    Why one layer is enough: the layers of these models are the same module applied to a
    (B, T, C) tensor of the same shape, so each owns the same parameters and saves the same
    bytes, and each is the first to save its own input (the layer before returns a residual sum
    or a layer-norm output without saving it). So embed + one layer + head, with the layer
    counted n_layer times, is exact up to what every layer reads but block 0 made (a padding mask
    of B*T numbers, counted once per layer); the tests check it against a real run. The cost of
    an estimate is thus that of a one-layer model, however deep the config.
    """
    kind, layers_attr, positions = _config_kind(config)
    if seq > positions:
        raise ValueError(f"seq {seq} is longer than the model reads ({positions} positions in its config); "
                         f"use seq <= {positions} or a config with more positions")
    n_layer = getattr(config, layers_attr)
    if n_layer < 1:
        raise ValueError(f"the config has {n_layer} layers; a model needs at least 1 to be estimated")
    one = dataclasses.replace(config, n_layer=1) if dataclasses.is_dataclass(config) else copy.deepcopy(config)
    setattr(one, layers_attr, 1)
    with mode:
        model = _constructor(kind)(one)
    return model, n_layer


def _config_kind(config: Any) -> tuple[str, str, int]:
    """(kind, name of the layer-count field, number of positions) of a supported config."""
    name = type(config).__name__
    if name == "GPTConfig":
        return "gpt", "n_layer", config.block_size
    if name == "BERTConfig":
        return "bert", "n_layer", config.block_size
    if name == "GPT2Config":
        return "hf-gpt2", "n_layer", config.n_positions
    if name == "BertConfig":
        return "hf-bert", "num_hidden_layers", config.max_position_embeddings
    raise TypeError(f"estimate takes an nn.Module or a GPTConfig / BERTConfig (mplib.models) / "
                    f"GPT2Config / BertConfig (transformers), got {name}; build the model and pass it instead")


def _constructor(kind: str) -> Callable[[Any], nn.Module]:
    if kind == "gpt":
        from mplib.models.gpt import GPT
        return GPT
    if kind == "bert":
        from mplib.models.bert import BERT
        return BERT
    import transformers
    return transformers.GPT2LMHeadModel if kind == "hf-gpt2" else transformers.BertForMaskedLM
