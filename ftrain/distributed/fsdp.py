"""HF's FSDP settings (the ``fsdp`` options and an ``fsdp_config``) as a :class:`~ftrain.distributed.ParallelConfig`.

The inputs are the values transformers' and accelerate's FSDP settings take (``TrainingArguments.fsdp`` /
``fsdp_config``; the Trainer shell reads them, :mod:`ftrain.trainer.parallel`). The FSDP sharding strategies are
shard levels on the ``dp_shard`` axis:

- ``full_shard`` (the default): ``dp_shard=world_size, shard_level=3``;
- ``shard_grad_op``: ``dp_shard=world_size, shard_level=2`` (parameters stay whole: more memory than FSDP's
  shard_grad_op, which reshards them between steps; the same numbers);
- ``hybrid_shard``: ``dp_replicate=world_size/group, dp_shard=group, shard_level=3`` (HSDP);
- ``hybrid_shard_zero2``: as ``hybrid_shard`` with ``shard_level=2``;
- ``no_shard``: ``dp_replicate=world_size, dp_shard=1`` (plain data parallel);
- ``offload`` / ``fsdp_config["cpu_offload"]``: ``offload_optimizer=True`` (the optimizer state on the CPU;
  unlike FSDP's CPU offload the parameters stay on the device);
- ``auto_wrap``: nothing, placements shard every parameter and there are no wrap units.

``fsdp_config["reshard_after_forward"]`` (FSDP2: ``True`` full shard, ``False`` shard_grad_op; FSDP1: a strategy
name) and ``mixed_precision_policy`` (``"bf16"`` or ``{"param_dtype", "reduce_dtype"}``) are mapped; without a
policy, the run's ``mixed_precision`` dtype gives ``param_dtype = reduce_dtype``, as accelerate does.
Wrapping and loading keys (``min_num_params``, ``transformer_layer_cls_to_wrap``, ``auto_wrap_policy``,
``state_dict_type``, …) have no meaning for placement-based sharding: accepted and logged at INFO. Unlike
transformers with FSDP2, the hybrid strategies are accepted: they are HSDP on the ``dp_replicate`` axis.

Example:
    >>> parallel_config_from_fsdp("hybrid_shard offload", None, 16, mixed_precision=torch.bfloat16, shard_group_size=8)
    ParallelConfig(dp_replicate=2, dp_shard=8, cp=1, tp=1, shard_level=3, param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, offload_optimizer=True)
"""  # noqa: E501

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ftrain.distributed.config import ParallelConfig

__all__ = ["FSDP_CONFIG_IGNORED", "FSDP_OPTIONS", "FsdpOptions", "fsdp_options", "parallel_config_from_fsdp"]

logger = logging.getLogger(__name__)

#: What ``fsdp`` takes: off (``None``, ``False``, ``""``, ``[]``), on (``True``), or options (a string or a list).
FsdpOptions = str | Sequence[str] | bool | None

#: strategy → (shard_level or None for no sharding, hybrid?)
_STRATEGIES: dict[str, tuple[int | None, bool]] = {
    "full_shard": (3, False),
    "shard_grad_op": (2, False),
    "no_shard": (None, False),
    "hybrid_shard": (3, True),
    "hybrid_shard_zero2": (2, True),
}
FSDP_OPTIONS = (*_STRATEGIES, "offload", "auto_wrap")

_WRAP = "placement-based sharding shards every parameter; there are no FSDP wrap units"
#: fsdp_config keys accepted without effect, with the reason.
FSDP_CONFIG_IGNORED: dict[str, str] = {
    "min_num_params": _WRAP,
    "transformer_layer_cls_to_wrap": _WRAP,
    "auto_wrap_policy": _WRAP,
    "version": "ftrain has one implementation (DTensor placements), not FSDP1/FSDP2",
    "cpu_ram_efficient_loading": "the model is built once and distributed by placements",
    "sync_module_states": "every rank builds the same state from the same seed and key",
    "state_dict_type": "checkpoints are written by ftrain.checkpoint (DCP for sharded states)",
    "use_orig_params": "parameters are state leaves; there are no flat parameters",
    "forward_prefetch": "a setting of FSDP's module hooks, which ftrain does not use",
    "backward_prefetch": "a setting of FSDP's module hooks, which ftrain does not use",
    "limit_all_gathers": "a setting of FSDP's module hooks, which ftrain does not use",
}
_FALSE_ONLY = {
    "activation_checkpointing": "set TrainingArguments.gradient_checkpointing=True instead",
    "xla": "XLA FSDP is not supported",
    "xla_fsdp_v2": "XLA FSDP is not supported",
    "xla_fsdp_grad_ckpt": "XLA FSDP is not supported",
}
_MAPPED = {"reshard_after_forward", "cpu_offload", "sharding_strategy", "mixed_precision_policy", "xla_fsdp_settings"}


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("y", "yes", "t", "true", "on", "1"):
        return True
    if text in ("n", "no", "f", "false", "off", "0"):
        return False
    raise ValueError(f"fsdp_config[{key!r}]={value!r} is not a boolean; use true or false")


def fsdp_options(fsdp: FsdpOptions) -> list[str] | None:
    """The ``fsdp`` setting as a list of lower-case options; ``None`` when it asks for no FSDP.

    Args:
        fsdp: ``None``, ``False``, ``""`` or ``[]`` (off); ``True`` (on, no option); a space-separated string or a
            list of :data:`FSDP_OPTIONS`.

    Returns:
        The options (``[]`` for ``True``), or ``None`` when FSDP is off.

    Raises:
        ValueError: an option that is not one of :data:`FSDP_OPTIONS`.

    Example:
        >>> fsdp_options("FULL_SHARD auto_wrap"), fsdp_options(True), fsdp_options("")
        (['full_shard', 'auto_wrap'], [], None)
    """
    if fsdp is None or fsdp is False or fsdp == "" or fsdp == []:
        return None
    if fsdp is True:
        return []
    items = fsdp.split() if isinstance(fsdp, str) else list(fsdp)
    items = [str(item).lower() for item in items]
    unknown = [item for item in items if item not in FSDP_OPTIONS]
    if unknown:
        raise ValueError(f"TrainingArguments.fsdp: unknown option(s) {unknown}; use some of {list(FSDP_OPTIONS)}")
    return items


def _load_fsdp_config(value: Mapping[str, Any] | str | os.PathLike | None) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        config = dict(value)
    elif os.path.isfile(str(value)):
        with open(str(value), encoding="utf-8") as f:
            config = json.load(f)
    elif str(value).lstrip().startswith("{"):
        config = json.loads(str(value))
    else:
        raise ValueError(f"TrainingArguments.fsdp_config={value!r} is neither a dict, a JSON file nor a JSON object")
    # transformers strips the "fsdp_" prefix accelerate's config files use
    return {(k[5:] if k.startswith("fsdp_") else k): v for k, v in config.items()}


def _check_fsdp_config(config: dict[str, Any]) -> None:
    problems, ignored = [], []
    for key, value in config.items():
        if key in FSDP_CONFIG_IGNORED:
            ignored.append(f"{key} ({FSDP_CONFIG_IGNORED[key]})")
        elif key in _FALSE_ONLY:
            if _bool(value, key):
                problems.append(f"- {key}=True: {_FALSE_ONLY[key]}")
        elif key == "xla_fsdp_settings":
            continue  # only read when xla is on, which is refused above
        elif key not in _MAPPED:
            problems.append(f"- {key}: not an fsdp_config key ftrain knows (a typo?); remove it")
    if problems:
        raise ValueError("TrainingArguments.fsdp_config has settings ftrain cannot honour:\n" + "\n".join(problems))
    if ignored:
        logger.info("fsdp_config keys with no effect on ftrain: %s", "; ".join(ignored))


def _strategy(items: list[str], config: dict[str, Any]) -> str:
    """The one sharding strategy that ``fsdp`` and ``fsdp_config`` ask for (full_shard when none)."""
    from_items = [item for item in items if item in _STRATEGIES]
    if len(from_items) > 1:
        raise ValueError(f"TrainingArguments.fsdp: several sharding strategies {from_items}; choose one")
    from_config = []
    for key in ("reshard_after_forward", "sharding_strategy"):
        if key not in config:
            continue
        value = config[key]
        if isinstance(value, str) and value.lower() in _STRATEGIES:
            from_config.append((key, value.lower()))
        elif isinstance(value, bool) or (isinstance(value, str) and key == "reshard_after_forward"):
            from_config.append((key, "full_shard" if _bool(value, key) else "shard_grad_op"))
        else:
            raise ValueError(
                f"fsdp_config[{key!r}]={value!r}: use true/false or one of {list(_STRATEGIES)} (an int "
                "reshard_after_forward, resharding to a smaller group, is not supported)"
            )
    chosen = {s for _, s in from_config} | set(from_items)
    if len(chosen) > 1:
        given = [f"fsdp={from_items[0]!r}"] if from_items else []
        given += [f"fsdp_config[{k!r}]={config[k]!r}" for k, _ in from_config]
        raise ValueError(f"FSDP sharding strategy is given twice and disagrees: {', '.join(given)}; keep one")
    return chosen.pop() if chosen else "full_shard"


def _mixed_precision(config: dict[str, Any], default: torch.dtype | None) -> tuple[Any, Any]:
    policy = config.get("mixed_precision_policy")
    if policy is None:
        return default, default
    if isinstance(policy, str):
        policy = {"param_dtype": policy, "reduce_dtype": policy}
    if not isinstance(policy, Mapping):
        raise ValueError(f"fsdp_config['mixed_precision_policy']={policy!r}: use 'bf16' or a dict of dtypes")
    extra = set(policy) - {"param_dtype", "reduce_dtype", "buffer_dtype", "output_dtype"}
    if extra:
        raise ValueError(f"fsdp_config['mixed_precision_policy']: unknown key(s) {sorted(extra)}")

    def dtype(name: str) -> Any:
        value = policy.get(name)
        return value.removeprefix("torch.") if isinstance(value, str) else value

    return dtype("param_dtype"), dtype("reduce_dtype")


def _hybrid_sizes(world_size: int, shard_group_size: int | None) -> dict[str, int]:
    group = shard_group_size or int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    if group < 1:
        raise ValueError(
            "FSDP hybrid sharding shards within a group (a node) and replicates across groups, but the group size "
            "is unknown: pass shard_group_size= (GPUs per node) or launch with torchrun (it sets LOCAL_WORLD_SIZE)."
        )
    if world_size % group:
        raise ValueError(f"FSDP hybrid sharding: shard group size {group} does not divide the world size {world_size}")
    return {"dp_replicate": world_size // group, "dp_shard": group}


def parallel_config_from_fsdp(
    fsdp: FsdpOptions,
    fsdp_config: Mapping[str, Any] | str | os.PathLike | None,
    world_size: int,
    *,
    mixed_precision: torch.dtype | None = None,
    shard_group_size: int | None = None,
) -> ParallelConfig | None:
    """The :class:`ParallelConfig` that FSDP options and an ``fsdp_config`` ask for, resolved for ``world_size``.

    Args:
        fsdp: the FSDP options (:func:`fsdp_options`), e.g. ``"full_shard offload"``, ``True`` or ``None``.
        fsdp_config: a dict, a JSON file or a JSON object string; keys may carry accelerate's ``fsdp_`` prefix.
        world_size: number of processes.
        mixed_precision: the run's mixed-precision dtype (``torch.bfloat16`` for bf16), the parameter and reduce
            dtype when ``fsdp_config`` has no ``mixed_precision_policy``; ``None``: full precision.
        shard_group_size: ranks that shard together under ``hybrid_shard`` (default: ``$LOCAL_WORLD_SIZE``).

    Returns:
        A resolved ``ParallelConfig`` (``cp = tp = 1``), or ``None`` when ``fsdp`` asks for no FSDP.

    Raises:
        ValueError: an unknown option or key, conflicting strategies, a setting ftrain cannot honour, or a hybrid
            group size that is unknown or does not divide ``world_size``.

    Example:
        >>> parallel_config_from_fsdp(True, {"reshard_after_forward": False}, 4)
        ParallelConfig(dp_replicate=1, dp_shard=4, cp=1, tp=1, shard_level=2, param_dtype=None, reduce_dtype=None, offload_optimizer=False)
        >>> parallel_config_from_fsdp(None, None, 4) is None
        True
    """  # noqa: E501
    items = fsdp_options(fsdp)
    if items is None:
        return None
    config = _load_fsdp_config(fsdp_config)
    _check_fsdp_config(config)
    level, hybrid = _STRATEGIES[_strategy(items, config)]
    if level is None:
        sizes = {"dp_replicate": world_size, "dp_shard": 1}
    else:
        sizes = _hybrid_sizes(world_size, shard_group_size) if hybrid else {"dp_shard": world_size}
    param_dtype, reduce_dtype = _mixed_precision(config, mixed_precision)
    offload = "offload" in items or _bool(config.get("cpu_offload", False), "cpu_offload")
    return ParallelConfig(
        **sizes,
        shard_level=level or 1,
        param_dtype=param_dtype,
        reduce_dtype=reduce_dtype,
        offload_optimizer=offload,
    ).resolve(world_size)
