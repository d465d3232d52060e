"""What a recipe builds: a :class:`Task` — model, data splits, loss and how to name its validation metrics.

The ``ftrain`` command trains any task the same way (``TrainState.create``, ``make_train_step``, ``BatchStream``,
``CheckpointManager``); a task module (:mod:`ftrain.recipes.gpt`, :mod:`ftrain.recipes.digits`) only says what
is trained on what.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ftrain import random as _random

__all__ = ["Task", "init_model"]


@dataclasses.dataclass(frozen=True)
class Task:
    """A built recipe.

    Attributes:
        model: the freshly initialised module (its weights are a function of the run's seed).
        train_data: the training split, any ``BatchStream`` source (e.g. a dict of equal-length tensor columns).
        val_data: the validation split, in the same form.
        loss_fn: ``loss_fn(model, batch) -> (sum, count[, aux])`` for ``make_train_step``.
        unit: what ``count`` counts (``"tokens"``, ``"examples"``), for throughput.
        summarize: reduced validation sums (``loss``, ``count`` and aux sums) -> the metrics to report, e.g.
            ``{"loss": ..., "perplexity": ...}``.
        headline: the key of ``summarize``'s output printed as the run's result.
        generate: ``generate(module, prompt, max_new_tokens, temperature, seed) -> str`` for language models,
            else ``None``.
    """

    model: nn.Module
    train_data: Any
    val_data: Any
    loss_fn: Callable[..., Any]
    unit: str
    summarize: Callable[[Mapping[str, float]], dict[str, float]]
    headline: str
    generate: Callable[..., str] | None = None


def init_model(build: Callable[[], nn.Module], key: torch.Tensor) -> nn.Module:
    """Builds a module with torch's RNG seeded from ``key``, leaving the caller's RNG state as it was.

    Example:
        >>> from ftrain import random
        >>> a = init_model(lambda: nn.Linear(2, 2), random.key(0))
        >>> b = init_model(lambda: nn.Linear(2, 2), random.key(0))
        >>> torch.equal(a.weight, b.weight)
        True
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_random.seed_for_step(key, 0))
        return build()
