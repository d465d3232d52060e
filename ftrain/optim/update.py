"""Applying updates to parameters: ``params + updates``, leaf by leaf, in one ``torch._foreach_add``.

Example:
    >>> import torch
    >>> from ftrain.optim.update import apply_updates
    >>> params = {"w": torch.ones(2), "frozen": torch.ones(1)}
    >>> new = apply_updates(params, {"w": torch.tensor([0.5, -0.5]), "frozen": None})
    >>> new["w"], new["frozen"] is params["frozen"]
    (tensor([1.5000, 0.5000]), True)
"""

from __future__ import annotations

from typing import Any

import torch

from ftrain import tree as _tree
from ftrain.optim.base import Params, Updates

__all__ = ["apply_updates", "apply_updates_"]


def _paired_leaves(params: Params, updates: Updates, where: str) -> tuple[list[Any], list[Any], Any]:
    """Params leaves, the update at each of them (``None`` allowed) and the params' treespec."""
    p_leaves, spec = _tree.tree_flatten(params)
    try:
        u_leaves = spec.flatten_up_to(updates)
    except (ValueError, TypeError) as err:
        _tree.tree_check_same_structure(params, updates, names=("params", "updates"))
        raise ValueError(f"{where}: updates do not have the params' structure: {err}") from err
    return p_leaves, u_leaves, spec


def apply_updates(params: Params, updates: Updates, /) -> Params:
    """Returns ``params + updates`` as new tensors; the inputs are not modified.

    Each result keeps its parameter's dtype (a float32 update to a bfloat16 parameter is added in float32,
    then rounded to bfloat16). A ``None`` update leaves its parameter as it is (the same tensor object comes
    back).

    Args:
        params: the parameter tree.
        updates: a tree with the params' structure (``None`` allowed at leaves), as returned by a
            transformation's ``update``.

    Returns:
        The new parameter tree.

    Raises:
        ValueError: the trees' structures differ (the message names the key paths).
    """
    p_leaves, u_leaves, spec = _paired_leaves(params, updates, "apply_updates")
    idx = [i for i, u in enumerate(u_leaves) if u is not None]
    if not idx:
        return spec.unflatten(p_leaves)
    summed = torch._foreach_add([p_leaves[i] for i in idx], [u_leaves[i] for i in idx])
    out = list(p_leaves)
    for i, new in zip(idx, summed):
        out[i] = new if new.dtype == p_leaves[i].dtype else new.to(p_leaves[i].dtype)
    return spec.unflatten(out)


def apply_updates_(params: Params, updates: Updates, /) -> Params:
    """Adds ``updates`` to ``params`` in place (one ``torch._foreach_add_``) and returns ``params``.

    The fast path for a step whose caller donated its state: no new parameter tensors are allocated. Runs
    under ``torch.no_grad()`` (parameters that require grad can be updated). Only use it when nothing else
    holds on to the old values; otherwise use :func:`apply_updates`.

    Args:
        params: the parameter tree, modified in place.
        updates: a tree with the params' structure (``None`` leaves are skipped).

    Returns:
        ``params`` itself.

    Example:
        >>> import torch
        >>> params = {"w": torch.ones(2)}
        >>> apply_updates_(params, {"w": torch.ones(2)}) is params, params["w"]
        (True, tensor([2., 2.]))
    """
    p_leaves, u_leaves, _ = _paired_leaves(params, updates, "apply_updates_")
    idx = [i for i, u in enumerate(u_leaves) if u is not None]
    if idx:
        with torch.no_grad():
            torch._foreach_add_([p_leaves[i] for i in idx], [u_leaves[i] for i in idx])
    return params
