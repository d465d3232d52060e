"""Hyper-parameter search for the ``Trainer``: transformers' ``hyperparameter_search`` API, optuna backend.

Each trial applies its hyper-parameters (drawn from ``hp_space(trial)``) to a copy of the search's base arguments,
rebuilds the model through ``model_init`` (given the trial when it takes one argument) and calls ``train()``. The
objective is reported to the study after every evaluation during training by a callback (:class:`_HPSearchCallback`),
so optuna pruners can stop bad trials; when no evaluation ran during training, one ``evaluate()`` at the end gives it.

Two backends run: optuna (trials in this process, one after the other) and ray tune (``pip install 'ray[tune]'``;
each trial in a ray worker process, see :meth:`HyperparameterSearch.run_ray`). ``"wandb"`` is a recognised name
that raises a clear error.

:class:`HyperparameterSearch` is the component that owns the search's state (backend, space, naming, objective
function, the running trial and its objective); the Trainer's ``hyperparameter_search``, ``_hp_search_setup`` and
``_report_to_hp_search`` and its attributes ``hp_search_backend``, ``hp_space``, ``hp_name``, ``compute_objective``,
``objective`` and ``_trial`` delegate to it (the ``Trainer``'s methods). The component calls back through
the Trainer where transformers does (``_hp_search_setup``, ``call_model_init``, ``train``, ``evaluate``,
``_report_to_hp_search``), so a subclass's overrides take part.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import importlib.util
import logging
import os
import types
from collections.abc import Callable
from typing import Any, NamedTuple

from ftrain.trainer.args import IntervalStrategy
from ftrain.trainer.callbacks import TrainerCallback
from ftrain.trainer.trainer_state import hp_params
from ftrain.trainer.utils import number_of_arguments

logger = logging.getLogger(__name__)

__all__ = [
    "BestRun",
    "HPSearchBackend",
    "HyperparameterSearch",
    "default_compute_objective",
    "default_hp_search_backend",
    "default_hp_space_optuna",
    "default_hp_space_ray",
]


class BestRun(NamedTuple):
    """The best run of a search: its id (the optuna trial number as a string, or the ray trial id), objective,
    hyper-parameters and an optional backend summary (``None`` for optuna; ray's ``ResultGrid``)."""

    run_id: str
    objective: float | list[float]
    hyperparameters: dict[str, Any]
    run_summary: Any | None = None


class HPSearchBackend(str, enum.Enum):
    """The search backends transformers knows; ftrain runs ``OPTUNA`` and ``RAY``."""

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
        "No hyperparameter search backend is installed. Install optuna (`pip install ftrain[optuna]`) or ray tune "
        "(`pip install 'ray[tune]'`)."
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


def default_hp_space_ray(trial: Any) -> dict[str, Any]:
    """transformers' default ray space: ``learning_rate`` log-uniform in [1e-6, 1e-4], ``num_train_epochs`` among
    1..5, ``seed`` uniform in [1, 40] (a float, made an int when applied to the arguments) and
    ``per_device_train_batch_size`` among 4, 8, 16, 32, 64. ``trial`` is ignored (ray calls it with ``None``).

    Example (needs ray):
        >>> space = default_hp_space_ray(None)  # doctest: +SKIP
        >>> sorted(space), space["num_train_epochs"].categories  # doctest: +SKIP
        (['learning_rate', 'num_train_epochs', 'per_device_train_batch_size', 'seed'], [1, 2, 3, 4, 5])

    Raises:
        ImportError: ray is not installed.
    """
    if not _available(HPSearchBackend.RAY):
        raise ImportError(f"This function needs ray tune: `{_INSTALL[HPSearchBackend.RAY]}`")
    from ray import tune

    return {
        "learning_rate": tune.loguniform(1e-6, 1e-4),
        "num_train_epochs": tune.choice([1, 2, 3, 4, 5]),
        "seed": tune.uniform(1, 40),
        "per_device_train_batch_size": tune.choice([4, 8, 16, 32, 64]),
    }


_DEFAULT_HP_SPACE = {HPSearchBackend.OPTUNA: default_hp_space_optuna, HPSearchBackend.RAY: default_hp_space_ray}


def _resolve_backend(backend: str | HPSearchBackend | None) -> HPSearchBackend:
    """The backend to run: ``backend``, or the first installed one.

    Raises:
        ValueError: an unknown name.
        NotImplementedError: ``"wandb"``.
        ImportError: the backend is not installed.
    """
    backend = HPSearchBackend(default_hp_search_backend() if backend is None else backend)
    if backend is HPSearchBackend.WANDB:
        raise NotImplementedError(
            "The wandb hyperparameter search backend is not supported by ftrain's Trainer; use backend='optuna' "
            f"(`{_INSTALL[HPSearchBackend.OPTUNA]}`) or backend='ray' (`{_INSTALL[HPSearchBackend.RAY]}`)."
        )
    if not _available(backend):
        raise ImportError(
            f"You picked the {backend.value} backend, but it is not installed. Run `{_INSTALL[backend]}`."
        )
    return backend


class _HPSearchCallback(TrainerCallback):
    """Marks the state as a search trial at ``on_train_begin`` and reports the objective of every evaluation during
    training to the search through the trainer's ``_report_to_hp_search`` (which may raise ``optuna.TrialPruned``).

    Args:
        search: the :class:`HyperparameterSearch` of the trainer whose training this callback watches.
    """

    def __init__(self, search: HyperparameterSearch) -> None:
        self.search = search
        self.active = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.active = True
        trial = self.search.trial
        state.is_hyper_param_search = trial is not None
        if trial is not None:
            state.trial_params = hp_params(trial)
            if self.search.hp_name is not None:
                state.trial_name = self.search.hp_name(trial)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.active = False

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        if self.active and metrics is not None:
            self.search.trainer._report_to_hp_search(self.search.trial, state.global_step, metrics)


class HyperparameterSearch:
    """The Trainer's hyper-parameter search component: the search's settings and the running trial.

    It reads the trainer's ``args`` (``world_size``; ``output_dir``; ``do_eval`` and ``eval_strategy`` for a ray
    scheduler; and every field a trial sets), ``model_init``, ``state``, ``control`` and ``callback_handler``. It
    replaces ``trainer.args`` by each trial's copy and restores it, and swaps ``trainer.model_init`` / sets
    ``trainer.model`` for a trial. It calls back through the trainer where transformers' search calls
    ``trainer.<method>``: ``_hp_search_setup``, ``call_model_init``, ``train``, ``evaluate`` and (from the callback
    during training) ``_report_to_hp_search``; also ``add_callback`` / ``remove_callback``.

    Args:
        trainer: the :class:`~ftrain.trainer.Trainer` it serves.

    Attributes:
        trainer: the Trainer.
        backend: the backend of the running search, ``None`` outside one (the Trainer's ``hp_search_backend``).
        hp_space: ``trial -> dict`` of hyper-parameters (the Trainer's ``hp_space``).
        hp_name: ``trial -> str``, the trial's name, or ``None`` (the Trainer's ``hp_name``).
        compute_objective: ``metrics -> objective`` (the Trainer's ``compute_objective``).
        objective: the running trial's last objective, ``None`` before its first evaluation (the Trainer's
            ``objective``).
        trial: the running trial (optuna ``Trial``, ray config dict), or ``None`` (the Trainer's ``_trial``).

    Example:
        >>> search = HyperparameterSearch(trainer=None)
        >>> search.backend is None and search.trial is None and search.objective is None
        True
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.backend: HPSearchBackend | None = None
        self.hp_space: Callable[[Any], dict[str, Any]] | None = None
        self.hp_name: Callable[[Any], str] | None = None
        self.compute_objective: Callable[[dict[str, float]], float] | None = None
        self.objective: float | list[float] | None = None
        self.trial: Any = None

    def serving(self, trainer: Any) -> HyperparameterSearch:
        """A search component for ``trainer`` (a copy of this one's trainer, shipped to a ray trial) with this
        search's backend, space, naming and objective function, and no trial yet."""
        search = HyperparameterSearch(trainer)
        search.backend, search.hp_space = self.backend, self.hp_space
        search.hp_name, search.compute_objective = self.hp_name, self.compute_objective
        return search

    def run(
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
            hp_space: ``trial -> dict`` of ``TrainingArguments`` fields (default :func:`default_hp_space_optuna`
                / :func:`default_hp_space_ray`). For ray it is called once with ``None`` and returns ray tune
                search spaces (``{"learning_rate": tune.loguniform(1e-4, 1e-2)}``); keys that are no field reach
                ``model_init(trial)`` only.
            compute_objective: ``metrics -> float`` (default :func:`default_compute_objective`).
            n_trials: the number of trials.
            direction: ``"minimize"`` / ``"maximize"``, or a list of them (multi-objective, optuna only); ray's
                ``mode`` ``"min"`` / ``"max"``.
            backend: ``"optuna"`` or ``"ray"`` (default: the first installed of optuna, ray).
            hp_name: ``trial -> str``, the trial's name (``state.trial_name`` and the trial's output folder).
            **kwargs: optuna: ``optuna.create_study`` arguments, plus ``timeout``, ``n_jobs``, ``gc_after_trial`` and
                ``catch`` for ``study.optimize``. ray: ``tune.run``'s arguments as transformers passes them, mapped
                onto ``tune.TuneConfig`` / ``tune.RunConfig`` fields, plus ``resources_per_trial`` (see
                :meth:`run_ray`).

        Returns:
            ``BestRun(run_id, objective, hyperparameters, run_summary)``, or a list of them for a multi-objective
            optuna search.

        Raises:
            RuntimeError: no ``model_init`` was given to the Trainer, no backend is installed, or ray trials failed.
            ImportError: the backend is not installed.
            NotImplementedError: ``"wandb"`` (not supported by ftrain), or several processes.
            ValueError / TypeError: an unknown backend name, or arguments the backend cannot take.
        """
        trainer = self.trainer
        backend = _resolve_backend(backend)
        if trainer.model_init is None:
            raise RuntimeError(
                "To use hyperparameter search, you need to pass your model through a model_init function."
            )
        if trainer.plan.process.world_size > 1:
            raise NotImplementedError("ftrain's hyperparameter search runs on a single process.")
        self.backend = backend
        self.hp_space = _DEFAULT_HP_SPACE[backend] if hp_space is None else hp_space
        self.hp_name = hp_name
        self.compute_objective = default_compute_objective if compute_objective is None else compute_objective
        base_args = trainer.args
        try:
            if backend is HPSearchBackend.RAY:
                return self.run_ray(n_trials, direction, **kwargs)
            callback = _HPSearchCallback(self)
            trainer.add_callback(callback)
            try:
                return self.run_optuna(n_trials, direction, **kwargs)
            finally:
                trainer.remove_callback(callback)
        finally:
            trainer.args = base_args
            self.backend = None
            self.trial = None

    def run_optuna(self, n_trials: int, direction: str | list[str], **kwargs: Any) -> BestRun | list[BestRun]:
        """The optuna search: ``n_trials`` trials of :meth:`run_trial` in this process, one after the other, each
        on the search's base arguments.

        Args:
            n_trials: ``study.optimize``'s ``n_trials``.
            direction: ``"minimize"`` / ``"maximize"``, or a list of them (multi-objective).
            **kwargs: ``optuna.create_study`` arguments, plus ``timeout``, ``n_jobs``, ``gc_after_trial`` and
                ``catch`` for ``study.optimize``.

        Returns:
            The best run, or the Pareto front's runs for several objectives.
        """
        import optuna

        trainer = self.trainer
        base_args = trainer.args

        def objective(trial: Any) -> float | list[float]:
            trainer.args = base_args
            self.run_trial(trial)
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

    def run_ray(self, n_trials: int, direction: str | list[str], **kwargs: Any) -> BestRun:
        """The ray tune search (transformers' ``run_hp_search_ray`` semantics, on ray's ``Tuner`` API).

        ``hp_space(None)`` is the ``param_space``; ``n_trials`` samples are drawn from it, each run by
        :func:`_ray_objective` in a ray worker on its own copy of the Trainer (:meth:`ray_trainer`, shipped with
        ``tune.with_parameters``). Every evaluation during training reports its metrics and ``objective`` to the
        trial, so ray schedulers can stop it; when none ran, one final ``evaluate()`` is reported. The best trial is
        chosen on the ``objective`` with ``RAY_SCOPE`` (default ``"last"``) as transformers does.

        Args:
            n_trials: ``TuneConfig.num_samples``.
            direction: ``"minimize"`` or ``"maximize"`` (ray's ``mode`` ``"min"`` / ``"max"``).
            **kwargs: ``resources_per_trial`` (default ``{"cpu": 1, "gpu": 0}``), transformers' ``tune.run``
                arguments ``local_dir`` (ray's ``storage_path``), ``max_failures`` and ``fail_fast`` (a
                ``FailureConfig``), and any ``tune.TuneConfig`` / ``tune.RunConfig`` field (``scheduler``,
                ``search_alg``, ``storage_path``, ``name``, ``stop``, ``progress_reporter`` ...; the default
                reporter shows ``objective``, as transformers').

        Returns:
            ``BestRun(trial_id, objective, config, result_grid)``.

        Raises:
            ValueError: a multi-objective ``direction``, or arguments the search sets itself.
            TypeError: an unknown argument, an ``hp_space`` that is not a ray space, or an unpicklable Trainer.
            RuntimeError / NotImplementedError: a scheduler that needs evaluation during training without it, or
                population based training (it needs tune checkpoints, which ftrain does not report).
            RuntimeError: a trial failed (its error is chained).
        """
        import ray
        from ray import tune

        if direction not in ("minimize", "maximize"):
            raise ValueError(
                f"hyperparameter_search(backend='ray') takes direction='minimize' or 'maximize', got {direction!r} "
                "(several objectives need backend='optuna')."
            )
        mode = direction[:3]
        resources = kwargs.pop("resources_per_trial", {"cpu": 1, "gpu": 0})
        _check_ray_scheduler(kwargs.get("scheduler"), self.trainer.plan.eval)
        tune_config, run_config = _ray_configs(kwargs, mode=mode, num_samples=n_trials)
        space = _ray_param_space(self.hp_space)
        shipped = self.ray_trainer()
        if not ray.is_initialized():  # as Tuner.fit would, but now: with_parameters pickles only into a running ray
            ray.init()
        try:
            trainable = tune.with_parameters(_ray_objective, trainer=shipped)
        except Exception as e:  # ray pickles the trainer into its object store here
            raise TypeError(_unpicklable_message(shipped, e)) from e
        trainable = tune.with_resources(trainable, resources)
        results = tune.Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config).fit()
        return _ray_best_run(results, mode)

    def ray_trainer(self) -> Any:
        """A shallow copy of the Trainer for ray to pickle into each trial; the Trainer itself is left unchanged.

        The copy has no model (``model_init`` rebuilds it) and no state of a past ``train()``; methods stored as
        attributes (``gather_function``) are bound to the copy; its components are rebuilt to serve the copy
        (``Trainer._build_components``: no run totals, checkpoint manager or gathered state), except that the search
        and the Hub client keep their settings (:meth:`serving`); an absolute ``output_dir`` (ray workers
        run in the trial's folder); a fresh TensorBoard callback in place of one holding a writer (writers do not
        pickle), and the search callback bound to the copy's search.
        """
        from ftrain.trainer.integrations import TensorBoardCallback

        trainer = self.trainer
        shipped = copy.copy(trainer)
        for name, value in vars(trainer).items():
            if isinstance(value, types.MethodType) and value.__self__ is trainer:  # e.g. gather_function
                setattr(shipped, name, types.MethodType(value.__func__, shipped))
        shipped._build_components()  # fresh components serving the copy
        shipped._hub, shipped._search = trainer._hub.serving(shipped), self.serving(shipped)
        shipped.model = shipped._train_state = shipped._train_step = None
        shipped.args = copy.deepcopy(trainer.args)
        shipped.args.output_dir = os.path.abspath(shipped.args.output_dir)
        handler = shipped.callback_handler = copy.copy(trainer.callback_handler)
        handler.model = handler.train_dataloader = handler.eval_dataloader = None
        callbacks = [cb for cb in handler.callbacks if not isinstance(cb, _HPSearchCallback)]
        writes = [isinstance(cb, TensorBoardCallback) and cb.tb_writer is not None for cb in callbacks]
        handler.callbacks = [type(cb)() if w else cb for cb, w in zip(callbacks, writes, strict=True)]
        handler.callbacks.append(_HPSearchCallback(shipped._search))
        return shipped

    def run_trial(self, trial: Any) -> dict[str, float] | None:
        """One trial: ``trainer._hp_search_setup(trial)``, then the model rebuilt by ``trainer.call_model_init``
        (``model_init`` given the trial when it takes one argument) and ``trainer.train()``; makes sure
        :attr:`objective` holds the last evaluation's objective (a final ``trainer.evaluate()`` when no evaluation
        ran during training).

        Args:
            trial: an optuna ``Trial``, or a ray trial's config dict.

        Returns:
            The metrics of the final ``evaluate()`` when no evaluation during training set the objective (it was
            then not reported to the search), else ``None``.
        """
        trainer = self.trainer
        self.objective = None
        trainer._hp_search_setup(trial)
        model_init = trainer.model_init
        if model_init is not None and number_of_arguments(model_init) == 1:
            trainer.model_init = lambda: model_init(trial)  # the Trainer's train() calls model_init() without a trial
        try:
            trainer.model = trainer.call_model_init()
            trainer.train()
        finally:
            trainer.model_init = model_init
        if self.objective is not None:
            return None
        metrics = trainer.evaluate()
        self.objective = self.compute_objective(dict(metrics))
        return metrics

    def setup(self, trial: Any) -> None:
        """The default ``Trainer._hp_search_setup``: records ``trial`` as the running one, applies its
        hyper-parameters onto a copy of ``trainer.args`` (transformers' rules: fields only, cast to the current
        value's type; unknown keys warn) and points ``output_dir`` at the trial's folder (``run-{trial.number}`` for
        optuna, ``run-{ray trial id}`` for ray, or ``hp_name(trial)``, as transformers' checkpoints).

        Args:
            trial: an optuna ``Trial``, a ray trial's config dict, or ``None``.

        Raises:
            RuntimeError: the Trainer has no ``model_init``.
            ValueError: a value that cannot be made the type of its field.
        """
        trainer = self.trainer
        if trainer.model_init is None:
            raise RuntimeError(
                "To use hyperparameter search, you need to pass your model through a model_init function."
            )
        self.trial = trial
        if self.backend is None or trial is None:
            return
        params = self.hp_space(trial) if self.backend is HPSearchBackend.OPTUNA else dict(trial)
        params.pop("wandb", None)
        args = copy.deepcopy(trainer.args)
        for key, value in params.items():
            if not hasattr(args, key):
                logger.warning(
                    f"Trying to set {key} in the hyperparameter search but there is no corresponding field in "
                    "`TrainingArguments`."
                )
                continue
            old = getattr(args, key, None)
            if old is not None:
                try:
                    value = type(old)(value)
                except (TypeError, ValueError) as e:
                    raise ValueError(
                        f"The hyperparameter search's trial sets TrainingArguments.{key} to {value!r}, which cannot be "
                        f"made a {type(old).__name__} like its current value {old!r} ({e}); fix hp_space."
                    ) from e
            setattr(args, key, value)
        run_id = _trial_id(self.backend, trial)
        run_name = self.hp_name(trial) if self.hp_name is not None else f"run-{run_id}"
        args.output_dir = os.path.join(args.output_dir, run_name)
        trainer.args = args
        logger.info(f"Trial: {getattr(trial, 'params', params)}")

    def report(self, trial: Any, step: int, metrics: dict[str, float]) -> None:
        """The default ``Trainer._report_to_hp_search``: sets :attr:`objective` from ``metrics``; for optuna,
        reports it at ``step`` (single objective) and raises ``optuna.TrialPruned`` (after ``on_train_end``) when
        the pruner says so; for ray, reports ``metrics`` with ``objective`` added to the trial (no tune checkpoint:
        the trial's checkpoints are ftrain's, in its ``output_dir``). Nothing outside a search or without a trial.

        Args:
            trial: the running trial.
            step: the global step of the evaluation.
            metrics: the evaluation's metrics (left unchanged).

        Raises:
            optuna.TrialPruned: the study's pruner stops the trial.
        """
        if self.backend is None or trial is None:
            return
        self.objective = self.compute_objective(dict(metrics))
        if self.backend is HPSearchBackend.OPTUNA:
            import optuna

            study = getattr(trial, "study", None)
            if study is not None and len(study.directions) == 1:
                trial.report(self.objective, step)
                if trial.should_prune():
                    trainer = self.trainer
                    trainer.callback_handler.on_train_end(trainer.args, trainer.state, trainer.control)
                    raise optuna.TrialPruned()
        elif self.backend is HPSearchBackend.RAY:
            _ray_report({**metrics, "objective": self.objective})


_RAY_RESERVED = {
    "metric": "the search always optimises the reported 'objective'",
    "mode": "pass direction='minimize' or 'maximize'",
    "num_samples": "pass n_trials",
    "config": "pass hp_space",
    "param_space": "pass hp_space",
}


def _ray_new_api() -> bool:
    """Whether ray tune has its own ``report`` / ``get_context`` / ``RunConfig`` (ray >= 2.41); before, Tune's
    function trainables used ``ray.train``'s."""
    from ray import tune

    return hasattr(tune, "RunConfig")


def _ray_report(metrics: dict[str, Any]) -> None:
    """Reports ``metrics`` to the running ray tune trial."""
    if _ray_new_api():
        from ray import tune

        tune.report(metrics)
    else:
        from ray import train

        train.report(metrics)


def _trial_id(backend: HPSearchBackend | None, trial: Any) -> Any:
    """The trial's id in its folder name: optuna's ``trial.number``, ray's trial id."""
    if backend is HPSearchBackend.RAY:
        if _ray_new_api():
            from ray import tune

            return tune.get_context().get_trial_id()
        from ray import train

        return train.get_context().get_trial_id()
    return getattr(trial, "number", 0)


def _ray_objective(config: dict[str, Any], trainer: Any) -> None:
    """One ray trial, in a ray worker, on the worker's own copy of the Trainer: train with ``config`` applied
    (each evaluation reports to ray through the trainer's ``_report_to_hp_search``), then report a final evaluation
    if none ran during training."""
    search = trainer._search
    metrics = search.run_trial(config)
    if metrics is not None:
        _ray_report({**metrics, "objective": search.objective, "done": True})


def _check_ray_scheduler(scheduler: Any, evaluation: Any) -> None:
    """Refuses the ray schedulers this search cannot feed (transformers' check, plus population based training).

    Raises:
        NotImplementedError: population based training (PBT, PB2): it restarts trials from other trials' tune
            checkpoints, and ftrain reports none.
        RuntimeError: ASHA, median stopping or BOHB without evaluation during training (nothing to stop on).
    """
    if scheduler is None:
        return
    from ray.tune.schedulers import ASHAScheduler, HyperBandForBOHB, MedianStoppingRule, PopulationBasedTraining

    name = type(scheduler).__name__
    if isinstance(scheduler, PopulationBasedTraining):
        raise NotImplementedError(
            f"hyperparameter_search(backend='ray'): {name} restarts trials from other trials' tune checkpoints, and "
            "ftrain's trials report metrics without tune checkpoints (their checkpoints are ftrain's, in each "
            "trial's output_dir). Use ASHAScheduler, MedianStoppingRule or no scheduler."
        )
    needs_eval = isinstance(scheduler, ASHAScheduler | MedianStoppingRule | HyperBandForBOHB)
    if needs_eval and (not evaluation.do_eval or evaluation.strategy == IntervalStrategy.NO):
        raise RuntimeError(
            f"You are using {name} as a scheduler but you haven't enabled evaluation during training, so your trials "
            f"report no intermediate results for it to stop them on. Pass eval_strategy='steps' (or 'epoch') in the "
            f"Trainer's args, or do not use {name}."
        )


def _ray_configs(kwargs: dict[str, Any], *, mode: str, num_samples: int) -> tuple[Any, Any]:
    """``(tune.TuneConfig, tune.RunConfig)`` from ``hyperparameter_search``'s keyword arguments.

    Raises:
        ValueError: an argument the search sets itself.
        TypeError: an argument that is no ``TuneConfig`` / ``RunConfig`` field.
    """
    from ray import tune

    configs = tune if _ray_new_api() else __import__("ray.train", fromlist=["RunConfig"])
    kwargs = dict(kwargs)
    clash = sorted(set(kwargs) & set(_RAY_RESERVED))
    if clash:
        raise ValueError(
            "hyperparameter_search(backend='ray') sets these itself: "
            + "; ".join(f"{k!r} ({_RAY_RESERVED[k]})" for k in clash)
        )
    if "local_dir" in kwargs:  # tune.run's older name, which transformers' docs still use
        kwargs.setdefault("storage_path", kwargs.pop("local_dir"))
    if isinstance(kwargs.get("storage_path"), str) and "://" not in kwargs["storage_path"]:
        kwargs["storage_path"] = os.path.abspath(kwargs["storage_path"])  # ray needs an absolute path or a URI
    failure = {k: kwargs.pop(k) for k in ("max_failures", "fail_fast") if k in kwargs}
    if failure:
        kwargs["failure_config"] = configs.FailureConfig(**failure)
    kwargs.setdefault("progress_reporter", tune.CLIReporter(metric_columns=["objective"]))
    tune_fields = {f.name for f in dataclasses.fields(tune.TuneConfig)} - set(_RAY_RESERVED)
    run_fields = {f.name for f in dataclasses.fields(configs.RunConfig)} - {"local_dir"}
    unknown = sorted(set(kwargs) - tune_fields - run_fields)
    if unknown:
        raise TypeError(
            f"hyperparameter_search(backend='ray') got {unknown}, which are neither tune.TuneConfig fields "
            f"({sorted(tune_fields)}) nor tune.RunConfig fields ({sorted(run_fields)}) nor resources_per_trial, "
            "local_dir, max_failures, fail_fast."
        )
    tune_config = tune.TuneConfig(
        metric="objective", mode=mode, num_samples=num_samples, **{k: v for k, v in kwargs.items() if k in tune_fields}
    )
    return tune_config, configs.RunConfig(**{k: v for k, v in kwargs.items() if k in run_fields})


def _ray_param_space(hp_space: Callable[[Any], Any]) -> dict[str, Any]:
    """``hp_space(None)``, checked to be a ray ``param_space``.

    Raises:
        TypeError: ``hp_space(None)`` fails (an optuna-style space) or returns no dict with ``str`` keys.
    """
    example = "e.g. hp_space=lambda _: {'learning_rate': tune.loguniform(1e-5, 1e-3)}"
    try:
        space = hp_space(None)
    except Exception as e:
        raise TypeError(
            f"hyperparameter_search(backend='ray'): hp_space(None) raised {type(e).__name__}: {e}. For ray, hp_space "
            f"is called once with None and returns a dict of ray tune search spaces ({example}); an optuna-style "
            "space (trial.suggest_float(...)) works only with backend='optuna'."
        ) from e
    if not isinstance(space, dict) or not all(isinstance(key, str) for key in space):
        raise TypeError(
            "hyperparameter_search(backend='ray'): hp_space(None) must return a dict from TrainingArguments field "
            f"names (or names model_init reads) to ray tune search spaces or values ({example}); got {space!r}."
        )
    return space


def _unpicklable_message(trainer: Any, error: Exception) -> str:
    """Says which of the Trainer's members ray could not pickle, and how to fix it (``error``, ray's own report, is
    chained by the caller)."""
    import io

    from ray import cloudpickle

    class _OmitTrainer(cloudpickle.CloudPickler):
        # Members that point back at the Trainer (bound methods, the search callback) would fail for another
        # member's sake: pickle the Trainer itself as a reference.
        def persistent_id(self, obj: Any) -> str | None:
            return "trainer" if obj is trainer else None

    bad = []
    for name, value in vars(trainer).items():
        try:
            _OmitTrainer(io.BytesIO()).dump(value)
        except Exception:
            bad.append(name)
    return (
        f"hyperparameter_search(backend='ray') must pickle the Trainer into each ray trial, and pickling failed "
        f"({type(error).__name__}). Trainer attributes that do not pickle: {bad or 'none alone (a combination)'}. "
        "Make them picklable (e.g. module-level functions instead of objects holding locks, files or threads), or "
        "use backend='optuna', which runs in this process."
    )


def _ray_best_run(results: Any, mode: str) -> BestRun:
    """The best trial of a ray ``ResultGrid`` on ``objective`` (scope: ``RAY_SCOPE``, default ``"last"``).

    Raises:
        RuntimeError: a trial failed (as ``tune.run`` does by default); the first error is chained.
    """
    if results.errors:
        first = results.errors[0]
        cause = getattr(first, "cause", None) or first  # a RayTaskError wraps the trial's own exception
        raise RuntimeError(
            f"{len(results.errors)} of {len(results)} ray tune trials failed; the first error: "
            f"{type(cause).__name__}: {cause}"
        ) from first
    best = results.get_best_result(metric="objective", mode=mode, scope=os.getenv("RAY_SCOPE", "last"))
    return BestRun(best.metrics["trial_id"], best.metrics["objective"], best.config, results)
