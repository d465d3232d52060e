"""The trainer's bookkeeping: :class:`TrainerState`, :class:`TrainerControl` and stateful callbacks.

These are the objects a Hugging Face callback receives as ``state`` and ``control``. They have transformers' fields,
defaults and ``trainer_state.json`` format (``dataclasses.asdict``, ``indent=2``, sorted keys, a final newline), so
a checkpoint folder written by either library resumes in the other and users' tooling reads it unchanged.

A "step" is one optimizer update everywhere here (``global_step``, ``max_steps``, ``logging_steps``...).

Example:
    >>> import json, os, tempfile
    >>> state = TrainerState(global_step=3, stateful_callbacks=[TrainerControl(should_save=True)])
    >>> path = os.path.join(tempfile.mkdtemp(), "trainer_state.json")
    >>> state.save_to_json(path)
    >>> TrainerState.load_from_json(path) == state
    True
    >>> json.load(open(path))["stateful_callbacks"]["TrainerControl"]["args"]["should_save"]
    True
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from ftrain.trainer.plan import resolve_interval
from ftrain.trainer.utils import hf_logger

__all__ = [
    "ExportableState",
    "TrainerControl",
    "TrainerState",
    "compare_trainer_and_checkpoint_args",
    "export_callback_states",
    "hp_params",
]

logger = logging.getLogger(__name__)


@runtime_checkable
class ExportableState(Protocol):
    """An object whose state goes into ``trainer_state.json`` and comes back on resume (an early-stopping counter).

    ``state()`` returns ``{"args": {...}, "attributes": {...}}`` of JSON values: ``args`` rebuild the object through
    its constructor and ``attributes`` are then set on it. Subclass it to get :meth:`from_state`; or just define
    ``state`` and ``from_state``: the check is structural, so ``isinstance(cb, ExportableState)`` is also true for
    callbacks written against ``transformers.ExportableState``.
    """

    def state(self) -> dict[str, dict[str, Any]]:
        """The constructor arguments and attributes that recreate this object; see the class docstring."""
        raise NotImplementedError(f"{type(self).__name__} must implement state() to be saved in trainer_state.json.")

    @classmethod
    def from_state(cls, state: dict[str, dict[str, Any]]) -> Any:
        """Rebuilds an object from :meth:`state`'s output: ``cls(**state["args"])``, then sets each attribute.

        Args:
            state: ``{"args": {...}, "attributes": {...}}``.

        Returns:
            The new instance.
        """
        instance = cls(**state["args"])
        for name, value in state["attributes"].items():
            setattr(instance, name, value)
        return instance


def export_callback_states(callbacks: Iterable[Any]) -> dict[str, Any]:
    """The ``stateful_callbacks`` entry of ``trainer_state.json`` for these objects.

    Keys are class names; a class that occurs more than once maps to the list of its instances' states, in order.

    Args:
        callbacks: Objects implementing :class:`ExportableState` (others raise).

    Returns:
        ``{class name: state() or [state(), ...]}``.

    Raises:
        TypeError: An object has no ``state()`` method.
    """
    states: dict[str, Any] = {}
    for callback in callbacks:
        if not isinstance(callback, ExportableState):
            raise TypeError(
                f"Only callbacks with state() and from_state() (ftrain or transformers ExportableState) can be saved "
                f"in trainer_state.json; got {type(callback).__name__}. Implement both, or leave it out."
            )
        name = type(callback).__name__
        if name not in states:
            states[name] = callback.state()
        elif isinstance(states[name], list):
            states[name].append(callback.state())
        else:
            states[name] = [states[name], callback.state()]
    return states


def hp_params(trial: Any) -> dict[str, Any]:
    """The hyper-parameters of a search trial: an optuna trial's ``params``, or a ray / wandb config dict itself.

    Raises:
        RuntimeError: ``trial`` is neither.
    """
    if isinstance(trial, dict):
        return trial
    params = getattr(trial, "params", None)
    if isinstance(params, dict):
        return params
    raise RuntimeError(f"Unknown type for trial {type(trial)}: expected an optuna trial or a ray / wandb dict.")


@dataclasses.dataclass
class TrainerState:
    """The trainer's progress and history, saved as ``trainer_state.json`` in every checkpoint.

    Field names, defaults and JSON layout are transformers' (``TrainerState``), so files are interchangeable.

    Args:
        epoch: Fractional epoch reached (``epoch + (micro_batch + 1) / steps_in_epoch``).
        global_step: Optimizer updates done.
        max_steps: Optimizer updates planned for this training run.
        logging_steps: Log every this many updates (a ratio in ``args`` is resolved by :meth:`compute_steps`).
        eval_steps: Evaluate every this many updates.
        save_steps: Save every this many updates.
        train_batch_size: Per-device batch size used (it can change under ``auto_find_batch_size``).
        num_train_epochs: Epochs planned.
        num_input_tokens_seen: Input tokens seen so far, when token counting is on.
        total_flos: Floating-point operations so far (a float, to avoid overflow).
        log_history: Every log so far, each ``{**logs, "step": global_step}``.
        best_metric: Best value of ``metric_for_best_model`` so far.
        best_global_step: Step at which ``best_metric`` was reached.
        best_model_checkpoint: Checkpoint folder of the best model.
        is_local_process_zero: This process is rank 0 on its node.
        is_world_process_zero: This process is the global rank 0.
        is_hyper_param_search: Training runs inside a hyper-parameter search.
        trial_name: The search trial's name.
        trial_params: The search trial's hyper-parameters.
        stateful_callbacks: Given a list of :class:`ExportableState` objects, it is stored as their exported states
            (:func:`export_callback_states`); a dict (from a JSON file) is kept as is.
    """

    epoch: float = 0
    global_step: int = 0
    max_steps: int = 0
    logging_steps: int = 500
    eval_steps: int = 500
    save_steps: int = 500
    train_batch_size: int | None = None
    num_train_epochs: int = 0
    num_input_tokens_seen: int = 0
    total_flos: float = 0
    log_history: list[dict[str, float]] = None  # type: ignore[assignment]  # None -> [] (transformers' signature)
    best_metric: float | None = None
    best_global_step: int | None = None
    best_model_checkpoint: str | None = None
    is_local_process_zero: bool = True
    is_world_process_zero: bool = True
    is_hyper_param_search: bool = False
    trial_name: str | None = None
    trial_params: dict[str, str | float | int | bool] | None = None
    stateful_callbacks: Any = None

    def __post_init__(self) -> None:
        if self.log_history is None:
            self.log_history = []
        if self.stateful_callbacks is None:
            self.stateful_callbacks = {}
        elif not isinstance(self.stateful_callbacks, dict):
            self.stateful_callbacks = export_callback_states(self.stateful_callbacks)

    def to_json_string(self) -> str:
        """The exact text :meth:`save_to_json` writes (sorted keys, 2-space indent, final newline)."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    def save_to_json(self, json_path: str | os.PathLike[str]) -> None:
        """Writes this state as JSON to ``json_path``, byte for byte as transformers would."""
        with open(json_path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def load_from_json(cls, json_path: str | os.PathLike[str]) -> TrainerState:
        """Reads a ``trainer_state.json`` written by ftrain or by transformers (4.x or 5.x).

        Keys this version does not know (from a newer writer) are dropped with a warning instead of failing.

        Args:
            json_path: The file to read.

        Returns:
            The state.
        """
        with open(json_path, encoding="utf-8") as f:
            content = json.load(f)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(content) - known)
        if unknown:
            logger.warning("Ignoring unknown keys %s in %s (written by a newer version?).", unknown, json_path)
        return cls(**{k: v for k, v in content.items() if k in known})

    def compute_steps(self, args: Any, max_steps: int) -> None:
        """Sets ``logging_steps``, ``eval_steps`` and ``save_steps`` from ``args``; a value below 1 is a ratio.

        A ratio ``r`` becomes ``ceil(max_steps * r)`` updates (:func:`ftrain.trainer.plan.resolve_interval`);
        ``None`` keeps the current value.

        Args:
            args: Training arguments, or the Trainer plan's ``intervals`` (only ``logging_steps``, ``eval_steps``,
                ``save_steps`` are read).
            max_steps: Total optimizer updates of the run.

        Example:
            >>> from ftrain.trainer.plan import Intervals
            >>> state = TrainerState()
            >>> state.compute_steps(Intervals(logging_steps=0.1, eval_steps=None, save_steps=30), max_steps=95)
            >>> state.logging_steps, state.eval_steps, state.save_steps
            (10, 500, 30)
        """
        for kind in ("logging", "eval", "save"):
            num_steps = getattr(args, f"{kind}_steps")
            if num_steps is not None:
                setattr(self, f"{kind}_steps", resolve_interval(num_steps, max_steps))

    def init_training_references(self, trainer: Any, max_steps: int, num_train_epochs: int, trial: Any) -> None:
        """Records the run's size, the process ranks and the search trial, at the start of training.

        Args:
            trainer: Read for ``hp_name`` and ``_trial`` (trial naming), ``is_local_process_zero()`` and
                ``is_world_process_zero()``.
            max_steps: Optimizer updates planned.
            num_train_epochs: Epochs planned.
            trial: The hyper-parameter search trial, or ``None``.
        """
        hp_name, current_trial = trainer.hp_name, trainer._trial  # as transformers: every Trainer has both
        if hp_name is not None and current_trial is not None:
            self.trial_name = hp_name(current_trial)
        self.trial_params = None if trial is None else hp_params(trial)
        self.max_steps = max_steps
        self.num_train_epochs = num_train_epochs
        self.is_local_process_zero = trainer.is_local_process_zero()
        self.is_world_process_zero = trainer.is_world_process_zero()


def compare_trainer_and_checkpoint_args(training_args: Any, trainer_state: Any) -> None:
    """On a resume, warns about the arguments that differ from the run that wrote the checkpoint, as transformers'
    function of this name: ``logging_steps``, ``eval_steps``, ``save_steps`` and the per-device batch size.

    Each mismatch is a line ``"<name>: <args value> (from args) != <saved value> (from trainer_state.json)"`` of one
    warning through ``transformers.trainer_utils``' logger. An interval given as a ratio (below 1) is compared once
    resolved with the saved run's ``max_steps`` (transformers compares the ratio itself, so it always differs); an
    argument or saved value that is ``None`` is not compared. The saved ``train_batch_size`` is per process, so it is
    compared with ``per_device_train_batch_size * max(1, n_gpu)`` as transformers does.

    Args:
        training_args: The current training arguments.
        trainer_state: The state read from the checkpoint.

    Example:
        >>> from types import SimpleNamespace
        >>> args = SimpleNamespace(logging_steps=10, eval_steps=None, save_steps=0.5, per_device_train_batch_size=8,
        ...                        n_gpu=0)
        >>> state = TrainerState(max_steps=20, logging_steps=5, save_steps=10, train_batch_size=4)
        >>> for line in _mismatches(args, state):  # save_steps=0.5 of max_steps=20 is the saved 10
        ...     print(line)
        logging_steps: 10 (from args) != 5 (from trainer_state.json)
        per_device_train_batch_size: 8 (from args) != 4 (from trainer_state.json)
    """
    lines = _mismatches(training_args, trainer_state)
    if lines:
        hf_logger("trainer_utils").warning(
            "The arguments differ from those of the run that wrote the checkpoint's trainer_state.json:\n\t"
            + "\n\t".join(lines)
        )


def _mismatches(training_args: Any, trainer_state: Any) -> list[str]:
    """The lines of :func:`compare_trainer_and_checkpoint_args`' warning."""
    compared = []
    for name in ("logging_steps", "eval_steps", "save_steps"):
        value, saved = getattr(training_args, name, None), getattr(trainer_state, name, None)
        compared.append((name, value, resolve_interval(value, trainer_state.max_steps), saved))
    saved_batch = trainer_state.train_batch_size
    if saved_batch is not None:
        per_device = saved_batch // max(1, getattr(training_args, "n_gpu", 0))
        batch = training_args.per_device_train_batch_size
        compared.append(("per_device_train_batch_size", batch, batch, per_device))
    return [
        f"{name}: {value} (from args) != {saved} (from trainer_state.json)"
        for name, value, resolved, saved in compared
        if value is not None and saved is not None and resolved != saved
    ]


@dataclasses.dataclass
class TrainerControl(ExportableState):
    """The switches callbacks flip to steer the loop; the trainer acts on them and resets them.

    ``should_training_stop`` stays set until a new training starts; ``should_epoch_stop`` is reset when an epoch
    begins; ``should_log``, ``should_evaluate`` and ``should_save`` are reset when a step begins and after the trainer
    has logged, evaluated or saved.

    Args:
        should_training_stop: Stop training.
        should_epoch_stop: End the current epoch.
        should_save: Save a checkpoint at this step.
        should_evaluate: Evaluate at this step.
        should_log: Log at this step.
    """

    should_training_stop: bool = False
    should_epoch_stop: bool = False
    should_save: bool = False
    should_evaluate: bool = False
    should_log: bool = False

    def _new_training(self) -> None:
        """Resets what a new training run starts without."""
        self.should_training_stop = False

    def _new_epoch(self) -> None:
        """Resets what a new epoch starts without."""
        self.should_epoch_stop = False

    def _new_step(self) -> None:
        """Resets what a new optimizer step starts without."""
        self.should_save = False
        self.should_evaluate = False
        self.should_log = False

    def state(self) -> dict[str, dict[str, Any]]:
        """All five switches as constructor arguments (see :class:`ExportableState`)."""
        return {"args": dataclasses.asdict(self), "attributes": {}}
