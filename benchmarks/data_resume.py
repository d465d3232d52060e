"""Time to the first batch when a run resumes at step k, on a 10**7-example map-style source (CPU).

ftrain's ``BatchStream.iter_from(k)`` computes the example indices of step k from the keyed permutation, so the cost
does not grow with k. A torch ``DataLoader`` has no position: resuming means skipping k batches, either by loading
and dropping them (what a plain loop does) or by skipping them in the batch sampler (what accelerate's
``skip_first_batches`` does for a map-style dataset: it still draws the epoch's ``randperm`` and walks k batches of
indices). Step k lies in epoch ``k // steps_per_epoch``; the DataLoader only needs to skip ``k % steps_per_epoch``
batches of that epoch (step 10**6 is in epoch 3 here). Load-and-drop is timed for a small k and scaled linearly; the
sampler skip is timed. Ratios are DataLoader time / ftrain time.

Run: ``python benchmarks/data_resume.py`` (about half a minute).
"""

from __future__ import annotations

import itertools
import time

import torch

from ftrain.data import BatchStream

N = 10**7
BATCH = 32
SEQ = 16


class Synthetic(torch.utils.data.Dataset):
    """10**7 examples made on the fly (no memory): example i is ``input_ids = [i, i, ...]``."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.full((SEQ,), i, dtype=torch.int64), "labels": torch.tensor(i % 7)}


def _best(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _ftrain_first_batch(stream: BatchStream, k: int) -> float:
    return _best(lambda: next(stream.iter_from(k)))


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
    ds = Synthetic()
    t0 = time.perf_counter()
    stream = BatchStream(ds, BATCH, seed=0)
    build = time.perf_counter() - t0
    print(f"10**7-example map-style source, batch {BATCH}, CPU; BatchStream built in {build * 1e3:.2f} ms\n")
    small_k = 1000
    fixed = _torch_loader_skip(ds, 0)  # includes the epoch's randperm(10**7)
    per_batch = (_torch_loader_skip(ds, small_k) - fixed) / small_k
    rows = []
    for k in (0, 10**3, 10**6):
        skip = k % len(stream)
        ours = _ftrain_first_batch(stream, k)
        naive = _torch_loader_skip(ds, skip) if skip <= small_k else fixed + per_batch * skip
        rows.append((k, ours, naive, _torch_sampler_skip(ds, skip)))
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
    print(f"ftrain worst time to first batch: {worst * 1e3:.2f} ms (target < 50 ms)")


if __name__ == "__main__":
    main()
