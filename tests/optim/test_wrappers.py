"""inject_hyperparams / set_hyperparam / find_hyperparam, MultiSteps and apply_if_finite.

References are ``torch.optim`` optimizers (independent code) or the wrapped optimizer rebuilt by hand.

Every equivalence is a mathematical claim checked in float64 (tests/tolerances.py). The gradients are O(1) noise,
never rounding noise (which Adam's normalisation would amplify), so two float64 computations of the same steps in
another order differ by a few roundings per step, relative to the O(1) params: the rtol=1e-12 used below is ~10**4
unit roundoffs (measured <= 6e-16), while a real difference (a step of lr, a missing decay) is > 1e-4 relative.
Params are randn (none near 0), so no atol is needed for them.
"""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import FLOAT64, UNIT_ROUNDOFF, gamma

from ftrain import tree
from ftrain.optim.alias import adamw, sgd
from ftrain.optim.combine import chain, named_chain
from ftrain.optim.factorized import adafactor
from ftrain.optim.transform import scale_by_learning_rate
from ftrain.optim.wrappers import (
    ApplyIfFiniteState,
    InjectHyperparamsState,
    MultiSteps,
    MultiStepsState,
    apply_if_finite,
    find_hyperparam,
    inject_hyperparams,
    set_hyperparam,
)

SHAPES = {"w": (4, 3), "b": (3,)}


def _params(dtype=torch.float64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in SHAPES.items()}


def _grads(params, step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return {k: p * 0.5 + torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}


def _apply(params, updates):
    return tree.tree_map(torch.add, params, updates)


def _torch_run(opt_cls, params, grads_per_step, lr_lambda=None, **kw):
    """Runs a ``torch.optim`` optimizer; ``grads_per_step(params_dict, step)`` gives each step's gradients."""
    tp = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = opt_cls(list(tp.values()), **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) if lr_lambda else None
    step = 0
    while True:
        grads = grads_per_step({k: v.detach().clone() for k, v in tp.items()}, step)
        if grads is None:
            return {k: v.detach() for k, v in tp.items()}
        for k, p in tp.items():
            p.grad = grads[k]
        opt.step()
        if sched:
            sched.step()
        step += 1


def _sched(count: torch.Tensor) -> torch.Tensor:
    return 1e-2 * 0.9 ** count.to(torch.float64)


# ------------------------------------------------------------------------------------------------------------
# inject_hyperparams


def test_inject_schedule_equals_rebuilt_optimizer_and_torch_adamw():
    params0 = _params()
    tx = inject_hyperparams(adamw)(learning_rate=_sched, weight_decay=0.1, mask={"w": True, "b": False})
    state = tx.init(params0)
    assert isinstance(state, InjectHyperparamsState)
    assert set(state.hyperparams) == {"learning_rate", "b1", "b2", "eps", "weight_decay", "eps_root"}
    # exact: Python floats stored in float64 unchanged; schedule(0) = 1e-2 · 0.9**0 = 1e-2
    assert state.hyperparams["b1"].dtype == torch.float64 and float(state.hyperparams["b1"]) == 0.9
    assert float(state.hyperparams["learning_rate"]) == 1e-2  # schedule(0), stored at init

    ref_state = adamw(1e-2, weight_decay=0.1, mask={"w": True, "b": False}).init(params0)
    params, ref_params = params0, params0
    for step in range(6):
        updates, state = tx.update(_grads(params, step), state, params)
        lr_k = 1e-2 * 0.9**step
        ref_updates, ref_state = adamw(lr_k, weight_decay=0.1, mask={"w": True, "b": False}).update(
            _grads(ref_params, step), ref_state, ref_params
        )
        for k in SHAPES:
            # not bit-equal: the tensor-lr path multiplies then adds where a Python lr fuses (alpha=). FLOAT64, not
            # an rtol alone: an update element near 0 (Adam's m near cancelling) has no relative accuracy.
            torch.testing.assert_close(updates[k], ref_updates[k], **FLOAT64)
        params, ref_params = _apply(params, updates), _apply(ref_params, ref_updates)
        # 0.9**count in torch and in Python, times 1e-2: <= 3 roundings (3.3e-16); rel=1e-15
        assert float(state.hyperparams["learning_rate"]) == pytest.approx(lr_k, rel=1e-15)
        assert find_hyperparam(state, "learning_rate") is state.hyperparams["learning_rate"]
    assert int(state.count) == 6

    # independently: torch.optim.AdamW with a LambdaLR and the HF-style two param groups
    tp = {k: torch.nn.Parameter(v.clone()) for k, v in params0.items()}
    opt = torch.optim.AdamW(
        [{"params": [tp["w"]], "weight_decay": 0.1}, {"params": [tp["b"]], "weight_decay": 0.0}], lr=1e-2
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s)
    for step in range(6):
        grads = _grads({k: v.detach() for k, v in tp.items()}, step)
        for k in SHAPES:
            tp[k].grad = grads[k]
        opt.step()
        sched.step()
    for k in SHAPES:
        torch.testing.assert_close(params[k], tp[k].detach(), rtol=1e-12, atol=0.0)  # see the module docstring


def test_dtype_rule_and_static_args():
    tx = inject_hyperparams(sgd)(0.1, momentum=torch.tensor(0.9, dtype=torch.float64), nesterov=True)
    state32 = tx.init({"w": torch.zeros(2)})
    assert {k: v.dtype for k, v in state32.hyperparams.items()} == {
        "learning_rate": torch.float32,
        "momentum": torch.float32,  # a float64 tensor is cast to the rule's dtype
        "dampening": torch.float32,
        "weight_decay": torch.float32,
    }
    state64 = tx.init({"w": torch.zeros(2), "v": torch.zeros(1, dtype=torch.float64)})
    assert state64.hyperparams["learning_rate"].dtype == torch.float64
    assert float(state64.hyperparams["learning_rate"]) == 0.1  # exact
    forced = inject_hyperparams(sgd, hyperparam_dtype=torch.float64)(0.1).init({"w": torch.zeros(2)})
    assert forced.hyperparams["learning_rate"].dtype == torch.float64
    static = inject_hyperparams(sgd, static_args=("momentum",))(0.1, momentum=0.9).init({"w": torch.zeros(2)})
    assert "momentum" not in static.hyperparams
    # positional arguments are bound by name
    bound = inject_hyperparams(adamw)(1e-3, 0.8).init({"w": torch.zeros(1, dtype=torch.float64)})
    assert float(bound.hyperparams["b1"]) == 0.8  # float64: exact


def test_set_hyperparam_changes_next_update_and_is_pure():
    params = _params()
    tx = inject_hyperparams(sgd)(learning_rate=0.1, momentum=0.9)
    state = tx.init(params)
    _, state = tx.update(_grads(params, 0), state, params)
    new_state = set_hyperparam(state, "learning_rate", 0.5)
    assert float(state.hyperparams["learning_rate"]) == 0.1  # the old state is untouched (float64: exact)
    assert new_state.hyperparams["learning_rate"].dtype == torch.float64
    g = _grads(params, 1)
    slow, _ = tx.update(g, state, params)
    fast, _ = tx.update(g, new_state, params)
    ref, _ = sgd(0.5, momentum=0.9).update(g, state.inner_state, params)
    for k in SHAPES:
        # the same SGD step, lr 0.5 as a float64 tensor or as a Python float: <= 4 roundings each (4.4e-16)
        torch.testing.assert_close(fast[k], ref[k], rtol=1e-15, atol=0.0)
        # lr 0.1 · 5 against lr 0.5: the rounding of 0.1 and of the products, a few u; rtol=1e-12 is ample
        torch.testing.assert_close(fast[k], slow[k] * 5.0, rtol=1e-12, atol=0.0)
    with pytest.raises(KeyError, match=r"no injected hyper-parameter 'lr'.*injected: \['dampening'"):
        set_hyperparam(state, "lr", 0.5)
    # nested: inside a chain and a MultiSteps
    outer = MultiSteps(chain(tx, scale_by_learning_rate(1.0)), 2).init(params)
    outer = set_hyperparam(outer, "momentum", 0.25)
    assert float(outer.inner_opt_state[0].hyperparams["momentum"]) == 0.25  # a power of 2: exact


def test_find_hyperparam_through_nesting():
    params = _params(torch.float32)
    tx = named_chain(("clip", MultiSteps(sgd(0.3), 2).gradient_transformation()), ("lr", adafactor(1e-3)))
    state = tx.init(params)
    f32 = UNIT_ROUNDOFF[torch.float32]  # float32 params: each learning rate is stored rounded once to float32
    assert float(find_hyperparam(state, "learning_rate")) == pytest.approx(0.3, rel=f32)  # ScaleByLearningRateState
    assert float(find_hyperparam({"x": adafactor(2e-3).init(params)}, "learning_rate")) == pytest.approx(2e-3, rel=f32)
    injected = apply_if_finite(inject_hyperparams(sgd)(learning_rate=0.7, momentum=0.5), 3).init(params)
    assert float(find_hyperparam(injected, "learning_rate")) == pytest.approx(0.7, rel=f32)  # the injected one
    assert float(find_hyperparam(injected, "momentum")) == 0.5  # a power of 2: exact in float32
    assert find_hyperparam(injected, "b2") is None
    assert find_hyperparam(state, "momentum") is None
    assert find_hyperparam((), "learning_rate") is None


@pytest.mark.compiled
def test_compiled_update_does_not_recompile_when_lr_changes():
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    # float64: the traced update == eager is a mathematical claim (FLOAT64)
    params = {"w": torch.ones(3, 2, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}
    inner = inject_hyperparams(adamw)(learning_rate=1e-3, weight_decay=0.1)
    tx = apply_if_finite(MultiSteps(inner, 2).gradient_transformation(), 2)
    step = torch.compile(tx.update, backend=counting_backend, fullgraph=True)
    state = tx.init(params)
    grads = {"w": torch.ones(3, 2, dtype=torch.float64), "b": torch.ones(2, dtype=torch.float64)}
    eager_state = state
    for i, lr in enumerate([1e-3, 1e-3, 2e-2, 2e-2, 5e-1, 5e-1]):
        state = set_hyperparam(state, "learning_rate", lr)
        eager_state = set_hyperparam(eager_state, "learning_rate", lr)
        updates, state = step(grads, state, params)
        eager_updates, eager_state = tx.update(grads, eager_state, params)
        torch.testing.assert_close(updates, eager_updates, **FLOAT64)
        if i % 2 == 1:
            # the second of each pair applies adamw; b = 0 so no decay: the first Adam step on g = 1 is
            # -lr · 1 / (1 + 1e-8), 1e-8 from -lr, plus rounding, where the bias correction 1 - 0.999 cancels ~10 bits
            # of the rounded b2 (float64: ~1000 roundings' worth, gamma(1000) = 1.1e-13; measured 7e-15)
            assert abs(float(updates["b"][0]) + lr) <= (1e-8 + gamma(1000, torch.float64)) * lr
    assert len(graphs) == 1


# ------------------------------------------------------------------------------------------------------------
# MultiSteps


@pytest.mark.parametrize(
    "make, torch_cls, kw",
    [
        (lambda: sgd(0.1, momentum=0.9), torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
        (lambda: adamw(1e-2, weight_decay=0.1), torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    ],
    ids=["sgd", "adamw"],
)
def test_multisteps_equals_inner_on_mean_gradients(make, torch_cls, kw):
    k, calls = 4, 8
    params = _params()
    ms = MultiSteps(make(), every_k_schedule=k)
    state = ms.init(params)
    mean_grads, updated = [], []
    for call in range(calls):
        g = _grads(params, call)
        if call % k == 0:
            mean_grads.append(tree.tree_map(torch.zeros_like, g))
        mean_grads[-1] = tree.tree_map(lambda a, b: a + b / k, mean_grads[-1], g)
        updates, state = ms.update(g, state, params)
        updated.append(bool(MultiSteps.has_updated(state)))
        if call % k != k - 1:
            assert all(torch.count_nonzero(u) == 0 for u in tree.tree_leaves(updates))
        params = _apply(params, updates)
    assert updated == [False, False, False, True] * 2
    assert isinstance(state, MultiStepsState)
    assert (int(state.mini_step), int(state.gradient_step)) == (0, 2)
    assert all(torch.count_nonzero(a) == 0 for a in tree.tree_leaves(state.acc_grads))

    # torch.optim on the averaged gradients: the gradients depend on the params, which move every k calls,
    # so the mean of each group of k is recomputed from the reference's own params.
    def mean_of_group(p, step):
        if step == calls // k:
            return None
        gs = [_grads(p, step * k + j) for j in range(k)]
        return {name: sum(g[name] for g in gs) / k for name in SHAPES}

    ref = _torch_run(torch_cls, _params(), mean_of_group, **kw)
    for name in SHAPES:
        # the mean of k gradients summed in another order (a + b / k vs sum / k): a few u more; module docstring
        torch.testing.assert_close(params[name], ref[name], rtol=1e-12, atol=0.0)


def test_multisteps_mid_steps_keep_inner_state_and_sum_mode():
    params = {"w": torch.zeros(2, dtype=torch.float64)}
    ms = MultiSteps(sgd(1.0, momentum=0.5), every_k_schedule=lambda gs: 2 + gs, use_grad_mean=False)
    state = ms.init(params)
    g = {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}
    emitted = []
    for _ in range(5):  # k = 2, then 3
        before = state.inner_opt_state
        updates, state = ms.update(g, state, params)
        emitted.append(updates["w"].tolist())
        if not bool(MultiSteps.has_updated(state)):
            for a, b in zip(tree.tree_leaves(before), tree.tree_leaves(state.inner_opt_state)):
                assert torch.equal(a, b)  # bitwise: the same tensors passed through, nothing recomputed
    # summed: 2 g, then momentum 0.5 * 2g + 3g = 4g (small integers: exact)
    assert emitted == [[0, 0], [-2, -4], [0, 0], [0, 0], [-4, -8]]
    with pytest.raises(ValueError, match="every_k_schedule must be an int >= 1"):
        MultiSteps(sgd(1.0), 0)


# ------------------------------------------------------------------------------------------------------------
# apply_if_finite


def test_apply_if_finite_skips_and_counts():
    params = {"w": torch.ones(3, dtype=torch.float64)}
    inner = sgd(0.1, momentum=0.9)
    tx = apply_if_finite(inner, max_consecutive_errors=2)
    state = tx.init(params)
    good = {"w": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)}
    inf = {"w": torch.tensor([1.0, math.inf, 3.0], dtype=torch.float64)}
    nan = {"w": torch.tensor([math.nan, 2.0, 3.0], dtype=torch.float64)}

    ref_state = inner.init(params)
    ref_u, ref_state = inner.update(good, ref_state, params)
    u, state = tx.update(good, state, params)
    torch.testing.assert_close(u["w"], ref_u["w"], rtol=0, atol=0)  # bitwise: the same inner kernels on the same input
    params = _apply(params, u)

    counters = []
    for grads in (inf, nan):
        inner_before = state.inner_state
        u, state = tx.update(grads, state, params)
        assert torch.equal(u["w"], torch.zeros(3, dtype=torch.float64))  # params unchanged
        for a, b in zip(tree.tree_leaves(inner_before), tree.tree_leaves(state.inner_state)):
            assert torch.equal(a, b)  # bitwise: the inner state is kept, not recomputed
        counters.append((int(state.notfinite_count), int(state.total_notfinite), bool(state.last_finite)))
    assert counters == [(1, 1, False), (2, 2, False)]

    # a third in a row exceeds max_consecutive_errors=2: applied anyway
    u, state = tx.update(inf, state, params)
    assert not torch.isfinite(u["w"]).all()
    assert (int(state.notfinite_count), int(state.total_notfinite)) == (3, 3)

    # a finite step resets the consecutive count but not the total
    u, state = tx.update(good, state, params)
    assert (int(state.notfinite_count), int(state.total_notfinite), bool(state.last_finite)) == (0, 3, True)
    assert isinstance(state, ApplyIfFiniteState)


def test_apply_if_finite_matches_inner_on_finite_steps_only():
    params = _params()
    grads = [_grads(params, i) for i in range(5)]
    grads[2] = {"w": grads[2]["w"] * math.inf, "b": grads[2]["b"]}
    tx = apply_if_finite(adamw(1e-2), max_consecutive_errors=0 + 1)
    state, p = tx.init(params), params
    for g in grads:
        u, state = tx.update(g, state, p)
        p = _apply(p, u)
    finite = [g for i, g in enumerate(grads) if i != 2]
    ref = _torch_run(
        torch.optim.AdamW,
        params,
        lambda _, s: finite[s] if s < len(finite) else None,
        lr=1e-2,
        weight_decay=1e-4,
    )
    for k in SHAPES:
        torch.testing.assert_close(p[k], ref[k], rtol=1e-12, atol=0.0)  # see the module docstring
