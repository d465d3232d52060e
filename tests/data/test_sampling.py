"""Keyed permutations and length grouping: permutation properties, and transformers' group_by_length, exactly."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ftrain import random
from ftrain.data import BatchStream, KeyedPermutation, LengthGroupedOrder, epoch_order


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000), seed=st.integers(0, 2**40), epoch=st.integers(0, 5))
def test_keyed_permutation_is_a_permutation_with_an_inverse(n, seed, epoch):
    perm = epoch_order(n, random.key(seed), epoch)
    out = perm.take(0, n)
    assert out.dtype == np.int64
    assert np.array_equal(np.sort(out), np.arange(n))
    assert np.array_equal(perm.inverse(out), np.arange(n))
    # any window equals the same slice of the whole
    lo, hi = n // 3, n - n // 4
    assert np.array_equal(perm.take(lo, hi), out[lo:hi])


def test_permutation_differs_between_epochs_and_seeds_and_is_reproducible():
    n = 1000
    base = epoch_order(n, random.key(0), 0).take(0, n)
    assert np.array_equal(base, epoch_order(n, random.key(0), 0).take(0, n))
    other_epoch = epoch_order(n, random.key(0), 1).take(0, n)
    other_seed = epoch_order(n, random.key(1), 0).take(0, n)
    # fixed points of a random permutation: about 1 expected; equal positions stay few
    assert (base == other_epoch).sum() < 10
    assert (base == other_seed).sum() < 10
    assert np.array_equal(epoch_order(n, random.key(0), 3, shuffle=False).take(0, n), np.arange(n))


def test_order_is_pinned_across_processes_and_versions():
    # golden values: a checkpoint's data position means these examples, on any machine and in any later release
    assert KeyedPermutation(10, random.key(0)).take(0, 10).tolist() == [2, 8, 6, 5, 4, 7, 0, 9, 1, 3]
    stream = BatchStream({"idx": torch.arange(100)}, 8, seed=42)
    assert stream.batch_at(0)["idx"].tolist() == [0, 53, 28, 1, 42, 70, 69, 56]
    assert stream.batch_at(13)["idx"].tolist() == [44, 54, 38, 76, 6, 23, 88, 56]  # epoch 1


def test_permutation_looks_uniform():
    # position 0 over 2000 keys lands in each of 10 buckets about 200 times (chi-square, 9 dof, p ~ 1e-4 at 33)
    n = 10
    firsts = np.array([KeyedPermutation(n, random.key(s)).take(0, 1)[0] for s in range(2000)])
    counts = np.bincount(firsts, minlength=n)
    chi2 = ((counts - 200) ** 2 / 200).sum()
    assert chi2 < 33, counts


def test_permutation_of_ten_million_starts_anywhere():
    perm = KeyedPermutation(10**7, random.key(0))
    window = perm.take(32 * 10**6 // 4, 32 * 10**6 // 4 + 32)
    assert len(set(window.tolist())) == 32 and window.min() >= 0 and window.max() < 10**7
    assert np.array_equal(perm.inverse(window), np.arange(8 * 10**6, 8 * 10**6 + 32))


def test_out_of_range_positions_raise():
    with pytest.raises(IndexError, match=r"\[0, 5\)"):
        KeyedPermutation(5, random.key(0))([5])
    with pytest.raises(ValueError, match="n must be >= 1"):
        KeyedPermutation(0, random.key(0))


def _hf_grouped(monkeypatch, perm_indices, lengths, group_size, mega_batch_mult=None):
    """transformers' own get_length_grouped_indices with its torch.randperm replaced by our permutation."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    def randperm(n, generator=None):
        assert n == len(perm_indices)
        return torch.as_tensor(perm_indices)

    with monkeypatch.context() as m:
        m.setattr(torch, "randperm", randperm)
        return get_length_grouped_indices(list(lengths), group_size, mega_batch_mult=mega_batch_mult)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 400),
    group=st.integers(1, 16),
    max_len=st.integers(1, 12),
    mult=st.one_of(st.none(), st.integers(1, 5)),
    seed=st.integers(0, 1000),
)
def test_length_grouping_equals_transformers_fed_the_same_permutation(n, group, max_len, mult, seed):
    # small length ranges make many ties: the stable, longest-first rules are exercised
    lengths = np.random.default_rng(seed).integers(1, max_len + 1, size=n)
    perm = KeyedPermutation(n, random.key(seed))
    ours = LengthGroupedOrder(perm, lengths, group, mult)
    with pytest.MonkeyPatch.context() as monkeypatch:
        expected = _hf_grouped(monkeypatch, perm.take(0, n), lengths, group, mult)
    assert ours.take(0, n).tolist() == expected
    # any window agrees with the whole (the order is computed megabatch by megabatch)
    lo = n // 2
    assert ours.take(lo, n).tolist() == expected[lo:]
    # HF's invariants: a permutation, the longest first, each megabatch sorted descending after position 0
    assert sorted(expected) == list(range(n)) and lengths[expected[0]] == lengths.max()


def test_stream_group_by_length_is_hf_order_split_into_batches(monkeypatch):
    n, bs, accum = 203, 4, 2
    lengths = [(i * 37) % 23 + 1 for i in range(n)]
    data = [{"input_ids": list(range(length))} for length in lengths]
    from ftrain.data import make_padding_collator

    stream = BatchStream(
        data, bs, seed=5, accum_steps=accum, group_by_length=True, collate_fn=make_padding_collator(pad_token_id=0)
    )
    got = [i for s in range(len(stream)) for mb in stream.microbatches_at(s) for i in mb.indices]
    perm = stream.order(0).perm
    assert np.array_equal(
        perm.take(0, n), KeyedPermutation(n, random.fold_in(random.fold_in(stream.key, 0), 0)).take(0, n)
    )
    expected = _hf_grouped(monkeypatch, perm.take(0, n), lengths, bs * accum)
    assert got == expected
    first = stream.batch_at(0)[0]
    assert first["input_ids"].shape == (bs, max(lengths))  # the longest batch comes first
    # a new epoch, a new grouping; still the longest first
    epoch1 = [i for mb in stream.microbatches_at(len(stream)) for i in mb.indices]
    assert epoch1 != got[: len(epoch1)] and lengths[epoch1[0]] == max(lengths)
