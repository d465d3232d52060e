"""Collators: a list of examples -> a batch, a dict of tensors whose first dimension is the example.

* :func:`default_collate` stacks equal-shaped values (transformers' ``default_data_collator`` rules: ``label`` and
  ``label_ids`` become ``labels``; integer labels are int64, float labels float32) and fails, naming the key and the
  example, on ragged sequences, strings and missing keys instead of dropping them.
* :func:`make_padding_collator` pads sequences like ``DataCollatorWithPadding`` (``input_ids`` with the pad token,
  ``attention_mask`` with 0, ``token_type_ids`` with the tokenizer's pad type id, ``special_tokens_mask`` with 1)
  and, like ``DataCollatorForTokenClassification``, sequence ``labels`` with -100; ``pad_to_multiple_of`` rounds the
  length up so a compiled step sees few shapes.
* :func:`make_causal_lm_collator` pads and adds ``labels = input_ids`` with the padding set to -100.

Any other callable ``features -> Mapping[str, Tensor]`` works as a collator, transformers' collators included;
:func:`check_batch` is what a stream runs on its output.

Example:
    >>> collate = make_padding_collator(pad_token_id=0, pad_to_multiple_of=4)
    >>> batch = collate([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
    >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist()
    ([[5, 6, 7, 0], [8, 0, 0, 0]], [[1, 1, 1, 0], [1, 0, 0, 0]])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["check_batch", "default_collate", "make_causal_lm_collator", "make_padding_collator"]

Collator = Callable[[list[Any]], Mapping[str, Any]]

_PADDING_HINT = (
    "pass collate_fn=ftrain.data.make_padding_collator(tokenizer) (or pad_token_id=...), or a transformers "
    "DataCollatorWithPadding, or pad/truncate the examples to one length in the dataset"
)


def _as_dicts(features: Sequence[Any], who: str) -> list[Mapping[str, Any]]:
    if len(features) == 0:
        raise ValueError(f"{who}: got no examples to collate")
    out = []
    for i, f in enumerate(features):
        if isinstance(f, Mapping):
            out.append(f)
        elif hasattr(f, "__dataclass_fields__"):
            out.append(vars(f))
        else:
            raise TypeError(
                f"{who}: example {i} is a {type(f).__name__}; ftrain batches are dicts of tensors, so examples must "
                "be dicts (e.g. {'input_ids': ..., 'labels': ...}). Map the dataset to dicts, or pass a collate_fn "
                "that builds the dict."
            )
    keys = list(out[0])
    for i, f in enumerate(out[1:], 1):
        if set(f) != set(keys):
            missing, extra = sorted(set(keys) - set(f)), sorted(set(f) - set(keys))
            raise KeyError(
                f"{who}: example {i} has keys {sorted(f)} but example 0 has {sorted(keys)} (missing {missing}, extra "
                f"{extra}); every example of a batch needs the same keys."
            )
    return out


def _rename_labels(features: list[Mapping[str, Any]], who: str) -> list[dict[str, Any]]:
    """transformers' rule: ``label`` / ``label_ids`` become ``labels``."""
    names = [k for k in ("label", "label_ids", "labels") if k in features[0]]
    if len(names) > 1:
        raise KeyError(f"{who}: examples have several label keys {names}; keep one (it becomes 'labels')")
    if not names or names[0] == "labels":
        return [dict(f) for f in features]
    return [{("labels" if k == names[0] else k): v for k, v in f.items()} for f in features]


def _column(key: str, values: list[Any], who: str) -> torch.Tensor | None:
    """The values of one key stacked into a tensor; ``None`` when every value is ``None``."""
    if all(v is None for v in values):
        return None
    for i, v in enumerate(values):
        if v is None or isinstance(v, str | bytes):
            what = "None" if v is None else f"a string ({v[:30]!r})"
            raise TypeError(
                f"{who}: example {i}[{key!r}] is {what}; a batch holds only tensors. Remove the column (BatchStream"
                f"(columns=...) or dataset.remove_columns([{key!r}])) or tokenize it first."
            )
    first = values[0]
    try:
        if isinstance(first, torch.Tensor):
            return torch.stack([torch.as_tensor(v) for v in values])
        if isinstance(first, np.ndarray | np.generic):
            return torch.from_numpy(np.stack([np.asarray(v) for v in values]))
        return torch.tensor(values)
    except (RuntimeError, ValueError, TypeError) as err:
        shapes = [tuple(np.shape(v)) if not isinstance(v, torch.Tensor) else tuple(v.shape) for v in values]
        odd = next((i for i, s in enumerate(shapes) if s != shapes[0]), None)
        if odd is None:
            raise TypeError(f"{who}: cannot make a tensor of {key!r} ({type(first).__name__} values): {err}") from err
        raise ValueError(
            f"{who}: {key!r} is ragged: example {odd} has shape {shapes[odd]} but example 0 has {shapes[0]}. "
            f"Sequences of different lengths need padding: {_PADDING_HINT}."
        ) from None


def default_collate(features: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Stacks a list of example dicts into a dict of tensors (see the module docstring).

    Raises:
        TypeError: an example that is not a dict, a string or ``None`` value.
        KeyError: examples with different keys.
        ValueError: a ragged key (sequences of different lengths): pad with :func:`make_padding_collator`.

    Example:
        >>> b = default_collate([{"x": [1, 2], "label": 0}, {"x": [3, 4], "label": 1}])
        >>> b["x"].tolist(), b["labels"].dtype
        ([[1, 2], [3, 4]], torch.int64)
    """
    feats = _rename_labels(_as_dicts(features, "default_collate"), "default_collate")
    batch = {}
    for key in feats[0]:
        col = _column(key, [f[key] for f in feats], "default_collate")
        if col is not None:
            batch[key] = col
    return batch


_DEFAULT_PAD = {"attention_mask": 0, "token_type_ids": 0, "special_tokens_mask": 1, "labels": -100, "position_ids": 0}


def _is_sequence(v: Any) -> bool:
    if isinstance(v, torch.Tensor | np.ndarray):
        return v.ndim == 1
    return isinstance(v, list | tuple)


def _pad_column(rows: list[torch.Tensor], length: int, value: int, side: str) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        if side == "right":
            out[i, : len(r)] = r
        else:
            out[i, length - len(r) :] = r
    return out


def _target_length(longest: int, max_length: int | None, multiple: int | None, who: str) -> int:
    if max_length is not None:
        if longest > max_length:
            raise ValueError(
                f"{who}: a sequence has {longest} tokens, more than max_length={max_length}; truncate when "
                "tokenizing (truncation=True, max_length=...) or raise max_length."
            )
        longest = max_length
    if multiple:
        longest = -(-longest // multiple) * multiple
    return longest


def _pad_settings(tokenizer: Any, pad_token_id: int | None, padding_side: str | None, who: str) -> tuple[int, str, int]:
    if tokenizer is not None:
        pad_token_id = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        padding_side = padding_side or getattr(tokenizer, "padding_side", "right")
        if pad_token_id is None:
            raise ValueError(
                f"{who}: the tokenizer has no pad token (pad_token_id is None). Set one, e.g. tokenizer.pad_token = "
                "tokenizer.eos_token, or pass pad_token_id=..."
            )
    if pad_token_id is None:
        raise ValueError(f"{who}: pass a tokenizer or pad_token_id=... (the id that pads input_ids)")
    side = padding_side or "right"
    if side not in ("right", "left"):
        raise ValueError(f"{who}: padding_side must be 'right' or 'left', got {side!r}")
    type_id = getattr(tokenizer, "pad_token_type_id", 0) if tokenizer is not None else 0
    return int(pad_token_id), side, int(type_id or 0)


def _check_unpadded(feats: list[dict[str, Any]], padded: list[str]) -> None:
    for key in feats[0]:
        if key in padded or not all(_is_sequence(f[key]) for f in feats):
            continue
        lengths = [len(f[key]) for f in feats]
        if len(set(lengths)) > 1:
            raise ValueError(
                f"padding collator: {key!r} is ragged (lengths {sorted(set(lengths))}) and has no pad value; pass "
                f"make_padding_collator(..., pad_values={{{key!r}: <pad value>}}) or pad it in the dataset."
            )


def make_padding_collator(
    tokenizer: Any = None,
    *,
    pad_token_id: int | None = None,
    padding_side: str | None = None,
    pad_to_multiple_of: int | None = None,
    max_length: int | None = None,
    pad_values: Mapping[str, int | float] | None = None,
    return_attention_mask: bool = True,
) -> Callable[[Sequence[Any]], dict[str, torch.Tensor]]:
    """A collator that pads every sequence key of a batch to one length.

    Args:
        tokenizer: a transformers tokenizer; gives ``pad_token_id``, ``padding_side`` and ``pad_token_type_id``.
        pad_token_id: the ``input_ids`` pad id (overrides the tokenizer's).
        padding_side: ``"right"`` (default) or ``"left"`` (overrides the tokenizer's).
        pad_to_multiple_of: round the padded length up to a multiple of this (tensor-core / compile friendly).
        max_length: pad to exactly this length (``padding="max_length"``); longer sequences raise.
        pad_values: pad values for other keys, e.g. ``{"pixel_mask": 0}``; they override the defaults above.
        return_attention_mask: add ``attention_mask`` (1 = token, 0 = padding) when the examples have none.

    Returns:
        ``collate(features) -> dict[str, Tensor]``; keys that are not padded are stacked by :func:`default_collate`.

    Raises:
        ValueError: no pad id, a ragged key with no pad value, or a sequence longer than ``max_length``.

    Example:
        >>> c = make_padding_collator(pad_token_id=0, padding_side="left")
        >>> c([{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3], "labels": [3]}])["labels"].tolist()
        [[1, 2], [-100, 3]]
    """
    who = "make_padding_collator"
    pad_id, side, type_id = _pad_settings(tokenizer, pad_token_id, padding_side, who)
    table = {**_DEFAULT_PAD, "input_ids": pad_id, "token_type_ids": type_id, **dict(pad_values or {})}

    def collate(features: Sequence[Any]) -> dict[str, torch.Tensor]:
        feats = _rename_labels(_as_dicts(features, "padding collator"), "padding collator")
        seq_keys = [k for k in feats[0] if k in table and all(_is_sequence(f[k]) for f in feats)]
        _check_unpadded(feats, seq_keys)
        rows = {k: [torch.as_tensor(f[k]) for f in feats] for k in seq_keys}
        longest = max((len(r) for rs in rows.values() for r in rs), default=0)
        length = _target_length(longest, max_length, pad_to_multiple_of, "padding collator")
        rest = default_collate([{k: v for k, v in f.items() if k not in rows} for f in feats]) if feats[0] else {}
        batch = {}
        for key in feats[0]:
            if key in rows:
                batch[key] = _pad_column(rows[key], length, table[key], side)
            elif key in rest:
                batch[key] = rest[key]
        if return_attention_mask and "input_ids" in rows and "attention_mask" not in batch:
            ones = [torch.ones(len(r), dtype=torch.int64) for r in rows["input_ids"]]
            batch["attention_mask"] = _pad_column(ones, length, 0, side)
        return batch

    return collate


def make_causal_lm_collator(
    tokenizer: Any = None,
    *,
    pad_token_id: int | None = None,
    padding_side: str | None = None,
    pad_to_multiple_of: int | None = None,
    max_length: int | None = None,
    mask_every_pad_token: bool = False,
) -> Callable[[Sequence[Any]], dict[str, torch.Tensor]]:
    """A padding collator that adds causal-LM ``labels``: ``input_ids`` with padded positions set to -100.

    Args:
        tokenizer, pad_token_id, padding_side, pad_to_multiple_of, max_length: as :func:`make_padding_collator`.
        mask_every_pad_token: set *every* token equal to ``pad_token_id`` to -100, as transformers'
            ``DataCollatorForLanguageModeling(mlm=False)`` does; the default masks only padding positions, which
            keeps real end-of-text tokens when ``pad_token == eos_token``.

    Returns:
        ``collate(features) -> dict`` with ``input_ids``, ``attention_mask`` and ``labels``.

    Raises:
        ValueError: the examples already have ``labels`` (use :func:`make_padding_collator` to keep them).

    Example:
        >>> c = make_causal_lm_collator(pad_token_id=0)
        >>> c([{"input_ids": [5, 6]}, {"input_ids": [7]}])["labels"].tolist()
        [[5, 6], [7, -100]]
    """
    pad_id, side, _ = _pad_settings(tokenizer, pad_token_id, padding_side, "make_causal_lm_collator")
    pad = make_padding_collator(
        pad_token_id=pad_id,
        padding_side=side,
        pad_to_multiple_of=pad_to_multiple_of,
        max_length=max_length,
        pad_values=None if tokenizer is None else {"token_type_ids": getattr(tokenizer, "pad_token_type_id", 0)},
    )

    def collate(features: Sequence[Any]) -> dict[str, torch.Tensor]:
        feats = _as_dicts(features, "causal-LM collator")
        if any(k in feats[0] for k in ("labels", "label", "label_ids")):
            raise ValueError(
                "causal-LM collator: the examples already have labels; it builds labels from input_ids. Remove the "
                "label column, or use make_padding_collator to pad the given labels with -100."
            )
        lengths = torch.tensor([len(f["input_ids"]) for f in feats])
        batch = pad(feats)
        labels = batch["input_ids"].clone()
        width = labels.shape[1]
        pos = torch.arange(width)[None, :]
        padding = pos >= lengths[:, None] if side == "right" else pos < (width - lengths)[:, None]
        labels[padding] = -100
        if mask_every_pad_token:
            labels[labels == pad_id] = -100
        batch["labels"] = labels
        return batch

    return collate


def check_batch(batch: Any, *, rows: int | None = None, where: str = "") -> dict[str, torch.Tensor]:
    """``batch`` as a plain dict after checking it is a mapping of tensors with ``rows`` rows each.

    Raises:
        TypeError: not a mapping, or a value that is not a tensor (named, with the fix).
        ValueError: a tensor whose first dimension is not ``rows``.

    Example:
        >>> check_batch({"x": torch.zeros(2, 3)}, rows=2)["x"].shape
        torch.Size([2, 3])
    """
    at = f" {where}" if where else ""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"collate_fn returned a {type(batch).__name__}{at}; a batch must be a dict of tensors (train_step reads "
            "batch[key]). Return e.g. {'input_ids': tensor, 'labels': tensor}."
        )
    out = dict(batch)
    for key, value in out.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"collate_fn returned batch[{key!r}] as a {type(value).__name__}{at}; every value must be a torch "
                "tensor. Convert it in the collator (torch.tensor / torch.from_numpy; transformers collators need "
                "return_tensors='pt'), or drop the key."
            )
        if rows is not None and value.dim() > 0 and value.shape[0] != rows:
            raise ValueError(
                f"collate_fn returned batch[{key!r}] with shape {tuple(value.shape)}{at}, but the microbatch has "
                f"{rows} examples; the first dimension of every tensor must be the example."
            )
    return out
