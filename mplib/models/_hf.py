"""Copying Hugging Face weights into the course's GPT and BERT: the checks both mappings share."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def load_mapped(ours: dict[str, Tensor], theirs: dict[str, Tensor], names: Sequence[tuple[str, str, bool]],
                embedding: str, head: str, model: str, config: str, hf_class: str, n_layer: int) -> None:
    """Copy `theirs[hf_name]` (transposed where flagged) into `ours[name]` for every (name, hf_name, transposed).

    Checks first that the vocabulary sizes agree and that the HF head is tied to the HF `embedding`
    (ours are one Parameter), then names every missing or misshapen tensor with the fix.
    """
    vocab = ours[next(mine for mine, hf, _ in names if hf == embedding)].shape[0]
    wte = theirs.get(embedding)
    if wte is not None and wte.shape[0] != vocab:
        raise ValueError(f"vocabulary mismatch: the HF weights have {wte.shape[0]} tokens but this {model} has "
                         f"vocab_size={vocab}; build it with {config}(vocab_size={wte.shape[0]}, ...) or use "
                         f"{model}.from_hf(hf_model)")
    tied = theirs.get(head)
    if tied is not None and wte is not None and not torch.equal(tied, wte):
        raise ValueError(f"HF {head!r} differs from {embedding!r}, but mplib's {model} ties them (one Parameter); "
                         "build the HF model with tie_word_embeddings=True")
    with torch.no_grad():
        for mine, hf, transpose in names:
            if hf not in theirs:
                raise ValueError(f"HF state dict has no {hf!r} (for {mine!r}); is it a {hf_class} with "
                                 f"{n_layer} layers?")
            value = theirs[hf].t() if transpose else theirs[hf]
            if value.shape != ours[mine].shape:
                raise ValueError(f"HF tensor {hf!r} has shape {tuple(theirs[hf].shape)} but mplib's {mine!r} has "
                                 f"{tuple(ours[mine].shape)}; build the {model} with the HF model's config, e.g. "
                                 f"{model}.from_hf(hf_model)")
            ours[mine].copy_(value)
