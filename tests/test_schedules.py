"""ftrain.schedules against independent references: ``transformers.get_scheduler`` (every step schedule,
step by step) and ``torch.optim.lr_scheduler.ReduceLROnPlateau`` (reduce_on_plateau)."""

from __future__ import annotations

import doctest
import random
import warnings
from typing import NamedTuple

import pytest
import torch
import transformers
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

import ftrain.schedules as S
from ftrain.optim.base import EmptyState

BASE_LR = 3e-4
# Our float64 tensor schedules against transformers' Python floats (float64): the same formula, <= ~20 roundings
# including a cos, sqrt or pow that libm and torch may round 1 ulp apart, so <= ~1e-14 relative (measured: equal).
# rtol=1e-12 leaves 100x; atol=1e-12 (3e-9 of BASE_LR) covers values that should be 0 and come out as ~1e-20. A
# real difference (an off-by-one step, a wrong cycle count) moves the lr by > 1e-9 (e.g. 3e-7 near a cosine's end).
TOL = dict(rtol=1e-12, atol=1e-12)

# (num_warmup_steps, num_training_steps): no warmup, short/long warmup, warmup == total, warmup > total, tiny.
WT = [(0, 10), (3, 20), (10, 50), (5, 5), (12, 8), (1, 1)]

# One registry of (schedule name, scheduler_specific_kwargs) cases, each run over every (W, T) above.
CASES = [
    ("constant", {}),
    ("constant_with_warmup", {}),
    ("linear", {}),
    ("cosine", {}),
    ("cosine", {"num_cycles": 1.5}),
    ("cosine", {"num_cycles": 0.25}),
    ("cosine_with_restarts", {}),
    ("cosine_with_restarts", {"num_cycles": 3}),
    ("polynomial", {}),
    ("polynomial", {"power": 2.0, "lr_end": 1e-5}),
    ("polynomial", {"power": 0.5, "lr_end": 0.0}),
    ("inverse_sqrt", {}),
    ("inverse_sqrt", {"timescale": 7}),
    ("cosine_with_min_lr", {"min_lr": 1e-5}),
    ("cosine_with_min_lr", {"min_lr_rate": 0.1, "num_cycles": 1.0}),
    ("cosine_warmup_with_min_lr", {"min_lr_rate": 0.05}),
    ("cosine_warmup_with_min_lr", {"min_lr": 2e-5, "warmup_lr_rate": 0.1}),
    ("cosine_warmup_with_min_lr", {"min_lr_rate": 0.0, "warmup_lr_rate": 0.0, "num_cycles": 1.0}),
    ("warmup_stable_decay", {"num_decay_steps": 4}),
    (
        "warmup_stable_decay",
        {"num_decay_steps": 3, "warmup_type": "cosine", "decay_type": "1-sqrt", "min_lr_ratio": 0.1},
    ),
    ("warmup_stable_decay", {"num_decay_steps": 5, "warmup_type": "1-sqrt", "decay_type": "linear"}),
    (
        "warmup_stable_decay",
        {"num_decay_steps": 2, "num_stable_steps": 3, "num_cycles": 1.0, "min_lr_ratio": 0.2},
    ),
]


def _params():
    for name, kwargs in CASES:
        for w, t in WT:
            if name == "polynomial" and w == t:
                continue  # HF divides by zero there, ours refuses to build: test_polynomial_no_decay_steps
            yield pytest.param(name, kwargs, w, t, id=f"{name}-{kwargs}-W{w}-T{t}")


def hf_learning_rates(name, lr, w, t, kwargs, num_steps):
    """The optimizer's lr after k scheduler steps, k = 0..num_steps, from transformers.get_scheduler."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    sched = transformers.get_scheduler(
        name, optimizer=opt, num_warmup_steps=w, num_training_steps=t, scheduler_specific_kwargs=dict(kwargs)
    )
    lrs = [sched.get_last_lr()[0]]
    for _ in range(num_steps):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    return lrs


@pytest.mark.parametrize(("name", "kwargs", "w", "t"), list(_params()))
def test_matches_transformers_step_by_step(name, kwargs, w, t):
    num_steps = max(w, t) + 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # WSD warns when num_stable_steps and num_training_steps are both set
        expected = hf_learning_rates(name, BASE_LR, w, t, kwargs, num_steps)
        schedule = S.get_schedule(name, BASE_LR, num_warmup_steps=w, num_training_steps=t, **kwargs)
    got = [schedule(torch.tensor(k, dtype=torch.int64)) for k in range(num_steps + 1)]
    assert all(g.dtype == torch.float64 and g.shape == () for g in got)
    torch.testing.assert_close(torch.stack(got), torch.tensor(expected, dtype=torch.float64), **TOL)


def test_accepts_scheduler_type_enum():
    by_enum = S.get_schedule(transformers.SchedulerType.COSINE, 1.0, num_warmup_steps=2, num_training_steps=9)
    by_str = S.get_schedule("cosine", 1.0, num_warmup_steps=2, num_training_steps=9)
    for k in range(12):
        assert float(by_enum(torch.tensor(k))) == float(by_str(torch.tensor(k)))  # the same schedule: bitwise
    assert S.SCHEDULE_NAMES == tuple(t.value for t in transformers.SchedulerType)


def test_constructors_are_what_get_schedule_builds():
    direct = S.warmup_stable_decay_schedule(
        2.0, num_warmup_steps=3, num_decay_steps=4, num_training_steps=12, decay_type="1-sqrt"
    )
    via = S.get_schedule(
        "warmup_stable_decay",
        2.0,
        num_warmup_steps=3,
        num_training_steps=12,
        num_decay_steps=4,
        decay_type="1-sqrt",
    )
    got = [float(direct(torch.tensor(k))) for k in range(14)]
    assert got == [float(via(torch.tensor(k))) for k in range(14)]  # the same function built twice: bitwise
    # exact: 2·k/3 is one correctly rounded division, as in Python; the plateau and the end are 2.0 and 0.0
    assert got[:3] == [0.0, 2 / 3, 4 / 3] and got[3:8] == [2.0] * 5 and got[-2:] == [0.0, 0.0]


# ----------------------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------------------


def test_missing_num_training_steps():
    with pytest.raises(ValueError, match=r"get_schedule\('linear'\) requires `num_training_steps`"):
        S.get_schedule("linear", 1e-3, num_warmup_steps=10)


def test_missing_num_warmup_steps():
    with pytest.raises(ValueError, match=r"get_schedule\('cosine'\) requires `num_warmup_steps`"):
        S.get_schedule("cosine", 1e-3, num_warmup_steps=None, num_training_steps=10)


def test_min_lr_and_min_lr_rate():
    with pytest.raises(ValueError, match=r"both min_lr=1e-05 and min_lr_rate=0.1; set exactly one"):
        S.get_schedule("cosine_with_min_lr", 1e-3, num_training_steps=10, min_lr=1e-5, min_lr_rate=0.1)
    with pytest.raises(ValueError, match=r"cosine_warmup_with_min_lr_schedule: set exactly one of min_lr"):
        S.get_schedule("cosine_warmup_with_min_lr", 1e-3, num_training_steps=10)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown schedule 'cosin'") as info:
        S.get_schedule("cosin", 1e-3, num_training_steps=10)
    assert all(name in str(info.value) for name in S.SCHEDULE_NAMES)


def test_polynomial_lr_not_above_lr_end():
    with pytest.raises(ValueError, match=r"lr_end \(0.001\) must be smaller than the initial lr \(0.001\)"):
        S.get_schedule("polynomial", 1e-3, num_training_steps=10, lr_end=1e-3)
    with pytest.raises(ValueError, match=r"lr_end \(0.1\) must be smaller than the initial lr \(0.01\)"):
        S.polynomial_schedule(1e-2, num_warmup_steps=0, num_training_steps=10, lr_end=0.1)


def test_polynomial_no_decay_steps():
    with pytest.raises(ZeroDivisionError):  # what transformers does, at step W == T
        hf_learning_rates("polynomial", 1e-3, 5, 5, {}, 6)
    with pytest.raises(ValueError, match=r"num_training_steps == num_warmup_steps == 5 leaves no decay steps"):
        S.get_schedule("polynomial", 1e-3, num_warmup_steps=5, num_training_steps=5)


@pytest.mark.parametrize("name, transformation", [("reduce_lr_on_plateau", "reduce_on_plateau"), ("greedy", "greedy")])
def test_metric_driven_names_point_to_their_transformation(name, transformation):
    with pytest.raises(ValueError, match=rf"not a step schedule\. Use ftrain\.schedules\.{transformation}\("):
        S.get_schedule(name, 1e-3)


def test_metric_driven_names_are_the_schedules_that_are_no_function_of_the_step():
    assert S.METRIC_SCHEDULE_NAMES == ("reduce_lr_on_plateau", "greedy")
    assert set(S.METRIC_SCHEDULE_NAMES) < set(S.SCHEDULE_NAMES)


def test_wsd_argument_errors():
    with pytest.raises(ValueError, match=r"requires `num_decay_steps`"):
        S.get_schedule("warmup_stable_decay", 1e-3, num_training_steps=10)
    with pytest.raises(ValueError, match=r"set num_training_steps \(then S = T - W - D\) or num_stable_steps"):
        S.get_schedule("warmup_stable_decay", 1e-3, num_decay_steps=3)
    with pytest.raises(ValueError, match=r"unknown decay_type 'exp'; expected one of 'linear', 'cosine'"):
        S.get_schedule("warmup_stable_decay", 1e-3, num_training_steps=10, num_decay_steps=3, decay_type="exp")
    with pytest.warns(UserWarning, match="num_stable_steps is used"):
        S.warmup_stable_decay_schedule(
            1.0, num_warmup_steps=1, num_decay_steps=1, num_training_steps=9, num_stable_steps=2
        )


def test_unexpected_kwarg():
    with pytest.raises(TypeError, match=r"unexpected scheduler_specific_kwargs \['power'\]; cosine accepts"):
        S.get_schedule("cosine", 1e-3, num_training_steps=10, power=2.0)


# ----------------------------------------------------------------------------------------------------------
# Compiled
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.compiled
def test_compiles_once_and_matches_eager():
    torch._dynamo.reset()
    schedule = S.get_schedule("cosine", 1e-3, num_warmup_steps=5, num_training_steps=20)
    # Whether it compiles to one graph and never recompiles is decided by dynamo, the same for every backend;
    # aot_eager also runs AOT tracing and functionalization. Inductor's cold C++ build alone takes 18-30 s on
    # 2 CPU cores, too slow for the default run (it gives the same frame count and bit-identical values).
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(schedule, backend=counter, fullgraph=True)
    got = torch.stack([compiled(torch.tensor(k)) for k in range(21)])
    want = torch.stack([schedule(torch.tensor(k)) for k in range(21)])
    torch.testing.assert_close(got, want, **TOL)
    assert got[5] == 1e-3 and got[0] == 0.0  # exact: 1e-3 · (1 + cos 0) / 2 and 1e-3 · 0 / 5
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames for 21 steps"


@pytest.mark.compiled
def test_plateau_update_compiles_once():
    torch._dynamo.reset()
    counter = CompileCounter()
    state = (EmptyState(), S.reduce_on_plateau(patience=0, factor=0.5).init({"w": torch.zeros(1)}))
    step = torch.compile(S.plateau_update, backend=counter, fullgraph=True)
    for metric in [3.0, 2.0, 2.0, 2.0, 1.0]:
        state = step(state, torch.tensor(metric))
    assert float(state[1].scale) == 0.25 and float(state[1].best) == 1.0  # powers of 2 and a copied metric: exact
    assert counter.frame_count == 1


# ----------------------------------------------------------------------------------------------------------
# reduce_on_plateau vs torch.optim.lr_scheduler.ReduceLROnPlateau
# ----------------------------------------------------------------------------------------------------------

PLATEAU_CASES = [
    {},
    {"mode": "min", "threshold_mode": "rel", "patience": 2, "factor": 0.5},
    {
        "mode": "max",
        "threshold_mode": "abs",
        "threshold": 0.05,
        "patience": 1,
        "cooldown": 2,
        "factor": 0.3,
        "min_lr": 1e-5,
    },
    {
        "mode": "min",
        "threshold_mode": "abs",
        "threshold": 0.1,
        "patience": 0,
        "cooldown": 1,
        "factor": 0.7,
        "min_lr": 2e-4,
    },
    {"mode": "max", "threshold_mode": "rel", "threshold": 0.01, "patience": 3, "factor": 0.1},
    {"mode": "min", "patience": 1, "factor": 0.5, "eps": 2e-4},  # reductions below eps are skipped
]


def _metrics(seed: int, n: int = 150) -> list[float]:
    """A noisy random walk that stalls in stretches (so both improvements and plateaus happen)."""
    rng = random.Random(seed)
    value, out = 1.0, []
    for _ in range(n):
        if rng.random() < 0.5:
            value += rng.gauss(0.0, 0.1)
        out.append(value if rng.random() < 0.8 else round(value, 1))
    return out


@pytest.mark.parametrize("kwargs", PLATEAU_CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
@pytest.mark.parametrize("as_tensor", [False, True])
def test_reduce_on_plateau_matches_torch(kwargs, as_tensor):
    base_lr = 1e-3
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kwargs)
    ours_kwargs = {k: v for k, v in kwargs.items() if k not in ("min_lr", "eps")}
    tx = S.reduce_on_plateau(
        **ours_kwargs, min_scale=kwargs.get("min_lr", 0.0) / base_lr, eps=kwargs.get("eps", 1e-8) / base_lr
    )
    state = tx.init({"w": torch.zeros(3)})
    lrs = []
    for metric in _metrics(seed=len(kwargs) + 7 * as_tensor):
        ref.step(metric)
        state = S.plateau_update(state, torch.tensor(metric, dtype=torch.float64) if as_tensor else metric)
        lrs.append(opt.param_groups[0]["lr"])
        # scale · base_lr vs torch's lr · factor, products of the same few factors: a few u (TOL)
        torch.testing.assert_close(state.scale * base_lr, torch.tensor(lrs[-1], dtype=torch.float64), **TOL)
        assert float(state.best) == ref.best  # a metric value copied on both sides: exact
        assert (int(state.num_bad_steps), int(state.cooldown_counter)) == (
            ref.num_bad_epochs,
            ref.cooldown_counter,
        )
    assert len(set(lrs)) >= 3, "the metric sequence should trigger at least two reductions"


def test_reduce_on_plateau_scales_updates():
    tx = S.reduce_on_plateau(factor=0.5, patience=0)
    state = tx.init({"w": torch.zeros(2)})
    for metric in [1.0, 1.0, 1.0]:
        state = S.plateau_update(state, metric)
    updates, new_state = tx.update({"w": torch.ones(2, dtype=torch.float32), "b": None}, state)
    assert updates["w"].dtype == torch.float32 and updates["b"] is None
    assert updates["w"].tolist() == [0.25, 0.25]  # 1 · 0.5 · 0.5: exact
    assert new_state is state


def test_eps_blocks_small_reductions():
    tx = S.reduce_on_plateau(factor=0.5, patience=0, eps=0.3)
    state = tx.init({})
    scales = []
    for _ in range(4):
        state = S.plateau_update(state, 1.0)
        scales.append(float(state.scale))
    # powers of 2, exact: 1 -> .5 is a .5 reduction; .5 -> .25 is .25 <= eps, skipped
    assert scales == [1.0, 0.5, 0.5, 0.5]


class _Outer(NamedTuple):
    inner: tuple
    count: torch.Tensor


def test_plateau_update_finds_state_in_a_tree():
    tx = S.reduce_on_plateau(patience=0, factor=0.5)
    other = {"mu": torch.ones(2)}
    tree = _Outer(inner=(EmptyState(), other, tx.init({"w": torch.zeros(1)})), count=torch.tensor(3))
    for metric in [2.0, 2.0]:
        tree = S.plateau_update(tree, metric)
    assert isinstance(tree, _Outer) and isinstance(tree.inner[2], S.ReduceOnPlateauState)
    assert float(tree.inner[2].scale) == 0.5 and float(tree.inner[2].best) == 2.0  # exact, as above
    assert tree.inner[1]["mu"] is other["mu"] and tree.inner[0] == EmptyState() and int(tree.count) == 3


def test_plateau_update_without_plateau_state():
    with pytest.raises(ValueError, match=r"no ReduceOnPlateauState or GreedyState in the given tuple"):
        S.plateau_update((EmptyState(), {"mu": torch.ones(1)}), 1.0)


def test_reduce_on_plateau_bad_arguments():
    with pytest.raises(ValueError, match=r"factor must be < 1.0"):
        S.reduce_on_plateau(factor=1.0)
    with pytest.raises(ValueError, match=r"mode must be 'min' or 'max', got 'low'"):
        S.reduce_on_plateau(mode="low")
    with pytest.raises(ValueError, match=r"threshold_mode must be 'rel' or 'abs'"):
        S.reduce_on_plateau(threshold_mode="relative")


def test_docstring_examples():
    result = doctest.testmod(S, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 20 and result.failed == 0
