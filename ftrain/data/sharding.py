"""The arithmetic of a batch stream: steps per epoch, which positions a step reads, and which rows a rank gets.

Vocabulary (every count is *global*, summed over ranks, so the order never depends on the world size):

* ``N`` examples per epoch, ``B = batch_size`` examples per microbatch, ``A = accum_steps`` microbatches per
  optimizer step, ``W = world_size`` ranks, each getting ``B / W`` rows of every full microbatch.
* ``M`` microbatches per epoch: ``N // B`` with ``drop_last`` (the last ``N % B`` examples of each epoch's order are
  dropped; the order changes every epoch, so different examples are dropped), else ``ceil(N / B)`` (the last
  microbatch is short).
* ``S`` optimizer steps per epoch: ``max(ceil(M / A), 1)``, transformers' ``num_update_steps_per_epoch``. The last
  step of an epoch holds the ``M - (S - 1) * A`` remaining microbatches; ``make_train_step`` divides by the total
  token count, so the short window is weighted exactly.
* Global step ``s`` is in epoch ``s // S``; its microbatches are ``[(s % S) * A, min((s % S + 1) * A, M))``;
  microbatch ``b`` reads positions ``[b * B, min((b + 1) * B, N))`` of the epoch's order.

**The tail across ranks.** A short microbatch of ``T < B`` rows is padded to ``W * ceil(T / W)`` rows by repeating
its own rows from the start (wrap-around), then split into ``W`` equal contiguous chunks: every rank gets the same
number of rows, the real rows of a chunk come first, and concatenating the ranks' chunks in rank order gives the
global microbatch followed by the padding. With ``W == 1`` nothing is ever padded (the short batch is just short).
The stream marks padded rows so that they count zero (see :class:`ftrain.data.BatchStream`).

Example:
    >>> layout = BatchLayout(num_examples=10, batch_size=4, accum_steps=2, world_size=2, drop_last=False)
    >>> layout.microbatches_per_epoch, layout.steps_per_epoch
    (3, 2)
    >>> layout.microbatches_of(1), layout.span(2)
    (range(2, 3), (8, 10))
    >>> layout.rank_rows(8, 10, rank=1)
    ([9], 1)
"""

from __future__ import annotations

import dataclasses
import math
import operator

__all__ = ["BatchLayout"]


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """Steps, microbatches and rank rows for ``num_examples`` examples (``None``: an iterable source of unknown
    length, for which only the per-microbatch arithmetic is defined).

    Raises:
        ValueError: a count below 1, ``batch_size`` not divisible by ``world_size``, ``rank`` outside
            ``[0, world_size)``, an empty source, or ``drop_last`` with fewer examples than one batch.
    """

    num_examples: int | None
    batch_size: int
    accum_steps: int = 1
    world_size: int = 1
    drop_last: bool = False

    def __post_init__(self) -> None:
        for name in ("batch_size", "accum_steps", "world_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BatchStream: {name} must be an int >= 1, got {value!r}")
        if self.batch_size % self.world_size:
            raise ValueError(
                f"BatchStream: batch_size={self.batch_size} is the global microbatch size (all ranks together) and "
                f"must be divisible by world_size={self.world_size}; each rank gets batch_size / world_size rows. "
                f"Use batch_size={self.world_size * max(1, self.batch_size // self.world_size)} (e.g. "
                "per_device_batch_size * world_size)."
            )
        n = self.num_examples
        if n is not None and n < 1:
            raise ValueError("BatchStream: the source has no examples (len(source) == 0); there is nothing to batch.")
        if n is not None and self.drop_last and n < self.batch_size:
            raise ValueError(
                f"BatchStream: batch_size={self.batch_size} is larger than the source ({n} examples) and drop_last="
                "True drops every partial batch, so an epoch would have no batches. Use a batch_size <= "
                f"{n}, or drop_last=False."
            )

    @property
    def local_batch_size(self) -> int:
        """Rows each rank gets from a full microbatch: ``batch_size // world_size``."""
        return self.batch_size // self.world_size

    def _n(self) -> int:
        if self.num_examples is None:
            raise TypeError(
                "BatchStream: an iterable source has no known length, so steps per epoch and epoch_of(step) are "
                "undefined; iterate with iter_from(step) (the epoch ends when the source is exhausted)."
            )
        return self.num_examples

    @property
    def microbatches_per_epoch(self) -> int:
        """``M``: ``N // B`` with ``drop_last``, else ``ceil(N / B)``."""
        n = self._n()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        """``S = max(ceil(M / A), 1)`` optimizer steps per epoch (transformers' ``num_update_steps_per_epoch``)."""
        return max(math.ceil(self.microbatches_per_epoch / self.accum_steps), 1)

    @property
    def examples_per_epoch(self) -> int:
        """Examples actually used per epoch: ``M * B`` with ``drop_last``, else ``N``."""
        n = self._n()
        return self.microbatches_per_epoch * self.batch_size if self.drop_last else n

    def epoch_of(self, step: int) -> int:
        """The epoch global step ``step`` belongs to."""
        return _check_step(step) // self.steps_per_epoch

    def microbatches_of(self, step: int) -> range:
        """Microbatch numbers (within the epoch) of global step ``step``; fewer than ``A`` at an epoch's end."""
        s = _check_step(step) % self.steps_per_epoch
        return range(s * self.accum_steps, min((s + 1) * self.accum_steps, self.microbatches_per_epoch))

    def span(self, micro: int) -> tuple[int, int]:
        """Positions ``[start, stop)`` of the epoch's order that microbatch ``micro`` reads."""
        start = micro * self.batch_size
        return start, min(start + self.batch_size, self.examples_per_epoch)

    def rank_rows(self, start: int, stop: int, rank: int) -> tuple[list[int], int]:
        """Positions (from ``[start, stop)``) that ``rank`` reads, padding included, and how many are real.

        A full span gives ``local_batch_size`` real rows; a short one ``ceil(T / W)`` rows with wrap-around padding.
        """
        if not 0 <= rank < self.world_size:
            raise ValueError(f"BatchStream: rank must be in [0, world_size={self.world_size}), got {rank}")
        total = stop - start
        if total < 1:
            raise ValueError(f"BatchStream: empty span [{start}, {stop})")
        per_rank = -(-total // self.world_size)
        rows = [start + (q % total) for q in range(rank * per_rank, (rank + 1) * per_rank)]
        valid = max(0, min(per_rank, total - rank * per_rank))
        return rows, valid

    def is_padded(self, start: int, stop: int) -> bool:
        """Whether the global microbatch ``[start, stop)`` needs padding rows on some rank."""
        return (stop - start) % self.world_size != 0


def _check_step(step: int) -> int:
    """``step`` as an int (a Python int, numpy int or 0-d integer tensor such as ``state.step``), checked >= 0."""
    try:
        value = operator.index(step) if not isinstance(step, bool) else -1
    except TypeError:
        value = -1
    if value < 0:
        raise ValueError(f"BatchStream: step must be an int >= 0 (a global optimizer step), got {step!r}")
    return value
