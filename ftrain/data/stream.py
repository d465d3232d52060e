"""``BatchStream``: the batches of a run as a pure function of ``(seed, epoch, step, rank)``.

The position in the data is the global optimizer step — nothing else needs saving for a map-style source:
``stream.batch_at(k)`` is the batch an uninterrupted run trains on at step ``k``, ``stream.iter_from(k)`` goes on
from there, and two runs with the same seed see the same batches whatever ``num_workers`` is. Counts are global
(``batch_size`` is the microbatch size summed over ranks) so the global order does not depend on ``world_size``:
global microbatch ``b`` is split into ``world_size`` contiguous chunks, and a run resumed on another number of ranks
carries on with the same examples. The arithmetic (steps per epoch, tail, padding) is in
:mod:`ftrain.data.sharding`; the order (keyed permutation, length grouping) in :mod:`ftrain.data.sampling`.

Iterable sources (torch ``IterableDataset``, ``datasets.IterableDataset``) are read in order; every rank reads the
stream and keeps its rows. They cannot seek: a resume loads ``iterator.state_dict()`` saved with the checkpoint
(which holds the source's own ``state_dict()`` when it has one), or else replays the stream from the start with a
warning that says how many examples that reads.

Example:
    >>> import torch
    >>> stream = BatchStream({"x": torch.arange(10)}, batch_size=4, seed=0, accum_steps=2)
    >>> len(stream), stream.epoch_of(5)  # ceil(3 microbatches / 2) steps per epoch
    (2, 2)
    >>> [mb["x"].shape[0] for mb in stream.batch_at(1)]  # the epoch's last window: one short microbatch
    [2]
    >>> it = stream.iter_from(0, stop=4)
    >>> all(torch.equal(a["x"], b["x"]) for w in range(4) for a, b in zip(next(it), stream.batch_at(w)))
    True
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ftrain import random as _random
from ftrain.data import columns as _columns
from ftrain.data.collate import default_collate
from ftrain.data.loading import Microbatch, MicrobatchBuilder, make_worker_loader
from ftrain.data.sampling import Order, epoch_order
from ftrain.data.sharding import BatchLayout, _check_step
from ftrain.data.sources import IterableSource, MapSource, as_source, is_hf_dataset

__all__ = ["BatchIterator", "BatchStream"]

Batch = dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]
_DATA_TAG = 0x64617461  # "data": the stream's key is fold_in(key(seed), _DATA_TAG), apart from the step's dropout key


class BatchStream:
    """Deterministic, resumable, rank-sharded batches of ``source``; a ``DataLoader`` whose position is the step.

    Args:
        source: a torch ``Dataset``, ``datasets.Dataset``, dict of columns or list of examples (map-style), or a
            torch / ``datasets`` ``IterableDataset`` (see :mod:`ftrain.data.sources`).
        batch_size: examples per microbatch **summed over ranks** (transformers: ``per_device_train_batch_size *
            world_size``); each rank gets ``batch_size // world_size``.
        seed: an int or an :mod:`ftrain.random` key; the order and collator randomness derive from it.
        shuffle: a new keyed permutation every epoch; ``False`` keeps the source order.
        drop_last: drop each epoch's last ``N % batch_size`` examples; else the last microbatch is short (and, with
            several ranks, padded — see ``pad_mask_key``).
        collate_fn: ``list[example] -> dict[str, Tensor]``; default :func:`~ftrain.data.default_collate`. Any
            transformers collator works.
        accum_steps: microbatches per optimizer step; a step's batch is then a list of up to ``accum_steps`` dicts,
            what ``make_train_step`` accumulates (the last step of an epoch may hold fewer).
        rank, world_size: this process's rank and the number of ranks sharing each microbatch.
        num_workers: DataLoader worker processes that fetch and collate (map-style only); the order never changes.
        pin_memory, prefetch_factor, multiprocessing_context: passed to the DataLoader (``pin_memory`` also pins
            batches built in the main process).
        persistent_workers: keep the worker processes between passes (``iter_from`` calls) instead of starting
            them for each; needs ``num_workers > 0``.
        group_by_length: transformers' length grouping over the keyed permutation (map-style only).
        lengths: per-example lengths for grouping, or a column name; default the ``"length"`` column if there is
            one, else ``len(example["input_ids"])``.
        mega_batch_mult: megabatch size in optimizer steps for length grouping (default HF's).
        columns: keep only these example keys, e.g. ``signature_columns(model)`` (transformers'
            ``remove_unused_columns``); ``None`` keeps every key.
        strict_columns: raise on keys outside ``columns``, naming them, instead of dropping them.
        label_keys: batch keys whose padding rows are set to -100 (integer tensors only).
        pad_mask_key: the bool key (``True`` = real row) added to every rank's batch of a padded microbatch;
            ``None`` adds nothing and relies on ``label_keys`` alone.
        validate: build the first microbatch now (map-style), so bad data or a bad collator fails here.

    Raises:
        ValueError: an empty source, ``batch_size`` larger than the source with ``drop_last``, ``batch_size`` not
            divisible by ``world_size``, options that need a map-style source, or (``validate``) a first microbatch
            that cannot be collated into tensors.
        TypeError: a source that cannot be batched reproducibly (e.g. a one-shot generator).

    Example:
        >>> import torch
        >>> data = {"input_ids": torch.arange(20).view(10, 2), "labels": torch.arange(10)}
        >>> rank1 = BatchStream(data, batch_size=4, seed=0, world_size=2, rank=1, accum_steps=2)
        >>> len(rank1), [mb["labels"].shape[0] for mb in rank1.batch_at(0)]  # 2 of each global microbatch of 4
        (2, [2, 2])
        >>> rank1.replace(rank=0, world_size=1).local_batch_size
        4
    """

    def __init__(
        self,
        source: Any,
        batch_size: int,
        *,
        seed: int | torch.Tensor = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        accum_steps: int = 1,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        multiprocessing_context: Any = None,
        persistent_workers: bool = False,
        group_by_length: bool = False,
        lengths: Sequence[int] | str | None = None,
        mega_batch_mult: int | None = None,
        columns: Sequence[str] | None = None,
        strict_columns: bool = False,
        label_keys: Sequence[str] = ("labels",),
        pad_mask_key: str | None = "_valid",
        validate: bool = True,
    ):
        self._args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        src = self.source = as_source(source)
        self.is_iterable = isinstance(src, IterableSource)
        self.layout = BatchLayout(
            None if self.is_iterable else len(src), batch_size, accum_steps, world_size, bool(drop_last)
        )
        self.layout.rank_rows(0, 1, rank)  # checks rank
        self.rank, self.shuffle = rank, bool(shuffle)
        base = seed if isinstance(seed, torch.Tensor) else _random.key(seed)
        self.key = _random.fold_in(base, _DATA_TAG)
        self._order_key = _random.fold_in(self.key, 0)
        self._check_loading(num_workers, prefetch_factor, group_by_length)
        if persistent_workers and not num_workers:
            raise ValueError("BatchStream: persistent_workers needs num_workers > 0 (there are no workers to keep)")
        self._lengths = self._resolve_lengths(lengths) if group_by_length else None
        if columns is not None and isinstance(src, MapSource) and is_hf_dataset(src.data):
            src = self.source = MapSource(_columns.remove_unused_columns(src.data, columns, strict=strict_columns))
        self.mega_batch_mult = mega_batch_mult
        self._orders: dict[int, Order] = {}
        filt = None if columns is None else _columns.make_column_filter(columns, strict=strict_columns)
        self.builder = MicrobatchBuilder(
            fetch=None if self.is_iterable else src.fetch,
            collate=collate_fn if collate_fn is not None else default_collate,
            column_filter=filt,
            key=_random.fold_in(self.key, 1),
            rank=rank,
            label_keys=tuple(label_keys),
            pad_mask_key=pad_mask_key,
        )
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.prefetch_factor, self.multiprocessing_context = prefetch_factor, multiprocessing_context
        self.persistent_workers = bool(persistent_workers)
        self._workers: torch.utils.data.DataLoader | None = None  # the kept loader, with persistent_workers
        if validate and not self.is_iterable:
            self.builder(self.microbatches_at(0)[0])

    def _check_loading(self, num_workers: int, prefetch_factor: int | None, group_by_length: bool) -> None:
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"BatchStream: num_workers must be an int >= 0, got {num_workers!r}")
        if prefetch_factor is not None and not num_workers:
            raise ValueError("BatchStream: prefetch_factor needs num_workers > 0 (workers prefetch; 0 means none)")
        if self.is_iterable and num_workers:
            raise ValueError(
                f"BatchStream: num_workers={num_workers} with an iterable source would split the stream between "
                "workers and make the order depend on their number. Use num_workers=0 (do heavy work in the source), "
                "or a map-style source."
            )
        if self.is_iterable and group_by_length:
            raise ValueError("BatchStream: group_by_length needs a map-style source (lengths of every example).")

    def _resolve_lengths(self, lengths: Sequence[int] | str | None) -> np.ndarray:
        src = self.source
        name = lengths if isinstance(lengths, str) else "length"
        if lengths is None or isinstance(lengths, str):
            col = src.column(name)
            if col is None and isinstance(lengths, str):
                raise ValueError(f"BatchStream: group_by_length: the source has no column {lengths!r}")
            if col is None:
                col = [len(x) for x in self._input_ids(src)]
            lengths = col
        out = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if len(out) != len(src):
            raise ValueError(f"BatchStream: {len(out)} lengths for a source of {len(src)} examples")
        return out

    @staticmethod
    def _input_ids(src: MapSource) -> list[Any]:
        ids = src.column("input_ids")
        if ids is not None:
            return ids
        examples = src.fetch(range(len(src)))
        if not all(isinstance(e, dict) and "input_ids" in e for e in examples[:1]):
            raise ValueError(
                "BatchStream: group_by_length needs lengths: the examples have no 'input_ids' and the source no "
                "'length' column. Pass lengths=[...] (one per example) or lengths='<column name>'."
            )
        return [e["input_ids"] for e in examples]

    # ---- arithmetic -------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Optimizer steps per epoch: ``max(ceil(microbatches_per_epoch / accum_steps), 1)``."""
        return self.layout.steps_per_epoch

    @property
    def steps_per_epoch(self) -> int:
        """Same as ``len(stream)``."""
        return self.layout.steps_per_epoch

    @property
    def local_batch_size(self) -> int:
        """Rows of a full microbatch on this rank: ``batch_size // world_size``."""
        return self.layout.local_batch_size

    def epoch_of(self, step: int) -> int:
        """The epoch global step ``step`` is in."""
        return self.layout.epoch_of(step)

    def order(self, epoch: int) -> Order:
        """Epoch ``epoch``'s order of the whole (global) source: ``order.take(a, b)`` are the example indices at
        positions ``[a, b)`` (map-style only)."""
        self._need_map("order")
        order = self._orders.get(epoch)
        if order is None:
            group = self.layout.batch_size * self.layout.accum_steps
            n = len(self.source)
            order = epoch_order(
                n, self._order_key, epoch, shuffle=self.shuffle, lengths=self._lengths, group_size=group,
                mega_batch_mult=self.mega_batch_mult,
            )  # fmt: skip
            if len(self._orders) >= 2:
                self._orders.pop(next(iter(self._orders)))
            self._orders[epoch] = order
        return order

    def microbatches_at(self, step: int) -> list[Microbatch]:
        """This rank's :class:`~ftrain.data.loading.Microbatch` plans for global step ``step`` (map-style only)."""
        self._need_map("microbatches_at")
        layout, step = self.layout, _check_step(step)
        epoch = layout.epoch_of(step)
        order = self.order(epoch)
        plans = []
        for micro in layout.microbatches_of(step):
            start, stop = layout.span(micro)
            positions, valid = layout.rank_rows(start, stop, self.rank)
            lo, hi = min(positions), max(positions) + 1
            idx = order.take(lo, hi)[np.asarray(positions) - lo]
            plans.append(Microbatch(step, epoch, micro, tuple(idx.tolist()), valid, layout.is_padded(start, stop)))
        return plans

    def _need_map(self, what: str) -> None:
        if self.is_iterable:
            raise TypeError(
                f"BatchStream.{what}: an iterable source cannot seek to a step; use iter_from(step, state=...) with "
                "the iterator state saved at that step."
            )

    # ---- batches ----------------------------------------------------------------------------------------------------

    def _window(self, microbatches: list[dict[str, torch.Tensor]], pin: bool = True) -> Batch:
        if pin and self.pin_memory and torch.accelerator.is_available():
            microbatches = [{k: v.pin_memory() for k, v in mb.items()} for mb in microbatches]
        return microbatches[0] if self.layout.accum_steps == 1 else microbatches

    def batch_at(self, step: int) -> Batch:
        """This rank's batch at global step ``step``: a dict, or a list of microbatch dicts when ``accum_steps > 1``.

        Built in the calling process in O(batch) time whatever ``step`` is (map-style only).
        """
        return self._window([self.builder(mb) for mb in self.microbatches_at(step)])

    def iter_from(self, step: int = 0, stop: int | None = None, *, state: dict | None = None) -> BatchIterator:
        """The batches of global steps ``step, step + 1, ...`` up to ``stop`` (exclusive).

        Args:
            step: the first global step (``int(state.step)`` when resuming).
            stop: the step to stop before; ``None`` stops at the end of ``step``'s epoch.
            state: iterable sources only — ``iterator.state_dict()`` saved at ``step``; without it the stream is
                replayed from the start (with a warning naming the cost).

        Returns:
            A :class:`BatchIterator`; its ``step`` attribute is the step of the next batch.
        """
        step = _check_step(step)
        if self.is_iterable:
            reader = _IterableReader(self, step, state)
            return BatchIterator(self, step, reader.batches(stop), reader=reader)
        if state is not None and state.get("step") != step:
            raise ValueError(f"BatchStream.iter_from: the state is for step {state.get('step')}, not step {step}")
        stop = (self.epoch_of(step) + 1) * self.steps_per_epoch if stop is None else _check_step(stop)
        return BatchIterator(self, step, self._map_batches(step, stop))

    def _map_batches(self, start: int, stop: int) -> Iterator[Batch]:
        if self.num_workers == 0:
            for step in range(start, stop):
                yield self.batch_at(step)
            return
        plans = lambda: (mb for s in range(start, stop) for mb in self.microbatches_at(s))  # noqa: E731
        workers = self._workers
        if workers is None:
            workers = make_worker_loader(
                self.builder, num_workers=self.num_workers,
                pin_memory=self.pin_memory and torch.accelerator.is_available(),
                prefetch_factor=self.prefetch_factor, multiprocessing_context=self.multiprocessing_context,
                persistent_workers=self.persistent_workers,
            )  # fmt: skip
            if self.persistent_workers:
                self._workers = workers
        workers.batch_sampler.plans = plans
        loader = iter(workers)
        for step in range(start, stop):
            yield self._window([next(loader) for _ in self.layout.microbatches_of(step)], pin=False)

    def replace(self, **changes: Any) -> BatchStream:
        """A new stream with some constructor arguments changed, e.g. ``stream.replace(rank=1, world_size=2)``."""
        unknown = sorted(set(changes) - set(self._args))
        if unknown:
            raise TypeError(f"BatchStream.replace: unknown arguments {unknown}")
        return type(self)(**{**self._args, **changes})

    def __iter__(self) -> Iterator[Batch]:
        raise TypeError(
            "BatchStream has no implicit position: iterate stream.iter_from(step) (an epoch from step, or up to "
            "stop=...), with step = int(state.step)."
        )


class BatchIterator(Iterator[Batch]):
    """Yields a stream's batches; ``step`` is the global step of the next batch, ``state_dict()`` the position."""

    def __init__(self, stream: BatchStream, step: int, batches: Iterator[Batch], *, reader: Any = None):
        self.stream, self.step = stream, step
        self._batches, self._reader = batches, reader

    def __next__(self) -> Batch:
        batch = next(self._batches)
        self.step += 1
        return batch

    def next_epoch(self) -> BatchIterator:
        """The batches of the following epoch, from where this iterator stopped.

        For an iterable source that is the next pass over the source, read by the same reader (nothing is replayed);
        this iterator must have reached the end of its pass. For a map-style source it is ``iter_from(self.step)``.
        """
        if self._reader is None:
            return self.stream.iter_from(self.step)
        reader = self._reader
        reader.start, reader.replay = self.step, False
        return BatchIterator(self.stream, self.step, reader.batches(None), reader=reader)

    def state_dict(self) -> dict[str, Any]:
        """``{"step": next step}``, plus for iterable sources the epoch, microbatch and the source's own state."""
        if self._reader is not None:
            return self._reader.state(self.step)
        return {"step": self.step}


class _IterableReader:
    """Reads global microbatches from an iterable source, one epoch after another, and keeps its position."""

    def __init__(self, stream: BatchStream, start: int, state: dict | None):
        self.stream, self.src = stream, stream.source
        self.layout, self.start = stream.layout, start
        if state is not None and state.get("source") is None and start > 0:
            state = None  # the source cannot seek: replay
        self.replay = state is None and start > 0
        if state is not None:
            self._resume(state)
        else:
            self._open(0, 0, None)
            if self.replay:
                self._warn_replay()

    def _open(self, epoch: int, micro: int, source_state: Any) -> None:
        self.epoch, self.micro, self.exhausted = epoch, micro, False
        self.it = self.src.start_epoch(epoch, source_state)

    def _resume(self, state: dict) -> None:
        if state.get("step") != self.start:
            raise ValueError(f"BatchStream.iter_from: the state is for step {state.get('step')}, not {self.start}")
        if state.get("source") is not None and not self.src.stateful:
            raise ValueError(
                "BatchStream.iter_from: the state holds a source state, but the source has no load_state_dict"
            )
        self._open(state["epoch"], state["micro"], state.get("source"))
        self.exhausted = bool(state.get("exhausted", False))

    def state(self, step: int) -> dict[str, Any]:
        source = self.src.state_dict() if self.src.stateful else None
        return {"step": step, "epoch": self.epoch, "micro": self.micro, "exhausted": self.exhausted, "source": source}

    def _next_rows(self) -> list[Any] | None:
        """The next global microbatch of this epoch (short at the end unless ``drop_last``); ``None`` at its end."""
        if self.exhausted:
            return None
        rows = list(itertools.islice(self.it, self.layout.batch_size))
        if len(rows) < self.layout.batch_size:
            self.exhausted = True
            if self.layout.drop_last or not rows:
                return None
        self.micro += 1
        return rows

    def _read_step(self) -> list[tuple[int, list[Any]]]:
        window: list[tuple[int, list[Any]]] = []
        while len(window) < self.layout.accum_steps and not self.exhausted:
            rows = self._next_rows()
            if rows is not None:
                window.append((self.micro - 1, rows))
        return window

    def _step_window(self, allow_new_epoch: bool) -> list[tuple[int, list[Any]]] | None:
        window = self._read_step()
        if window or not allow_new_epoch:
            return window or None
        self._open(self.epoch + 1, 0, None)
        window = self._read_step()
        if not window:
            raise ValueError(f"BatchStream: the iterable source yielded no examples in epoch {self.epoch}")
        return window

    def _warn_replay(self) -> None:
        layout = self.layout
        warnings.warn(
            f"BatchStream: resuming an iterable source at step {self.start} without a saved state replays the stream "
            f"from its start: about {self.start * layout.accum_steps * layout.batch_size:,} examples (step "
            f"{self.start} x accum_steps {layout.accum_steps} x batch_size {layout.batch_size}) are read and "
            "discarded. Save iterator.state_dict() with the checkpoint and pass it as iter_from(step, state=...) "
            + ("to skip this." if self.src.stateful else "with a source that has state_dict()/load_state_dict()."),
            stacklevel=4,
        )

    def _replay(self) -> None:
        for _ in range(self.start if self.replay else 0):
            self._step_window(allow_new_epoch=True)

    def _build(self, step: int, micro: int, rows: list[Any]) -> dict[str, torch.Tensor]:
        positions, valid = self.layout.rank_rows(0, len(rows), self.stream.rank)
        base = micro * self.layout.batch_size
        padded = self.layout.is_padded(0, len(rows))
        plan = Microbatch(step, self.epoch, micro, tuple(base + p for p in positions), valid, padded)
        return self.stream.builder(plan, [rows[p] for p in positions])

    def batches(self, stop: int | None) -> Iterator[Batch]:
        self._replay()
        step, first = self.start, True
        while stop is None or step < stop:
            window = self._step_window(allow_new_epoch=first or stop is not None)
            if window is None:
                return
            first = False
            yield self.stream._window([self._build(step, micro, rows) for micro, rows in window])
            step += 1
