"""Callbacks: the hooks a Hugging Face Trainer script uses, with transformers' events, order and decisions.

A callback has one method per event, each called as ``callback.on_<event>(args, state, control, **kwargs)``; the
keyword arguments are ``model``, ``processing_class``, ``optimizer``, ``lr_scheduler``, ``train_dataloader``,
``eval_dataloader`` and, for some events, ``metrics`` or ``logs``. A callback steers the loop only through
``control`` (:class:`TrainerControl`); returning a control object replaces the one the next callback sees.

:class:`CallbackHandler` calls them in order. Everything is duck-typed: callbacks written against
``transformers.TrainerCallback`` run here unchanged, and the built-in callbacks only read attributes of ``args``, so
they work with ftrain's ``TrainingArguments`` and with transformers' own. Nothing here imports transformers; once a
script has imported transformers' callback module, the built-in callbacks the handler installs are also instances of
transformers' classes of the same name (:func:`builtin_class`), so HF code's ``isinstance`` checks find them. Messages
go through transformers' logger names (:func:`~ftrain.trainer.utils.hf_logger`), as transformers writes them.

Example:
    >>> from types import SimpleNamespace
    >>> class Recorder(TrainerCallback):
    ...     def on_step_end(self, args, state, control, **kwargs):
    ...         print("step", state.global_step, "log:", control.should_log)
    >>> handler = CallbackHandler([DefaultFlowCallback, Recorder()], None, None, None, None)
    >>> args = SimpleNamespace(logging_strategy="steps", eval_strategy="no", save_strategy="no", logging_steps=2)
    >>> state, control = TrainerState(max_steps=2, logging_steps=2), TrainerControl()
    >>> for _ in range(2):
    ...     control = handler.on_step_begin(args, state, control)
    ...     state.global_step += 1
    ...     control = handler.on_step_end(args, state, control)
    step 1 log: False
    step 2 log: True
    >>> control.should_training_stop
    True
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

from ftrain.trainer.trainer_state import ExportableState, TrainerControl, TrainerState
from ftrain.trainer.utils import has_length, hf_logger, strategy_value

__all__ = [
    "DEFAULT_CALLBACKS",
    "DEFAULT_PROGRESS_CALLBACK",
    "CallbackHandler",
    "DefaultFlowCallback",
    "EarlyStoppingCallback",
    "ExportableState",
    "PrinterCallback",
    "ProgressCallback",
    "TrainerCallback",
    "TrainerControl",
    "TrainerState",
    "builtin_class",
    "is_callback_of",
    "restore_callback_states",
]

logger = hf_logger("trainer_callback")

EVENTS = (
    "on_init_end",
    "on_train_begin",
    "on_train_end",
    "on_epoch_begin",
    "on_epoch_end",
    "on_step_begin",
    "on_pre_optimizer_step",
    "on_optimizer_step",
    "on_substep_end",
    "on_step_end",
    "on_evaluate",
    "on_predict",
    "on_save",
    "on_log",
    "on_prediction_step",
    "on_push_begin",
)


class TrainerCallback:
    """Base class for callbacks: every event is a no-op; override the ones you need.

    Each event receives ``(args, state, control, **kwargs)`` (see the module docstring for the keyword arguments).
    Return ``None`` to leave ``control`` as it is, or a :class:`TrainerControl` to replace it.

    Example:
        >>> class StopAtTen(TrainerCallback):
        ...     def on_step_end(self, args, state, control, **kwargs):
        ...         if state.global_step >= 10:
        ...             control.should_training_stop = True
        ...         return control
    """

    def on_init_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Called when the ``Trainer`` has finished ``__init__``."""

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Called when ``train()`` starts, before the first epoch."""

    def on_train_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Called when training has finished (after the last step, or when it was stopped)."""

    def on_epoch_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Called at the start of each epoch."""

    def on_epoch_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Called at the end of each epoch."""

    def on_step_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Called before the first micro-batch of an optimizer step (a step spans all accumulated micro-batches)."""

    def on_pre_optimizer_step(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Called after gradient clipping, before the optimizer update: the gradients are final."""

    def on_optimizer_step(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Called after the optimizer update, before the gradients are cleared."""

    def on_substep_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Called after each micro-batch of gradient accumulation except the last one of a step."""

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Called after an optimizer step, once ``state.global_step`` and ``state.epoch`` are updated."""

    def on_evaluate(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Called after an evaluation, with its ``metrics``."""

    def on_predict(self, args: Any, state: TrainerState, control: TrainerControl, metrics: Any, **kwargs: Any) -> Any:
        """Called after ``predict()`` has finished, with its ``metrics``."""

    def on_save(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Called after a checkpoint has been saved."""

    def on_log(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Called after the trainer has logged, with the ``logs`` dict."""

    def on_prediction_step(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Called after each batch of an evaluation or prediction loop."""

    def on_push_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Called before the model is pushed to the Hugging Face Hub."""


# The built-in callbacks ftrain has in place of transformers' classes of the same name.
_TWIN_NAMES = frozenset(
    {
        "DefaultFlowCallback",
        "ProgressCallback",
        "PrinterCallback",
        "EarlyStoppingCallback",
        "TensorBoardCallback",
        "JITCheckpointCallback",
    }
)
_TWIN_PACKAGES = frozenset({"ftrain", "transformers"})


def _package(klass: type) -> str:
    return klass.__module__.split(".", 1)[0]


def _builtin_name(klass: type) -> str | None:
    """The built-in callback ``klass`` is (ftrain's class, transformers' class of that name, or ftrain's class
    deriving from both), by name; ``None`` for any other class."""
    return klass.__name__ if klass.__name__ in _TWIN_NAMES and _package(klass) in _TWIN_PACKAGES else None


def _same_builtin(a: type, b: type) -> bool:
    """Whether ``a`` and ``b`` are the same built-in callback, each from ftrain or from transformers."""
    name = _builtin_name(a)
    return name is not None and name == _builtin_name(b)


def is_callback_of(callback: Any, klass: type) -> bool:
    """Whether ``callback`` is an instance of ``klass``, counting ftrain's built-in callbacks as instances of
    transformers' classes of the same name and the other way round (ftrain installs its own ``DefaultFlowCallback``,
    so ``trainer.remove_callback(transformers.DefaultFlowCallback)`` must find it, even where it was installed
    before transformers' callback module was imported: see :func:`builtin_class`).

    Example:
        >>> is_callback_of(PrinterCallback(), TrainerCallback), is_callback_of(PrinterCallback(), ProgressCallback)
        (True, False)
    """
    return isinstance(callback, klass) or any(_same_builtin(k, klass) for k in type(callback).__mro__)


def builtin_class(klass: type) -> type:
    """The class to instantiate for the callback class ``klass``.

    For ftrain's ``DefaultFlowCallback``, ``ProgressCallback`` and ``PrinterCallback`` (and
    ``JITCheckpointCallback``, once transformers' ``trainer_jit_checkpoint`` is imported too), once transformers'
    callback module is imported: ftrain's subclass deriving from transformers' class of the same name too
    (:mod:`ftrain.trainer.transformers_callbacks`): its methods are ftrain's, and ``isinstance(cb,
    transformers.DefaultFlowCallback)`` in HF code (``_get_callback``-style lookups, TRL) is true, as with
    transformers' Trainer. Code that can name transformers' classes has imported that module, so ftrain never
    imports transformers for this. Any other class is returned as it is.

    Example:
        >>> builtin_class(TrainerCallback) is TrainerCallback
        True
    """
    if "transformers.trainer_callback" not in sys.modules:
        return klass
    from ftrain.trainer.transformers_callbacks import twin

    return twin(klass)


class CallbackHandler(TrainerCallback):
    """Calls a list of callbacks in order, passing each the control object the previous one returned.

    Before calling the callbacks, some events reset switches of ``control``: ``on_train_begin`` resets
    ``should_training_stop``, ``on_epoch_begin`` ``should_epoch_stop``, ``on_step_begin`` the log/evaluate/save
    switches, and ``on_evaluate``, ``on_save``, ``on_log`` the switch that asked for them.

    Args:
        callbacks: Callback classes (instantiated without arguments) or instances, in calling order.
        model: Passed to every callback as ``model``.
        processing_class: Passed as ``processing_class`` (a tokenizer or processor).
        optimizer: Passed as ``optimizer``.
        lr_scheduler: Passed as ``lr_scheduler``.
    """

    def __init__(self, callbacks: Any, model: Any, processing_class: Any, optimizer: Any, lr_scheduler: Any) -> None:
        self.callbacks: list[Any] = []
        for callback in callbacks:
            self.add_callback(callback)
        self.model = model
        self.processing_class = processing_class
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.train_dataloader: Any = None
        self.eval_dataloader: Any = None
        if not any(is_callback_of(cb, DefaultFlowCallback) for cb in self.callbacks):
            logger.warning(
                "There is no DefaultFlowCallback among the callbacks, so nothing will ask the trainer to log, "
                "evaluate, save or stop at max_steps. Add one with trainer.add_callback(DefaultFlowCallback). "
                "Callbacks:\n%s",
                self.callback_list,
            )

    def add_callback(self, callback: Any) -> None:
        """Appends a callback (a class is instantiated without arguments, through :func:`builtin_class`); warns,
        naming the class in the message, if its class is already there."""
        instance = builtin_class(callback)() if isinstance(callback, type) else callback
        klass = callback if isinstance(callback, type) else type(callback)
        if any(type(cb) is klass or _same_builtin(type(cb), klass) for cb in self.callbacks):
            logger.warning(
                f"Adding a second {klass} to the callbacks; both will be called. Callbacks so far:\n"
                + self.callback_list
            )
        self.callbacks.append(instance)

    def pop_callback(self, callback: Any) -> Any:
        """Removes and returns the first callback that is an instance of ``callback`` (a class; ftrain's built-in
        callbacks count as instances of transformers' classes of the same name, see :func:`is_callback_of`) or
        equals it.

        Returns:
            The removed callback, or ``None`` when there is no match.
        """
        by_class = isinstance(callback, type)
        for cb in self.callbacks:
            if (by_class and is_callback_of(cb, callback)) or (not by_class and cb == callback):
                self.callbacks.remove(cb)
                return cb
        return None

    def remove_callback(self, callback: Any) -> None:
        """Removes the first instance of ``callback`` (a class; nothing happens without a match) or ``callback`` itself.

        Raises:
            ValueError: ``callback`` is an instance that is not in the list.
        """
        if isinstance(callback, type):
            self.pop_callback(callback)
        else:
            self.callbacks.remove(callback)

    @property
    def callback_list(self) -> str:
        """The callbacks' class names, one per line."""
        return "\n".join(type(cb).__name__ for cb in self.callbacks)

    def call_event(self, event: str, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Calls ``event`` on every callback in order and returns the resulting control object.

        A callback that returns something other than ``None`` replaces ``control`` for the callbacks after it. A
        callback without a method for the event (written against an older transformers) is skipped.

        Args:
            event: The method name, e.g. ``"on_step_end"``.
            args: The training arguments.
            state: The trainer state.
            control: The current control object.
            **kwargs: Event-specific keyword arguments (``metrics``, ``logs``...).

        Returns:
            The control object after the last callback.
        """
        for callback in self.callbacks:
            method = getattr(callback, event, None)
            if method is None:
                continue
            result = method(
                args,
                state,
                control,
                model=self.model,
                processing_class=self.processing_class,
                optimizer=self.optimizer,
                lr_scheduler=self.lr_scheduler,
                train_dataloader=self.train_dataloader,
                eval_dataloader=self.eval_dataloader,
                **kwargs,
            )
            if result is not None:
                control = result
        return control

    def on_init_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        return self.call_event("on_init_end", args, state, control, **kwargs)

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        control.should_training_stop = False
        return self.call_event("on_train_begin", args, state, control, **kwargs)

    def on_train_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        return self.call_event("on_train_end", args, state, control, **kwargs)

    def on_epoch_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        control.should_epoch_stop = False
        return self.call_event("on_epoch_begin", args, state, control, **kwargs)

    def on_epoch_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        return self.call_event("on_epoch_end", args, state, control, **kwargs)

    def on_step_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        control.should_log = False
        control.should_evaluate = False
        control.should_save = False
        return self.call_event("on_step_begin", args, state, control, **kwargs)

    def on_pre_optimizer_step(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        return self.call_event("on_pre_optimizer_step", args, state, control, **kwargs)

    def on_optimizer_step(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        return self.call_event("on_optimizer_step", args, state, control, **kwargs)

    def on_substep_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        return self.call_event("on_substep_end", args, state, control, **kwargs)

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        return self.call_event("on_step_end", args, state, control, **kwargs)

    def on_evaluate(self, args: Any, state: TrainerState, control: TrainerControl, metrics: Any, **kwargs: Any) -> Any:
        control.should_evaluate = False
        return self.call_event("on_evaluate", args, state, control, metrics=metrics, **kwargs)

    def on_predict(self, args: Any, state: TrainerState, control: TrainerControl, metrics: Any, **kwargs: Any) -> Any:
        return self.call_event("on_predict", args, state, control, metrics=metrics, **kwargs)

    def on_save(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        control.should_save = False
        return self.call_event("on_save", args, state, control, **kwargs)

    def on_log(self, args: Any, state: TrainerState, control: TrainerControl, logs: Any, **kwargs: Any) -> Any:
        control.should_log = False
        return self.call_event("on_log", args, state, control, logs=logs, **kwargs)

    def on_prediction_step(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        return self.call_event("on_prediction_step", args, state, control, **kwargs)

    def on_push_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        return self.call_event("on_push_begin", args, state, control, **kwargs)


def restore_callback_states(handler: CallbackHandler, control: Any, stored: dict[str, Any]) -> Any:
    """Restores callbacks from a checkpoint's ``stateful_callbacks`` (``restore_callback_states_from_checkpoint``).

    Each stored entry is matched by class name with the handler's callbacks and ``control`` (the n-th stored state
    of a class goes to the n-th callback of that class); a match is rebuilt as ``type(cb)(**args)`` with the stored
    attributes set, and takes the old callback's place in the list. Stored names with no match are logged and ignored.

    Args:
        handler: The callback handler; its list is updated in place.
        control: The trainer's current control object.
        stored: ``TrainerState.stateful_callbacks`` as loaded from ``trainer_state.json``.

    Returns:
        The control object to use from now on (rebuilt if it was stored, else ``control``).
    """
    pool = [*handler.callbacks, control]
    not_found = []
    for name, entries in stored.items():
        matches = [i for i, cb in enumerate(pool) if type(cb).__name__ == name]
        if not matches:
            not_found.append(name)
            continue
        for i, entry in zip(matches, entries if isinstance(entries, list) else [entries]):
            rebuilt = type(pool[i])(**entry.get("args", {}))
            for attribute, value in entry.get("attributes", {}).items():
                setattr(rebuilt, attribute, value)
            pool[i] = rebuilt
    if not_found:  # transformers' Trainer writes this one, through its own logger
        hf_logger("trainer").warning(
            f"The checkpoint has states for callbacks that are not in use; ignoring {', '.join(not_found)}."
        )
    handler.callbacks[:] = pool[:-1]
    return pool[-1]


class DefaultFlowCallback(TrainerCallback):
    """Decides when to log, evaluate, save and stop, from the ``*_strategy`` and ``*_steps`` arguments.

    After each step: log at step 1 with ``logging_first_step`` and every ``logging_steps``; evaluate every
    ``eval_steps`` once ``eval_delay`` steps have passed; save every ``save_steps``; at ``max_steps`` stop, evaluate
    (steps strategy, unless this step already evaluates) and save (steps strategy). After each epoch: the ``"epoch"``
    strategies (evaluation once ``epoch >= eval_delay``). ``save_strategy="best"`` is the trainer's decision, made
    after an evaluation. Step counts come from ``state`` (ratios resolved by ``TrainerState.compute_steps``).
    """

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> TrainerControl:
        step = state.global_step
        eval_by_steps = strategy_value(args.eval_strategy) == "steps"
        eval_delay = getattr(args, "eval_delay", 0)
        if step == 1 and getattr(args, "logging_first_step", False):
            control.should_log = True
        if strategy_value(args.logging_strategy) == "steps" and step % state.logging_steps == 0:
            control.should_log = True
        if eval_by_steps and step % state.eval_steps == 0 and eval_delay <= step:
            control.should_evaluate = True
        save_by_steps = strategy_value(args.save_strategy) == "steps"
        if save_by_steps and state.save_steps > 0 and step % state.save_steps == 0:
            control.should_save = True
        if step >= state.max_steps:
            control.should_training_stop = True
            if eval_by_steps and step % state.eval_steps != 0 and eval_delay <= step:
                control.should_evaluate = True  # a final evaluation, unless this step already has one
            if save_by_steps:
                control.should_save = True
        return control

    def on_epoch_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> TrainerControl:
        if strategy_value(args.logging_strategy) == "epoch":
            control.should_log = True
        if strategy_value(args.eval_strategy) == "epoch" and getattr(args, "eval_delay", 0) <= state.epoch:
            control.should_evaluate = True
        if strategy_value(args.save_strategy) == "epoch":
            control.should_save = True
        return control


def _format_logs(logs: dict[str, Any], max_str_len: int | None = None) -> dict[str, Any]:
    """A copy of ``logs`` for display: floats as ``.4g`` strings, long strings replaced, ``total_flos`` dropped."""
    shown = {}
    for key, value in logs.items():
        if key == "total_flos":
            continue
        if max_str_len is not None and isinstance(value, str) and len(value) > max_str_len:
            value = (
                f"[String too long to display, length: {len(value)} > {max_str_len}. "
                "Consider increasing `max_str_len` if needed.]"
            )
        elif isinstance(value, float):
            value = f"{value:.4g}"
        shown[key] = value
    return shown


class ProgressCallback(TrainerCallback):
    """Shows tqdm bars for training (``max_steps`` updates) and for evaluation or prediction, and prints the logs.

    Only the global rank 0 draws. During training, each log is written above the bar with ``tqdm.write`` as
    ``str(dict)``: floats in ``.4g``, strings longer than ``max_str_len`` replaced by a note, ``total_flos`` left out.

    Args:
        max_str_len: Longest string value shown in a log line.
    """

    def __init__(self, max_str_len: int = 100) -> None:
        self.training_bar: Any = None
        self.prediction_bar: Any = None
        self.max_str_len = max_str_len
        self.current_step = 0

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, dynamic_ncols=True)
        self.current_step = 0

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.is_world_process_zero and self.training_bar is not None:
            self.training_bar.update(state.global_step - self.current_step)
            self.current_step = state.global_step

    def on_prediction_step(
        self, args: Any, state: TrainerState, control: TrainerControl, eval_dataloader: Any = None, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero and has_length(eval_dataloader):
            if self.prediction_bar is None:
                leave = self.training_bar is None  # inside training, the bar disappears when evaluation ends
                self.prediction_bar = tqdm(total=len(eval_dataloader), leave=leave, dynamic_ncols=True)
            self.prediction_bar.update(1)

    def _close_prediction_bar(self, state: TrainerState) -> None:
        if state.is_world_process_zero:
            if self.prediction_bar is not None:
                self.prediction_bar.close()
            self.prediction_bar = None

    def on_evaluate(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._close_prediction_bar(state)

    def on_predict(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._close_prediction_bar(state)

    def on_log(
        self, args: Any, state: TrainerState, control: TrainerControl, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero and self.training_bar is not None:
            self.training_bar.write(str(_format_logs(logs or {}, self.max_str_len)))

    def on_train_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.is_world_process_zero and self.training_bar is not None:
            self.training_bar.close()
            self.training_bar = None


class PrinterCallback(TrainerCallback):
    """Prints each log dict (floats as ``.4g``, no ``total_flos``) on the local rank 0; used with ``disable_tqdm``."""

    def on_log(
        self, args: Any, state: TrainerState, control: TrainerControl, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if state.is_local_process_zero:
            print(None if logs is None else _format_logs(logs))


class EarlyStoppingCallback(TrainerCallback, ExportableState):
    """Stops training when ``metric_for_best_model`` has not improved for ``early_stopping_patience`` evaluations.

    An evaluation improves when there is no ``state.best_metric`` yet, or when its metric is better than
    ``state.best_metric`` (per ``greater_is_better``) by more than ``early_stopping_threshold``. The trainer updates
    ``best_metric`` after this callback runs, so the comparison is with the best of the *earlier* evaluations. The
    counter is saved in checkpoints (:class:`ExportableState`).

    Args:
        early_stopping_patience: Evaluations without improvement before stopping.
        early_stopping_threshold: Smallest change that counts as an improvement (``None`` means 0).
    """

    def __init__(self, early_stopping_patience: int = 1, early_stopping_threshold: float | None = 0.0) -> None:
        self.early_stopping_patience = early_stopping_patience
        self.early_stopping_threshold = early_stopping_threshold
        self.early_stopping_patience_counter = 0  # evaluations in a row without improvement

    def check_metric_value(self, args: Any, state: TrainerState, control: TrainerControl, metric_value: float) -> None:
        """Resets the counter if ``metric_value`` improves on ``state.best_metric``, else increments it."""
        best = state.best_metric
        threshold = self.early_stopping_threshold or 0.0
        if best is None or (
            (metric_value > best if args.greater_is_better else metric_value < best)  # False for NaN
            and abs(metric_value - best) > threshold
        ):
            self.early_stopping_patience_counter = 0
        else:
            self.early_stopping_patience_counter += 1

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not args.load_best_model_at_end:
            logger.warning(
                "EarlyStoppingCallback is used without load_best_model_at_end=True: training stops early, but the "
                "best model is not loaded at the end."
            )
        if args.metric_for_best_model is None:
            raise ValueError(
                "EarlyStoppingCallback needs metric_for_best_model, e.g. TrainingArguments(metric_for_best_model="
                '"loss") (it is also set to "loss" by load_best_model_at_end=True).'
            )
        if strategy_value(args.eval_strategy) == "no":
            raise ValueError(
                'EarlyStoppingCallback needs evaluations during training: set eval_strategy="steps" or "epoch".'
            )

    def on_evaluate(
        self, args: Any, state: TrainerState, control: TrainerControl, metrics: dict[str, float], **kwargs: Any
    ) -> None:
        name = args.metric_for_best_model
        if not name.startswith("eval_"):
            name = f"eval_{name}"
        value = metrics.get(name)
        if value is None:
            logger.warning("Early stopping is disabled: the evaluation metrics have no %r (%s).", name, sorted(metrics))
            return
        self.check_metric_value(args, state, control, value)
        if self.early_stopping_patience_counter >= self.early_stopping_patience:
            control.should_training_stop = True

    def state(self) -> dict[str, dict[str, Any]]:
        """Patience and threshold as constructor arguments, the counter as an attribute."""
        return {
            "args": {
                "early_stopping_patience": self.early_stopping_patience,
                "early_stopping_threshold": self.early_stopping_threshold,
            },
            "attributes": {"early_stopping_patience_counter": self.early_stopping_patience_counter},
        }


DEFAULT_CALLBACKS: list[type[TrainerCallback]] = [DefaultFlowCallback]
DEFAULT_PROGRESS_CALLBACK: type[TrainerCallback] = ProgressCallback
