"""Which module of a model is split how: plans as data for mplib's GPT and BERT, HF GPT-2 and Llama.

A plan maps module names to styles, like torch's `parallelize_module`; `check` validates a model
against T (heads, widths, vocabulary) before a single weight moves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from mplib.tensor_parallel.group import Group
from mplib.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from mplib.tensor_parallel.mappings import copy_to_tp, gather_from_sp
from mplib.tensor_parallel.models import BERTAttention, GPTAttention


@dataclass(frozen=True)
class Column:
    """Split the output features (`parts` fused parts, e.g. 3 for [q | k | v]); `tie`: share that
    vocabulary-parallel embedding's weight (a tied LM head)."""

    parts: int = 1
    input: str = "copy"
    gather_output: bool = False
    padded: int | None = None
    tie: str | None = None

    def build(self, original: nn.Module, replica: nn.Module, group: Group, label: str) -> nn.Module:
        weight = replica.get_submodule(self.tie).weight if self.tie else None
        return ColumnParallelLinear.from_dense(original, group, parts=self.parts, padded=self.padded, weight=weight,
                                               input=self.input, gather_output=self.gather_output, label=label)


@dataclass(frozen=True)
class Row:
    """Split the input features; `output` "reduce" (g) or "sequence" (reduce-scatter)."""

    output: str = "reduce"

    def build(self, original: nn.Module, replica: nn.Module, group: Group, label: str) -> nn.Module:
        return RowParallelLinear.from_dense(original, group, output=self.output, label=label)


@dataclass(frozen=True)
class Vocab:
    """Split an embedding's rows (the vocabulary), padded to `padded` rows."""

    padded: int | None = None

    def build(self, original: nn.Module, replica: nn.Module, group: Group, label: str) -> nn.Module:
        return VocabParallelEmbedding.from_dense(original, group, self.padded, label)


@dataclass(frozen=True)
class Heads:
    """Replace an attention module by `make(original, group, sequence_parallel, label)` (mplib's models)."""

    make: Callable[..., nn.Module]
    sequence_parallel: bool = False

    def build(self, original: nn.Module, replica: nn.Module, group: Group, label: str) -> nn.Module:
        return self.make(original, group, self.sequence_parallel, label)


@dataclass(frozen=True)
class Attrs:
    """Set attributes of the replica's module, e.g. HF GPT-2's num_heads and split_size per rank."""

    values: dict[str, Any] = field(default_factory=dict)

    def build(self, original: nn.Module, replica: nn.Module, group: Group, label: str) -> nn.Module:
        module = replica.get_submodule(label)
        for k, v in self.values.items():
            setattr(module, k, v)
        return module


@dataclass(frozen=True)
class Enter:
    """Apply f (or the sequence all-gather) once to a module's hidden input, for the bare
    (input="parallel") projections inside it: q, k and v, or gate and up, share one."""

    input: str = "copy"

    def build(self, original: nn.Module, replica: nn.Module, group: Group, label: str) -> nn.Module:
        module = replica.get_submodule(label)

        def enter(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            fn = (lambda x: gather_from_sp(x, group, label=label)) if self.input == "sequence" else \
                (lambda x: copy_to_tp(x, group, label))
            return map_hidden(args, kwargs, fn)
        module.register_forward_pre_hook(enter, with_kwargs=True)
        return module


def map_hidden(args: tuple, kwargs: dict, fn: Callable) -> tuple[tuple, dict]:
    """Apply `fn` to a layer's hidden states: the first positional argument (or the first item of
    it, for mplib BERT's (hidden, mask)) or the `hidden_states` keyword."""
    if args:
        first = args[0]
        first = (fn(first[0]), *first[1:]) if isinstance(first, tuple) else fn(first)
        return (first, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}


@dataclass
class Plan:
    """Styles by module name (applied in order), the transformer layers, and what the model is."""

    styles: dict[str, Any]
    layers: list[str]
    kind: str
    vocab: int | None = None
    padded: int | None = None


def _divisible(what: str, value: int, T: int, fix: str) -> None:
    if value % T:
        divisors = [d for d in range(1, value + 1) if value % d == 0]
        raise ValueError(f"{what} {value} is not divisible by T={T}: {fix}; use T in {divisors[:8]} "
                         f"(divisors of {value}) or a model whose {what} is a multiple of {T}")


def _padded(vocab: int, T: int, multiple: int) -> int:
    return math.ceil(vocab / (T * multiple)) * T * multiple


def kind_of(model: nn.Module) -> str | None:
    from mplib.models.bert import Encoder
    from mplib.models.gpt import GPT

    if isinstance(model, GPT):
        return "gpt"
    if isinstance(model, Encoder):
        return "bert"
    config = getattr(model, "config", None)
    mt = getattr(config, "model_type", None)
    if mt == "gpt2" and hasattr(model, "transformer") and hasattr(model, "lm_head"):
        return "hf-gpt2"
    if mt == "llama" and hasattr(model, "model") and hasattr(model, "lm_head"):
        return "hf-llama"
    return None


SUPPORTED = ("mplib.models.gpt.GPT", "mplib.models.bert.BERT / BertClassifier", "transformers GPT2LMHeadModel",
             "transformers LlamaForCausalLM", "any model with plan={name: 'column' | 'row' | 'vocab'}")


def build(model: nn.Module, T: int, sp: bool, gather_output: bool, vocab_multiple: int = 1) -> Plan:
    """The plan for a model this module knows; ValueError/TypeError (rule, values, fix) otherwise."""
    kind = kind_of(model)
    if kind is None:
        raise TypeError(f"tensor_parallel.parallelize does not know a {type(model).__qualname__}: it splits "
                        f"{'; '.join(SUPPORTED)}. For another model pass plan={{'0': 'column', '2': 'row'}} naming "
                        "its Linear layers (a column layer feeding a row layer, as in an MLP)")
    cin, rout = ("sequence", "sequence") if sp else ("copy", "reduce")
    return {"gpt": _gpt, "bert": _bert, "hf-gpt2": _hf_gpt2, "hf-llama": _llama}[kind](
        model, T, sp, gather_output, vocab_multiple, cin, rout)


def _head(styles: dict, vocab: int, padded: int, embed: str, head: str, tied: bool, gather: bool) -> None:
    styles[embed] = Vocab(padded)
    styles[head] = Column(input="copy", gather_output=gather, padded=padded, tie=embed if tied else None)


def _gpt(model, T, sp, gather, multiple, cin, rout) -> Plan:
    c = model.config
    _divisible("n_head", c.n_head, T, "each rank holds whole attention heads")
    V, styles = c.vocab_size, {}
    padded = _padded(V, T, multiple)
    styles["embed.wte"] = Vocab(padded)
    for i in range(c.n_layer):
        styles[f"h.{i}.attn"] = Heads(GPTAttention, sp)
        styles[f"h.{i}.mlp.c_fc"] = Column(input=cin)
        styles[f"h.{i}.mlp.c_proj"] = Row(rout)
    styles["head.lm_head"] = Column(input="copy", gather_output=gather, padded=padded, tie="embed.wte")
    return Plan(styles, [f"h.{i}" for i in range(c.n_layer)], "gpt", V, padded)


def _bert(model, T, sp, gather, multiple, cin, rout) -> Plan:
    c = model.config
    _divisible("n_head", c.n_head, T, "each rank holds whole attention heads")
    _divisible("intermediate_size", c.intermediate_size, T, "each rank holds 1/T of the MLP's hidden units")
    V, styles = c.vocab_size, {}
    padded = _padded(V, T, multiple)
    styles["embed.word"] = Vocab(padded)
    for i in range(c.n_layer):
        styles[f"layers.{i}.attn"] = Heads(BERTAttention, sp)
        styles[f"layers.{i}.fc"] = Column(input=cin)
        styles[f"layers.{i}.proj"] = Row(rout)
    if hasattr(model.head, "decoder"):  # the masked-LM head; a classifier's head stays whole on every rank
        styles["head.decoder"] = Column(input="copy", gather_output=gather, padded=padded, tie="embed.word")
    return Plan(styles, [f"layers.{i}" for i in range(c.n_layer)], "bert", V, padded)


def _hf_gpt2(model, T, sp, gather, multiple, cin, rout) -> Plan:
    c = model.config
    _divisible("n_head", c.n_head, T, "each rank holds whole attention heads")
    inner = c.n_inner or 4 * c.n_embd
    _divisible("n_inner", inner, T, "each rank holds 1/T of the MLP's hidden units")
    if c.add_cross_attention:
        raise ValueError("GPT-2 with cross-attention (add_cross_attention=True) is not split by this plan; "
                         "build it without cross-attention")
    V, styles = c.vocab_size, {}
    padded = _padded(V, T, multiple)
    styles["transformer.wte"] = Vocab(padded)
    for i in range(c.n_layer):
        p = f"transformer.h.{i}"
        styles[f"{p}.attn"] = Attrs({"num_heads": c.n_head // T, "split_size": c.n_embd // T})
        styles[f"{p}.attn.c_attn"] = Column(parts=3, input=cin)  # per head: q, k and v each split
        styles[f"{p}.attn.c_proj"] = Row(rout)
        styles[f"{p}.mlp.c_fc"] = Column(input=cin)
        styles[f"{p}.mlp.c_proj"] = Row(rout)
    tied = model.lm_head.weight is model.transformer.wte.weight
    styles["lm_head"] = Column(input="copy", gather_output=gather, padded=padded, tie="transformer.wte" if tied else None)
    return Plan(styles, [f"transformer.h.{i}" for i in range(c.n_layer)], "hf-gpt2", V, padded)


def _llama(model, T, sp, gather, multiple, cin, rout) -> Plan:
    c = model.config
    _divisible("num_attention_heads", c.num_attention_heads, T, "each rank holds whole query heads")
    _divisible("num_key_value_heads", c.num_key_value_heads, T,
               "grouped-query attention splits the key/value heads too, so that each rank's query heads find "
               "their key/value head on the same rank")
    _divisible("intermediate_size", c.intermediate_size, T, "each rank holds 1/T of the MLP's hidden units")
    V, styles = c.vocab_size, {}
    padded = _padded(V, T, multiple)
    styles["model.embed_tokens"] = Vocab(padded)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        styles[f"{p}.self_attn"] = Enter(cin)
        for proj in ("q_proj", "k_proj", "v_proj"):
            styles[f"{p}.self_attn.{proj}"] = Column(input="parallel")
        styles[f"{p}.self_attn.o_proj"] = Row(rout)
        styles[f"{p}.mlp"] = Enter(cin)
        styles[f"{p}.mlp.gate_proj"] = Column(input="parallel")
        styles[f"{p}.mlp.up_proj"] = Column(input="parallel")
        styles[f"{p}.mlp.down_proj"] = Row(rout)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    styles["lm_head"] = Column(input="copy", gather_output=gather, padded=padded,
                               tie="model.embed_tokens" if tied else None)
    return Plan(styles, [f"model.layers.{i}" for i in range(c.num_hidden_layers)], "hf-llama", V, padded)


def from_user(model: nn.Module, plan: dict[str, Any], T: int) -> Plan:
    """A plan given as {name: "column" | "row" | "vocab" | style}; every name must be a Linear/Embedding."""
    named = {"column": Column(), "row": Row(), "vocab": Vocab()}
    styles = {}
    for name, style in plan.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"plan names {name!r}, which is not a submodule of this {type(model).__qualname__}; "
                             f"its modules are {[n for n, _ in model.named_modules() if n][:12]}...") from None
        style = named.get(style, style) if isinstance(style, str) else style
        if isinstance(style, str) or not hasattr(style, "build"):
            raise ValueError(f"plan[{name!r}] is {style!r}; use 'column', 'row' or 'vocab'")
        want = nn.Embedding if isinstance(style, Vocab) else nn.Linear
        if not isinstance(module, want) and type(module).__name__ != "Conv1D":
            raise TypeError(f"plan[{name!r}] = {type(style).__name__.lower()} needs an {want.__name__}, but {name!r} "
                            f"is a {type(module).__qualname__}")
        rows = module.weight.shape[0] if isinstance(style, Vocab) else None
        if rows is not None and rows % T:
            style = Vocab(_padded(rows, T, 1))
        elif isinstance(style, (Column, Row)):
            w = module.weight
            n = (w.shape[0] if isinstance(style, Column) else w.shape[1]) if isinstance(module, nn.Linear) else \
                (w.shape[1] if isinstance(style, Column) else w.shape[0])
            _divisible(f"{name!r}'s {'output' if isinstance(style, Column) else 'input'} features", n, T,
                       "each rank holds an equal slice")
        styles[name] = style
    return Plan(styles, [], "plan")
