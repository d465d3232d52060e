"""Losses as ``(sum, count)``.

A loss returns the *sum* over the items it saw and how many items there were, never a mean. The train step adds
sums and counts over every microbatch (and, distributed, over every rank) and divides once per optimizer step, so a
batch of 32 gives the same gradient as 4 accumulated microbatches of 8 even when they hold different numbers of
tokens (DESIGN.md invariant 6).

Example:
    >>> import torch
    >>> from ftrain import losses
    >>> logits = torch.zeros(1, 3, 4)                   # batch 1, 3 positions, vocabulary 4
    >>> labels = torch.tensor([[1, 2, -100]])
    >>> s, n = losses.cross_entropy(logits, labels, shift=True)
    >>> int(n), round(float(s / n), 4)                  # one position predicts 2, the next is padding
    (1, 1.3863)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["Loss", "cross_entropy", "mean", "mse"]


class Loss(NamedTuple):
    """``sum``: 0-d float tensor, differentiable; ``count``: 0-d tensor, the number of items summed."""

    sum: torch.Tensor
    count: torch.Tensor


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    label_smoothing: float = 0.0,
) -> Loss:
    """Token cross-entropy summed over the labels that are not ``ignore_index``.

    Args:
        logits: ``(..., vocab)`` scores; half-precision logits are upcast to float32 first.
        labels: ``logits.shape[:-1]`` class indices; ``ignore_index`` marks positions that do not count.
        shift: causal-LM shift: position ``t`` predicts label ``t + 1`` (``logits[..., :-1, :]`` against
            ``labels[..., 1:]``), as transformers' causal-LM loss does.
        label_smoothing: epsilon of uniform label smoothing (``torch.nn.functional.cross_entropy`` semantics,
            which equal transformers' ``LabelSmoother``).

    Returns:
        ``Loss(sum, count)`` with ``count`` the number of labels that are not ``ignore_index``.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"cross_entropy: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match: labels "
            "must have the logits' shape without the last (class) dimension."
        )
    if labels.is_floating_point():
        raise TypeError(f"cross_entropy: labels must be integer class indices, got dtype {labels.dtype}")
    if shift:
        logits = logits[..., :-1, :]
        labels = labels[..., 1:]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    total = F.cross_entropy(
        flat_logits, flat_labels, ignore_index=ignore_index, reduction="sum", label_smoothing=label_smoothing
    )
    return Loss(total, (flat_labels != ignore_index).sum())


def mse(predictions: torch.Tensor, targets: torch.Tensor) -> Loss:
    """Squared error summed over every element; ``count`` is the number of elements."""
    if predictions.shape != targets.shape:
        raise ValueError(f"mse: predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} differ")
    diff = predictions - targets.to(predictions.dtype)
    return Loss((diff * diff).sum(), torch.tensor(diff.numel(), device=diff.device))


def mean(loss: Loss | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``sum / count``; 0 when nothing was counted."""
    total, count = loss[0], loss[1]
    return total / count.clamp_min(1).to(total.dtype)
