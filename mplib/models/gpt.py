"""GPT: a causal transformer decoder (GPT-2 layout), with a KV cache and HF GPT-2 weight mapping.

Read top to bottom: config, attention, MLP, block, embedding, head, model, generation, HF mapping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mplib.models._hf import load_mapped

KVCache = list[tuple[Tensor, Tensor]]  # per layer: keys and values seen so far, each (B, nh, T, hs)


@dataclass
class GPTConfig:
    """Sizes of a GPT. `block_size` (HF: n_positions) is the longest sequence it can read."""

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    bias: bool = True

    def __post_init__(self) -> None:
        if self.n_head < 1 or self.n_embd % self.n_head:
            raise ValueError(f"n_head {self.n_head} must divide n_embd {self.n_embd} (each head gets "
                             f"n_embd / n_head channels); pick n_head from "
                             f"{[h for h in range(1, self.n_embd + 1) if self.n_embd % h == 0][:8]}...")

    @property
    def n_positions(self) -> int:
        return self.block_size


GPT_TINY = GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=32)
# The GPT-2 family (Radford et al. 2019), for counting memory; too big to train in this course.
GPT2_SMALL = GPTConfig(n_layer=12, n_head=12, n_embd=768)
GPT2_MEDIUM = GPTConfig(n_layer=24, n_head=16, n_embd=1024)
GPT2_LARGE = GPTConfig(n_layer=36, n_head=20, n_embd=1280)
GPT2_XL = GPTConfig(n_layer=48, n_head=25, n_embd=1600)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, past: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if past is not None:  # the cache holds keys and values of earlier tokens: only new ones are computed
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, nh, P+T, hs)
        P = k.shape[2] - T
        mask = None
        if P and T > 1:  # new query i sits at position P+i and may see keys 0..P+i
            mask = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(diagonal=P)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=(P == 0 and T > 1),
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN transformer layer: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))[0]
        return x + self.mlp(self.ln_2(x))

    def forward_cached(self, x: Tensor, past: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        a, kv = self.attn(self.ln_1(x), past)
        x = x + a
        return x + self.mlp(self.ln_2(x)), kv


class Embedding(nn.Module):
    """Token embedding + learned position embedding: (B, T) ids -> (B, T, C)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.block_size = config.block_size
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, idx: Tensor, start: int = 0) -> Tensor:
        T = idx.shape[1]
        if start + T > self.block_size:
            raise ValueError(f"a sequence of {start + T} tokens is longer than the context of {self.block_size} "
                             f"positions (config.block_size); crop the input to idx[:, -{self.block_size}:] "
                             "or build the model with a larger block_size")
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        return self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)


class Head(nn.Module):
    """Final layer norm and the language-model head, whose weight is the token embedding's."""

    def __init__(self, config: GPTConfig, wte: nn.Embedding) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = wte.weight  # weight tying: one Parameter in two blocks

    def forward(self, x: Tensor) -> Tensor:
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)


class GPT(nn.Module):
    """A GPT-2-style language model whose forward is the chain of its blocks.

    Example:
        model = GPT(GPT_TINY)
        logits = model(torch.randint(GPT_TINY.vocab_size, (2, 16)))   # (2, 16, 512)
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = Embedding(config)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.head = Head(config, self.embed.wte)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: residual projections scaled down by depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def blocks(self) -> list[nn.Module]:
        """[embed, h.0, ..., h.{n_layer-1}, head]: chaining them is `forward`."""
        return [self.embed, *self.h, self.head]

    def forward(self, idx: Tensor) -> Tensor:
        blocks = self.blocks()
        x = blocks[0](idx)
        for block in blocks[1:]:
            x = block(x)
        return x  # logits (B, T, vocab)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights counted once

    def forward_cached(self, idx: Tensor, cache: KVCache | None) -> tuple[Tensor, KVCache]:
        """Logits of the new tokens `idx`, given keys/values of the tokens before them."""
        start = cache[0][0].shape[2] if cache else 0
        x = self.embed(idx, start)
        new_cache = []
        for i, block in enumerate(self.h):
            x, kv = block.forward_cached(x, cache[i] if cache else None)
            new_cache.append(kv)
        return self.head(x), new_cache

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 use_cache: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """Append `max_new_tokens` sampled tokens to `idx` (B, T); temperature 0 is greedy.

        With `use_cache`, each step feeds only the newest token and reuses the keys and values
        of the earlier ones; the tokens are the same as without the cache.

        Example:
            out = model.generate(torch.zeros(1, 1, dtype=torch.long), 20, temperature=0)
            out.shape   # (1, 21)
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
        cache: KVCache | None = None
        n = self.config.block_size
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = self(idx[:, -n:])
            elif cache is None or cache[0][0].shape[2] + 1 > n:
                logits, cache = self.forward_cached(idx[:, -n:], None)  # (re)fill the cache from the window
            else:
                logits, cache = self.forward_cached(idx[:, -1:], cache)
            idx = torch.cat([idx, _sample(logits[:, -1, :], temperature, top_k, generator)], dim=1)
        return idx

    # HF mapping: HF GPT-2 stores Linear weights as Conv1D, i.e. transposed (in, out).

    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> "GPT":
        """A GPT with the weights of a `transformers.GPT2LMHeadModel`.

        Example:
            from transformers import GPT2Config, GPT2LMHeadModel
            gpt = GPT.from_hf(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2)))
            gpt.to_hf()   # and back
        """
        c = hf_model.config
        if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"HF activation_function {c.activation_function!r} differs from GPT-2's tanh GELU "
                             "(gelu_new) that mplib's GPT uses; build the HF model with the default")
        if c.scale_attn_by_inverse_layer_idx or c.reorder_and_upcast_attn or not c.scale_attn_weights:
            raise ValueError("mplib's GPT scales attention by 1/sqrt(head size) only; build the HF model with "
                             "scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, "
                             "reorder_and_upcast_attn=False (the defaults)")
        config = GPTConfig(vocab_size=c.vocab_size, block_size=c.n_positions, n_layer=c.n_layer,
                           n_head=c.n_head, n_embd=c.n_embd, dropout=c.resid_pdrop,
                           layer_norm_epsilon=c.layer_norm_epsilon)
        model = cls(config)
        model.load_hf_state_dict(hf_model.state_dict())
        return model

    def load_hf_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Copy HF GPT-2 weights (`GPT2LMHeadModel.state_dict()`) into this model."""
        load_mapped(self.state_dict(), state_dict, _hf_names(self.config.n_layer), "transformer.wte.weight",
                    "lm_head.weight", "GPT", "GPTConfig", "GPT2LMHeadModel", self.config.n_layer)

    def to_hf(self) -> nn.Module:
        """This model as a `transformers.GPT2LMHeadModel` with the same weights."""
        from transformers import GPT2Config, GPT2LMHeadModel

        c = self.config
        if not c.bias:
            raise ValueError("HF GPT-2 has biases in every Linear and LayerNorm; only a GPT with bias=True maps to it")
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_layer=c.n_layer,
                                        n_head=c.n_head, n_embd=c.n_embd, resid_pdrop=c.dropout,
                                        embd_pdrop=c.dropout, attn_pdrop=c.dropout,
                                        layer_norm_epsilon=c.layer_norm_epsilon,
                                        bos_token_id=None, eos_token_id=None))
        ours = self.state_dict()
        theirs = hf.state_dict()
        with torch.no_grad():
            for mine, name, transpose in _hf_names(c.n_layer):
                theirs[name].copy_(ours[mine].t() if transpose else ours[mine])
        return hf.train(self.training)


def _sample(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """One next token per row of `logits` (B, vocab) -> (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)


def _hf_names(n_layer: int) -> list[tuple[str, str, bool]]:
    """(mplib name, HF name, transposed?) for every tensor; lm_head is tied to wte in both."""
    names = [("embed.wte.weight", "transformer.wte.weight", False),
             ("embed.wpe.weight", "transformer.wpe.weight", False)]
    for i in range(n_layer):
        for part in ("ln_1", "ln_2"):
            names += [(f"h.{i}.{part}.{w}", f"transformer.h.{i}.{part}.{w}", False) for w in ("weight", "bias")]
        for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            names += [(f"h.{i}.{part}.weight", f"transformer.h.{i}.{part}.weight", True),
                      (f"h.{i}.{part}.bias", f"transformer.h.{i}.{part}.bias", False)]
    names += [("head.ln_f.weight", "transformer.ln_f.weight", False),
              ("head.ln_f.bias", "transformer.ln_f.bias", False)]
    return names
