"""Which example keys a model takes: transformers' column removal and label-name discovery, plus a strict mode.

* :func:`find_labels` — ``transformers.utils.find_labels``: the ``forward`` parameters whose name contains
  ``"label"``, plus ``start_positions`` / ``end_positions`` for ``*QuestionAnswering*`` classes.
* :func:`signature_columns` — ``Trainer._set_signature_columns_if_needed``: the ``forward`` parameters (of the base
  model for PEFT models), then ``label``, ``label_ids`` and the label names.
* :func:`remove_unused_columns` — ``Trainer._remove_unused_columns`` for a ``datasets.Dataset``: drops the other
  columns, and raises if none is left.
* :func:`make_column_filter` — the per-example filter for every other source (``RemoveColumnsCollator``'s rule:
  dict examples keep the signature keys, anything else passes through); with ``strict=True`` an unknown key raises,
  naming it, instead of being dropped.

Example:
    >>> import torch
    >>> class Net(torch.nn.Module):
    ...     def forward(self, input_ids, attention_mask=None, labels=None):
    ...         return input_ids
    >>> find_labels(Net)
    ['labels']
    >>> keep = make_column_filter(signature_columns(Net()))
    >>> keep({"input_ids": 1, "text": "hi", "label": 0})
    {'input_ids': 1, 'label': 0}
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["find_labels", "make_column_filter", "remove_unused_columns", "signature_columns"]

_log = logging.getLogger(__name__)


def _forward_of(model: Any) -> Callable[..., Any]:
    forward = getattr(model, "forward", None)
    if forward is None:
        raise TypeError(f"expected a model (class or instance) with a forward method, got {type(model).__name__}")
    return forward


def _unwrap_peft(model: Any) -> Any:
    """The model whose ``forward`` names the inputs: the base model of a PEFT wrapper, else ``model`` itself."""
    if not isinstance(model, type) and type(model).__module__.split(".")[0] == "peft":
        if hasattr(model, "get_base_model"):
            return model.get_base_model()
        return model.base_model.model
    return model


def find_labels(model: Any) -> list[str]:
    """The label argument names of a model (class or instance), by transformers' ``find_labels`` rule.

    Example:
        >>> class BertForQuestionAnswering:
        ...     def forward(self, input_ids, start_positions=None, end_positions=None): ...
        >>> find_labels(BertForQuestionAnswering)
        ['start_positions', 'end_positions']
    """
    cls = model if isinstance(model, type) else type(_unwrap_peft(model))
    params = inspect.signature(_forward_of(cls)).parameters
    if "QuestionAnswering" in cls.__name__:
        return [p for p in params if "label" in p or p in ("start_positions", "end_positions")]
    return [p for p in params if "label" in p]


def signature_columns(model: Any, *, label_names: Sequence[str] | None = None) -> list[str]:
    """The example keys a model's ``forward`` accepts, by transformers' ``_set_signature_columns_if_needed`` rule.

    Args:
        model: the model (instance; a PEFT model is looked through to its base model).
        label_names: ``TrainingArguments.label_names``; ``None`` means :func:`find_labels` of the model.

    Returns:
        The ``forward`` parameter names, then ``label``, ``label_ids`` and the label names (duplicates removed,
        order kept).

    Example:
        >>> import torch
        >>> signature_columns(torch.nn.Linear(1, 1))
        ['input', 'label', 'label_ids']
    """
    inner = _unwrap_peft(model)
    names = list(inspect.signature(_forward_of(inner)).parameters)
    labels = find_labels(inner) if label_names is None else list(label_names)
    return list(dict.fromkeys(names + ["label", "label_ids"] + labels))


def _no_match_error(columns: Sequence[str], ignored: Sequence[str], model_name: str) -> ValueError:
    return ValueError(
        f"No columns in the dataset match the {model_name}.forward signature ({', '.join(columns)}); the dataset has "
        f"[{', '.join(sorted(ignored))}]. Rename the columns to the model's argument names, or turn column removal off "
        "(BatchStream(columns=None); remove_unused_columns=False in TrainingArguments)."
    )


def _unknown_error(unknown: Sequence[str], columns: Sequence[str], where: str) -> ValueError:
    return ValueError(
        f"strict columns: {where} has keys {sorted(unknown)} that the model's forward does not take (it takes "
        f"{list(columns)}). Remove them from the dataset (dataset.remove_columns / a map), or use strict=False to drop "
        "them."
    )


def remove_unused_columns(
    dataset: Any, columns: Sequence[str], *, strict: bool = False, model_name: str = "model", description: str = ""
) -> Any:
    """A ``datasets.Dataset`` without the columns that are not in ``columns`` (``Trainer._remove_unused_columns``).

    Args:
        dataset: a ``datasets.Dataset``.
        columns: the accepted keys, e.g. :func:`signature_columns` of the model.
        strict: raise on columns that would be removed instead of removing them.
        model_name: the model class name, for messages.
        description: e.g. ``"training"``, for the log line.

    Returns:
        ``dataset.remove_columns(ignored)`` (the same object when nothing is ignored).

    Raises:
        ValueError: no column matches (transformers raises too), or ``strict`` and some column is not accepted.
    """
    names = list(dataset.column_names)
    ignored = [c for c in names if c not in set(columns)]
    if not any(c in names for c in columns):
        raise _no_match_error(columns, ignored, model_name)
    if not ignored:
        return dataset
    if strict:
        raise _unknown_error(ignored, columns, f"the {description + ' ' if description else ''}dataset")
    _log.info("Columns %s are not arguments of %s.forward and were removed.", ", ".join(ignored), model_name)
    return dataset.remove_columns(ignored)


def make_column_filter(
    columns: Sequence[str], *, strict: bool = False, model_name: str = "model"
) -> Callable[[Any], Any]:
    """A pure ``example -> example`` that keeps the keys in ``columns`` (non-dict examples pass through).

    Args:
        columns: the accepted keys.
        strict: raise ``ValueError`` naming the unknown keys instead of dropping them.
        model_name: the model class name, for messages.

    Raises:
        ValueError: (from the returned function) an example with no accepted key, or, with ``strict``, one with
            keys outside ``columns``.

    Example:
        >>> f = make_column_filter(["x"], strict=True)
        >>> f({"x": 1})
        {'x': 1}
    """
    keep = frozenset(columns)
    cols = list(columns)

    def filter_example(example: Any) -> Any:
        if not isinstance(example, dict):
            return example
        unknown = [k for k in example if k not in keep]
        if not unknown:
            return example
        if len(unknown) == len(example):
            raise _no_match_error(cols, unknown, model_name)
        if strict:
            raise _unknown_error(unknown, cols, "an example")
        return {k: v for k, v in example.items() if k in keep}

    return filter_example
