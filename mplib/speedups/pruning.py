"""Pruning, for comparison: whole attention heads removed (smaller matmuls), or the smallest weights zeroed.

Removing heads shrinks the query/key/value rows and the output projection's columns (Michel et
al. 2019), so the layer really runs faster. Magnitude pruning (`torch.nn.utils.prune`) keeps the
shapes: a dense kernel multiplies the zeros all the same, so it saves nothing without sparse kernels.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import prune

from mplib.models.bert import SelfAttention


class PrunedSelfAttention(nn.Module):
    """BERT self-attention with some heads removed: `n_head` heads of `head_size` channels each.

    Example:
        layer = model.layers[0]                                  # 4 heads of 8 channels
        layer.attn = PrunedSelfAttention(layer.attn, keep=[0, 2])
        layer.attn.n_head, layer.attn.query.out_features        # (2, 16)
    """

    def __init__(self, attn: SelfAttention, keep: Sequence[int]) -> None:
        super().__init__()
        C = attn.query.in_features
        hs = C // attn.n_head
        self.n_head, self.head_size, self.heads = len(keep), hs, list(keep)  # heads: the original indices kept
        rows = torch.cat([torch.arange(h * hs, (h + 1) * hs) for h in keep])  # the kept heads' channels
        self.query, self.key, self.value = (_rows(lin, rows) for lin in (attn.query, attn.key, attn.value))
        self.proj = nn.Linear(len(rows), C).to(attn.proj.weight)
        with torch.no_grad():
            self.proj.weight.copy_(attn.proj.weight[:, rows])
            self.proj.bias.copy_(attn.proj.bias)
        self.attn_dropout, self.drop = attn.attn_dropout, attn.drop

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = (lin(x).view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
                   for lin in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_size)  # (B, T, nh * hs)
        return self.drop(self.proj(y))


def _rows(lin: nn.Linear, rows: Tensor) -> nn.Linear:
    out = nn.Linear(lin.in_features, len(rows)).to(lin.weight)
    with torch.no_grad():
        out.weight.copy_(lin.weight[rows])
        out.bias.copy_(lin.bias[rows])
    return out


def prune_heads(model: nn.Module, heads: Mapping[int, Sequence[int]]) -> dict[int, list[int]]:
    """Remove attention heads, in place: `heads[i]` lists the heads to drop in layer i of an mplib BERT.

    Returns the heads each changed layer keeps (original indices).

    Example:
        prune_heads(model, {0: [1, 3], 1: [0]})   # {0: [0, 2], 1: [1, 2, 3]}
    """
    layers = getattr(model, "layers", None)
    if layers is None or not all(hasattr(layer, "attn") for layer in layers):
        raise TypeError(f"prune_heads takes an mplib BERT / BertClassifier (layers with .attn), got {type(model).__name__}")
    kept = {}
    for i, drop in heads.items():
        if not 0 <= i < len(layers):
            raise ValueError(f"layer {i} does not exist: the model has {len(layers)} layers (0..{len(layers) - 1})")
        attn = layers[i].attn
        if not isinstance(attn, SelfAttention):
            raise ValueError(f"layer {i} was pruned before (it keeps heads {attn.heads}); prune each layer once, "
                             "naming all the heads to drop in one call")
        bad = sorted(set(drop) - set(range(attn.n_head)))
        if bad:
            raise ValueError(f"layer {i} has heads 0..{attn.n_head - 1}; cannot drop {bad}")
        keep = [h for h in range(attn.n_head) if h not in set(drop)]
        if not keep:
            raise ValueError(f"dropping {sorted(set(drop))} would leave layer {i} without a head; keep at least one")
        layers[i].attn = PrunedSelfAttention(attn, keep)
        kept[i] = keep
    return kept


def head_scores(model: nn.Module) -> list[list[float]]:
    """Per layer, per head: the Frobenius norm of the head's value rows times its output columns.

    A cheap stand-in for importance (Michel et al. 2019 use gradients of the loss): a head whose
    values and output projection are small changes the residual stream little.

    Example:
        scores = head_scores(model); weakest = min(range(4), key=scores[0].__getitem__)
    """
    out = []
    for layer in model.layers:
        a = layer.attn
        hs = a.query.in_features // a.n_head
        value, proj = a.value.weight.detach(), a.proj.weight.detach()
        out.append([float(value[h * hs:(h + 1) * hs].norm() * proj[:, h * hs:(h + 1) * hs].norm())
                    for h in range(a.n_head)])
    return out


def magnitude_prune(model: nn.Module, amount: float, global_: bool = False, permanent: bool = True,
                    skip: tuple[str, ...] = ()) -> dict[str, float]:
    """Zero the `amount` share of smallest-|w| weights of every Linear (`torch.nn.utils.prune`).

    Per layer (`l1_unstructured`) or, with `global_`, over all of them at once (`global_unstructured`).
    `permanent` folds the mask into the weight (`prune.remove`). Returns each layer's zero share.

    Example:
        magnitude_prune(model, 0.5)["layers.0.attn.query"]      # 0.5
        # every Linear's share of zeros, by name
    """
    if not 0 <= amount < 1:
        raise ValueError(f"amount is the share of weights to zero, in [0, 1), got {amount}")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not any(n.startswith(s) for s in skip)}
    if global_:
        prune.global_unstructured([(m, "weight") for m in linears.values()], prune.L1Unstructured, amount=amount)
    else:
        for m in linears.values():
            prune.l1_unstructured(m, "weight", amount=amount)
    if permanent:
        for m in linears.values():
            prune.remove(m, "weight")
    return {n: float((m.weight == 0).float().mean()) for n, m in linears.items()}
