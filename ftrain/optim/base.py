"""The gradient-transformation protocol, optax-shaped.

A :class:`GradientTransformation` is a pair of pure functions:

- ``init(params) -> state``
- ``update(updates, state, params=None) -> (new_updates, new_state)``

Neither mutates its arguments: new tensors come back (``torch._foreach_*`` without the trailing underscore).
Trees are dicts of tensors keyed like ``model.named_parameters()``; ``None`` inside a tree is an empty node, which
is how :func:`ftrain.optim.masked` hides leaves from an inner transformation. Hyper-parameters may be Python
floats or 0-d tensors (see :func:`ftrain.optim.inject_hyperparams`), so a changing value never recompiles a
compiled step.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

import torch

from ftrain import tree as _tree

Params = Any
Updates = Any
OptState = Any
Schedule = Callable[[torch.Tensor], torch.Tensor]
ScalarOrSchedule = float | torch.Tensor | Schedule

__all__ = [
    "Description",
    "EmptyState",
    "GradientTransformation",
    "OptState",
    "Params",
    "ScalarOrSchedule",
    "Schedule",
    "TransformInitFn",
    "TransformUpdateFn",
    "Updates",
    "check_float_params",
    "describe",
    "description",
    "identity",
    "set_to_zero",
]


class TransformInitFn(Protocol):
    def __call__(self, params: Params) -> OptState: ...


class TransformUpdateFn(Protocol):
    def __call__(self, updates: Updates, state: OptState, params: Params | None = None) -> tuple[Updates, OptState]: ...


class GradientTransformation(NamedTuple):
    """``init`` and ``update``, pure. Compose them with :func:`ftrain.optim.chain`."""

    init: TransformInitFn
    update: TransformUpdateFn


@dataclasses.dataclass(frozen=True)
class Description:
    """What a transformation built by an :mod:`ftrain.optim` factory is, so that
    :func:`ftrain.optim.update_and_apply` can recognise it and run it as a fused kernel.

    Attributes:
        kind: the factory's name without its module (``"scale_by_adam"``, ``"chain"``, ...).
        hparams: the arguments the factory was called with (numbers, 0-d tensors, schedules, masks), read-only.
        children: the transformations it is built from (``chain``'s links, ``masked``'s inner one), in order.
    """

    kind: str
    hparams: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    children: tuple[GradientTransformation, ...] = ()


# Keyed by the ``update`` function (a closure unique to each transformation), weakly: a description lives as long
# as its transformation, and GradientTransformation keeps its two fields (``init, update = tx`` still works).
_DESCRIPTIONS: weakref.WeakKeyDictionary[Callable[..., Any], Description] = weakref.WeakKeyDictionary()


def describe(
    tx: GradientTransformation, kind: str, /, *, children: tuple[GradientTransformation, ...] = (), **hparams: Any
) -> GradientTransformation:
    """Records what ``tx`` is (see :class:`Description`) and returns ``tx``. Each factory in :mod:`ftrain.optim`
    calls it on what it returns; a transformation nobody described simply takes the generic route. Inside a
    compiled function nothing is recorded (the compiled step never takes the fused route).

    Example:
        >>> tx = describe(identity(), "identity")
        >>> description(tx).kind
        'identity'
    """
    if not torch.compiler.is_compiling():  # only the eager update_and_apply reads them; dynamo cannot trace weakrefs
        _DESCRIPTIONS[tx.update] = Description(kind, MappingProxyType(dict(hparams)), tuple(children))
    return tx


def description(tx: GradientTransformation) -> Description | None:
    """The :class:`Description` recorded for ``tx`` by :func:`describe`, or ``None``."""
    try:
        return _DESCRIPTIONS.get(tx.update)
    except TypeError:  # an update that cannot be weakly referenced was never described
        return None


class EmptyState(NamedTuple):
    """State of a stateless transformation."""


def identity() -> GradientTransformation:
    """Passes updates through unchanged."""

    def init(params):
        return EmptyState()

    def update(updates, state, params=None):
        return updates, state

    return describe(GradientTransformation(init, update), "identity")


def set_to_zero() -> GradientTransformation:
    """Replaces every update with zeros (used by :func:`ftrain.optim.freeze` and ``partition``)."""

    def init(params):
        return EmptyState()

    def update(updates, state, params=None):
        return _tree.tree_map(torch.zeros_like, updates), state

    return describe(GradientTransformation(init, update), "set_to_zero")


def check_float_params(params: Params, /, *, where: str) -> None:
    """Raises ``TypeError`` naming the key path of the first non-floating-point tensor leaf.

    Every transformation's ``init`` calls this: an optimizer over an integer tensor is always a mistake (an
    index buffer passed as a parameter, say), and it is caught when the optimizer is built, not at step 1.
    """
    paths, leaves, _ = _tree.tree_flatten_with_path(params)
    for path, leaf in zip(paths, leaves):
        if isinstance(leaf, torch.Tensor) and not (leaf.is_floating_point() or leaf.is_complex()):
            raise TypeError(
                f"{where}: parameter {_tree.keystr(path)} has dtype {leaf.dtype}; optimizers update floating-point "
                "tensors only. Keep integer tensors out of the params tree (as buffers), or mask them out "
                "with ftrain.optim.masked / freeze."
            )
