"""A split Hugging Face model answers as the model: its call checked, its caches owned, generate, save_pretrained.

`SplitModel` hands its HF model's interface to these functions; `Pipeline` reads `items` and `check_labels`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from torch import Tensor, nn

from mplib.hf import IGNORE, POSITIONAL, CacheRef, is_cache


def call(split_model: Any, args: tuple, kwargs: dict) -> Any:
    """The HF model's forward through the stages: its keyword inputs in, its own ModelOutput out."""
    kwargs = {**dict(zip(POSITIONAL, args)), **kwargs, "return_dict": kwargs.get("return_dict", True)}
    check_call(split_model.hf, kwargs, split_model._owner)
    out = split_model._chain((), {k: CacheRef(v) if is_cache(v) else v for k, v in kwargs.items()})
    cache = getattr(out, "cache", None)
    if is_cache(cache):
        cache._mplib_owner = split_model._owner  # a later call may pass it back
    return out


def generate(split_model: Any, args: tuple, kwargs: dict) -> Any:
    """The HF model's own `generate`, every forward it makes running through the stages."""
    model = split_model.hf
    check_context(model, args, kwargs)

    def through_stages(*a: Any, **k: Any) -> Any:
        out = split_model(*a, **k)
        ids = k.get("input_ids", a[0] if a else None)
        if isinstance(ids, Tensor) and out.logits.device != ids.device:  # generate appends to the prompt's tokens
            out.logits = out.logits.to(ids.device)
        return out

    model.forward = functools.wraps(model.forward)(through_stages)  # generate calls model(...): route it here
    try:
        return model.generate(*args, **kwargs)
    finally:
        del model.forward  # the class's forward again; no reference to the split model stays behind


def save_pretrained(split_model: Any, path: str, kwargs: dict) -> None:
    """HF's own save_pretrained, from the split model's weights gathered on the CPU in the unsplit keys."""
    cpu: dict[int, Tensor] = {}  # a tied tensor stays one tensor
    state = {k: cpu.setdefault(id(v), v.detach().cpu()) for k, v in split_model.state_dict().items()}
    split_model.hf.save_pretrained(path, state_dict=state, **kwargs)


def items(model: nn.Module) -> Callable[[Tensor], int] | None:
    """How many items the model's own loss is a mean over, from its labels; None: the examples.

    A causal LM shifts its labels by one inside the loss, so the first token of each row counts for nothing.

    Example:
        items(gpt2)(labels)   # (labels[:, 1:] != -100).sum()
    """
    kind = getattr(model, "loss_type", None) or type(model).__name__
    if "CausalLM" in kind or "LMHead" in kind:
        return lambda labels: int((labels[..., 1:] != IGNORE).sum())
    if "MaskedLM" in kind or "TokenClassification" in kind:
        return lambda labels: int((labels != IGNORE).sum())
    return None


def check_labels(model: nn.Module, call: dict) -> None:
    """Refuse labels whose shape the model's own loss would not take (or would take wrongly).

    Example:
        check_labels(llama, {"input_ids": ids, "labels": ids[:, 1:]})   # ValueError: labels of shape ... (B, T)
    """
    labels, ids = call.get("labels"), call.get("input_ids", call.get("inputs_embeds"))
    if not isinstance(labels, Tensor) or not isinstance(ids, Tensor):
        return
    B, T = ids.shape[:2]
    name = type(model).__name__
    if items(model) is not None and tuple(labels.shape) != (B, T):
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match input_ids of shape {(B, T)}: "
                         f"{name} wants one label per token, shape (B, T) = {(B, T)}, -100 where no loss is "
                         "wanted (padding); e.g. labels = input_ids.masked_fill(attention_mask == 0, -100)")
    if items(model) is None and tuple(labels.shape) not in _per_example(model, labels, B):
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match a batch of {B} examples: {name} "
                         f"wants one class index per example, shape ({B},) (float labels of shape "
                         f"({B}, {model.config.num_labels}) for multi-label)")


def _per_example(model: nn.Module, labels: Tensor, B: int) -> list[tuple[int, ...]]:
    """The label shapes a classifier's own loss takes: HF picks the loss by num_labels and dtype."""
    n = model.config.num_labels
    if n == 1:  # regression
        return [(B,), (B, 1)]
    return [(B, n)] if labels.is_floating_point() else [(B,)]


def check_call(model: nn.Module, call: dict, owner: object) -> None:
    """Refuse, before anything runs, what a split model cannot answer as the unsplit one would."""
    check_labels(model, call)
    wanted = [k for k in ("output_attentions", "output_hidden_states") if call.get(k)]
    if wanted:
        raise ValueError(f"{', '.join(wanted)}=True is not available on a split model (its layers sit on several "
                         "devices); call the unsplit model for them, or read activations with forward hooks")
    cache = call.get("cache", call.get("past_key_values"))
    if is_cache(cache) and cache.get_seq_length() > 0 and getattr(cache, "_mplib_owner", None) is not owner:
        raise ValueError(f"this cache holds {cache.get_seq_length()} tokens computed by another model or split: "
                         "its keys and values sit on that model's devices; start with cache=None (or an empty "
                         "DynamicCache) and pass on the .cache this split model returns")


def context(model: nn.Module) -> int | None:
    """The number of positions the model was built with (None when its config does not say).

    Example:
        context(gpt2)   # config.n_positions, e.g. 1024
    """
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def check_context(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """generate must stay inside the positions the model was built with."""
    ids = args[0] if args else kwargs.get("input_ids")
    limit = context(model)
    if not isinstance(ids, Tensor) or limit is None:
        return
    config = kwargs.get("generation_config") or model.generation_config
    new = kwargs.get("max_new_tokens", config.max_new_tokens)
    total = ids.shape[-1] + new if new is not None else kwargs.get("max_length", config.max_length)
    if total > limit:
        raise ValueError(f"generate would reach {total} tokens ({ids.shape[-1]} in the prompt), past the "
                         f"{limit} positions of this {type(model).__name__}; ask for at most "
                         f"max_new_tokens={max(limit - ids.shape[-1], 0)}, or shorten the prompt")
