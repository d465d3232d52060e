"""Crash test: SIGKILL a training run at 30 random moments (many mid-save); every time, the newest listed
checkpoint restores and the run resumes from it; each resumed chain ends bitwise equal to an uninterrupted run.

Each run is a child process forked from a forkserver that imported torch and ftrain once (a fresh interpreter
costs ~4 s here); the child is killed with SIGKILL, never asked to stop.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # crash_script.py lives next to this file; children import it too
import crash_script  # noqa: E402

from ftrain import tree  # noqa: E402
from ftrain.checkpoint import CheckpointManager  # noqa: E402
from ftrain.checkpoint.atomic import TMP_PREFIX  # noqa: E402

KILLS = 30
DELAY = 0.04


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def assert_bitwise_equal(a, b) -> None:
    """Bitwise: every run is a child of one forkserver on this machine with one thread (crash_script.run), so the
    resumed chain and the uninterrupted run execute the same kernels on the same inputs in the same order."""
    pa, la, _ = tree.tree_flatten_with_path(a)
    pb, lb, _ = tree.tree_flatten_with_path(b)
    assert [tree.keystr(p) for p in pa] == [tree.keystr(p) for p in pb]
    for path, x, y in zip(pa, la, lb):
        assert (x.dtype, x.shape) == (y.dtype, y.shape), tree.keystr(path)
        assert _bits(x) == _bits(y), f"{tree.keystr(path)} differs"


def _read_events(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _run_and_kill(ctx, directory: Path, events: Path, rng: random.Random, async_save: bool) -> tuple[bool, str]:
    """Starts a run and kills it at a moment drawn from ``rng``; returns (killed, trigger)."""
    events.unlink(missing_ok=True)
    trigger = rng.choice(["time", "write-begin", "write-end", "step"])
    nth = rng.randint(1, 3)
    after = rng.uniform(0, DELAY * 1.5) if trigger != "time" else rng.uniform(0.0, 0.8)
    proc = ctx.Process(
        target=crash_script.run,
        args=(str(directory),),
        kwargs=dict(async_save=async_save, delay=DELAY, events=str(events)),
    )
    proc.start()
    start = time.monotonic()
    fire_at = start + after if trigger == "time" else None
    while proc.is_alive():
        now = time.monotonic()
        if fire_at is None and sum(e.startswith(trigger) for e in _read_events(events)) >= nth:
            fire_at = now + after
        if fire_at is not None and now >= fire_at:
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
            return True, trigger
        assert now - start < 30, "the training run hung"
        time.sleep(0.002)
    proc.join()
    assert proc.exitcode == 0, f"the run failed (exit code {proc.exitcode}); see its output above"
    return False, trigger


def test_sigkill_at_random_moments_always_leaves_a_restorable_checkpoint_and_resumes_bitwise(tmp_path):
    ctx = mp.get_context("forkserver")
    # The forkserver imports these once (Python 3.11 applies the parent's sys.path only in the children, so preload
    # what is importable from anywhere; each child then imports the small crash_script module itself).
    ctx.set_forkserver_preload(["torch", "ftrain", "ftrain.checkpoint", "ftrain.models"])
    like = crash_script.build_state()

    reference_dir = tmp_path / "reference"
    proc = ctx.Process(target=crash_script.run, args=(str(reference_dir),))
    proc.start()
    proc.join()
    assert proc.exitcode == 0
    with CheckpointManager(reference_dir) as mgr:
        assert mgr.all_steps() == [21, 24]
        reference = mgr.restore(crash_script.TOTAL_STEPS, like=like)
    assert int(reference.step) == crash_script.TOTAL_STEPS

    rng = random.Random(0)
    kills = chains = mid_save = 0
    triggers: dict[str, int] = {}
    directory, events = tmp_path / "run0", tmp_path / "events.txt"
    while kills < KILLS:
        killed, trigger = _run_and_kill(ctx, directory, events, rng, async_save=kills % 2 == 1)
        if killed:
            kills += 1
            triggers[trigger] = triggers.get(trigger, 0) + 1
            mid_save += any(p.name.startswith(TMP_PREFIX) for p in directory.iterdir()) if directory.exists() else 0
            with CheckpointManager(directory) as mgr:  # cleans the leftovers of the killed save
                assert not any(p.name.startswith(TMP_PREFIX) for p in directory.iterdir())
                latest = mgr.latest_step()
                if latest is not None:
                    state = mgr.restore(like=like)  # verifies every file's hash
                    assert int(state.step) == latest
                    assert mgr.restore_extra(latest) == {"data_position": latest}
            continue
        # the run finished: the chain of resumed runs must equal the uninterrupted run, bit for bit
        with CheckpointManager(directory) as mgr:
            assert_bitwise_equal(mgr.restore(crash_script.TOTAL_STEPS, like=like), reference)
        chains += 1
        directory = tmp_path / f"run{chains}"
    # finish the last chain without killing it
    proc = ctx.Process(target=crash_script.run, args=(str(directory),))
    proc.start()
    proc.join()
    assert proc.exitcode == 0
    with CheckpointManager(directory) as mgr:
        assert_bitwise_equal(mgr.restore(crash_script.TOTAL_STEPS, like=like), reference)
    print(f"{kills} kills ({triggers}), {mid_save} mid-save, {chains + 1} chains compared bitwise")
    assert mid_save >= 5, f"only {mid_save} kills landed mid-save; the test no longer exercises what it should"
