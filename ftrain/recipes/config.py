"""The typed sections every recipe shares, and the YAML ↔ dataclass conversion.

A recipe is a frozen, nested dataclass: ``optim``, ``schedule``, ``train``, ``checkpoint``, ``log`` and ``parallel``
are the same for every task; ``model`` and ``data`` are typed per task (see :mod:`ftrain.recipes.gpt` and
:mod:`ftrain.recipes.digits`). Each section checks its values when it is built, so a bad value fails before any
model is made, naming the key. :func:`from_dict` turns parsed YAML into a recipe, rejecting unknown keys (with a
suggestion) and wrong types (with the key path); :func:`to_dict` is its inverse, what a checkpoint stores.

Example:
    >>> OptimConfig(name="sgd", lr=0.1).lr
    0.1
    >>> from_dict(TrainConfig, {"steps": 5, "batch_size": 8}).steps
    5
    >>> from_dict(TrainConfig, {"stepz": 5})
    Traceback (most recent call last):
    ...
    ftrain.recipes.config.RecipeError: recipe key 'stepz' is unknown (did you mean 'steps'?); known keys: steps, batch_size, accum, seed, compile, donate, eval_every, eval_batches, threads
"""  # noqa: E501

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, ClassVar, Literal

from ftrain.distributed.config import ParallelConfig
from ftrain.schedules import METRIC_SCHEDULE_NAMES, SCHEDULE_NAMES

__all__ = [
    "CheckpointConfig",
    "LogConfig",
    "OptimConfig",
    "ParallelSection",
    "Recipe",
    "RecipeError",
    "ScheduleConfig",
    "TrainConfig",
    "from_dict",
    "to_dict",
]


class RecipeError(ValueError):
    """A recipe that cannot be used: an unknown key or name, a wrong type, a value out of range."""


def _check(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise RecipeError(f"{where}: {message}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optimizer: an :mod:`ftrain.optim` alias, after global-norm clipping.

    Args:
        name: ``adamw`` (HF's decay rule: no decay for biases and LayerNorm weights), ``adam``, ``sgd`` or ``lion``.
        lr: the peak learning rate (the schedule scales it).
        weight_decay: decoupled weight decay (adamw, lion) or L2 penalty (sgd).
        betas: (b1, b2) of adam/adamw/lion.
        momentum: SGD momentum.
        clip: max global gradient norm; ``None`` disables clipping.
    """

    name: Literal["adamw", "adam", "sgd", "lion"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.0
    clip: float | None = 1.0

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(all(0 <= b < 1 for b in self.betas), "optim.betas", f"each must be in [0, 1), got {self.betas}")
        _check(self.clip is None or self.clip > 0, "optim.clip", f"must be > 0 or None, got {self.clip}")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """The learning-rate schedule, by its transformers ``SchedulerType`` name (``ftrain.schedules.get_schedule``).

    Args:
        name: ``linear``, ``cosine``, ``constant``, ``constant_with_warmup``, ... (see ``SCHEDULE_NAMES``).
        warmup_steps: linear warmup steps; when 0, ``warmup_ratio`` of the run's steps.
        warmup_ratio: warmup as a fraction of ``train.steps`` (HF's ``warmup_ratio``).
    """

    name: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0

    def __post_init__(self) -> None:
        names = [n for n in SCHEDULE_NAMES if n not in METRIC_SCHEDULE_NAMES]  # a recipe's steps drive its lr
        _check(self.name in names, "schedule.name", f"unknown schedule {self.name!r}; use one of {', '.join(names)}")
        _check(self.warmup_steps >= 0, "schedule.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(0 <= self.warmup_ratio < 1, "schedule.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")

    def warmup(self, steps: int) -> int:
        """Warmup steps for a run of ``steps`` (``warmup_steps`` wins over ``warmup_ratio``, as in HF)."""
        return self.warmup_steps if self.warmup_steps else int(self.warmup_ratio * steps + 0.5)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop.

    Args:
        steps: optimizer steps of the whole run.
        batch_size: examples per optimizer step (summed over processes and accumulated microbatches).
        accum: microbatches per optimizer step (``batch_size`` must be divisible by it).
        seed: the run's seed: initial weights, data order and dropout derive from it.
        compile: compile the train and eval steps with ``ftrain.jit`` (deterministic either way).
        donate: let the step write the next state into the previous one's memory (eager or compiled).
        eval_every: evaluate every this many steps (0: only at the end).
        eval_batches: validation batches per evaluation (0: the whole validation split).
        threads: torch's CPU threads for the run (0: torch's default). One thread is fastest for small models on a
            shared machine: two threads next to a busy neighbour spin against each other (measured 5x the CPU time).
    """

    steps: int = 100
    batch_size: int = 16
    accum: int = 1
    seed: int = 0
    compile: bool = False
    donate: bool = True
    eval_every: int = 0
    eval_batches: int = 0
    threads: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "accum"):
            _check(getattr(self, name) >= 1, f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(
            self.batch_size % self.accum == 0,
            "train.batch_size",
            f"{self.batch_size} is not divisible by train.accum={self.accum}; each microbatch holds batch_size/accum",
        )
        _check(self.eval_every >= 0, "train.eval_every", f"must be >= 0, got {self.eval_every}")
        _check(self.eval_batches >= 0, "train.eval_batches", f"must be >= 0, got {self.eval_batches}")
        _check(self.threads >= 0, "train.threads", f"must be >= 0, got {self.threads}")

    @property
    def microbatch_size(self) -> int:
        """Examples per microbatch (summed over processes)."""
        return self.batch_size // self.accum


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints (the final step is always saved).

    Args:
        every: save every this many steps (0: only the final step).
        keep: how many newest checkpoints to keep; ``None`` keeps all.
    """

    every: int = 100
    keep: int | None = 2

    def __post_init__(self) -> None:
        _check(self.every >= 0, "checkpoint.every", f"must be >= 0, got {self.every}")
        _check(self.keep is None or self.keep >= 1, "checkpoint.keep", f"must be >= 1 or None, got {self.keep}")


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Logging and the output directory.

    Args:
        every: log the mean training metrics every this many steps.
        output_dir: where checkpoints, ``metrics.jsonl``, TensorBoard logs and ``loss.png`` go.
        tensorboard: write TensorBoard event files (needs ``pip install ftrain[tensorboard]``).
        plot: write the loss-curve PNG at the end.
    """

    every: int = 10
    output_dir: str = "runs/default"
    tensorboard: bool = True
    plot: bool = True

    def __post_init__(self) -> None:
        _check(self.every >= 1, "log.every", f"must be >= 1, got {self.every}")
        _check(bool(self.output_dir), "log.output_dir", "must not be empty")


@dataclasses.dataclass(frozen=True)
class ParallelSection:
    """The mesh of an ``--nproc N`` run, shaped like :class:`ftrain.distributed.ParallelConfig` (validated by it)."""

    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        try:
            self.config()
        except ValueError as err:
            raise RecipeError(f"parallel: {err}") from None

    def config(self, world_size: int | None = None) -> ParallelConfig:
        """The :class:`ParallelConfig`, resolved against ``world_size`` when given."""
        cfg = ParallelConfig(dp_replicate=self.dp_replicate, dp_shard=self.dp_shard, cp=self.cp, tp=self.tp)
        if world_size is None:
            return cfg
        if self.cp > 1 or self.tp > 1:
            # Both need a model-specific plan (which Linear layers split how; an attention that gathers K/V) that the
            # built-in recipes do not carry: refuse before any process starts instead of training wrongly.
            raise ValueError(
                f"cp={self.cp}, tp={self.tp}: the ftrain command runs data parallel, FSDP and HSDP (dp_replicate, "
                "dp_shard); for context or tensor parallel use the Python API (shard_state with a tp_plan, "
                "apply_context_parallel; see docs/distributed.md)"
            )
        return cfg.resolve(world_size)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What every recipe holds; a task's subclass types ``model`` and ``data`` and sets ``task``."""

    task: ClassVar[str] = ""
    model: Any = None
    data: Any = None
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    parallel: ParallelSection = ParallelSection()


# ------------------------------------------------------------------------------------------------------------------
# YAML <-> dataclass


def to_dict(recipe: Any) -> dict[str, Any]:
    """A recipe as plain JSON/YAML data (tuples become lists), with its ``task`` first."""
    body = dataclasses.asdict(recipe)
    task = getattr(recipe, "task", "")
    return {"task": task, **_listify(body)} if task else _listify(body)


def _listify(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _listify(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_listify(v) for v in obj]
    return obj


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Builds the dataclass ``cls`` from parsed YAML, every key checked against the fields and their types.

    Args:
        cls: a (nested) dataclass type.
        data: a mapping of field names to values; missing fields keep their defaults.
        where: the key path of ``data``, for messages.

    Returns:
        The dataclass instance.

    Raises:
        RecipeError: an unknown key (with the closest known one), a value of the wrong type (with its key path),
            or a value the section rejects.
    """
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {where or 'file'} must be a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"recipe key {path!r} is unknown{hint}; known keys: {', '.join(fields)}")
        values[key] = _convert(hints[key], value, path)
    try:
        return cls(**values)
    except RecipeError:
        raise
    except (TypeError, ValueError) as err:
        raise RecipeError(f"recipe {where or 'file'}: {err}") from None


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, path)
            except RecipeError:
                continue
        return _wrong(tp, value, path)
    if origin is Literal:
        return value if value in args else _wrong(tp, value, path, f"one of {', '.join(map(repr, args))}")
    if origin is tuple:
        variadic = len(args) == 2 and args[1] is Ellipsis
        if not isinstance(value, list | tuple) or (not variadic and len(value) != len(args)):
            return _wrong(tp, value, path, "a list" if variadic else f"a list of {len(args)} values")
        kinds = [args[0]] * len(value) if variadic else list(args)
        return tuple(_convert(k, v, f"{path}[{i}]") for i, (k, v) in enumerate(zip(kinds, value)))
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    if tp is Any:
        return value
    return _wrong(tp, value, path)


def _wrong(tp: Any, value: Any, path: str, expected: str | None = None) -> Any:
    want = expected or getattr(tp, "__name__", str(tp).replace("typing.", ""))
    raise RecipeError(f"recipe key {path!r} must be {want}, got {value!r} ({type(value).__name__})")
