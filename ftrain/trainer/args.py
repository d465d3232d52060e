"""``TrainingArguments``: the Hugging Face ``Trainer`` configuration, validated once.

The dataclass has every field of ``transformers.TrainingArguments`` 5.24 with the same name, type and default,
so a script written for the Hugging Face ``Trainer`` builds it unchanged (keyword arguments, the command-line
parser in :mod:`ftrain.trainer.hf_argparser`, ``to_dict()`` round trips). ``__post_init__`` normalises the
values the way transformers does (strategy strings to enums, ``eval_steps`` from ``logging_steps``,
``report_to="none"`` to ``[]`` ...) and rejects the combinations transformers rejects, plus the settings ftrain
cannot honour, each with a message naming the field and the fix. The fluent setters (``set_training`` ...) run the
same validation: a value the constructor refuses raises the same error and leaves the arguments unchanged.

The object is then decided in one place: :func:`ftrain.trainer.plan.make_plan` turns it into a frozen
:class:`~ftrain.trainer.plan.TrainerPlan` when the Trainer is built, and records what happens to every field
(``DISPOSITIONS``: honoured, refused or ignored). The pure core never sees it (DESIGN.md, rules 2 and 3).

Four transformers 4.x names are still accepted, with a ``FutureWarning``, and folded into their 5.x fields:
``evaluation_strategy`` (-> ``eval_strategy``), ``warmup_ratio`` (-> a ratio in ``warmup_steps``),
``group_by_length`` (-> ``train_sampling_strategy="group_by_length"``) and ``no_cuda`` (-> ``use_cpu``).
``logging_dir`` is kept as the TensorBoard directory, ``overwrite_output_dir`` is kept for scripts that read
it, and ``save_safetensors=False`` is refused (ftrain writes safetensors only). One field is ftrain's own:
``eval_loss_reduction`` (``"batch"``, transformers' ``eval_loss``, or ``"token"``, the exact mean); it is left out
of ``to_dict`` at its default.

This module is long because of the field list (about 120 fields, one short help text each); the logic below
the fields is split into short helpers.

Example:
    >>> args = TrainingArguments("out", eval_strategy="steps", logging_steps=50, warmup_steps=0.1)
    >>> args.eval_strategy is IntervalStrategy.STEPS, args.eval_steps, args.do_eval
    (True, 50, True)
    >>> args.get_warmup_steps(1000), args.report_to
    (100, [])
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from datetime import timedelta
from enum import Enum
from typing import Any, Literal

import torch

from ftrain.schedules import METRIC_SCHEDULE_NAMES, SCHEDULE_NAMES

__all__ = [
    "AcceleratorConfig",
    "DebugOption",
    "HubStrategy",
    "IntervalStrategy",
    "OptimizerNames",
    "ParallelMode",
    "SaveStrategy",
    "SchedulerType",
    "TrainingArguments",
]

logger = logging.getLogger("ftrain.trainer")


# ----------------------------------------------------------------------------------------------------------
# Enums. Each is a ``str`` enum, so ``args.eval_strategy == "steps"`` holds, and each accepts the member of
# transformers' enum of the same name (by value), so code that passes ``transformers.IntervalStrategy.STEPS``
# keeps working without this module importing transformers.


class _ChoiceEnum(str, Enum):
    """A string enum whose error lists the valid values and which accepts other enums' members by value."""

    @classmethod
    def _missing_(cls, value: object) -> Any:
        if isinstance(value, Enum):
            return cls(value.value)
        raise ValueError(f"{value!r} is not a valid {cls.__name__}; valid values are {[m.value for m in cls]}.")


class IntervalStrategy(_ChoiceEnum):
    """When logging / evaluation happen: never, every ``*_steps`` optimizer steps, or at each epoch end."""

    NO = "no"
    STEPS = "steps"
    EPOCH = "epoch"


class SaveStrategy(_ChoiceEnum):
    """When checkpoints are written; ``best`` saves after an evaluation that found a new best metric."""

    NO = "no"
    STEPS = "steps"
    EPOCH = "epoch"
    BEST = "best"


class HubStrategy(_ChoiceEnum):
    """What is pushed to the Hub, and when."""

    END = "end"
    EVERY_SAVE = "every_save"
    CHECKPOINT = "checkpoint"
    ALL_CHECKPOINTS = "all_checkpoints"


# Built from ftrain.schedules.SCHEDULE_NAMES, the one list of schedule names; each member is named as transformers
# names it: the value in upper case, except this one.
_SCHEDULER_MEMBER_NAMES = {"reduce_lr_on_plateau": "REDUCE_ON_PLATEAU"}
SchedulerType = _ChoiceEnum(
    "SchedulerType",
    [(_SCHEDULER_MEMBER_NAMES.get(name, name.upper()), name) for name in SCHEDULE_NAMES],
    module=__name__,
    qualname="SchedulerType",
)
SchedulerType.__doc__ = "Learning-rate schedule names (``ftrain.schedules.SCHEDULE_NAMES``, in transformers' order)."


class OptimizerNames(_ChoiceEnum):
    """Every optimizer name transformers knows. ftrain builds the torch-only ones (see
    :func:`ftrain.trainer.convert.make_optimizer`); the others are refused there with a suggestion."""

    ADAMW_TORCH = "adamw_torch"
    ADAMW_TORCH_FUSED = "adamw_torch_fused"
    ADAMW_TORCH_XLA = "adamw_torch_xla"
    ADAMW_TORCH_NPU_FUSED = "adamw_torch_npu_fused"
    ADAFACTOR = "adafactor"
    ADAMW_ANYPRECISION = "adamw_anyprecision"
    ADAMW_TORCH_4BIT = "adamw_torch_4bit"
    ADAMW_TORCH_8BIT = "adamw_torch_8bit"
    ADEMAMIX = "ademamix"
    SGD = "sgd"
    ADAGRAD = "adagrad"
    ADAMW_BNB = "adamw_bnb_8bit"
    ADAMW_8BIT = "adamw_8bit"
    ADEMAMIX_8BIT = "ademamix_8bit"
    LION_8BIT = "lion_8bit"
    LION = "lion_32bit"
    PAGED_ADAMW = "paged_adamw_32bit"
    PAGED_ADAMW_8BIT = "paged_adamw_8bit"
    PAGED_ADEMAMIX = "paged_ademamix_32bit"
    PAGED_ADEMAMIX_8BIT = "paged_ademamix_8bit"
    PAGED_LION = "paged_lion_32bit"
    PAGED_LION_8BIT = "paged_lion_8bit"
    RMSPROP = "rmsprop"
    RMSPROP_BNB = "rmsprop_bnb"
    RMSPROP_8BIT = "rmsprop_bnb_8bit"
    RMSPROP_32BIT = "rmsprop_bnb_32bit"
    GALORE_ADAMW = "galore_adamw"
    GALORE_ADAMW_8BIT = "galore_adamw_8bit"
    GALORE_ADAFACTOR = "galore_adafactor"
    GALORE_ADAMW_LAYERWISE = "galore_adamw_layerwise"
    GALORE_ADAMW_8BIT_LAYERWISE = "galore_adamw_8bit_layerwise"
    GALORE_ADAFACTOR_LAYERWISE = "galore_adafactor_layerwise"
    LOMO = "lomo"
    ADALOMO = "adalomo"
    GROKADAMW = "grokadamw"
    SCHEDULE_FREE_RADAM = "schedule_free_radam"
    SCHEDULE_FREE_ADAMW = "schedule_free_adamw"
    SCHEDULE_FREE_SGD = "schedule_free_sgd"
    APOLLO_ADAMW = "apollo_adamw"
    APOLLO_ADAMW_LAYERWISE = "apollo_adamw_layerwise"
    STABLE_ADAMW = "stable_adamw"


class DebugOption(_ChoiceEnum):
    """Values of ``TrainingArguments.debug``."""

    UNDERFLOW_OVERFLOW = "underflow_overflow"
    TPU_METRICS_DEBUG = "tpu_metrics_debug"


class ParallelMode(Enum):
    """How this process takes part in training (``TrainingArguments.parallel_mode``)."""

    NOT_PARALLEL = "not_parallel"
    NOT_DISTRIBUTED = "not_distributed"
    DISTRIBUTED = "distributed"
    SAGEMAKER_MODEL_PARALLEL = "sagemaker_model_parallel"
    SAGEMAKER_DATA_PARALLEL = "sagemaker_data_parallel"
    TPU = "tpu"


# ----------------------------------------------------------------------------------------------------------
# The accelerate loader settings, kept as plain data (ftrain does not use accelerate).


# accelerate's GradientAccumulationPlugin fields. ``num_steps`` becomes gradient_accumulation_steps (as transformers
# takes it over); the others steer accelerate's own accumulation, which transformers' Trainer runs with num_steps=1
# (it accumulates itself), so they change nothing there either, nor in ftrain (which accumulates inside the step).
_ACCUMULATION_KEYS = frozenset({"num_steps", "adjust_scheduler", "sync_with_dataloader", "sync_each_batch"})


@dataclass
class AcceleratorConfig:
    """transformers' ``accelerator_config`` settings, as data for ftrain's data layer.

    Attributes:
        split_batches: the loader yields global batches that are split across ranks.
        dispatch_batches: rank 0 reads the data and sends each rank its share (``None``: automatic).
        even_batches: pad the last batch so every rank gets one.
        use_seedable_sampler: random sampling seeded from ``seed`` and the epoch.
        non_blocking: non-blocking host-to-device copies.
        gradient_accumulation_kwargs: ``num_steps`` / ``sync_each_batch`` overrides.
        use_configured_state: take the processes and devices from an accelerate state the script set up first
            (``Accelerator()`` / ``PartialState()``); ftrain accepts it where that state agrees with its own reading
            of them (see ``TrainingArguments._check_configured_state``).
    """

    split_batches: bool = False
    dispatch_batches: bool | None = None
    even_batches: bool = True
    use_seedable_sampler: bool = True
    non_blocking: bool = False
    gradient_accumulation_kwargs: dict | None = None
    use_configured_state: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The settings as a dict (what ``TrainingArguments.to_dict`` stores; ``use_configured_state`` is left
        out, as transformers leaves it out)."""
        out = dataclasses.asdict(self)
        out.pop("use_configured_state")
        return out

    @classmethod
    def from_value(cls, value: Any) -> AcceleratorConfig:
        """Builds the config from ``None``, a dict, a JSON file path, or an object with ``to_dict()``.

        Raises:
            NotImplementedError: a class (``AcceleratorConfig`` rather than ``AcceleratorConfig()``), as transformers.
            ValueError: a key that is not one of the fields.
        """
        if value is None:
            return cls()
        if isinstance(value, type):
            raise NotImplementedError(
                f"Tried passing in a callable to `accelerator_config` (the class {value.__name__}, not an instance); "
                "pass an instance such as AcceleratorConfig(split_batches=True), a dict or a JSON file path."
            )
        if isinstance(value, cls):
            config = value
        else:
            if isinstance(value, (str, os.PathLike)):
                with open(value, encoding="utf-8") as f:
                    value = json.load(f)
            elif hasattr(value, "to_dict"):
                value = value.to_dict()
            if not isinstance(value, dict):
                raise ValueError(
                    f"accelerator_config must be a dict, a JSON file path or an AcceleratorConfig, got "
                    f"{type(value).__name__}."
                )
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"accelerator_config: unknown keys {unknown}; valid keys are {sorted(known)}.")
            config = cls(**value)
        unknown = sorted(set(config.gradient_accumulation_kwargs or {}) - _ACCUMULATION_KEYS)
        if unknown:
            raise ValueError(
                f"accelerator_config['gradient_accumulation_kwargs']: unknown keys {unknown}; valid keys are "
                f"{sorted(_ACCUMULATION_KEYS)} (accelerate's GradientAccumulationPlugin)."
            )
        return config


def _device_key(device: Any) -> tuple[str, int]:
    """``(type, index)`` of a device, ``torch.device("cuda")`` reading as index 0 (the device of one process)."""
    device = torch.device(device)
    return device.type, device.index or 0


# ----------------------------------------------------------------------------------------------------------
# Helpers for the field list.

_LOG_LEVELS = {
    "detail": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "passive": -1,
}
_SAMPLING_STRATEGIES = ("random", "sequential", "group_by_length", "batch_rebalance")
_TOKEN_COUNTING = ("all", "non_padding", "no")
_EVAL_LOSS_REDUCTIONS = ("batch", "token")
#: ftrain's own fields -> their defaults; left out of ``to_dict`` at their default, so that a transformers
#: script sees transformers' keys.
_FTRAIN_FIELDS = {"eval_loss_reduction": "batch"}


def _arg(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with a default and argparse metadata (``help`` plus e.g. ``choices``)."""
    return field(default=default, metadata={"help": help, **metadata})


def _default_optim() -> str:
    """transformers' default: the fused AdamW from torch 2.8 on (ftrain needs torch >= 2.11)."""
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return "adamw_torch_fused" if (major, minor) >= (2, 8) else "adamw_torch"


def _parse_scalar_strings(d: dict) -> dict:
    """In a dict read from a JSON string, turns "true"/"false" and number strings into bools and numbers, at any
    depth (what transformers does to dict arguments given on the command line)."""
    for key, value in d.items():
        if isinstance(value, dict):
            d[key] = _parse_scalar_strings(value)
        elif isinstance(value, str):
            if value.lower() in ("true", "false"):
                d[key] = value.lower() == "true"
            elif value.isdigit():
                d[key] = int(value)
            elif value.replace(".", "", 1).isdigit():
                d[key] = float(value)
    return d


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "y", "on", "t")


def _installed_integrations() -> list[str]:
    """The reporting integrations ftrain has that are installed (checked without importing them)."""
    return ["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else []


def _dtypes_to_str(d: dict) -> None:
    """Replaces ``torch.dtype`` values under a ``dtype`` key (at any depth) by their names, for JSON."""
    if d.get("dtype") is not None and not isinstance(d["dtype"], str):
        d["dtype"] = str(d["dtype"]).split(".")[-1]
    for value in d.values():
        if isinstance(value, dict):
            _dtypes_to_str(value)


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the code that built the arguments (outside this module and
    the dataclass-generated ``__init__``)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename in (__file__, "<string>"):
        frame, level = frame.f_back, level + 1
    return level


def _warn_legacy(old: str, advice: str) -> None:
    warnings.warn(
        f"TrainingArguments: `{old}` is a transformers 4.x argument; {advice}.", FutureWarning, _user_stacklevel()
    )


# Fields added for transformers 4.x scripts; they are folded into 5.x fields and left out of ``to_dict`` when
# unset. The names, and what each one becomes, are listed in the module docstring.
_LEGACY_FIELDS = (
    "evaluation_strategy",
    "warmup_ratio",
    "group_by_length",
    "logging_dir",
    "overwrite_output_dir",
    "save_safetensors",
    "no_cuda",
)


@dataclass
class TrainingArguments:
    """The Hugging Face ``Trainer`` configuration (transformers 5.24 fields and defaults), validated on creation.

    Every field is documented by its ``help`` metadata (``--help`` of :class:`~ftrain.trainer.hf_argparser.
    HfArgumentParser` lists them). Differences from transformers are listed in ``tests/trainer/test_args.py``
    (``INTENTIONAL_DIFFERENCES``).

    Raises:
        ValueError: an invalid value or combination; the message names the field(s) and the fix.
    """

    # Fields whose value may be given as a JSON string (``--lr_scheduler_kwargs '{"num_cycles": 2}'``).
    _VALID_DICT_FIELDS = [
        "accelerator_config",
        "fsdp_config",
        "deepspeed",
        "activation_checkpointing_kwargs",
        "gradient_checkpointing_kwargs",
        "lr_scheduler_kwargs",
    ]

    # --- output and length of training ---
    output_dir: str | None = _arg(None, "Where checkpoints and outputs go (default: 'trainer_output').")
    per_device_train_batch_size: int = _arg(8, "Training batch size on each device.")
    num_train_epochs: float = _arg(3.0, "Number of epochs (a fraction runs part of the last one).")
    max_steps: int = _arg(-1, "If > 0: the number of optimizer steps, overriding num_train_epochs.")
    # --- learning rate and optimizer ---
    learning_rate: float = _arg(5e-5, "Peak learning rate.")
    lr_scheduler_type: SchedulerType | str = _arg("linear", "Learning-rate schedule (a SchedulerType value).")
    lr_scheduler_kwargs: dict | str | None = _arg(None, "Extra schedule arguments, as a dict or a JSON string.")
    warmup_steps: float = _arg(0, "Linear warmup: a number of steps if >= 1, else a fraction of all steps.")
    optim: OptimizerNames | str = _arg(_default_optim(), "Optimizer name (an OptimizerNames value).")
    optim_args: str | None = _arg(None, "Extra optimizer arguments as 'key=value,key=value'.")
    weight_decay: float = _arg(0.0, "Weight decay, not applied to biases and normalization weights.")
    adam_beta1: float = _arg(0.9, "Adam first-moment decay.")
    adam_beta2: float = _arg(0.999, "Adam second-moment decay.")
    adam_epsilon: float = _arg(1e-8, "Adam epsilon.")
    optim_target_modules: None | str | list[str] = _arg(None, "Modules a low-rank optimizer (GaLore) targets.")
    gradient_accumulation_steps: int = _arg(1, "Micro-batches accumulated per optimizer step.")
    average_tokens_across_devices: bool = _arg(True, "Count loss tokens over all ranks before dividing.")
    max_grad_norm: float = _arg(1.0, "Clip the global gradient norm to this; 0 turns clipping off.")
    label_smoothing_factor: float = _arg(0.0, "Label smoothing epsilon; 0 means none.")
    # --- precision ---
    bf16: bool = _arg(False, "Train in bfloat16 mixed precision.")
    fp16: bool = _arg(False, "Train in float16 mixed precision (not implemented yet: refused; use bf16).")
    bf16_full_eval: bool = _arg(False, "Evaluate with the model in bfloat16.")
    fp16_full_eval: bool = _arg(False, "Evaluate with the model in float16.")
    tf32: bool | None = _arg(None, "Allow TF32 matmuls on Ampere or newer GPUs.")
    # --- memory and speed ---
    activation_checkpointing: bool | None = _arg(
        None, "Recompute activations in backward to save memory.", nargs="?", const=True
    )
    activation_checkpointing_kwargs: dict[str, Any] | str | None = _arg(None, "Options for activation checkpointing.")
    gradient_checkpointing: bool | None = _arg(None, "Old name of activation_checkpointing.", nargs="?", const=True)
    gradient_checkpointing_kwargs: dict[str, Any] | str | None = _arg(
        None, "Old name of activation_checkpointing_kwargs."
    )
    torch_compile: bool = _arg(False, "Compile the train step with torch.compile.")
    torch_compile_backend: str | None = _arg(None, "torch.compile backend (setting it turns torch_compile on).")
    torch_compile_mode: str | None = _arg(None, "torch.compile mode (setting it turns torch_compile on).")
    use_liger_kernel: bool = _arg(False, "Use Liger kernels.")
    liger_kernel_config: dict[str, bool] | None = _arg(None, "Options for the Liger kernels.")
    use_cache: bool = _arg(False, "Let the model use its key/value cache while training.")
    neftune_noise_alpha: float | None = _arg(None, "NEFTune embedding-noise scale; None turns it off.")
    torch_empty_cache_steps: int | None = _arg(None, "Empty the device cache every this many steps.")
    auto_find_batch_size: bool = _arg(False, "Shrink the batch size after an out-of-memory error and retry.")
    # --- logging ---
    logging_strategy: IntervalStrategy | str = _arg("steps", "When to log: 'no', 'steps' or 'epoch'.")
    logging_steps: float = _arg(500, "Log every this many steps (a fraction of all steps if < 1).")
    logging_first_step: bool = _arg(False, "Also log after the first step.")
    log_on_each_node: bool = _arg(True, "Log on the first process of every node, not only of node 0.")
    logging_nan_inf_filter: bool = _arg(True, "Leave NaN/inf losses out of the logged average.")
    include_num_input_tokens_seen: str | bool = _arg("no", "Count input tokens: 'all', 'non_padding' or 'no'.")
    log_level: str = _arg("passive", "Log level of the main process.", choices=tuple(_LOG_LEVELS))
    log_level_replica: str = _arg("warning", "Log level of the other processes.", choices=tuple(_LOG_LEVELS))
    disable_tqdm: bool | None = _arg(None, "Hide progress bars (default: when the log level is above warning).")
    report_to: None | str | list[str] = _arg("none", "Integrations to report to; 'all' or 'none' too.")
    run_name: str | None = _arg(None, "A name for the run, for the integrations.")
    project: str = _arg("huggingface", "Project name, for Trackio.")
    trackio_space_id: str | None = _arg(None, "Hugging Face Space for Trackio.")
    trackio_bucket_id: str | None = _arg(None, "Hugging Face bucket for Trackio.")
    trackio_static_space_id: str | None | Literal[False] = _arg(None, "Static Trackio Space; False for none.")
    # --- evaluation ---
    eval_strategy: IntervalStrategy | str = _arg("no", "When to evaluate: 'no', 'steps' or 'epoch'.")
    eval_steps: float | None = _arg(None, "Evaluate every this many steps (default: logging_steps).")
    eval_delay: float = _arg(0, "Epochs or steps to wait before the first evaluation.")
    per_device_eval_batch_size: int = _arg(8, "Evaluation batch size on each device.")
    prediction_loss_only: bool = _arg(False, "Evaluation returns only the loss.")
    eval_on_start: bool = _arg(False, "Evaluate once before training starts.")
    eval_do_concat_batches: bool = _arg(True, "Concatenate predictions across batches (else keep a list).")
    eval_use_gather_object: bool = _arg(False, "Gather arbitrary Python objects from all ranks in evaluation.")
    eval_accumulation_steps: int | None = _arg(None, "Move predictions to the CPU every this many eval steps.")
    include_for_metrics: list[str] = field(
        default_factory=list, metadata={"help": "Extra inputs for compute_metrics: 'inputs', 'loss'."}
    )
    batch_eval_metrics: bool = _arg(False, "Call compute_metrics on each batch, then once for the result.")
    # --- checkpoints ---
    save_only_model: bool = _arg(False, "Checkpoints hold the weights only (no optimizer, no resume).")
    save_strategy: SaveStrategy | str = _arg("steps", "When to save: 'no', 'steps', 'epoch' or 'best'.")
    save_steps: float = _arg(500, "Save every this many steps (a fraction of all steps if < 1).")
    save_on_each_node: bool = _arg(False, "Save on the first process of every node.")
    save_total_limit: int | None = _arg(None, "Keep at most this many checkpoints (the best one is kept).")
    enable_jit_checkpoint: bool = _arg(False, "Save a checkpoint when the process gets SIGTERM.")
    # --- Hub ---
    push_to_hub: bool = _arg(False, "Push the model to the Hub when it is saved.")
    hub_token: str | None = _arg(None, "Hub token (default: the logged-in one).")
    hub_private_repo: bool | None = _arg(None, "Create the Hub repository as private.")
    hub_model_id: str | None = _arg(None, "Hub repository to push to.")
    hub_strategy: HubStrategy | str = _arg("every_save", "What to push, and when (a HubStrategy value).")
    hub_always_push: bool = _arg(False, "Push even if the previous push has not finished.")
    hub_revision: str | None = _arg(None, "Branch, tag or commit to push to.")
    # --- best model ---
    load_best_model_at_end: bool = _arg(False, "Load the best checkpoint when training ends.")
    metric_for_best_model: str | None = _arg(None, "Metric that picks the best model (default: 'loss').")
    greater_is_better: bool | None = _arg(None, "Whether a larger metric is better (default: from its name).")
    # --- resuming and reproducibility ---
    ignore_data_skip: bool = _arg(False, "On resume, do not skip the batches already seen.")
    restore_callback_states_from_checkpoint: bool = _arg(False, "On resume, restore callback states too.")
    full_determinism: bool = _arg(False, "Use deterministic algorithms everywhere (slower).")
    seed: int = _arg(42, "Random seed.")
    data_seed: int | None = _arg(None, "Seed of the data order (default: seed).")
    # --- hardware and loaders ---
    use_cpu: bool = _arg(False, "Run on the CPU even if a GPU is available.")
    accelerator_config: dict | str | None = _arg(None, "Loader settings: a dict, a JSON string or a JSON file.")
    parallelism_config: Any | None = _arg(None, "Parallelism layout, read by the distributed layer.")
    dataloader_drop_last: bool = _arg(False, "Drop the last incomplete batch.")
    dataloader_num_workers: int = _arg(0, "Loader worker processes (0: load in the main process).")
    dataloader_pin_memory: bool = _arg(True, "Pin loader memory.")
    dataloader_persistent_workers: bool = _arg(False, "Keep loader workers alive between epochs.")
    dataloader_prefetch_factor: int | None = _arg(None, "Batches each worker loads ahead (needs workers).")
    dataloader_multiprocessing_context: str | None = _arg(
        None, "Start method of the loader workers.", choices=["fork", "spawn", "forkserver"]
    )
    dataloader_in_order: bool = _arg(True, "Yield batches in the order the workers were given them.")
    remove_unused_columns: bool = _arg(True, "Drop dataset columns the model's forward does not take.")
    label_names: list[str] | None = _arg(None, "Batch keys that hold labels.")
    train_sampling_strategy: str = _arg("random", "Training sampler.", choices=list(_SAMPLING_STRATEGIES))
    length_column_name: str = _arg("length", "Dataset column with precomputed lengths.")
    # --- distributed ---
    ddp_find_unused_parameters: bool | None = _arg(None, "DDP find_unused_parameters.")
    ddp_bucket_cap_mb: int | None = _arg(None, "DDP bucket_cap_mb.")
    ddp_broadcast_buffers: bool | None = _arg(None, "DDP broadcast_buffers.")
    ddp_static_graph: bool | None = _arg(None, "DDP static_graph.")
    ddp_backend: str | None = _arg(
        None, "torch.distributed backend.", choices=["nccl", "gloo", "mpi", "xccl", "hccl", "cncl", "mccl"]
    )
    ddp_timeout: int = _arg(1800, "Timeout of distributed operations, in seconds.")
    fsdp: str | None = _arg(None, "Shard the model with FSDP (settings in fsdp_config).", nargs="?", const=True)
    fsdp_config: dict[str, Any] | str | None = _arg(None, "FSDP settings: a dict, a JSON string or a JSON file.")
    deepspeed: dict | str | None = _arg(None, "DeepSpeed settings: a dict, a JSON string or a JSON file.")
    debug: str | list[DebugOption] = _arg("", "Debug features: 'underflow_overflow', 'tpu_metrics_debug'.")
    skip_memory_metrics: bool = _arg(True, "Do not report memory use.")
    # --- for scripts ---
    do_train: bool = _arg(False, "Whether the script trains (read by scripts, not the Trainer).")
    do_eval: bool = _arg(False, "Whether the script evaluates (set when eval_strategy is not 'no').")
    do_predict: bool = _arg(False, "Whether the script predicts on a test set.")
    resume_from_checkpoint: str | None = _arg(None, "Checkpoint folder a script resumes from.")
    local_rank: int = _arg(-1, "Set by old launchers; read local_process_index instead.")
    # --- transformers 4.x names (folded into the fields above by __post_init__) ---
    evaluation_strategy: IntervalStrategy | str | None = _arg(None, "4.x name of eval_strategy.")
    warmup_ratio: float | None = _arg(None, "4.x: warmup as a fraction of all steps (use warmup_steps < 1).")
    group_by_length: bool | None = _arg(
        None, "4.x: use train_sampling_strategy='group_by_length'.", nargs="?", const=True
    )
    logging_dir: str | None = _arg(None, "TensorBoard log directory (4.x name, still honoured).")
    overwrite_output_dir: bool | None = _arg(None, "4.x flag some scripts read.", nargs="?", const=True)
    save_safetensors: bool | None = _arg(None, "4.x flag; ftrain always saves safetensors.", nargs="?", const=True)
    no_cuda: bool | None = _arg(None, "4.x name of use_cpu.", nargs="?", const=True)
    # --- ftrain's own ---
    eval_loss_reduction: str = _arg(
        "batch",
        "How eval_loss/test_loss average the batches: 'batch' (transformers' number: each batch's mean loss "
        "weighted by its number of examples) or 'token' (the exact mean over every item the loss counts: the "
        "tokens of a causal LM, the examples of a classifier; a loss the model returns counts once per batch).",
        choices=list(_EVAL_LOSS_REDUCTIONS),
    )

    # ------------------------------------------------------------------------------------------------------
    # Normalisation and validation.

    def __setattr__(self, name: str, value: Any) -> None:
        """Sets a field and counts the change in ``revision`` (a Trainer rebuilds its plan when it moves)."""
        object.__setattr__(self, name, value)
        object.__setattr__(self, "_revision", self.__dict__.get("_revision", 0) + 1)

    @property
    def revision(self) -> int:
        """How many times a field has been set (construction included): a cheap "have the arguments changed?"."""
        return self.__dict__.get("_revision", 0)

    def __post_init__(self) -> None:
        self._fold_legacy_fields()
        self._normalise_values()
        self._derive_defaults()
        self._validate()
        self.mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if self.fp16:
            self.mixed_precision = "fp16"
        elif self.bf16:
            self.mixed_precision = "bf16"

    def _fold_legacy_fields(self) -> None:
        """Maps the transformers 4.x names onto their 5.x fields, with a FutureWarning each."""
        if self.evaluation_strategy is not None:
            _warn_legacy("evaluation_strategy", "use `eval_strategy`")
            legacy = IntervalStrategy(self.evaluation_strategy)
            if IntervalStrategy(self.eval_strategy) not in (IntervalStrategy.NO, legacy):
                raise ValueError(
                    f"TrainingArguments: evaluation_strategy={legacy.value!r} and eval_strategy="
                    f"{IntervalStrategy(self.eval_strategy).value!r} disagree; set only eval_strategy."
                )
            self.eval_strategy, self.evaluation_strategy = legacy, None
        if self.warmup_ratio is not None:
            _warn_legacy("warmup_ratio", "use `warmup_steps` with a value below 1 (a fraction of all steps)")
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(
                    f"TrainingArguments: warmup_ratio must be in [0, 1), got {self.warmup_ratio}. For a warmup over "
                    "all steps set warmup_steps to the number of steps."
                )
            if self.warmup_steps == 0:
                self.warmup_steps = self.warmup_ratio
            elif self.warmup_ratio > 0:
                warnings.warn(
                    "TrainingArguments: warmup_steps is set, so warmup_ratio is ignored (as in 4.x).",
                    UserWarning,
                    stacklevel=_user_stacklevel(),
                )
            self.warmup_ratio = None
        if self.group_by_length is not None:
            _warn_legacy("group_by_length", "use `train_sampling_strategy='group_by_length'`")
            if self.group_by_length:
                if self.train_sampling_strategy not in ("random", "group_by_length"):
                    raise ValueError(
                        "TrainingArguments: group_by_length=True and train_sampling_strategy="
                        f"{self.train_sampling_strategy!r} disagree; set only train_sampling_strategy."
                    )
                self.train_sampling_strategy = "group_by_length"
            self.group_by_length = None
        self._fold_legacy_flags()

    def _fold_legacy_flags(self) -> None:
        if self.no_cuda is not None:
            _warn_legacy("no_cuda", "use `use_cpu`")
            self.use_cpu = self.use_cpu or bool(self.no_cuda)
            self.no_cuda = None
        if self.save_safetensors is not None:
            if not self.save_safetensors:
                raise ValueError(
                    "TrainingArguments: save_safetensors=False asks for pickled checkpoints; ftrain writes "
                    "safetensors only (pickles are never loaded). Remove the argument."
                )
            _warn_legacy("save_safetensors", "it is always on; remove it")
            self.save_safetensors = None
        if self.overwrite_output_dir:
            _warn_legacy("overwrite_output_dir", "the Trainer ignores it (it is kept for scripts that read it)")
        if self.logging_dir is not None:
            _warn_legacy(
                "logging_dir",
                "ftrain still writes TensorBoard logs there (transformers 5 reads TENSORBOARD_LOGGING_DIR)",
            )
            self.logging_dir = os.path.expanduser(os.fspath(self.logging_dir))

    def _normalise_values(self) -> None:
        """Fills ``output_dir``, parses JSON-string dicts, resolves old aliases, turns strings into enums."""
        if self.output_dir is None:
            self.output_dir = "trainer_output"
        self.output_dir = os.path.expanduser(os.fspath(self.output_dir))
        for name in self._VALID_DICT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str) and value.lstrip().startswith("{"):
                try:
                    setattr(self, name, _parse_scalar_strings(json.loads(value)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"TrainingArguments: {name} is not valid JSON ({err}): {value!r}") from err
        for old, new in (
            ("gradient_checkpointing", "activation_checkpointing"),
            ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
        ):
            if getattr(self, new) is None and getattr(self, old) is not None:
                warnings.warn(
                    f"TrainingArguments: `{old}` is deprecated; use `{new}`.", FutureWarning, _user_stacklevel()
                )
                setattr(self, new, getattr(self, old))
            setattr(self, old, getattr(self, new))
        if self.activation_checkpointing is None:
            self.activation_checkpointing = self.gradient_checkpointing = False
        if self.disable_tqdm is None:
            self.disable_tqdm = logging.getLogger("ftrain").getEffectiveLevel() > logging.WARNING
        if isinstance(self.include_num_input_tokens_seen, bool):
            self.include_num_input_tokens_seen = "all" if self.include_num_input_tokens_seen else "no"
        self.eval_strategy = IntervalStrategy(self.eval_strategy)
        self.logging_strategy = IntervalStrategy(self.logging_strategy)
        self.save_strategy = SaveStrategy(self.save_strategy)
        self.hub_strategy = HubStrategy(self.hub_strategy)
        self.lr_scheduler_type = SchedulerType(self.lr_scheduler_type)
        self.optim = OptimizerNames(self.optim)
        if isinstance(self.debug, str):
            self.debug = [DebugOption(s) for s in self.debug.split()]
        else:
            self.debug = [DebugOption(s) for s in (self.debug or [])]
        self.accelerator_config = AcceleratorConfig.from_value(self.accelerator_config)

    def _derive_defaults(self) -> None:
        """The values transformers derives from others: do_eval, eval_steps, best-metric defaults, report_to,
        torch_compile, pin_memory."""
        if not self.do_eval and self.eval_strategy != IntervalStrategy.NO:
            self.do_eval = True
        if self.eval_strategy == IntervalStrategy.STEPS and not self.eval_steps:
            if not self.logging_steps or self.logging_steps <= 0:
                raise ValueError(
                    "TrainingArguments: eval_strategy='steps' needs eval_steps > 0 (or logging_steps > 0, which "
                    "eval_steps defaults to)."
                )
            self.eval_steps = self.logging_steps
        metric_scheduler = self.lr_scheduler_type in METRIC_SCHEDULE_NAMES
        if (self.load_best_model_at_end or metric_scheduler) and self.metric_for_best_model is None:
            self.metric_for_best_model = "loss"
        if self.greater_is_better is None and self.metric_for_best_model is not None:
            self.greater_is_better = not self.metric_for_best_model.endswith("loss")
        if self.report_to in ("all", ["all"]):
            self.report_to = _installed_integrations()
        elif self.report_to in (None, "none", ["none"]):
            self.report_to = []
        elif isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        else:
            self.report_to = list(self.report_to)
        if (self.torch_compile_mode is not None or self.torch_compile_backend is not None) and not self.torch_compile:
            self.torch_compile = True
        if self.torch_compile and self.torch_compile_backend is None:
            self.torch_compile_backend = "inductor"
        if self.use_cpu:
            self.dataloader_pin_memory = False

    def _validate(self) -> None:
        """The one validation pass, run by the constructor and by every fluent setter: transformers' rejections
        (with ftrain's wording), then the settings ftrain cannot honour. It also makes whole ``*_steps`` above 1
        ints, as transformers does.

        Raises:
            ValueError: the first invalid value or combination found; the message names the field(s) and the fix.
        """
        if self.torch_empty_cache_steps is not None and not (
            isinstance(self.torch_empty_cache_steps, int) and self.torch_empty_cache_steps > 0
        ):
            raise ValueError(
                f"TrainingArguments: torch_empty_cache_steps must be a positive int or None, got "
                f"{self.torch_empty_cache_steps!r}."
            )
        if self.logging_strategy == IntervalStrategy.STEPS and self.logging_steps == 0:
            raise ValueError("TrainingArguments: logging_strategy='steps' needs logging_steps > 0.")
        self.logging_steps = self._whole_steps("logging_steps", self.logging_strategy == IntervalStrategy.STEPS)
        self.eval_steps = self._whole_steps("eval_steps", self.eval_strategy == IntervalStrategy.STEPS)
        self.save_steps = self._whole_steps("save_steps", self.save_strategy == SaveStrategy.STEPS)
        if self.load_best_model_at_end and self.save_strategy != SaveStrategy.BEST:
            self._check_best_model_strategies()
        if self.torch_compile and self.activation_checkpointing:
            raise ValueError(
                "TrainingArguments: torch_compile=True cannot be combined with activation_checkpointing=True. ftrain "
                "compiles the whole step (forward, torch.autograd.grad, optimizer) as one graph, and torch.compile "
                "cannot rematerialise checkpointed layers in such a graph when they draw random numbers (dropout) or "
                "when there is more than one backward (gradient_accumulation_steps > 1). Turn one of them off."
            )
        if self.fp16 and self.bf16:
            raise ValueError("TrainingArguments: fp16 and bf16 are both True; choose one.")
        if self.fp16_full_eval and self.bf16_full_eval:
            raise ValueError("TrainingArguments: fp16_full_eval and bf16_full_eval are both True; choose one.")
        if self.lr_scheduler_type in METRIC_SCHEDULE_NAMES and self.eval_strategy == IntervalStrategy.NO:
            raise ValueError(
                f"TrainingArguments: lr_scheduler_type={self.lr_scheduler_type.value!r} lowers the learning "
                "rate from evaluation results, so it needs eval_strategy='steps' or 'epoch'."
            )
        if self.warmup_steps < 0:
            raise ValueError(f"TrainingArguments: warmup_steps must be >= 0, got {self.warmup_steps}.")
        if self.dataloader_num_workers == 0 and self.dataloader_prefetch_factor is not None:
            raise ValueError(
                "TrainingArguments: dataloader_prefetch_factor only applies to worker processes; set "
                "dataloader_num_workers > 0 or leave dataloader_prefetch_factor unset."
            )
        self._check_loader_settings()
        self._check_configured_state()
        self._check_types()
        self._check_hardware()
        self._check_unsupported()

    def _check_loader_settings(self) -> None:
        """Refuses the loader settings ftrain's batch layout cannot give (every microbatch has the same size on
        every process; a short last one is padded with masked rows)."""
        if self.dataloader_persistent_workers and self.dataloader_num_workers == 0:
            raise ValueError(
                "TrainingArguments: dataloader_persistent_workers keeps worker processes alive between epochs; set "
                "dataloader_num_workers > 0 or leave dataloader_persistent_workers unset (torch's DataLoader refuses "
                "it without workers too)."
            )
        if self.train_sampling_strategy == "batch_rebalance":
            raise ValueError(
                "TrainingArguments: train_sampling_strategy='batch_rebalance' is not supported by ftrain: it makes "
                "microbatches of different sizes (fewer long sequences, more short ones), while ftrain's BatchStream "
                "gives every microbatch per_device_train_batch_size rows. Use 'group_by_length' to batch sequences "
                "of similar length (less padding), or 'random'."
            )
        if not self.accelerator_config.even_batches and self.world_size > 1:
            raise ValueError(
                "TrainingArguments: accelerator_config['even_batches']=False is not supported with several "
                "processes: every process takes part in every step, so ftrain gives each one a batch at the end of "
                "an epoch too, padding a short last batch with masked rows (labels -100) that add nothing to the "
                "loss or the metrics. Remove the key (the default, even_batches=True, is what ftrain does)."
            )

    def _whole_steps(self, name: str, used: bool) -> float | int | None:
        """``*_steps`` above 1 must be whole numbers (they become ints); below 1 they are ratios."""
        value = getattr(self, name)
        if used and value is not None and value > 1:
            if value != int(value):
                raise ValueError(
                    f"TrainingArguments: {name}={value} must be a whole number when above 1 (below 1 it is a "
                    "fraction of all steps)."
                )
            return int(value)
        return value

    def _check_best_model_strategies(self) -> None:
        """load_best_model_at_end: evaluation and saving must line up, so the best step has a checkpoint."""
        if self.eval_strategy.value != self.save_strategy.value:
            raise ValueError(
                "TrainingArguments: load_best_model_at_end needs eval_strategy and save_strategy to match (or "
                f"save_strategy='best'), got eval_strategy={self.eval_strategy.value!r} and save_strategy="
                f"{self.save_strategy.value!r}."
            )
        if self.eval_strategy != IntervalStrategy.STEPS:
            return
        save, ev = self.save_steps, self.eval_steps
        if save % ev == 0:
            return
        if save >= 1 and ev >= 1:
            raise ValueError(
                f"TrainingArguments: load_best_model_at_end needs save_steps ({save}) to be a multiple of "
                f"eval_steps ({ev}), so every saved step has been evaluated."
            )
        if (save < 1) != (ev < 1):
            raise ValueError(
                "TrainingArguments: load_best_model_at_end needs save_steps to be a multiple of eval_steps, which "
                f"cannot be checked when one is a ratio and the other a step count (save_steps={save}, "
                f"eval_steps={ev}); give both as ratios or both as counts."
            )
        if round(save * 1_000_000) % round(ev * 1_000_000) != 0:
            raise ValueError(
                f"TrainingArguments: load_best_model_at_end needs the save ratio ({save}) to be a multiple of the "
                f"eval ratio ({ev}), so every saved step has been evaluated."
            )

    def _check_types(self) -> None:
        """Checks transformers leaves to later (or never): counts, and the values given as free strings or dicts."""
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainingArguments: {name} must be an int >= 1, got {value!r}.")
        if self.eval_accumulation_steps is not None and self.eval_accumulation_steps < 1:
            raise ValueError(
                f"TrainingArguments: eval_accumulation_steps must be >= 1 or None, got {self.eval_accumulation_steps}."
            )
        if self.include_num_input_tokens_seen not in _TOKEN_COUNTING:
            raise ValueError(
                "TrainingArguments: include_num_input_tokens_seen must be True, False or one of "
                f"{list(_TOKEN_COUNTING)}, got {self.include_num_input_tokens_seen!r}."
            )
        for name, value, valid in (
            ("train_sampling_strategy", self.train_sampling_strategy, _SAMPLING_STRATEGIES),
            ("log_level", self.log_level, tuple(_LOG_LEVELS)),
            ("log_level_replica", self.log_level_replica, tuple(_LOG_LEVELS)),
            ("eval_loss_reduction", self.eval_loss_reduction, _EVAL_LOSS_REDUCTIONS),
        ):
            if value not in valid:
                raise ValueError(f"TrainingArguments: {name}={value!r} is not one of {list(valid)}.")
        if not isinstance(self.lr_scheduler_kwargs, (dict, type(None))):
            raise ValueError(
                "TrainingArguments: lr_scheduler_kwargs must be a dict or a JSON object string such as "
                f"'{{\"num_cycles\": 2}}', got {self.lr_scheduler_kwargs!r}."
            )

    def _check_unsupported(self) -> None:
        """transformers' checks that its Trainer makes later, and the features ftrain does not provide."""
        if self.save_strategy == SaveStrategy.BEST and self.metric_for_best_model is None:
            raise ValueError(
                "TrainingArguments: `args.metric_for_best_model` must be provided with save_strategy='best': it "
                "saves after an evaluation that improves that metric, and none is set. Set metric_for_best_model "
                "(e.g. 'loss'), as transformers' Trainer requires."
            )
        if self.use_liger_kernel:
            missing = "" if importlib.util.find_spec("liger_kernel") else " (and liger-kernel is not installed)"
            raise ValueError(
                f"TrainingArguments: use_liger_kernel=True{missing}: Liger's Triton kernels patch transformers' "
                "modules and losses in place, which ftrain's pure step does not apply (it computes the loss from the "
                "logits with ftrain.losses). Remove the argument; for speed use torch_compile=True."
            )
        if self.debug:
            raise ValueError(
                f"TrainingArguments: debug={[d.value for d in self.debug]} is not provided by ftrain: "
                "'underflow_overflow' hooks every module's forward (ftrain's step runs a meta skeleton through "
                "functional_call, and a compiled step cannot call such hooks) and 'tpu_metrics_debug' needs a TPU. "
                "Remove it; to find non-finite values use torch.autograd.detect_anomaly() around trainer.train()."
            )
        self._check_ddp_backend()

    def _check_configured_state(self) -> None:
        """``accelerator_config["use_configured_state"]``: transformers then takes this process's device and ranks
        from the accelerate state the script set up before (and refuses without one). ftrain sets up its devices
        and process group itself, from the same launcher environment and ``use_cpu``, so it accepts such a state
        where it agrees with that reading and refuses one that does not (training would run elsewhere than the
        state says)."""
        if not self.accelerator_config.use_configured_state:
            return
        from ftrain.trainer.accelerator import configured_accelerate_state

        state = configured_accelerate_state()
        if state is None:
            raise ValueError(
                "TrainingArguments: accelerator_config['use_configured_state']=True requires a pre-configured "
                "`AcceleratorState` or `PartialState` to be defined before calling `TrainingArguments`: create "
                "accelerate's Accelerator() or PartialState() first, or remove the key."
            )
        theirs = (_device_key(state.device), state.num_processes, state.process_index)
        ours = (_device_key(self.device), self.world_size, self.process_index)
        if theirs != ours:
            raise ValueError(
                f"TrainingArguments: accelerator_config['use_configured_state']=True, but the configured accelerate "
                f"state runs process {state.process_index} of {state.num_processes} on {state.device}, while ftrain "
                f"(which sets up devices and processes itself, from the launcher's environment and use_cpu) would "
                f"run process {self.process_index} of {self.world_size} on {self.device}. Make them agree (e.g. "
                "use_cpu=True for a state created with cpu=True) or remove the key."
            )

    def _check_ddp_backend(self) -> None:
        """``ddp_backend``: the torch.distributed backends of the devices ftrain trains on."""
        if self.ddp_backend is None:
            return
        cuda = self._cuda_usable()
        usable = ("nccl", "gloo", "mpi") if cuda else ("gloo", "mpi")
        if self.ddp_backend not in usable:
            raise ValueError(
                f"TrainingArguments: ddp_backend={self.ddp_backend!r} cannot run on this process's device "
                f"({'cuda' if cuda else 'cpu'}); use one of {list(usable)} or leave it unset (gloo on the CPU, nccl "
                "on CUDA)."
            )

    def _check_hardware(self) -> None:
        """Precision settings this machine, or ftrain's pure step, cannot honour."""
        cuda = self._cuda_usable()
        if self.fp16 and not cuda:
            # transformers 5.24 + accelerate 1.15 accept fp16 on the CPU and silently train in float32 (no autocast,
            # no GradScaler): refusing says so instead of pretending. (fp16_full_eval is a cast of the evaluated
            # model, which transformers does on the CPU too: it is honoured.)
            raise ValueError(
                "TrainingArguments: fp16=True needs a CUDA GPU (float16 training relies on its kernels and "
                "loss scaling); on the CPU transformers ignores it and trains in float32, which is what leaving it "
                "off gives. For mixed precision on the CPU use bf16=True."
            )
        if self.fp16 and cuda:
            raise ValueError(
                "TrainingArguments: fp16=True (float16 autocast with dynamic loss scaling) is not implemented by "
                "ftrain's pure step yet: the loss scale would have to live in the TrainState. Use bf16=True (no "
                "loss scaling needed), or leave both off."
            )
        if (self.bf16 or self.bf16_full_eval) and cuda and not torch.cuda.is_bf16_supported():
            which = "bf16" if self.bf16 else "bf16_full_eval"
            raise ValueError(
                f"TrainingArguments: {which}=True but this GPU has no bfloat16 support (that needs an Ampere or newer "
                f"GPU). Leave {which} off to run in float32: fp16=True, transformers' advice here, is not implemented "
                "by ftrain yet (fp16_full_eval is, for evaluation)."
            )
        if self.tf32 and not (cuda and torch.cuda.get_device_capability()[0] >= 8):
            raise ValueError(
                "TrainingArguments: tf32=True needs an Ampere or newer CUDA GPU (and use_cpu=False); remove it."
            )

    # ------------------------------------------------------------------------------------------------------
    # Processes and devices. ftrain sets up torch.distributed in its distributed layer; these properties only
    # read it (or the launcher's environment before it is initialised).

    def _cuda_usable(self) -> bool:
        return not (self.use_cpu or _env_flag("ACCELERATE_USE_CPU")) and torch.cuda.is_available()

    @property
    def world_size(self) -> int:
        """Number of processes training together (torch.distributed, else the launcher's ``WORLD_SIZE``)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size()
        return int(os.environ.get("WORLD_SIZE", "1"))

    @property
    def process_index(self) -> int:
        """Global rank of this process."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank()
        return int(os.environ.get("RANK", "0"))

    @property
    def local_process_index(self) -> int:
        """Rank of this process on its node (``LOCAL_RANK``, else ``local_rank`` if set, else 0)."""
        if "LOCAL_RANK" in os.environ:
            return int(os.environ["LOCAL_RANK"])
        return self.local_rank if self.local_rank >= 0 else 0

    @property
    def device(self) -> torch.device:
        """The device of this process, as transformers picks it: the CPU with ``use_cpu`` (or
        ``ACCELERATE_USE_CPU``), else ``mps`` on one process of an Apple-silicon machine, else ``cuda:<local rank>``
        (``cuda:0`` on one process) when a GPU is usable, else the CPU."""
        if not (self.use_cpu or _env_flag("ACCELERATE_USE_CPU")) and self.world_size == 1:
            if torch.backends.mps.is_available():
                return torch.device("mps")
        if self._cuda_usable():
            return torch.device("cuda", self.local_process_index if self.world_size > 1 else 0)
        return torch.device("cpu")

    @property
    def n_gpu(self) -> int:
        """GPUs this process drives: 1 on a GPU, 0 on the CPU (ftrain never uses ``nn.DataParallel``)."""
        return 1 if self._cuda_usable() else 0

    @property
    def parallel_mode(self) -> ParallelMode:
        """``DISTRIBUTED`` with more than one process, else ``NOT_PARALLEL``."""
        return ParallelMode.DISTRIBUTED if self.world_size > 1 else ParallelMode.NOT_PARALLEL

    @property
    def train_batch_size(self) -> int:
        """Training batch size of this process: ``per_device_train_batch_size * max(1, n_gpu)``."""
        return self.per_device_train_batch_size * max(1, self.n_gpu)

    @property
    def eval_batch_size(self) -> int:
        """Evaluation batch size of this process."""
        return self.per_device_eval_batch_size * max(1, self.n_gpu)

    @property
    def ddp_timeout_delta(self) -> timedelta:
        """``ddp_timeout`` as a ``timedelta``."""
        return timedelta(seconds=self.ddp_timeout)

    @property
    def should_log(self) -> bool:
        """Whether this process logs: local rank 0 with ``log_on_each_node``, else global rank 0."""
        return (self.local_process_index if self.log_on_each_node else self.process_index) == 0

    @property
    def should_save(self) -> bool:
        """Whether this process writes checkpoints: local rank 0 with ``save_on_each_node``, else rank 0."""
        return (self.local_process_index if self.save_on_each_node else self.process_index) == 0

    @property
    def place_model_on_device(self) -> bool | None:
        """Override point kept from transformers; ``None`` lets the Trainer decide."""
        return None

    def get_process_log_level(self) -> int:
        """The ``logging`` level for this process: ``log_level`` on the logging process, ``log_level_replica``
        elsewhere; ``"passive"`` means the current level of the ``ftrain`` logger."""
        level = _LOG_LEVELS[self.log_level if self.should_log else self.log_level_replica]
        return logging.getLogger("ftrain").getEffectiveLevel() if level == -1 else level

    @contextlib.contextmanager
    def main_process_first(self, local: bool = True, desc: str = "work") -> Iterator[None]:
        """Runs the block on the main process (of the node with ``local=True``) before the others.

        The other processes wait at a barrier until the main one has finished the block (for example a
        ``datasets.map`` whose cache they then reuse). Without an initialised process group it just runs.

        Args:
            local: main process of each node (True) or of the whole job (False).
            desc: what is being done, for the debug log.
        """
        if self.world_size <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            yield
            return
        is_main = (self.local_process_index if local else self.process_index) == 0
        try:
            if not is_main:
                logger.debug("process %d waits for the main process to do %s", self.process_index, desc)
                torch.distributed.barrier()
            yield
        finally:
            if is_main:
                logger.debug("main process %d finished %s", self.process_index, desc)
                torch.distributed.barrier()

    def get_warmup_steps(self, num_training_steps: int) -> int:
        """Warmup length for a run of ``num_training_steps``: ``int(warmup_steps)`` if it is >= 1, else
        ``ceil(num_training_steps * warmup_steps)`` (:func:`ftrain.trainer.plan.resolve_warmup`)."""
        from ftrain.trainer.plan import resolve_warmup  # plan.py imports this module

        return resolve_warmup(self.warmup_steps, num_training_steps)

    # ------------------------------------------------------------------------------------------------------
    # Serialisation.

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values: enums as their values, ``*_token`` fields redacted, unset 4.x fields and
        ftrain's own fields at their default left out.

        Returns:
            A dict that ``json.dumps`` accepts and ``TrainingArguments(**d)`` rebuilds from (tokens aside).
        """
        out: dict[str, Any] = {}
        for f in fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            if f.name in _LEGACY_FIELDS and value is None:
                continue
            if f.name in _FTRAIN_FIELDS and value == _FTRAIN_FIELDS[f.name]:
                continue
            if isinstance(value, Enum):
                value = value.value
            elif isinstance(value, list) and value and isinstance(value[0], Enum):
                value = [v.value for v in value]
            elif isinstance(value, AcceleratorConfig):
                value = value.to_dict()
            elif f.name == "parallelism_config" and value is not None and hasattr(value, "to_json"):
                value = value.to_json()
            if f.name.endswith("_token"):
                value = f"<{f.name.upper()}>"
            out[f.name] = value
        _dtypes_to_str(out)
        return out

    def to_json_string(self) -> str:
        """``to_dict()`` as indented JSON."""
        return json.dumps(self.to_dict(), indent=2)

    def to_sanitized_dict(self) -> dict[str, Any]:
        """``to_dict()`` plus the batch sizes, with every value that is not a bool, int, float, str or tensor
        turned into its ``str`` (the form TensorBoard's hparams take)."""
        d = {**self.to_dict(), "train_batch_size": self.train_batch_size, "eval_batch_size": self.eval_batch_size}
        valid = (bool, int, float, str, torch.Tensor)
        return {k: v if type(v) in valid else str(v) for k, v in d.items()}

    def __str__(self) -> str:
        items = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        body = "".join(f"{k}={f'<{k.upper()}>' if k.endswith('_token') else v},\n" for k, v in sorted(items.items()))
        return f"{type(self).__name__}(\n{body})"

    __repr__ = __str__

    # ------------------------------------------------------------------------------------------------------
    # Fluent setters (transformers' signatures; each returns ``self``). Each one validates like the constructor
    # (:meth:`_set`): a value the constructor refuses raises the constructor's error and changes nothing.

    def _set(self, **changes: Any) -> TrainingArguments:
        """Stores a setter's ``changes`` once the result passes the constructor's checks; on an error nothing changes.

        A copy with the changes is normalised, given its derived defaults and validated as ``__post_init__`` does;
        the values themselves are then stored as given, as transformers' setters store them.

        Raises:
            ValueError: the constructor's error for the changed arguments.
        """
        candidate = copy.copy(self)
        for name, value in changes.items():
            setattr(candidate, name, value)
        candidate._normalise_values()
        candidate._derive_defaults()
        candidate._validate()
        for name, value in changes.items():
            setattr(self, name, value)
        return self

    def set_training(
        self,
        learning_rate: float = 5e-5,
        batch_size: int = 8,
        weight_decay: float = 0,
        num_epochs: float = 3,
        max_steps: int = -1,
        gradient_accumulation_steps: int = 1,
        seed: int = 42,
        activation_checkpointing: bool = False,
        gradient_checkpointing: bool | None = None,
    ) -> TrainingArguments:
        """Sets the main training settings and ``do_train=True``.

        Raises:
            ValueError: a value the constructor refuses (e.g. ``batch_size=0``); the arguments are then unchanged.

        Example:
            >>> TrainingArguments("out").set_training(learning_rate=1e-4, batch_size=32).per_device_train_batch_size
            32
        """
        if gradient_checkpointing is not None:
            warnings.warn("`gradient_checkpointing` is deprecated; use `activation_checkpointing`.", FutureWarning, 2)
            activation_checkpointing = gradient_checkpointing
        return self._set(
            do_train=True,
            learning_rate=learning_rate,
            per_device_train_batch_size=batch_size,
            weight_decay=weight_decay,
            num_train_epochs=num_epochs,
            max_steps=max_steps,
            gradient_accumulation_steps=gradient_accumulation_steps,
            seed=seed,
            activation_checkpointing=activation_checkpointing,
            gradient_checkpointing=activation_checkpointing,
        )

    def set_evaluate(
        self,
        strategy: str | IntervalStrategy = "no",
        steps: int = 500,
        batch_size: int = 8,
        accumulation_steps: int | None = None,
        delay: float | None = None,
        loss_only: bool = False,
    ) -> TrainingArguments:
        """Sets the evaluation settings; ``do_eval`` follows the strategy.

        Raises:
            ValueError: ``strategy="steps"`` with ``steps=0``, or a value the constructor refuses; the arguments are
                then unchanged.
        """
        eval_strategy = IntervalStrategy(strategy)
        if eval_strategy == IntervalStrategy.STEPS and steps == 0:
            raise ValueError("set_evaluate: strategy='steps' needs steps > 0.")
        return self._set(
            eval_strategy=eval_strategy,
            do_eval=eval_strategy != IntervalStrategy.NO,
            eval_steps=steps,
            per_device_eval_batch_size=batch_size,
            eval_accumulation_steps=accumulation_steps,
            eval_delay=delay,
            prediction_loss_only=loss_only,
        )

    def set_testing(self, batch_size: int = 8, loss_only: bool = False) -> TrainingArguments:
        """Sets the prediction settings and ``do_predict=True``.

        Raises:
            ValueError: a value the constructor refuses; the arguments are then unchanged.
        """
        return self._set(do_predict=True, per_device_eval_batch_size=batch_size, prediction_loss_only=loss_only)

    def set_save(
        self,
        strategy: str | IntervalStrategy = "steps",
        steps: int = 500,
        total_limit: int | None = None,
        on_each_node: bool = False,
    ) -> TrainingArguments:
        """Sets the checkpoint settings.

        Raises:
            ValueError: ``strategy="steps"`` with ``steps=0``, or a value the constructor refuses; the arguments are
                then unchanged.
        """
        save_strategy = SaveStrategy(strategy)
        if save_strategy == SaveStrategy.STEPS and steps == 0:
            raise ValueError("set_save: strategy='steps' needs steps > 0.")
        return self._set(
            save_strategy=save_strategy, save_steps=steps, save_total_limit=total_limit, save_on_each_node=on_each_node
        )

    def set_logging(
        self,
        strategy: str | IntervalStrategy = "steps",
        steps: int = 500,
        report_to: str | list[str] = "none",
        level: str = "passive",
        first_step: bool = False,
        nan_inf_filter: bool = False,
        on_each_node: bool = False,
        replica_level: str = "passive",
    ) -> TrainingArguments:
        """Sets the logging settings (``report_to`` is stored as given, as transformers does).

        Raises:
            ValueError: ``strategy="steps"`` with ``steps=0``, or a value the constructor refuses; the arguments are
                then unchanged.
        """
        logging_strategy = IntervalStrategy(strategy)
        if logging_strategy == IntervalStrategy.STEPS and steps == 0:
            raise ValueError("set_logging: strategy='steps' needs steps > 0.")
        return self._set(
            logging_strategy=logging_strategy,
            logging_steps=steps,
            report_to=report_to,
            log_level=level,
            logging_first_step=first_step,
            logging_nan_inf_filter=nan_inf_filter,
            log_on_each_node=on_each_node,
            log_level_replica=replica_level,
        )

    def set_push_to_hub(
        self,
        model_id: str,
        strategy: str | HubStrategy = "every_save",
        token: str | None = None,
        private_repo: bool | None = None,
        always_push: bool = False,
        revision: str | None = None,
    ) -> TrainingArguments:
        """Sets the Hub settings and ``push_to_hub=True``.

        Raises:
            ValueError: an unknown strategy, or a value the constructor refuses; the arguments are then unchanged.
        """
        return self._set(
            push_to_hub=True,
            hub_model_id=model_id,
            hub_strategy=HubStrategy(strategy),
            hub_token=token,
            hub_private_repo=private_repo,
            hub_always_push=always_push,
            hub_revision=revision,
        )

    def set_optimizer(
        self,
        name: str | OptimizerNames = "adamw_torch",
        learning_rate: float = 5e-5,
        weight_decay: float = 0,
        beta1: float = 0.9,
        beta2: float = 0.999,
        epsilon: float = 1e-8,
        args: str | None = None,
    ) -> TrainingArguments:
        """Sets the optimizer and its hyper-parameters.

        Raises:
            ValueError: an unknown optimizer name, or a value the constructor refuses; the arguments are then
                unchanged.

        Example:
            >>> TrainingArguments("out").set_optimizer(name="sgd", args="momentum=0.9").optim_args
            'momentum=0.9'
        """
        return self._set(
            optim=OptimizerNames(name),
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            adam_beta1=beta1,
            adam_beta2=beta2,
            adam_epsilon=epsilon,
            optim_args=args,
        )

    def set_lr_scheduler(
        self,
        name: str | SchedulerType = "linear",
        num_epochs: float = 3.0,
        max_steps: int = -1,
        warmup_steps: float = 0,
    ) -> TrainingArguments:
        """Sets the schedule, the training length and the warmup.

        Raises:
            ValueError: an unknown schedule, or a value the constructor refuses (e.g. ``reduce_lr_on_plateau``
                without an evaluation strategy); the arguments are then unchanged.
        """
        return self._set(
            lr_scheduler_type=SchedulerType(name),
            num_train_epochs=num_epochs,
            max_steps=max_steps,
            warmup_steps=warmup_steps,
        )

    def set_dataloader(
        self,
        train_batch_size: int = 8,
        eval_batch_size: int = 8,
        drop_last: bool = False,
        num_workers: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
        multiprocessing_context: str | None = None,
        in_order: bool = True,
        auto_find_batch_size: bool = False,
        ignore_data_skip: bool = False,
        sampler_seed: int | None = None,
    ) -> TrainingArguments:
        """Sets the data-loader settings (``sampler_seed`` is ``data_seed``).

        Raises:
            ValueError: a value the constructor refuses (e.g. ``prefetch_factor`` without workers); the arguments
                are then unchanged.
        """
        return self._set(
            per_device_train_batch_size=train_batch_size,
            per_device_eval_batch_size=eval_batch_size,
            dataloader_drop_last=drop_last,
            dataloader_num_workers=num_workers,
            dataloader_pin_memory=pin_memory,
            dataloader_persistent_workers=persistent_workers,
            dataloader_prefetch_factor=prefetch_factor,
            dataloader_multiprocessing_context=multiprocessing_context,
            dataloader_in_order=in_order,
            auto_find_batch_size=auto_find_batch_size,
            ignore_data_skip=ignore_data_skip,
            data_seed=sampler_seed,
        )
