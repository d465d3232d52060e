"""Example orders as functions of a key: position ``p`` of an epoch -> example index, without materialising anything.

:class:`KeyedPermutation` is a pseudo-random permutation of ``range(n)`` given by a key: a balanced Feistel network
on the smallest even-bit power of two ``>= n``, restricted to ``[0, n)`` by *cycle walking* (apply the network again
until the value falls inside). Any position is computed in O(1) expected time (the domain is < 4n, so fewer than
4 walks on average), so a stream can start at position 10**9 of an epoch as cheaply as at position 0, and the
inverse (index -> position) is as cheap.

:class:`LengthGroupedOrder` is transformers' ``group_by_length`` (``get_length_grouped_indices``) driven by such a
permutation: megabatches of ``mega_batch_mult * group_size`` consecutive positions, each sorted by length (longest
first, ties in permutation order), and the longest example of the epoch swapped to position 0 so an out-of-memory
error shows up at the first step. A megabatch is computed only when a position inside it is asked for.

Example:
    >>> from ftrain import random
    >>> p = KeyedPermutation(10, random.key(0))
    >>> sorted(p.take(0, 10).tolist()) == list(range(10))
    True
    >>> int(p.inverse(p.take(3, 4))[0])
    3
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ftrain import random as _random

__all__ = ["KeyedPermutation", "LengthGroupedOrder", "Order", "epoch_order"]

_U64 = np.uint64
_MASK64 = (1 << 64) - 1
_C0, _C1, _C2 = _U64(0x9E3779B97F4A7C15), _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB)
_S30, _S27, _S31 = _U64(30), _U64(27), _U64(31)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (numpy array arithmetic wraps modulo 2**64)."""
    x = x + _C0
    x = (x ^ (x >> _S30)) * _C1
    x = (x ^ (x >> _S27)) * _C2
    return x ^ (x >> _S31)


def _key_words(key: torch.Tensor, count: int) -> list[int]:
    """``count`` 64-bit round keys derived from ``key`` with :func:`ftrain.random.fold_in`."""
    words = []
    for i in range(count):
        hi, lo = _random.fold_in(key, i).tolist()
        words.append((hi ^ (lo << 1)) & _MASK64)
    return words


class KeyedPermutation:
    """A pseudo-random permutation of ``range(n)`` determined by ``key`` (identity when ``key`` is ``None``).

    Args:
        n: the number of elements, ``>= 1``.
        key: an :mod:`ftrain.random` key; ``None`` gives the identity (sequential order).
        rounds: Feistel rounds (6 is plenty for shuffling; 4 already gives a strong pseudo-random permutation).

    Example:
        >>> from ftrain import random
        >>> p = KeyedPermutation(5, random.key(1))
        >>> p.take(0, 5).tolist() == p(np.arange(5)).tolist()
        True
        >>> KeyedPermutation(4, None).take(1, 3).tolist()
        [1, 2]
    """

    def __init__(self, n: int, key: torch.Tensor | None, *, rounds: int = 6):
        if n < 1:
            raise ValueError(f"KeyedPermutation: n must be >= 1, got {n}")
        self.n = int(n)
        self.identity = key is None
        bits = max(2, (self.n - 1).bit_length())
        self._half = (bits + 1) // 2
        self._mask = _U64((1 << self._half) - 1)
        self._shift = _U64(self._half)
        self._keys = [] if key is None else [_U64(w) for w in _key_words(key, rounds)]

    def __len__(self) -> int:
        return self.n

    def _feistel(self, x: np.ndarray, keys: Sequence[np.uint64]) -> np.ndarray:
        left, right = x >> self._shift, x & self._mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & self._mask)
        return (left << self._shift) | right

    def _unfeistel(self, y: np.ndarray, keys: Sequence[np.uint64]) -> np.ndarray:
        left, right = y >> self._shift, y & self._mask
        for k in reversed(keys):
            left, right = right ^ (_mix(left ^ k) & self._mask), left
        return (left << self._shift) | right

    def _walk(self, x: np.ndarray, inverse: bool) -> np.ndarray:
        step = self._unfeistel if inverse else self._feistel
        y = step(x, self._keys)
        outside = y >= _U64(self.n)
        while outside.any():  # cycle walking: the cycle through x < n returns inside [0, n)
            y[outside] = step(y[outside], self._keys)
            outside = y >= _U64(self.n)
        return y

    def _apply(self, values: np.ndarray | Sequence[int], inverse: bool) -> np.ndarray:
        arr = np.asarray(values, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.n):
            raise IndexError(f"KeyedPermutation: values must lie in [0, {self.n}), got min {arr.min()} max {arr.max()}")
        if self.identity or arr.size == 0:
            return arr.copy()
        return self._walk(arr.astype(_U64), inverse).astype(np.int64)

    def __call__(self, positions: np.ndarray | Sequence[int]) -> np.ndarray:
        """The example index at each position (an int64 array)."""
        return self._apply(positions, inverse=False)

    def inverse(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """The position of each example index: ``p.inverse(p(x)) == x``."""
        return self._apply(indices, inverse=True)

    def take(self, start: int, stop: int) -> np.ndarray:
        """The example indices at positions ``[start, stop)``."""
        return self(np.arange(start, stop, dtype=np.int64))


class LengthGroupedOrder:
    """transformers' ``get_length_grouped_indices`` over a :class:`KeyedPermutation` instead of ``torch.randperm``.

    Args:
        perm: the epoch's permutation (``len(perm) == len(lengths)``).
        lengths: one length per example.
        group_size: the batch size HF passes (ftrain: ``batch_size * accum_steps``, one optimizer step).
        mega_batch_mult: megabatch size in groups; ``None`` is HF's default ``min(n // (4 * group_size), 50) or 1``.

    Example:
        >>> order = LengthGroupedOrder(KeyedPermutation(4, None), [1, 3, 2, 5], group_size=2)
        >>> order.take(0, 4).tolist()  # megabatches [1, 0] and [3, 2]; the longest (3) swapped to the front
        [3, 0, 1, 2]
    """

    def __init__(
        self, perm: KeyedPermutation, lengths: Sequence[int] | np.ndarray, group_size: int, mega_batch_mult=None
    ):
        self.lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if len(self.lengths) != len(perm):
            raise ValueError(f"LengthGroupedOrder: {len(self.lengths)} lengths for {len(perm)} examples")
        n = len(perm)
        if mega_batch_mult is None:
            mega_batch_mult = min(n // (group_size * 4), 50) or 1
        if mega_batch_mult < 1:
            raise ValueError(f"LengthGroupedOrder: mega_batch_mult must be >= 1, got {mega_batch_mult}")
        self.perm, self.n = perm, n
        self.megabatch_size = mega_batch_mult * group_size
        # HF swaps the first element of megabatch 0 with the first element of the first megabatch whose maximum is
        # the global maximum: that element is the longest example that comes earliest in the permutation.
        longest = np.flatnonzero(self.lengths == self.lengths.max())
        first_pos = int(perm.inverse(longest).min())
        self._longest_index = int(perm(np.array([first_pos]))[0])
        self._longest_megabatch = first_pos // self.megabatch_size
        self._head = self._sorted(0)[0] if self._longest_megabatch else self._longest_index
        self._cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.n

    def _sorted(self, j: int) -> np.ndarray:
        idx = self.perm.take(j * self.megabatch_size, min((j + 1) * self.megabatch_size, self.n))
        return idx[np.argsort(-self.lengths[idx], kind="stable")]

    def megabatch(self, j: int) -> np.ndarray:
        """Example indices of megabatch ``j`` in order (sorted by length, with HF's longest-first swap)."""
        if self._cache is not None and self._cache[0] == j:
            return self._cache[1]
        out = self._sorted(j)
        if self._longest_megabatch:
            if j == 0:
                out[0] = self._longest_index
            elif j == self._longest_megabatch:
                out[0] = self._head
        self._cache = (j, out)
        return out

    def take(self, start: int, stop: int) -> np.ndarray:
        """The example indices at positions ``[start, stop)``."""
        if stop <= start:
            return np.zeros(0, dtype=np.int64)
        size = self.megabatch_size
        parts = []
        for j in range(start // size, (stop - 1) // size + 1):
            lo = max(start - j * size, 0)
            parts.append(self.megabatch(j)[lo : stop - j * size])
        return np.concatenate(parts)


Order = KeyedPermutation | LengthGroupedOrder


def epoch_order(
    n: int,
    key: torch.Tensor,
    epoch: int,
    *,
    shuffle: bool = True,
    lengths: np.ndarray | None = None,
    group_size: int = 1,
    mega_batch_mult: int | None = None,
) -> Order:
    """The order of epoch ``epoch``: a permutation keyed by ``fold_in(key, epoch)`` (identity if not ``shuffle``),
    length-grouped when ``lengths`` is given.

    Example:
        >>> from ftrain import random
        >>> a, b = epoch_order(100, random.key(0), 0), epoch_order(100, random.key(0), 1)
        >>> bool((a.take(0, 100) != b.take(0, 100)).any())
        True
    """
    perm = KeyedPermutation(n, _random.fold_in(key, epoch) if shuffle else None)
    if lengths is None:
        return perm
    return LengthGroupedOrder(perm, lengths, group_size, mega_batch_mult)
