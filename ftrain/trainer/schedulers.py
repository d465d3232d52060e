"""transformers' scheduler functions (``transformers.optimization``) returning ftrain schedules.

A script written for transformers builds its schedule with ``get_scheduler(name, optimizer, num_warmup_steps,
num_training_steps, scheduler_specific_kwargs)`` or one of the ``get_*_schedule*`` functions. Those take a torch
optimizer and return a ``LambdaLR`` that rewrites the optimizer's learning rate in place at each ``step()``. The
functions here keep transformers' names, parameters and defaults, but take the learning rate instead of the torch
optimizer and return an ftrain schedule: ``schedule(step) -> lr``, a pure function of the number of updates done
(:mod:`ftrain.schedules`), which goes into an :mod:`ftrain.optim` optimizer as its ``learning_rate``. Its value at
step ``k`` equals the torch optimizer's learning rate after ``k`` calls to ``scheduler.step()``.

``optimizer`` is what carries the base learning rate:

- a number (the learning rate itself), or
- an ftrain optimizer description ``(factory, kwargs)`` whose ``kwargs`` hold ``learning_rate`` — what
  ``Trainer.get_optimizer_cls_and_kwargs(args)`` returns and ``Trainer(optimizer_cls_and_kwargs=...)`` takes.

A torch optimizer is refused with advice: ftrain's schedule does not drive it, so accepting it would silently leave
its learning rate constant.

The formulas live in :mod:`ftrain.schedules`, once; this module only maps transformers' signatures onto them.
The metric-driven ``reduce_lr_on_plateau`` gives :func:`ftrain.schedules.reduce_on_plateau`, a gradient
transformation fed after each evaluation by :func:`ftrain.schedules.plateau_update`; ``greedy`` (transformers'
``GreedyLR``) gives :func:`ftrain.schedules.greedy`, fed the same way.

Example:
    >>> import torch
    >>> from ftrain import optim
    >>> schedule = get_scheduler("linear", 1e-3, num_warmup_steps=2, num_training_steps=10)
    >>> [round(float(schedule(torch.tensor(k))), 6) for k in (0, 1, 2, 10)]
    [0.0, 0.0005, 0.001, 0.0]
    >>> tx = optim.adamw(schedule, weight_decay=0.01)  # the schedule is the optimizer's learning rate
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any

import torch

from ftrain import schedules as _schedules
from ftrain.optim.base import GradientTransformation, Schedule
from ftrain.trainer.args import SchedulerType

__all__ = [
    "get_constant_schedule",
    "get_constant_schedule_with_warmup",
    "get_cosine_schedule_with_warmup",
    "get_cosine_with_hard_restarts_schedule_with_warmup",
    "get_cosine_with_min_lr_schedule_with_warmup",
    "get_cosine_with_min_lr_schedule_with_warmup_lr_rate",
    "get_greedy_schedule",
    "get_inverse_sqrt_schedule",
    "get_linear_schedule_with_warmup",
    "get_polynomial_decay_schedule_with_warmup",
    "get_reduce_on_plateau_schedule",
    "get_scheduler",
    "get_wsd_schedule",
]

_TORCH_OPTIMIZER_ADVICE = (
    "ftrain's schedules are pure functions step -> learning rate that an ftrain.optim optimizer reads; they do not "
    "drive a torch optimizer, so one given here would keep a constant learning rate. Pass the learning rate instead "
    "(e.g. optimizer.param_groups[0]['lr']) and give the returned schedule to an ftrain.optim optimizer as its "
    "learning_rate, or use transformers.get_scheduler to get a torch LambdaLR."
)


# ----------------------------------------------------------------------------------------------------------
# The base learning rate, and transformers' ``last_epoch``.


def _learning_rate(optimizer: Any, where: str) -> float:
    """The base learning rate ``optimizer`` carries: a number, or ``kwargs["learning_rate"]`` of an ftrain
    optimizer description ``(factory, kwargs)``.

    Raises:
        TypeError: a torch optimizer (with advice), or anything else that carries no learning rate.
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{where}: got a torch.optim.{type(optimizer).__name__}. {_TORCH_OPTIMIZER_ADVICE}")
    if isinstance(optimizer, numbers.Real) and not isinstance(optimizer, bool):
        return float(optimizer)
    if isinstance(optimizer, torch.Tensor) and optimizer.numel() == 1 and optimizer.is_floating_point():
        return float(optimizer)
    if isinstance(optimizer, tuple) and len(optimizer) == 2 and callable(optimizer[0]):
        kwargs = optimizer[1]
        if isinstance(kwargs, Mapping) and isinstance(kwargs.get("learning_rate"), numbers.Real):
            return float(kwargs["learning_rate"])
        raise TypeError(
            f"{where}: the optimizer description ({getattr(optimizer[0], '__name__', optimizer[0])!r}, kwargs) has no "
            "numeric kwargs['learning_rate'] to schedule; put the base learning rate there, or pass it directly."
        )
    raise TypeError(
        f"{where}: expected the learning rate (a number) or an ftrain optimizer description (factory, kwargs) with "
        f"kwargs['learning_rate'], got {type(optimizer).__name__}."
    )


def _resumed(schedule: Schedule, last_epoch: int, where: str) -> Schedule:
    """``schedule`` as a torch ``LambdaLR`` built with ``last_epoch`` runs it: such a scheduler starts ``last_epoch
    + 1`` steps in, so step ``k`` of the result is step ``k + last_epoch + 1`` of ``schedule`` (``-1``: unchanged).

    Raises:
        ValueError: ``last_epoch`` below -1, or not an int.
    """
    if isinstance(last_epoch, bool) or not isinstance(last_epoch, int) or last_epoch < -1:
        raise ValueError(f"{where}: last_epoch must be an int >= -1 (-1 starts at step 0), got {last_epoch!r}.")
    if last_epoch == -1:
        return schedule
    offset = last_epoch + 1

    def resumed(step: torch.Tensor) -> torch.Tensor:
        return schedule(step + offset)

    return resumed


def _build(where: str, optimizer: Any, last_epoch: int, build: Callable[..., Schedule], **kwargs: Any) -> Schedule:
    return _resumed(build(_learning_rate(optimizer, where), **kwargs), last_epoch, where)


# ----------------------------------------------------------------------------------------------------------
# transformers' functions, one per schedule.


def get_constant_schedule(optimizer: Any, last_epoch: int = -1) -> Schedule:
    """The constant learning rate (transformers' ``get_constant_schedule``); see the module docstring for
    ``optimizer`` and ``last_epoch`` (how many steps a resumed torch scheduler has already taken, minus one).

    Example:
        >>> import torch
        >>> float(get_constant_schedule(0.1)(torch.tensor(7)))
        0.1
    """
    return _build("get_constant_schedule", optimizer, last_epoch, _schedules.constant_schedule)


def get_constant_schedule_with_warmup(optimizer: Any, num_warmup_steps: int, last_epoch: int = -1) -> Schedule:
    """Linear warmup over ``num_warmup_steps``, then constant (:func:`ftrain.schedules.constant_with_warmup_schedule`).

    Example:
        >>> import torch
        >>> [float(get_constant_schedule_with_warmup(1.0, 2)(torch.tensor(k))) for k in range(4)]
        [0.0, 0.5, 1.0, 1.0]
    """
    return _build(
        "get_constant_schedule_with_warmup",
        optimizer,
        last_epoch,
        _schedules.constant_with_warmup_schedule,
        num_warmup_steps=num_warmup_steps,
    )


def get_linear_schedule_with_warmup(
    optimizer: Any, num_warmup_steps: int, num_training_steps: int, last_epoch: int = -1
) -> Schedule:
    """Linear warmup, then linear decay to 0 at ``num_training_steps`` (:func:`ftrain.schedules.linear_schedule`).

    Example:
        >>> import torch
        >>> [float(get_linear_schedule_with_warmup(1.0, 1, 3)(torch.tensor(k))) for k in range(4)]
        [0.0, 1.0, 0.5, 0.0]
    """
    return _build(
        "get_linear_schedule_with_warmup",
        optimizer,
        last_epoch,
        _schedules.linear_schedule,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
    )


def get_cosine_schedule_with_warmup(
    optimizer: Any, num_warmup_steps: int, num_training_steps: int, num_cycles: float = 0.5, last_epoch: int = -1
) -> Schedule:
    """Linear warmup, then ``num_cycles`` cosine waves (:func:`ftrain.schedules.cosine_schedule`)."""
    return _build(
        "get_cosine_schedule_with_warmup",
        optimizer,
        last_epoch,
        _schedules.cosine_schedule,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        num_cycles=num_cycles,
    )


def get_cosine_with_hard_restarts_schedule_with_warmup(
    optimizer: Any, num_warmup_steps: int, num_training_steps: int, num_cycles: int = 1, last_epoch: int = -1
) -> Schedule:
    """Linear warmup, then ``num_cycles`` hard-restarted cosines
    (:func:`ftrain.schedules.cosine_with_restarts_schedule`)."""
    return _build(
        "get_cosine_with_hard_restarts_schedule_with_warmup",
        optimizer,
        last_epoch,
        _schedules.cosine_with_restarts_schedule,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        num_cycles=num_cycles,
    )


def get_polynomial_decay_schedule_with_warmup(
    optimizer: Any,
    num_warmup_steps: int,
    num_training_steps: int,
    lr_end: float = 1e-7,
    power: float = 1.0,
    last_epoch: int = -1,
) -> Schedule:
    """Linear warmup, then a polynomial decay to ``lr_end`` (:func:`ftrain.schedules.polynomial_schedule`)."""
    return _build(
        "get_polynomial_decay_schedule_with_warmup",
        optimizer,
        last_epoch,
        _schedules.polynomial_schedule,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        lr_end=lr_end,
        power=power,
    )


def get_inverse_sqrt_schedule(
    optimizer: Any, num_warmup_steps: int, timescale: int | None = None, last_epoch: int = -1
) -> Schedule:
    """Linear warmup, then ``1 / sqrt`` decay (:func:`ftrain.schedules.inverse_sqrt_schedule`)."""
    return _build(
        "get_inverse_sqrt_schedule",
        optimizer,
        last_epoch,
        _schedules.inverse_sqrt_schedule,
        num_warmup_steps=num_warmup_steps,
        timescale=timescale,
    )


def get_cosine_with_min_lr_schedule_with_warmup(
    optimizer: Any,
    num_warmup_steps: int,
    num_training_steps: int,
    num_cycles: float = 0.5,
    last_epoch: int = -1,
    min_lr: float | None = None,
    min_lr_rate: float | None = None,
) -> Schedule:
    """Linear warmup, then cosine to ``min_lr`` (or ``min_lr_rate`` × lr)
    (:func:`ftrain.schedules.cosine_with_min_lr_schedule`)."""
    return _build(
        "get_cosine_with_min_lr_schedule_with_warmup",
        optimizer,
        last_epoch,
        _schedules.cosine_with_min_lr_schedule,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        num_cycles=num_cycles,
        min_lr=min_lr,
        min_lr_rate=min_lr_rate,
    )


def get_cosine_with_min_lr_schedule_with_warmup_lr_rate(
    optimizer: Any,
    num_warmup_steps: int,
    num_training_steps: int,
    num_cycles: float = 0.5,
    last_epoch: int = -1,
    min_lr: float | None = None,
    min_lr_rate: float | None = None,
    warmup_lr_rate: float | None = None,
) -> Schedule:
    """Warmup from ``warmup_lr_rate`` × lr, then cosine to ``min_lr`` (transformers' ``cosine_warmup_with_min_lr``;
    :func:`ftrain.schedules.cosine_warmup_with_min_lr_schedule`)."""
    return _build(
        "get_cosine_with_min_lr_schedule_with_warmup_lr_rate",
        optimizer,
        last_epoch,
        _schedules.cosine_warmup_with_min_lr_schedule,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        num_cycles=num_cycles,
        min_lr=min_lr,
        min_lr_rate=min_lr_rate,
        warmup_lr_rate=warmup_lr_rate,
    )


def get_wsd_schedule(
    optimizer: Any,
    num_warmup_steps: int,
    num_decay_steps: int,
    num_training_steps: int | None = None,
    num_stable_steps: int | None = None,
    warmup_type: str = "linear",
    decay_type: str = "cosine",
    min_lr_ratio: float = 0,
    num_cycles: float = 0.5,
    last_epoch: int = -1,
) -> Schedule:
    """Warmup, stable, decay (:func:`ftrain.schedules.warmup_stable_decay_schedule`)."""
    return _build(
        "get_wsd_schedule",
        optimizer,
        last_epoch,
        _schedules.warmup_stable_decay_schedule,
        num_warmup_steps=num_warmup_steps,
        num_decay_steps=num_decay_steps,
        num_training_steps=num_training_steps,
        num_stable_steps=num_stable_steps,
        warmup_type=warmup_type,
        decay_type=decay_type,
        min_lr_ratio=min_lr_ratio,
        num_cycles=num_cycles,
    )


#: ``torch.optim.lr_scheduler.ReduceLROnPlateau``'s keyword arguments, which transformers passes through.
PLATEAU_KWARGS = ("mode", "factor", "patience", "threshold", "threshold_mode", "cooldown", "min_lr", "eps")


def get_reduce_on_plateau_schedule(optimizer: Any, **kwargs: Any) -> GradientTransformation:
    """torch's ``ReduceLROnPlateau(optimizer, **kwargs)`` (transformers' ``get_reduce_on_plateau_schedule``) as
    :func:`ftrain.schedules.reduce_on_plateau`: a gradient transformation to put last in the optimizer's chain, whose
    scale :func:`ftrain.schedules.plateau_update` lowers after each evaluation. ``min_lr`` and ``eps`` are learning
    rates in torch; they become fractions of the base learning rate here.

    Raises:
        ValueError: a keyword ``ReduceLROnPlateau`` does not take, a ``min_lr`` that is not one number, or a base
            learning rate that is not positive.
        TypeError: an ``optimizer`` that carries no learning rate.

    Example:
        >>> import torch
        >>> from ftrain.schedules import plateau_update
        >>> tx = get_reduce_on_plateau_schedule(0.1, factor=0.5, patience=0)
        >>> state = plateau_update(plateau_update(tx.init({"w": torch.zeros(1)}), 1.0), 2.0)
        >>> float(state.scale)
        0.5
    """
    lr = _learning_rate(optimizer, "get_reduce_on_plateau_schedule")
    unknown = sorted(set(kwargs) - set(PLATEAU_KWARGS))
    if unknown:
        raise ValueError(
            f"{unknown} are not arguments of reduce_lr_on_plateau (torch's ReduceLROnPlateau); it takes "
            f"{list(PLATEAU_KWARGS)}."
        )
    if not lr > 0:
        raise ValueError(f"reduce_lr_on_plateau needs a learning rate > 0 (it scales it), got {lr}.")
    kw = dict(kwargs)
    min_lr, eps = kw.pop("min_lr", 0.0), kw.pop("eps", 1e-8)
    if not isinstance(min_lr, numbers.Real):
        raise ValueError(f"reduce_lr_on_plateau: min_lr must be one number (one learning rate), got {min_lr!r}.")
    return _schedules.reduce_on_plateau(**kw, min_scale=min_lr / lr, eps=eps / lr)


#: transformers' ``GreedyLR`` keyword arguments (after the optimizer).
GREEDY_KWARGS = (
    "mode", "factor", "patience", "threshold", "threshold_mode", "cooldown", "warmup", "min_lr", "max_lr", "eps",
    "verbose", "smooth", "window_size", "reset_start",
)  # fmt: skip


def get_greedy_schedule(optimizer: Any, **kwargs: Any) -> GradientTransformation:
    """transformers' ``GreedyLR(optimizer, **kwargs)`` (``get_greedy_schedule``) as :func:`ftrain.schedules.greedy`:
    a gradient transformation to put last in the optimizer's chain, whose scale
    :func:`ftrain.schedules.plateau_update` raises or lowers after each evaluation. ``min_lr``, ``max_lr`` and
    ``eps`` are learning rates in transformers (defaults 1e-3, 1.0, 1e-8); they become fractions of the base
    learning rate here.

    Raises:
        ValueError: a keyword ``GreedyLR`` does not take, ``min_lr`` / ``max_lr`` that are not one number each,
            ``verbose=True`` (ftrain does not print; the Trainer logs ``learning_rate``), or a base learning rate
            that is not positive.
        TypeError: an ``optimizer`` that carries no learning rate.

    Example:
        >>> import torch
        >>> from ftrain.schedules import plateau_update
        >>> tx = get_greedy_schedule(0.1, factor=0.5, patience=0)
        >>> state = plateau_update(plateau_update(tx.init({"w": torch.zeros(1)}), 2.0), 3.0)
        >>> round(float(state.scale), 6)  # raised after 2.0 (an improvement on inf), lowered after 3.0
        1.0
    """
    lr = _learning_rate(optimizer, "get_greedy_schedule")
    unknown = sorted(set(kwargs) - set(GREEDY_KWARGS))
    if unknown:
        raise ValueError(
            f"{unknown} are not arguments of greedy (transformers' GreedyLR); it takes {list(GREEDY_KWARGS)}."
        )
    if not lr > 0:
        raise ValueError(f"greedy needs a learning rate > 0 (it scales it), got {lr}.")
    kw = dict(kwargs)
    if kw.pop("verbose", False):
        raise ValueError(
            "greedy: verbose=True (printing each change) is not supported by ftrain; drop it and read the "
            "'learning_rate' the Trainer logs."
        )
    min_lr, max_lr, eps = kw.pop("min_lr", 1e-3), kw.pop("max_lr", 1.0), kw.pop("eps", 1e-8)
    for name, value in (("min_lr", min_lr), ("max_lr", max_lr)):
        if not isinstance(value, numbers.Real):
            raise ValueError(f"greedy: {name} must be one number (one learning rate), got {value!r}.")
    return _schedules.greedy(**kw, min_scale=min_lr / lr, max_scale=max_lr / lr, eps=eps / lr)


# ----------------------------------------------------------------------------------------------------------
# By name.


def get_scheduler(
    name: str | Enum,
    optimizer: Any,
    num_warmup_steps: int | None = None,
    num_training_steps: int | None = None,
    scheduler_specific_kwargs: dict | None = None,
) -> Schedule | GradientTransformation:
    """The schedule called ``name``, built as transformers' ``get_scheduler`` builds it: ``constant`` ignores
    every other argument, ``constant_with_warmup`` the scheduler-specific kwargs, ``inverse_sqrt``
    ``num_training_steps``; every other step schedule needs ``num_warmup_steps`` (and all but
    ``warmup_stable_decay`` ``num_training_steps``).

    Args:
        name: a ``SchedulerType`` (ftrain's or transformers') or its value.
        optimizer: the base learning rate, or an ftrain optimizer description ``(factory, kwargs)`` (see the
            module docstring).
        num_warmup_steps: warmup steps; required by every schedule except ``constant`` and
            the metric-driven ``reduce_lr_on_plateau`` and ``greedy``.
        num_training_steps: the total number of optimizer steps, for schedules that end at a step.
        scheduler_specific_kwargs: transformers' ``lr_scheduler_kwargs`` (``num_cycles``, ``power``, ``min_lr``...).

    Returns:
        ``schedule(step) -> lr``; for ``reduce_lr_on_plateau`` and ``greedy``, the gradient transformation of
        :func:`get_reduce_on_plateau_schedule` / :func:`get_greedy_schedule`.

    Raises:
        ValueError: an unknown name, or a missing or invalid argument.
        TypeError: a scheduler-specific kwarg the schedule does not take, or an ``optimizer`` that carries no
            learning rate (a torch optimizer included).
    """
    key = SchedulerType(name).value
    kwargs = dict(scheduler_specific_kwargs or {})
    if key == "reduce_lr_on_plateau":
        return get_reduce_on_plateau_schedule(optimizer, **kwargs)
    if key == "greedy":
        return get_greedy_schedule(optimizer, **kwargs)
    lr = _learning_rate(optimizer, f"get_scheduler({key!r})")
    return _schedules.get_schedule(
        key, lr, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps, **kwargs
    )
