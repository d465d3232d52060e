"""Optax-shaped gradient transformations (filled in by the optim modules)."""

from ftrain.optim.base import (  # noqa: F401
    EmptyState,
    GradientTransformation,
    check_float_params,
    identity,
    set_to_zero,
)
