"""Shared helpers of the checkpoint tests: small states with every kind of leaf, and bitwise comparison."""

from __future__ import annotations

import torch

from ftrain import TrainState, optim, random, tree


class TinyNet(torch.nn.Module):
    """float32 and bfloat16 parameters, an int64 buffer (BatchNorm's counter) and a frozen parameter."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.head = torch.nn.Linear(3, 2).to(torch.bfloat16)
        self.norm = torch.nn.BatchNorm1d(3)
        self.frozen = torch.nn.Parameter(torch.randn(2), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.dropout(self.norm(self.fc(x)), 0.5, self.training)
        return self.head(h.to(torch.bfloat16)).float() + self.frozen


def make_state(seed: int = 0, *, steps: int = 2) -> TrainState:
    """A state with nested optimizer state — chain(clip, masked adamw with injected hyper-parameters, trace) — that
    holds None leaves (the mask), 0-d int64 counters, bfloat16 moments and the RNG key, after ``steps`` updates."""
    torch.manual_seed(seed)
    model = TinyNet()
    mask = {name: not name.endswith("bias") for name, p in model.named_parameters() if p.requires_grad}
    tx = optim.chain(
        optim.clip_by_global_norm(1.0),
        optim.masked(optim.inject_hyperparams(optim.adamw)(learning_rate=1e-2, weight_decay=0.1), mask),
        optim.trace(0.9),
    )
    state = TrainState.create(model, tx, key=random.key(seed))
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        grads = {k: torch.randn(v.shape, generator=g).to(v.dtype) for k, v in state.params.items()}
        state = state.apply_gradients(grads)
    return state


def bits(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def assert_bitwise_equal(a, b) -> None:
    """Same key paths, same None leaves, same dtypes, shapes and bytes.

    Bitwise is the right claim wherever the suite uses it: a save/load round trip copies bytes, and a resumed or
    recomputed state repeats the same kernels on the same inputs in the same order (same machine, same process or
    a child with the same environment; make_state's tensors are too small for any kernel to split them by thread).
    """
    pa, la, _ = tree.tree_flatten_with_path(a, is_leaf=lambda x: x is None)
    pb, lb, _ = tree.tree_flatten_with_path(b, is_leaf=lambda x: x is None)
    assert [tree.keystr(p) for p in pa] == [tree.keystr(p) for p in pb]
    for path, x, y in zip(pa, la, lb):
        where = tree.keystr(path)
        if not isinstance(x, torch.Tensor):
            assert x == y, where
            continue
        assert isinstance(y, torch.Tensor), where
        assert (x.dtype, tuple(x.shape)) == (y.dtype, tuple(y.shape)), where
        assert bits(x) == bits(y), f"{where} differs"


def save_sharded(rank: int, world_size: int, init_file: str, directory: str) -> None:
    """Worker of the multi-process DCP test: each rank holds a Shard(0) part of every tensor and saves it."""
    import os
    import signal

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from ftrain.checkpoint import CheckpointManager, CheckpointManagerOptions

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))

        def shard(x: torch.Tensor) -> torch.Tensor:
            return distribute_tensor(x, mesh, [Shard(0)]) if x.dim() >= 1 else x

        state = make_state()
        sharded = state.replace(
            params=tree.tree_map(shard, state.params), opt_state=tree.tree_map(shard, state.opt_state)
        )
        local = sharded.params["fc.weight"].to_local()
        assert local.shape[0] == (2 if rank == 0 else 1)  # 3 rows over 2 ranks
        opts = CheckpointManagerOptions(backend="dcp", max_to_keep=1, save_interval_steps=10, save_on_preemption=True)
        with CheckpointManager(directory, opts) as mgr:
            assert mgr.save(10, sharded) and not mgr.save(15, sharded)
            assert mgr.save(20, sharded, extra={"world_size": world_size})
            assert not mgr.should_save(21)
            if rank == 1:  # only one rank is told it will be preempted; both must save
                os.kill(os.getpid(), signal.SIGTERM)
            assert mgr.should_save(21) and mgr.preempted
            assert mgr.save(21, sharded, extra={"world_size": world_size, "preempted": True})
            assert mgr.all_steps() == [21]
            restored = mgr.restore(like=sharded)  # every rank gets its own shards back
        assert torch.equal(restored.params["fc.weight"].to_local(), local)
    finally:
        dist.destroy_process_group()


def orbax_checks(directory: str) -> list[str]:
    """The orbax backend's checks, run in a child process (jax starts threads, which would make later ``fork``\\ s
    in the test process unsafe). Returns the files of the checkpoint; raises AssertionError on a failure."""
    from pathlib import Path

    import pytest

    from ftrain.checkpoint import CheckpointManager, CheckpointManagerOptions, CorruptCheckpointError

    root = Path(directory)
    state = make_state()
    extras = {"empty": torch.zeros(0, 3), "f8": torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn)}
    for async_save in (False, True):
        opts = CheckpointManagerOptions(backend="orbax", async_save=async_save)
        with CheckpointManager(root / f"async{async_save}", opts) as mgr:
            mgr.save(2, (state, extras), extra={"async": async_save})
            restored = mgr.restore(like=(make_state(seed=4, steps=0), tree.tree_map(torch.zeros_like, extras)))
        assert_bitwise_equal(restored, (state, extras))
    ckpt = root / "asyncFalse" / "step_00000002"
    files = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
    data = max((p for p in ckpt.rglob("*") if p.is_file() and "/d/" in p.as_posix()), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 1
    data.write_bytes(bytes(raw))
    with CheckpointManager(root / "asyncFalse", CheckpointManagerOptions(backend="orbax")) as mgr:
        name = data.relative_to(ckpt).as_posix()
        with pytest.raises(CorruptCheckpointError, match=f"file '{name}' is corrupt: its xxh3_128 differs"):
            mgr.restore(like=(make_state(), extras))
    return files
