"""Attention of mplib's GPT and BERT with this rank's heads: the same code as theirs, on n_head / T heads.

Their attention reads the width from its input (C = x.shape[-1]), which under tensor parallelism
is the whole model width while the projections hold 1/T of it, so they are rewritten here (the
HF models keep their own attention: they read the head count from attributes we set).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mplib.tensor_parallel.group import Group
from mplib.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear


class GPTAttention(nn.Module):
    """`mplib.models.gpt.CausalSelfAttention` on heads [r nh/T, (r+1) nh/T): c_attn split per head, c_proj by rows."""

    def __init__(self, attn: nn.Module, group: Group, sequence_parallel: bool = False, label: str = "") -> None:
        super().__init__()
        self.n_head = attn.n_head // group.size
        self.c_attn = ColumnParallelLinear.from_dense(attn.c_attn, group, parts=3, label=label,
                                                      input="sequence" if sequence_parallel else "copy")
        self.c_proj = RowParallelLinear.from_dense(attn.c_proj, group, label=label,
                                                   output="sequence" if sequence_parallel else "reduce")
        self.attn_dropout = attn.attn_dropout
        self.resid_dropout = copy.deepcopy(attn.resid_dropout)

    def forward(self, x: Tensor, past: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        qkv = self.c_attn(x)  # (B, T, 3C/T): this rank's q, k and v heads (the whole sequence)
        B, T, _ = qkv.shape
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in qkv.chunk(3, dim=2))  # (B, nh/T, T, hs)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, nh/T, P+T, hs)
        P = k.shape[2] - T
        mask = None
        if P and T > 1:
            mask = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(diagonal=P)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=(P == 0 and T > 1),
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, C/T): this rank's heads side by side
        return self.resid_dropout(self.c_proj(y)), (k, v)


class BERTAttention(nn.Module):
    """`mplib.models.bert.SelfAttention` on this rank's heads: one f (or all-gather) feeds q, k and v."""

    def __init__(self, attn: nn.Module, group: Group, sequence_parallel: bool = False, label: str = "") -> None:
        super().__init__()
        self.group, self.sequence_parallel, self.label = group, sequence_parallel, label
        self.n_head = attn.n_head // group.size
        for name in ("query", "key", "value"):
            setattr(self, name, ColumnParallelLinear.from_dense(getattr(attn, name), group, input="parallel",
                                                                label=label))
        self.proj = RowParallelLinear.from_dense(attn.proj, group, label=label,
                                                 output="sequence" if sequence_parallel else "reduce")
        self.attn_dropout = attn.attn_dropout
        self.drop = copy.deepcopy(attn.drop)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        from mplib.tensor_parallel.mappings import copy_to_tp, gather_from_sp

        x = gather_from_sp(x, self.group, label=self.label) if self.sequence_parallel else \
            copy_to_tp(x, self.group, self.label)  # (B, T, C) on every rank
        B, T, _ = x.shape
        q, k, v = (lin(x).view(B, T, self.n_head, -1).transpose(1, 2)  # (B, nh/T, T, hs)
                   for lin in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, C/T)
        return self.drop(self.proj(y))
