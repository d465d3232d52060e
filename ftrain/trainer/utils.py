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

import dataclasses
import enum
import functools
import inspect
import json
import logging
import os
import random
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

from ftrain.checkpoint import StepNaming, list_step_dirs

__all__ = [
    "CHECKPOINT_NAMING",
    "PREFIX_CHECKPOINT_DIR",
    "EvalLoopOutput",
    "EvalPrediction",
    "LabelSmoother",
    "PredictionOutput",
    "TrainOutput",
    "denumpify_detensorize",
    "enable_full_determinism",
    "get_last_checkpoint",
    "has_length",
    "hf_logger",
    "load_weights_strict",
    "make_label_smoother",
    "nested_gather",
    "nested_numpify",
    "number_of_arguments",
    "read_safetensors_weights",
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
# Label smoothing
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LabelSmoother:
    """``trainer.label_smoother``: uniform label smoothing of the cross-entropy, as transformers'
    ``trainer_pt_utils.LabelSmoother`` (same fields; calling it gives the same mean loss). The Trainer's step reads
    its ``epsilon`` (the fused loss of :func:`ftrain.step.make_loss_fn`), so setting ``trainer.label_smoother =
    None`` before ``train()`` turns smoothing off, as in transformers.

    Example:
        >>> smoother = LabelSmoother(epsilon=0.1)
        >>> round(float(smoother({"logits": torch.zeros(2, 4)}, torch.tensor([1, -100]))), 4)  # log(4)
        1.3863
    """

    epsilon: float = 0.1
    ignore_index: int = -100

    def __call__(self, model_output: Any, labels: torch.Tensor, shift_labels: bool = False) -> torch.Tensor:
        """The mean smoothed cross-entropy of the output's logits (``model_output["logits"]``, or its first
        element) against ``labels``, over the labels that are not ``ignore_index`` (shifted by one with
        ``shift_labels``, for a causal LM)."""
        from ftrain.losses import cross_entropy, mean

        logits = model_output["logits"] if isinstance(model_output, Mapping) else model_output[0]
        if labels.dim() == logits.dim():  # transformers' (batch, 1) labels of a classifier
            labels = labels.squeeze(-1)
        loss = cross_entropy(
            logits, labels, ignore_index=self.ignore_index, shift=shift_labels, label_smoothing=self.epsilon
        )
        return mean(loss)


def make_label_smoother(model: Any, epsilon: float) -> LabelSmoother | None:
    """transformers' choice of ``trainer.label_smoother``: none for ``epsilon == 0``, and none (with a warning) for
    a multi-label classifier (``config.problem_type == "multi_label_classification"``), whose binary
    cross-entropy labels cannot be smoothed this way; else ``LabelSmoother(epsilon)``."""
    if epsilon == 0:
        return None
    if getattr(getattr(model, "config", None), "problem_type", None) == "multi_label_classification":
        warnings.warn(
            "Label smoothing is not compatible with multi-label classification. Disabling label smoothing for this "
            "training run (label_smoothing_factor is ignored; the model's own loss is used).",
            UserWarning,
            stacklevel=3,
        )
        return None
    return LabelSmoother(epsilon=epsilon)


# --------------------------------------------------------------------------------------------------------------------
# Checkpoint folders, metrics
# --------------------------------------------------------------------------------------------------------------------

PREFIX_CHECKPOINT_DIR = "checkpoint"
#: ``checkpoint-{global_step}``: the Trainer's checkpoint folder names, written and parsed by this one object.
CHECKPOINT_NAMING = StepNaming(f"{PREFIX_CHECKPOINT_DIR}-", 0)


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
    found = list_step_dirs(folder, CHECKPOINT_NAMING)
    if not found:
        return None
    _, path = max(found, key=lambda item: item[0])  # the first listed, on a tie (as transformers)
    return os.path.join(folder, path.name)


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


def hf_logger(module: str) -> logging.Logger:
    """The logger of transformers' module ``transformers.<module>``, for the messages the shell writes where
    transformers' Trainer writes the same ones ("***** Running training *****", a callback added twice...).

    A script written for transformers' Trainer shows or hides them with transformers' settings:
    ``transformers.logging.set_verbosity_info()``, handlers on the ``"transformers"`` logger, ``log_level``. This only
    names a standard ``logging`` logger; transformers is not imported (without it, the messages propagate to the
    root logger like any other).

    Args:
        module: transformers' module, e.g. ``"trainer"`` or ``"trainer_callback"``.

    Example:
        >>> hf_logger("trainer").name
        'transformers.trainer'
    """
    return logging.getLogger(f"transformers.{module}")


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


# --------------------------------------------------------------------------------------------------------------------
# Gathering predictions across processes
# --------------------------------------------------------------------------------------------------------------------


def _gather_one(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` from every rank, concatenated along dim 0 (a 0-d tensor counts as one row), rank order."""
    tensor = tensor.detach().contiguous()
    if tensor.dim() == 0:
        tensor = tensor[None]
    parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, tensor)
    return torch.cat(parts, dim=0)


def nested_gather(tensors: Any) -> Any:
    """``tensors`` (a tensor or nested lists / tuples / dicts of them) from every process, concatenated on dim 0.

    transformers' ``nested_gather`` for ``ParallelMode.DISTRIBUTED``: every rank must call it with tensors of the
    same shapes (pad first); a 0-d tensor becomes one row per rank. Outside an initialised process group (one
    process) the input comes back unchanged.

    Args:
        tensors: ``None``, a tensor, or nested lists / tuples / dicts of tensors.

    Returns:
        The same structure with gathered tensors (``None`` for ``None``).

    Example:
        >>> nested_gather({"loss": torch.tensor(1.5), "ids": [torch.arange(2)]})
        {'loss': tensor(1.5000), 'ids': [tensor([0, 1])]}
    """
    if tensors is None:
        return None
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensors
    if isinstance(tensors, (list, tuple)):
        return type(tensors)(nested_gather(t) for t in tensors)
    if isinstance(tensors, dict):
        return type(tensors)({k: nested_gather(v) for k, v in tensors.items()})
    return _gather_one(tensors)


def nested_numpify(tensors: Any) -> Any:
    """Tensors to numpy arrays (on the CPU) through lists, tuples and dicts; bfloat16 becomes float32, which numpy
    lacks (transformers' ``nested_numpify``).

    Example:
        >>> nested_numpify((torch.ones(2, dtype=torch.bfloat16), {"n": torch.tensor(3)}))
        (array([1., 1.], dtype=float32), {'n': array(3)})
    """
    if isinstance(tensors, (list, tuple)):
        return type(tensors)(nested_numpify(t) for t in tensors)
    if isinstance(tensors, dict):
        return type(tensors)({k: nested_numpify(v) for k, v in tensors.items()})
    if not isinstance(tensors, torch.Tensor):
        return tensors
    t = tensors.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


# --------------------------------------------------------------------------------------------------------------------
# Weight files (safetensors only: a pickle is never loaded)
# --------------------------------------------------------------------------------------------------------------------

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def _model_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    """Every name of ``model``'s parameters and buffers (tied aliases included) -> tensor, and the groups of names
    that must be loaded: one group per distinct parameter (its tied aliases) and per persistent buffer."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    persistent = set(model.state_dict(keep_vars=True))
    groups: dict[int, list[str]] = {}
    for name, tensor in named.items():
        if name in persistent:
            groups.setdefault(id(tensor), []).append(name)
    return named, list(groups.values())


def load_weights_strict(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Copies ``tensors`` (e.g. a ``model.safetensors``) into ``model`` in place, matching keys strictly: every
    parameter and persistent buffer must be given (one name of a tied pair is enough, as ``save_pretrained`` writes
    it) and every given name must exist in the model, with the same shape.

    Args:
        model: the module to load into.
        tensors: ``{state_dict name: tensor}``.
        where: what the tensors came from, for messages.

    Raises:
        ValueError: missing or unexpected keys (listed), or a shape mismatch (named).

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> load_weights_strict(model, {"weight": torch.ones(1, 2), "bias": torch.zeros(1)}, "memory")
        >>> model.weight.tolist()
        [[1.0, 1.0]]
    """
    named, groups = _model_tensors(model)
    missing = [group[0] for group in groups if not any(n in tensors for n in group)]
    unexpected = sorted(set(tensors) - set(named))
    if missing or unexpected:
        raise ValueError(
            f"Error(s) in loading the weights of {where} into {type(model).__name__}: missing keys {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''} ({len(missing)}), unexpected keys {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)}). The checkpoint was written for another "
            "architecture or config: build the model from the checkpoint's config.json."
        )
    with torch.no_grad():
        for name, value in tensors.items():
            target = named[name]
            if tuple(target.shape) != tuple(value.shape):
                raise ValueError(
                    f"Error in loading {where}: {name!r} has shape {tuple(value.shape)} in the checkpoint and "
                    f"{tuple(target.shape)} in {type(model).__name__}."
                )
            target.copy_(value)


def read_safetensors_weights(folder: str) -> dict[str, torch.Tensor] | None:
    """The tensors (on the CPU) of ``folder``'s ``model.safetensors``, else of the shards its
    ``model.safetensors.index.json`` lists; ``None`` when it has neither.

    Raises:
        ValueError: shards holding tensors the index does not list.
    """
    from safetensors.torch import load_file

    single, index = os.path.join(folder, SAFE_WEIGHTS_NAME), os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        return load_file(single, device="cpu")
    if not os.path.isfile(index):
        return None
    with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(load_file(os.path.join(folder, shard), device="cpu"))
    extra = sorted(set(tensors) - set(weight_map))
    if extra:
        raise ValueError(f"{index}: the shards hold tensors the index does not list: {extra[:10]}")
    return tensors
