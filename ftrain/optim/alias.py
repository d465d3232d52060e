"""Ready-made optimizers, each a :func:`~ftrain.optim.combine.chain` of a few transformations.

Every alias takes ``learning_rate`` first (a Python number, a 0-d tensor or a schedule ``step -> 0-d tensor``)
and matches the ``torch.optim`` optimizer of the same name step for step (``lion`` follows Chen et al., 2023).

A Python ``0`` for ``momentum`` means no momentum buffer (as in torch); pass a 0-d tensor to keep a buffer
whose coefficient can change between steps.

Example:
    >>> import torch
    >>> from ftrain.optim.alias import sgd
    >>> from ftrain.optim.update import apply_updates
    >>> tx = sgd(0.1, momentum=0.9)
    >>> params = {"w": torch.ones(2)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": torch.ones(2)}, state, params)
    >>> apply_updates(params, updates)["w"]
    tensor([0.9000, 0.9000])
"""

from __future__ import annotations

from ftrain.optim.base import GradientTransformation, ScalarOrSchedule, identity
from ftrain.optim.combine import chain
from ftrain.optim.transform import (
    MaskOrFn,
    Numeric,
    _is_zero,
    add_decayed_weights,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_lion,
    scale_by_rms,
    trace,
)

__all__ = ["adagrad", "adam", "adamw", "lion", "rmsprop", "sgd"]


def adam(
    learning_rate: ScalarOrSchedule,
    b1: Numeric = 0.9,
    b2: Numeric = 0.999,
    eps: Numeric = 1e-8,
    *,
    eps_root: Numeric = 0.0,
    nesterov: bool = False,
) -> GradientTransformation:
    """Adam (``torch.optim.Adam`` without weight decay): :func:`scale_by_adam` then the learning rate.

    Args:
        learning_rate: number, 0-d tensor or schedule.
        b1, b2, eps, eps_root, nesterov: see :func:`~ftrain.optim.transform.scale_by_adam`.

    Returns:
        The optimizer.
    """
    return chain(
        scale_by_adam(b1, b2, eps, eps_root, nesterov=nesterov),
        scale_by_learning_rate(learning_rate),
    )


def adamw(
    learning_rate: ScalarOrSchedule,
    b1: Numeric = 0.9,
    b2: Numeric = 0.999,
    eps: Numeric = 1e-8,
    weight_decay: Numeric = 1e-4,
    *,
    mask: MaskOrFn = None,
    eps_root: Numeric = 0.0,
    nesterov: bool = False,
) -> GradientTransformation:
    """AdamW (``torch.optim.AdamW``): Adam's direction plus decoupled weight decay, times the learning rate.

    ``p -= lr * (adam_direction + weight_decay * p)``: torch's ``p *= 1 - lr * wd`` then the Adam step.

    Args:
        learning_rate: number, 0-d tensor or schedule.
        b1, b2, eps, eps_root, nesterov: see :func:`~ftrain.optim.transform.scale_by_adam`.
        weight_decay: the decoupled weight-decay coefficient.
        mask: which leaves are decayed (a tree of bools or a function of the params); all when ``None``.

    Returns:
        The optimizer.

    Example:
        >>> import torch
        >>> tx = adamw(1e-3, weight_decay=0.1, mask=lambda p: {k: v.ndim > 1 for k, v in p.items()})
        >>> state = tx.init({"w": torch.ones(2, 2), "b": torch.ones(2)})
        >>> int(state[0].count)
        0
    """
    return chain(
        scale_by_adam(b1, b2, eps, eps_root, nesterov=nesterov),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def _momentum(momentum: Numeric, *, nesterov: bool = False, dampening: Numeric = 0.0) -> GradientTransformation:
    if _is_zero(momentum):
        if nesterov:
            raise ValueError("nesterov=True needs a non-zero momentum (as torch.optim.SGD).")
        return identity()
    return trace(momentum, nesterov=nesterov, dampening=dampening)


def sgd(
    learning_rate: ScalarOrSchedule,
    momentum: Numeric = 0.0,
    *,
    nesterov: bool = False,
    dampening: Numeric = 0.0,
    weight_decay: Numeric = 0.0,
) -> GradientTransformation:
    """SGD with ``torch.optim.SGD`` semantics: ``g + wd * p`` (before momentum), then momentum, then ``-lr``.

    Args:
        learning_rate: number, 0-d tensor or schedule.
        momentum: momentum coefficient; a Python 0 keeps no buffer.
        nesterov: Nesterov momentum (needs momentum and no dampening).
        dampening: dampening of the gradient in the momentum buffer (not applied on the first step).
        weight_decay: L2 penalty added to the gradient.

    Returns:
        The optimizer.
    """
    return chain(
        add_decayed_weights(weight_decay),
        _momentum(momentum, nesterov=nesterov, dampening=dampening),
        scale_by_learning_rate(learning_rate),
    )


def adagrad(
    learning_rate: ScalarOrSchedule,
    lr_decay: Numeric = 0.0,
    weight_decay: Numeric = 0.0,
    initial_accumulator_value: Numeric = 0.0,
    eps: Numeric = 1e-10,
) -> GradientTransformation:
    """Adagrad with ``torch.optim.Adagrad`` semantics, ``lr_decay`` included.

    The ``t``-th step (from 1) moves ``p`` by ``-lr / (1 + (t-1) * lr_decay) * g / (sqrt(sum g**2) + eps)``,
    with ``g`` the gradient plus ``weight_decay * p``. The logged learning rate is ``learning_rate`` itself.

    Args:
        learning_rate: number, 0-d tensor or schedule.
        lr_decay: learning-rate decay per step.
        weight_decay: L2 penalty added to the gradient.
        initial_accumulator_value: starting sum of squares.
        eps: added after the square root.

    Returns:
        The optimizer.
    """
    return chain(
        add_decayed_weights(weight_decay),
        scale_by_adagrad(initial_accumulator_value, eps, lr_decay=lr_decay),
        scale_by_learning_rate(learning_rate),
    )


def rmsprop(
    learning_rate: ScalarOrSchedule,
    decay: Numeric = 0.99,
    eps: Numeric = 1e-8,
    weight_decay: Numeric = 0.0,
    momentum: Numeric = 0.0,
    centered: bool = False,
) -> GradientTransformation:
    """RMSprop with ``torch.optim.RMSprop`` semantics (``decay`` is torch's ``alpha``).

    ``g + wd * p`` -> divide by ``sqrt(nu) + eps`` (centered: ``sqrt(nu - mu**2) + eps``) -> momentum
    ``buf = momentum * buf + that`` -> ``-lr``.

    Args:
        learning_rate: number, 0-d tensor or schedule.
        decay: decay of the running mean of squared gradients.
        eps: added after the square root.
        weight_decay: L2 penalty added to the gradient.
        momentum: momentum coefficient; a Python 0 keeps no buffer.
        centered: normalize by an estimate of the gradient's variance.

    Returns:
        The optimizer.
    """
    return chain(
        add_decayed_weights(weight_decay),
        scale_by_rms(decay, eps, centered=centered),
        _momentum(momentum),
        scale_by_learning_rate(learning_rate),
    )


def lion(
    learning_rate: ScalarOrSchedule,
    b1: Numeric = 0.9,
    b2: Numeric = 0.99,
    weight_decay: Numeric = 0.0,
    *,
    mask: MaskOrFn = None,
) -> GradientTransformation:
    """Lion (Chen et al., 2023): ``p -= lr * (sign(b1 * m + (1 - b1) * g) + wd * p)``, then ``m`` decays.

    The momentum follows ``m = b2 * m + (1 - b2) * g``.

    Use a learning rate 3-10x smaller than AdamW's and a weight decay 3-10x larger (the paper's advice).

    Args:
        learning_rate: number, 0-d tensor or schedule.
        b1, b2: see :func:`~ftrain.optim.transform.scale_by_lion`.
        weight_decay: decoupled weight decay.
        mask: which leaves are decayed (a tree of bools or a function of the params); all when ``None``.

    Returns:
        The optimizer.
    """
    return chain(
        scale_by_lion(b1, b2),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )
