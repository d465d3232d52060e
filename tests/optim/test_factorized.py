"""Adafactor against ``transformers.optimization.Adafactor``, step for step in float64.

ftrain == transformers is a mathematical claim, checked in float64 with ``FLOAT64`` (tests/tolerances.py): the two
do the same float64 arithmetic in another order, and the gradients are O(1) noise (never rounding noise, which
Adafactor's normalisation would amplify), so they differ by a few roundings per step (measured <= 3e-15 after 50
steps), orders of magnitude below what a real difference (a missing decay, an off-by-one step count) makes.
"""

from __future__ import annotations

import pytest
import torch
from tolerances import FLOAT64, UNIT_ROUNDOFF, gamma
from transformers.optimization import Adafactor

from ftrain import tree
from ftrain.optim.combine import masked
from ftrain.optim.factorized import ScaleByAdafactorState, adafactor, scale_by_adafactor

SHAPES = {"emb": (6, 5), "bias": (5,), "conv": (3, 4, 2), "scalar": ()}
STEPS = 50


def _init_params() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in SHAPES.items()}


def _grads(params: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    """A gradient that depends on the params (so trajectories couple) plus step-dependent noise."""
    gen = torch.Generator().manual_seed(1000 + step)
    return {k: 2.0 * (p - 0.5) + torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}


def _run_ftrain(tx, params, steps=STEPS):
    state = tx.init(params)
    for step in range(steps):
        updates, state = tx.update(_grads(params, step), state, params)
        params = tree.tree_map(torch.add, params, updates)
    return params, state


def _run_hf(params, groups_kw, hf_kwargs, steps=STEPS, lr_lambda=None):
    """``groups_kw``: list of (names, extra group options) for HF param groups."""
    torch_params = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    groups = [{"params": [torch_params[n] for n in names], **extra} for names, extra in groups_kw]
    opt = Adafactor(groups, **hf_kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) if lr_lambda is not None else None
    for step in range(steps):
        grads = _grads({k: v.detach() for k, v in torch_params.items()}, step)
        for k, p in torch_params.items():
            p.grad = grads[k]
        opt.step()
        if sched is not None:
            sched.step()
    return {k: v.detach() for k, v in torch_params.items()}


def _assert_close(ours, ref):
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], **FLOAT64, msg=lambda m, k=k: f"{k}: {m}")


ALL = [list(SHAPES)]


@pytest.mark.parametrize(
    "ours_kw, hf_kw",
    [
        ({}, {}),
        ({"beta1": 0.9}, {"beta1": 0.9}),
        (
            {"clip_threshold": 0.5, "decay_rate": -0.6, "eps": (1e-20, 1e-2)},
            {"clip_threshold": 0.5, "decay_rate": -0.6, "eps": (1e-20, 1e-2)},
        ),
    ],
    ids=["trainer-defaults", "beta1", "other-hparams"],
)
def test_adafactor_matches_hf_trainer_setting(ours_kw, hf_kw):
    params = _init_params()
    ours, state = _run_ftrain(adafactor(1e-2, **ours_kw), params)
    ref = _run_hf(params, [(list(SHAPES), {})], {"lr": 1e-2, "scale_parameter": False, "relative_step": False, **hf_kw})
    _assert_close(ours, ref)
    assert int(state.count) == STEPS
    assert float(state.learning_rate) == 1e-2  # the constant as given, stored in float64 unchanged
    assert state.learning_rate.dtype == torch.float64


def test_adafactor_weight_decay_with_mask_matches_hf_param_groups():
    """HF's Trainer: decayed names in one group with ``weight_decay``, the rest in a group with 0."""
    params = _init_params()
    mask = {k: k != "bias" for k in SHAPES}
    ours, _ = _run_ftrain(adafactor(1e-2, weight_decay=0.3, beta1=0.8, mask=mask), params)
    decay = [k for k in SHAPES if mask[k]]
    ref = _run_hf(
        params,
        [(decay, {"weight_decay": 0.3}), (["bias"], {"weight_decay": 0.0})],
        {"lr": 1e-2, "scale_parameter": False, "relative_step": False, "beta1": 0.8},
    )
    _assert_close(ours, ref)
    no_decay, _ = _run_ftrain(adafactor(1e-2, beta1=0.8), params)
    # the decay did something: 50 steps of lr·wd = 3e-3 move params by ~10%, far above 1e-6 (rounding is ~1e-15)
    assert not torch.allclose(ours["emb"], no_decay["emb"], rtol=1e-6)
    # the bias is masked out of the decay: the same float64 mathematics as without decay (FLOAT64)
    torch.testing.assert_close(ours["bias"], no_decay["bias"], **FLOAT64)


def test_adafactor_schedule_with_beta1_matches_hf_lambda_lr():
    params = _init_params()
    lam = lambda s: 1.0 / (1.0 + 0.2 * s)  # noqa: E731
    # the schedule gets the int64 count tensor; compute in float64 like HF's Python floats
    sched = lambda count: 1e-2 * lam(count.to(torch.float64))  # noqa: E731
    ours, state = _run_ftrain(adafactor(sched, beta1=0.9, weight_decay=0.1), params)
    ref = _run_hf(
        params,
        [(list(SHAPES), {})],
        {"lr": 1e-2, "scale_parameter": False, "relative_step": False, "beta1": 0.9, "weight_decay": 0.1},
        lr_lambda=lam,
    )
    _assert_close(ours, ref)
    # the same float64 formula in torch and in Python, a handful of roundings (<= 5u = 5.6e-16): rel=1e-15
    assert float(state.learning_rate) == pytest.approx(1e-2 * lam(STEPS - 1), rel=1e-15)


@pytest.mark.parametrize("warmup_init", [False, True])
def test_scale_by_adafactor_hf_class_defaults(warmup_init):
    """``relative_step=True, scale_parameter=True`` (HF's class defaults), with weight decay and beta1."""
    params = _init_params()
    kw = {"beta1": 0.9, "weight_decay": 0.05, "warmup_init": warmup_init}
    inner = scale_by_adafactor(**kw)
    tx_state = inner.init(params)
    p = params
    for step in range(STEPS):
        steps, tx_state = inner.update(_grads(p, step), tx_state, p)
        p = tree.tree_map(torch.sub, p, steps)
    ref = _run_hf(params, [(list(SHAPES), {})], kw)
    _assert_close(p, ref)
    via_alias, _ = _run_ftrain(adafactor(None, relative_step=True, scale_parameter=True, **kw), params)
    _assert_close(via_alias, ref)
    expected_lr = min(1e-6 * STEPS, STEPS**-0.5) if warmup_init else 1e-2
    # HF's relative step, float64 in torch vs Python floats: a min and a sqrt or a product, <= 3u: rel=1e-15
    assert float(tx_state.learning_rate) == pytest.approx(expected_lr, rel=1e-15)


def test_state_layout_and_dtypes():
    params = {"w": torch.zeros(4, 3, dtype=torch.bfloat16), "b": torch.zeros(3, dtype=torch.float16)}
    tx = adafactor(1e-3, beta1=0.9)
    state = tx.init(params)
    assert isinstance(state, ScaleByAdafactorState)
    assert state.exp_avg_sq_row["w"].shape == (4,) and state.exp_avg_sq_col["w"].shape == (3,)
    assert state.exp_avg_sq_row["b"] is None and state.exp_avg_sq["w"] is None
    assert state.exp_avg_sq["b"].shape == (3,)
    assert {x.dtype for x in tree.tree_leaves(state[2:])} == {torch.float32}  # HF keeps fp32 statistics
    assert state.count.dtype == torch.int64 and state.learning_rate.dtype == torch.float32
    grads = {"w": torch.ones(4, 3, dtype=torch.bfloat16), "b": torch.ones(3, dtype=torch.float16)}
    before = tree.tree_map(torch.clone, (grads, state))
    updates, new_state = tx.update(grads, state, params)
    assert updates["w"].dtype == torch.bfloat16 and updates["b"].dtype == torch.float16
    # all-ones grads: the normalised update is 1 everywhere, times lr, times (1 - beta1) = -1e-4, computed in
    # float32 (<= gamma(16) relative) and rounded once to the parameter's dtype (<= its unit roundoff)
    for k in ("w", "b"):
        rtol = UNIT_ROUNDOFF[updates[k].dtype] + gamma(16)
        expected = torch.full(updates[k].shape, -1e-4, dtype=torch.float64)
        torch.testing.assert_close(updates[k].double(), expected, rtol=rtol, atol=0)
    # nothing was mutated (bitwise: each tensor against its own clone)
    for a, b in zip(tree.tree_leaves(before), tree.tree_leaves((grads, state))):
        assert torch.equal(a, b)
    assert int(new_state.count) == 1 and int(state.count) == 0


def test_invalid_combinations_raise():
    with pytest.raises(ValueError, match="relative_step=True cannot be combined"):
        scale_by_adafactor(1e-3)
    with pytest.raises(ValueError, match="needs a learning_rate"):
        adafactor(None)
    with pytest.raises(ValueError, match="warmup_init=True requires"):
        adafactor(1e-3, warmup_init=True)
    tx = scale_by_adafactor()  # scale_parameter needs params
    params = {"w": torch.ones(2, 2)}
    with pytest.raises(ValueError, match="update needs params"):
        tx.update(params, tx.init(params))
    with pytest.raises(TypeError, match="int64"):
        tx.init({"i": torch.ones(2, dtype=torch.int64)})


@pytest.mark.compiled
def test_compiles_fullgraph_without_recompiling_on_new_hyperparams():
    from ftrain.optim.wrappers import inject_hyperparams, set_hyperparam

    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    # float64: the traced update == eager is a mathematical claim (FLOAT64)
    params = {"w": torch.ones(3, 2, dtype=torch.float64), "b": torch.full((2,), 0.5, dtype=torch.float64)}
    tx = inject_hyperparams(adafactor)(1e-2, beta1=0.9, weight_decay=0.1, mask={"w": True, "b": False})
    step = torch.compile(tx.update, backend=counting_backend, fullgraph=True)
    state = eager_state = tx.init(params)
    grads = {"w": torch.ones(3, 2, dtype=torch.float64), "b": torch.ones(2, dtype=torch.float64)}
    for lr in (1e-2, 3e-2, 1e-1):
        state, eager_state = (set_hyperparam(s, "learning_rate", lr) for s in (state, eager_state))
        updates, state = step(grads, state, params)
        eager_updates, eager_state = tx.update(grads, eager_state, params)
        torch.testing.assert_close(updates, eager_updates, **FLOAT64)
    assert len(graphs) == 1
    assert float(state.inner_state.learning_rate) == 1e-1  # set as a Python float, held in float64 exactly


def test_mask_errors_name_the_transform_and_what_is_wrong():
    params = {"w": torch.ones(2, 2), "b": torch.ones(2)}
    tx = adafactor(1e-3, weight_decay=0.1, mask={"w": torch.tensor(True), "b": False})
    with pytest.raises(TypeError, match=r"^scale_by_adafactor: mask leaves must be Python bools .*, got Tensor\."):
        tx.update(params, tx.init(params), params)
    tx = adafactor(1e-3, weight_decay=0.1, mask={"w": True})
    with pytest.raises(ValueError) as err:
        tx.update(params, tx.init(params), params)
    assert str(err.value).splitlines()[:2] == [
        "scale_by_adafactor: the mask does not have the params' structure: params and mask have different tree "
        "structures (2 vs 1 leaves).",
        "  in params only: ['b']",
    ]


def test_mask_of_all_params_inside_masked():
    """A mask built for the whole tree still works where an outer ``masked`` hides some leaves (``None``)."""
    params = {"w": torch.ones(2, 2), "b": torch.ones(2), "emb": torch.ones(1, 1)}
    grads = {k: torch.full_like(v, 0.5) for k, v in params.items()}
    decay_mask = {"w": True, "b": False, "emb": True}
    tx = masked(adafactor(1e-2, weight_decay=0.3, mask=decay_mask), {"w": True, "b": True, "emb": False})
    out, _ = tx.update(grads, tx.init(params), params)
    inner = adafactor(1e-2, weight_decay=0.3, mask={"w": True, "b": False})
    sub = {k: params[k] for k in ("w", "b")}
    ref, _ = inner.update({k: grads[k] for k in sub}, inner.init(sub), sub)
    torch.testing.assert_close(out, {**ref, "emb": grads["emb"]}, rtol=0, atol=0)
    # lr 1e-2 times the normalised gradient (1), plus lr * weight_decay * p = 3e-3 where the mask says decay
    torch.testing.assert_close(out["w"], torch.full((2, 2), -0.013))
    torch.testing.assert_close(out["b"], torch.full((2,), -0.01))
