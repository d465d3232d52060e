"""The ``digits`` recipe: an MLP classifier on scikit-learn's 8×8 handwritten digits (``load_digits``).

The 1,797 images (64 pixels in 0..16, scaled to 0..1) are split once by a permutation keyed by ``data.split_seed``
(not the run's seed, so every run of the recipe validates on the same images). The loss is summed cross-entropy;
the number of correct predictions rides along as an auxiliary sum, so validation accuracy is exact over the split.
scikit-learn is only needed by this recipe (``pip install scikit-learn``).

Example:
    >>> x, y = torch.rand(10, 64), torch.arange(10) % 10
    >>> train, val = split_arrays(x, y, val_fraction=0.2, seed=0)
    >>> len(train["labels"]), len(val["labels"])
    (8, 2)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ftrain import losses
from ftrain import random as _random
from ftrain.recipes.config import LogConfig, Recipe, RecipeError
from ftrain.recipes.task import Task, init_model

__all__ = ["DigitsData", "DigitsRecipe", "MLPModel", "build", "load_arrays", "make_mlp", "split_arrays"]


@dataclasses.dataclass(frozen=True)
class MLPModel:
    """A multilayer perceptron: ``hidden`` sizes with ReLU, then a linear layer to the classes."""

    hidden: tuple[int, ...] = (128,)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if any(h < 1 for h in self.hidden):
            raise RecipeError(f"model.hidden: every size must be >= 1, got {self.hidden}")
        if not 0 <= self.dropout < 1:
            raise RecipeError(f"model.dropout: must be in [0, 1), got {self.dropout}")


@dataclasses.dataclass(frozen=True)
class DigitsData:
    """The split: ``val_fraction`` of the images, chosen by a permutation keyed by ``split_seed``."""

    val_fraction: float = 0.2
    split_seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise RecipeError(f"data.val_fraction: must be in (0, 1), got {self.val_fraction}")


@dataclasses.dataclass(frozen=True)
class DigitsRecipe(Recipe):
    """An MLP digit classifier."""

    task: ClassVar[str] = "digits"
    model: MLPModel = MLPModel()
    data: DigitsData = DigitsData()
    log: LogConfig = LogConfig(output_dir="runs/digits")


def load_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (N, 64) float32 in [0, 1], labels (N,) int64)`` from scikit-learn.

    Raises:
        RecipeError: scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise RecipeError("the digits recipe needs scikit-learn: pip install scikit-learn") from None
    x, y = load_digits(return_X_y=True)
    return torch.as_tensor(x, dtype=torch.float32) / 16.0, torch.as_tensor(y, dtype=torch.long)


def split_arrays(
    x: torch.Tensor, y: torch.Tensor, *, val_fraction: float, seed: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A keyed random split into training and validation columns ``{"pixels", "labels"}``."""
    g = torch.Generator().manual_seed(_random.seed_for_step(_random.key(seed), 0))
    order = torch.randperm(len(y), generator=g)
    n_val = max(1, round(val_fraction * len(y)))
    val, train = order[:n_val].sort().values, order[n_val:].sort().values
    return {"pixels": x[train], "labels": y[train]}, {"pixels": x[val], "labels": y[val]}


def make_mlp(n_in: int, hidden: tuple[int, ...], n_out: int, dropout: float) -> nn.Sequential:
    """``Linear -> ReLU (-> Dropout)`` per hidden size, then ``Linear`` to ``n_out`` logits."""
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(n_in, h), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
        n_in = h
    return nn.Sequential(*layers, nn.Linear(n_in, n_out))


def loss_fn(model: Any, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Summed cross-entropy, and the count of correct predictions as the auxiliary ``correct``."""
    logits = model(batch["pixels"])
    loss_sum, count = losses.cross_entropy(logits, batch["labels"])
    return loss_sum, count, {"correct": (logits.argmax(-1) == batch["labels"]).sum()}


def summarize(sums: Mapping[str, float]) -> dict[str, float]:
    """Validation loss and accuracy."""
    return {"loss": sums["loss"], "accuracy": sums["correct"] / sums["count"] if sums["count"] else float("nan")}


def build(recipe: DigitsRecipe, key: torch.Tensor) -> Task:
    """The task of a ``digits`` recipe; the initial weights come from ``key``."""
    x, y = load_arrays()
    train, val = split_arrays(x, y, val_fraction=recipe.data.val_fraction, seed=recipe.data.split_seed)
    n_classes = int(y.max()) + 1
    m = recipe.model
    return Task(
        model=init_model(lambda: make_mlp(x.shape[1], m.hidden, n_classes, m.dropout), key),
        train_data=train,
        val_data=val,
        loss_fn=loss_fn,
        unit="examples",
        summarize=summarize,
        headline="accuracy",
    )
