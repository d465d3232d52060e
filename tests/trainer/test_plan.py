"""make_plan: every TrainingArguments field has a disposition, and the plan's decisions match transformers.

The reference numbers come from transformers itself (``Trainer.set_initial_training_values``,
``Trainer.get_total_train_batch_size``, ``TrainerState.compute_steps``, ``TrainingArguments``' properties), run as
released on a stand-in holding the attributes they read, or are derived by hand from the formulas in
``shared/reference/hf_trainer.md`` (written out next to each number).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import operator
import pickle
import sys
import types
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ftrain.trainer import callbacks, integrations
from ftrain.trainer.args import IntervalStrategy, SaveStrategy, TrainingArguments
from ftrain.trainer.convert import make_optimizer, make_schedule
from ftrain.trainer.plan import (
    DISPOSITIONS,
    Intervals,
    TrainerPlan,
    apply_process_settings,
    make_plan,
    resolve_interval,
)
from ftrain.trainer.trainer_state import TrainerState
from tests.trainer.test_convert import LR  # the schedule's float64 tolerance

transformers = pytest.importorskip("transformers")

# HFArgs: tests/trainer/conftest.py


def _init_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


# ----------------------------------------------------------------------------------------------------------
# The disposition table


def test_every_transformers_field_has_a_disposition():
    missing = [name for name in _init_fields(transformers.TrainingArguments) if name not in DISPOSITIONS]
    assert missing == []


def test_every_ftrain_field_has_a_disposition_and_nothing_else_does():
    ours = _init_fields(TrainingArguments)
    assert [name for name in ours if name not in DISPOSITIONS] == []
    assert sorted(set(DISPOSITIONS) - set(ours)) == []


def test_honoured_fields_name_plan_attributes_that_exist():
    plan = make_plan(TrainingArguments("out"))
    unknown = []
    for name, disposition in DISPOSITIONS.items():
        if disposition.kind != "honoured":
            continue
        assert disposition.where or disposition.by, f"{name} is honoured but names no plan entry or callback"
        if disposition.by:  # a callback that reads the field from args, as transformers' does
            cls = getattr(callbacks, disposition.by, None) or getattr(integrations, disposition.by)
            assert name in inspect.getsource(cls), f"{disposition.by} does not read {name}"
        for path in disposition.where:
            try:
                operator.attrgetter(path)(plan)
            except AttributeError:
                unknown.append(f"{name} -> {path}")
    assert unknown == []


@pytest.mark.parametrize("name", [n for n, d in DISPOSITIONS.items() if d.kind == "refused"])
def test_refused_fields_are_refused_with_their_message(name):
    disposition = DISPOSITIONS[name]
    assert disposition.refused_with and disposition.message
    with pytest.raises(ValueError, match=disposition.message):
        TrainingArguments("out", **disposition.refused_with)


def test_dispositions_are_well_formed():
    for name, disposition in DISPOSITIONS.items():
        assert disposition.kind in ("honoured", "refused", "ignored"), name
        if disposition.kind == "ignored":
            assert len(disposition.why) > 20 and not disposition.where, name
    kinds = [d.kind for d in DISPOSITIONS.values()]
    assert kinds.count("refused") == 4 and kinds.count("ignored") >= 15


# A value other than the default for each honoured field, where flipping a bool, adding 2 to an int or halving a float
# does not give one (or needs companions), and the launcher environment where the field acts only with several
# processes. ``None``: the field changes the plan only on a GPU machine.
_SEVERAL = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
_OTHER_NODE_RANK = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "0"}
_ALTERNATIVES = {
    "output_dir": {"output_dir": "elsewhere"},
    "lr_scheduler_type": {"lr_scheduler_type": "cosine"},
    "lr_scheduler_kwargs": {"lr_scheduler_type": "cosine_with_restarts", "lr_scheduler_kwargs": {"num_cycles": 2}},
    "optim": {"optim": "sgd"},
    "optim_args": {"optim_args": "momentum=0.9"},
    "tf32": {"tf32": False},
    "activation_checkpointing": {"activation_checkpointing": True},
    "activation_checkpointing_kwargs": {
        "activation_checkpointing": True,
        "activation_checkpointing_kwargs": {"use_reentrant": True},
    },
    "gradient_checkpointing": {"gradient_checkpointing": True},
    "gradient_checkpointing_kwargs": {
        "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": 1},
    },
    "torch_compile_backend": {"torch_compile_backend": "aot_eager"},
    "torch_compile_mode": {"torch_compile_mode": "max-autotune"},
    "neftune_noise_alpha": {"neftune_noise_alpha": 5.0},
    "torch_empty_cache_steps": {"torch_empty_cache_steps": 3},
    "log_on_each_node": ({"log_on_each_node": False}, _OTHER_NODE_RANK),
    "include_num_input_tokens_seen": {"include_num_input_tokens_seen": "non_padding"},
    "log_level": {"log_level": "error"},
    "eval_loss_reduction": {"eval_loss_reduction": "token"},
    "log_level_replica": ({"log_level_replica": "error"}, {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}),
    "disable_tqdm": {"disable_tqdm": True},
    "report_to": {"report_to": "tensorboard"},
    "eval_strategy": {"eval_strategy": "epoch"},
    "eval_steps": {"eval_steps": 7},
    "include_for_metrics": {"include_for_metrics": ["inputs"]},
    "save_strategy": {"save_strategy": "epoch"},
    "save_on_each_node": ({"save_on_each_node": True}, _OTHER_NODE_RANK),
    "save_total_limit": {"save_total_limit": 2},
    "hub_token": {"hub_token": "hf_x"},
    "hub_private_repo": {"hub_private_repo": True},
    "hub_model_id": {"hub_model_id": "me/model"},
    "hub_strategy": {"hub_strategy": "checkpoint"},
    "hub_revision": {"hub_revision": "dev"},
    "load_best_model_at_end": {"load_best_model_at_end": True, "eval_strategy": "steps", "save_steps": 500},
    "metric_for_best_model": {"metric_for_best_model": "accuracy"},
    "greater_is_better": {"metric_for_best_model": "loss", "greater_is_better": True},
    "data_seed": {"data_seed": 7},
    "use_cpu": None,
    "no_cuda": None,
    "accelerator_config": {"accelerator_config": {"gradient_accumulation_kwargs": {"num_steps": 3}}},
    "parallelism_config": "dp_shard=2",  # built in the test (needs ftrain.distributed)
    "dataloader_pin_memory": {"dataloader_pin_memory": False},
    "dataloader_persistent_workers": {"dataloader_num_workers": 1, "dataloader_persistent_workers": True},
    "dataloader_prefetch_factor": {"dataloader_num_workers": 1, "dataloader_prefetch_factor": 4},
    "dataloader_multiprocessing_context": {"dataloader_num_workers": 1, "dataloader_multiprocessing_context": "spawn"},
    "label_names": {"label_names": ["y"]},
    "train_sampling_strategy": {"train_sampling_strategy": "sequential"},
    "length_column_name": {"length_column_name": "len"},
    "ddp_backend": {"ddp_backend": "gloo"},
    "fsdp": ({"fsdp": "full_shard"}, _SEVERAL),
    "fsdp_config": ({"fsdp": True, "fsdp_config": {"reshard_after_forward": False}}, _SEVERAL),
    "deepspeed": ({"deepspeed": {"zero_optimization": {"stage": 3}}}, _SEVERAL),
    "evaluation_strategy": {"evaluation_strategy": "epoch"},
    "warmup_ratio": {"warmup_ratio": 0.1},
    "group_by_length": {"group_by_length": True},
    "eval_accumulation_steps": {"eval_accumulation_steps": 2},
}


def _alternative(name: str):
    if name in _ALTERNATIVES:
        value = _ALTERNATIVES[name]
        if value == "dp_shard=2":
            from ftrain.distributed import ParallelConfig

            return {"parallelism_config": ParallelConfig(dp_shard=2)}, _SEVERAL
        return value if isinstance(value, tuple) or value is None else (value, {})
    default = next(f.default for f in dataclasses.fields(TrainingArguments) if f.name == name)
    if isinstance(default, bool):
        return {name: not default}, {}
    if isinstance(default, (int, float)):
        return {name: default + 2 if isinstance(default, int) else (default / 2 if default else 0.25)}, {}
    raise AssertionError(f"{name}: add a non-default value to _ALTERNATIVES")


@pytest.mark.parametrize("name", [n for n, d in DISPOSITIONS.items() if d.kind == "honoured" and d.where])
def test_honoured_fields_are_read_into_their_plan_entries(name, monkeypatch):
    """An honoured field must change what its plan entries hold: a field that is accepted but not read (neither
    refused nor ignored with a reason) fails here."""
    alternative = _alternative(name)
    if alternative is None:
        if not torch.cuda.is_available():
            pytest.skip(f"{name} changes the device only where a GPU is usable")
        alternative = ({name: True}, {})
    kwargs, env = alternative
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if name == "tf32":  # tf32=False is applied only where the GPU has TF32 (transformers' rule): pretend it has
        monkeypatch.setattr(sys.modules["ftrain.trainer.plan"], "tf32_available", lambda: True)
    cpu = {} if name in ("use_cpu", "no_cuda", "dataloader_pin_memory") else {"use_cpu": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        base = make_plan(TrainingArguments(**{"output_dir": "out", **cpu}))
        plan = make_plan(TrainingArguments(**{"output_dir": "out", **cpu, **kwargs}))
    paths = DISPOSITIONS[name].where
    assert [operator.attrgetter(p)(plan) for p in paths] != [operator.attrgetter(p)(base) for p in paths]


# ----------------------------------------------------------------------------------------------------------
# Step arithmetic against transformers' own code


class _Loader:
    def __init__(self, n: int | None) -> None:
        self.n = n

    def __len__(self) -> int:
        if self.n is None:
            raise TypeError("no length")
        return self.n


def _hf_trainer_stand_in(args: TrainingArguments, world_size: int, tp: int = 1, cp: int = 1, sp: int = 1):
    """The attributes transformers' ``set_initial_training_values`` / ``get_total_train_batch_size`` read."""
    fake = types.SimpleNamespace(
        _train_batch_size=args.train_batch_size,
        get_tp_size=lambda: tp,
        get_cp_size=lambda: cp,
        get_sp_size=lambda: sp,
        num_examples=lambda dl: len(dl) * 4,
    )
    hf_args = types.SimpleNamespace(
        world_size=world_size, **{k: getattr(args, k) for k in ("gradient_accumulation_steps", "max_steps")}
    )
    hf_args.num_train_epochs = args.num_train_epochs
    fake.get_total_train_batch_size = lambda a: transformers.Trainer.get_total_train_batch_size(fake, a)
    return fake, hf_args


@settings(max_examples=150, deadline=None)
@given(
    length=st.one_of(st.none(), st.integers(1, 50)),
    ga=st.integers(1, 8),
    epochs=st.sampled_from([0.5, 1.0, 2.5, 3.0]),
    max_steps=st.sampled_from([-1, 1, 7, 40]),
    logging=st.sampled_from([1, 10, 0.1, 0.25]),
    eval_steps=st.sampled_from([None, 5, 0.3]),
    warmup=st.sampled_from([0, 3, 0.1]),
)
def test_steps_match_transformers(length, ga, epochs, max_steps, logging, eval_steps, warmup):
    args = TrainingArguments(
        gradient_accumulation_steps=ga,
        num_train_epochs=epochs,
        max_steps=max_steps,
        logging_steps=logging,
        eval_steps=eval_steps,
        warmup_steps=warmup,
        per_device_train_batch_size=4,
        use_cpu=True,
    )
    plan = make_plan(args)
    fake, hf_args = _hf_trainer_stand_in(args, world_size=2)
    if length is None and max_steps <= 0:
        with pytest.raises(ValueError, match="max_steps must be set > 0"):
            plan.steps(length, world_size=2)
        with pytest.raises(ValueError, match="max_steps must be set to a positive value"):
            plan.initial_training_values(length, num_examples=lambda: 0)
        with pytest.raises(ValueError, match="max_steps must be set to a positive value"):
            transformers.Trainer.set_initial_training_values(fake, hf_args, _Loader(length))
        return
    theirs = transformers.Trainer.set_initial_training_values(fake, hf_args, _Loader(length))
    total = plan.total_train_batch_size(world_size=2)
    ours = plan.initial_training_values(length, num_examples=lambda: length * 4, total_train_batch_size=total)
    assert ours == theirs
    steps = plan.steps(length, world_size=2)
    epochs_hf, per_epoch_hf, _, _, total_hf, steps_in_epoch_hf, max_hf = theirs
    assert (steps.num_train_epochs, steps.num_update_steps_per_epoch, steps.total_train_batch_size) == (
        epochs_hf,
        per_epoch_hf,
        total_hf,
    )
    assert (steps.steps_in_epoch, steps.max_steps) == (steps_in_epoch_hf, max_hf)
    state = transformers.TrainerState()
    state.compute_steps(args, max_hf)
    assert (steps.logging_steps, steps.save_steps) == (state.logging_steps, state.save_steps)
    assert steps.eval_steps == (None if eval_steps is None else state.eval_steps)
    assert steps.warmup_steps == transformers.TrainingArguments.get_warmup_steps(args, max_hf)


def test_plan_steps_refuse_an_empty_loader():
    with pytest.raises(ValueError, match="the training dataloader is empty"):
        make_plan(TrainingArguments()).steps(0)
    steps = make_plan(TrainingArguments(max_steps=5, gradient_accumulation_steps=3)).steps(None, world_size=1)
    assert (steps.num_update_steps_per_epoch, steps.steps_in_epoch) == (5, 15)
    assert steps.num_train_epochs > 10**9 and math.isfinite(steps.max_steps)


@pytest.mark.parametrize("tp, cp, sp", [(1, 1, 1), (2, 1, 1), (2, 2, 1), (1, 1, 4)])
def test_total_train_batch_size_matches_transformers(tp, cp, sp):
    args = TrainingArguments(per_device_train_batch_size=3, gradient_accumulation_steps=5, use_cpu=True)
    fake, hf_args = _hf_trainer_stand_in(args, world_size=16, tp=tp, cp=cp, sp=sp)
    ours = make_plan(args).total_train_batch_size(world_size=16, tp_size=tp, cp_size=cp, sp_size=sp)
    assert ours == transformers.Trainer.get_total_train_batch_size(fake, hf_args)
    assert ours == 3 * 5 * (16 // (tp * cp * sp))  # hand: per device × accumulation × data-parallel ranks


def test_steps_by_hand():
    plan = make_plan(
        TrainingArguments(
            gradient_accumulation_steps=4,
            num_train_epochs=2.5,
            per_device_train_batch_size=2,
            warmup_steps=0.1,
            logging_steps=0.25,
            eval_strategy="steps",
            eval_steps=3,
            save_steps=0.5,
            use_cpu=True,
        )
    )
    steps = plan.steps(10)
    # 10 microbatches / GA 4 -> ceil = 3 updates per epoch; 2.5 epochs -> ceil(7.5) = 8 steps over ceil(2.5) = 3 epochs
    assert (steps.num_update_steps_per_epoch, steps.max_steps, steps.num_train_epochs) == (3, 8, 3)
    # warmup ceil(8 * 0.1) = 1; logging ceil(8 * 0.25) = 2; eval 3 as given; save ceil(8 * 0.5) = 4
    assert (steps.warmup_steps, steps.logging_steps, steps.eval_steps, steps.save_steps) == (1, 2, 3, 4)
    assert steps.total_train_batch_size == 2 * 4 * 1 and steps.steps_in_epoch == 10
    assert plan.steps(10, world_size=3).total_train_batch_size == 24
    # no length: max_steps steps of GA microbatches, "infinitely" many epochs
    no_length = make_plan(TrainingArguments(max_steps=5, gradient_accumulation_steps=3)).steps(None)
    assert (no_length.max_steps, no_length.num_update_steps_per_epoch, no_length.steps_in_epoch) == (5, 5, 15)
    assert no_length.num_train_epochs == sys.maxsize
    with pytest.raises(ValueError, match="the training dataloader is empty"):
        plan.steps(0)


def test_initial_training_values_by_hand():
    plan = make_plan(TrainingArguments(num_train_epochs=1.5, per_device_train_batch_size=4, use_cpu=True))
    # 7 microbatches, GA 1: 7 updates per epoch, ceil(1.5 * 7) = 11 steps, 2 epochs; samples = 26 examples × 1.5
    assert plan.initial_training_values(7, num_examples=lambda: 26) == (2, 7, 26, 39.0, 4, 7, 11)
    plan = make_plan(TrainingArguments(max_steps=10, per_device_train_batch_size=4, use_cpu=True))
    # max_steps: samples = 10 × total batch 4; with no length (None or 0) the examples are the samples too
    assert plan.initial_training_values(7, num_examples=lambda: 26) == (2, 7, 26, 40, 4, 7, 10)
    assert plan.initial_training_values(0, num_examples=lambda: 1 / 0) == (sys.maxsize, 10, 40, 40, 4, 10, 10)


@pytest.mark.parametrize("max_steps", [1, 7, 100, 1001])
def test_intervals_resolve_like_transformers_trainer_state(max_steps):
    args = TrainingArguments(logging_steps=0.1, eval_strategy="steps", eval_steps=0.25, save_steps=30)
    ours, theirs = TrainerState(), transformers.TrainerState()
    ours.compute_steps(make_plan(args).intervals, max_steps)
    theirs.compute_steps(args, max_steps)
    got = (ours.logging_steps, ours.eval_steps, ours.save_steps)
    assert got == (theirs.logging_steps, theirs.eval_steps, theirs.save_steps)
    assert got == (math.ceil(max_steps * 0.1), math.ceil(max_steps * 0.25), 30)
    assert resolve_interval(None, max_steps) is None
    untouched = TrainerState()
    untouched.compute_steps(Intervals(10, None, 20), max_steps)
    assert (untouched.logging_steps, untouched.eval_steps, untouched.save_steps) == (10, 500, 20)


# ----------------------------------------------------------------------------------------------------------
# Decisions against transformers' TrainingArguments (one process)


PLAN_CASES = [
    {},
    {"per_device_train_batch_size": 3, "per_device_eval_batch_size": 5, "seed": 7, "data_seed": 3},
    {"eval_strategy": "steps", "eval_steps": 20, "logging_steps": 10, "save_steps": 40},
    {"load_best_model_at_end": True, "eval_strategy": "epoch", "save_strategy": "epoch"},
    {"metric_for_best_model": "accuracy", "eval_strategy": "epoch"},
    {"metric_for_best_model": "eval_f1", "greater_is_better": False},
    {"warmup_steps": 0.15, "lr_scheduler_type": "cosine", "log_level": "info", "log_level_replica": "error"},
    {"save_on_each_node": True, "log_on_each_node": False, "report_to": "tensorboard"},
    {"hub_model_id": "me/m", "hub_strategy": "checkpoint", "push_to_hub": True, "hub_revision": "dev"},
]


@pytest.mark.parametrize("kwargs", PLAN_CASES, ids=[str(i) for i in range(len(PLAN_CASES))])
def test_plan_agrees_with_transformers_arguments(HFArgs, tmp_path, kwargs):
    kwargs = {"output_dir": str(tmp_path), "use_cpu": True, **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan, hf = make_plan(TrainingArguments(**kwargs)), HFArgs(**kwargs)
    assert (plan.data.train_batch_size, plan.data.eval_batch_size) == (hf.train_batch_size, hf.eval_batch_size)
    assert plan.data.seed == (hf.data_seed if hf.data_seed is not None else hf.seed) and plan.seeding.seed == hf.seed
    assert (plan.process.world_size, plan.process.process_index) == (hf.world_size, hf.process_index)
    assert str(plan.process.device) == str(hf.device)
    assert (plan.save.should_save, plan.log.should_log) == (hf.should_save, hf.should_log)
    assert plan.save.output_dir == hf.output_dir and plan.save.strategy.value == hf.save_strategy.value
    assert plan.eval.strategy.value == hf.eval_strategy.value and plan.eval.steps == hf.eval_steps
    assert plan.log.steps == hf.logging_steps and plan.save.steps == hf.save_steps
    assert plan.eval.greater_is_better == hf.greater_is_better and plan.eval.do_eval == hf.do_eval
    name = hf.metric_for_best_model
    assert plan.eval.metric_key == (None if name is None else name if name.startswith("eval_") else f"eval_{name}")
    assert plan.log.report_to == tuple(hf.report_to)
    assert [plan.optim.warmup_for(n) for n in (1, 7, 100)] == [hf.get_warmup_steps(n) for n in (1, 7, 100)]
    if hf.log_level != "passive":
        assert plan.log.process_log_level == hf.get_process_log_level()
    assert (plan.hub.model_id, plan.hub.strategy.value, plan.hub.revision) == (
        hf.hub_model_id,
        hf.hub_strategy.value,
        hf.hub_revision,
    )


def test_which_process_saves_and_logs(monkeypatch):
    # transformers' rule: should_save = local rank 0 with save_on_each_node, else global rank 0 (same for logs)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    args = TrainingArguments(use_cpu=True, log_level="info", log_level_replica="error")
    plan = make_plan(args)
    assert (plan.process.world_size, plan.process.process_index, plan.process.local_process_index) == (4, 2, 0)
    assert not plan.save.should_save and plan.log.should_log and plan.log.process_log_level == logging.INFO
    assert not plan.process.is_world_process_zero and plan.process.is_local_process_zero
    args.save_on_each_node, args.log_on_each_node = True, False
    plan = make_plan(args)
    assert plan.save.should_save and not plan.log.should_log and plan.log.process_log_level == logging.ERROR


# ----------------------------------------------------------------------------------------------------------
# Decisions by hand


def test_data_policy():
    plan = make_plan(TrainingArguments(seed=5, label_names=["start", "end"], train_sampling_strategy="group_by_length"))
    assert (plan.data.seed, plan.data.label_names) == (5, ("start", "end"))
    assert plan.data.group_by_length and not plan.data.shuffle
    data = {s: make_plan(TrainingArguments(train_sampling_strategy=s)).data for s in ("random", "sequential")}
    assert data["random"].shuffle and not data["sequential"].shuffle and not data["random"].group_by_length
    assert make_plan(TrainingArguments(label_names=None)).data.label_names is None


def test_loader_options_reach_the_trainers_streams(tmp_path):
    from ftrain.trainer import Trainer

    args = TrainingArguments(str(tmp_path), report_to="none", dataloader_num_workers=1, dataloader_prefetch_factor=3,
                             dataloader_multiprocessing_context="spawn", dataloader_pin_memory=False)  # fmt: skip
    trainer = Trainer(torch.nn.Linear(2, 1), args, train_dataset=[{"input": [1.0, 2.0]}] * 4)
    for stream in (trainer.get_train_dataloader(), trainer.get_test_dataloader([{"input": [1.0, 2.0]}])):
        assert (stream.num_workers, stream.prefetch_factor, stream.multiprocessing_context) == (1, 3, "spawn")
        assert stream.pin_memory is False
    assert Trainer(torch.nn.Linear(2, 1), TrainingArguments(str(tmp_path), report_to="none")).plan.data.pin_memory


def test_accumulation_taken_over_from_accelerator_config():
    config = {"gradient_accumulation_kwargs": {"num_steps": 4}}
    plan = make_plan(TrainingArguments(accelerator_config=config, per_device_train_batch_size=2, use_cpu=True))
    assert plan.data.gradient_accumulation_steps == 4 and plan.total_train_batch_size() == 8
    assert make_plan(TrainingArguments(gradient_accumulation_steps=3)).data.gradient_accumulation_steps == 3


def test_step_policy():
    plan = make_plan(TrainingArguments(bf16=True, use_cpu=True, neftune_noise_alpha=5.0, label_smoothing_factor=0.1))
    assert plan.step.autocast_dtype is torch.bfloat16 and plan.step.jit_options is None and not plan.step.torch_compile
    assert (plan.step.neftune_noise_alpha, plan.step.label_smoothing_factor, plan.step.tf32) == (5.0, 0.1, None)
    assert make_plan(TrainingArguments()).step.autocast_dtype is None
    compiled = make_plan(TrainingArguments(torch_compile_mode="max-autotune", full_determinism=True)).step
    assert compiled.torch_compile and compiled.jit_options == {
        "donate": True,
        "deterministic": True,
        "fallback_random": True,  # an Inductor option: eager's random numbers under full_determinism
        "mode": "max-autotune",
        "backend": "inductor",
        "optimizer": "eager",  # gradients compiled, the fused eager optimizer (benchmarks step_time (i), cold_start)
    }
    kwargs = {"use_reentrant": False, "every_n_layers": 2, "offload": True}
    checkpointing = make_plan(TrainingArguments(activation_checkpointing=True, activation_checkpointing_kwargs=kwargs))
    ac = checkpointing.step.activation_checkpointing
    assert (ac.checkpoint_kwargs, ac.every_n_layers, ac.offload) == ({"use_reentrant": False}, 2, True)
    with pytest.warns(FutureWarning, match="gradient_checkpointing"):
        plain = make_plan(TrainingArguments(gradient_checkpointing=True)).step.activation_checkpointing
    assert (plain.checkpoint_kwargs, plain.every_n_layers, plain.offload) == (None, 1, False)
    assert make_plan(TrainingArguments()).step.activation_checkpointing is None


def test_eval_policy():
    plan = make_plan(TrainingArguments(include_for_metrics=["loss"], eval_strategy="epoch", eval_delay=2))
    assert plan.eval.include_loss and not plan.eval.include_inputs
    assert (plan.eval.strategy, plan.eval.metric_key) == (IntervalStrategy.EPOCH, None)
    plateau = make_plan(TrainingArguments(lr_scheduler_type="reduce_lr_on_plateau", eval_strategy="epoch")).eval
    assert (plateau.metric_key, plateau.greater_is_better) == ("eval_loss", False)


def test_save_policy_and_checkpoint_options():
    plan = make_plan(TrainingArguments("runs/a", save_strategy="epoch", save_total_limit=2, save_only_model=True))
    assert (plan.save.strategy, plan.save.total_limit, plan.save.only_model) == (SaveStrategy.EPOCH, 2, True)
    keep = lambda step: step == 3  # noqa: E731
    options = plan.save.checkpoint_options(sharded=False, should_keep_fn=keep)
    assert (options.step_prefix, options.step_digits, options.backend) == ("checkpoint-", 0, "safetensors")
    assert (options.max_to_keep, options.retention, options.should_keep_fn) == (2, "total", keep)
    unlimited = make_plan(TrainingArguments(save_total_limit=0)).save.checkpoint_options(sharded=True)
    assert (unlimited.backend, unlimited.max_to_keep, unlimited.should_keep_fn) == ("dcp", None, None)


def test_parallel_policy_on_one_process():
    plan = make_plan(TrainingArguments(parallelism_config={"tp_size": 2, "cp_size": 1, "dp_shard_size": 2}))
    assert plan.parallel.layout is None  # one process: no mesh
    assert (plan.parallel.tp_size, plan.parallel.cp_size, plan.parallel.sp_size) == (2, 1, 1)
    assert plan.parallel.fsdp_enabled
    default = make_plan(TrainingArguments()).parallel
    assert (default.layout, default.tp_size, default.fsdp_enabled) == (None, 1, False)


def test_hub_token_stays_out_of_the_repr():
    plan = make_plan(TrainingArguments(hub_token="secret-token", hub_private_repo=True))
    assert plan.hub.token == "secret-token" and plan.hub.private_repo is True
    assert "secret-token" not in repr(plan)


def test_plan_is_frozen_and_does_not_follow_the_arguments():
    kwargs = {"use_reentrant": False}
    args = TrainingArguments(activation_checkpointing=True, activation_checkpointing_kwargs=kwargs)
    args.lr_scheduler_kwargs = {"num_cycles": 2, "nested": {"x": 1}}
    plan = make_plan(args)
    args.lr_scheduler_kwargs["nested"]["x"] = 5
    args.activation_checkpointing_kwargs["use_reentrant"] = True
    args.learning_rate = 1.0
    assert plan.optim.schedule_kwargs == {"num_cycles": 2, "nested": {"x": 1}} and plan.optim.learning_rate == 5e-5
    assert plan.step.activation_checkpointing.checkpoint_kwargs == {"use_reentrant": False}
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.data = None
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.optim.learning_rate = 1.0
    assert isinstance(plan, TrainerPlan)
    assert pickle.loads(pickle.dumps(plan)) == plan  # a trainer shipped to a ray worker carries its plan


# ----------------------------------------------------------------------------------------------------------
# convert takes the plan's optimizer policy


def test_convert_builds_the_same_optimizer_from_the_plan():
    args = TrainingArguments(
        optim="adamw_torch", learning_rate=0.1, warmup_steps=2, weight_decay=0.1, max_grad_norm=0.5
    )
    policy = make_plan(args).optim
    assert [float(make_schedule(policy, 6)(torch.tensor(k))) for k in range(6)] == [
        float(make_schedule(args, 6)(torch.tensor(k))) for k in range(6)
    ]
    theirs = transformers.get_scheduler(
        "linear", torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), num_warmup_steps=2, num_training_steps=6
    )
    expected = []
    for _ in range(6):
        expected.append(theirs.get_last_lr()[0])
        theirs.optimizer.step()
        theirs.step()
    assert [float(make_schedule(policy, 6)(torch.tensor(k))) for k in range(6)] == pytest.approx(expected, **LR)
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    results = []
    for source in (args, policy):
        tx = make_optimizer(source, model, num_training_steps=6)
        state, p = tx.init(params), params
        for _ in range(3):
            updates, state = tx.update(grads, state, p)
            p = {k: p[k] + updates[k] for k in p}
        results.append(p)
    assert all(torch.equal(results[0][k], results[1][k]) for k in params)


# ----------------------------------------------------------------------------------------------------------
# Process settings


def _tf32_flags():
    """TF32 of float32 matmuls and convolutions as torch resolves it (the setting transformers writes too)."""
    backends = torch.backends
    return backends.fp32_precision, backends.cuda.matmul.fp32_precision, backends.cudnn.conv.fp32_precision


def test_apply_process_settings_sets_tf32_and_the_log_level():
    precision = torch.backends.fp32_precision
    ftrain_logger, transformers_logger = logging.getLogger("ftrain"), logging.getLogger("transformers")
    level, transformers_level = ftrain_logger.level, transformers_logger.level
    try:
        plan = make_plan(TrainingArguments(log_level="error"))
        plan = dataclasses.replace(plan, step=dataclasses.replace(plan.step, tf32=False))  # tf32=False on a GPU
        apply_process_settings(plan)
        assert _tf32_flags()[0] == "ieee"
        # transformers' Trainer sets its verbosity the same: the shell's transformers messages follow log_level
        assert ftrain_logger.level == transformers_logger.level == logging.ERROR
        on = dataclasses.replace(plan, step=dataclasses.replace(plan.step, tf32=True))  # tf32=True needs a GPU
        apply_process_settings(on)
        assert _tf32_flags()[0] == "tf32"
        ftrain_logger.setLevel(logging.WARNING)
        apply_process_settings(make_plan(TrainingArguments()))  # tf32=None, log_level="passive": left alone
        assert _tf32_flags()[0] == "tf32" and ftrain_logger.level == logging.WARNING
    finally:
        torch.backends.fp32_precision = precision
        ftrain_logger.setLevel(level)
        transformers_logger.setLevel(transformers_level)


def test_tf32_is_set_as_transformers_sets_it(HFArgs, monkeypatch):
    """The TF32 setting transformers' TrainingArguments writes (through ``enable_tf32``) is the one ftrain's plan
    applies, for tf32 off / unset, with and without torch_compile, on a GPU with and without TF32 (unset with
    torch_compile turns it on where the GPU has it)."""
    import transformers.training_args as hf_training_args

    import ftrain.trainer.plan as plan_module

    writes = {"hf": [], "ftrain": []}
    monkeypatch.setattr(hf_training_args, "enable_tf32", writes["hf"].append)
    monkeypatch.setattr(plan_module, "_enable_tf32", writes["ftrain"].append)
    for tf32 in (False, None):
        for compile_, available in ((False, True), (True, True), (True, False)):
            monkeypatch.setattr(hf_training_args, "is_torch_tf32_available", lambda a=available: a)
            monkeypatch.setattr(plan_module, "tf32_available", lambda a=available: a)
            writes["hf"].clear(), writes["ftrain"].clear()
            HFArgs("out", tf32=tf32, torch_compile=compile_, use_cpu=True, report_to="none")
            apply_process_settings(make_plan(TrainingArguments("out", tf32=tf32, torch_compile=compile_)))
            last = {k: v[-1] if v else None for k, v in writes.items()}
            assert last["ftrain"] == last["hf"], (tf32, compile_, available, writes)
