"""RNN, LSTM and GRU cells from scratch: one time step each, weights laid out as in torch's fused modules."""

from __future__ import annotations

import torch
from torch import Tensor, nn

State = Tensor | tuple[Tensor, Tensor]  # h for RNN and GRU, (h, c) for LSTM
CELL_TYPES = ("rnn", "lstm", "gru")


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}; e.g. {name}=32")


def _check_cell(cell: str) -> None:
    if cell not in CELL_TYPES:
        raise ValueError(f"unknown cell {cell!r}; use one of {CELL_TYPES}")


# ---------------------------------------------------------------------------------------------
# Cells: one time step. Each has an input projection `ih` and a recurrent projection `hh`.
# `forward(x, state)` is `step(ih(x), state)`: the RNN layer below projects all T inputs at
# once (they do not depend on the recurrence) and only calls `step` sequentially.


class RNNCell(nn.Module):
    """Elman cell: h' = tanh(W_ih x + b_ih + W_hh h + b_hh)."""

    gates = 1  # how many H-sized slices ih and hh produce

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True):
        super().__init__()
        _check_sizes(input_size=input_size, hidden_size=hidden_size)
        self.hidden_size = hidden_size
        self.ih = nn.Linear(input_size, self.gates * hidden_size, bias=bias)
        self.hh = nn.Linear(hidden_size, self.gates * hidden_size, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # torch's recurrent init: every weight and bias uniform in +-1/sqrt(H)
        bound = self.hidden_size ** -0.5
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def zero_state(self, batch: int, like: Tensor) -> State:
        return like.new_zeros(batch, self.hidden_size)

    def step(self, xi: Tensor, h: Tensor) -> Tensor:  # xi = ih(x): (B, H)
        return torch.tanh(xi + self.hh(h))

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return self.step(self.ih(x), h)


class LSTMCell(RNNCell):
    """LSTM cell; gates in torch's order i, f, g, o. The cell state c carries memory additively."""

    gates = 4

    def zero_state(self, batch: int, like: Tensor) -> State:
        return like.new_zeros(batch, self.hidden_size), like.new_zeros(batch, self.hidden_size)

    def step(self, xi: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        h, c = state
        i, f, g, o = (xi + self.hh(h)).chunk(4, dim=-1)  # 4 x (B, H)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


class GRUCell(RNNCell):
    """GRU cell; gates in torch's order r, z, n. The reset gate r scales the recurrent part of n."""

    gates = 3

    def step(self, xi: Tensor, h: Tensor) -> Tensor:
        xr, xz, xn = xi.chunk(3, dim=-1)  # 3 x (B, H)
        hr, hz, hn = self.hh(h).chunk(3, dim=-1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h


CELLS = {"rnn": RNNCell, "lstm": LSTMCell, "gru": GRUCell}


def _hidden(state: State) -> Tensor:
    return state[0] if isinstance(state, tuple) else state
