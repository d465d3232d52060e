"""What HF code sees of the Trainer's callbacks, state and log lines, compared with transformers' Trainer.

transformers is the reference in every test, run on the same model, data and arguments:

- the built-in callbacks the Trainer installs are found by ``isinstance`` against transformers' classes, and popped
  and removed by them, as transformers' own are;
- the warnings HF code patches (a callback added twice, a stored callback state with no callback) go through the
  transformers logger transformers uses, with the class name in the message;
- ``_load_callback_state`` rebuilds the same control and callbacks from the same ``trainer_state.json``;
- ``compare_trainer_and_checkpoint_args`` names the same mismatches;
- the "***** Running training *****" lines carry the same counts, and ``log_level`` shows or hides them;
- a NaN logged loss is written into ``trainer_state.json`` (and resumed) where transformers writes one.
"""

import json
import logging
import math
from unittest import mock

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from transformers import trainer_callback as hf_callbacks  # noqa: E402
from transformers import trainer_utils as hf_trainer_utils  # noqa: E402

from ftrain.trainer import Trainer, TrainingArguments  # noqa: E402
from ftrain.trainer import callbacks as ft_callbacks  # noqa: E402
from ftrain.trainer.trainer_state import TrainerState, compare_trainer_and_checkpoint_args  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LIBRARIES = {"hf": (transformers.Trainer, transformers.TrainingArguments), "ft": (Trainer, TrainingArguments)}
BASE = dict(
    report_to="none", use_cpu=True, seed=0, learning_rate=0.1, optim="adamw_torch", per_device_train_batch_size=2,
    train_sampling_strategy="sequential", logging_steps=1, save_strategy="no", disable_tqdm=True,
)  # fmt: skip


class Line(torch.nn.Module):
    """``y = a * x + b`` with a squared-error loss: two float64 parameters, the smallest model both Trainers run."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(-0.5, dtype=torch.float64))

    def forward(self, x, labels=None):
        y = self.a * x + self.b
        return {"loss": torch.nn.functional.mse_loss(y, labels), "logits": y}


def line_rows(n=8, nan_row=None):
    x = [float(i) / n for i in range(n)]
    labels = [2.0 * v + 1.0 for v in x]
    if nan_row is not None:
        labels[nan_row] = math.nan
    return datasets.Dataset.from_dict({"x": x, "labels": labels}).with_format("torch", dtype=torch.float64)


def make(lib, out, callbacks=None, data=None, **kw):
    trainer_cls, args_cls = LIBRARIES[lib]
    args = args_cls(output_dir=str(out), **{**BASE, **kw})
    return trainer_cls(model=Line(), args=args, train_dataset=data or line_rows(), callbacks=callbacks)


# ---- the built-in callbacks are transformers' classes for HF code ------------------------------------------------


def _found(trainer, klass):
    """HF code's lookup: the first callback that is an instance of ``klass`` (transformers' class)."""
    return next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, klass)), None)


@pytest.mark.parametrize("disable_tqdm", [False, True])
def test_builtin_callbacks_are_instances_of_transformers_classes(tmp_path, disable_tqdm):
    trainers = {lib: make(lib, tmp_path / lib, disable_tqdm=disable_tqdm) for lib in LIBRARIES}
    for klass in (hf_callbacks.DefaultFlowCallback, hf_callbacks.ProgressCallback, hf_callbacks.PrinterCallback):
        found = {lib: _found(t, klass) for lib, t in trainers.items()}
        assert (found["ft"] is None) == (found["hf"] is None), klass
        if found["ft"] is None:
            continue
        assert type(found["ft"]).__name__ == type(found["hf"]).__name__ == klass.__name__
        ftrain_class = getattr(ft_callbacks, klass.__name__)
        assert isinstance(found["ft"], ftrain_class)  # ftrain's own methods, not transformers'
        assert type(found["ft"]).on_step_end is ftrain_class.on_step_end
        for lib, trainer in trainers.items():  # pop returns what the lookup found; then the lookup finds nothing
            assert trainer.pop_callback(klass) is found[lib]
            assert _found(trainer, klass) is None
    names = {lib: [type(cb).__name__ for cb in t.callback_handler.callbacks] for lib, t in trainers.items()}
    assert names["ft"] == names["hf"] == []


def test_remove_by_transformers_class_and_add_back(tmp_path):
    trainers = {lib: make(lib, tmp_path / lib) for lib in LIBRARIES}
    for lib, trainer in trainers.items():
        trainer.remove_callback(hf_callbacks.DefaultFlowCallback)
        assert _found(trainer, hf_callbacks.DefaultFlowCallback) is None
        trainer.add_callback(ft_callbacks.DefaultFlowCallback if lib == "ft" else hf_callbacks.DefaultFlowCallback)
    assert isinstance(_found(trainers["ft"], hf_callbacks.DefaultFlowCallback), ft_callbacks.DefaultFlowCallback)
    names = {lib: [type(cb).__name__ for cb in t.callback_handler.callbacks] for lib, t in trainers.items()}
    assert names["ft"] == names["hf"] == ["PrinterCallback", "DefaultFlowCallback"]


class Recorder(hf_callbacks.TrainerCallback):
    pass


@pytest.mark.parametrize("lib", LIBRARIES)
def test_duplicate_callback_warns_through_transformers_logger_naming_the_class(tmp_path, lib):
    with mock.patch.object(hf_callbacks.logger, "warning") as warn:  # what HF code patches
        make(lib, tmp_path, callbacks=[Recorder, Recorder])
    assert warn.call_count == 1 and "Recorder" in warn.call_args[0][0]


# ---- callback states on resume -----------------------------------------------------------------------------------


class Stateful(hf_callbacks.TrainerCallback, hf_callbacks.ExportableState):
    def __init__(self, value="default"):
        self.value = value

    def state(self):
        return {"args": {"value": self.value}, "attributes": {}}


class Gone(Stateful):
    """A stateful callback of the saved run that the resumed run does not have."""


@pytest.fixture(scope="module")
def saved_state(tmp_path_factory):
    """An ftrain run's trainer_state.json at step 2 (its last step): the control says stop; three callback states."""
    out = tmp_path_factory.mktemp("saved")
    callbacks = [Stateful("first"), Stateful("second"), Gone("gone")]
    make("ft", out, callbacks=callbacks, max_steps=2, save_strategy="steps", save_steps=2).train()
    return out / "checkpoint-2" / "trainer_state.json"


def _restored(lib, out, path, callbacks):
    trainer = make(lib, out, callbacks=callbacks, restore_callback_states_from_checkpoint=True)
    trainer.state = transformers.TrainerState.load_from_json(str(path))
    with mock.patch.object(logging.getLogger("transformers.trainer"), "warning") as warn:
        trainer._load_callback_state()
    stateful = [cb.value for cb in trainer.callback_handler.callbacks if isinstance(cb, Stateful)]
    return vars(trainer.control), stateful, [c.args[0] for c in warn.call_args_list]


def test_load_callback_state_restores_control_and_callbacks_as_transformers(tmp_path, saved_state):
    hf = _restored("hf", tmp_path / "hf", saved_state, [Stateful(), Stateful()])
    ft = _restored("ft", tmp_path / "ft", saved_state, [Stateful(), Stateful()])
    assert ft[:2] == hf[:2]
    assert ft[0]["should_training_stop"] and ft[1] == ["first", "second"]
    # the saved Gone has no callback here: both warn through transformers.trainer, naming it
    assert len(ft[2]) == len(hf[2]) == 1 and "Gone" in ft[2][0] and "Gone" in hf[2][0]


def test_load_callback_state_does_nothing_unless_asked(tmp_path, saved_state):
    trainer = make("ft", tmp_path, callbacks=[Stateful()])
    control = trainer.control
    trainer.state = TrainerState.load_from_json(saved_state)
    trainer._load_callback_state()
    assert trainer.control is control and not control.should_training_stop


# ---- compare_trainer_and_checkpoint_args -------------------------------------------------------------------------


def _hf_mismatch_lines(args, state):
    with mock.patch.object(hf_trainer_utils.logger, "warning_once") as warn:
        hf_trainer_utils.compare_trainer_and_checkpoint_args(args, state)
    return [] if not warn.called else warn.call_args[0][0].split("\n\t")[1:]


def _ft_mismatch_lines(args, state):
    with mock.patch.object(logging.getLogger("transformers.trainer_utils"), "warning") as warn:
        compare_trainer_and_checkpoint_args(args, state)
    return [] if not warn.called else warn.call_args[0][0].split("\n\t")[1:]


@pytest.mark.parametrize(
    "changed",
    [{}, {"save_steps": 10}, {"logging_steps": 3, "eval_steps": 7}, {"per_device_train_batch_size": 8},
     {"save_steps": 10, "eval_steps": 4, "logging_steps": 1, "per_device_train_batch_size": 1}],
)  # fmt: skip
def test_compare_trainer_and_checkpoint_args_names_the_mismatches_transformers_names(tmp_path, changed):
    saved = dict(logging_steps=2, eval_steps=4, save_steps=5, per_device_train_batch_size=2)
    state = transformers.TrainerState(max_steps=20, logging_steps=2, eval_steps=4, save_steps=5, train_batch_size=2)
    hf_args = transformers.TrainingArguments(str(tmp_path), eval_strategy="steps", **{**saved, **changed})
    ft_args = TrainingArguments(str(tmp_path), eval_strategy="steps", **{**saved, **changed})
    expected = _hf_mismatch_lines(hf_args, state)
    assert _ft_mismatch_lines(ft_args, state) == expected
    assert len(expected) == sum(saved[k] != v for k, v in changed.items())


def test_compare_resolves_a_ratio_before_comparing(tmp_path):
    state = TrainerState(max_steps=20, logging_steps=2, eval_steps=500, save_steps=5, train_batch_size=8)
    args = TrainingArguments(str(tmp_path), logging_steps=0.1, save_steps=0.25)  # 2 and 5 of 20 steps: the same
    assert _ft_mismatch_lines(args, state) == []
    # transformers compares the ratio itself, so it reports both as changed (a difference on purpose)
    assert len(_hf_mismatch_lines(transformers.TrainingArguments(str(tmp_path), logging_steps=0.1, save_steps=0.25),
                                  state)) == 2  # fmt: skip


def test_resume_with_other_arguments_warns_through_transformers_logger(tmp_path, caplog):
    make("ft", tmp_path, max_steps=4, save_strategy="steps", save_steps=2).train()
    resumed = make("ft", tmp_path, max_steps=4, save_strategy="steps", save_steps=4, per_device_train_batch_size=4)
    with caplog.at_level(logging.WARNING, logger="transformers.trainer_utils"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert "save_steps: 4 (from args) != 2 (from trainer_state.json)" in caplog.text
    assert "per_device_train_batch_size: 4 (from args) != 2 (from trainer_state.json)" in caplog.text


# ---- the run's sizes at info level -------------------------------------------------------------------------------


def _run_start_lines(lib, out, **kw):
    """The "Running training" block transformers.trainer's logger receives at info level, as {label: value}."""
    levels = {name: logging.getLogger(name).level for name in ("transformers", "ftrain")}
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers.trainer")
    logger.addHandler(handler)
    try:
        make(lib, out, **kw).train()
    finally:
        logger.removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    lines = [r.getMessage() for r in records if r.levelno == logging.INFO]
    return dict(line.strip().split(" = ") for line in lines if line.startswith("  ") and " = " in line), lines


@pytest.mark.parametrize("ga", [1, 3])
def test_running_training_lines_carry_transformers_counts(tmp_path, ga):
    kw = dict(log_level="info", num_train_epochs=2, gradient_accumulation_steps=ga)
    hf, hf_lines = _run_start_lines("hf", tmp_path / "hf", **kw)
    ft, ft_lines = _run_start_lines("ft", tmp_path / "ft", **kw)
    assert "***** Running training *****" in hf_lines and "***** Running training *****" in ft_lines
    assert ft == hf
    assert hf["Total optimization steps"] == str(2 * math.ceil(4 / ga)) and hf["Number of trainable parameters"] == "2"


def test_log_level_error_hides_the_running_training_lines(tmp_path):
    for lib in LIBRARIES:
        counts, lines = _run_start_lines(lib, tmp_path / lib, log_level="error", max_steps=1)
        assert lines == [], lib


# ---- non-finite logged losses in trainer_state.json ----------------------------------------------------------------


def _nan_run(lib, out, **kw):
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, logging_nan_inf_filter=False, **kw)
    trainer = make(lib, out, data=line_rows(nan_row=2), **kw)  # row 2 is in step 2's batch
    trainer.train()
    return trainer


def test_nan_loss_is_written_to_trainer_state_json_and_resumed(tmp_path):
    hf, ft = _nan_run("hf", tmp_path / "hf"), _nan_run("ft", tmp_path / "ft")
    nan_steps = {lib: [math.isnan(e["loss"]) for e in t.state.log_history if "loss" in e] for lib, t in
                 (("hf", hf), ("ft", ft))}  # fmt: skip
    assert nan_steps["ft"] == nan_steps["hf"] == [False, True, True, True]
    for step in (2, 4):
        name = f"checkpoint-{step}/trainer_state.json"
        ours, theirs = (json.loads((tmp_path / lib / name).read_text()) for lib in ("ft", "hf"))
        assert [math.isnan(e.get("loss", 0.0)) for e in ours["log_history"]] == [
            math.isnan(e.get("loss", 0.0)) for e in theirs["log_history"]
        ]
    resumed = make("ft", tmp_path / "ft", data=line_rows(nan_row=2), max_steps=4, logging_nan_inf_filter=False)
    resumed.train(resume_from_checkpoint=str(tmp_path / "ft" / "checkpoint-2"))
    assert [math.isnan(e["loss"]) for e in resumed.state.log_history if "loss" in e] == nan_steps["hf"]
