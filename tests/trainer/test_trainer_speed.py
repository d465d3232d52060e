"""The Trainer's loop costs no host-device sync per step: only logging steps read values back (issue 5)."""

import os
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from ftrain.trainer import Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from tests.trainer.test_trainer_parity import ARGS, tiny_gpt2, token_rows  # noqa: E402

# Every way a tensor's value reaches Python (on a GPU each one waits for the device).
_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


# Host-side reads that are not the loop's: the data pipeline's and the step's RNG key arithmetic (the key and step
# are read to seed torch's generator; reported separately as a core matter).
_HOST_SIDE = (os.path.join("ftrain", "data", ""), os.path.join("ftrain", "random.py"))


def _host_side() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.endswith(_HOST_SIDE[1]) or _HOST_SIDE[0] in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


@pytest.fixture
def reads(monkeypatch):
    """Counts the tensor reads made while the fixture is active (not the host-side ones above)."""
    counter = {"n": 0}
    for name in _READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            if not _host_side():
                counter["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counter


def test_steps_between_logs_read_no_more_than_the_pure_step_itself(tmp_path, reads):
    class Window(TrainerCallback):
        """Reads made from one on_step_end to the next: the log/save checks of step k, the data and step k + 1."""

        def __init__(self):
            self.at_end = []

        def on_step_end(self, args, state, control, **kwargs):
            self.at_end.append(reads["n"])

    window = Window()
    args = TrainingArguments(str(tmp_path), **{**ARGS, "max_steps": 7, "logging_steps": 3, "disable_tqdm": True})
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=token_rows(), callbacks=[window])
    trainer.train()
    per_window = [b - a for a, b in zip(window.at_end, window.at_end[1:])]  # windows after steps 1..6

    batch = next(iter(trainer.get_train_dataloader().iter_from(0, stop=1)))
    before = reads["n"]
    trainer._train_step(trainer._train_state, batch)  # the pure step alone: what the model's forward reads
    intrinsic = reads["n"] - before

    logged_after = {3, 6}
    for k, n in enumerate(per_window, start=1):
        if k in logged_after:
            assert n > intrinsic  # the log reads the loss, grad_norm and lr back: the counter sees reads
        else:
            assert n == intrinsic, f"the loop read {n - intrinsic} tensor value(s) around step {k + 1}"
