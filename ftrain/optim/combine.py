"""Combinators: build one :class:`~ftrain.optim.base.GradientTransformation` out of others.

- :func:`chain` / :func:`named_chain` run transformations one after the other;
- :func:`masked` applies one to some leaves and passes the others through;
- :func:`partition` gives each group of leaves its own transformation;
- :func:`freeze` zeroes the updates of some leaves.

Hidden leaves are ``None`` in the tree an inner transformation sees (an empty node), so its state holds
nothing for them.

Example:
    >>> import torch
    >>> from ftrain.optim.combine import chain, masked
    >>> from ftrain.optim.transform import scale
    >>> tx = chain(masked(scale(10.0), {"w": True, "b": False}), scale(-1.0))
    >>> params = {"w": torch.ones(1), "b": torch.ones(1)}
    >>> out, _ = tx.update({"w": torch.ones(1), "b": torch.ones(1)}, tx.init(params), params)
    >>> out["w"], out["b"]
    (tensor([-10.]), tensor([-1.]))
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

import optree

from ftrain import tree as _tree
from ftrain.optim.base import GradientTransformation, OptState, Params, Updates, describe, set_to_zero
from ftrain.optim.transform import MaskOrFn, _flatten_keep_none, _resolve_mask

__all__ = [
    "MaskedState",
    "PartitionState",
    "chain",
    "freeze",
    "masked",
    "named_chain",
    "partition",
]


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Applies ``transforms`` in order; the state is the tuple of their states.

    Args:
        *transforms: the transformations, first applied first.

    Returns:
        A transformation whose state is ``tuple(state_0, state_1, ...)``.

    Example:
        >>> import torch
        >>> from ftrain.optim.transform import scale
        >>> tx = chain(scale(2.0), scale(3.0))
        >>> tx.update({"w": torch.ones(1)}, tx.init(None))[0]["w"]
        tensor([6.])
    """

    def init(params: Params) -> tuple[OptState, ...]:
        return tuple(tx.init(params) for tx in transforms)

    def update(
        updates: Updates, state: tuple[OptState, ...], params: Params | None = None
    ) -> tuple[Updates, tuple[OptState, ...]]:
        if len(state) != len(transforms):
            raise ValueError(
                f"chain: got a state of {len(state)} entries for {len(transforms)} transformations; the "
                "state comes from a different chain (call this chain's init)."
            )
        new_states = []
        for tx, tx_state in zip(transforms, state):
            updates, tx_state = tx.update(updates, tx_state, params)
            new_states.append(tx_state)
        return updates, tuple(new_states)

    return describe(GradientTransformation(init, update), "chain", children=transforms)


def named_chain(*transforms: tuple[str, GradientTransformation]) -> GradientTransformation:
    """Like :func:`chain`, with a state that is a dict ``name -> state`` (readable in checkpoints and logs).

    Args:
        *transforms: ``(name, transformation)`` pairs, first applied first; names must be unique.

    Returns:
        A transformation whose state is ``{name: state}``.

    Raises:
        ValueError: a name appears twice.

    Example:
        >>> import torch
        >>> from ftrain.optim.transform import scale, scale_by_adam
        >>> tx = named_chain(("adam", scale_by_adam()), ("lr", scale(-0.1)))
        >>> sorted(tx.init({"w": torch.zeros(1)}))
        ['adam', 'lr']
    """
    names = [name for name, _ in transforms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"named_chain: names must be unique; repeated: {duplicates}.")

    def init(params: Params) -> dict[str, OptState]:
        return {name: tx.init(params) for name, tx in transforms}

    def update(
        updates: Updates, state: dict[str, OptState], params: Params | None = None
    ) -> tuple[Updates, dict[str, OptState]]:
        missing = [n for n in names if n not in state]
        if missing:
            raise ValueError(f"named_chain: the state has no entry for {missing}; it has {sorted(state)}.")
        new_state = {}
        for name, tx in transforms:
            updates, new_state[name] = tx.update(updates, state[name], params)
        return updates, new_state

    return describe(
        GradientTransformation(init, update),
        "named_chain",
        children=tuple(tx for _, tx in transforms),
        names=tuple(names),
    )


class MaskedState(NamedTuple):
    """The inner transformation's state (built for the tree with masked-out leaves set to ``None``)."""

    inner_state: OptState


def _select(tree: Any, spec: Any, keep: list[bool]) -> Any:
    """``tree`` with ``None`` wherever ``keep`` is False (``spec`` keeps ``None`` as a leaf)."""
    if tree is None:
        return None
    leaves = spec.flatten_up_to(tree)
    return spec.unflatten([x if k else None for x, k in zip(leaves, keep)])


def masked(inner: GradientTransformation, mask: MaskOrFn) -> GradientTransformation:
    """Applies ``inner`` to the leaves where ``mask`` is True; the other updates pass through unchanged.

    ``inner`` sees trees with ``None`` at the masked-out positions, both at ``init`` and at ``update``.

    Args:
        inner: the transformation to apply to the selected leaves.
        mask: a tree of Python bools with the params' structure, or a function ``params -> that tree`` (called
            on ``params`` when given, else on ``updates``).

    Returns:
        A transformation with state :class:`MaskedState`.

    Example:
        >>> import torch
        >>> from ftrain.optim.transform import scale
        >>> tx = masked(scale(0.0), lambda p: {k: v.ndim > 1 for k, v in p.items()})
        >>> params = {"w": torch.ones(1, 1), "b": torch.ones(1)}
        >>> out, _ = tx.update(params, tx.init(params), params)
        >>> out["w"], out["b"]
        (tensor([[0.]]), tensor([1.]))
    """

    def init(params: Params) -> MaskedState:
        _, spec = _flatten_keep_none(params)
        keep = _resolve_mask(mask, params, spec, where="masked")
        return MaskedState(inner.init(_select(params, spec, keep)))

    def update(updates: Updates, state: MaskedState, params: Params | None = None) -> tuple[Updates, MaskedState]:
        leaves, spec = _flatten_keep_none(updates)
        keep = _resolve_mask(mask, updates if params is None else params, spec, where="masked")
        inner_updates, inner_state = inner.update(
            spec.unflatten([u if k else None for u, k in zip(leaves, keep)]),
            state.inner_state,
            _select(params, spec, keep),
        )
        inner_leaves = spec.flatten_up_to(inner_updates)
        out = [new if k else old for old, new, k in zip(leaves, inner_leaves, keep)]
        return spec.unflatten(out), MaskedState(inner_state)

    return describe(GradientTransformation(init, update), "masked", children=(inner,), mask=mask)


def freeze(mask: MaskOrFn) -> GradientTransformation:
    """Zeroes the updates of the leaves where ``mask`` is True (they stay at their values); others pass
    through.

    Args:
        mask: a tree of Python bools with the params' structure, or a function ``params -> that tree``.

    Returns:
        A transformation with state :class:`MaskedState` (of an empty state).

    Example:
        >>> import torch
        >>> tx = freeze({"emb": True, "head": False})
        >>> params = {"emb": torch.ones(1), "head": torch.ones(1)}
        >>> out, _ = tx.update(params, tx.init(params), params)
        >>> out["emb"], out["head"]
        (tensor([0.]), tensor([1.]))
    """
    return masked(set_to_zero(), mask)


class PartitionState(NamedTuple):
    """``inner_states``: label -> the state of that label's transformation."""

    inner_states: dict[Hashable, OptState]


def _labels(
    param_labels: Any | Callable[[Params], Any], params: Params, spec: Any, transforms: Mapping[Hashable, Any]
) -> list[Hashable]:
    """Label leaves aligned with ``spec``; an unknown label raises naming the leaf's key path."""
    labels_tree = param_labels(params) if callable(param_labels) else param_labels
    try:
        labels = spec.flatten_up_to(labels_tree)
    except (ValueError, TypeError) as err:
        _tree.tree_check_same_structure(params, labels_tree, names=("params", "param_labels"))
        raise ValueError(f"partition: param_labels does not have the params' structure: {err}") from err
    paths = None
    for i, label in enumerate(labels):
        if label not in transforms:
            paths = paths or optree.tree_paths(params, none_is_leaf=True, namespace=_tree.NAMESPACE)
            where = _tree.keystr(paths[i]) if i < len(paths) else f"leaf {i}"
            raise ValueError(
                f"partition: parameter {where} has label {label!r}, which has no transformation; the labels "
                f"with one are {sorted(transforms, key=repr)}. Add it to `transforms` or relabel the leaf."
            )
    return labels


def partition(
    transforms: Mapping[Hashable, GradientTransformation], param_labels: Any | Callable[[Params], Any]
) -> GradientTransformation:
    """Gives each group of leaves its own transformation; each one sees only its leaves (``None`` elsewhere).

    Args:
        transforms: label -> transformation.
        param_labels: a tree of labels with the params' structure, or a function ``params -> that tree``.

    Returns:
        A transformation with state :class:`PartitionState`.

    Raises:
        ValueError: a leaf's label has no transformation (the message names the leaf's key path), or
            ``param_labels`` does not have the params' structure.

    Example:
        >>> import torch
        >>> from ftrain.optim.transform import scale
        >>> tx = partition({"fast": scale(10.0), "slow": scale(0.1)}, {"w": "fast", "b": "slow"})
        >>> params = {"w": torch.ones(1), "b": torch.ones(1)}
        >>> out, _ = tx.update(params, tx.init(params), params)
        >>> out["w"], out["b"]
        (tensor([10.]), tensor([0.1000]))
    """

    def init(params: Params) -> PartitionState:
        _, spec = _flatten_keep_none(params)
        labels = _labels(param_labels, params, spec, transforms)
        return PartitionState(
            {label: tx.init(_select(params, spec, [lb == label for lb in labels])) for label, tx in transforms.items()}
        )

    def update(updates: Updates, state: PartitionState, params: Params | None = None) -> tuple[Updates, PartitionState]:
        leaves, spec = _flatten_keep_none(updates)
        labels = _labels(param_labels, updates if params is None else params, spec, transforms)
        out = list(leaves)
        new_states = {}
        for label, tx in transforms.items():
            keep = [lb == label for lb in labels]
            group_updates, new_states[label] = tx.update(
                _select(updates, spec, keep), state.inner_states[label], _select(params, spec, keep)
            )
            for i, new in enumerate(spec.flatten_up_to(group_updates)):
                if keep[i]:
                    out[i] = new
        return spec.unflatten(out), PartitionState(new_states)

    return describe(
        GradientTransformation(init, update),
        "partition",
        children=tuple(transforms.values()),
        labels=tuple(transforms),
        param_labels=param_labels,
    )
