"""Turn a model into an ordered list of blocks whose chain is its forward; report tied weights.

A block is the unit that `split`, `profile` and `partition` place on a device. Block 0
takes the model's inputs; every later block takes the one value the block before returned.
Hugging Face models are cut by `mplib.hf`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from torch import nn

from mplib import hf


@dataclass
class Blocks:
    """The blocks of a model, their names and which of their parameters are one tensor.

    `tied` holds groups of (block index, parameter name) that share one tensor, e.g. GPT-2's
    `[[(0, "wte.weight"), (3, "lm_head.weight")]]`.
    """

    modules: list[nn.Module]
    names: list[str]
    tied: list[list[tuple[int, str]]] = field(default_factory=list)
    source: nn.Module | None = None  # the model the blocks came from (its state_dict keys rule)
    hf: nn.Module | None = None  # the HF model, when they came from one: its call, loss and generate

    def __len__(self) -> int:
        return len(self.modules)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the chain: block 0 on the inputs, every later block on the previous output."""
        x = self.modules[0](*args, **kwargs)
        for block in self.modules[1:]:
            x = block(x)
        return x


def blocks(model: Any) -> Blocks:
    """Split `model` into its ordered blocks.

    Accepts an `nn.Sequential` or `nn.ModuleList`, a list of modules, an object with a `.blocks()`
    method (every mplib model), a `Blocks`, and Hugging Face models cut by one rule (`mplib.hf`): the
    embeddings, one block per layer of the model's own list, the head (GPT-2, BERT, Llama, Qwen2,
    Mistral, with any of their task heads). The blocks hold the model's own modules: nothing is copied.

    Example:
        b = mplib.layers.blocks(model)
        print(b.names, b.tied)   # ['embed', 'h.0', 'h.1', 'head'] [[(0, 'wte.weight'), (3, ...)]]
    """
    if isinstance(model, Blocks):
        return model
    source: nn.Module | None = model if isinstance(model, nn.Module) else None
    if isinstance(model, (nn.Sequential, nn.ModuleList)):
        mods, names = list(model), [name for name, _ in model.named_children()]
    elif isinstance(model, (list, tuple)) and model and all(isinstance(m, nn.Module) for m in model):
        mods = list(model)
        names = [str(i) for i in range(len(mods))]
        source = nn.Sequential(*mods)
    elif callable(getattr(model, "blocks", None)):
        mods = list(model.blocks())
        names = _names_in(model, mods)
    elif hf.is_hf(model):
        mods, names = hf.blocks(model)
    else:
        raise TypeError(
            f"mplib.layers.blocks does not know how to cut a {type(model).__qualname__} into blocks; "
            "it takes an nn.Sequential / nn.ModuleList, a non-empty list of nn.Modules, an object with a "
            f".blocks() method (mplib models), or an HF model built on {', '.join(hf.SUPPORTED)} (e.g. "
            "GPT2LMHeadModel, BertForSequenceClassification, LlamaForCausalLM). Pass your model as a list of "
            "modules whose chain equals its forward: blocks([embed, *layers, head])")
    if not mods:
        raise ValueError(f"{type(model).__qualname__} has no blocks; a model needs at least one to be split")
    return Blocks(mods, names, find_tied(mods), source, model if hf.is_hf(model) else None)


def find_tied(mods: Sequence[nn.Module]) -> list[list[tuple[int, str]]]:
    """Groups of (block index, parameter name) that are one nn.Parameter, found by identity.

    Example:
        find_tied([embed, head])   # [[(0, 'wte.weight'), (1, 'lm_head.weight')]] when tied
    """
    users: dict[int, list[tuple[int, str]]] = {}
    for i, mod in enumerate(mods):
        for name, p in mod.named_parameters(remove_duplicate=False):
            users.setdefault(id(p), []).append((i, name))
    return [group for group in users.values() if len(group) > 1]


def _names_in(model: Any, mods: list[nn.Module]) -> list[str]:
    """Each block's qualified name inside `model` (e.g. 'layers.0'), or its class name."""
    where = {id(m): n for n, m in model.named_modules()} if isinstance(model, nn.Module) else {}
    return [where.get(id(m)) or f"{i}.{type(m).__name__}" for i, m in enumerate(mods)]
