"""The Trainer's loaders: what ``get_*_dataloader`` return, how ``train()`` reads any loader, and the batch-size search.

**What the loaders are.** ``get_train_dataloader`` / ``get_eval_dataloader`` / ``get_test_dataloader`` return a
:class:`TrainerDataLoader`: a :class:`~ftrain.data.BatchStream` (batches as a function of the step, so a resume
continues bitwise) that also reads like the accelerate-prepared ``DataLoader`` transformers returns —
``len(loader)`` is the microbatches of an epoch on this process, iterating it yields those microbatches, and it has
``batch_size``, ``total_batch_size``, ``dataset``, ``sampler`` and ``set_epoch``.

**What ``train()`` accepts.** Whatever ``get_train_dataloader`` returns, as transformers does: a BatchStream, a torch
``DataLoader``, a list of batches or any re-iterable object. :class:`TrainFeed` turns it into one iterator of
microbatches per epoch; the loop takes each optimizer step's microbatches from it through ``get_batch_samples``.
A loader with a length sets the step arithmetic (``len`` microbatches per epoch); one without needs ``max_steps``
and is read again from its start for every epoch (a pass), as transformers reads an ``IterableDataset``.

**Resuming.** Skipped batches are never computed on: a map-style BatchStream starts at the step; an iterable one is
replayed to it (its rows are read and dropped, from the first pass on, so a resume that crossed the end of a pass
lands where the run was — transformers' skip stays in the first pass); another loader has its first batches read and
dropped, as accelerate's ``skip_first_batches`` gives for a plain ``DataLoader``. ``ignore_data_skip`` starts the
resumed epoch's data from its beginning instead, as transformers.

**Iterable sources and several processes.** Every process reads the stream and keeps its share of each global
microbatch (contiguous rows): the rows accelerate's dispatching (its default for an ``IterableDataset``) gives each
process, without a broadcast.

**Differences from transformers, on purpose.** When an iterable source ends in the middle of an accumulation window,
that short window is one optimizer step; transformers leaves its gradients unapplied and adds them to the next pass's
first step.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from ftrain.data import BatchStream
from ftrain.trainer.memory import clear_device_cache

__all__ = [
    "EpochSampler",
    "TrainFeed",
    "TrainerDataLoader",
    "find_executable_batch_size",
    "flatten_windows",
    "is_out_of_memory",
    "loader_length",
]

logger = logging.getLogger(__name__)


class TrainerDataLoader(BatchStream):
    """A :class:`~ftrain.data.BatchStream` that also reads like transformers' prepared ``DataLoader``.

    The stream's own interface (``iter_from``, ``batch_at``, ``steps_per_epoch``, ``layout``) is unchanged; the
    attributes below are the ones code written for transformers reads.

    Attributes:
        epoch: the epoch ``iter(loader)`` reads (``set_epoch``), 0 at first.

    Example:
        >>> import torch
        >>> loader = TrainerDataLoader({"x": torch.arange(10)}, batch_size=4, shuffle=False, accum_steps=2)
        >>> len(loader), loader.steps_per_epoch, loader.total_batch_size  # 3 microbatches, 2 optimizer steps
        (3, 2, 4)
        >>> [mb["x"].tolist() for mb in loader]
        [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epoch = 0

    @property
    def batch_size(self) -> int:
        """Rows of a full microbatch on this process (transformers' ``per_device_*_batch_size``)."""
        return self.local_batch_size

    @property
    def total_batch_size(self) -> int:
        """Rows of a full microbatch over all processes (accelerate's ``total_batch_size``)."""
        return self.layout.batch_size

    @property
    def dataset(self) -> Any:
        """The dataset read (a ``datasets.Dataset`` without the columns the model does not take)."""
        return self.source.data

    @property
    def sampler(self) -> EpochSampler | None:
        """The order of the examples (:class:`EpochSampler`); ``None`` for an iterable source, read in its order."""
        return None if self.is_iterable else EpochSampler(self)

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch ``iter(loader)`` and ``sampler`` read."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Microbatches of an epoch on this process, as ``len()`` of transformers' loader.

        Raises:
            TypeError: an iterable source (it has no length).
        """
        if self.is_iterable:
            raise TypeError("TrainerDataLoader: an iterable source has no length")
        return self.layout.microbatches_per_epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """The microbatches of epoch ``self.epoch`` (for an iterable source, its pass number ``self.epoch``)."""
        if self.is_iterable:
            start = {"step": 0, "epoch": self.epoch, "micro": 0, "exhausted": False, "source": None}
            return flatten_windows(self.iter_from(0, state=start))
        return flatten_windows(self.iter_from(self.epoch * self.steps_per_epoch))


class EpochSampler:
    """The example order of a map-style :class:`TrainerDataLoader` at its current epoch, as a torch sampler reads.

    Iterating gives the global example indices in the order of the epoch (every process's rows; the process keeps
    its share of each microbatch). ``set_epoch`` moves the loader's epoch.
    """

    def __init__(self, loader: TrainerDataLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader.source)

    def __iter__(self) -> Iterator[int]:
        return iter(self.loader.order(self.loader.epoch).take(0, len(self)).tolist())

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)


def flatten_windows(windows: Iterable[Any]) -> Iterator[Any]:
    """The microbatches of a stream's per-step items (a dict, or a list of microbatch dicts), in order."""
    for window in windows:
        if isinstance(window, list):
            yield from window
        else:
            yield window


def loader_length(loader: Any) -> int | None:
    """Microbatches per epoch on this process (transformers' ``len(train_dataloader)``), ``None`` without a length.

    A plain :class:`~ftrain.data.BatchStream` counts optimizer steps with ``len()``; its microbatches are read from
    its layout.
    """
    if isinstance(loader, BatchStream):
        return None if loader.is_iterable else loader.layout.microbatches_per_epoch
    try:
        return len(loader)
    except (TypeError, AttributeError, NotImplementedError):
        return None


class TrainFeed:
    """The microbatches ``train()`` reads from a loader, one iterator per epoch.

    Args:
        loader: what ``get_train_dataloader`` returned.
        accum_steps: microbatches per optimizer step.

    Raises:
        TypeError: a loader that is a one-shot iterator (it cannot be read again for the next epoch).
    """

    def __init__(self, loader: Any, *, accum_steps: int) -> None:
        if isinstance(loader, Iterator) and not isinstance(loader, BatchStream):
            raise TypeError(
                f"get_train_dataloader returned a one-shot {type(loader).__name__}; train() reads the loader again "
                "for every epoch. Return a re-iterable object: a torch DataLoader, a list of batches, or a dataset "
                "(the Trainer's own loader)."
            )
        self.loader, self.accum_steps = loader, accum_steps
        self._pass: Any = None  # the last pass of an iterable BatchStream (the next one continues its reader)

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Any]:
        """The microbatches of ``epoch`` after those of its first ``skip`` optimizer steps (already trained, in the
        first epoch of a resumed run)."""
        loader = self.loader
        if isinstance(loader, BatchStream) and not loader.is_iterable:
            start = epoch * loader.steps_per_epoch + skip
            return flatten_windows(loader.iter_from(start, stop=(epoch + 1) * loader.steps_per_epoch))
        if isinstance(loader, BatchStream):
            self._pass = loader.iter_from(skip) if self._pass is None else self._pass.next_epoch()
            return flatten_windows(self._pass)
        set_epoch = getattr(loader, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        return _skip(iter(loader), skip * self.accum_steps)


def _skip(iterator: Iterator[Any], count: int) -> Iterator[Any]:
    for _ in range(count):
        if next(iterator, _END) is _END:
            break
    return iterator


_END = object()


# ---- auto_find_batch_size ---------------------------------------------------------------------------------------

_OUT_OF_MEMORY_TEXTS = (
    " out of memory.",  # CUDA, ROCm, XPU
    "MPS backend out of memory",
    "DefaultCPUAllocator: can't allocate memory",
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED.",  # what cuDNN raises for a batch too large for a kernel
)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an out-of-memory error that a smaller batch can avoid (the errors accelerate's
    ``should_reduce_batch_size`` recognises: a ``RuntimeError`` — ``torch.OutOfMemoryError`` is one — whose single
    argument carries an allocator's out-of-memory text).

    Example:
        >>> is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")), is_out_of_memory(
        ...     ValueError("out of memory."))
        (True, False)
    """
    if not isinstance(err, RuntimeError) or len(err.args) != 1 or not isinstance(err.args[0], str):
        return False
    return any(text in err.args[0] for text in _OUT_OF_MEMORY_TEXTS)


def _free_memory() -> None:
    """Frees what a failed attempt left: Python garbage, then the accelerator's cached blocks (as accelerate's
    ``release_memory``)."""
    gc.collect()
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is not None:
        clear_device_cache(accelerator)


def find_executable_batch_size(
    function: Callable[[int], Any], starting_batch_size: int, *, on_retry: Callable[[int, BaseException], None]
) -> Any:
    """``function(batch_size)``, retried with ``int(batch_size * 0.9)`` after each out-of-memory error
    (:func:`is_out_of_memory`) — transformers' ``auto_find_batch_size`` through accelerate's
    ``find_executable_batch_size`` (accelerate 1.15+ shrinks by 0.9, not by half).

    Args:
        function: runs the work with a per-process batch size.
        starting_batch_size: the first batch size tried.
        on_retry: called with the new batch size and the error before each retry (the Trainer frees the failed
            attempt's state and logs).

    Returns:
        What ``function`` returns.

    Raises:
        RuntimeError: the batch size reached 0 (every size down to 1 ran out of memory).
        Exception: any other error from ``function``, as it is.

    Example:
        >>> def needs_at_most_6(batch_size):
        ...     if batch_size > 6:
        ...         raise torch.OutOfMemoryError("CUDA out of memory.")
        ...     return batch_size
        >>> find_executable_batch_size(needs_at_most_6, 8, on_retry=lambda size, err: None)  # 8 -> 7 -> 6
        6
    """
    batch_size = starting_batch_size
    _free_memory()
    while True:
        if batch_size <= 0:
            raise RuntimeError(
                f"auto_find_batch_size: every batch size from {starting_batch_size} down to 1 ran out of memory; "
                "make the model or the sequences smaller, or use a device with more memory."
            )
        try:
            return function(batch_size)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            batch_size = int(batch_size * 0.9)
            on_retry(batch_size, err)
            _free_memory()
