"""DCP across processes: 2 gloo ranks save a Shard(0)-sharded state (and agree to save when only one of them gets
SIGTERM); 1 process restores it, bitwise."""

from __future__ import annotations

import sys
from pathlib import Path

import torch.multiprocessing as tmp

sys.path.insert(0, str(Path(__file__).parent))  # ckpt_helpers.py lives here; the child processes import it too
from ckpt_helpers import assert_bitwise_equal, make_state, save_sharded  # noqa: E402

from ftrain.checkpoint import CheckpointManager, CheckpointManagerOptions  # noqa: E402


def test_two_ranks_save_one_process_restores(tmp_path):
    ctx = tmp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "ftrain", "ftrain.checkpoint", "torch.distributed.checkpoint"])
    directory = tmp_path / "ckpt"
    tmp.start_processes(
        save_sharded,
        args=(2, str(tmp_path / "store"), str(directory)),
        nprocs=2,
        start_method="forkserver",
    )
    with CheckpointManager(directory, CheckpointManagerOptions(backend="dcp")) as mgr:
        assert mgr.all_steps() == [21]
        info = mgr.metadata()
        assert info.extra == {"world_size": 2, "preempted": True}
        restored = mgr.restore(like=make_state(seed=7, steps=0))
    # bitwise: the ranks built make_state() with the same kernels on this machine (tiny tensors: no threading)
    assert_bitwise_equal(restored, make_state())
    files = sorted(p.name for p in (directory / "step_00000021" / "dcp").iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"]
