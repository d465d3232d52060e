"""BatchStream: same seed same batches, resume anywhere, rank sharding, accumulation windows, workers."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ftrain import TrainState, losses, make_train_step, optim
from ftrain.data import BatchStream


def columns(n: int) -> dict[str, torch.Tensor]:
    """Example i has idx = i and labels = i % 3, so a batch names its examples."""
    return {"idx": torch.arange(n), "labels": torch.arange(n) % 3}


def windows(batch):
    return batch if isinstance(batch, list) else [batch]


def idx_of(batch) -> list[list[int]]:
    return [mb["idx"].tolist() for mb in windows(batch)]


def run(stream: BatchStream, start: int, stop: int) -> list[list[list[int]]]:
    return [idx_of(b) for b in stream.iter_from(start, stop)]


def test_same_seed_same_batches_different_seed_different_batches():
    a = BatchStream(columns(100), 8, seed=3)
    b = BatchStream(columns(100), 8, seed=3)
    c = BatchStream(columns(100), 8, seed=4)
    assert run(a, 0, 30) == run(b, 0, 30)
    assert run(a, 0, 13) != run(c, 0, 13)
    # seed may be an ftrain.random key too
    from ftrain import random

    assert run(BatchStream(columns(100), 8, seed=random.key(3)), 0, 5) == run(a, 0, 5)


def test_epochs_cover_the_source_once_and_reshuffle():
    stream = BatchStream(columns(50), 8, seed=0)  # 7 microbatches: 6 full + one of 2
    assert len(stream) == 7
    epoch0 = [i for w in run(stream, 0, 7) for mb in w for i in mb]
    epoch1 = [i for w in run(stream, 7, 14) for mb in w for i in mb]
    assert sorted(epoch0) == sorted(epoch1) == list(range(50))
    assert epoch0 != epoch1
    assert [len(w[0]) for w in run(stream, 0, 7)] == [8] * 6 + [2]
    # iter_from(step) with no stop ends with the step's epoch
    assert len(list(stream.iter_from(3))) == 4
    assert stream.epoch_of(6) == 0 and stream.epoch_of(7) == 1


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 60),
    world=st.sampled_from([1, 2, 3]),
    per_rank=st.integers(1, 5),
    accum=st.integers(1, 3),
    drop_last=st.booleans(),
    data=st.data(),
)
def test_resume_at_any_step_replays_nothing(n, world, per_rank, accum, drop_last, data):
    bs = world * per_rank
    if drop_last and bs > n:
        with pytest.raises(ValueError, match="larger than the source"):
            BatchStream(columns(n), bs, drop_last=True, world_size=world)
        return
    base = BatchStream(columns(n), bs, seed=7, accum_steps=accum, drop_last=drop_last, world_size=world)
    spe = len(base)
    # mid-epoch, or exactly at an epoch boundary
    k = data.draw(st.one_of(st.integers(0, 3 * spe), st.sampled_from([spe, 2 * spe])))
    stop = k + data.draw(st.integers(1, 2 * spe))
    for rank in range(world):
        stream = base.replace(rank=rank)
        uninterrupted = run(stream, 0, stop)
        assert run(stream, k, stop) == uninterrupted[k:]
        assert idx_of(stream.batch_at(k)) == uninterrupted[k]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), per_rank=st.integers(1, 6), accum=st.integers(1, 3), drop_last=st.booleans())
def test_ranks_are_disjoint_covering_equal_and_independent_of_world_size(n, per_rank, accum, drop_last):
    world = 2
    bs = world * per_rank
    if drop_last and bs > n:
        return
    single = BatchStream(columns(n), bs, seed=1, accum_steps=accum, drop_last=drop_last)
    ranks = [single.replace(world_size=world, rank=r) for r in range(world)]
    assert len(single) == len(ranks[0]) == max(math.ceil(single.layout.microbatches_per_epoch / accum), 1)
    seen = []
    for step in range(len(single)):
        whole = windows(single.batch_at(step))
        parts = [windows(r.batch_at(step)) for r in ranks]
        assert [len(p) for p in parts] == [len(whole)] * world
        for j, mb in enumerate(whole):
            rows = [p[j]["idx"].shape[0] for p in parts]
            assert rows[0] == rows[1]  # equal count per rank
            valid = [p[j]["_valid"] if "_valid" in p[j] else torch.ones(rows[0], dtype=torch.bool) for p in parts]
            real = torch.cat([p[j]["idx"][v] for p, v in zip(parts, valid)])
            assert real.tolist() == mb["idx"].tolist()  # global microbatch b split across ranks, in rank order
            padded_labels = torch.cat([p[j]["labels"][~v] for p, v in zip(parts, valid)])
            assert (padded_labels == -100).all()  # padding counts zero in (sum, count) losses
            seen += real.tolist()
    used = single.layout.examples_per_epoch
    assert len(seen) == len(set(seen)) == used  # disjoint and covering
    assert used == (n // bs * bs if drop_last else n)


def test_world_size_two_to_one_resume_continues_the_global_order():
    n, bs, k = 37, 4, 6
    two = [BatchStream(columns(n), bs, seed=2, world_size=2, rank=r) for r in range(2)]
    one = BatchStream(columns(n), bs, seed=2, world_size=1)
    before = [torch.cat([r.batch_at(s)["idx"] for r in two]).tolist() for s in range(k)]
    after = [b["idx"].tolist() for b in one.iter_from(k, 2 * len(one))]
    uninterrupted = [b["idx"].tolist() for b in one.iter_from(0, 2 * len(one))]
    assert before + after == uninterrupted


def test_padding_marks_only_padded_microbatches():
    # 10 examples, batch 4 on 3 ranks is invalid; on 2 ranks the tail of 2 splits evenly, of 3 needs one pad row
    even = BatchStream(columns(10), 4, world_size=2, rank=1, seed=0)
    assert "_valid" not in even.batch_at(2)
    odd = BatchStream(columns(11), 4, world_size=2, seed=0)
    last = [odd.replace(rank=r).batch_at(2) for r in range(2)]
    assert [b["_valid"].tolist() for b in last] == [[True, True], [True, False]]
    assert last[1]["labels"][1].item() == -100 and last[1]["idx"][1].item() == last[0]["idx"][0].item()
    assert "_valid" not in odd.batch_at(0)
    no_mask = odd.replace(pad_mask_key=None, rank=1).batch_at(2)
    assert sorted(no_mask) == ["idx", "labels"] and no_mask["labels"][1].item() == -100


def test_accumulation_windows_and_steps_per_epoch_match_transformers():
    for n, bs, accum, drop_last in [(50, 4, 3, False), (50, 4, 3, True), (8, 4, 4, False), (48, 4, 3, False)]:
        stream = BatchStream(columns(n), bs, accum_steps=accum, drop_last=drop_last, seed=0)
        len_dl = n // bs if drop_last else math.ceil(n / bs)
        assert len(stream) == max(len_dl // accum + int(len_dl % accum > 0), 1)  # Trainer's formula
        sizes = [len(stream.batch_at(s)) for s in range(len(stream))]
        remainder = len_dl % accum or accum
        assert sizes == [accum] * (len(stream) - 1) + [remainder]
    with pytest.raises(ValueError, match="accum_steps must be an int >= 1"):
        BatchStream(columns(8), 4, accum_steps=0)


def test_short_last_window_is_weighted_exactly_by_the_train_step():
    # 10 examples, microbatch 4, accum 2: step 1 holds one microbatch of 2; its gradient equals the plain mean
    x = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randn(10, 1, dtype=torch.float64)
    stream = BatchStream({"x": x, "y": y, "idx": torch.arange(10)}, 4, accum_steps=2, seed=0)
    loss = lambda m, b: losses.mse(m(b["x"]), b["y"])  # noqa: E731
    model = torch.nn.Linear(3, 1).double()
    for step in range(len(stream)):
        window = stream.batch_at(step)
        state = TrainState.create(model, optim.sgd(1.0), key=0)
        new, metrics = make_train_step(loss, accum_steps=2)(state, window)
        rows = torch.cat([mb["idx"] for mb in window])
        ref = torch.nn.Linear(3, 1).double()
        ref.load_state_dict(model.state_dict())
        torch.nn.functional.mse_loss(ref(x[rows]), y[rows], reduction="sum").div(rows.numel()).backward()
        # float64: sgd(1.0) moves the weight by its gradient, so old - new is the gradient up to the rounding of
        # the O(1) weights and of a sum over <= 8 rows (~1e-15; measured 1e-16). atol=1e-12 still fails a window
        # weighted by the wrong count (the gradient off by a factor 2, an O(1) change).
        torch.testing.assert_close(state.params["weight"] - new.params["weight"], ref.weight.grad, rtol=0, atol=1e-12)
        assert int(metrics["count"]) == rows.numel()


def _noisy_collate(features):
    """A collator with randomness (like MLM masking): torch.rand under the stream's per-microbatch seed."""
    idx = torch.tensor([f["idx"] for f in features])
    return {"idx": idx, "noise": torch.rand(len(features)), "aug": torch.stack([f["aug"] for f in features])}


class Augmented(torch.utils.data.Dataset):
    """Random augmentation in __getitem__ (torch's global RNG), as image pipelines do."""

    def __len__(self):
        return 23

    def __getitem__(self, i):
        return {"idx": i, "aug": torch.randn(2)}


@pytest.mark.parametrize("accum", [1, 2])
def test_num_workers_does_not_change_batches_or_collator_randomness(accum):
    kw = dict(seed=11, accum_steps=accum, collate_fn=_noisy_collate, world_size=2, rank=1)
    zero = BatchStream(Augmented(), 4, num_workers=0, **kw)
    two = BatchStream(Augmented(), 4, num_workers=2, prefetch_factor=3, **kw)
    stop = 2 * len(zero) + 1
    rng = torch.get_rng_state()
    a = [windows(b) for b in zero.iter_from(0, stop)]
    b = [windows(b) for b in two.iter_from(0, stop)]
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is untouched
    assert len(a) == len(b) == stop
    # bitwise: the same draws (torch.rand / randn from the same per-microbatch seed) on the same machine, in this
    # process or in its worker processes
    for wa, wb in zip(a, b):
        for ma, mb in zip(wa, wb, strict=True):
            assert torch.equal(ma["idx"], mb["idx"]) and torch.equal(ma["noise"], mb["noise"])
            assert torch.equal(ma["aug"], mb["aug"])
    # resuming also resumes the collator's randomness
    resumed = windows(next(two.iter_from(3, stop)))
    assert all(torch.equal(m["noise"], r["noise"]) for m, r in zip(a[3], resumed, strict=True))
    assert all(torch.equal(m["aug"], r["aug"]) for m, r in zip(a[3], resumed, strict=True))
    assert not torch.equal(a[0][0]["noise"], a[1][0]["noise"])


def test_step_may_be_a_state_step_tensor_and_iterator_tracks_position():
    stream = BatchStream(columns(20), 4, seed=0)
    assert idx_of(stream.batch_at(torch.tensor(3))) == idx_of(stream.batch_at(3))
    it = stream.iter_from(2)
    next(it)
    assert it.step == 3 and it.state_dict() == {"step": 3}
    with pytest.raises(TypeError, match="iter_from"):
        iter(stream)
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        stream.batch_at(-1)
