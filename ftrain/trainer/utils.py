"""Result types and small helpers of the HF-compatible trainer shell.

These mirror ``transformers.trainer_utils`` so that a Hugging Face Trainer script (its ``compute_metrics``, its
resume logic, its seeding) runs unchanged: the same names, fields, defaults and decisions, written for ftrain.
Nothing here imports transformers.

Example:
    >>> import numpy as np
    >>> from ftrain.trainer.utils import EvalPrediction, get_last_checkpoint, speed_metrics
    >>> preds, labels = EvalPrediction(predictions=np.zeros(3), label_ids=np.ones(3))  # unpacks like a tuple
    >>> float(labels.sum())
    3.0
    >>> sorted(speed_metrics("eval", start_time=0.0, num_samples=10))
    ['eval_runtime', 'eval_samples_per_second']
"""

from __future__ import annotations

import enum
import functools
import inspect
import os
import random
import re
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = [
    "PREFIX_CHECKPOINT_DIR",
    "EvalLoopOutput",
    "EvalPrediction",
    "PredictionOutput",
    "TrainOutput",
    "denumpify_detensorize",
    "enable_full_determinism",
    "get_last_checkpoint",
    "has_length",
    "number_of_arguments",
    "set_seed",
    "speed_metrics",
    "strategy_value",
]


# --------------------------------------------------------------------------------------------------------------------
# Strategy enums: defined with TrainingArguments in ftrain.trainer.args; importable from here too, as from
# transformers.trainer_utils (loaded on first use, so the two modules may import each other).
# --------------------------------------------------------------------------------------------------------------------

_FROM_ARGS = ("IntervalStrategy", "SaveStrategy", "HubStrategy")


def __getattr__(name: str) -> Any:
    if name in _FROM_ARGS:
        from ftrain.trainer import args

        return getattr(args, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def strategy_value(strategy: object) -> object:
    """The plain value of a strategy: ``"steps"`` for ``"steps"`` and for any library's enum member of that value.

    Args:
        strategy: A string, an enum member (any library's) or ``None``.

    Returns:
        ``strategy.value`` for an enum member, else ``strategy`` unchanged.

    Example:
        >>> import enum
        >>> strategy_value(enum.Enum("Save", {"BEST": "best"}).BEST), strategy_value("epoch")
        ('best', 'epoch')
    """
    return strategy.value if isinstance(strategy, enum.Enum) else strategy


# --------------------------------------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------------------------------------


class EvalPrediction:
    """What ``compute_metrics`` receives: predictions and labels, optionally the inputs and the per-sample losses.

    It unpacks and indexes like the tuple ``(predictions, label_ids[, inputs][, losses])``; ``inputs`` and
    ``losses`` take a place only when they are not ``None``. Negative indices are refused, as in transformers.

    Args:
        predictions: The model's outputs (a numpy array or a tuple of arrays).
        label_ids: The targets.
        inputs: The inputs given to the model, when ``include_for_metrics`` asks for them.
        losses: The losses, when ``include_for_metrics`` asks for them.

    Example:
        >>> p = EvalPrediction(predictions=[0.1], label_ids=[1], losses=[0.5])
        >>> [len(x) for x in p], p[2]
        ([1, 1, 1], [0.5])
    """

    def __init__(self, predictions: Any, label_ids: Any, inputs: Any = None, losses: Any = None) -> None:
        self.predictions = predictions
        self.label_ids = label_ids
        self.inputs = inputs
        self.losses = losses
        extras = tuple(x for x in (inputs, losses) if x is not None)
        self.elements: tuple[Any, ...] = (predictions, label_ids, *extras)

    def __iter__(self):
        return iter(self.elements)

    def __getitem__(self, idx: int) -> Any:
        if not 0 <= idx < len(self.elements):
            raise IndexError("tuple index out of range")
        return self.elements[idx]

    def __repr__(self) -> str:
        names = ("predictions", "label_ids", "inputs", "losses")
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in names if getattr(self, n) is not None)
        return f"EvalPrediction({fields})"


class EvalLoopOutput(NamedTuple):
    """What ``Trainer.evaluation_loop`` returns: predictions, labels, prefixed metrics and the number of samples."""

    predictions: Any
    label_ids: Any
    metrics: dict[str, float] | None
    num_samples: int | None


class PredictionOutput(NamedTuple):
    """What ``Trainer.predict`` returns: predictions, labels (``None`` without labels) and ``test_*`` metrics."""

    predictions: Any
    label_ids: Any
    metrics: dict[str, float] | None


class TrainOutput(NamedTuple):
    """What ``Trainer.train`` returns: optimizer updates done, the mean training loss and the ``train_*`` metrics."""

    global_step: int
    training_loss: float
    metrics: dict[str, float]


# --------------------------------------------------------------------------------------------------------------------
# Checkpoint folders, metrics
# --------------------------------------------------------------------------------------------------------------------

PREFIX_CHECKPOINT_DIR = "checkpoint"
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}\-(\d+)$")


def get_last_checkpoint(folder: str | os.PathLike[str]) -> str | None:
    """The checkpoint folder with the highest step in ``folder``, as transformers finds it for ``resume=True``.

    A checkpoint folder is a directory named exactly ``checkpoint-<digits>``; files and other names are ignored.
    Like transformers, this does not check that the checkpoint is complete.

    Args:
        folder: The training output directory.

    Returns:
        ``os.path.join(folder, "checkpoint-N")`` for the largest ``N``, or ``None`` when there is none.

    Raises:
        FileNotFoundError: ``folder`` does not exist.
    """
    steps = {
        name: int(match.group(1))
        for name in os.listdir(folder)
        if (match := _CHECKPOINT_NAME.search(name)) is not None and os.path.isdir(os.path.join(folder, name))
    }
    if not steps:
        return None
    return os.path.join(folder, max(steps, key=steps.__getitem__))  # the first listed, on a tie (as transformers)


def speed_metrics(
    split: str,
    start_time: float,
    num_samples: int | None = None,
    num_steps: int | None = None,
    num_tokens: int | None = None,
) -> dict[str, float]:
    """Runtime and throughput since ``start_time`` (a ``time.time()`` reading), with transformers' rounding.

    Args:
        split: The key prefix (``"train"``, ``"eval"``, ``"test"``).
        start_time: When the measured work started, from ``time.time()``.
        num_samples: Samples processed, if known.
        num_steps: Steps processed, if known.
        num_tokens: Tokens processed, if known.

    Returns:
        ``{split}_runtime`` in seconds rounded to 4 decimals and, when the runtime is not zero, each known
        ``{split}_{samples,steps,tokens}_per_second`` rounded to 3 decimals.
    """
    runtime = time.time() - start_time
    result = {f"{split}_runtime": round(runtime, 4)}
    if runtime == 0:
        return result
    for name, count in (("samples", num_samples), ("steps", num_steps), ("tokens", num_tokens)):
        if count is not None:
            result[f"{split}_{name}_per_second"] = round(count / runtime, 3)
    return result


def denumpify_detensorize(metrics: Any) -> Any:
    """Turns numpy scalars and one-element tensors into Python numbers, through dicts, lists and tuples.

    Args:
        metrics: A metric value or a (nested) dict / list / tuple of them.

    Returns:
        The same structure (same container types) with numbers in place of numpy scalars and 1-element tensors.

    Example:
        >>> denumpify_detensorize({"acc": np.float32(0.5), "n": [torch.tensor(3)]})
        {'acc': 0.5, 'n': [3]}
    """
    if isinstance(metrics, (list, tuple)):
        return type(metrics)(denumpify_detensorize(m) for m in metrics)
    if isinstance(metrics, dict):
        return type(metrics)({k: denumpify_detensorize(v) for k, v in metrics.items()})
    if isinstance(metrics, np.generic):
        return metrics.item()
    if isinstance(metrics, torch.Tensor) and metrics.numel() == 1:
        return metrics.item()
    return metrics


def number_of_arguments(func: Callable[..., Any]) -> int:
    """How many parameters ``func`` declares, not counting those a ``functools.partial`` already fills.

    Example:
        >>> number_of_arguments(functools.partial(lambda a, b, c: None, 1, c=2))
        1
    """
    if isinstance(func, functools.partial):
        return len(inspect.signature(func.func).parameters) - len(func.args) - len(func.keywords)
    return len(inspect.signature(func).parameters)


def has_length(dataset: Any) -> bool:
    """True when ``len(dataset)`` works (an ``IterableDataset`` or a generator has no length).

    Example:
        >>> has_length([1, 2]), has_length(iter([1, 2]))
        (True, False)
    """
    try:
        return len(dataset) is not None
    except (TypeError, AttributeError):
        return False


# --------------------------------------------------------------------------------------------------------------------
# Seeding
# --------------------------------------------------------------------------------------------------------------------


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seeds Python's ``random``, numpy's global generator and torch (CPU and every CUDA device).

    This is the global seeding transformers' Trainer does at start-up; ftrain's own steps draw from explicit keys
    (:mod:`ftrain.random`) and do not depend on it.

    Args:
        seed: The seed (numpy needs ``0 <= seed < 2**32``).
        deterministic: Also call ``torch.use_deterministic_algorithms(True)`` (slower; see
            :func:`enable_full_determinism` for the environment variables CUDA needs).
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)  # lazy: a no-op without CUDA
    if deterministic:
        torch.use_deterministic_algorithms(True)


_DETERMINISM_ENV = {
    "CUDA_LAUNCH_BLOCKING": "1",
    "CUBLAS_WORKSPACE_CONFIG": ":16:8",
    "ASCEND_LAUNCH_BLOCKING": "1",
    "HCCL_DETERMINISTIC": "1",
    "FLASH_ATTENTION_DETERMINISTIC": "1",
}


def enable_full_determinism(seed: int, warn_only: bool = False) -> None:
    """Seeds everything and turns on deterministic kernels, as transformers does for ``full_determinism=True``.

    Sets the environment variables CUDA, cuBLAS, Ascend NPUs and flash-attention read (``CUDA_LAUNCH_BLOCKING=1``,
    ``CUBLAS_WORKSPACE_CONFIG=:16:8``, ``ASCEND_LAUNCH_BLOCKING=1``, ``HCCL_DETERMINISTIC=1``,
    ``FLASH_ATTENTION_DETERMINISTIC=1``), calls ``torch.use_deterministic_algorithms(True, warn_only=warn_only)`` and
    sets cuDNN to deterministic without benchmarking. On a CPU-only machine the CUDA settings change nothing.

    Args:
        seed: The seed given to :func:`set_seed`.
        warn_only: Warn instead of raising when an operation has no deterministic implementation.
    """
    set_seed(seed)
    os.environ.update(_DETERMINISM_ENV)
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
