"""``update_and_apply``'s fused route against the generic one (``tx.update`` then ``apply_updates``).

The generic route is the reference: it is the one ``tests/optim/test_alias_vs_torch.py`` checks step by step against
``torch.optim``. Every case first asserts that the fused route is the one taken (``route_of``), so a case that
silently fell back to the generic route would fail rather than compare the generic route with itself.

Tolerances (tests/tolerances.py). The two routes compute the same mathematics in a different order: torch's kernels
fold ``lr`` into a step size, divide by ``sqrt(bias correction)`` instead of the moment, decay the parameter by
``1 - lr * wd`` before the step... Each route rounds its final ``p + update`` once (and AdamW's kernel its decay
multiply once more), so after ``STEPS`` steps the parameters may differ by ``STEPS · 4u · |p|`` from rounding the
parameter alone; what the update itself may differ by is the brief's claim: ``1e-6`` (float32) / ``1e-12``
(float64) of the update's size (the largest ``|Δp|`` of the leaf over the steps). Moments, recorded learning rates and
other float state are held to the same relative bound of their own size; counters are exact. Undonated inputs are
compared with clones of themselves, bitwise.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from tolerances import FLOAT64, UNIT_ROUNDOFF

from ftrain import optim, tree
from ftrain.optim.base import EmptyState, GradientTransformation
from ftrain.optim.fused import route_of, update_and_apply

SHAPES = {"layer.weight": (6, 4), "layer.bias": (4,), "emb": (3, 2, 5), "scale": ()}
STEPS = 3
CLAIM = {torch.float32: 1e-6, torch.float64: 1e-12}


def decay_mask(params):
    return {k: v.ndim > 1 for k, v in params.items()}


def warmup(count: torch.Tensor) -> torch.Tensor:
    """A schedule that changes every step (so a stale learning rate would show)."""
    return 0.02 * (count + 1) / (count + 3)


GROUPS = {"layer.weight": "decay", "layer.bias": "no_decay", "emb": "decay", "scale": "no_decay"}

# name -> (the optimizer, the route update_and_apply must take)
CASES: dict[str, tuple[Callable[[], GradientTransformation], str]] = {
    "adamw": (lambda: optim.adamw(1e-2, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1), "adamw"),
    "adamw_mask_schedule": (lambda: optim.adamw(warmup, weight_decay=0.1, mask=decay_mask), "adamw"),
    "adam": (lambda: optim.adam(1e-2, b1=0.85, b2=0.99), "adam"),
    "adam_l2": (
        lambda: optim.chain(optim.add_decayed_weights(0.05), optim.scale_by_adam(), optim.scale_by_learning_rate(1e-2)),
        "adam",
    ),
    "sgd": (lambda: optim.sgd(0.1), "sgd"),
    "sgd_momentum_decay": (lambda: optim.sgd(0.1, momentum=0.9, weight_decay=0.05), "sgd"),
    "sgd_nesterov": (lambda: optim.sgd(0.1, momentum=0.9, nesterov=True), "sgd"),
    "sgd_dampening": (lambda: optim.sgd(0.1, momentum=0.8, dampening=0.3), "sgd"),
    "adagrad": (
        lambda: optim.adagrad(0.1, lr_decay=0.01, weight_decay=0.02, initial_accumulator_value=0.1, eps=1e-9),
        "adagrad",
    ),
    "rmsprop": (lambda: optim.rmsprop(1e-2, decay=0.9), "rmsprop"),
    "rmsprop_centered_momentum": (
        lambda: optim.rmsprop(1e-2, centered=True, momentum=0.9, weight_decay=0.01),
        "rmsprop",
    ),
    "rmsprop_schedule": (lambda: optim.rmsprop(warmup, centered=True), "rmsprop"),
    "lion": (lambda: optim.lion(1e-3, weight_decay=0.1, mask=decay_mask), "lion"),
    "adafactor": (lambda: optim.adafactor(1e-2), "adafactor"),
    "adafactor_relative_beta1_decay": (
        lambda: optim.adafactor(
            None, relative_step=True, scale_parameter=True, beta1=0.9, weight_decay=0.1, mask=decay_mask
        ),
        "adafactor",
    ),
    "clip_adamw": (lambda: optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(1e-2)), "clip+adamw"),
    "clip_sgd_schedule": (
        lambda: optim.chain(optim.clip_by_global_norm(0.5), optim.sgd(warmup, momentum=0.9)),
        "clip+sgd",
    ),
    "inject_adamw": (
        lambda: optim.inject_hyperparams(optim.adamw)(learning_rate=warmup, weight_decay=0.1, mask=decay_mask),
        "inject_hyperparams(adamw)",
    ),
    "inject_sgd": (
        lambda: optim.inject_hyperparams(optim.sgd)(learning_rate=0.1, momentum=0.9, dampening=0.2),
        "inject_hyperparams(sgd)",
    ),
    "partition_decay_groups": (
        lambda: optim.chain(
            optim.clip_by_global_norm(0.5),
            optim.make_optimizer("rmsprop", 1e-2, weight_decay=0.1, decay_mask=decay_mask(init_params()), momentum=0.9),
        ),
        "clip+partition(decay: rmsprop, no_decay: rmsprop)",
    ),
    "partition_frozen_and_empty": (
        lambda: optim.partition(
            {"decay": optim.adagrad(0.1), "no_decay": optim.set_to_zero(), "unused": optim.lion(1e-3)}, GROUPS
        ),
        "partition(decay: adagrad, no_decay: set_to_zero, unused: empty)",
    ),
    "named_chain": (
        lambda: optim.named_chain(("clip", optim.clip_by_global_norm(1.0)), ("opt", optim.lion(1e-3))),
        "clip+lion",
    ),
}


def init_params(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for k, s in SHAPES.items()}


def grads_at(params: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + k)
    return {n: torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for n, p in params.items()}


def generic_step(tx, grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optim.apply_updates(params, updates), state


def clone_tree(x):
    return tree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, x)


def assert_bitwise(a, b) -> None:
    assert tree.tree_structure(a) == tree.tree_structure(b)
    for x, y in zip(tree.tree_leaves(a), tree.tree_leaves(b)):
        assert torch.equal(x, y)


def assert_states_close(fused, generic, rtol: float) -> None:
    """Same tree; integer leaves equal; float leaves within ``rtol`` of their own size."""
    assert tree.tree_structure(fused) == tree.tree_structure(generic)
    for x, y in zip(tree.tree_leaves(fused), tree.tree_leaves(generic)):
        assert x.dtype == y.dtype and x.shape == y.shape
        if not y.is_floating_point():
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=0, atol=rtol * float(y.abs().max()))


# Adam's (b1, b2) per case: the generic route's float32 bias correction is less exact than the kernels' (below).
ADAM_BETAS = {
    "adamw": (0.8, 0.95),
    "adam": (0.85, 0.99),
    **dict.fromkeys(["adamw_mask_schedule", "adam_l2", "clip_adamw", "inject_adamw"], (0.9, 0.999)),
}


def generic_bias_correction_rtol(name: str, dtype: torch.dtype) -> float:
    """The generic route's own error on Adam's update from its bias corrections ``1 - b**t``, which it computes in
    the parameters' dtype (torch's kernels, as ``torch.optim``, in double). Rounding ``b`` and ``b**t`` to the dtype
    moves ``b**t`` by up to ``(t+1)·u·b**t``, and the subtraction turns that into a relative error of
    ``(t+1)·u·b**t / (1 - b**t)`` (plus ``u`` for its own rounding): ``≈ 2000u`` for ``b2 = 0.999`` at ``t = 1``. The
    update divides by ``1 - b1**t`` and by the square root of ``1 - b2**t``: the first error plus half the second."""
    if name not in ADAM_BETAS:
        return 0.0
    u = UNIT_ROUNDOFF[dtype]
    rel = [[u + (t + 1) * u * b**t / (1 - b**t) for b in ADAM_BETAS[name]] for t in range(1, STEPS + 1)]
    return max(e1 + e2 / 2 for e1, e2 in rel)


def assert_params_close(fused, generic, start, moved, dtype, extra_rtol: float = 0.0) -> None:
    """``|fused - generic| <= (CLAIM + extra_rtol) · (the leaf's update size) + STEPS · 4u · |p|`` (module
    docstring; ``extra_rtol``: the generic route's own known error, :func:`generic_bias_correction_rtol`)."""
    for name, y in generic.items():
        p_size = torch.maximum(y.abs(), start[name].abs())
        bound = (CLAIM[dtype] + extra_rtol) * moved[name] + STEPS * 4 * UNIT_ROUNDOFF[dtype] * p_size
        assert bool(((fused[name] - y).abs() <= bound).all()), f"{name}: {float((fused[name] - y).abs().max())}"


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(CASES))
def test_fused_route_equals_generic(name: str, dtype: torch.dtype, donate: bool) -> None:
    make, route = CASES[name]
    tx = make()
    start = init_params(dtype)
    params, state = start, tx.init(start)
    f_params, f_state = clone_tree(start), tx.init(start)
    moved = {k: torch.zeros((), dtype=torch.float64) for k in start}
    for k in range(STEPS):
        grads = grads_at(params, k)
        assert route_of(tx, grads, f_state, f_params) == f"fused: {route}"
        before = (clone_tree(f_params), clone_tree(f_state), clone_tree(grads))
        new_params, new_state = update_and_apply(tx, grads, f_state, f_params, donate=donate)
        assert_bitwise(grads, before[2])  # never written
        if donate:  # the same objects, holding the new values
            assert new_params is f_params and new_state is f_state
        else:
            assert_bitwise((f_params, f_state), before[:2])
        next_params, state = generic_step(tx, grads, state, params)
        for n in start:
            moved[n] = torch.maximum(moved[n], (next_params[n] - params[n]).abs().max().double())
        params, f_params, f_state = next_params, new_params, new_state
        assert_states_close(f_state, state, CLAIM[dtype])
        assert_params_close(f_params, params, start, moved, dtype, generic_bias_correction_rtol(name, dtype))


def test_global_norm_given_is_used_for_the_clip() -> None:
    """The clip reads ``grad_norm`` when given (the step's metric) instead of computing it: with a norm twice the
    true one, the step is ``p - lr * g * 0.5 / (2 norm + 1e-6)`` (float64; a few roundings: ``FLOAT64``)."""
    tx = optim.chain(optim.clip_by_global_norm(0.5), optim.sgd(0.1))
    params = init_params(torch.float64)
    grads = grads_at(params, 0)
    norm = tree.tree_global_norm(grads)
    factor = 0.5 / (2 * float(norm) + 1e-6)
    assert factor < 0.5 / float(norm) < 1.0  # clipping is active, and the given norm makes a difference
    new, _ = update_and_apply(tx, grads, tx.init(params), params, grad_norm=2 * norm)
    for n in params:
        torch.testing.assert_close(new[n], params[n] - 0.1 * grads[n] * factor, **FLOAT64)


def test_donated_grads_are_scaled_in_place_by_the_clip() -> None:
    """``donate_grads=True`` lets the clip scale the caller's buffers (a train step's own): they hold the clipped
    gradients afterwards, and the step is the undonated one's."""
    tx = optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(1e-2))
    params = init_params(torch.float64)
    grads = grads_at(params, 0)
    expected, expected_state = update_and_apply(tx, clone_tree(grads), tx.init(params), params)
    new, state = update_and_apply(tx, grads, tx.init(params), params, donate_grads=True)
    assert_bitwise((new, state), (expected, expected_state))
    factor = 0.5 / (float(tree.tree_global_norm(grads_at(params, 0))) + 1e-6)
    torch.testing.assert_close(grads["emb"], grads_at(params, 0)["emb"] * factor, rtol=1e-15, atol=0)


def _undescribed_scale(factor: float) -> GradientTransformation:
    """A transformation written by a user: nothing recorded, so the chain is not recognised."""

    def update(updates, state, params=None):
        return tree.tree_map(lambda u: u * factor, updates), state

    return GradientTransformation(lambda params: EmptyState(), update)


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda: optim.chain(optim.scale_by_adam(), _undescribed_scale(-1e-2)), "is not a transformation"),
        (lambda: optim.adam(1e-2, nesterov=True), "nesterov"),
        (lambda: optim.chain(optim.scale_by_adam(), optim.scale(-1e-2)), "no fused kernel for the chain"),
        (lambda: optim.MultiSteps(optim.adamw(1e-2), 2).gradient_transformation(), "is not a transformation"),
    ],
    ids=["user_transform", "adam_nesterov", "scale_not_lr", "multisteps"],
)
@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_unrecognised_takes_the_generic_route_exactly(make, why: str, donate: bool) -> None:
    tx = make()
    params = init_params(torch.float32)
    state, f_params, f_state = tx.init(params), clone_tree(params), tx.init(params)
    for k in range(2):
        grads = grads_at(params, k)
        assert route_of(tx, grads, f_state, f_params).startswith("generic: ") and why in route_of(
            tx, grads, f_state, f_params
        )
        params, state = generic_step(tx, grads, state, params)
        f_params, f_state = update_and_apply(tx, grads, f_state, f_params, donate=donate)
        assert_bitwise((f_params, f_state), (params, state))


def test_other_dtypes_take_the_generic_route() -> None:
    """bfloat16 (and leaves on several dtypes the kernels do not take) keep the generic route's numbers."""
    tx = optim.adamw(1e-2)
    params = {k: v.bfloat16() for k, v in init_params().items()}
    grads = grads_at(params, 0)
    assert route_of(tx, grads, tx.init(params), params).startswith("generic: a leaf is torch.bfloat16")
    assert_bitwise(
        update_and_apply(tx, grads, tx.init(params), params), generic_step(tx, grads, tx.init(params), params)
    )


def test_trainer_default_optimizer_takes_the_fused_route(tmp_path, monkeypatch) -> None:
    """The Trainer's default (adamw_torch, linear schedule, clip 1.0, two decay groups when decay is on): its eager
    steps run the fused plan; the generic route is made to fail so that a fallback cannot pass unnoticed."""
    pytest.importorskip("transformers")
    pytest.importorskip("datasets")
    from ftrain.optim import fused
    from tests.trainer.test_trainer import make

    ran = []
    prepare = fused._prepare

    def spy(*args, **kwargs):
        plan, env = prepare(*args, **kwargs)
        ran.append(plan.name)
        return plan, env

    def no_generic(*args, **kwargs):
        raise AssertionError("the generic route ran")

    monkeypatch.setattr(fused, "_prepare", spy)
    monkeypatch.setattr(fused, "_generic", no_generic)
    make(tmp_path, max_steps=2).train()
    make(tmp_path, "decayed", max_steps=2, weight_decay=0.01).train()
    assert ran == ["clip+adam"] * 2 + ["clip+adamw"] * 2
