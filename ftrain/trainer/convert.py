"""``TrainingArguments`` -> core pieces: the optimizer and the learning-rate schedule.

The functions here take the Trainer plan's :class:`~ftrain.trainer.plan.OptimPolicy` (``plan.optim``) or, as in
transformers, the ``TrainingArguments`` themselves (read into that policy by
:func:`~ftrain.trainer.plan.optim_policy`). They only choose and parameterise pieces of :mod:`ftrain.optim` and
:mod:`ftrain.schedules`; the maths lives there. The step arithmetic
(:meth:`~ftrain.trainer.plan.TrainerPlan.steps`) and the compile options (:func:`~ftrain.trainer.plan.jit_options`)
are the plan's.

What :func:`make_optimizer` builds matches ``transformers.Trainer.create_optimizer_and_scheduler``:

- the optimizer named by ``args.optim`` (the torch-only names, plus ``lion_32bit``), with transformers' keyword
  arguments (``adam_beta1/2``, ``adam_epsilon``, ``optim_args``);
- its two parameter groups: weight decay ``args.weight_decay`` on the parameters
  :func:`ftrain.optim.hf_decay_mask` marks, none on biases and normalisation weights; only trainable params;
- gradient clipping to ``args.max_grad_norm`` first (none when it is 0 or ``None``);
- the learning rate ``schedule(count)`` with ``count`` the number of updates done, so update ``k`` (0-based)
  uses ``lr * λ(k)`` as transformers' scheduler does (with warmup the first update has lr 0). The value used by
  the last update is recorded in the optimizer state; the train step reports it as ``learning_rate``, which is
  transformers' logged ``lr_scheduler.get_last_lr()[0]``.

Example:
    >>> import torch
    >>> from ftrain.trainer.args import TrainingArguments
    >>> model = torch.nn.Linear(3, 2)
    >>> args = TrainingArguments("out", learning_rate=0.1, warmup_steps=2, optim="sgd")
    >>> tx = make_optimizer(args, model, num_training_steps=10)
    >>> params = {k: v.detach() for k, v in model.named_parameters()}
    >>> state = tx.init(params)
    >>> _, state = tx.update({k: torch.ones_like(v) for k, v in params.items()}, state, params)
    >>> float(logged_learning_rate(state))  # warmup: the first update uses lr 0
    0.0
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from enum import Enum
from typing import Any

import torch
from torch import nn

from ftrain import optim
from ftrain import tree as _tree
from ftrain.optim.base import GradientTransformation, OptState, Schedule
from ftrain.schedules import get_schedule, is_metric_schedule_state
from ftrain.trainer.args import OptimizerNames, SchedulerType
from ftrain.trainer.plan import (
    OptimPolicy,
    optim_policy,
    resolve_warmup,
)
from ftrain.trainer.schedulers import get_greedy_schedule, get_reduce_on_plateau_schedule

__all__ = [
    "SUPPORTED_OPTIMIZERS",
    "get_optimizer_cls_and_kwargs",
    "logged_learning_rate",
    "make_optimizer",
    "make_schedule",
    "parse_optim_args",
]

# ``optim_args`` keys transformers reads for each torch optimizer, with their type and ftrain's argument name.
_OPTIM_ARG_SPECS: dict[str, dict[str, tuple[type, str]]] = {
    "sgd": {
        "momentum": (float, "momentum"),
        "dampening": (float, "dampening"),
        "weight_decay": (float, "weight_decay"),
        "nesterov": (bool, "nesterov"),
    },
    "adagrad": {"lr_decay": (float, "lr_decay"), "weight_decay": (float, "weight_decay"), "eps": (float, "eps")},
    "rmsprop": {
        "momentum": (float, "momentum"),
        "alpha": (float, "decay"),
        "eps": (float, "eps"),
        "weight_decay": (float, "weight_decay"),
        "centered": (bool, "centered"),
    },
}
_FACTORIES: dict[str, Callable[..., GradientTransformation]] = {
    "adamw_torch": optim.adamw,
    "adamw_torch_fused": optim.adamw,
    "adafactor": optim.adafactor,
    "lion_32bit": optim.lion,
    "sgd": optim.sgd,
    "adagrad": optim.adagrad,
    "rmsprop": optim.rmsprop,
}
SUPPORTED_OPTIMIZERS: tuple[str, ...] = tuple(_FACTORIES)
"""The ``TrainingArguments.optim`` values ftrain builds."""

# Why each other transformers optimizer is refused, and what to use instead.
_UNSUPPORTED: dict[str, tuple[str, str]] = {
    "adamw_torch_xla": ("runs on TPUs through torch_xla", "adamw_torch"),
    "adamw_torch_npu_fused": ("runs on Ascend NPUs through torch_npu", "adamw_torch"),
    "adamw_anyprecision": ("comes from torchdistx", "adamw_torch"),
    "adamw_torch_4bit": ("keeps 4-bit states through torchao", "adamw_torch"),
    "adamw_torch_8bit": ("keeps 8-bit states through torchao", "adamw_torch"),
    "grokadamw": ("comes from the grokadamw package", "adamw_torch"),
    "stable_adamw": ("comes from torch-optimi", "adamw_torch"),
    "lomo": ("fuses the update into the backward pass (lomo-optim)", "sgd"),
    "adalomo": ("fuses the update into the backward pass (lomo-optim)", "adafactor"),
    "schedule_free_radam": ("comes from schedulefree", "adamw_torch"),
    "schedule_free_adamw": ("comes from schedulefree", "adamw_torch"),
    "schedule_free_sgd": ("comes from schedulefree", "sgd"),
}
# The package transformers imports for each of them: (module, pip command, exception type transformers raises when
# the module is missing — ImportError, or ValueError for the four it reports so).
_SCHEDULEFREE = ("schedulefree", "pip install schedulefree", ImportError)
_BACKENDS: dict[str, tuple[str, str, type[Exception]]] = {
    "adamw_torch_xla": ("torch_xla", "pip install torch_xla", ValueError),
    "adamw_torch_npu_fused": ("torch_npu", "pip install torch_npu", ValueError),
    "adamw_anyprecision": ("torchdistx", "pip install git+https://github.com/pytorch/torchdistx", ValueError),
    "grokadamw": ("grokadamw", "pip install grokadamw", ValueError),
    "adamw_torch_4bit": ("torchao", "pip install torchao", ImportError),
    "adamw_torch_8bit": ("torchao", "pip install torchao", ImportError),
    "stable_adamw": ("optimi", "pip install torch-optimi", ImportError),
    "lomo": ("lomo_optim", "pip install lomo-optim", ImportError),
    "adalomo": ("lomo_optim", "pip install lomo-optim", ImportError),
    "schedule_free_radam": _SCHEDULEFREE,
    "schedule_free_adamw": _SCHEDULEFREE,
    "schedule_free_sgd": _SCHEDULEFREE,
}
# Families of refused optimizers: (reason, backend) shared by their names.
_BNB = ("is a bitsandbytes optimizer (8-bit or paged states)",
        ("bitsandbytes", "pip install -U bitsandbytes", ImportError))  # fmt: skip
_GALORE = ("projects gradients to low rank (galore_torch)",
           ("galore_torch", "pip install git+https://github.com/jiaweizzhao/GaLore", ImportError))  # fmt: skip
_APOLLO = ("projects gradients to low rank (apollo_torch)",
           ("apollo_torch", "pip install git+https://github.com/zhuhanqing/APOLLO", ImportError))  # fmt: skip
_FAMILIES = [  # (names, (reason, backend), instead)
    (("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit", "ademamix", "ademamix_8bit",
      "paged_ademamix_32bit", "paged_ademamix_8bit"), _BNB, "adamw_torch"),
    (("lion_8bit", "paged_lion_32bit", "paged_lion_8bit"), _BNB, "lion_32bit"),
    (("rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit"), _BNB, "rmsprop"),
    (("galore_adamw", "galore_adamw_8bit", "galore_adamw_layerwise", "galore_adamw_8bit_layerwise"), _GALORE,
     "adamw_torch"),
    (("galore_adafactor", "galore_adafactor_layerwise"), _GALORE, "adafactor"),
    (("apollo_adamw", "apollo_adamw_layerwise"), _APOLLO, "adamw_torch"),
]  # fmt: skip
for _names, (_reason, _backend), _instead in _FAMILIES:
    for _name in _names:
        _UNSUPPORTED[_name], _BACKENDS[_name] = (_reason, _instead), _backend


def _refuse(name: str) -> Exception:
    """The error for an optimizer ftrain does not build: transformers' exception naming the package when it is not
    installed (so scripts that catch it keep working), else a ValueError saying ftrain has no pure version."""
    reason, instead = _UNSUPPORTED[name]
    module, pip, error = _BACKENDS[name]
    if importlib.util.find_spec(module) is None:
        return error(
            f"optim={name!r} needs the `{module}` package, which is not installed: `{pip}`. Note that ftrain has no "
            f"pure version of this optimizer even with the package; optim={instead!r} works without it."
        )
    return ValueError(
        f"optim={name!r} is not available in ftrain: it {reason}, and ftrain's optimizers are pure functions "
        f"from ftrain.optim. Use optim={instead!r} (--optim {instead}), or give the Trainer your own "
        "ftrain.optim GradientTransformation."
    )


# ----------------------------------------------------------------------------------------------------------
# The optimizer.


def parse_optim_args(optim_args: str | None) -> dict[str, str]:
    """Splits transformers' ``optim_args`` string ``"key=value,key=value"`` (spaces ignored) into a dict.

    Args:
        optim_args: the string, or ``None``.

    Returns:
        ``{key: value}`` with the values still strings.

    Raises:
        ValueError: a part that is not ``key=value``.

    Example:
        >>> parse_optim_args("momentum=0.9, nesterov=True")
        {'momentum': '0.9', 'nesterov': 'True'}
    """
    out: dict[str, str] = {}
    for part in (optim_args or "").replace(" ", "").split(","):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key or not value or "=" in value:
            raise ValueError(
                f"optim_args: {part!r} is not key=value; write e.g. optim_args='momentum=0.9,nesterov=True'."
            )
        out[key] = value
    return out


def _typed_optim_args(name: str, raw: dict[str, str]) -> dict[str, Any]:
    """``optim_args`` of a torch optimizer as ftrain keyword arguments (floats and bools, ftrain's names)."""
    specs = _OPTIM_ARG_SPECS[name]
    unknown = sorted(set(raw) - set(specs))
    if unknown:
        raise ValueError(f"optim_args: {unknown} are not arguments of optim={name!r}; it takes {sorted(specs)}.")
    out: dict[str, Any] = {}
    for key, text in raw.items():
        kind, ftrain_name = specs[key]
        if kind is bool:
            if text.lower() not in ("true", "1", "yes", "false", "0", "no"):
                raise ValueError(f"optim_args: {key}={text!r} for optim={name!r} must be true/false (or 1/0, yes/no).")
            out[ftrain_name] = text.lower() in ("true", "1", "yes")
        else:
            try:
                out[ftrain_name] = float(text)
            except ValueError:
                raise ValueError(f"optim_args: {key}={text!r} for optim={name!r} must be a number.") from None
    return out


def _optimizer_name(value: Any) -> str:
    """``args.optim`` as a plain string, checked against transformers' names."""
    text = value.value if isinstance(value, Enum) else str(value)
    try:
        return OptimizerNames(text).value
    except ValueError:
        raise ValueError(
            f"optim={text!r} is not an optimizer name; ftrain builds {list(SUPPORTED_OPTIMIZERS)}."
        ) from None


def _policy(args: Any) -> OptimPolicy:
    """``args`` as an :class:`OptimPolicy` (it may be one already)."""
    return args if isinstance(args, OptimPolicy) else optim_policy(args)


def get_optimizer_cls_and_kwargs(args: Any, model: nn.Module | None = None) -> tuple[Callable[..., Any], dict]:
    """The optimizer ``args.optim`` names, as transformers' ``Trainer.get_optimizer_cls_and_kwargs`` gives it:
    a factory (an :mod:`ftrain.optim` alias) and its keyword arguments.

    The keyword arguments are ftrain's names for transformers' ones: ``learning_rate`` (``args.learning_rate``),
    Adam's ``b1``/``b2``/``eps`` from ``adam_beta1``/``adam_beta2``/``adam_epsilon``, and the ``optim_args`` keys
    transformers reads for ``sgd`` / ``adagrad`` / ``rmsprop``. Weight decay is not among them: transformers sets
    it per parameter group, and :func:`make_optimizer` does the same.

    Args:
        args: a ``TrainingArguments`` (ftrain's or transformers'), or a plan's ``OptimPolicy``.
        model: unused (transformers needs it for GaLore-like optimizers, which ftrain does not build).

    Returns:
        ``(factory, kwargs)``; ``factory(**kwargs, weight_decay=..., ...)`` is a ``GradientTransformation``.

    Raises:
        ImportError / ValueError: an optimizer of another library whose package is missing (transformers' exception
            type, naming the package).
        ValueError: an unknown or unsupported optimizer name (the message suggests a supported one), or
            ``optim_args`` the optimizer does not take or cannot parse.

    Example:
        >>> from ftrain.trainer.args import TrainingArguments
        >>> factory, kwargs = get_optimizer_cls_and_kwargs(TrainingArguments("out", optim="rmsprop",
        ...                                                optim_args="alpha=0.9,centered=true"))
        >>> factory.__name__, kwargs
        ('rmsprop', {'learning_rate': 5e-05, 'decay': 0.9, 'centered': True})
    """
    policy = _policy(args)
    name = _optimizer_name(policy.name)
    if name in _UNSUPPORTED:
        raise _refuse(name)
    kwargs: dict[str, Any] = {"learning_rate": policy.learning_rate}
    raw = parse_optim_args(policy.optim_args)
    if name in _OPTIM_ARG_SPECS:
        typed = _typed_optim_args(name, raw)
        if "weight_decay" in typed:
            warnings.warn(
                f"optim_args weight_decay={typed.pop('weight_decay')} is ignored, as in transformers: weight decay "
                "is set per parameter group from TrainingArguments.weight_decay; set that instead.",
                UserWarning,
                stacklevel=2,
            )
        kwargs.update(typed)
    elif raw:
        raise ValueError(
            f"optim_args={policy.optim_args!r}: optim={name!r} takes no optim_args (transformers would ignore "
            "them); its settings are learning_rate, adam_beta1, adam_beta2, adam_epsilon and weight_decay."
        )
    if name in ("adamw_torch", "adamw_torch_fused"):
        kwargs.update(b1=policy.beta1, b2=policy.beta2, eps=policy.epsilon)
    elif name == "lion_32bit":
        kwargs.update(b1=policy.beta1, b2=policy.beta2)
    elif name == "adafactor":
        kwargs.update(scale_parameter=False, relative_step=False)
    return _FACTORIES[name], kwargs


def make_optimizer(args: Any, model: nn.Module, *, num_training_steps: int) -> GradientTransformation:
    """The optimizer transformers' ``Trainer`` would create for ``args``, as a pure ``GradientTransformation``.

    ``chain(clip_by_global_norm(max_grad_norm), <optimizer with its two decay groups and the schedule>)`` (the
    optimizer from :func:`ftrain.optim.make_optimizer`, as the ``ftrain`` command builds its own), plus
    :func:`ftrain.schedules.reduce_on_plateau` at the end for ``lr_scheduler_type="reduce_lr_on_plateau"``
    (:func:`ftrain.schedules.greedy` for ``"greedy"``).
    The params tree it expects is ``{name: tensor}`` over the model's trainable parameters
    (``ftrain.module.split_module``).

    Args:
        args: a ``TrainingArguments``, or a plan's ``OptimPolicy`` (``plan.optim``).
        model: the model whose trainable parameters the optimizer updates (used for the decay groups).
        num_training_steps: the total number of optimizer steps (``max_steps`` after the step arithmetic).

    Returns:
        The optimizer.

    Raises:
        ValueError: an unsupported optimizer or schedule, bad ``optim_args`` / ``lr_scheduler_kwargs``, or a
            model without trainable parameters.
    """
    policy = _policy(args)
    factory, kwargs = get_optimizer_cls_and_kwargs(policy, model)
    decays = optim.hf_decay_mask(model)
    if not decays:
        raise ValueError(
            f"make_optimizer: {type(model).__name__} has no parameter with requires_grad=True, so there is "
            "nothing to train; unfreeze some parameters."
        )
    kwargs["learning_rate"] = make_schedule(policy, num_training_steps)
    parts = []
    if policy.max_grad_norm is not None and policy.max_grad_norm > 0:
        parts.append(optim.clip_by_global_norm(policy.max_grad_norm))
    parts.append(optim.make_optimizer(factory, **kwargs, weight_decay=policy.weight_decay, decay_mask=decays))
    if SchedulerType(policy.schedule) == SchedulerType.REDUCE_ON_PLATEAU:
        parts.append(_plateau(policy))
    elif SchedulerType(policy.schedule) == SchedulerType.GREEDY:
        parts.append(get_greedy_schedule(policy.learning_rate, **policy.schedule_kwargs))
    return optim.chain(*parts)


# ----------------------------------------------------------------------------------------------------------
# The learning rate.


def make_schedule(args: Any, num_training_steps: int) -> Schedule:
    """``step -> learning rate`` for ``args.lr_scheduler_type``, ``args.get_warmup_steps(num_training_steps)``
    and ``args.lr_scheduler_kwargs`` (:func:`ftrain.schedules.get_schedule`, transformers' ``get_scheduler``); the
    warmup is resolved by :func:`~ftrain.trainer.plan.resolve_warmup`, the formula of ``get_warmup_steps``.

    For ``reduce_lr_on_plateau`` and ``greedy`` it is the constant ``learning_rate``; the metric-driven scale is a
    separate transformation that :func:`make_optimizer` adds.

    Args:
        args: a ``TrainingArguments``, or a plan's ``OptimPolicy`` (``plan.optim``).
        num_training_steps: the total number of optimizer steps.

    Returns:
        The schedule, called with the number of updates done (0 for the first).

    Raises:
        ValueError: arguments the schedule rejects.
        TypeError: a ``lr_scheduler_kwargs`` key the schedule does not take.

    Example:
        >>> import torch
        >>> from ftrain.trainer.args import TrainingArguments
        >>> sched = make_schedule(TrainingArguments("out", learning_rate=1.0, warmup_steps=0.5), 4)
        >>> [float(sched(torch.tensor(k))) for k in range(4)]
        [0.0, 0.5, 1.0, 0.5]
    """
    policy = _policy(args)
    name = SchedulerType(policy.schedule).value
    if name in ("reduce_lr_on_plateau", "greedy"):
        return get_schedule("constant", policy.learning_rate)
    return get_schedule(
        name,
        policy.learning_rate,
        num_warmup_steps=resolve_warmup(policy.warmup_steps, num_training_steps),
        num_training_steps=num_training_steps,
        **policy.schedule_kwargs,
    )


def _plateau(policy: OptimPolicy) -> GradientTransformation:
    """``torch.optim.lr_scheduler.ReduceLROnPlateau(**lr_scheduler_kwargs)`` as a scale on the updates
    (:func:`~ftrain.trainer.schedulers.get_reduce_on_plateau_schedule`)."""
    return get_reduce_on_plateau_schedule(policy.learning_rate, **policy.schedule_kwargs)


def logged_learning_rate(opt_state: OptState) -> torch.Tensor | None:
    """The learning rate the last update used, as transformers logs it (``get_last_lr()[0]``, or the param
    group's lr under ``reduce_lr_on_plateau`` / ``greedy``): the recorded rate times any metric-driven scale.

    Args:
        opt_state: the state of an optimizer from :func:`make_optimizer`.

    Returns:
        A 0-d tensor, or ``None`` when the state records no learning rate.
    """
    lr = optim.find_hyperparam(opt_state, "learning_rate")
    if lr is None:
        return None
    for leaf in _tree.tree_leaves(opt_state, is_leaf=is_metric_schedule_state):
        if is_metric_schedule_state(leaf):
            lr = lr * leaf.scale.to(lr.dtype)
    return lr
