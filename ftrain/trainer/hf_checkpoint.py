"""transformers' checkpoint files — ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth`` — from and into ftrain's pure
state.

transformers' ``Trainer`` writes a ``checkpoint-N`` folder with ``torch.save`` of its torch objects' ``state_dict()``;
its resume (and users' tooling) reads them back. ftrain keeps the same facts in the ``TrainState``: the optimizer's
moments in ``opt_state`` (nested ``NamedTuple`` states of :mod:`ftrain.optim`), the schedule as a function of the
update count, the dropout key. This module translates, in both directions:

- :func:`torch_param_states`: the one map from ftrain's optimizer states to torch's per-parameter state keys, by
  parameter name. Mapped states: Adam/AdamW (``step``, ``exp_avg``, ``exp_avg_sq``), SGD momentum
  (``momentum_buffer``), Adagrad (``step``, ``sum``), RMSprop (``step``, ``square_avg``, ``momentum_buffer``,
  ``grad_avg``); read leniently (for ``trainer.optimizer``, :mod:`ftrain.trainer.torch_optim`) also transformers'
  Adafactor.
- :func:`opt_state_to_torch` / :func:`opt_state_from_torch`: ``opt_state`` <-> a ``torch.optim`` ``state_dict()``
  (``{"state": {index: {...}}, "param_groups": [...]}``). The parameter index order is transformers' param groups
  order: the decaying parameters, then the others, each in ``named_parameters()`` order
  (:func:`ftrain.trainer.torch_optim.hf_param_groups`). Anything but the torch.optim states above (Lion, Adafactor,
  a plateau scale, a user's transformation) cannot be written in a format a torch optimizer loads, and raises
  :class:`UnmappableOptimizerError` naming the part.
- :func:`lambda_lr_state_dict`: the ``LambdaLR`` ``state_dict()`` of transformers' schedulers after ``step``
  updates (its ``lr_lambdas`` are rebuilt from the arguments on load, by transformers and by ftrain alike).
- :func:`rng_states` / :func:`set_rng_states`: the global Python / numpy / torch generators, as ``rng_state.pth``
  holds them. ftrain's own randomness is the key in the ``TrainState`` (dropout draws ``fold_in(key, step)``), so
  these matter only for user code that draws from the global generators (a collator's masking, say).
- :func:`load_torch_file`: ``torch.load(weights_only=True)`` with numpy's array types allowed (the RNG file holds
  one): tensors, containers and numbers only, never an arbitrary pickled object.

Example:
    >>> import torch
    >>> from ftrain import optim
    >>> params = {"w": torch.ones(2), "b": torch.zeros(1)}
    >>> tx = optim.sgd(0.1, momentum=0.9)
    >>> state = tx.update({"w": torch.ones(2), "b": torch.ones(1)}, tx.init(params), params)[1]
    >>> groups = [{"params": ["w"], "lr": 0.1}, {"params": ["b"], "lr": 0.1}]
    >>> sd = opt_state_to_torch(state, groups, step=1)
    >>> sd["param_groups"][1]["params"], sd["state"][0]["momentum_buffer"]
    ([1], tensor([1., 1.]))
    >>> back = opt_state_from_torch(sd, tx.init(params), [["w"], ["b"]], step=1)
    >>> back[1].trace["b"], int(back[1].count)
    (tensor([1.]), 1)
"""

from __future__ import annotations

import functools
import random
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from ftrain import tree as _tree
from ftrain.checkpoint.treeio import is_dtensor
from ftrain.optim.base import EmptyState
from ftrain.optim.factorized import ScaleByAdafactorState
from ftrain.optim.transform import (
    ScaleByAdagradState,
    ScaleByAdamState,
    ScaleByLearningRateState,
    ScaleByRmsState,
    ScaleByScheduleState,
    TraceState,
)

__all__ = [
    "OPTIMIZER_NAME",
    "RNG_STATE_NAME",
    "SCALER_NAME",
    "SCHEDULER_NAME",
    "TRAINING_ARGS_BIN",
    "UnmappableOptimizerError",
    "check_param_groups",
    "index_param_groups",
    "lambda_lr_state_dict",
    "load_torch_file",
    "opt_state_from_torch",
    "opt_state_to_torch",
    "rng_states",
    "set_rng_states",
    "torch_param_states",
]

OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
SCALER_NAME = "scaler.pt"
RNG_STATE_NAME = "rng_state.pth"
TRAINING_ARGS_BIN = "training_args.bin"

# ftrain state type -> {torch's per-parameter key: the state's field holding {param name: tensor}}.
_MOMENTS: dict[type, dict[str, str]] = {
    ScaleByAdamState: {"exp_avg": "mu", "exp_avg_sq": "nu"},
    TraceState: {"momentum_buffer": "trace"},
    ScaleByAdagradState: {"sum": "sum_of_squares"},
    ScaleByRmsState: {"square_avg": "nu", "grad_avg": "mu"},
}
# transformers' Adafactor (not a torch.optim class): trainer.optimizer shows its state in torch's form, but
# optimizer.pt holds torch.optim states only.
_ADAFACTOR_MOMENTS = {ScaleByAdafactorState: {k: k for k in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq",
                                                             "exp_avg")}}  # fmt: skip
# States whose torch optimizer keeps a per-parameter "step" (Adam, Adagrad, RMSprop; SGD keeps none).
_STEPPED = (ScaleByAdamState, ScaleByAdagradState, ScaleByRmsState)
# States that only count updates.
_COUNTERS = (ScaleByLearningRateState, ScaleByScheduleState)
_KNOWN = (*_MOMENTS, *_COUNTERS, EmptyState)
# Group hyper-parameters that ftrain takes from the arguments (not from a checkpoint): they must agree on resume.
_CHECKED_HYPERPARAMS = ("betas", "eps", "weight_decay", "momentum", "dampening", "nesterov", "alpha", "centered",
                        "lr_decay", "initial_accumulator_value", "amsgrad", "maximize", "initial_lr")  # fmt: skip


class UnmappableOptimizerError(ValueError):
    """An optimizer state that has no ``torch.optim`` ``state_dict()`` form (or a torch state ftrain cannot map)."""


def _is_node(x: Any) -> bool:
    return isinstance(x, _KNOWN)


def _nodes(opt_state: Any, known: tuple[type, ...] = _KNOWN) -> list[tuple[str, Any]]:
    """``(key path, leaf)`` of ``opt_state`` with the optimizer states of types ``known`` as leaves (``None``
    skipped)."""
    paths, leaves, _ = _tree.tree_flatten_with_path(opt_state, is_leaf=lambda x: isinstance(x, known))
    return [(_tree.keystr(p), leaf) for p, leaf in zip(paths, leaves)]


def _unmappable(path: str, leaf: Any) -> UnmappableOptimizerError:
    what = type(leaf).__name__
    return UnmappableOptimizerError(
        f"opt_state{path} ({what}) has no torch.optim state_dict() form: optimizer.pt can hold the states of AdamW / "
        "Adam, SGD with momentum, Adagrad and RMSprop (torch.optim), not this one. The whole optimizer state is in "
        "ftrain's state.safetensors, which ftrain resumes from; transformers cannot resume this checkpoint."
    )


# ---- opt_state -> torch ----------------------------------------------------------------------------------------------


def _scalar_dtype() -> torch.dtype:
    """The dtype torch's optimizers give their ``step`` tensors (float64 only under a float64 default dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _host(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU tensor of its own (a DTensor gathered: a collective when sharded; every rank must call): one copy,
    whether ``t`` is on an accelerator or already on the CPU."""
    if is_dtensor(t):
        t = t.full_tensor()
    return t.detach().to("cpu", copy=True)


def _torch_step(leaf: Any, step: int | torch.Tensor) -> torch.Tensor | int | None:
    """torch's per-parameter ``step`` for the optimizer ``leaf`` belongs to: the state's update count, or ``step``
    where ftrain keeps none (RMSprop); ``None`` where torch keeps none (SGD)."""
    if isinstance(leaf, ScaleByAdafactorState):
        return int(leaf.count)  # transformers' Adafactor counts in a Python int
    if not isinstance(leaf, _STEPPED):
        return None
    count = leaf.count if "count" in leaf._fields else step
    return torch.as_tensor(count).detach().to(_scalar_dtype())


def _per_name(tree: Any, where: str) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of a ``{name: tensor | None}`` moment tree (``None``: a parameter another group holds)."""
    if tree is None:
        return {}
    if not isinstance(tree, Mapping):
        raise UnmappableOptimizerError(f"{where} is a {type(tree).__name__}, not a {{parameter name: tensor}} dict.")
    return {name: value for name, value in tree.items() if value is not None}


def torch_param_states(
    opt_state: Any, /, *, step: int | torch.Tensor, strict: bool = True
) -> dict[str, dict[str, torch.Tensor | int]]:
    """The per-parameter state of the torch optimizer that ``opt_state`` mirrors, by parameter name: Adam / AdamW
    ``step, exp_avg, exp_avg_sq``; SGD ``momentum_buffer``; RMSprop ``step, square_avg`` (+ ``momentum_buffer``,
    ``grad_avg``); Adagrad ``step, sum``. Parameters without state (SGD without momentum) are absent, as in torch.

    Args:
        opt_state: the state of an :mod:`ftrain.optim` optimizer over ``{param name: tensor}``.
        step: the number of updates done: RMSprop's ``step``, which ftrain does not keep.
        strict: raise on a part of ``opt_state`` with no ``torch.optim`` form (what ``optimizer.pt`` needs); with
            ``False`` (``trainer.optimizer``'s view) such parts are passed over, and transformers' Adafactor state
            is read too (``step`` and its moment statistics; its ``RMS`` entry, recomputed by torch before use, is
            not kept by ftrain and is left out).

    Returns:
        ``{name: {torch key: value}}``: the state's own tensors (no copy); ``step`` a 0-d tensor of the dtype torch
        gives it (an int for Adafactor).

    Raises:
        UnmappableOptimizerError: with ``strict``, a part of ``opt_state`` with no torch form (names its key path).
    """
    moments = _MOMENTS if strict else {**_MOMENTS, **_ADAFACTOR_MOMENTS}
    out: dict[str, dict[str, Any]] = {}
    for path, leaf in _nodes(opt_state, (*moments, *_COUNTERS, EmptyState)):
        if type(leaf) not in moments:
            if strict and not isinstance(leaf, _COUNTERS + (EmptyState,)):
                raise _unmappable(path, leaf)
            continue
        count = _torch_step(leaf, step)
        for key, field in moments[type(leaf)].items():
            for name, value in _per_name(getattr(leaf, field), f"opt_state{path}.{field}").items():
                entry = out.setdefault(name, {})
                if count is not None:
                    entry.setdefault("step", count)
                entry[key] = value
    return out


def index_param_groups(param_groups: Sequence[Mapping[str, Any]]) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """``({name: index}, groups)``: the parameters of ``param_groups`` (names in ``"params"``) numbered over the
    groups in order, and the groups with those indices in ``"params"`` (the other keys as they are), as
    ``torch.optim.Optimizer.state_dict()`` lists them."""
    index = {name: i for i, name in enumerate(n for g in param_groups for n in g["params"])}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[n] for n in g["params"]]}
              for g in param_groups]  # fmt: skip
    return index, groups


def opt_state_to_torch(opt_state: Any, param_groups: Sequence[Mapping[str, Any]], /, *, step: int) -> dict[str, Any]:
    """``opt_state`` as the ``state_dict()`` of the torch optimizer with ``param_groups``.

    Args:
        opt_state: the state of an :mod:`ftrain.optim` optimizer over ``{param name: tensor}``.
        param_groups: torch's param groups with parameter *names* in ``"params"``
            (:func:`ftrain.trainer.torch_optim.hf_param_groups`); the other keys are copied as they are. The index
            of a parameter is its position over the groups in order.
        step: the number of updates done (torch's per-parameter ``step`` where the ftrain state keeps no count).

    Returns:
        ``{"state": {index: {key: tensor}}, "param_groups": [...]}``, what ``torch.optim.Optimizer.state_dict()``
        returns; tensors on the CPU, gathered when sharded.

    Raises:
        UnmappableOptimizerError: a part of ``opt_state`` with no torch form (names its key path), or a parameter
            with optimizer state that no group lists.
    """
    index, groups = index_param_groups(param_groups)
    per_name = torch_param_states(opt_state, step=step)
    unlisted = [name for name in per_name if name not in index]
    if unlisted:
        raise UnmappableOptimizerError(
            f"opt_state has state for {unlisted[0]!r}, which no param group lists; the groups list {len(index)} "
            "parameters."
        )
    state = {index[name]: {key: _host(value) for key, value in entry.items()} for name, entry in per_name.items()}
    return {"state": dict(sorted(state.items())), "param_groups": groups}


# ---- torch -> opt_state ----------------------------------------------------------------------------------------------


def _like(value: torch.Tensor, target: torch.Tensor, where: str) -> torch.Tensor:
    """``value`` with ``target``'s dtype, device (and DTensor layout)."""
    if tuple(value.shape) != tuple(target.shape):
        raise UnmappableOptimizerError(f"{where}: shape {tuple(value.shape)} in the checkpoint, "
                                       f"{tuple(target.shape)} in this model's optimizer state.")  # fmt: skip
    if is_dtensor(target):
        from torch.distributed.tensor import distribute_tensor

        value = value.to(device=target.device_mesh.device_type, dtype=target.dtype)
        return distribute_tensor(value, target.device_mesh, target.placements)
    return value.to(device=target.device, dtype=target.dtype).clone()


class _TorchState(NamedTuple):
    """A torch ``state_dict()``'s per-parameter states by parameter name."""

    by_name: dict[str, dict[str, torch.Tensor]]

    def field(self, name: str, key: str, where: str) -> torch.Tensor:
        entry = self.by_name.get(name)
        if entry is None or key not in entry:
            have = sorted(entry) if entry is not None else "no state"
            raise UnmappableOptimizerError(
                f"optimizer.pt: parameter {name!r} has no {key!r} ({have}); ftrain's {where} needs it. A parameter "
                "that never got a gradient has no torch state; ftrain updates every trainable parameter at every "
                "step, so such a run cannot be continued exactly."
            )
        return entry[key]


def _by_name(state_dict: Mapping[str, Any], names: Sequence[Sequence[str]]) -> _TorchState:
    """The per-parameter states of ``state_dict`` keyed by name (checks the groups' sizes)."""
    saved = state_dict.get("param_groups")
    if not isinstance(saved, list) or "state" not in state_dict:
        raise UnmappableOptimizerError("optimizer.pt is not a torch optimizer state_dict (no 'state', 'param_groups')")
    sizes, expected = [len(g.get("params", ())) for g in saved], [len(n) for n in names]
    if sizes != expected:
        raise UnmappableOptimizerError(
            f"optimizer.pt has param groups of {sizes} parameters; this model's (decaying, then not decaying, as "
            f"transformers groups them) have {expected}. Resume with the same model and weight decay rule."
        )
    index_to_name = {}
    for group, group_names in zip(saved, names):
        index_to_name.update(zip(group["params"], group_names))
    return _TorchState({index_to_name[i]: dict(s) for i, s in state_dict["state"].items() if i in index_to_name})


def _check_keys(torch_state: _TorchState, allowed: set[str]) -> None:
    for name, entry in torch_state.by_name.items():
        unknown = sorted(set(entry) - allowed)
        if unknown:
            raise UnmappableOptimizerError(
                f"optimizer.pt: parameter {name!r} has optimizer state {unknown}, which this run's optimizer does not "
                f"keep (it keeps {sorted(allowed)}). The checkpoint was written by another optimizer (or amsgrad / a "
                "bitsandbytes optimizer); set the same optim / optim_args to continue it."
            )


def _count(torch_state: _TorchState, names: list[str], default: int) -> torch.Tensor:
    steps = {int(torch_state.by_name[n]["step"]) for n in names if "step" in torch_state.by_name.get(n, {})}
    if len(steps) > 1:
        raise UnmappableOptimizerError(f"optimizer.pt: the parameters' 'step' counts differ ({sorted(steps)}).")
    return torch.tensor(steps.pop() if steps else default, dtype=torch.int64)


def _rebuild_node(node: Any, path: str, torch_state: _TorchState, step: int, learning_rate: Any) -> Any:
    """One known optimizer state rebuilt from the torch state."""
    if isinstance(node, EmptyState):
        return node
    if isinstance(node, ScaleByLearningRateState):
        old = node.learning_rate
        lr = old if learning_rate is None else torch.as_tensor(learning_rate, dtype=old.dtype, device=old.device)
        return ScaleByLearningRateState(torch.full_like(node.count, step), lr)
    if isinstance(node, ScaleByScheduleState):
        return ScaleByScheduleState(torch.full_like(node.count, step))
    fields, names = {}, []
    for key, field in _MOMENTS[type(node)].items():
        tree = getattr(node, field)
        if tree is None:
            continue
        out = {}
        for name, target in tree.items():
            if target is not None:
                names.append(name)
                target_where = f"opt_state{path}.{field}[{name!r}]"
                out[name] = _like(torch_state.field(name, key, type(node).__name__), target, target_where)
            else:
                out[name] = None
        fields[field] = out
    if "count" in node._fields:
        fields["count"] = _count(torch_state, names, step).to(node.count.device)
    return node._replace(**fields)


def opt_state_from_torch(
    state_dict: Mapping[str, Any],
    like: Any,
    param_names: Sequence[Sequence[str]],
    /,
    *,
    step: int,
    learning_rate: float | torch.Tensor | None = None,
) -> Any:
    """The ``opt_state`` that continues a torch optimizer's ``state_dict()``: :func:`opt_state_to_torch` reversed.

    Args:
        state_dict: a torch optimizer's ``state_dict()`` (e.g. transformers' ``optimizer.pt``).
        like: a fresh ``opt_state`` of the optimizer to continue with (``tx.init(params)``): its structure, dtypes,
            devices and layouts are kept, its tensors replaced.
        param_names: the parameter names of each param group, in ``state_dict``'s group order.
        step: the number of updates done (a scheduler's ``last_epoch``): the update counters, and the momentum
            counter of SGD (which torch does not store).
        learning_rate: the learning rate the last update used, for ``ScaleByLearningRateState`` (``None`` keeps
            ``like``'s; the next update recomputes it from the schedule anyway).

    Returns:
        The new ``opt_state``.

    Raises:
        UnmappableOptimizerError: groups of other sizes, per-parameter keys this optimizer does not keep, a
            missing moment or a shape that differs (each names the parameter), or a part of ``like`` with no torch
            form.
    """
    torch_state = _by_name(state_dict, param_names)
    nodes = _nodes(like)
    if not torch_state.by_name and step == 0:  # a torch optimizer that never stepped keeps no state
        return like
    allowed = {"step"} if any(isinstance(n, _STEPPED) for _, n in nodes) else set()
    for path, node in nodes:
        if type(node) in _MOMENTS:
            allowed |= {k for k, f in _MOMENTS[type(node)].items() if getattr(node, f) is not None}
        elif not isinstance(node, _KNOWN):
            raise _unmappable(path, node)
    _check_keys(torch_state, allowed)
    rebuilt = iter([_rebuild_node(n, p, torch_state, step, learning_rate) for p, n in nodes])
    return _tree.tree_map(lambda _: next(rebuilt), like, is_leaf=_is_node)


# ---- param groups, scheduler -----------------------------------------------------------------------------------------


def check_param_groups(saved: Sequence[Mapping[str, Any]], expected: Sequence[Mapping[str, Any]]) -> None:
    """Raises when a checkpoint's param groups used other hyper-parameters than this run's arguments give.

    transformers' resume takes them from the checkpoint; ftrain's optimizer takes them from the arguments, so a
    difference would silently change the run. ``lr`` is the schedule's and is not compared.

    Raises:
        UnmappableOptimizerError: the first differing hyper-parameter, with both values and the group.
    """
    for i, (ours, theirs) in enumerate(zip(expected, saved)):
        for key in _CHECKED_HYPERPARAMS:
            if key in ours and key in theirs and _normalize(theirs[key]) != _normalize(ours[key]):
                raise UnmappableOptimizerError(
                    f"optimizer.pt: param group {i} has {key}={theirs[key]!r}, but these TrainingArguments give "
                    f"{key}={ours[key]!r}. ftrain's optimizer takes its hyper-parameters from the arguments: set them "
                    "as the run that wrote the checkpoint had them (learning_rate, adam_beta1/2, adam_epsilon, "
                    "weight_decay, optim_args) to continue it."
                )


def _normalize(value: Any) -> Any:
    return tuple(float(v) for v in value) if isinstance(value, list | tuple) else value


def _constant(step: int) -> float:
    return 1.0


def lambda_lr_state_dict(base_lr: float, num_groups: int, *, step: int, last_lr: float) -> dict[str, Any]:
    """The ``state_dict()`` of transformers' ``LambdaLR`` scheduler after ``step`` updates.

    Built by torch's ``LambdaLR`` itself (over a placeholder optimizer) so its keys are this torch's; then its
    counters are set: ``last_epoch = step``, ``_step_count = step + 1``, ``_last_lr`` the rate of the next update.
    transformers' lambdas are ``functools.partial`` objects, saved as their (empty) ``__dict__``.

    Args:
        base_lr: the peak learning rate (``base_lrs``).
        num_groups: the optimizer's number of param groups.
        step: updates done.
        last_lr: the schedule's learning rate for update ``step`` (0-based), as a float.
    """
    placeholder = torch.optim.SGD([{"params": [torch.zeros(())]} for _ in range(num_groups)], lr=base_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(placeholder, [functools.partial(_constant)] * num_groups)
    scheduler.last_epoch, scheduler._step_count = step, step + 1
    scheduler._last_lr = [float(last_lr)] * num_groups
    return scheduler.state_dict()


# ---- RNG, loading ----------------------------------------------------------------------------------------------------


def rng_states(*, distributed: bool = False) -> dict[str, Any]:
    """The global generators' states as transformers' ``rng_state.pth`` holds them: ``python``, ``numpy``, ``cpu``
    and, with CUDA, ``cuda`` (every device's state when ``distributed``)."""
    states: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                              "cpu": torch.random.get_rng_state()}  # fmt: skip
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.random.get_rng_state_all() if distributed else torch.cuda.random.get_rng_state()
    return states


def set_rng_states(states: Mapping[str, Any], *, distributed: bool = False) -> None:
    """Sets the global generators from :func:`rng_states`' form (what is missing is left alone)."""
    if "python" in states:
        random.setstate(_as_python_state(states["python"]))
    if "numpy" in states:
        np.random.set_state(states["numpy"])
    if "cpu" in states:
        torch.random.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        cuda = states["cuda"]
        if distributed or isinstance(cuda, list | tuple):
            torch.cuda.random.set_rng_state_all(cuda)
        else:
            torch.cuda.random.set_rng_state(cuda)


def _as_python_state(state: Any) -> tuple:
    """``random.setstate`` wants tuples; a round trip through a file may give lists."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


def load_torch_file(path: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with numpy's array and dtype types allowed (for the
    numpy RNG state): tensors, containers, numbers and arrays only, never an arbitrary pickled object.

    Raises:
        pickle.UnpicklingError: the file holds other objects (torch names them).
    """
    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)
