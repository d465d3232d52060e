"""ftrain: training for PyTorch in the style of JAX.

Training is a pure function ``train_step(state, batch) -> (state, metrics)`` over an immutable
:class:`TrainState` pytree; :func:`jit` compiles the whole step with ``torch.compile``.
"""

from ftrain import data, losses, metrics, optim, random, schedules, tree
from ftrain.jit import jit
from ftrain.state import TrainState
from ftrain.step import make_eval_step, make_train_step

__version__ = "0.1.0"

__all__ = [
    "TrainState",
    "data",
    "jit",
    "losses",
    "make_eval_step",
    "make_train_step",
    "metrics",
    "optim",
    "random",
    "schedules",
    "tree",
]


def __getattr__(name: str):
    """``ftrain.Trainer`` / ``ftrain.TrainingArguments``, imported on first use (the shell is optional)."""
    if name in ("Trainer", "TrainingArguments"):
        import importlib

        return getattr(importlib.import_module("ftrain.trainer"), name)  # lazy: the core never imports the shell
    raise AttributeError(f"module 'ftrain' has no attribute {name!r}")
