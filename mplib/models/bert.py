"""BERT: a bidirectional transformer encoder with a masked-LM head or a classifier, HF weight mapping.

Top to bottom: config, embedding, attention, layer, heads, models, masked-LM batches (HF names: `_bert_hf`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mplib.models import _bert_hf
from mplib.models._bert_hf import hf_names as _hf_names
from mplib.models._hf import load_mapped

Hidden = tuple[Tensor, Tensor]  # between blocks: (hidden (B, T, C), additive attention mask (B, 1, 1, T))


@dataclass
class BERTConfig:
    """Sizes of a BERT. `block_size` (HF: max_position_embeddings) is the longest sequence."""

    vocab_size: int = 30522
    block_size: int = 512
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    intermediate_size: int = 3072
    type_vocab_size: int = 2
    dropout: float = 0.1
    layer_norm_epsilon: float = 1e-12
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.n_head < 1 or self.n_embd % self.n_head:
            raise ValueError(f"n_head {self.n_head} must divide n_embd {self.n_embd} (each head gets "
                             f"n_embd / n_head channels); pick n_head from "
                             f"{[h for h in range(1, self.n_embd + 1) if self.n_embd % h == 0][:8]}...")


BERT_TINY = BERTConfig(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=64, intermediate_size=256,
                       dropout=0.0)
# Devlin et al. 2018, for counting memory.
BERT_BASE = BERTConfig()
BERT_LARGE = BERTConfig(n_layer=24, n_head=16, n_embd=1024, intermediate_size=4096)


class Embedding(nn.Module):
    """Word + position + token-type embeddings, layer-normed; the padding mask made additive."""

    def __init__(self, config: BERTConfig) -> None:
        super().__init__()
        self.block_size = config.block_size
        self.word = nn.Embedding(config.vocab_size, config.n_embd, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.block_size, config.n_embd)
        self.token_type = nn.Embedding(config.type_vocab_size, config.n_embd)
        self.ln = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Hidden:
        B, T = input_ids.shape
        if T > self.block_size:
            raise ValueError(f"a sequence of {T} tokens is longer than the {self.block_size} positions "
                             "(config.block_size); truncate the input or build a larger model")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        pos = torch.arange(T, device=input_ids.device)  # (T,)
        x = self.word(input_ids) + self.position(pos) + self.token_type(token_type_ids)  # (B, T, C)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # 1 = attend, 0 = padding -> 0 or a huge negative number added to the attention scores
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min  # (B, 1, 1, T)
        return self.drop(self.ln(x)), mask


class SelfAttention(nn.Module):
    """Every token attends to every non-padding token (no causal mask)."""

    def __init__(self, config: BERTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.query = nn.Linear(config.n_embd, config.n_embd)
        self.key = nn.Linear(config.n_embd, config.n_embd)
        self.value = nn.Linear(config.n_embd, config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = config.dropout
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = (lin(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
                   for lin in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.drop(self.proj(y))


class Layer(nn.Module):
    """Post-LN transformer layer (as in BERT): x = ln(x + attn(x)), then x = ln(x + mlp(x))."""

    def __init__(self, config: BERTConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(config)
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.fc = nn.Linear(config.n_embd, config.intermediate_size)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def forward(self, x: Hidden) -> Hidden:
        h, mask = x
        h = self.ln_1(h + self.attn(h, mask))
        h = self.ln_2(h + self.drop(self.proj(F.gelu(self.fc(h)))))  # exact (erf) GELU, as in BERT
        return h, mask


class MLMHead(nn.Module):
    """Masked-LM head: dense + GELU + LayerNorm, then the decoder tied to the word embeddings."""

    def __init__(self, config: BERTConfig, word: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(config.n_embd, config.n_embd)
        self.ln = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.decoder = nn.Linear(config.n_embd, config.vocab_size)
        self.decoder.weight = word.weight  # tied: one Parameter in two blocks

    def forward(self, x: Hidden) -> Tensor:
        return self.decoder(self.ln(F.gelu(self.dense(x[0]))))  # (B, T, vocab)


class ClassifierHead(nn.Module):
    """Pooler (dense + tanh on the [CLS] token) and a linear classifier."""

    def __init__(self, config: BERTConfig, num_labels: int) -> None:
        super().__init__()
        self.pooler = nn.Linear(config.n_embd, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.n_embd, num_labels)

    def forward(self, x: Hidden) -> Tensor:
        cls = torch.tanh(self.pooler(x[0][:, 0]))  # (B, C): the first token, [CLS]
        return self.classifier(self.drop(cls))  # (B, num_labels)


class Encoder(nn.Module):
    """Embedding and layers shared by `BERT` and `BertClassifier`; subclasses add `self.head`."""

    def __init__(self, config: BERTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = Embedding(config)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.n_layer))

    def init_weights(self) -> None:
        for m in self.modules():  # BERT's init: N(0, 0.02), zero biases, LayerNorm at identity
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.embed.word.weight[self.config.pad_token_id].zero_()

    def blocks(self) -> list[nn.Module]:
        """[embed, layers.0, ..., head]: chaining them is `forward`."""
        return [self.embed, *self.layers, self.head]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        blocks = self.blocks()
        x = blocks[0](input_ids, attention_mask, token_type_ids)
        for block in blocks[1:]:
            x = block(x)
        return x

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights counted once


class BERT(Encoder):
    """BERT with the masked-LM head; forward returns logits over the vocabulary (B, T, V).

    Example:
        model = BERT(BERT_TINY)
        logits = model(torch.randint(BERT_TINY.vocab_size, (2, 16)))   # (2, 16, 512)
    """

    def __init__(self, config: BERTConfig) -> None:
        super().__init__(config)
        self.head = MLMHead(config, self.embed.word)
        self.init_weights()

    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> "BERT":
        """A BERT with the weights of a `transformers.BertForMaskedLM`.

        Example:
            from transformers import BertConfig, BertForMaskedLM
            bert = BERT.from_hf(BertForMaskedLM(BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2,
                                                           num_attention_heads=2, intermediate_size=128)))
            bert.to_hf()   # and back
        """
        config = BERTConfig(**_bert_hf.config_fields(hf_model.config))
        model = cls(config)
        model.load_hf_state_dict(hf_model.state_dict())
        return model

    def load_hf_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Copy HF `BertForMaskedLM.state_dict()` weights into this model."""
        names = [(mine, theirs, False) for mine, theirs in _hf_names(self.config.n_layer)]
        load_mapped(self.state_dict(), state_dict, names, "bert.embeddings.word_embeddings.weight",
                    "cls.predictions.decoder.weight", "BERT", "BERTConfig", "BertForMaskedLM", self.config.n_layer)

    def to_hf(self) -> nn.Module:
        """This model as a `transformers.BertForMaskedLM` with the same weights."""
        hf = _bert_hf.empty_hf_model(self.config)
        ours, theirs = self.state_dict(), hf.state_dict()
        with torch.no_grad():
            for mine, name in _hf_names(self.config.n_layer):
                theirs[name].copy_(ours[mine])
        return hf.train(self.training)


class BertClassifier(Encoder):
    """BERT's encoder with a pooler and classifier; forward returns (B, num_labels) logits.

    Example:
        clf = BertClassifier.from_pretrained(bert, num_labels=4)   # encoder weights copied
        logits = clf(ids, attention_mask)                           # (B, 4)
    """

    def __init__(self, config: BERTConfig, num_labels: int) -> None:
        super().__init__(config)
        self.head = ClassifierHead(config, num_labels)
        self.init_weights()

    @classmethod
    def from_pretrained(cls, bert: BERT, num_labels: int) -> "BertClassifier":
        """A classifier whose embedding and layers are copies of a pre-trained `bert`'s."""
        model = cls(bert.config, num_labels)
        model.embed = copy.deepcopy(bert.embed)
        model.layers = copy.deepcopy(bert.layers)
        return model


def encode_batch(tokenizer, texts: Sequence[str], max_len: int) -> tuple[Tensor, Tensor]:
    """[CLS] text [SEP] for each text, cut to `max_len` and padded: (ids, attention_mask), both (B, T).

    Example:
        ids, mask = encode_batch(tok, ["the goat ate.", "a tram"], max_len=16)
        logits = model(ids, mask)
    """
    cls, sep, pad = tokenizer.id("[CLS]"), tokenizer.id("[SEP]"), tokenizer.id("[PAD]")
    rows = [[cls, *tokenizer.encode(t)[:max_len - 2], sep] for t in texts]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    return ids, (ids != pad).long()


def mask_tokens(ids: Tensor, mask_id: int, vocab_size: int, special_ids: Sequence[int] = (0, 2, 3),
                prob: float = 0.15, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """BERT's masked-LM corruption: pick `prob` of the non-special tokens; of those, 80% become
    [MASK], 10% a random token, 10% stay. Returns (inputs, labels), labels -100 where not picked.

    Example:
        x, y = mask_tokens(ids, tok.id("[MASK]"), tok.vocab_size, generator=torch.Generator().manual_seed(0))
        loss = mplib.train.lm_loss(model(x, mask), y)
    """
    if not 0 < prob < 1:
        raise ValueError(f"prob must be between 0 and 1 (BERT uses 0.15), got {prob}")
    special = torch.isin(ids, torch.tensor(list(special_ids), dtype=ids.dtype))
    picked = (torch.rand(ids.shape, generator=generator) < prob) & ~special
    labels = ids.masked_fill(~picked, -100)
    roll = torch.rand(ids.shape, generator=generator)
    inputs = ids.masked_fill(picked & (roll < 0.8), mask_id)
    randomize = picked & (roll >= 0.8) & (roll < 0.9)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator)
    inputs = torch.where(randomize, random_ids, inputs)
    return inputs, labels
