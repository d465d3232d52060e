"""The Trainer's parallel layout: ``TrainingArguments``' distributed fields as one ``ParallelConfig``.

This is the one place the shell reads ``world_size``, ``fsdp``, ``fsdp_config``, ``deepspeed``,
``parallelism_config`` and the precision and DeepSpeed ``"auto"`` fields. It hands :mod:`ftrain.distributed` plain
values: the FSDP options and config with the run's mixed-precision dtype
(:func:`~ftrain.distributed.parallel_config_from_fsdp`), or a DeepSpeed config whose ``"auto"`` values are filled
from the arguments (:func:`~ftrain.distributed.fill_deepspeed_config`,
:func:`~ftrain.distributed.parallel_config_from_deepspeed`). ``args`` is read by attribute, so ftrain's and
transformers' ``TrainingArguments`` both work. ``ftrain.distributed`` is imported on first use: importing the
shell does not start the distributed layer.

Example:
    >>> from types import SimpleNamespace
    >>> args = SimpleNamespace(fsdp="hybrid_shard offload", fsdp_config=None, deepspeed=None, bf16=True)
    >>> parallel_config_from_training_args(args, world_size=16, shard_group_size=8)
    ParallelConfig(dp_replicate=2, dp_shard=8, cp=1, tp=1, shard_level=3, param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, offload_optimizer=True)
"""  # noqa: E501

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ftrain.distributed import ParallelConfig

__all__ = ["config_size", "fill_deepspeed_config_from_args", "parallel_config_from_training_args", "parallel_layout"]


def _deepspeed_auto(args: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """``(values, names)``: each DeepSpeed ``"auto"`` key's value in ``args`` and the field(s) it comes from, as
    transformers' ``HfTrainerDeepSpeedConfig`` fills them (``train_batch_size`` is calculated from the first two)."""
    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    rows = [
        ("train_micro_batch_size_per_gpu", "per_device_train_batch_size", get("per_device_train_batch_size")),
        ("gradient_accumulation_steps", "gradient_accumulation_steps", get("gradient_accumulation_steps", 1)),
        ("gradient_clipping", "max_grad_norm", get("max_grad_norm")),
        ("optimizer.params.lr", "learning_rate", get("learning_rate")),
        ("optimizer.params.betas", "adam_beta1+adam_beta2", [get("adam_beta1"), get("adam_beta2")]),
        ("optimizer.params.eps", "adam_epsilon", get("adam_epsilon")),
        ("optimizer.params.weight_decay", "weight_decay", get("weight_decay")),
        ("fp16.enabled", "fp16|fp16_full_eval", bool(get("fp16", False) or get("fp16_full_eval", False))),
        ("bf16.enabled", "bf16|bf16_full_eval", bool(get("bf16", False) or get("bf16_full_eval", False))),
    ]
    return {key: value for key, _, value in rows}, {key: name for key, name, _ in rows}


def fill_deepspeed_config_from_args(ds_config: Mapping[str, Any] | str, args: Any, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config with transformers' ``"auto"`` values filled from ``args``; explicit values must agree.

    Args:
        ds_config: a dict, a JSON path or a JSON string.
        args: ftrain's or transformers' ``TrainingArguments`` (read by attribute).
        world_size: number of processes (``train_batch_size`` = world size × per-device batch × accumulation).

    Returns:
        A new dict (:func:`ftrain.distributed.fill_deepspeed_config`).

    Raises:
        ValueError: every explicit value that disagrees with ``args``, as ``ds KEY=VALUE vs hf FIELD=VALUE``.

    Example:
        >>> from types import SimpleNamespace
        >>> args = SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_grad_norm=1.0)
        >>> fill_deepspeed_config_from_args({"train_batch_size": "auto", "gradient_clipping": 1.0}, args, 2)
        {'train_batch_size': 16, 'gradient_clipping': 1.0}
        >>> fill_deepspeed_config_from_args({"train_micro_batch_size_per_gpu": 8}, args, world_size=2)
        Traceback (most recent call last):
        ...
        ValueError: DeepSpeed config values disagree with TrainingArguments:
        - ds train_micro_batch_size_per_gpu=8 vs hf per_device_train_batch_size=4
        Set these DeepSpeed values to "auto" (filled from TrainingArguments) or make them equal.
    """
    from ftrain.distributed import fill_deepspeed_config

    values, names = _deepspeed_auto(args)
    return fill_deepspeed_config(ds_config, values, world_size, names=names)


def parallel_config_from_training_args(
    args: Any, world_size: int, *, shard_group_size: int | None = None
) -> ParallelConfig | None:
    """The ``ParallelConfig`` that ``args.fsdp`` / ``args.fsdp_config`` / ``args.deepspeed`` ask for.

    Without a ``mixed_precision_policy`` in ``fsdp_config``, ``bf16`` / ``fp16`` give FSDP's parameter and reduce
    dtype, as accelerate does; a DeepSpeed config has its ``"auto"`` values filled from ``args`` first.

    Args:
        args: ftrain's or transformers' ``TrainingArguments`` (or anything with those attributes).
        world_size: number of processes.
        shard_group_size: ranks that shard together under ``hybrid_shard`` (default: ``$LOCAL_WORLD_SIZE``).

    Returns:
        A resolved ``ParallelConfig`` (``cp = tp = 1``), or ``None`` when neither FSDP nor DeepSpeed is asked for
        (the caller's default: plain data parallel).

    Raises:
        ValueError: both FSDP and DeepSpeed, or what :func:`~ftrain.distributed.parallel_config_from_fsdp`,
            :func:`~ftrain.distributed.fill_deepspeed_config` or
            :func:`~ftrain.distributed.parallel_config_from_deepspeed` refuse.
    """
    from ftrain.distributed import parallel_config_from_deepspeed, parallel_config_from_fsdp
    from ftrain.distributed.fsdp import fsdp_options

    fsdp, deepspeed = getattr(args, "fsdp", None), getattr(args, "deepspeed", None)
    if deepspeed and fsdp_options(fsdp) is not None:
        raise ValueError("TrainingArguments: fsdp and deepspeed are both set; choose one way to shard")
    if deepspeed:
        return parallel_config_from_deepspeed(fill_deepspeed_config_from_args(deepspeed, args, world_size), world_size)
    bf16, fp16 = getattr(args, "bf16", False), getattr(args, "fp16", False)
    return parallel_config_from_fsdp(
        fsdp,
        getattr(args, "fsdp_config", None),
        world_size,
        mixed_precision=torch.bfloat16 if bf16 else torch.float16 if fp16 else None,
        shard_group_size=shard_group_size,
    )


def parallel_layout(args: Any) -> ParallelConfig | None:
    """The ``ParallelConfig`` a Trainer on ``args.world_size`` processes trains with; ``None`` on one process.

    ``fsdp`` / ``fsdp_config`` / ``deepspeed`` give it (:func:`parallel_config_from_training_args`); else an ftrain
    ``ParallelConfig`` in ``parallelism_config``; else plain data parallel (``dp_replicate=world_size``), what
    transformers does with DDP.

    Example:
        >>> from types import SimpleNamespace
        >>> args = SimpleNamespace(world_size=4, fsdp="shard_grad_op", fsdp_config=None, deepspeed=None,
        ...                        parallelism_config=None, bf16=False, fp16=False)
        >>> parallel_layout(args).dp_shard, parallel_layout(args).shard_level
        (4, 2)
        >>> parallel_layout(SimpleNamespace(**{**vars(args), "fsdp": None})).dp_replicate
        4

    Raises:
        ValueError: ``parallelism_config`` together with ``fsdp`` / ``deepspeed``, an accelerate
            ``ParallelismConfig``, or what :func:`parallel_config_from_training_args` refuses.
        NotImplementedError: a layout with ``cp`` or ``tp`` > 1 (the Trainer has no tensor-parallel plan or
            sequence splitting yet).
    """
    world = args.world_size
    if world <= 1:
        return None
    from ftrain.distributed import ParallelConfig

    config = parallel_config_from_training_args(args, world)
    given = getattr(args, "parallelism_config", None)
    if given is not None and config is not None:
        raise ValueError("TrainingArguments: parallelism_config and fsdp/deepspeed are both set; keep one layout")
    if given is not None and not isinstance(given, ParallelConfig):
        raise ValueError(
            f"TrainingArguments.parallelism_config is a {type(given).__name__}; ftrain's Trainer lays out its state "
            "with an ftrain.distributed.ParallelConfig (or use fsdp=... / deepspeed=...)."
        )
    config = config or (given.resolve(world) if given is not None else ParallelConfig(dp_replicate=world, dp_shard=1))
    if config.cp > 1 or config.tp > 1:
        raise NotImplementedError(
            f"Trainer: cp={config.cp}, tp={config.tp}: context and tensor parallel are not wired into the Trainer "
            "yet; use them through ftrain.distributed with make_train_step (docs/distributed.md)."
        )
    return config


def config_size(config: Any, *names: str) -> int:
    """The first of ``names`` that ``config`` (an ftrain ``ParallelConfig``, accelerate's ``ParallelismConfig`` or a
    dict) sets, else 1."""
    for name in names:
        value = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
        if value is not None:
            return int(value)
    return 1
