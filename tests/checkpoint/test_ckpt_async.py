"""Asynchronous saves: the caller blocks only while tensors are staged, may overwrite (donate) the state right after
``save`` returns, and a failed background write raises at the next call."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # ckpt_helpers.py lives next to this file
from ckpt_helpers import assert_bitwise_equal, make_state  # noqa: E402

from ftrain import tree  # noqa: E402
from ftrain.checkpoint import CheckpointManager, CheckpointManagerOptions, SafetensorsBackend  # noqa: E402
from ftrain.checkpoint import staging as staging_module  # noqa: E402


class GatedBackend(SafetensorsBackend):
    """Writes only once ``gate`` is set; fails on the steps in ``fail_on``."""

    def __init__(self, fail_on=()):
        super().__init__()
        self.gate = threading.Event()
        self.fail_on = set(fail_on)
        self.writer_threads = set()

    def write(self, directory, tensors, meta, *, hash_algorithm):
        self.writer_threads.add(threading.current_thread().name)
        assert self.gate.wait(10)
        if meta["step"] in self.fail_on:
            raise OSError(f"simulated write failure at step {meta['step']}")
        return super().write(directory, tensors, meta, hash_algorithm=hash_algorithm)


def _async(backend) -> CheckpointManagerOptions:
    return CheckpointManagerOptions(async_save=True, backend=backend)


def test_the_caller_blocks_only_while_staging_and_may_overwrite_the_state_right_after(tmp_path, monkeypatch):
    staged_seconds = []
    real_stage = staging_module.Stager.stage

    def timed_stage(self, tensors):
        t = time.perf_counter()
        out = real_stage(self, tensors)
        staged_seconds.append(time.perf_counter() - t)
        return out

    monkeypatch.setattr(staging_module.Stager, "stage", timed_stage)
    backend = GatedBackend()
    state = make_state()
    expected = tree.tree_map(lambda x: x.clone(), state)
    with CheckpointManager(tmp_path, _async(backend)) as mgr:
        t = time.perf_counter()
        assert mgr.save(2, state)
        blocked = time.perf_counter() - t
        # the write has not even started: save returned after staging alone
        assert staged_seconds and blocked - staged_seconds[0] < 0.05
        assert mgr.all_steps() == [] and not mgr.should_save(2)  # in flight: not listed, not due again
        for leaf in tree.tree_leaves(state):  # what a donated jitted step does: write the next state in place
            leaf.add_(1) if leaf.dtype != torch.bool else leaf.logical_not_()
        backend.gate.set()
        mgr.wait_until_finished()
        assert mgr.all_steps() == [2]
        assert_bitwise_equal(mgr.restore(like=make_state()), expected)
    assert backend.writer_threads == {"ftrain-checkpoint_0"}


def test_a_failed_background_write_raises_at_the_next_save_once(tmp_path):
    backend = GatedBackend(fail_on={2})
    backend.gate.set()
    with CheckpointManager(tmp_path, _async(backend)) as mgr:
        assert mgr.save(2, make_state())  # returns: the failure happens in the background
        with pytest.raises(OSError, match="simulated write failure at step 2"):
            mgr.save(3, make_state())
        assert mgr.save(3, make_state())  # raised once; the next save works
        mgr.wait_until_finished()
        assert mgr.all_steps() == [3]
    assert not any(p.name.startswith(".tmp-step_00000003") for p in tmp_path.iterdir())


@pytest.mark.parametrize("where", ["wait_until_finished", "close", "restore"])
def test_a_failed_background_write_raises_at_wait_close_and_restore(tmp_path, where):
    backend = GatedBackend(fail_on={1})
    backend.gate.set()
    mgr = CheckpointManager(tmp_path, _async(backend))
    mgr.save(1, make_state())
    with pytest.raises(OSError, match="simulated write failure at step 1"):
        if where == "restore":
            mgr.restore(like=make_state())
        else:
            getattr(mgr, where)()
    mgr.close()


def test_restore_and_metadata_wait_for_the_write_in_flight(tmp_path):
    backend = GatedBackend()
    with CheckpointManager(tmp_path, _async(backend)) as mgr:
        mgr.save(4, make_state(), extra={"data_position": 4})
        threading.Timer(0.1, backend.gate.set).start()
        assert int(mgr.restore(like=make_state()).step) == 2  # waited for step 4's commit (make_state: 2 updates)
        assert mgr.metadata().extra == {"data_position": 4}


def test_staging_buffers_are_reused_and_released_on_close(tmp_path):
    backend = GatedBackend()
    backend.gate.set()
    state = make_state()
    mgr = CheckpointManager(tmp_path, _async(backend))
    mgr.save(1, state)
    held = mgr._stager.nbytes
    assert held == sum(t.numel() * t.element_size() for t in tree.tree_leaves(state))
    ptr = mgr._stager._buffers["['params']['fc.weight']"].data_ptr()
    mgr.save(2, state)
    assert mgr._stager._buffers["['params']['fc.weight']"].data_ptr() == ptr
    mgr.close()
    assert mgr._stager.nbytes == 0 and mgr.all_steps() == [1, 2]
    with pytest.raises(RuntimeError, match="is closed"):
        mgr.save(3, state)
