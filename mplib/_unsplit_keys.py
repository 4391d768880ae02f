"""A SplitModel's state_dict in the unsplit model's keys: stage keys mapped by tensor identity, both ways."""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor


def to_unsplit_keys(module: Any, state: dict, prefix: str, local_metadata: Any) -> None:
    """state_dict post-hook: stage keys become the unsplit model's, also inside another module."""
    for alias in module._aliases:  # a second name of a tensor within one stage (HF BERT's decoder.bias)
        state.pop(prefix + alias, None)
    own = {k: state.pop(prefix + k) for k in dict.fromkeys(module._keys.values()) if prefix + k in state}
    for key, own_key in module._keys.items():
        if own_key in own:
            state[prefix + key] = own[own_key]


def from_unsplit_keys(module: Any, state: dict, prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: the unsplit model's keys become the stages' own."""
    for key, own_key in module._keys.items():
        if prefix + key in state:
            value = state.pop(prefix + key)
            state.setdefault(prefix + own_key, value)  # a tied weight: the first of its keys wins
    for alias, own_key in module._aliases.items():  # so that a strict load finds every own key
        if prefix + own_key in state:
            state[prefix + alias] = state[prefix + own_key]


def key_map(source_state: Mapping[str, Tensor],
            own_state: Mapping[str, Tensor]) -> tuple[dict[str, str], dict[str, str]]:
    """Unsplit key -> own key, matched by tensor identity (tied keys map to the one owner key);
    and own aliases: a later own key of a tensor -> its first own key."""
    own_by_id: dict[int, str] = {}
    aliases = {}
    for key, t in own_state.items():
        first = own_by_id.setdefault(id(t), key)
        if first != key:
            aliases[key] = first
    keys = {key: own_by_id[id(t)] for key, t in source_state.items() if id(t) in own_by_id}
    named = {id(t) for t in source_state.values()}
    keys.update({k: k for k, t in own_state.items() if id(t) not in named and k not in aliases})  # unnamed
    return keys, aliases
