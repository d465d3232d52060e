"""torch optimizers and schedulers through ftrain's Trainer, against ``transformers.Trainer`` with the same objects.

Each run builds a fresh float64 model (same seed) and fresh torch objects for each Trainer, trains a few steps and
compares the per-step logs (``loss``, ``learning_rate``, ``grad_norm``, ``epoch``) and the final weights
(``side_by_side.assert_same_training``). In float64 both sides compute the same mathematics (torch.optim's step,
ftrain's pure transformation), so they agree to ``FLOAT64`` (``tests/tolerances.py``); the logged loss to
``hf_loss_rtol(1)``, as transformers adds it into a float32 tensor. The views (``trainer.optimizer.param_groups``
/ ``state_dict()``, ``trainer.lr_scheduler.get_last_lr()``) are compared with transformers' trainer's own objects
after the run.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
from tolerances import FLOAT64
from torch import nn

from ftrain.schedules import plateau_update
from ftrain.trainer import Trainer, TrainingArguments
from ftrain.trainer.convert import make_optimizer
from ftrain.trainer.torch_optim import table_schedule

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from tests.trainer.side_by_side import (  # noqa: E402
    Regression,
    assert_same_training,
    logged_steps,
    regression_rows,
    train_both,
)

STEPS = 6


def _data(n: int = 32) -> list[dict[str, torch.Tensor]]:
    return regression_rows(n, intercept=0.3)


def _groups(model: nn.Module) -> list[dict]:
    """Two groups with different lr and weight decay (weights; biases)."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": weights, "weight_decay": 0.1}, {"params": biases, "lr": 0.02, "weight_decay": 0.0}]


SETTINGS = dict(max_steps=STEPS, per_device_train_batch_size=4, logging_steps=1, save_strategy="no", report_to="none",
                disable_tqdm=True, dataloader_drop_last=True, train_sampling_strategy="sequential")  # fmt: skip


def _args(cls, tmp_path, **kw):
    return cls(output_dir=str(tmp_path), **{**SETTINGS, **kw})


def _both(tmp_path, make_objects, eval_rows=0, **kw):
    """(transformers' Trainer, ftrain's), each trained with its own fresh ``make_objects(model)``."""
    return train_both(tmp_path, {**SETTINGS, **kw}, make_objects, eval_rows=eval_rows)


def _assert_same_run(hf, ft):
    """``STEPS`` logged steps and the final weights agree with transformers' (one microbatch per logged loss)."""
    assert len(logged_steps(ft)) == STEPS
    assert_same_training(hf, ft)


OPTIMIZERS = {
    "AdamW": lambda m: torch.optim.AdamW(_groups(m), lr=0.05, betas=(0.8, 0.99), eps=1e-7),
    "Adam": lambda m: torch.optim.Adam(_groups(m), lr=0.05),
    "SGD": lambda m: torch.optim.SGD(_groups(m), lr=0.05, momentum=0.9, nesterov=True),
    "RMSprop": lambda m: torch.optim.RMSprop(_groups(m), lr=0.01, momentum=0.5, centered=True),
    "Adagrad": lambda m: torch.optim.Adagrad(_groups(m), lr=0.05, lr_decay=0.01),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_torch_optimizer_matches_transformers(name, tmp_path, one_thread):
    """optimizers=(torch optimizer, None): transformers adds its linear schedule; so does ftrain, per group."""
    hf, ft = _both(tmp_path, lambda m: (OPTIMIZERS[name](m), None), warmup_steps=2)
    _assert_same_run(hf, ft)
    assert isinstance(ft.optimizer, type(hf.optimizer.optimizer))  # the view is an instance of the torch class
    _assert_same_views(hf, ft)


def _assert_same_views(hf, ft):
    """param_groups (live parameters, current lr), state_dict(), get_last_lr() against transformers' objects."""
    for ours, theirs in zip(ft.optimizer.param_groups, hf.optimizer.param_groups):
        ft_names = {id(p): n for n, p in ft.model.named_parameters()}  # the view holds the live parameters
        hf_names = {id(p): n for n, p in hf.model.named_parameters()}
        assert [ft_names[id(p)] for p in ours["params"]] == [hf_names[id(p)] for p in theirs["params"]]
        assert {k: v for k, v in ours.items() if k not in ("params", "lr")} == {
            k: v for k, v in theirs.items() if k not in ("params", "lr")
        }
    torch.testing.assert_close(ft.get_learning_rates(), hf.get_learning_rates(), **FLOAT64)
    torch.testing.assert_close(ft.lr_scheduler.get_last_lr(), hf.lr_scheduler.get_last_lr(), **FLOAT64)
    assert ft.lr_scheduler.last_epoch == hf.lr_scheduler.last_epoch
    ours, theirs = ft.optimizer.state_dict(), hf.optimizer.state_dict()
    assert [g["params"] for g in ours["param_groups"]] == [g["params"] for g in theirs["param_groups"]]
    assert ours["state"].keys() == theirs["state"].keys()
    for index, state in theirs["state"].items():
        assert ours["state"][index].keys() == state.keys()
        for key, value in state.items():
            torch.testing.assert_close(ours["state"][index][key], value, **FLOAT64, check_dtype=False, msg=key)


SCHEDULERS = {
    "linear_warmup": lambda o: transformers.get_linear_schedule_with_warmup(o, 2, STEPS),
    "cosine_hf": lambda o: transformers.get_scheduler("cosine", o, num_warmup_steps=1, num_training_steps=STEPS),
    "any_lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0 / (k + 1)),
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "multistep": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[1, 4], gamma=0.3),
    "exponential": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.8),
    "cosine_annealing": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4),
    "linear": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=3),
    "constant": lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=0.5, total_iters=2),
    "one_cycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=[0.1, 0.05], total_steps=STEPS, cycle_momentum=False
    ),  # fmt: skip
    "sequential": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o,
        [torch.optim.lr_scheduler.LinearLR(o, 0.5, total_iters=2), torch.optim.lr_scheduler.ExponentialLR(o, 0.9)],
        milestones=[2],
    ),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_torch_scheduler_matches_transformers(name, tmp_path, one_thread):
    def objects(model):
        opt = torch.optim.AdamW(_groups(model), lr=0.05)
        return opt, SCHEDULERS[name](opt)

    hf, ft = _both(tmp_path, objects)
    _assert_same_run(hf, ft)
    _assert_same_views(hf, ft)


def test_reduce_lr_on_plateau_matches_transformers(tmp_path, one_thread):
    """ReduceLROnPlateau is stepped after each evaluation with eval_loss, on both sides."""

    def objects(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        return opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0, threshold=0.5)

    kw = dict(eval_strategy="steps", eval_steps=1, metric_for_best_model="eval_loss")
    hf, ft = _both(tmp_path, objects, eval_rows=8, **kw)
    assert len({h["learning_rate"] for h in logged_steps(hf)}) > 1  # the scheduler did reduce
    _assert_same_run(hf, ft)
    assert isinstance(ft.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert ft.get_learning_rates() == pytest.approx(hf.get_learning_rates(), rel=FLOAT64["rtol"])


# ---- optimizer names, classes and the views' API -------------------------------------------------------------------

SUPPORTED = ("adamw_torch", "adamw_torch_fused", "sgd", "adagrad", "rmsprop")


@pytest.mark.parametrize("name", SUPPORTED)
def test_get_optimizer_cls_and_kwargs_equals_transformers(name):
    kw = dict(optim=name, learning_rate=0.01, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6)
    if name in ("sgd", "rmsprop", "adagrad"):
        kw["optim_args"] = {"sgd": "momentum=0.9,nesterov=true", "rmsprop": "alpha=0.9,centered=True",
                            "adagrad": "lr_decay=0.1,eps=1e-8"}[name]  # fmt: skip
    theirs = transformers.Trainer.get_optimizer_cls_and_kwargs(transformers.TrainingArguments("out", **kw))
    assert Trainer.get_optimizer_cls_and_kwargs(TrainingArguments("out", **kw)) == theirs


MISSING = {"adamw_bnb_8bit": "bitsandbytes", "paged_lion_8bit": "bitsandbytes", "galore_adamw": "galore_torch",
           "apollo_adamw": "apollo_torch", "lomo": "lomo_optim", "schedule_free_adamw": "schedulefree",
           "adamw_torch_4bit": "torchao", "stable_adamw": "optimi"}  # fmt: skip


@pytest.mark.parametrize("name", sorted(MISSING))
def test_optimizers_of_missing_packages_raise_transformers_import_error(name, tmp_path):
    """transformers raises ImportError naming the package when it is missing; so does ftrain, when the optimizer
    is created (at train(), as transformers)."""
    if importlib.util.find_spec(MISSING[name]) is not None:
        pytest.skip(f"{MISSING[name]} is installed")
    hf = transformers.Trainer(Regression(), _args(transformers.TrainingArguments, tmp_path / "hf", optim=name))
    with pytest.raises(ImportError) as theirs:
        hf.create_optimizer()
    ft = Trainer(Regression(), _args(TrainingArguments, tmp_path / "ft", optim=name))
    with pytest.raises(ImportError, match=rf"`{MISSING[name]}` package, which is not installed"):
        ft.create_optimizer()
    assert MISSING[name].replace("optimi", "torch-optimi") in str(theirs.value)  # both name the same package


def test_optimizer_cls_and_kwargs_and_an_overriding_subclass_drive_create_optimizer(tmp_path, one_thread):
    cls_kwargs = (torch.optim.SGD, {"lr": 0.05, "momentum": 0.5})
    ft_logs = {}
    for how in ("cls_and_kwargs", "override"):

        class Sub(Trainer):
            @staticmethod
            def get_optimizer_cls_and_kwargs(args, model=None):
                return cls_kwargs

        model = Regression()
        args = _args(TrainingArguments, tmp_path / how)
        if how == "cls_and_kwargs":
            ft = Trainer(model, args, train_dataset=_data(), optimizer_cls_and_kwargs=cls_kwargs)
        else:
            ft = Sub(model, args, train_dataset=_data())
        ft.train()
        ft_logs[how] = logged_steps(ft)
        assert isinstance(ft.optimizer, torch.optim.SGD) and ft.optimizer.param_groups[0]["momentum"] == 0.5
    hf = transformers.Trainer(Regression(), _args(transformers.TrainingArguments, tmp_path / "hf2"),
                              train_dataset=_data(), optimizer_cls_and_kwargs=cls_kwargs)  # fmt: skip
    hf.train()
    _assert_same_run(hf, ft)
    assert ft_logs["override"] == ft_logs["cls_and_kwargs"]


def test_views_before_training_match_transformers(tmp_path):
    """transformers' own checks (test_no_wd_param_group, test_get_learning_rates, test_lr_scheduler_kwargs'
    intent): groups of live parameters, the lrs before training, the scheduler stepping the view's lrs."""
    kw = dict(weight_decay=0.1, warmup_steps=2, lr_scheduler_type="cosine")
    hf = transformers.Trainer(Regression(), _args(transformers.TrainingArguments, tmp_path / "hf", **kw))
    ft = Trainer(Regression(), _args(TrainingArguments, tmp_path / "ft", **kw))
    for trainer in (hf, ft):
        with pytest.raises(ValueError):
            trainer.get_learning_rates()
        trainer.create_optimizer_and_scheduler(num_training_steps=10)
    for ours, theirs in zip(ft.optimizer.param_groups, hf.optimizer.param_groups):
        names = {id(p): n for n, p in ft.model.named_parameters()}
        hf_names = {id(p): n for n, p in hf.model.named_parameters()}
        assert [names[id(p)] for p in ours["params"]] == [hf_names[id(p)] for p in theirs["params"]]
        assert ours == {**theirs, "params": ours["params"]}
    assert ft.optimizer.defaults == hf.optimizer.defaults
    lrs = {"hf": [], "ft": []}
    for key, trainer in (("hf", hf), ("ft", ft)):
        for _ in range(10):
            lrs[key].append(trainer.get_learning_rates())
            trainer.lr_scheduler.step()
    torch.testing.assert_close(lrs["ft"], lrs["hf"], **FLOAT64)
    assert ft.optimizer.state_dict() == {**hf.optimizer.state_dict(), "state": {}}


def test_created_scheduler_matches_transformers_across_blocks_and_past_the_end(tmp_path):
    """The created ``LambdaLR`` reads ftrain's schedule a block of steps at a time: its ``get_last_lr()`` is
    transformers' at every step, over several blocks and past ``num_training_steps`` (where the cosine rises again)."""
    kw = dict(weight_decay=0.1, warmup_steps=100, lr_scheduler_type="cosine")
    hf = transformers.Trainer(Regression(), _args(transformers.TrainingArguments, tmp_path / "hf", **kw))
    ft = Trainer(Regression(), _args(TrainingArguments, tmp_path / "ft", **kw))
    lrs = {"hf": [], "ft": []}
    for key, trainer in (("hf", hf), ("ft", ft)):
        trainer.create_optimizer_and_scheduler(num_training_steps=1500)
        for _ in range(2600):
            lrs[key].append(trainer.lr_scheduler.get_last_lr())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # stepping the scheduler without optimizer.step()
                trainer.lr_scheduler.step()
    assert lrs["hf"][2000] != lrs["hf"][1500]  # past the end, transformers' cosine moves again
    torch.testing.assert_close(lrs["ft"], lrs["hf"], **FLOAT64)


@pytest.mark.parametrize("schedule", ["cosine", "reduce_lr_on_plateau", "greedy"])
@pytest.mark.parametrize("optim_name", [*SUPPORTED, "adafactor", "lion_32bit"])
def test_the_trainers_optimizer_is_convert_make_optimizer(optim_name, schedule, tmp_path):
    """The Trainer builds its optimizer through the torch description (``create_optimizer`` ->
    ``make_transformation``); for ``TrainingArguments`` alone that is :func:`ftrain.trainer.convert.make_optimizer`'s
    chain (which the ``ftrain`` command's optimizer is checked against), update for update, bitwise."""
    kw = dict(optim=optim_name, learning_rate=0.05, weight_decay=0.1, max_grad_norm=0.5, lr_scheduler_type=schedule,
              warmup_steps=2, eval_strategy="steps", eval_steps=1,
              lr_scheduler_kwargs={"factor": 0.5, "patience": 0} if schedule != "cosine" else {})  # fmt: skip
    if optim_name in ("sgd", "rmsprop"):
        kw["optim_args"] = "momentum=0.9"
    args = TrainingArguments(str(tmp_path), **kw)
    model = Regression()
    ft = Trainer(model, args, eval_dataset=_data(8))
    ft.create_optimizer_and_scheduler(num_training_steps=6)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    sides = [ft._tx, make_optimizer(args, model, num_training_steps=6)]
    states, outs = [tx.init(params) for tx in sides], [dict(params), dict(params)]
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        grads = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}
        for i, tx in enumerate(sides):
            updates, states[i] = tx.update(grads, states[i], outs[i])
            outs[i] = {k: outs[i][k] + updates[k] for k in params}
            if schedule != "cosine":
                states[i] = plateau_update(states[i], float(step % 3))  # raises and lowers the scale
    for name in params:
        assert not torch.equal(outs[0][name], params[name]), name
        assert torch.equal(outs[0][name], outs[1][name]), name


def test_the_view_refuses_stateful_calls_and_stepped_optimizers(tmp_path):
    ft = Trainer(Regression(), _args(TrainingArguments, tmp_path))
    optimizer = ft.create_optimizer()
    for call in (optimizer.step, optimizer.zero_grad, lambda: optimizer.load_state_dict({})):
        with pytest.raises(RuntimeError, match="pure|TrainState"):
            call()
    model = Regression()
    stepped = torch.optim.AdamW(model.parameters())
    model(torch.zeros(2, 3, dtype=torch.float64), labels=torch.zeros(2, dtype=torch.float64))["loss"].backward()
    stepped.step()
    with pytest.raises(ValueError, match="has already taken steps"):
        Trainer(model, _args(TrainingArguments, tmp_path), optimizers=(stepped, None))


def test_a_scheduler_that_moves_momentum_is_refused(tmp_path):
    model = Regression()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=STEPS)  # cycle_momentum=True
    ft = Trainer(model, _args(TrainingArguments, tmp_path), train_dataset=_data(), optimizers=(opt, sched))
    with pytest.raises(ValueError, match=r"OneCycleLR also changes \['momentum'\].*cycle_momentum=False"):
        ft.train()


def test_table_schedule_holds_its_last_value():
    sched = table_schedule([0.5, 0.25])
    assert [float(sched(torch.tensor(k))) for k in range(3)] == [0.5, 0.25, 0.25]
