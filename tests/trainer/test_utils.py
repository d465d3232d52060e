"""ftrain.trainer.utils against transformers.trainer_utils, the reference for every behaviour here.

The numbers compared come from the same Python float arithmetic on both sides (speed metrics from a faked clock,
rounded to 3-4 decimals) or from the same generators seeded alike (bitwise draws), so they are compared exactly.
"""

import functools
import os
import random
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ftrain.trainer import utils

hf = pytest.importorskip("transformers.trainer_utils", reason="transformers is the reference for these tests")


# --------------------------------------------------------------------------------------------------------------------
# speed_metrics
# --------------------------------------------------------------------------------------------------------------------

COUNT = st.one_of(st.none(), st.integers(0, 10**7))


@settings(max_examples=200, deadline=None)
@given(
    start=st.floats(0, 1e9, allow_nan=False),
    runtime=st.one_of(st.just(0.0), st.floats(1e-6, 1e5, allow_nan=False)),
    samples=COUNT,
    steps=COUNT,
    tokens=COUNT,
)
def test_speed_metrics_keys_and_rounding_match_transformers(start, runtime, samples, steps, tokens):
    now = start + runtime
    original = time.time
    time.time = lambda: now  # both modules call time.time() through the time module
    try:
        ours = utils.speed_metrics("train", start, num_samples=samples, num_steps=steps, num_tokens=tokens)
        theirs = hf.speed_metrics("train", start, num_samples=samples, num_steps=steps, num_tokens=tokens)
    finally:
        time.time = original
    assert ours == theirs
    assert list(ours) == list(theirs)


def test_speed_metrics_rounds_runtime_to_4_and_rates_to_3_decimals(monkeypatch):
    monkeypatch.setattr(time, "time", lambda: 103.0)
    assert utils.speed_metrics("eval", 100.0, num_samples=10, num_steps=2, num_tokens=1000) == {
        "eval_runtime": 3.0,
        "eval_samples_per_second": 3.333,
        "eval_steps_per_second": 0.667,
        "eval_tokens_per_second": 333.333,
    }
    monkeypatch.setattr(time, "time", lambda: 100.0)
    assert utils.speed_metrics("eval", 100.0, num_samples=10) == {"eval_runtime": 0.0}


# --------------------------------------------------------------------------------------------------------------------
# Checkpoint folders
# --------------------------------------------------------------------------------------------------------------------


def test_get_last_checkpoint_matches_transformers(tmp_path):
    for name in (
        "checkpoint-1",
        "checkpoint-9",
        "checkpoint-10",
        "checkpoint-x",
        "checkpoint-12-tmp",
        "mycheckpoint-50",
    ):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-11").write_text("a file, not a checkpoint folder")
    assert utils.get_last_checkpoint(tmp_path) == os.path.join(tmp_path, "checkpoint-10")
    assert utils.get_last_checkpoint(tmp_path) == hf.get_last_checkpoint(tmp_path)
    assert utils.PREFIX_CHECKPOINT_DIR == hf.PREFIX_CHECKPOINT_DIR == "checkpoint"


def test_get_last_checkpoint_without_checkpoints_or_folder(tmp_path):
    (tmp_path / "runs").mkdir()
    assert utils.get_last_checkpoint(tmp_path) is None is hf.get_last_checkpoint(tmp_path)
    for impl in (utils, hf):
        with pytest.raises(FileNotFoundError):
            impl.get_last_checkpoint(tmp_path / "missing")


# --------------------------------------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------------------------------------

MAYBE = st.one_of(st.none(), st.integers(0, 9))


@given(inputs=MAYBE, losses=MAYBE)
def test_eval_prediction_unpacks_and_indexes_like_transformers(inputs, losses):
    args = dict(predictions=np.arange(3), label_ids=np.ones(3), inputs=inputs, losses=losses)
    ours, theirs = utils.EvalPrediction(**args), hf.EvalPrediction(**args)
    assert len(list(ours)) == len(list(theirs)) == 2 + (inputs is not None) + (losses is not None)
    assert all(a is b for a, b in zip(ours, theirs))
    assert ours.elements == theirs.elements
    for idx in range(len(theirs.elements)):
        assert ours[idx] is theirs[idx]
    for bad in (-1, len(theirs.elements)):
        for p in (ours, theirs):
            with pytest.raises(IndexError, match="tuple index out of range"):
                p[bad]
    assert (ours.predictions, ours.label_ids, ours.inputs, ours.losses) == (
        theirs.predictions,
        theirs.label_ids,
        theirs.inputs,
        theirs.losses,
    )


@pytest.mark.parametrize("name", ["TrainOutput", "PredictionOutput", "EvalLoopOutput"])
def test_output_tuples_have_transformers_fields(name):
    ours, theirs = getattr(utils, name), getattr(hf, name)
    assert ours._fields == theirs._fields
    values = tuple(range(len(theirs._fields)))
    assert tuple(ours(*values)) == tuple(theirs(*values)) == values
    assert ours(*values)._asdict() == theirs(*values)._asdict()


def test_train_output_unpacks_like_a_tuple():
    step, loss, metrics = utils.TrainOutput(global_step=7, training_loss=0.25, metrics={"train_loss": 0.25})
    assert (step, loss, metrics) == (7, 0.25, {"train_loss": 0.25})


def test_strategy_enums_are_importable_from_utils_as_from_transformers_trainer_utils():
    from ftrain.trainer import args

    for name in ("IntervalStrategy", "SaveStrategy", "HubStrategy"):
        ours, theirs = getattr(utils, name), getattr(hf, name)
        assert ours is getattr(args, name)  # one definition, with TrainingArguments
        assert [m.value for m in ours] == [m.value for m in theirs]
    with pytest.raises(AttributeError, match="no attribute 'SchedulerTypo'"):
        _ = utils.SchedulerTypo


def test_strategy_value_reads_any_enum_or_string():
    assert [utils.strategy_value(v) for v in (hf.SaveStrategy.BEST, "epoch", None)] == ["best", "epoch", None]


# --------------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------------


def test_denumpify_detensorize_matches_transformers():
    metrics = {
        "acc": np.float32(0.5),
        "n": np.int64(3),
        "t": torch.tensor(2.5),
        "t1": torch.tensor([4]),
        "vec": torch.tensor([1.0, 2.0]),
        "nested": [np.float64(1.5), (torch.tensor(1), "s")],
        "none": None,
    }
    ours, theirs = utils.denumpify_detensorize(metrics), hf.denumpify_detensorize(metrics)
    vec_ours, vec_theirs = ours.pop("vec"), theirs.pop("vec")
    assert vec_ours is vec_theirs is metrics["vec"]  # a multi-element tensor is left alone
    assert ours == theirs == {"acc": 0.5, "n": 3, "t": 2.5, "t1": 4, "nested": [1.5, (1, "s")], "none": None}
    assert type(ours["n"]) is int and type(ours["nested"][1]) is tuple


def _three(a, b, c):
    return a


@pytest.mark.parametrize(
    "func",
    [_three, functools.partial(_three, 1), functools.partial(_three, c=1), lambda: 0, lambda *a, **k: 0],
    ids=["plain", "partial-arg", "partial-kwarg", "none", "varargs"],
)
def test_number_of_arguments_matches_transformers(func):
    assert utils.number_of_arguments(func) == hf.number_of_arguments(func)


class _Unsized:
    def __len__(self):
        raise TypeError("no length")


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(range(3))


@pytest.mark.parametrize(
    "obj", [[1, 2], (), range(3), iter([1]), _Unsized(), _Stream(), torch.utils.data.TensorDataset(torch.zeros(4))]
)
def test_has_length_matches_transformers(obj):
    assert utils.has_length(obj) == hf.has_length(obj)


# --------------------------------------------------------------------------------------------------------------------
# Seeding
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def restore_global_rng_and_flags():
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    flags = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    yield
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])
    torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags[2], flags[3]


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


@pytest.mark.usefixtures("restore_global_rng_and_flags")
@pytest.mark.parametrize("seed", [0, 42, 2**32 - 1])
def test_set_seed_gives_the_same_draws_as_transformers(seed):
    hf.set_seed(seed)
    expected = _draws()
    utils.set_seed(seed)
    assert _draws() == expected
    utils.set_seed(seed + 1 if seed < 2**32 - 1 else 0)
    assert _draws() != expected


@pytest.mark.usefixtures("restore_global_rng_and_flags")
@pytest.mark.parametrize("warn_only", [False, True])
def test_enable_full_determinism_sets_what_transformers_sets(monkeypatch, warn_only):
    names = ("CUDA_LAUNCH_BLOCKING", "CUBLAS_WORKSPACE_CONFIG", "ASCEND_LAUNCH_BLOCKING", "HCCL_DETERMINISTIC")
    names += ("FLASH_ATTENTION_DETERMINISTIC",)

    def snapshot():
        return (
            {k: os.environ.get(k) for k in names},
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark,
            _draws(),
        )

    results = []
    for impl in (hf, utils):
        for k in names:
            monkeypatch.delenv(k, raising=False)
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
        impl.enable_full_determinism(7, warn_only=warn_only)
        results.append(snapshot())
    assert results[0] == results[1]
    env, enabled, warn, cudnn_det, cudnn_bench, _ = results[1]
    assert env["CUBLAS_WORKSPACE_CONFIG"] == ":16:8" and env["CUDA_LAUNCH_BLOCKING"] == "1"
    assert (enabled, warn, cudnn_det, cudnn_bench) == (True, warn_only, True, False)
