"""Bad input fails when the stream is built, saying what, where and how to fix it."""

import pytest
import torch

from ftrain.data import BatchStream


def rows(n):
    return [{"x": [i, i], "labels": i % 2} for i in range(n)]


def test_empty_source():
    with pytest.raises(ValueError, match=r"no examples \(len\(source\) == 0\)"):
        BatchStream([], 4)
    with pytest.raises(ValueError, match="dict of columns is empty"):
        BatchStream({}, 4)


def test_batch_larger_than_dataset_with_drop_last():
    with pytest.raises(ValueError, match=r"batch_size=8 is larger than the source \(5 examples\).*batch_size <= 5"):
        BatchStream(rows(5), 8, drop_last=True)
    assert len(BatchStream(rows(5), 8)) == 1  # without drop_last: one short batch


def test_collator_returning_non_tensors():
    as_lists = lambda feats: {"x": [f["x"] for f in feats]}  # noqa: E731
    with pytest.raises(
        TypeError, match=r"batch\['x'\] as a list at step 0 \(epoch 0, microbatch 0, examples \[.*torch"
    ):
        BatchStream(rows(6), 2, collate_fn=as_lists)
    with pytest.raises(TypeError, match="collate_fn returned a tuple.*dict of tensors"):
        BatchStream(rows(6), 2, collate_fn=lambda feats: (torch.zeros(2),))
    with pytest.raises(ValueError, match=r"batch\['x'\] with shape \(3,\).*microbatch has 2 examples"):
        BatchStream(rows(6), 2, collate_fn=lambda feats: {"x": torch.zeros(3)})


def test_ragged_sequences_without_padding():
    ragged = [{"input_ids": list(range(i % 3 + 1))} for i in range(6)]
    with pytest.raises(ValueError, match=r"'input_ids' is ragged.*need padding.*make_padding_collator.*at step 0"):
        BatchStream(ragged, 3, shuffle=False)


def test_bad_layout_and_options():
    with pytest.raises(ValueError, match=r"batch_size=5 .* divisible by world_size=2.*batch_size=4"):
        BatchStream(rows(10), 5, world_size=2)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\), got 2"):
        BatchStream(rows(10), 4, world_size=2, rank=2)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        BatchStream(rows(10), 0)
    with pytest.raises(ValueError, match="columns have different lengths"):
        BatchStream({"a": torch.zeros(3), "b": torch.zeros(4)}, 2)
    with pytest.raises(TypeError, match="one-shot generator.*from_generator"):
        BatchStream((r for r in rows(4)), 2)
    with pytest.raises(ValueError, match="num_workers=2 with an iterable source"):
        BatchStream(torch.utils.data.IterableDataset.__new__(_Iter), 2, num_workers=2)
    with pytest.raises(ValueError, match="prefetch_factor needs num_workers > 0"):
        BatchStream(rows(4), 2, prefetch_factor=2)
    with pytest.raises(TypeError, match="unknown arguments"):
        BatchStream(rows(4), 2).replace(batch=3)
    with pytest.raises(ValueError, match="already has a '_valid' key"):
        BatchStream([{"x": i, "_valid": 1} for i in range(3)], 2, world_size=2).batch_at(1)


class _Iter(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter([{"x": 1}])


def test_group_by_length_without_lengths():
    with pytest.raises(ValueError, match=r"no 'input_ids' and the source no 'length' column. Pass lengths="):
        BatchStream([{"x": [1]}] * 4, 2, group_by_length=True)
    with pytest.raises(ValueError, match="has no column 'n_tokens'"):
        BatchStream({"x": torch.zeros(4)}, 2, group_by_length=True, lengths="n_tokens")
