"""transformers' Trainer and ftrain's, side by side: what the parity tests share to build and compare the two.

The reference is transformers run in the same test, on the same model, rows and arguments. Both compute the same
mathematics, so the float64 claims use the tolerances of tests/tolerances.py: :data:`APPROX64` wherever both sides
compute in float64, :func:`hf_loss_rtol` for a loss transformers logs (it accumulates it in float32).
"""

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tolerances import FLOAT64, reduction_rtol
from torch import nn

transformers = pytest.importorskip("transformers")

from ftrain.trainer import Trainer, TrainingArguments  # noqa: E402

#: ``FLOAT64`` in ``pytest.approx``'s names, for the scalars two float64 computations log (loss, grad_norm, lr).
APPROX64 = {"rel": FLOAT64["rtol"], "abs": FLOAT64["atol"]}

#: Each side's ``(Trainer class, TrainingArguments class)``: transformers' (the reference) first, then ftrain's.
SIDES = {"hf": (transformers.Trainer, transformers.TrainingArguments), "ft": (Trainer, TrainingArguments)}


def hf_loss_rtol(roundings: int) -> float:
    """Relative tolerance of a ``loss``/``train_loss`` that transformers logs, against ftrain's, for float64 models.

    transformers sums a logging window's microbatch losses into ``self._tr_loss = torch.tensor(0.0)``, a float32
    tensor whatever the model's dtype, so each of the window's ``roundings`` additions (one per microbatch:
    ``gradient_accumulation_steps * logging_steps``) rounds to float32; ftrain accumulates in float64. The losses
    are positive, so :func:`reduction_rtol` (``2·γ_n``, float32) bounds it; ``train_loss`` is a mean of such windows.
    A real difference is far above it: ``learning_rate`` 1e-3 -> 1.001e-3 moves the logged loss by 1e-5 relative."""
    return reduction_rtol(roundings, torch.float32)


def side_args(
    tmp_path: Path, settings: dict[str, Any], *, name: str = "", hf_args_cls: type | None = None, ft_only=None
) -> Iterator[tuple[str, type, Any]]:
    """``(side, Trainer class, its TrainingArguments)`` for transformers then ftrain, built alike from ``settings``;
    each side's arguments are built when it is reached, so a trainer built in the loop comes before the next side's
    arguments (as a test of which library refuses first expects).

    Args:
        tmp_path: each side writes under ``tmp_path / side`` (``side-name`` with a ``name``).
        settings: the arguments both sides take; each side gets its own deep copy (transformers edits its dicts).
        name: tells apart several pairs in one folder.
        hf_args_cls: transformers' arguments class to use instead (the ``HFArgs`` fixture, buildable without
            accelerate).
        ft_only: arguments of ftrain's side alone (ftrain's own fields).
    """
    for side, (trainer_cls, args_cls) in SIDES.items():
        if side == "hf" and hf_args_cls is not None:
            args_cls = hf_args_cls
        options = {**settings, **(ft_only or {})} if side == "ft" else settings
        folder = tmp_path / (f"{side}-{name}" if name else side)
        yield side, trainer_cls, args_cls(output_dir=str(folder), **copy.deepcopy(options))


def regression_rows(n: int, *, intercept: float) -> list[dict[str, torch.Tensor]]:
    """``n`` float64 rows ``{"x": x, "labels": x · (1, -2, 0.5) + intercept}``, ``x`` standard normal (seed 1): the
    data of the small regression models the tests train on both sides."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + intercept
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def train_both(
    tmp_path: Path, settings: dict[str, Any], make_objects: Any = None, *, eval_rows: int = 0
) -> tuple[Any, Any]:
    """``(transformers' Trainer, ftrain's)``, each built from ``settings`` (:func:`side_args`) with its own fresh
    :class:`Regression` and ``optimizers=make_objects(model)`` (``(None, None)`` without it), then trained on
    :func:`regression_rows` ``(32)``, with ``eval_rows`` rows of evaluation data when it is not 0."""
    trainers = {}
    for side, trainer_cls, args in side_args(tmp_path, settings):
        model = Regression()
        objects = make_objects(model) if make_objects is not None else (None, None)
        eval_dataset = regression_rows(eval_rows, intercept=0.3) if eval_rows else None
        trainer = trainer_cls(model, args, train_dataset=regression_rows(32, intercept=0.3),
                              eval_dataset=eval_dataset, optimizers=objects)  # fmt: skip
        trainer.train()
        trainers[side] = trainer
    return trainers["hf"], trainers["ft"]


def logged_steps(trainer: Any) -> list[dict[str, Any]]:
    """The training steps' log entries (those with a ``loss``), in order."""
    return [e for e in trainer.state.log_history if "loss" in e]


def assert_same_training(hf: Any, ft: Any, *, accumulated: int = 1) -> None:
    """Every logged step (loss, grad_norm, lr, epoch) and the final float64 parameters agree with transformers'.

    ``accumulated``: the microbatches in one logged loss (``gradient_accumulation_steps * logging_steps``), the
    float32 additions of transformers' loss (:func:`hf_loss_rtol`)."""
    theirs, ours = logged_steps(hf), logged_steps(ft)
    assert [e["step"] for e in ours] == [e["step"] for e in theirs] and ours
    for a, b in zip(theirs, ours):
        assert b["loss"] == pytest.approx(a["loss"], rel=hf_loss_rtol(accumulated))
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], **APPROX64)
        assert b["learning_rate"] == pytest.approx(a["learning_rate"], **APPROX64)
        assert b["epoch"] == pytest.approx(a["epoch"], **APPROX64)
    assert ft.state.global_step == hf.state.global_step
    reference = dict(hf.model.named_parameters())
    for name, p in ft.model.named_parameters():
        torch.testing.assert_close(p.detach(), reference[name].detach(), **FLOAT64)


class Regression(nn.Module):
    """Two float64 layers (weights decay, biases do not) returning ``{"loss", "logits"}``; seeded, so every
    instance starts from the same weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 1)
        self.double()

    def forward(self, x, labels=None):
        out = self.fc2(torch.tanh(self.fc1(x))).squeeze(-1)
        return {"loss": ((out - labels) ** 2).mean(), "logits": out}
