"""``lr_scheduler_type="greedy"`` (transformers' ``GreedyLR``) against transformers' own scheduler and Trainer.

ftrain writes ``GreedyLR`` as :func:`ftrain.schedules.greedy`, a scale on the updates that
:func:`ftrain.schedules.plateau_update` changes after each evaluation. The reference is transformers' ``GreedyLR``
driving a torch optimizer over the same metric sequence (every branch: increase, decrease, cooldown, warmup, the
bounds, smoothing, the reset), and transformers' ``Trainer`` on the same float64 model and data. The learning rate is
``base_lr · scale`` here and is multiplied or divided in place by ``factor`` there, so the two differ by the
rounding of those few products: float64's tolerance (``FLOAT64``) bounds it.
"""

from __future__ import annotations

import random

import pytest
import torch
from tolerances import FLOAT64

from ftrain.schedules import GreedyState, greedy, plateau_update
from ftrain.trainer.schedulers import get_greedy_schedule, get_scheduler
from ftrain.trainer.torch_optim import greedy_transformation

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers.optimization import GreedyLR  # noqa: E402

from tests.trainer.side_by_side import assert_same_training, logged_steps, train_both  # noqa: E402

LR = 0.2

CASES = {
    "defaults": {},
    "fast": {"factor": 0.5, "patience": 0, "min_lr": 0.05, "max_lr": 0.8},
    "cooldown-warmup": {"factor": 0.8, "patience": 1, "cooldown": 2, "warmup": 1, "min_lr": 0.01},
    "max-rel": {"mode": "max", "threshold_mode": "rel", "threshold": 0.05, "patience": 1, "factor": 0.7},
    "smooth": {"smooth": True, "window_size": 3, "patience": 0, "factor": 0.6, "threshold": 0.01},
    "reset": {"factor": 0.5, "patience": 0, "min_lr": 0.1, "reset_start": 2, "cooldown": 1},
    "eps": {"factor": 0.9, "patience": 0, "eps": 0.021},  # from 0.2 a decrease (0.02) is skipped, an increase not
}


def _metrics(seed: int, n: int = 80) -> list[float]:
    """A noisy random walk: long enough runs of improvements and of failures to take every branch."""
    rng = random.Random(seed)
    x, out = 1.0, []
    for _ in range(n):
        x += rng.gauss(0.0, 0.3)
        out.append(x)
    return out


def _assert_follows_greedy_lr(tx, case: dict, metrics: list[float]) -> list[float]:
    """After each metric, ``LR · scale`` of ``tx``'s state is the lr ``GreedyLR(**case)`` set on a torch optimizer
    with base ``LR``, and the counters are its counters; returns that lr sequence."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))], lr=LR)
    reference = GreedyLR(opt, **case)
    state = tx.init({"w": torch.zeros(1, dtype=torch.float64)})
    lrs, hf_lrs = [], []
    for metric in metrics:
        reference.step(metric)
        state = plateau_update(state, metric)
        hf_lrs.append(opt.param_groups[0]["lr"])
        lrs.append(LR * float(state.scale))
        assert int(state.num_bad_steps) == reference.num_bad_epochs
        assert int(state.num_good_steps) == reference.num_good_epochs
        assert int(state.cooldown_counter) == reference.cooldown_counter
        assert int(state.warmup_counter) == reference.warmup_counter
        assert int(state.reset_start) == reference.reset_start
    assert lrs == pytest.approx(hf_lrs, rel=FLOAT64["rtol"], abs=0)
    return hf_lrs


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_scale_follows_transformers_greedy_lr(case, seed):
    """After each metric, ``LR · scale`` is the lr ``GreedyLR`` set on a torch optimizer with base ``LR``."""
    hf_lrs = _assert_follows_greedy_lr(get_greedy_schedule(LR, **case), case, _metrics(seed))
    assert len(set(hf_lrs)) > 1  # the sequence did move the learning rate


def test_reset_restarts_from_the_base_learning_rate():
    """At the floor for ``reset_start`` reductions, GreedyLR goes back to its initial lr and forgets the best."""
    kw = {"factor": 0.5, "patience": 0, "min_lr": 0.1, "reset_start": 2}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    reference = GreedyLR(opt, **kw)
    state = get_greedy_schedule(LR, **kw).init({"w": torch.zeros(1)})
    seen = []
    for metric in [1.0, 2.0, 3.0, 4.0]:  # up once (1.0 beats inf), then failures: down to 0.1, at the floor, reset
        reference.step(metric)
        state = plateau_update(state, metric)
        seen.append((opt.param_groups[0]["lr"], LR * float(state.scale), reference.best, float(state.best)))
    assert [s[1] for s in seen] == pytest.approx([s[0] for s in seen], rel=FLOAT64["rtol"])
    assert [s[3] for s in seen] == [s[2] for s in seen]
    assert seen[-2][0] == 0.1 and seen[-1][0] == LR and seen[-1][2] == float("inf")  # the reference did reset


def test_get_scheduler_greedy_is_the_transformation():
    """``get_scheduler("greedy", lr, scheduler_specific_kwargs=...)`` passes every kwarg on: it follows
    ``GreedyLR`` with those kwargs (not its defaults)."""
    case = CASES["cooldown-warmup"]
    tx = get_scheduler("greedy", LR, scheduler_specific_kwargs=case)
    assert isinstance(tx.init({"w": torch.zeros(1)}), GreedyState)
    assert len(set(_assert_follows_greedy_lr(tx, case, _metrics(0)))) > 1


def test_refusals():
    with pytest.raises(ValueError, match=r"\['patient'\] are not arguments of greedy"):
        get_greedy_schedule(LR, patient=3)
    with pytest.raises(ValueError, match="verbose=True .* is not supported"):
        get_greedy_schedule(LR, verbose=True)
    with pytest.raises(ValueError, match="min_lr must be one number"):
        get_greedy_schedule(LR, min_lr=[0.1, 0.2])
    with pytest.raises(ValueError, match="factor must be < 1.0"):
        greedy(factor=1.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    stepped = GreedyLR(opt)
    stepped.step(1.0)
    with pytest.raises(ValueError, match="has not been stepped yet"):
        greedy_transformation(stepped)


# ---- the Trainer --------------------------------------------------------------------------------------------------

STEPS = 8
SETTINGS = dict(max_steps=STEPS, per_device_train_batch_size=4, logging_steps=1, save_strategy="no", report_to="none",
                disable_tqdm=True, dataloader_drop_last=True, train_sampling_strategy="sequential",
                eval_strategy="steps", eval_steps=1, metric_for_best_model="eval_loss")  # fmt: skip


def _train_both(tmp_path, make_objects=None, **kw):
    """(transformers' Trainer, ftrain's), each trained with its own fresh model (and ``make_objects(model)``)."""
    return train_both(tmp_path, {**SETTINGS, **kw}, make_objects, eval_rows=8)


def _assert_same_scheduler(hf, ft):
    """ftrain's ``trainer.lr_scheduler`` is a real ``GreedyLR`` in the state of transformers'."""
    assert isinstance(ft.lr_scheduler, GreedyLR)
    theirs, ours = hf.lr_scheduler.state_dict(), ft.lr_scheduler.state_dict()
    for key in ("_last_lr", "best"):
        assert ours.pop(key) == pytest.approx(theirs.pop(key), rel=FLOAT64["rtol"])
    assert ours == theirs


def test_trainer_lr_scheduler_type_greedy_matches_transformers(tmp_path, one_thread):
    """Per-step loss, lr, grad norm and the final weights of ``lr_scheduler_type="greedy"``, with both directions."""
    kwargs = {"factor": 0.5, "patience": 0, "min_lr": 0.01, "max_lr": 0.4, "warmup": 1}
    hf, ft = _train_both(tmp_path, learning_rate=0.05, lr_scheduler_type="greedy", lr_scheduler_kwargs=kwargs)
    lrs = [e["learning_rate"] for e in logged_steps(hf)]
    pairs = list(zip(lrs, lrs[1:]))
    assert any(b > a for a, b in pairs) and any(b < a for a, b in pairs)  # transformers raised and lowered it
    assert_same_training(hf, ft)
    _assert_same_scheduler(hf, ft)


def test_trainer_given_greedy_lr_matches_transformers(tmp_path, one_thread):
    """A ``GreedyLR`` passed in ``optimizers=`` (transformers' ``test_greedy_lr_args``): the same run."""

    def objects(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
        return opt, GreedyLR(opt, factor=0.8, patience=0, cooldown=1, min_lr=0.02)

    hf, ft = _train_both(tmp_path, objects)
    assert len({e["learning_rate"] for e in logged_steps(hf)}) > 1
    assert_same_training(hf, ft)
    _assert_same_scheduler(hf, ft)
    assert (ft.lr_scheduler.factor, ft.lr_scheduler.patience, ft.lr_scheduler.cooldown) == (0.8, 0, 1)
