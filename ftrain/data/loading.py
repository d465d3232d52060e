"""Building microbatches: fetch, filter columns, collate under a per-microbatch seed, mark padding; worker loading.

Randomness in fetching and collating (a dataset's random crops in ``__getitem__``, MLM masking) runs under torch's,
Python's and numpy's global RNGs seeded from ``fold_in(fold_in(fold_in(key, epoch), rank), microbatch)`` and
restored afterwards: a microbatch is the same whichever process or worker builds it, whatever came before, and the
caller's RNG state is untouched. (It depends on the rank: a run resumed on another world size keeps the examples
but not the augmentation draws.)

With ``num_workers > 0`` a torch ``DataLoader`` runs the same builder in worker processes. Its batch sampler yields
:class:`Microbatch` plans computed from the step in the main process, so workers only fetch and collate: the order
never depends on ``num_workers``. The DataLoader's own base seed comes from a private generator (never the global
RNG), and each worker is seeded from the key, its rank and its id.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import random as _pyrandom
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch

from ftrain import random as _random
from ftrain.data.collate import check_batch

__all__ = ["Microbatch", "MicrobatchBuilder", "make_worker_loader", "seeded", "worker_loader"]


class Microbatch(NamedTuple):
    """One rank's share of one microbatch: what to read and how much of it is padding.

    Attributes:
        step: the global optimizer step it belongs to.
        epoch: the epoch.
        index: the microbatch number within the epoch.
        indices: example indices this rank reads (map-style) or stream positions within the epoch (iterable),
            padding rows included.
        num_valid: how many leading rows are real examples; the rest are padding.
        padded: whether the global microbatch has padding rows on some rank (then every rank's batch is marked).
    """

    step: int
    epoch: int
    index: int
    indices: tuple[int, ...]
    num_valid: int
    padded: bool


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Runs the body with torch's CPU RNG, Python's ``random`` and numpy's global RNG seeded from ``seed``, and
    restores all three afterwards."""
    py_state, np_state = _pyrandom.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _pyrandom.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            _pyrandom.setstate(py_state)
            np.random.set_state(np_state)


def _where(mb: Microbatch) -> str:
    shown = ", ".join(str(i) for i in mb.indices[:8]) + (", ..." if len(mb.indices) > 8 else "")
    return f"at step {mb.step} (epoch {mb.epoch}, microbatch {mb.index}, examples [{shown}])"


def _with_context(err: Exception, where: str) -> Exception:
    """The same kind of error with the microbatch's position appended (the original when its type cannot be)."""
    try:
        return type(err)(f"{err.args[0] if err.args else err} ({where})")
    except Exception:
        return err


@dataclasses.dataclass(frozen=True)
class MicrobatchBuilder:
    """``builder(plan, examples=None) -> dict`` of tensors for one :class:`Microbatch` (picklable for workers).

    Padding rows (``plan.num_valid <= row``) get ``-100`` in the integer ``label_keys`` (so ``(sum, count)`` losses
    count them zero) and, when ``pad_mask_key`` is set, the batch gets a bool ``pad_mask_key`` tensor, ``True`` for
    real rows, on every rank of a padded microbatch.
    """

    fetch: Callable[[tuple[int, ...]], list[Any]] | None
    collate: Callable[[list[Any]], Any]
    column_filter: Callable[[Any], Any] | None
    key: torch.Tensor
    rank: int
    label_keys: tuple[str, ...]
    pad_mask_key: str | None

    def seed_for(self, mb: Microbatch) -> int:
        return _random.seed_for_step(_random.fold_in(_random.fold_in(self.key, mb.epoch), self.rank), mb.index)

    def __call__(self, mb: Microbatch, examples: list[Any] | None = None) -> dict[str, torch.Tensor]:
        where = _where(mb)
        try:
            with seeded(self.seed_for(mb)):  # random augmentation in __getitem__ or the collator is reproducible
                if examples is None:
                    examples = self.fetch(mb.indices)
                if self.column_filter is not None:
                    examples = [self.column_filter(e) for e in examples]
                out = self.collate(examples)
        except (ValueError, TypeError, KeyError) as err:
            raise _with_context(err, where) from err
        batch = check_batch(out, rows=len(mb.indices), where=where)
        return self._mark_padding(batch, mb) if mb.padded else batch

    def _mark_padding(self, batch: dict[str, torch.Tensor], mb: Microbatch) -> dict[str, torch.Tensor]:
        for name in self.label_keys:
            labels = batch.get(name)
            if (
                labels is not None
                and labels.dim() > 0
                and not labels.is_floating_point()
                and labels.dtype != torch.bool
            ):
                labels = labels.clone()
                labels[mb.num_valid :] = -100
                batch[name] = labels
        if self.pad_mask_key is not None:
            if self.pad_mask_key in batch:
                raise ValueError(
                    f"the batch already has a {self.pad_mask_key!r} key, which BatchStream uses to mark padding rows "
                    f"{_where(mb)}; pass another pad_mask_key."
                )
            batch[self.pad_mask_key] = torch.arange(len(mb.indices)) < mb.num_valid
        return batch


class _PlanDataset:
    """What the DataLoader indexes: ``__getitems__(plan)`` builds the whole microbatch in the worker."""

    def __init__(self, builder: MicrobatchBuilder):
        self.builder = builder

    def __getitems__(self, plan: Microbatch) -> dict[str, torch.Tensor]:
        return self.builder(plan)

    def __getitem__(self, plan: Microbatch) -> dict[str, torch.Tensor]:
        return self.builder(plan)


class _PlanSampler:
    """A batch sampler over precomputed microbatch plans; ``plans`` is read when an iteration starts, so a
    persistent loader is pointed at the next pass by setting it."""

    def __init__(self, plans: Callable[[], Iterable[Microbatch]]):
        self.plans = plans

    def __iter__(self) -> Iterator[Microbatch]:
        return iter(self.plans())


def _identity(x: Any) -> Any:
    return x


def _init_worker(base_seed: int, rank: int, num_workers: int, worker_id: int) -> None:
    seed = _random.seed_for_step(_random.fold_in(_random.key(base_seed), rank), worker_id)
    torch.manual_seed(seed)
    _pyrandom.seed(seed)
    np.random.seed(seed % 2**32)


def make_worker_loader(
    builder: MicrobatchBuilder,
    *,
    num_workers: int,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    multiprocessing_context: Any = None,
    persistent_workers: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader whose ``num_workers`` workers build microbatches with ``builder``, in the order of the plans
    its batch sampler yields: set ``loader.batch_sampler.plans`` (a callable returning the plans) before each
    iteration. With ``persistent_workers`` the workers outlive an iteration and serve the next one."""
    base_seed = _random.seed_for_step(builder.key, builder.rank)
    return torch.utils.data.DataLoader(
        _PlanDataset(builder),
        batch_sampler=_PlanSampler(lambda: ()),
        collate_fn=_identity,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor,
        worker_init_fn=functools.partial(_init_worker, base_seed, builder.rank, num_workers),
        generator=torch.Generator().manual_seed(base_seed),
        multiprocessing_context=multiprocessing_context,
        persistent_workers=persistent_workers,
    )


def worker_loader(
    builder: MicrobatchBuilder,
    plans: Callable[[], Iterable[Microbatch]],
    *,
    num_workers: int,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    multiprocessing_context: Any = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """An iterator over the microbatches of ``plans()``, built by ``num_workers`` DataLoader workers, in order."""
    loader = make_worker_loader(
        builder, num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
        multiprocessing_context=multiprocessing_context,
    )  # fmt: skip
    loader.batch_sampler.plans = plans
    return iter(loader)
