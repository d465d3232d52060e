"""Optimizers by name, with weight decay on the parameters a mask selects: what a config turns into.

The Trainer (``TrainingArguments.optim``, :mod:`ftrain.trainer.convert`) and the ``ftrain`` command (a recipe's
``optim`` section, :mod:`ftrain.cli.train`) both build their optimizer with :func:`make_optimizer`; each only maps
its own names and fields onto it, and adds gradient clipping in front.

Example:
    >>> import torch
    >>> tx = make_optimizer("sgd", 0.1, weight_decay=0.01, decay_mask={"w": True, "b": False})
    >>> params = {"w": torch.ones(2), "b": torch.ones(2)}
    >>> updates, _ = tx.update({"w": torch.ones(2), "b": torch.ones(2)}, tx.init(params), params)
    >>> [round(float(updates[k][0]), 4) for k in ("w", "b")]  # -lr * (g + wd * p) where the mask says so
    [-0.101, -0.1]
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from ftrain.optim.alias import adagrad, adam, adamw, lion, rmsprop, sgd
from ftrain.optim.base import GradientTransformation, ScalarOrSchedule
from ftrain.optim.combine import partition
from ftrain.optim.factorized import adafactor

__all__ = ["OPTIMIZERS", "make_optimizer"]

OPTIMIZERS: dict[str, Callable[..., GradientTransformation]] = {
    f.__name__: f for f in (adam, adamw, sgd, adagrad, rmsprop, lion, adafactor)
}
"""The aliases :func:`make_optimizer` knows by name."""


def _factory(optimizer: str | Callable[..., GradientTransformation]) -> Callable[..., GradientTransformation]:
    if callable(optimizer):
        return optimizer
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"make_optimizer: unknown optimizer {optimizer!r}; the names are {sorted(OPTIMIZERS)}.")
    return OPTIMIZERS[optimizer]


def make_optimizer(
    optimizer: str | Callable[..., GradientTransformation],
    learning_rate: ScalarOrSchedule,
    *,
    weight_decay: float = 0.0,
    decay_mask: Mapping[str, bool] | None = None,
    **hyperparams: Any,
) -> GradientTransformation:
    """The optimizer ``optimizer`` with ``weight_decay`` on the parameters where ``decay_mask`` is True.

    Optimizers with decoupled decay (``adamw``, ``lion``, ``adafactor``: they take a ``mask``) get the mask; for
    the others (an L2 penalty added to the gradient) the params are split with :func:`ftrain.optim.partition` into
    a decayed and an undecayed copy of the optimizer, when both groups are non-empty and decay is on — the two
    parameter groups of HF's ``Trainer``.

    Args:
        optimizer: a name in :data:`OPTIMIZERS`, or an alias of the same shape (``learning_rate`` first, then
            ``weight_decay`` and maybe ``mask``).
        learning_rate: a number, a 0-d tensor or a schedule ``count -> lr``.
        weight_decay: the decay coefficient.
        decay_mask: ``{param name: decays}`` (:func:`ftrain.optim.hf_decay_mask`); ``None`` decays every
            parameter.
        **hyperparams: the alias's other arguments (``b1``, ``b2``, ``eps``, ``momentum``, ...).

    Returns:
        The optimizer.

    Raises:
        ValueError: an unknown name, or weight decay for an optimizer that has none (``adam``).
    """
    factory = _factory(optimizer)
    takes = inspect.signature(factory).parameters
    if "mask" in takes:
        return factory(learning_rate=learning_rate, **hyperparams, weight_decay=weight_decay, mask=decay_mask)
    if "weight_decay" not in takes:
        if weight_decay:
            raise ValueError(
                f"{factory.__name__} has no weight decay (weight_decay={weight_decay}); use adamw for decoupled "
                "decay, or set weight_decay to 0."
            )
        return factory(learning_rate=learning_rate, **hyperparams)
    flags = [True] if decay_mask is None else list(decay_mask.values())
    if weight_decay == 0 or not any(flags):
        return factory(learning_rate=learning_rate, **hyperparams, weight_decay=0.0)
    if all(flags):
        return factory(learning_rate=learning_rate, **hyperparams, weight_decay=weight_decay)
    labels = {name: "decay" if d else "no_decay" for name, d in decay_mask.items()}
    groups = {
        "decay": factory(learning_rate=learning_rate, **hyperparams, weight_decay=weight_decay),
        "no_decay": factory(learning_rate=learning_rate, **hyperparams, weight_decay=0.0),
    }
    return partition(groups, labels)
