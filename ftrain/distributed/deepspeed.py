"""A DeepSpeed config as a :class:`~ftrain.distributed.config.ParallelConfig`, with transformers' ``"auto"`` rules.

ZeRO's stages are ftrain's shard levels: stage 0 is plain data parallel (``dp_replicate = world_size``), stages
1, 2 and 3 shard over ``dp_shard = world_size`` the optimizer state, then the gradients, then the parameters.
``offload_optimizer.device = "cpu"`` is ``offload_optimizer=True``; ``bf16`` / ``fp16`` ``enabled`` give
``param_dtype``; ``communication_data_type`` gives ``reduce_dtype`` (absent: gradients are reduced in their own
dtype, as DeepSpeed does).

As transformers' ``HfTrainerDeepSpeedConfig`` does, :func:`fill_deepspeed_config` replaces ``"auto"`` by the
run's value of that key (:data:`DEEPSPEED_AUTO_KEYS`: the micro batch, accumulation, ``train_batch_size`` ← world
size × micro batch × accumulation, ``gradient_clipping``, the optimizer's ``lr``/``betas``/``eps``/``weight_decay``,
``fp16``/``bf16.enabled``) and raises one error listing every explicit value that disagrees. The values come from
the caller, keyed by DeepSpeed's own names; the Trainer shell reads them from TrainingArguments
(:mod:`ftrain.trainer.parallel`).

Keys that change only how DeepSpeed's own engine runs (bucket sizes, overlap, prefetch, logging) have no meaning
for placement-based sharding and are accepted (:data:`DEEPSPEED_IGNORED`, logged at INFO). Keys that ask for
something ftrain does not do — parameter offload, NVMe, ZeRO++ quantisation and hierarchical partitions, MiCS,
pipeline/tensor/sequence parallel through DeepSpeed, DeepSpeed's own schedulers and non-Adam optimizers — raise
an error naming each key and why (:data:`DEEPSPEED_UNSUPPORTED`); an unknown key raises too (a typo must not be
dropped silently).

Example:
    >>> cfg = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}, "bf16": {"enabled": True}}
    >>> parallel_config_from_deepspeed(cfg, world_size=8)
    ParallelConfig(dp_replicate=1, dp_shard=8, cp=1, tp=1, shard_level=2, param_dtype=torch.bfloat16, reduce_dtype=None, offload_optimizer=True)
"""  # noqa: E501

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ftrain.distributed.config import ParallelConfig

__all__ = [
    "DEEPSPEED_AUTO_KEYS",
    "DEEPSPEED_IGNORED",
    "DEEPSPEED_UNSUPPORTED",
    "fill_deepspeed_config",
    "load_deepspeed_config",
    "parallel_config_from_deepspeed",
]

logger = logging.getLogger(__name__)

_ENGINE = "tunes DeepSpeed's own engine; placement-based sharding has no such knob"
_LOGGING = "DeepSpeed logging/monitoring; ftrain logs through the Trainer's callbacks"

#: Keys accepted without effect, with the reason (dotted paths; ``zero_optimization.`` for ZeRO keys).
DEEPSPEED_IGNORED: dict[str, str] = {
    **{
        f"zero_optimization.{k}": _ENGINE
        for k in (
            "allgather_partitions allgather_bucket_size overlap_comm reduce_scatter reduce_bucket_size "
            "contiguous_gradients round_robin_gradients sub_group_size stage3_prefetch_bucket_size "
            "stage3_param_persistence_threshold stage3_max_live_parameters stage3_max_reuse_distance "
            "stage3_module_granularity_threshold memory_efficient_linear use_multi_rank_bucket_allreduce "
            "load_from_fp32_weights elastic_checkpoint ignore_unused_parameters legacy_stage1 "
            "log_trace_cache_warnings prefetch_bucket_size param_persistence_threshold max_live_parameters "
            "max_reuse_distance"
        ).split()
    },
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": "ftrain checkpoints always hold whole tensors",
    "zero_optimization.gather_16bit_weights_on_model_save": "ftrain checkpoints always hold whole tensors",
    **{k: _LOGGING for k in ("steps_per_print", "wall_clock_breakdown", "dump_state", "tensorboard", "wandb")},
    **{k: _LOGGING for k in ("csv_monitor", "comet", "comms_logger", "flops_profiler", "memory_breakdown")},
    "zero_allow_untested_optimizer": "ftrain shards any ftrain.optim optimizer",
    "zero_force_ds_cpu_optimizer": "the offloaded optimizer runs ftrain.optim on the CPU",
    "prescale_gradients": "gradients are summed then divided once (loss is (sum, count))",
    "gradient_predivide_factor": "gradients are summed then divided once (loss is (sum, count))",
    "checkpoint": "checkpoints are written by ftrain.checkpoint.CheckpointManager",
    "aio": "asynchronous NVMe I/O settings; only used with NVMe offload, which is unsupported",
    "activation_checkpointing": "DeepSpeed's checkpointing API is not used by the model; set "
    "TrainingArguments.gradient_checkpointing instead",
    "data_types": "grad_accum_dtype is a setting of DeepSpeed's engine",
}
for _section in ("fp16", "bf16"):
    for _k in ("loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis", "consecutive_hysteresis",
               "min_loss_scale", "auto_cast", "immediate_grad_update", "check_grad_overflow"):  # fmt: skip
        DEEPSPEED_IGNORED[f"{_section}.{_k}"] = "loss scaling is the Trainer's fp16 setting, not a placement"

_ACTIVE_IF_PRESENT = "present"


def _enabled(value: Any) -> bool:
    if isinstance(value, Mapping):
        return bool(value.get("enabled", True))
    return value is not None and value is not False


def _device(value: Any) -> str:
    return str((value or {}).get("device", "none") if isinstance(value, Mapping) else ("cpu" if value else "none"))


#: Keys ftrain cannot honour: dotted path → (is it switched on?, why it is refused and what to do).
DEEPSPEED_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "zero_optimization.offload_param": (
        lambda v: _device(v) not in ("none", "None"),
        "parameter offload has no equivalent: ftrain keeps parameters on the device (ParallelConfig can offload "
        "only the optimizer state). Use shard_level 3 over more ranks, or remove offload_param.",
    ),
    "zero_optimization.zero_quantized_weights": (bool, "ZeRO++ weight quantisation is not implemented"),
    "zero_optimization.zero_quantized_gradients": (bool, "ZeRO++ gradient quantisation is not implemented"),
    "zero_optimization.zero_quantized_nontrainable_weights": (bool, "ZeRO++ weight quantisation is not implemented"),
    "zero_optimization.zero_hpz_partition_size": (
        lambda v: v is not None and v > 1,
        "ZeRO++ hierarchical partitioning (hpZ) has no equivalent; for sharding within a node and replication "
        "across nodes use ParallelConfig(dp_replicate=nodes, dp_shard=gpus_per_node) (HSDP).",
    ),
    "zero_optimization.mics_shard_size": (
        lambda v: v is not None and v > 0,
        "MiCS has no equivalent; use ParallelConfig(dp_replicate=..., dp_shard=mics_shard_size) (HSDP).",
    ),
    "zero_optimization.mics_hierarchical_params_gather": (bool, "MiCS has no equivalent"),
    "pipeline": (_enabled, "pipeline parallelism is not implemented in ftrain"),
    "tensor_parallel": (
        lambda v: _enabled(v) and (v.get("autotp_size", v.get("tp_size", 1)) or 1) > 1,
        "DeepSpeed AutoTP is not used; set ParallelConfig(tp=...) for ftrain's tensor parallel plan",
    ),
    "sequence_parallel_size": (
        lambda v: v is not None and v > 1,
        "DeepSpeed-Ulysses is not used; set ParallelConfig(cp=...) for ftrain's context parallel",
    ),
    "amp": (_enabled, "apex AMP is not supported; use bf16 or fp16"),
    "fp8": (_enabled, "fp8 training is not supported"),
    "sparse_gradients": (bool, "sparse gradients are not supported"),
    "sparse_attention": (_enabled, "DeepSpeed sparse attention kernels are not used"),
    "compression_training": (_enabled, "DeepSpeed compression is not supported"),
    "quantize_training": (_enabled, "DeepSpeed quantisation-aware training is not supported"),
    "data_efficiency": (_enabled, "DeepSpeed data efficiency (curriculum, sampling) is not supported"),
    "curriculum_learning": (_enabled, "DeepSpeed curriculum learning is not supported"),
    "elasticity": (_enabled, "elastic training is not supported; the world size is fixed per run"),
    "autotuning": (_enabled, "DeepSpeed autotuning is not supported"),
    "torch_autocast": (_enabled, "DeepSpeed's torch_autocast is not used; set TrainingArguments.bf16 or fp16"),
    "scheduler": (
        _enabled,
        "DeepSpeed's learning-rate schedules are not reproduced; ftrain takes the schedule from TrainingArguments "
        "(lr_scheduler_type, warmup_steps). Remove the 'scheduler' section and set those.",
    ),
}

_MAPPED = {"zero_optimization", "fp16", "bf16", "optimizer", "train_batch_size", "train_micro_batch_size_per_gpu",
           "gradient_accumulation_steps", "gradient_clipping", "communication_data_type"}  # fmt: skip
_ZERO_MAPPED = {"stage", "offload_optimizer", "cpu_offload"}
_COMM_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_deepspeed_config(ds_config: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """A deep copy of ``ds_config``: a dict, a path to a JSON file, or a JSON string (as ``--deepspeed`` takes).

    Raises:
        ValueError: a string that is neither an existing file nor JSON, or JSON that is not an object.
    """
    if isinstance(ds_config, Mapping):
        return copy.deepcopy(dict(ds_config))
    text = str(ds_config)
    if os.path.isfile(text):
        with open(text, encoding="utf-8") as f:
            loaded = json.load(f)
    elif text.lstrip().startswith("{"):
        loaded = json.loads(text)
    else:
        raise ValueError(f"DeepSpeed config {text!r} is neither a file nor a JSON object; pass a dict or a JSON path")
    if not isinstance(loaded, dict):
        raise ValueError(f"DeepSpeed config {text!r}: expected a JSON object, got {type(loaded).__name__}")
    return loaded


def _node(config: dict[str, Any], dotted: str) -> tuple[dict[str, Any] | None, str]:
    *parents, leaf = dotted.split(".")
    for part in parents:
        config = config.get(part)
        if not isinstance(config, dict):
            return None, leaf
    return config, leaf


#: The keys whose ``"auto"`` :func:`fill_deepspeed_config` fills (dotted paths), in the order disagreements are listed.
DEEPSPEED_AUTO_KEYS = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "train_batch_size",
    "gradient_clipping",
    "optimizer.params.lr",
    "optimizer.params.betas",
    "optimizer.params.eps",
    "optimizer.params.weight_decay",
    "fp16.enabled",
    "bf16.enabled",
)


def _with_train_batch_size(values: Mapping[str, Any], world_size: int) -> dict[str, Any]:
    """``values`` with DeepSpeed's ``train_batch_size = world_size × micro batch × accumulation`` when not given."""
    values = dict(values)
    if "train_batch_size" not in values and "train_micro_batch_size_per_gpu" in values:
        micro, accum = values["train_micro_batch_size_per_gpu"], values.get("gradient_accumulation_steps", 1)
        values["train_batch_size"] = None if micro is None or accum is None else world_size * micro * accum
    return values


def fill_deepspeed_config(
    ds_config: Mapping[str, Any] | str | os.PathLike,
    values: Mapping[str, Any],
    world_size: int,
    *,
    names: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The config with its ``"auto"`` values filled from ``values``; explicit values must agree with them.

    Args:
        ds_config: a dict, a JSON path or a JSON string.
        values: the run's value for some of :data:`DEEPSPEED_AUTO_KEYS`, keyed by DeepSpeed's dotted names (e.g.
            ``{"train_micro_batch_size_per_gpu": 8, "optimizer.params.lr": 1e-4}``). A key it lacks is left as it
            is; a ``None`` value (or a list holding one) fills ``"auto"`` but checks nothing.
        world_size: number of processes: ``train_batch_size``, when ``values`` lacks it, is world size × micro
            batch × accumulation (accumulation 1 when absent).
        names: where each value came from, for the error message (default: the key; the calculated
            ``train_batch_size`` is ``"train_batch_size (calculated)"``).

    Returns:
        A new dict (``ds_config`` is not changed).

    Raises:
        ValueError: a key of ``values`` that is not in :data:`DEEPSPEED_AUTO_KEYS`; every explicit value that
            disagrees with ``values``, as ``ds KEY=VALUE vs hf NAME=VALUE``.

    Example:
        >>> values = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0}
        >>> fill_deepspeed_config({"train_batch_size": "auto", "gradient_clipping": 1.0}, values, world_size=2)
        {'train_batch_size': 16, 'gradient_clipping': 1.0}
        >>> fill_deepspeed_config({"train_micro_batch_size_per_gpu": 8}, values, 2, names={"train_micro_batch_size_per_gpu": "per_device_train_batch_size"})
        Traceback (most recent call last):
        ...
        ValueError: DeepSpeed config values disagree with TrainingArguments:
        - ds train_micro_batch_size_per_gpu=8 vs hf per_device_train_batch_size=4
        Set these DeepSpeed values to "auto" (filled from TrainingArguments) or make them equal.
    """  # noqa: E501
    unknown = sorted(set(values) - set(DEEPSPEED_AUTO_KEYS))
    if unknown:
        raise ValueError(
            f'fill_deepspeed_config: {unknown} are not keys DeepSpeed fills from "auto"; use some of '
            f"{list(DEEPSPEED_AUTO_KEYS)}"
        )
    config = load_deepspeed_config(ds_config)
    values = _with_train_batch_size(values, world_size)
    labels = {"train_batch_size": "train_batch_size (calculated)", **(names or {})}
    mismatches = []
    for key in DEEPSPEED_AUTO_KEYS:
        node, leaf = _node(config, key)
        if key not in values or node is None or leaf not in node:
            continue
        value = values[key]
        if node[leaf] == "auto":
            node[leaf] = value
        elif value is not None and None not in (value if isinstance(value, list) else [value]):
            if node[leaf] != value:
                mismatches.append(f"- ds {key}={node[leaf]} vs hf {labels.get(key, key)}={value}")
    if mismatches:
        raise ValueError(
            "DeepSpeed config values disagree with TrainingArguments:\n"
            + "\n".join(mismatches)
            + '\nSet these DeepSpeed values to "auto" (filled from TrainingArguments) or make them equal.'
        )
    return config


def _check_keys(config: dict[str, Any]) -> None:
    """Raises one error naming every unsupported or unknown key in use; logs the ignored ones."""
    problems, ignored = [], []
    zero = config.get("zero_optimization") or {}
    entries = [(k, v) for k, v in config.items() if k != "zero_optimization"]
    entries += [(f"zero_optimization.{k}", v) for k, v in zero.items()]
    for section in ("fp16", "bf16"):
        if isinstance(config.get(section), dict):
            entries += [(f"{section}.{k}", v) for k, v in config[section].items() if k != "enabled"]
    for key, value in entries:
        if key in DEEPSPEED_UNSUPPORTED:
            active, why = DEEPSPEED_UNSUPPORTED[key]
            if active(value):
                problems.append(f"- {key}: {why}")
        elif key in DEEPSPEED_IGNORED:
            ignored.append(f"{key} ({DEEPSPEED_IGNORED[key]})")
        elif key not in _MAPPED and key.removeprefix("zero_optimization.") not in _ZERO_MAPPED:
            problems.append(f"- {key}: not a DeepSpeed key ftrain knows (a typo?); remove it")
    problems += _offload_optimizer_problems(zero) + _optimizer_problems(config.get("optimizer"))
    if problems:
        raise ValueError("DeepSpeed config has settings ftrain cannot honour:\n" + "\n".join(problems))
    if ignored:
        logger.info("DeepSpeed keys with no effect on ftrain: %s", "; ".join(ignored))


def _offload_optimizer_problems(zero: dict[str, Any]) -> list[str]:
    offload = zero.get("offload_optimizer")
    device = _device(offload)
    problems = []
    if device not in ("none", "None", "cpu"):
        problems.append(
            f'- zero_optimization.offload_optimizer.device="{device}": only "cpu" (or "none") is supported; '
            "NVMe offload has no equivalent"
        )
    if isinstance(offload, dict):
        if offload.get("ratio", 1.0) != 1.0:
            problems.append(
                f"- zero_optimization.offload_optimizer.ratio={offload['ratio']}: partial offload is not supported; "
                "remove ratio (the whole optimizer state is offloaded)"
            )
        unknown = set(offload) - {"device", "pin_memory", "buffer_count", "fast_init", "ratio", "nvme_path"}
        problems += [f"- zero_optimization.offload_optimizer.{k}: not a key ftrain knows" for k in sorted(unknown)]
    return problems


def _optimizer_problems(optimizer: Any) -> list[str]:
    if not optimizer:
        return []
    kind = str(optimizer.get("type", "")).lower()
    params = optimizer.get("params") or {}
    if kind not in ("adam", "adamw", "fusedadam", "cpuadam", "deepspeedcpuadam"):
        return [
            f"- optimizer.type={optimizer.get('type')!r}: DeepSpeed's optimizers are not used; ftrain builds "
            "AdamW from TrainingArguments (optim, learning_rate, adam_*, weight_decay). Remove the 'optimizer' "
            "section or use type AdamW."
        ]
    if kind != "adamw" and params.get("adam_w_mode", True) is False:
        return ["- optimizer.params.adam_w_mode=false: Adam with L2 decay is not AdamW; set it true or remove it"]
    return []


def _dtypes(config: dict[str, Any]) -> tuple[torch.dtype | None, torch.dtype | None]:
    def on(section: str) -> bool:
        value = (config.get(section) or {}).get("enabled", False)
        if value == "auto":
            raise ValueError(
                f'DeepSpeed config: {section}.enabled is "auto", which is filled from TrainingArguments.{section}; '
                "pass the config through fill_deepspeed_config first, or set it to true/false."
            )
        return bool(value)

    fp16, bf16 = on("fp16"), on("bf16")
    if fp16 and bf16:
        raise ValueError("DeepSpeed config: fp16.enabled and bf16.enabled are both true; choose one")
    param = torch.float16 if fp16 else torch.bfloat16 if bf16 else None
    comm = config.get("communication_data_type")
    if comm is not None and str(comm).lower() not in _COMM_DTYPES:
        raise ValueError(f"DeepSpeed config: communication_data_type={comm!r} is not one of {sorted(_COMM_DTYPES)}")
    return param, None if comm is None else _COMM_DTYPES[str(comm).lower()]


def parallel_config_from_deepspeed(ds_config: Mapping[str, Any] | str | os.PathLike, world_size: int) -> ParallelConfig:
    """The :class:`ParallelConfig` a DeepSpeed config asks for, resolved for ``world_size``.

    Args:
        ds_config: a dict, a JSON path or a JSON string; ``"auto"`` precision must be filled first
            (:func:`fill_deepspeed_config`), other ``"auto"`` values do not decide the layout.
        world_size: number of processes.

    Returns:
        ``ParallelConfig`` with ``cp = tp = 1``: stage 0 → ``dp_replicate=world_size, dp_shard=1``; stage ``s``
        in 1..3 → ``dp_shard=world_size, shard_level=s``.

    Raises:
        ValueError: a bad stage, unsupported or unknown keys (all named in one message), ``"auto"`` precision, or
            optimizer offload with stage 0.
    """
    config = load_deepspeed_config(ds_config)
    _check_keys(config)
    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ValueError(f"DeepSpeed config: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    offload = _device(zero.get("offload_optimizer")) == "cpu" or bool(zero.get("cpu_offload", False))
    if offload and stage == 0:
        raise ValueError(
            "DeepSpeed config: zero_optimization.offload_optimizer needs ZeRO stage 1, 2 or 3 (stage is 0); the "
            "offloaded optimizer state is the sharded one."
        )
    param_dtype, reduce_dtype = _dtypes(config)
    sizes = {"dp_replicate": world_size, "dp_shard": 1} if stage == 0 else {"dp_shard": world_size}
    return ParallelConfig(
        **sizes,
        shard_level=max(stage, 1),
        param_dtype=param_dtype,
        reduce_dtype=reduce_dtype,
        offload_optimizer=offload,
    ).resolve(world_size)
