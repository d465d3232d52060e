"""TrainingArguments and HfArgumentParser against transformers 5.24 (fields, normalisation, errors, parsing).

transformers' ``TrainingArguments.__post_init__`` sets up a device through accelerate, which ftrain does not
depend on. Where accelerate is missing, the ``HFArgs`` fixture replaces only that device lookup (CPU, no GPU);
every other line of transformers' normalisation and validation runs as released.

The numbers compared are argument values as given, or normalised by the same Python arithmetic on both sides
(ratios to step counts): they are compared exactly.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ftrain.trainer.args import (
    AcceleratorConfig,
    DebugOption,
    IntervalStrategy,
    OptimizerNames,
    ParallelMode,
    SaveStrategy,
    SchedulerType,
    TrainingArguments,
)
from ftrain.trainer.hf_argparser import HfArgumentParser, string_to_bool

transformers = pytest.importorskip("transformers")

# Every way ftrain's dataclass differs from transformers' 5.24 one: name -> why.
INTENTIONAL_DIFFERENCES = {
    "evaluation_strategy": "extra field: 4.x name, folded into eval_strategy with a FutureWarning",
    "warmup_ratio": "extra field: 4.x name, folded into warmup_steps (< 1 is a ratio) with a FutureWarning",
    "group_by_length": "extra field: 4.x name, folded into train_sampling_strategy with a FutureWarning",
    "logging_dir": "extra field: 4.x TensorBoard directory, kept for the TensorBoard integration",
    "overwrite_output_dir": "extra field: 4.x flag that scripts read; the Trainer ignores it",
    "save_safetensors": "extra field: 4.x flag; True accepted, False refused (safetensors only)",
    "no_cuda": "extra field: 4.x name, folded into use_cpu with a FutureWarning",
    "eval_loss_reduction": "extra field: ftrain's own; 'batch' (the default) is transformers' eval_loss, 'token' the "
    "exact mean; left out of to_dict at its default",
}
# Behaviour that differs on purpose (asserted in the tests below).
INTENTIONAL_BEHAVIOUR_DIFFERENCES = {
    "n_gpu": "1 on a GPU, 0 on the CPU: ftrain never uses nn.DataParallel over several GPUs in one process",
    "fp16 on CPU": "refused when the args are built (transformers silently trains in float32)",
    "bf16 on CPU": "allowed without use_cpu=True (transformers asks for use_cpu=True)",
    "tf32": "validated, not applied on construction (no global side effect): plan.apply_process_settings applies it",
    "fluent setters": "validate like the constructor and change nothing on an error (transformers' do not validate)",
    "fsdp / deepspeed / parallelism_config": "stored as given; the distributed layer validates and uses them",
    "stricter checks": "batch sizes and gradient_accumulation_steps >= 1, eval_accumulation_steps >= 1, "
    "include_num_input_tokens_seen / train_sampling_strategy / log levels / lr_scheduler_kwargs type checked",
    "world_size / process_index": "read from torch.distributed or the launcher's env; no process group is created",
    "get_process_log_level": "'passive' reads the 'ftrain' logger level, not transformers' verbosity",
}


# HFArgs: tests/trainer/conftest.py


HAS_ACCELERATE = importlib.util.find_spec("accelerate") is not None


def _comparable(d: dict) -> dict:
    """transformers' to_dict output, less ``accelerator_config`` when accelerate (which builds it) is missing."""
    return {k: v for k, v in d.items() if HAS_ACCELERATE or k != "accelerator_config"}


def _pair(HFArgs, tmp_path, **kwargs):
    kwargs = {"output_dir": str(tmp_path), "report_to": "none", **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TrainingArguments(**kwargs), HFArgs(**kwargs)


def _assert_same_dict(ours: dict, theirs: dict) -> None:
    theirs = _comparable(theirs)
    ours = {k: v for k, v in ours.items() if k in theirs}
    assert ours == theirs


# ----------------------------------------------------------------------------------------------------------
# Fields


def test_fields_and_defaults_match_transformers():
    hf = {f.name: f for f in dataclasses.fields(transformers.TrainingArguments)}
    ours = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    assert sorted(set(ours) - set(hf)) == sorted(INTENTIONAL_DIFFERENCES)
    assert set(hf) - set(ours) == set()
    assert [n for n in ours if n in hf] == list(hf)  # same order, so positional use works too

    def default(f):
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    assert {n: default(ours[n]) for n in hf} == {n: default(f) for n, f in hf.items()}
    for name, f in hf.items():  # argparse metadata that changes parsing
        theirs = {k: list(v) if k == "choices" else v for k, v in f.metadata.items() if k != "help"}
        mine = {k: list(v) if k == "choices" else v for k, v in ours[name].metadata.items() if k != "help"}
        assert mine == theirs, name
        assert ours[name].metadata["help"], name


def test_enums_have_transformers_values_and_accept_its_members():
    from transformers.debug_utils import DebugOption as HFDebug
    from transformers.trainer_utils import HubStrategy as HFHub
    from transformers.trainer_utils import IntervalStrategy as HFInterval
    from transformers.trainer_utils import SaveStrategy as HFSave
    from transformers.trainer_utils import SchedulerType as HFSched
    from transformers.training_args import OptimizerNames as HFOptim
    from transformers.training_args import ParallelMode as HFParallel

    from ftrain.trainer.args import HubStrategy

    for ours, theirs in [
        (IntervalStrategy, HFInterval),
        (SaveStrategy, HFSave),
        (HubStrategy, HFHub),
        (SchedulerType, HFSched),
        (OptimizerNames, HFOptim),
        (DebugOption, HFDebug),
        (ParallelMode, HFParallel),
    ]:
        assert [m.value for m in ours] == [m.value for m in theirs]
    assert IntervalStrategy(HFInterval.STEPS) is IntervalStrategy.STEPS
    assert IntervalStrategy.STEPS == HFInterval.STEPS == "steps"
    args = TrainingArguments(eval_strategy=HFInterval.EPOCH, lr_scheduler_type=HFSched.COSINE)
    assert args.eval_strategy is IntervalStrategy.EPOCH and args.lr_scheduler_type is SchedulerType.COSINE
    with pytest.raises(ValueError, match=r"'sometimes' is not a valid IntervalStrategy; valid values are \['no'"):
        TrainingArguments(eval_strategy="sometimes")


def test_importing_args_does_not_import_transformers():
    code = "import sys, ftrain.trainer.args, ftrain.trainer.hf_argparser; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------------------------------------
# Normalisation: the same to_dict() as transformers


NORMALISATION_CASES = [
    {},
    {"output_dir": None},
    {"output_dir": "~/runs/x"},
    {"eval_strategy": "steps", "logging_steps": 50},
    {"eval_strategy": "steps", "eval_steps": 0, "logging_steps": 0.1},
    {"eval_strategy": "epoch", "save_strategy": "epoch", "load_best_model_at_end": True},
    {"eval_strategy": "steps", "eval_steps": 100, "save_steps": 500, "load_best_model_at_end": True},
    {"eval_strategy": "steps", "eval_steps": 0.05, "save_steps": 0.1, "load_best_model_at_end": True},
    {"eval_strategy": "steps", "eval_steps": 0.5, "save_steps": 500, "load_best_model_at_end": True},
    {"eval_strategy": "epoch", "save_strategy": "best", "metric_for_best_model": "accuracy"},
    {"metric_for_best_model": "eval_loss"},
    {"metric_for_best_model": "f1", "greater_is_better": False},
    {"lr_scheduler_type": "reduce_lr_on_plateau", "eval_strategy": "epoch"},
    {"report_to": ["none"]},
    {"report_to": "tensorboard"},
    {"report_to": ["tensorboard", "wandb"]},
    {"lr_scheduler_kwargs": '{"num_cycles": "2", "flag": "true", "x": "0.5", "nested": {"y": "3"}}'},
    {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}},
    {"activation_checkpointing": True},
    {"include_num_input_tokens_seen": True},
    {"include_num_input_tokens_seen": "non_padding"},
    {"torch_compile_mode": "max-autotune"},
    {"torch_compile": True},
    {"logging_steps": 10.0, "save_steps": 30.0, "eval_strategy": "steps", "eval_steps": 5.0},
    {"logging_strategy": "epoch", "logging_steps": 12.5},
    {"use_cpu": True, "bf16": True, "bf16_full_eval": True},
    {"warmup_steps": 0.1, "optim": "sgd", "optim_args": "momentum=0.9"},
    {"hub_token": "secret", "hub_strategy": "checkpoint", "push_to_hub": True, "hub_model_id": "me/model"},
    {"do_eval": False, "eval_strategy": "epoch", "do_predict": True, "do_train": True},
    {"dataloader_num_workers": 2, "dataloader_prefetch_factor": 4, "train_sampling_strategy": "group_by_length"},
    {"label_names": ["labels"], "include_for_metrics": ["inputs", "loss"], "seed": 7, "data_seed": 3},
    {"tf32": False, "log_level": "info", "log_level_replica": "error", "disable_tqdm": True},
]


@pytest.mark.parametrize("kwargs", NORMALISATION_CASES, ids=[str(i) for i in range(len(NORMALISATION_CASES))])
def test_normalised_values_match_transformers(HFArgs, tmp_path, kwargs):
    kwargs = {"output_dir": str(tmp_path), **kwargs} if "output_dir" not in kwargs else kwargs
    ours, theirs = _pair(HFArgs, tmp_path, **kwargs)
    _assert_same_dict(ours.to_dict(), theirs.to_dict())
    assert json.loads(ours.to_json_string()) == ours.to_dict()
    sanitized = _comparable(theirs.to_sanitized_dict())
    assert {k: v for k, v in ours.to_sanitized_dict().items() if k in sanitized} == sanitized
    for name in ("should_log", "should_save", "world_size"):
        assert getattr(ours, name) == getattr(theirs, name), name
    if torch.cuda.device_count() <= 1:  # several GPUs: transformers multiplies by n_gpu (nn.DataParallel)
        assert (ours.train_batch_size, ours.eval_batch_size) == (theirs.train_batch_size, theirs.eval_batch_size)
    assert ours.process_index == theirs.process_index and ours.local_process_index == theirs.local_process_index
    assert ours.parallel_mode.value == theirs.parallel_mode.value and str(ours.device) == str(theirs.device)
    assert ours.mixed_precision == theirs.mixed_precision


def test_normalised_values_by_hand():
    args = TrainingArguments(eval_strategy="steps", logging_steps=20.0, save_steps=40.0, report_to="none")
    assert (args.eval_strategy, args.eval_steps, args.logging_steps, args.save_steps) == ("steps", 20, 20, 40)
    assert type(args.logging_steps) is int and args.do_eval and args.report_to == []
    assert args.output_dir == "trainer_output" and args.metric_for_best_model is None
    args = TrainingArguments("~/x", load_best_model_at_end=True, eval_strategy="epoch", save_strategy="epoch")
    assert args.output_dir.endswith("/x") and "~" not in args.output_dir
    assert (args.metric_for_best_model, args.greater_is_better) == ("loss", False)
    assert TrainingArguments(metric_for_best_model="accuracy").greater_is_better is True
    args = TrainingArguments(lr_scheduler_kwargs='{"num_cycles": "2", "power": "1.5", "on": "True"}')
    assert args.lr_scheduler_kwargs == {"num_cycles": 2, "power": 1.5, "on": True}
    assert TrainingArguments(use_cpu=True).dataloader_pin_memory is False
    args = TrainingArguments(torch_compile_mode="default")
    assert (args.torch_compile, args.torch_compile_backend) == (True, "inductor")
    with pytest.raises(ValueError, match=r"debug=\['underflow_overflow'\] is not provided"):  # parsed, then refused
        TrainingArguments(debug=DebugOption.UNDERFLOW_OVERFLOW)
    assert TrainingArguments(include_num_input_tokens_seen=True).include_num_input_tokens_seen == "all"
    assert TrainingArguments(hub_token="secret").to_dict()["hub_token"] == "<HUB_TOKEN>"
    assert "secret" not in repr(TrainingArguments(hub_token="secret"))


def test_report_to_all_means_installed_integrations(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "tensorboard" else None)
    assert TrainingArguments(report_to="all").report_to == ["tensorboard"]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert TrainingArguments(report_to=["all"]).report_to == []


def test_dataclasses_replace_and_to_dict_round_trip():
    args = TrainingArguments(eval_strategy="steps", warmup_steps=0.1, lr_scheduler_kwargs='{"num_cycles": 2}')
    again = TrainingArguments(**{k: v for k, v in args.to_dict().items() if k != "hub_token"})
    assert again.to_dict() == args.to_dict()
    assert dataclasses.replace(args, learning_rate=1.0).to_dict() == {**args.to_dict(), "learning_rate": 1.0}


# ----------------------------------------------------------------------------------------------------------
# Rejections: transformers' and ftrain's


REJECTED = [
    ({"logging_steps": 10.5}, "logging_steps=10.5 must be a whole number"),
    ({"eval_strategy": "steps", "eval_steps": 12.5}, "eval_steps=12.5 must be a whole number"),
    ({"save_steps": 100.5}, "save_steps=100.5 must be a whole number"),
    ({"logging_steps": 0}, "logging_strategy='steps' needs logging_steps > 0"),
    ({"eval_strategy": "steps", "logging_steps": 0, "logging_strategy": "no"}, "needs eval_steps > 0"),
    (
        {"load_best_model_at_end": True, "eval_strategy": "steps", "save_strategy": "epoch"},
        "eval_strategy='steps' and save_strategy='epoch'",
    ),
    (
        {"load_best_model_at_end": True, "eval_strategy": "steps", "eval_steps": 100, "save_steps": 250},
        r"save_steps \(250\) to be a multiple of eval_steps \(100\)",
    ),
    (
        {"load_best_model_at_end": True, "eval_strategy": "steps", "eval_steps": 0.1, "save_steps": 100},
        "one is a ratio and the other a step count",
    ),
    (
        {"load_best_model_at_end": True, "eval_strategy": "steps", "eval_steps": 0.2, "save_steps": 0.3},
        "save ratio",
    ),
    ({"lr_scheduler_type": "reduce_lr_on_plateau"}, "needs eval_strategy='steps' or 'epoch'"),
    ({"lr_scheduler_type": "greedy"}, "lr_scheduler_type='greedy'"),
    ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
    ({"dataloader_prefetch_factor": 2}, "set dataloader_num_workers > 0"),
    ({"torch_empty_cache_steps": 0}, "torch_empty_cache_steps must be a positive int"),
    ({"use_cpu": True, "fp16_full_eval": True, "bf16_full_eval": True}, "fp16_full_eval"),
    ({"eval_strategy": "bogus"}, "'bogus' is not a valid IntervalStrategy"),
    ({"optim": "adam_extreme"}, "'adam_extreme' is not a valid OptimizerNames"),
]


@pytest.mark.parametrize("kwargs, message", REJECTED, ids=[m[:30] for _, m in REJECTED])
def test_rejections_match_transformers(HFArgs, tmp_path, kwargs, message):
    kwargs = {"output_dir": str(tmp_path), "report_to": "none", **kwargs}
    with pytest.raises(ValueError, match=message):
        TrainingArguments(**kwargs)
    with pytest.raises(ValueError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        HFArgs(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be an int >= 1"),
        ({"gradient_accumulation_steps": 1.5}, "gradient_accumulation_steps must be an int >= 1"),
        ({"eval_accumulation_steps": 0}, "eval_accumulation_steps must be >= 1"),
        ({"include_num_input_tokens_seen": "some"}, "include_num_input_tokens_seen must be"),
        ({"train_sampling_strategy": "shuffled"}, "train_sampling_strategy='shuffled' is not one of"),
        ({"log_level": "loud"}, "log_level='loud' is not one of"),
        ({"lr_scheduler_kwargs": "kwargs.json"}, "lr_scheduler_kwargs must be a dict or a JSON object"),
        ({"lr_scheduler_kwargs": "{not json"}, "lr_scheduler_kwargs is not valid JSON"),
        ({"accelerator_config": {"split_batch": True}}, r"unknown keys \['split_batch'\]"),
    ],
)
def test_ftrain_rejections(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainingArguments(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusals")
def test_settings_that_need_a_gpu_are_refused_on_cpu():
    with pytest.raises(ValueError, match=r"fp16=True needs a CUDA GPU .* use bf16=True"):
        TrainingArguments(fp16=True)
    with pytest.raises(ValueError, match="fp16 and bf16 are both True"):
        TrainingArguments(fp16=True, bf16=True)
    with pytest.raises(ValueError, match="tf32=True needs an Ampere or newer CUDA GPU"):
        TrainingArguments(tf32=True)
    assert TrainingArguments(bf16=True).mixed_precision == "bf16"  # bf16 runs on the CPU


def test_accelerator_config_forms(tmp_path):
    assert TrainingArguments().accelerator_config == AcceleratorConfig()
    path = tmp_path / "acc.json"
    path.write_text(json.dumps({"split_batches": True}))
    assert TrainingArguments(accelerator_config=str(path)).accelerator_config.split_batches is True
    args = TrainingArguments(accelerator_config='{"even_batches": "false"}')
    assert args.accelerator_config.even_batches is False
    assert args.to_dict()["accelerator_config"]["even_batches"] is False


def test_distributed_settings_are_stored_for_the_distributed_layer():
    args = TrainingArguments(fsdp="full_shard", fsdp_config='{"version": "2"}', deepspeed={"zero_optimization": {}})
    assert (args.fsdp, args.fsdp_config, args.deepspeed) == ("full_shard", {"version": 2}, {"zero_optimization": {}})


# ----------------------------------------------------------------------------------------------------------
# transformers 4.x names


def test_legacy_names_warn_and_fold_into_5x_fields():
    with pytest.warns(FutureWarning) as record:
        args = TrainingArguments(
            evaluation_strategy="steps", warmup_ratio=0.1, group_by_length=True, no_cuda=True, logging_dir="~/tb"
        )
    messages = " ".join(str(w.message) for w in record)
    for name in ("evaluation_strategy", "warmup_ratio", "group_by_length", "no_cuda", "logging_dir"):
        assert f"`{name}` is a transformers 4.x argument" in messages
    assert record[0].filename == __file__  # the warning points at the caller
    assert args.eval_strategy is IntervalStrategy.STEPS and args.eval_steps == 500 and args.do_eval
    assert args.warmup_steps == 0.1 and args.get_warmup_steps(95) == 10
    assert args.train_sampling_strategy == "group_by_length" and args.use_cpu
    assert args.logging_dir.endswith("/tb") and "~" not in args.logging_dir
    d = args.to_dict()
    assert "logging_dir" in d and not {"evaluation_strategy", "warmup_ratio", "group_by_length", "no_cuda"} & set(d)
    assert set(TrainingArguments().to_dict()) == {f.name for f in dataclasses.fields(transformers.TrainingArguments)}


def test_legacy_names_conflicts_and_refusals():
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="evaluation_strategy='epoch' and eval_strategy"):
        TrainingArguments(evaluation_strategy="epoch", eval_strategy="steps")
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match=r"warmup_ratio must be in \[0, 1\)"):
        TrainingArguments(warmup_ratio=1.0)
    with pytest.warns(UserWarning, match="warmup_ratio is ignored"), pytest.warns(FutureWarning):
        assert TrainingArguments(warmup_ratio=0.5, warmup_steps=7).warmup_steps == 7
    with pytest.raises(ValueError, match="ftrain writes safetensors only"):
        TrainingArguments(save_safetensors=False)
    with pytest.warns(FutureWarning, match="overwrite_output_dir"):
        assert TrainingArguments(overwrite_output_dir=True).overwrite_output_dir is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainingArguments(overwrite_output_dir=False, group_by_length=None)  # unset or False: silent


# ----------------------------------------------------------------------------------------------------------
# Properties


@settings(max_examples=200, deadline=None)
@given(warmup=st.one_of(st.integers(0, 50), st.floats(0, 0.999)), total=st.integers(1, 10_000))
def test_get_warmup_steps_matches_transformers(warmup, total):
    args = TrainingArguments(warmup_steps=warmup)
    assert args.get_warmup_steps(total) == transformers.TrainingArguments.get_warmup_steps(args, total)


def test_process_properties_follow_the_launcher(monkeypatch):
    args = TrainingArguments(use_cpu=True, per_device_train_batch_size=4)
    assert (args.world_size, args.process_index, args.local_process_index, args.n_gpu) == (1, 0, 0, 0)
    assert args.parallel_mode is ParallelMode.NOT_PARALLEL and args.device == torch.device("cpu")
    assert args.train_batch_size == 4 and args.should_log and args.should_save
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (args.world_size, args.process_index, args.local_process_index) == (4, 3, 1)
    assert args.parallel_mode is ParallelMode.DISTRIBUTED and not args.should_log and not args.should_save
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert args.should_log and not args.should_save  # log_on_each_node=True, save_on_each_node=False
    args.log_on_each_node, args.save_on_each_node = False, True
    assert not args.should_log and args.should_save
    monkeypatch.delenv("LOCAL_RANK")
    assert TrainingArguments(local_rank=2).local_process_index == 2
    assert args.ddp_timeout_delta.total_seconds() == 1800


def test_process_log_level(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    args = TrainingArguments(log_level="error", log_level_replica="info")
    assert args.get_process_log_level() == logging.INFO  # a replica
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert args.get_process_log_level() == logging.ERROR
    args.log_level = "passive"
    assert args.get_process_log_level() == logging.getLogger("ftrain").getEffectiveLevel()


def test_main_process_first_orders_processes_with_barriers(monkeypatch):
    events = []
    args = TrainingArguments()
    with args.main_process_first():
        events.append("work")
    assert events == ["work"]  # single process: no barrier
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "barrier", lambda: events.append("barrier"))
    for rank, expected in ((0, ["work", "barrier"]), (1, ["barrier", "work"])):
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        events.clear()
        with args.main_process_first(local=False):
            events.append("work")
        assert events == expected


# ----------------------------------------------------------------------------------------------------------
# Fluent setters


SETTER_CALLS = [
    ("set_training", {}),
    ("set_training", {"learning_rate": 1e-4, "batch_size": 32, "max_steps": 10, "activation_checkpointing": True}),
    ("set_evaluate", {"strategy": "steps", "steps": 100, "delay": 2.0, "loss_only": True}),
    ("set_evaluate", {}),
    ("set_testing", {"batch_size": 32}),
    ("set_save", {"strategy": "epoch", "total_limit": 2, "on_each_node": True}),
    ("set_logging", {"strategy": "steps", "steps": 10, "level": "info", "first_step": True}),
    ("set_push_to_hub", {"model_id": "me/model", "strategy": "end", "token": "t", "private_repo": True}),
    ("set_optimizer", {"name": "sgd", "learning_rate": 0.1, "beta1": 0.8, "args": "momentum=0.9"}),
    ("set_lr_scheduler", {"name": "cosine", "warmup_steps": 0.05, "num_epochs": 2}),
    ("set_dataloader", {"train_batch_size": 16, "num_workers": 2, "sampler_seed": 3, "in_order": False}),
]


@pytest.mark.parametrize("method, kwargs", SETTER_CALLS, ids=[m for m, _ in SETTER_CALLS])
def test_fluent_setters_match_transformers(HFArgs, tmp_path, method, kwargs):
    ours, theirs = _pair(HFArgs, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert getattr(ours, method)(**kwargs) is ours
        getattr(theirs, method)(**kwargs)
    _assert_same_dict(ours.to_dict(), theirs.to_dict())


def test_setters_reject_zero_steps():
    for method in ("set_evaluate", "set_save", "set_logging"):
        args = TrainingArguments()
        before = args.to_dict()
        with pytest.raises(ValueError, match="strategy='steps' needs steps > 0"):
            getattr(args, method)(strategy="steps", steps=0)
        assert args.to_dict() == before


_BEST_BY_STEPS = {"load_best_model_at_end": True, "eval_strategy": "steps", "eval_steps": 100, "save_steps": 500}
# (arguments, setter, its keyword arguments, the constructor keyword arguments that say the same)
SETTER_REFUSALS = [
    ({}, "set_training", {"batch_size": 0}, {"per_device_train_batch_size": 0}),
    ({}, "set_training", {"gradient_accumulation_steps": 0}, {"gradient_accumulation_steps": 0}),
    ({}, "set_evaluate", {"batch_size": 0}, {"per_device_eval_batch_size": 0}),
    ({}, "set_evaluate", {"strategy": "steps", "steps": 2.5}, {"eval_strategy": "steps", "eval_steps": 2.5}),
    ({}, "set_evaluate", {"accumulation_steps": 0}, {"eval_accumulation_steps": 0}),
    ({}, "set_testing", {"batch_size": -1}, {"per_device_eval_batch_size": -1}),
    ({}, "set_save", {"steps": 10.5}, {"save_steps": 10.5}),
    (_BEST_BY_STEPS, "set_save", {"strategy": "epoch"}, {"save_strategy": "epoch"}),
    (_BEST_BY_STEPS, "set_save", {"steps": 250}, {"save_steps": 250}),
    ({}, "set_logging", {"level": "loud"}, {"log_level": "loud"}),
    ({}, "set_logging", {"steps": 12.5}, {"logging_steps": 12.5}),
    ({}, "set_lr_scheduler", {"name": "reduce_lr_on_plateau"}, {"lr_scheduler_type": "reduce_lr_on_plateau"}),
    ({}, "set_lr_scheduler", {"warmup_steps": -1}, {"warmup_steps": -1}),
    ({}, "set_dataloader", {"prefetch_factor": 2}, {"dataloader_prefetch_factor": 2}),
    ({}, "set_dataloader", {"train_batch_size": 0}, {"per_device_train_batch_size": 0}),
    ({}, "set_optimizer", {"name": "adam_extreme"}, {"optim": "adam_extreme"}),
    ({}, "set_push_to_hub", {"model_id": "me/m", "strategy": "sometimes"}, {"hub_strategy": "sometimes"}),
]


@pytest.mark.parametrize(
    "base, method, kwargs, same_as", SETTER_REFUSALS, ids=[f"{m}-{sorted(k)}" for _, m, k, _ in SETTER_REFUSALS]
)
def test_setters_validate_like_the_constructor_and_change_nothing_on_error(base, method, kwargs, same_as):
    with pytest.raises(ValueError) as constructor_error:
        TrainingArguments(**{**base, **same_as})
    args = TrainingArguments(**base)
    before, text = args.to_dict(), repr(args)
    with pytest.raises(ValueError) as setter_error:
        getattr(args, method)(**kwargs)
    assert str(setter_error.value) == str(constructor_error.value)
    assert args.to_dict() == before and repr(args) == text


def test_setters_store_values_the_constructor_accepts():
    args = TrainingArguments(eval_strategy="epoch").set_lr_scheduler(name="reduce_lr_on_plateau", warmup_steps=3)
    assert (args.lr_scheduler_type, args.warmup_steps) == (SchedulerType.REDUCE_ON_PLATEAU, 3)
    args = TrainingArguments(**_BEST_BY_STEPS).set_save(strategy="steps", steps=300)
    assert args.save_steps == 300
    assert TrainingArguments().set_dataloader(num_workers=2, prefetch_factor=4).dataloader_prefetch_factor == 4


def test_bf16_on_a_gpu_without_bfloat16_gives_advice_ftrain_can_follow(monkeypatch):
    monkeypatch.setattr(TrainingArguments, "_cuda_usable", lambda self: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(ValueError, match="no bfloat16 support") as error:
        TrainingArguments(bf16=True)
    assert "Leave bf16 off" in str(error.value) and "use fp16=True" not in str(error.value)
    with pytest.raises(ValueError, match="fp16=True .* is not implemented"):
        TrainingArguments(fp16=True)  # what the old advice led to


# ----------------------------------------------------------------------------------------------------------
# HfArgumentParser


TRAINING_ARGS_COMMAND_LINES = [
    ["--output_dir", "o", "--learning_rate", "3e-4", "--do_train", "--do_eval"],
    ["--no_remove_unused_columns", "--no-dataloader-pin-memory"],
    ["--remove_unused_columns", "false", "--logging_first_step", "True", "--save_only_model", "1"],
    ["--eval_strategy", "steps", "--eval_steps", "20", "--logging_steps", "10", "--save_steps", "40"],
    [
        "--load_best_model_at_end",
        "--eval_strategy",
        "epoch",
        "--save_strategy",
        "epoch",
        "--metric_for_best_model",
        "f1",
    ],
    [
        "--lr_scheduler_type",
        "cosine_with_min_lr",
        "--lr_scheduler_kwargs",
        '{"min_lr_rate": 0.1}',
        "--warmup_steps",
        "0.1",
    ],
    ["--optim", "sgd", "--optim_args", "momentum=0.9,nesterov=True", "--weight_decay", "0.01"],
    ["--report_to", "tensorboard"],
    ["--report_to", "none", "--run_name", "r1", "--project", "p"],
    ["--label_names", "start_positions", "end_positions", "--include_for_metrics", "inputs", "loss"],
    ["--bf16", "--use_cpu"],
    ["--bf16", "true", "--use_cpu", "1", "--bf16_full_eval", "yes"],
    ["--activation_checkpointing"],
    ["--gradient_checkpointing", "--gradient_checkpointing_kwargs", '{"use_reentrant": false}'],
    ["--tf32", "false", "--max_steps", "100", "--per-device-train-batch-size", "4", "--num_train_epochs", "1.5"],
    ["--include_num_input_tokens_seen"],
    ["--hub_strategy", "checkpoint", "--push_to_hub", "--hub_model_id", "me/m", "--hub_private_repo", "true"],
    ["--log_level", "info", "--log_level_replica", "error", "--disable_tqdm", "true"],
    ["--dataloader_num_workers", "2", "--dataloader_prefetch_factor", "4", "--dataloader_persistent_workers"],
    ["--seed", "7", "--data_seed", "3", "--full_determinism", "--dataloader_multiprocessing_context", "spawn"],
    ["--trackio_static_space_id", "x/y", "--train_sampling_strategy", "group_by_length"],
    ["--torch_compile_mode", "reduce-overhead", "--save_total_limit", "2", "--eval_delay", "1.5"],
    ["--accelerator_config", '{"split_batches": true}', "--ddp_find_unused_parameters", "false", "--ddp_timeout", "60"],
]


@pytest.mark.parametrize("argv", TRAINING_ARGS_COMMAND_LINES, ids=[a[0] for a in TRAINING_ARGS_COMMAND_LINES])
def test_parser_gives_transformers_values_for_training_arguments(HFArgs, tmp_path, argv):
    argv = ["--output_dir", str(tmp_path), *argv] if "--output_dir" not in argv else argv
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (ours,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(argv, look_for_args_file=False)
        (theirs,) = transformers.HfArgumentParser(HFArgs).parse_args_into_dataclasses(argv, look_for_args_file=False)
        # transformers' own parser over ftrain's dataclass gives the same too (the annotations are compatible)
        (mixed,) = transformers.HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
            argv, look_for_args_file=False
        )
    _assert_same_dict(ours.to_dict(), theirs.to_dict())
    assert mixed.to_dict() == ours.to_dict()


class Color(Enum):
    RED = "red"
    BLUE = "blue"


@dataclass
class ModelArguments:
    model_name: str = field(metadata={"help": "Model to fine-tune."})
    n_layers: int = 3
    dropout: float | None = None
    freeze: bool = False
    shuffle: bool = field(default=True, metadata={"help": "Shuffle the data."})
    cache: bool | None = None
    color: Color = Color.RED
    mode: Literal["train", "eval"] = "train"
    tags: list[str] = field(default_factory=list)
    ids: list[int] | None = None
    name_or_none: str | None = field(default=None, metadata={"aliases": ["-n"]})


USER_COMMAND_LINES = [
    ["--model_name", "gpt2"],
    ["--model_name", "gpt2", "--n_layers", "6", "--dropout", "0.1", "--freeze", "--no_shuffle"],
    ["--model-name", "gpt2", "--shuffle", "false", "--cache", "true", "--color", "blue", "--mode", "eval"],
    ["--model_name", "x", "--tags", "a", "b", "--ids", "1", "2", "3", "-n", "alias"],
    ["--model_name", "x", "--freeze", "no", "--no-shuffle", "--name_or_none", "y"],
]


@pytest.mark.parametrize("argv", USER_COMMAND_LINES)
def test_parser_gives_transformers_values_for_a_user_dataclass(argv):
    ours = HfArgumentParser(ModelArguments).parse_args_into_dataclasses(argv, look_for_args_file=False)
    theirs = transformers.HfArgumentParser(ModelArguments).parse_args_into_dataclasses(argv, look_for_args_file=False)
    assert ours == theirs


def test_parser_beyond_transformers():
    parser = HfArgumentParser([ModelArguments, TrainingArguments])
    with pytest.warns(FutureWarning, match="group_by_length"):
        model_args, args = parser.parse_args_into_dataclasses(
            ["--model_name", "m", "--cache", "--report_to", "tensorboard", "wandb", "--include_num_input_tokens_seen",
             "non_padding", "--group_by_length"],
            look_for_args_file=False,
        )  # fmt: skip
    assert model_args.cache is True and args.report_to == ["tensorboard", "wandb"]
    assert args.include_num_input_tokens_seen == "non_padding" and args.train_sampling_strategy == "group_by_length"

    @dataclass
    class Extra:
        cfg: dict | None = None
        step: int | float = 1

    (extra,) = HfArgumentParser(Extra).parse_args_into_dataclasses(
        ["--cfg", '{"a": 1}', "--step", "0.5"], look_for_args_file=False
    )
    assert extra == Extra(cfg={"a": 1}, step=0.5)


def test_parser_errors_are_one_line(capsys):
    parser = HfArgumentParser(TrainingArguments)
    with pytest.raises(ValueError, match=r"\['--learnin_rate', '3'\].*did you mean --learning_rate\?") as err:
        parser.parse_args_into_dataclasses(["--learnin_rate", "3"], look_for_args_file=False)
    assert "\n" not in str(err.value)
    for argv, expected in [
        (["--learning_rate", "abc"], "argument --learning_rate/--learning-rate: invalid float value: 'abc'"),
        (["--eval_strategy", "often"], "invalid choice: 'often'"),
        (["--do_train", "maybe"], "expected a boolean"),
        (["--accelerator_config"], "expected one argument"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], lines
    with pytest.raises(SystemExit):
        HfArgumentParser(ModelArguments).parse_args_into_dataclasses([], look_for_args_file=False)
    assert "--model_name" in capsys.readouterr().err


def test_help_lists_every_field_with_its_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(["--help"], look_for_args_file=False)
    assert exit_info.value.code == 0
    squeezed = "".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainingArguments):
        assert f"--{f.name}" in squeezed
        assert "".join(f.metadata["help"].split()) in squeezed, f.name


def test_parse_dict_json_yaml_and_args_files(tmp_path):
    parser = HfArgumentParser([ModelArguments, TrainingArguments])
    data = {"model_name": "m", "learning_rate": 0.1, "eval_strategy": "epoch", "output_dir": str(tmp_path)}
    model_args, args = parser.parse_dict(data)
    assert model_args.model_name == "m" and args.learning_rate == 0.1 and args.do_eval
    with pytest.raises(ValueError, match=r"keys not used by any dataclass: \['learnig_rate'\].*learning_rate"):
        parser.parse_dict({**data, "learnig_rate": 1})
    assert len(parser.parse_dict({**data, "other": 1}, allow_extra_keys=True)) == 2
    (tmp_path / "a.json").write_text(json.dumps(data))
    assert parser.parse_json_file(tmp_path / "a.json")[1].to_dict() == args.to_dict()
    (tmp_path / "a.yaml").write_text("model_name: m\nlearning_rate: 0.1\neval_strategy: epoch\n")
    assert parser.parse_yaml_file(tmp_path / "a.yaml")[1].learning_rate == 0.1
    theirs = transformers.HfArgumentParser(ModelArguments).parse_dict({"model_name": "m", "tags": ["a"]})
    assert HfArgumentParser(ModelArguments).parse_dict({"model_name": "m", "tags": ["a"]}) == theirs
    (tmp_path / "base.args").write_text("--model_name from_file --n_layers 2")
    (tmp_path / "more.args").write_text("--n_layers 5")
    p = HfArgumentParser(ModelArguments)
    (m,) = p.parse_args_into_dataclasses(["--freeze"], args_filename=tmp_path / "base.args")
    assert (m.model_name, m.n_layers, m.freeze) == ("from_file", 2, True)
    (m,) = p.parse_args_into_dataclasses(
        ["--extra_args", str(tmp_path / "more.args")],
        args_filename=tmp_path / "base.args",
        args_file_flag="--extra_args",
    )
    assert m.n_layers == 5
    namespace_parser = HfArgumentParser(ModelArguments)
    namespace_parser.add_argument("--verbose", action="store_true")
    _, ns, rest = namespace_parser.parse_args_into_dataclasses(
        ["--model_name", "m", "--verbose", "--unknown"], return_remaining_strings=True, look_for_args_file=False
    )
    assert ns.verbose is True and rest == ["--unknown"]


def test_string_to_bool():
    assert [string_to_bool(v) for v in ("yes", "TRUE", "t", "1", "no", "False", "f", "0", True)] == [True] * 4 + [
        False
    ] * 4 + [True]
