"""``TrainingArguments`` decided once: :func:`make_plan` -> a frozen :class:`TrainerPlan` (DESIGN.md rule 3).

``TrainingArguments`` has about 120 fields. The Trainer reads them here, once, when it is built, and its shell code
reads the plan: small frozen policies for the data, the optimizer, the train step, logging, evaluation, saving, the
Hub, seeding, the process and the parallel layout. Callbacks and the model card still get ``args``, as in
transformers.

The plan is also the one home of the step arithmetic (:meth:`TrainerPlan.steps`,
:meth:`TrainerPlan.initial_training_values`, :meth:`TrainerPlan.total_train_batch_size`, :func:`resolve_interval`,
:func:`resolve_warmup`): ``compute_steps`` in :mod:`ftrain.trainer.convert`, ``TrainerState.compute_steps`` and
``TrainingArguments.get_warmup_steps`` call these functions.

:data:`DISPOSITIONS` records what happens to every ``TrainingArguments`` field: **honoured** (and the plan entries
that carry it), **refused** (the value the validator refuses and its message) or **ignored** (and why).

The plan is fixed when it is made: changing ``args`` afterwards (a hyperparameter-search trial sets fields on a
copy) needs a new plan. Its policies are frozen; the few dict values in them are copies of the arguments' dicts.

This module is long because of its two tables, the policies (each attribute documented) and the disposition of
about 120 fields (one line each); the logic between them is short functions.

Example:
    >>> from ftrain.trainer.args import TrainingArguments
    >>> plan = make_plan(TrainingArguments("out", gradient_accumulation_steps=4, num_train_epochs=2.5,
    ...                                    logging_steps=0.1, use_cpu=True))
    >>> steps = plan.steps(10)  # 10 microbatches per epoch on this rank
    >>> steps.num_update_steps_per_epoch, steps.max_steps, steps.num_train_epochs, steps.logging_steps
    (3, 8, 3, 1)
    >>> plan.data.seed, plan.eval.metric_key, plan.save.checkpoint_options(sharded=False).step_prefix
    (42, None, 'checkpoint-')
    >>> DISPOSITIONS["ddp_bucket_cap_mb"].kind
    'ignored'
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch

from ftrain.checkpoint import CheckpointManagerOptions
from ftrain.trainer.args import (
    _LOG_LEVELS,
    HubStrategy,
    IntervalStrategy,
    OptimizerNames,
    SaveStrategy,
    SchedulerType,
    TrainingArguments,
)
from ftrain.trainer.parallel import config_size, parallel_layout
from ftrain.trainer.utils import CHECKPOINT_NAMING

if TYPE_CHECKING:
    from ftrain.distributed import ParallelConfig

__all__ = [
    "DISPOSITIONS",
    "ActivationCheckpointing",
    "DataPolicy",
    "Disposition",
    "EvalPolicy",
    "HubPolicy",
    "Intervals",
    "LogPolicy",
    "OptimPolicy",
    "ParallelPolicy",
    "ProcessFacts",
    "SavePolicy",
    "Seeding",
    "StepPolicy",
    "TrainerPlan",
    "TrainingLength",
    "TrainingSteps",
    "apply_process_settings",
    "initial_training_values",
    "jit_options",
    "make_plan",
    "optim_policy",
    "resolve_interval",
    "resolve_warmup",
    "total_train_batch_size",
    "training_steps",
]


# ----------------------------------------------------------------------------------------------------------
# Step arithmetic: transformers' formulas, in one place.


class Intervals(NamedTuple):
    """``logging_steps``, ``eval_steps`` and ``save_steps`` as given: a count if >= 1, a fraction of all steps if
    below 1 (:func:`resolve_interval`); ``eval_steps`` may be ``None``. ``TrainerState.compute_steps`` takes it in
    place of the arguments."""

    logging_steps: float
    eval_steps: float | None
    save_steps: float


@dataclass(frozen=True)
class TrainingLength:
    """How long to train, as given: ``max_steps > 0`` optimizer steps, else ``num_train_epochs`` epochs."""

    num_train_epochs: float
    max_steps: int


@dataclass(frozen=True)
class TrainingSteps:
    """How long training runs, in transformers' units (a step is one optimizer update).

    Attributes:
        max_steps: optimizer steps in the whole run (the schedule's ``num_training_steps``).
        num_train_epochs: epochs the loop starts (``sys.maxsize`` for a loader without a length).
        num_update_steps_per_epoch: optimizer steps per full epoch.
        steps_in_epoch: micro-batches per epoch.
        total_train_batch_size: samples per optimizer step over all data-parallel ranks.
        warmup_steps: warmup length in optimizer steps.
        logging_steps, eval_steps, save_steps: the intervals with ratios resolved against ``max_steps``
            (:func:`resolve_interval`, as ``TrainerState.compute_steps``); ``eval_steps`` is ``None`` when unset.
    """

    max_steps: int
    num_train_epochs: int
    num_update_steps_per_epoch: int
    steps_in_epoch: int
    total_train_batch_size: int
    warmup_steps: int
    logging_steps: float
    eval_steps: float | None
    save_steps: float


def resolve_interval(value: float | None, max_steps: int) -> float | None:
    """A ``*_steps`` interval in optimizer steps: a value below 1 is a fraction of ``max_steps``, rounded up.

    transformers' ``TrainerState.compute_steps`` rule: other values are kept as they are, ``None`` stays ``None``.

    Example:
        >>> resolve_interval(0.1, 95), resolve_interval(500, 95), resolve_interval(None, 95)
        (10, 500, None)
    """
    if value is not None and value < 1:
        return math.ceil(max_steps * value)
    return value


def resolve_warmup(warmup_steps: float, num_training_steps: int) -> int:
    """Warmup length in optimizer steps: ``int(warmup_steps)`` if it is >= 1, else ``ceil(num_training_steps *
    warmup_steps)`` (transformers' ``TrainingArguments.get_warmup_steps``).

    Example:
        >>> resolve_warmup(0.1, 95), resolve_warmup(7.0, 95)
        (10, 7)
    """
    if warmup_steps >= 1:
        return int(warmup_steps)
    return math.ceil(num_training_steps * warmup_steps)


def total_train_batch_size(
    train_batch_size: int,
    gradient_accumulation_steps: int,
    world_size: int,
    *,
    tp_size: int = 1,
    cp_size: int = 1,
    sp_size: int = 1,
) -> int:
    """Samples per optimizer step over all processes: ``train_batch_size × gradient_accumulation_steps ×
    dp_world_size`` with ``dp_world_size = world_size // (tp × cp × sp)`` (transformers'
    ``Trainer.get_total_train_batch_size``; the ranks of one tensor / context / sequence group see the same rows).

    Example:
        >>> total_train_batch_size(8, 4, 16, tp_size=2)
        256
    """
    return train_batch_size * gradient_accumulation_steps * (world_size // tp_size // cp_size // sp_size)


def _epochs(microbatches_per_epoch: int | None, length: TrainingLength, accum: int) -> tuple[int, int, int, int]:
    """``(max_steps, num_train_epochs, num_update_steps_per_epoch, steps_in_epoch)`` (transformers' formula).

    Raises:
        ValueError: an empty loader, or no loader length and ``max_steps <= 0``.
    """
    if microbatches_per_epoch == 0:
        raise ValueError("TrainerPlan.steps: the training dataloader is empty; check the dataset and the batch size.")
    if microbatches_per_epoch is None:
        if length.max_steps <= 0:
            raise ValueError(
                "TrainerPlan.steps: the training data has no length, so max_steps must be set > 0 (it is "
                f"{length.max_steps})."
            )
        return length.max_steps, sys.maxsize, length.max_steps, length.max_steps * accum
    per_epoch = max(math.ceil(microbatches_per_epoch / accum), 1)
    if length.max_steps > 0:
        return length.max_steps, math.ceil(length.max_steps / per_epoch), per_epoch, microbatches_per_epoch
    max_steps = math.ceil(length.num_train_epochs * per_epoch)
    return max_steps, math.ceil(length.num_train_epochs), per_epoch, microbatches_per_epoch


def training_steps(
    microbatches_per_epoch: int | None,
    length: TrainingLength,
    *,
    gradient_accumulation_steps: int,
    total_train_batch_size: int,
    warmup_steps: float,
    intervals: Intervals,
) -> TrainingSteps:
    """transformers' step arithmetic (``Trainer.set_initial_training_values`` and ``TrainerState.compute_steps``).

    With a loader length: ``updates_per_epoch = max(ceil(len / GA), 1)``; if ``max_steps <= 0`` the run is
    ``ceil(num_train_epochs * updates_per_epoch)`` steps over ``ceil(num_train_epochs)`` epochs, else
    ``max_steps`` steps over ``ceil(max_steps / updates_per_epoch)`` epochs. Without one, ``max_steps`` must be
    positive and the data is re-iterated as needed.

    Args:
        microbatches_per_epoch: micro-batches per epoch on this rank, or ``None`` if the loader has no length.
        length: the run's length as given.
        gradient_accumulation_steps: micro-batches per optimizer step.
        total_train_batch_size: samples per optimizer step over all ranks (:func:`total_train_batch_size`).
        warmup_steps: the warmup as given (:func:`resolve_warmup`).
        intervals: the logging / eval / save intervals as given (:func:`resolve_interval`).

    Returns:
        The counts.

    Raises:
        ValueError: no loader length and ``max_steps <= 0``, or an empty loader.
    """
    max_steps, epochs, per_epoch, steps_in_epoch = _epochs(microbatches_per_epoch, length, gradient_accumulation_steps)
    return TrainingSteps(
        max_steps=max_steps,
        num_train_epochs=epochs,
        num_update_steps_per_epoch=per_epoch,
        steps_in_epoch=steps_in_epoch,
        total_train_batch_size=total_train_batch_size,
        warmup_steps=resolve_warmup(warmup_steps, max_steps),
        logging_steps=resolve_interval(intervals.logging_steps, max_steps),
        eval_steps=resolve_interval(intervals.eval_steps, max_steps),
        save_steps=resolve_interval(intervals.save_steps, max_steps),
    )


def initial_training_values(
    microbatches_per_epoch: int | None,
    length: TrainingLength,
    *,
    gradient_accumulation_steps: int,
    total_train_batch_size: int,
    num_examples: Callable[[], int],
) -> tuple[int, int, int, int | float, int, int, int]:
    """transformers' ``Trainer.set_initial_training_values`` counts: ``(num_train_epochs,
    num_update_steps_per_epoch, num_examples, num_train_samples, total_train_batch_size, steps_in_epoch, max_steps)``.

    A loader of length 0 or ``None`` has no length: the run is ``max_steps`` steps of ``total_train_batch_size``
    samples over ``sys.maxsize`` epochs. Otherwise ``num_train_samples`` is ``max_steps × total_train_batch_size``
    when ``max_steps > 0``, else ``num_examples × num_train_epochs``.

    Args:
        microbatches_per_epoch: micro-batches per epoch on this rank, or ``None`` / 0 for no length.
        length: the run's length as given.
        gradient_accumulation_steps: micro-batches per optimizer step.
        total_train_batch_size: samples per optimizer step over all ranks.
        num_examples: gives the number of training examples (called only when the loader has a length).

    Raises:
        ValueError: no loader length and ``max_steps <= 0`` (transformers' message).
    """
    total = total_train_batch_size
    if not microbatches_per_epoch:
        if length.max_steps <= 0:
            raise ValueError(
                "args.max_steps must be set to a positive value if dataloader does not have a length, was "
                f"{length.max_steps}"
            )
        max_steps, epochs, per_epoch, steps_in_epoch = _epochs(None, length, gradient_accumulation_steps)
        return epochs, per_epoch, total * max_steps, total * max_steps, total, steps_in_epoch, max_steps
    max_steps, epochs, per_epoch, _ = _epochs(microbatches_per_epoch, length, gradient_accumulation_steps)
    examples = num_examples()
    samples = max_steps * total if length.max_steps > 0 else examples * length.num_train_epochs
    return epochs, per_epoch, examples, samples, total, microbatches_per_epoch, max_steps


# ----------------------------------------------------------------------------------------------------------
# The policies.


@dataclass(frozen=True)
class ProcessFacts:
    """This process, as seen when the plan was made (``torch.distributed``, else the launcher's environment).

    Attributes:
        device: ``cuda:<local rank>`` when a GPU is usable (``use_cpu`` / ``no_cuda`` off), else the CPU.
        world_size: processes training together.
        process_index: global rank.
        local_process_index: rank on this node (``LOCAL_RANK``, else ``local_rank``).
    """

    device: torch.device
    world_size: int
    process_index: int
    local_process_index: int

    @property
    def is_world_process_zero(self) -> bool:
        """Global rank 0."""
        return self.process_index == 0

    @property
    def is_local_process_zero(self) -> bool:
        """Rank 0 on its node."""
        return self.local_process_index == 0


@dataclass(frozen=True)
class DataPolicy:
    """How batches are made.

    Attributes:
        per_device_train_batch_size, per_device_eval_batch_size: rows per device and micro-batch.
        train_batch_size, eval_batch_size: rows per process and micro-batch (per device × ``max(1, n_gpu)``).
        gradient_accumulation_steps: micro-batches per optimizer step; ``accelerator_config``'s
            ``gradient_accumulation_kwargs["num_steps"]`` when given (as transformers takes it over).
        seed: seed of the data order: ``data_seed``, else ``seed``.
        sampling_strategy: ``train_sampling_strategy`` (``random``, ``sequential``, ``group_by_length``).
        drop_last, num_workers: ``dataloader_drop_last``, ``dataloader_num_workers``.
        pin_memory, prefetch_factor, multiprocessing_context: the ``dataloader_*`` loader options (``pin_memory``
            acts only where an accelerator is available).
        remove_unused_columns: drop the columns the model's ``forward`` does not take.
        label_names: batch keys holding labels, or ``None`` (found from the model).
        length_column_name: the column of precomputed lengths for ``group_by_length``.
        split_batches: ``accelerator_config["split_batches"]``: the batch sizes are global, split over processes.
        persistent_workers: ``dataloader_persistent_workers``: loader workers outlive an epoch (and evaluation
            loaders are kept per dataset name).
        ignore_data_skip: on a resume, read the resumed epoch's data from its start instead of skipping the
            batches already trained on.
        auto_find_batch_size: retry training with a smaller batch after running out of memory.
    """

    per_device_train_batch_size: int
    per_device_eval_batch_size: int
    train_batch_size: int
    eval_batch_size: int
    gradient_accumulation_steps: int
    seed: int
    sampling_strategy: str
    drop_last: bool
    num_workers: int
    pin_memory: bool
    prefetch_factor: int | None
    multiprocessing_context: Any
    remove_unused_columns: bool
    label_names: tuple[str, ...] | None
    length_column_name: str
    split_batches: bool = False
    persistent_workers: bool = False
    ignore_data_skip: bool = False
    auto_find_batch_size: bool = False

    @property
    def shuffle(self) -> bool:
        """Whether training batches are drawn in a seeded random order (not ``sequential`` nor
        ``group_by_length``, which shuffles by its own rule)."""
        return self.sampling_strategy not in ("sequential", "group_by_length")

    @property
    def group_by_length(self) -> bool:
        """Whether training batches group examples of similar length."""
        return self.sampling_strategy == "group_by_length"


@dataclass(frozen=True)
class OptimPolicy:
    """What :func:`ftrain.trainer.convert.make_optimizer` / ``make_schedule`` / ``get_optimizer_cls_and_kwargs``
    build from (they take this policy or the arguments).

    Attributes:
        name: ``optim`` (checked, and refused with advice when ftrain does not build it, by ``convert``).
        learning_rate, weight_decay: the peak learning rate and the decay of the decaying parameter group.
        beta1, beta2, epsilon: ``adam_beta1``, ``adam_beta2``, ``adam_epsilon``.
        optim_args: the ``"key=value,..."`` string.
        max_grad_norm: clip the global gradient norm to this (0 or ``None``: no clipping).
        schedule: ``lr_scheduler_type``.
        schedule_kwargs: a copy of ``lr_scheduler_kwargs`` (``{}`` when unset).
        warmup_steps: the warmup as given (:meth:`warmup_for`).
    """

    name: OptimizerNames | str
    learning_rate: float
    weight_decay: float
    beta1: float
    beta2: float
    epsilon: float
    optim_args: str | None
    max_grad_norm: float | None
    schedule: SchedulerType | str
    schedule_kwargs: dict[str, Any]
    warmup_steps: float

    def warmup_for(self, num_training_steps: int) -> int:
        """Warmup length of a run of ``num_training_steps`` (:func:`resolve_warmup`)."""
        return resolve_warmup(self.warmup_steps, num_training_steps)


@dataclass(frozen=True)
class ActivationCheckpointing:
    """transformers' activation checkpointing options, split as its ``activation_checkpointing_enable`` takes them.

    Attributes:
        checkpoint_kwargs: for ``torch.utils.checkpoint.checkpoint`` (``None`` when empty).
        every_n_layers: checkpoint every n-th layer.
        offload: offload the saved activations to the CPU.
    """

    checkpoint_kwargs: dict[str, Any] | None
    every_n_layers: int
    offload: bool


@dataclass(frozen=True)
class StepPolicy:
    """How the pure train step is built and run.

    Attributes:
        jit_options: ``ftrain.jit`` keyword arguments (:func:`jit_options`) when ``torch_compile``, else ``None``
            (the step runs eager).
        autocast_dtype: ``torch.bfloat16`` with ``bf16`` (the forward runs under ``torch.autocast``), else ``None``.
        activation_checkpointing: the options, or ``None`` when off.
        neftune_noise_alpha: NEFTune noise scale, or ``None``.
        label_smoothing_factor: label smoothing epsilon of the default loss.
        average_tokens_across_devices: ``num_items_in_batch`` counts the items of every rank.
        tf32: TF32 matmuls and cuDNN on (True), off (False) or left as they are (``None``); applied by
            :func:`apply_process_settings`.
        empty_cache_steps: ``torch_empty_cache_steps``: the loop releases the device allocator's cache before every
            step whose ``global_step`` is a multiple of it (``None``: never).
        use_cache: ``use_cache``, set on the model's ``config.use_cache`` when the Trainer is built.
    """

    jit_options: dict[str, Any] | None
    autocast_dtype: torch.dtype | None
    activation_checkpointing: ActivationCheckpointing | None
    neftune_noise_alpha: float | None
    label_smoothing_factor: float
    average_tokens_across_devices: bool
    tf32: bool | None
    empty_cache_steps: int | None
    use_cache: bool

    @property
    def torch_compile(self) -> bool:
        """Whether the step is compiled."""
        return self.jit_options is not None


@dataclass(frozen=True)
class LogPolicy:
    """When and where the trainer logs.

    Attributes:
        steps: ``logging_steps`` as given (resolved against ``max_steps`` by :attr:`TrainerPlan.intervals`).
        nan_inf_filter: replace a NaN / inf step loss in the logged average.
        num_input_tokens: ``include_num_input_tokens_seen``: ``"all"``, ``"non_padding"`` or ``"no"``.
        report_to: the integrations, as given (``("all",)`` and ``("none",)`` included).
        disable_tqdm: print the logs instead of drawing progress bars.
        should_log: this process logs (local rank 0 with ``log_on_each_node``, else global rank 0).
        process_log_level: the ``logging`` level of this process (``log_level``, or ``log_level_replica`` on
            processes that do not log); ``None`` for ``"passive"``.
        memory_metrics: report the ``*_mem_*`` metrics (``skip_memory_metrics=False``;
            :class:`~ftrain.trainer.memory.TrainerMemoryTracker`).
    """

    steps: float
    nan_inf_filter: bool
    num_input_tokens: str
    report_to: tuple[str, ...]
    disable_tqdm: bool
    should_log: bool
    process_log_level: int | None
    memory_metrics: bool


@dataclass(frozen=True)
class EvalPolicy:
    """When and how the trainer evaluates, and how it picks the best model.

    Attributes:
        strategy, steps: ``eval_strategy`` and ``eval_steps`` as given.
        do_eval: the script evaluates (set when ``eval_strategy`` is not ``"no"``).
        on_start: evaluate once before training.
        prediction_loss_only, batch_eval_metrics: as the arguments.
        include_inputs, include_loss: ``include_for_metrics`` asks for ``"inputs"`` / ``"loss"``.
        concat_batches: ``eval_do_concat_batches``: predictions, labels and inputs are concatenated over the
            batches (``False``: lists of per-batch arrays).
        accumulation_steps: ``eval_accumulation_steps``: the outputs kept on the device move to the CPU every this
            many batches (``None``: once, at the end).
        loss_reduction: ``eval_loss_reduction``: ``"batch"`` (transformers' ``eval_loss``, each batch's mean
            weighted by its examples) or ``"token"`` (the exact ``(sum, count)`` mean).
        metric_key: ``metric_for_best_model`` with the ``eval_`` prefix (as evaluation metrics are named), or
            ``None``.
        greater_is_better: whether a larger metric is better.
        full_eval_dtype: ``torch.bfloat16`` (``bf16_full_eval``) or ``torch.float16`` (``fp16_full_eval``): an
            evaluation outside ``train()`` runs a copy of the model cast to it; ``None`` evaluates the model as is.
    """

    strategy: IntervalStrategy
    steps: float | None
    do_eval: bool
    on_start: bool
    prediction_loss_only: bool
    batch_eval_metrics: bool
    include_inputs: bool
    include_loss: bool
    concat_batches: bool
    accumulation_steps: int | None
    loss_reduction: str
    metric_key: str | None
    greater_is_better: bool | None
    full_eval_dtype: torch.dtype | None


@dataclass(frozen=True)
class SavePolicy:
    """When and what the trainer saves, and where.

    Attributes:
        output_dir: the training output folder (``checkpoint-N`` folders, the final model).
        strategy, steps: ``save_strategy``, ``save_steps`` (as given).
        total_limit: keep at most this many checkpoints (the best one kept); ``None`` or <= 0 keeps all.
        only_model: checkpoints hold the weights only (no resume).
        load_best_model_at_end: load the best checkpoint when training ends.
        restore_callback_states: on resume, restore the callbacks' states too.
        should_save: this process writes (local rank 0 with ``save_on_each_node``, else global rank 0).
        jit_checkpoint: ``enable_jit_checkpoint``: a SIGTERM makes the loop save a checkpoint and stop
            (:class:`~ftrain.trainer.jit_checkpoint.JITCheckpointCallback`).
    """

    output_dir: str
    strategy: SaveStrategy
    steps: float
    total_limit: int | None
    only_model: bool
    load_best_model_at_end: bool
    restore_callback_states: bool
    should_save: bool
    jit_checkpoint: bool

    def checkpoint_options(
        self, *, sharded: bool, should_keep_fn: Callable[[int], bool] | None = None
    ) -> CheckpointManagerOptions:
        """The ``CheckpointManager`` options of transformers' layout: ``checkpoint-N`` folders, the ``dcp`` backend
        for a sharded state (else ``safetensors``) and, with ``total_limit > 0``, transformers' retention
        (``max_to_keep=total_limit``, ``retention="total"``, ``should_keep_fn`` keeping the best folder).

        Args:
            sharded: the state is sharded over processes (the trainer has a mesh).
            should_keep_fn: ``step -> bool``, the steps retention never deletes (used only with a limit).

        Example:
            >>> options = make_plan(TrainingArguments("out", save_total_limit=2)).save.checkpoint_options(sharded=True)
            >>> options.backend, options.max_to_keep, options.retention
            ('dcp', 2, 'total')
        """
        rotation: dict[str, Any] = {}
        if self.total_limit is not None and self.total_limit > 0:
            rotation = {"max_to_keep": self.total_limit, "retention": "total", "should_keep_fn": should_keep_fn}
        return CheckpointManagerOptions(
            step_prefix=CHECKPOINT_NAMING.prefix,
            step_digits=CHECKPOINT_NAMING.digits,
            backend="dcp" if sharded else "safetensors",
            **rotation,
        )


@dataclass(frozen=True)
class HubPolicy:
    """What is pushed to the Hugging Face Hub, and where (the ``hub_*`` fields; the token is left out of ``repr``).

    Attributes:
        push_to_hub: push when the model is saved.
        model_id: the repository (``None``: named after ``output_dir``).
        token: the token, or ``None`` for the logged-in one.
        private_repo: create the repository as private.
        strategy: what is pushed, and when.
        always_push: push even while the previous push runs.
        revision: the branch, tag or commit to push to.
    """

    push_to_hub: bool
    model_id: str | None
    token: str | None = dataclasses.field(repr=False)
    private_repo: bool | None
    strategy: HubStrategy
    always_push: bool
    revision: str | None


@dataclass(frozen=True)
class Seeding:
    """The process's seeding: ``set_seed(seed)``, or ``enable_full_determinism(seed)`` with ``full_determinism``
    (which also makes the compiled step deterministic, see :func:`jit_options`)."""

    seed: int
    full_determinism: bool


@dataclass(frozen=True)
class ParallelPolicy:
    """The layout over processes.

    Attributes:
        layout: the ``ParallelConfig`` the state is laid out with on several processes (``fsdp`` /
            ``deepspeed`` / ``parallelism_config``, else plain data parallel; :func:`~ftrain.trainer.parallel.
            parallel_layout`), ``None`` on one process.
        tp_size, cp_size, sp_size: tensor / context / sequence-parallel sizes of ``parallelism_config`` (1 when
            unset; a model's own ``_tp_size`` is the Trainer's to add).
        fsdp_enabled: the layout (or ``parallelism_config``) shards the data-parallel dimension (``dp_shard > 1``).
        backend: ``ddp_backend``, the process group's backend when the Trainer starts it (``None``: gloo on the
            CPU, nccl on CUDA).
        timeout: ``ddp_timeout`` as a ``timedelta``, the process group's collective timeout.
    """

    layout: ParallelConfig | None
    tp_size: int
    cp_size: int
    sp_size: int
    fsdp_enabled: bool
    backend: str | None
    timeout: timedelta


@dataclass(frozen=True)
class TrainerPlan:
    """Every decision the Trainer's shell takes from ``TrainingArguments``, made once by :func:`make_plan`.

    Attributes:
        process: this process (device, ranks, world size).
        length: how long to train, as given (:meth:`steps` resolves it against the data).
        data: batch sizes, accumulation, data order, loader settings, columns.
        optim: what the optimizer and its schedule are built from.
        step: how the train step is built and run (compile, autocast, checkpointing, NEFTune, loss options, TF32).
        log: when and where to log.
        eval: when and how to evaluate; the best-model metric.
        save: when and what to save; the checkpoint manager's options.
        hub: what to push to the Hub.
        seeding: the process's seed and determinism.
        parallel: the layout over processes.
    """

    process: ProcessFacts
    length: TrainingLength
    data: DataPolicy
    optim: OptimPolicy
    step: StepPolicy
    log: LogPolicy
    eval: EvalPolicy
    save: SavePolicy
    hub: HubPolicy
    seeding: Seeding
    parallel: ParallelPolicy

    @property
    def intervals(self) -> Intervals:
        """The logging / eval / save intervals as given (``TrainerState.compute_steps`` resolves them)."""
        return Intervals(self.log.steps, self.eval.steps, self.save.steps)

    def total_train_batch_size(
        self, *, world_size: int | None = None, tp_size: int = 1, cp_size: int = 1, sp_size: int = 1
    ) -> int:
        """Samples per optimizer step over all processes (:func:`total_train_batch_size` with this plan's
        per-process batch size and accumulation).

        Args:
            world_size: processes (default: ``process.world_size``).
            tp_size, cp_size, sp_size: ranks that see the same rows (transformers divides the world by them).
        """
        world = self.process.world_size if world_size is None else world_size
        return total_train_batch_size(
            self.data.train_batch_size,
            self.data.gradient_accumulation_steps,
            world,
            tp_size=tp_size,
            cp_size=cp_size,
            sp_size=sp_size,
        )

    def steps(self, microbatches_per_epoch: int | None, *, world_size: int | None = None) -> TrainingSteps:
        """The run's step counts for a loader of ``microbatches_per_epoch`` on this rank (:func:`training_steps`).

        Args:
            microbatches_per_epoch: micro-batches per epoch on this rank (``BatchStream.layout.
                microbatches_per_epoch``), or ``None`` when the data has no length.
            world_size: data-parallel processes for ``total_train_batch_size`` (default: ``process.world_size``).

        Raises:
            ValueError: no length and ``max_steps <= 0``, or an empty loader.
        """
        return training_steps(
            microbatches_per_epoch,
            self.length,
            gradient_accumulation_steps=self.data.gradient_accumulation_steps,
            total_train_batch_size=self.total_train_batch_size(world_size=world_size),
            warmup_steps=self.optim.warmup_steps,
            intervals=self.intervals,
        )

    def initial_training_values(
        self,
        microbatches_per_epoch: int | None,
        *,
        num_examples: Callable[[], int],
        total_train_batch_size: int | None = None,
    ) -> tuple[int, int, int, int | float, int, int, int]:
        """transformers' ``Trainer.set_initial_training_values`` tuple for this plan
        (:func:`initial_training_values`).

        Args:
            microbatches_per_epoch: micro-batches per epoch on this rank; ``None`` or 0 for no length.
            num_examples: gives the number of training examples (called only with a length).
            total_train_batch_size: default :meth:`total_train_batch_size` (the Trainer passes its tp/cp/sp).

        Raises:
            ValueError: no length and ``max_steps <= 0`` (transformers' message).
        """
        total = self.total_train_batch_size() if total_train_batch_size is None else total_train_batch_size
        return initial_training_values(
            microbatches_per_epoch,
            self.length,
            gradient_accumulation_steps=self.data.gradient_accumulation_steps,
            total_train_batch_size=total,
            num_examples=num_examples,
        )


# ----------------------------------------------------------------------------------------------------------
# make_plan: the one place the fields are read and decided.


def make_plan(args: TrainingArguments) -> TrainerPlan:
    """Decides every ``TrainingArguments`` field the Trainer's shell acts on, once (see :data:`DISPOSITIONS`).

    The arguments were validated when they were built (and by their setters); this adds the decisions that need
    the process (device, ranks, the parallel layout, which process logs and saves).

    Args:
        args: ftrain's ``TrainingArguments`` (the Trainer converts transformers' first).

    Returns:
        The frozen plan.

    Raises:
        ValueError / NotImplementedError: a parallel layout :func:`~ftrain.trainer.parallel.parallel_layout`
            refuses (several processes), or a ``parallelism_config`` whose sizes do not fit the world size.
    """
    process = ProcessFacts(
        device=args.device,
        world_size=args.world_size,
        process_index=args.process_index,
        local_process_index=args.local_process_index,
    )
    accum = _accumulation_steps(args)
    return TrainerPlan(
        process=process,
        length=TrainingLength(num_train_epochs=args.num_train_epochs, max_steps=args.max_steps),
        data=_data_policy(args, accum),
        optim=optim_policy(args),
        step=_step_policy(args),
        log=_log_policy(args, process),
        eval=_eval_policy(args),
        save=_save_policy(args, process),
        hub=_hub_policy(args),
        seeding=Seeding(seed=args.seed, full_determinism=bool(args.full_determinism)),
        parallel=_parallel_policy(args, accum, process),
    )


def optim_policy(args: Any) -> OptimPolicy:
    """The optimizer and schedule settings of ``args`` (ftrain's or transformers' ``TrainingArguments``, read by
    attribute); values are taken as given and checked where they are built (:mod:`ftrain.trainer.convert`).

    Example:
        >>> optim_policy(TrainingArguments("out", optim="sgd", warmup_steps=0.1)).warmup_for(95)
        10
    """
    return OptimPolicy(
        name=args.optim,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        beta1=args.adam_beta1,
        beta2=args.adam_beta2,
        epsilon=args.adam_epsilon,
        optim_args=args.optim_args,
        max_grad_norm=args.max_grad_norm,
        schedule=args.lr_scheduler_type,
        schedule_kwargs=copy.deepcopy(dict(args.lr_scheduler_kwargs or {})),
        warmup_steps=args.warmup_steps,
    )


def jit_options(args: Any) -> dict[str, Any]:
    """The :func:`ftrain.jit` keyword arguments the Trainer compiles its train step with (``torch_compile``).

    - ``donate=True``: the Trainer owns its ``TrainState`` and never reads a state after stepping it, so the step
      may write the new state into the old one's tensors (in place, as ``torch.optim`` does: one copy of params
      and optimizer state in memory, no fresh allocations per step);
    - ``deterministic`` and ``fallback_random``: ``args.full_determinism`` (transformers turns deterministic
      algorithms on only then); with it the compiled step also draws eager's random numbers (dropout, NEFTune), so
      a compiled run reproduces the eager one;
    - ``mode`` and ``backend``: ``args.torch_compile_mode`` and ``args.torch_compile_backend`` (``"inductor"``);
    - ``optimizer="eager"``: the forward and backward are compiled, the optimizer runs as fused in-place kernels
      (:func:`ftrain.optim.update_and_apply`). Measured (benchmarks ``step_time`` (i) against (f), ``cold_start``):
      as fast in the steady state as compiling the optimizer into the step, a first step in a fresh process about
      half as long, and the compiled gradients are saved to the precompile cache (:mod:`ftrain.compile_cache`), so
      a rerun or a resume starts in seconds. A state sharded on a mesh keeps the whole step compiled (the Trainer).

    Args:
        args: the ``TrainingArguments``.

    Returns:
        The keyword arguments for ``ftrain.jit(step, **jit_options(args))``.

    Example:
        >>> options = jit_options(TrainingArguments("out", torch_compile=True))
        >>> options["donate"], options["optimizer"], options["mode"], options["backend"], options["deterministic"]
        (True, 'eager', None, 'inductor', False)
    """
    backend = args.torch_compile_backend or "inductor"
    return dict(
        donate=True,
        deterministic=bool(args.full_determinism),
        fallback_random=bool(args.full_determinism) and backend == "inductor",  # an Inductor option
        mode=args.torch_compile_mode,
        backend=backend,
        optimizer="eager",
    )


def _accumulation_steps(args: TrainingArguments) -> int:
    """``gradient_accumulation_steps``, or ``accelerator_config``'s ``gradient_accumulation_kwargs["num_steps"]``
    when given (transformers takes it over; the Trainer refuses both together)."""
    config = args.accelerator_config
    if isinstance(config, Mapping):
        kwargs = config.get("gradient_accumulation_kwargs")
    else:
        kwargs = getattr(config, "gradient_accumulation_kwargs", None)
    num_steps = (kwargs or {}).get("num_steps")
    return args.gradient_accumulation_steps if num_steps is None else int(num_steps)


def _data_policy(args: TrainingArguments, accum: int) -> DataPolicy:
    return DataPolicy(
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        train_batch_size=args.train_batch_size,
        eval_batch_size=args.eval_batch_size,
        gradient_accumulation_steps=accum,
        seed=args.data_seed if args.data_seed is not None else args.seed,
        sampling_strategy=args.train_sampling_strategy,
        drop_last=args.dataloader_drop_last,
        num_workers=args.dataloader_num_workers,
        pin_memory=args.dataloader_pin_memory,
        prefetch_factor=args.dataloader_prefetch_factor,
        multiprocessing_context=args.dataloader_multiprocessing_context,
        remove_unused_columns=args.remove_unused_columns,
        label_names=None if args.label_names is None else tuple(args.label_names),
        length_column_name=args.length_column_name,
        split_batches=bool(args.accelerator_config.split_batches),
        persistent_workers=bool(args.dataloader_persistent_workers),
        ignore_data_skip=bool(args.ignore_data_skip),
        auto_find_batch_size=bool(args.auto_find_batch_size),
    )


def _step_policy(args: TrainingArguments) -> StepPolicy:
    checkpointing = None
    if args.activation_checkpointing:
        kwargs = copy.deepcopy(dict(args.activation_checkpointing_kwargs or {}))
        every_n_layers, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
        checkpointing = ActivationCheckpointing(kwargs or None, every_n_layers, offload)
    return StepPolicy(
        jit_options=jit_options(args) if args.torch_compile else None,
        autocast_dtype=torch.bfloat16 if args.bf16 else None,
        activation_checkpointing=checkpointing,
        neftune_noise_alpha=args.neftune_noise_alpha,
        label_smoothing_factor=args.label_smoothing_factor,
        average_tokens_across_devices=args.average_tokens_across_devices,
        tf32=_tf32(args),
        empty_cache_steps=args.torch_empty_cache_steps,
        use_cache=args.use_cache,
    )


def tf32_available() -> bool:
    """Whether this process has a CUDA GPU with TF32 (compute capability 8.0, Ampere, or newer)."""
    return torch.cuda.is_available() and torch.version.cuda is not None and torch.cuda.get_device_capability()[0] >= 8


def _tf32(args: TrainingArguments) -> bool | None:
    """The TF32 setting to apply, transformers' rule: ``tf32=True`` (the arguments refuse it without a GPU that
    has TF32); ``tf32=False`` where the GPU has TF32 (elsewhere there is nothing to turn off); unset, on for
    ``torch_compile`` where the GPU has it (its speed-ups need it); ``None`` leaves torch's setting."""
    if args.tf32 is not None:
        return args.tf32 if args.tf32 or tf32_available() else None
    return True if args.torch_compile and tf32_available() else None


def _report_to(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _log_policy(args: TrainingArguments, process: ProcessFacts) -> LogPolicy:
    should_log = (process.local_process_index if args.log_on_each_node else process.process_index) == 0
    level = _LOG_LEVELS[args.log_level if should_log else args.log_level_replica]
    return LogPolicy(
        steps=args.logging_steps,
        nan_inf_filter=args.logging_nan_inf_filter,
        num_input_tokens=args.include_num_input_tokens_seen,
        report_to=_report_to(args.report_to),
        disable_tqdm=args.disable_tqdm,
        should_log=should_log,
        process_log_level=None if level == -1 else level,
        memory_metrics=not args.skip_memory_metrics,
    )


def _eval_policy(args: TrainingArguments) -> EvalPolicy:
    name, include = args.metric_for_best_model, args.include_for_metrics or ()
    return EvalPolicy(
        strategy=IntervalStrategy(args.eval_strategy),
        steps=args.eval_steps,
        do_eval=args.do_eval,
        on_start=args.eval_on_start,
        prediction_loss_only=args.prediction_loss_only,
        batch_eval_metrics=args.batch_eval_metrics,
        include_inputs="inputs" in include,
        include_loss="loss" in include,
        concat_batches=args.eval_do_concat_batches,
        accumulation_steps=args.eval_accumulation_steps,
        loss_reduction=args.eval_loss_reduction,
        metric_key=None if name is None else name if name.startswith("eval_") else f"eval_{name}",
        greater_is_better=args.greater_is_better,
        full_eval_dtype=torch.bfloat16 if args.bf16_full_eval else torch.float16 if args.fp16_full_eval else None,
    )


def _save_policy(args: TrainingArguments, process: ProcessFacts) -> SavePolicy:
    return SavePolicy(
        output_dir=args.output_dir,
        strategy=SaveStrategy(args.save_strategy),
        steps=args.save_steps,
        total_limit=args.save_total_limit,
        only_model=args.save_only_model,
        load_best_model_at_end=args.load_best_model_at_end,
        restore_callback_states=args.restore_callback_states_from_checkpoint,
        should_save=(process.local_process_index if args.save_on_each_node else process.process_index) == 0,
        jit_checkpoint=args.enable_jit_checkpoint,
    )


def _hub_policy(args: TrainingArguments) -> HubPolicy:
    return HubPolicy(
        push_to_hub=args.push_to_hub,
        model_id=args.hub_model_id,
        token=args.hub_token,
        private_repo=args.hub_private_repo,
        strategy=HubStrategy(args.hub_strategy),
        always_push=args.hub_always_push,
        revision=args.hub_revision,
    )


def _parallel_policy(args: TrainingArguments, accum: int, process: ProcessFacts) -> ParallelPolicy:
    resolved = args
    if accum != args.gradient_accumulation_steps:  # DeepSpeed's "auto" values see the accumulation taken over
        resolved = copy.copy(args)
        resolved.gradient_accumulation_steps = accum
    layout = parallel_layout(resolved)
    given = args.parallelism_config
    parallel = layout if layout is not None else given
    if hasattr(parallel, "resolve"):  # ftrain's ParallelConfig: dp_shard=-1 takes what the world size leaves
        with contextlib.suppress(ValueError):  # sizes this world cannot hold: the layout refuses them when used
            parallel = parallel.resolve(process.world_size)
    return ParallelPolicy(
        layout=layout,
        tp_size=1 if given is None else config_size(given, "tp", "tp_size"),
        cp_size=1 if given is None else config_size(given, "cp", "cp_size"),
        sp_size=1 if given is None else config_size(given, "sp_size"),
        fsdp_enabled=parallel is not None and config_size(parallel, "dp_shard", "dp_shard_size") > 1,
        backend=args.ddp_backend,
        timeout=timedelta(seconds=args.ddp_timeout),
    )


def apply_process_settings(plan: TrainerPlan) -> None:
    """Applies the process-wide settings the arguments ask for, as transformers does when it builds them.

    - ``tf32`` (``plan.step.tf32``): TF32 for float32 matmuls and convolutions on (True) or off (False), through
      the API transformers sets (``torch.backends.fp32_precision = "tf32" / "ieee"`` from torch 2.9, else the
      ``allow_tf32`` flags of ``torch.backends.cuda.matmul`` and ``cudnn``; torch refuses to read a mix of the
      two); ``None`` leaves them.
    - ``log_level`` / ``log_level_replica`` (``plan.log.process_log_level``): the level of the ``ftrain`` logger
      and of the ``transformers`` logger, which the shell's messages of transformers' Trainer go through
      (:func:`~ftrain.trainer.utils.hf_logger`; transformers' Trainer sets its verbosity the same way);
      ``"passive"`` leaves them.

    Args:
        plan: the Trainer's plan.

    Example:
        >>> plan = make_plan(TrainingArguments("out"))
        >>> plan = dataclasses.replace(plan, step=dataclasses.replace(plan.step, tf32=False))  # tf32=False on a GPU
        >>> before = torch.backends.fp32_precision
        >>> apply_process_settings(plan)
        >>> torch.backends.fp32_precision
        'ieee'
        >>> torch.backends.fp32_precision = before
    """
    if plan.step.tf32 is not None:
        _enable_tf32(plan.step.tf32)
    if plan.log.process_log_level is not None:
        for name in ("ftrain", "transformers"):
            logging.getLogger(name).setLevel(plan.log.process_log_level)


def _enable_tf32(enable: bool) -> None:
    if hasattr(torch.backends, "fp32_precision"):  # torch >= 2.9, where transformers sets this one
        torch.backends.fp32_precision = "tf32" if enable else "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enable


# ----------------------------------------------------------------------------------------------------------
# What happens to every field.


@dataclass(frozen=True)
class Disposition:
    """What the Trainer does with one ``TrainingArguments`` field.

    Attributes:
        kind: ``"honoured"`` (acted on, through the plan entries in ``where``), ``"refused"`` (the value in
            ``refused_with`` raises a ``ValueError`` containing ``message`` when the arguments are built) or
            ``"ignored"`` (accepted and not acted on; ``why`` says why).
        where: the plan attributes that carry an honoured field (``"data.seed"``).
        by: for a field acted on by a callback, which reads it from ``args`` as transformers' does (the callback's
            class name in :mod:`ftrain.trainer.callbacks` or :mod:`ftrain.trainer.integrations`).
        why: a note on an honoured field, or the reason a field is ignored.
        refused_with: for a refused field, the ``TrainingArguments`` keyword arguments that are refused.
        message: for a refused field, a part of the error message.
    """

    kind: Literal["honoured", "refused", "ignored"]
    where: tuple[str, ...] = ()
    by: str = ""
    why: str = ""
    refused_with: Mapping[str, Any] | None = None
    message: str = ""


def _honoured(*where: str, by: str = "", why: str = "") -> Disposition:
    return Disposition("honoured", where=where, by=by, why=why)


def _ignored(why: str) -> Disposition:
    return Disposition("ignored", why=why)


def _refused(refused_with: dict[str, Any], message: str, why: str) -> Disposition:
    return Disposition("refused", why=why, refused_with=refused_with, message=message)


_NOT_A_DDP_WRAPPER = "ftrain does not wrap the model in DistributedDataParallel: the pure step reduces the gradients"
_SCRIPTS_ONLY = "read by training scripts, not by the Trainer (as in transformers)"

#: Every ``TrainingArguments`` field (transformers 5.x and ftrain's 4.x extras) -> its :class:`Disposition`.
DISPOSITIONS: dict[str, Disposition] = {
    # --- output and length of training ---
    "output_dir": _honoured("save.output_dir"),
    "per_device_train_batch_size": _honoured("data.per_device_train_batch_size", "data.train_batch_size"),
    "num_train_epochs": _honoured("length.num_train_epochs"),
    "max_steps": _honoured("length.max_steps"),
    # --- learning rate and optimizer ---
    "learning_rate": _honoured("optim.learning_rate"),
    "lr_scheduler_type": _honoured(
        "optim.schedule", why="'reduce_lr_on_plateau' and 'greedy' are scales stepped with each evaluation metric"
    ),
    "lr_scheduler_kwargs": _honoured("optim.schedule_kwargs"),
    "warmup_steps": _honoured("optim.warmup_steps"),
    "optim": _honoured(
        "optim.name",
        why="names ftrain does not build are refused, with advice, by convert (with "
        "transformers' ImportError naming the package when it is missing)",
    ),
    "optim_args": _honoured("optim.optim_args"),
    "weight_decay": _honoured("optim.weight_decay"),
    "adam_beta1": _honoured("optim.beta1"),
    "adam_beta2": _honoured("optim.beta2"),
    "adam_epsilon": _honoured("optim.epsilon"),
    "optim_target_modules": _ignored("only GaLore / APOLLO optimizers read it, and their names are refused"),
    "gradient_accumulation_steps": _honoured("data.gradient_accumulation_steps"),
    "average_tokens_across_devices": _honoured(
        "step.average_tokens_across_devices",
        why="it sets num_items_in_batch (get_batch_samples); the trained loss is always the global (sum, count) mean",
    ),
    "max_grad_norm": _honoured("optim.max_grad_norm"),
    "label_smoothing_factor": _honoured("step.label_smoothing_factor"),
    # --- precision ---
    "bf16": _honoured("step.autocast_dtype", "parallel.layout", why="FSDP's mixed-precision dtype too"),
    "fp16": _refused(
        {"fp16": True},
        "TrainingArguments: fp16=True",
        "float16 needs dynamic loss scaling, which the pure step does not implement (and a CUDA GPU)",
    ),
    "bf16_full_eval": _honoured(
        "eval.full_eval_dtype",
        why="evaluate()/predict() outside train() run a bfloat16 copy of the model (Trainer._model_for_inference), "
        "as transformers casts it; evaluations inside train() use the model as is, as transformers",
    ),
    "fp16_full_eval": _honoured(
        "eval.full_eval_dtype",
        why="as bf16_full_eval, in float16 (on the CPU too, as transformers: a cast for evaluation, no loss scaling)",
    ),
    "tf32": _honoured(
        "step.tf32",
        why="applied by apply_process_settings; True needs an Ampere or newer GPU; unset, torch_compile turns it on "
        "where the GPU has it (transformers' rule)",
    ),
    # --- memory and speed ---
    "activation_checkpointing": _honoured(
        "step.activation_checkpointing", why="refused together with torch_compile (Trainer._validate)"
    ),
    "activation_checkpointing_kwargs": _honoured("step.activation_checkpointing"),
    "gradient_checkpointing": _honoured("step.activation_checkpointing", why="old name, folded in by the args"),
    "gradient_checkpointing_kwargs": _honoured("step.activation_checkpointing", why="old name, folded in"),
    "torch_compile": _honoured("step.jit_options"),
    "torch_compile_backend": _honoured("step.jit_options"),
    "torch_compile_mode": _honoured("step.jit_options"),
    "use_liger_kernel": _refused(
        {"use_liger_kernel": True},
        "use_liger_kernel=True",
        "Liger's Triton kernels patch transformers' modules in place; ftrain's pure step does not apply them",
    ),
    "liger_kernel_config": _ignored("options of the Liger kernels, read only with use_liger_kernel=True (refused)"),
    "use_cache": _honoured("step.use_cache", why="set on model.config.use_cache when the Trainer is built"),
    "neftune_noise_alpha": _honoured("step.neftune_noise_alpha"),
    "torch_empty_cache_steps": _honoured("step.empty_cache_steps"),
    "auto_find_batch_size": _honoured(
        "data.auto_find_batch_size", why="TrainingLoop.find_batch_size: x0.9 after each out-of-memory error"
    ),
    # --- logging ---
    "logging_strategy": _honoured(by="DefaultFlowCallback"),
    "logging_steps": _honoured("log.steps"),
    "logging_first_step": _honoured(by="DefaultFlowCallback"),
    "log_on_each_node": _honoured("log.should_log", "log.process_log_level"),
    "logging_nan_inf_filter": _honoured("log.nan_inf_filter"),
    "include_num_input_tokens_seen": _honoured("log.num_input_tokens"),
    "log_level": _honoured(
        "log.process_log_level", why="applied to the 'ftrain' and 'transformers' loggers by apply_process_settings"
    ),
    "log_level_replica": _honoured("log.process_log_level", why="applied by apply_process_settings"),
    "disable_tqdm": _honoured("log.disable_tqdm"),
    "report_to": _honoured("log.report_to", why="integrations ftrain does not provide are refused when built"),
    "run_name": _ignored("names a run for wandb / mlflow / trackio, which ftrain does not provide"),
    "project": _ignored("a Trackio setting; ftrain does not provide Trackio (report_to='trackio' is refused)"),
    "trackio_space_id": _ignored("a Trackio setting; ftrain does not provide Trackio"),
    "trackio_bucket_id": _ignored("a Trackio setting; ftrain does not provide Trackio"),
    "trackio_static_space_id": _ignored("a Trackio setting; ftrain does not provide Trackio"),
    # --- evaluation ---
    "eval_strategy": _honoured("eval.strategy"),
    "eval_steps": _honoured("eval.steps"),
    "eval_delay": _honoured(by="DefaultFlowCallback"),
    "per_device_eval_batch_size": _honoured("data.per_device_eval_batch_size", "data.eval_batch_size"),
    "prediction_loss_only": _honoured("eval.prediction_loss_only"),
    "eval_on_start": _honoured("eval.on_start"),
    "eval_do_concat_batches": _honoured("eval.concat_batches"),
    "eval_use_gather_object": _ignored("the Evaluator gathers tensors only; Python objects are not gathered"),
    "eval_accumulation_steps": _honoured("eval.accumulation_steps"),
    "include_for_metrics": _honoured("eval.include_inputs", "eval.include_loss"),
    "batch_eval_metrics": _honoured("eval.batch_eval_metrics"),
    # --- checkpoints ---
    "save_only_model": _honoured("save.only_model"),
    "save_strategy": _honoured("save.strategy", why="'best' without metric_for_best_model is refused, as transformers"),
    "save_steps": _honoured("save.steps"),
    "save_on_each_node": _honoured("save.should_save"),
    "save_total_limit": _honoured("save.total_limit"),
    "enable_jit_checkpoint": _honoured("save.jit_checkpoint"),
    # --- Hub ---
    "push_to_hub": _honoured("hub.push_to_hub"),
    "hub_token": _honoured("hub.token"),
    "hub_private_repo": _honoured("hub.private_repo"),
    "hub_model_id": _honoured("hub.model_id"),
    "hub_strategy": _honoured("hub.strategy"),
    "hub_always_push": _honoured("hub.always_push"),
    "hub_revision": _honoured("hub.revision"),
    # --- best model ---
    "load_best_model_at_end": _honoured("save.load_best_model_at_end"),
    "metric_for_best_model": _honoured("eval.metric_key"),
    "greater_is_better": _honoured("eval.greater_is_better"),
    # --- resuming and reproducibility ---
    "ignore_data_skip": _honoured("data.ignore_data_skip", why="read by TrainFeed: the resumed epoch starts over"),
    "restore_callback_states_from_checkpoint": _honoured("save.restore_callback_states"),
    "full_determinism": _honoured("seeding.full_determinism", "step.jit_options"),
    "seed": _honoured("seeding.seed", "data.seed"),
    "data_seed": _honoured("data.seed"),
    # --- hardware and loaders ---
    "use_cpu": _honoured("process.device"),
    "accelerator_config": _honoured(
        "data.gradient_accumulation_steps",
        "data.split_batches",
        why="gradient_accumulation_kwargs['num_steps'] (its other accelerate plugin fields change nothing in "
        "transformers' Trainer either; unknown ones are refused) and split_batches are honoured; each process reads "
        "the rows dispatch_batches (any value) gives it; the order is always seeded (use_seedable_sampler=False "
        "too); even_batches=False with several processes is refused; use_configured_state=True needs an accelerate "
        "state that agrees with ftrain's own devices and ranks (checked, else refused); non_blocking "
        "only changes how a copy overlaps, not what is computed",
    ),
    "parallelism_config": _honoured(
        "parallel.layout", "parallel.tp_size", "parallel.cp_size", "parallel.sp_size", "parallel.fsdp_enabled"
    ),
    "dataloader_drop_last": _honoured("data.drop_last"),
    "dataloader_num_workers": _honoured("data.num_workers"),
    "dataloader_pin_memory": _honoured("data.pin_memory", why="pins only where an accelerator is available"),
    "dataloader_persistent_workers": _honoured(
        "data.persistent_workers", why="BatchStream keeps its workers; evaluation loaders are kept per name"
    ),
    "dataloader_prefetch_factor": _honoured("data.prefetch_factor"),
    "dataloader_multiprocessing_context": _honoured("data.multiprocessing_context"),
    "dataloader_in_order": _ignored("BatchStream always yields batches in order"),
    "remove_unused_columns": _honoured("data.remove_unused_columns"),
    "label_names": _honoured("data.label_names"),
    "train_sampling_strategy": _honoured(
        "data.sampling_strategy", why="'batch_rebalance' (microbatches of varying size) is refused by the arguments"
    ),
    "length_column_name": _honoured("data.length_column_name"),
    # --- distributed ---
    "ddp_find_unused_parameters": _ignored(_NOT_A_DDP_WRAPPER),
    "ddp_bucket_cap_mb": _ignored(_NOT_A_DDP_WRAPPER),
    "ddp_broadcast_buffers": _ignored(_NOT_A_DDP_WRAPPER),
    "ddp_static_graph": _ignored(_NOT_A_DDP_WRAPPER),
    "ddp_backend": _honoured(
        "parallel.backend", why="when the Trainer starts the process group; backends of other devices are refused"
    ),
    "ddp_timeout": _honoured("parallel.timeout", why="when the Trainer starts the process group"),
    "fsdp": _honoured("parallel.layout", "parallel.fsdp_enabled"),
    "fsdp_config": _honoured("parallel.layout"),
    "deepspeed": _honoured("parallel.layout", why="as a sharding layout; no DeepSpeed engine runs"),
    "debug": _refused(
        {"debug": "underflow_overflow"},
        "is not provided by ftrain",
        "the underflow/overflow hooks cannot run in the functional (or compiled) step; TPU metrics need a TPU",
    ),
    "skip_memory_metrics": _honoured("log.memory_metrics"),
    # --- for scripts ---
    "do_train": _ignored(_SCRIPTS_ONLY),
    "do_eval": _honoured("eval.do_eval", why="the ray scheduler check of hyperparameter_search reads it"),
    "do_predict": _ignored(_SCRIPTS_ONLY),
    "resume_from_checkpoint": _ignored(_SCRIPTS_ONLY + "; pass it to train()"),
    "local_rank": _honoured("process.local_process_index", why="when LOCAL_RANK is unset"),
    # --- transformers 4.x names, folded into 5.x fields by the arguments ---
    "evaluation_strategy": _honoured("eval.strategy"),
    "warmup_ratio": _honoured("optim.warmup_steps"),
    "group_by_length": _honoured("data.sampling_strategy"),
    "logging_dir": _honoured(by="TensorBoardCallback"),
    "overwrite_output_dir": _ignored("kept for scripts; the Trainer never checks output_dir for old runs"),
    "save_safetensors": _refused(
        {"save_safetensors": False}, "ftrain writes safetensors only", "pickled checkpoints are never written"
    ),
    "no_cuda": _honoured("process.device"),
    # --- ftrain's own ---
    "eval_loss_reduction": _honoured("eval.loss_reduction"),
}
