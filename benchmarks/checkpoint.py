"""Checkpoint save / restore speed: ftrain's backends against torch.save and the safetensors library, and the time an
asynchronous save blocks the caller, in one run.

States: params of a stack of 1024x1024 linear layers (25M or 100M float32 values) plus AdamW's two moments (random
values, so no format can shortcut zeros): 0.3 GB and 1.2 GB. Every save is fsynced (torch.save and save_file get an
explicit fsync so the rows compare like with like); restores read back from the page cache (the file was just
written; dropping caches would disturb other work on the machine) and every restored tensor is materialized. The
methods take turns within each repeat (each in a fresh directory), so drift in machine speed hits them alike; the
best of the repeats counts.

Rows:
  torch.save           torch.save(flat dict) + fsync / torch.load(weights_only=True, mmap=False)
  safetensors.save_file  the library's writer + fsync / load_file + clone (load_file memory-maps)
  ftrain safetensors   CheckpointManager(backend="safetensors"): streaming write + xxh3_128 + fsync + manifest +
                       commit / restore with checksum verification and template checks (and, in its own column,
                       verify=False). Goals against torch.save: save <= 1.1x, verified restore <= 1.3x.
  ftrain sha256        the same with CheckpointManagerOptions(hash_algorithm="sha256") (cryptographic)
  ftrain dcp           CheckpointManager(backend="dcp"): torch.distributed.checkpoint + hashing + commit
  ftrain orbax         CheckpointManager(backend="orbax") (skipped with a note when orbax-checkpoint is missing)
Async: the caller-blocked time of CheckpointManager(async_save=True).save (staging into reused CPU buffers) against a
synchronous save of the same state. Goal: blocked < 10% of the synchronous save.

Usage:
    python benchmarks/checkpoint.py                  # 25M and 100M, best of 3
    python benchmarks/checkpoint.py --sizes 25M --repeats 1
    python benchmarks/checkpoint.py --quick --json r.json   # smoke run on a 4M state (50 MB), rows as JSON
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ftrain import TrainState, optim, tree
from ftrain.checkpoint import CheckpointManager, CheckpointManagerOptions
from ftrain.checkpoint.integrity import DEFAULT_HASH

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_json  # noqa: E402

SIZES = {"25M": 24, "100M": 96}  # number of 1024x1024 (+bias) layers
QUICK_SIZES = {"4M": 4}  # --quick only
ASYNC_GOAL = 0.10  # async save blocks the caller for < 10% of a synchronous save
SAVE_GOAL = 1.1  # ftrain's save (checksums, fsync, commit) <= 1.1x torch.save + fsync
RESTORE_GOAL = 1.3  # ftrain's verified restore <= 1.3x torch.load(mmap=False)


def build_state(layers: int) -> TrainState:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(layers)])
    state = TrainState.create(model, optim.adamw(1e-3), key=0)
    return state.replace(opt_state=tree.tree_map(lambda x: torch.randn_like(x) if x.dim() else x, state.opt_state))


def nbytes(state) -> int:
    return sum(t.numel() * t.element_size() for t in tree.tree_leaves(state))


def flat(state) -> dict[str, torch.Tensor]:
    paths, leaves, _ = tree.tree_flatten_with_path(state)
    return {tree.keystr(p): leaf for p, leaf in zip(paths, leaves)}


def fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def bench_torch_save(state, d: Path) -> tuple[float, float]:
    tensors, path = flat(state), d / "state.pt"
    save_s, _ = timed(lambda: (torch.save(tensors, path), fsync(path)))
    load_s, _ = timed(lambda: torch.load(path, weights_only=True, mmap=False))
    return save_s, load_s


def bench_save_file(state, d: Path) -> tuple[float, float]:
    from safetensors.torch import load_file, save_file

    tensors, path = flat(state), d / "state.safetensors"
    save_s, _ = timed(lambda: (save_file(tensors, path), fsync(path)))
    load_s, _ = timed(lambda: {k: v.clone() for k, v in load_file(path).items()})
    return save_s, load_s


def bench_manager(state, d: Path, backend: str, hash_algorithm: str = DEFAULT_HASH) -> tuple[float, float, float]:
    """Save, restore (checksums verified), restore without verification."""
    opts = CheckpointManagerOptions(backend=backend, hash_algorithm=hash_algorithm)
    with CheckpointManager(d / backend, opts) as mgr:
        save_s, _ = timed(lambda: mgr.save(1, state))
        load_s, restored = timed(lambda: mgr.restore(like=state))
        del restored
        unverified_s, restored = timed(lambda: mgr.restore(like=state, verify=False))
    assert torch.equal(restored.params["0.weight"], state.params["0.weight"])
    return save_s, load_s, unverified_s


def bench_async(state, d: Path) -> dict[str, float]:
    """Blocked time of the first async save (allocates the staging buffers) and of later ones (reuses them)."""
    with CheckpointManager(d / "async", CheckpointManagerOptions(async_save=True)) as mgr:
        first, _ = timed(lambda: mgr.save(1, state))
        total_first, _ = timed(mgr.wait_until_finished)
        steady = []
        for step in (2, 3):
            blocked, _ = timed(lambda step=step: mgr.save(step, state))
            mgr.wait_until_finished()
            steady.append(blocked)
    return {"first": first, "steady": min(steady), "background": total_first}


def best_of(repeats: int, methods: dict[str, Callable], state, root: Path) -> dict[str, tuple[float, ...]]:
    """The best time of each method's columns over ``repeats`` rounds; in each round every method runs once, in
    turn, each in a fresh directory."""
    results: dict[str, list[tuple[float, ...]]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            d = Path(tempfile.mkdtemp(dir=root))
            try:
                results[name].append(fn(state, d))
            finally:
                shutil.rmtree(d, ignore_errors=True)
    return {name: tuple(min(column) for column in zip(*runs)) for name, runs in results.items()}


def orbax_available() -> bool:
    try:
        import ml_dtypes  # noqa: F401
        import orbax.checkpoint  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    p.add_argument("--quick", action="store_true", help="smoke run: one 4M state (50 MB), one repeat, no orbax")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args()
    sizes, repeats = (list(QUICK_SIZES), 1) if args.quick else (args.sizes, args.repeats)
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="ftrain-ckpt-bench-"))
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} threads; writing under {root}"
    )
    methods: dict[str, Callable] = {
        "torch.save": bench_torch_save,
        "safetensors.save_file": bench_save_file,
        "ftrain safetensors": lambda s, d: bench_manager(s, d, "safetensors"),
        "ftrain sha256": lambda s, d: bench_manager(s, d, "safetensors", "sha256"),
        "ftrain dcp": lambda s, d: bench_manager(s, d, "dcp"),
    }
    if args.quick:
        print("note: --quick skips the orbax row (importing orbax alone takes seconds)")
    elif orbax_available():
        methods["ftrain orbax"] = lambda s, d: bench_manager(s, d, "orbax")
    else:
        print("note: orbax-checkpoint / ml_dtypes not installed: the orbax row is skipped (pip install ftrain[orbax])")
    rows, async_rows = [], []
    try:
        for size in sizes:
            size_rows, async_row = bench_size(size, methods, repeats, root)
            rows += size_rows
            async_rows.append(async_row)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_tables(rows, async_rows)
    if args.json:
        write_json(args.json, to_json(rows, async_rows, quick=args.quick, repeats=repeats))


def to_json(rows: list[tuple], async_rows: list[tuple], *, quick: bool, repeats: int) -> dict:
    """The two tables as lists of dicts (seconds; ``save_vs_torch_save`` and ``restore_vs_torch_load`` are ratios
    to torch.save's row)."""
    keys = ("size", "mb", "method", "save_s", "restore_s", "restore_unverified_s", "save_vs_torch_save",
            "restore_vs_torch_load")  # fmt: skip
    async_keys = ("size", "sync_save_s", "async_blocked_first_s", "async_blocked_later_s", "async_commit_s")
    return {
        "quick": quick,
        "repeats": repeats,
        "async_goal": ASYNC_GOAL,
        "save_goal": SAVE_GOAL,
        "restore_goal": RESTORE_GOAL,
        "rows": [dict(zip(keys, row)) for row in rows],
        "async": [dict(zip(async_keys, row)) for row in async_rows],
    }


def bench_size(size: str, methods: dict[str, Callable], repeats: int, root: Path) -> tuple[list, tuple]:
    state = build_state({**SIZES, **QUICK_SIZES}[size])
    mb = nbytes(state) / 1e6
    best = best_of(repeats, methods, state, root)
    base_save, base_load = best["torch.save"][:2]
    rows = []
    for name, (save_s, load_s, *unverified) in best.items():
        plain = unverified[0] if unverified else None
        rows.append((size, mb, name, save_s, load_s, plain, save_s / base_save, load_s / base_load))
        print(f"  {size} {name}: save {save_s:.2f}s, restore {load_s:.2f}s", flush=True)
    sync_s = next(r[3] for r in rows if r[2] == "ftrain safetensors")
    runs = [bench_async(state, Path(tempfile.mkdtemp(dir=root))) for _ in range(repeats)]
    best_async = {k: min(r[k] for r in runs) for k in runs[0]}
    return rows, (size, sync_s, best_async["first"], best_async["steady"], best_async["background"])


def print_tables(rows, async_rows) -> None:
    print(
        "\n| state | method | save s | save MB/s | restore s | restore MB/s | restore s, verify=False "
        f"| save vs torch.save (goal <= {SAVE_GOAL}) | restore vs torch.load (goal <= {RESTORE_GOAL}) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for size, mb, name, save_s, load_s, unverified, save_ratio, load_ratio in rows:
        plain = f"{unverified:.2f}" if unverified is not None else "—"
        print(
            f"| {size} ({mb:.0f} MB) | {name} | {save_s:.2f} | {mb / save_s:.0f} | {load_s:.2f} | {mb / load_s:.0f} | "
            f"{plain} | {save_ratio:.2f}x | {load_ratio:.2f}x |"
        )
    print(
        "\n| state | sync save s | async blocked, 1st save s | async blocked, later saves s | blocked / sync "
        "(later) | wait until committed s |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for size, sync_s, first, steady, background in async_rows:
        print(
            f"| {size} | {sync_s:.2f} | {first:.3f} ({first / sync_s:.1%}) | {steady:.3f} | {steady / sync_s:.1%} | "
            f"{background:.2f} |"
        )


if __name__ == "__main__":
    main()
