"""Distillation: a half-depth student learns the teacher's softened outputs and the labels (DistilBERT).

Hinton et al. 2015: loss = alpha T^2 KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) CE(s, y).
The T^2 keeps the soft term's gradient on the scale of the hard one's as T grows.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mplib.train import History, fit


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None,
                      temperature: float = 2.0, alpha: float = 0.5, ignore_index: int = -100) -> Tensor:
    """Soft targets at `temperature` (weight `alpha`) plus hard labels (weight 1 - alpha).

    Logits are (..., classes); `labels` (...) may carry `ignore_index` for examples without a label
    (an unlabelled transfer set). Without labels the loss is the soft term alone.

    Example:
        student = half_depth_student(teacher)
        loss = distillation_loss(student(ids, mask), teacher(ids, mask).detach(), y, temperature=2.0, alpha=0.5)
    """
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"the student predicts {student_logits.shape[-1]} classes (or tokens) but the teacher "
                         f"{teacher_logits.shape[-1]}: distillation compares the two distributions entry by entry, "
                         "so both need the same vocabulary / label set; build the student with the teacher's")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape (same batch)")
    if temperature <= 0 or not 0 <= alpha <= 1:
        raise ValueError(f"temperature must be > 0 and alpha in [0, 1], got {temperature}, {alpha}")
    C = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, C) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.reshape(-1, C).detach() / temperature, dim=-1)
    soft = F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2
    if labels is None or alpha == 1:
        return soft if labels is None else alpha * soft
    labels = labels.reshape(-1)
    if (labels != ignore_index).any():
        hard = F.cross_entropy(student_logits.reshape(-1, C), labels, ignore_index=ignore_index)
    else:
        hard = student_logits.sum() * 0.0  # no labelled example in this batch
    return alpha * soft + (1 - alpha) * hard


def half_depth_student(teacher: nn.Module, keep: list[int] | None = None) -> nn.Module:
    """A copy of an mplib BERT / BertClassifier / GPT with every other layer (DistilBERT's initialisation).

    `keep`: which of the teacher's layers to keep (default: 0, 2, 4, ...). Embedding and head are copied.

    Example:
        student = half_depth_student(teacher)
        len(teacher.layers), len(student.layers)     # (2, 1)
    """
    layers = getattr(teacher, "layers", None) or getattr(teacher, "h", None)
    config = getattr(teacher, "config", None)
    if layers is None or config is None or not hasattr(config, "n_layer"):
        raise TypeError(f"half_depth_student takes an mplib BERT, BertClassifier or GPT (a .config with n_layer "
                        f"and a list of layers), got {type(teacher).__name__}")
    n = len(layers)
    keep = list(range(0, n, 2)) if keep is None else list(keep)
    if not keep or any(not 0 <= i < n for i in keep):
        raise ValueError(f"keep must name layers of the teacher's {n}, got {keep}")
    student = copy.deepcopy(teacher)
    student.config = dataclasses.replace(config, n_layer=len(keep))
    attr = "layers" if hasattr(teacher, "layers") else "h"
    setattr(student, attr, nn.ModuleList(copy.deepcopy(layers[i]) for i in keep))
    return student


def distill(teacher: nn.Module, student: nn.Module, batches: Iterable[Any], steps: int, lr: float = 1e-3,
            temperature: float = 2.0, alpha: float = 0.5, progress: bool = False, **fit_options: Any) -> History:
    """Train `student` on `batches` of (inputs..., labels) against `teacher`'s logits (`mplib.train.fit`).

    Each batch is a tuple whose last entry is the labels (`-100` where unlabelled) and the rest the
    model's inputs. The teacher runs in eval mode without a graph.

    Example:
        batches = [(ids, mask, y)] * 2                # inputs..., labels
        history = distill(teacher, half_depth_student(teacher), batches, steps=2, temperature=2.0)
    """
    tv, sv = _vocab(teacher), _vocab(student)
    if tv is not None and sv is not None and tv != sv:
        raise ValueError(f"the student reads a vocabulary of {sv} tokens but the teacher {tv}: the same ids would "
                         "mean different words; build the student with the teacher's config.vocab_size and tokenizer")
    teacher.eval()

    def loss_fn(model: nn.Module, batch: Any) -> Tensor:
        *inputs, labels = batch
        with torch.no_grad():
            target = teacher(*inputs)
        return distillation_loss(model(*inputs), target, labels, temperature, alpha)

    return fit(student, batches, loss_fn, steps, lr=lr, progress=progress, **fit_options)


def _vocab(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "vocab_size", None)
