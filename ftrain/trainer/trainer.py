"""``Trainer``: a thin stateful shell that speaks Hugging Face's ``Trainer`` API over ftrain's pure core.

``Trainer.train()`` converts ``TrainingArguments`` into core pieces once — the optimizer and schedule
(:func:`~ftrain.trainer.convert.make_optimizer`), a :class:`~ftrain.data.BatchStream` over the training set, a
:class:`~ftrain.TrainState`, a ``train_step`` (:func:`ftrain.make_train_step`, compiled with :func:`ftrain.jit`
when ``torch_compile``) and a :class:`~ftrain.checkpoint.CheckpointManager` — then loops, fires callbacks, logs,
evaluates and saves (:mod:`ftrain.trainer.loop`). The shell holds no training math (DESIGN.md rule 2).

Differences from transformers, on purpose:

- **Optimizers are pure.** ``optimizers=(tx, None)`` takes an ``ftrain.optim`` ``GradientTransformation`` (with
  its schedule inside, e.g. ``ftrain.optim.adamw(ftrain.schedules.get_schedule(...))``); a ``torch.optim``
  optimizer or scheduler is refused with that advice.
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
- **Checkpoints** hold the whole pure state (``state.safetensors``) next to transformers' views
  (``model.safetensors``, ``config.json``, ``trainer_state.json``), and ``training_args.json`` instead of the
  pickled ``training_args.bin``; see :mod:`ftrain.trainer.loop`.
- ``eval_loss`` is the ``(sum, count)`` mean over the whole evaluation set (token-weighted for causal LMs).
- **Several processes** (``torchrun --nproc_per_node N``): ``create_accelerator_and_postprocess`` (called by
  ``__init__``) picks the layout — ``fsdp`` / ``deepspeed`` through
  :func:`ftrain.distributed.parallel_config_from_training_args`, else plain data parallel — and builds the mesh;
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
import json
import logging
import math
import os
from typing import Any

import torch
from torch import nn

from ftrain import optim as _optim
from ftrain.data import BatchStream, default_collate, make_padding_collator
from ftrain.data.columns import find_labels, signature_columns
from ftrain.jit import jit
from ftrain.losses import Loss
from ftrain.optim.base import GradientTransformation
from ftrain.step import make_train_step
from ftrain.trainer.args import IntervalStrategy, TrainingArguments
from ftrain.trainer.callbacks import DEFAULT_CALLBACKS, DEFAULT_PROGRESS_CALLBACK, CallbackHandler, PrinterCallback
from ftrain.trainer.compat import HFCompatMixin
from ftrain.trainer.convert import jit_options, logged_learning_rate, make_optimizer, make_schedule
from ftrain.trainer.evaluation import EvaluationMixin, loss_item_count, make_loss_fn
from ftrain.trainer.hp_search import HyperparameterSearchMixin
from ftrain.trainer.hub import HubMixin
from ftrain.trainer.integrations import get_reporting_integration_callbacks
from ftrain.trainer.loop import TRAINER_STATE_NAME, TRAINING_ARGS_NAME, TrainingLoopMixin
from ftrain.trainer.trainer_state import TrainerControl, TrainerState
from ftrain.trainer.utils import enable_full_determinism, number_of_arguments, set_seed, speed_metrics

__all__ = ["Trainer"]

logger = logging.getLogger(__name__)


def _is_torch_optimizer(obj: Any) -> bool:
    return isinstance(obj, torch.optim.Optimizer | torch.optim.lr_scheduler.LRScheduler) or (
        isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer)
    )


_TORCH_OPTIMIZER_ADVICE = (
    "ftrain's Trainer needs a pure ftrain.optim GradientTransformation, not a stateful torch.optim object: the "
    "optimizer and its schedule run inside the pure train step. Pass optimizers=(tx, None) with e.g. "
    "tx = ftrain.optim.adamw(ftrain.schedules.get_schedule('linear', 1e-3, num_warmup_steps=10, "
    "num_training_steps=1000)), or leave optimizers unset and choose one with TrainingArguments(optim=..., "
    "lr_scheduler_type=...)."
)


class Trainer(HFCompatMixin, HyperparameterSearchMixin, HubMixin, EvaluationMixin, TrainingLoopMixin):
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
        optimizers: ``(tx, None)`` with an ``ftrain.optim`` GradientTransformation, or ``(None, None)``.
        optimizer_cls_and_kwargs: ``(factory, kwargs)`` with an ``ftrain.optim`` factory such as
            ``ftrain.optim.adamw``; ``learning_rate`` defaults to the ``args`` schedule.
        preprocess_logits_for_metrics: ``f(logits, labels) -> logits`` applied per evaluation batch.

    Raises:
        ValueError / TypeError: transformers' invalid combinations (see ``_validate``), torch optimizers, and
            ``torch_compile`` with ``activation_checkpointing``.
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
        self.args = TrainingArguments(output_dir="tmp_trainer") if args is None else _as_ftrain_args(args)
        self._seed()
        self.model_init = model_init
        self._validate(model, train_dataset, eval_dataset, optimizers, optimizer_cls_and_kwargs)
        self.model = self.call_model_init() if model is None else model
        self.create_accelerator_and_postprocess()  # devices, world size and (several processes) the mesh
        self.processing_class = processing_class
        self.data_collator = data_collator if data_collator is not None else self._default_collator()
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.compute_loss_func, self.compute_metrics = compute_loss_func, compute_metrics
        if self.args.batch_eval_metrics and compute_metrics is not None:
            if "compute_result" not in inspect.signature(compute_metrics).parameters:
                raise ValueError(
                    "With `batch_eval_metrics=True`, `compute_metrics` must take a boolean `compute_result` argument: "
                    "it is called on every evaluation batch and `compute_result=True` on the last one, which should "
                    "return the summary metrics."
                )
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        self.neftune_noise_alpha = self.args.neftune_noise_alpha
        self.optimizer, self.lr_scheduler = optimizers
        self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs
        self._user_optimizer = self.optimizer
        self.label_names = self.args.label_names if self.args.label_names is not None else find_labels(self.model)
        self.state, self.control = TrainerState(), TrainerControl()
        self._train_state = self._train_step = self._manager = self._flos_params = None
        self._model_stale, self.is_in_train = False, False
        self.callback_handler = CallbackHandler(self._default_callbacks(callbacks), self.model, processing_class,
                                                self.optimizer, self.lr_scheduler)  # fmt: skip
        self.control = self.callback_handler.on_init_end(self.args, self.state, self.control)
        if self.args.push_to_hub:
            self.init_hf_repo()

    # ---- construction ---------------------------------------------------------------------------------------------

    def _seed(self) -> None:
        if self.args.full_determinism:
            enable_full_determinism(self.args.seed)
        else:
            set_seed(self.args.seed)

    def _validate(self, model: Any, train_dataset: Any, eval_dataset: Any, optimizers: Any, cls_kwargs: Any) -> None:
        """transformers' constructor checks, plus ftrain's (torch optimizers)."""
        if (model is None) == (self.model_init is None):
            raise ValueError(
                "Trainer requires either a `model` or a `model_init` argument, not both and not neither"
                + (" (both were given)." if model is not None else ".")
            )
        if self.args.eval_strategy != IntervalStrategy.NO and eval_dataset is None:
            raise ValueError(
                f"You have set `args.eval_strategy` to {self.args.eval_strategy.value!r} but you didn't pass an "
                "`eval_dataset` to `Trainer`. Either set `args.eval_strategy` to `no` or pass an `eval_dataset`."
            )
        self._validate_optimizers(optimizers, cls_kwargs)
        if self.args.torch_compile and self.args.activation_checkpointing:
            raise ValueError(
                "Trainer: torch_compile=True cannot be combined with activation_checkpointing=True. ftrain compiles "
                "the whole step (forward, torch.autograd.grad, optimizer) as one graph, and torch.compile cannot "
                "rematerialise checkpointed layers in such a graph when they draw random numbers (dropout) or when "
                "there is more than one backward (gradient_accumulation_steps > 1). Turn one of them off."
            )

    def _validate_optimizers(self, optimizers: Any, cls_kwargs: Any) -> None:
        tx, scheduler = optimizers if optimizers is not None else (None, None)
        if _is_torch_optimizer(tx) or _is_torch_optimizer(scheduler):
            raise TypeError(_TORCH_OPTIMIZER_ADVICE)
        if cls_kwargs is not None and _is_torch_optimizer(cls_kwargs[0]):
            raise TypeError("optimizer_cls_and_kwargs: " + _TORCH_OPTIMIZER_ADVICE)
        if tx is not None and not isinstance(tx, GradientTransformation):
            raise TypeError(f"optimizers[0] must be an ftrain.optim GradientTransformation, got {type(tx).__name__}")
        if scheduler is not None:
            raise TypeError(
                "optimizers[1] must be None: in ftrain the schedule is part of the optimizer (pass it as the "
                "learning_rate of the ftrain.optim transformation)."
            )
        if tx is not None and cls_kwargs is not None:
            raise RuntimeError("Passing both `optimizers` and `optimizer_cls_and_kwargs` arguments is incompatible.")
        if tx is not None and self.model_init is not None:
            raise RuntimeError(
                "Passing a `model_init` is incompatible with providing the `optimizers` argument. You should "
                "subclass `Trainer` and override the `create_optimizer_and_scheduler` method."
            )

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
        progress = PrinterCallback if self.args.disable_tqdm else DEFAULT_PROGRESS_CALLBACK
        integrations = get_reporting_integration_callbacks(self.args.report_to)
        return [*DEFAULT_CALLBACKS, *integrations, progress, *(callbacks or [])]

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

    def create_optimizer(self, num_training_steps: int | None = None) -> GradientTransformation:
        """The ``ftrain.optim`` transformation (clipping, optimizer, schedule) for ``args``; cached."""
        if self.optimizer is None:
            steps = num_training_steps if num_training_steps is not None else max(self.args.max_steps, 1)
            if self.optimizer_cls_and_kwargs is not None:
                factory, kwargs = self.optimizer_cls_and_kwargs
                kwargs = {"learning_rate": make_schedule(self.args, steps), **kwargs}
                self.optimizer = factory(**kwargs)
            else:
                self.optimizer = make_optimizer(self.args, self.model, num_training_steps=steps)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        """The learning-rate schedule ``step -> lr`` (informational: the optimizer already contains it)."""
        if self.lr_scheduler is None:
            self.lr_scheduler = make_schedule(self.args, num_training_steps)
        return self.lr_scheduler

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        """Sets ``self.optimizer`` (a GradientTransformation) and ``self.lr_scheduler`` (its schedule)."""
        if self._user_optimizer is None:
            self.optimizer = None
        self.create_optimizer(num_training_steps)
        self.create_scheduler(num_training_steps)
        self.callback_handler.optimizer, self.callback_handler.lr_scheduler = self.optimizer, self.lr_scheduler

    def _custom_compute_loss(self) -> bool:
        return type(self).compute_loss is not EvaluationMixin.compute_loss

    def _loss_with_outputs(self, model: Any, batch: Any) -> tuple[Loss, Any]:
        fn = make_loss_fn(self.model, label_smoothing=self.args.label_smoothing_factor,
                          compute_loss_func=self.compute_loss_func)  # fmt: skip
        return fn(model, batch)

    def _custom_training_step(self) -> bool:
        return type(self).training_step is not Trainer.training_step

    def _make_loss_fn(self) -> Any:
        """The step's ``loss_fn(model, batch) -> (sum, count)``, built from the overridable pieces.

        Without overrides it is the fused default loss (under ``compute_loss_context_manager``). With an overridden
        ``compute_loss`` or ``training_step`` it calls ``training_step`` per microbatch and weights its loss: by 1
        for a custom ``compute_loss`` (a microbatch mean), else by the microbatch's item count, which is passed as
        ``num_items_in_batch``. (NEFTune's hook sits on the state's skeleton, see ``_setup_training``.)
        """
        kwargs = dict(label_smoothing=self.args.label_smoothing_factor, compute_loss_func=self.compute_loss_func)
        custom_loss = self._custom_compute_loss()
        default = None if custom_loss or self._custom_training_step() else make_loss_fn(self.model, **kwargs)

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
        step = make_train_step(self._make_loss_fn(), accum_steps=self.args.gradient_accumulation_steps)
        if self.args.torch_compile:
            return jit(step, **jit_options(self.args))
        return step

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
        if self.args.bf16:
            return torch.autocast(self.args.device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)
        return contextlib.nullcontext()

    # ---- NEFTune --------------------------------------------------------------------------------------------------

    def _activate_neftune(self, model: Any) -> Any:
        """Registers the NEFTune noise hook on ``model``'s input embeddings (the step's skeleton); returns the
        handle. The noise is ``uniform(-m, m)`` with ``m = neftune_noise_alpha / sqrt(seq_len * hidden)``, added
        to the embeddings' output in training mode only (transformers' NEFTune)."""
        get = getattr(model, "get_input_embeddings", None)
        if get is None:
            raise ValueError(
                f"neftune_noise_alpha needs a model with get_input_embeddings(); {type(model).__name__} has none."
            )
        embeddings = get()
        alpha = float(self.neftune_noise_alpha)

        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            if not module.training:
                return output
            magnitude = alpha / math.sqrt(output.size(1) * output.size(2))
            return output + torch.zeros_like(output).uniform_(-magnitude, magnitude)

        return embeddings.register_forward_hook(hook)

    def _deactivate_neftune(self, model: Any, handle: Any = None) -> None:
        """Removes the hook that :meth:`_activate_neftune` registered."""
        if handle is not None:
            handle.remove()

    # ---- data -----------------------------------------------------------------------------------------------------

    def _stream(self, dataset: Any, batch_size: int, *, train: bool) -> BatchStream:
        args = self.args
        columns = signature_columns(self.model, label_names=args.label_names) if args.remove_unused_columns else None
        strategy = args.train_sampling_strategy if train else "sequential"
        seed = args.data_seed if args.data_seed is not None else args.seed
        rank, world = self._data_parallel()
        return BatchStream(
            dataset,
            batch_size * world,
            seed=seed,
            shuffle=strategy not in ("sequential", "group_by_length") if train else False,
            drop_last=args.dataloader_drop_last,
            collate_fn=self.data_collator,
            accum_steps=args.gradient_accumulation_steps if train else 1,
            rank=rank,
            world_size=world,
            num_workers=args.dataloader_num_workers,
            group_by_length=strategy == "group_by_length",
            lengths=args.length_column_name if strategy == "group_by_length" and _has_column(dataset, args) else None,
            columns=columns,
            label_keys=tuple(self.label_names) or ("labels",),
        )

    def _data_parallel(self) -> tuple[int, int]:
        """``(rank, size)`` among the processes that read different rows (the mesh's data dims); ``(0, 1)`` alone."""
        mesh = getattr(self, "mesh", None)
        if mesh is None:
            return 0, 1
        from ftrain.distributed import data_parallel_rank, data_parallel_size

        return data_parallel_rank(mesh), data_parallel_size(mesh)

    def get_train_dataloader(self) -> BatchStream:
        """The training :class:`~ftrain.data.BatchStream` (one list of ``gradient_accumulation_steps`` microbatches
        of ``per_device_train_batch_size × world_size`` examples per optimizer step)."""
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        return self._stream(self.train_dataset, self.args.per_device_train_batch_size, train=True)

    def get_eval_dataloader(self, eval_dataset: Any = None) -> BatchStream:
        """The evaluation stream (in order); a ``str`` names one of ``self.eval_dataset``'s entries."""
        if isinstance(eval_dataset, str):
            eval_dataset = self.eval_dataset[eval_dataset]
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("Trainer: evaluation requires an eval_dataset.")
        stream = self._stream(dataset, self.args.per_device_eval_batch_size, train=False)
        self.callback_handler.eval_dataloader = stream
        return stream

    def get_test_dataloader(self, test_dataset: Any) -> BatchStream:
        """The prediction stream over ``test_dataset`` (in order)."""
        return self._stream(test_dataset, self.args.per_device_eval_batch_size, train=False)

    def num_examples(self, dataloader: Any) -> int:
        """Examples in the stream's source."""
        return len(dataloader.source)

    def _model_for_inference(self) -> nn.Module:
        self._sync_model()
        self.model.eval()
        return self.model

    # ---- saving and logging ---------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Writes ``model.safetensors`` + ``config.json`` (``from_pretrained`` loads them), the processing class and
        ``training_args.json`` into ``output_dir`` (default ``args.output_dir``). With several processes every rank
        calls it (the sharded weights are gathered) and ``args.should_save`` (rank 0) writes the full model."""
        output_dir = self.args.output_dir if output_dir is None else output_dir
        self._sync_model()  # a collective when the state is sharded: before the rank check
        if not self.args.should_save:
            return
        from ftrain.checkpoint import export_pretrained

        export_pretrained(self._export_state() if self._train_state is not None else self.model, output_dir)
        if self.processing_class is not None and hasattr(self.processing_class, "save_pretrained"):
            self.processing_class.save_pretrained(output_dir)
        with open(os.path.join(output_dir, TRAINING_ARGS_NAME), "w", encoding="utf-8") as f:
            f.write(self.args.to_json_string())

    def save_state(self) -> None:
        """Writes ``trainer_state.json`` into ``args.output_dir``."""
        if self.is_world_process_zero():
            os.makedirs(self.args.output_dir, exist_ok=True)
            self.state.save_to_json(os.path.join(self.args.output_dir, TRAINER_STATE_NAME))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds ``epoch`` (and ``num_input_tokens_seen`` when counted, with ``train_tokens_per_second`` of this
        ``train()`` call when ``start_time`` is given), appends ``{**logs, "step": global_step}`` to ``log_history``
        and fires ``on_log``."""
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        if self.args.include_num_input_tokens_seen != "no":
            logs["num_input_tokens_seen"] = self.state.num_input_tokens_seen
            if start_time is not None:
                tokens = self.state.num_input_tokens_seen - getattr(self, "_initial_num_input_tokens_seen", 0)
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
        os.makedirs(self.args.output_dir, exist_ok=True)
        path = os.path.join(self.args.output_dir, f"{split}_results.json")
        with open(path, "w") as f:
            json.dump(metrics, f, indent=4, sort_keys=True)
        if combined:
            all_path = os.path.join(self.args.output_dir, "all_results.json")
            merged = json.load(open(all_path)) if os.path.exists(all_path) else {}
            merged.update(metrics)
            with open(all_path, "w") as f:
                json.dump(merged, f, indent=4, sort_keys=True)

    # ---- small queries --------------------------------------------------------------------------------------------

    def is_world_process_zero(self) -> bool:
        """True on the global main process."""
        return self.args.process_index == 0

    def is_local_process_zero(self) -> bool:
        """True on each node's main process."""
        return self.args.local_process_index == 0

    def get_num_trainable_parameters(self) -> int:
        """Number of parameters with ``requires_grad``."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def get_learning_rates(self) -> list[float]:
        """The learning rate of the last update (the schedule's first value before training)."""
        if self._train_state is not None:
            lr = logged_learning_rate(self._train_state.opt_state)
            if lr is not None:
                return [float(lr)]
        return [float(make_schedule(self.args, max(self.args.max_steps, 1))(torch.tensor(0)))]

    def get_decay_parameter_names(self, model: nn.Module | None = None) -> list[str]:
        """Names of the parameters that get weight decay (transformers' rule: not biases, not norm weights)."""
        return [name for name, decays in _optim.hf_decay_mask(model or self.model).items() if decays]


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


def _as_ftrain_args(args: Any) -> TrainingArguments:
    """``args`` as ftrain's :class:`TrainingArguments`; a ``transformers.TrainingArguments`` (or a subclass such
    as TRL's configs) is converted through its ``to_dict()``, with the real ``*_token`` values (``to_dict`` masks
    them). ftrain's class has every transformers 5.24 field, so the values are validated by its ``__post_init__``
    (which refuses what ftrain cannot honour). Fields ftrain does not have are refused unless they keep their
    default.

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
    known = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
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
        return TrainingArguments(**{k: v for k, v in values.items() if k in known})
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"Trainer: the {type(args).__name__} cannot be used by ftrain's Trainer (converted field by field to "
            f"ftrain.trainer.TrainingArguments): {e}"
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


def _has_column(dataset: Any, args: TrainingArguments) -> bool:
    names = getattr(dataset, "column_names", None)
    return bool(names) and args.length_column_name in names
