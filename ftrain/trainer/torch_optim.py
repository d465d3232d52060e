"""``torch.optim`` objects in and out of ftrain's pure optimizers.

transformers' users hand the ``Trainer`` torch objects (``optimizers=(torch.optim.AdamW(...), get_scheduler(...))``,
``optimizer_cls_and_kwargs=(torch.optim.AdamW, {...})``) and read torch objects back
(``trainer.optimizer.param_groups``,
``trainer.lr_scheduler.get_last_lr()``, ``optimizer=`` in callbacks). ftrain trains with a pure
:class:`~ftrain.optim.base.GradientTransformation` whose state lives in the :class:`~ftrain.TrainState`. This module
joins the two:

- **In:** :func:`describe_torch_optimizer` reads a torch optimizer's parameter groups (by parameter name) into a
  :class:`TorchOptimizerSpec`; :func:`make_transformation` turns a spec into the ``ftrain.optim`` optimizer that
  is step-exact with the torch class (one transformation per group, :func:`ftrain.optim.partition` between
  groups); :func:`torch_lr_schedules` turns a torch scheduler into one ``step -> lr`` schedule per group by
  running the scheduler's own arithmetic on a stand-in optimizer (so every step-driven scheduler —
  ``LambdaLR`` from transformers' ``get_*_schedule_with_warmup`` or any lambda, ``StepLR``, ``CosineAnnealingLR``,
  ``OneCycleLR``, ``SequentialLR``... — is reproduced with torch's own numbers), and
  :func:`plateau_transformation` turns a ``ReduceLROnPlateau`` into :func:`ftrain.schedules.reduce_on_plateau`
  (and transformers' ``GreedyLR`` into :func:`ftrain.schedules.greedy`, :func:`greedy_transformation`).
- **Out:** :func:`torch_optimizer_state_dict` writes an ftrain ``opt_state`` in torch's ``state_dict()`` format
  (the state map is :func:`ftrain.trainer.hf_checkpoint.torch_param_states`, shared with transformers' checkpoint
  files); :func:`hf_param_groups` gives the torch param groups transformers' ``create_optimizer`` builds for the
  arguments; :func:`make_optimizer_view` builds ``trainer.optimizer``: an instance of the torch
  class (``isinstance`` holds) whose ``param_groups`` hold the model's live parameters and the current learning
  rates and whose ``state`` / ``state_dict()`` read the current ``TrainState``, while ``step()`` and
  ``zero_grad()`` raise (the pure train step does both).

Example:
    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.5}], lr=0.1)
    >>> spec = describe_torch_optimizer(opt, model)
    >>> [(g.names, g.hyperparams["lr"]) for g in spec.groups]
    [(('weight',), 0.1), (('bias',), 0.5)]
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ftrain import optim
from ftrain.optim.base import GradientTransformation, OptState, ScalarOrSchedule, Schedule
from ftrain.trainer import convert as _convert
from ftrain.trainer.hf_checkpoint import UnmappableOptimizerError, index_param_groups, torch_param_states
from ftrain.trainer.schedulers import (
    GREEDY_KWARGS,
    PLATEAU_KWARGS,
    get_greedy_schedule,
    get_reduce_on_plateau_schedule,
)

__all__ = [
    "TorchGroup",
    "TorchOptimizerSpec",
    "describe_torch_optimizer",
    "ftrain_optimizer_kwargs",
    "greedy_transformation",
    "hf_param_groups",
    "is_metric_scheduler",
    "is_transformers_adafactor",
    "make_optimizer_view",
    "make_transformation",
    "plateau_transformation",
    "table_schedule",
    "torch_lr_schedules",
    "torch_optimizer_cls_and_kwargs",
    "torch_optimizer_state_dict",
]

# ----------------------------------------------------------------------------------------------------------
# The torch classes ftrain has a step-exact optimizer for, and how their group keys map onto it.


def _adam_l2(learning_rate: ScalarOrSchedule, b1: float, b2: float, eps: float, weight_decay: float = 0.0):
    """``torch.optim.Adam``'s coupled L2 penalty (``g + wd * p`` before the moments), then Adam."""
    return optim.chain(optim.add_decayed_weights(weight_decay), optim.adam(learning_rate, b1, b2, eps))


# torch class -> (ftrain factory, {torch group key: ftrain argument}); ``betas`` splits into ``b1``/``b2``.
_ADAM_KEYS = {"betas": ("b1", "b2"), "eps": "eps", "weight_decay": "weight_decay"}
_TRANSLATIONS: dict[type, tuple[Callable[..., GradientTransformation], dict[str, Any]]] = {
    torch.optim.AdamW: (optim.adamw, _ADAM_KEYS),
    torch.optim.Adam: (_adam_l2, _ADAM_KEYS),
    torch.optim.SGD: (
        optim.sgd,
        {"momentum": "momentum", "dampening": "dampening", "weight_decay": "weight_decay", "nesterov": "nesterov"},
    ),
    torch.optim.RMSprop: (
        optim.rmsprop,
        {
            "alpha": "decay",
            "eps": "eps",
            "weight_decay": "weight_decay",
            "momentum": "momentum",
            "centered": "centered",
        },
    ),
    torch.optim.Adagrad: (
        optim.adagrad,
        {
            "lr_decay": "lr_decay",
            "weight_decay": "weight_decay",
            "initial_accumulator_value": "initial_accumulator_value",
            "eps": "eps",
        },  # fmt: skip
    ),
}
_ADAFACTOR_KEYS = {k: k for k in ("eps", "clip_threshold", "decay_rate", "beta1", "weight_decay", "scale_parameter",
                                  "relative_step", "warmup_init")}  # fmt: skip
# Group keys that choose an implementation (kernels, graph capture) and not the arithmetic, and the keys schedulers
# keep in the groups for themselves (OneCycleLR, CyclicLR).
_NO_EFFECT = frozenset({"params", "lr", "initial_lr", "foreach", "fused", "capturable", "differentiable", "name",
                        "max_lr", "min_lr", "base_lr", "max_momentum", "base_momentum"})  # fmt: skip
# Keys whose non-default value ftrain's optimizers do not implement.
_REFUSED = {"amsgrad": False, "maximize": False}


def is_transformers_adafactor(obj: Any) -> bool:
    """Whether ``obj`` is (an instance of) ``transformers.optimization.Adafactor``, recognised without importing
    transformers."""
    return _is_transformers_class(obj if isinstance(obj, type) else type(obj), "Adafactor")


@functools.wraps(optim.adafactor)
def _transformers_adafactor(learning_rate: Any, **kwargs: Any) -> GradientTransformation:
    """transformers' ``Adafactor`` as ftrain's :func:`~ftrain.optim.adafactor`. With ``relative_step=True`` its step
    size comes from the relative-step rule and never reads the group's ``lr``, so whatever lr the group holds or a
    scheduler gives it (``AdafactorSchedule`` sets 0.0) is dropped: ``learning_rate=None``, as ftrain's takes it."""
    if kwargs.get("relative_step"):
        learning_rate = None
    return optim.adafactor(learning_rate, **kwargs)


@functools.cache
def _factory_class(factory: Callable[..., GradientTransformation]) -> type:
    """A stand-in class for an ftrain factory, so groups that hold its own arguments translate to it."""
    return type(factory.__name__, (torch.optim.Optimizer,), {"_ftrain_factory": staticmethod(factory)})


def _translation(cls: type) -> tuple[Callable[..., GradientTransformation], dict[str, Any]]:
    factory = getattr(cls, "_ftrain_factory", None)
    if factory is not None:
        names = [n for n in inspect.signature(factory).parameters if n not in ("learning_rate", "mask")]
        return factory, {n: n for n in names}
    if is_transformers_adafactor(cls):
        return _transformers_adafactor, _ADAFACTOR_KEYS
    for known in cls.__mro__:
        if known in _TRANSLATIONS:
            if known is not cls and cls.step is not known.step:
                break  # a subclass with its own step: its arithmetic is not torch's
            return _TRANSLATIONS[known]
    supported = sorted(c.__name__ for c in _TRANSLATIONS) + ["transformers' Adafactor"]
    raise TypeError(
        f"ftrain cannot translate the optimizer class {cls.__module__}.{cls.__name__}: ftrain's optimizers are pure "
        f"functions, and it has step-exact ones only for torch.optim {supported}. Write yours as an ftrain.optim "
        "GradientTransformation — a chain of transforms, e.g. ftrain.optim.chain(ftrain.optim.scale_by_adam(), "
        "ftrain.optim.add_decayed_weights(0.01), ftrain.optim.scale_by_learning_rate(schedule)) — and pass it "
        "as Trainer(optimizers=(tx, None))."
    )


def ftrain_optimizer_kwargs(cls: type, hyperparams: Mapping[str, Any]) -> tuple[Callable[..., Any], dict[str, Any]]:
    """The ``ftrain.optim`` factory and its keyword arguments (without ``learning_rate``) for one parameter group
    of a torch optimizer of class ``cls``.

    Args:
        cls: the torch optimizer class (``torch.optim.AdamW``...).
        hyperparams: the group's keys as torch names them (``betas``, ``eps``, ``weight_decay``...).

    Returns:
        ``(factory, kwargs)``.

    Raises:
        TypeError: a class ftrain has no step-exact optimizer for.
        ValueError: a key or value ftrain's optimizer does not implement (``amsgrad=True``, ``maximize=True``...).

    Example:
        >>> ftrain_optimizer_kwargs(torch.optim.AdamW, {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1})
        (<function adamw at ...>, {'b1': 0.8, 'b2': 0.99, 'eps': 1e-06, 'weight_decay': 0.1})
    """
    factory, keys = _translation(cls)
    if cls is torch.optim.Adam and hyperparams.get("decoupled_weight_decay"):
        factory = optim.adamw
    kwargs: dict[str, Any] = {}
    for key, value in hyperparams.items():
        if key in _NO_EFFECT or key == "decoupled_weight_decay":
            continue
        if key in _REFUSED:
            if value != _REFUSED[key]:
                raise ValueError(
                    f"{cls.__name__}({key}={value!r}) has no ftrain equivalent; use {key}={_REFUSED[key]!r} or write "
                    "the optimizer as an ftrain.optim GradientTransformation."
                )
            continue
        if key not in keys:
            raise ValueError(
                f"{cls.__name__}: the parameter-group key {key!r} is not one ftrain's {factory.__name__} reproduces "
                f"(it maps {sorted(keys)}); remove it or write the optimizer as an ftrain.optim GradientTransformation."
            )
        target = keys[key]
        if isinstance(target, tuple):
            kwargs.update(zip(target, value))
        else:
            kwargs[target] = value
    return factory, kwargs


# ----------------------------------------------------------------------------------------------------------
# A torch optimizer, described by parameter name.


@dataclasses.dataclass(frozen=True)
class TorchGroup:
    """One parameter group: the names of its parameters (in the group's order) and its other keys."""

    names: tuple[str, ...]
    hyperparams: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class TorchOptimizerSpec:
    """A torch optimizer by parameter name: its class, ``defaults`` and groups — what :func:`make_transformation`
    builds from and what :func:`torch_optimizer_state_dict` writes ``param_groups`` from."""

    cls: type
    defaults: dict[str, Any]
    groups: tuple[TorchGroup, ...]
    factory: Callable[..., GradientTransformation] | None = None
    """An ``ftrain.optim`` factory whose arguments the groups hold under ftrain's names (``cls`` is then
    ``torch.optim.Optimizer``): an optimizer ftrain builds that has no torch class (``adafactor``, ``lion``)."""

    @property
    def names(self) -> list[str]:
        """Every parameter name, in torch's ``state_dict`` index order (group by group)."""
        return [name for group in self.groups for name in group.names]


def describe_torch_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> TorchOptimizerSpec:
    """``optimizer``'s class, defaults and parameter groups, with each parameter named as in
    ``model.named_parameters()``.

    Raises:
        ValueError: a parameter of the optimizer is not a parameter of ``model`` (the optimizer was built for
            another model, or over a copy of its parameters).
    """
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for i, group in enumerate(optimizer.param_groups):
        missing = [j for j, p in enumerate(group["params"]) if id(p) not in names]
        if missing:
            raise ValueError(
                f"The torch optimizer's param_groups[{i}] holds {len(missing)} tensor(s) that are not parameters of "
                f"{type(model).__name__} (e.g. position {missing[0]}): build the optimizer over the Trainer's "
                "model's own parameters (model.parameters() or named groups of them)."
            )
        hyper = {k: v for k, v in group.items() if k != "params"}
        groups.append(TorchGroup(tuple(names[id(p)] for p in group["params"]), hyper))
    return TorchOptimizerSpec(type(optimizer), dict(optimizer.defaults), tuple(groups))


def _mask_form(spec: TorchOptimizerSpec, lrs: Sequence[ScalarOrSchedule]) -> GradientTransformation | None:
    """transformers' two groups (same settings, weight decay ``wd`` and 0) as one optimizer with a decay mask —
    the layout :func:`ftrain.trainer.convert.make_optimizer` builds — or ``None`` when the groups are otherwise."""
    if len(spec.groups) != 2:
        return None
    numbers = all(isinstance(lr, float | int) for lr in lrs)
    if not (lrs[0] is lrs[1] or (numbers and lrs[0] == lrs[1])):
        return None
    (f0, k0), (f1, k1) = (ftrain_optimizer_kwargs(spec.cls, g.hyperparams) for g in spec.groups)
    wd0, wd1 = k0.pop("weight_decay", 0.0), k1.pop("weight_decay", 0.0)
    if f0 is not f1 or k0 != k1 or wd1 != 0:
        return None
    mask = {n: True for n in spec.groups[0].names} | {n: False for n in spec.groups[1].names}
    return optim.make_optimizer(f0, lrs[0], weight_decay=wd0, decay_mask=mask, **k0)


def make_transformation(
    spec: TorchOptimizerSpec, learning_rates: Sequence[ScalarOrSchedule], *, all_names: Sequence[str] | None = None
) -> GradientTransformation:
    """The ``ftrain.optim`` optimizer that steps like ``spec``'s torch optimizer, with ``learning_rates[i]`` for
    group ``i`` (numbers or schedules of the update count).

    One group is one alias over every parameter; transformers' decay / no-decay pair is one alias with a decay
    mask; other groupings are a :func:`ftrain.optim.partition` with one alias per group (labels ``0, 1, ...``).
    Trainable parameters in ``all_names`` that no group holds are left unchanged, as torch leaves them.

    Raises:
        TypeError / ValueError: see :func:`ftrain_optimizer_kwargs`; a parameter in two groups.
    """
    if len(learning_rates) != len(spec.groups):
        raise ValueError(f"make_transformation: {len(learning_rates)} learning rates for {len(spec.groups)} groups.")
    names = spec.names
    if len(set(names)) != len(names):
        raise ValueError("make_transformation: a parameter appears in more than one parameter group.")
    if spec.factory is not None:
        spec = dataclasses.replace(spec, cls=_factory_class(spec.factory))
    outside = [n for n in (all_names or ()) if n not in set(names)]
    if not outside:
        mask_form = _mask_form(spec, learning_rates)
        if mask_form is not None:
            return mask_form
        if len(spec.groups) == 1:
            factory, kwargs = ftrain_optimizer_kwargs(spec.cls, spec.groups[0].hyperparams)
            return factory(learning_rate=learning_rates[0], **kwargs)
    transforms: dict[Any, GradientTransformation] = {}
    labels: dict[str, Any] = {}
    for i, (group, lr) in enumerate(zip(spec.groups, learning_rates)):
        factory, kwargs = ftrain_optimizer_kwargs(spec.cls, group.hyperparams)
        transforms[i] = factory(learning_rate=lr, **kwargs)
        labels.update(dict.fromkeys(group.names, i))
    if outside:
        transforms[len(spec.groups)] = optim.set_to_zero()
        labels.update(dict.fromkeys(outside, len(spec.groups)))
    return optim.partition(transforms, labels)


# ----------------------------------------------------------------------------------------------------------
# Schedulers.


def table_schedule(values: Sequence[float]) -> Schedule:
    """``step -> values[min(step, len - 1)]`` (a float64 0-d tensor): a schedule given by its values.

    Example:
        >>> float(table_schedule([0.0, 0.5, 1.0])(torch.tensor(7)))
        1.0
    """
    table = torch.tensor(list(values), dtype=torch.float64)

    def schedule(step: torch.Tensor) -> torch.Tensor:
        step = torch.as_tensor(step)
        return table.to(step.device)[step.clamp(0, len(table) - 1).long()]

    return schedule


class _StandIn(torch.optim.Optimizer):
    """An optimizer over empty tensors with a copy of another's groups, which a scheduler copy can drive."""

    def __init__(self, groups: Sequence[Mapping[str, Any]]) -> None:
        super().__init__([{**g, "params": [torch.zeros(0)]} for g in groups], {})

    def step(self, closure: Any = None) -> None:
        return None


def _moving_keys(before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]]) -> list[str]:
    return sorted({k for b, a in zip(before, after) for k in b if k not in ("lr", "params") and b[k] != a.get(k)})


def torch_lr_schedules(
    scheduler: Any, optimizer: torch.optim.Optimizer, num_training_steps: int
) -> list[Schedule | float]:
    """One learning-rate schedule per parameter group that reproduces ``scheduler`` for ``num_training_steps``
    updates: the scheduler's own arithmetic is run on a copy bound to a stand-in optimizer (``scheduler`` and
    ``optimizer`` are not touched), and its values become a :func:`table_schedule` (a float when constant).

    Update ``k`` uses the lr after ``k`` scheduler steps, as transformers steps the scheduler after each update.

    Raises:
        ValueError: a scheduler that also moves other hyper-parameters (``OneCycleLR`` / ``CyclicLR`` with
            ``cycle_momentum=True``), or a ``ReduceLROnPlateau`` (see :func:`plateau_transformation`).
    """
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ValueError("torch_lr_schedules: ReduceLROnPlateau is driven by a metric; use plateau_transformation.")
    stand_in = _StandIn(optimizer.param_groups)
    start = [dict(g) for g in stand_in.param_groups]
    twin = copy.deepcopy(scheduler, memo={id(optimizer): stand_in})
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()" and the like
        rows.append([g["lr"] for g in stand_in.param_groups])
        for _ in range(num_training_steps):
            twin.step()
            rows.append([g["lr"] for g in stand_in.param_groups])
    moving = _moving_keys(start, stand_in.param_groups)
    if moving:
        raise ValueError(
            f"{type(scheduler).__name__} also changes {moving} of the optimizer at every step, which ftrain's "
            "optimizers take as fixed: turn that off (e.g. cycle_momentum=False) or write the optimizer with "
            "ftrain.optim.inject_hyperparams and a schedule for it."
        )
    columns = list(zip(*rows))
    return [col[0] if len(set(col)) == 1 else table_schedule(col) for col in columns]


def plateau_transformation(scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau) -> GradientTransformation:
    """``ReduceLROnPlateau`` as :func:`ftrain.schedules.reduce_on_plateau` (a scale on the updates, lowered by
    :func:`ftrain.schedules.plateau_update` after each evaluation), through
    :func:`~ftrain.trainer.schedulers.get_reduce_on_plateau_schedule` with the scheduler's own arguments.

    Raises:
        ValueError: groups with different learning rates or ``min_lr`` ratios (one scale cannot follow them), or a
            scheduler that has already reduced.
    """
    lrs = [g["lr"] for g in scheduler.optimizer.param_groups]
    if len(set(lrs)) != 1 or len(set(scheduler.min_lrs)) != 1 or scheduler.num_bad_epochs or scheduler.last_epoch:
        raise ValueError(
            "ftrain reproduces ReduceLROnPlateau as one scale on every update: give every parameter group the same "
            "lr and min_lr, and pass a scheduler that has not been stepped yet."
        )
    kwargs = {key: getattr(scheduler, key) for key in PLATEAU_KWARGS if key != "min_lr"}
    return get_reduce_on_plateau_schedule(lrs[0], **kwargs, min_lr=scheduler.min_lrs[0])


def is_greedy_scheduler(scheduler: Any) -> bool:
    """Whether ``scheduler`` is transformers' ``GreedyLR`` (checked by class name, without importing transformers)."""
    return _is_transformers_class(type(scheduler), "GreedyLR")


def is_metric_scheduler(scheduler: Any) -> bool:
    """Whether ``scheduler`` is stepped with the evaluation metric (``ReduceLROnPlateau``, transformers'
    ``GreedyLR``) instead of after each update."""
    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) or is_greedy_scheduler(scheduler)


def greedy_view_scheduler(view: torch.optim.Optimizer, kwargs: Mapping[str, Any]) -> Any:
    """``trainer.lr_scheduler`` for ``lr_scheduler_type="greedy"``: transformers' own ``GreedyLR(view, **kwargs)``
    (so ``isinstance`` checks against it hold and its counters can be read), stepped with each evaluation metric
    by :func:`advance_scheduler`; ``None`` when transformers is not installed (the train step's scale, from
    :func:`ftrain.schedules.greedy`, does not need it)."""
    try:
        from transformers.optimization import GreedyLR
    except ImportError:
        return None
    return GreedyLR(view, **kwargs)


def greedy_transformation(scheduler: Any) -> GradientTransformation:
    """transformers' ``GreedyLR`` as :func:`ftrain.schedules.greedy` (a scale on the updates, changed by
    :func:`ftrain.schedules.plateau_update` after each evaluation), through
    :func:`~ftrain.trainer.schedulers.get_greedy_schedule` with the scheduler's own arguments.

    Raises:
        ValueError: groups with different learning rates or ``min_lr`` / ``max_lr`` (one scale cannot follow
            them), or a scheduler that has already been stepped.
    """
    lrs = [g["lr"] for g in scheduler.optimizer.param_groups]
    bounds_differ = len(set(scheduler.min_lrs)) != 1 or len(set(scheduler.max_lrs)) != 1
    if len(set(lrs)) != 1 or bounds_differ or scheduler.last_epoch:
        raise ValueError(
            "ftrain reproduces GreedyLR as one scale on every update: give every parameter group the same lr, "
            "min_lr and max_lr, and pass a scheduler that has not been stepped yet."
        )
    kwargs = {key: getattr(scheduler, key) for key in GREEDY_KWARGS if key not in ("min_lr", "max_lr", "reset_start")}
    kwargs["reset_start"] = scheduler.reset_start_original
    return get_greedy_schedule(lrs[0], **kwargs, min_lr=scheduler.min_lrs[0], max_lr=scheduler.max_lrs[0])


# ----------------------------------------------------------------------------------------------------------
# The state, in torch's format.


def torch_optimizer_state_dict(
    spec: TorchOptimizerSpec, opt_state: OptState, *, step: int | torch.Tensor
) -> dict[str, Any]:
    """``opt_state`` as ``torch.optim.Optimizer.state_dict()`` of ``spec``'s optimizer writes it:
    ``{"state": {index: {...}}, "param_groups": [{..., "params": [indices]}]}`` with parameters numbered group
    by group (:attr:`TorchOptimizerSpec.names`). The tensors are the state's own; ``step`` is the train state's
    step; parts with no torch form are passed over (:func:`ftrain.trainer.hf_checkpoint.torch_param_states`,
    ``strict=False``).

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> spec = describe_torch_optimizer(torch.optim.AdamW(model.parameters(), lr=0.1), model)
        >>> tx = make_transformation(spec, [0.1])
        >>> params = dict(model.named_parameters())
        >>> sd = torch_optimizer_state_dict(spec, tx.init({k: v.detach() for k, v in params.items()}), step=0)
        >>> sorted(sd["state"][0]), sd["param_groups"][0]["params"]
        (['exp_avg', 'exp_avg_sq', 'step'], [0, 1])
    """
    index, groups = index_param_groups([{**g.hyperparams, "params": g.names} for g in spec.groups])
    per_name = torch_param_states(opt_state, step=step, strict=False)
    return {"state": {index[n]: s for n, s in per_name.items() if n in index}, "param_groups": groups}


# ----------------------------------------------------------------------------------------------------------
# trainer.optimizer: the torch class, over the live model, reading the TrainState.

_PURE_STEP = (
    "trainer.optimizer is a view of ftrain's pure optimizer: the Trainer's train step computes the gradients and "
    "updates the parameters and the optimizer state inside the TrainState, so {what} has nothing to do here. Read "
    "param_groups / state_dict() freely; change the optimizer by passing optimizers=(...) or TrainingArguments."
)


class _OptimizerView:
    """Methods of ``trainer.optimizer`` (mixed in front of the torch class by :func:`make_optimizer_view`)."""

    _state_source: Callable[[], tuple[OptState, Any] | None]
    _spec: TorchOptimizerSpec
    _group_names: list[tuple[str, ...]]

    @property
    def state(self) -> dict[torch.Tensor, dict[str, Any]]:
        """``{parameter: its torch state}`` from the current ``TrainState`` (empty before training)."""
        source = self._state_source()
        if source is None:
            return {}
        opt_state, step = source
        params = {n: p for names, g in zip(self._group_names, self.param_groups) for n, p in zip(names, g["params"])}
        per_name = torch_param_states(opt_state, step=step, strict=False)
        return {params[n]: s for n, s in per_name.items() if n in params}

    @state.setter
    def state(self, value: Any) -> None:
        if value:  # torch's __init__ assigns an empty dict; anything else would be ignored, so refuse it
            raise RuntimeError(_PURE_STEP.format(what="assigning optimizer.state"))

    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict()`` (:func:`torch_optimizer_state_dict`) with the groups' current learning rates."""
        source = self._state_source()
        groups = tuple(
            TorchGroup(tuple(names), {k: v for k, v in g.items() if k != "params"})
            for names, g in zip(self._group_names, self.param_groups)
        )
        spec = dataclasses.replace(self._spec, groups=groups)
        opt_state, step = (None, 0) if source is None else source
        return torch_optimizer_state_dict(spec, opt_state, step=step)

    def load_state_dict(self, state_dict: Any) -> None:
        raise RuntimeError(
            "trainer.optimizer.load_state_dict: the optimizer state lives in ftrain's TrainState; resume with "
            "trainer.train(resume_from_checkpoint=...) instead."
        )

    def step(self, closure: Any = None) -> None:
        raise RuntimeError(_PURE_STEP.format(what="optimizer.step()"))

    def zero_grad(self, set_to_none: bool = True) -> None:
        raise RuntimeError(_PURE_STEP.format(what="optimizer.zero_grad()"))


@functools.cache
def _view_class(cls: type) -> type:
    return type(cls.__name__, (_OptimizerView, cls), {"__module__": __name__, "__qualname__": cls.__qualname__})


def make_optimizer_view(
    spec: TorchOptimizerSpec, model: nn.Module, state_source: Callable[[], tuple[OptState, Any] | None]
) -> torch.optim.Optimizer:
    """An instance of ``spec.cls`` (``isinstance(view, torch.optim.AdamW)`` holds) whose ``param_groups`` hold
    ``model``'s live parameters and ``spec``'s keys, whose ``state`` / ``state_dict()`` read
    ``state_source() -> (opt_state, step)`` (``None`` before training), and whose ``step()`` / ``zero_grad()`` /
    ``load_state_dict()`` raise. A torch scheduler can drive its ``lr`` keys, as transformers' schedulers do.
    """
    params = dict(model.named_parameters())
    groups = [{**g.hyperparams, "params": [params[n] for n in g.names]} for g in spec.groups]
    view = _view_class(spec.cls).__new__(_view_class(spec.cls))
    view._state_source, view._spec, view._group_names = state_source, spec, [g.names for g in spec.groups]
    torch.optim.Optimizer.__init__(view, groups, dict(spec.defaults))
    return view


# ----------------------------------------------------------------------------------------------------------
# Optimizer names -> torch classes, as transformers' Trainer.get_optimizer_cls_and_kwargs returns them.

_TORCH_CLASS_OF = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad,
                   "rmsprop": torch.optim.RMSprop}  # fmt: skip


def torch_optimizer_cls_and_kwargs(args: Any, model: nn.Module | None = None) -> tuple[Any, dict[str, Any]]:
    """transformers' ``Trainer.get_optimizer_cls_and_kwargs(args, model)``: the torch class and its keyword
    arguments for ``args.optim`` — ``(torch.optim.AdamW, {"lr", "betas", "eps"[, "fused": True]})``,
    ``torch.optim.SGD`` / ``Adagrad`` / ``RMSprop`` with the ``optim_args`` transformers reads. They are
    :func:`ftrain.trainer.convert.get_optimizer_cls_and_kwargs`'s choice with torch's names. ``adafactor`` and
    ``lion_32bit`` have no torch class and come back as ftrain's factory and arguments.

    Raises:
        ImportError / ValueError: as :func:`ftrain.trainer.convert.get_optimizer_cls_and_kwargs`.

    Example:
        >>> from ftrain.trainer.args import TrainingArguments
        >>> torch_optimizer_cls_and_kwargs(TrainingArguments("out", optim="adamw_torch", adam_beta2=0.99))
        (<class 'torch.optim.adamw.AdamW'>, {'lr': 5e-05, 'betas': (0.9, 0.99), 'eps': 1e-08})
    """
    factory, kwargs = _convert.get_optimizer_cls_and_kwargs(args, model)
    cls = _TORCH_CLASS_OF.get(factory.__name__)
    if cls is None:
        return factory, kwargs
    _, keys = _TRANSLATIONS[cls]
    back = {v: k for k, v in keys.items() if isinstance(v, str)}
    out: dict[str, Any] = {"lr": kwargs["learning_rate"]}
    if "b1" in kwargs:
        out["betas"] = (kwargs["b1"], kwargs["b2"])
    out.update({back[k]: v for k, v in kwargs.items() if k in back})
    name = args.name if hasattr(args, "name") else args.optim
    if str(getattr(name, "value", name)) == "adamw_torch_fused":
        out["fused"] = True
    return cls, out


# ----------------------------------------------------------------------------------------------------------
# What create_optimizer / create_scheduler build.


def _hf_groups(decay_mask: Mapping[str, bool], weight_decay: float) -> list[tuple[list[str], float]]:
    """transformers' two parameter groups by name: the parameters ``decay_mask`` marks (weight decay
    ``weight_decay``), then the others (0.0), each in ``decay_mask``'s (``named_parameters()``) order."""
    return [([n for n, d in decay_mask.items() if d], weight_decay), ([n for n, d in decay_mask.items() if not d], 0.0)]


def hf_param_groups(policy: Any, decay_mask: Mapping[str, bool], *, lr: float) -> list[dict[str, Any]]:
    """The param groups transformers' ``create_optimizer`` builds for ``policy``, with parameter names in
    ``"params"``, as its torch optimizer's ``state_dict()`` lists them after a ``LambdaLR`` scheduler set
    ``initial_lr`` (what ``optimizer.pt`` holds).

    The torch class and its arguments are :func:`torch_optimizer_cls_and_kwargs`'; the hyper-parameter keys and
    defaults are torch's own: the optimizer is built over placeholder scalars and its groups read back.

    Args:
        policy: the plan's :class:`~ftrain.trainer.plan.OptimPolicy` (``trainer.plan.optim``).
        decay_mask: ``{name: decays}`` over the trainable parameters (:func:`ftrain.optim.hf_decay_mask`).
        lr: the groups' current learning rate (the schedule's value for the next update).

    Raises:
        UnmappableOptimizerError: an ``optim`` whose transformers optimizer is not a ``torch.optim`` one.
    """
    cls, kwargs = torch_optimizer_cls_and_kwargs(policy)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        name = getattr(policy.name, "value", policy.name)
        classes = sorted(c.__name__ for c in _TORCH_CLASS_OF.values())
        raise UnmappableOptimizerError(
            f"optim={name!r}: transformers' optimizer for it is not a torch.optim one, so optimizer.pt cannot hold "
            f"its state (it can for the optim values that build torch.optim's {classes})."
        )
    groups = _hf_groups(decay_mask, policy.weight_decay)
    placeholders = [{"params": [torch.zeros(()) for _ in names], "weight_decay": wd} for names, wd in groups]
    optimizer = cls(placeholders, **{**kwargs, "lr": lr})
    return [{**{k: v for k, v in g.items() if k != "params"}, "initial_lr": policy.learning_rate, "params": names}
            for g, (names, _) in zip(optimizer.param_groups, groups)]  # fmt: skip


def build_optimizer_spec(
    cls: Any, kwargs: Mapping[str, Any], model: nn.Module, weight_decay: float
) -> tuple[TorchOptimizerSpec, Schedule | None]:
    """The spec of ``cls(<transformers' two groups of model>, **kwargs)`` — what transformers'
    ``create_optimizer`` builds — and the learning-rate schedule given in ``kwargs`` (``None`` unless an ftrain
    factory got a callable ``learning_rate``).

    ``cls`` is a torch optimizer class (instantiated over ``model``'s parameters, so torch checks the arguments;
    no state is allocated) or an ``ftrain.optim`` factory (its arguments are kept under ftrain's names).
    """
    groups = _hf_groups(optim.hf_decay_mask(model), weight_decay)
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer):
        _translation(cls)  # refuse an untranslatable class before building anything
        params = dict(model.named_parameters())
        instance = cls([{"params": [params[n] for n in names], "weight_decay": wd} for names, wd in groups], **kwargs)
        return describe_torch_optimizer(instance, model), None
    kw = dict(kwargs)
    lr = kw.pop("learning_rate", None)
    schedule = lr if callable(lr) else None
    hyper = [{"lr": None if callable(lr) else lr, **kw, "weight_decay": wd} for _, wd in groups]
    spec_groups = tuple(TorchGroup(tuple(names), h) for (names, _), h in zip(groups, hyper))
    return TorchOptimizerSpec(torch.optim.Optimizer, {"lr": hyper[0]["lr"]}, spec_groups, factory=cls), schedule


def check_torch_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> TorchOptimizerSpec:
    """The spec of a user's torch optimizer, refused when ftrain cannot reproduce it: a class or key it has no
    equivalent for, a parameter of another model, or an optimizer that has already stepped (its state would be
    lost; pass a fresh one, or resume from a checkpoint)."""
    spec = describe_torch_optimizer(optimizer, model)
    for group in spec.groups:
        ftrain_optimizer_kwargs(spec.cls, group.hyperparams)
    for state in optimizer.state.values():
        stepped = any(k != "step" and k != "sum" for k in state) or float(state.get("step", 0)) > 0
        if stepped:
            raise ValueError(
                f"The {spec.cls.__name__} passed in optimizers=(...) has already taken steps; ftrain starts the "
                "optimizer state from its own TrainState and would drop that state. Pass a freshly built optimizer, "
                "or continue a run with trainer.train(resume_from_checkpoint=...)."
            )
    return spec


def bind_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer, view: torch.optim.Optimizer) -> Any:
    """A copy of ``scheduler`` (and of the schedulers inside it: ``SequentialLR``, ``ChainedScheduler``) that drives
    ``view`` instead of ``optimizer``; ``scheduler`` itself is left as it is."""
    torch_scheduler = torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau
    if not (isinstance(scheduler, torch_scheduler) or is_greedy_scheduler(scheduler)):
        raise TypeError(
            "optimizers[1] must be a torch.optim.lr_scheduler scheduler (or transformers' GreedyLR) of "
            f"optimizers[0], got {type(scheduler).__name__}."
        )
    if getattr(scheduler, "optimizer", None) is not optimizer:
        raise ValueError("optimizers[1] must be a scheduler of optimizers[0] (it drives another optimizer).")
    twin = copy.deepcopy(scheduler, memo={id(optimizer): view})
    if _is_transformers_class(type(scheduler), "AdafactorSchedule"):
        twin.__class__ = _adafactor_schedule_class(type(scheduler))
    return twin


def _is_transformers_class(cls: type, name: str) -> bool:
    return any(c.__name__ == name and c.__module__.startswith("transformers") for c in cls.__mro__)


class _AdafactorScheduleView:
    """``get_lr`` of transformers' ``AdafactorSchedule`` (a proxy that reports the step size Adafactor computes
    itself) over ftrain's state, mixed in front of that class by :func:`bind_scheduler`.

    transformers reads the step size at the optimizer's update count once the groups have gradients (before that,
    the base lrs). ftrain's step never sets ``.grad``, and the Trainer steps this view once per update (and catches
    it up on resume), so its ``last_epoch`` is that count once training has a state: reading it costs nothing per
    update, where reading the optimizer state would translate every parameter's state and wait for the device. The
    value is transformers' ``Adafactor._get_lr`` without the ``scale_parameter`` factor ``max(eps[1], RMS(p))``:
    that RMS is of the parameter before the update, which ftrain's state does not keep (ftrain applies it inside
    the update all the same; only the reported number leaves it out).
    """

    def get_lr(self) -> list[float]:
        view = self.optimizer  # trainer.optimizer, or the stand-in of torch_lr_schedules (no state: base lrs)
        if self.last_epoch == 0 or not isinstance(view, _OptimizerView) or view._state_source() is None:
            return list(self.base_lrs)
        groups = self.optimizer.param_groups
        return [_adafactor_step_size(group, self.last_epoch) for group in groups if group["params"]]


def _adafactor_step_size(group: Mapping[str, Any], step: int) -> float:
    """transformers' Adafactor step size at ``step`` (updates done) without the RMS factor: the relative step
    ``min(1e-6 * step if warmup_init else 1e-2, 1 / sqrt(step))``, or the group's ``lr``."""
    if not group["relative_step"]:
        return float(group["lr"])
    return min(1e-6 * step if group["warmup_init"] else 1e-2, 1.0 / math.sqrt(max(step, 1)))


@functools.cache
def _adafactor_schedule_class(cls: type) -> type:
    return type(cls.__name__, (_AdafactorScheduleView, cls), {"__module__": __name__, "__qualname__": cls.__qualname__})


def _schedule_factor(step: int, *, value: Callable[[int], float], lr: float) -> float:
    """``schedule(step) / lr``, the factor a ``LambdaLR`` multiplies the group's initial lr by (``value`` is
    :func:`_host_reader` of the schedule, so that stepping reads no tensor)."""
    return value(step) / lr if lr else 0.0


#: How many steps of a schedule :func:`_host_reader` computes in one call.
_HOST_BLOCK = 1024


def _host_values(schedule: Schedule, start: int, stop: int) -> list[float]:
    """``schedule`` at ``start..stop - 1`` as Python floats, in one call where it takes a vector of steps."""
    steps = torch.arange(start, stop)
    try:
        values = schedule(steps)
        if isinstance(values, torch.Tensor) and values.shape == steps.shape:
            return values.tolist()
    except (RuntimeError, TypeError, ValueError):
        pass  # a schedule written for 0-d steps only
    return [float(schedule(torch.tensor(k))) for k in range(start, stop)]


def _host_reader(schedule: Schedule) -> Callable[[int], float]:
    """``step -> float(schedule(step))``, computed :data:`_HOST_BLOCK` steps at a time when a step of the block is
    first read (the last two blocks are kept): nothing is computed or held for steps the run never reaches, however
    large ``max_steps`` is, and each scheduler step is a list lookup."""

    @functools.lru_cache(maxsize=2)
    def block(index: int) -> list[float]:
        return _host_values(schedule, index * _HOST_BLOCK, (index + 1) * _HOST_BLOCK)

    def value(step: int) -> float:
        index, offset = divmod(step, _HOST_BLOCK)
        return block(index)[offset]

    return value


def make_lambda_scheduler(view: torch.optim.Optimizer, schedules: Sequence[Schedule]) -> Any:
    """``trainer.lr_scheduler`` for ftrain schedules: a ``LambdaLR`` over ``view`` whose factor for group ``i`` is
    ``schedules[i](step) / lr_i`` (so ``get_last_lr()`` is the schedule's value, as transformers' LambdaLR), read
    from the schedule's values computed a block of steps at a time (:func:`_host_reader`)."""
    readers = {id(s): _host_reader(s) for s in schedules}
    lambdas = [
        functools.partial(_schedule_factor, value=readers[id(s)], lr=g["lr"])
        for s, g in zip(schedules, view.param_groups)
    ]
    return torch.optim.lr_scheduler.LambdaLR(view, lambdas)


def advance_scheduler(scheduler: Any, metric: float | None = None) -> None:
    """Steps a torch scheduler as transformers does after an update (``metric is None``: every scheduler but
    ``ReduceLROnPlateau`` and ``GreedyLR``) or after an evaluation (those two only, with the metric)."""
    is_plateau = is_metric_scheduler(scheduler)
    stepped = isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler) or is_greedy_scheduler(scheduler)
    if not stepped or is_plateau != (metric is not None):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the view's step() is never called: torch warns about the order
        scheduler.step(metric) if is_plateau else scheduler.step()


def optimizer_group(optimizer: torch.optim.Optimizer, model: nn.Module, param: Any = None) -> Any:
    """transformers' ``get_optimizer_group``: the ``param_groups`` entry holding ``param`` (a parameter, or its
    name in ``model``), or each group's ``params`` list when ``param`` is ``None``.

    Raises:
        ValueError: ``param`` is in no group.
    """
    if param is None:
        return [group["params"] for group in optimizer.param_groups]
    tensor = dict(model.named_parameters()).get(param) if isinstance(param, str) else param
    for group in optimizer.param_groups:
        if any(p is tensor for p in group["params"]):
            return group
    raise ValueError(
        f"get_optimizer_group: {repr(param) if isinstance(param, str) else 'the given tensor'} is in no parameter "
        f"group of the optimizer; pass a trainable parameter of {type(model).__name__} (or its name)."
    )
