"""``trainer.accelerator``'s ``accelerator_config`` answers, ``unwrap_model``, ``model_wrapped`` and
``use_configured_state``, against transformers' Trainer (with accelerate's ``Accelerator``) built in the same test.

Everything compared is a configuration value, a dict of settings, an object identity or an error type, so the
comparisons are exact.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from accelerate.state import AcceleratorState  # noqa: E402
from transformers.trainer_pt_utils import AcceleratorConfig as HFAcceleratorConfig  # noqa: E402

from ftrain.trainer import Trainer, TrainingArguments  # noqa: E402
from ftrain.trainer import accelerator as ftrain_accelerator  # noqa: E402
from ftrain.trainer.args import AcceleratorConfig  # noqa: E402
from tests.trainer.test_args_honoured import both  # noqa: E402
from tests.trainer.test_compat import COMMON  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LOADER_SETTINGS = ("split_batches", "dispatch_batches", "even_batches", "use_seedable_sampler", "non_blocking")

CONFIGS = {
    "default": None,
    "partial": {"split_batches": True},
    "every_loader_setting": {"split_batches": True, "dispatch_batches": True, "even_batches": False,
                             "use_seedable_sampler": False, "non_blocking": True},  # fmt: skip
    "sync_each_batch": {"gradient_accumulation_kwargs": {"sync_each_batch": True}},
    "all_plugin_fields": {"gradient_accumulation_kwargs": {"num_steps": 3, "adjust_scheduler": False,
                                                           "sync_with_dataloader": False, "sync_each_batch": True}},
    "plugin_defaults": {"gradient_accumulation_kwargs": {"adjust_scheduler": True, "sync_each_batch": False}},
}  # fmt: skip


@pytest.fixture
def no_accelerate_state():
    """No accelerate state before the test (transformers' Trainer leaves one) and none after it."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def answers(trainer) -> dict:
    """What HF code reads of the accelerator's configuration, and the accumulation the Trainer took over."""
    acc = trainer.accelerator
    state = acc.gradient_state
    return {
        **{name: getattr(acc, name) for name in LOADER_SETTINGS},
        "plugin_kwargs": dict(state.plugin_kwargs),
        "num_steps": state.num_steps,
        "adjust_scheduler": state.adjust_scheduler,
        "sync_with_dataloader": state.sync_with_dataloader,
        "sync_gradients": acc.sync_gradients,
        "accelerator_accumulation": acc.gradient_accumulation_steps,
        "args_accumulation": trainer.args.gradient_accumulation_steps,
    }


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_accelerator_config_answers_like_transformers(HFArgs, tmp_path, name):
    hf, ft = both(HFArgs, tmp_path, accelerator_config=CONFIGS[name])
    assert answers(ft) == answers(hf)


@pytest.mark.parametrize("form", ["transformers_instance", "ftrain_instance", "json_file"])
def test_accelerator_config_forms(HFArgs, tmp_path, form):
    settings = {"split_batches": True, "dispatch_batches": False, "even_batches": False, "use_seedable_sampler": False}
    path = tmp_path / "accelerator_config.json"
    path.write_text(json.dumps(settings))
    hf_config = path if form == "json_file" else HFAcceleratorConfig(**settings)  # transformers takes no ftrain class
    ft_config = {"transformers_instance": hf_config, "ftrain_instance": AcceleratorConfig(**settings)}.get(form, path)
    hf_args = HFArgs(str(tmp_path / "hf"), **COMMON, accelerator_config=hf_config)
    ft_args = TrainingArguments(str(tmp_path / "ft"), **COMMON, accelerator_config=ft_config)
    hf = transformers.Trainer(model=torch.nn.Linear(2, 1), args=hf_args)
    ft = Trainer(model=torch.nn.Linear(2, 1), args=ft_args)
    assert answers(ft) == answers(hf)


def test_accelerator_config_class_is_refused_like_transformers(HFArgs, tmp_path):
    errors = []
    for args_cls, config_cls in ((HFArgs, HFAcceleratorConfig), (TrainingArguments, AcceleratorConfig)):
        with pytest.raises(NotImplementedError) as info:
            args_cls(str(tmp_path), **COMMON, accelerator_config=config_cls)
        errors.append(str(info.value))
    assert all("Tried passing in a callable to `accelerator_config`" in e for e in errors)


def test_num_steps_with_accumulation_is_refused_like_transformers(HFArgs, tmp_path):
    config = {"gradient_accumulation_kwargs": {"num_steps": 4}}
    for trainer_cls, args_cls in ((transformers.Trainer, HFArgs), (Trainer, TrainingArguments)):
        options = dict(COMMON, gradient_accumulation_steps=2, accelerator_config=copy.deepcopy(config))
        args = args_cls(str(tmp_path), **options)
        with pytest.raises(ValueError, match="The `AcceleratorConfig`'s `num_steps` is set but"):
            trainer_cls(model=torch.nn.Linear(2, 1), args=args)


# ---- use_configured_state ------------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_accelerate_state")
def test_configured_state_needs_one_like_transformers(HFArgs, tmp_path):
    for args_cls in (HFArgs, TrainingArguments):
        with pytest.raises(ValueError, match="requires a pre-configured `AcceleratorState` or `PartialState`"):
            args_cls(str(tmp_path), **COMMON, accelerator_config={"use_configured_state": True})


@pytest.mark.usefixtures("no_accelerate_state")
def test_configured_state_is_used_where_it_agrees(HFArgs, tmp_path):
    accelerate.Accelerator(cpu=True)
    hf_args = HFArgs(str(tmp_path / "hf"), **COMMON, accelerator_config={"use_configured_state": True})
    ft_args = TrainingArguments(str(tmp_path / "ft"), **COMMON, accelerator_config={"use_configured_state": True})
    facts = ("device", "world_size", "process_index", "local_process_index")
    assert {n: getattr(ft_args, n) for n in facts} == {n: getattr(hf_args, n) for n in facts}
    assert "use_configured_state" not in ft_args.to_dict()["accelerator_config"]
    assert "use_configured_state" not in hf_args.to_dict()["accelerator_config"]


def test_configured_state_that_disagrees_is_refused(tmp_path, monkeypatch):
    elsewhere = SimpleNamespace(device=torch.device("cuda", 1), num_processes=2, process_index=1)
    monkeypatch.setattr(ftrain_accelerator, "configured_accelerate_state", lambda: elsewhere)
    with pytest.raises(ValueError, match=r"runs process 1 of 2 on cuda:1, while ftrain .* run process 0 of 1 on cpu"):
        TrainingArguments(str(tmp_path), **COMMON, accelerator_config={"use_configured_state": True})


# ---- unwrap_model and model_wrapped ----------------------------------------------------------------------------


@pytest.mark.parametrize("keep_torch_compile", [True, False])
def test_unwrap_model_removes_parallel_containers_like_accelerate(HFArgs, tmp_path, keep_torch_compile):
    hf, ft = both(HFArgs, tmp_path)
    model = ft.model
    for wrap in (lambda m: m, torch.nn.DataParallel, lambda m: torch.nn.DataParallel(torch.nn.DataParallel(m))):
        ours, theirs = (trainer.accelerator.unwrap_model(wrap(model)) for trainer in (ft, hf))
        assert ours is theirs is model
    results = []
    for trainer in (ft, hf):  # each gets its own compiled wrapper: accelerate puts the unwrapped module inside it
        compiled = torch.compile(torch.nn.DataParallel(model))
        out = trainer.accelerator.unwrap_model(compiled, keep_torch_compile=keep_torch_compile)
        results.append((out is compiled, out._orig_mod if out is compiled else out))
    assert results[0] == results[1]
    assert results[0][1] is model


def test_model_wrapped_is_the_model_before_and_after_training(HFArgs, tmp_path):
    hf, ft = both(HFArgs, tmp_path)
    assert (ft.model_wrapped is ft.model) and (hf.model_wrapped is hf.model)
    for trainer in (hf, ft):
        trainer.train()
        first = trainer.model_wrapped
        trainer.train()
        assert trainer.model_wrapped is first is trainer.model  # one CPU process: neither wraps the model


def test_model_wrapped_takes_the_model_or_its_wrapper_only(HFArgs, tmp_path):
    _, ft = both(HFArgs, tmp_path)
    ft.model_wrapped = torch.nn.DataParallel(ft.model)  # as a transformers subclass may assign it
    ft.model_wrapped = ft.model
    assert ft.model_wrapped is ft.model
    with pytest.raises(ValueError, match="model_wrapped can only be the Trainer's model"):
        ft.model_wrapped = torch.nn.Linear(2, 1)
