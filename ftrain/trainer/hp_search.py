"""Hyper-parameter search for the ``Trainer``: transformers' ``hyperparameter_search`` API, optuna backend.

Each trial applies its hyper-parameters (drawn from ``hp_space(trial)``) to a copy of the search's base arguments,
rebuilds the model through ``model_init`` (given the trial when it takes one argument) and calls ``train()``. The
objective is reported to the study after every evaluation during training by a callback (:class:`_HPSearchCallback`),
so optuna pruners can stop bad trials; when no evaluation ran during training, one ``evaluate()`` at the end gives it.

Only the optuna backend runs; ``"ray"`` and ``"wandb"`` are recognised names that raise a clear error.
"""

from __future__ import annotations

import copy
import enum
import importlib.util
import logging
import os
from collections.abc import Callable
from typing import Any, NamedTuple

from ftrain.trainer.callbacks import TrainerCallback
from ftrain.trainer.trainer_state import hp_params
from ftrain.trainer.utils import number_of_arguments

logger = logging.getLogger(__name__)

__all__ = [
    "BestRun",
    "HPSearchBackend",
    "HyperparameterSearchMixin",
    "default_compute_objective",
    "default_hp_search_backend",
    "default_hp_space_optuna",
]


class BestRun(NamedTuple):
    """The best run of a search: its id (the optuna trial number, as a string), objective, hyper-parameters and an
    optional backend summary (``None`` for optuna)."""

    run_id: str
    objective: float | list[float]
    hyperparameters: dict[str, Any]
    run_summary: Any | None = None


class HPSearchBackend(str, enum.Enum):
    """The search backends transformers knows; ftrain runs ``OPTUNA``."""

    OPTUNA = "optuna"
    RAY = "ray"
    WANDB = "wandb"


_INSTALL = {
    HPSearchBackend.OPTUNA: "pip install ftrain[optuna]",
    HPSearchBackend.RAY: "pip install 'ray[tune]'",
    HPSearchBackend.WANDB: "pip install wandb",
}
_MODULE = {HPSearchBackend.OPTUNA: "optuna", HPSearchBackend.RAY: "ray", HPSearchBackend.WANDB: "wandb"}


def _available(backend: HPSearchBackend) -> bool:
    return importlib.util.find_spec(_MODULE[backend]) is not None


def default_hp_search_backend() -> str:
    """The first installed backend of optuna, ray, wandb (transformers' order).

    Raises:
        RuntimeError: none is installed.
    """
    for backend in HPSearchBackend:
        if _available(backend):
            return backend.value
    raise RuntimeError(
        "No hyperparameter search backend is installed. Install optuna with `pip install ftrain[optuna]`."
    )


def default_compute_objective(metrics: dict[str, float]) -> float:
    """transformers' default objective: ``eval_loss`` when the metrics hold nothing else (``epoch`` and the speed
    metrics ``*_runtime`` / ``*_per_second`` do not count), otherwise the sum of the other metrics.

    >>> default_compute_objective({"eval_loss": 2.0, "epoch": 1.0, "eval_runtime": 0.1})
    2.0
    >>> default_compute_objective({"eval_loss": 2.0, "eval_accuracy": 0.5, "eval_f1": 0.25})
    0.75
    """
    rest = {k: v for k, v in metrics.items() if k not in ("eval_loss", "epoch")}
    rest = {k: v for k, v in rest.items() if not (k.endswith("_runtime") or k.endswith("_per_second"))}
    return metrics.get("eval_loss") if not rest else sum(rest.values())


def default_hp_space_optuna(trial: Any) -> dict[str, float]:
    """transformers' default optuna space: ``learning_rate`` log-uniform in [1e-6, 1e-4], ``num_train_epochs`` in
    1..5, ``seed`` in 1..40 and ``per_device_train_batch_size`` among 4, 8, 16, 32, 64."""
    if not _available(HPSearchBackend.OPTUNA):
        raise ImportError(f"This function needs optuna: `{_INSTALL[HPSearchBackend.OPTUNA]}`")
    return {
        "learning_rate": trial.suggest_float("learning_rate", 1e-6, 1e-4, log=True),
        "num_train_epochs": trial.suggest_int("num_train_epochs", 1, 5),
        "seed": trial.suggest_int("seed", 1, 40),
        "per_device_train_batch_size": trial.suggest_categorical("per_device_train_batch_size", [4, 8, 16, 32, 64]),
    }


class _HPSearchCallback(TrainerCallback):
    """Marks the state as a search trial at ``on_train_begin`` and reports the objective of every evaluation during
    training to the search (``trainer._report_to_hp_search``), which may raise ``optuna.TrialPruned``."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.active = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.active = True
        trial = self.trainer._trial
        state.is_hyper_param_search = trial is not None
        if trial is not None:
            state.trial_params = hp_params(trial)
            if self.trainer.hp_name is not None:
                state.trial_name = self.trainer.hp_name(trial)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.active = False

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        if self.active and metrics is not None:
            self.trainer._report_to_hp_search(self.trainer._trial, state.global_step, metrics)


class HyperparameterSearchMixin:
    """``Trainer.hyperparameter_search`` (transformers' API). Needs the Trainer's ``args``, ``model_init``,
    ``call_model_init``, ``train``, ``evaluate``, ``state``, ``control``, ``callback_handler`` and
    ``add_callback`` / ``remove_callback``."""

    hp_search_backend: HPSearchBackend | None = None
    hp_space: Callable[[Any], dict[str, Any]] | None = None
    hp_name: Callable[[Any], str] | None = None
    compute_objective: Callable[[dict[str, float]], float] | None = None
    objective: float | None = None
    _trial: Any = None

    def hyperparameter_search(
        self,
        hp_space: Callable[[Any], dict[str, float]] | None = None,
        compute_objective: Callable[[dict[str, float]], float] | None = None,
        n_trials: int = 20,
        direction: str | list[str] = "minimize",
        backend: str | HPSearchBackend | None = None,
        hp_name: Callable[[Any], str] | None = None,
        **kwargs: Any,
    ) -> BestRun | list[BestRun]:
        """Runs ``n_trials`` trainings with hyper-parameters drawn from ``hp_space`` and returns the best.

        Args:
            hp_space: ``trial -> dict`` of ``TrainingArguments`` fields (default :func:`default_hp_space_optuna`).
            compute_objective: ``metrics -> float`` (default :func:`default_compute_objective`).
            n_trials: the number of trials.
            direction: ``"minimize"`` / ``"maximize"``, or a list of them (multi-objective, optuna only).
            backend: ``"optuna"`` (default: the first installed backend).
            hp_name: ``trial -> str``, the trial's name (``state.trial_name`` and the trial's output folder).
            **kwargs: ``optuna.create_study`` arguments, plus ``timeout``, ``n_jobs``, ``gc_after_trial`` and
                ``catch`` for ``study.optimize``.

        Returns:
            ``BestRun(run_id, objective, hyperparameters)``, or a list of them for a multi-objective search.

        Raises:
            RuntimeError: no ``model_init`` was given to the Trainer, or no backend is installed.
            ImportError: the backend is not installed.
            NotImplementedError: ``"ray"`` / ``"wandb"`` (not supported by ftrain).
            ValueError: an unknown backend name.
        """
        backend = HPSearchBackend(default_hp_search_backend() if backend is None else backend)
        if backend is not HPSearchBackend.OPTUNA:
            if not _available(backend):
                raise ImportError(
                    f"You picked the {backend.value} backend, but it is not installed (`{_INSTALL[backend]}`); "
                    f"ftrain's Trainer only supports the optuna backend (`{_INSTALL[HPSearchBackend.OPTUNA]}`)."
                )
            raise NotImplementedError(
                f"The {backend.value} hyperparameter search backend is not supported by ftrain's Trainer; use "
                f"backend='optuna' (`{_INSTALL[HPSearchBackend.OPTUNA]}`)."
            )
        if not _available(backend):
            raise ImportError(
                f"You picked the optuna backend, but it is not installed. Run `{_INSTALL[HPSearchBackend.OPTUNA]}`."
            )
        if self.model_init is None:
            raise RuntimeError(
                "To use hyperparameter search, you need to pass your model through a model_init function."
            )
        self.hp_search_backend = backend
        self.hp_space = default_hp_space_optuna if hp_space is None else hp_space
        self.hp_name = hp_name
        self.compute_objective = default_compute_objective if compute_objective is None else compute_objective
        base_args = self.args
        callback = _HPSearchCallback(self)
        self.add_callback(callback)
        try:
            return self._run_hp_search_optuna(n_trials, direction, **kwargs)
        finally:
            self.remove_callback(callback)
            self.args = base_args
            self.hp_search_backend = None
            self._trial = None

    def _run_hp_search_optuna(self, n_trials: int, direction: str | list[str], **kwargs: Any) -> Any:
        import optuna

        if self.args.world_size > 1:
            raise NotImplementedError("ftrain's hyperparameter search runs on a single process.")
        base_args = self.args

        def objective(trial: Any) -> float | list[float]:
            self.args = base_args
            self._run_trial(trial)
            return self.objective

        timeout = kwargs.pop("timeout", None)
        n_jobs = kwargs.pop("n_jobs", 1)
        gc_after_trial = kwargs.pop("gc_after_trial", False)
        catch = kwargs.pop("catch", ())
        directions = direction if isinstance(direction, list) else None
        study = optuna.create_study(direction=None if directions else direction, directions=directions, **kwargs)
        study.optimize(
            objective, n_trials=n_trials, timeout=timeout, n_jobs=n_jobs, gc_after_trial=gc_after_trial, catch=catch
        )
        if directions is None:
            best = study.best_trial
            return BestRun(str(best.number), best.value, best.params)
        return [BestRun(str(best.number), best.values, best.params) for best in study.best_trials]

    def _run_trial(self, trial: Any) -> None:
        """One trial: set the arguments from ``trial``, train (the model rebuilt by ``model_init(trial)``), and make
        sure ``self.objective`` holds the last evaluation's objective."""
        self.objective = None
        self._hp_search_setup(trial)
        model_init = self.model_init
        if model_init is not None and number_of_arguments(model_init) == 1:
            self.model_init = lambda: model_init(trial)  # the Trainer's train() calls model_init() without a trial
        try:
            self.model = self.call_model_init()
            self.train()
        finally:
            self.model_init = model_init
        if self.objective is None:
            self.objective = self.compute_objective(self.evaluate())

    def _hp_search_setup(self, trial: Any) -> None:
        """Applies the trial's hyper-parameters onto a copy of ``self.args`` (transformers' rules: fields only, cast
        to the current value's type; unknown keys warn) and points ``output_dir`` at the trial's folder
        (``run-{trial.number}`` or ``hp_name(trial)``, as transformers' checkpoints).

        Raises:
            RuntimeError: the Trainer has no ``model_init``.
        """
        if self.model_init is None:
            raise RuntimeError(
                "To use hyperparameter search, you need to pass your model through a model_init function."
            )
        self._trial = trial
        if self.hp_search_backend is None or trial is None:
            return
        params = self.hp_space(trial) if self.hp_search_backend is HPSearchBackend.OPTUNA else dict(trial)
        params.pop("wandb", None)
        args = copy.deepcopy(self.args)
        for key, value in params.items():
            if not hasattr(args, key):
                logger.warning(
                    f"Trying to set {key} in the hyperparameter search but there is no corresponding field in "
                    "`TrainingArguments`."
                )
                continue
            old = getattr(args, key, None)
            if old is not None:
                value = type(old)(value)
            setattr(args, key, value)
        run_name = self.hp_name(trial) if self.hp_name is not None else f"run-{getattr(trial, 'number', 0)}"
        args.output_dir = os.path.join(args.output_dir, run_name)
        self.args = args
        logger.info(f"Trial: {getattr(trial, 'params', params)}")

    def _report_to_hp_search(self, trial: Any, step: int, metrics: dict[str, float]) -> None:
        """Sets ``self.objective`` from ``metrics``; for optuna, reports it at ``step`` (single objective) and raises
        ``optuna.TrialPruned`` (after ``on_train_end``) when the pruner says so."""
        if self.hp_search_backend is None or trial is None:
            return
        self.objective = self.compute_objective(dict(metrics))
        if self.hp_search_backend is HPSearchBackend.OPTUNA:
            import optuna

            study = getattr(trial, "study", None)
            if study is not None and len(study.directions) == 1:
                trial.report(self.objective, step)
                if trial.should_prune():
                    self.callback_handler.on_train_end(self.args, self.state, self.control)
                    raise optuna.TrialPruned()
