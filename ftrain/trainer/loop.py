"""The Trainer's training loop (:class:`TrainingLoop`): a loop over the pure ``train_step``, callbacks, logs, saves.

The loop holds no training math (DESIGN.md rule 2): one call of the core ``train_step(state, batch)`` is one
optimizer update, with accumulation, the loss reduction, clipping, the optimizer and the schedule inside it. The
shell only fires callbacks in transformers' order, turns metrics into numbers when it logs, and saves.

Events per optimizer step, as transformers fires them: ``on_step_begin``, ``on_substep_end`` once per microbatch
but the last (fired before the step runs: the microbatches are accumulated inside the one pure step),
``on_pre_optimizer_step``, the step, ``on_optimizer_step``, ``on_step_end``, then log / evaluate / save.

**Logging and metric-driven pieces.** ``logging_nan_inf_filter`` replaces a NaN/inf step loss in the logging
accumulator by ``accumulator / (1 + steps since the last log)`` as transformers does — per optimizer step here, per
microbatch there (the same with ``gradient_accumulation_steps=1``); after a log the accumulator restarts at 0, where
transformers' ``tr_loss -= tr_loss`` keeps an unfiltered NaN for the rest of the run. ``include_num_input_tokens_seen``
counts tokens per microbatch into ``state.num_input_tokens_seen`` (logged with every entry, with
``train_tokens_per_second`` in the training logs). Under ``lr_scheduler_type="reduce_lr_on_plateau"`` (or
``"greedy"``) each evaluation
in ``train()`` (not ``eval_on_start``) feeds ``eval_{metric_for_best_model}`` to
:func:`ftrain.schedules.plateau_update` on the optimizer state in the ``TrainState``.

**Checkpoints** (``output_dir/checkpoint-{global_step}/``, resume, rotation, the best model) are the component
:class:`~ftrain.trainer.checkpoints.TrainerCheckpoints` (``self._checkpoints``); the methods with transformers' names
(``_save_checkpoint``, ``_rotate_checkpoints``, ``_load_best_model``...) delegate to it. With several processes
(torchrun) the state is sharded in :meth:`TrainingLoop.distribute`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, NamedTuple

import torch

from ftrain.metrics import to_host
from ftrain.schedules import has_metric_schedule, plateau_update
from ftrain.state import TrainState
from ftrain.trainer.args import SaveStrategy
from ftrain.trainer.checkpoints import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from ftrain.trainer.convert import logged_learning_rate
from ftrain.trainer.dataloaders import TrainFeed, find_executable_batch_size, is_out_of_memory
from ftrain.trainer.memory import clear_device_cache
from ftrain.trainer.placement import check_training_wrapper, prepare_step_batch
from ftrain.trainer.plan import ActivationCheckpointing
from ftrain.trainer.torch_optim import advance_scheduler
from ftrain.trainer.trainer_state import TrainerState
from ftrain.trainer.utils import TrainOutput, hf_logger, speed_metrics

__all__ = [
    "TRAINER_STATE_NAME",
    "TRAINING_ARGS_NAME",
    "RunCounts",
    "RunTotals",
    "TrainingLoop",
    "enable_activation_checkpointing",
]

logger = logging.getLogger(__name__)


def _rebinding_checkpoint(checkpoint_func: Any) -> Any:
    """``checkpoint_func(function, *args)`` whose recompute sees the tensors the layer had in the forward.

    transformers calls it with ``functools.partial(forward, layer, **kwargs)``. Inside ``functional_call`` the
    layer's parameters and buffers are the step's tensors; when the backward recomputes the layer they are meta
    again, so the recompute re-binds the ones captured at forward time."""
    from torch.nn.utils.stateless import _reparametrize_module

    def func(function: Any, *args: Any, **kwargs: Any) -> Any:
        layer = getattr(function, "args", (None,))[0] if getattr(function, "args", None) else None
        if not isinstance(layer, torch.nn.Module):
            return checkpoint_func(function, *args, **kwargs)
        names = [n for n, _ in layer.named_parameters(remove_duplicate=False)]
        names += [n for n, _ in layer.named_buffers(remove_duplicate=False)]
        tensors = {n: _get_attr(layer, n) for n in names}

        def run(*inner: Any) -> Any:
            with _reparametrize_module(layer, tensors):
                return function(*inner)

        return checkpoint_func(run, *args, **kwargs)

    func._ftrain_rebinds = True
    return func


def _is_tokenizer(processing_class: Any) -> bool:
    """Whether ``processing_class`` is a transformers tokenizer or processor (transformers' test in ``train()``).
    Without transformers imported, nothing can be one."""
    import sys

    transformers = sys.modules.get("transformers")
    if processing_class is None or transformers is None:
        return False
    kinds = tuple(
        getattr(transformers, n) for n in ("PreTrainedTokenizerBase", "ProcessorMixin") if hasattr(transformers, n)
    )
    return isinstance(processing_class, kinds)


def _get_attr(module: torch.nn.Module, name: str) -> Any:
    for part in name.split("."):
        module = getattr(module, part)
    return module


def enable_activation_checkpointing(skeleton: Any, options: ActivationCheckpointing) -> None:
    """transformers' activation checkpointing, enabled on the step's meta skeleton (never the user's model).

    ``options`` is the plan's split of ``activation_checkpointing_kwargs``: ``every_n_layers`` and ``offload`` as
    transformers takes them out, the rest for ``torch.utils.checkpoint.checkpoint`` (``use_reentrant=False`` by
    default). Each layer's
    checkpoint function is wrapped to re-bind the tensors the functional forward gave the layer: the recompute
    runs during the step's backward, after ``functional_call`` has put the meta tensors back.

    Raises:
        ValueError: a model without ``activation_checkpointing_enable`` / ``gradient_checkpointing_enable``.
    """
    kwargs, every_n_layers, offload = options.checkpoint_kwargs, options.every_n_layers, options.offload
    enable = getattr(skeleton, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers, offload=offload)
    elif hasattr(skeleton, "gradient_checkpointing_enable"):
        skeleton.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(
            f"activation_checkpointing=True needs a model with activation_checkpointing_enable() (a transformers "
            f"PreTrainedModel); {type(skeleton).__name__} has none."
        )
    for module in skeleton.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if func is not None and not getattr(func, "_ftrain_rebinds", False):
            module._gradient_checkpointing_func = _rebinding_checkpoint(func)


class RunCounts(NamedTuple):
    """The run's counts, as ``Trainer.set_initial_training_values`` returns them (transformers' order); they decide
    the schedule's length, the epochs run, ``state.epoch`` and ``train_samples_per_second``."""

    num_train_epochs: int
    num_update_steps_per_epoch: int
    num_examples: int
    num_train_samples: int | float
    total_train_batch_size: int
    steps_in_epoch: int
    max_steps: int


def _zero_loss(device: torch.device) -> torch.Tensor:
    """The logging accumulator's start: float64 zero on the step's device (as transformers keeps ``tr_loss`` on
    ``args.device``), so adding each step's loss needs no transfer; it is read at logs only."""
    return torch.zeros((), dtype=torch.float64, device=device)


@dataclasses.dataclass
class RunTotals:
    """What one ``train()`` call accumulates between logs (transformers keeps it on the trainer as ``tr_loss``,
    ``_total_loss_scalar``, ``_globalstep_last_logged``...).

    Attributes:
        start_time: ``time.time()`` when the run started (for ``train_*_per_second``).
        initial_global_step, initial_tokens: ``global_step`` and ``num_input_tokens_seen`` at the start (a resume
            starts above 0).
        tr_loss: the sum of the step losses since the last log (float64, on the step's device).
        total_loss: the sum of every logged ``tr_loss`` (for ``train_loss``).
        last_logged_step: ``global_step`` at the last log.
        last_metrics: the metrics of the last step (``grad_norm``, ``learning_rate``).
    """

    start_time: float
    initial_global_step: int
    initial_tokens: int
    tr_loss: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    total_loss: float = 0.0
    last_logged_step: int = 0
    last_metrics: dict[str, torch.Tensor] | None = None


class TrainingLoop:
    """The training loop of a Trainer (a component: ``Trainer.train``, ``_inner_training_loop``, ``_run_epoch``,
    ``_maybe_log_save_evaluate``, ``_evaluate``, ``_determine_best_metric``, ``_track_num_input_tokens`` and
    ``_finalize_training`` delegate here); see the module docstring.

    It calls back through the trainer's methods wherever transformers does (``get_train_dataloader``,
    ``create_optimizer_and_scheduler``, ``_inner_training_loop``, ``_run_epoch``, ``_maybe_log_save_evaluate``,
    ``evaluate``, ``_evaluate``, ``_determine_best_metric``, ``_save_checkpoint``, ``_load_best_model``, ``log``,
    ``store_flos``, ``_track_num_input_tokens``, ``_finalize_training``), so a subclass's overrides take part.

    Args:
        trainer: the :class:`~ftrain.trainer.Trainer` it serves.

    Attributes:
        run: the :class:`RunTotals` of the ``train()`` call in progress (``None`` before the first).
        feed: the :class:`~ftrain.trainer.dataloaders.TrainFeed` of the ``train()`` call in progress.
        gathered: ``(params, buffers, full state)``: the last gathered full state of a sharded run, reused while
            the state's parameters are the same objects.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.run: RunTotals | None = None
        self.feed: TrainFeed | None = None
        self.gathered: tuple[Any, Any, TrainState] | None = None

    # ---- set-up ---------------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: bool | str | None, trial: Any, ignore_keys_for_eval: Any) -> TrainOutput:
        """The default ``Trainer.train``; see its docstring."""
        trainer = self.trainer
        trainer._memory_tracker.start("train")
        checkpoint = trainer._resolve_resume(resume_from_checkpoint)
        if trial is not None and trial is not trainer._trial:  # a search's run_trial has applied its trial already
            trainer._hp_search_setup(trial)
        if trainer.model_init is not None:
            trainer._seed()
            trainer.model = trainer.call_model_init(trial)
            if trainer.place_model_on_device:
                trainer._move_model_to_device(trainer.model, trainer.plan.process.device)
        # *_full_eval keeps the model where it was when the Trainer was built (transformers casts it at evaluation)
        if (
            trainer.plan.eval.full_eval_dtype is not None
            and not trainer.is_model_parallel
            and trainer.model_init is None
        ):
            trainer._move_model_to_device(trainer.model, trainer.plan.process.device)
        if _is_tokenizer(trainer.processing_class):  # new special tokens for fine-tuning, as transformers
            trainer._align_special_tokens()
        if checkpoint is not None:  # the weights first, into the model the state is built from, as transformers
            trainer._load_from_checkpoint(checkpoint)
        trainer.is_in_train = True
        try:
            if not trainer.plan.data.auto_find_batch_size:
                return trainer._inner_training_loop(
                    batch_size=trainer._train_batch_size,
                    args=trainer.args,
                    resume_from_checkpoint=checkpoint,
                    trial=trial,
                    ignore_keys_for_eval=ignore_keys_for_eval,
                )
            return self.find_batch_size(checkpoint, trial, ignore_keys_for_eval)
        finally:
            trainer.is_in_train = False

    def find_batch_size(
        self, checkpoint: str | None, trial: Any, ignore_keys_for_eval: list[str] | None
    ) -> TrainOutput:
        """``auto_find_batch_size``: ``_inner_training_loop(batch_size=...)`` with the batch size shrunk by 0.9 after
        each out-of-memory error (:func:`~ftrain.trainer.dataloaders.find_executable_batch_size`), starting from the
        checkpoint's ``train_batch_size`` on a resume, as transformers. A retry starts the loop again from the
        weights trained so far (copied into ``trainer.model``), with a fresh optimizer, as transformers' does."""
        trainer = self.trainer
        start = trainer._train_batch_size
        if checkpoint is not None:
            saved = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME)).train_batch_size
            start = saved if saved is not None else start

        def attempt(batch_size: int) -> TrainOutput:
            return trainer._inner_training_loop(
                batch_size=batch_size,
                args=trainer.args,
                resume_from_checkpoint=checkpoint,
                trial=trial,
                ignore_keys_for_eval=ignore_keys_for_eval,
            )

        def on_retry(batch_size: int, err: BaseException) -> None:
            logger.warning("auto_find_batch_size: out of memory (%s); retrying with batch size %d", err, batch_size)
            self.sync_model()
            trainer._train_state = trainer._train_step = None

        return find_executable_batch_size(attempt, start, on_retry=on_retry)

    def inner_training_loop(
        self, batch_size: int | None, args: Any, checkpoint: str | None, trial: Any, ignore_keys_for_eval: Any
    ) -> TrainOutput:
        """The default ``Trainer._inner_training_loop``: set up, fire ``on_train_begin``, run the epochs, finish.

        ``batch_size`` becomes the trainer's ``_train_batch_size`` (the per-process micro-batch of the training
        stream); ``args``, when another object than ``trainer.args``, replaces them (the plan follows). The loader
        is whatever ``get_train_dataloader`` returns (see :mod:`ftrain.trainer.dataloaders`); the run's counts come
        from ``trainer.set_initial_training_values`` (whose default asks ``get_total_train_batch_size``), so a
        subclass's overrides drive them as in transformers."""
        trainer = self.trainer
        if args is not None and args is not trainer.args:
            trainer.args = args
        if batch_size is not None:
            trainer._train_batch_size = int(batch_size)
        args, plan = trainer.args, trainer.plan
        loader = trainer.get_train_dataloader()
        counts = RunCounts(*trainer.set_initial_training_values(args, loader))
        self.setup(loader, counts.max_steps, checkpoint)
        trainer.state.init_training_references(trainer, counts.max_steps, counts.num_train_epochs, trial)
        trainer.state.train_batch_size = trainer._train_batch_size
        trainer.state.compute_steps(plan.intervals, counts.max_steps)
        state = trainer.state
        self.run = RunTotals(time.time(), state.global_step, state.num_input_tokens_seen,
                             last_logged_step=state.global_step,
                             tr_loss=_zero_loss(plan.process.device))  # fmt: skip
        per_epoch = counts.num_update_steps_per_epoch
        epochs_trained = state.global_step // per_epoch
        skip = 0 if plan.data.ignore_data_skip else state.global_step % per_epoch
        self.feed = TrainFeed(loader, accum_steps=plan.data.gradient_accumulation_steps)
        self.log_run_start(counts, checkpoint, epochs_trained, skip)
        trainer.control = trainer.callback_handler.on_train_begin(args, state, trainer.control)
        if plan.eval.on_start:
            trainer._evaluate(trial, ignore_keys_for_eval, skip_scheduler=True)
        for epoch in range(epochs_trained, counts.num_train_epochs):
            trainer.control = trainer.callback_handler.on_epoch_begin(args, trainer.state, trainer.control)
            trainer._run_epoch(
                model=trainer.model,
                epoch=epoch,
                train_dataloader=loader,
                steps_in_epoch=counts.steps_in_epoch,
                num_update_steps_per_epoch=per_epoch,
                trial=trial,
                ignore_keys_for_eval=ignore_keys_for_eval,
                start_time=self.run.start_time,
                resume_from_checkpoint=checkpoint,
                epochs_trained=epochs_trained,
                steps_trained_in_current_epoch=skip * plan.data.gradient_accumulation_steps,  # microbatches
            )
            if trainer.control.should_training_stop:
                break
        return trainer._finalize_training(trial, counts.num_train_samples, self.run.start_time)

    def log_run_start(self, counts: RunCounts, checkpoint: str | None, epochs_trained: int, skip: int) -> None:
        """Logs the run's sizes at info level through ``transformers.trainer``'s logger, where transformers' Trainer
        logs them ("***** Running training *****"), so HF scripts show them with the same settings."""
        trainer = self.trainer
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        per_device = trainer.args.per_device_train_batch_size
        lines = [
            "***** Running training *****",
            f"  Num examples = {counts.num_examples:,}",
            f"  Num Epochs = {counts.num_train_epochs:,}",
            f"  Num update steps per epoch = {counts.num_update_steps_per_epoch:,}",
            f"  Instantaneous batch size per device = {per_device:,}",
        ]
        if trainer._train_batch_size != per_device:
            lines.append(f"  Batch size in use (auto_find_batch_size) = {trainer._train_batch_size:,}")
        accum = trainer.plan.data.gradient_accumulation_steps
        lines += [
            f"  Total train batch size (w. parallel, distributed & accumulation) = {counts.total_train_batch_size:,}",
            f"  Gradient Accumulation steps = {accum}",
            f"  Total optimization steps = {counts.max_steps:,}",
            f"  Number of trainable parameters = {trainable:,}",
        ]
        if checkpoint is not None:
            step = trainer.state.global_step
            lines.append(f"  Resuming training from {checkpoint} at epoch {epochs_trained}, global step {step}")
            if skip:
                lines.append(f"  Skipping the first {skip} steps ({skip * accum} batches) of epoch {epochs_trained}")
        log = hf_logger("trainer")
        for line in lines:
            log.info(line)

    def setup(self, stream: Any, max_steps: int, checkpoint: str | None) -> None:
        """Converts the arguments into core pieces once: the optimizer, the state, the step, the manager."""
        trainer = self.trainer
        trainer.state = TrainerState()
        trainer.current_flos = 0.0
        trainer.callback_handler.train_dataloader = stream
        trainer.create_optimizer_and_scheduler(num_training_steps=max_steps)
        check_training_wrapper(type(trainer).__name__, trainer._wrap_model(trainer.model), trainer.model)
        # made from the placed model: params, buffers and opt_state on args.device (shard_state places them on a mesh)
        state = trainer._distribute(TrainState.create(trainer.model, trainer._tx, key=trainer.plan.seeding.seed))
        if checkpoint is not None:
            state = trainer._restore_checkpoint(checkpoint, state)
            for _ in range(int(state.step)):  # the torch scheduler view catches up with the restored step
                advance_scheduler(trainer.lr_scheduler)
        if trainer.plan.step.activation_checkpointing is not None:
            trainer._enable_activation_checkpointing(state.skeleton)
        # NEFTune's hook goes on the skeleton here, outside the step: torch.compile cannot trace registering a hook,
        # and the hook itself adds noise only in training mode, so evaluation through this skeleton sees none.
        if trainer.neftune_noise_alpha is not None:
            trainer._activate_neftune(state.skeleton)
        trainer._train_state = state
        trainer._train_step = trainer._make_train_step()
        trainer._model_stale = checkpoint is not None

    def distribute(self, state: TrainState) -> TrainState:
        """The default ``Trainer._distribute``: ``state`` laid out on the trainer's mesh (unchanged on one process)."""
        trainer = self.trainer
        if trainer.mesh is None:
            return state
        from ftrain.distributed import shard_state

        return shard_state(state, trainer.mesh, trainer.parallel_config)

    def export_state(self) -> TrainState:
        """The train state with full parameters (for ``trainer.model`` and exported weights; no optimizer state when
        sharded). A collective on a sharded state — every rank calls it — cached while the parameters stay the
        same objects, so a rank-0-only export after a sync gathers nothing more."""
        from ftrain.distributed import gather_state, get_plan

        state = self.trainer._train_state
        if get_plan(state) is None:
            return state
        cached = self.gathered
        if cached is not None and cached[0] is state.params and cached[1] is state.buffers:
            return cached[2]
        full = gather_state(state.replace(opt_state=None))
        self.gathered = (state.params, state.buffers, full)
        return full

    def sync_model(self) -> None:
        """Copies the train state's weights into ``trainer.model`` (what users, callbacks and eval see)."""
        trainer = self.trainer
        if trainer._train_state is not None and trainer._model_stale:
            self.export_state().load_into(trainer.model)  # full weights: a collective when sharded
            trainer._model_stale = False

    # ---- the loop -------------------------------------------------------------------------------------------------

    def run_epoch(
        self,
        model: Any,
        epoch: int,
        loader: Any,
        steps_in_epoch: int,
        updates_per_epoch: int,
        skip: int,
        trial: Any,
        ignore_keys_for_eval: Any,
        start_time: float,
    ) -> None:
        """The default ``Trainer._run_epoch``: the optimizer steps of one epoch of ``loader`` (``steps_in_epoch``
        microbatches in ``updates_per_epoch`` steps), from the first of them not trained (``skip``).

        As transformers, each step's microbatches come from ``get_batch_samples(epoch_iterator, n, device)`` with
        ``n = gradient_accumulation_steps``, fewer for the epoch's last step (``steps_in_epoch % n``); the epoch
        ends early when the loader runs out (an iterable source's pass), and training stops when an epoch
        yielded nothing.

        Raises:
            ValueError: ``loader`` is not the loader ``train()`` is reading.
        """
        trainer, feed = self.trainer, self.feed
        if loader is not feed.loader:
            raise ValueError(
                f"{type(trainer).__name__}._run_epoch was given another train_dataloader than the one train() "
                "reads (get_train_dataloader's, whose position carries over epochs and resumes); to train on "
                "another loader, override get_train_dataloader."
            )
        accum = feed.accum_steps
        remainder = steps_in_epoch % accum or accum
        epoch_iterator = feed.epoch(epoch, skip)
        micro, ran = skip * accum, False
        for update_step in range(skip, updates_per_epoch):
            if trainer.state.global_step >= trainer.state.max_steps:
                break
            num_batches = accum if update_step != updates_per_epoch - 1 else remainder
            batches = trainer._batch_samples(epoch_iterator, num_batches)
            if not batches:
                break
            micro, ran = micro + len(batches), True
            self.update(batches, epoch + micro / steps_in_epoch)
            self.call_maybe_log_save_evaluate(model, trial, ignore_keys_for_eval, start_time)
            if trainer.control.should_epoch_stop or trainer.control.should_training_stop:
                break
        if not ran and not skip and trainer.state.global_step < trainer.state.max_steps:
            logger.warning(
                "The training data yielded no batch in epoch %d: stopping at step %d of %d. This is expected with an "
                "iterable dataset shorter than max_steps needs.",
                epoch,
                trainer.state.global_step,
                trainer.state.max_steps,
            )
            trainer.control.should_training_stop = True
        trainer.control = trainer.callback_handler.on_epoch_end(trainer.args, trainer.state, trainer.control)
        self.call_maybe_log_save_evaluate(model, trial, ignore_keys_for_eval, start_time)

    def call_maybe_log_save_evaluate(
        self, model: Any, trial: Any, ignore_keys_for_eval: Any, start_time: float
    ) -> None:
        """Calls ``trainer._maybe_log_save_evaluate`` with transformers' arguments, from the run's totals."""
        metrics = self.run.last_metrics or {}
        self.trainer._maybe_log_save_evaluate(
            self.run.tr_loss, metrics.get("grad_norm"), model, trial, self.trainer.state.epoch,
            ignore_keys_for_eval, start_time,
        )  # fmt: skip

    def update(self, batches: list[Any], epoch: float) -> None:
        """One optimizer update on ``batches`` (a step's microbatches) with its callbacks; the update itself is one
        call of the pure step. ``epoch`` is the float epoch after it (transformers' ``epoch + micro /
        steps_in_epoch``)."""
        trainer = self.trainer
        handler, args, state = trainer.callback_handler, trainer.args, trainer.state
        # the step's batch as a BatchStream gives it: one dict without accumulation, else a list of microbatches
        batch = batches[0] if len(batches) == 1 and trainer.plan.data.gradient_accumulation_steps == 1 else batches
        trainer.control = handler.on_step_begin(args, state, trainer.control)
        prepared = prepare_step_batch(trainer, batch)  # to args.device via _prepare_inputs; fires on_substep_end
        trainer.control = handler.on_pre_optimizer_step(args, state, trainer.control)
        trainer._train_state, metrics = trainer._train_step(trainer._train_state, prepared)
        trainer._model_stale = True
        advance_scheduler(trainer.lr_scheduler)  # the torch view follows the schedule inside the step
        trainer.control = handler.on_optimizer_step(args, state, trainer.control)
        self.accumulate_loss(metrics["loss"].detach().to(self.run.tr_loss.dtype))
        self.run.last_metrics = metrics
        # counted on the batch as loaded (host tensors, no device sync), as transformers counts the batch it has
        # not yet passed through _prepare_inputs
        trainer._count_flos(batch)  # flushed into state.total_flos by store_flos() at saves and at the end
        trainer._track_num_input_tokens(batch)
        empty_cache_steps = trainer.plan.step.empty_cache_steps  # transformers checks before counting the step
        if empty_cache_steps is not None and state.global_step % empty_cache_steps == 0:
            clear_device_cache(trainer.plan.process.device)
        state.global_step += 1
        state.epoch = epoch
        trainer.control = handler.on_step_end(args, state, trainer.control)

    def accumulate_loss(self, step_loss: torch.Tensor) -> None:
        """Adds the step's loss to the logging accumulator. With ``logging_nan_inf_filter``, a NaN/inf loss adds
        ``accumulator / (1 + steps since the last log)`` instead, as transformers (the update itself already ran).

        transformers filters per microbatch; here the step is one pure update, so a non-finite microbatch makes the
        whole step's loss non-finite and the whole step is replaced (identical when ``gradient_accumulation_steps``
        is 1)."""
        run = self.run
        if self.trainer.plan.log.nan_inf_filter:
            window = 1 + self.trainer.state.global_step - run.last_logged_step
            step_loss = torch.where(torch.isfinite(step_loss), step_loss, run.tr_loss / window)
        run.tr_loss = run.tr_loss + step_loss

    def track_num_input_tokens(self, batch: Any) -> None:
        """The default ``Trainer._track_num_input_tokens``: ``state.num_input_tokens_seen`` as transformers counts it
        (``include_num_input_tokens_seen``): every element of the main input, or with ``"non_padding"`` the
        ``attention_mask`` sum (else the tokens that are not the tokenizer's pad id)."""
        trainer = self.trainer
        mode = trainer.plan.log.num_input_tokens
        if mode == "no":
            return
        name = getattr(trainer.model, "main_input_name", "input_ids")
        pad_id = getattr(trainer.processing_class, "pad_token_id", None)
        seen = 0
        for mb in batch if isinstance(batch, list) else [batch]:
            if not isinstance(mb, dict) or name not in mb:
                logger.warning(
                    "Tried to track the number of tokens seen, but the batch has no %r (the model's main_input_name); "
                    "set main_input_name on the model.",
                    name,
                )
                return
            ids = mb[name]
            valid = mb.get("_valid")
            rows = valid.to(torch.bool) if valid is not None else torch.ones(ids.shape[0], dtype=torch.bool)
            if mode == "non_padding" and "attention_mask" in mb:
                tokens = mb["attention_mask"][rows].sum()
            elif mode == "non_padding" and pad_id is not None:
                tokens = (ids[rows] != pad_id).sum()
            else:
                tokens = ids[rows].numel()
            seen += int(tokens)
        if trainer.mesh is not None:  # every rank's rows, as transformers gathers them
            total = torch.tensor(seen, dtype=torch.int64, device=trainer.plan.process.device)
            torch.distributed.all_reduce(total)
            seen = int(total)
        trainer.state.num_input_tokens_seen += seen

    # ---- log, evaluate, save --------------------------------------------------------------------------------------

    def maybe_log_save_evaluate(
        self,
        tr_loss: torch.Tensor,
        grad_norm: Any,
        model: Any,
        trial: Any,
        ignore_keys_for_eval: list[str] | None,
        start_time: float,
        learning_rate: float | None,
    ) -> None:
        """The default ``Trainer._maybe_log_save_evaluate``: logs, evaluates and saves as ``control`` asks."""
        trainer = self.trainer
        if trainer.control.should_log and trainer.state.global_step > self.run.last_logged_step:
            self.log_training_metrics(tr_loss, grad_norm, learning_rate, start_time)
        if trainer.control.should_evaluate:
            metrics = trainer._evaluate(trial, ignore_keys_for_eval)
            is_new_best = trainer._determine_best_metric(metrics=metrics, trial=trial)
            if trainer.plan.save.strategy == SaveStrategy.BEST:
                trainer.control.should_save = is_new_best
        if trainer.control.should_save:
            trainer._save_checkpoint(model, trial)
            trainer.control = trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)

    def log_training_metrics(
        self, tr_loss: torch.Tensor, grad_norm: Any, learning_rate: float | None, start_time: float
    ) -> None:
        """``loss`` (``tr_loss`` over the updates since the last log), ``grad_norm``, ``learning_rate`` (the last
        update's when ``None``); the run's accumulator restarts at 0."""
        trainer, run = self.trainer, self.run
        # One device-to-host transfer for everything this log reads.
        pending = {"loss": tr_loss}
        if learning_rate is None:
            pending["learning_rate"] = self._learning_rate_tensor(run.last_metrics or {})
        if isinstance(grad_norm, torch.Tensor):
            pending["grad_norm"] = grad_norm
        host = to_host({k: v for k, v in pending.items() if v is not None})
        tr_loss_scalar = host["loss"]
        run.tr_loss = _zero_loss(run.tr_loss.device)
        logs: dict[str, float] = {"loss": tr_loss_scalar / (trainer.state.global_step - run.last_logged_step)}
        if grad_norm is not None:
            logs["grad_norm"] = host.get("grad_norm", grad_norm)
        if learning_rate is not None:
            logs["learning_rate"] = learning_rate
        else:
            logs["learning_rate"] = host.get("learning_rate", float("nan"))
        run.total_loss += tr_loss_scalar
        run.last_logged_step = trainer.state.global_step
        trainer.store_flos()  # state.total_flos is current at each log, as transformers (on_log callbacks read it)
        trainer.log(logs, start_time)

    def _learning_rate_tensor(self, metrics: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The lr of the last update (with any plateau scale), as a tensor; ``None`` when the optimizer has none."""
        lr = logged_learning_rate(self.trainer._train_state.opt_state)
        return metrics.get("learning_rate") if lr is None else torch.as_tensor(lr)

    def evaluate(self, ignore_keys_for_eval: list[str] | None, skip_scheduler: bool = False) -> dict[str, float]:
        """The default ``Trainer._evaluate``: evaluates, then feeds ``eval_{metric_for_best_model}`` to the
        optimizer's plateau state (transformers steps ``ReduceLROnPlateau`` there), through
        :func:`ftrain.schedules.plateau_update`."""
        trainer = self.trainer
        try:
            metrics = trainer.evaluate(ignore_keys=ignore_keys_for_eval)
        except RuntimeError as err:
            # auto_find_batch_size shrinks only the training batch: an evaluation that runs out of memory must not
            # reach the batch-size search, which would restart training with ever smaller batches (transformers).
            if trainer.plan.data.auto_find_batch_size and is_out_of_memory(err):
                raise RuntimeError(
                    "Evaluation hit an out-of-memory error. auto_find_batch_size only adjusts the training batch size; "
                    "lower per_device_eval_batch_size instead."
                ) from err
            raise
        if skip_scheduler or not self._has_plateau():
            return metrics
        key = _metric_key(trainer.plan.eval.metric_key, metrics)
        opt_state = plateau_update(trainer._train_state.opt_state, float(metrics[key]))
        trainer._train_state = trainer._train_state.replace(opt_state=opt_state)
        advance_scheduler(trainer.lr_scheduler, float(metrics[key]))
        return metrics

    def _has_plateau(self) -> bool:
        state = self.trainer._train_state
        if state is None:
            return False
        return has_metric_schedule(state.opt_state)

    def determine_best_metric(self, metrics: dict[str, float]) -> bool:
        """The default ``Trainer._determine_best_metric``: updates ``best_metric`` / ``best_global_step`` from
        ``metric_for_best_model``; True on a new best."""
        trainer, state = self.trainer, self.trainer.state
        name = trainer.plan.eval.metric_key
        if name is None:
            return False
        key = _metric_key(name, metrics)
        value, greater = metrics[key], trainer.plan.eval.greater_is_better
        if state.best_metric is None:
            state.best_metric = float("-inf") if greater else float("inf")
        if (value > state.best_metric) if greater else (value < state.best_metric):
            state.best_metric = value
            if trainer.plan.save.strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST):
                state.best_global_step = state.global_step
            return True
        return False

    def finalize_training(self, num_train_samples: int, start_time: float) -> TrainOutput:
        """The default ``Trainer._finalize_training``: the ``train_*`` metrics, the best model, ``on_train_end``."""
        trainer, run = self.trainer, self.run
        run.total_loss += to_host({"loss": run.tr_loss})["loss"]
        steps_run = trainer.state.global_step - run.initial_global_step
        train_loss = run.total_loss / max(steps_run, 0.001)
        metrics = speed_metrics(
            "train",
            start_time,
            num_samples=num_train_samples * steps_run / max(trainer.state.max_steps, 1),
            num_steps=steps_run,
        )
        trainer.store_flos()
        metrics["total_flos"] = trainer.state.total_flos
        metrics["train_loss"] = train_loss
        trainer._memory_tracker.stop_and_update_metrics("train", metrics)
        trainer.log(metrics)
        if trainer.neftune_hook_handle is not None:
            trainer._deactivate_neftune(trainer._train_state.skeleton)
        if trainer.plan.save.load_best_model_at_end and trainer.state.best_model_checkpoint is not None:
            trainer._load_best_model()
        self.sync_model()
        trainer._checkpoints.keep_only_best()  # save_total_limit == 1: only the best folder survives the end
        trainer.control = trainer.callback_handler.on_train_end(trainer.args, trainer.state, trainer.control)
        return TrainOutput(trainer.state.global_step, train_loss, metrics)


def _metric_key(name: str, metrics: dict[str, float]) -> str:
    """``eval_{name}`` (``name`` as is when it has the prefix), which must be among ``metrics``."""
    key = name if name.startswith("eval_") else f"eval_{name}"
    if key not in metrics:
        raise KeyError(
            f"The `metric_for_best_model` training argument is set to '{key}', which is not found in the "
            f"evaluation metrics. The available evaluation metrics are: {list(metrics)}. Make compute_metrics return "
            f"'{key}' or change `metric_for_best_model` in the TrainingArguments."
        )
    return key
