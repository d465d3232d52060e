"""Sharded (DCP) checkpoints across layouts and process counts: saved by 2 FSDP ranks, restored in 1 process, and
the other way round; an FSDP checkpoint restored under a DP plan; a resumed 2-process run bitwise equal to the
uninterrupted one (checked inside the workers).

Bitwise wherever nothing is recomputed: a save/load round trip (1 -> 2, 2 -> 1, FSDP -> DP) moves the saved values
and compares them with the values saved, and a resumed run repeats the uninterrupted run's kernels on the same
layout in the same processes. The one comparison of two computations, 2 processes vs 1, is float64 (dist_workers
builds the model in float64) against ``tolerances.FLOAT64``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.multiprocessing as tmp

sys.path.insert(0, str(Path(__file__).parent))
import dist_workers as w  # noqa: E402
from tolerances import FLOAT64  # noqa: E402

from ftrain.checkpoint import CheckpointManager, CheckpointManagerOptions  # noqa: E402


def test_sharded_checkpoints_move_between_layouts_and_process_counts(tmp_path):
    opts = CheckpointManagerOptions(backend="dcp")
    single = w.plain_run(w.CKPT_AT)
    with CheckpointManager(tmp_path / "single", opts) as mgr:  # 1 process saves; 2 restore it below
        mgr.save(w.CKPT_AT, single)
    ctx = tmp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "ftrain", "torch.distributed.tensor", "dist_workers"])
    out = tmp_path / "out.pt"
    tmp.start_processes(
        w.ckpt_worker,
        args=(2, str(tmp_path / "store"), str(tmp_path), str(out)),
        nprocs=2,
        start_method="forkserver",
    )
    got = torch.load(out, weights_only=True)
    # 1 -> 2: the single-process checkpoint restored into FSDP shards, gathered: bitwise the saved state.
    w._assert_bitwise(got["from_single"], w.tensors_of(single), "1 -> 2 processes")
    # 2 -> 1: the FSDP checkpoint restored in this process: bitwise what the 2 ranks held.
    with CheckpointManager(tmp_path / "run", opts) as mgr:
        assert mgr.all_steps() == [w.CKPT_AT]
        restored = mgr.restore(like=w.plain_run(0))
    w._assert_bitwise(w.tensors_of(restored), got["at_save"], "2 -> 1 process")
    # and the 2-process state at the save is the single-process one (it trained the same batches): float64 params
    # after 3 AdamW steps, whose gradients were summed over 2 half batches instead of 1 whole one - FLOAT64.
    for k, v in single.params.items():
        assert v.dtype == torch.float64, k
        torch.testing.assert_close(restored.params[k], v, **FLOAT64, msg=lambda m, k=k: f"{k}: {m}")
