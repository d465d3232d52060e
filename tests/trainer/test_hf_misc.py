"""Smaller transformers Trainer behaviours that HF code relies on, each checked against ``transformers.Trainer`` run
in the same test: ``_get_output_dir`` (what transformers' JIT ``CheckpointManager`` writes through), the
``label_smoother`` choice (off for a multi-label classifier), transformers' ``Adafactor`` with ``relative_step`` and
``AdafactorSchedule`` in ``optimizers=``, and the ``metric_for_best_model`` error of ``save_strategy="best"``.

Runs are float64 (a fresh model from the same seed for each trainer), so equal mathematics agrees to ``FLOAT64``
(``tests/tolerances.py``).
"""

from __future__ import annotations

import os
import signal
import warnings

import pytest
import torch
from tolerances import FLOAT64, reduction_rtol
from torch import nn

from ftrain.trainer import Trainer, TrainingArguments
from ftrain.trainer.utils import LabelSmoother

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers.trainer_jit_checkpoint import CheckpointManager  # noqa: E402
from transformers.trainer_pt_utils import LabelSmoother as HFLabelSmoother  # noqa: E402

from tests.trainer.side_by_side import Regression  # noqa: E402

STEPS = 4


class _Config:
    problem_type = "multi_label_classification"


class MultiLabel(nn.Module):
    """A multi-label classifier (``config.problem_type``): its own loss is the binary cross-entropy of float labels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.config = _Config()
        self.head = nn.Linear(3, 2).double()

    def forward(self, x, labels=None):
        logits = self.head(x)
        loss = None if labels is None else nn.functional.binary_cross_entropy_with_logits(logits, labels)
        return {"loss": loss, "logits": logits}


def _data(n: int = 16, multi_label: bool = False) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    if multi_label:
        y = (x[:, :2] > 0).to(torch.float64)
    else:
        y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def _args(cls, folder, **kw):
    base = dict(output_dir=str(folder), max_steps=STEPS, per_device_train_batch_size=4, logging_steps=1,
                save_strategy="no", report_to="none", disable_tqdm=True, train_sampling_strategy="sequential",
                learning_rate=0.1)  # fmt: skip
    return cls(**{**base, **kw})


def _both(tmp_path, make_model=Regression, make_objects=None, data=None, **kw):
    """The same run through transformers' Trainer and ftrain's: ``[(hf_trainer), (ftrain_trainer)]``."""
    out = []
    for trainer_cls, args_cls in ((transformers.Trainer, transformers.TrainingArguments), (Trainer, TrainingArguments)):
        model = make_model()
        objects = make_objects(model) if make_objects is not None else (None, None)
        args = _args(args_cls, tmp_path / trainer_cls.__module__.split(".")[0], **kw)
        out.append(trainer_cls(model, args, train_dataset=data or _data(), optimizers=objects))
    return out


def _assert_same_weights(hf, ft):
    for (name, a), (_, b) in zip(hf.model.named_parameters(), ft.model.named_parameters()):
        torch.testing.assert_close(b, a, **FLOAT64, msg=name)


# ---- _get_output_dir and transformers' JIT CheckpointManager -----------------------------------------------------


def test_transformers_jit_checkpoint_manager_saves_through_get_output_dir(tmp_path):
    """transformers' ``CheckpointManager.execute_jit_checkpoint`` drives either Trainer through ``_get_output_dir``,
    ``_save_checkpoint`` and ``state.global_step``: both write ``output_dir/checkpoint-{step}`` and leave no
    ``checkpoint-is-incomplete.txt`` behind; ftrain's folder is a checkpoint it resumes from."""
    folders = []
    for trainer in _both(tmp_path, save_strategy="no"):
        trainer.train()
        assert trainer._get_output_dir(trial=None) == trainer.args.output_dir
        manager = CheckpointManager(trainer)
        manager.is_checkpoint_requested = True
        manager.execute_jit_checkpoint()
        assert not manager.is_checkpoint_requested
        folder = os.path.join(trainer.args.output_dir, f"checkpoint-{STEPS}")
        assert os.path.isdir(folder)
        assert not os.path.exists(os.path.join(folder, "checkpoint-is-incomplete.txt"))
        folders.append(os.path.relpath(folder, trainer.args.output_dir))
    assert folders[0] == folders[1]
    ft = trainer
    resumed = Trainer(Regression(), ft.args, train_dataset=_data())
    resumed.train(resume_from_checkpoint=os.path.join(ft.args.output_dir, f"checkpoint-{STEPS}"))
    assert resumed.state.global_step == STEPS
    for a, b in zip(ft.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_pop_callback_by_transformers_jit_class_finds_ftrains(tmp_path):
    """With ``enable_jit_checkpoint``, ``pop_callback(transformers' JITCheckpointCallback)`` returns the trainer's JIT
    callback in both, bound to the trainer: ftrain's is an instance of transformers' class too."""
    original = signal.getsignal(signal.SIGTERM)
    try:
        for trainer in _both(tmp_path, enable_jit_checkpoint=True):
            hf_class = transformers.trainer_jit_checkpoint.JITCheckpointCallback
            installed = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, hf_class)]
            assert len(installed) == 1  # HF code counts it with isinstance against transformers' class
            popped = trainer.pop_callback(hf_class)
            assert popped is installed[0] and type(popped).__name__ == "JITCheckpointCallback"
            assert popped.trainer is trainer and popped.jit_manager is not None
    finally:
        signal.signal(signal.SIGTERM, original)  # both installed their SIGTERM handler


# ---- label smoothing ----------------------------------------------------------------------------------------------


def test_label_smoother_equals_transformers():
    """``trainer.label_smoother`` called as transformers' ``LabelSmoother`` is: the same mean smoothed loss, with
    ``-100`` labels left out and with the causal shift."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (3, 5), generator=g)
    labels[0, :2] = -100
    for shift in (False, True):
        expected = HFLabelSmoother(epsilon=0.2)({"logits": logits}, labels, shift_labels=shift)
        got = LabelSmoother(epsilon=0.2)({"logits": logits}, labels, shift_labels=shift)
        # transformers sums the smoothing term in float32 (each row's 7 log-probs cast to float32, then the 15
        # rows), the rest in float64: its rounding, relative to that term and so to the loss, is <= gamma(7 + 15 + 1)
        # = reduction_rtol(23) / 2 in float32 (~1.4e-6). A smoothing weight off by 1/V or a wrong count is > 1e-2.
        torch.testing.assert_close(got, expected.to(got.dtype), rtol=reduction_rtol(23, torch.float32), atol=0)


def test_label_smoothing_is_off_for_a_multi_label_model_as_in_transformers(tmp_path):
    """transformers warns once and drops the smoother for ``problem_type="multi_label_classification"``; both then
    train on the model's own (binary cross-entropy) loss: same warning, same ``label_smoother``, same weights."""
    messages = []
    trainers = []
    for trainer_cls, args_cls in ((transformers.Trainer, transformers.TrainingArguments), (Trainer, TrainingArguments)):
        args = _args(args_cls, tmp_path / trainer_cls.__module__.split(".")[0], label_smoothing_factor=0.1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = trainer_cls(MultiLabel(), args, train_dataset=_data(multi_label=True))
        messages.append([str(w.message) for w in caught if "multi-label" in str(w.message)])
        assert trainer.label_smoother is None
        trainer.train()
        trainers.append(trainer)
    assert len(messages[0]) == len(messages[1]) == 1
    assert messages[1][0].startswith(messages[0][0].split(".")[0])
    _assert_same_weights(*trainers)


def test_label_smoother_set_to_none_turns_smoothing_off(tmp_path):
    """Setting ``trainer.label_smoother = None`` before ``train()`` is honoured, as transformers reads it in
    ``compute_loss``: both then train a classifier on the plain cross-entropy."""

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.config = type("Config", (), {"problem_type": "single_label_classification"})()
            self.head = nn.Linear(3, 4).double()

        def forward(self, x, labels=None):
            logits = self.head(x)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    g = torch.Generator().manual_seed(2)
    data = [{"x": torch.randn(3, generator=g, dtype=torch.float64), "labels": torch.tensor(i % 4)} for i in range(16)]
    hf, ft = _both(tmp_path, make_model=Classifier, data=data, label_smoothing_factor=0.3)
    assert isinstance(ft.label_smoother, LabelSmoother) and ft.label_smoother.epsilon == hf.label_smoother.epsilon
    for trainer in (hf, ft):
        trainer.label_smoother = None
        trainer.train()
    _assert_same_weights(hf, ft)
    ft.label_smoother = object()
    with pytest.raises(TypeError, match="label_smoother"):
        ft.train()


# ---- transformers' Adafactor with its own step size ---------------------------------------------------------------


def _adafactor(model, scale_parameter):
    from transformers.optimization import Adafactor, AdafactorSchedule

    optimizer = Adafactor(
        model.parameters(), lr=None, relative_step=True, warmup_init=True, scale_parameter=scale_parameter
    )
    return optimizer, AdafactorSchedule(optimizer)


@pytest.mark.parametrize("scale_parameter", [False, True])
def test_relative_step_adafactor_with_adafactor_schedule_matches_transformers(tmp_path, scale_parameter):
    """``Adafactor(lr=None, relative_step=True)`` + ``AdafactorSchedule``: the same weights after the run, and the
    schedule's ``get_last_lr`` is transformers' step size (exactly without ``scale_parameter``; with it transformers
    multiplies by the first parameter's RMS before the update, which ftrain's state does not keep)."""
    hf, ft = _both(tmp_path, make_objects=lambda m: _adafactor(m, scale_parameter))
    for trainer in (hf, ft):
        trainer.train()
    _assert_same_weights(hf, ft)
    ft_lr = ft.lr_scheduler.get_last_lr()[0]
    assert ft.optimizer.state_dict()["param_groups"][0]["lr"] == ft_lr > 0
    if scale_parameter:
        rms = hf.optimizer.state[hf.optimizer.param_groups[0]["params"][0]]["RMS"]
        expected = hf.lr_scheduler.get_last_lr()[0] / max(hf.optimizer.param_groups[0]["eps"][1], rms)
    else:
        expected = hf.lr_scheduler.get_last_lr()[0]
    assert ft_lr == pytest.approx(float(expected), rel=FLOAT64["rtol"])


# ---- metric_for_best_model with save_strategy="best" -------------------------------------------------------------


def test_save_strategy_best_without_metric_raises_transformers_phrase(tmp_path, HFArgs):
    """Both refuse ``save_strategy="best"`` without ``metric_for_best_model`` with transformers' phrase
    (transformers when the Trainer is built, ftrain already in ``TrainingArguments``)."""
    phrase = "`args.metric_for_best_model` must be provided"
    with pytest.raises(ValueError) as hf_error:
        args = HFArgs(str(tmp_path), eval_strategy="epoch", save_strategy="best", report_to="none")
        transformers.Trainer(Regression(), args, train_dataset=_data(), eval_dataset=_data())
    with pytest.raises(ValueError) as ft_error:
        TrainingArguments(str(tmp_path), eval_strategy="epoch", save_strategy="best")
    assert phrase in str(hf_error.value) and phrase in str(ft_error.value)
