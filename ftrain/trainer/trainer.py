"""``Trainer``: a thin stateful shell that speaks Hugging Face's ``Trainer`` API over ftrain's pure core.

**Structure.** ``TrainingArguments`` are decided once into a frozen :class:`~ftrain.trainer.plan.TrainerPlan`
(``trainer.plan``; made again only when the arguments change), which the shell reads instead of ``args`` — callbacks
and the model card still see ``args``, as in transformers. The work is done by components with declared state:
:class:`~ftrain.trainer.loop.TrainingLoop`, :class:`~ftrain.trainer.evaluation.Evaluator`,
:class:`~ftrain.trainer.checkpoints.TrainerCheckpoints` (every read and write of ``checkpoint-N``, through
:class:`~ftrain.checkpoint.CheckpointManager` only), :class:`~ftrain.trainer.hub.HubClient` and
:class:`~ftrain.trainer.hp_search.HyperparameterSearch`. ``Trainer``'s methods keep transformers' names and
signatures and delegate to them; the components call back through those methods wherever transformers calls
``self.<hook>``, so a subclass's overrides take part. ``train()`` builds the core pieces once — the optimizer and
schedule (:func:`~ftrain.trainer.convert.make_optimizer`), a :class:`~ftrain.data.BatchStream`, a
:class:`~ftrain.TrainState` and a ``train_step`` (:func:`ftrain.make_train_step`, compiled with :func:`ftrain.jit`
when ``torch_compile``) — then loops, fires callbacks, logs, evaluates and saves. The shell holds no training
math (DESIGN.md rule 2).

Differences from transformers, on purpose:

- **Optimizers are pure.** The train step runs an ``ftrain.optim`` ``GradientTransformation`` whose state is in the
  ``TrainState``. ``optimizers=(torch_optimizer, torch_scheduler)`` and ``optimizer_cls_and_kwargs=(torch class,
  kwargs)`` are translated into one (:mod:`ftrain.trainer.torch_optim`: the torch classes ftrain has step-exact
  equivalents for, any step-driven scheduler, ``ReduceLROnPlateau``; others are refused with how to write them);
  ``optimizers=(tx, None)`` takes an ftrain transformation as it is. ``trainer.optimizer`` /
  ``trainer.lr_scheduler`` are torch objects that view it: ``param_groups`` over the live model with the current
  learning rates, ``state_dict()`` from the ``TrainState``, ``get_last_lr()``; their ``step()`` is the train step's.
- **Custom losses and training steps.** The pure step is built from the overridable pieces: its ``loss_fn`` calls
  ``training_step(model, microbatch, num_items_in_batch)`` once per microbatch, which by default calls
  ``compute_loss`` under ``compute_loss_context_manager()``. ``training_step`` *returns* the differentiable
  microbatch loss (the step differentiates, accumulates, clips and updates); it must not call ``backward`` itself —
  that is detected and refused with how to port it. A scalar from an overridden ``compute_loss`` is taken as the
  mean over its microbatch and the step averages microbatches (transformers' behaviour without
  ``num_items_in_batch``); with the default ``compute_loss`` the microbatch gets ``num_items_in_batch`` = its
  item count and the step weights it by that count (token-weighted, as transformers).
- **NEFTune, bf16, activation checkpointing** act inside the pure step: the NEFTune hook is registered on the
  state's meta skeleton for the duration of ``train()`` (never on the user's model; registered outside the step,
  so ``torch_compile`` traces it) and adds noise in training mode only, drawn from the step's seeded RNG; ``bf16``
  runs the forward under ``torch.autocast``; activation checkpointing is enabled on the skeleton, with a checkpoint
  function that re-binds the layer's tensors when it recomputes (eager only: refused with ``torch_compile``).
- **Checkpoints** hold the whole pure state (``state.safetensors``) next to transformers' files
  (``model.safetensors``, ``config.json``, ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``,
  ``training_args.bin``, ``trainer_state.json``), all committed at once, so either library resumes the other's
  checkpoints; see :mod:`ftrain.trainer.checkpoints`.
- ``eval_loss_reduction="token"`` (an argument of ftrain's own) reports the exact ``(sum, count)`` mean as
  ``eval_loss`` (token-weighted for causal LMs) instead of transformers' number, each batch's mean loss weighted by
  its examples (the default).
- **Optimizer, scheduler and RNG state live in the** :class:`~ftrain.TrainState` (``opt_state``, ``step``, ``key``):
  ``_save_optimizer_and_scheduler`` / ``_save_rng_state`` write them in transformers' torch formats
  (:mod:`ftrain.trainer.hf_checkpoint`), and the ``_load_*`` twins read them back into the current state (from a
  committed ftrain checkpoint's ``state.safetensors``, else with ``torch.load(weights_only=True)``).
- **No wrappers, no accelerate state.** ``_wrap_model`` returns the model (an override's module is evaluated, but
  training refuses one that is not the model: the pure step trains the state's skeleton),
  ``create_accelerator_and_postprocess`` records the device / process facts the shell reads and answers
  accelerate's questions through ``trainer.accelerator`` (:class:`~ftrain.trainer.accelerator.TrainerAccelerator`,
  which takes over nothing), and there is no loss scaler (``_save_scaler`` is a no-op).
- **Placement** follows transformers (:mod:`ftrain.trainer.placement`): the model is moved to ``args.device`` by
  ``_move_model_to_device`` when the Trainer is built (``place_model_on_device``), the ``TrainState`` is made from
  it, and every training microbatch and evaluation batch goes through ``_prepare_inputs`` before the step or the
  forward. ``bf16_full_eval`` / ``fp16_full_eval`` evaluate a cast copy of the model outside ``train()``, never
  the model itself.
- **Weights load strictly.** ``_load_from_checkpoint`` reads an ftrain checkpoint or a transformers-written folder
  (``model.safetensors`` or a sharded index) and refuses pickled ``pytorch_model.bin`` files.
- Methods transformers 5 moved out of the class (``_sorted_checkpoints``, ``_nested_gather``, ``num_tokens``,
  ``prediction_loop``, ``get_optimizer_group``, ``tokenizer``...) keep their transformers 4.57 signatures.
- **Several processes** (``torchrun --nproc_per_node N``): ``create_accelerator_and_postprocess`` (called by
  ``__init__``) picks the layout — ``fsdp`` / ``deepspeed`` through
  :func:`ftrain.trainer.parallel.parallel_config_from_training_args`, else plain data parallel — and builds the mesh;
  ``train()`` shards the ``TrainState`` on it (``_distribute``). The step sums the loss ``(sum, count)`` and the
  gradients over the ranks, so the logged ``loss`` is the global mean (also with ``average_tokens_across_devices=
  False``, where transformers would average per-rank means). Every rank must call ``train``, ``evaluate`` and
  ``save_model`` (they gather).

Example:
    >>> import torch
    >>> from ftrain.trainer import ProgressCallback, Trainer, TrainingArguments
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.lin = torch.nn.Linear(2, 1)
    ...     def forward(self, x, labels=None):
    ...         out = self.lin(x).squeeze(-1)
    ...         return {"loss": ((out - labels) ** 2).mean(), "logits": out}
    >>> data = [{"x": [float(i), 1.0], "labels": float(i)} for i in range(8)]
    >>> args = TrainingArguments("/tmp/ftrain-doctest", max_steps=3, save_strategy="no", report_to="none",
    ...                          per_device_train_batch_size=4, logging_steps=10)
    >>> trainer = Trainer(Net(), args, train_dataset=data)
    >>> trainer.remove_callback(ProgressCallback)  # no progress bar or printed logs here
    >>> out = trainer.train()
    >>> out.global_step, sorted(k for k in out.metrics if not k.endswith("second") and k != "train_runtime")
    (3, ['epoch', 'total_flos', 'train_loss'])
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftrain import optim as _optim
from ftrain.checkpoint import CheckpointManager
from ftrain.data import BatchStream, default_collate, make_padding_collator
from ftrain.data.columns import find_labels, make_column_filter, remove_unused_columns, signature_columns
from ftrain.jit import jit
from ftrain.losses import Loss
from ftrain.optim.base import GradientTransformation
from ftrain.state import TrainState
from ftrain.step import make_train_step
from ftrain.trainer import torch_optim as _torch_optim
from ftrain.trainer.accelerator import TrainerAccelerator
from ftrain.trainer.args import AcceleratorConfig, IntervalStrategy, SchedulerType, TrainingArguments
from ftrain.trainer.callbacks import (
    DEFAULT_CALLBACKS,
    DEFAULT_PROGRESS_CALLBACK,
    CallbackHandler,
    PrinterCallback,
    builtin_class,
)
from ftrain.trainer.checkpoints import TRAINING_ARGS_BIN, TrainerCheckpoints
from ftrain.trainer.convert import logged_learning_rate, make_schedule
from ftrain.trainer.dataloaders import TrainerDataLoader, loader_length
from ftrain.trainer.evaluation import Evaluator, loss_item_count, make_loss_fn
from ftrain.trainer.hp_search import BestRun, HPSearchBackend, HyperparameterSearch
from ftrain.trainer.hub import HubClient, PushInProgress
from ftrain.trainer.integrations import get_reporting_integration_callbacks
from ftrain.trainer.jit_checkpoint import JITCheckpointCallback
from ftrain.trainer.loop import TRAINER_STATE_NAME, TRAINING_ARGS_NAME, TrainingLoop, enable_activation_checkpointing
from ftrain.trainer.memory import TrainerMemoryTracker
from ftrain.trainer.placement import cast_for_full_eval, is_model_parallel, place_model_on_device
from ftrain.trainer.plan import TrainerPlan, apply_process_settings, make_plan, total_train_batch_size
from ftrain.trainer.schedulers import get_greedy_schedule
from ftrain.trainer.trainer_state import TrainerControl, TrainerState
from ftrain.trainer.utils import (
    PREFIX_CHECKPOINT_DIR,
    EvalLoopOutput,
    PredictionOutput,
    TrainOutput,
    enable_full_determinism,
    make_label_smoother,
    nested_gather,
    nested_numpify,
    number_of_arguments,
    set_seed,
    speed_metrics,
)

__all__ = ["Trainer"]

logger = logging.getLogger(__name__)


_TORCH_OPTIMIZER_ADVICE = (
    "For an ftrain.optim GradientTransformation, pass optimizers=(tx, None) with e.g. tx = ftrain.optim.adamw("
    "ftrain.schedules.get_schedule('linear', 1e-3, num_warmup_steps=10, num_training_steps=1000)); or leave "
    "optimizers unset and choose one with TrainingArguments(optim=..., lr_scheduler_type=...)."
)


def _default_loss(default: Any, device_type: str, autocast_dtype: torch.dtype | None) -> Any:
    """The Trainer's loss without overridden hooks: ``default`` (:func:`~ftrain.step.make_loss_fn`) under
    ``torch.autocast`` when ``args.bf16`` (what ``compute_loss_context_manager`` gives)."""

    def loss_fn(model: Any, batch: Any) -> Loss:
        if autocast_dtype is None:
            return default(model, batch)[0]
        with torch.autocast(device_type, dtype=autocast_dtype, cache_enabled=True):
            return default(model, batch)[0]

    return loss_fn


class Trainer:
    """Hugging Face's ``Trainer`` API over ftrain's pure core; see the module docstring.

    Args:
        model: the ``nn.Module`` to train (or use ``model_init``; exactly one of them).
        args: a :class:`TrainingArguments` (default ``TrainingArguments(output_dir="tmp_trainer")``), or a
            ``transformers.TrainingArguments`` (or subclass), converted field by field (see ``_as_ftrain_args``).
        data_collator: ``list[example] -> batch``; default: padding with ``processing_class`` if it is a tokenizer,
            else :func:`~ftrain.data.default_collate`.
        train_dataset, eval_dataset: map-style or iterable datasets; ``eval_dataset`` may be a dict of them.
        processing_class: a tokenizer / processor (saved with checkpoints).
        model_init: builds the model (0 or 1 argument, the trial).
        compute_loss_func: ``f(outputs, labels, num_items_in_batch=n) -> mean loss`` over ``n`` items.
        compute_metrics: ``f(EvalPrediction) -> dict`` of metrics.
        callbacks: extra callbacks (classes or instances), after the default ones.
        optimizers: ``(torch optimizer, torch scheduler or None)`` over the model's parameters (translated, see
            :mod:`ftrain.trainer.torch_optim`), ``(tx, None)`` with an ``ftrain.optim`` GradientTransformation, or
            ``(None, None)``.
        optimizer_cls_and_kwargs: ``(torch optimizer class, kwargs)`` as transformers takes it, or ``(factory,
            kwargs)`` with an ``ftrain.optim`` factory such as ``ftrain.optim.adamw`` (``learning_rate`` defaults to
            ``args.learning_rate``); built over transformers' decay / no-decay parameter groups.
        preprocess_logits_for_metrics: ``f(logits, labels) -> logits`` applied per evaluation batch.

    Raises:
        ValueError / TypeError: transformers' invalid combinations (see ``_validate``) and torch optimizers or
            schedulers ftrain cannot reproduce.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        model_init: Any = None,
        compute_loss_func: Any = None,
        compute_metrics: Any = None,
        callbacks: list[Any] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        optimizer_cls_and_kwargs: tuple[Any, dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Any = None,
    ) -> None:
        self._plan: tuple[Any, int, TrainerPlan] | None = None  # (the args, their revision, the plan)
        self.args = TrainingArguments(output_dir="tmp_trainer") if args is None else _as_ftrain_args(args)
        apply_process_settings(self.plan)  # TF32 and the process's log level, as transformers' arguments do
        self._memory_tracker = TrainerMemoryTracker(not self.plan.log.memory_metrics, self.plan.process.device)
        self._memory_tracker.start("init")
        self._train_state = self._train_step = None  # the pure state and step, built by train()
        self._model_stale, self.is_in_train = False, False
        self.current_flos, self._flos_params, self._signature_columns = 0.0, None, None
        self._num_steps_taken: int | None = None  # accelerator_config's num_steps, once taken over
        self._eval_dataloaders: dict[str, Any] = {}  # kept by key with dataloader_persistent_workers
        self._build_components()
        self._seed()
        self.model_init = model_init
        self._validate(model, train_dataset, eval_dataset, optimizers, optimizer_cls_and_kwargs)
        self.model = self.call_model_init() if model is None else model
        self.create_accelerator_and_postprocess()  # devices, world size and (several processes) the mesh
        self._place_model()
        self.processing_class = processing_class
        self.data_collator = data_collator if data_collator is not None else self._default_collator()
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.compute_loss_func, self.compute_metrics = compute_loss_func, compute_metrics
        self.label_smoother = make_label_smoother(self.model, self.plan.step.label_smoothing_factor)
        if self.plan.eval.batch_eval_metrics and compute_metrics is not None:
            if "compute_result" not in inspect.signature(compute_metrics).parameters:
                raise ValueError(
                    "With `batch_eval_metrics=True`, `compute_metrics` must take a boolean `compute_result` argument: "
                    "it is called on every evaluation batch and `compute_result=True` on the last one, which should "
                    "return the summary metrics."
                )
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        self.neftune_noise_alpha = self.plan.step.neftune_noise_alpha
        self.neftune_hook_handle: Any = None  # set by _activate_neftune while train() runs
        self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs
        self._tx: GradientTransformation | None = None  # what the train step runs (create_optimizer_and_scheduler)
        self._optimizer_spec: _torch_optim.TorchOptimizerSpec | None = None  # what self.optimizer views
        self._kwargs_schedule: Any = None  # a schedule given as an ftrain factory's learning_rate (create_optimizer)
        self._user_optimizer, self._created_lr_scheduler = optimizers[0], False
        self.optimizer, self.lr_scheduler = self._adopt_optimizers(*optimizers)
        names = self.plan.data.label_names
        self.label_names = list(names) if names is not None else find_labels(self.model)
        self.state, self.control = TrainerState(), TrainerControl()
        self.callback_handler = CallbackHandler(self._default_callbacks(callbacks), self.model, processing_class,
                                                self.optimizer, self.lr_scheduler)  # fmt: skip
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, JITCheckpointCallback):
                callback.set_trainer(self)
        self.control = self.callback_handler.on_init_end(self.args, self.state, self.control)
        if self.plan.hub.push_to_hub:
            self.init_hf_repo()
        if getattr(self.model, "config", None) is not None:
            self.model.config.use_cache = self.plan.step.use_cache  # transformers sets it, whatever the model had
        self._memory_tracker.stop_and_update_metrics("init")

    # ---- construction ---------------------------------------------------------------------------------------------

    @property
    def plan(self) -> TrainerPlan:
        """Every decision taken from ``self.args`` (:func:`~ftrain.trainer.plan.make_plan`): the shell reads this,
        not ``args``. Made when the Trainer is built and again only when the arguments change (a search trial
        assigns new ones; a script may set a field), so it always describes the arguments callbacks receive."""
        args = self.args
        if self._plan is None or self._plan[0] is not args or self._plan[1] != args.revision:
            self._plan = (args, args.revision, make_plan(args))
        return self._plan[2]

    def _build_components(self) -> None:
        """The Trainer's pieces, each with its own declared state; the methods with transformers' names delegate to
        them and they call back through those methods (so a subclass's overrides take part)."""
        self._loop = TrainingLoop(self)
        self._evaluator = Evaluator(self)
        self._checkpoints = TrainerCheckpoints(self)
        self._hub = HubClient(self)
        self._search = HyperparameterSearch(self)

    def _seed(self) -> None:
        seeding = self.plan.seeding
        if seeding.full_determinism:
            enable_full_determinism(seeding.seed)
        else:
            set_seed(seeding.seed)

    def _validate(self, model: Any, train_dataset: Any, eval_dataset: Any, optimizers: Any, cls_kwargs: Any) -> None:
        """transformers' constructor checks, plus ftrain's (torch optimizers)."""
        if (model is None) == (self.model_init is None):
            raise ValueError(
                "Trainer requires either a `model` or a `model_init` argument, not both and not neither"
                + (" (both were given)." if model is not None else ".")
            )
        if self.plan.eval.strategy != IntervalStrategy.NO and eval_dataset is None:
            raise ValueError(
                f"You have set `args.eval_strategy` to {self.plan.eval.strategy.value!r} but you didn't pass an "
                "`eval_dataset` to `Trainer`. Either set `args.eval_strategy` to `no` or pass an `eval_dataset`."
            )
        self._validate_optimizers(optimizers, cls_kwargs)

    def _validate_optimizers(self, optimizers: Any, cls_kwargs: Any) -> None:
        tx, scheduler = optimizers if optimizers is not None else (None, None)
        if tx is None and scheduler is not None:
            raise TypeError(
                "optimizers=(None, scheduler): the scheduler drives an optimizer the Trainer would not use; pass "
                "optimizers=(its optimizer, scheduler)."
            )
        if cls_kwargs is not None and isinstance(cls_kwargs[0], type):
            if issubclass(cls_kwargs[0], torch.optim.Optimizer):
                _torch_optim.ftrain_optimizer_kwargs(cls_kwargs[0], {})  # refuses a class ftrain cannot translate
        if tx is not None and not isinstance(tx, GradientTransformation | torch.optim.Optimizer):
            raise TypeError(
                "optimizers[0] must be a torch.optim optimizer over the model's parameters or an ftrain.optim "
                f"GradientTransformation, got {type(tx).__name__}. " + _TORCH_OPTIMIZER_ADVICE
            )
        if isinstance(tx, GradientTransformation) and scheduler is not None:
            raise TypeError(
                "optimizers[1] must be None with an ftrain.optim GradientTransformation: its schedule is part of it "
                "(pass it as the learning_rate of the transformation)."
            )
        if tx is not None and cls_kwargs is not None:
            raise RuntimeError("Passing both `optimizers` and `optimizer_cls_and_kwargs` arguments is incompatible.")
        if tx is not None and self.model_init is not None:
            raise RuntimeError(
                "Passing a `model_init` is incompatible with providing the `optimizers` argument. You should "
                "subclass `Trainer` and override the `create_optimizer_and_scheduler` method."
            )

    def _place_model(self) -> None:
        """Sets ``is_model_parallel`` and ``place_model_on_device`` (transformers' rules, see
        :mod:`ftrain.trainer.placement`) and moves the model to ``args.device`` through :meth:`_move_model_to_device`
        when it should be."""
        device = self.plan.process.device
        self.is_model_parallel = is_model_parallel(self.model, device)
        sharded = self.is_fsdp_enabled or self.args.deepspeed is not None  # shard_state places the leaves
        full_eval = self.plan.eval.full_eval_dtype is not None
        self.place_model_on_device = place_model_on_device(self.args, self.model, sharded=sharded, full_eval=full_eval)
        if self.place_model_on_device:
            self._move_model_to_device(self.model, device)

    def call_model_init(self, trial: Any = None) -> nn.Module:
        """Calls ``model_init`` with 0 or 1 argument (the trial), as transformers."""
        n = number_of_arguments(self.model_init)
        if n > 1:
            raise RuntimeError("model_init should have 0 or 1 argument.")
        model = self.model_init() if n == 0 else self.model_init(trial)
        if model is None:
            raise RuntimeError("model_init should not return None.")
        return model

    def _default_collator(self) -> Any:
        pc = self.processing_class
        if pc is not None and hasattr(pc, "pad") and getattr(pc, "pad_token_id", None) is not None:
            return make_padding_collator(pc)
        return default_collate

    def _default_callbacks(self, callbacks: list[Any] | None) -> list[Any]:
        progress = PrinterCallback if self.plan.log.disable_tqdm else DEFAULT_PROGRESS_CALLBACK
        integrations = get_reporting_integration_callbacks(list(self.plan.log.report_to))
        jit = [builtin_class(JITCheckpointCallback)()] if self.plan.save.jit_checkpoint else []
        return [*DEFAULT_CALLBACKS, *integrations, *jit, progress, *(callbacks or [])]

    # ---- callbacks ------------------------------------------------------------------------------------------------

    def add_callback(self, callback: Any) -> None:
        """Adds a callback (class or instance)."""
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback: Any) -> Any:
        """Removes and returns a callback (by class or instance), or ``None``."""
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback: Any) -> None:
        """Removes a callback (by class or instance)."""
        self.callback_handler.remove_callback(callback)

    # ---- core pieces ----------------------------------------------------------------------------------------------

    def _adopt_optimizers(self, optimizer: Any, scheduler: Any) -> tuple[Any, Any]:
        """``optimizers=(...)`` as the Trainer keeps them: a torch optimizer becomes a view over ftrain's state
        (checked now, so what ftrain cannot reproduce fails here), its scheduler a copy driving that view."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            return optimizer, scheduler
        self._optimizer_spec = _torch_optim.check_torch_optimizer(optimizer, self.model)
        view = _torch_optim.make_optimizer_view(self._optimizer_spec, self.model, self._optimizer_state)
        if scheduler is None:
            return view, None
        return view, _torch_optim.bind_scheduler(scheduler, optimizer, view)

    def _optimizer_state(self) -> tuple[Any, Any] | None:
        """``(opt_state, step)`` of the current train state, which ``trainer.optimizer`` views."""
        state = self._train_state
        return None if state is None else (state.opt_state, state.step)

    def create_optimizer(self, model: nn.Module | None = None) -> Any:
        """The optimizer for ``model`` (default ``self.model``), as transformers 5 builds it, unless one was given:
        ``optimizer_cls_and_kwargs`` or ``self.get_optimizer_cls_and_kwargs(args, model)`` (a subclass's override
        takes part) over transformers' decay / no-decay groups. It is a torch optimizer that views ftrain's state
        (:func:`~ftrain.trainer.torch_optim.make_optimizer_view`); the train step runs its translation."""
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            if self.optimizer_cls_and_kwargs is not None:
                cls, kwargs = self.optimizer_cls_and_kwargs
            else:
                cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            spec, self._kwargs_schedule = _torch_optim.build_optimizer_spec(
                cls, kwargs, opt_model, self.plan.optim.weight_decay
            )
            self._optimizer_spec = spec
            self.optimizer = _torch_optim.make_optimizer_view(spec, opt_model, self._optimizer_state)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        """The learning-rate scheduler of ``optimizer`` (default ``self.optimizer``) for ``args`` unless one was
        given: a torch ``LambdaLR`` whose values are ftrain's schedule (:func:`~ftrain.trainer.convert.make_schedule`,
        per group), ``ReduceLROnPlateau`` for ``reduce_lr_on_plateau``, or transformers' ``GreedyLR`` for ``greedy``
        (``None`` without transformers); the train step runs the same schedule.
        With an ftrain GradientTransformation given by the user, it is the ``args`` schedule as a function."""
        if self.lr_scheduler is None:
            optimizer = self.optimizer if optimizer is None else optimizer
            self._created_lr_scheduler = True
            if not isinstance(optimizer, torch.optim.Optimizer):
                self.lr_scheduler = make_schedule(self.plan.optim, num_training_steps)
            elif SchedulerType(self.plan.optim.schedule) == SchedulerType.REDUCE_ON_PLATEAU:
                kwargs = dict(self.plan.optim.schedule_kwargs)
                self.lr_scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **kwargs)
            elif SchedulerType(self.plan.optim.schedule) == SchedulerType.GREEDY:
                self.lr_scheduler = _torch_optim.greedy_view_scheduler(optimizer, self.plan.optim.schedule_kwargs)
            else:
                schedules = self._group_schedules(optimizer, num_training_steps)
                self.lr_scheduler = _torch_optim.make_lambda_scheduler(optimizer, schedules)
        return self.lr_scheduler

    def _group_schedules(self, optimizer: torch.optim.Optimizer, num_training_steps: int) -> list[Any]:
        """The ``args`` schedule for each group's learning rate (a schedule given to an ftrain factory wins)."""
        given = self._kwargs_schedule
        by_lr: dict[float, Any] = {}  # groups with the same lr share one schedule (one optimizer with a decay mask)
        for group in optimizer.param_groups:
            lr = group.get("initial_lr", group["lr"])
            if lr not in by_lr:
                policy = dataclasses.replace(self.plan.optim, learning_rate=lr)
                by_lr[lr] = given or make_schedule(policy, num_training_steps)
        return [by_lr[g.get("initial_lr", g["lr"])] for g in optimizer.param_groups]

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        """Sets ``self.optimizer`` and ``self.lr_scheduler`` (transformers' torch objects, views of ftrain's
        state) and the pure transformation the train step runs (:meth:`_make_transformation`)."""
        if self._user_optimizer is None:
            self.optimizer = None
        if self._created_lr_scheduler:
            self.lr_scheduler = None
        self.create_optimizer()
        self.create_scheduler(num_training_steps)
        self._tx = self._make_transformation(num_training_steps)
        self.callback_handler.optimizer, self.callback_handler.lr_scheduler = self.optimizer, self.lr_scheduler

    def _make_transformation(self, num_training_steps: int) -> GradientTransformation:
        """The pure optimizer: the user's GradientTransformation, or ``self.optimizer`` / ``self.lr_scheduler``
        translated — clipping to ``max_grad_norm`` first and ``ReduceLROnPlateau``'s (or ``GreedyLR``'s) scale last,
        as transformers clips before ``optimizer.step()`` and steps those schedulers after evaluations."""
        if isinstance(self.optimizer, GradientTransformation):
            return self.optimizer
        spec, scheduler = self._optimizer_spec, self.lr_scheduler
        if spec is None or not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"trainer.optimizer is a {type(self.optimizer).__name__}; ftrain's Trainer needs the optimizer it "
                "created or was given (an override of create_optimizer must return self.optimizer built by "
                "Trainer.create_optimizer, or assign an ftrain.optim GradientTransformation)."
            )
        is_plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        is_greedy = SchedulerType(self.plan.optim.schedule) == SchedulerType.GREEDY and self._created_lr_scheduler
        is_greedy = is_greedy or _torch_optim.is_greedy_scheduler(scheduler)
        if is_plateau or is_greedy or scheduler is None:
            lrs = [g["lr"] for g in self.optimizer.param_groups]
        elif self._created_lr_scheduler:
            lrs = self._group_schedules(self.optimizer, num_training_steps)
        else:
            lrs = _torch_optim.torch_lr_schedules(scheduler, self.optimizer, num_training_steps)
        names = list(_optim.hf_decay_mask(self.model))
        parts = []
        if self.plan.optim.max_grad_norm is not None and self.plan.optim.max_grad_norm > 0:
            parts.append(_optim.clip_by_global_norm(self.plan.optim.max_grad_norm))
        parts.append(_torch_optim.make_transformation(spec, lrs, all_names=names))
        if is_plateau:
            parts.append(_torch_optim.plateau_transformation(scheduler))
        elif is_greedy:
            parts.append(self._greedy_transformation(scheduler))
        return _optim.chain(*parts)

    def _greedy_transformation(self, scheduler: Any) -> GradientTransformation:
        """``GreedyLR``'s scale: from the scheduler when it is transformers' (given or created), else from ``args``
        (a created one without transformers installed)."""
        if _torch_optim.is_greedy_scheduler(scheduler):
            return _torch_optim.greedy_transformation(scheduler)
        lr = self.optimizer.param_groups[0]["lr"]
        return get_greedy_schedule(lr, **self.plan.optim.schedule_kwargs)

    def _loss_with_outputs(self, model: Any, batch: Any) -> tuple[Loss, Any]:
        fn = make_loss_fn(self.model, label_smoothing=self._label_smoothing(), compute_loss_func=self.compute_loss_func)
        return fn(model, batch)

    def _label_smoothing(self) -> float:
        """The label-smoothing epsilon the loss uses: ``self.label_smoother``'s (0 when it is ``None``).

        Raises:
            TypeError: ``label_smoother`` was replaced by an object that is not a ``LabelSmoother`` (ftrain's or
                transformers'): the step's fused loss can apply uniform smoothing only.
        """
        smoother = self.label_smoother
        if smoother is None:
            return 0.0
        if type(smoother).__name__ != "LabelSmoother" or getattr(smoother, "ignore_index", None) != -100:
            raise TypeError(
                f"trainer.label_smoother is a {type(smoother).__name__}; ftrain's step applies uniform label "
                "smoothing in its fused cross-entropy, so it takes None or a LabelSmoother(epsilon=..., "
                "ignore_index=-100). For another loss, pass compute_loss_func= or override compute_loss."
            )
        return float(smoother.epsilon)

    def _make_loss_fn(self) -> Any:
        """The step's ``loss_fn(model, batch) -> (sum, count)``, built from the overridable pieces.

        Without overrides it is the fused default loss (under ``compute_loss_context_manager``). With an overridden
        ``compute_loss`` or ``training_step`` it calls ``training_step`` per microbatch and weights its loss: by 1
        for a custom ``compute_loss`` (a microbatch mean), else by the microbatch's item count, which is passed as
        ``num_items_in_batch``. (NEFTune's hook sits on the state's skeleton, see ``_setup_training``.)
        """
        kwargs = dict(label_smoothing=self._label_smoothing(), compute_loss_func=self.compute_loss_func)
        custom_loss = self.overrides("compute_loss")
        default = None if custom_loss or self.overrides("training_step") else make_loss_fn(self.model, **kwargs)
        contexts = ("compute_loss_context_manager", "autocast_smart_context_manager")
        if default is not None and not any(self.overrides(hook) for hook in contexts):
            # Nothing here refers to the Trainer, so a precompiled step (ftrain.compile_cache) can be saved.
            return _default_loss(default, self.plan.process.device.type, self.plan.step.autocast_dtype)

        def loss_fn(model: Any, batch: Any) -> Loss:
            if default is not None:
                with self.compute_loss_context_manager():
                    return default(model, batch)[0]
            if custom_loss:
                weight, items = torch.ones((), dtype=torch.int64), None
            else:
                weight = items = loss_item_count(self.model, batch, **kwargs)
            loss = self.training_step(model, batch, num_items_in_batch=items)
            _check_training_step_loss(type(self).__name__, loss, model)
            return Loss(loss * weight.to(device=loss.device, dtype=loss.dtype), weight.to(loss.device))

        return loss_fn

    def _make_train_step(self) -> Any:
        """The pure train step the loop runs, donated: the Trainer owns its ``TrainState`` and never reads one after
        stepping it, so the step writes the new state into the old one's tensors, in place as ``torch.optim`` does
        (one copy of params and optimizer state; ``self.model``, whose storage the state shares, sees each update).
        Eager, ``make_train_step(..., donate=True)``; with ``torch_compile``, ``ftrain.jit`` donates
        (``plan.step.jit_options``). A state sharded on a mesh (DTensor leaves) steps undonated when eager: the
        eager in-place update copies with ``torch._foreach_copy_``, which DTensor has no sharding rule for."""
        accum_steps = self.plan.data.gradient_accumulation_steps
        if self.plan.step.torch_compile:
            options = dict(self.plan.step.jit_options)
            if self.mesh is not None:  # DTensor leaves: the optimizer stays in the compiled graph
                options["optimizer"] = "compiled"
            return jit(make_train_step(self._make_loss_fn(), accum_steps=accum_steps), **options)
        return make_train_step(self._make_loss_fn(), accum_steps=accum_steps, donate=self.mesh is None)

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        """One microbatch's differentiable loss, called inside the pure train step (transformers' name and
        arguments); the default is ``compute_loss`` under ``compute_loss_context_manager()``.

        Override it to change or extend the per-microbatch loss: ``loss = super().training_step(...)``, then
        modify and *return* it. Unlike transformers' it must not call ``backward`` (the step differentiates what
        it returns, then accumulates, clips and updates).

        Args:
            model: the model bound to the step's parameters (call it like the module).
            inputs: one microbatch.
            num_items_in_batch: the microbatch's item count when the default ``compute_loss`` is used (its mean
                is then ``sum / num_items_in_batch``); ``None`` with an overridden ``compute_loss``.
        """
        with self.compute_loss_context_manager():
            return self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)

    def compute_loss_context_manager(self) -> contextlib.ExitStack:
        """The contexts the loss is computed in (transformers' name): ``autocast_smart_context_manager()``."""
        stack = contextlib.ExitStack()
        autocast = self.autocast_smart_context_manager()
        if not isinstance(autocast, contextlib.nullcontext):
            stack.enter_context(autocast)
        return stack

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True) -> contextlib.AbstractContextManager:
        """``torch.autocast(device_type, dtype=torch.bfloat16)`` when ``args.bf16``, else a ``nullcontext``."""
        dtype = self.plan.step.autocast_dtype
        if dtype is not None:
            return torch.autocast(self.plan.process.device.type, dtype=dtype, cache_enabled=cache_enabled)
        return contextlib.nullcontext()

    def overrides(self, hook: str) -> bool:
        """Whether ``hook`` is not the method of the ftrain trainer this one derives from (``Trainer``, or
        ``Seq2SeqTrainer`` whose own hooks the components know): its class overrides it, or it was set on the
        instance (``trainer.get_batch_samples = wrapped(trainer.get_batch_samples)``, as transformers' own tests
        do). The components then call it; otherwise they may take a faster path with the same result."""
        if hook in vars(self):
            return True
        ftrain_class = next(c for c in type(self).__mro__ if c.__module__.startswith("ftrain.trainer."))
        return getattr(type(self), hook) is not getattr(ftrain_class, hook)

    # ---- evaluation (:class:`~ftrain.trainer.evaluation.Evaluator`) ---------------------------------------------

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """The microbatch's mean loss (``sum / count``, or ``sum / num_items_in_batch`` when given), as transformers.

        Override it to change the training loss: the train step then uses the returned scalar as the mean over
        this microbatch, one item per microbatch (transformers' behaviour for losses without ``num_items``).
        """
        return self._evaluator.compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def prediction_step(
        self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: list[str] | None = None
    ) -> tuple[torch.Tensor | None, Any, Any]:
        """``(loss, logits, labels)`` of one batch, as transformers; ``loss`` is the batch's mean."""
        return self._evaluator.prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        """Runs the model over ``dataloader`` (a BatchStream); returns predictions, labels and prefixed metrics.

        ``include_for_metrics`` adds ``inputs`` (the model's main input, dim 1 padded with -100 across batches) and
        ``losses`` (each batch's mean loss, once per example) to the ``EvalPrediction``. With ``batch_eval_metrics``
        ``compute_metrics(EvalPrediction(batch tensors), compute_result=is_last_batch)`` runs on every batch (its
        ``inputs`` is then the whole batch dict, as transformers) and its last return is the metrics; predictions are
        then not gathered, except for ``predict``.
        """
        return self._evaluator.evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Evaluates on ``eval_dataset`` (default ``self.eval_dataset``; a dict evaluates each, prefixed by name),
        logs the metrics and fires ``on_evaluate``.

        Returns:
            ``{prefix}_loss``, the ``compute_metrics`` results, ``{prefix}_runtime``, ``{prefix}_samples_per_second``
            and ``{prefix}_steps_per_second``.
        """
        self._memory_tracker.start("eval")
        metrics = self._evaluator.evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        self._memory_tracker.stop_and_update_metrics("eval", metrics)
        return metrics

    def predict(
        self, test_dataset: Any, ignore_keys: list[str] | None = None, metric_key_prefix: str = "test"
    ) -> PredictionOutput:
        """Predictions, labels (``None`` without) and ``test_*`` metrics on ``test_dataset``; fires ``on_predict``."""
        self._memory_tracker.start("test")
        output = self._evaluator.predict(test_dataset, ignore_keys, metric_key_prefix)
        self._memory_tracker.stop_and_update_metrics("test", output.metrics)
        return output

    # ---- NEFTune --------------------------------------------------------------------------------------------------

    def _activate_neftune(self, model: Any) -> Any:
        """Registers the NEFTune noise hook on ``model``'s input embeddings (the step's skeleton) and keeps its
        handle as ``neftune_hook_handle``; returns ``model`` (transformers 4.x's contract). The noise is
        ``uniform(-m, m)`` with ``m = neftune_noise_alpha / sqrt(seq_len * hidden)``, added to the embeddings' output
        in training mode only (transformers' NEFTune)."""
        get = getattr(model, "get_input_embeddings", None)
        if get is None:
            raise ValueError(
                f"neftune_noise_alpha needs a model with get_input_embeddings(); {type(model).__name__} has none."
            )
        alpha = float(self.neftune_noise_alpha)

        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            if not module.training:
                return output
            magnitude = alpha / math.sqrt(output.size(1) * output.size(2))
            return output + torch.zeros_like(output).uniform_(-magnitude, magnitude)

        self.neftune_hook_handle = get().register_forward_hook(hook)
        return model

    def _deactivate_neftune(self, model: Any) -> None:
        """Removes the hook that :meth:`_activate_neftune` registered (``model`` is the module it was registered
        on, as in transformers 4.x).

        Raises:
            ValueError: NEFTune was not activated.
        """
        if self.neftune_hook_handle is None:
            raise ValueError("Neftune is not activated make sure to call `trainer._activate_neftune()` first")
        self.neftune_hook_handle.remove()
        self.neftune_hook_handle = None

    # ---- data -----------------------------------------------------------------------------------------------------

    def _stream(self, dataset: Any, batch_size: int, *, train: bool) -> TrainerDataLoader:
        """The :class:`~ftrain.trainer.dataloaders.TrainerDataLoader` over ``dataset`` with ``batch_size`` rows per
        process and microbatch (the global microbatch, split over the processes, with
        ``accelerator_config["split_batches"]``)."""
        data = self.plan.data
        columns = signature_columns(self.model, label_names=data.label_names) if data.remove_unused_columns else None
        strategy = data.sampling_strategy if train else "sequential"
        by_length = strategy == "group_by_length"
        rank, world = self._data_parallel()
        if data.split_batches and batch_size % world:
            raise ValueError(
                f"accelerator_config['split_batches']=True splits each batch of {batch_size} rows over {world} "
                "processes, so the batch size must be a multiple of the number of processes."
            )
        return TrainerDataLoader(
            dataset,
            batch_size if data.split_batches else batch_size * world,
            seed=data.seed,
            shuffle=train and data.shuffle,
            drop_last=data.drop_last,
            collate_fn=self.data_collator,
            accum_steps=data.gradient_accumulation_steps if train else 1,
            rank=rank,
            world_size=world,
            num_workers=data.num_workers,
            pin_memory=data.pin_memory,
            prefetch_factor=data.prefetch_factor,
            multiprocessing_context=data.multiprocessing_context,
            persistent_workers=data.persistent_workers,
            group_by_length=by_length,
            lengths=data.length_column_name if by_length and _has_column(dataset, data.length_column_name) else None,
            columns=columns,
            label_keys=tuple(self.label_names) or ("labels",),
        )

    def _data_parallel(self) -> tuple[int, int]:
        """``(rank, size)`` among the processes that read different rows (the mesh's data dims); ``(0, 1)`` alone."""
        if self.mesh is None:
            return 0, 1
        from ftrain.distributed import data_parallel_rank, data_parallel_size

        return data_parallel_rank(self.mesh), data_parallel_size(self.mesh)

    def get_train_dataloader(self) -> TrainerDataLoader:
        """The training loader: ``_get_dataloader(train_dataset, "Training", _train_batch_size, is_training=True)``,
        a :class:`~ftrain.trainer.dataloaders.TrainerDataLoader` (one list of ``gradient_accumulation_steps``
        microbatches of ``_train_batch_size × world_size`` examples per optimizer step). An override may return any
        re-iterable loader of batches (a torch ``DataLoader``, a list); ``train()`` reads it as transformers does."""
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        return self._get_dataloader(self.train_dataset, "Training", self._train_batch_size, is_training=True)

    def get_eval_dataloader(self, eval_dataset: Any = None) -> TrainerDataLoader:
        """The evaluation loader (in order): ``_get_dataloader(dataset, "Evaluation", eval_batch_size)``; a ``str``
        names one of ``self.eval_dataset``'s entries. With ``dataloader_persistent_workers`` it is kept per name
        (``"eval"`` for the default) and reused, as transformers, so its worker processes stay alive."""
        if eval_dataset is None and self.eval_dataset is None:
            raise ValueError("Trainer: evaluation requires an eval_dataset.")
        key = eval_dataset if isinstance(eval_dataset, str) else "eval"
        cached = self._eval_dataloaders.get(key) if self.plan.data.persistent_workers else None
        if cached is not None:
            self.callback_handler.eval_dataloader = cached
            return cached
        if isinstance(eval_dataset, str):
            eval_dataset = self.eval_dataset[eval_dataset]
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        loader = self._get_dataloader(dataset, "Evaluation", self.plan.data.eval_batch_size, dataloader_key=key)
        self.callback_handler.eval_dataloader = loader
        return loader

    def get_test_dataloader(self, test_dataset: Any) -> TrainerDataLoader:
        """The prediction loader over ``test_dataset`` (in order): ``_get_dataloader(test_dataset, "test", ...)``."""
        return self._get_dataloader(test_dataset, "test", self.plan.data.eval_batch_size)

    def num_examples(self, dataloader: Any) -> int:
        """Examples in the loader's dataset (``len(dataloader.dataset)``, the source of a BatchStream), else
        ``len(dataloader) × per_device_train_batch_size``, as transformers estimates it."""
        if isinstance(dataloader, BatchStream):
            return len(dataloader.source)
        try:
            return len(dataloader.dataset)
        except (AttributeError, TypeError, NameError):
            return len(dataloader) * self.plan.data.per_device_train_batch_size

    def _model_for_inference(self) -> nn.Module:
        """The model ``evaluation_loop`` runs, as transformers prepares it: the train state's weights synced into
        ``self.model``, ``_wrap_model(model, training=False)``, then — for ``bf16_full_eval`` / ``fp16_full_eval``
        outside ``train()`` — a copy cast to that dtype on ``args.device`` (:func:`~ftrain.trainer.placement.
        cast_for_full_eval`; transformers casts the model itself, ftrain leaves it and the train state as they
        are), in eval mode."""
        self._sync_model()
        model = self._wrap_model(self.model, training=False)
        dtype = self.plan.eval.full_eval_dtype
        if dtype is not None and not self.is_in_train:
            model = cast_for_full_eval(model, dtype, self.plan.process.device)
        if callable(getattr(model, "eval", None)):
            model.eval()
        return model

    # ---- saving and logging ---------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Writes ``model.safetensors`` + ``config.json`` (``from_pretrained`` loads them), the processing class,
        ``training_args.json`` and ``training_args.bin`` (``torch.save(args)``, as transformers) into
        ``output_dir`` (default ``args.output_dir``). With several processes every rank
        calls it (the sharded weights are gathered) and ``args.should_save`` (rank 0) writes the full model."""
        output_dir = self.plan.save.output_dir if output_dir is None else output_dir
        self._sync_model()  # a collective when the state is sharded: before the rank check
        if not self.plan.save.should_save:
            return
        from ftrain.checkpoint import export_pretrained

        export_pretrained(self._export_state() if self._train_state is not None else self.model, output_dir)
        if self.processing_class is not None and hasattr(self.processing_class, "save_pretrained"):
            self.processing_class.save_pretrained(output_dir)
        with open(os.path.join(output_dir, TRAINING_ARGS_NAME), "w", encoding="utf-8") as f:
            f.write(self.args.to_json_string())
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_BIN))  # for tooling; see trainer.checkpoints

    def save_state(self) -> None:
        """Writes ``trainer_state.json`` into ``args.output_dir``."""
        if self.is_world_process_zero():
            os.makedirs(self.plan.save.output_dir, exist_ok=True)
            self.state.save_to_json(os.path.join(self.plan.save.output_dir, TRAINER_STATE_NAME))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds ``epoch`` (and ``num_input_tokens_seen`` when counted, with ``train_tokens_per_second`` of this
        ``train()`` call when ``start_time`` is given), appends ``{**logs, "step": global_step}`` to ``log_history``
        and fires ``on_log``."""
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        if self.plan.log.num_input_tokens != "no":
            logs["num_input_tokens_seen"] = self.state.num_input_tokens_seen
            if start_time is not None:
                tokens = self.state.num_input_tokens_seen - (self._loop.run.initial_tokens if self._loop.run else 0)
                logs.update(speed_metrics("train", start_time, num_tokens=tokens))
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs)

    def log_metrics(self, split: str, metrics: dict[str, Any]) -> None:
        """Prints ``metrics`` as transformers' ``log_metrics`` does (world process zero only)."""
        if not self.is_world_process_zero():
            return
        print(f"***** {split} metrics *****")
        width = max((len(k) for k in metrics), default=0)
        for key in sorted(metrics):
            print(f"  {key: <{width}} = {metrics[key]}")

    def save_metrics(self, split: str, metrics: dict[str, Any], combined: bool = True) -> None:
        """Writes ``{split}_results.json`` (and merges into ``all_results.json`` when ``combined``)."""
        if not self.is_world_process_zero():
            return
        output_dir = self.plan.save.output_dir
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, f"{split}_results.json")
        with open(path, "w") as f:
            json.dump(metrics, f, indent=4, sort_keys=True)
        if combined:
            all_path = os.path.join(output_dir, "all_results.json")
            merged = json.load(open(all_path)) if os.path.exists(all_path) else {}
            merged.update(metrics)
            with open(all_path, "w") as f:
                json.dump(merged, f, indent=4, sort_keys=True)

    # ---- small queries --------------------------------------------------------------------------------------------

    def is_world_process_zero(self) -> bool:
        """True on the global main process."""
        return self.plan.process.process_index == 0

    def is_local_process_zero(self) -> bool:
        """True on each node's main process."""
        return self.plan.process.local_process_index == 0

    def get_num_trainable_parameters(self) -> int:
        """Number of parameters with ``requires_grad``."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def get_learning_rates(self) -> list[float]:
        """Each parameter group's current learning rate (``[g["lr"] for g in self.optimizer.param_groups]``, as
        transformers); with a user's GradientTransformation, the one of its last update (the ``args``
        schedule's first value before training).

        Raises:
            ValueError: the optimizer is not created yet.
        """
        if self.optimizer is None:
            raise ValueError("Trainer optimizer is None, please make sure you have setup the optimizer before.")
        if isinstance(self.optimizer, torch.optim.Optimizer):
            return [group["lr"] for group in self.optimizer.param_groups]
        if self._train_state is not None:
            lr = logged_learning_rate(self._train_state.opt_state)
            if lr is not None:
                return [float(lr)]
        return [float(make_schedule(self.plan.optim, max(self.plan.length.max_steps, 1))(torch.tensor(0)))]

    def get_decay_parameter_names(self, model: nn.Module | None = None) -> list[str]:
        """Names of the parameters that get weight decay (transformers' rule: not biases, not norm weights)."""
        return [name for name, decays in _optim.hf_decay_mask(model or self.model).items() if decays]

    # ---- the training loop (:class:`~ftrain.trainer.loop.TrainingLoop`) ----------------------------------------

    def train(
        self,
        resume_from_checkpoint: bool | str | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
    ) -> TrainOutput:
        """Trains for ``max_steps`` / ``num_train_epochs``; resumes bitwise from a checkpoint (``True``: the last one
        in ``output_dir``). Returns ``TrainOutput(global_step, training_loss, metrics)``.

        ``trial`` (an optuna ``Trial`` or a dict of hyper-parameters), as transformers: ``model_init`` gets it, it is
        applied by :meth:`_hp_search_setup` (which keeps it as ``self._trial`` and, inside a search, sets its
        hyper-parameters on the arguments) and it is recorded in ``state.trial_params``."""
        return self._loop.train(resume_from_checkpoint, trial, ignore_keys_for_eval)

    def _inner_training_loop(
        self,
        batch_size: int | None = None,
        args: TrainingArguments | None = None,
        resume_from_checkpoint: str | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
    ) -> TrainOutput:
        """Sets up the state and step, fires ``on_train_begin``, runs the epochs and finishes (transformers'
        arguments: ``batch_size`` is the per-device train batch size of this run, as ``auto_find_batch_size``
        passes it (``None``: keep ``_train_batch_size``); ``args`` replaces ``self.args`` when it is another object;
        ``resume_from_checkpoint`` is a checkpoint folder, already resolved by ``train``)."""
        return self._loop.inner_training_loop(batch_size, args, resume_from_checkpoint, trial, ignore_keys_for_eval)

    def _distribute(self, state: TrainState) -> TrainState:
        """The state laid out over processes by :func:`ftrain.distributed.shard_state`, with the layout and mesh that
        ``create_accelerator_and_postprocess`` decided (FSDP / ZeRO from ``fsdp`` or ``deepspeed``, else plain data
        parallel); unchanged on one process. Every rank builds the same state (same model, same seed) first.

        The step then reduces the loss ``(sum, count)`` and the gradients over the data-parallel ranks, so its
        ``loss`` and ``grad_norm`` are global and identical on every rank: the logged loss is transformers'
        ``nested_gather(tr_loss).mean()`` (its per-rank losses are scaled so that their mean is the global mean).
        """
        return self._loop.distribute(state)

    def _export_state(self) -> TrainState:
        """The train state with full parameters (a collective when sharded; see ``TrainingLoop.export_state``)."""
        return self._loop.export_state()

    def _sync_model(self) -> None:
        """Copies the train state's weights into ``self.model`` (what users, callbacks and eval see)."""
        self._loop.sync_model()

    def _enable_activation_checkpointing(self, skeleton: Any) -> None:
        """transformers' activation checkpointing on the step's meta skeleton
        (:func:`~ftrain.trainer.loop.enable_activation_checkpointing` with ``activation_checkpointing_kwargs``)."""
        enable_activation_checkpointing(skeleton, self.plan.step.activation_checkpointing)

    def _run_epoch(
        self,
        model: Any,
        epoch: int,
        train_dataloader: Any,
        steps_in_epoch: int,
        num_update_steps_per_epoch: int,
        trial: Any,
        ignore_keys_for_eval: list[str] | None,
        start_time: float,
        resume_from_checkpoint: str | None,
        epochs_trained: int,
        steps_trained_in_current_epoch: int,
    ) -> None:
        """The optimizer steps of epoch ``epoch`` of ``train_dataloader`` (``steps_in_epoch`` microbatches in
        ``num_update_steps_per_epoch`` steps); transformers' ``_run_epoch`` and arguments. In the first epoch of a
        resumed run (``epoch == epochs_trained`` and ``resume_from_checkpoint``), the
        ``steps_trained_in_current_epoch`` microbatches already trained are skipped (a map-style stream starts at
        the step, an iterable or user loader is read past them). Each step's microbatches come from
        ``get_batch_samples``; ``model`` is handed on to ``_maybe_log_save_evaluate``.

        Raises:
            ValueError: ``train_dataloader`` is not the loader ``train()`` reads.
        """
        resumed = epoch == epochs_trained and resume_from_checkpoint is not None
        skip = steps_trained_in_current_epoch // self.plan.data.gradient_accumulation_steps if resumed else 0
        self._loop.run_epoch(model, epoch, train_dataloader, steps_in_epoch, num_update_steps_per_epoch, skip, trial,
                             ignore_keys_for_eval, start_time)  # fmt: skip

    def _track_num_input_tokens(self, inputs: Any) -> None:
        """Adds the tokens of ``inputs`` (a step's microbatches) to ``state.num_input_tokens_seen``
        (``include_num_input_tokens_seen``)."""
        self._loop.track_num_input_tokens(inputs)

    def _maybe_log_save_evaluate(
        self,
        tr_loss: torch.Tensor,
        grad_norm: torch.Tensor | float | None,
        model: Any,
        trial: Any,
        epoch: float,
        ignore_keys_for_eval: list[str] | None,
        start_time: float,
        learning_rate: float | None = None,
    ) -> None:
        """Logs, evaluates and saves as ``control`` asks (transformers' ``_maybe_log_save_evaluate`` and
        arguments): ``tr_loss`` is the sum of the step losses since the last log (reset when logged), ``grad_norm``
        the last step's, ``learning_rate`` the logged one (``None``: the last update's)."""
        self._loop.maybe_log_save_evaluate(tr_loss, grad_norm, model, trial, ignore_keys_for_eval, start_time,
                                           learning_rate)  # fmt: skip

    def _evaluate(
        self, trial: Any, ignore_keys_for_eval: list[str] | None, skip_scheduler: bool = False
    ) -> dict[str, float]:
        """Evaluates, then feeds ``eval_{metric_for_best_model}`` to the optimizer's plateau state (transformers
        steps ``ReduceLROnPlateau`` there), through :func:`ftrain.schedules.plateau_update`. The search's
        objective is reported for ``trial`` by the search's callback, on ``on_evaluate``."""
        return self._loop.evaluate(ignore_keys_for_eval, skip_scheduler)

    def _determine_best_metric(self, metrics: dict[str, float], trial: Any) -> bool:
        """Updates ``best_metric`` / ``best_global_step`` from ``metric_for_best_model``; True on a new best.
        (``trial``, transformers' argument, names its output folder there; ftrain's best checkpoint is found by
        ``best_global_step`` in ``args.output_dir``, which a search trial's arguments already point at.)"""
        return self._loop.determine_best_metric(metrics)

    def _finalize_training(self, trial: Any, num_train_samples: int, start_time: float) -> TrainOutput:
        """The ``train_*`` metrics and last log, the best model (``load_best_model_at_end``), ``on_train_end``.
        (``trial`` as in :meth:`_determine_best_metric`.)"""
        return self._loop.finalize_training(num_train_samples, start_time)

    # ---- checkpoints (:class:`~ftrain.trainer.checkpoints.TrainerCheckpoints`) -----------------------------------

    def _resolve_resume(self, resume_from_checkpoint: bool | str | None) -> str | None:
        """The checkpoint folder ``train(resume_from_checkpoint=...)`` resumes from, or ``None``."""
        return self._checkpoints.resolve_resume(resume_from_checkpoint)

    def _checkpoint_manager(self, directory: str | os.PathLike[str]) -> CheckpointManager:
        """The :class:`~ftrain.checkpoint.CheckpointManager` of ``directory`` (one at a time, made when needed)."""
        return self._checkpoints.manager(directory)

    def _restore_checkpoint(self, checkpoint: str, state: TrainState) -> TrainState:
        """Resumes from ``checkpoint`` (ftrain's or transformers'): sets the ``TrainerState``, then calls
        ``_load_optimizer_and_scheduler``, ``_load_scaler`` and ``_load_rng_state`` on ``state``; the resumed state."""
        return self._checkpoints.restore_checkpoint(checkpoint, state)

    def _load_best_model(self) -> None:
        """Restores the whole state saved in ``best_model_checkpoint`` (weights bitwise)."""
        self._checkpoints.load_best_model()

    def _get_output_dir(self, trial: Any) -> str:
        """The folder ``_save_checkpoint`` writes ``checkpoint-{global_step}`` into and rotates, as transformers (an
        override moves them). A search trial's arguments already point ``output_dir`` at the trial's ``run-*``
        folder (:meth:`_hp_search_setup`), so ``trial`` changes nothing here."""
        return self.plan.save.output_dir

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Writes ``_get_output_dir(trial)/checkpoint-{global_step}`` atomically (the state and transformers' files,
        through ``_write_hf_views``), pushes it, then rotates. ``model`` is transformers' (unused)."""
        self._checkpoints.save_checkpoint(self._get_output_dir(trial))

    def _write_hf_views(self, folder: Path) -> None:
        """transformers' files of a checkpoint into the uncommitted ``folder``, in transformers' order:
        ``save_model``, ``_save_optimizer_and_scheduler``, ``_save_scaler``, ``_save_rng_state``,
        ``trainer_state.json``."""
        self._checkpoints.write_hf_views(folder)

    def _checkpoint_dirs(self) -> list[tuple[int, str]]:
        """``(step, path)`` of every ``checkpoint-N`` folder of ``output_dir``, committed or not, by step."""
        return self._checkpoints.checkpoint_dirs()

    def _delete_checkpoint(self, step: int, path: str) -> None:
        """Deletes the checkpoint folder ``path`` of ``step`` through the manager."""
        self._checkpoints.delete_checkpoint(step, path)

    def _rotate_checkpoints(self, use_mtime: bool = False, output_dir: str | None = None) -> None:
        """transformers' rule: keep the newest and the best; delete the oldest others (by step, or by modification
        time with ``use_mtime``) down to ``save_total_limit``, in ``output_dir`` (default ``args.output_dir``)."""
        self._checkpoints.rotate_checkpoints(use_mtime, output_dir)

    # ---- set-up ---------------------------------------------------------------------------------------------------

    def create_accelerator_and_postprocess(self) -> None:
        """Records the process and device facts transformers' ``Trainer`` keeps after creating its accelerator.

        ftrain has no ``accelerate.Accelerator``: devices and process groups come from ``torch.distributed`` (read
        through ``args``), and gradient accumulation happens inside the pure step; ``accelerator`` is a
        :class:`~ftrain.trainer.accelerator.TrainerAccelerator` with accelerate's API over these facts. Sets
        ``accelerator``, ``device``, ``world_size``,
        ``process_index``, ``is_deepspeed_enabled`` / ``is_fsdp_xla_enabled`` (always ``False``: ftrain shards
        DTensor state leaves instead), ``is_fsdp_enabled`` (``ParallelConfig.dp_shard > 1``), ``is_tp_enabled``,
        ``gather_function`` (:meth:`_nested_gather`) and ``_train_batch_size``.

        With several processes (``WORLD_SIZE`` > 1, as torchrun sets) it also decides the layout,
        ``parallel_config`` (:func:`~ftrain.trainer.parallel.parallel_layout`), and builds ``mesh`` on it (starting
        the process group); both are ``None`` on one process.

        Like transformers, a ``num_steps`` in ``accelerator_config.gradient_accumulation_kwargs`` becomes
        ``args.gradient_accumulation_steps`` (ftrain accumulates inside the pure step).

        Raises:
            ValueError: ``accelerator_config["gradient_accumulation_kwargs"]["num_steps"]`` together with
                ``gradient_accumulation_steps > 1`` (transformers' check: which one is meant is unknown), or a
                layout :func:`~ftrain.trainer.parallel.parallel_layout` refuses.
        """
        args = self.args
        config = args.accelerator_config
        kwargs = config.get("gradient_accumulation_kwargs") if isinstance(config, Mapping) else None
        kwargs = getattr(config, "gradient_accumulation_kwargs", None) if kwargs is None else kwargs
        num_steps = (kwargs or {}).get("num_steps")
        # __init__ calls this; a second call (scripts, hyper-parameter search) finds its own takeover, not a conflict
        taken = self._num_steps_taken == num_steps == args.gradient_accumulation_steps
        if num_steps is not None and args.gradient_accumulation_steps > 1 and not taken:
            raise ValueError(
                "The `AcceleratorConfig`'s `num_steps` is set but `gradient_accumulation_steps` is greater than 1 in "
                "the passed `TrainingArguments`. Set only one of them."
            )
        if num_steps is not None:
            args.gradient_accumulation_steps = self._num_steps_taken = int(num_steps)  # transformers does, too
        plan = self.plan
        process = plan.process
        self.device, self.world_size, self.process_index = process.device, process.world_size, process.process_index
        self.is_deepspeed_enabled = self.is_fsdp_xla_enabled = False
        # Several processes: the layout, and the mesh (starting the process group from torchrun's environment).
        self.parallel_config = plan.parallel.layout
        self.mesh = None
        if self.parallel_config is not None:
            from ftrain.distributed import build_mesh

            self.mesh = build_mesh(self.parallel_config, self.device.type, backend=plan.parallel.backend,
                                   timeout=plan.parallel.timeout)  # fmt: skip
        self.is_fsdp_enabled = plan.parallel.fsdp_enabled
        self.accelerator = TrainerAccelerator(
            device=self.device,
            num_processes=self.world_size,
            process_index=self.process_index,
            local_process_index=process.local_process_index,
            mixed_precision="bf16" if plan.step.autocast_dtype == torch.bfloat16 else "no",
            fsdp=self.is_fsdp_enabled,
            config=AcceleratorConfig.from_value(config),
        )
        self.is_tp_enabled = self.get_tp_size() > 1
        self.gather_function = self._nested_gather
        self._train_batch_size = plan.data.train_batch_size

    @property
    def model_wrapped(self) -> nn.Module:
        """The outermost module around the model (transformers' ``model_wrapped``): ``self.model`` itself, since
        ftrain never wraps the model (no ``DataParallel`` / ``DistributedDataParallel``: its step is a pure
        function of the state, sharded by the mesh)."""
        return self.model

    @model_wrapped.setter
    def model_wrapped(self, model: nn.Module) -> None:
        """Accepts what transformers' subclasses assign when it is (a parallel wrapper around) ``self.model``.

        Raises:
            ValueError: another module: ftrain trains ``self.model``; assign the model there instead.
        """
        if self.accelerator.unwrap_model(model) is not self.model:
            raise ValueError(
                f"Trainer.model_wrapped can only be the Trainer's model (or a parallel wrapper of it): ftrain never "
                f"wraps the model, so model_wrapped is trainer.model; got another {type(model).__name__}. Assign "
                "trainer.model to train a different module."
            )

    @property
    def tokenizer(self) -> Any:
        """Deprecated alias of ``processing_class`` (as transformers 4.46-4.57), with its warning."""
        logger.warning("Trainer.tokenizer is now deprecated. You should use Trainer.processing_class instead.")
        return self.processing_class

    @tokenizer.setter
    def tokenizer(self, processing_class: Any) -> None:
        logger.warning(
            "Trainer.tokenizer is now deprecated. You should use `Trainer.processing_class = processing_class` instead."
        )
        self.processing_class = processing_class

    def _align_special_tokens(self) -> None:
        """Aligns the model config's (and generation config's) EOS / BOS / PAD ids with the tokenizer's.

        transformers' rule (5.x ``align_special_tokens``): only ids the tokenizer defines are propagated; an id
        already in the config (and generation config) is left alone; a config that lists several EOS ids, and the
        generation config, keep their other ids after the tokenizer's. Warns with the ids it changed. Does nothing
        without a ``processing_class`` or a model ``config``.
        """
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        config = getattr(self.model, "config", None)
        if tokenizer is None or config is None:
            return
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        generation = getattr(self.model, "generation_config", None)
        updated: dict[str, Any] = {}
        for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
            token = getattr(tokenizer, name, None)
            if token is None:
                continue
            in_config = getattr(config, name, None)
            config_ids = in_config if isinstance(in_config, list) else [in_config]
            gen_ids = getattr(generation, name, None) if generation is not None else None
            gen_ids = gen_ids if isinstance(gen_ids, list) else [gen_ids]
            if token in config_ids and (generation is None or token in gen_ids):
                continue
            updated[name] = token
            several = name == "eos_token_id"
            keep = several and isinstance(in_config, list)
            setattr(config, name, [token, *(t for t in config_ids if t != token)] if keep else token)
            if generation is not None:
                others = [t for t in gen_ids if t is not None and t != token]
                setattr(generation, name, [token, *others] if several else token)
        if updated:
            logger.warning(
                "The tokenizer has new PAD/BOS/EOS tokens that differ from the model config and generation config. "
                "The model config and generation config were aligned accordingly, being updated with the "
                f"tokenizer's values. Updated tokens: {updated}."
            )

    # ---- data -----------------------------------------------------------------------------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        """Sets ``_signature_columns`` (once): the model ``forward``'s parameters (the base model's for PEFT), then
        ``label``, ``label_ids`` and the label names (:func:`ftrain.data.columns.signature_columns`)."""
        if self._signature_columns is None:
            self._signature_columns = signature_columns(self.model, label_names=self.label_names)

    def _remove_unused_columns(self, dataset: Any, description: str | None = None) -> Any:
        """``dataset`` (a ``datasets.Dataset``) without the columns the model's ``forward`` does not take, when
        ``args.remove_unused_columns``.

        Raises:
            ValueError: no column matches the signature (it names both lists and how to fix it).
        """
        if not self.plan.data.remove_unused_columns:
            return dataset
        self._set_signature_columns_if_needed()
        return remove_unused_columns(dataset, self._signature_columns, model_name=type(self.model).__name__,
                                     description=description or "")  # fmt: skip

    def _get_collator_with_removed_columns(self, data_collator: Callable, description: str | None = None) -> Callable:
        """``data_collator`` preceded by the column filter (dict examples keep the signature keys; others pass
        through), when ``args.remove_unused_columns``; else ``data_collator`` itself."""
        if not self.plan.data.remove_unused_columns:
            return data_collator
        self._set_signature_columns_if_needed()
        keep = make_column_filter(self._signature_columns, model_name=type(self.model).__name__)

        def collate(features: list[Any]) -> Any:
            return data_collator([keep(f) for f in features])

        return collate

    def _get_dataloader(
        self,
        dataset: Any,
        description: str,
        batch_size: int,
        sampler_fn: Callable | None = None,
        is_training: bool = False,
        dataloader_key: str | None = None,
    ) -> Any:
        """The :class:`~ftrain.trainer.dataloaders.TrainerDataLoader` over ``dataset`` (what ``get_*_dataloader``
        return; override it to change how all three are built).

        It removes unused columns itself, collates with ``data_collator``, shards per rank and, when training, yields
        one list of ``gradient_accumulation_steps`` microbatches per optimizer step in an order that is a function
        of ``(data_seed or seed, epoch)`` — so a resume continues bitwise. With ``dataloader_persistent_workers``
        the loader is kept under ``dataloader_key`` for ``get_eval_dataloader`` to reuse.

        Raises:
            ValueError: a ``sampler_fn``: the order is chosen by ``args.train_sampling_strategy`` instead.
        """
        if sampler_fn is not None:
            raise ValueError(
                f"_get_dataloader({description!r}): ftrain's BatchStream does not take a sampler: its order is a "
                "function of the seed and the epoch, so that a resume continues bitwise. Choose the order with "
                "TrainingArguments(train_sampling_strategy='random' | 'sequential' | 'group_by_length')."
            )
        loader = self._stream(dataset, batch_size, train=is_training)
        if dataloader_key is not None and self.plan.data.persistent_workers:
            self._eval_dataloaders[dataloader_key] = loader
        return loader

    @staticmethod
    def num_tokens(train_dl: Any, max_steps: int | None = None) -> int:
        """Tokens (``input_ids`` elements) in a training loader, as transformers 4.x counted them: with
        ``max_steps``, the first batch's count times ``max_steps``. A :class:`~ftrain.data.BatchStream` is read for
        one epoch and each of its items (one optimizer step, a list of microbatches) counts all its microbatches.
        A batch without ``input_ids`` logs a warning and the count so far is returned."""
        total = 0
        try:
            for item in train_dl.iter_from(0) if hasattr(train_dl, "iter_from") else train_dl:
                tokens = sum(mb["input_ids"].numel() for mb in (item if isinstance(item, list) else [item]))
                if max_steps is not None:
                    return tokens * max_steps
                total += tokens
        except KeyError:
            logger.warning("Cannot get num_tokens from dataloader")
        return total

    # ---- optimizer ------------------------------------------------------------------------------------------------

    @staticmethod
    def get_optimizer_cls_and_kwargs(args: Any, model: nn.Module | None = None) -> tuple[Callable[..., Any], dict]:
        """The optimizer class and keyword arguments for ``args.optim``, as transformers returns them:
        ``(torch.optim.AdamW, {"lr", "betas", "eps"[, "fused": True]})`` for ``adamw_torch[_fused]``,
        ``torch.optim.SGD`` / ``Adagrad`` / ``RMSprop`` with ``optim_args``. ``adafactor`` and ``lion_32bit`` give
        ftrain's pure factories (transformers' Adafactor class would need transformers; its Lion, bitsandbytes).
        :meth:`create_optimizer` builds from what this returns, so an override takes part.

        Raises:
            ImportError / ValueError: an optimizer of another library (bitsandbytes, torchao, GaLore...): the
                package's name when it is missing, as transformers; otherwise ftrain's refusal, naming one to use.
        """
        return _torch_optim.torch_optimizer_cls_and_kwargs(args, model)

    def get_optimizer_group(self, param: str | nn.Parameter | None = None) -> Any:
        """The optimizer's parameter groups, as transformers: ``self.optimizer.param_groups`` (live parameters;
        transformers' two groups, decay then no decay, unless the optimizer was given).

        Args:
            param: a parameter of ``self.model``, or its name (an ftrain addition); ``None`` for all groups.

        Returns:
            The ``param_groups`` entry holding ``param``, or, without ``param``, each group's ``params`` list. With a
            user's ftrain GradientTransformation (no torch groups): one group ``{"params": [names],
            "weight_decay": None}`` by name.

        Raises:
            ValueError: the optimizer is not created yet, or ``param`` is not a trainable parameter of the model.
        """
        if self.optimizer is None:
            raise ValueError("Trainer optimizer is None, please make sure you have setup the optimizer before.")
        if isinstance(self.optimizer, torch.optim.Optimizer):
            return _torch_optim.optimizer_group(self.optimizer, self.model, param)
        groups = _as_optimizer_groups(self.model, self.plan.optim.weight_decay, self._user_optimizer is not None)
        if param is None:
            return [group["params"] for group in groups]
        name = param
        if isinstance(param, torch.Tensor):
            name = next((n for n, p in self.model.named_parameters() if p is param), None)
        for group in groups:
            if name in group["params"]:
                return group
        raise ValueError(
            f"get_optimizer_group: {repr(name) if isinstance(name, str) else 'the given tensor'} is not a trainable "
            f"parameter of {type(self.model).__name__}; pass one of its named_parameters() names."
        )

    # ---- step arithmetic ------------------------------------------------------------------------------------------

    def get_tp_size(self) -> int:
        """Tensor-parallel size: ``model._tp_size`` when set (transformers' tp_plan), else the ``tp`` (ftrain
        ``ParallelConfig``) or ``tp_size`` (accelerate ``ParallelismConfig``) of ``args.parallelism_config``, else 1."""
        model_tp = getattr(self.model, "_tp_size", None)
        if model_tp is not None:
            return int(model_tp)
        return self.plan.parallel.tp_size

    def _cp_size(self) -> int:
        return self.plan.parallel.cp_size

    def _sp_size(self) -> int:
        return self.plan.parallel.sp_size

    def get_total_train_batch_size(self, args: Any) -> int:
        """Examples per optimizer step over all processes: ``_train_batch_size × gradient_accumulation_steps ×
        dp_world_size``, with ``dp_world_size = world_size // (tp × cp × sp)`` (transformers' formula;
        ``_train_batch_size`` is the arguments' ``train_batch_size`` unless ``auto_find_batch_size`` lowered it)."""
        plan = self.plan if args is self.args else make_plan(args)
        return total_train_batch_size(self._train_batch_size, plan.data.gradient_accumulation_steps,
                                      plan.process.world_size, tp_size=self.get_tp_size(),
                                      cp_size=plan.parallel.cp_size, sp_size=plan.parallel.sp_size)  # fmt: skip

    def set_initial_training_values(
        self, args: Any, dataloader: Any, total_train_batch_size: int | None = None
    ) -> tuple[int, int, int, int | float, int, int, int]:
        """transformers' training counts: ``(num_train_epochs, num_update_steps_per_epoch, num_examples,
        num_train_samples, total_train_batch_size, steps_in_epoch, max_steps)``.

        ``dataloader`` is a :class:`~ftrain.data.BatchStream` (its length in microbatches is
        ``layout.microbatches_per_epoch``) or any loader; ``total_train_batch_size`` (transformers 4.x passed it)
        defaults to :meth:`get_total_train_batch_size`.

        Raises:
            ValueError: a loader without a length and ``max_steps <= 0`` (transformers' message).
        """
        length = loader_length(dataloader)
        plan = self.plan if args is self.args else make_plan(args)
        total = self.get_total_train_batch_size(args) if total_train_batch_size is None else total_train_batch_size
        examples = lambda: self.num_examples(dataloader)
        return plan.initial_training_values(length, num_examples=examples, total_train_batch_size=total)

    # ---- batches --------------------------------------------------------------------------------------------------

    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, device: torch.device
    ) -> tuple[list, torch.Tensor | None]:
        """Up to ``num_batches`` batches from ``epoch_iterator`` and their label count ``num_items_in_batch``.

        The count is the one ftrain's loss reduces by (:func:`~ftrain.trainer.evaluation.loss_item_count`:
        ``labels[..., 1:] != -100`` for causal LMs, or ``shift_labels``), summed over the batches and, with
        ``average_tokens_across_devices`` on several processes, over the processes; it is divided by
        ``tp × cp × sp`` (ranks that see the same batch), as transformers. ``None`` when the first batch has no
        ``labels``. Unlike transformers it does not depend on whether ``forward`` takes ``**kwargs``: ftrain's
        loss is always (sum, count).
        """
        batches = list(itertools.islice(epoch_iterator, num_batches))
        return batches, self._get_num_items_in_batch(batches, device)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """The label count of ``batch_samples`` that the loss is divided by (see :meth:`get_batch_samples`)."""
        from ftrain.trainer.evaluation import loss_item_count

        batches = batch_samples
        if not batches or not isinstance(batches[0], Mapping) or "labels" not in batches[0]:
            return None
        kwargs = dict(label_smoothing=self._label_smoothing(), compute_loss_func=self.compute_loss_func)
        count = sum(loss_item_count(self.model, b, **kwargs).to(device) for b in batches)
        if self.plan.step.average_tokens_across_devices and torch.distributed.is_available():
            if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                torch.distributed.all_reduce(count)
        return count / (self.get_tp_size() * self._cp_size() * self._sp_size())

    def _batch_samples(self, epoch_iterator: Iterator, num_batches: int) -> list:
        """One optimizer step's microbatches for the loop, through :meth:`get_batch_samples` when it or
        :meth:`_get_num_items_in_batch` is overridden (so an override takes part, as in transformers' loop). Without
        an override the microbatches are read directly: the default's count is the one the pure step takes from the
        batches itself, so computing it here too would cost a host-to-device copy per microbatch (and an
        ``all_reduce`` per step with ``average_tokens_across_devices``) for a number nobody reads.

        Raises:
            ValueError: an override of ``get_batch_samples`` / ``_get_num_items_in_batch`` returned a
                ``num_items_in_batch`` other than the count the pure step divides by (it takes ``(sum, count)``
                from the batches itself, so another count cannot be honoured).
        """
        if not (self.overrides("get_batch_samples") or self.overrides("_get_num_items_in_batch")):
            return list(itertools.islice(epoch_iterator, num_batches))
        device = self.plan.process.device
        batches, num_items = self.get_batch_samples(epoch_iterator, num_batches, device)
        if num_items is not None and batches:
            own = Trainer._get_num_items_in_batch(self, batches, device)
            if own is None or float(own) != float(num_items):
                raise ValueError(
                    f"{type(self).__name__}.get_batch_samples returned num_items_in_batch={float(num_items):g}, but "
                    f"the train step's own count of these batches' labels is "
                    f"{'none' if own is None else f'{float(own):g}'}. ftrain's step divides the summed loss by the "
                    "count it takes from the batches (sum, count), so another count cannot be honoured: return "
                    "super().get_batch_samples' count (changing the batches is fine), and change the loss weighting "
                    "in compute_loss or compute_loss_func instead."
                )
        return batches

    def _prepare_input(self, data: Any) -> Any:
        """``data`` with every tensor moved to ``args.device``, through (nested) mappings, lists and tuples, whose
        types are kept; other values unchanged."""
        if isinstance(data, Mapping):
            return type(data)({k: self._prepare_input(v) for k, v in data.items()})
        if isinstance(data, (tuple, list)):
            return type(data)(self._prepare_input(v) for v in data)
        if isinstance(data, torch.Tensor):
            return data.to(device=self.plan.process.device)
        return data

    def _prepare_inputs(self, inputs: Mapping[str, Any]) -> Mapping[str, Any]:
        """:meth:`_prepare_input` of a batch.

        Raises:
            ValueError: an empty batch (names the columns the model takes).
        """
        inputs = self._prepare_input(inputs)
        if len(inputs) == 0:
            self._set_signature_columns_if_needed()
            raise ValueError(
                "The batch received was empty, your model won't be able to train on it. Double-check that your "
                f"training dataset contains keys expected by the model: {','.join(self._signature_columns)}."
            )
        return inputs

    def _prepare_context_parallel_inputs(
        self, model: nn.Module, inputs: dict[str, Any]
    ) -> tuple[Callable[[], contextlib.AbstractContextManager], dict[str, Any]]:
        """``(context factory, inputs)`` for context parallelism, as transformers returns them.

        With a ``cp`` size above 1 in ``args.parallelism_config`` the inputs get what must be computed on the whole
        sequence before it is split: ``shift_labels`` from ``labels`` (last position -100) and global
        ``position_ids``. ftrain splits the sequence in its distributed layer
        (:func:`ftrain.distributed.context_parallel.prepare_cp_batch`), so the context is always
        ``contextlib.nullcontext``. Without context parallelism the inputs are returned unchanged.

        Raises:
            ValueError: context parallelism with a model whose attention is not ``sdpa``.
        """
        if self._cp_size() <= 1:
            return contextlib.nullcontext, inputs
        from ftrain.distributed.context_parallel import shift_labels

        attn = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa")
        if attn != "sdpa":
            raise ValueError(f"Context parallelism is supported only with SDPA attention, you are using {attn}.")
        inputs = dict(inputs)
        if "shift_labels" not in inputs and "labels" in inputs:
            inputs["shift_labels"] = shift_labels(inputs["labels"])
        if "position_ids" not in inputs and "input_ids" in inputs:
            ids = inputs["input_ids"]
            inputs["position_ids"] = torch.arange(ids.size(1), device=ids.device).expand(ids.size(0), -1)
        return contextlib.nullcontext, inputs

    # ---- evaluation -----------------------------------------------------------------------------------------------

    def prediction_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        """Deprecated: transformers 4.x's legacy loop (``use_legacy_prediction_loop``), removed in transformers 5.
        Warns (``FutureWarning``) and runs :meth:`evaluation_loop` with the same arguments."""
        warnings.warn(
            "Trainer.prediction_loop is deprecated (transformers 5 removed it with use_legacy_prediction_loop); "
            "call Trainer.evaluation_loop, which takes the same arguments.",
            FutureWarning,
            stacklevel=2,
        )
        return self.evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)

    def _nested_gather(self, tensors: Any, name: str | None = None) -> Any:
        """``tensors`` (nested lists / tuples / dicts of tensors) from every process, concatenated on dim 0
        (:func:`~ftrain.trainer.utils.nested_gather`); unchanged on one process. ``name`` (an XLA tag) is unused."""
        return nested_gather(tensors)

    def _gather_and_numpify(self, tensors: Any, name: str | None = None) -> Any:
        """:meth:`_nested_gather`, then to numpy (bfloat16 as float32)."""
        if tensors is None:
            return None
        return nested_numpify(self._nested_gather(tensors, name))

    def torch_jit_model_eval(self, model: nn.Module, dataloader: Any, training: bool = False) -> nn.Module:
        """Returns ``model`` unchanged: transformers 4.x traced it with TorchScript for ``jit_mode_eval`` (removed in
        transformers 5). ftrain compiles its pure steps with :func:`ftrain.jit` (``torch_compile=True``) instead; a
        traced module would freeze the parameters that the pure step passes in."""
        return model

    # ---- model placement ------------------------------------------------------------------------------------------

    def _move_model_to_device(self, model: nn.Module, device: torch.device) -> None:
        """Moves ``model`` to ``device`` in place, unless it is spread over several devices (``hf_device_map``),
        which is left as it is with a warning (transformers' rule)."""
        if getattr(model, "hf_device_map", None) is not None:
            logger.warning("The model is already on multiple devices. Skipping the move to device specified in `args`.")
            return
        model.to(device)

    def _wrap_model(self, model: nn.Module, training: bool = True, dataloader: Any = None) -> nn.Module:
        """Returns ``model`` itself: ftrain never wraps it.

        transformers wraps for DataParallel / DDP / FSDP. In ftrain parallelism is a property of the
        ``TrainState``'s leaves (DTensor placements chosen by a plan) and the step calls ``functional_call`` on a
        hook-free skeleton; a DDP or FSDP2 wrapper's hooks would replace the tensors the step passes in (see
        DESIGN.md, "FSDP").

        Called where transformers calls it: by ``train()`` once the optimizer is created (``training=True``; an
        override may change ``model`` in place, but returning another module is refused, since the pure step
        trains the ``TrainState``'s skeleton) and by every ``evaluation_loop`` (``training=False``; the module
        returned is the one evaluated).
        """
        return model

    # ---- flops ----------------------------------------------------------------------------------------------------

    def floating_point_ops(self, inputs: Mapping[str, Any]) -> int:
        """Forward + backward floating-point operations of one microbatch, transformers' estimate.

        ``model.floating_point_ops(inputs)`` when the model defines it (transformers 4.x models, custom ones); else
        ``6 × inputs[main_input_name].numel() × model.num_parameters(exclude_embeddings=True)`` (the count is
        cached per model: transformers walks the modules on every call); else 0.
        """
        model = self.model
        own = getattr(model, "floating_point_ops", None)
        if own is not None:
            return int(own(inputs))
        main_input = getattr(model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(model, "num_parameters"):
            return 0
        cached = self._flos_params
        if not (isinstance(cached, tuple) and cached[0] is model):
            cached = self._flos_params = (model, int(model.num_parameters(exclude_embeddings=True)))
        return 6 * inputs[main_input].numel() * cached[1]

    def _count_flos(self, inputs: Any) -> None:
        """Adds the :meth:`floating_point_ops` of ``inputs`` (a microbatch or a step's list of them) to
        ``current_flos``. Local and host-only (shapes), so the loop calls it every step."""
        for mb in inputs if isinstance(inputs, list) else [inputs]:
            if isinstance(mb, Mapping):
                self.current_flos += float(self.floating_point_ops(mb))

    def store_flos(self, inputs: Any = None) -> None:
        """Adds ``current_flos`` to ``state.total_flos`` (summed over the processes when there are several) and
        resets it, as transformers: the loop calls it before a checkpoint and at the end of training, not per step
        (the sum over processes is a collective and a host read).

        ``inputs``, when given, are counted first (:meth:`_count_flos`); transformers' own callers pass nothing.
        """
        if inputs is not None:
            self._count_flos(inputs)
        flos = self.current_flos
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                total = torch.tensor(float(flos), dtype=torch.float64, device=self.plan.process.device)
                torch.distributed.all_reduce(total)
                flos = total.item()
        self.state.total_flos += flos
        self.current_flos = 0.0

    # ---- checkpoints (:class:`~ftrain.trainer.checkpoints.TrainerCheckpoints`) -----------------------------------

    def _sorted_checkpoints(
        self, output_dir: str | None = None, checkpoint_prefix: str = PREFIX_CHECKPOINT_DIR, use_mtime: bool = False
    ) -> list[str]:
        """The ``{checkpoint_prefix}-N`` folders of ``output_dir`` (default ``args.output_dir``), oldest first, the
        best one second-to-last, as transformers' ``sort_checkpoints``."""
        return self._checkpoints.sorted_checkpoints(output_dir, checkpoint_prefix, use_mtime)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Loads the weights saved in ``resume_from_checkpoint`` (an ftrain checkpoint or a transformers folder)
        into ``model`` (default ``self.model``), strictly; never a pickle.

        Raises:
            ValueError: no weights in the folder, pickled weights, or keys / shapes that do not match.
        """
        self._checkpoints.load_from_checkpoint(resume_from_checkpoint, model)

    def _committed_state(self, folder: str) -> dict[str, Any] | None:
        """``{key path: tensor}`` of a committed ftrain checkpoint (``checkpoint-N`` with ``COMMIT``), else None."""
        return self._checkpoints.committed_state(folder)

    def _committed_weights(self, folder: str) -> dict[str, torch.Tensor] | None:
        """The weights of a committed ftrain checkpoint by ``state_dict`` name, else None."""
        return self._checkpoints.committed_weights(folder)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Writes transformers' ``optimizer.pt`` and ``scheduler.pt`` from the ``TrainState`` (the torch optimizer's
        and ``LambdaLR``'s ``state_dict()``; neither, with a warning, for an optimizer without a torch form).

        Raises:
            RuntimeError: before ``train()`` built the state.
        """
        self._checkpoints.save_optimizer_and_scheduler(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Restores ``state.opt_state`` and ``state.step`` from ``checkpoint``'s committed ftrain state, else from
        transformers' ``optimizer.pt`` + ``scheduler.pt`` (``torch.load(weights_only=True)``); nothing without them.

        Raises:
            CheckpointMismatchError: the saved optimizer state does not fit the current one (names the leaves).
            UnmappableOptimizerError: an ``optimizer.pt`` of another optimizer or other hyper-parameters.
            RuntimeError: before ``train()`` built the state.
        """
        self._checkpoints.load_optimizer_and_scheduler(checkpoint)

    def _saved_specs(self, checkpoint: str) -> list[Any]:
        """Every leaf (key path, kind, dtype, shape) of the state saved in the ``checkpoint-N`` folder."""
        return self._checkpoints.saved_specs(checkpoint)

    def _rng_file(self, folder: str) -> str:
        """``folder/rng_state.pth``, or ``rng_state_{rank}.pth`` with several processes."""
        return self._checkpoints.rng_file(folder)

    def _save_rng_state(self, output_dir: str) -> None:
        """Writes ``rng_state.pth`` as transformers (the global Python / numpy / torch generators); ftrain's own key
        is saved with the ``TrainState``."""
        self._checkpoints.save_rng_state(output_dir)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """Restores the ``TrainState``'s key (a committed ftrain checkpoint) and the global generators
        (``rng_state.pth``, ``torch.load(weights_only=True)``; nothing without the file)."""
        self._checkpoints.load_rng_state(checkpoint)

    def _save_scaler(self, output_dir: str) -> None:
        """Does nothing: ftrain keeps no ``GradScaler``."""
        self._checkpoints.save_scaler(output_dir)

    def _load_scaler(self, checkpoint: str | None) -> None:
        """Does nothing (no loss scaler); warns about a transformers ``scaler.pt``, which is not read."""
        self._checkpoints.load_scaler(checkpoint)

    def _load_callback_state(self) -> None:
        """With ``restore_callback_states_from_checkpoint``, rebuilds the callbacks and ``self.control`` from the
        states in ``self.state.stateful_callbacks`` (each keeps its place in the list); called on resume."""
        self._checkpoints.load_callback_state()

    # ---- the Hub (:class:`~ftrain.trainer.hub.HubClient`) ---------------------------------------------------------

    @property
    def hub_model_id(self) -> str | None:
        """The full id of the repository pushed to (set by :meth:`init_hf_repo`), or ``None``."""
        return self._hub.hub_model_id

    @hub_model_id.setter
    def hub_model_id(self, value: str | None) -> None:
        self._hub.hub_model_id = value

    @property
    def push_in_progress(self) -> PushInProgress | None:
        """The uploads of the last checkpoint push, or ``None``."""
        return self._hub.push_in_progress

    @push_in_progress.setter
    def push_in_progress(self, value: PushInProgress | None) -> None:
        self._hub.push_in_progress = value

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Writes a draft model card, ``output_dir/README.md`` (see :meth:`HubClient.create_model_card`)."""
        self._hub.create_model_card(language, license, tags, model_name, finetuned_from, tasks, dataset_tags,
                                    dataset, dataset_args)  # fmt: skip

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Creates the Hub repository and sets ``hub_model_id`` (see :meth:`HubClient.init_hf_repo`)."""
        self._hub.init_hf_repo(token, private)

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Saves the model and a model card into ``output_dir`` and uploads it (see :meth:`HubClient.push_to_hub`).

        Returns:
            ``huggingface_hub.upload_folder``'s result; ``None`` off world process zero.
        """
        return self._hub.push_to_hub(commit_message, blocking, token, revision, private, **kwargs)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Pushes a just-saved checkpoint as ``hub_strategy`` says (see :meth:`HubClient.push_from_checkpoint`)."""
        self._hub.push_from_checkpoint(checkpoint_folder)

    def _finish_current_push(self) -> None:
        """Waits for the pending checkpoint push, if any."""
        self._hub.finish_current_push()

    # ---- hyper-parameter search (:class:`~ftrain.trainer.hp_search.HyperparameterSearch`) -------------------------

    @property
    def hp_search_backend(self) -> HPSearchBackend | None:
        """The backend of the running search, ``None`` outside one."""
        return self._search.backend

    @hp_search_backend.setter
    def hp_search_backend(self, value: HPSearchBackend | None) -> None:
        self._search.backend = value

    @property
    def hp_space(self) -> Callable[[Any], dict[str, Any]] | None:
        """``trial -> dict`` of the hyper-parameters of the last search."""
        return self._search.hp_space

    @hp_space.setter
    def hp_space(self, value: Callable[[Any], dict[str, Any]] | None) -> None:
        self._search.hp_space = value

    @property
    def hp_name(self) -> Callable[[Any], str] | None:
        """``trial -> str``, the trial naming of the last search, or ``None``."""
        return self._search.hp_name

    @hp_name.setter
    def hp_name(self, value: Callable[[Any], str] | None) -> None:
        self._search.hp_name = value

    @property
    def compute_objective(self) -> Callable[[dict[str, float]], float] | None:
        """``metrics -> objective`` of the last search."""
        return self._search.compute_objective

    @compute_objective.setter
    def compute_objective(self, value: Callable[[dict[str, float]], float] | None) -> None:
        self._search.compute_objective = value

    @property
    def objective(self) -> float | list[float] | None:
        """The running trial's last objective, or ``None``."""
        return self._search.objective

    @objective.setter
    def objective(self, value: float | list[float] | None) -> None:
        self._search.objective = value

    @property
    def _trial(self) -> Any:
        """The running trial, or ``None``."""
        return self._search.trial

    @_trial.setter
    def _trial(self, value: Any) -> None:
        self._search.trial = value

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
        """Runs ``n_trials`` trainings with hyper-parameters drawn from ``hp_space`` and returns the best (see
        :meth:`HyperparameterSearch.run` for the arguments and errors).

        Returns:
            ``BestRun(run_id, objective, hyperparameters, run_summary)``, or a list of them for a multi-objective
            optuna search.
        """
        return self._search.run(hp_space, compute_objective, n_trials, direction, backend, hp_name, **kwargs)

    def _hp_search_setup(self, trial: Any) -> None:
        """Applies ``trial``'s hyper-parameters onto a copy of ``args`` (see :meth:`HyperparameterSearch.setup`)."""
        self._search.setup(trial)

    def _report_to_hp_search(self, trial: Any, step: int, metrics: dict[str, float]) -> None:
        """Reports an evaluation's objective to the search (see :meth:`HyperparameterSearch.report`)."""
        self._search.report(trial, step, metrics)


# ---- ray tune ---------------------------------------------------------------------------------------------------

# Arguments hyperparameter_search(backend="ray") sets itself, with where to set them instead.


def _as_optimizer_groups(model: nn.Module, weight_decay: float, user_tx: bool) -> list[dict[str, Any]]:
    decays = _optim.hf_decay_mask(model)
    if user_tx:
        return [{"params": list(decays), "weight_decay": None}]
    groups = [
        {"params": [n for n, d in decays.items() if d], "weight_decay": weight_decay},
        {"params": [n for n, d in decays.items() if not d], "weight_decay": 0.0},
    ]
    return groups


def _check_training_step_loss(name: str, loss: Any, model: Any) -> None:
    """Refuses a ``training_step`` that ran ``backward`` itself or returned no differentiable scalar."""
    if torch.compiler.is_compiling():
        # dynamo cannot read ``.grad``/``.grad_fn`` here; a step that fails to compile is re-run eagerly by
        # ftrain.jit, so a bad training_step still gets this message from the eager run.
        return
    backward_ran = any(getattr(p, "grad", None) is not None for p in getattr(model, "params", {}).values())
    if backward_ran or not isinstance(loss, torch.Tensor) or loss.grad_fn is None:
        what = "called backward()" if backward_ran else "returned a loss with no autograd graph (detached?)"
        raise RuntimeError(
            f"{name}.training_step {what}. In ftrain, training_step runs inside the pure train step and must "
            "return the microbatch's differentiable loss: the step itself differentiates it, accumulates, clips "
            "and updates. Port transformers-style code by deleting loss.backward() / accelerator.backward(loss) "
            "and returning the loss instead of loss.detach()."
        )


def _as_ftrain_args(args: Any, cls: type[TrainingArguments] = TrainingArguments) -> TrainingArguments:
    """``args`` as ftrain's :class:`TrainingArguments` (or its subclass ``cls``); a ``transformers.TrainingArguments``
    (or a subclass such as TRL's configs) is converted through its ``to_dict()``, with the real ``*_token`` values
    (``to_dict`` masks them). ftrain's class has every transformers 5.24 field, so the values are validated by its
    ``__post_init__`` (which refuses what ftrain cannot honour). Fields ``cls`` does not have are refused unless they
    keep their default.

    Raises:
        ValueError: a field ftrain does not have set to a non-default value, or a value ftrain cannot honour.
        TypeError: ``args`` is neither kind of ``TrainingArguments``.
    """
    if isinstance(args, TrainingArguments):
        return args
    if not _is_hf_args(args):
        raise TypeError(
            f"Trainer: args must be an ftrain.trainer.TrainingArguments or a transformers.TrainingArguments, got "
            f"{type(args).__name__}."
        )
    values = args.to_dict()
    for name in values:
        if name.endswith("_token"):
            values[name] = getattr(args, name)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    defaults = {f.name: f for f in dataclasses.fields(type(args)) if f.init}
    extra = sorted(name for name in values if name not in known)
    custom = [name for name in extra if not _is_default(defaults.get(name), getattr(args, name))]
    if custom:
        raise ValueError(
            f"Trainer: {type(args).__name__} sets {custom}, which ftrain's TrainingArguments does not have, so "
            "ftrain's Trainer cannot honour them. Leave them at their defaults, or pass an "
            "ftrain.trainer.TrainingArguments."
        )
    try:
        return cls(**{k: v for k, v in values.items() if k in known})
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"Trainer: the {type(args).__name__} cannot be used by ftrain's Trainer (converted field by field to "
            f"ftrain.trainer.{cls.__name__}): {e}"
        ) from e


def _is_hf_args(args: Any) -> bool:
    return any(
        cls.__name__ == "TrainingArguments" and cls.__module__.startswith("transformers") for cls in type(args).__mro__
    )


def _is_default(field: Any, value: Any) -> bool:
    if field is None:
        return False
    if field.default is not dataclasses.MISSING:
        return value == field.default
    if field.default_factory is not dataclasses.MISSING:
        return value == field.default_factory()
    return False


def _has_column(dataset: Any, name: str) -> bool:
    names = getattr(dataset, "column_names", None)
    return bool(names) and name in names
