"""Transforms and combinators, each checked against numbers worked out by hand or by torch.

Most hand-worked values are small dyadic rationals (1.5, 0.25, 30.0): every float32 operation on them is exact, on
any CPU, so they are compared exactly. Where a float32 value is not exact (0.1, 1.9) the tolerance is ``gamma(n)``
for the ``n`` roundings between the two sides (tests/tolerances.py), stated next to it; Adam's values are checked in
float64 with ``FLOAT64`` (in float32 its bias correction ``1 - 0.999`` cancels 10 bits of the rounded ``b2``).
"""

from __future__ import annotations

import pytest
import torch
from tolerances import FLOAT64, gamma, reduction_rtol

from ftrain import tree
from ftrain.optim.alias import adamw, sgd
from ftrain.optim.base import EmptyState, identity
from ftrain.optim.combine import MaskedState, PartitionState, chain, freeze, masked, named_chain, partition
from ftrain.optim.transform import (
    ScaleByAdamState,
    ScaleByLearningRateState,
    TraceState,
    add_decayed_weights,
    clip_by_global_norm,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_lion,
    scale_by_schedule,
    trace,
)
from ftrain.optim.update import apply_updates, apply_updates_


def t(*values: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def params3() -> dict[str, torch.Tensor]:
    return {"w": t(1.0, 2.0), "b": t(3.0), "norm": t(-4.0)}


def ones3() -> dict[str, torch.Tensor]:
    return {"w": t(1.0, 1.0), "b": t(1.0), "norm": t(1.0)}


def assert_tree_equal(actual, expected, rtol: float = 0.0) -> None:
    """Exact unless a relative tolerance is passed (see the module docstring)."""
    assert actual.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], rtol=rtol, atol=0.0, msg=lambda m, k=k: f"{k}: {m}")


# ------------------------------------------------------------------------------------------------------------
# add_decayed_weights, scale, clip_by_global_norm


@pytest.mark.parametrize(
    "mask",
    [
        {"w": True, "b": False, "norm": False},
        lambda p: {k: k == "w" for k in p},
    ],
    ids=["tree", "callable"],
)
def test_add_decayed_weights_mask(mask) -> None:
    tx = add_decayed_weights(0.5, mask)
    params = params3()
    out, _ = tx.update(ones3(), tx.init(params), params)
    assert_tree_equal(out, {"w": t(1.5, 2.0), "b": t(1.0), "norm": t(1.0)})


def test_add_decayed_weights_tensor_value_and_no_mask() -> None:
    tx = add_decayed_weights(torch.tensor(0.25))
    params = params3()
    out, _ = tx.update(ones3(), tx.init(params), params)
    assert_tree_equal(out, {"w": t(1.25, 1.5), "b": t(1.75), "norm": t(0.0)})


def test_add_decayed_weights_errors() -> None:
    params = params3()
    tx = add_decayed_weights(0.1, {"w": True, "b": False})
    with pytest.raises(ValueError, match=r"in params only: \['norm'\]"):
        tx.update(ones3(), tx.init(params), params)
    tx = add_decayed_weights(0.1, {"w": torch.tensor(True), "b": False, "norm": False})
    with pytest.raises(TypeError, match="Python bools"):
        tx.update(ones3(), tx.init(params), params)
    with pytest.raises(ValueError, match="needs params"):
        add_decayed_weights(0.1).update(ones3(), EmptyState())


def test_scale() -> None:
    out, state = scale(-3.0).update(ones3(), EmptyState())
    assert_tree_equal(out, {"w": t(-3.0, -3.0), "b": t(-3.0), "norm": t(-3.0)})
    assert state == EmptyState()


@pytest.mark.parametrize("max_norm", [0.5, 100.0, torch.tensor(0.5)], ids=["clips", "no-op", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clip_by_global_norm_matches_torch(max_norm, dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    grads = {
        "a": torch.randn(3, 4, generator=gen, dtype=dtype),
        "b": torch.randn(5, generator=gen, dtype=dtype),
    }
    tensors = [torch.zeros_like(g) for g in grads.values()]
    for p, g in zip(tensors, grads.values()):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(tensors, float(max_norm))
    out, _ = clip_by_global_norm(max_norm).update(grads, EmptyState())
    # In each dtype (the clip must keep it): both sides sum the n = 17 squares in their own order (foreach norms, then
    # the norm of the norms) and round <= 8 more times each (the squares, two sqrts, + 1e-6, the division, the
    # clamp, the product): reduction_rtol(n + 8) = 3.0e-6 in float32, 5.5e-15 in float64. Positive terms, so the
    # bound is relative to the norm; a norm that misses a tensor or a wrong factor is off by > 1e-2.
    n = sum(g.numel() for g in grads.values())
    rtol = reduction_rtol(n + 8, dtype)
    for got, p in zip(out.values(), tensors):
        torch.testing.assert_close(got, p.grad, rtol=rtol, atol=0.0)
        assert got.dtype == dtype
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in out.values()]))
    if float(max_norm) < 1.0:
        # max_norm · N / (N + 1e-6), N the norm before clipping; the same rounding bound (N's own rounding moves
        # this by 1e-6 / N² of it, nothing)
        before = float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads.values()])))
        expected = torch.tensor(float(max_norm) * before / (before + 1e-6), dtype=dtype)
        torch.testing.assert_close(norm, expected, rtol=reduction_rtol(n + 8, dtype), atol=0.0)


# ------------------------------------------------------------------------------------------------------------
# Learning rate, schedule, trace, adam, lion


def test_scale_by_learning_rate_state_tracks_the_schedule() -> None:
    tx = scale_by_learning_rate(lambda step: 0.1 * (step.to(torch.float32) + 1.0))
    params = {"w": torch.zeros(2)}
    state = tx.init(params)
    assert isinstance(state, ScaleByLearningRateState)
    assert int(state.count) == 0 and state.count.dtype == torch.int64
    torch.testing.assert_close(state.learning_rate, torch.tensor(0.1), rtol=0.0, atol=0.0)  # 0.1f · 1, exact
    expected = []
    for _ in range(3):
        out, state = tx.update({"w": torch.ones(2)}, state)
        expected.append(float(out["w"][0]))
    # 0.1f · k against float32(0.1 · k): 0.1 rounded, the product rounded, the literal rounded: gamma(3)
    torch.testing.assert_close(torch.tensor(expected), torch.tensor([-0.1, -0.2, -0.3]), rtol=gamma(3), atol=0.0)
    torch.testing.assert_close(state.learning_rate, torch.tensor(0.3), rtol=gamma(3), atol=0.0)
    assert int(state.count) == 3


def test_scale_by_learning_rate_ascends_without_flip() -> None:
    tx = scale_by_learning_rate(0.5, flip_sign=False)
    out, state = tx.update({"w": t(2.0)}, tx.init({"w": t(0.0)}))
    assert_tree_equal(out, {"w": t(1.0)})
    assert torch.equal(state.learning_rate, torch.tensor(0.5))  # exact


def test_scale_by_schedule() -> None:
    tx = scale_by_schedule(lambda step: 0.5**step)
    state = tx.init({"w": t(0.0)})
    seen = []
    for _ in range(3):
        out, state = tx.update({"w": t(4.0)}, state)
        seen.append(float(out["w"]))
    assert seen == [4.0, 2.0, 1.0]


def test_trace_first_step_is_not_dampened() -> None:
    tx = trace(0.5, dampening=0.5)
    state = tx.init({"w": t(0.0)})
    bufs = []
    for g in (2.0, 2.0, 4.0):
        out, state = tx.update({"w": t(g)}, state)
        bufs.append(float(out["w"]))
    # buf = 2; 0.5*2 + 0.5*2 = 2; 0.5*2 + 0.5*4 = 3
    assert bufs == [2.0, 2.0, 3.0]
    assert isinstance(state, TraceState) and int(state.count) == 3


def test_trace_nesterov() -> None:
    tx = trace(0.9, nesterov=True)
    state = tx.init({"w": t(0.0)})
    out, state = tx.update({"w": t(1.0)}, state)
    # g + 0.9 * buf, buf = g: 0.9 rounded, the sum rounded, the literal rounded: gamma(3)
    torch.testing.assert_close(out["w"], t(1.9), rtol=gamma(3), atol=0.0)
    out, state = tx.update({"w": t(1.0)}, state)
    # buf = 1 + 0.9 (0.9 and the sum rounded), then 1 + 0.9 · buf (product, sum), the literal: <= 6 roundings
    torch.testing.assert_close(out["w"], t(1.0 + 0.9 * 1.9), rtol=gamma(6), atol=0.0)


def test_scale_by_adam_first_step_and_eps_root() -> None:
    # float64, FLOAT64: in float32 the bias correction 1 - 0.999 cancels 10 bits of the rounded b2 (6e-6 seen)
    f64 = torch.float64
    tx = scale_by_adam(eps=0.0, eps_root=1.0)
    state = tx.init({"w": t(0.0, 0.0, dtype=f64)})
    out, state = tx.update({"w": t(3.0, -1.0, dtype=f64)}, state)
    # mu_hat = g, nu_hat = g**2: g / sqrt(g**2 + 1)
    torch.testing.assert_close(out["w"], t(3.0 / 10**0.5, -1.0 / 2**0.5, dtype=f64), **FLOAT64)
    assert isinstance(state, ScaleByAdamState)
    torch.testing.assert_close(state.mu["w"], t(0.3, -0.1, dtype=f64), **FLOAT64)


def test_scale_by_lion_updates_momentum() -> None:
    tx = scale_by_lion(b1=0.5, b2=0.75)
    state = tx.init({"w": t(0.0, 0.0)})
    out, state = tx.update({"w": t(4.0, -8.0)}, state)
    assert_tree_equal(out, {"w": t(1.0, -1.0)})
    assert torch.equal(state.mu["w"], t(1.0, -2.0))  # 0.25 · g: exact
    out, state = tx.update({"w": t(-1.5, 1.0)}, state)
    # sign(0.5 * 1 + 0.5 * -1.5) = -1, sign(0.5 * -2 + 0.5 * 1) = -1
    assert_tree_equal(out, {"w": t(-1.0, -1.0)})


# ------------------------------------------------------------------------------------------------------------
# Combinators


def test_chain_applies_in_order() -> None:
    params = {"w": t(2.0)}
    decay_then_scale = chain(add_decayed_weights(1.0), scale(10.0))
    scale_then_decay = chain(scale(10.0), add_decayed_weights(1.0))
    out1, state = decay_then_scale.update({"w": t(1.0)}, decay_then_scale.init(params), params)
    out2, _ = scale_then_decay.update({"w": t(1.0)}, scale_then_decay.init(params), params)
    assert_tree_equal(out1, {"w": t(30.0)})
    assert_tree_equal(out2, {"w": t(12.0)})
    assert state == (EmptyState(), EmptyState())
    with pytest.raises(ValueError, match="state of 1 entries for 2"):
        decay_then_scale.update({"w": t(1.0)}, (EmptyState(),), params)


def test_named_chain_matches_chain_and_names_its_state() -> None:
    params = params3()
    named = named_chain(("adam", scale_by_adam()), ("wd", add_decayed_weights(0.1)), ("lr", scale(-0.01)))
    plain = chain(scale_by_adam(), add_decayed_weights(0.1), scale(-0.01))
    s_named, s_plain = named.init(params), plain.init(params)
    assert list(s_named) == ["adam", "wd", "lr"]
    for _ in range(2):
        out_named, s_named = named.update(ones3(), s_named, params)
        out_plain, s_plain = plain.update(ones3(), s_plain, params)
    assert_tree_equal(out_named, out_plain)
    assert int(s_named["adam"].count) == 2
    with pytest.raises(ValueError, match=r"repeated: \['a'\]"):
        named_chain(("a", identity()), ("a", identity()))


def test_masked_passes_hidden_leaves_through_and_hides_them_from_inner() -> None:
    params = {k: v.double() for k, v in params3().items()}
    tx = masked(chain(scale_by_adam(), scale(-1.0)), {"w": True, "b": False, "norm": True})
    state = tx.init(params)
    assert isinstance(state, MaskedState)
    assert state.inner_state[0].mu["b"] is None and state.inner_state[0].mu["w"] is not None
    grads = {k: t(*v, dtype=torch.float64) for k, v in {"w": (2.0, -2.0), "b": (5.0,), "norm": (0.5,)}.items()}
    out, state = tx.update(grads, state, params)
    # Adam's first step is -g / (|g| + eps): float64, FLOAT64 (float32 would add the bias corrections' cancellation)
    for k in ("w", "norm"):
        torch.testing.assert_close(out[k], -grads[k] / (grads[k].abs() + 1e-8), **FLOAT64)
    assert out["b"] is grads["b"]


def test_masked_inner_sees_masked_params() -> None:
    params = params3()
    tx = masked(add_decayed_weights(1.0), lambda p: {k: k != "norm" for k in p})
    out, _ = tx.update(ones3(), tx.init(params), params)
    assert_tree_equal(out, {"w": t(2.0, 3.0), "b": t(4.0), "norm": t(1.0)})


def test_freeze_leaves_frozen_params_unchanged() -> None:
    params = params3()
    tx = chain(freeze({"w": False, "b": True, "norm": False}), sgd(0.5))
    updates, _ = tx.update(ones3(), tx.init(params), params)
    new = apply_updates(params, updates)
    assert_tree_equal(new, {"w": t(0.5, 1.5), "b": t(3.0), "norm": t(-4.5)})


def test_freeze_hides_integer_leaves_from_the_optimizer() -> None:
    params = {"w": t(1.0), "step": torch.tensor([3])}
    with pytest.raises(TypeError, match=r"\['step'\]"):
        adamw(0.1).init(params)
    tx = masked(adamw(0.1), {"w": True, "step": False})
    state = tx.init(params)
    assert state.inner_state[0].mu == {"w": torch.zeros(1), "step": None}


def test_partition_gives_each_label_its_transform() -> None:
    params = params3()
    labels = {"w": "decay", "b": "plain", "norm": "plain"}
    tx = partition({"decay": sgd(0.1, weight_decay=1.0), "plain": sgd(1.0, momentum=0.5)}, labels)
    state = tx.init(params)
    assert isinstance(state, PartitionState) and set(state.inner_states) == {"decay", "plain"}
    assert state.inner_states["plain"][1].trace["w"] is None
    for _ in range(2):
        updates, state = tx.update(ones3(), state, params)
        params = apply_updates(params, updates)
    # decay: p -= 0.1 * (1 + p) twice.  plain: buf 1 then 1.5; p -= 1, then 1.5.
    w = t(1.0, 2.0)
    for _ in range(2):
        w = w - 0.1 * (1 + w)
    assert_tree_equal(params, {"w": w, "b": t(0.5), "norm": t(-6.5)})


def test_partition_callable_labels_and_unknown_label() -> None:
    params = params3()
    tx = partition({"a": scale(2.0), "b": scale(0.0)}, lambda p: {k: "a" if k == "w" else "b" for k in p})
    out, _ = tx.update(ones3(), tx.init(params), params)
    assert_tree_equal(out, {"w": t(2.0, 2.0), "b": t(0.0), "norm": t(0.0)})
    bad = partition({"a": scale(2.0)}, {"w": "a", "b": "a", "norm": "zzz"})
    with pytest.raises(ValueError, match=r"\['norm'\] has label 'zzz'.*are \['a'\]"):
        bad.init(params)


def test_empty_params() -> None:
    tx = adamw(1e-3)
    state = tx.init({})
    updates, state = tx.update({}, state, {})
    assert updates == {} and int(state[0].count) == 1


# ------------------------------------------------------------------------------------------------------------
# apply_updates


def test_apply_updates_is_pure_keeps_dtype_and_skips_none() -> None:
    params = {"w": torch.ones(2, dtype=torch.bfloat16), "b": t(1.0), "frozen": t(7.0)}
    updates = {"w": t(0.5, -0.25), "b": t(2.0), "frozen": None}
    new = apply_updates(params, updates)
    assert new["w"].dtype == torch.bfloat16
    assert_tree_equal(new, {"w": torch.tensor([1.5, 0.75], dtype=torch.bfloat16), "b": t(3.0), "frozen": t(7.0)})
    assert new["frozen"] is params["frozen"]
    assert torch.equal(params["w"], torch.ones(2, dtype=torch.bfloat16)) and float(params["b"]) == 1.0


def test_apply_updates_in_place() -> None:
    params = {"w": torch.ones(2, requires_grad=True), "b": t(1.0)}
    w = params["w"]
    out = apply_updates_(params, {"w": t(1.0, 2.0), "b": None})
    assert out is params and out["w"] is w
    assert torch.equal(w.detach(), t(2.0, 3.0)) and float(params["b"]) == 1.0


def test_apply_updates_structure_mismatch_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"in params only: \['b'\]"):
        apply_updates({"w": t(1.0), "b": t(1.0)}, {"w": t(1.0)})


def test_state_structure_mismatch_teaches() -> None:
    tx = scale_by_adam()
    state = tx.init({"w": t(1.0)})
    with pytest.raises(ValueError, match="call init on the same params tree"):
        tx.update({"w": t(1.0), "b": t(1.0)}, state)


def test_hyperparameter_range_checked_when_built() -> None:
    with pytest.raises(ValueError, match=r"b1=1.5"):
        scale_by_adam(b1=1.5)
    assert tree.tree_leaves(scale_by_adam(b1=torch.tensor(0.9)).init({"w": t(1.0)}))[0].dtype == torch.int64


def test_callable_mask_inside_partition_sees_none_at_hidden_leaves() -> None:
    params = {"w": torch.ones(2, 2), "b": t(1.0), "emb": torch.ones(1, 1)}
    seen = []

    def decay_matrices(p):
        seen.append(sorted(k for k, v in p.items() if v is not None))
        return tree.tree_map(lambda v: v.ndim > 1, p)  # keeps None where partition hid a leaf

    inner = chain(add_decayed_weights(0.5, decay_matrices), scale(-1.0))
    tx = partition({"main": inner, "frozen": scale(0.0)}, {"w": "main", "b": "main", "emb": "frozen"})
    grads = {"w": torch.zeros(2, 2), "b": t(0.0), "emb": torch.ones(1, 1)}
    out, _ = tx.update(grads, tx.init(params), params)
    assert seen == [["b", "w"]]
    assert_tree_equal(out, {"w": torch.full((2, 2), -0.5), "b": t(-0.0), "emb": torch.zeros(1, 1)})
