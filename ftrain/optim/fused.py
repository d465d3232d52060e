"""``update_and_apply``: one optimizer step, ``tx.update`` then ``apply_updates``, as fused passes where it can.

``tx.update`` and ``apply_updates`` are pure and out of place: every ``torch._foreach_*`` op allocates a new list
of tensors. A train step that only needs the new parameters and the new optimizer state calls
:func:`update_and_apply` instead, which gives the same result (``torch.optim``'s numbers) and, with
``donate=True``, writes it into the tensors it was given, as ``torch.optim`` does in place.

Example:
    >>> import torch
    >>> from ftrain import optim
    >>> tx = optim.sgd(0.1, momentum=0.9)
    >>> params = {"w": torch.ones(2)}
    >>> new_params, new_state = update_and_apply(tx, {"w": torch.ones(2)}, tx.init(params), params)
    >>> new_params["w"], params["w"]  # the inputs are untouched
    (tensor([0.9000, 0.9000]), tensor([1., 1.]))
"""

from __future__ import annotations

import torch

from ftrain import tree as _tree
from ftrain.optim.base import GradientTransformation, OptState, Params, Updates
from ftrain.optim.update import apply_updates, apply_updates_

__all__ = ["update_and_apply"]


def _copy_state_into(old: OptState, new: OptState) -> OptState:
    """Writes ``new``'s tensors into ``old``'s (same structure) and returns ``old``."""
    olds, news = _tree.tree_leaves(old), _tree.tree_leaves(new)
    pairs = [(o, n) for o, n in zip(olds, news) if isinstance(o, torch.Tensor) and o is not n]
    if pairs:
        with torch.no_grad():
            torch._foreach_copy_([o for o, _ in pairs], [n for _, n in pairs])
    return old


def update_and_apply(
    tx: GradientTransformation,
    grads: Updates,
    opt_state: OptState,
    params: Params,
    *,
    donate: bool = False,
    grad_norm: torch.Tensor | None = None,
) -> tuple[Params, OptState]:
    """``(apply_updates(params, updates), new_opt_state)`` where ``updates, new_opt_state = tx.update(grads,
    opt_state, params)``.

    Args:
        tx: the optimizer.
        grads: the gradients, a tree with the params' structure. Never modified.
        opt_state: ``tx``'s state.
        params: the parameters.
        donate: write the new parameters and optimizer state into ``params``' and ``opt_state``'s tensors and
            return those same objects (nothing else may hold on to the old values).
        grad_norm: the global L2 norm of ``grads`` when the caller has it already (a train step reports it), so a
            ``clip_by_global_norm`` at the head of ``tx`` need not compute it again. ``None``: computed if needed.

    Returns:
        ``(new_params, new_opt_state)``.
    """
    del grad_norm  # used by the fused kernels
    updates, new_state = tx.update(grads, opt_state, params)
    if not donate:
        return apply_updates(params, updates), new_state
    apply_updates_(params, updates)
    return params, _copy_state_into(opt_state, new_state)
