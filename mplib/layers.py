"""Turn a model into an ordered list of blocks whose chain is its forward; report tied weights.

A block is the unit that `split`, `profile` and `partition` place on a device. Block 0
takes the model's inputs; every later block takes the one value the block before returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn


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
    method (every mplib model), a `Blocks`, and HF `GPT2LMHeadModel` / `BertForMaskedLM` (wrapped in small
    adapters: embeddings, one block per layer, head; attention masks travel with the hidden
    states). The blocks hold the model's own modules: nothing is copied.

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
    elif _hf_kind(model) is not None:
        mods, names = _hf_blocks(model)
    else:
        raise TypeError(
            f"mplib.layers.blocks does not know how to cut a {type(model).__qualname__} into blocks; "
            "it takes an nn.Sequential / nn.ModuleList, a non-empty list of nn.Modules, an object with a "
            ".blocks() method (mplib models), or HF GPT2LMHeadModel / BertForMaskedLM. Pass your model as a list of "
            "modules whose chain equals its forward: blocks([embed, *layers, head])")
    if not mods:
        raise ValueError(f"{type(model).__qualname__} has no blocks; a model needs at least one to be split")
    return Blocks(mods, names, find_tied(mods), source)


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


def _hf_kind(model: Any) -> str | None:
    try:
        from transformers import BertForMaskedLM, GPT2LMHeadModel
    except ImportError:
        return None
    if isinstance(model, GPT2LMHeadModel):
        return "gpt2"
    if isinstance(model, BertForMaskedLM):
        return "bert"
    return None


def _hf_blocks(model: nn.Module) -> tuple[list[nn.Module], list[str]]:
    if _hf_kind(model) == "gpt2":
        t = model.transformer
        layers = [GPT2Layer(h) for h in t.h]
        mods = [GPT2Embed(t), *layers, GPT2Head(t.ln_f, model.lm_head)]
        return mods, ["embed", *[f"h.{i}" for i in range(len(layers))], "head"]
    b = model.bert
    layers = [BertLayerBlock(layer) for layer in b.encoder.layer]
    mods = [BertEmbed(b), *layers, BertHead(model.cls)]
    return mods, ["embeddings", *[f"layer.{i}" for i in range(len(layers))], "head"]


# HF adapters. Each holds the HF model's own submodules; the chain equals
# `model(input_ids, attention_mask=mask, use_cache=False).logits`.
# Between blocks the value is (hidden (B, T, C), mask): the mask HF builds once from the
# attention mask (None when the attention kernel needs none).


class GPT2Embed(nn.Module):
    """GPT-2 token + position embeddings, and the causal mask every layer reads."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.wte, self.wpe, self.drop = transformer.wte, transformer.wpe, transformer.drop
        self.config = transformer.config  # a plain attribute: configs are not modules

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Any]:
        from transformers.masking_utils import create_causal_mask

        embeds = self.wte(input_ids)  # (B, T, C)
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)  # (1, T)
        hidden = embeds + self.wpe(position_ids)
        if attention_mask is not None:
            attention_mask = attention_mask.view(input_ids.shape[0], -1)
        mask = create_causal_mask(config=self.config, inputs_embeds=embeds, attention_mask=attention_mask,
                                  past_key_values=None, position_ids=position_ids)
        return self.drop(hidden), mask


class GPT2Layer(nn.Module):
    """One GPT-2 transformer layer; passes the mask on."""

    def __init__(self, h: nn.Module) -> None:
        super().__init__()
        self.h = h

    def forward(self, x: tuple[Tensor, Any]) -> tuple[Tensor, Any]:
        hidden, mask = x
        return self.h(hidden, attention_mask=mask, use_cache=False), mask


class GPT2Head(nn.Module):
    """Final layer norm and the language-model head (its weight is tied to `wte`)."""

    def __init__(self, ln_f: nn.Module, lm_head: nn.Module) -> None:
        super().__init__()
        self.ln_f, self.lm_head = ln_f, lm_head

    def forward(self, x: tuple[Tensor, Any]) -> Tensor:
        return self.lm_head(self.ln_f(x[0]))  # (B, T, vocab)


class BertEmbed(nn.Module):
    """BERT word + position + token-type embeddings, and the padding mask every layer reads."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.embeddings = bert.embeddings
        self.config = bert.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> tuple[Tensor, Any]:
        from transformers.masking_utils import create_bidirectional_mask

        hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)  # (B, T, C)
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        return hidden, mask


class BertLayerBlock(nn.Module):
    """One BERT encoder layer; passes the mask on."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: tuple[Tensor, Any]) -> tuple[Tensor, Any]:
        hidden, mask = x
        out = self.layer(hidden, mask)
        return (out[0] if isinstance(out, tuple) else out), mask


class BertHead(nn.Module):
    """The masked-LM head: transform, then the decoder tied to the word embeddings."""

    def __init__(self, cls: nn.Module) -> None:
        super().__init__()
        self.cls = cls

    def forward(self, x: tuple[Tensor, Any]) -> Tensor:
        return self.cls(x[0])  # (B, T, vocab)
