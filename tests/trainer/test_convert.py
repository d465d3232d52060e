"""make_optimizer / make_schedule / the plan's step arithmetic against transformers' Trainer, step by step.

The reference optimizer and scheduler come from ``transformers.Trainer.create_optimizer_and_scheduler``. With
accelerate installed a real ``Trainer`` runs it; without accelerate (which a ``Trainer`` needs to be built) the
same unbound methods run on a stand-in holding the attributes they read, so the grouping, optimizer and
scheduler code is transformers' own either way.

The optimizers run on float64 parameters and gradients (``Tiny().double()``), so ftrain == transformers is checked
to ``FLOAT64``; learning rates, float64 on both sides, to ``LR``.
"""

from __future__ import annotations

import copy
import importlib.util
import types
import warnings

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tolerances import FLOAT64, UNIT_ROUNDOFF, gamma
from torch import nn

from ftrain import optim
from ftrain.schedules import plateau_update
from ftrain.trainer.args import TrainingArguments
from ftrain.trainer.convert import (
    SUPPORTED_OPTIMIZERS,
    get_optimizer_cls_and_kwargs,
    logged_learning_rate,
    make_optimizer,
    make_schedule,
    parse_optim_args,
)
from ftrain.trainer.plan import make_plan

transformers = pytest.importorskip("transformers")
HAS_ACCELERATE = importlib.util.find_spec("accelerate") is not None
T = 20  # optimizer steps per run

#: A learning rate is the peak lr times a schedule factor: a few dozen float64 operations (warmup ratio, cos or pow,
#: products) on each side, ftrain's in torch and transformers' in Python's math. 10**4 unit roundoffs (1.1e-12)
#: covers them with room, while a real difference (a step off, another warmup) is >= 1e-3 relative. ``abs`` is for
#: an lr of 0 (warmup's first step) that one side may compute as a rounding residue of the peak lr (<= 0.1 here).
LR = {"rel": 1e4 * UNIT_ROUNDOFF[torch.float64], "abs": 0.1 * 1e4 * UNIT_ROUNDOFF[torch.float64]}


class Tiny(nn.Module):
    """Linear + LayerNorm + biases, a '_norm' parameter and a frozen layer, so both decay groups matter."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.fc1 = nn.Linear(6, 8)
        self.ln = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 3)
        self.head_norm = nn.Parameter(torch.ones(3))
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)


# HFArgs: tests/trainer/conftest.py


def hf_optimizer_and_scheduler(hf_args, model: nn.Module, num_training_steps: int):
    """transformers' ``Trainer.create_optimizer_and_scheduler`` for ``hf_args`` and ``model``."""
    trainer_cls = transformers.Trainer
    if HAS_ACCELERATE:
        trainer = trainer_cls(model=model, args=hf_args, eval_dataset=[{}])  # an eval set: plateau needs one
        trainer.create_optimizer_and_scheduler(num_training_steps=num_training_steps)
        return trainer.optimizer, trainer.lr_scheduler
    fake = types.SimpleNamespace(
        model=model, args=hf_args, optimizer=None, lr_scheduler=None, optimizer_cls_and_kwargs=None
    )
    fake.get_decay_parameter_names = lambda m: trainer_cls.get_decay_parameter_names(fake, m)
    fake.get_optimizer_cls_and_kwargs = trainer_cls.get_optimizer_cls_and_kwargs
    fake.create_optimizer = lambda model=None: trainer_cls.create_optimizer(fake, model)
    fake.create_scheduler = lambda num_training_steps, optimizer=None: trainer_cls.create_scheduler(
        fake, num_training_steps, optimizer
    )
    trainer_cls.create_optimizer_and_scheduler(fake, num_training_steps=num_training_steps)
    return fake.optimizer, fake.lr_scheduler


def _gradients(model: nn.Module, steps: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random float64 gradients; their global norm moves around 1, so clipping at 1.0 acts on some steps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(steps):
        scale = 0.05 + 0.3 * (k % 5)
        out.append(
            {
                n: torch.randn(p.shape, generator=g, dtype=torch.float64) * scale
                for n, p in model.named_parameters()
                if p.requires_grad
            }
        )
    return out


def _run_both(args_kwargs: dict, HFArgs, tmp_path, *, plateau_metrics: dict[int, float] | None = None):
    """Runs ftrain's and transformers' optimizers on the same gradients; returns both runs' params and lrs."""
    kwargs = {"output_dir": str(tmp_path), "report_to": "none", "use_cpu": True, **args_kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours_args, hf_args = TrainingArguments(**kwargs), HFArgs(**kwargs)
    torch.manual_seed(0)
    model = Tiny().double()
    hf_model = copy.deepcopy(model)
    hf_opt, hf_sched = hf_optimizer_and_scheduler(hf_args, hf_model, T)
    tx = make_optimizer(ours_args, model, num_training_steps=T)
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    state = tx.init(params)
    trainable = [p for p in hf_model.parameters() if p.requires_grad]
    ours_lrs, hf_lrs = [], []
    for k, grads in enumerate(_gradients(model, T)):
        for n, p in hf_model.named_parameters():
            if p.requires_grad:
                p.grad = grads[n].clone()
        if hf_args.max_grad_norm is not None and hf_args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, hf_args.max_grad_norm)
        hf_opt.step()
        hf_lrs.append(hf_opt.param_groups[0]["lr"] if plateau_metrics is not None else hf_sched.get_last_lr()[0])
        updates, state = tx.update(grads, state, params)
        params = optim.apply_updates(params, updates)
        ours_lrs.append(float(logged_learning_rate(state)))
        if plateau_metrics is None:
            hf_sched.step()
        elif k in plateau_metrics:  # an evaluation after this step
            hf_sched.step(plateau_metrics[k])
            state = plateau_update(state, plateau_metrics[k])
    hf_params = {n: p.detach() for n, p in hf_model.named_parameters() if p.requires_grad}
    return params, hf_params, ours_lrs, hf_lrs, model


def _assert_close(params, hf_params, model):
    """Float64 params after T steps of the same optimizer on the same gradients: FLOAT64 (a step of lr = 1e-2 that
    one side missed is 1e8 times above it), and every param moved (the comparison is not of two frozen copies)."""
    assert list(params) == list(hf_params)
    for name, p in params.items():
        ref = hf_params[name]
        torch.testing.assert_close(p, ref, **FLOAT64, msg=lambda m, name=name: f"{name}: {m}")
        assert not torch.equal(ref, dict(model.named_parameters())[name].detach()), f"{name} did not move"


PARITY_CASES = [
    dict(optim="adamw_torch", weight_decay=0.1, lr_scheduler_type="linear", warmup_steps=3),
    dict(optim="adamw_torch_fused", weight_decay=0.01, lr_scheduler_type="cosine", warmup_steps=0.1),
    dict(optim="adamw_torch", lr_scheduler_type="constant", max_grad_norm=0.0, adam_beta1=0.8, adam_epsilon=1e-6),
    dict(optim="adamw_torch", weight_decay=0.1, lr_scheduler_type="cosine_with_restarts", warmup_steps=2,
         lr_scheduler_kwargs={"num_cycles": 2}),
    dict(optim="adafactor", weight_decay=0.1, lr_scheduler_type="constant_with_warmup", warmup_steps=3),
    dict(optim="adafactor", lr_scheduler_type="cosine_with_min_lr", warmup_steps=0.1,
         lr_scheduler_kwargs={"min_lr_rate": 0.1}),
    dict(optim="sgd", optim_args="momentum=0.9,nesterov=True", weight_decay=0.1, lr_scheduler_type="polynomial",
         warmup_steps=3, lr_scheduler_kwargs={"power": 2.0, "lr_end": 1e-4}),
    dict(optim="sgd", optim_args="momentum=0.9,dampening=0.1", lr_scheduler_type="linear", warmup_steps=3),
    dict(optim="sgd", lr_scheduler_type="inverse_sqrt", warmup_steps=4, max_grad_norm=0.5),
    dict(optim="adagrad", optim_args="lr_decay=0.01,eps=1e-8", weight_decay=0.1, lr_scheduler_type="cosine",
         warmup_steps=0.1),
    dict(optim="rmsprop", optim_args="momentum=0.5,alpha=0.9,centered=True", weight_decay=0.05,
         lr_scheduler_type="constant_with_warmup", warmup_steps=3),
    dict(optim="rmsprop", lr_scheduler_type="warmup_stable_decay", warmup_steps=3,
         lr_scheduler_kwargs={"num_decay_steps": 5, "decay_type": "1-sqrt"}),
    dict(optim="adamw_torch", weight_decay=0.1, lr_scheduler_type="cosine_warmup_with_min_lr", warmup_steps=4,
         lr_scheduler_kwargs={"min_lr": 1e-3}),
]  # fmt: skip


@pytest.mark.parametrize(
    "case", PARITY_CASES, ids=[f"{c['optim']}-{c.get('lr_scheduler_type')}-{i}" for i, c in enumerate(PARITY_CASES)]
)
def test_optimizer_and_schedule_match_transformers_step_by_step(HFArgs, tmp_path, case):
    params, hf_params, ours_lrs, hf_lrs, model = _run_both({"learning_rate": 1e-2, **case}, HFArgs, tmp_path)
    assert ours_lrs == pytest.approx(hf_lrs, **LR)
    _assert_close(params, hf_params, model)
    if case.get("warmup_steps") and case["lr_scheduler_type"] != "cosine_warmup_with_min_lr":
        assert ours_lrs[0] == 0.0  # the first update with warmup has lr 0 (that schedule warms up from 1/W)


def test_reduce_lr_on_plateau_matches_transformers(HFArgs, tmp_path):
    case = {
        "learning_rate": 1e-2,
        "optim": "adamw_torch",
        "weight_decay": 0.1,
        "lr_scheduler_type": "reduce_lr_on_plateau",
        "eval_strategy": "steps",
        "eval_steps": 2,
        "lr_scheduler_kwargs": {"factor": 0.5, "patience": 1, "min_lr": 2e-3},
    }
    metrics = {k: 1.0 + 0.01 * (k == 1) for k in range(1, T, 2)}  # no improvement after the first evaluation
    params, hf_params, ours_lrs, hf_lrs, model = _run_both(case, HFArgs, tmp_path, plateau_metrics=metrics)
    assert ours_lrs == pytest.approx(hf_lrs, **LR)
    assert min(hf_lrs) == 2e-3 and max(hf_lrs) == 1e-2  # it did reduce, down to min_lr (max(lr·factor, min_lr): exact)
    _assert_close(params, hf_params, model)


@pytest.mark.skipif(not HAS_ACCELERATE, reason="the real Trainer needs accelerate")
def test_stand_in_matches_the_real_trainer(HFArgs, tmp_path):
    args = HFArgs(output_dir=str(tmp_path), report_to="none", use_cpu=True, optim="sgd", optim_args="momentum=0.9")
    model = Tiny().double()
    trainer = transformers.Trainer(model=model, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=T)
    groups = [[id(p) for p in g["params"]] for g in trainer.optimizer.param_groups]
    decay = ("embed.weight", "fc1.weight", "fc2.weight")
    no_decay = ("head_norm", "fc1.bias", "ln.weight", "ln.bias", "fc2.bias")
    named = list(model.named_parameters())
    assert groups == [[id(p) for n, p in named if n in decay], [id(p) for n, p in named if n in no_decay]]


def test_accepts_transformers_training_arguments(HFArgs, tmp_path):
    kwargs = dict(
        optim="sgd", optim_args="momentum=0.9", lr_scheduler_type="cosine", warmup_steps=0.2, weight_decay=0.1
    )
    hf_args = HFArgs(str(tmp_path), report_to="none", use_cpu=True, learning_rate=0.1, **kwargs)
    ours_args = TrainingArguments(str(tmp_path), report_to="none", use_cpu=True, learning_rate=0.1, **kwargs)
    model = Tiny().double()
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    grads = _gradients(model, 3)
    runs = []
    for args in (hf_args, ours_args):
        tx, p = make_optimizer(args, model, num_training_steps=10), params
        state = tx.init(p)
        for g in grads:
            updates, state = tx.update(g, state, p)
            p = optim.apply_updates(p, updates)
        runs.append(p)
    # the same optimizer built from either arguments class, the same kernels on the same gradients: bitwise
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in params)


# ----------------------------------------------------------------------------------------------------------
# get_optimizer_cls_and_kwargs


@pytest.mark.parametrize(
    "optim_name, optim_args, expected",
    [
        ("adamw_torch", None, {"b1": 0.8, "b2": 0.99, "eps": 1e-7}),
        ("adamw_torch_fused", None, {"b1": 0.8, "b2": 0.99, "eps": 1e-7}),
        ("adafactor", None, {"scale_parameter": False, "relative_step": False}),
        ("sgd", "momentum=0.9,dampening=0.1,nesterov=false", {"momentum": 0.9, "dampening": 0.1, "nesterov": False}),
        ("adagrad", "lr_decay=0.1,eps=1e-6", {"lr_decay": 0.1, "eps": 1e-6}),
        ("rmsprop", "momentum=0.1,alpha=0.9,eps=1e-6,centered=1", {"momentum": 0.1, "decay": 0.9, "eps": 1e-6,
                                                                   "centered": True}),
    ],
)  # fmt: skip
def test_optimizer_kwargs_are_transformers_kwargs_in_ftrain_names(HFArgs, tmp_path, optim_name, optim_args, expected):
    kwargs = dict(optim=optim_name, optim_args=optim_args, adam_beta1=0.8, adam_beta2=0.99, adam_epsilon=1e-7)
    args = TrainingArguments(str(tmp_path), learning_rate=0.3, **kwargs)
    factory, ours = get_optimizer_cls_and_kwargs(args)
    assert ours == {"learning_rate": 0.3, **expected}
    _, theirs = transformers.Trainer.get_optimizer_cls_and_kwargs(HFArgs(str(tmp_path), learning_rate=0.3, **kwargs))
    mapped: dict = {}
    for key, value in theirs.items():
        if key == "betas":
            mapped.update(b1=value[0], b2=value[1])
        elif key != "fused":
            mapped[{"lr": "learning_rate", "alpha": "decay"}.get(key, key)] = value
    assert ours == mapped
    assert factory is getattr(optim, {"adamw_torch_fused": "adamw", "adamw_torch": "adamw"}.get(optim_name, optim_name))


def test_lion_uses_adam_betas_and_the_decay_mask():
    args = TrainingArguments(optim="lion_32bit", adam_beta1=0.95, adam_beta2=0.98, weight_decay=0.5, max_grad_norm=0)
    factory, kwargs = get_optimizer_cls_and_kwargs(args)
    assert factory is optim.lion and kwargs == {"learning_rate": 5e-5, "b1": 0.95, "b2": 0.98}
    model = nn.Sequential(nn.Linear(2, 2))
    params = {n: p.detach() for n, p in model.named_parameters()}
    tx = make_optimizer(args, model, num_training_steps=10)
    updates, _ = tx.update({n: torch.zeros_like(p) for n, p in params.items()}, tx.init(params), params)
    assert torch.equal(updates["0.bias"], torch.zeros(2))  # no decay on the bias: exactly 0
    # zero gradient: sign(0) = 0, so the update is the decoupled decay -lr * wd * p (lr(0) = lr, no warmup). Float32
    # params: each side computes it in at most 4 float32 roundings (the lr, wd·p, the sum with 0, the product by
    # lr), so gamma(4) relative and no absolute slack (torch's default atol 1e-5 would accept an update of 0 here).
    torch.testing.assert_close(updates["0.weight"], -5e-5 * 0.5 * params["0.weight"], rtol=gamma(4), atol=0)


def test_weight_decay_in_optim_args_is_ignored_with_a_warning():
    with pytest.warns(UserWarning, match="weight_decay=0.3 is ignored, as in transformers"):
        _, kwargs = get_optimizer_cls_and_kwargs(TrainingArguments(optim="sgd", optim_args="weight_decay=0.3"))
    assert "weight_decay" not in kwargs


@pytest.mark.parametrize(
    "name, module, message",
    [
        ("adamw_bnb_8bit", "bitsandbytes",
         r"optim='adamw_bnb_8bit' is not available in ftrain: it is a bitsandbytes .*'adamw_torch'"),
        ("paged_lion_8bit", "bitsandbytes", r"bitsandbytes .*optim='lion_32bit'"),
        ("rmsprop_bnb_32bit", "bitsandbytes", r"bitsandbytes .*optim='rmsprop'"),
        ("galore_adafactor", "galore_torch", r"low rank .*optim='adafactor'"),
        ("adamw_torch_xla", "torch_xla", r"TPUs .*optim='adamw_torch'"),
        ("adamw_torch_8bit", "torchao", "torchao"),
        ("schedule_free_sgd", "schedulefree", r"schedulefree.*optim='sgd'"),
    ],
)  # fmt: skip
def test_unsupported_optimizers_are_refused_with_an_alternative(name, module, message):
    """Installed, the package's optimizer is refused with an ftrain alternative; missing, the error is transformers'
    kind (ImportError, or ValueError for xla / npu / anyprecision / grokadamw) and names the package."""
    args = TrainingArguments()
    args.optim = name
    if importlib.util.find_spec(module) is None:
        kind = ValueError if name == "adamw_torch_xla" else ImportError
        with pytest.raises(kind, match=rf"needs the `{module}` package, which is not installed"):
            get_optimizer_cls_and_kwargs(args)
    else:
        with pytest.raises(ValueError, match=message):
            get_optimizer_cls_and_kwargs(args)


def test_an_unknown_optimizer_name_is_refused():
    args = TrainingArguments()
    args.optim = "no_such_optimizer"  # past __post_init__, which already refuses unknown names
    with pytest.raises(ValueError, match=r"optim='no_such_optimizer' is not an optimizer name; ftrain builds \['adamw"):
        get_optimizer_cls_and_kwargs(args)


def test_every_transformers_optimizer_name_is_built_or_refused():
    from transformers.training_args import OptimizerNames

    for name in OptimizerNames:
        args = TrainingArguments(optim=name.value)
        if name.value in SUPPORTED_OPTIMIZERS:
            assert callable(get_optimizer_cls_and_kwargs(args)[0])
        else:
            with pytest.raises((ImportError, ValueError), match="is not available in ftrain|is not installed"):
                get_optimizer_cls_and_kwargs(args)


@pytest.mark.parametrize(
    "optim_name, optim_args, message",
    [
        ("sgd", "momentum", r"'momentum' is not key=value; write e.g. optim_args='momentum=0.9"),
        ("sgd", "momentum=0.9=1", "is not key=value"),
        ("sgd", "momentum=abc", r"momentum='abc' for optim='sgd' must be a number"),
        ("sgd", "momentun=0.9", r"\['momentun'\] are not arguments of optim='sgd'; it takes \['dampening'"),
        ("sgd", "nesterov=maybe", "nesterov='maybe' for optim='sgd' must be true/false"),
        ("adamw_torch", "betas=0.9", "optim='adamw_torch' takes no optim_args"),
    ],
)
def test_bad_optim_args_are_refused(optim_name, optim_args, message):
    with pytest.raises(ValueError, match=message):
        get_optimizer_cls_and_kwargs(TrainingArguments(optim=optim_name, optim_args=optim_args))


def test_parse_optim_args():
    assert parse_optim_args(None) == {} and parse_optim_args("") == {}
    assert parse_optim_args(" a = 1 , b=x,") == {"a": "1", "b": "x"}


# ----------------------------------------------------------------------------------------------------------
# Schedules and the other refusals


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(["linear", "cosine", "constant", "constant_with_warmup", "polynomial", "inverse_sqrt"]),
    warmup=st.one_of(st.integers(0, 30), st.floats(0, 0.9)),
    total=st.integers(1, 60),
)
def test_make_schedule_matches_transformers_get_scheduler(name, warmup, total):
    args = TrainingArguments(lr_scheduler_type=name, warmup_steps=warmup, learning_rate=0.1)
    # polynomial with no decay step divides by zero in transformers; ftrain refuses it when building
    assume(name != "polynomial" or args.get_warmup_steps(total) < total)
    sched = make_schedule(args, total)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    hf = transformers.get_scheduler(name, opt, num_warmup_steps=args.get_warmup_steps(total), num_training_steps=total)
    for k in range(total + 2):
        assert float(sched(torch.tensor(k))) == pytest.approx(hf.get_last_lr()[0], **LR), k
        opt.step()
        hf.step()


def test_schedule_and_optimizer_refusals():
    greedy = TrainingArguments(lr_scheduler_type="greedy", eval_strategy="epoch", lr_scheduler_kwargs={"verbose": 1})
    with pytest.raises(ValueError, match=r"greedy: verbose=True \(printing each change\) is not supported"):
        make_optimizer(greedy, nn.Linear(2, 2), num_training_steps=10)
    args = TrainingArguments(
        lr_scheduler_type="reduce_lr_on_plateau", eval_strategy="epoch", lr_scheduler_kwargs={"verbose": True}
    )
    with pytest.raises(ValueError, match=r"\['verbose'\] are not arguments of reduce_lr_on_plateau"):
        make_optimizer(args, nn.Linear(2, 2), num_training_steps=10)
    with pytest.raises(TypeError, match="unexpected scheduler_specific_kwargs"):
        make_schedule(TrainingArguments(lr_scheduler_type="cosine", lr_scheduler_kwargs={"power": 2}), 10)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="Linear has no parameter with requires_grad=True"):
        make_optimizer(TrainingArguments(), frozen, num_training_steps=10)


def test_clipping_comes_first_and_only_when_enabled():
    model = nn.Linear(2, 1)
    for norm, n_parts in ((1.0, 2), (0.0, 1), (None, 1)):
        args = TrainingArguments(max_grad_norm=norm, optim="sgd")
        state = make_optimizer(args, model, num_training_steps=5).init(dict(model.named_parameters()))
        assert len(state) == n_parts


@pytest.mark.parametrize("name", SUPPORTED_OPTIMIZERS)
def test_optimizer_from_the_plan_policy_is_the_one_from_the_arguments(name):

    args = TrainingArguments(optim=name, learning_rate=0.2, adam_beta1=0.8, adam_epsilon=1e-6, use_cpu=True)
    assert get_optimizer_cls_and_kwargs(make_plan(args).optim) == get_optimizer_cls_and_kwargs(args)
