"""Layers split over a tensor-parallel group: column- and row-parallel linears, a vocabulary-parallel
embedding, and the vocabulary-parallel cross-entropy with Megatron-LM's three all-reduces.

How the weights are split (T = 2; A is (in, out) as in the paper, a Linear stores A^T):

    column-parallel  Y = X [A_0 | A_1]      rank i holds the output columns A_i (and b_i): Y_i = X A_i
    row-parallel     Z = [Y_0 | Y_1] [B_0]  rank i holds the input rows B_i: Z = sum_i Y_i B_i (+ b once)
                                     [B_1]
    vocab-parallel   E = [E_0]              rank i holds the embedding rows of tokens [i V/T, (i+1) V/T)
                         [E_1]

A fused weight (GPT-2's c_attn = [q | k | v]) is split per part: rank i takes the i-th slice of
q, of k and of v, so that it holds whole heads of each; `Split.parts` says how many parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mplib.tensor_parallel.group import Group
from mplib.tensor_parallel.mappings import (copy_to_tp, gather_from_sp, gather_from_tp, reduce_from_tp,
                                            reduce_scatter_to_sp)

INPUTS = ("copy", "sequence", "parallel")  # f, the sequence all-gather, or already inside the region
OUTPUTS = ("reduce", "sequence")  # g, or the sequence reduce-scatter


@dataclass(frozen=True)
class Split:
    """How one parameter is split: along `dim`, each of its `parts` fused parts evenly, padded to `padded`."""

    dim: int
    parts: int = 1
    full: int | None = None  # the unsplit size along dim (a padded vocabulary is cut back to it)
    padded: int | None = None

    def shard(self, full: Tensor, rank: int, size: int) -> Tensor:
        """Rank `rank`'s slice of the whole tensor, as a fresh tensor (not a view that keeps the whole alive)."""
        if self.padded is not None and self.padded > full.shape[self.dim]:
            pad = list(full.shape)
            pad[self.dim] = self.padded - full.shape[self.dim]
            full = torch.cat([full, full.new_zeros(pad)], self.dim)
        return torch.cat([part.chunk(size, self.dim)[rank] for part in full.chunk(self.parts, self.dim)],
                         self.dim).clone()

    def unshard(self, shards: Sequence[Tensor]) -> Tensor:
        """The whole tensor from every rank's slice (on the first slice's device): `shard`'s inverse."""
        dev = shards[0].device
        by_part = [s.to(dev).chunk(self.parts, self.dim) for s in shards]
        whole = torch.cat([torch.cat([b[p] for b in by_part], self.dim) for p in range(self.parts)], self.dim)
        return whole if self.full is None else whole.narrow(self.dim, 0, self.full)


def _dense_weight(layer: nn.Module) -> tuple[Tensor, Tensor | None, bool]:
    """(weight, bias, transposed) of an nn.Linear, or of HF's Conv1D, which stores the weight (in, out)."""
    if isinstance(layer, nn.Linear):
        return layer.weight, layer.bias, False
    if type(layer).__name__ == "Conv1D" and hasattr(layer, "nf"):
        return layer.weight, layer.bias, True
    raise TypeError(f"a column- or row-parallel layer is made from an nn.Linear or HF Conv1D, not a "
                    f"{type(layer).__qualname__}")


def _check_mode(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {value!r}")


class _ParallelLinear(nn.Module):
    def __init__(self, weight: Tensor, bias: Tensor | None, transposed: bool, group: Group,
                 splits: dict[str, Split], label: str) -> None:
        super().__init__()
        self.group, self.transposed, self.label, self.splits = group, transposed, label, splits
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)

    def _matmul(self, x: Tensor, bias: Tensor | None) -> Tensor:
        if not self.transposed:
            return F.linear(x, self.weight, bias)
        flat = x.reshape(-1, x.shape[-1])  # HF Conv1D: x @ W (+ b) with W stored (in, out)
        out = flat @ self.weight if bias is None else torch.addmm(bias, flat, self.weight)
        return out.view(*x.shape[:-1], self.weight.shape[1])


class ColumnParallelLinear(_ParallelLinear):
    """Y_i = X A_i + b_i: this rank's slice of the output features.

    `input`: "copy" applies f (identity forward, all-reduce backward), "sequence" all-gathers the
    sequence (sequence parallelism), "parallel" takes an input already inside the region (one f
    shared by the q, k and v projections). `gather_output` all-gathers Y (cut back to `full` when
    the split was padded, as a vocabulary is).

    Example:
        col = ColumnParallelLinear.from_dense(nn.Linear(32, 128), group)   # inside group.run
        y_i = col(x)                                                        # (B, T, 128 / T)
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, group: Group, *, transposed: bool = False,
                 input: str = "copy", gather_output: bool = False, split: Split | None = None,
                 label: str = "") -> None:
        _check_mode(input, INPUTS, "input")
        split = split or Split(dim=1 if transposed else 0)
        splits = {"weight": split} | ({} if bias is None else {"bias": Split(0, split.parts, split.full, split.padded)})
        super().__init__(weight, bias, transposed, group, splits, label)
        self.input, self.gather_output = input, gather_output

    @classmethod
    def from_dense(cls, layer: nn.Module, group: Group, *, parts: int = 1, padded: int | None = None,
                   weight: nn.Parameter | None = None, **kwargs: Any) -> "ColumnParallelLinear":
        """This rank's shard of a whole `layer` (nn.Linear or Conv1D); `weight`: an already split one to share."""
        w, b, transposed = _dense_weight(layer)
        dim = 1 if transposed else 0
        split = Split(dim, parts, w.shape[dim] if padded else None, padded)
        mine = weight if weight is not None else split.shard(w.detach(), group.rank, group.size)
        bias = None if b is None else Split(0, parts, split.full, padded).shard(b.detach(), group.rank, group.size)
        return cls(mine, bias, group, transposed=transposed, split=split, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        if self.input == "copy":
            x = copy_to_tp(x, self.group, self.label)
        elif self.input == "sequence":
            x = gather_from_sp(x, self.group, label=self.label)
        y = self._matmul(x, self.bias)
        if not self.gather_output:
            return y
        y = gather_from_tp(y, self.group, label=self.label)
        full = self.splits["weight"].full
        return y if full is None else y[..., :full]


class RowParallelLinear(_ParallelLinear):
    """Z = sum_i Y_i B_i + b: this rank's slice of the input features; the sum is g (all-reduce), or a
    reduce-scatter over the sequence with `output="sequence"`. The bias is added once, after it.

    Example:
        row = RowParallelLinear.from_dense(nn.Linear(128, 32), group)
        z = row(y_i)                     # y_i (B, T, 128 / T), this rank's slice -> z (B, T, 32) on every rank
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, group: Group, *, transposed: bool = False,
                 output: str = "reduce", label: str = "") -> None:
        _check_mode(output, OUTPUTS, "output")
        super().__init__(weight, bias, transposed, group, {"weight": Split(dim=0 if transposed else 1)}, label)
        self.output = output

    @classmethod
    def from_dense(cls, layer: nn.Module, group: Group, **kwargs: Any) -> "RowParallelLinear":
        w, b, transposed = _dense_weight(layer)
        mine = Split(0 if transposed else 1).shard(w.detach(), group.rank, group.size)
        return cls(mine, None if b is None else b.detach().clone(), group, transposed=transposed, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        partial = self._matmul(x, None)  # this rank's Y_i B_i
        if self.output == "reduce":
            z = reduce_from_tp(partial, self.group, self.label)
        else:
            z = reduce_scatter_to_sp(partial, self.group, label=self.label)
        return z if self.bias is None else z + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + V/T) of the embedding on this rank: a token outside them looks up zeros,
    and g (all-reduce) adds the ranks' lookups, so every token finds its one row.

    Example:
        emb = VocabParallelEmbedding.from_dense(nn.Embedding(512, 32), group)
        x = emb(ids)                                                   # (B, T, 32) on every rank
    """

    def __init__(self, weight: Tensor, group: Group, vocab_size: int, padding_idx: int | None = None,
                 label: str = "") -> None:
        super().__init__()
        self.group, self.vocab_size, self.padding_idx, self.label = group, vocab_size, padding_idx, label
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.per_rank = self.weight.shape[0]
        self.start = group.rank * self.per_rank
        padded = self.per_rank * group.size
        self.splits = {"weight": Split(0, 1, vocab_size if padded > vocab_size else None,
                                       padded if padded > vocab_size else None)}

    @classmethod
    def from_dense(cls, emb: nn.Embedding, group: Group, padded: int | None = None,
                   label: str = "") -> "VocabParallelEmbedding":
        V = emb.weight.shape[0]
        padded = padded or V
        mine = Split(0, 1, V, padded).shard(emb.weight.detach(), group.rank, group.size)
        return cls(mine, group, V, emb.padding_idx, label)

    def forward(self, ids: Tensor) -> Tensor:
        outside = (ids < self.start) | (ids >= self.start + self.per_rank)
        local = (ids - self.start).masked_fill(outside, 0)
        pad = self.padding_idx - self.start if self.padding_idx is not None else None
        pad = pad if pad is not None and 0 <= pad < self.per_rank else None
        rows = F.embedding(local, self.weight, padding_idx=pad)  # (B, T, C)
        rows = rows.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(rows, self.group, self.label)


def vocab_parallel_cross_entropy(logits: Tensor, target: Tensor, group: Group, vocab_size: int | None = None,
                                 ignore_index: int = -100, label: str = "loss") -> Tensor:
    """Mean cross-entropy of logits split over the vocabulary, as `F.cross_entropy(full_logits, target)`.

    `logits` (..., V/T) is this rank's slice (`gather_output=False`); `target` (...) holds token ids
    or `ignore_index`. Three all-reduces of one number per token, never the (..., V) logits
    (Megatron-LM's `_VocabParallelCrossEntropy`): the max (for a stable softmax), the target's
    logit (only its owner has it), and the sum of exponentials. Columns at or past `vocab_size`
    (padding) are left out.

    Example:
        logits_i = ColumnParallelLinear.from_dense(nn.Linear(32, 512), group)(x)   # this rank's 512 / T columns
        loss = vocab_parallel_cross_entropy(logits_i, y, group)                    # on every rank, in group.run
    """
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target has shape {tuple(target.shape)} but the logits {tuple(logits.shape)}; give one "
                         "target per row of logits, e.g. targets (B, T) for logits (B, T, V/T)")
    V = logits.shape[-1] * group.size if vocab_size is None else vocab_size
    per_rank = logits.shape[-1]
    if not per_rank * (group.size - 1) < V <= per_rank * group.size:
        raise ValueError(f"logits hold {per_rank} columns per rank over {group.size} ranks, which cannot be a "
                         f"vocabulary of {V} (padded to a multiple of {group.size}); pass the model's vocab_size "
                         "and this rank's slice of the logits of a model parallelized over this group")
    losses = _VocabParallelCE.apply(logits.reshape(-1, per_rank), target.reshape(-1), group, V, ignore_index, label)
    keep = target.reshape(-1) != ignore_index
    return losses.sum() / keep.sum()  # a mean over the tokens that count; NaN if none does, as F.cross_entropy


class _VocabParallelCE(torch.autograd.Function):
    """Per-token losses; backward is local (softmax minus one-hot on this rank's columns): no collective."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: Tensor, group: Group, V: int, ignore: int, label: str) -> Tensor:
        x = logits.float()
        start = group.rank * x.shape[-1]
        if start + x.shape[-1] > V:  # padded columns: no token lives there
            x = x.clone()
            x[:, max(V - start, 0):] = float("-inf")
        top = group.all_reduce(x.max(dim=-1).values, op="max", label=label)  # 1: the max over every rank
        x = x - top.unsqueeze(-1)
        mine = (target >= start) & (target < start + x.shape[-1])
        local = (target - start).masked_fill(~mine, 0)
        rows = torch.arange(x.shape[0], device=x.device)
        picked = x[rows, local].masked_fill(~mine, 0.0)
        picked = group.all_reduce(picked, label=label)  # 2: the target's logit, from its owner
        exp = x.exp()
        sum_exp = group.all_reduce(exp.sum(dim=-1), label=label)  # 3: the softmax's denominator
        keep = target != ignore
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local, mine & keep, keep)
        ctx.dtype = logits.dtype
        return ((sum_exp.log() - picked) * keep).to(logits.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        softmax, local, mine, keep = ctx.saved_tensors
        rows = torch.arange(softmax.shape[0], device=softmax.device)
        g = softmax.clone()
        g[rows, local] -= mine.to(g.dtype)  # minus the one-hot, on the rank that owns the target
        g *= (grad * keep).unsqueeze(-1)
        return g.to(ctx.dtype), None, None, None, None, None


def is_parallel(module: nn.Module) -> bool:
    return isinstance(module, (_ParallelLinear, VocabParallelEmbedding))
