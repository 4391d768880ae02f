"""Decomposition: a Linear layer as two thinner ones, W ~ (U_r sqrt(S_r)) (sqrt(S_r) Vh_r), by SVD.

The rank r is the fewest singular values that keep `energy` of sum(S^2) (the squared Frobenius
norm of W): at energy 1 the factorization is exact. It pays when r (in + out) < in * out.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class LowRankLinear(nn.Module):
    """y = second(first(x)): `first` maps in -> rank (no bias), `second` rank -> out (the bias).

    Example:
        low = LowRankLinear(64, 32, rank=8)
        low(torch.randn(4, 64)).shape   # (4, 32)
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    @property
    def rank(self) -> int:
        return self.first.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))


def rank_for_energy(singular_values: Tensor, energy: float) -> int:
    """The smallest r whose top-r singular values keep `energy` of sum(S^2).

    Example:
        rank_for_energy(torch.tensor([3.0, 1.0]), 0.9)   # 1
        # the top value keeps 9 of sum(S^2) = 10
    """
    if not 0 < energy <= 1:
        raise ValueError(f"energy is the share of sum(S^2) to keep, in (0, 1], got {energy}")
    power = singular_values.double() ** 2
    kept = power.cumsum(0) / power.sum()
    return min(int((kept < energy - 1e-12).sum()) + 1, len(singular_values))


def factorize(linear: nn.Linear, rank: int | None = None, energy: float = 0.9) -> LowRankLinear:
    """`linear` as a LowRankLinear of `rank`, or of the rank that keeps `energy` (when rank is None).

    Example:
        low = factorize(nn.Linear(64, 32), rank=8)
        low.rank, sum(p.numel() for p in low.parameters())   # (8, 800)
        # 64 * 8 + 8 * 32 + 32 (bias) parameters, against 64 * 32 + 32 = 2080
    """
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"factorize takes an nn.Linear, got {type(linear).__name__}")
    out_f, in_f = linear.weight.shape
    full = min(out_f, in_f)
    W = linear.weight.detach().double()  # in float64: the full-rank product is the weight to ~1e-15
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # (out, k), (k,), (k, in)
    if rank is None:
        rank = rank_for_energy(S, energy)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise ValueError(f"rank {rank!r} is not possible for a {out_f} x {in_f} weight: its rank is at most "
                         f"min({out_f}, {in_f}) = {full}; pick a rank from 1 to {full}, or pass energy= instead")
    root = S[:rank].sqrt()
    low = LowRankLinear(in_f, out_f, rank, bias=linear.bias is not None).to(linear.weight.device)
    with torch.no_grad():
        low.first.weight.copy_(root[:, None] * Vh[:rank])  # (r, in)
        low.second.weight.copy_(U[:, :rank] * root)  # (out, r)
        if linear.bias is not None:
            low.second.bias.copy_(linear.bias)
    return low.to(linear.weight.dtype)


def factorize_model(model: nn.Module, energy: float = 0.9, skip: tuple[str, ...] = ()) -> dict[str, int]:
    """Replace, in place, every Linear whose factorization at `energy` has fewer parameters.

    `skip`: name prefixes to leave alone (e.g. a classifier). Returns {module name: rank} of those replaced.

    Example:
        ranks = factorize_model(model, energy=0.9, skip=("head",))
    """
    done = {}
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or any(name.startswith(s) for s in skip):
            continue
        low = factorize(mod, energy=energy)
        out_f, in_f = mod.weight.shape
        if low.rank * (in_f + out_f) < in_f * out_f:
            model.set_submodule(name, low)
            done[name] = low.rank
    return done


def parameters(model: Any) -> int:
    """Parameters of a model, each tensor once.

    Example:
        parameters(nn.Linear(64, 32))   # 2080
    """
    return sum(p.numel() for p in model.parameters())
