"""Reporting integrations: where the trainer's logs go besides the console.

``report_to`` picks them as in transformers 5.x (``"none"`` is the default, ``"all"`` means every installed one).
ftrain provides :class:`TensorBoardCallback` (``pip install ftrain[tensorboard]``); the other transformers
integrations (wandb, mlflow, ...) are not available yet and are refused with a message that says how to plug a
callback of your own. :class:`JsonlLoggerCallback` appends every log to a JSON-lines file (used by the ``ftrain``
command). TensorBoard is imported only when a :class:`TensorBoardCallback` is created.

Example:
    >>> import json, os, tempfile
    >>> from ftrain.trainer.callbacks import TrainerControl, TrainerState
    >>> get_reporting_integration_callbacks("none")
    []
    >>> path = os.path.join(tempfile.mkdtemp(), "metrics.jsonl")
    >>> logger = JsonlLoggerCallback(path)
    >>> logger.on_log(None, TrainerState(global_step=5), TrainerControl(), logs={"loss": 0.5, "epoch": 1.0})
    >>> open(path).read()
    '{"loss": 0.5, "epoch": 1.0, "step": 5}\\n'
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import socket
from datetime import datetime
from typing import Any

from ftrain.trainer.callbacks import TrainerCallback, TrainerControl, TrainerState
from ftrain.trainer.utils import denumpify_detensorize

__all__ = [
    "JsonlLoggerCallback",
    "TensorBoardCallback",
    "default_logdir",
    "get_available_reporting_integrations",
    "get_reporting_integration_callbacks",
    "is_tensorboard_available",
    "rewrite_logs",
]

logger = logging.getLogger(__name__)

# transformers 5.x `report_to` values that ftrain does not provide yet.
_NOT_YET_AVAILABLE = (
    "azure_ml",
    "comet_ml",
    "mlflow",
    "neptune",
    "trackio",
    "wandb",
    "codecarbon",
    "clearml",
    "dagshub",
    "flyte",
    "dvclive",
    "swanlab",
    "kubeflow",
)
_MODULE_OF = {"azure_ml": "azureml", "comet_ml": "comet_ml", "mlflow": "mlflow", "neptune": "neptune", "wandb": "wandb"}


def is_tensorboard_available() -> bool:
    """True when ``tensorboard`` (or ``tensorboardX``) is installed; nothing is imported."""
    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


def get_available_reporting_integrations() -> list[str]:
    """The integrations ``report_to="all"`` turns on: those ftrain provides whose package is installed."""
    return ["tensorboard"] if is_tensorboard_available() else []


def _warn_about_skipped_integrations() -> None:
    """Under ``report_to="all"``, says which installed trackers transformers would use and ftrain does not."""
    skipped = [name for name, module in _MODULE_OF.items() if importlib.util.find_spec(module) is not None]
    if skipped:
        logger.warning(
            "report_to='all': %s installed but not provided by ftrain yet, so not used; pass your own callback "
            "(callbacks=[...]) to report there.",
            ", ".join(skipped),
        )


def get_reporting_integration_callbacks(report_to: str | list[str] | None) -> list[type[TrainerCallback]]:
    """The callback classes for a ``report_to`` value, as ``TrainingArguments.report_to`` accepts it.

    Args:
        report_to: ``None``, ``"none"`` or ``[]`` (no integration), ``"all"`` (every installed integration ftrain
            provides), a name or a list of names.

    Returns:
        The callback classes, in the order given (the trainer instantiates them).

    Raises:
        ValueError: A name is a transformers integration ftrain does not provide yet, or no integration at all;
            the message says what to use instead.
    """
    if report_to is None:
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if names in (["none"], []):
        return []
    if names == ["all"]:
        _warn_about_skipped_integrations()
        names = get_available_reporting_integrations()
    for name in names:
        if name in _NOT_YET_AVAILABLE:
            raise ValueError(
                f"report_to={name!r}: the {name} integration is not available in ftrain yet. Remove it from "
                "report_to (report_to='none', or 'tensorboard') and pass a callback that reports there instead: "
                "Trainer(..., callbacks=[MyCallback()]), where MyCallback subclasses ftrain.trainer.callbacks."
                "TrainerCallback (or transformers.TrainerCallback) and implements on_log(args, state, control, "
                "logs=None, **kwargs)."
            )
        if name != "tensorboard":
            raise ValueError(
                f"report_to={name!r} is not a reporting integration; ftrain accepts 'tensorboard', 'all' or 'none'."
            )
    return [TensorBoardCallback for _ in names]


def rewrite_logs(logs: dict[str, Any]) -> dict[str, Any]:
    """Groups log keys as transformers does for trackers: ``eval_x -> eval/x``, ``test_x -> test/x``, else ``train/x``.

    Example:
        >>> rewrite_logs({"loss": 1.0, "eval_loss": 2.0, "test_acc": 0.5})
        {'train/loss': 1.0, 'eval/loss': 2.0, 'test/acc': 0.5}
    """
    rewritten = {}
    for key, value in logs.items():
        for prefix in ("eval", "test"):
            if key.startswith(f"{prefix}_"):
                rewritten[f"{prefix}/{key[len(prefix) + 1 :]}"] = value
                break
        else:
            rewritten[f"train/{key}"] = value
    return rewritten


def default_logdir() -> str:
    """``runs/<Mon DD_HH-MM-SS>_<hostname>``, TensorBoard's (and transformers') default run folder name."""
    return os.path.join("runs", f"{datetime.now().strftime('%b%d_%H-%M-%S')}_{socket.gethostname()}")


def _summary_writer_class() -> type:
    """``torch.utils.tensorboard.SummaryWriter`` (or tensorboardX's), or an error naming the extra to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ImportError(
                "TensorBoardCallback (report_to='tensorboard') needs TensorBoard: pip install ftrain[tensorboard] "
                "(or pip install tensorboard). Use report_to='none' to train without it."
            ) from None
    return SummaryWriter


def _config_text(model: Any) -> str | None:
    """The model's config as JSON text (a transformers config or a dataclass), or ``None``."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "to_json_string"):
        return config.to_json_string()
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True, default=str)
    return None


class TensorBoardCallback(TrainerCallback):
    """Writes logs to TensorBoard: numbers as scalars at ``state.global_step``, strings as text.

    Keys are grouped with :func:`rewrite_logs`. The run folder is, in order: the ``TENSORBOARD_LOGGING_DIR``
    environment variable (transformers 5.x), ``args.logging_dir`` when the arguments have one (transformers 4.x
    scripts), else ``<output_dir>/runs/<date>_<host>``; inside a hyper-parameter search each trial writes to
    ``<output_dir>/runs/<date>_<host>/<trial name>``. Only the global rank 0 writes.

    Args:
        tb_writer: A ``SummaryWriter`` to use; by default one is created when training starts.

    Raises:
        ImportError: ``tb_writer`` is not given and neither tensorboard nor tensorboardX is installed.
    """

    def __init__(self, tb_writer: Any = None) -> None:
        self._SummaryWriter = None if tb_writer is not None else _summary_writer_class()
        self.tb_writer = tb_writer
        self.logging_dir = os.getenv("TENSORBOARD_LOGGING_DIR")
        if self.logging_dir is not None:
            self.logging_dir = os.path.expanduser(self.logging_dir)

    def _resolve_logging_dir(self, args: Any) -> str:
        if self.logging_dir is None:
            self.logging_dir = getattr(args, "logging_dir", None) or os.path.join(args.output_dir, default_logdir())
        return self.logging_dir

    def _ensure_writer(self, args: Any) -> None:
        if self.tb_writer is None:
            if self._SummaryWriter is None:
                self._SummaryWriter = _summary_writer_class()
            self.tb_writer = self._SummaryWriter(log_dir=self._resolve_logging_dir(args))

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        if state.is_hyper_param_search and state.trial_name is not None:
            self.logging_dir = os.path.join(args.output_dir, default_logdir(), state.trial_name)
        self._ensure_writer(args)
        to_json = getattr(args, "to_json_string", None)
        self.tb_writer.add_text("args", to_json() if callable(to_json) else str(args))
        config = _config_text(kwargs.get("model"))
        if config is not None:
            self.tb_writer.add_text("model_config", config)

    def on_log(
        self, args: Any, state: TrainerState, control: TrainerControl, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        self._ensure_writer(args)
        for key, value in rewrite_logs(logs or {}).items():
            if isinstance(value, (int, float)):
                self.tb_writer.add_scalar(key, value, state.global_step)
            elif isinstance(value, str):
                self.tb_writer.add_text(key, value, state.global_step)
            else:
                logger.warning(
                    "TensorBoard: dropping %r, whose value %r (%s) is neither a number nor a string.",
                    key,
                    value,
                    type(value).__name__,
                )
        self.tb_writer.flush()

    def on_train_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.tb_writer is not None:
            self.tb_writer.close()
            self.tb_writer = None


class JsonlLoggerCallback(TrainerCallback):
    """Appends each log to a JSON-lines file: one object ``{**logs, "step": global_step}`` per line.

    The lines are the ``log_history`` entries of ``trainer_state.json``. Numpy scalars and one-element tensors are
    written as numbers; NaN and infinities as ``NaN`` / ``Infinity`` (as Python's json and ``trainer_state.json``
    do); other values as their ``str``. Only the global rank 0 writes; the parent folder is created if needed.

    Args:
        path: The file to write.
        append: Keep what the file already holds (a resumed run continues it); ``False`` empties it on first write.
    """

    def __init__(self, path: str | os.PathLike[str], append: bool = True) -> None:
        self.path = os.fspath(path)
        self._truncate = not append

    def on_log(
        self, args: Any, state: TrainerState, control: TrainerControl, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        record = {**denumpify_detensorize(dict(logs or {})), "step": state.global_step}
        line = json.dumps(record, default=str) + "\n"
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "w" if self._truncate else "a", encoding="utf-8") as f:
            f.write(line)
        self._truncate = False
