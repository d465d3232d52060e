"""Trainer features checked against transformers.Trainer (the reference), on a tiny GPT-2 from config:
``logging_nan_inf_filter``, ``include_num_input_tokens_seen``, ``reduce_lr_on_plateau``, ``include_for_metrics`` /
``batch_eval_metrics`` / ``eval_accumulation_steps``, and a ``transformers.TrainingArguments`` as ``args``.

The model is test_trainer_parity's float64 ``tiny_gpt2()``: ftrain == transformers is a mathematical claim, checked
to ``FLOAT64`` (``APPROX64`` for logged scalars), except the losses transformers logs through its float32 accumulator
(``hf_loss_rtol``, see test_trainer_parity.py).
"""

import math

import pytest
import torch
from tolerances import FLOAT64

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from ftrain.trainer import Trainer, TrainingArguments  # noqa: E402
from tests.trainer.test_trainer_parity import APPROX64, ARGS, hf_loss_rtol, tiny_gpt2, token_rows  # noqa: E402

BASE = {**ARGS, "gradient_accumulation_steps": 1, "max_steps": 6}
SUMMARY_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_tokens_per_second")
TIMING = ("_runtime", "_per_second")


def _run_both(tmp_path, args: dict, train_dataset, eval_dataset=None, evaluate: bool = False, **kwargs):
    """Trains (and optionally evaluates) the same tiny GPT-2 with transformers' and ftrain's Trainer."""
    out = {}
    for name, trainer_cls, args_cls in (
        ("hf", transformers.Trainer, transformers.TrainingArguments),
        ("ft", Trainer, TrainingArguments),
    ):
        targs = args_cls(output_dir=str(tmp_path / name), **args)
        trainer = trainer_cls(
            model=tiny_gpt2(), args=targs, train_dataset=train_dataset, eval_dataset=eval_dataset, **kwargs
        )
        trainer.train()
        metrics = trainer.evaluate() if evaluate else None
        out[name] = (trainer, metrics)
    return out


def _numbers(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if not k.endswith(TIMING)}


def _assert_same_history(hf, ft, loss_rtol: float):
    """Every logged number equal: float64 values to ``APPROX64``; ``loss``/``train_loss`` (transformers' float32
    accumulator) to ``loss_rtol`` = ``hf_loss_rtol(microbatches per logging window)``; anything else exactly."""
    assert len(ft.state.log_history) == len(hf.state.log_history)
    for a, b in zip(hf.state.log_history, ft.state.log_history):
        assert set(b) == set(a)
        a, b = _numbers(a), _numbers(b)
        for k in a:
            if k in ("loss", "train_loss"):
                assert b[k] == pytest.approx(a[k], rel=loss_rtol), k
            elif isinstance(a[k], float):
                assert b[k] == pytest.approx(a[k], **APPROX64), k
            else:
                assert b[k] == a[k], k


# ---- 1. logging_nan_inf_filter --------------------------------------------------------------------------------------


def _marked_rows(n: int = 24, length: int = 16):
    """Token rows whose first token is the row index, so a loss function can recognise a batch."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (n, length), generator=g)
    ids[:, 0] = torch.arange(n)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def _nan_on_row(row: int):
    """Shifted causal cross-entropy over ``num_items_in_batch``, plus a constant NaN on the batch starting with
    ``row``: the logged loss is NaN while the gradients (and so the update) stay finite."""

    def loss_func(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1]  # in the model's dtype (float64): no upcast that would round it to float32
        target = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
        )
        loss = loss / num_items_in_batch
        nan = torch.where(labels[0, 0] == row, torch.tensor(float("nan")), torch.tensor(0.0))
        return loss + nan.detach()

    return loss_func


@pytest.mark.parametrize("nan_filter", [True, False])
def test_logging_nan_inf_filter_matches_transformers(tmp_path, nan_filter):
    args = {**BASE, "logging_steps": 2, "logging_nan_inf_filter": nan_filter}
    # bs 4, sequential: the 4th update's batch starts with row 12 (2nd step of the 2nd logging window).
    runs = _run_both(tmp_path, args, _marked_rows(), compute_loss_func=_nan_on_row(12))
    hf, ft = runs["hf"][0], runs["ft"][0]
    steps_hf = [e for e in hf.state.log_history if "loss" in e]
    steps_ft = [e for e in ft.state.log_history if "loss" in e]
    assert [e["step"] for e in steps_ft] == [2, 4, 6] == [e["step"] for e in steps_hf]
    for a, b in zip(steps_hf, steps_ft):  # float64 on both sides
        assert b["learning_rate"] == pytest.approx(a["learning_rate"], **APPROX64)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], **APPROX64)
    losses_hf, losses_ft = [e["loss"] for e in steps_hf], [e["loss"] for e in steps_ft]
    # transformers' float32 accumulator (hf_loss_rtol): 2 additions per window (1 microbatch x 2 steps); in the
    # filtered window the NaN's addition adds the running sum / 2 instead, one float32 division more: 3 roundings.
    loss_rtol = hf_loss_rtol(3)
    if nan_filter:
        assert losses_ft == pytest.approx(losses_hf, rel=loss_rtol)
        assert all(math.isfinite(x) for x in losses_ft)
    else:
        # The NaN window logs NaN in both. transformers then resets its accumulator with `tr_loss -= tr_loss`, which
        # keeps it NaN for the rest of the run; ftrain resets it to 0, so later windows log their real loss.
        assert losses_ft[0] == pytest.approx(losses_hf[0], rel=loss_rtol)
        assert math.isnan(losses_ft[1]) and math.isnan(losses_hf[1])
        assert math.isnan(losses_hf[2]) and math.isfinite(losses_ft[2])
    end_hf, end_ft = hf.state.log_history[-1], ft.state.log_history[-1]
    if nan_filter:
        assert end_ft["train_loss"] == pytest.approx(end_hf["train_loss"], rel=loss_rtol)
    for name, p in ft.model.named_parameters():  # the update itself ran on finite gradients in both: float64 params
        torch.testing.assert_close(p.detach(), dict(hf.model.named_parameters())[name].detach(), **FLOAT64)


# ---- 2. include_num_input_tokens_seen -------------------------------------------------------------------------------


def _padded_rows(n: int = 24, length: int = 16):
    """Fixed-length rows with right padding (attention_mask 0, labels -100) of varying length."""
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 64, (n, length), generator=g)
    lengths = torch.randint(4, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()}
    )


@pytest.mark.parametrize("mode", ["all", "non_padding", True])
def test_num_input_tokens_seen_matches_transformers(tmp_path, mode):
    args = {**BASE, "logging_steps": 2, "include_num_input_tokens_seen": mode, "eval_strategy": "steps",
            "eval_steps": 3, "gradient_accumulation_steps": 2}  # fmt: skip
    runs = _run_both(tmp_path, args, _padded_rows(), _padded_rows(8))
    hf, ft = runs["hf"][0], runs["ft"][0]
    assert ft.state.num_input_tokens_seen == hf.state.num_input_tokens_seen > 0
    seen_hf = [(e["step"], e.get("num_input_tokens_seen")) for e in hf.state.log_history]
    seen_ft = [(e["step"], e.get("num_input_tokens_seen")) for e in ft.state.log_history]
    assert seen_ft == seen_hf
    assert all(n is not None for _, n in seen_ft)
    for a, b in zip(hf.state.log_history, ft.state.log_history):
        assert set(b) == set(a)
    assert any("train_tokens_per_second" in e for e in ft.state.log_history)
    if mode == "non_padding":
        assert ft.state.num_input_tokens_seen < 6 * 2 * 4 * 16


def test_num_input_tokens_seen_off_by_default(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), **{**BASE, "max_steps": 2})
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=token_rows())
    trainer.train()
    assert trainer.state.num_input_tokens_seen == 0
    assert not any("num_input_tokens_seen" in e for e in trainer.state.log_history)


# ---- 3. reduce_lr_on_plateau ----------------------------------------------------------------------------------------


def _constant_metric(eval_pred):
    return {"score": 1.0}


def test_reduce_lr_on_plateau_lr_sequence_matches_transformers(tmp_path):
    args = {**BASE, "max_steps": 8, "lr_scheduler_type": "reduce_lr_on_plateau", "warmup_steps": 0,
            "lr_scheduler_kwargs": {"patience": 1, "factor": 0.5}, "eval_strategy": "steps", "eval_steps": 1,
            "metric_for_best_model": "score"}  # fmt: skip
    runs = _run_both(tmp_path, args, token_rows(), token_rows(4, seed=2), compute_metrics=_constant_metric)
    hf, ft = runs["hf"][0], runs["ft"][0]
    lr_hf = [e["learning_rate"] for e in hf.state.log_history if "loss" in e]
    lr_ft = [e["learning_rate"] for e in ft.state.log_history if "loss" in e]
    assert lr_ft == pytest.approx(lr_hf, **APPROX64)  # the lr and its cuts by 0.5, in float64 on both sides
    assert lr_hf[0] == 1e-3 and lr_hf[-1] < lr_hf[0]  # the metric stopped improving, so the lr was cut
    assert ft.get_learning_rates()[0] == pytest.approx(hf.optimizer.param_groups[0]["lr"], **APPROX64)  # after eval 8
    _assert_same_history(hf, ft, loss_rtol=hf_loss_rtol(1))  # 1 microbatch per logged step


# ---- 4. include_for_metrics, batch_eval_metrics, eval_accumulation_steps ------------------------------------------


def _evaluate_both(tmp_path, args: dict, compute_metrics, eval_dataset):
    out = {}
    for name, trainer_cls, args_cls in (
        ("hf", transformers.Trainer, transformers.TrainingArguments),
        ("ft", Trainer, TrainingArguments),
    ):
        calls = []
        targs = args_cls(output_dir=str(tmp_path / name), **{**BASE, **args})
        trainer = trainer_cls(model=tiny_gpt2(), args=targs, eval_dataset=eval_dataset,
                              compute_metrics=compute_metrics(calls))  # fmt: skip
        metrics = trainer.evaluate()
        metrics.pop("eval_model_preparation_time", None)  # transformers' evaluate-before-train timing, out of scope
        out[name] = (metrics, calls)
    return out


def _recording_metrics(calls):
    def compute_metrics(p):
        calls.append(p)
        return {"accuracy": float((p.predictions[:, :-1].argmax(-1) == p.label_ids[:, 1:]).mean())}

    return compute_metrics


@pytest.mark.parametrize("accumulation", [None, 2])
def test_include_for_metrics_inputs_and_losses_match_transformers(tmp_path, accumulation):
    args = {"include_for_metrics": ["inputs", "loss"], "eval_accumulation_steps": accumulation}
    runs = _evaluate_both(tmp_path, args, _recording_metrics, token_rows(10, seed=2))  # batches of 4, 4, 2
    (hf_metrics, [hf]), (ft_metrics, [ft]) = runs["hf"], runs["ft"]
    assert len(tuple(ft)) == len(tuple(hf)) == 4
    np = pytest.importorskip("numpy")
    np.testing.assert_array_equal(ft.inputs, hf.inputs)
    np.testing.assert_array_equal(ft.label_ids, hf.label_ids)
    assert ft.losses.shape == hf.losses.shape == (10,)
    # the same float64 forward and per-batch mean losses on both sides (and float64 arrays: ftrain keeps the dtype)
    assert ft.predictions.dtype == hf.predictions.dtype == np.float64
    np.testing.assert_allclose(ft.losses, hf.losses, **FLOAT64)
    np.testing.assert_allclose(ft.predictions, hf.predictions, **FLOAT64)
    assert set(ft_metrics) == set(hf_metrics)
    # exact: an argmax of float64 logits equal to ~1e-15 flips only on a tie that close
    assert ft_metrics["eval_accuracy"] == hf_metrics["eval_accuracy"]
    assert ft_metrics["eval_loss"] == pytest.approx(hf_metrics["eval_loss"], **APPROX64)


def _batch_metrics(calls):
    totals = {"right": 0, "count": 0}

    def compute_metrics(p, compute_result):
        calls.append((p, compute_result))
        right = (p.predictions[:, :-1].argmax(-1) == p.label_ids[:, 1:]).sum()
        totals["right"] += int(right)
        totals["count"] += p.label_ids[:, 1:].numel()
        if compute_result:
            result = {"accuracy": totals["right"] / totals["count"], "batches": len(calls)}
            totals.update(right=0, count=0)
            return result
        return {}

    return compute_metrics


def test_batch_eval_metrics_matches_transformers(tmp_path):
    args = {"batch_eval_metrics": True, "include_for_metrics": ["inputs", "loss"]}
    runs = _evaluate_both(tmp_path, args, _batch_metrics, token_rows(10, seed=2))
    (hf_metrics, hf_calls), (ft_metrics, ft_calls) = runs["hf"], runs["ft"]
    assert [flag for _, flag in ft_calls] == [flag for _, flag in hf_calls] == [False, False, True]
    for (a, _), (b, _) in zip(hf_calls, ft_calls):
        assert torch.is_tensor(b.predictions) and torch.is_tensor(b.label_ids)
        assert torch.equal(b.label_ids, a.label_ids)  # integer labels: exact
        torch.testing.assert_close(b.predictions, a.predictions, **FLOAT64)  # the same float64 forward
        assert set(b.inputs) == set(a.inputs)  # the whole batch dict, as transformers
        torch.testing.assert_close(b.losses, a.losses, **FLOAT64)  # float64 per-batch mean losses
    assert set(ft_metrics) == set(hf_metrics)
    assert ft_metrics["eval_accuracy"] == hf_metrics["eval_accuracy"]  # argmax counts of float64 logits: exact
    assert ft_metrics["eval_batches"] == 3
    assert ft_metrics["eval_loss"] == pytest.approx(hf_metrics["eval_loss"], **APPROX64)


def test_batch_eval_metrics_needs_compute_result(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), **{**BASE, "batch_eval_metrics": True})
    with pytest.raises(ValueError, match="compute_result"):
        Trainer(model=tiny_gpt2(), args=args, compute_metrics=lambda p: {})


# ---- 5. a transformers.TrainingArguments as args ------------------------------------------------------------------


def test_transformers_training_arguments_train_identically(tmp_path):
    args = {**BASE, "eval_strategy": "steps", "eval_steps": 3, "include_num_input_tokens_seen": True}
    histories, params = {}, {}
    for name, args_cls in (("hf_args", transformers.TrainingArguments), ("ft_args", TrainingArguments)):
        targs = args_cls(output_dir=str(tmp_path / name), **args)
        trainer = Trainer(model=tiny_gpt2(), args=targs, train_dataset=token_rows(), eval_dataset=token_rows(8))
        assert isinstance(trainer.args, TrainingArguments)
        trainer.train()
        histories[name] = [_numbers(e) for e in trainer.state.log_history]
        params[name] = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    # Bitwise: the same Trainer, kernels and order; only the class of the arguments it was given differs.
    assert histories["hf_args"] == histories["ft_args"]
    for k, v in params["ft_args"].items():
        assert torch.equal(params["hf_args"][k], v), k


def test_transformers_training_arguments_conversion_errors(tmp_path):
    from dataclasses import dataclass, field

    @dataclass
    class ExtendedArgs(transformers.TrainingArguments):
        packing_ratio: float = field(default=1.0)

    ok = ExtendedArgs(output_dir=str(tmp_path), **BASE)
    assert Trainer(model=tiny_gpt2(), args=ok).args.max_steps == BASE["max_steps"]
    custom = ExtendedArgs(output_dir=str(tmp_path), packing_ratio=0.5, **BASE)
    with pytest.raises(ValueError, match="packing_ratio"):
        Trainer(model=tiny_gpt2(), args=custom)
    with pytest.raises(TypeError, match="TrainingArguments"):
        Trainer(model=tiny_gpt2(), args={"output_dir": str(tmp_path)})
