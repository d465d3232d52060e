"""Every kind of source: torch and transformers datasets, map-style and iterable, and their resumes."""

import warnings

import pytest
import torch

from ftrain.data import BatchStream, make_padding_collator

datasets = pytest.importorskip("datasets")


class Squares(torch.utils.data.Dataset):
    def __len__(self):
        return 30

    def __getitem__(self, i):
        return {"x": torch.tensor([i, i * i])}


class Counter(torch.utils.data.IterableDataset):
    """A stateless iterable: counts to n."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return ({"x": i, "labels": i % 2} for i in range(self.n))


class StatefulCounter(Counter):
    """torchdata's Stateful protocol: state_dict() / load_state_dict()."""

    def __init__(self, n):
        super().__init__(n)
        self.pos, self._start = 0, 0

    def __iter__(self):
        self.pos = self._start
        self._start = 0
        while self.pos < self.n:
            self.pos += 1
            yield {"x": self.pos - 1, "labels": (self.pos - 1) % 2}

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self._start = state["pos"]


def xs(batch):
    return [mb["x"].tolist() for mb in (batch if isinstance(batch, list) else [batch])]


def test_map_style_sources_agree():
    n = 12
    rows = [{"x": i, "labels": i % 2} for i in range(n)]
    sources = {
        "list": rows,
        "columns": {"x": torch.arange(n), "labels": torch.arange(n) % 2},
        "numpy columns": {"x": torch.arange(n).numpy(), "labels": [i % 2 for i in range(n)]},
        "hf": datasets.Dataset.from_dict({"x": list(range(n)), "labels": [i % 2 for i in range(n)]}),
        "hf torch format": datasets.Dataset.from_dict({"x": list(range(n)), "labels": [i % 2 for i in range(n)]})
        .with_format("torch"),
    }  # fmt: skip
    ref = None
    for name, src in sources.items():
        stream = BatchStream(src, 4, seed=9, accum_steps=2)
        got = [xs(b) for b in stream.iter_from(0, 4)]
        assert ref is None or got == ref, name
        assert [xs(b) for b in stream.iter_from(3, 4)] == got[3:], name  # resume mid-way
        ref = got
    assert sorted(i for w in ref[:2] for mb in w for i in mb) == list(range(n))
    torch_ds = BatchStream(Squares(), 5, seed=0)
    b = torch_ds.batch_at(2)["x"]
    assert b.shape == (5, 2) and torch.equal(b[:, 1], b[:, 0] ** 2)  # int64 rows, i and i * i: exact


def test_hf_iterable_dataset_resumes_from_its_state_dict():
    def gen():
        for i in range(10):
            yield {"x": i, "labels": i % 2}

    ds = datasets.IterableDataset.from_generator(gen)
    stream = BatchStream(ds, 4, seed=0)
    it = stream.iter_from(0, stop=9)
    seen, saved = [], {}
    for batch in it:
        seen.append(xs(batch))
        saved[it.step] = it.state_dict()
    # 10 examples in microbatches of 4: [0..3], [4..7], [8, 9], then the next epoch
    assert seen[:4] == [[[0, 1, 2, 3]], [[4, 5, 6, 7]], [[8, 9]], [[0, 1, 2, 3]]]
    for k in (1, 3, 4, 5, 7):
        fresh = BatchStream(datasets.IterableDataset.from_generator(gen), 4, seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a stateful resume replays nothing and does not warn
            resumed = [xs(b) for b in fresh.iter_from(k, stop=9, state=saved[k])]
        assert resumed == seen[k:], k
    assert saved[4]["epoch"] == 1 and saved[4]["source"] is not None
    # a state loaded for one iterator does not leak into the next one started from scratch
    fresh = BatchStream(datasets.IterableDataset.from_generator(gen), 4, seed=0)
    assert [xs(b) for b in fresh.iter_from(1, stop=2, state=saved[1])] == seen[1:2]
    assert [xs(b) for b in fresh.iter_from(0, stop=3)] == seen[:3]


@pytest.mark.parametrize("make", [Counter, StatefulCounter])
def test_torch_iterable_resume_by_state_or_replay(make):
    stream = BatchStream(make(7), 2, accum_steps=2, world_size=2, rank=1, seed=0)
    it = stream.iter_from(0, stop=6)
    seen, states = [], {}
    for batch in it:
        seen.append(xs(batch))
        states[it.step] = it.state_dict()
    # rank 1 gets the second row of each microbatch; the tail microbatch [6] is padded on rank 1
    assert seen[:3] == [[[1], [3]], [[5], [6]], [[1], [3]]]
    last = stream.iter_from(0, stop=2)
    next(last)
    assert next(last)[1]["_valid"].tolist() == [False]
    with pytest.warns(UserWarning, match=r"about 12 examples \(step 3 x accum_steps 2 x batch_size 2\)"):
        replayed = stream.iter_from(3, stop=6)
    assert [xs(b) for b in replayed] == seen[3:]
    if make is StatefulCounter:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fresh = BatchStream(make(7), 2, accum_steps=2, world_size=2, rank=1, seed=0)
            assert [xs(b) for b in fresh.iter_from(3, stop=6, state=states[3])] == seen[3:]


def test_iterable_epoch_ends_and_cannot_seek():
    stream = BatchStream(Counter(5), 2, drop_last=True, seed=0)
    assert [xs(b) for b in stream.iter_from(0)] == [[[0, 1]], [[2, 3]]]  # one epoch, the tail [4] dropped
    assert [xs(b) for b in stream.iter_from(0, stop=3)][2] == [[0, 1]]
    with pytest.raises(TypeError, match="cannot seek"):
        stream.batch_at(0)
    with pytest.raises(TypeError, match="no known length"):
        len(stream)
    with pytest.raises(ValueError, match="yielded no examples"):
        next(BatchStream(Counter(0), 2).iter_from(0))


def test_hf_dataset_with_padding_collator_and_workers():
    ds = datasets.Dataset.from_dict({"input_ids": [[1] * (i % 5 + 1) for i in range(20)], "label": [0, 1] * 10})
    collate = make_padding_collator(pad_token_id=0, pad_to_multiple_of=8)
    a = BatchStream(ds, 4, seed=1, collate_fn=collate)
    b = a.replace(num_workers=2)
    for x, y in zip(a.iter_from(0), b.iter_from(0), strict=True):
        assert x.keys() == y.keys() == {"input_ids", "attention_mask", "labels"}
        assert x["input_ids"].shape == (4, 8) and torch.equal(x["input_ids"], y["input_ids"])
        assert torch.equal(x["attention_mask"].sum(1), (x["input_ids"] == 1).sum(1))


def test_hf_length_column_drives_grouping_before_column_removal():
    n = 40
    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2]] * n, "length": list(range(n)), "text": ["t"] * n})
    stream = BatchStream(ds, 4, seed=3, group_by_length=True, columns=["input_ids"])
    first = stream.microbatches_at(0)[0].indices
    assert first[0] == n - 1  # the longest by the "length" column comes first
    assert list(first) == sorted(first, reverse=True)  # sorted by length within the megabatch
    assert sorted(stream.batch_at(0)) == ["input_ids"]  # "length" and "text" removed from the batches
    with pytest.raises(TypeError, match=r"splits \['train'\]; pass one split"):
        BatchStream(datasets.DatasetDict({"train": ds}), 2)
