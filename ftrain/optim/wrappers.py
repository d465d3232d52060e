"""Wrappers around a transformation: hyper-parameters in the state, gradient accumulation, skipping bad steps.

- :func:`inject_hyperparams` moves an optimizer's numeric hyper-parameters into its state as 0-d tensors, so a
  schedule, a logger or a person can read and change them without rebuilding (or recompiling) anything.
- :class:`MultiSteps` accumulates ``k`` gradients and applies the inner optimizer to their mean every ``k``-th
  call; the other calls emit zeros.
- :func:`apply_if_finite` drops updates that contain ``inf`` / ``nan`` and keeps the inner state as it was.

All three are branch-free: the inner update always runs and ``torch.where`` selects the result, so an update
compiles with ``torch.compile(fullgraph=True)`` and never syncs with the host.

Example:
    >>> import torch
    >>> from ftrain.optim.transform import scale_by_learning_rate
    >>> tx = inject_hyperparams(scale_by_learning_rate)(learning_rate=lambda count: 0.1 / (count + 1))
    >>> params = {"w": torch.zeros(2)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": torch.ones(2)}, state)
    >>> updates["w"], float(state.hyperparams["learning_rate"])
    (tensor([-0.1000, -0.1000]), 0.10000000149011612)
    >>> updates, state = tx.update({"w": torch.ones(2)}, state)
    >>> updates["w"]
    tensor([-0.0500, -0.0500])
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import optree
import torch

from ftrain import tree as _tree
from ftrain.optim.base import GradientTransformation, OptState, Params, Updates, check_float_params, describe
from ftrain.optim.transform import _zero_count

__all__ = [
    "ApplyIfFiniteState",
    "InjectHyperparamsState",
    "MultiSteps",
    "MultiStepsState",
    "apply_if_finite",
    "find_hyperparam",
    "inject_hyperparams",
    "set_hyperparam",
]


def _select_tree(pred: torch.Tensor, on_true: Any, on_false: Any) -> Any:
    """``torch.where(pred, a, b)`` leaf by leaf over two trees of one structure (non-tensor leaves: ``a``)."""

    def pick(a: Any, b: Any) -> Any:
        return torch.where(pred, a, b) if isinstance(a, torch.Tensor) else a

    return _tree.tree_map(pick, on_true, on_false)


def _zeros_unless(pred: torch.Tensor, updates: Updates) -> Updates:
    return _tree.tree_map(lambda u: torch.where(pred, u, torch.zeros_like(u)), updates)


# ------------------------------------------------------------------------------------------------------------
# inject_hyperparams


class InjectHyperparamsState(NamedTuple):
    """State of :func:`inject_hyperparams`.

    Attributes:
        count: 0-d int64, updates done; schedules are called with it (0 for the first update).
        hyperparams: name -> 0-d tensor, the values the last update used (before any update, the first's).
        inner_state: the wrapped transformation's state.
    """

    count: torch.Tensor
    hyperparams: dict[str, torch.Tensor]
    inner_state: OptState


def _is_numeric(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    return isinstance(value, torch.Tensor) and value.dim() == 0


def _as_hyperparam(value: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A number or floating 0-d tensor as a 0-d ``dtype`` tensor; integer/bool tensors keep their dtype."""
    if isinstance(value, torch.Tensor) and not (value.is_floating_point() or value.is_complex()):
        return value.to(device=device)
    return _cast(value, dtype, device)


def _cast(value: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``value`` (a Python number or a tensor) as a ``dtype`` tensor; a Python float is rounded only once."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype=dtype, device=device)
    return torch.as_tensor(value, dtype=dtype, device=device)


def _bind_arguments(factory: Callable[..., Any], args: tuple, kwargs: dict) -> dict[str, Any]:
    """All of ``factory``'s arguments by name, defaults included (``**kwargs`` are merged in)."""
    sig = inspect.signature(factory)
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in sig.parameters.values()):
        raise TypeError(f"inject_hyperparams: {factory.__name__} takes *args; only named arguments can be injected.")
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return named


def inject_hyperparams(
    inner_factory: Callable[..., GradientTransformation],
    *,
    static_args: Iterable[str] = (),
    hyperparam_dtype: torch.dtype | None = None,
) -> Callable[..., GradientTransformation]:
    """Wraps an optimizer factory so its numeric hyper-parameters live in the state as 0-d tensors.

    ``inject_hyperparams(factory)(**kwargs)`` sorts the factory's arguments (defaults included):

    - numbers (``int`` / ``float``, not ``bool``) and 0-d tensors become 0-d tensors in ``state.hyperparams``;
    - callables are schedules, called with the update count (0 for the first update) at each update, and their
      value is stored too. Arguments whose name ends in ``mask`` (a mask function) are static instead;
    - everything else (bools, ``None``, strings, tuples, masks) and the names in ``static_args`` is static:
      passed to the factory as given.

    Each update rebuilds ``factory(**static, **hyperparams)`` and runs its ``update``. Changing a value
    (:func:`set_hyperparam`) therefore changes the next update and, the value being a tensor input, does not
    recompile a compiled step.

    dtype rule: floating values are stored as ``hyperparam_dtype`` if given, else float64 when any params leaf
    is float64 and float32 otherwise (so ``1e-3`` is exact in a float64 run); integers become that float dtype
    too (put integer-valued arguments that must stay ``int`` in ``static_args``); integer or bool 0-d tensors
    keep their dtype. Values live on the params' device. Schedule values are cast the same way.

    Args:
        inner_factory: a function returning a :class:`GradientTransformation`, e.g. ``adamw``.
        static_args: argument names never to turn into tensors or call as schedules.
        hyperparam_dtype: the floating dtype of the stored values (default: the rule above).

    Returns:
        A factory with ``inner_factory``'s arguments; its transformations have state
        :class:`InjectHyperparamsState`.

    Example:
        >>> import torch
        >>> from ftrain.optim.transform import scale
        >>> tx = inject_hyperparams(scale)(factor=2.0)
        >>> state = tx.init({"w": torch.zeros(1, dtype=torch.float64)})
        >>> state.hyperparams
        {'factor': tensor(2., dtype=torch.float64)}
        >>> tx.update({"w": torch.ones(1)}, set_hyperparam(state, "factor", 3.0))[0]
        {'w': tensor([3.])}
    """
    static_names = frozenset(static_args)

    @functools.wraps(inner_factory)
    def make(*args: Any, **kwargs: Any) -> GradientTransformation:
        named = _bind_arguments(inner_factory, args, kwargs)
        static, numeric, schedules = {}, {}, {}
        for name, value in named.items():
            if name in static_names or (callable(value) and name.endswith("mask")):
                static[name] = value
            elif callable(value) and not isinstance(value, torch.Tensor):
                schedules[name] = value
            elif _is_numeric(value):
                numeric[name] = value
            else:
                static[name] = value

        def init(params: Params) -> InjectHyperparamsState:
            check_float_params(params, where=f"inject_hyperparams({inner_factory.__name__})")
            count = _zero_count(params)
            leaves = [x for x in _tree.tree_leaves(params) if isinstance(x, torch.Tensor)]
            dtype = hyperparam_dtype or (
                torch.float64 if any(x.dtype == torch.float64 for x in leaves) else torch.float32
            )
            values = {**numeric, **{k: fn(count) for k, fn in schedules.items()}}
            hparams = {k: _as_hyperparam(values[k], dtype, count.device) for k in named if k in values}
            inner_state = inner_factory(**static, **hparams).init(params)
            return InjectHyperparamsState(count, hparams, inner_state)

        def update(
            updates: Updates, state: InjectHyperparamsState, params: Params | None = None
        ) -> tuple[Updates, InjectHyperparamsState]:
            hparams = dict(state.hyperparams)
            for name, fn in schedules.items():
                like = hparams[name]
                hparams[name] = _cast(fn(state.count), like.dtype, like.device)
            new_updates, inner_state = inner_factory(**static, **hparams).update(updates, state.inner_state, params)
            return new_updates, InjectHyperparamsState(state.count + 1, hparams, inner_state)

        tx = GradientTransformation(init, update)
        return describe(tx, "inject_hyperparams", factory=inner_factory, static=static, schedules=schedules)

    return make


def _is_inject_state(node: Any) -> bool:
    return isinstance(node, InjectHyperparamsState)


def set_hyperparam(opt_state: OptState, name: str, value: float | torch.Tensor) -> OptState:
    """A copy of ``opt_state`` with hyper-parameter ``name`` set to ``value`` in every
    :class:`InjectHyperparamsState` that holds it (at any depth: chains, dicts, :class:`MultiSteps`...).

    The value is cast to the stored tensor's dtype and device, so a compiled step does not recompile. A name
    driven by a schedule is overwritten by the schedule at the next update.

    Raises:
        KeyError: no injected hyper-parameter of that name in ``opt_state``.

    Example:
        >>> import torch
        >>> from ftrain.optim.transform import scale_by_learning_rate
        >>> tx = inject_hyperparams(scale_by_learning_rate)(learning_rate=0.1)
        >>> state = set_hyperparam(tx.init({"w": torch.zeros(1)}), "learning_rate", 0.5)
        >>> tx.update({"w": torch.ones(1)}, state)[0]["w"]
        tensor([-0.5000])
    """
    if not _holds(opt_state, name):
        known = sorted({k for s in _inject_states(opt_state) for k in s.hyperparams})
        raise KeyError(
            f"set_hyperparam: no injected hyper-parameter {name!r} in this optimizer state "
            f"(injected: {known}). Wrap the optimizer factory with inject_hyperparams to make it settable."
        )
    return _replace_hyperparam(opt_state, name, value)


def _replace_hyperparam(opt_state: OptState, name: str, value: float | torch.Tensor) -> OptState:
    def replace(node: Any) -> Any:
        if not _is_inject_state(node):
            return node
        hparams = node.hyperparams
        if name in hparams:
            old = hparams[name]
            hparams = {**hparams, name: _cast(value, old.dtype, old.device)}
        return node._replace(hyperparams=hparams, inner_state=_replace_hyperparam(node.inner_state, name, value))

    return _tree.tree_map(replace, opt_state, is_leaf=_is_inject_state)


def _children(node: Any) -> list[Any]:
    if optree.tree_is_leaf(node, namespace=_tree.NAMESPACE):
        return []
    return list(optree.tree_flatten_one_level(node, namespace=_tree.NAMESPACE)[0])


def _inject_states(node: Any) -> Iterable[InjectHyperparamsState]:
    """Every :class:`InjectHyperparamsState` in ``node``, outermost first."""
    if _is_inject_state(node):
        yield node
    for child in _children(node):
        yield from _inject_states(child)


def _holds(node: Any, name: str) -> bool:
    return any(name in s.hyperparams for s in _inject_states(node))


def _is_learning_rate_state(node: Any) -> bool:
    fields = getattr(type(node), "_fields", None)
    return type(node).__name__ == "ScaleByLearningRateState" or (
        fields is not None and "learning_rate" in fields and isinstance(node.learning_rate, torch.Tensor)
    )


def find_hyperparam(opt_state: OptState, name: str) -> torch.Tensor | None:
    """The current value of hyper-parameter ``name`` in an optimizer state tree, or ``None``.

    Searches depth first, outermost first, through any nesting (chain tuples, ``named_chain`` dicts,
    :class:`MultiStepsState`, ...): an :class:`InjectHyperparamsState` holding ``name`` wins; for
    ``name == "learning_rate"`` a state with a ``learning_rate`` tensor field (``ScaleByLearningRateState``,
    ``ScaleByAdafactorState``) answers too. The train step reports this as its ``learning_rate`` metric.

    Example:
        >>> import torch
        >>> from ftrain.optim.transform import scale_by_learning_rate
        >>> state = scale_by_learning_rate(0.25).init({"w": torch.zeros(1)})
        >>> find_hyperparam((None, {"opt": state}), "learning_rate")
        tensor(0.2500)
        >>> find_hyperparam(state, "momentum") is None
        True
    """
    if _is_inject_state(opt_state) and name in opt_state.hyperparams:
        return opt_state.hyperparams[name]
    if name == "learning_rate" and _is_learning_rate_state(opt_state):
        return opt_state.learning_rate
    for child in _children(opt_state):
        if isinstance(child, torch.Tensor):  # a moment or a count: no hyper-parameter below (the step asks each step)
            continue
        found = find_hyperparam(child, name)
        if found is not None:
            return found
    return None


# ------------------------------------------------------------------------------------------------------------
# MultiSteps


class MultiStepsState(NamedTuple):
    """State of :class:`MultiSteps`.

    Attributes:
        mini_step: 0-d int64, gradients accumulated since the last inner update.
        gradient_step: 0-d int64, inner updates done.
        inner_opt_state: the inner transformation's state.
        acc_grads: the running mean (or sum) of the gradients of this cycle, like the params.
    """

    mini_step: torch.Tensor
    gradient_step: torch.Tensor
    inner_opt_state: OptState
    acc_grads: Updates


class MultiSteps:
    """Gradient accumulation as a transformation (optax's ``MultiSteps``).

    Each call adds the gradients to a running mean; the ``k``-th call applies ``inner`` to the mean of the
    ``k`` gradients and emits its updates, the others emit zeros and keep the inner state. Branch-free:
    ``inner`` runs every call and ``torch.where`` picks, so it compiles as one graph.

    Args:
        inner: the optimizer to apply every ``k`` calls.
        every_k_schedule: ``k``, or a function of ``gradient_step`` (0-d int64 tensor) returning it.
        use_grad_mean: average the ``k`` gradients (default) rather than sum them.

    Example:
        >>> import torch
        >>> from ftrain.optim.transform import scale_by_learning_rate
        >>> ms = MultiSteps(scale_by_learning_rate(1.0), every_k_schedule=2)
        >>> state = ms.init({"w": torch.zeros(1)})
        >>> u, state = ms.update({"w": torch.tensor([1.0])}, state)
        >>> u["w"], bool(MultiSteps.has_updated(state))
        (tensor([0.]), False)
        >>> u, state = ms.update({"w": torch.tensor([3.0])}, state)
        >>> u["w"], bool(MultiSteps.has_updated(state))
        (tensor([-2.]), True)
    """

    def __init__(
        self,
        inner: GradientTransformation,
        every_k_schedule: int | Callable[[torch.Tensor], Any],
        *,
        use_grad_mean: bool = True,
    ) -> None:
        if not callable(every_k_schedule) and (isinstance(every_k_schedule, bool) or every_k_schedule < 1):
            raise ValueError(f"MultiSteps: every_k_schedule must be an int >= 1, got {every_k_schedule!r}.")
        self.inner = inner
        self.every_k_schedule = every_k_schedule
        self.use_grad_mean = use_grad_mean

    def init(self, params: Params) -> MultiStepsState:
        check_float_params(params, where="MultiSteps")
        count = _zero_count(params)
        acc = _tree.tree_map(torch.zeros_like, params)
        return MultiStepsState(count, count.clone(), self.inner.init(params), acc)

    def update(
        self, updates: Updates, state: MultiStepsState, params: Params | None = None
    ) -> tuple[Updates, MultiStepsState]:
        k = self.every_k_schedule
        k = k(state.gradient_step) if callable(k) else k
        mini = state.mini_step
        if self.use_grad_mean:
            acc = _tree.tree_map(lambda g, a: a + (g - a) / (mini + 1).to(a.dtype), updates, state.acc_grads)
        else:
            acc = _tree.tree_map(torch.add, state.acc_grads, updates)
        final = mini >= k - 1
        inner_updates, inner_state = self.inner.update(acc, state.inner_opt_state, params)
        new_state = MultiStepsState(
            mini_step=torch.where(final, torch.zeros_like(mini), mini + 1),
            gradient_step=torch.where(final, state.gradient_step + 1, state.gradient_step),
            inner_opt_state=_select_tree(final, inner_state, state.inner_opt_state),
            acc_grads=_tree.tree_map(lambda a: torch.where(final, torch.zeros_like(a), a), acc),
        )
        return _zeros_unless(final, inner_updates), new_state

    @staticmethod
    def has_updated(state: MultiStepsState) -> torch.Tensor:
        """0-d bool: whether the last call applied the inner optimizer."""
        return torch.logical_and(state.mini_step == 0, state.gradient_step > 0)

    def gradient_transformation(self) -> GradientTransformation:
        """``GradientTransformation(self.init, self.update)``, to chain or wrap like any other."""
        return GradientTransformation(self.init, self.update)


# ------------------------------------------------------------------------------------------------------------
# apply_if_finite


class ApplyIfFiniteState(NamedTuple):
    """State of :func:`apply_if_finite`.

    Attributes:
        notfinite_count: 0-d int64, consecutive calls with a non-finite update (0 after a finite one).
        last_finite: 0-d bool, whether the last call's updates were all finite.
        total_notfinite: 0-d int64, calls with a non-finite update in all.
        inner_state: the inner transformation's state.
    """

    notfinite_count: torch.Tensor
    last_finite: torch.Tensor
    total_notfinite: torch.Tensor
    inner_state: OptState


def _all_finite(updates: Updates, device: torch.device) -> torch.Tensor:
    leaves = [x for x in _tree.tree_leaves(updates) if isinstance(x, torch.Tensor)]
    if not leaves:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.stack([torch.isfinite(x).all().to(device) for x in leaves]).all()


def apply_if_finite(inner: GradientTransformation, max_consecutive_errors: int) -> GradientTransformation:
    """Skips updates that contain ``inf`` or ``nan`` (optax's ``apply_if_finite``).

    When any incoming update is non-finite, the output is zeros and the inner state is kept, and the counters
    move. After more than ``max_consecutive_errors`` non-finite calls in a row, the update is applied anyway
    (so a run that keeps producing them fails visibly instead of silently standing still).

    Args:
        inner: the transformation to protect.
        max_consecutive_errors: how many non-finite calls in a row are skipped.

    Returns:
        A transformation with state :class:`ApplyIfFiniteState`.

    Example:
        >>> import torch
        >>> from ftrain.optim.transform import scale_by_learning_rate
        >>> tx = apply_if_finite(scale_by_learning_rate(0.1), max_consecutive_errors=2)
        >>> state = tx.init({"w": torch.zeros(2)})
        >>> u, state = tx.update({"w": torch.tensor([1.0, float("inf")])}, state)
        >>> u["w"], int(state.notfinite_count), bool(state.last_finite)
        (tensor([0., 0.]), 1, False)
    """
    if isinstance(max_consecutive_errors, bool) or max_consecutive_errors < 0:
        raise ValueError(f"apply_if_finite: max_consecutive_errors must be >= 0, got {max_consecutive_errors!r}.")

    def init(params: Params) -> ApplyIfFiniteState:
        check_float_params(params, where="apply_if_finite")
        count = _zero_count(params)
        is_true = torch.ones((), dtype=torch.bool, device=count.device)
        return ApplyIfFiniteState(count, is_true, count.clone(), inner.init(params))

    def update(
        updates: Updates, state: ApplyIfFiniteState, params: Params | None = None
    ) -> tuple[Updates, ApplyIfFiniteState]:
        finite = _all_finite(updates, state.notfinite_count.device)
        notfinite_count = torch.where(finite, torch.zeros_like(state.notfinite_count), state.notfinite_count + 1)
        apply = torch.logical_or(finite, notfinite_count > max_consecutive_errors)
        new_updates, inner_state = inner.update(updates, state.inner_state, params)
        new_state = ApplyIfFiniteState(
            notfinite_count=notfinite_count,
            last_finite=finite,
            total_notfinite=torch.where(finite, state.total_notfinite, state.total_notfinite + 1),
            inner_state=_select_tree(apply, inner_state, state.inner_state),
        )
        return _zeros_unless(apply, new_updates), new_state

    return GradientTransformation(init, update)
