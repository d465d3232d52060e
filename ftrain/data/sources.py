"""Adapters that give every kind of dataset one of two small interfaces.

* :class:`MapSource` — ``len(source)`` and ``source.fetch(indices) -> list[example]``: a torch ``Dataset`` (using its
  batched ``__getitems__`` when it has one), a ``datasets.Dataset``, a dict of equal-length columns (tensors, numpy
  arrays or lists), or a list of examples.
* :class:`IterableSource` — ``iter(source)`` and, when the wrapped object has them, ``state_dict()`` /
  ``load_state_dict()`` (transformers ``datasets.IterableDataset``, torchdata's ``Stateful`` protocol) and
  ``set_epoch(epoch)``: a torch ``IterableDataset``, a ``datasets.IterableDataset``, or any re-iterable object.

:func:`as_source` picks the adapter and fails early, with the fix, for what cannot be batched reproducibly (a
one-shot iterator, an empty source, columns of different lengths).

Example:
    >>> import torch
    >>> src = as_source({"x": torch.arange(6), "y": [0, 1, 0, 1, 0, 1]})
    >>> len(src), src.fetch([4, 1])
    (6, [{'x': tensor(4), 'y': 0}, {'x': tensor(1), 'y': 1}])
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["ColumnSource", "IterableSource", "MapSource", "as_source", "is_hf_dataset"]


def is_hf_dataset(obj: object) -> bool:
    """A ``datasets.Dataset`` (map-style Arrow table), recognised without importing ``datasets``."""
    return type(obj).__module__.startswith("datasets.") and hasattr(obj, "column_names") and hasattr(obj, "__len__")


class MapSource:
    """A map-style source: ``len`` and ``fetch(indices)``. Wraps anything with ``__len__`` and ``__getitem__``."""

    def __init__(self, data: Any):
        self.data = data
        self._getitems = getattr(data, "__getitems__", None)

    def __len__(self) -> int:
        return len(self.data)

    def fetch(self, indices: Sequence[int]) -> list[Any]:
        """The examples at ``indices``, in that order (one batched ``__getitems__`` call when available)."""
        indices = [int(i) for i in indices]
        if self._getitems is not None:
            return list(self._getitems(indices))
        return [self.data[i] for i in indices]

    @property
    def column_names(self) -> list[str] | None:
        """Column names when the source knows them without reading (``datasets.Dataset``, dict of columns)."""
        names = getattr(self.data, "column_names", None)
        return list(names) if names is not None else None

    def column(self, name: str) -> list[Any] | None:
        """A whole column, when the source stores columns (used for a ``length`` column); else ``None``."""
        if is_hf_dataset(self.data) and name in self.data.column_names:
            return list(self.data[name])
        return None


class ColumnSource(MapSource):
    """A dict of equal-length columns (tensors, numpy arrays or lists); example ``i`` is ``{k: col[i]}``."""

    def __init__(self, columns: Mapping[str, Any]):
        if not columns:
            raise ValueError("BatchStream: the dict of columns is empty; pass e.g. {'input_ids': tensor, ...}")
        lengths = {}
        for name, col in columns.items():
            if not isinstance(name, str):
                raise TypeError(f"BatchStream: column names must be str, got {name!r}")
            try:
                lengths[name] = len(col)
            except TypeError:
                raise TypeError(
                    f"BatchStream: column {name!r} is a {type(col).__name__}, which has no length; a dict source "
                    "holds one tensor, numpy array or list per column, indexed by example along the first dimension."
                ) from None
        if len(set(lengths.values())) > 1:
            raise ValueError(
                f"BatchStream: the columns have different lengths {lengths}; every column needs one entry per example."
            )
        super().__init__(dict(columns))
        self._n = next(iter(lengths.values()))
        self._getitems = None

    def __len__(self) -> int:
        return self._n

    def fetch(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        idx = [int(i) for i in indices]
        return [{k: col[i] for k, col in self.data.items()} for i in idx]

    @property
    def column_names(self) -> list[str]:
        return list(self.data)

    def column(self, name: str) -> list[Any] | None:
        col = self.data.get(name)
        if col is None:
            return None
        return col.tolist() if isinstance(col, torch.Tensor | np.ndarray) else list(col)


class IterableSource:
    """An iterable source; resumable through ``state_dict`` / ``load_state_dict`` when the wrapped object has them."""

    def __init__(self, data: Iterable[Any]):
        self.data = data
        self.stateful = callable(getattr(data, "state_dict", None)) and callable(getattr(data, "load_state_dict", None))
        self._initial = self._try_state() if self.stateful else None
        self._loaded = False  # whether start_epoch loaded a state into the source (a resume)

    def _try_state(self) -> Any:
        try:
            return copy.deepcopy(self.data.state_dict())
        except Exception:  # a source may only know its state once iterated
            return None

    def state_dict(self) -> Any:
        """A copy of the source's state after the examples read so far (stateful sources only)."""
        return copy.deepcopy(self.data.state_dict())

    def start_epoch(self, epoch: int, state: Any = None) -> Iterator[Any]:
        """A fresh iterator for ``epoch``: ``set_epoch(epoch)`` when the source has it, then ``state`` loaded.

        Without ``state`` the source is read from its start: nothing is loaded (a fresh ``iter()`` starts at the
        beginning, however far an earlier iteration got — the live ``state_dict()`` of a ``datasets`` stream that
        was peeked at or read by another run would start mid-stream), except after this adapter loaded a state,
        when the source's state from before that is loaded back so the resume does not leak into a new epoch."""
        set_epoch = getattr(self.data, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        if state is not None:
            self.data.load_state_dict(copy.deepcopy(state))
            self._loaded = True
        elif self._loaded and self._initial is not None:
            self.data.load_state_dict(copy.deepcopy(self._initial))
        return iter(self.data)


def _is_iterable_style(obj: object) -> bool:
    if isinstance(obj, torch.utils.data.IterableDataset):
        return True
    if type(obj).__module__.startswith("datasets.") and type(obj).__name__ == "IterableDataset":
        return True
    return hasattr(obj, "__iter__") and not (hasattr(obj, "__len__") and hasattr(obj, "__getitem__"))


def as_source(obj: Any) -> MapSource | IterableSource:
    """The adapter for ``obj`` (see the module docstring).

    Raises:
        TypeError: a one-shot iterator or generator (it cannot be re-read for a new epoch or a resume), or an
            object that is neither map-style nor iterable.
        ValueError: an empty map-style source, or a dict whose columns differ in length.
    """
    if isinstance(obj, MapSource | IterableSource):
        return obj
    if type(obj).__name__ in ("DatasetDict", "IterableDatasetDict"):
        raise TypeError(
            f"BatchStream: got a {type(obj).__name__} with splits {sorted(obj)}; pass one split, e.g. ds['train']."
        )
    if isinstance(obj, Mapping) and not is_hf_dataset(obj):
        return ColumnSource(obj)
    if isinstance(obj, Iterator):
        raise TypeError(
            f"BatchStream: the source is a one-shot {type(obj).__name__}; it cannot be read again for the next epoch "
            "or a resume. Pass a re-iterable object instead: a list, a torch IterableDataset whose __iter__ makes a "
            "new generator, or datasets.IterableDataset.from_generator(fn)."
        )
    if _is_iterable_style(obj):
        return IterableSource(obj)
    if hasattr(obj, "__len__") and hasattr(obj, "__getitem__"):
        return MapSource(obj)
    raise TypeError(
        f"BatchStream: cannot batch a {type(obj).__name__}: expected a map-style dataset (__len__ and __getitem__: a "
        "torch Dataset, datasets.Dataset, list of examples or dict of columns) or an iterable one (a torch "
        "IterableDataset, datasets.IterableDataset)."
    )
