"""Deterministic, resumable, rank-sharded batches; collators; transformers' column rules.

A run's data order is a pure function of ``(seed, epoch, step, rank)``: :class:`BatchStream` turns a dataset into
the batch of any global optimizer step (``batch_at``), an iterator from any step (``iter_from``), and the
steps-per-epoch arithmetic (``len``, ``epoch_of``). Resuming at step ``k`` replays nothing; the same seed gives the
same batches whatever ``num_workers`` is; ``batch_size`` is global, so the order does not depend on ``world_size``.

Example:
    >>> import torch
    >>> from ftrain import data
    >>> stream = data.BatchStream({"input_ids": torch.arange(12).view(6, 2)}, batch_size=2, seed=0)
    >>> len(stream), sorted(stream.batch_at(0))
    (3, ['input_ids'])
    >>> torch.equal(stream.batch_at(4)["input_ids"], next(stream.iter_from(4))["input_ids"])
    True
"""

from ftrain.data.collate import check_batch, default_collate, make_causal_lm_collator, make_padding_collator
from ftrain.data.columns import find_labels, make_column_filter, remove_unused_columns, signature_columns
from ftrain.data.loading import Microbatch
from ftrain.data.sampling import KeyedPermutation, LengthGroupedOrder, epoch_order
from ftrain.data.sharding import BatchLayout
from ftrain.data.sources import as_source
from ftrain.data.stream import BatchIterator, BatchStream

__all__ = [
    "BatchIterator",
    "BatchLayout",
    "BatchStream",
    "KeyedPermutation",
    "LengthGroupedOrder",
    "Microbatch",
    "as_source",
    "check_batch",
    "default_collate",
    "epoch_order",
    "find_labels",
    "make_causal_lm_collator",
    "make_column_filter",
    "make_padding_collator",
    "remove_unused_columns",
    "signature_columns",
]
