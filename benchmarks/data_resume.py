"""Time to the first batch when a run resumes at step k, on a 10**7-example map-style source (CPU).

ftrain's ``BatchStream.iter_from(k)`` computes the example indices of step k from the keyed permutation, so the cost
does not grow with k. A torch ``DataLoader`` has no position: resuming means skipping k batches, either by loading
and dropping them (what a plain loop does) or by skipping them in the batch sampler (what accelerate's
``skip_first_batches`` does for a map-style dataset: it still draws the epoch's ``randperm`` and walks k batches of
indices). Step k lies in epoch ``k // steps_per_epoch``; the DataLoader only needs to skip ``k % steps_per_epoch``
batches of that epoch (step 10**6 is in epoch 3 here). Load-and-drop is timed for a small k and scaled linearly; the
sampler skip is timed. Ratios are DataLoader time / ftrain time.

Run: ``python benchmarks/data_resume.py`` (about half a minute); ``--quick`` for a smoke run (one repeat, load-and-drop
fitted on k=100, a 10**6-example source); ``--json PATH`` to also write the rows as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

from ftrain.data import BatchStream

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_json  # noqa: E402

N = 10**7
BATCH = 32
SEQ = 16
TARGET_MS = 50.0  # goal: time to the first batch at any step


class Synthetic(torch.utils.data.Dataset):
    """``n`` (10**7) examples made on the fly (no memory): example i is ``input_ids = [i, i, ...]``."""

    def __init__(self, n: int = N):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.full((SEQ,), i, dtype=torch.int64), "labels": torch.tensor(i % 7)}


def _best(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _ftrain_first_batch(stream: BatchStream, k: int, repeat: int = 5) -> float:
    return _best(lambda: next(stream.iter_from(k)), repeat)


def _loader(ds: torch.utils.data.Dataset) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(0))


def _torch_loader_skip(ds: torch.utils.data.Dataset, k: int) -> float:
    """Load and drop k batches, then take one."""
    return _best(lambda: next(itertools.islice(iter(_loader(ds)), k, None)), repeat=1)


def _torch_sampler_skip(ds: torch.utils.data.Dataset, k: int) -> float:
    """Skip k batches of indices in the batch sampler (accelerate's skip_first_batches), then load one."""

    def run():
        loader = _loader(ds)
        indices = next(itertools.islice(iter(loader.batch_sampler), k, None))
        loader.collate_fn([ds[i] for i in indices])

    return _best(run, repeat=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 10**6 examples, one repeat")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args()
    ds = Synthetic(10**6 if args.quick else N)
    t0 = time.perf_counter()
    stream = BatchStream(ds, BATCH, seed=0)
    build = time.perf_counter() - t0
    print(f"{len(ds):,}-example map-style source, batch {BATCH}, CPU; BatchStream built in {build * 1e3:.2f} ms\n")
    small_k, repeat = (100, 1) if args.quick else (1000, 5)
    fixed = _torch_loader_skip(ds, 0)  # includes the epoch's randperm(10**7)
    per_batch = (_torch_loader_skip(ds, small_k) - fixed) / small_k
    rows = []
    for k in (0, 10**3, 10**6):
        skip = k % len(stream)
        ours = _ftrain_first_batch(stream, k, repeat)
        naive = _torch_loader_skip(ds, skip) if skip <= small_k else fixed + per_batch * skip
        rows.append((k, ours, naive, _torch_sampler_skip(ds, skip)))
    _print_table(rows, small_k, fixed, per_batch)
    if args.json:
        keys = ("step", "ftrain_s", "loader_drop_s", "sampler_skip_s")
        write_json(
            args.json,
            {
                "quick": args.quick,
                "examples": len(ds),
                "batch": BATCH,
                "steps_per_epoch": len(stream),
                "extrapolated_above_k": small_k,
                "target_ms": TARGET_MS,
                "rows": [dict(zip(keys, row)) for row in rows],
            },
        )


def _print_table(rows: list[tuple], small_k: int, fixed: float, per_batch: float) -> None:
    head = f"{'resume at step k':>16} | {'ftrain iter_from(k)':>19} | {'DataLoader load+drop k':>22} | {'ratio':>9} "
    head += f"| {'sampler skip k':>14} | {'ratio':>9}"
    print(head)
    print("-" * len(head))
    for k, ours, naive, samp in rows:
        est = "*" if k > small_k else " "
        print(
            f"{k:>16,} | {ours * 1e3:>16.2f} ms | {naive * 1e3:>19.1f} ms{est} | {naive / ours:>8.0f}x "
            f"| {samp * 1e3:>11.1f} ms | {samp / ours:>8.0f}x"
        )
    print(
        f"\n* extrapolated: load+drop = {fixed * 1e3:.0f} ms (first batch, with the randperm) + {per_batch * 1e3:.3f} "
        f"ms per skipped batch (fitted on k=0 and k={small_k}); everything else is measured."
    )
    worst = max(r[1] for r in rows)
    print(f"ftrain worst time to first batch: {worst * 1e3:.2f} ms (target < {TARGET_MS:.0f} ms)")


if __name__ == "__main__":
    main()
