"""BERT <-> `transformers.BertForMaskedLM`: the configs and the HF name of every tensor."""

from __future__ import annotations

from typing import Any

from torch import nn


def config_fields(c: Any) -> dict[str, Any]:
    """The `BERTConfig` fields of an HF `BertConfig`; refuses what mplib's BERT does not compute."""
    positions = getattr(c, "position_embedding_type", "absolute")
    if c.hidden_act != "gelu" or positions != "absolute":
        raise ValueError(f"mplib's BERT uses the exact GELU and absolute positions; this HF model has "
                         f"hidden_act={c.hidden_act!r}, position_embedding_type={positions!r}; build it with "
                         "the defaults ('gelu', 'absolute')")
    return dict(vocab_size=c.vocab_size, block_size=c.max_position_embeddings, n_layer=c.num_hidden_layers,
                n_head=c.num_attention_heads, n_embd=c.hidden_size, intermediate_size=c.intermediate_size,
                type_vocab_size=c.type_vocab_size, dropout=c.hidden_dropout_prob,
                layer_norm_epsilon=c.layer_norm_eps, pad_token_id=c.pad_token_id)


def empty_hf_model(c: Any) -> nn.Module:
    """A freshly initialized `BertForMaskedLM` of the sizes of `c` (a `BERTConfig`)."""
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(vocab_size=c.vocab_size, max_position_embeddings=c.block_size,
                                      num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                                      hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
                                      type_vocab_size=c.type_vocab_size, hidden_dropout_prob=c.dropout,
                                      attention_probs_dropout_prob=c.dropout, layer_norm_eps=c.layer_norm_epsilon,
                                      pad_token_id=c.pad_token_id))


def hf_names(n_layer: int) -> list[tuple[str, str]]:
    """(mplib name, HF BertForMaskedLM name) for every tensor; the decoder weight is tied to `word`."""
    e = "bert.embeddings."
    names = [("embed.word.weight", e + "word_embeddings.weight"),
             ("embed.position.weight", e + "position_embeddings.weight"),
             ("embed.token_type.weight", e + "token_type_embeddings.weight"),
             ("embed.ln.weight", e + "LayerNorm.weight"), ("embed.ln.bias", e + "LayerNorm.bias")]
    parts = {"attn.query": "attention.self.query", "attn.key": "attention.self.key",
             "attn.value": "attention.self.value", "attn.proj": "attention.output.dense",
             "ln_1": "attention.output.LayerNorm", "fc": "intermediate.dense", "proj": "output.dense",
             "ln_2": "output.LayerNorm"}
    for i in range(n_layer):
        for mine, theirs in parts.items():
            names += [(f"layers.{i}.{mine}.{w}", f"bert.encoder.layer.{i}.{theirs}.{w}") for w in ("weight", "bias")]
    p = "cls.predictions."
    names += [("head.dense.weight", p + "transform.dense.weight"), ("head.dense.bias", p + "transform.dense.bias"),
              ("head.ln.weight", p + "transform.LayerNorm.weight"), ("head.ln.bias", p + "transform.LayerNorm.bias"),
              ("head.decoder.bias", p + "bias")]
    return names
