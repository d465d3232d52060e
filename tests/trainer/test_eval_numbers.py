"""The numbers ``evaluate()`` and ``predict()`` report, and tuple model outputs, against ``transformers.Trainer`` (issue
14, sections 0 and 5).

transformers' ``evaluation_loop`` repeats each batch's mean loss once per example of the batch and averages: batches
are weighted by their number of examples. That is ftrain's default ``eval_loss`` (``eval_loss_reduction="batch"``);
the exact mean over every counted token (``"token"``) is an opt-in, checked here against a hand computation.

Every comparison runs both trainers in the same test on the same float64 model and data, so the claim is a
mathematical equivalence and the tolerance is ``FLOAT64`` (tests/tolerances.py): both sides compute float64 means of
O(1) losses, differing at most by the order of a few reductions (measured: equal to the last bit here). A real
difference — batches weighted otherwise, a dropped partial batch, a logit column taken for the loss — is orders of
magnitude above it (each test's control says by how much).
"""

import numpy as np
import pytest
import torch
from tolerances import FLOAT64
from torch import nn

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from ftrain.trainer import Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from tests.trainer.side_by_side import (  # noqa: E402
    APPROX64,
    assert_same_training,
    logged_steps,
    side_args,
)
from tests.trainer.test_trainer_parity import tiny_gpt2  # noqa: E402

BASE = dict(
    report_to="none",
    use_cpu=True,
    per_device_train_batch_size=4,
    per_device_eval_batch_size=4,
    save_strategy="no",
    disable_tqdm=True,
    seed=0,
)
EVAL_ROWS = 10  # batches of 4, 4 and 2: a partial last batch


# ----------------------------------------------------------------------------------------------------------
# Models and data


class TupleRegression(nn.Module):
    """``y = a·x + b`` returning plain tuples, like transformers' test ``RegressionModel``: ``(loss, y)`` (or
    ``(loss, y, 2y)`` with ``double_output``) given labels, ``(y,)`` (or ``(y, 2y)``) without. float64."""

    def __init__(self, double_output: bool = False):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(0.25, dtype=torch.float64))
        self.double_output = double_output

    def forward(self, input_x, labels=None):
        y = input_x * self.a + self.b
        outputs = (y, 2 * y) if self.double_output else (y,)
        if labels is None:
            return outputs
        return (nn.functional.mse_loss(y, labels), *outputs)


class RegressionRows:
    """``y = 2x + 3 + noise`` in float64; without labels when ``labelled=False``."""

    def __init__(self, n: int, seed: int, labelled: bool = True):
        rng = np.random.default_rng(seed)
        self.x = rng.normal(size=n)
        self.y = 2 * self.x + 3 + rng.normal(scale=0.5, size=n)
        self.labelled = labelled

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_x": self.x[i], "labels": self.y[i]} if self.labelled else {"input_x": self.x[i]}


def padded_rows(n: int = EVAL_ROWS, seed: int = 3):
    """Token rows of 3 to 16 tokens (labels = inputs), so that batches hold different numbers of tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 17, (n,), generator=g).tolist()
    ids = [torch.randint(1, 64, (length,), generator=g).tolist() for length in lengths]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def pad_collate(features):
    """Right-pads a batch: ``input_ids`` with 0, ``attention_mask`` 0 and ``labels`` -100 on the padding."""
    width = max(len(f["input_ids"]) for f in features)

    def pad(key, value):
        return torch.tensor([list(f[key]) + [value] * (width - len(f[key])) for f in features])

    batch = {"input_ids": pad("input_ids", 0)}
    batch["attention_mask"] = (pad("labels", -100) != -100).long() if "labels" in features[0] else None
    if "labels" in features[0]:
        batch["labels"] = pad("labels", -100)
    return {k: v for k, v in batch.items() if v is not None}


class TupleGPT2LMHeadModel(transformers.GPT2LMHeadModel):
    """GPT-2 returning tuples: ``return_dict=False`` (in the call: transformers 5.25's GPT-2 breaks with it in the
    config) and no cache, so ``(loss, logits)`` with labels and ``(logits,)`` without."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        return super().forward(input_ids, attention_mask=attention_mask, labels=labels, use_cache=False,
                               return_dict=False, **kwargs)  # fmt: skip


def tuple_gpt2():
    """The tiny float64 GPT-2 of the parity tests, returning tuples."""
    model = tiny_gpt2()
    model.__class__ = TupleGPT2LMHeadModel
    return model


# ----------------------------------------------------------------------------------------------------------
# compute_metrics


def token_metrics(p):
    """Next-token accuracy and the mean of the predicted logits over the counted positions."""
    logits, labels = p.predictions, p.label_ids
    if isinstance(logits, list):  # eval_do_concat_batches=False: one array per batch
        parts = [token_metrics(transformers.EvalPrediction(lg, lb)) for lg, lb in zip(logits, labels)]
        return {"batches": len(parts), "accuracy": float(np.mean([m["accuracy"] for m in parts]))}
    target, logits = labels[:, 1:], logits[:, :-1]
    counted = target != -100
    return {"accuracy": (logits.argmax(-1) == target)[counted].mean(), "mean_logit": logits[counted].mean()}


def token_metrics_with_inputs_and_losses(p):
    """:func:`token_metrics` plus what ``include_for_metrics=["inputs", "loss"]`` adds."""
    inputs, losses = p.inputs, p.losses
    return {**token_metrics(p), "input_sum": inputs[inputs != -100].sum(), "losses": losses.mean(), "n": len(losses)}


class BatchTokenMetrics:
    """``batch_eval_metrics``: counts per batch (torch tensors), the summary when ``compute_result``."""

    def __init__(self):
        self.correct = self.total = 0
        self.loss_sum = 0.0

    def __call__(self, p, compute_result):
        target, logits = p.label_ids[:, 1:], p.predictions[:, :-1]
        counted = target != -100
        self.correct += int((logits.argmax(-1) == target)[counted].sum())
        self.total += int(counted.sum())
        self.loss_sum += float(p.losses.sum()) + float(p.inputs["input_ids"].sum())
        if compute_result:
            return {"accuracy": self.correct / self.total, "loss_and_input_sum": self.loss_sum}


def regression_metrics(p):
    predictions = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
    error = np.abs(predictions - p.label_ids)
    return {"accuracy": (error < 0.5).mean(), "mae": error.mean()}


# ----------------------------------------------------------------------------------------------------------
# Running both trainers and comparing


def both(tmp_path, model_fn, ft_args=None, compute_metrics=None, **kwargs):
    """``{"hf": transformers.Trainer, "ft": ftrain Trainer}`` on fresh models, with the same arguments
    (``ft_args``: ftrain's own extra arguments). ``compute_metrics`` may be a factory (a fresh one per trainer)."""
    out = {}
    for name, trainer_cls, args in side_args(tmp_path, {**BASE, **kwargs.pop("args", {})}, ft_only=ft_args):
        metrics = compute_metrics() if isinstance(compute_metrics, type) else compute_metrics
        out[name] = trainer_cls(model=model_fn(), args=args, compute_metrics=metrics, **kwargs)
    return out


def _timing(key: str) -> bool:
    return key.endswith(("_runtime", "_per_second", "_model_preparation_time"))


def assert_same_metrics(ours: dict, theirs: dict) -> None:
    """The same keys (timings aside; transformers adds ``*_model_preparation_time``) and the same values."""
    theirs = {k: v for k, v in theirs.items() if not _timing(k)}
    ours = {k: v for k, v in ours.items() if not _timing(k)}
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, **APPROX64), key


def assert_same_arrays(ours, theirs) -> None:
    """The same nesting (arrays, tuples, lists of per-batch arrays), shapes and dtypes, values to FLOAT64."""
    if isinstance(theirs, tuple | list):
        assert type(ours) is type(theirs) and len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert_same_arrays(a, b)
    elif theirs is None:
        assert ours is None
    else:
        assert isinstance(ours, np.ndarray) and ours.shape == theirs.shape and ours.dtype == theirs.dtype
        np.testing.assert_allclose(ours, theirs, rtol=FLOAT64["rtol"], atol=FLOAT64["atol"])


def assert_same_evaluate_and_predict(trainers, eval_data, test_data=None) -> tuple[dict, dict]:
    """``evaluate(eval_data)`` metrics and ``predict(test_data)`` outputs equal; returns the evaluate metrics."""
    hf, ft = trainers["hf"], trainers["ft"]
    hf_eval, ft_eval = hf.evaluate(eval_data), ft.evaluate(eval_data)
    assert_same_metrics(ft_eval, hf_eval)
    test_data = eval_data if test_data is None else test_data
    hf_pred, ft_pred = hf.predict(test_data), ft.predict(test_data)
    assert_same_arrays(ft_pred.predictions, hf_pred.predictions)
    assert_same_arrays(ft_pred.label_ids, hf_pred.label_ids)
    assert_same_metrics(ft_pred.metrics, hf_pred.metrics)
    return ft_eval, hf_eval


# ----------------------------------------------------------------------------------------------------------
# (1) A padded variable-length set with a partial last batch


def test_padded_causal_lm_evaluate_and_predict_match_transformers(tmp_path, one_thread):
    trainers = both(tmp_path, tiny_gpt2, compute_metrics=token_metrics, data_collator=pad_collate)
    ours, theirs = assert_same_evaluate_and_predict(trainers, padded_rows())
    assert {"eval_loss", "eval_accuracy", "eval_mean_logit"} <= set(ours)
    # The control: the exact token mean of the same set is not transformers' number at this tolerance.
    trainers["ft"].args.eval_loss_reduction = "token"
    token = trainers["ft"].evaluate(padded_rows())["eval_loss"]
    assert token != pytest.approx(theirs["eval_loss"], **APPROX64)


def _hand_token_mean(model, data) -> float:
    """The exact next-token cross-entropy over every labelled token of ``data``, row by row (no padding), float64."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    model.eval()
    with torch.no_grad():
        for row in data:
            ids = torch.tensor(row["input_ids"])[None]
            logits = model(input_ids=ids).logits[0, :-1]
            total += nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
            count += ids.shape[1] - 1
    return float(total / count)


def _hand_batch_mean(model, data, batch_size: int) -> float:
    """transformers' number by hand: each batch's token mean, weighted by the batch's rows."""
    rows = list(data)
    means = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        means += [_hand_token_mean(model, chunk)] * len(chunk)
    return float(np.mean(means))


def test_token_reduction_is_the_exact_token_mean_and_batch_the_weighted_batch_means(tmp_path, one_thread):
    data = padded_rows()
    args = TrainingArguments(output_dir=str(tmp_path), **BASE, eval_loss_reduction="token")
    trainer = Trainer(model=tiny_gpt2(), args=args, data_collator=pad_collate)
    token = trainer.evaluate(data)["eval_loss"]
    assert token == pytest.approx(_hand_token_mean(tiny_gpt2(), data), **APPROX64)
    assert trainer.predict(data).metrics["test_loss"] == pytest.approx(token, **APPROX64)
    trainer.args.eval_loss_reduction = "batch"  # the default
    batch = trainer.evaluate(data)["eval_loss"]
    assert batch == pytest.approx(_hand_batch_mean(tiny_gpt2(), data, BASE["per_device_eval_batch_size"]), **APPROX64)
    assert batch != pytest.approx(token, **APPROX64)  # the two reductions differ on this set


def test_eval_loss_reduction_is_validated_and_left_out_of_to_dict_at_its_default():
    with pytest.raises(ValueError, match=r"eval_loss_reduction='tokens' is not one of \['batch', 'token'\]"):
        TrainingArguments("out", eval_loss_reduction="tokens")
    assert "eval_loss_reduction" not in TrainingArguments("out").to_dict()
    assert TrainingArguments("out", eval_loss_reduction="token").to_dict()["eval_loss_reduction"] == "token"


# ----------------------------------------------------------------------------------------------------------
# (2) Models returning tuples


@pytest.mark.parametrize("double_output", [False, True], ids=["loss-y", "loss-y-2y"])
def test_tuple_model_evaluate_and_predict_match_transformers(tmp_path, double_output):
    trainers = both(tmp_path, lambda: TupleRegression(double_output), compute_metrics=regression_metrics)
    ours, theirs = assert_same_evaluate_and_predict(trainers, RegressionRows(EVAL_ROWS, seed=1))
    assert {"eval_loss", "eval_accuracy", "eval_mae"} <= set(ours)
    # Without labels: no loss, the whole tuple is the predictions (a 1-tuple collapses to its array).
    unlabelled = RegressionRows(EVAL_ROWS, seed=1, labelled=False)
    hf_pred, ft_pred = trainers["hf"].predict(unlabelled), trainers["ft"].predict(unlabelled)
    assert_same_arrays(ft_pred.predictions, hf_pred.predictions)
    assert ft_pred.label_ids is None and "test_loss" not in ft_pred.metrics
    assert_same_metrics(ft_pred.metrics, hf_pred.metrics)


def test_tuple_causal_lm_evaluate_and_predict_match_transformers(tmp_path, one_thread):
    """``return_dict=False``: ftrain computes the loss from the logits of a forward without labels, then puts it in
    front of the tuple, so ``outputs[1:]`` are the logits as in transformers."""
    trainers = both(tmp_path, tuple_gpt2, compute_metrics=token_metrics, data_collator=pad_collate)
    assert_same_evaluate_and_predict(trainers, padded_rows())


@pytest.mark.parametrize("nan_inf_filter", [True, False], ids=["filtered", "kept"])
def test_a_nan_batch_loss_is_left_out_of_eval_loss_as_transformers(tmp_path, nan_inf_filter):
    """``logging_nan_inf_filter`` (default on) leaves non-finite batch losses out of ``eval_loss``, as transformers."""
    data = RegressionRows(EVAL_ROWS, seed=1)
    data.x[5] = np.nan  # the second batch's loss is NaN
    trainers = both(tmp_path, TupleRegression, args=dict(logging_nan_inf_filter=nan_inf_filter))
    ours, theirs = trainers["ft"].evaluate(data)["eval_loss"], trainers["hf"].evaluate(data)["eval_loss"]
    if nan_inf_filter:
        assert ours == pytest.approx(theirs, **APPROX64) and np.isfinite(ours)
    else:
        assert np.isnan(ours) and np.isnan(theirs)


def test_compute_loss_and_prediction_step_of_a_tuple_model_match_transformers(tmp_path):
    trainers = both(tmp_path, lambda: TupleRegression(double_output=True))
    data = RegressionRows(4, seed=5)
    batch = {"input_x": torch.tensor(data.x), "labels": torch.tensor(data.y)}
    results = {}
    for name, trainer in trainers.items():
        loss, outputs = trainer.compute_loss(trainer.model, dict(batch), return_outputs=True)
        results[name] = (loss, outputs, trainer.prediction_step(trainer.model, dict(batch), False))
    (hf_loss, hf_out, hf_step), (ft_loss, ft_out, ft_step) = results["hf"], results["ft"]
    torch.testing.assert_close(ft_loss, hf_loss, **FLOAT64)
    assert isinstance(ft_out, tuple) and len(ft_out) == len(hf_out) == 3
    for ours, theirs in [*zip(ft_out, hf_out), *zip(ft_step[1], hf_step[1]), (ft_step[0], hf_step[0])]:
        torch.testing.assert_close(ours, theirs, **FLOAT64)
    torch.testing.assert_close(ft_step[2], hf_step[2], rtol=0, atol=0)  # the labels, as given


class CountingLoss(nn.Module):
    """A CLIP-like model: ``forward(..., return_loss=True)`` computes a loss without labels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

    def forward(self, input_x, return_loss=True):
        y = input_x * self.a
        return (y.pow(2).mean(), y) if return_loss else (y,)


class LogitsOnly(nn.Module):
    """A model returning a bare tensor."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

    def forward(self, input_x):
        return input_x * self.a


@pytest.mark.parametrize("model_fn", [CountingLoss, LogitsOnly], ids=["return_loss", "bare-logits"])
def test_models_without_label_names_predict_like_transformers(tmp_path, model_fn):
    """No label names: a loss when ``forward`` defaults ``return_loss=True`` (label_ids is then transformers' empty
    tuple), else predictions only."""
    trainers = both(tmp_path, model_fn)
    unlabelled = RegressionRows(EVAL_ROWS, seed=1, labelled=False)
    ours, theirs = trainers["ft"].predict(unlabelled), trainers["hf"].predict(unlabelled)
    assert_same_arrays(ours.predictions, theirs.predictions)
    assert ours.label_ids == theirs.label_ids
    assert_same_metrics(ours.metrics, theirs.metrics)
    assert ("test_loss" in ours.metrics) == (model_fn is CountingLoss)


def test_a_loss_that_is_not_one_element_is_refused_with_the_fix(tmp_path):
    class PerExample(TupleRegression):
        def forward(self, input_x, labels=None):
            y = input_x * self.a + self.b
            return ((y - labels) ** 2, y)

    args = TrainingArguments(output_dir=str(tmp_path), **BASE, max_steps=1)
    trainer = Trainer(model=PerExample(), args=args, train_dataset=RegressionRows(8, seed=0))
    with pytest.raises(ValueError, match=r"must be a one-element tensor, got a tensor of shape \(4,\).*\.mean\(\)"):
        trainer.train()


def test_tuple_model_trains_like_transformers(tmp_path):
    """A few AdamW steps of the float64 tuple model, 2 microbatches per step: the loss is ``outputs[0]`` and, as the
    model takes no loss kwargs, each step's loss is the mean of its microbatch means on both sides."""
    train = RegressionRows(16, seed=0)
    trainers = both(
        tmp_path,
        TupleRegression,
        train_dataset=train,
        args=dict(max_steps=4, learning_rate=0.1, logging_steps=1, gradient_accumulation_steps=2,
                  optim="adamw_torch", train_sampling_strategy="sequential"),
    )  # fmt: skip
    for trainer in trainers.values():
        trainer.train()
    assert [e["step"] for e in logged_steps(trainers["ft"])] == [1, 2, 3, 4]
    # the loss to transformers' float32 accumulator of 2 microbatches; the rest to FLOAT64, far below a real
    # difference (lr 0.1 moves a and b by ~0.1 per step)
    assert_same_training(trainers["hf"], trainers["ft"], accumulated=2)


# ----------------------------------------------------------------------------------------------------------
# (3) The evaluation options


OPTIONS = {
    "batch_eval_metrics": (dict(batch_eval_metrics=True, include_for_metrics=["inputs", "loss"]), BatchTokenMetrics),
    "include_for_metrics": (dict(include_for_metrics=["inputs", "loss"]), token_metrics_with_inputs_and_losses),
    "no_concat": (dict(eval_do_concat_batches=False), token_metrics),
    "accumulation": (dict(eval_accumulation_steps=2), token_metrics),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_evaluation_options_match_transformers(tmp_path, one_thread, option):
    args, metrics = OPTIONS[option]
    trainers = both(tmp_path, tiny_gpt2, compute_metrics=metrics, data_collator=pad_collate, args=args)
    ours, _ = assert_same_evaluate_and_predict(trainers, padded_rows())
    assert "eval_loss" in ours and "eval_accuracy" in ours
    if option == "no_concat":  # lists of per-batch arrays, of the batches' own widths
        predictions = trainers["ft"].predict(padded_rows()).predictions
        assert [p.shape[0] for p in predictions] == [4, 4, 2] and ours["eval_batches"] == 3


@pytest.mark.parametrize("accumulation_steps", [None, 2])
def test_outputs_move_to_the_cpu_when_transformers_moves_them(tmp_path, monkeypatch, accumulation_steps):
    """Each batch's outputs (losses, predictions, labels) stay on the device until ``eval_accumulation_steps``
    batches are done, or the end with ``None``, as transformers' ``EvalLoopContainer``: the loop does not wait for
    the device after each batch. Recorded as the prediction steps done when a non-empty container moves."""
    from transformers.trainer_pt_utils import EvalLoopContainer

    import ftrain.trainer.evaluation as evaluation

    done, moved = {"hf": 0, "ft": 0}, {"hf": [], "ft": []}

    def recorder(name, original, has_tensors):
        def to_cpu_and_numpy(self):
            if has_tensors(self):
                moved[name].append(done[name])
            return original(self)

        return to_cpu_and_numpy

    monkeypatch.setattr(
        EvalLoopContainer,
        "to_cpu_and_numpy",
        recorder("hf", EvalLoopContainer.to_cpu_and_numpy, lambda c: c.tensors is not None),
    )
    monkeypatch.setattr(evaluation._Collected, "to_cpu_and_numpy",
                        recorder("ft", evaluation._Collected.to_cpu_and_numpy, lambda c: bool(c._pending)))  # fmt: skip
    trainers = both(tmp_path, tiny_gpt2, compute_metrics=token_metrics, data_collator=pad_collate,
                    args=dict(eval_accumulation_steps=accumulation_steps))  # fmt: skip
    for name, base in (("hf", transformers.TrainerCallback), ("ft", TrainerCallback)):

        class Count(base):
            def on_prediction_step(self, args, state, control, name=name, **kwargs):
                done[name] += 1

        trainers[name].add_callback(Count())
    data = padded_rows(18)  # batches of 4, 4, 4, 4 and 2
    assert_same_metrics(trainers["ft"].evaluate(data), trainers["hf"].evaluate(data))
    expected = [2, 2, 2, 4, 4, 4, 5, 5, 5] if accumulation_steps else [5, 5, 5]  # losses, predictions, labels
    assert moved["hf"] == expected  # what this test assumes of transformers
    assert moved["ft"] == moved["hf"]
