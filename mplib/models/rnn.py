"""Recurrent networks from scratch: RNN, LSTM and GRU cells, stacked layers, a character LM.

Weights are laid out exactly like torch's nn.RNN / nn.LSTM / nn.GRU (same gate order), so
`from_torch` / `to_torch` copy them one to one and both give the same outputs and gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from mplib.memory import SavedBytes
from mplib.models.rnn_cells import (  # noqa: F401  (the cells are part of this module's API)
    CELL_TYPES, CELLS, GRUCell, LSTMCell, RNNCell, State, _check_cell, _check_sizes, _hidden)


@dataclass
class RNNConfig:
    vocab_size: int = 64
    n_embd: int = 16  # embedding size = input size of the first layer
    hidden_size: int = 32
    n_layer: int = 2
    cell: str = "lstm"  # "rnn" | "lstm" | "gru"
    dropout: float = 0.0  # between layers, as in torch (none after the last one)
    bias: bool = True

    def __post_init__(self) -> None:
        _check_sizes(n_embd=self.n_embd, hidden_size=self.hidden_size, n_layer=self.n_layer,
                     vocab_size=self.vocab_size)
        _check_cell(self.cell)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout is a probability in [0, 1), got {self.dropout}; use e.g. 0.1")


CHAR_RNN_TINY = RNNConfig(vocab_size=64, n_embd=16, hidden_size=64, n_layer=1, cell="rnn")
CHAR_LSTM_TINY = RNNConfig(vocab_size=64, n_embd=16, hidden_size=32, n_layer=2, cell="lstm")
CHAR_GRU_TINY = RNNConfig(vocab_size=64, n_embd=16, hidden_size=32, n_layer=2, cell="gru")


# ---------------------------------------------------------------------------------------------
# Layers over time.


class RNN(nn.Module):
    """One recurrent layer over a sequence, batch first: (B, T, C) -> (B, T, H), final state.

    Example:
        layer = RNN(input_size=8, hidden_size=16, cell="gru")
        out, h = layer(torch.randn(4, 10, 8))   # out (4, 10, 16), h (4, 16)
    """

    def __init__(self, input_size: int, hidden_size: int, cell: str = "rnn", bias: bool = True):
        super().__init__()
        _check_cell(cell)
        self.cell_type = cell
        self.cell = CELLS[cell](input_size, hidden_size, bias)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        if x.dim() != 3:
            raise ValueError(f"RNN takes batch-first input (B, T, C), got shape {tuple(x.shape)}")
        B = x.shape[0]
        state = self.cell.zero_state(B, x) if state is None else state
        xi = self.cell.ih(x)  # (B, T, G*H): all input projections in one matmul
        outs = []
        # unbind, not xi[:, t]: the backward of T selects would build T full-size (B, T, G*H) zero
        # gradients (O(T^2) memory traffic); unbind's backward stacks the T step gradients once
        for xi_t in xi.unbind(1):  # backprop through time walks this loop in reverse
            state = self.cell.step(xi_t, state)
            outs.append(_hidden(state))
        return torch.stack(outs, dim=1), state  # (B, T, H)


class StackedLayer(nn.Module):
    """One layer of a stack as a block: sequence in, sequence out (the final state is dropped)."""

    def __init__(self, rnn: RNN, dropout: float = 0.0):
        super().__init__()
        self.rnn = rnn
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C) -> (B, T, H)
        return self.drop(self.rnn(x)[0])


class StackedRNN(nn.Module):
    """`n_layer` recurrent layers, each reading the output sequence of the one below.

    Example:
        stack = StackedRNN(RNNConfig(n_embd=8, hidden_size=16, n_layer=3, cell="lstm"))
        out, states = stack(torch.randn(4, 10, 8))   # out (4, 10, 16); states[i] = (h, c)
    """

    def __init__(self, config: RNNConfig):
        super().__init__()
        self.config = config
        c = config
        self.layers = nn.ModuleList(
            StackedLayer(RNN(c.n_embd if i == 0 else c.hidden_size, c.hidden_size, c.cell, c.bias),
                         dropout=c.dropout if i < c.n_layer - 1 else 0.0)
            for i in range(c.n_layer))

    def forward(self, x: Tensor, states: list[State] | None = None) -> tuple[Tensor, list[State]]:
        new_states = []
        for i, layer in enumerate(self.layers):
            out, state = layer.rnn(x, None if states is None else states[i])
            x = layer.drop(out)  # the same computation as layer(x), keeping the state
            new_states.append(state)
        return x, new_states


class CharRNN(nn.Module):
    """Character language model: embedding -> StackedRNN -> linear head, returns logits (B, T, V).

    Example:
        model = CharRNN(dataclasses.replace(CHAR_LSTM_TINY, vocab_size=tok.vocab_size))
        logits = model(idx)   # idx (B, T) -> (B, T, V)
    """

    def __init__(self, config: RNNConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.rnn = StackedRNN(config)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    def blocks(self) -> list[nn.Module]:
        """embedding, one block per recurrent layer, head; chained they are `forward`."""
        return [self.embed, *self.rnn.layers, self.head]

    def forward(self, idx: Tensor) -> Tensor:
        x = self.embed(idx)  # (B, T, C)
        for layer in self.rnn.layers:
            x = layer(x)  # (B, T, H)
        return self.head(x)  # (B, T, V)

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> Tensor:
        """Continue each row of `idx` (B, T) by sampling; temperature 0 picks the likeliest token.

        The prompt is read once; then each new token costs one step, carrying the states.

        Example:
            g = torch.Generator().manual_seed(0)
            out = model.generate(torch.tensor([tok.encode("the ")]), 50, generator=g)
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}; 0 means greedy")
        if idx.dim() != 2 or idx.size(1) < 1:
            raise ValueError(f"idx must be (B, T) token ids with T >= 1, got shape {tuple(idx.shape)}")
        out, states = self.rnn(self.embed(idx))
        pieces = [idx]
        for _ in range(max_new_tokens):
            logits = self.head(out[:, -1])  # (B, V)
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            pieces.append(nxt)
            out, states = self.rnn(self.embed(nxt), states)
        return torch.cat(pieces, dim=1)


# ---------------------------------------------------------------------------------------------
# Interop with torch's fused modules, and the activation memory a block saves for backward.

TORCH_MODULES = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


def _cell_type(module: nn.RNNBase) -> str:
    for name, cls in TORCH_MODULES.items():
        if type(module) is cls:
            if getattr(module, "nonlinearity", "tanh") != "tanh" or module.bidirectional or \
                    getattr(module, "proj_size", 0):
                raise ValueError("only unidirectional tanh nn.RNN / nn.LSTM (no proj_size) / nn.GRU "
                                 f"have a counterpart here, got {module}")
            return name
    raise TypeError(f"expected torch.nn.RNN, nn.LSTM or nn.GRU, got {type(module).__name__}")


def _our_layers(ours: StackedRNN | RNN) -> list[RNN]:
    if isinstance(ours, StackedRNN):
        return [layer.rnn for layer in ours.layers]
    if isinstance(ours, RNN):
        return [ours]
    raise TypeError(f"expected mplib StackedRNN or RNN, got {type(ours).__name__}")


def _param_pairs(ours: StackedRNN | RNN, theirs: nn.RNNBase) -> Iterator[tuple[Tensor, Tensor]]:
    layers, cell = _our_layers(ours), _cell_type(theirs)
    if (len(layers), layers[0].cell_type, layers[0].cell.hidden_size, theirs.bias) != \
            (theirs.num_layers, cell, theirs.hidden_size, layers[0].cell.ih.bias is not None):
        raise ValueError(f"shapes differ: ours has {len(layers)} {layers[0].cell_type} layer(s) of "
                         f"{layers[0].cell.hidden_size}, torch's is {theirs}; build both from one config")
    for k, layer in enumerate(layers):
        yield layer.cell.ih.weight, getattr(theirs, f"weight_ih_l{k}")
        yield layer.cell.hh.weight, getattr(theirs, f"weight_hh_l{k}")
        if theirs.bias:
            yield layer.cell.ih.bias, getattr(theirs, f"bias_ih_l{k}")
            yield layer.cell.hh.bias, getattr(theirs, f"bias_hh_l{k}")


@torch.no_grad()
def copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """Copy weights between an mplib StackedRNN/RNN and a torch nn.RNN/LSTM/GRU, either way.

    Example:
        copy_weights(torch_lstm, ours)   # now ours(x) equals torch_lstm(x)
        copy_weights(ours, torch_lstm)   # and back
    """
    ours_first = isinstance(src, (StackedRNN, RNN))
    ours, theirs = (src, dst) if ours_first else (dst, src)
    for a, b in _param_pairs(ours, theirs):
        if a.shape != b.shape:
            raise ValueError(f"weight shapes {tuple(a.shape)} and {tuple(b.shape)} differ; "
                             "the input sizes of the two models do not match")
        (b if ours_first else a).copy_(a if ours_first else b)


def from_torch(module: nn.RNNBase) -> StackedRNN:
    """A StackedRNN (batch first) with the weights of a torch nn.RNN/LSTM/GRU.

    Example:
        ours = from_torch(nn.GRU(8, 16, num_layers=2, batch_first=True))
        out, states = ours(x)
    """
    cell = _cell_type(module)
    config = RNNConfig(n_embd=module.input_size, hidden_size=module.hidden_size,
                       n_layer=module.num_layers, cell=cell,
                       dropout=float(module.dropout), bias=module.bias)
    ours = StackedRNN(config)
    copy_weights(module, ours)
    return ours


def to_torch(ours: StackedRNN | RNN) -> nn.RNNBase:
    """A torch nn.RNN/LSTM/GRU (batch_first=True) with the weights of an mplib StackedRNN or RNN.

    Example:
        fused = to_torch(StackedRNN(RNNConfig(n_embd=8, hidden_size=16, n_layer=2, cell="lstm")))
        out, (h_n, c_n) = fused(torch.randn(4, 10, 8))   # out (4, 10, 16)
    """
    layers = _our_layers(ours)
    first = layers[0].cell
    dropout = ours.config.dropout if isinstance(ours, StackedRNN) else 0.0
    theirs = TORCH_MODULES[layers[0].cell_type](
        first.ih.in_features, first.hidden_size, num_layers=len(layers), bias=first.ih.bias is not None,
        batch_first=True, dropout=dropout)
    copy_weights(ours, theirs)
    return theirs


def stack_states(states: list[State]) -> State:
    """Per-layer final states in torch's layout: h_n (L, B, H), or (h_n, c_n) for an LSTM."""
    if isinstance(states[0], tuple):
        return torch.stack([h for h, _ in states]), torch.stack([c for _, c in states])
    return torch.stack(states)


def saved_activation_bytes(module: nn.Module, *inputs) -> int:
    """Bytes of the tensors autograd saves for backward when `module(*inputs)` runs, params excluded.

    Each storage counts once (a slice saved at every time step is the same buffer). This is the
    activation memory a training step holds between forward and backward.

    Example:
        saved_activation_bytes(model.rnn.layers[0], torch.randn(8, 64, 16))  # e.g. 270336
    """
    with torch.enable_grad(), SavedBytes(exclude=module) as saved:
        module(*inputs)
    return saved.bytes
