"""Adafactor (Shazeer & Stern, 2018), step for step as ``transformers.optimization.Adafactor``.

Second moments of a parameter with two or more dimensions are factored into running averages over its rows
and columns (the last two dimensions), so their memory is ``O(n + m)`` instead of ``O(n m)``; 0-D and 1-D
parameters keep a full second moment. The update is the gradient scaled by the inverse square root of that
estimate, clipped to an RMS of ``clip_threshold``, multiplied by the step size, and optionally averaged with
``beta1``.

HF multiplies by the step size *before* the first-moment average and uses it for weight decay, and the
step size depends on the step (``relative_step``) and on each parameter's RMS (``scale_parameter``). So the
step size lives inside :func:`scale_by_adafactor`, not in a separate ``scale_by_learning_rate``: that keeps a
scheduled learning rate with ``beta1`` exactly equal to HF.

Example:
    >>> import torch
    >>> from ftrain.optim.factorized import adafactor
    >>> params = {"w": torch.ones(2, 3), "b": torch.zeros(3)}
    >>> tx = adafactor(learning_rate=1e-2)
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": torch.ones(2, 3), "b": torch.ones(3)}, state, params)
    >>> updates["w"]
    tensor([[-0.0100, -0.0100, -0.0100],
            [-0.0100, -0.0100, -0.0100]])
    >>> int(state.count), float(state.learning_rate)
    (1, 0.009999999776482582)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ftrain import tree as _tree
from ftrain.optim.base import GradientTransformation, Params, ScalarOrSchedule, check_float_params, describe
from ftrain.optim.transform import (
    MaskOrFn,
    Numeric,
    _ema,
    _flatten_keep_none,
    _resolve_mask,
    _scalar_dtype,
    _zero_count,
)

__all__ = ["ScaleByAdafactorState", "adafactor", "scale_by_adafactor"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class ScaleByAdafactorState(NamedTuple):
    """State of :func:`scale_by_adafactor`. The moment fields are trees shaped like the params, with ``None``
    where a leaf has no such statistic (``exp_avg_sq_row``/``_col`` for 0-D and 1-D leaves, ``exp_avg_sq`` for
    factored ones; ``exp_avg`` is ``None`` altogether without ``beta1``).

    Attributes:
        count: 0-d int64, updates done so far.
        learning_rate: 0-d float, the step size of the last update before the per-parameter RMS factor (the
            relative step size with ``relative_step=True``); before any update, the one the first update uses.
        exp_avg_sq_row: running mean of ``grad**2 + eps[0]`` over the last dimension (shape ``p.shape[:-1]``).
        exp_avg_sq_col: the same over the second-to-last dimension (shape ``p.shape[:-2] + p.shape[-1:]``).
        exp_avg_sq: running mean of ``grad**2 + eps[0]`` for 0-D and 1-D leaves.
        exp_avg: running mean of the scaled updates, with ``beta1``.
    """

    count: torch.Tensor
    learning_rate: torch.Tensor
    exp_avg_sq_row: Any
    exp_avg_sq_col: Any
    exp_avg_sq: Any
    exp_avg: Any


def _step_size(
    learning_rate: ScalarOrSchedule | None,
    count: torch.Tensor,
    *,
    relative_step: bool,
    warmup_init: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Step size of the update that follows ``count`` updates (HF's ``_get_lr`` without the RMS factor)."""
    if relative_step:
        step = (count + 1).to(dtype)
        min_step = 1e-6 * step if warmup_init else torch.full_like(step, 1e-2)
        return torch.minimum(min_step, 1.0 / torch.sqrt(step))
    value = learning_rate(count) if callable(learning_rate) else learning_rate
    return torch.as_tensor(value, dtype=dtype, device=count.device)


def _rms_list(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``x.norm(2) / sqrt(x.numel())`` for each ``x``, as HF's ``Adafactor._rms``."""
    return torch._foreach_div(torch._foreach_norm(xs), [x.numel() ** 0.5 for x in xs])


def _precondition(
    grads: list[torch.Tensor], state_lists: tuple[list, list, list], beta2t: torch.Tensor, eps1: Numeric
) -> tuple[list[torch.Tensor], tuple[list, list, list]]:
    """Updates the factored / full second moments and returns ``grad / sqrt(v_hat)`` per leaf."""
    rows, cols, fulls = state_lists
    sq = torch._foreach_add(torch._foreach_mul(grads, grads), eps1)
    fac = [i for i, r in enumerate(rows) if r is not None]
    unf = [i for i, r in enumerate(rows) if r is None]
    new_rows, new_cols, new_fulls = list(rows), list(cols), list(fulls)
    if fac:
        r_new = _ema([rows[i] for i in fac], [sq[i].mean(dim=-1) for i in fac], beta2t, lerp=False)
        c_new = _ema([cols[i] for i in fac], [sq[i].mean(dim=-2) for i in fac], beta2t, lerp=False)
        for i, r, c in zip(fac, r_new, c_new):
            new_rows[i], new_cols[i] = r, c
    if unf:
        for i, v in zip(unf, _ema([fulls[i] for i in unf], [sq[i] for i in unf], beta2t, lerp=False)):
            new_fulls[i] = v
    out = []
    for i, g in enumerate(grads):
        if rows[i] is not None:
            r, c = new_rows[i], new_cols[i]
            r_factor = (r / r.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
            out.append(torch.mul(r_factor, c.unsqueeze(-2).rsqrt()) * g)
        else:
            out.append(new_fulls[i].rsqrt() * g)
    return out, (new_rows, new_cols, new_fulls)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """HF computes fp16/bf16 leaves in float32 (and keeps their statistics in float32)."""
    return torch.float32 if x.dtype in _LOW_PRECISION else x.dtype


def _init_leaf_stats(
    leaf: torch.Tensor,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    dtype = _compute_dtype(leaf)
    shape = leaf.shape
    if leaf.dim() >= 2:
        row = torch.zeros(shape[:-1], dtype=dtype, device=leaf.device)
        col = torch.zeros(shape[:-2] + shape[-1:], dtype=dtype, device=leaf.device)
        return row, col, None
    return None, None, torch.zeros(shape, dtype=dtype, device=leaf.device)


def _check_step_size_args(learning_rate: Any, relative_step: bool, warmup_init: bool) -> None:
    """The combinations HF's ``Adafactor.__init__`` rejects."""
    if learning_rate is not None and relative_step:
        raise ValueError(
            "scale_by_adafactor: learning_rate and relative_step=True cannot be combined (the relative step "
            "rule sets the step size). Pass learning_rate=None, or relative_step=False."
        )
    if learning_rate is None and not relative_step:
        raise ValueError("scale_by_adafactor: relative_step=False needs a learning_rate.")
    if warmup_init and not relative_step:
        raise ValueError("scale_by_adafactor: warmup_init=True requires relative_step=True.")


def scale_by_adafactor(
    learning_rate: ScalarOrSchedule | None = None,
    *,
    eps: tuple[Numeric, Numeric] = (1e-30, 1e-3),
    clip_threshold: Numeric = 1.0,
    decay_rate: Numeric = -0.8,
    beta1: Numeric | None = None,
    weight_decay: Numeric = 0.0,
    weight_decay_mask: MaskOrFn = None,
    scale_parameter: bool = True,
    relative_step: bool = True,
    warmup_init: bool = False,
) -> GradientTransformation:
    """Adafactor's step, as ``transformers.optimization.Adafactor`` (same arguments, same defaults).

    Returns the amount to *subtract* from each parameter (HF's ``update`` plus its weight-decay term), so
    ``p - u`` is HF's new parameter; :func:`adafactor` negates it to give an optax-style update.

    Args:
        learning_rate: float, 0-d tensor or schedule of the update count (evaluated at 0 for the first
            update). Must be ``None`` with ``relative_step=True`` and given otherwise, as in HF.
        eps: ``(eps1, eps2)``: added to ``grad**2``; lower bound of the param RMS with ``scale_parameter``.
        clip_threshold: the RMS the preconditioned update is clipped to.
        decay_rate: the second-moment decay is ``beta2_t = 1 - t**decay_rate`` at step ``t`` (1-based).
        beta1: coefficient of a running average of the scaled updates; ``None`` for none (no state).
        weight_decay: HF's decay ``p -= weight_decay * lr_t * p`` (``lr_t`` with the RMS factor), from the
            params before the update. ``0.0`` (a Python float) adds nothing.
        weight_decay_mask: a tree of bools like the params (or a function of the params returning one);
            ``False`` leaves are not decayed. ``None`` decays all.
        scale_parameter: multiply the step size by ``max(eps2, RMS(p))`` per parameter.
        relative_step: step size ``min(1e-2, 1/sqrt(t))`` (``min(1e-6 t, 1/sqrt(t))`` with ``warmup_init``).
        warmup_init: see ``relative_step``.

    Returns:
        A :class:`GradientTransformation` with state :class:`ScaleByAdafactorState`. ``update`` needs
        ``params`` when ``scale_parameter`` is set or ``weight_decay`` is not ``0.0``.

    Raises:
        ValueError: the ``learning_rate`` / ``relative_step`` / ``warmup_init`` combination HF rejects.
    """
    _check_step_size_args(learning_rate, relative_step, warmup_init)
    decays = not (isinstance(weight_decay, (int, float)) and weight_decay == 0)
    lr_kw = dict(relative_step=relative_step, warmup_init=warmup_init)
    hparams = dict(
        learning_rate=learning_rate,
        eps=eps,
        clip_threshold=clip_threshold,
        decay_rate=decay_rate,
        beta1=beta1,
        weight_decay=weight_decay,
        weight_decay_mask=weight_decay_mask,
        scale_parameter=scale_parameter,
        **lr_kw,
    )

    def init(params: Params) -> ScaleByAdafactorState:
        check_float_params(params, where="scale_by_adafactor")
        leaves, spec = _tree.tree_flatten(params)
        count = _zero_count(params)
        stats = [_init_leaf_stats(x) for x in leaves]
        trees = [_tree.tree_unflatten(spec, [s[j] for s in stats]) for j in range(3)]
        exp_avg = None
        if beta1 is not None:
            exp_avg = _tree.tree_unflatten(spec, [torch.zeros_like(x, dtype=_compute_dtype(x)) for x in leaves])
        lr = _step_size(learning_rate, count, dtype=_scalar_dtype(leaves), **lr_kw)
        return ScaleByAdafactorState(count, lr, *trees, exp_avg)

    def update(updates, state: ScaleByAdafactorState, params: Params | None = None):
        leaves, spec = _tree.tree_flatten(updates)
        if not leaves:
            return updates, state._replace(count=state.count + 1)
        if (scale_parameter or decays) and params is None:
            raise ValueError("scale_by_adafactor: update needs params (scale_parameter or weight_decay is set).")
        p_leaves = [None] * len(leaves) if params is None else spec.flatten_up_to(params)
        p_leaves = [p if p is None else p.to(_compute_dtype(p)) for p in p_leaves]
        grads = [g.to(_compute_dtype(g)) for g in leaves]
        sdtype = _scalar_dtype(leaves)
        lr = _step_size(learning_rate, state.count, dtype=sdtype, **lr_kw)
        beta2t = 1.0 - (state.count + 1).to(sdtype) ** decay_rate
        stats = (state.exp_avg_sq_row, state.exp_avg_sq_col, state.exp_avg_sq)
        stat_lists = tuple(spec.flatten_up_to(t) for t in stats)
        us, new_stats = _precondition(grads, stat_lists, beta2t, eps[0])
        denom = torch._foreach_clamp_min(torch._foreach_div(_rms_list(us), clip_threshold), 1.0)
        us = torch._foreach_div(us, denom)
        lrs = [torch.clamp_min(r, eps[1]) * lr for r in _rms_list(p_leaves)] if scale_parameter else [lr] * len(us)
        us = torch._foreach_mul(us, lrs)
        new_avg = None
        if beta1 is not None:
            avg = spec.flatten_up_to(state.exp_avg)
            us = _ema(avg, us, beta1, lerp=False)  # HF's order of operations
            new_avg = _tree.tree_unflatten(spec, us)
        if decays:
            full_leaves, full_spec = _flatten_keep_none(updates)  # None: a leaf hidden by an outer mask
            keep = (
                [True] * full_spec.num_leaves
                if weight_decay_mask is None
                else _resolve_mask(weight_decay_mask, params, full_spec, where="scale_by_adafactor")
            )
            mask = [k for u, k in zip(full_leaves, keep) if u is not None]
            us = [u + p * (weight_decay * r) if m else u for u, p, r, m in zip(us, p_leaves, lrs, mask)]
        out = _tree.tree_unflatten(spec, [u.to(g.dtype) for u, g in zip(us, leaves)])
        new_trees = [_tree.tree_unflatten(spec, s) for s in new_stats]
        return out, ScaleByAdafactorState(state.count + 1, lr, *new_trees, new_avg)

    return describe(GradientTransformation(init, update), "scale_by_adafactor", **hparams)


def adafactor(
    learning_rate: ScalarOrSchedule | None,
    *,
    eps: tuple[Numeric, Numeric] = (1e-30, 1e-3),
    clip_threshold: Numeric = 1.0,
    decay_rate: Numeric = -0.8,
    beta1: Numeric | None = None,
    weight_decay: Numeric = 0.0,
    mask: MaskOrFn = None,
    scale_parameter: bool = False,
    relative_step: bool = False,
    warmup_init: bool = False,
) -> GradientTransformation:
    """Adafactor as HF's ``Trainer`` builds it for ``optim="adafactor"``.

    The defaults give ``transformers.optimization.Adafactor(lr=learning_rate, scale_parameter=False,
    relative_step=False)``; HF's weight decay (``p -= weight_decay * lr * p``, from the params before the
    update) applies to the leaves where ``mask`` is ``True`` (HF's Trainer decays the leaves
    :func:`ftrain.optim.masks.hf_decay_mask` marks).
    With ``relative_step=True`` the step size comes from the relative-step rule and ``learning_rate`` must be
    ``None``. The state is :class:`ScaleByAdafactorState` (its ``learning_rate`` field is the step size used).

    Args:
        learning_rate: float, 0-d tensor or schedule of the update count; ``None`` with ``relative_step``.
        eps, clip_threshold, decay_rate, beta1, scale_parameter, relative_step, warmup_init: as in
            :func:`scale_by_adafactor` (HF's meaning).
        weight_decay: HF's decoupled decay coefficient.
        mask: tree of bools like the params, or a function of the params returning one: which leaves decay.

    Returns:
        A :class:`GradientTransformation` whose updates are added to the params.

    Example:
        >>> import torch
        >>> tx = adafactor(1e-3, weight_decay=0.1)
        >>> p = {"w": torch.full((2, 2), 2.0)}
        >>> u, _ = tx.update({"w": torch.ones(2, 2)}, tx.init(p), p)
        >>> u["w"][0, 0]  # -(1e-3 * 1 + 0.1 * 1e-3 * 2)
        tensor(-0.0012)
    """
    inner = scale_by_adafactor(
        learning_rate,
        eps=eps,
        clip_threshold=clip_threshold,
        decay_rate=decay_rate,
        beta1=beta1,
        weight_decay=weight_decay,
        weight_decay_mask=mask,
        scale_parameter=scale_parameter,
        relative_step=relative_step,
        warmup_init=warmup_init,
    )

    def update(updates, state: ScaleByAdafactorState, params: Params | None = None):
        steps, state = inner.update(updates, state, params)
        return _tree.tree_map(torch.neg, steps), state

    return describe(GradientTransformation(inner.init, update), "adafactor", children=(inner,))
