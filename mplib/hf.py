"""Hugging Face models cut by one rule: the embeddings, the model's own list of layers, the head.

The embeddings block runs the model's own forward until its first layer is called and keeps what
that layer was handed (hidden states, masks, rotary embeddings computed once, position ids); each
layer block replays that call on its own layer; the head block runs the model's own forward again,
its base model answering at once with the last hidden state, so the head, the loss and the output
class are the model's own. No class has an adapter of its own.
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
import typing
from typing import Any, NamedTuple

from torch import Tensor, nn

# Base models whose layers are all called with the same arguments: the rule holds for them, and
# tests/test_hf.py checks it for each task class listed in TESTED.
SUPPORTED = ("GPT2Model", "BertModel", "LlamaModel", "Qwen2Model", "MistralModel")
TESTED = ("GPT2LMHeadModel", "GPT2ForSequenceClassification", "BertForMaskedLM", "BertForSequenceClassification",
          "BertForTokenClassification", "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
POSITIONAL = ("input_ids", "attention_mask")  # what block 0 takes by position; everything else by keyword
IGNORE = -100  # HF's label for "no loss here" (padding, prompt tokens)


def is_hf(model: Any) -> bool:
    """Whether `model` is a Hugging Face `PreTrainedModel` (False when transformers is not installed).

    Example:
        mplib.hf.is_hf(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2)))   # True
    """
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def blocks(model: nn.Module) -> tuple[list[nn.Module], list[str]]:
    """The blocks of an HF model: [embeddings, one per layer, head], holding the model's own modules.

    Example:
        mods, names = mplib.hf.blocks(LlamaForCausalLM(config))   # names: ['embed', 'layers.0', ..., 'head']
    """
    base = model.base_model
    path, layers = _layer_list(model, base)
    names = [n for n, _ in base.named_children()]
    top = names.index(path.split(".")[0])  # the child that holds the layers: h, encoder, layers
    after = [(n, c) for n, c in list(base.named_children())[top + 1:]]
    norms = [(n, c) for n, c in after if type(c).__name__.endswith("Norm")]  # ln_f, norm: the final norm
    pooler = getattr(base, "pooler", None)
    pre = [(n, c) for i, (n, c) in enumerate(base.named_children())  # embeddings (rotary ones too)
           if i != top and all(c is not m for _, m in norms) and c is not pooler]
    heads = [(n, c) for n, c in model.named_children() if c is not base]
    mods = [Embed(model, layers[0], pre), *[Layer(layer) for layer in layers], Head(model, norms, pooler, heads)]
    _check_covered(model, mods)
    embed = pre[0][0] if len(pre) == 1 else "embed"  # BERT's one `embeddings` keeps its name
    return mods, [embed, *[f"{path.split('.')[-1]}.{i}" for i in range(len(layers))], "head"]


def unsupported(model: Any, why: str) -> TypeError:
    """The error for a model the rule cannot cut: why, the supported classes, how to pass your own blocks.

    Example:
        raise mplib.hf.unsupported(opt_model, "its base model is a OPTModel")   # TypeError naming the supported classes
    """
    return TypeError(
        f"mplib cannot cut a {type(model).__qualname__} into blocks: {why}. It cuts HF models whose base model is "
        f"one of {', '.join(SUPPORTED)} (tested: {', '.join(TESTED)}). For another model pass your own blocks, "
        "a list of modules whose chain equals its forward: mplib.split([embed, *layers, head], devices)")


def _layer_list(model: nn.Module, base: nn.Module) -> tuple[str, nn.ModuleList]:
    if type(base).__name__ not in SUPPORTED:
        raise unsupported(model, f"its base model is a {type(base).__name__}")
    n = model.config.num_hidden_layers
    lists = [(p, m) for p, m in base.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n and p]
    if len(lists) != 1:
        raise unsupported(model, f"it has {len(lists)} lists of {n} layers, not one")
    kinds = set(getattr(model.config, "layer_types", None) or ())
    if len(kinds) > 1:  # e.g. Qwen2 with use_sliding_window: layers read different masks
        raise unsupported(model, f"its layers mix attention types {sorted(kinds)}, so they read different masks")
    return lists[0]


def _check_covered(model: nn.Module, mods: list[nn.Module]) -> None:
    mine = {id(p) for m in mods for p in m.parameters()}
    left = [name for name, p in model.named_parameters() if id(p) not in mine]
    if left:
        raise unsupported(model, f"parameters {left[:3]} sit outside its embeddings, layers and head")


# -- what travels between blocks -------------------------------------------------------------------

class CacheRef(str):
    """A KV cache riding along with the hidden states. `mplib.transfer` passes a str through unmoved, and
    so should the cache: each layer keeps its own keys and values on its own stage's device."""

    cache: Any

    def __new__(cls, cache: Any) -> CacheRef:
        ref = super().__new__(cls, "kv-cache")
        ref.cache = cache
        return ref


class Carry(NamedTuple):
    """The value between blocks: the hidden states and the rest of what every layer is handed.

    `args`/`kwargs` are the first layer's call without its hidden states (the cache's place, `slot`, left
    None); `call` the model's own call (labels, input_ids, ...) for the head; `full`: return the whole
    ModelOutput (SplitModel's HF call) instead of the logits (a chain of blocks, a pipeline). A named
    tuple, so that every walker of nested values (mplib.transfer, torch's pytree) reaches its tensors.
    """

    hidden: Tensor  # (B, T, C)
    args: tuple
    kwargs: dict
    call: dict
    slot: int | str | None = None
    cache: CacheRef | None = None
    full: bool = False


class _Reached(Exception):
    """Raised by the first layer's pre-hook: the embeddings are done, here is what the layer was handed."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        self.args, self.kwargs = args, kwargs


_capturing = threading.local()  # only the embeddings block's own call stops at the first layer


def _stop_at_first_layer(module: nn.Module, args: tuple, kwargs: dict) -> None:
    if getattr(_capturing, "on", False):
        raise _Reached(args, kwargs)


class Embed(nn.Module):
    """The model's own forward up to its first layer: embeddings, masks, rotary embeddings, position ids."""

    def __init__(self, model: nn.Module, first: nn.Module, children: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        for name, child in children:
            self.add_module(name, child)
        object.__setattr__(self, "_model", model)  # not a submodule: its layers and head are other blocks'
        object.__setattr__(self, "_first", first)
        self._use_cache = "use_cache" in inspect.signature(type(model).forward).parameters

    def forward(self, *args: Any, **kwargs: Any) -> Carry:
        if len(args) > len(POSITIONAL):
            raise TypeError(f"block 0 of an HF model takes {POSITIONAL} by position and the rest by keyword, "
                            f"got {len(args)} positional inputs")
        kwargs.update(zip(POSITIONAL, args))
        kwargs = {k: v.cache if isinstance(v, CacheRef) else v for k, v in kwargs.items()}
        full = "return_dict" in kwargs  # SplitModel's HF call; a chain of blocks wants logits and no cache
        if not full and self._use_cache:
            kwargs.setdefault("use_cache", False)
        hook = self._first.register_forward_pre_hook(_stop_at_first_layer, with_kwargs=True)
        _capturing.on = True
        try:
            type(self._model).forward(self._model, **kwargs)
        except _Reached as reached:
            return _carry(reached, kwargs, full)
        finally:
            _capturing.on = False
            hook.remove()
        raise RuntimeError(f"{type(self._model).__name__}.forward returned without calling its first layer")


def _carry(reached: _Reached, call: dict, full: bool) -> Carry:
    hidden, *args = reached.args
    kwargs, slot, cache = dict(reached.kwargs), None, None
    for key, value in [*enumerate(args), *kwargs.items()]:
        if is_cache(value):
            slot, cache = key, CacheRef(value)
    if isinstance(slot, int):
        args[slot] = None
    elif slot is not None:
        kwargs[slot] = None
    call = {k: v for k, v in call.items() if not is_cache(v)}
    return Carry(hidden, tuple(args), kwargs, call, slot, cache, full)


def is_cache(value: Any) -> bool:
    """Whether `value` is an HF KV cache (a `transformers.cache_utils.Cache`, e.g. DynamicCache).

    Example:
        mplib.hf.is_cache(DynamicCache())   # True
    """
    from transformers.cache_utils import Cache

    return isinstance(value, Cache)


class Layer(nn.Module):
    """One of the model's own layers, called as the model calls it."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Carry) -> Carry:
        args, kwargs = list(x.args), dict(x.kwargs)
        if x.cache is not None:  # this layer's keys and values land on this stage's device
            if isinstance(x.slot, int):
                args[x.slot] = x.cache.cache
            else:
                kwargs[x.slot] = x.cache.cache
        out = self.layer(x.hidden, *args, **kwargs)
        return x._replace(hidden=out[0] if isinstance(out, tuple) else out)


class Head(nn.Module):
    """The final norm (and pooler), then the model's own forward from its base model's output on."""

    def __init__(self, model: nn.Module, norms: list[tuple[str, nn.Module]], pooler: nn.Module | None,
                 heads: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        for name, child in [*norms, *heads, *([("pooler", pooler)] if pooler is not None else [])]:
            self.add_module(name, child)
        self._norms = [name for name, _ in norms]
        object.__setattr__(self, "_model", model)
        self._output = _base_output_class(model.base_model)

    def forward(self, x: Carry) -> Any:
        hidden = x.hidden
        for name in self._norms:
            hidden = getattr(self, name)(hidden)
        fields = {f.name for f in dataclasses.fields(self._output)}
        parts = {"last_hidden_state": hidden, "pooler_output": self.pooler(hidden) if "pooler" in self._modules
                 else None, "cache": x.cache.cache if x.cache is not None else None}
        base_out = self._output(**{k: v for k, v in parts.items() if k in fields})
        model = self._model
        if model is model.base_model:
            out = base_out
        else:
            call = x.call if x.full else {**x.call, "return_dict": True}
            out = type(model).forward(_Rebased(model, base_out), **call)
        if x.full or "labels" in x.call:
            return out
        return out.logits if "logits" in out else out.last_hidden_state


class _Rebased:
    """The model as its own forward sees it, but its base model answers at once with `out`."""

    def __init__(self, model: nn.Module, out: Any) -> None:
        self.__dict__.update(_model=model, _prefix=model.base_model_prefix, _out=out)

    def __getattr__(self, name: str) -> Any:
        if name == self._prefix:
            return lambda *args, **kwargs: self._out
        return getattr(self._model, name)


def _base_output_class(base: nn.Module) -> type:
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions
    from transformers.utils import ModelOutput

    hint = typing.get_type_hints(type(base).forward).get("return")
    for cls in (*typing.get_args(hint), hint):
        if isinstance(cls, type) and issubclass(cls, ModelOutput):
            return cls
    return BaseModelOutputWithPoolingAndCrossAttentions
