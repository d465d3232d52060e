"""When to save and what to keep: :class:`CheckpointManagerOptions` and the pure functions that apply it.

The vocabulary is Orbax's ``CheckpointManagerOptions``; the retention rules are stated once, here:

**Saving.** A step is due when it is newer than every committed checkpoint and any of these holds: ``step %
save_interval_steps == 0``; ``step in save_on_steps``; ``save_interval_seconds`` have passed since the last save (or
since the manager started); a preemption signal arrived (``save_on_preemption``). With none of the first three set,
every new step is due (Orbax's default ``save_interval_steps=1``).

**Keeping.** Only ``max_to_keep`` deletes anything. With it set, these steps are *protected*:

- the newest step,
- every step with ``step % keep_period == 0`` (kept forever),
- the ``keep_best`` best steps by the metric (``metric`` + ``best_mode``, or ``best_fn``; default ``keep_best=1``),
- every step for which ``should_keep_fn(step)`` is true (the caller's own rule, e.g. the checkpoint its state calls
  the best).

What survives a save then depends on ``retention``:

- ``"union"`` (default): the protected steps and the ``max_to_keep`` newest steps.
- ``"total"``: ``max_to_keep`` counts everything kept. The protected steps stay, and the newest of the others fill
  the room left, ``max(0, max_to_keep - len(protected))``; when the protected steps alone reach ``max_to_keep``, all
  of them and nothing else survive. This is Hugging Face's ``save_total_limit`` (transformers'
  ``rotate_checkpoints``): with the best and the newest protected, ``max_to_keep=1`` keeps 2.

So a best-metric policy never deletes the checkpoint a crashed run resumes from — the bug in Orbax's manager, which
counted ``max_to_keep`` among the best only and could delete the newest step. Checkpoints saved without the metric
(a preemption save, say) are never "best" but are kept by the other rules. Ties in the metric go to the earlier step
(as in Hugging Face's ``Trainer``, a later step must be strictly better); a NaN metric is never best.

Example:
    >>> opts = CheckpointManagerOptions(max_to_keep=2, keep_period=10, metric="loss")
    >>> metrics = {5: {"loss": 0.5}, 10: {"loss": 0.9}, 15: {"loss": 0.2}, 20: {"loss": 0.8}, 25: {"loss": 0.7}}
    >>> sorted(select_to_keep([5, 10, 15, 20, 25], metrics, opts))  # newest 2, multiples of 10, best (15)
    [10, 15, 20, 25]
    >>> total = CheckpointManagerOptions(max_to_keep=3, metric="loss", retention="total")
    >>> sorted(select_to_keep([5, 10, 15, 20, 25], metrics, total))  # best (15), newest (25), then 20: 3 in all
    [15, 20, 25]
"""

from __future__ import annotations

import dataclasses
import math
import signal
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from ftrain.checkpoint.atomic import StepNaming
from ftrain.checkpoint.backends import BACKEND_NAMES, Backend, missing_backend_members
from ftrain.checkpoint.integrity import DEFAULT_HASH, check_hash_algorithm

__all__ = ["RETENTIONS", "CheckpointManagerOptions", "best_steps", "is_save_due", "metric_value", "select_to_keep"]

Metrics = Mapping[str, float]

#: The values of ``CheckpointManagerOptions.retention``.
RETENTIONS = ("union", "total")


def _check_positive_int(name: str, value: Any, *, zero_ok: bool = False) -> None:
    if value is None:
        return
    low = 0 if zero_ok else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"CheckpointManagerOptions: {name} must be an int >= {low} or None, got {value!r}")


@dataclasses.dataclass(frozen=True)
class CheckpointManagerOptions:
    """What :class:`~ftrain.checkpoint.CheckpointManager` saves, keeps and how it writes. Validated when built.

    Args:
        save_interval_steps: save when ``step % save_interval_steps == 0``.
        save_on_steps: save on exactly these steps.
        save_interval_seconds: save when this much wall-clock time has passed since the last save.
        save_on_preemption: install a handler for ``preemption_signals`` (SIGTERM by default) that makes the next
            :meth:`~ftrain.checkpoint.CheckpointManager.should_save` return True; the previous handler is restored
            on ``close()``. The manager must then be built in the main thread.
        preemption_signals: the signals that mean "about to be preempted".
        max_to_keep: keep this many newest checkpoints (plus the protected ones, see ``retention``); ``None`` keeps
            everything.
        retention: ``"union"`` (default) keeps the protected steps (newest, best, ``keep_period``,
            ``should_keep_fn``) in addition to the ``max_to_keep`` newest; ``"total"`` counts them within
            ``max_to_keep`` (Hugging Face's ``save_total_limit``). See :mod:`ftrain.checkpoint.policy`. Needs
            ``max_to_keep``.
        keep_period: never delete a step that is a multiple of this (needs ``max_to_keep``).
        should_keep_fn: ``step -> bool``; never delete a step for which it returns True (Orbax's option; needs
            ``max_to_keep``). It is asked at each retention, so it may follow the caller's state.
        metric: name of the metric (in ``save(..., metrics=...)``) that ranks checkpoints.
        best_fn: instead of ``metric``, a function of the metrics dict returning the number to rank by.
        best_mode: ``"min"`` (lower is better, e.g. a loss) or ``"max"`` (e.g. accuracy).
        keep_best: keep this many best checkpoints (default 1 when a metric is set; needs ``max_to_keep``).
        async_save: return from ``save`` once the tensors are staged; write on a background thread.
        backend: ``"safetensors"`` (default, one process), ``"dcp"`` (torch.distributed.checkpoint; DTensor
            states, any world size), ``"orbax"`` (``pip install ftrain[orbax]``), or a
            :class:`~ftrain.checkpoint.Backend` instance.
        hash_algorithm: the manifest's checksum: ``"xxh3_128"`` (default; fast, finds accidental damage — torn
            writes, truncation, bit rot — but not deliberate tampering) or any :mod:`hashlib` algorithm, e.g.
            ``"sha256"`` (cryptographic, ~15x slower). See :mod:`ftrain.checkpoint.integrity`.
        step_prefix, step_digits: directory names, ``step_prefix + zero-padded step`` (``step_00000120``);
            ``("checkpoint-", 0)`` gives Hugging Face's ``checkpoint-120``.

    Raises:
        ValueError: an invalid value or an option that would have no effect, with the fix.
    """

    save_interval_steps: int | None = None
    save_on_steps: Collection[int] = ()
    save_interval_seconds: float | None = None
    save_on_preemption: bool = False
    preemption_signals: tuple[int, ...] = (signal.SIGTERM,)
    max_to_keep: int | None = None
    retention: str = "union"
    keep_period: int | None = None
    should_keep_fn: Callable[[int], bool] | None = None
    metric: str | None = None
    best_fn: Callable[[Metrics], float] | None = None
    best_mode: str = "min"
    keep_best: int | None = None
    async_save: bool = False
    backend: str | Backend = "safetensors"
    hash_algorithm: str = DEFAULT_HASH
    step_prefix: str = "step_"
    step_digits: int = 8

    def __post_init__(self):
        _check_positive_int("save_interval_steps", self.save_interval_steps)
        _check_positive_int("max_to_keep", self.max_to_keep)
        _check_positive_int("keep_period", self.keep_period)
        _check_positive_int("keep_best", self.keep_best)
        steps = frozenset(self.save_on_steps)
        for s in steps:
            _check_positive_int("every entry of save_on_steps", s, zero_ok=True)
        object.__setattr__(self, "save_on_steps", steps)
        sec = self.save_interval_seconds
        if sec is not None and (isinstance(sec, bool) or not isinstance(sec, int | float) or not sec > 0):
            raise ValueError(f"CheckpointManagerOptions: save_interval_seconds must be a number > 0, got {sec!r}")
        self._check_best()
        self._check_retention()
        if not self.preemption_signals or not all(isinstance(s, int) for s in self.preemption_signals):
            raise ValueError(
                f"CheckpointManagerOptions: preemption_signals must be signal numbers, got {self.preemption_signals!r}"
            )
        check_hash_algorithm(self.hash_algorithm)
        if isinstance(self.backend, str):
            if self.backend not in BACKEND_NAMES:
                raise ValueError(
                    f"CheckpointManagerOptions: backend={self.backend!r} is unknown; use one of {list(BACKEND_NAMES)} "
                    "or an object with the members of ftrain.checkpoint.Backend"
                )
        elif missing := missing_backend_members(self.backend):
            raise ValueError(
                f"CheckpointManagerOptions: backend must be one of {list(BACKEND_NAMES)} or an object with the "
                f"members of ftrain.checkpoint.Backend; a {type(self.backend).__name__} lacks {', '.join(missing)}"
            )
        StepNaming(self.step_prefix, self.step_digits)  # validates

    def _check_best(self) -> None:
        if self.metric is not None and self.best_fn is not None:
            raise ValueError(
                "CheckpointManagerOptions: give either metric (a name in the metrics dict) or best_fn (a function of "
                "it), not both."
            )
        if self.metric is not None and (not isinstance(self.metric, str) or not self.metric):
            raise ValueError(f"CheckpointManagerOptions: metric must be a metric name (str), got {self.metric!r}")
        if self.best_fn is not None and not callable(self.best_fn):
            raise ValueError(f"CheckpointManagerOptions: best_fn must be callable, got {type(self.best_fn).__name__}")
        if self.best_mode not in ("min", "max"):
            raise ValueError(
                f"CheckpointManagerOptions: best_mode must be 'min' (lower is better, e.g. a loss) or 'max' (e.g. "
                f"accuracy), got {self.best_mode!r}"
            )
        if self.keep_best is not None and not self.has_best:
            raise ValueError(
                f"CheckpointManagerOptions: keep_best={self.keep_best} needs a metric to rank by: set metric='loss' "
                "(a key of the metrics passed to save) or best_fn."
            )

    def _check_retention(self) -> None:
        if self.retention not in RETENTIONS:
            raise ValueError(
                f"CheckpointManagerOptions: retention must be 'union' (the protected steps in addition to the "
                f"max_to_keep newest) or 'total' (max_to_keep counts them, as Hugging Face's save_total_limit), got "
                f"{self.retention!r}"
            )
        if self.should_keep_fn is not None and not callable(self.should_keep_fn):
            raise ValueError(
                f"CheckpointManagerOptions: should_keep_fn must be callable (step -> bool), got "
                f"{type(self.should_keep_fn).__name__}"
            )
        if self.max_to_keep is not None:
            return
        idle = {
            "retention": None if self.retention == "union" else self.retention,
            "keep_period": self.keep_period,
            "should_keep_fn": self.should_keep_fn,
            "keep_best": self.keep_best,
        }
        for name, value in idle.items():
            if value is not None:
                shown = name if callable(value) else f"{name}={value!r}"
                raise ValueError(
                    f"CheckpointManagerOptions: {shown} has no effect without max_to_keep (nothing is ever deleted). "
                    "Set max_to_keep, or drop it."
                )

    @property
    def has_best(self) -> bool:
        return self.metric is not None or self.best_fn is not None

    @property
    def naming(self) -> StepNaming:
        return StepNaming(self.step_prefix, self.step_digits)

    @property
    def has_save_trigger(self) -> bool:
        return bool(self.save_interval_steps or self.save_on_steps or self.save_interval_seconds)


def metric_value(metrics: Metrics | None, options: CheckpointManagerOptions, *, strict: bool = False) -> float | None:
    """The number a checkpoint is ranked by, or ``None`` (no metric configured, none recorded, or NaN).

    Raises:
        KeyError: with ``strict=True``, ``metrics`` lacks the configured metric (names the ones it has).
    """
    if not options.has_best or metrics is None:
        return None
    try:
        value = options.best_fn(metrics) if options.best_fn is not None else metrics[options.metric]
        value = float(value)
    except (KeyError, TypeError, ValueError) as e:
        if strict:
            what = f"metric {options.metric!r}" if options.metric else "best_fn"
            raise KeyError(
                f"save(metrics=...): {what} cannot be read from the metrics {sorted(metrics)} ({e!r}). Pass the "
                "metric the options rank by, or save without metrics (such a checkpoint is never 'best')."
            ) from None
        return None
    return None if math.isnan(value) else value


def best_steps(values: Mapping[int, float | None], options: CheckpointManagerOptions, n: int) -> list[int]:
    """The ``n`` best steps, best first; steps without a value are left out; ties go to the earlier step."""
    sign = 1.0 if options.best_mode == "min" else -1.0
    ranked = sorted((sign * v, s) for s, v in values.items() if v is not None)
    return [s for _, s in ranked[:n]]


def select_to_keep(
    steps: Iterable[int], metrics: Mapping[int, Metrics | None], options: CheckpointManagerOptions
) -> set[int]:
    """The committed steps that survive under ``options`` (see the module docstring); the rest may be deleted.

    Args:
        steps: every committed step.
        metrics: the metrics each step was saved with (missing or ``None``: saved without metrics).
        options: the retention policy.
    """
    steps = sorted(set(steps))
    if not steps or options.max_to_keep is None:
        return set(steps)
    protected = {steps[-1]}
    if options.keep_period is not None:
        protected.update(s for s in steps if s % options.keep_period == 0)
    if options.has_best:
        values = {s: metric_value(metrics.get(s), options) for s in steps}
        protected.update(best_steps(values, options, options.keep_best or 1))
    if options.should_keep_fn is not None:
        protected.update(s for s in steps if options.should_keep_fn(s))
    if options.retention == "union":
        return protected | set(steps[-options.max_to_keep :])
    others = [s for s in steps if s not in protected]
    room = max(0, options.max_to_keep - len(protected))
    return protected | set(others[max(0, len(others) - room) :])


def is_save_due(
    step: int,
    options: CheckpointManagerOptions,
    *,
    latest_step: int | None,
    seconds_since_save: float,
    preempted: bool = False,
) -> bool:
    """Whether ``step`` should be saved (see the module docstring); never for a step at or before ``latest_step``."""
    if latest_step is not None and step <= latest_step:
        return False
    if preempted or not options.has_save_trigger:
        return True
    if options.save_interval_steps and step % options.save_interval_steps == 0:
        return True
    if step in options.save_on_steps:
        return True
    return bool(options.save_interval_seconds and seconds_since_save >= options.save_interval_seconds)
