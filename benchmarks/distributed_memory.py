"""Per-rank parameter and optimizer-state bytes under FSDP (and ZeRO-1/2, DP) on N gloo processes vs one.

Each layout shards a GPT's TrainState (AdamW) with ``ftrain.distributed.shard_state``, runs one train step (so the
state is the one training holds) and counts the bytes of the local shards this rank holds: params, and the
optimizer state (moments plus scalars). The goal under FSDP is 1/N of the single-process bytes for both.

Run:
    python benchmarks/distributed_memory.py --nproc 2 4 --json benchmarks/results/distributed_memory.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_json  # noqa: E402

LAYOUTS = {
    "dp": dict(dp_replicate=-1, dp_shard=1),
    "zero1": dict(dp_shard=-1, shard_level=1),
    "zero2": dict(dp_shard=-1, shard_level=2),
    "fsdp": dict(dp_shard=-1, shard_level=3),
}


def _config(kwargs: dict, world: int):
    from ftrain.distributed import ParallelConfig

    if kwargs.get("dp_replicate") == -1:
        kwargs = {**kwargs, "dp_replicate": world}
    return ParallelConfig(**kwargs)


def local_bytes(tree) -> int:
    """Bytes of the tensors this rank holds (a DTensor counts its local shard)."""
    from torch.distributed.tensor import DTensor

    from ftrain import tree as _tree

    total = 0
    for x in _tree.tree_leaves(tree):
        if isinstance(x, torch.Tensor):
            local = x.to_local() if isinstance(x, DTensor) else x
            total += local.numel() * local.element_size()
    return total


def model():
    from ftrain.models import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=512, seq_len=64, n_layer=4, n_head=4, d_model=128, dropout=0.0))


def worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from ftrain import TrainState, losses, make_train_step, optim
    from ftrain.distributed import build_mesh, shard_state

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rows = {}
        ids = torch.randint(0, 512, (world * 2, 64), generator=torch.Generator().manual_seed(0))
        local = {"input_ids": ids.chunk(world)[rank]}
        step = make_train_step(lambda m, b: losses.cross_entropy(m(b["input_ids"]), b["input_ids"], shift=True))
        for name, kwargs in LAYOUTS.items():
            config = _config(kwargs, world)
            state = shard_state(TrainState.create(model(), optim.adamw(1e-3), key=0), build_mesh(config), config)
            state, _ = step(state, local)
            rows[name] = {"params": local_bytes(state.params), "opt_state": local_bytes(state.opt_state)}
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        if rank == 0:
            torch.save({"max_over_ranks": _max_rows(gathered)}, out)
    finally:
        dist.destroy_process_group()


def _max_rows(per_rank: list[dict]) -> dict:
    return {name: {kind: max(r[name][kind] for r in per_rank) for kind in per_rank[0][name]} for name in per_rank[0]}


def measure(world: int) -> dict:
    import torch.multiprocessing as tmp

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.pt")
        tmp.start_processes(worker, args=(world, os.path.join(d, "store"), out), nprocs=world, start_method="spawn")
        return torch.load(out, weights_only=True)["max_over_ranks"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--json", default="benchmarks/results/distributed_memory.json")
    args = parser.parse_args()
    from ftrain import TrainState, optim

    single = TrainState.create(model(), optim.adamw(1e-3), key=0)
    base = {"params": local_bytes(single.params), "opt_state": local_bytes(single.opt_state)}
    results = {"single_process": base, "layouts": {}}
    print(f"single process: params {base['params']:,} B, optimizer state {base['opt_state']:,} B")
    print(f"{'layout':>8} {'N':>3} {'params/rank':>12} {'ratio':>7} {'1/N':>6} {'opt/rank':>12} {'ratio':>7}")
    for world in args.nproc:
        rows = measure(world)
        for name, row in rows.items():
            p, o = row["params"] / base["params"], row["opt_state"] / base["opt_state"]
            results["layouts"][f"{name}@{world}"] = {**row, "params_ratio": p, "opt_ratio": o, "goal": 1 / world}
            sizes = f"{row['params']:>12,} {p:>7.3f} {1 / world:>6.3f} {row['opt_state']:>12,} {o:>7.3f}"
            print(f"{name:>8} {world:>3} {sizes}")
    write_json(args.json, results)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
