"""Pytree helpers over optree, in ftrain's registry namespace.

Every ftrain container (``TrainState``, optimizer states) is registered in the ``"ftrain"`` optree namespace; the
functions here always pass it, so ``tree_map`` sees through them. Errors name the key path of the first leaf that
does not fit, e.g. ``["transformer.h.0.attn.weight"]``.

Example:
    >>> import torch
    >>> from ftrain import tree
    >>> t = {"a": torch.ones(2), "b": (torch.zeros(1), None)}
    >>> [tree.keystr(p) for p in tree.tree_paths(t)]
    ["['a']", "['b'][0]"]
    >>> float(tree.tree_global_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}))
    5.0
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import optree
import torch

NAMESPACE = "ftrain"

PyTree = Any

__all__ = [
    "NAMESPACE",
    "PyTree",
    "combine",
    "keystr",
    "partition",
    "tree_check_same_structure",
    "tree_flatten",
    "tree_flatten_with_path",
    "tree_global_norm",
    "tree_leaves",
    "tree_map",
    "tree_map_with_path",
    "tree_paths",
    "tree_structure",
    "tree_unflatten",
    "tree_zeros_like",
]


def tree_flatten(tree: PyTree, /, *, is_leaf: Callable[[Any], bool] | None = None):
    """Leaves (``None`` is an empty node) and the treespec."""
    return optree.tree_flatten(tree, is_leaf=is_leaf, namespace=NAMESPACE)


def tree_unflatten(treespec, leaves: Sequence[Any], /):
    return optree.tree_unflatten(treespec, leaves)


def tree_leaves(tree: PyTree, /, *, is_leaf: Callable[[Any], bool] | None = None) -> list[Any]:
    return optree.tree_leaves(tree, is_leaf=is_leaf, namespace=NAMESPACE)


def tree_structure(tree: PyTree, /, *, is_leaf: Callable[[Any], bool] | None = None):
    return optree.tree_structure(tree, is_leaf=is_leaf, namespace=NAMESPACE)


def tree_map(fn: Callable[..., Any], tree: PyTree, /, *rest: PyTree, is_leaf=None) -> PyTree:
    """``optree.tree_map`` in ftrain's namespace; a structure mismatch raises with the key path (see
    :func:`tree_check_same_structure`)."""
    for i, other in enumerate(rest):
        tree_check_same_structure(tree, other, names=("tree", f"rest[{i}]"), is_leaf=is_leaf)
    return optree.tree_map(fn, tree, *rest, is_leaf=is_leaf, namespace=NAMESPACE)


def tree_map_with_path(fn: Callable[..., Any], tree: PyTree, /, *rest: PyTree, is_leaf=None) -> PyTree:
    """Like :func:`tree_map`, ``fn(path, leaf, *others)``, ``path`` a tuple of entries (see :func:`keystr`)."""
    for i, other in enumerate(rest):
        tree_check_same_structure(tree, other, names=("tree", f"rest[{i}]"), is_leaf=is_leaf)
    return optree.tree_map_with_path(fn, tree, *rest, is_leaf=is_leaf, namespace=NAMESPACE)


def tree_flatten_with_path(tree: PyTree, /, *, is_leaf=None):
    """``(paths, leaves, treespec)``."""
    return optree.tree_flatten_with_path(tree, is_leaf=is_leaf, namespace=NAMESPACE)


def tree_paths(tree: PyTree, /, *, is_leaf=None) -> list[tuple[Any, ...]]:
    return optree.tree_paths(tree, is_leaf=is_leaf, namespace=NAMESPACE)


def keystr(path: tuple[Any, ...]) -> str:
    """Formats a path as Python indexing: ``('params', 'h.0.w', 1)`` -> ``['params']['h.0.w'][1]``."""
    return "".join(f"[{entry!r}]" for entry in path)


def tree_check_same_structure(a: PyTree, b: PyTree, /, *, names=("a", "b"), is_leaf=None) -> None:
    """Raises ``ValueError`` naming the first key path where ``a`` and ``b`` differ (a missing or extra key, a
    leaf where a subtree stands). Does nothing when they match."""
    spec_a = tree_structure(a, is_leaf=is_leaf)
    spec_b = tree_structure(b, is_leaf=is_leaf)
    if spec_a == spec_b:
        return
    paths_a = [keystr(p) for p in tree_paths(a, is_leaf=is_leaf)]
    paths_b = [keystr(p) for p in tree_paths(b, is_leaf=is_leaf)]
    set_a, set_b = set(paths_a), set(paths_b)
    only_a = [p for p in paths_a if p not in set_b]
    only_b = [p for p in paths_b if p not in set_a]
    lines = [f"{names[0]} and {names[1]} have different tree structures ({len(paths_a)} vs {len(paths_b)} leaves)."]
    if only_a:
        lines.append(f"  in {names[0]} only: {', '.join(only_a[:5])}" + (" ..." if len(only_a) > 5 else ""))
    if only_b:
        lines.append(f"  in {names[1]} only: {', '.join(only_b[:5])}" + (" ..." if len(only_b) > 5 else ""))
    if not only_a and not only_b:
        lines.append(f"  same leaf paths, different containers:\n    {spec_a}\n    {spec_b}")
    lines.append("  Build the second tree from the first (e.g. with tree_map) so their keys match.")
    raise ValueError("\n".join(lines))


def tree_zeros_like(tree: PyTree, /) -> PyTree:
    return tree_map(torch.zeros_like, tree)


def tree_global_norm(tree: PyTree, /) -> torch.Tensor:
    """The L2 norm of all leaves together, as a 0-d float32 tensor (float64 if any leaf is float64).

    Uses one ``torch._foreach_norm`` over the leaves, like ``torch.nn.utils.clip_grad_norm_``.
    """
    leaves = [x for x in tree_leaves(tree) if isinstance(x, torch.Tensor)]
    if not leaves:
        return torch.zeros((), dtype=torch.float32)
    acc_dtype = torch.float64 if any(x.dtype == torch.float64 for x in leaves) else torch.float32
    norms = torch._foreach_norm(leaves)
    return torch.linalg.vector_norm(torch.stack([n.to(acc_dtype) for n in norms]))


def partition(tree: PyTree, predicate: Callable[[Any], bool], /) -> tuple[PyTree, PyTree]:
    """Splits ``tree`` into ``(matching, rest)``, two trees of the same structure with ``None`` where a leaf went
    to the other side (equinox's ``partition``). :func:`combine` puts them back together."""
    matching = optree.tree_map(lambda x: x if predicate(x) else None, tree, namespace=NAMESPACE)
    rest = optree.tree_map(lambda x: None if predicate(x) else x, tree, namespace=NAMESPACE)
    return matching, rest


def combine(*trees: PyTree) -> PyTree:
    """Inverse of :func:`partition`: takes, at each position, the first tree's value that is not ``None``."""

    def first(*xs):
        for x in xs:
            if x is not None:
                return x
        return None

    return optree.tree_map(first, *trees, none_is_leaf=True, namespace=NAMESPACE)
