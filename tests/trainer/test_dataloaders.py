"""The Trainer's loaders against transformers.Trainer run in the same test (the independent reference).

Iterable datasets, a custom ``get_train_dataloader``, the ``get_batch_samples`` / ``_get_dataloader`` hooks,
``auto_find_batch_size`` and ``ignore_data_skip`` each train both trainers on the same float64 tiny GPT-2 and the
same rows, and compare what transformers logs step by step. The tolerances are test_trainer_parity's:
``hf_loss_rtol(GA)`` for a loss transformers accumulates in float32, ``FLOAT64`` for float64 on both sides.
"""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' Trainer prepares its loaders with accelerate

from ftrain.data import BatchStream  # noqa: E402
from ftrain.trainer import Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from ftrain.trainer.dataloaders import TrainerDataLoader, find_executable_batch_size  # noqa: E402
from tests.trainer.side_by_side import APPROX64, assert_same_training, logged_steps, side_args  # noqa: E402
from tests.trainer.test_trainer_parity import ARGS, tiny_gpt2, token_rows  # noqa: E402

GA = ARGS["gradient_accumulation_steps"]


def _pair(tmp_path, name, **overrides):
    """``(label, Trainer class, TrainingArguments)`` for transformers, then ftrain, with ``ARGS | overrides``."""
    return side_args(tmp_path, {**ARGS, **overrides}, name=name)


class TokenStream(torch.utils.data.IterableDataset):
    """A torch IterableDataset of the rows of ``token_rows()`` (no length, read in order)."""

    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


def _iterable(kind):
    rows = token_rows()
    return TokenStream(list(rows)) if kind == "torch" else rows.to_iterable_dataset()


@pytest.mark.parametrize("kind", ["torch", "datasets"])
def test_iterable_dataset_trains_and_evaluates_like_transformers(tmp_path, kind, one_thread):
    # 24 rows in microbatches of 4, GA 2: 3 updates per pass, so max_steps=5 reads the stream a second time.
    # One dataset object for both, transformers first: ftrain must read it from its start although transformers'
    # run left the stream's live state_dict() in the middle of a pass.
    out, data = {}, _iterable(kind)
    for name, cls, args in _pair(tmp_path, kind, max_steps=5):
        trainer = cls(model=tiny_gpt2(), args=args, train_dataset=data)
        trainer.train()
        evals = token_rows(10, seed=2)
        evals = TokenStream(list(evals)) if kind == "torch" else evals.to_iterable_dataset()
        out[name] = trainer, trainer.evaluate(evals)
    (hf, hf_eval), (ft, ft_eval) = out["hf"], out["ft"]
    assert_same_training(hf, ft, accumulated=GA)
    assert [e["epoch"] for e in logged_steps(ft)][-2:] == pytest.approx([1 + 2 / 10, 1 + 4 / 10])  # the second pass
    assert ft_eval["eval_loss"] == pytest.approx(hf_eval["eval_loss"], **APPROX64)  # float64 on both sides


def test_iterable_dataset_without_max_steps_is_refused_like_transformers(tmp_path):
    for _name, cls, args in _pair(tmp_path, "nomax", max_steps=-1):
        with pytest.raises(ValueError, match="max_steps"):
            cls(model=tiny_gpt2(), args=args, train_dataset=_iterable("torch")).train()


def test_loader_attributes_match_transformers(tmp_path):
    data = token_rows(22)
    (_, _, hf_args), (_, _, ft_args) = _pair(tmp_path, "attrs", per_device_train_batch_size=4)
    hf = transformers.Trainer(model=tiny_gpt2(), args=hf_args, train_dataset=data)
    ft = Trainer(model=tiny_gpt2(), args=ft_args, train_dataset=data)
    theirs, ours = hf.get_train_dataloader(), ft.get_train_dataloader()
    assert isinstance(ours, TrainerDataLoader)
    assert ours.total_batch_size == theirs.total_batch_size == 4
    assert len(ours) == len(theirs) == 6  # microbatches per epoch, the last one short
    assert ours.batch_size == 4  # (accelerate's prepared loader reports None: it was given a batch sampler)
    assert list(ours.sampler) == list(theirs.sampler) == list(range(22))  # sequential
    assert len(ours.dataset) == len(theirs.dataset) and ours.dataset.column_names == theirs.dataset.column_names
    assert ft.num_examples(ours) == hf.num_examples(theirs) == 22
    for a, b in zip(theirs, ours, strict=True):  # iterating gives transformers' microbatches
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ft.set_initial_training_values(ft.args, ours) == hf.set_initial_training_values(hf.args, theirs)


def _torch_loader(trainer):
    return torch.utils.data.DataLoader(
        trainer.train_dataset, batch_size=4, collate_fn=transformers.default_data_collator, shuffle=False
    )


@pytest.mark.parametrize("make_loader", [_torch_loader, lambda t: list(_torch_loader(t))], ids=["DataLoader", "list"])
def test_custom_get_train_dataloader_trains_like_transformers(tmp_path, make_loader, one_thread):
    trainers = {}
    for name, cls, args in _pair(tmp_path, "custom", max_steps=8):

        class Custom(cls):
            def get_train_dataloader(self):
                return make_loader(self)

        trainers[name] = Custom(model=tiny_gpt2(), args=args, train_dataset=token_rows(20))
        trainers[name].train()
    # 5 microbatches per epoch, GA 2: updates of 2, 2 and 1 microbatches, so step 3 ends epoch 0
    assert_same_training(trainers["hf"], trainers["ft"], accumulated=GA)


class _Recorder(TrainerCallback):
    def __init__(self, events):
        self.events = events

    def on_step_begin(self, args, state, control, **kwargs):
        self.events.append("on_step_begin")

    def on_step_end(self, args, state, control, **kwargs):
        self.events.append("on_step_end")


def _recording(cls, events):
    class Recording(cls):
        def _get_dataloader(self, dataset, description, batch_size, sampler_fn=None, is_training=False, **kwargs):
            events.append(f"_get_dataloader({description}, {batch_size}, {is_training})")
            if cls is Trainer:
                sampler_fn = None  # ftrain's loader orders the examples itself (train_sampling_strategy)
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, **kwargs)

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, count = super().get_batch_samples(epoch_iterator, num_batches, device)
            events.append(f"get_batch_samples({num_batches}) -> {len(batches)}, {int(count)}")
            return batches, count

        def training_step(self, model, inputs, num_items_in_batch=None):
            events.append("training_step")
            return super().training_step(model, inputs, num_items_in_batch)

    return Recording


def test_get_dataloader_and_get_batch_samples_overrides_run_in_transformers_order(tmp_path, one_thread):
    events, trainers = {}, {}
    for name, cls, args in _pair(tmp_path, "order", max_steps=4):
        events[name] = []
        trainer = _recording(cls, events[name])(model=tiny_gpt2(), args=args, train_dataset=token_rows(20))
        trainer.add_callback(_Recorder(events[name]))
        trainer.train()
        trainers[name] = trainer
    assert events["ft"] == events["hf"]
    assert events["ft"][:7] == [
        "_get_dataloader(Training, 4, True)",
        "get_batch_samples(2) -> 2, 120",
        "on_step_begin",
        "training_step",
        "training_step",
        "on_step_end",
        "get_batch_samples(2) -> 2, 120",
    ]
    assert "get_batch_samples(1) -> 1, 60" in events["ft"]  # the epoch's last window: 5 % 2 microbatches
    assert_same_training(trainers["hf"], trainers["ft"], accumulated=GA)


def test_get_batch_samples_count_that_the_step_cannot_honour_is_refused(tmp_path):
    class Doubled(Trainer):
        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, count = super().get_batch_samples(epoch_iterator, num_batches, device)
            return batches, 2 * count

    args = TrainingArguments(str(tmp_path), **{**ARGS, "max_steps": 1})
    with pytest.raises(ValueError, match="num_items_in_batch=240, but the train step's own count .* is 120"):
        Doubled(model=tiny_gpt2(), args=args, train_dataset=token_rows(8)).train()


def test_get_batch_samples_set_on_the_instance_is_called_like_transformers(tmp_path, one_thread):
    """transformers' own tests wrap ``trainer.get_batch_samples`` on the instance; the loop must call that."""
    windows, counts, trainers = {}, {}, {}
    for name, cls, args in _pair(tmp_path, "instance", max_steps=-1, num_train_epochs=2):
        trainer = cls(model=tiny_gpt2(), args=args, train_dataset=token_rows(20))
        windows[name], counts[name], default = [], [], trainer.get_batch_samples

        def wrapped(epoch_iterator, num_batches, device, name=name, default=default):
            batches, count = default(epoch_iterator, num_batches, device)
            windows[name].append(len(batches))
            counts[name].append(int(count))
            return batches, count

        trainer.get_batch_samples = wrapped
        trainer.train()
        trainers[name] = trainer
    # 5 microbatches per epoch, GA 2: windows of 2, 2 and 1 in each of the 2 epochs
    assert windows["ft"] == windows["hf"] == [2, 2, 1] * 2
    assert counts["ft"] == counts["hf"]
    assert_same_training(trainers["hf"], trainers["ft"], accumulated=GA)


def test_default_loop_does_not_count_labels_twice(tmp_path, monkeypatch):
    """Without an override the loop reads the microbatches directly: the step counts the labels itself, so the
    shell's count (a host-to-device copy per microbatch on a GPU) is not computed."""
    import ftrain.trainer.evaluation as evaluation

    calls = []
    count = evaluation.loss_item_count
    monkeypatch.setattr(evaluation, "loss_item_count", lambda *a, **k: calls.append(1) or count(*a, **k))
    args = TrainingArguments(str(tmp_path), **{**ARGS, "max_steps": 3})
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=token_rows(20))
    trainer.train()
    assert calls == [] and trainer.state.global_step == 3
    batches, num_items = trainer.get_batch_samples(iter(trainer.get_train_dataloader()), 2, torch.device("cpu"))
    assert len(calls) == 2 and int(num_items) == 2 * 4 * 15  # the public hook still counts: 2 x 4 rows x 15 labels


def _out_of_memory_above(cls, limit, sizes):
    """``cls`` whose ``get_batch_samples`` raises a CUDA out-of-memory error for microbatches above ``limit`` rows
    (where a real run would run out of memory: the first forward), recording each attempt's size."""

    class OutOfMemory(cls):
        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, count = super().get_batch_samples(epoch_iterator, num_batches, device)
            rows = batches[0]["input_ids"].shape[0]
            if not sizes or sizes[-1] != rows:
                sizes.append(rows)
            if rows > limit:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return batches, count

    return OutOfMemory


def test_auto_find_batch_size_retries_like_transformers(tmp_path, one_thread):
    sizes, trainers = {}, {}
    for name, cls, args in _pair(tmp_path, "auto", auto_find_batch_size=True, per_device_train_batch_size=8,
                                 max_steps=2):  # fmt: skip
        sizes[name] = []
        trainer = _out_of_memory_above(cls, 6, sizes[name])(model=tiny_gpt2(), args=args, train_dataset=token_rows())
        trainer.train()
        trainers[name] = trainer
    hf, ft = trainers["hf"], trainers["ft"]
    assert sizes["ft"] == sizes["hf"] == [8, 7, 6]  # x0.9 after each out-of-memory error (accelerate's rule)
    assert ft._train_batch_size == hf._train_batch_size == 6
    assert ft.state.train_batch_size == hf.state.train_batch_size == 6
    assert ft.args.per_device_train_batch_size == hf.args.per_device_train_batch_size == 8
    assert ft.get_total_train_batch_size(ft.args) == hf.get_total_train_batch_size(hf.args) == 12
    assert_same_training(hf, ft, accumulated=GA)


def test_auto_find_batch_size_reraises_other_errors_and_gives_up_at_zero():
    calls = []

    def fails(batch_size):
        calls.append(batch_size)
        raise torch.OutOfMemoryError("CUDA out of memory.")

    with pytest.raises(RuntimeError, match="every batch size from 2 down to 1 ran out of memory"):
        find_executable_batch_size(fails, 2, on_retry=lambda size, err: None)
    assert calls == [2, 1]  # int(2 * 0.9) = 1, int(0.9) = 0
    with pytest.raises(ValueError, match="not memory"):
        find_executable_batch_size(lambda bs: (_ for _ in ()).throw(ValueError("not memory")), 3,
                                   on_retry=lambda size, err: None)  # fmt: skip


def test_evaluation_out_of_memory_is_not_retried_with_auto_find_batch_size(tmp_path):
    errors = {}
    for name, cls, args in _pair(tmp_path, "evaloom", auto_find_batch_size=True, max_steps=2, eval_strategy="steps",
                                 eval_steps=1):  # fmt: skip

        class EvalOutOfMemory(cls):
            def evaluate(self, *args, **kwargs):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

        trainer = EvalOutOfMemory(model=tiny_gpt2(), args=args, train_dataset=token_rows(8),
                                  eval_dataset=token_rows(4))  # fmt: skip
        with pytest.raises(RuntimeError, match="only adjusts the training batch size") as err:
            trainer.train()
        errors[name] = err.value
        assert trainer._train_batch_size == args.per_device_train_batch_size  # no retry
    assert all(isinstance(e.__cause__, torch.OutOfMemoryError) for e in errors.values())


def _first_rows(cls, seen):
    class Recording(cls):
        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, count = super().get_batch_samples(epoch_iterator, num_batches, device)
            seen.append([b["input_ids"][:, 0].tolist() for b in batches])
            return batches, count

    return Recording


@pytest.mark.parametrize("ignore_data_skip", [True, False])
@pytest.mark.parametrize("kind", ["map", "iterable"])
def test_resume_with_and_without_ignore_data_skip_matches_transformers(tmp_path, kind, ignore_data_skip, one_thread):
    # 24 rows, microbatches of 4, GA 1: 6 updates per epoch (or pass); the run saves at step 4 and is resumed there.
    # An iterable stream is replayed to step 4 (ftrain, with a warning) or skipped to it (transformers).
    first, resumed, seen = {}, {}, {}
    common = dict(max_steps=5, gradient_accumulation_steps=1, save_strategy="steps", save_steps=4)
    data = (lambda: token_rows()) if kind == "map" else (lambda: TokenStream(list(token_rows())))
    for name, cls, args in _pair(tmp_path, "skip", **common):
        first[name] = cls(model=tiny_gpt2(), args=args, train_dataset=data())
        first[name].train()
    for name, cls, args in _pair(tmp_path, "skip", **common, ignore_data_skip=ignore_data_skip):
        seen[name] = []
        resumed[name] = _first_rows(cls, seen[name])(model=tiny_gpt2(), args=args, train_dataset=data())
        with warnings.catch_warnings(record=True):  # ftrain's replay of an iterable stream says what it reads
            resumed[name].train(resume_from_checkpoint=f"{args.output_dir}/checkpoint-4")
    assert seen["ft"] == seen["hf"]
    epoch0 = token_rows()["input_ids"]
    expected_first = 0 if ignore_data_skip else 4  # the resumed epoch from its start, or from its 5th batch
    assert seen["ft"][0] == [[row[0] for row in epoch0[4 * expected_first : 4 * expected_first + 4]]]
    assert_same_training(resumed["hf"], resumed["ft"])


def _recording_run_epoch(cls, calls):
    class Recording(cls):
        def _run_epoch(self, **kwargs):  # both trainers pass keywords
            names = ("epoch", "steps_in_epoch", "num_update_steps_per_epoch", "resume_from_checkpoint",
                     "epochs_trained", "steps_trained_in_current_epoch")  # fmt: skip
            calls.append(tuple(kwargs[k] is not None if k == "resume_from_checkpoint" else kwargs[k] for k in names))
            return super()._run_epoch(**kwargs)

    return Recording


def test_run_epoch_gets_transformers_arguments_on_a_resume(tmp_path, one_thread):
    # 20 rows in microbatches of 4, GA 2: 5 microbatches in 3 updates per epoch; saved at step 4 (epoch 1, 1 update
    # in), resumed to step 6. steps_trained_in_current_epoch counts microbatches, as transformers.
    calls, resumed = {}, {}
    common = dict(max_steps=6, save_strategy="steps", save_steps=4)
    for _name, cls, args in _pair(tmp_path, "run_epoch", **common):
        cls(model=tiny_gpt2(), args=args, train_dataset=token_rows(20)).train()
    for name, cls, args in _pair(tmp_path, "run_epoch", **common):
        calls[name] = []
        resumed[name] = _recording_run_epoch(cls, calls[name])(model=tiny_gpt2(), args=args,
                                                               train_dataset=token_rows(20))  # fmt: skip
        resumed[name].train(resume_from_checkpoint=f"{args.output_dir}/checkpoint-4")
    assert calls["hf"] == [(1, 5, 3, True, 1, 2)]  # what this test assumes of transformers
    assert calls["ft"] == calls["hf"]
    assert_same_training(resumed["hf"], resumed["ft"], accumulated=GA)


def test_run_epoch_refuses_another_loader(tmp_path):
    class OtherLoader(Trainer):
        def _run_epoch(self, **kwargs):
            return super()._run_epoch(**{**kwargs, "train_dataloader": list(kwargs["train_dataloader"])})

    args = TrainingArguments(str(tmp_path), **{**ARGS, "max_steps": 1})
    with pytest.raises(ValueError, match="another train_dataloader than the one train.. reads.*get_train_dataloader"):
        OtherLoader(model=tiny_gpt2(), args=args, train_dataset=token_rows(8)).train()


def test_persistent_workers_keep_one_pool_and_the_same_batches(tmp_path):
    data = {"x": torch.arange(20), "labels": torch.arange(20)}
    stream = BatchStream(data, batch_size=4, seed=3, num_workers=1, persistent_workers=True)
    reference = BatchStream(data, batch_size=4, seed=3)
    for epoch in (0, 1):
        first = next(stream.iter_from(epoch * 5))  # an abandoned pass: the next one must not see its batches
        assert torch.equal(first["x"], reference.batch_at(epoch * 5)["x"])
        pool = stream._workers
        batches = list(stream.iter_from(epoch * 5))
        assert stream._workers is pool is not None
        assert all(torch.equal(b["x"], reference.batch_at(epoch * 5 + i)["x"]) for i, b in enumerate(batches))
    for name, cls, args in _pair(tmp_path, "persist", dataloader_persistent_workers=True, dataloader_num_workers=1):
        trainer = cls(model=tiny_gpt2(), args=args, train_dataset=token_rows(8), eval_dataset=token_rows(4))
        assert trainer.get_eval_dataloader() is trainer.get_eval_dataloader(), name  # kept, as transformers


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(train_sampling_strategy="batch_rebalance"), "microbatches of different sizes"),
        (dict(dataloader_persistent_workers=True), "dataloader_num_workers > 0"),
    ],
)
def test_loader_settings_ftrain_cannot_give_are_refused_when_built(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainingArguments("out", **settings)
