"""Workers of the context-parallel step test (2 gloo ranks on the CPU) and the single-process reference they are
compared with. One launch trains every layout: the tiny ``ftrain.models.GPT`` in float64 through the sharded
``make_train_step``, each rank reading its share of the same global batches; rank 1 writes what it measured."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))  # tests/conftest.py: the tiny GPT and its batches
from conftest import lm_batches, make_gpt  # noqa: E402

from ftrain import TrainState, make_train_step, optim  # noqa: E402
from ftrain.distributed.context_parallel import apply_context_parallel, lm_loss, prepare_cp_batch  # noqa: E402

STEPS = 10
BATCH = 8

# name -> (ParallelConfig kwargs, load_balance, apply_context_parallel, steps)
LAYOUTS = {
    "cp_balanced": (dict(dp_shard=1, cp=2), True, True, STEPS),
    "cp_contiguous": (dict(dp_shard=1, cp=2), False, True, STEPS),
    "fsdp": (dict(dp_shard=2, cp=1), True, True, STEPS),
    # the control: cp=2 batches, but each rank attends only to its own shard (no apply_context_parallel)
    "cp_local_attention": (dict(dp_shard=1, cp=2), True, False, 2),
}


def tx() -> optim.GradientTransformation:
    return optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(3e-3, eps=1e-4, weight_decay=0.1))


def new_state() -> TrainState:
    return TrainState.create(make_gpt(0, dropout=0.0, dtype=torch.float64), tx(), key=0)


def reference(steps: int = STEPS) -> dict[str, object]:
    """One process, the whole global batch, the model's own causal attention, ``labels`` shifted in the loss."""
    state = new_state()
    step = make_train_step(lm_loss)
    curve = []
    for b in lm_batches(steps, BATCH):
        state, metrics = step(state, b)
        curve.append(metrics["loss"])
    return {"loss": torch.stack(curve), "params": dict(state.params), "metrics": metrics}


def rank_batch(batch: dict, mesh, load_balance: bool) -> dict:
    """This rank's part of a global batch: its data-parallel rows, then its cp shard of the sequence."""
    from ftrain.distributed import data_parallel_rank, data_parallel_size

    rows = {k: v.chunk(data_parallel_size(mesh))[data_parallel_rank(mesh)] for k, v in batch.items()}
    cp_size = mesh["cp"].size()
    if cp_size == 1:
        return rows
    return prepare_cp_batch(rows, mesh.get_local_rank("cp"), cp_size, load_balance=load_balance)


def run_layout(name: str) -> dict[str, object]:
    """Trains ``name``'s layout; returns the global loss curve, the gathered final params, the last metrics, the
    attention hook the skeleton carried and the shape of the batch this rank fed the model."""
    from ftrain.distributed import ParallelConfig, build_mesh, gather_state, shard_state

    kwargs, load_balance, use_cp, steps = LAYOUTS[name]
    config = ParallelConfig(**kwargs)
    mesh = build_mesh(config, "cpu")
    model = make_gpt(0, dropout=0.0, dtype=torch.float64)
    if use_cp:
        model = apply_context_parallel(model, mesh)
    state = shard_state(TrainState.create(model, tx(), key=0), mesh, config)
    step = make_train_step(lm_loss)
    curve, shapes = [], []
    for b in lm_batches(steps, BATCH):
        local = rank_batch(b, mesh, load_balance)
        shapes.append(tuple(local["input_ids"].shape))
        state, metrics = step(state, local)
        curve.append(metrics["loss"])
    return {
        "loss": torch.stack(curve),
        "params": dict(gather_state(state).params),
        "metrics": {k: v.detach().clone() for k, v in metrics.items()},
        "attention": type(state.skeleton.attention_fn).__name__,
        "input_shape": torch.tensor(shapes[-1]),
    }


def cp_worker(rank: int, world: int, init_file: str, out: str, names: list[str]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {name: run_layout(name) for name in names}
        if rank == 1:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()
