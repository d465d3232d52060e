"""``TrainState``: everything that changes during training, as one immutable pytree.

Leaves: ``step`` (0-d int64, CPU), ``params`` (trainable tensors by ``named_parameters`` name), ``buffers``
(buffers and frozen parameters), ``opt_state`` (the optimizer's state tree) and ``key`` (an
:mod:`ftrain.random` key, CPU). Static: the model ``skeleton`` (meta device) and the gradient transformation
``tx``. The state is registered with optree (namespace ``"ftrain"``) and with ``torch.utils._pytree``, so
``ftrain.tree.tree_map``, ``optree.tree_map(..., namespace="ftrain")`` and torch.func all see its leaves.

``step`` and ``key`` stay on the CPU: the host reads them to seed each step's RNG without a device sync.

Example:
    >>> import torch
    >>> from ftrain import TrainState, optim, random
    >>> state = TrainState.create(torch.nn.Linear(2, 1), optim.sgd(0.1), key=random.key(0))
    >>> int(state.step), sorted(state.params)
    (0, ['bias', 'weight'])
    >>> grads = {k: torch.ones_like(v) for k, v in state.params.items()}
    >>> new = state.apply_gradients(grads)
    >>> int(new.step), round(float(new.params["bias"][0] - state.params["bias"][0]), 6)
    (1, -0.1)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import optree
import torch
import torch.utils._pytree as torch_pytree
from torch import nn

from ftrain import random as _random
from ftrain import tree as _tree
from ftrain.module import load_into_module, materialize, split_module
from ftrain.optim.base import GradientTransformation

__all__ = ["Donated", "TrainState"]

_LEAF_FIELDS = ("step", "params", "buffers", "opt_state", "key")
_STATIC_FIELDS = ("skeleton", "tx")


class Donated:
    """Stands in for every field of a donated state; any use raises with the fix."""

    __slots__ = ("field", "step")

    def __init__(self, field: str, step: int | torch.Tensor):
        self.field = field
        self.step = step

    def _fail(self, *args: Any, **kwargs: Any):
        raise RuntimeError(
            f"this TrainState was donated to a step at step {int(self.step)}: its tensors now hold the next "
            f"state, so state.{self.field} is gone. Use the state the step returned "
            "(state, metrics = step(state, batch)), or build the step without donate=True."
        )

    __getitem__ = __iter__ = __len__ = __getattr__ = __call__ = __bool__ = __float__ = __int__ = _fail
    keys = values = items = _fail

    def __repr__(self) -> str:
        return f"<donated {self.field}>"


def mark_donated(state: TrainState, step: int | torch.Tensor) -> None:
    """Kills ``state`` after a step reused its tensors (``jit(..., donate=True)``): every leaf field becomes a
    :class:`Donated`, so any later use raises with the fix. ``step`` is the step it was donated at."""
    for name in _LEAF_FIELDS:
        object.__setattr__(state, name, Donated(name, step))


@dataclasses.dataclass(frozen=True, eq=False)
class TrainState:
    """The whole training state. Build it with :meth:`create`; change it with :meth:`replace` or
    :meth:`apply_gradients`, which return new states."""

    step: torch.Tensor
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    opt_state: Any
    key: torch.Tensor
    skeleton: nn.Module | None = None
    tx: GradientTransformation | None = None

    @classmethod
    def create(
        cls,
        model: nn.Module,
        tx: GradientTransformation,
        *,
        key: torch.Tensor | int,
        copy: bool = False,
    ) -> TrainState:
        """A state at step 0 from a module and a gradient transformation.

        Args:
            model: any module; its trainable parameters become ``params``, its buffers and frozen parameters
                ``buffers``. The module itself is left as it is.
            tx: the optimizer, e.g. ``ftrain.optim.adamw(3e-4)``; ``tx.init(params)`` builds ``opt_state``.
            key: an :func:`ftrain.random.key`, or an int seed.
            copy: clone the tensors instead of sharing the module's storage. Sharing is the default (no extra
                memory); a donated step (``ftrain.jit(..., donate=True)``) then also updates the module in place.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"TrainState.create: model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(tx, GradientTransformation):
            raise TypeError(
                "TrainState.create: tx must be an ftrain.optim.GradientTransformation (e.g. ftrain.optim.adamw("
                f"3e-4)), got {type(tx).__name__}. torch.optim optimizers are stateful; ftrain's are pure."
            )
        skeleton, params, buffers = split_module(model)
        if copy:
            params = {k: v.clone() for k, v in params.items()}
            buffers = {k: v.clone() for k, v in buffers.items()}
        if isinstance(key, int):
            key = _random.key(key)
        elif not _random.is_key(key):
            raise TypeError("TrainState.create: key must be an int seed or ftrain.random.key(seed)")
        return cls(
            step=torch.zeros((), dtype=torch.int64),
            params=params,
            buffers=buffers,
            opt_state=tx.init(params),
            key=key,
            skeleton=skeleton,
            tx=tx,
        )

    def replace(self, **changes: Any) -> TrainState:
        """A copy with some fields replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def apply_gradients(self, grads: dict[str, torch.Tensor]) -> TrainState:
        """One optimizer update: ``tx.update`` then ``apply_updates``; ``step`` + 1. Pure.

        Raises:
            ValueError: ``grads`` does not have the tree structure of ``params`` (names the key paths).
        """
        from ftrain.optim.update import apply_updates

        if self.tx is None:
            raise ValueError("apply_gradients: this state has no tx; build it with TrainState.create(model, tx)")
        _tree.tree_check_same_structure(self.params, grads, names=("state.params", "grads"))
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        return self.replace(step=self.step + 1, params=apply_updates(self.params, updates), opt_state=opt_state)

    @property
    def device(self) -> torch.device:
        """Device of the parameters (CPU when there are none)."""
        for leaf in self.params.values():
            return leaf.device
        return torch.device("cpu")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Params and buffers in one dict keyed like ``model.state_dict()`` (tied weights listed once)."""
        return {**self.params, **self.buffers}

    def load_into(self, module: nn.Module) -> nn.Module:
        """Copies params and buffers into ``module`` in place (same architecture) and returns it."""
        load_into_module(module, self.params, self.buffers)
        return module

    def to_module(self) -> nn.Module:
        """A new real module with this state's weights (for export, ``save_pretrained``, ``generate``)."""
        if self.skeleton is None:
            raise ValueError("to_module: this state has no skeleton; use load_into(module) instead")
        return materialize(self.skeleton, self.params, self.buffers)

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.params.values())
        return (
            f"TrainState(step={int(self.step)}, params={len(self.params)} tensors / {n:,} values, "
            f"buffers={len(self.buffers)}, skeleton={type(self.skeleton).__name__})"
        )


def _flatten(state: TrainState):
    return tuple(getattr(state, f) for f in _LEAF_FIELDS), (state.skeleton, state.tx), _LEAF_FIELDS


def _unflatten(static, children) -> TrainState:
    return TrainState(*children, *static)


optree.register_pytree_node(
    TrainState,
    _flatten,
    _unflatten,
    path_entry_type=optree.GetAttrEntry,
    namespace=_tree.NAMESPACE,
)


def _torch_flatten(state: TrainState):
    return [getattr(state, f) for f in _LEAF_FIELDS], (state.skeleton, state.tx)


def _torch_unflatten(children, context) -> TrainState:
    return TrainState(*children, *context)


def _torch_flatten_with_keys(state: TrainState):
    return [(torch_pytree.GetAttrKey(f), getattr(state, f)) for f in _LEAF_FIELDS], (state.skeleton, state.tx)


torch_pytree.register_pytree_node(
    TrainState,
    _torch_flatten,
    _torch_unflatten,
    serialized_type_name="ftrain.state.TrainState",
    flatten_with_keys_fn=_torch_flatten_with_keys,
)
