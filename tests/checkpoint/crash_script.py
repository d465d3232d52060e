"""Crash-test worker: trains a tiny GPT (eager, dropout on) with a CheckpointManager and resumes from the newest
checkpoint when it starts. ``test_ckpt_crash.py`` runs it in child processes and SIGKILLs them at random moments.

Standalone:
    python tests/checkpoint/crash_script.py DIR [--async] [--delay 0.05] [--events FILE]

The batch of step ``k`` depends only on ``k`` (the data position is a function of ``state.step``, DESIGN.md
invariant 3), and dropout is seeded from ``fold_in(state.key, state.step)``, so a run resumed from any checkpoint
must end with the same bits as a run that was never interrupted.

The backend sleeps before and after writing the tensors (``delay``), so random kills often land mid-save, and
writes an event line (``write-begin <step>``, ``write-end <step>``, ``step <step>``) that the test times kills from.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import ftrain
from ftrain import losses, optim, random
from ftrain.checkpoint import CheckpointManager, CheckpointManagerOptions, SafetensorsBackend
from ftrain.models import GPT, GPTConfig

CFG = GPTConfig(vocab_size=32, seq_len=8, n_layer=1, n_head=2, d_model=16, dropout=0.1)
TOTAL_STEPS = 24
SAVE_EVERY = 3


class SlowBackend(SafetensorsBackend):
    """The safetensors backend with sleeps around the write and an event log."""

    def __init__(self, delay: float, events: str | None):
        super().__init__()
        self.delay = delay
        self.events = events

    def emit(self, what: str, step: int) -> None:
        if self.events:
            with open(self.events, "a") as f:
                f.write(f"{what} {step}\n")

    def write(self, directory, tensors, meta, *, hash_algorithm):
        self.emit("write-begin", meta["step"])
        time.sleep(self.delay)
        entries = super().write(directory, tensors, meta, hash_algorithm=hash_algorithm)
        self.emit("write-end", meta["step"])
        time.sleep(self.delay / 4)
        return entries


def build_state() -> ftrain.TrainState:
    torch.manual_seed(0)
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1))
    return ftrain.TrainState.create(GPT(CFG), tx, key=random.key(0))


def batch_at(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return {"input_ids": torch.randint(0, CFG.vocab_size, (4, CFG.seq_len), generator=g)}


def loss_fn(model, batch):
    return losses.cross_entropy(model(batch["input_ids"]), batch["input_ids"], shift=True)


def run(directory: str, *, async_save: bool = False, delay: float = 0.0, events: str | None = None) -> int:
    """Trains to ``TOTAL_STEPS`` from the newest checkpoint in ``directory``; returns the step it started from."""
    torch.set_num_threads(1)  # the same in every run (bitwise), and no spinning OpenMP threads on a busy machine
    backend = SlowBackend(delay, events)
    opts = CheckpointManagerOptions(
        save_interval_steps=SAVE_EVERY, max_to_keep=2, async_save=async_save, backend=backend
    )
    state = build_state()
    train_step = ftrain.make_train_step(loss_fn)
    with CheckpointManager(directory, opts) as mgr:
        if mgr.latest_step() is not None:
            state, info = mgr.restore_with_metadata(like=state)
            assert info.extra == {"data_position": int(state.step)}, info.extra
        start = int(state.step)
        while int(state.step) < TOTAL_STEPS:
            state, _ = train_step(state, batch_at(int(state.step)))
            step = int(state.step)
            backend.emit("step", step)
            mgr.save(step, state, extra={"data_position": step})
    backend.emit("done", int(state.step))
    return start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory")
    p.add_argument("--async", dest="async_save", action="store_true")
    p.add_argument("--delay", type=float, default=0.05)
    p.add_argument("--events", default=None)
    args = p.parse_args()
    start = run(os.path.abspath(args.directory), async_save=args.async_save, delay=args.delay, events=args.events)
    print(f"resumed from step {start}, trained to step {TOTAL_STEPS}")


if __name__ == "__main__":
    main()
