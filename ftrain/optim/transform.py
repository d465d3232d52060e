"""Gradient transformations: the small pieces every optimizer in :mod:`ftrain.optim.alias` is chained from.

Each ``scale_by_*`` / ``add_*`` / ``clip_*`` / ``trace`` function returns a
:class:`~ftrain.optim.base.GradientTransformation` whose state is the ``NamedTuple`` defined next to it. The
maths runs as ``torch._foreach_*`` ops (the variants without a trailing underscore, so nothing is mutated)
over the flattened leaves of the tree. Hyper-parameters may be Python numbers or 0-d tensors; the code never
branches on their values and never syncs with the host, so an update compiles with ``fullgraph=True`` and a
new tensor value does not recompile.

Example:
    >>> import torch
    >>> from ftrain.optim.transform import scale_by_adam
    >>> tx = scale_by_adam()
    >>> params = {"w": torch.ones(3)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": torch.full((3,), 0.5)}, state, params)
    >>> updates["w"]  # the first Adam step is sign(g) up to eps
    tensor([1.0000, 1.0000, 1.0000])
    >>> int(state.count)
    1
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

from ftrain import tree as _tree
from ftrain.optim.base import (
    EmptyState,
    GradientTransformation,
    Params,
    ScalarOrSchedule,
    Schedule,
    Updates,
    check_float_params,
    describe,
)

Numeric = float | torch.Tensor
"""A hyper-parameter: a Python number or a 0-d tensor (what ``inject_hyperparams`` passes)."""

MaskOrFn = Any | Callable[[Params], Any] | None
"""A tree of Python bools with the params' structure, or a function ``params -> that tree``.

Inside :func:`~ftrain.optim.combine.masked` or ``partition`` the function sees ``None`` at the hidden leaves:
build the tree with :func:`ftrain.tree.tree_map`, which keeps them ``None`` (a ``None`` leaf is False)."""

__all__ = [
    "ScaleByAdagradState",
    "ScaleByAdamState",
    "ScaleByLearningRateState",
    "ScaleByLionState",
    "ScaleByRmsState",
    "ScaleByScheduleState",
    "TraceState",
    "add_decayed_weights",
    "clip_by_global_norm",
    "scale",
    "scale_by_adagrad",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_lion",
    "scale_by_rms",
    "scale_by_schedule",
    "trace",
]


# ----------------------------------------------------------------------------------------------------------
# Private helpers shared by the transforms and the rest of ftrain.optim (combine, factorized, wrappers).


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_zero(x: Any) -> bool:
    """True only for a Python number equal to 0 (a tensor is never treated as zero: its value may change)."""
    return _is_number(x) and x == 0


def _check_range(where: str, name: str, x: Any, low: float, high: float, *, high_open: bool = True) -> None:
    """Validates a Python-number hyper-parameter when the transformation is built (not tensors)."""
    if not _is_number(x):
        return
    ok = low <= x < high if high_open else low <= x <= high
    if not ok:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{where}: {name}={x!r} is outside [{low}, {high}{bracket}.")


def _scalar_dtype(leaves: list[torch.Tensor]) -> torch.dtype:
    """dtype for scalars derived from counters: float64 when any leaf is float64, float32 otherwise."""
    return torch.float64 if any(x.dtype == torch.float64 for x in leaves) else torch.float32


def _device(leaves: list[torch.Tensor]) -> torch.device:
    """Device of the first leaf (CPU for no leaves)."""
    return leaves[0].device if leaves else torch.device("cpu")


def _zero_count(params: Params) -> torch.Tensor:
    """A 0-d int64 zero on the params' device; non-tensor leaves (a wrapper sees any tree) are skipped."""
    leaves = [x for x in _tree.tree_leaves(params) if isinstance(x, torch.Tensor)]
    return torch.zeros((), dtype=torch.int64, device=_device(leaves))


def _count_as(count: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return count.to(dtype)


def _on(x: Numeric, device: torch.device) -> Numeric:
    """A tensor hyper-parameter moved to the leaves' device (a no-op when it is already there)."""
    return x.to(device) if isinstance(x, torch.Tensor) else x


def _state_leaves(state_tree: Any, n: int, *, where: str, field: str) -> list[torch.Tensor]:
    leaves = _tree.tree_leaves(state_tree)
    if len(leaves) != n:
        raise ValueError(
            f"{where}: the updates have {n} leaves but state.{field} has {len(leaves)}. The state was built "
            "by init for a different tree; call init on the same params tree (same masked-out leaves)."
        )
    return leaves


def _params_leaves(params: Params, n: int, *, where: str) -> list[torch.Tensor]:
    if params is None:
        raise ValueError(f"{where} needs params: call update(updates, state, params).")
    leaves = _tree.tree_leaves(params)
    if len(leaves) != n:
        raise ValueError(
            f"{where}: the updates have {n} leaves but params has {len(leaves)}; pass the params tree the "
            "updates were computed for."
        )
    return leaves


def _bump(state: Any) -> Any:
    """The state after an update of an empty tree: counters advance, nothing else changes."""
    # A field named count: every NamedTuple has a ``count`` method (tuple.count), so hasattr would not tell.
    return state._replace(count=state.count + 1) if "count" in getattr(state, "_fields", ()) else state


def _mul(xs: list[torch.Tensor], s: Numeric) -> list[torch.Tensor]:
    return torch._foreach_mul(xs, s)


def _add_scaled(ys: list[torch.Tensor], xs: list[torch.Tensor], a: Numeric) -> list[torch.Tensor]:
    """``ys + a * xs``; ``alpha=`` takes Python numbers only, so a tensor ``a`` costs one more op."""
    if _is_number(a):
        return torch._foreach_add(ys, xs, alpha=a)
    return torch._foreach_add(ys, torch._foreach_mul(xs, a))


def _ema(old: list[torch.Tensor], new: list[torch.Tensor], decay: Numeric, *, lerp: bool = True) -> list[torch.Tensor]:
    """``decay * old + (1 - decay) * new``: a ``lerp`` for a Python ``decay``, as torch.optim writes it, unless
    ``lerp=False``; otherwise two products and a sum (HF Adafactor's order of operations, which rounds apart)."""
    if lerp and _is_number(decay):
        return torch._foreach_lerp(old, new, 1.0 - decay)
    return torch._foreach_add(torch._foreach_mul(old, decay), torch._foreach_mul(new, 1 - decay))


def _ema_sq(old: list[torch.Tensor], new: list[torch.Tensor], decay: Numeric) -> list[torch.Tensor]:
    """``decay * old + (1 - decay) * new**2``."""
    if _is_number(decay):
        return torch._foreach_addcmul(torch._foreach_mul(old, decay), new, new, value=1.0 - decay)
    return torch._foreach_add(
        torch._foreach_mul(old, decay), torch._foreach_mul(torch._foreach_mul(new, new), 1 - decay)
    )


def _flatten_keep_none(tree: Any) -> tuple[list[Any], Any]:
    """Leaves and treespec with ``None`` kept as a leaf, so masks and labels can name masked-out positions."""
    return optree.tree_flatten(tree, none_is_leaf=True, namespace=_tree.NAMESPACE)


def _resolve_mask(mask: MaskOrFn, params: Params, spec: Any, *, where: str) -> list[bool]:
    """Mask leaves aligned with ``spec`` (a treespec built with ``none_is_leaf=True``), as Python bools.

    A ``None`` leaf of the mask (a leaf hidden by an outer mask) is False. A transform whose mask is optional
    (``None``: every leaf) decides that before calling this, so ``masked(inner, None)`` stays an error.

    Raises:
        ValueError: the mask's structure is not the params' (naming the key path where they differ).
        TypeError: a mask leaf is not a Python bool.
    """
    mask_tree = mask(params) if callable(mask) else mask
    try:
        leaves = spec.flatten_up_to(mask_tree)
    except (ValueError, TypeError) as err:
        why = str(err)
        try:
            _tree.tree_check_same_structure(params, mask_tree, names=("params", "mask"))
        except ValueError as diff:  # names the key path, where optree's message may not
            why = str(diff)
        raise ValueError(f"{where}: the mask does not have the params' structure: {why}") from err
    leaves = [False if leaf is None else leaf for leaf in leaves]
    for leaf in leaves:
        if not isinstance(leaf, bool):
            raise TypeError(
                f"{where}: mask leaves must be Python bools (a tree like {{'w': True, 'b': False}}), got "
                f"{type(leaf).__name__}. A tensor would need a host sync to decide which leaves to touch."
            )
    return leaves


# ----------------------------------------------------------------------------------------------------------
# Stateless scalings.


def scale(factor: Numeric) -> GradientTransformation:
    """Multiplies every update by ``factor``.

    Args:
        factor: a Python number or a 0-d tensor.

    Returns:
        A stateless transformation (state :class:`~ftrain.optim.base.EmptyState`).

    Example:
        >>> import torch
        >>> tx = scale(-2.0)
        >>> tx.update({"w": torch.ones(2)}, tx.init(None))[0]["w"]
        tensor([-2., -2.])
    """

    def init(params: Params) -> EmptyState:
        check_float_params(params, where="scale")
        return EmptyState()

    def update(updates: Updates, state: EmptyState, params: Params | None = None) -> tuple[Updates, EmptyState]:
        leaves, spec = _tree.tree_flatten(updates)
        if not leaves:
            return updates, state
        return _tree.tree_unflatten(spec, _mul(leaves, _on(factor, _device(leaves)))), state

    return describe(GradientTransformation(init, update), "scale", factor=factor)


def add_decayed_weights(weight_decay: Numeric = 0.0, mask: MaskOrFn = None) -> GradientTransformation:
    """Adds ``weight_decay * params`` to the updates (decoupled weight decay when chained after a scaling).

    Args:
        weight_decay: a Python number or a 0-d tensor.
        mask: ``None`` (decay every leaf), a tree of Python bools with the params' structure, or a function
            ``params -> that tree``. Leaves marked ``False`` get no decay (biases, norm weights).

    Returns:
        A stateless transformation; ``update`` needs ``params``.

    Example:
        >>> import torch
        >>> params = {"w": torch.ones(2), "b": torch.ones(1)}
        >>> tx = add_decayed_weights(0.1, mask={"w": True, "b": False})
        >>> out, _ = tx.update({"w": torch.zeros(2), "b": torch.zeros(1)}, tx.init(params), params)
        >>> out["w"], out["b"]
        (tensor([0.1000, 0.1000]), tensor([0.]))
    """

    def init(params: Params) -> EmptyState:
        check_float_params(params, where="add_decayed_weights")
        return EmptyState()

    def update(updates: Updates, state: EmptyState, params: Params | None = None) -> tuple[Updates, EmptyState]:
        if _is_zero(weight_decay):
            return updates, state
        leaves, spec = _tree.tree_flatten(updates)
        if not leaves:
            return updates, state
        p_leaves = _params_leaves(params, len(leaves), where="add_decayed_weights")
        wd = _on(weight_decay, _device(leaves))
        if mask is None:
            return _tree.tree_unflatten(spec, _add_scaled(leaves, p_leaves, wd)), state
        full_leaves, full_spec = _flatten_keep_none(updates)
        keep = _resolve_mask(mask, params, full_spec, where="add_decayed_weights")
        chosen = [i for i, (u, m) in enumerate(zip(full_leaves, keep)) if m and u is not None]
        p_full = full_spec.flatten_up_to(params)
        decayed = _add_scaled([full_leaves[i] for i in chosen], [p_full[i] for i in chosen], wd)
        for i, new in zip(chosen, decayed):
            full_leaves[i] = new
        return full_spec.unflatten(full_leaves), state

    return describe(GradientTransformation(init, update), "add_decayed_weights", weight_decay=weight_decay, mask=mask)


def clip_by_global_norm(max_norm: Numeric) -> GradientTransformation:
    """Scales all updates by ``min(1, max_norm / (global_norm + 1e-6))``, as
    ``torch.nn.utils.clip_grad_norm_``.

    Branch-free: the factor is computed as a tensor and always applied, so nothing syncs with the host.

    Args:
        max_norm: the largest allowed L2 norm of all updates together (Python number or 0-d tensor).

    Returns:
        A stateless transformation.

    Example:
        >>> import torch
        >>> tx = clip_by_global_norm(1.0)
        >>> tx.update({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, tx.init(None))[0]["a"]
        tensor([0.6000])
    """

    def init(params: Params) -> EmptyState:
        check_float_params(params, where="clip_by_global_norm")
        return EmptyState()

    def update(updates: Updates, state: EmptyState, params: Params | None = None) -> tuple[Updates, EmptyState]:
        leaves, spec = _tree.tree_flatten(updates)
        if not leaves:
            return updates, state
        norm = _tree.tree_global_norm(updates).to(_device(leaves))
        factor = torch.clamp(_on(max_norm, norm.device) / (norm + 1e-6), max=1.0)
        return _tree.tree_unflatten(spec, _mul(leaves, factor)), state

    return describe(GradientTransformation(init, update), "clip_by_global_norm", max_norm=max_norm)


# ----------------------------------------------------------------------------------------------------------
# Learning rates and schedules.


class ScaleByLearningRateState(NamedTuple):
    """``count``: updates done so far (int64, 0-d). ``learning_rate``: the value the most recent update used
    (at init, the value for step 0), a 0-d float tensor the train step reports as its ``learning_rate``."""

    count: torch.Tensor
    learning_rate: torch.Tensor


def _lr_value(learning_rate: ScalarOrSchedule, count: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    value = learning_rate(count) if callable(learning_rate) else learning_rate
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def scale_by_learning_rate(learning_rate: ScalarOrSchedule, *, flip_sign: bool = True) -> GradientTransformation:
    """Multiplies the updates by ``-learning_rate`` (or ``+learning_rate`` with ``flip_sign=False``).

    A schedule is called with ``state.count`` (0 for the first update), then the count goes up by one.

    Args:
        learning_rate: a Python number, a 0-d tensor, or a schedule ``step (int64 0-d tensor) -> 0-d tensor``.
        flip_sign: descend (the default) instead of ascend.

    Returns:
        A transformation with state :class:`ScaleByLearningRateState`.

    Example:
        >>> import torch
        >>> tx = scale_by_learning_rate(lambda step: 0.1 * (step + 1))
        >>> params = {"w": torch.zeros(1)}
        >>> state = tx.init(params)
        >>> out, state = tx.update({"w": torch.ones(1)}, state)
        >>> out["w"], float(state.learning_rate)
        (tensor([-0.1000]), 0.10000000149011612)
    """

    def init(params: Params) -> ScaleByLearningRateState:
        check_float_params(params, where="scale_by_learning_rate")
        leaves = _tree.tree_leaves(params)
        count = _zero_count(params)
        like = torch.zeros((), dtype=_scalar_dtype(leaves), device=count.device)
        return ScaleByLearningRateState(count, _lr_value(learning_rate, count, like))

    def update(
        updates: Updates, state: ScaleByLearningRateState, params: Params | None = None
    ) -> tuple[Updates, ScaleByLearningRateState]:
        leaves, spec = _tree.tree_flatten(updates)
        if _is_number(learning_rate):
            lr_t, factor = state.learning_rate, (-learning_rate if flip_sign else learning_rate)
        else:
            lr_t = _lr_value(learning_rate, state.count, state.learning_rate)
            factor = -lr_t if flip_sign else lr_t
        new_leaves = _mul(leaves, factor) if leaves else leaves
        return _tree.tree_unflatten(spec, new_leaves), ScaleByLearningRateState(state.count + 1, lr_t)

    return describe(
        GradientTransformation(init, update), "scale_by_learning_rate", learning_rate=learning_rate, flip_sign=flip_sign
    )


class ScaleByScheduleState(NamedTuple):
    """``count``: updates done so far (int64, 0-d)."""

    count: torch.Tensor


def scale_by_schedule(step_size_fn: Schedule) -> GradientTransformation:
    """Multiplies the updates by ``step_size_fn(count)`` (no sign flip), then increments ``count``.

    Args:
        step_size_fn: ``step (int64 0-d tensor) -> 0-d tensor`` (or a Python number).

    Returns:
        A transformation with state :class:`ScaleByScheduleState`.

    Example:
        >>> import torch
        >>> tx = scale_by_schedule(lambda step: 0.5 ** step)
        >>> state = tx.init({"w": torch.zeros(1)})
        >>> _, state = tx.update({"w": torch.ones(1)}, state)
        >>> tx.update({"w": torch.ones(1)}, state)[0]["w"]
        tensor([0.5000])
    """

    def init(params: Params) -> ScaleByScheduleState:
        check_float_params(params, where="scale_by_schedule")
        return ScaleByScheduleState(_zero_count(params))

    def update(
        updates: Updates, state: ScaleByScheduleState, params: Params | None = None
    ) -> tuple[Updates, ScaleByScheduleState]:
        leaves, spec = _tree.tree_flatten(updates)
        if not leaves:
            return updates, _bump(state)
        factor = step_size_fn(state.count)
        if isinstance(factor, torch.Tensor):
            factor = factor.to(device=_device(leaves), dtype=_scalar_dtype(leaves))
        return _tree.tree_unflatten(spec, _mul(leaves, factor)), ScaleByScheduleState(state.count + 1)

    return describe(GradientTransformation(init, update), "scale_by_schedule", step_size_fn=step_size_fn)


# ----------------------------------------------------------------------------------------------------------
# Moment-based scalings.


class ScaleByAdamState(NamedTuple):
    """``count`` (int64, 0-d), first moment ``mu`` and second moment ``nu`` (trees shaped like the params)."""

    count: torch.Tensor
    mu: Updates
    nu: Updates


def scale_by_adam(
    b1: Numeric = 0.9,
    b2: Numeric = 0.999,
    eps: Numeric = 1e-8,
    eps_root: Numeric = 0.0,
    *,
    nesterov: bool = False,
) -> GradientTransformation:
    """Adam's bias-corrected moment ratio ``mu_hat / (sqrt(nu_hat + eps_root) + eps)`` (Kingma & Ba, 2015).

    Chained with :func:`scale_by_learning_rate` this is ``torch.optim.Adam``; with :func:`add_decayed_weights`
    in between, ``torch.optim.AdamW``.

    Args:
        b1: decay of the first moment.
        b2: decay of the second moment.
        eps: added to the denominator after the square root.
        eps_root: added to ``nu_hat`` under the square root.
        nesterov: use the Nesterov-style first moment ``b1 * mu_hat(t+1) + (1 - b1) * g / (1 - b1**t)`` (NAdam
            without its momentum schedule).

    Returns:
        A transformation with state :class:`ScaleByAdamState`.
    """
    _check_range("scale_by_adam", "b1", b1, 0.0, 1.0)
    _check_range("scale_by_adam", "b2", b2, 0.0, 1.0)

    def init(params: Params) -> ScaleByAdamState:
        check_float_params(params, where="scale_by_adam")
        mu = _tree.tree_map(torch.zeros_like, params)
        nu = _tree.tree_map(torch.zeros_like, params)
        return ScaleByAdamState(_zero_count(params), mu, nu)

    def update(
        updates: Updates, state: ScaleByAdamState, params: Params | None = None
    ) -> tuple[Updates, ScaleByAdamState]:
        g, spec = _tree.tree_flatten(updates)
        if not g:
            return updates, _bump(state)
        mu = _state_leaves(state.mu, len(g), where="scale_by_adam", field="mu")
        nu = _state_leaves(state.nu, len(g), where="scale_by_adam", field="nu")
        dev, sdt = _device(g), _scalar_dtype(g)
        beta1, beta2 = _on(b1, dev), _on(b2, dev)
        count = state.count + 1
        t = _count_as(count, sdt)
        mu = _ema(mu, g, beta1)
        nu = _ema_sq(nu, g, beta2)
        bc1, bc2 = 1 - beta1**t, 1 - beta2**t
        if nesterov:
            mu_hat = torch._foreach_add(_mul(mu, beta1 / (1 - beta1 ** (t + 1))), _mul(g, (1 - beta1) / bc1))
        else:
            mu_hat = torch._foreach_div(mu, bc1)
        nu_hat = torch._foreach_div(nu, bc2)
        if not _is_zero(eps_root):
            nu_hat = torch._foreach_add(nu_hat, _on(eps_root, dev))
        denom = torch._foreach_add(torch._foreach_sqrt(nu_hat), _on(eps, dev))
        out = torch._foreach_div(mu_hat, denom)
        new_state = ScaleByAdamState(count, _tree.tree_unflatten(spec, mu), _tree.tree_unflatten(spec, nu))
        return _tree.tree_unflatten(spec, out), new_state

    return describe(
        GradientTransformation(init, update),
        "scale_by_adam",
        b1=b1,
        b2=b2,
        eps=eps,
        eps_root=eps_root,
        nesterov=nesterov,
    )


class TraceState(NamedTuple):
    """``count`` (int64, 0-d; marks the undampened first step) and the momentum buffer ``trace``."""

    count: torch.Tensor
    trace: Updates


def trace(decay: Numeric, *, nesterov: bool = False, dampening: Numeric = 0.0) -> GradientTransformation:
    """Momentum with ``torch.optim.SGD`` semantics.

    ``buf = g`` on the first step, then ``buf = decay * buf + (1 - dampening) * g``; the output is ``buf``, or
    ``g + decay * buf`` with ``nesterov=True``. The first step is told apart branch-free from ``count``.

    Args:
        decay: the momentum coefficient (Python number or 0-d tensor).
        nesterov: Nesterov momentum.
        dampening: damps the gradient's contribution after the first step.

    Returns:
        A transformation with state :class:`TraceState`.

    Example:
        >>> import torch
        >>> tx = trace(0.9)
        >>> state = tx.init({"w": torch.zeros(1)})
        >>> out, state = tx.update({"w": torch.ones(1)}, state)
        >>> tx.update({"w": torch.ones(1)}, state)[0]["w"]
        tensor([1.9000])
    """
    _check_range("trace", "decay", decay, 0.0, float("inf"))
    _check_range("trace", "dampening", dampening, 0.0, 1.0, high_open=False)
    if nesterov and (_is_zero(decay) or (_is_number(dampening) and dampening != 0)):
        raise ValueError("trace: nesterov=True needs a non-zero decay and zero dampening (as torch.optim.SGD).")

    def init(params: Params) -> TraceState:
        check_float_params(params, where="trace")
        return TraceState(_zero_count(params), _tree.tree_map(torch.zeros_like, params))

    def update(updates: Updates, state: TraceState, params: Params | None = None) -> tuple[Updates, TraceState]:
        g, spec = _tree.tree_flatten(updates)
        if not g:
            return updates, _bump(state)
        buf = _state_leaves(state.trace, len(g), where="trace", field="trace")
        dev = _device(g)
        momentum = _on(decay, dev)
        if _is_zero(dampening):
            buf = torch._foreach_add(_mul(buf, momentum), g)
        else:
            damp = torch.as_tensor(1 - _on(dampening, dev), dtype=_scalar_dtype(g), device=dev)
            factor = torch.where(state.count == 0, torch.ones_like(damp), damp)
            buf = torch._foreach_add(_mul(buf, momentum), _mul(g, factor))
        out = _add_scaled(g, buf, momentum) if nesterov else buf
        return _tree.tree_unflatten(spec, out), TraceState(state.count + 1, _tree.tree_unflatten(spec, buf))

    return describe(GradientTransformation(init, update), "trace", decay=decay, nesterov=nesterov, dampening=dampening)


class ScaleByRmsState(NamedTuple):
    """``nu``: running mean of squared updates; ``mu``: running mean of updates (``centered=True``), else
    None."""

    nu: Updates
    mu: Updates | None


def scale_by_rms(
    decay: Numeric = 0.99,
    eps: Numeric = 1e-8,
    *,
    centered: bool = False,
    initial_scale: Numeric = 0.0,
) -> GradientTransformation:
    """Divides by the root of a running mean of squares, ``torch.optim.RMSprop`` style.

    ``nu = decay * nu + (1 - decay) * g**2``; the output is ``g / (sqrt(nu) + eps)``, or with
    ``centered=True`` ``g / (sqrt(nu - mu**2) + eps)`` where ``mu`` is the running mean of ``g``. Chain
    :func:`trace` after it for RMSprop's momentum (``buf = momentum * buf + g / avg``, exactly torch's).

    Args:
        decay: torch's ``alpha``.
        eps: added after the square root.
        centered: subtract the squared running mean (a variance estimate instead of a second moment).
        initial_scale: initial value of ``nu`` (torch uses 0).

    Returns:
        A transformation with state :class:`ScaleByRmsState`.
    """
    _check_range("scale_by_rms", "decay", decay, 0.0, 1.0, high_open=False)

    def init(params: Params) -> ScaleByRmsState:
        check_float_params(params, where="scale_by_rms")
        nu = _tree.tree_map(lambda p: torch.zeros_like(p) + initial_scale, params)
        mu = _tree.tree_map(torch.zeros_like, params) if centered else None
        return ScaleByRmsState(nu, mu)

    def update(
        updates: Updates, state: ScaleByRmsState, params: Params | None = None
    ) -> tuple[Updates, ScaleByRmsState]:
        g, spec = _tree.tree_flatten(updates)
        if not g:
            return updates, _bump(state)
        nu = _state_leaves(state.nu, len(g), where="scale_by_rms", field="nu")
        dev = _device(g)
        alpha = _on(decay, dev)
        nu = _ema_sq(nu, g, alpha)
        if centered:
            mu = _ema(_state_leaves(state.mu, len(g), where="scale_by_rms", field="mu"), g, alpha)
            avg = torch._foreach_sqrt(torch._foreach_addcmul(nu, mu, mu, value=-1))
            new_mu = _tree.tree_unflatten(spec, mu)
        else:
            avg, new_mu = torch._foreach_sqrt(nu), None
        out = torch._foreach_div(g, torch._foreach_add(avg, _on(eps, dev)))
        return _tree.tree_unflatten(spec, out), ScaleByRmsState(_tree.tree_unflatten(spec, nu), new_mu)

    return describe(
        GradientTransformation(init, update),
        "scale_by_rms",
        decay=decay,
        eps=eps,
        centered=centered,
        initial_scale=initial_scale,
    )


class ScaleByAdagradState(NamedTuple):
    """``count`` (int64, 0-d; drives ``lr_decay``) and the running ``sum_of_squares``."""

    count: torch.Tensor
    sum_of_squares: Updates


def scale_by_adagrad(
    initial_accumulator_value: Numeric = 0.0,
    eps: Numeric = 1e-10,
    *,
    lr_decay: Numeric = 0.0,
) -> GradientTransformation:
    """Adagrad with ``torch.optim.Adagrad`` semantics: ``g / (sqrt(sum g**2) + eps) / (1 + (t - 1) *
    lr_decay)``.

    Args:
        initial_accumulator_value: starting value of the sum of squares.
        eps: added after the square root.
        lr_decay: torch's ``lr_decay``; the ``t``-th update (``t`` from 1) is divided by
            ``1 + (t-1)*lr_decay``.

    Returns:
        A transformation with state :class:`ScaleByAdagradState`.

    Example:
        >>> import torch
        >>> tx = scale_by_adagrad(eps=0.0)
        >>> tx.update({"w": torch.tensor([-3.0])}, tx.init({"w": torch.zeros(1)}))[0]["w"]
        tensor([-1.])
    """
    _check_range("scale_by_adagrad", "initial_accumulator_value", initial_accumulator_value, 0.0, float("inf"))
    _check_range("scale_by_adagrad", "lr_decay", lr_decay, 0.0, float("inf"))

    def init(params: Params) -> ScaleByAdagradState:
        check_float_params(params, where="scale_by_adagrad")
        sums = _tree.tree_map(lambda p: torch.zeros_like(p) + initial_accumulator_value, params)
        return ScaleByAdagradState(_zero_count(params), sums)

    def update(
        updates: Updates, state: ScaleByAdagradState, params: Params | None = None
    ) -> tuple[Updates, ScaleByAdagradState]:
        g, spec = _tree.tree_flatten(updates)
        if not g:
            return updates, _bump(state)
        sums = _state_leaves(state.sum_of_squares, len(g), where="scale_by_adagrad", field="sum_of_squares")
        dev = _device(g)
        sums = torch._foreach_addcmul(sums, g, g)
        out = torch._foreach_div(g, torch._foreach_add(torch._foreach_sqrt(sums), _on(eps, dev)))
        if not _is_zero(lr_decay):
            decay_t = 1 + _count_as(state.count, _scalar_dtype(g)) * _on(lr_decay, dev)
            out = torch._foreach_div(out, decay_t)
        new_state = ScaleByAdagradState(state.count + 1, _tree.tree_unflatten(spec, sums))
        return _tree.tree_unflatten(spec, out), new_state

    return describe(
        GradientTransformation(init, update),
        "scale_by_adagrad",
        initial_accumulator_value=initial_accumulator_value,
        eps=eps,
        lr_decay=lr_decay,
    )


class ScaleByLionState(NamedTuple):
    """The momentum ``mu`` (a tree shaped like the params)."""

    mu: Updates


def scale_by_lion(b1: Numeric = 0.9, b2: Numeric = 0.99) -> GradientTransformation:
    """Lion's update ``sign(b1 * mu + (1 - b1) * g)``, then ``mu = b2 * mu + (1 - b2) * g`` (Chen et al.,
    2023).

    Args:
        b1: interpolation between momentum and gradient for the update's sign.
        b2: decay of the momentum.

    Returns:
        A transformation with state :class:`ScaleByLionState`.

    Example:
        >>> import torch
        >>> tx = scale_by_lion()
        >>> tx.update({"w": torch.tensor([-0.2, 0.0, 3.0])}, tx.init({"w": torch.zeros(3)}))[0]["w"]
        tensor([-1.,  0.,  1.])
    """
    _check_range("scale_by_lion", "b1", b1, 0.0, 1.0, high_open=False)
    _check_range("scale_by_lion", "b2", b2, 0.0, 1.0, high_open=False)

    def init(params: Params) -> ScaleByLionState:
        check_float_params(params, where="scale_by_lion")
        return ScaleByLionState(_tree.tree_map(torch.zeros_like, params))

    def update(
        updates: Updates, state: ScaleByLionState, params: Params | None = None
    ) -> tuple[Updates, ScaleByLionState]:
        g, spec = _tree.tree_flatten(updates)
        if not g:
            return updates, _bump(state)
        mu = _state_leaves(state.mu, len(g), where="scale_by_lion", field="mu")
        dev = _device(g)
        out = torch._foreach_sign(_ema(mu, g, _on(b1, dev)))
        mu = _ema(mu, g, _on(b2, dev))
        return _tree.tree_unflatten(spec, out), ScaleByLionState(_tree.tree_unflatten(spec, mu))

    return describe(GradientTransformation(init, update), "scale_by_lion", b1=b1, b2=b2)
