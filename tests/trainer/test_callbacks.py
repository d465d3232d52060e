"""ftrain.trainer callbacks, state and integrations against transformers' own classes (the reference).

The same ``transformers.TrainingArguments`` object is given to ftrain's and transformers' callbacks: ftrain's only
read attributes, so they must decide the same with it (and with ftrain's own arguments later).

The numbers here are step counts, thresholds and logged values passed through or formatted by the same Python
arithmetic on both sides, with no float kernel in between: they are compared exactly.
"""

import dataclasses
import functools
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from ftrain.trainer import callbacks as ft
from ftrain.trainer import integrations
from ftrain.trainer.utils import strategy_value

transformers = pytest.importorskip("transformers", reason="transformers is the reference for these tests")
hf = pytest.importorskip("transformers.trainer_callback")

TENSORBOARD = integrations.is_tensorboard_available()


@functools.cache
def _hf_args_cached(items: tuple) -> "transformers.TrainingArguments":
    kwargs = dict(output_dir=os.path.join("/tmp", "ftrain-test-never-written"), report_to="none", use_cpu=True)
    kwargs.update(items)
    TrainingArguments = transformers.TrainingArguments
    if importlib.util.find_spec("accelerate") is not None:
        return TrainingArguments(**kwargs)
    # Without accelerate, transformers cannot pick a device in __post_init__; nothing tested here reads the device,
    # so give it the CPU and keep the rest of its argument handling (enums, ratios, eval_steps fallback) real.
    with mock.patch.object(TrainingArguments, "_setup_devices", new=property(lambda self: torch.device("cpu"))):
        return TrainingArguments(**kwargs)


def hf_args(**kwargs) -> "transformers.TrainingArguments":
    """``transformers.TrainingArguments(output_dir=..., report_to="none", use_cpu=True, **kwargs)``, cached."""
    return _hf_args_cached(tuple(sorted(kwargs.items())))


@functools.cache
def _ftrain_args_cached(items: tuple):
    from ftrain.trainer.args import TrainingArguments

    return TrainingArguments(
        output_dir=os.path.join("/tmp", "ftrain-test-never-written"), report_to="none", **dict(items)
    )


def ftrain_args(**kwargs):
    """ftrain's own ``TrainingArguments`` with the keywords given to :func:`hf_args`, cached."""
    return _ftrain_args_cached(tuple(sorted(kwargs.items())))


def _flags(control) -> tuple:
    return tuple(getattr(control, f.name) for f in dataclasses.fields(ft.TrainerControl))


# --------------------------------------------------------------------------------------------------------------------
# DefaultFlowCallback: same decisions as transformers' at every step and epoch end
# --------------------------------------------------------------------------------------------------------------------


def _act_on(handler, args, state, control):
    """What the trainer does after a decision: log, evaluate, save (each resets its own switch)."""
    if control.should_log:
        control = handler.on_log(args, state, control, logs={})
    if control.should_evaluate:
        control = handler.on_evaluate(args, state, control, metrics={})
    if control.should_save:
        control = handler.on_save(args, state, control)
    return control


def simulate(lib, args, max_steps: int, steps_per_epoch: int) -> list:
    """Runs transformers' loop skeleton with ``lib``'s handler and flow callback; records every decision."""
    state, control = lib.TrainerState(), lib.TrainerControl()
    state.compute_steps(args, max_steps)
    state.max_steps = max_steps
    handler = lib.CallbackHandler([lib.DefaultFlowCallback], None, None, None, None)
    trace = [("steps", state.logging_steps, state.eval_steps, state.save_steps)]
    control = handler.on_train_begin(args, state, control)
    for epoch in range(math.ceil(max_steps / steps_per_epoch)):
        control = handler.on_epoch_begin(args, state, control)
        for micro in range(steps_per_epoch):
            control = handler.on_step_begin(args, state, control)
            state.global_step += 1
            state.epoch = epoch + (micro + 1) / steps_per_epoch
            control = handler.on_step_end(args, state, control)
            trace.append(("step", state.global_step, _flags(control)))
            control = _act_on(handler, args, state, control)
            if control.should_epoch_stop or control.should_training_stop:
                break
        control = handler.on_epoch_end(args, state, control)
        trace.append(("epoch", epoch, _flags(control)))
        control = _act_on(handler, args, state, control)
        if control.should_training_stop:
            break
    return trace


STEPS = st.one_of(st.integers(1, 12), st.sampled_from([0.05, 0.1, 0.25, 1 / 3, 0.5, 0.75]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    logging_strategy=st.sampled_from(["no", "steps", "epoch"]),
    eval_strategy=st.sampled_from(["no", "steps", "epoch"]),
    save_strategy=st.sampled_from(["no", "steps", "epoch", "best"]),
    logging_steps=STEPS,
    eval_steps=st.one_of(st.none(), STEPS),
    save_steps=STEPS,
    eval_delay=st.one_of(st.integers(0, 8), st.sampled_from([0.5, 1.5, 2.0])),
    logging_first_step=st.booleans(),
    max_steps=st.integers(1, 40),
    steps_per_epoch=st.integers(1, 12),
)
def test_default_flow_decides_like_transformers(max_steps, steps_per_epoch, **kwargs):
    try:
        args = hf_args(**kwargs)
    except ValueError:
        reject()
    expected = simulate(hf, args, max_steps, steps_per_epoch)
    assert simulate(ft, args, max_steps, steps_per_epoch) == expected
    # The same decisions from plain attributes with string strategies (ftrain's own arguments need not use enums).
    names = ("logging_strategy", "eval_strategy", "save_strategy", "logging_steps", "eval_steps", "save_steps")
    plain = SimpleNamespace(**{n: strategy_value(getattr(args, n)) for n in names})
    plain.eval_delay, plain.logging_first_step = args.eval_delay, args.logging_first_step
    assert simulate(ft, plain, max_steps, steps_per_epoch) == expected
    # And from ftrain's own TrainingArguments, built from the same keywords (save_strategy="best" needs a metric there:
    # ftrain refuses it without one when the arguments are built, transformers when its Trainer is; the flow does not
    # read the metric).
    if kwargs["save_strategy"] == "best":
        kwargs["metric_for_best_model"] = "loss"
    assert simulate(ft, ftrain_args(**kwargs), max_steps, steps_per_epoch) == expected


def test_default_flow_example_by_hand():
    args = hf_args(logging_steps=2, eval_strategy="steps", eval_steps=3, save_steps=4, logging_first_step=True)
    trace = simulate(ft, args, max_steps=5, steps_per_epoch=10)
    # (stop, epoch stop, save, evaluate, log) after each step: log 1, 2, 4; eval 3 and at the end; save 4 and at the end
    assert trace == [
        ("steps", 2, 3, 4),
        ("step", 1, (False, False, False, False, True)),
        ("step", 2, (False, False, False, False, True)),
        ("step", 3, (False, False, False, True, False)),
        ("step", 4, (False, False, True, False, True)),
        ("step", 5, (True, False, True, True, False)),
        ("epoch", 0, (True, False, False, False, False)),
    ]


# --------------------------------------------------------------------------------------------------------------------
# TrainerState JSON
# --------------------------------------------------------------------------------------------------------------------

NUMBER = st.one_of(st.integers(-(10**6), 10**6), st.floats(allow_nan=False, allow_infinity=False, width=64))
LOG = st.dictionaries(st.sampled_from(["loss", "grad_norm", "learning_rate", "epoch", "eval_acc"]), NUMBER)


@settings(max_examples=60, deadline=None)
@given(
    epoch=NUMBER,
    global_step=st.integers(0, 10**6),
    logging_steps=st.integers(1, 1000),
    train_batch_size=st.one_of(st.none(), st.integers(1, 64)),
    total_flos=NUMBER,
    log_history=st.lists(LOG, max_size=4),
    best_metric=st.one_of(st.none(), NUMBER),
    best_model_checkpoint=st.one_of(st.none(), st.text(max_size=20)),
    trial_params=st.one_of(st.none(), st.dictionaries(st.text(max_size=5), NUMBER, max_size=3)),
    patience_counter=st.integers(0, 5),
    control_flags=st.lists(st.booleans(), min_size=5, max_size=5),
)
def test_trainer_state_json_is_byte_identical_to_transformers(tmp_path_factory, patience_counter, control_flags, **kw):
    names = [f.name for f in dataclasses.fields(ft.TrainerControl)]

    def callbacks(lib):
        es = lib.EarlyStoppingCallback(early_stopping_patience=3, early_stopping_threshold=0.01)
        es.early_stopping_patience_counter = patience_counter
        return [es, lib.TrainerControl(**dict(zip(names, control_flags))), lib.EarlyStoppingCallback()]

    ours = ft.TrainerState(**kw, stateful_callbacks=callbacks(ft))
    theirs = hf.TrainerState(**kw, stateful_callbacks=callbacks(hf))
    folder = tmp_path_factory.mktemp("state")
    ours.save_to_json(folder / "ours.json")
    theirs.save_to_json(folder / "theirs.json")
    assert (folder / "ours.json").read_bytes() == (folder / "theirs.json").read_bytes()
    # Each library reads the other's file back to the same content.
    assert ft.TrainerState.load_from_json(folder / "theirs.json") == ours
    assert dataclasses.asdict(hf.TrainerState.load_from_json(folder / "ours.json")) == dataclasses.asdict(ours)


def test_trainer_state_json_defaults_match_transformers(tmp_path):
    ft.TrainerState().save_to_json(tmp_path / "ours.json")
    hf.TrainerState().save_to_json(tmp_path / "theirs.json")
    assert (tmp_path / "ours.json").read_bytes() == (tmp_path / "theirs.json").read_bytes()
    assert (tmp_path / "ours.json").read_text().endswith('"trial_params": null\n}\n')
    ours, theirs = ft.TrainerState(), hf.TrainerState()
    assert [f.name for f in dataclasses.fields(ours)] == [f.name for f in dataclasses.fields(theirs)]
    assert dataclasses.asdict(ours) == dataclasses.asdict(theirs)
    assert ours.to_json_string() == json.dumps(dataclasses.asdict(theirs), indent=2, sort_keys=True) + "\n"
    with pytest.raises(TypeError, match="state\\(\\) and from_state\\(\\)"):
        ft.TrainerState(stateful_callbacks=[ft.ProgressCallback()])


def test_trainer_state_loads_a_file_with_unknown_keys_with_a_warning(tmp_path, caplog):
    content = dataclasses.asdict(hf.TrainerState(global_step=4))
    content["added_by_a_future_version"] = 1
    (tmp_path / "trainer_state.json").write_text(json.dumps(content))
    with caplog.at_level(logging.WARNING):
        state = ft.TrainerState.load_from_json(tmp_path / "trainer_state.json")
    assert state.global_step == 4
    assert "added_by_a_future_version" in caplog.text


@pytest.mark.parametrize("max_steps", [1, 7, 100, 1001])
def test_compute_steps_resolves_ratios_like_transformers(max_steps):
    args = hf_args(logging_steps=0.1, eval_strategy="steps", eval_steps=0.25, save_steps=30)
    ours, theirs = ft.TrainerState(), hf.TrainerState()
    ours.compute_steps(args, max_steps)
    theirs.compute_steps(args, max_steps)
    got = (ours.logging_steps, ours.eval_steps, ours.save_steps)
    assert got == (theirs.logging_steps, theirs.eval_steps, theirs.save_steps)
    assert got == (math.ceil(max_steps * 0.1), math.ceil(max_steps * 0.25), 30)


def test_init_training_references_matches_transformers():
    trainer = SimpleNamespace(
        hp_name=lambda trial: f"trial-{trial['n']}",
        _trial={"n": 3},
        is_local_process_zero=lambda: True,
        is_world_process_zero=lambda: False,
    )
    ours, theirs = ft.TrainerState(), hf.TrainerState()
    ours.init_training_references(trainer, 120, 3, None)
    theirs.init_training_references(trainer, 120, 3, None)
    assert ours == ft.TrainerState(**dataclasses.asdict(theirs))
    assert (ours.trial_name, ours.max_steps, ours.is_world_process_zero) == ("trial-3", 120, False)
    ours.init_training_references(trainer, 10, 1, {"learning_rate": 1e-4})  # a ray / wandb trial is a dict
    assert ours.trial_params == {"learning_rate": 1e-4}
    ours.init_training_references(trainer, 10, 1, SimpleNamespace(params={"seed": 3}))  # an optuna trial
    assert ours.trial_params == {"seed": 3}


# --------------------------------------------------------------------------------------------------------------------
# CallbackHandler
# --------------------------------------------------------------------------------------------------------------------


class Recorder:
    """A duck-typed callback (no base class) that records each call, and replaces ``control`` on some events."""

    def __init__(self, name, log, replace_on=()):
        self.name, self.log, self.replace_on = name, log, replace_on

    def __getattr__(self, event):
        if not event.startswith("on_"):
            raise AttributeError(event)

        def method(args, state, control, **kwargs):
            self.log.append((self.name, event, _flags(control), sorted(kwargs), kwargs.get("metrics")))
            if event in self.replace_on:
                new = type(control)(should_log=True, should_save=True)
                return new
            return None

        return method


def _drive(lib, log):
    """Calls every event once through ``lib``'s handler, with two recorders; returns the final control flags."""
    handler = lib.CallbackHandler(
        [lib.DefaultFlowCallback, Recorder("a", log, replace_on=("on_step_begin", "on_log")), Recorder("b", log)],
        "model",
        "tokenizer",
        "optimizer",
        "scheduler",
    )
    args, state, control = hf_args(), lib.TrainerState(max_steps=10), lib.TrainerControl(should_training_stop=True)
    for event in ft.EVENTS:
        extra = {"metrics": {"eval_loss": 1.0}} if event in ("on_evaluate", "on_predict") else {}
        extra = {"logs": {"loss": 1.0}} if event == "on_log" else extra
        if event == "on_step_end":
            state.global_step = 10
        control = getattr(handler, event)(args, state, control, **extra)
        log.append(("after", event, _flags(control), [], None))
    return _flags(control)


def test_handler_event_order_kwargs_and_control_propagation_match_transformers():
    ours_log, theirs_log = [], []
    assert _drive(ft, ours_log) == _drive(hf, theirs_log)
    assert ours_log == theirs_log
    assert len(ours_log) == 3 * len(ft.EVENTS)
    # "b" sees the control "a" returned at on_step_begin; on_train_begin reset should_training_stop beforehand.
    step_begin = [e for e in ours_log if e[1] == "on_step_begin"]
    assert step_begin[1] == ("b", "on_step_begin", (False, False, True, False, True), step_begin[1][3], None)
    kwargs = ["eval_dataloader", "lr_scheduler", "model", "optimizer", "processing_class", "train_dataloader"]
    assert ours_log[0][3] == kwargs
    assert [e[0] for e in ours_log[:3]] == ["a", "b", "after"]


def test_handler_passes_the_objects_and_every_event_exists_on_the_base_class():
    assert set(ft.EVENTS) == {n for n in dir(hf.TrainerCallback) if n.startswith("on_")}
    assert set(ft.EVENTS) <= {n for n in dir(ft.TrainerCallback) if n.startswith("on_")}
    seen = {}

    class Spy(ft.TrainerCallback):
        def on_evaluate(self, args, state, control, metrics, model=None, optimizer=None, **kwargs):
            seen.update(metrics=metrics, model=model, optimizer=optimizer)

    handler = ft.CallbackHandler([ft.DefaultFlowCallback, Spy], "M", None, "O", None)
    control = ft.TrainerControl(should_evaluate=True)
    out = handler.on_evaluate(None, ft.TrainerState(), control, {"eval_loss": 2.0})
    assert out is control and not control.should_evaluate
    assert seen == {"metrics": {"eval_loss": 2.0}, "model": "M", "optimizer": "O"}


def test_a_transformers_callback_runs_in_ftrain_handler():
    calls = []

    class SaveEveryThird(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % 3 == 0:
                control.should_save = True
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            calls.append(dict(logs))

    # transformers' own DefaultFlowCallback counts as the default flow; no warning, same decisions.
    handler = ft.CallbackHandler([hf.DefaultFlowCallback, SaveEveryThird], None, None, None, None)
    args, state, control = hf_args(save_strategy="no"), ft.TrainerState(max_steps=100), ft.TrainerControl()
    saves = []
    for _ in range(7):
        control = handler.on_step_begin(args, state, control)
        state.global_step += 1
        control = handler.on_step_end(args, state, control)
        saves.append(control.should_save)
    handler.on_log(args, state, control, logs={"loss": 0.5})
    assert saves == [False, False, True, False, False, True, False]
    assert calls == [{"loss": 0.5}]


def test_handler_skips_callbacks_without_an_event_method():
    class OldStyle:  # written for a transformers version without on_push_begin
        def on_log(self, args, state, control, **kwargs):
            control.should_save = True

    handler = ft.CallbackHandler([ft.DefaultFlowCallback, OldStyle()], None, None, None, None)
    control = ft.TrainerControl()
    assert handler.on_push_begin(None, ft.TrainerState(), control) is control
    assert handler.on_log(None, ft.TrainerState(), control, logs={}).should_save


def _warnings_of(lib, caplog, build):
    """Warnings logged while ``build()`` runs, from ``lib``'s logger."""
    if lib is hf:
        with mock.patch.object(hf.logger, "warning") as warn:
            result = build()
        return result, [str(c.args[0]) for c in warn.call_args_list]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="transformers.trainer_callback"):
        result = build()
    return result, [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("lib", [ft, hf], ids=["ftrain", "transformers"])
def test_handler_add_pop_remove_and_warnings(lib, caplog):
    handler, warned = _warnings_of(lib, caplog, lambda: lib.CallbackHandler([lib.PrinterCallback], 0, 0, 0, 0))
    assert len(warned) == 1 and "DefaultFlowCallback" in warned[0]
    _, warned = _warnings_of(lib, caplog, lambda: handler.add_callback(lib.DefaultFlowCallback))
    assert warned == []
    _, warned = _warnings_of(lib, caplog, lambda: handler.add_callback(lib.PrinterCallback()))
    assert len(warned) == 1 and "PrinterCallback" in warned[0]
    progress = lib.ProgressCallback()
    handler.add_callback(progress)
    assert handler.callback_list == "PrinterCallback\nDefaultFlowCallback\nPrinterCallback\nProgressCallback"
    first_printer = handler.callbacks[0]
    assert handler.pop_callback(lib.PrinterCallback) is first_printer
    assert handler.pop_callback(progress) is progress
    assert handler.pop_callback(progress) is None and handler.pop_callback(lib.EarlyStoppingCallback) is None
    handler.remove_callback(lib.PrinterCallback)
    handler.remove_callback(lib.PrinterCallback)  # no match: nothing happens
    assert handler.callback_list == "DefaultFlowCallback"
    with pytest.raises(ValueError):
        handler.remove_callback(progress)
    handler.remove_callback(handler.callbacks[0])
    assert handler.callbacks == []


# --------------------------------------------------------------------------------------------------------------------
# EarlyStoppingCallback
# --------------------------------------------------------------------------------------------------------------------


def _stop_index(lib, args, patience, threshold, values):
    """Evaluations run before early stopping stops training (the trainer updates best_metric after on_evaluate)."""
    callback = lib.EarlyStoppingCallback(early_stopping_patience=patience, early_stopping_threshold=threshold)
    state, control = lib.TrainerState(), lib.TrainerControl()
    better = np.greater if args.greater_is_better else np.less
    for i, value in enumerate(values):
        callback.on_evaluate(args, state, control, metrics={"eval_score": value, "eval_loss": 0.0})
        if state.best_metric is None:
            state.best_metric = -math.inf if args.greater_is_better else math.inf
        if better(value, state.best_metric):
            state.best_metric = value
        if control.should_training_stop:
            return i + 1, callback.early_stopping_patience_counter
    return None, callback.early_stopping_patience_counter


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(st.one_of(st.floats(-2, 2), st.sampled_from([0.0, 0.5, 1.0, math.nan])), max_size=15),
    patience=st.integers(1, 4),
    threshold=st.sampled_from([0.0, 0.01, 0.3, None]),
    greater_is_better=st.booleans(),
    name=st.sampled_from(["score", "eval_score"]),
)
def test_early_stopping_stops_at_the_same_evaluation_as_transformers(
    values, patience, threshold, greater_is_better, name
):
    args = hf_args(eval_strategy="steps", metric_for_best_model=name, greater_is_better=greater_is_better)
    expected = _stop_index(hf, args, patience, 0.0 if threshold is None else threshold, values)
    assert _stop_index(ft, args, patience, threshold, values) == expected


def test_early_stopping_example_by_hand():
    args = hf_args(eval_strategy="steps", metric_for_best_model="score", greater_is_better=False)
    assert _stop_index(ft, args, 2, 0.0, [1.0, 0.9, 0.95, 0.8, 0.85, 0.9, 0.1]) == (6, 2)
    assert _stop_index(ft, args, 2, 0.2, [1.0, 0.9, 0.95, 0.5]) == (3, 2)  # 0.1 is not a large enough improvement
    assert _stop_index(ft, args, 1, 0.5, [1.0, 0.5]) == (2, 1)  # an improvement must exceed the threshold
    assert _stop_index(hf, args, 1, 0.5, [1.0, 0.5]) == (2, 1)


def test_early_stopping_checks_the_arguments(caplog):
    callback, state, control = ft.EarlyStoppingCallback(), ft.TrainerState(), ft.TrainerControl()
    with pytest.raises(ValueError, match='eval_strategy="steps" or "epoch"'):
        callback.on_train_begin(hf_args(metric_for_best_model="loss"), state, control)
    with pytest.raises(AssertionError):  # transformers asserts the same condition
        hf.EarlyStoppingCallback().on_train_begin(hf_args(metric_for_best_model="loss"), state, control)
    with pytest.raises(ValueError, match="needs metric_for_best_model"):
        callback.on_train_begin(
            SimpleNamespace(load_best_model_at_end=True, metric_for_best_model=None), state, control
        )
    with caplog.at_level(logging.WARNING, logger="transformers.trainer_callback"):
        callback.on_train_begin(hf_args(eval_strategy="epoch", metric_for_best_model="loss"), state, control)
        assert "load_best_model_at_end" in caplog.text
        caplog.clear()
        good = hf_args(eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True)
        callback.on_train_begin(good, state, control)
        assert caplog.text == ""
        callback.on_evaluate(good, state, control, metrics={"eval_accuracy": 1.0})
        assert "eval_loss" in caplog.text and not control.should_training_stop


def test_early_stopping_state_round_trips_through_trainer_state_json(tmp_path, caplog):
    callback = ft.EarlyStoppingCallback(early_stopping_patience=4, early_stopping_threshold=0.5)
    callback.early_stopping_patience_counter = 3
    assert callback.state() == {
        "args": {"early_stopping_patience": 4, "early_stopping_threshold": 0.5},
        "attributes": {"early_stopping_patience_counter": 3},
    }
    rebuilt = ft.EarlyStoppingCallback.from_state(callback.state())
    assert vars(rebuilt) == vars(callback)
    hf_callback = hf.EarlyStoppingCallback.from_state(callback.state())  # same state format
    assert vars(hf_callback) == vars(callback)
    # Through a trainer_state.json written by transformers, back into a handler, in place, with the control.
    state = hf.TrainerState(stateful_callbacks=[hf_callback, hf.TrainerControl(should_training_stop=True)])
    state.stateful_callbacks["_Gone"] = {"args": {}, "attributes": {}}  # a callback no longer in use
    state.save_to_json(tmp_path / "trainer_state.json")
    stored = ft.TrainerState.load_from_json(tmp_path / "trainer_state.json").stateful_callbacks
    handler = ft.CallbackHandler([ft.DefaultFlowCallback, ft.EarlyStoppingCallback(), ft.ProgressCallback], 0, 0, 0, 0)
    old_control = ft.TrainerControl()
    with caplog.at_level(logging.WARNING, logger="transformers.trainer"):  # where transformers' Trainer warns
        control = ft.restore_callback_states(handler, old_control, stored)
    assert "_Gone" in caplog.text
    assert handler.callback_list == "DefaultFlowCallback\nEarlyStoppingCallback\nProgressCallback"
    assert vars(handler.callbacks[1]) == vars(callback)
    assert control is not old_control and control == ft.TrainerControl(should_training_stop=True)


@pytest.mark.parametrize("reset", ["_new_training", "_new_epoch", "_new_step"])
def test_trainer_control_resets_and_state_match_transformers(reset):
    ours, theirs = ft.TrainerControl(*[True] * 5), hf.TrainerControl(*[True] * 5)
    assert ours.state() == theirs.state()
    getattr(ours, reset)()
    getattr(theirs, reset)()
    assert _flags(ours) == _flags(theirs) and sum(_flags(ours)) == {"_new_step": 2}.get(reset, 4)
    assert ours.state() == theirs.state() and ft.TrainerControl.from_state(ours.state()) == ours


def test_exportable_state_is_structural():
    assert isinstance(hf.EarlyStoppingCallback(), ft.ExportableState)
    assert isinstance(hf.TrainerControl(), ft.ExportableState)
    assert not isinstance(ft.ProgressCallback(), ft.ExportableState)
    assert ft.TrainerState(stateful_callbacks=[hf.TrainerControl()]).stateful_callbacks == {
        "TrainerControl": ft.TrainerControl().state()
    }


# --------------------------------------------------------------------------------------------------------------------
# ProgressCallback, PrinterCallback
# --------------------------------------------------------------------------------------------------------------------

LOGS = {
    "loss": 0.123456789,
    "grad_norm": np.float64(3.14159),
    "learning_rate": 5e-05,
    "epoch": 1.0,
    "step_count": 3,
    "total_flos": 1.5e12,
    "note": "x" * 30,
}


def _run_progress(lib, capsys, max_str_len):
    callback = lib.ProgressCallback(max_str_len=max_str_len)
    state, control = lib.TrainerState(max_steps=3), lib.TrainerControl()
    callback.on_log(None, state, control, logs=dict(LOGS))  # before training: nothing is written
    callback.on_train_begin(None, state, control)
    for _ in range(3):
        state.global_step += 1
        callback.on_step_end(None, state, control)
    for _ in range(2):
        callback.on_prediction_step(None, state, control, eval_dataloader=[0, 1])
    callback.on_evaluate(None, state, control, metrics={})
    callback.on_log(None, state, control, logs=dict(LOGS))
    callback.on_train_end(None, state, control)
    return capsys.readouterr()


@pytest.mark.parametrize("max_str_len", [100, 10])
def test_progress_callback_writes_what_transformers_writes(capsys, max_str_len):
    expected = _run_progress(hf, capsys, max_str_len)
    ours = _run_progress(ft, capsys, max_str_len)
    assert ours.out == expected.out
    assert ours.out.count("\n") == 1 and "total_flos" not in ours.out and "'loss': '0.1235'" in ours.out
    assert ("String too long to display, length: 30 > 10" in ours.out) == (max_str_len == 10)
    assert "3/3" in ours.err and "0/2" in ours.err


def test_progress_callback_only_draws_on_world_rank_zero(capsys):
    callback = ft.ProgressCallback()
    state = ft.TrainerState(max_steps=2, is_world_process_zero=False)
    callback.on_train_begin(None, state, ft.TrainerControl())
    callback.on_step_end(None, state, ft.TrainerControl())
    callback.on_log(None, state, ft.TrainerControl(), logs={"loss": 1.0})
    callback.on_train_end(None, state, ft.TrainerControl())
    assert capsys.readouterr() == ("", "") and callback.training_bar is None


@pytest.mark.parametrize("local_zero", [True, False])
def test_printer_callback_prints_what_transformers_prints(capsys, local_zero):
    state = ft.TrainerState(is_local_process_zero=local_zero)
    hf.PrinterCallback().on_log(None, state, None, logs=dict(LOGS))
    expected = capsys.readouterr().out
    logs = dict(LOGS)
    ft.PrinterCallback().on_log(None, state, None, logs=logs)
    assert capsys.readouterr().out == expected
    assert logs == LOGS  # the caller's dict is not changed
    if local_zero:
        assert expected.startswith("{'loss': '0.1235', 'grad_norm': '3.142', 'learning_rate': '5e-05'")


# --------------------------------------------------------------------------------------------------------------------
# Integrations
# --------------------------------------------------------------------------------------------------------------------


class FakeWriter:
    def __init__(self, log_dir=None):
        self.log_dir, self.calls = log_dir, []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, *args))


def test_tensorboard_callback_logs_scalars_and_text_with_rewritten_keys(caplog):
    writer = FakeWriter()
    callback = integrations.TensorBoardCallback(tb_writer=writer)
    args, state, control = hf_args(), ft.TrainerState(global_step=7), ft.TrainerControl()
    model = SimpleNamespace(config=SimpleNamespace(to_json_string=lambda: '{"n_layer": 2}'))
    callback.on_train_begin(args, state, control, model=model)
    with caplog.at_level(logging.WARNING, logger="ftrain.trainer.integrations"):
        callback.on_log(args, state, control, logs={"loss": 1.5, "eval_acc": 1, "test_note": "hi", "bad": [1]})
    callback.on_train_end(args, state, control)
    assert writer.calls == [
        ("add_text", "args", args.to_json_string()),
        ("add_text", "model_config", '{"n_layer": 2}'),
        ("add_scalar", "train/loss", 1.5, 7),
        ("add_scalar", "eval/acc", 1, 7),
        ("add_text", "test/note", "hi", 7),
        ("flush",),
        ("close",),
    ]
    assert "'train/bad'" in caplog.text and callback.tb_writer is None


def test_rewrite_logs_matches_transformers():
    from transformers.integrations.integration_utils import rewrite_logs

    logs = {"loss": 1, "eval_loss": 2, "test_f1": 3, "eval_": 4, "evaluation": 5, "train_runtime": 6}
    assert integrations.rewrite_logs(logs) == rewrite_logs(logs)


def test_tensorboard_logging_dir_comes_from_env_then_args_then_output_dir(monkeypatch, tmp_path):
    monkeypatch.setattr(integrations, "_summary_writer_class", lambda: FakeWriter)
    state, control = ft.TrainerState(), ft.TrainerControl()
    args = SimpleNamespace(output_dir=str(tmp_path), logging_dir=str(tmp_path / "logs"))
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "~/tb")
    callback = integrations.TensorBoardCallback()
    callback.on_train_begin(args, state, control)
    assert callback.tb_writer.log_dir == os.path.expanduser("~/tb")
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR")
    callback = integrations.TensorBoardCallback()
    callback.on_log(args, state, control, logs={"loss": 1.0})  # a log before training creates the writer too
    assert callback.tb_writer.log_dir == str(tmp_path / "logs")
    callback = integrations.TensorBoardCallback()
    callback.on_train_begin(SimpleNamespace(output_dir=str(tmp_path)), state, control)
    runs, name = os.path.split(os.path.relpath(callback.tb_writer.log_dir, tmp_path))
    assert runs == "runs" and name.endswith("_" + __import__("socket").gethostname())
    trial = ft.TrainerState(is_hyper_param_search=True, trial_name="trial-2")
    callback = integrations.TensorBoardCallback()
    callback.on_train_begin(args, trial, control)
    assert callback.tb_writer.log_dir.startswith(str(tmp_path / "runs")) and callback.tb_writer.log_dir.endswith(
        "trial-2"
    )


def test_tensorboard_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(ImportError, match=r"pip install ftrain\[tensorboard\]"):
        integrations.TensorBoardCallback()
    integrations.TensorBoardCallback(tb_writer=FakeWriter())  # a given writer needs no tensorboard


def _scalars(folder):
    """(tag, step, value) of every scalar in the event files under ``folder``."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    found = []
    for root, _, files in os.walk(folder):
        for name in (f for f in files if f.startswith("events.out.tfevents")):
            for event in LegacyEventFileLoader(os.path.join(root, name)).Load():
                found += [
                    (v.tag, event.step, v.simple_value) for v in event.summary.value if v.HasField("simple_value")
                ]
    return sorted(found)


@pytest.mark.skipif(not TENSORBOARD, reason="tensorboard is not installed (pip install ftrain[tensorboard])")
def test_tensorboard_writes_the_event_files_transformers_writes(monkeypatch, tmp_path):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    from transformers.integrations import TensorBoardCallback as HFTensorBoardCallback

    for name, klass in (("ours", integrations.TensorBoardCallback), ("theirs", HFTensorBoardCallback)):
        args = hf_args(output_dir=str(tmp_path / name))
        state, control, callback = ft.TrainerState(), ft.TrainerControl(), klass()
        callback.on_train_begin(args, state, control, model=None)
        for step, loss in ((1, 2.5), (2, 1.25)):
            state.global_step = step
            callback.on_log(args, state, control, logs={"loss": loss, "eval_accuracy": step / 4})
        callback.on_train_end(args, state, control)
    ours = _scalars(tmp_path / "ours" / "runs")
    assert ours == [
        ("eval/accuracy", 1, 0.25),
        ("eval/accuracy", 2, 0.5),
        ("train/loss", 1, 2.5),
        ("train/loss", 2, 1.25),
    ]
    assert ours == _scalars(tmp_path / "theirs" / "runs")


def test_reporting_integrations(monkeypatch):
    get = integrations.get_reporting_integration_callbacks
    assert get(None) == get("none") == get(["none"]) == get([]) == []
    assert get("tensorboard") == get(["tensorboard"]) == [integrations.TensorBoardCallback]
    with pytest.raises(ValueError, match="the wandb integration is not available in ftrain yet.*callbacks=") as err:
        get(["tensorboard", "wandb"])
    assert "report_to='none'" in str(err.value)
    with pytest.raises(ValueError, match="ftrain accepts 'tensorboard', 'all' or 'none'"):
        get("tensorbored")
    monkeypatch.setattr(integrations, "is_tensorboard_available", lambda: True)
    assert get("all") == get(["all"]) == [integrations.TensorBoardCallback]
    monkeypatch.setattr(integrations, "is_tensorboard_available", lambda: False)
    assert get("all") == []
    assert set(integrations._NOT_YET_AVAILABLE) | {"tensorboard"} == set(
        transformers.integrations.integration_utils.INTEGRATION_TO_CALLBACK
    )


def test_jsonl_logger_writes_the_log_history_entries(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    callback = integrations.JsonlLoggerCallback(path)
    state, control = ft.TrainerState(), ft.TrainerControl()
    history = []
    for step, logs in ((1, {"loss": np.float32(0.5), "epoch": 0.1}), (2, {"eval_loss": torch.tensor(0.25)})):
        state.global_step = step
        callback.on_log(None, state, control, logs=logs)
        history.append({**logs, "step": step})
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"loss": 0.5, "epoch": 0.1, "step": 1},
        {"eval_loss": 0.25, "step": 2},
    ]
    assert lines[0] == '{"loss": 0.5, "epoch": 0.1, "step": 1}'
    integrations.JsonlLoggerCallback(path).on_log(None, state, control, logs={"loss": math.nan})
    assert path.read_text().splitlines()[-1] == '{"loss": NaN, "step": 2}'  # appends, as trainer_state.json writes NaN
    integrations.JsonlLoggerCallback(path, append=False).on_log(None, state, control, logs={"a": 1})
    assert path.read_text() == '{"a": 1, "step": 2}\n'
    other_rank = ft.TrainerState(is_world_process_zero=False)
    integrations.JsonlLoggerCallback(path).on_log(None, other_rank, control, logs={"a": 2})
    assert path.read_text() == '{"a": 1, "step": 2}\n'


def test_importing_the_modules_imports_no_optional_dependency():
    code = (
        "import sys, ftrain.trainer.callbacks, ftrain.trainer.integrations, ftrain.trainer.trainer_state, "
        "ftrain.trainer.utils; print(sorted(m.split('.')[0] for m in sys.modules if m.split('.')[0] in "
        "('transformers', 'datasets', 'tensorboard', 'tensorboardX', 'accelerate')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
