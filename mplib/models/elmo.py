"""ELMo (Peters et al. 2018) at small scale: a bidirectional LSTM language model over a char-CNN
token encoder, and a scalar mix of its layers that gives each word a vector that depends on context.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import mplib.data
from mplib.models._elmo_inputs import (BOS_CHAR, BOW, EOS_CHAR, EOW, N_CHARS, PAD_CHAR, WordVocab,  # noqa: F401
                                       batch_to_ids, sentence_batches, tokenize)
from mplib.train import lm_loss

# Top to bottom: words -> character ids (mplib.models._elmo_inputs) -> TokenEncoder (char-CNN,
# highway, projection) -> BiLSTMLayer x n_layer (forward LSTM on the sequence, backward LSTM on it
# reversed) -> LMHead (one softmax shared by both directions). `ELMo.representations` stops before
# the head and returns every layer; `ScalarMix` collapses them into one vector per token.

Layers = tuple[tuple[Tensor, ...], Tensor]  # (every layer so far, each (B, T, 2C); token mask (B, T))

# ---------------------------------------------------------------------------------------------
# Config


@dataclass
class ELMoConfig:
    vocab_size: int = 512  # words in the softmax (WordVocab size)
    max_chars: int = 16  # characters per token, begin/end-of-word markers included
    char_embd: int = 16
    filters: tuple[tuple[int, int], ...] = ((1, 16), (2, 16), (3, 32), (4, 32), (5, 32))  # (width, channels)
    n_highway: int = 1
    n_embd: int = 64  # C: token vector size = LSTM input and (projected) output size
    hidden_size: int = 64  # LSTM cells per direction; if > C, projected down to C (ELMo: 4096 -> 512)
    n_layer: int = 2
    dropout: float = 0.0  # on the input of every biLSTM layer

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_chars", "char_embd", "n_embd", "hidden_size", "n_layer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.n_highway, bool) or not isinstance(self.n_highway, int) or self.n_highway < 0:
            raise ValueError(f"n_highway must be an int >= 0, got {self.n_highway!r}; use e.g. 1")
        self.filters = tuple(tuple(f) for f in self.filters)
        if not self.filters or any(len(f) != 2 or min(f) < 1 for f in self.filters):
            raise ValueError(f"filters must be a non-empty list of (width, channels) pairs, got {self.filters}")
        widest = max(w for w, _ in self.filters)
        if widest > self.max_chars:
            raise ValueError(f"filter width {widest} exceeds max_chars={self.max_chars}: it would not fit one "
                             f"token; use widths <= {self.max_chars} or a larger max_chars")
        if self.hidden_size < self.n_embd:
            raise ValueError(f"hidden_size {self.hidden_size} must be >= n_embd {self.n_embd}: the LSTM projects "
                             "its cells down to n_embd (torch's proj_size < hidden_size)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout is a probability in [0, 1), got {self.dropout}; use e.g. 0.1")


ELMO_TINY = ELMoConfig()


# ---------------------------------------------------------------------------------------------
# Token encoder: context-free, one vector per token from its characters alone.


class Highway(nn.Module):
    """y = g * x + (1 - g) * relu(W x), with a gate g = sigmoid(W_g x) that starts biased to carry x."""

    def __init__(self, size: int):
        super().__init__()
        self.proj = nn.Linear(size, 2 * size)
        nn.init.constant_(self.proj.bias[size:], 1.0)  # gate bias > 0: near-identity at the start

    def forward(self, x: Tensor) -> Tensor:
        h, g = self.proj(x).chunk(2, dim=-1)
        g = torch.sigmoid(g)
        return g * x + (1 - g) * torch.relu(h)


class TokenEncoder(nn.Module):
    """Block 0: character ids (B, T, max_chars) -> token layer, each token from its characters only."""

    def __init__(self, config: ELMoConfig):
        super().__init__()
        self.max_chars = config.max_chars
        self.char_embedding = nn.Embedding(N_CHARS, config.char_embd, padding_idx=PAD_CHAR)
        self.convs = nn.ModuleList(nn.Conv1d(config.char_embd, c, kernel_size=w) for w, c in config.filters)
        width = sum(c for _, c in config.filters)
        self.highways = nn.ModuleList(Highway(width) for _ in range(config.n_highway))
        self.proj = nn.Linear(width, config.n_embd)

    def forward(self, char_ids: Tensor) -> Layers:
        if char_ids.dim() != 3 or char_ids.size(-1) != self.max_chars:
            raise ValueError(f"char_ids must be (B, T, max_chars={self.max_chars}), got {tuple(char_ids.shape)}; "
                             f"make them with batch_to_ids(sentences, max_chars={self.max_chars})")
        B, T, L = char_ids.shape
        mask = char_ids.ne(PAD_CHAR).any(-1)  # (B, T): False on padding tokens
        e = self.char_embedding(char_ids.reshape(B * T, L)).transpose(1, 2)  # (B*T, E, L): Conv1d layout
        x = torch.cat([torch.relu(conv(e)).amax(-1) for conv in self.convs], dim=-1)  # (B*T, width)
        for highway in self.highways:
            x = highway(x)
        x = self.proj(x).view(B, T, -1)  # (B, T, C)
        # Both directions start from the same token vector: the layer is [x, x], (B, T, 2C).
        return (torch.cat([x, x], dim=-1),), mask


# ---------------------------------------------------------------------------------------------
# biLM layers and head.


def reverse_padded(x: Tensor, mask: Tensor) -> Tensor:
    """Reverse each sequence of x (B, T, ...) within its own length, leaving the padding at the end.

    Example:
        reverse_padded(torch.tensor([[1, 2, 3, 0]]), torch.tensor([[1, 1, 1, 0]]).bool())  # [[3, 2, 1, 0]]
    """
    T = x.size(1)
    lengths = mask.sum(1, keepdim=True)  # (B, 1)
    t = torch.arange(T, device=x.device).expand(x.size(0), T)  # (B, T)
    index = torch.where(t < lengths, lengths - 1 - t, t)  # its own inverse
    return x.gather(1, index.view(*index.shape, *[1] * (x.dim() - 2)).expand_as(x))


class BiLSTMLayer(nn.Module):
    """One biLM layer: a forward LSTM reads tokens left to right, a separate backward LSTM right to left.

    Takes and returns (layers, mask); appends this layer's output [h_forward, h_backward] (B, T, 2C).
    From the second layer on, each direction adds its input to its output (a residual connection).
    """

    def __init__(self, config: ELMoConfig, residual: bool):
        super().__init__()
        C, H = config.n_embd, config.hidden_size
        self.residual = residual
        self.dropout = nn.Dropout(config.dropout)
        self.forward_lstm = nn.LSTM(C, H, batch_first=True, proj_size=C if H > C else 0)
        self.backward_lstm = nn.LSTM(C, H, batch_first=True, proj_size=C if H > C else 0)

    def forward(self, inputs: Layers) -> Layers:
        layers, mask = inputs
        x_fwd, x_bwd = self.dropout(layers[-1]).chunk(2, dim=-1)  # (B, T, C) each
        h_fwd, _ = self.forward_lstm(x_fwd)  # position t has read tokens 0..t
        h_bwd, _ = self.backward_lstm(reverse_padded(x_bwd, mask))
        h_bwd = reverse_padded(h_bwd, mask)  # position t has read tokens t..end
        if self.residual:
            h_fwd, h_bwd = h_fwd + x_fwd, h_bwd + x_bwd
        return (*layers, torch.cat([h_fwd, h_bwd], dim=-1)), mask


class LMHead(nn.Module):
    """Last block: one softmax layer shared by both directions -> (forward_logits, backward_logits)."""

    def __init__(self, config: ELMoConfig):
        super().__init__()
        self.softmax = nn.Linear(config.n_embd, config.vocab_size)

    def forward(self, inputs: Layers) -> tuple[Tensor, Tensor]:
        layers, _ = inputs
        h_fwd, h_bwd = layers[-1].chunk(2, dim=-1)
        return self.softmax(h_fwd), self.softmax(h_bwd)  # (B, T, V) each


class ELMo(nn.Module):
    """The biLM: token encoder, n_layer biLSTM layers, shared softmax. forward -> (fwd, bwd) logits.

    Example:
        model = ELMo(ELMO_TINY)
        fwd, bwd = model(batch_to_ids(["the bat flew"]))   # (1, 5, 512) each
    """

    def __init__(self, config: ELMoConfig = ELMO_TINY):
        super().__init__()
        self.config = config
        self.encoder = TokenEncoder(config)
        self.layers = nn.ModuleList(BiLSTMLayer(config, residual=i > 0) for i in range(config.n_layer))
        self.head = LMHead(config)

    def blocks(self) -> list[nn.Module]:
        """Token encoder, one block per biLSTM layer, head; chained they are `forward` (contract 1)."""
        return [self.encoder, *self.layers, self.head]

    def forward(self, char_ids: Tensor) -> tuple[Tensor, Tensor]:
        x = self.encoder(char_ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)

    def representations(self, char_ids: Tensor) -> tuple[Tensor, Tensor]:
        """All layers (B, n_layer + 1, T, 2C), token layer first, and the token mask (B, T).

        Example:
            reps, mask = model.representations(batch_to_ids(["the bat flew"]))
            reps[:, 0]   # context-free token layer; reps[:, 1:] the biLSTM layers
        """
        x = self.encoder(char_ids)
        for layer in self.layers:
            x = layer(x)
        layers, mask = x
        return torch.stack(layers, dim=1), mask


def load_pretrained(path: str | Path | None = None) -> tuple[ELMo, WordVocab]:
    """The biLM written by scripts/pretrain_elmo.py (default data/checkpoints/elmo_tiny.pt) and its vocab.

    Example:
        model, vocab = load_pretrained()
        reps, mask = model.eval().representations(batch_to_ids(["the bat flew"]))
    """
    path = Path(path) if path is not None else mplib.data.DATA / "checkpoints" / "elmo_tiny.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no ELMo checkpoint at {path}; write it with python scripts/pretrain_elmo.py")
    checkpoint = torch.load(path, map_location="cpu")
    model = ELMo(ELMoConfig(**checkpoint["config"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model, WordVocab(checkpoint["vocab"])


def bilm_loss(logits: tuple[Tensor, Tensor], word_ids: Tensor) -> Tensor:
    """Mean of the forward LM loss (position t predicts word t+1) and the backward one (t predicts t-1).

    Example:
        loss = bilm_loss(model(batch_to_ids(sents)), vocab.encode_batch(sents))
        loss.backward()
    """
    fwd, bwd = logits
    if fwd.shape[:2] != word_ids.shape:
        raise ValueError(f"logits {tuple(fwd.shape)} and word_ids {tuple(word_ids.shape)} must share (B, T); "
                         "build both from the same sentences (batch_to_ids and WordVocab.encode_batch)")
    # Backward targets: position t predicts word t-1, but only where t is a real token; the first
    # padding position would otherwise learn to predict </s> from a state that read the padding.
    bwd_targets = word_ids[:, :-1].masked_fill(word_ids[:, 1:].eq(-100), -100)
    return (lm_loss(fwd[:, :-1], word_ids[:, 1:]) + lm_loss(bwd[:, 1:], bwd_targets)) / 2


class ScalarMix(nn.Module):
    """ELMo's task-specific combination of layers: gamma * sum_j softmax(w)_j * layer_j.

    Example:
        mix = ScalarMix(3)
        vectors = mix(reps)   # reps (B, 3, T, D) -> (B, T, D); mix.weights sums to 1
    """

    def __init__(self, n_layers: int):
        super().__init__()
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"n_layers must be a positive int, got {n_layers!r}; use config.n_layer + 1")
        self.scalars = nn.Parameter(torch.zeros(n_layers))  # all zero: equal weights at the start
        self.gamma = nn.Parameter(torch.ones(()))

    @property
    def weights(self) -> Tensor:
        return torch.softmax(self.scalars, dim=0)

    def forward(self, layers: Tensor) -> Tensor:
        if layers.dim() < 2 or layers.size(1) != self.scalars.numel():
            raise ValueError(f"layers must be (B, {self.scalars.numel()}, ...), got {tuple(layers.shape)}; "
                             "pass the output of ELMo.representations")
        w = self.weights.view(1, -1, *[1] * (layers.dim() - 2))  # broadcast over (B, L, T, D)
        return self.gamma * (w * layers).sum(1)
