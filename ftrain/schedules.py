"""Learning-rate schedules: every Hugging Face ``SchedulerType`` as a pure function of the step.

A schedule is ``schedule(step) -> lr``: a 0-d integer step tensor in, the learning rate out as a 0-d float64
tensor on the step's device. It is ``base_lr * λ(step)`` where ``λ`` is the multiplier of the matching
``transformers.get_scheduler`` schedule, so ``schedule(k)`` equals the optimizer's lr after ``k`` calls to
``scheduler.step()`` (HF's Trainer uses ``schedule(k)`` for the update of optimizer step ``k``, 0-based).

Every schedule is branch-free (``torch.where`` / ``clamp``, no Python ``if`` on the step), so a compiled train
step that calls it compiles once and never recompiles as the step changes. Phases that HF would not evaluate
at a given step are clamped into their own domain, so no ``nan`` appears even in the branch ``torch.where``
discards.

Metric-driven schedules (:data:`METRIC_SCHEDULE_NAMES`) are not functions of the step: :func:`reduce_on_plateau`
(torch's ``ReduceLROnPlateau``) and :func:`greedy` (transformers' ``GreedyLR``) are gradient transformations whose
scale :func:`plateau_update` changes after each evaluation.

Example:
    >>> import torch
    >>> from ftrain.schedules import get_schedule
    >>> sched = get_schedule("cosine", 1e-3, num_warmup_steps=2, num_training_steps=10)
    >>> [round(float(sched(torch.tensor(k))), 6) for k in (0, 1, 2, 6, 10)]
    [0.0, 0.0005, 0.001, 0.0005, 0.0]
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from collections.abc import Callable
from enum import Enum
from typing import Any, NamedTuple

import torch

from ftrain import tree as _tree
from ftrain.optim.base import GradientTransformation, OptState, Params, Schedule, Updates, check_float_params

__all__ = [
    "METRIC_SCHEDULE_NAMES",
    "SCHEDULE_NAMES",
    "GreedyHyperparams",
    "GreedyState",
    "PlateauHyperparams",
    "ReduceOnPlateauState",
    "constant_schedule",
    "constant_with_warmup_schedule",
    "cosine_schedule",
    "cosine_warmup_with_min_lr_schedule",
    "cosine_with_min_lr_schedule",
    "cosine_with_restarts_schedule",
    "get_schedule",
    "greedy",
    "has_metric_schedule",
    "inverse_sqrt_schedule",
    "is_metric_schedule_state",
    "linear_schedule",
    "plateau_update",
    "polynomial_schedule",
    "reduce_on_plateau",
    "warmup_stable_decay_schedule",
]

_SHAPES = ("linear", "cosine", "1-sqrt")


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


def _as_step(step: torch.Tensor) -> torch.Tensor:
    """The step as a float64 tensor on its own device (integers below 2**53 convert exactly)."""
    return torch.as_tensor(step).to(torch.float64)


def _check_steps(where: str, **steps: int | None) -> None:
    for name, value in steps.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0):
            raise ValueError(f"{where}: {name} must be a non-negative int, got {value!r}.")


def _linear_warmup(s: torch.Tensor, num_warmup_steps: int) -> torch.Tensor:
    """HF's ``float(step) / float(max(1, num_warmup_steps))``."""
    return s / float(max(1, num_warmup_steps))


def _half_cosine(progress: torch.Tensor, num_cycles: float) -> torch.Tensor:
    """HF's ``0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))``."""
    return 0.5 * (1.0 + torch.cos((math.pi * float(num_cycles) * 2.0) * progress))


def _cosine_progress(s: torch.Tensor, num_warmup_steps: int, num_training_steps: int) -> torch.Tensor:
    """HF's ``float(step - W) / float(max(1, T - W))``."""
    return (s - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))


# ----------------------------------------------------------------------------------------------------------
# Step schedules
# ----------------------------------------------------------------------------------------------------------


def constant_schedule(lr: float) -> Schedule:
    """A constant learning rate: ``λ(s) = 1`` (HF ``constant``, which ignores warmup).

    Args:
        lr: The learning rate.

    Returns:
        ``schedule(step) -> lr`` (0-d float64 on the step's device).

    Example:
        >>> import torch
        >>> float(constant_schedule(0.1)(torch.tensor(7)))
        0.1
    """
    lr = float(lr)

    def schedule(step: torch.Tensor) -> torch.Tensor:
        return torch.full_like(_as_step(step), lr)

    return schedule


def constant_with_warmup_schedule(lr: float, *, num_warmup_steps: int) -> Schedule:
    """Linear warmup from 0, then constant: ``λ(s) = s / max(1, W)`` for ``s < W``, else ``1``.

    Args:
        lr: The peak learning rate.
        num_warmup_steps: ``W``, the number of warmup steps.

    Returns:
        ``schedule(step) -> lr``.

    Example:
        >>> import torch
        >>> sched = constant_with_warmup_schedule(1.0, num_warmup_steps=4)
        >>> [float(sched(torch.tensor(k))) for k in range(6)]
        [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    """
    _check_steps("constant_with_warmup_schedule", num_warmup_steps=num_warmup_steps)
    lr = float(lr)

    def schedule(step: torch.Tensor) -> torch.Tensor:
        s = _as_step(step)
        return lr * torch.where(s < num_warmup_steps, _linear_warmup(s, num_warmup_steps), 1.0)

    return schedule


def linear_schedule(lr: float, *, num_warmup_steps: int, num_training_steps: int) -> Schedule:
    """Linear warmup from 0, then linear decay to 0 at ``T``.

    ``λ(s) = s / max(1, W)`` for ``s < W``, else ``max(0, (T - s) / max(1, T - W))``.

    Args:
        lr: The peak learning rate.
        num_warmup_steps: ``W``.
        num_training_steps: ``T``, the total number of optimizer steps.

    Returns:
        ``schedule(step) -> lr``.

    Example:
        >>> import torch
        >>> sched = linear_schedule(1.0, num_warmup_steps=2, num_training_steps=6)
        >>> [float(sched(torch.tensor(k))) for k in range(8)]
        [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    """
    _check_steps("linear_schedule", num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps)
    lr = float(lr)
    decay_steps = float(max(1, num_training_steps - num_warmup_steps))

    def schedule(step: torch.Tensor) -> torch.Tensor:
        s = _as_step(step)
        decay = torch.clamp((num_training_steps - s) / decay_steps, min=0.0)
        return lr * torch.where(s < num_warmup_steps, _linear_warmup(s, num_warmup_steps), decay)

    return schedule


def cosine_schedule(lr: float, *, num_warmup_steps: int, num_training_steps: int, num_cycles: float = 0.5) -> Schedule:
    """Linear warmup from 0, then a cosine from ``lr`` down to 0.

    ``p = (s - W) / max(1, T - W)``; ``λ(s) = max(0, 0.5 (1 + cos(2π · num_cycles · p)))`` after warmup.

    Args:
        lr: The peak learning rate.
        num_warmup_steps: ``W``.
        num_training_steps: ``T``.
        num_cycles: Number of cosine waves; the default 0.5 is one half-cosine from 1 to 0.

    Returns:
        ``schedule(step) -> lr``.

    Example:
        >>> import torch
        >>> sched = cosine_schedule(1.0, num_warmup_steps=0, num_training_steps=4)
        >>> [round(float(sched(torch.tensor(k))), 4) for k in range(5)]
        [1.0, 0.8536, 0.5, 0.1464, 0.0]
    """
    _check_steps("cosine_schedule", num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps)
    lr = float(lr)

    def schedule(step: torch.Tensor) -> torch.Tensor:
        s = _as_step(step)
        decay = torch.clamp(
            _half_cosine(_cosine_progress(s, num_warmup_steps, num_training_steps), num_cycles), min=0.0
        )
        return lr * torch.where(s < num_warmup_steps, _linear_warmup(s, num_warmup_steps), decay)

    return schedule


def cosine_with_restarts_schedule(
    lr: float, *, num_warmup_steps: int, num_training_steps: int, num_cycles: int = 1
) -> Schedule:
    """Linear warmup, then ``num_cycles`` hard-restarted half-cosines from ``lr`` to 0, and 0 from ``T`` on.

    ``p = (s - W) / max(1, T - W)``; after warmup ``λ(s) = 0`` if ``p >= 1``, else
    ``max(0, 0.5 (1 + cos(π · ((num_cycles · p) mod 1))))``.

    Args:
        lr: The peak learning rate.
        num_warmup_steps: ``W``.
        num_training_steps: ``T``.
        num_cycles: Number of hard restarts.

    Returns:
        ``schedule(step) -> lr``.

    Example:
        >>> import torch
        >>> sched = cosine_with_restarts_schedule(1.0, num_warmup_steps=0, num_training_steps=4, num_cycles=2)
        >>> [round(float(sched(torch.tensor(k))), 4) for k in range(5)]
        [1.0, 0.5, 1.0, 0.5, 0.0]
    """
    _check_steps(
        "cosine_with_restarts_schedule",
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
    )
    lr = float(lr)

    def schedule(step: torch.Tensor) -> torch.Tensor:
        s = _as_step(step)
        progress = _cosine_progress(s, num_warmup_steps, num_training_steps)
        wave = 0.5 * (1.0 + torch.cos(math.pi * torch.remainder(float(num_cycles) * progress, 1.0)))
        decay = torch.where(progress >= 1.0, 0.0, torch.clamp(wave, min=0.0))
        return lr * torch.where(s < num_warmup_steps, _linear_warmup(s, num_warmup_steps), decay)

    return schedule


def polynomial_schedule(
    lr: float,
    *,
    num_warmup_steps: int,
    num_training_steps: int,
    lr_end: float = 1e-7,
    power: float = 1.0,
) -> Schedule:
    """Linear warmup, then a polynomial decay from ``lr`` to ``lr_end`` at ``T``, and ``lr_end`` after.

    After warmup and up to ``T``: ``lr(s) = (lr - lr_end) · (1 - (s - W) / (T - W))^power + lr_end``.

    Args:
        lr: The peak learning rate; must be larger than ``lr_end``.
        num_warmup_steps: ``W``.
        num_training_steps: ``T``; must differ from ``W`` (HF divides by ``T - W``).
        lr_end: The final learning rate.
        power: The polynomial power (1.0 is linear decay).

    Returns:
        ``schedule(step) -> lr``.

    Raises:
        ValueError: ``lr <= lr_end``, or ``num_training_steps == num_warmup_steps``.

    Example:
        >>> import torch
        >>> sched = polynomial_schedule(1.0, num_warmup_steps=0, num_training_steps=4, lr_end=0.2, power=2.0)
        >>> [round(float(sched(torch.tensor(k))), 4) for k in range(6)]
        [1.0, 0.65, 0.4, 0.25, 0.2, 0.2]
    """
    _check_steps("polynomial_schedule", num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps)
    lr_init, lr_end, power = float(lr), float(lr_end), float(power)
    if not lr_init > lr_end:
        raise ValueError(
            f"polynomial_schedule: lr_end ({lr_end}) must be smaller than the initial lr ({lr_init}), since "
            "the schedule decays from lr to lr_end. Lower lr_end (default 1e-7) or raise the learning rate."
        )
    if num_training_steps == num_warmup_steps:
        raise ValueError(
            f"polynomial_schedule: num_training_steps == num_warmup_steps == {num_warmup_steps} leaves no "
            "decay steps (transformers raises ZeroDivisionError at that step). Use fewer warmup steps."
        )
    lr_range = lr_init - lr_end
    decay_steps = num_training_steps - num_warmup_steps

    def schedule(step: torch.Tensor) -> torch.Tensor:
        s = _as_step(step)
        pct_remaining = torch.clamp(1.0 - (s - num_warmup_steps) / decay_steps, min=0.0)
        decay = (lr_range * pct_remaining**power + lr_end) / lr_init
        lam = torch.where(s > num_training_steps, lr_end / lr_init, decay)
        return lr_init * torch.where(s < num_warmup_steps, _linear_warmup(s, num_warmup_steps), lam)

    return schedule


def inverse_sqrt_schedule(lr: float, *, num_warmup_steps: int, timescale: int | None = None) -> Schedule:
    """Linear warmup, then inverse square-root decay: ``λ(s) = 1 / sqrt((s + timescale - W) / timescale)``.

    Args:
        lr: The peak learning rate.
        num_warmup_steps: ``W``.
        timescale: Decay time scale; defaults to ``W``, or 10,000 when ``W == 0`` (as HF).

    Returns:
        ``schedule(step) -> lr``.

    Raises:
        ValueError: ``timescale <= 0``.

    Example:
        >>> import torch
        >>> sched = inverse_sqrt_schedule(1.0, num_warmup_steps=2)
        >>> [round(float(sched(torch.tensor(k))), 4) for k in (0, 1, 2, 4, 6)]
        [0.0, 0.5, 1.0, 0.7071, 0.5774]
    """
    _check_steps("inverse_sqrt_schedule", num_warmup_steps=num_warmup_steps)
    if timescale is None:
        timescale = num_warmup_steps or 10_000
    if not timescale > 0:
        raise ValueError(f"inverse_sqrt_schedule: timescale must be positive, got {timescale!r}.")
    lr = float(lr)
    shift = timescale - num_warmup_steps

    def schedule(step: torch.Tensor) -> torch.Tensor:
        s = _as_step(step)
        decay = 1.0 / torch.sqrt((torch.clamp(s, min=num_warmup_steps) + shift) / timescale)
        return lr * torch.where(s < num_warmup_steps, _linear_warmup(s, num_warmup_steps), decay)

    return schedule


def _min_lr_rate(where: str, lr: float, min_lr: float | None, min_lr_rate: float | None) -> float:
    if min_lr is not None and min_lr_rate is not None:
        raise ValueError(
            f"{where}: got both min_lr={min_lr} and min_lr_rate={min_lr_rate}; set exactly one "
            "(min_lr is absolute, min_lr_rate is a fraction of the learning rate)."
        )
    if min_lr is not None:
        return float(min_lr) / float(lr)
    if min_lr_rate is None:
        raise ValueError(
            f"{where}: set exactly one of min_lr (absolute) or min_lr_rate (fraction of the learning rate), "
            "e.g. lr_scheduler_kwargs={'min_lr_rate': 0.1}."
        )
    return float(min_lr_rate)


def cosine_with_min_lr_schedule(
    lr: float,
    *,
    num_warmup_steps: int,
    num_training_steps: int,
    num_cycles: float = 0.5,
    min_lr: float | None = None,
    min_lr_rate: float | None = None,
) -> Schedule:
    """:func:`cosine_schedule` that decays to ``min_lr`` instead of 0.

    After warmup ``λ(s) = max(0, c(s) · (1 - r) + r)``, ``c`` the cosine factor and ``r = min_lr_rate`` or
    ``min_lr / lr``.

    Args:
        lr: The peak learning rate.
        num_warmup_steps: ``W``.
        num_training_steps: ``T``.
        num_cycles: Number of cosine waves.
        min_lr: The final learning rate (absolute); exclusive with ``min_lr_rate``.
        min_lr_rate: The final learning rate as a fraction of ``lr``.

    Returns:
        ``schedule(step) -> lr``.

    Raises:
        ValueError: both or neither of ``min_lr`` / ``min_lr_rate``.

    Example:
        >>> import torch
        >>> sched = cosine_with_min_lr_schedule(1.0, num_warmup_steps=0, num_training_steps=2, min_lr=0.1)
        >>> [round(float(sched(torch.tensor(k))), 4) for k in range(3)]
        [1.0, 0.55, 0.1]
    """
    where = "cosine_with_min_lr_schedule"
    _check_steps(where, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps)
    rate = _min_lr_rate(where, lr, min_lr, min_lr_rate)
    lr = float(lr)

    def schedule(step: torch.Tensor) -> torch.Tensor:
        s = _as_step(step)
        factor = _half_cosine(_cosine_progress(s, num_warmup_steps, num_training_steps), num_cycles)
        decay = torch.clamp(factor * (1 - rate) + rate, min=0.0)
        return lr * torch.where(s < num_warmup_steps, _linear_warmup(s, num_warmup_steps), decay)

    return schedule


def cosine_warmup_with_min_lr_schedule(
    lr: float,
    *,
    num_warmup_steps: int,
    num_training_steps: int,
    num_cycles: float = 0.5,
    min_lr: float | None = None,
    min_lr_rate: float | None = None,
    warmup_lr_rate: float | None = None,
) -> Schedule:
    """Cosine to ``min_lr`` whose warmup starts above 0 and whose decay is shifted one step early (HF's
    ``cosine_warmup_with_min_lr``).

    Warmup (``s < W``): ``(s + 1) / max(1, W)``, or ``wr + (1 - wr) · s / max(1, W - 1)`` with
    ``wr = warmup_lr_rate``. After: ``p = (s - W + 1) / max(1, T - W)`` and
    ``λ = max(0, 0.5 (1 + cos(2π · num_cycles · p)) · (1 - r) + r)``, ``r = min_lr_rate`` or ``min_lr / lr``.

    Args:
        lr: The peak learning rate.
        num_warmup_steps: ``W``.
        num_training_steps: ``T``.
        num_cycles: Number of cosine waves.
        min_lr: The final learning rate (absolute); exclusive with ``min_lr_rate``.
        min_lr_rate: The final learning rate as a fraction of ``lr``.
        warmup_lr_rate: The first warmup step's learning rate as a fraction of ``lr``.

    Returns:
        ``schedule(step) -> lr``.

    Raises:
        ValueError: both or neither of ``min_lr`` / ``min_lr_rate``.

    Example:
        >>> import torch
        >>> sched = cosine_warmup_with_min_lr_schedule(
        ...     1.0, num_warmup_steps=2, num_training_steps=4, min_lr_rate=0.0)
        >>> [round(float(sched(torch.tensor(k))), 4) for k in range(5)]
        [0.5, 1.0, 0.5, 0.0, 0.5]
    """
    where = "cosine_warmup_with_min_lr_schedule"
    _check_steps(where, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps)
    rate = _min_lr_rate(where, lr, min_lr, min_lr_rate)
    lr, w, t = float(lr), float(num_warmup_steps), float(num_training_steps)
    wr = None if warmup_lr_rate is None else float(warmup_lr_rate)

    def warmup(s: torch.Tensor) -> torch.Tensor:
        if wr is None:  # static: fixed when the schedule is built
            return (s + 1.0) / max(1.0, w)
        return wr + (1.0 - wr) * s / max(1, w - 1)

    def schedule(step: torch.Tensor) -> torch.Tensor:
        s = _as_step(step)
        warm = warmup(s)
        progress = (s - w + 1.0) / max(1.0, t - w)
        factor = 0.5 * (1.0 + torch.cos(math.pi * num_cycles * 2.0 * progress))
        decay = torch.clamp(factor * (1 - rate) + rate, min=0.0)
        return lr * torch.where(s < w, warm, decay)

    return schedule


def _wsd_shape(kind: str, progress: torch.Tensor, num_cycles: float, *, rising: bool) -> torch.Tensor:
    """The un-scaled WSD factor for ``progress`` in [0, 1): warmup shapes rise 0→1, decay shapes fall 1→0."""
    if kind == "linear":
        return progress if rising else 1.0 - progress
    if kind == "cosine":
        if rising:
            return 0.5 * (1.0 - torch.cos(math.pi * progress))
        return _half_cosine(progress, num_cycles)
    # "1-sqrt"; the clamps only touch steps outside the phase, which HF never evaluates (sqrt would be nan).
    if rising:
        return 1.0 - torch.sqrt(torch.clamp(1.0 - progress, min=0.0))
    return 1.0 - torch.sqrt(torch.clamp(progress, min=0.0))


def warmup_stable_decay_schedule(
    lr: float,
    *,
    num_warmup_steps: int,
    num_decay_steps: int,
    num_training_steps: int | None = None,
    num_stable_steps: int | None = None,
    warmup_type: str = "linear",
    decay_type: str = "cosine",
    min_lr_ratio: float = 0,
    num_cycles: float = 0.5,
) -> Schedule:
    """Warmup–stable–decay (WSD): warmup ``W`` steps to ``lr``, hold ``S`` steps, decay ``D`` steps to
    ``min_lr_ratio · lr``, then stay there.

    With ``m = min_lr_ratio``: warmup ``λ = max(0, f_w(s / max(1, W)) · (1 - m) + m)``; stable ``λ = 1``;
    decay ``λ = max(0, f_d((s - W - S) / max(1, D)) · (1 - m) + m)``; after ``W + S + D``: ``λ = m``. ``f_w``
    is ``p`` / ``(1 - cos πp)/2`` / ``1 - sqrt(1 - p)`` and ``f_d`` is ``1 - p`` / ``(1 + cos
    2π·num_cycles·p)/2`` / ``1 - sqrt(p)`` for linear / cosine / 1-sqrt.

    Args:
        lr: The peak learning rate.
        num_warmup_steps: ``W``.
        num_decay_steps: ``D``.
        num_training_steps: ``T``; when ``num_stable_steps`` is not given, ``S = T - W - D``.
        num_stable_steps: ``S``; takes precedence over ``num_training_steps`` (with a warning if both are
            set).
        warmup_type: ``"linear"``, ``"cosine"`` or ``"1-sqrt"``.
        decay_type: ``"linear"``, ``"cosine"`` or ``"1-sqrt"``.
        min_lr_ratio: ``m``, the start and end learning rate as a fraction of ``lr``.
        num_cycles: Number of waves of the cosine decay.

    Returns:
        ``schedule(step) -> lr``.

    Raises:
        ValueError: neither ``num_training_steps`` nor ``num_stable_steps``; an unknown warmup or decay type.

    Example:
        >>> import torch
        >>> sched = warmup_stable_decay_schedule(
        ...     1.0, num_warmup_steps=2, num_decay_steps=2, num_stable_steps=2, decay_type="linear")
        >>> [float(sched(torch.tensor(k))) for k in range(8)]
        [0.0, 0.5, 1.0, 1.0, 1.0, 0.5, 0.0, 0.0]
    """
    where = "warmup_stable_decay_schedule"
    _check_steps(
        where,
        num_warmup_steps=num_warmup_steps,
        num_decay_steps=num_decay_steps,
        num_training_steps=num_training_steps,
        num_stable_steps=num_stable_steps,
    )
    if num_training_steps is None and num_stable_steps is None:
        raise ValueError(f"{where}: set num_training_steps (then S = T - W - D) or num_stable_steps.")
    if num_training_steps is not None and num_stable_steps is not None:
        warnings.warn(
            f"{where}: both num_training_steps and num_stable_steps are set; num_stable_steps is used.",
            stacklevel=2,
        )
    for arg, kind in (("warmup_type", warmup_type), ("decay_type", decay_type)):
        if kind not in _SHAPES:
            raise ValueError(f"{where}: unknown {arg} {kind!r}; expected one of {', '.join(map(repr, _SHAPES))}.")
    if num_stable_steps is None:
        num_stable_steps = num_training_steps - num_warmup_steps - num_decay_steps
    lr, m = float(lr), min_lr_ratio
    decay_start = num_warmup_steps + num_stable_steps
    decay_end = decay_start + num_decay_steps

    def schedule(step: torch.Tensor) -> torch.Tensor:
        s = _as_step(step)
        warm = _wsd_shape(warmup_type, s / float(max(1, num_warmup_steps)), num_cycles, rising=True)
        decay_progress = (s - num_warmup_steps - num_stable_steps) / float(max(1, num_decay_steps))
        decay = _wsd_shape(decay_type, decay_progress, num_cycles, rising=False)
        lam = torch.where(s < decay_end, torch.clamp(decay * (1.0 - m) + m, min=0.0), float(m))
        lam = torch.where(s < decay_start, 1.0, lam)
        lam = torch.where(s < num_warmup_steps, torch.clamp(warm * (1.0 - m) + m, min=0.0), lam)
        return lr * lam

    return schedule


# ----------------------------------------------------------------------------------------------------------
# Dispatcher
# ----------------------------------------------------------------------------------------------------------

#: Every ``transformers.SchedulerType`` value, in HF's order of definition, with the function that builds it; ``None``
#: for the metric-driven ones, which are not functions of the step (see :data:`METRIC_SCHEDULE_NAMES`).
_SCHEDULES: dict[str, Callable[..., Schedule] | None] = {
    "linear": linear_schedule,
    "cosine": cosine_schedule,
    "cosine_with_restarts": cosine_with_restarts_schedule,
    "polynomial": polynomial_schedule,
    "constant": constant_schedule,
    "constant_with_warmup": constant_with_warmup_schedule,
    "inverse_sqrt": inverse_sqrt_schedule,
    "reduce_lr_on_plateau": None,
    "cosine_with_min_lr": cosine_with_min_lr_schedule,
    "cosine_warmup_with_min_lr": cosine_warmup_with_min_lr_schedule,
    "warmup_stable_decay": warmup_stable_decay_schedule,
    "greedy": None,
}
#: Every ``transformers.SchedulerType`` value, in HF's order of definition.
SCHEDULE_NAMES: tuple[str, ...] = tuple(_SCHEDULES)
#: The schedules driven by an evaluation metric instead of the step: :func:`get_schedule` refuses them; the
#: learning rate falls through :func:`reduce_on_plateau` and :func:`plateau_update` instead.
METRIC_SCHEDULE_NAMES: tuple[str, ...] = tuple(name for name, build in _SCHEDULES.items() if build is None)
_COMMON_ARGS = ("lr", "num_warmup_steps", "num_training_steps")


def _check_kwargs(name: str, fn: Callable[..., Schedule], kwargs: dict[str, Any]) -> None:
    accepted = [p for p in inspect.signature(fn).parameters if p not in _COMMON_ARGS]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"get_schedule({name!r}): unexpected scheduler_specific_kwargs {unknown}; "
            f"{name} accepts {accepted or 'none'}."
        )
    if name == "warmup_stable_decay" and "num_decay_steps" not in kwargs:
        raise ValueError(
            "get_schedule('warmup_stable_decay') requires `num_decay_steps`; pass it as a scheduler-specific "
            "kwarg (lr_scheduler_kwargs={'num_decay_steps': ...})."
        )


def get_schedule(
    name: str | Enum,
    learning_rate: float,
    *,
    num_warmup_steps: int | None = 0,
    num_training_steps: int | None = None,
    **scheduler_specific_kwargs: Any,
) -> Schedule:
    """The schedule called ``name``, built like ``transformers.get_scheduler`` builds it.

    As in HF, ``constant`` ignores every other argument, ``constant_with_warmup`` ignores the
    scheduler-specific kwargs, ``inverse_sqrt`` ignores ``num_training_steps`` and ``warmup_stable_decay``
    needs ``num_decay_steps`` in the kwargs. Missing arguments raise here, when the schedule is built, not at
    some later step.

    Args:
        name: A ``transformers.SchedulerType`` or its string value (see :data:`SCHEDULE_NAMES`).
        learning_rate: The base (peak) learning rate.
        num_warmup_steps: ``W``; required (not ``None``) by every schedule except ``constant``.
        num_training_steps: ``T``; required by every schedule that decays to a fixed end step.
        **scheduler_specific_kwargs: HF's ``lr_scheduler_kwargs`` (``num_cycles``, ``power``, ``min_lr``,
            ...).

    Returns:
        ``schedule(step) -> lr``.

    Raises:
        ValueError: an unknown name, a metric-driven name (use :func:`reduce_on_plateau`), or a missing
            argument.
        TypeError: a scheduler-specific kwarg the schedule does not take.

    Example:
        >>> import torch
        >>> sched = get_schedule("linear", 1.0, num_warmup_steps=1, num_training_steps=3)
        >>> [float(sched(torch.tensor(k))) for k in range(4)]
        [0.0, 1.0, 0.5, 0.0]
    """
    key = name.value if isinstance(name, Enum) else name
    if key in METRIC_SCHEDULE_NAMES:
        raise ValueError(
            f"get_schedule({key!r}): {key} is driven by an evaluation metric, not by the step, so it is not "
            f"a step schedule. Use ftrain.schedules.{'greedy' if key == 'greedy' else 'reduce_on_plateau'}(...) in "
            "the optimizer chain and call ftrain.schedules.plateau_update(opt_state, metric) after each evaluation."
        )
    fn = _SCHEDULES.get(key)
    if fn is None:
        raise ValueError(f"get_schedule: unknown schedule {name!r}; valid names are {', '.join(SCHEDULE_NAMES)}.")
    if key == "constant":
        return fn(learning_rate)
    if num_warmup_steps is None:
        raise ValueError(f"get_schedule({key!r}) requires `num_warmup_steps` (an int, 0 for no warmup).")
    if key == "constant_with_warmup":
        return fn(learning_rate, num_warmup_steps=num_warmup_steps)
    _check_kwargs(key, fn, scheduler_specific_kwargs)
    if key == "inverse_sqrt":
        return fn(learning_rate, num_warmup_steps=num_warmup_steps, **scheduler_specific_kwargs)
    if key != "warmup_stable_decay" and num_training_steps is None:
        raise ValueError(
            f"get_schedule({key!r}) requires `num_training_steps` (the total number of optimizer steps); "
            "pass num_training_steps=..."
        )
    return fn(
        learning_rate,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        **scheduler_specific_kwargs,
    )


# ----------------------------------------------------------------------------------------------------------
# Reduce on plateau
# ----------------------------------------------------------------------------------------------------------


class PlateauHyperparams(NamedTuple):
    """The constants of :func:`reduce_on_plateau`, kept in its state (as 0-d tensors) so that
    :func:`plateau_update` is a pure function of ``(state, metric)`` and a checkpoint restores them.

    ``mode`` and ``threshold_mode`` are folded into ``mode_sign`` (+1 for min, -1 for max) and an improvement
    threshold ``best * threshold_mul + threshold_add`` (rel: ``mul = 1 ∓ threshold``; abs: ``add = ∓
    threshold``).
    """

    factor: torch.Tensor
    patience: torch.Tensor
    cooldown: torch.Tensor
    min_scale: torch.Tensor
    eps: torch.Tensor
    mode_sign: torch.Tensor
    threshold_mul: torch.Tensor
    threshold_add: torch.Tensor


class ReduceOnPlateauState(NamedTuple):
    """State of :func:`reduce_on_plateau`: the update ``scale`` and torch's ``ReduceLROnPlateau`` counters."""

    scale: torch.Tensor  # float64, multiplies every update
    best: torch.Tensor  # float64, best metric so far (+inf for min, -inf for max before the first one)
    num_bad_steps: torch.Tensor  # int64, evaluations since the last improvement
    cooldown_counter: torch.Tensor  # int64, evaluations left in cooldown
    hparams: PlateauHyperparams


def reduce_on_plateau(
    factor: float = 0.1,
    patience: int = 10,
    threshold: float = 1e-4,
    threshold_mode: str = "rel",
    cooldown: int = 0,
    min_scale: float = 0.0,
    mode: str = "min",
    eps: float = 1e-8,
) -> GradientTransformation:
    """Multiplies updates by a ``scale`` that :func:`plateau_update` lowers when the metric stops improving.

    Exactly ``torch.optim.lr_scheduler.ReduceLROnPlateau`` with the learning rate written as ``base_lr ·
    scale`` (``scale`` starts at 1): when more than ``patience`` evaluations in a row fail to improve on the
    best metric (by ``threshold``), ``scale ← max(scale · factor, min_scale)``, unless that lowers it by
    ``eps`` or less, and ``cooldown`` evaluations follow during which bad evaluations are not counted. Put it
    after the learning-rate scaling in a chain. To mirror ``ReduceLROnPlateau(min_lr=m, eps=e)`` for base
    learning rate ``lr``, pass ``min_scale=m / lr, eps=e / lr``.

    Args:
        factor: Multiplier of the scale at each reduction (< 1).
        patience: Number of non-improving evaluations tolerated before a reduction.
        threshold: Minimal improvement that counts.
        threshold_mode: ``"rel"`` (improve on ``best · (1 ∓ threshold)``) or ``"abs"`` (on ``best ∓
            threshold``).
        cooldown: Evaluations after a reduction during which bad evaluations are not counted.
        min_scale: Lower bound of the scale (torch's ``min_lr / base_lr``).
        mode: ``"min"`` (lower metric is better) or ``"max"``.
        eps: A reduction of the scale by ``eps`` or less is skipped (torch's ``eps / base_lr``).

    Returns:
        A :class:`~ftrain.optim.base.GradientTransformation` with state :class:`ReduceOnPlateauState`.

    Raises:
        ValueError: ``factor >= 1``, or an unknown ``mode`` / ``threshold_mode``.

    Example:
        >>> import torch
        >>> tx = reduce_on_plateau(factor=0.5, patience=1)
        >>> state = tx.init({"w": torch.zeros(2)})
        >>> for metric in [1.0, 2.0, 2.0]:
        ...     state = plateau_update(state, metric)
        >>> float(state.scale)
        0.5
        >>> tx.update({"w": torch.ones(2)}, state)[0]["w"]
        tensor([0.5000, 0.5000])
    """
    if not factor < 1.0:
        raise ValueError(f"reduce_on_plateau: factor must be < 1.0 (it multiplies the scale), got {factor}.")
    sign, mul, add = _improvement_threshold("reduce_on_plateau", mode, threshold_mode, threshold)

    def init(params: Params) -> ReduceOnPlateauState:
        f64, i64 = _scalar_makers(params, "reduce_on_plateau")
        hparams = PlateauHyperparams(
            f64(factor), i64(patience), i64(cooldown), f64(min_scale), f64(eps), f64(sign), f64(mul), f64(add)
        )
        return ReduceOnPlateauState(f64(1.0), f64(sign * math.inf), i64(0), i64(0), hparams)

    return GradientTransformation(init, _scale_updates)


def _improvement_threshold(where: str, mode: str, threshold_mode: str, threshold: float) -> tuple[float, ...]:
    """``(mode_sign, threshold_mul, threshold_add)``: a metric improves on ``best`` when ``mode_sign · metric <
    mode_sign · (best · threshold_mul + threshold_add)`` (:func:`_improves`), which is torch's and transformers' test
    — rel min ``best · (1 - t)``, rel max ``best · (1 + t)``, abs min ``best - t``, abs max ``best + t``.

    Raises:
        ValueError: an unknown ``mode`` / ``threshold_mode`` (the message starts with ``where``).
    """
    if mode not in ("min", "max"):
        raise ValueError(f"{where}: mode must be 'min' or 'max', got {mode!r}.")
    if threshold_mode not in ("rel", "abs"):
        raise ValueError(f"{where}: threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}.")
    sign = 1.0 if mode == "min" else -1.0
    if threshold_mode == "rel":
        return sign, 1.0 - sign * threshold, 0.0
    return sign, 1.0, -sign * threshold


def _improves(h: PlateauHyperparams | GreedyHyperparams, current: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """Whether ``current`` improves on ``best`` under the folded threshold of :func:`_improvement_threshold`."""
    return h.mode_sign * current < h.mode_sign * (best * h.threshold_mul + h.threshold_add)


def _scalar_makers(params: Params, where: str) -> tuple[Callable[[float], torch.Tensor], Callable[[int], torch.Tensor]]:
    """``(f64, i64)``: makers of the 0-d float64 / int64 state tensors of a metric-driven schedule, on the device of
    ``params``' first tensor (checked to be floating point, as every transformation's ``init`` does)."""
    check_float_params(params, where=where)
    tensors = [x for x in _tree.tree_leaves(params) if isinstance(x, torch.Tensor)]
    device = tensors[0].device if tensors else torch.device("cpu")
    return (
        lambda v: torch.tensor(float(v), dtype=torch.float64, device=device),
        lambda v: torch.tensor(int(v), dtype=torch.int64, device=device),
    )


def _scale_updates(updates: Updates, state: ReduceOnPlateauState | GreedyState, params: Params | None = None):
    """The ``update`` of a metric-driven schedule: every update times the state's ``scale``."""
    return _tree.tree_map(lambda u: u * state.scale, updates), state


def _plateau_step(state: ReduceOnPlateauState, metric: torch.Tensor | float) -> ReduceOnPlateauState:
    """One ``ReduceLROnPlateau.step(metric)``, branch-free."""
    h = state.hparams
    current = torch.as_tensor(metric, dtype=torch.float64, device=state.best.device)
    better = _improves(h, current, state.best)
    best = torch.where(better, current, state.best)
    num_bad = torch.where(better, 0, state.num_bad_steps + 1)
    in_cooldown = state.cooldown_counter > 0
    cooldown_counter = torch.where(in_cooldown, state.cooldown_counter - 1, state.cooldown_counter)
    num_bad = torch.where(in_cooldown, 0, num_bad)
    reduce = num_bad > h.patience
    candidate = torch.maximum(state.scale * h.factor, h.min_scale)
    scale = torch.where(reduce & (state.scale - candidate > h.eps), candidate, state.scale)
    cooldown_counter = torch.where(reduce, h.cooldown, cooldown_counter)
    num_bad = torch.where(reduce, 0, num_bad)
    return ReduceOnPlateauState(scale, best, num_bad, cooldown_counter, h)


def plateau_update(state: OptState, metric: torch.Tensor | float, /) -> OptState:
    """Feeds one evaluation ``metric`` to every metric-driven schedule state in an optimizer state
    (:class:`ReduceOnPlateauState`, :class:`GreedyState`).

    ``state`` may be such a state itself or any tree holding it (a chain's tuple of
    states, NamedTuples, dicts): the same tree comes back with the plateau state(s) stepped, everything else
    untouched. Pure and branch-free, so it can run inside a compiled eval step. Call it after each evaluation
    (with the eval metric), not after each train step.

    Args:
        state: An optimizer state, typically ``train_state.opt_state``.
        metric: The evaluation metric (a float or 0-d tensor).

    Returns:
        The updated state tree.

    Raises:
        ValueError: ``state`` holds no metric-driven schedule state.

    Example:
        >>> import torch
        >>> tx = reduce_on_plateau(patience=0)
        >>> opt_state = (tx.init({"w": torch.zeros(1)}),)  # e.g. a chain's state
        >>> opt_state = plateau_update(plateau_update(opt_state, 1.0), 1.0)
        >>> round(float(opt_state[0].scale), 6)
        0.1
    """
    if is_metric_schedule_state(state):
        return _metric_step(state, metric)
    if not has_metric_schedule(state):
        raise ValueError(
            f"plateau_update: no ReduceOnPlateauState or GreedyState in the given {type(state).__name__}. Build "
            "the optimizer with ftrain.schedules.reduce_on_plateau(...) or greedy(...) in its chain and pass its "
            "state (train_state.opt_state)."
        )
    return _tree.tree_map(
        lambda x: _metric_step(x, metric) if is_metric_schedule_state(x) else x,
        state,
        is_leaf=is_metric_schedule_state,
    )


def is_metric_schedule_state(x: Any) -> bool:
    """Whether ``x`` is the state of a metric-driven schedule (:func:`reduce_on_plateau` or :func:`greedy`)."""
    return isinstance(x, ReduceOnPlateauState | GreedyState)


def has_metric_schedule(state: OptState) -> bool:
    """Whether an optimizer state holds a metric-driven schedule's state, which :func:`plateau_update` steps."""
    leaves = _tree.tree_leaves(state, is_leaf=is_metric_schedule_state)
    return any(is_metric_schedule_state(x) for x in leaves)


def _metric_step(state: Any, metric: torch.Tensor | float) -> Any:
    return _plateau_step(state, metric) if isinstance(state, ReduceOnPlateauState) else _greedy_step(state, metric)


# ----------------------------------------------------------------------------------------------------------
# Greedy (transformers' GreedyLR)
# ----------------------------------------------------------------------------------------------------------


class GreedyHyperparams(NamedTuple):
    """The constants of :func:`greedy`, kept in its state (as 0-d tensors) so that :func:`plateau_update` is a pure
    function of ``(state, metric)``. ``mode`` / ``threshold_mode`` are folded as in :class:`PlateauHyperparams`."""

    factor: torch.Tensor
    patience: torch.Tensor
    cooldown: torch.Tensor
    warmup: torch.Tensor
    min_scale: torch.Tensor
    max_scale: torch.Tensor
    eps: torch.Tensor
    mode_sign: torch.Tensor
    threshold_mul: torch.Tensor
    threshold_add: torch.Tensor
    smooth: torch.Tensor  # bool
    reset_start: torch.Tensor  # int64, the configured number of reductions at the floor before a reset


class GreedyState(NamedTuple):
    """State of :func:`greedy`: the update ``scale``, ``GreedyLR``'s counters and its smoothing window."""

    scale: torch.Tensor  # float64, multiplies every update
    best: torch.Tensor  # float64, best (smoothed) metric so far
    num_bad_steps: torch.Tensor  # int64
    num_good_steps: torch.Tensor  # int64
    cooldown_counter: torch.Tensor  # int64, evaluations left without counting after a decrease
    warmup_counter: torch.Tensor  # int64, evaluations left without counting after an increase
    reset_start: torch.Tensor  # int64, reductions at the floor left before the reset
    window: torch.Tensor  # float64 (window_size,), the last metrics (a ring) for the streaming average
    window_count: torch.Tensor  # int64, metrics seen since the window was (re)started
    window_sum: torch.Tensor  # float64, running sum of the window, updated as transformers' StreamingAverage
    hparams: GreedyHyperparams


def greedy(
    factor: float = 0.95,
    patience: int = 10,
    threshold: float = 1e-6,
    threshold_mode: str = "abs",
    cooldown: int = 0,
    warmup: int = 0,
    min_scale: float = 0.0,
    max_scale: float = math.inf,
    mode: str = "min",
    eps: float = 1e-8,
    smooth: bool = False,
    window_size: int = 50,
    reset_start: int = 500,
) -> GradientTransformation:
    """Multiplies updates by a ``scale`` that :func:`plateau_update` raises while the metric keeps improving and
    lowers when it stops: transformers' ``GreedyLR`` with the learning rate written as ``base_lr · scale``.

    At each evaluation (after any cooldown or warmup evaluations, which are not counted) the metric — its
    streaming average over the last ``window_size`` values when ``smooth`` — either improves on the best by
    ``threshold`` (a good evaluation) or not (a bad one). More than ``patience`` good ones in a row raise the scale
    to ``min(scale / factor, max_scale)`` and start ``warmup`` evaluations; more than ``patience`` bad ones lower it
    to ``max(scale · factor, min_scale)`` and start ``cooldown`` evaluations. A change of ``eps`` or less is
    skipped. After ``reset_start`` reductions with the scale at ``min_scale`` everything restarts (scale 1, best
    and window forgotten). To mirror ``GreedyLR(min_lr=m, max_lr=M, eps=e)`` for base lr ``lr``, pass
    ``min_scale=m / lr, max_scale=M / lr, eps=e / lr``.

    Returns:
        A :class:`~ftrain.optim.base.GradientTransformation` with state :class:`GreedyState`.

    Raises:
        ValueError: ``factor >= 1``, an unknown ``mode`` / ``threshold_mode``, or ``window_size < 1``.

    Example:
        >>> import torch
        >>> tx = greedy(factor=0.5, patience=1)
        >>> state = tx.init({"w": torch.zeros(1)})
        >>> for metric in [3.0, 2.0, 1.0]:
        ...     state = plateau_update(state, metric)
        >>> float(state.scale)
        2.0
    """
    if not factor < 1.0:
        raise ValueError(f"greedy: factor must be < 1.0 (the scale is multiplied or divided by it), got {factor}.")
    sign, mul, add = _improvement_threshold("greedy", mode, threshold_mode, threshold)
    if smooth and window_size < 1:
        raise ValueError(f"greedy: window_size must be >= 1 with smooth=True, got {window_size}.")
    size = max(int(window_size), 1)

    def init(params: Params) -> GreedyState:
        f64, i64 = _scalar_makers(params, "greedy")
        h = GreedyHyperparams(
            f64(factor), i64(patience), i64(cooldown), i64(warmup), f64(min_scale), f64(max_scale), f64(eps),
            f64(sign), f64(mul), f64(add), i64(bool(smooth)).bool(), i64(reset_start),
        )  # fmt: skip
        window = torch.zeros(size, dtype=torch.float64, device=h.factor.device)
        return GreedyState(
            f64(1.0), f64(sign * math.inf), i64(0), i64(0), i64(0), i64(0), i64(reset_start), window, i64(0),
            f64(0.0), h,
        )  # fmt: skip

    return GradientTransformation(init, _scale_updates)


def _streaming_average(state: GreedyState, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """transformers' ``StreamingAverage.streamavg`` on a ring buffer: ``sum += value``, then ``sum -= oldest``
    once the window is full, and the average over the values held."""
    size = state.window.shape[0]
    pos = state.window_count % size
    full = state.window_count >= size
    total = state.window_sum + value
    total = torch.where(full, total - state.window[pos], total)
    window = torch.where(torch.arange(size, device=value.device) == pos, value, state.window)
    count = state.window_count + 1
    return total / torch.clamp(count, max=size), window, count, total


def _greedy_step(state: GreedyState, metric: torch.Tensor | float) -> GreedyState:
    """One ``GreedyLR.step(metric)``, branch-free."""
    h = state.hparams
    raw = torch.as_tensor(metric, dtype=torch.float64, device=state.best.device)
    average, window, count, total = _streaming_average(state, raw)
    current = torch.where(h.smooth, average, raw)
    window = torch.where(h.smooth, window, state.window)
    count = torch.where(h.smooth, count, state.window_count)
    total = torch.where(h.smooth, total, state.window_sum)
    # Cooldown, then warmup, evaluations are not counted.
    in_cooldown = state.cooldown_counter > 0
    in_warmup = ~in_cooldown & (state.warmup_counter > 0)
    counted = ~in_cooldown & ~in_warmup
    cooldown_counter = torch.where(in_cooldown, state.cooldown_counter - 1, state.cooldown_counter)
    warmup_counter = torch.where(in_warmup, state.warmup_counter - 1, state.warmup_counter)
    better = _improves(h, current, state.best)
    best = torch.where(counted & better, current, state.best)
    zero = torch.zeros_like(state.num_bad_steps)
    num_bad = torch.where(counted & ~better, state.num_bad_steps + 1, zero)
    num_good = torch.where(counted & better, state.num_good_steps + 1, zero)
    increase = num_good > h.patience
    reduce = ~increase & (num_bad > h.patience)
    # Increase: divide by factor up to max_scale; the reset countdown starts over.
    up = torch.minimum(state.scale / h.factor, h.max_scale)
    scale = torch.where(increase & (up - state.scale > h.eps), up, state.scale)
    warmup_counter = torch.where(increase, h.warmup, warmup_counter)
    num_good = torch.where(increase, zero, num_good)
    reset_start = torch.where(increase, h.reset_start, state.reset_start)
    # Decrease: multiply by factor down to min_scale; at the floor, count down to a full reset.
    down = torch.maximum(scale * h.factor, h.min_scale)
    scale = torch.where(reduce & (scale - down > h.eps), down, scale)
    at_floor = reduce & ~(scale > h.min_scale)
    reset_start = torch.where(at_floor, reset_start - 1, reset_start)
    reset = at_floor & (reset_start <= 0)
    scale = torch.where(reset, torch.ones_like(scale), scale)
    best = torch.where(reset, h.mode_sign * math.inf, best)
    num_good = torch.where(reset, zero, num_good)
    warmup_counter = torch.where(reset, zero, warmup_counter)
    reset_start = torch.where(reset, h.reset_start, reset_start)
    window = torch.where(reset, torch.zeros_like(window), window)
    count = torch.where(reset, zero, count)
    total = torch.where(reset, torch.zeros_like(total), total)
    cooldown_counter = torch.where(reduce, h.cooldown, cooldown_counter)
    num_bad = torch.where(reduce, zero, num_bad)
    return GreedyState(
        scale, best, num_bad, num_good, cooldown_counter, warmup_counter, reset_start, window, count, total, h
    )
