"""50-step parity with transformers.Trainer on a tiny GPT-2 and a tiny BERT classifier, every logged step.

Both trainers get the same from-config model (same seed), the same local data in sequential order, dropout off, and
AdamW + linear warmup + clipping + gradient accumulation + weight decay. The claim is mathematical, so both models are
float64: ``learning_rate``, ``eval_loss`` and the final params must equal transformers' to ``FLOAT64`` after all 50
updates, and each logged ``loss`` to ``hf_loss_rtol`` (transformers accumulates it in float32, see
test_trainer_parity.py); ``compute_metrics`` outputs exactly.
"""

import numpy as np
import pytest
import torch
from tolerances import FLOAT64

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from ftrain.trainer import Trainer, TrainingArguments  # noqa: E402
from tests.trainer.test_trainer_parity import APPROX64, hf_loss_rtol, tiny_gpt2  # noqa: E402

STEPS, SEQ, BATCH, ACCUM = 50, 16, 2, 4
ARGS = dict(
    report_to="none",
    use_cpu=True,
    train_sampling_strategy="sequential",
    max_steps=STEPS,
    logging_steps=1,
    learning_rate=5e-4,
    warmup_steps=5,
    lr_scheduler_type="linear",
    optim="adamw_torch",
    weight_decay=0.01,
    max_grad_norm=1.0,
    per_device_train_batch_size=BATCH,
    per_device_eval_batch_size=BATCH,
    gradient_accumulation_steps=ACCUM,
    save_strategy="no",
    disable_tqdm=True,
    seed=0,
)


# tiny_gpt2 (float64, dropout off, loss_type named) is shared with the short parity test.


def tiny_bert() -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0, attention_probs_dropout_prob=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).double()  # its CrossEntropyLoss keeps float64
    # BERT's forward takes **kwargs, so transformers 5.24 passes it num_items_in_batch and then skips dividing the loss
    # by gradient_accumulation_steps (trainer.py:2111-2118), but the classifier's CrossEntropyLoss ignores the count:
    # its logged loss and its gradients come out 4x (here: 4.405 against ftrain's 1.101 at step 1). The documented
    # opt-out gives the mean over the accumulated batch that ftrain computes.
    model.accepts_loss_kwargs = False
    return model


def lm_rows(n: int, seed: int):
    ids = torch.randint(0, 64, (n, SEQ), generator=torch.Generator().manual_seed(seed)).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def cls_rows(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, SEQ), generator=g)
    labels = (ids[:, 0] % 3).tolist()  # learnable: the class is a function of the first token
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels})


def accuracy(pred) -> dict[str, float]:
    return {"accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}


# 50 updates x 4 microbatches x 2 rows = 400 rows: 1.25 epochs of 320 rows, so the epoch boundary falls mid-run.
CASES = {
    "gpt2": dict(model=tiny_gpt2, train=lambda: lm_rows(320, 1), eval=lambda: lm_rows(10, 2), metrics=None),
    "bert": dict(model=tiny_bert, train=lambda: cls_rows(320, 1), eval=lambda: cls_rows(10, 2), metrics=accuracy),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """One torch thread for this module (see tests/trainer/conftest.py)."""


@pytest.fixture(scope="module", params=sorted(CASES))
def runs(request, tmp_path_factory):
    case = CASES[request.param]
    data, evals = case["train"](), case["eval"]()
    out = {}
    for name, trainer_cls, args_cls in (
        ("hf", transformers.Trainer, transformers.TrainingArguments),
        ("ft", Trainer, TrainingArguments),
    ):
        args = args_cls(output_dir=str(tmp_path_factory.mktemp(f"{request.param}-{name}")), **ARGS)
        trainer = trainer_cls(
            model=case["model"](), args=args, train_dataset=data, eval_dataset=evals, compute_metrics=case["metrics"]
        )
        trainer.train()
        out[name] = (trainer, trainer.evaluate())
    return request.param, out


def _steps(trainer):
    return [e for e in trainer.state.log_history if "loss" in e]


def test_logged_loss_and_learning_rate_match_transformers_every_step(runs):
    _, out = runs
    hf, ft = _steps(out["hf"][0]), _steps(out["ft"][0])
    assert [e["step"] for e in ft] == list(range(1, STEPS + 1)) == [e["step"] for e in hf]
    for a, b in zip(hf, ft):
        assert b["loss"] == pytest.approx(a["loss"], rel=hf_loss_rtol(ACCUM)), a["step"]  # ACCUM microbatches a step
        assert b["learning_rate"] == pytest.approx(a["learning_rate"], **APPROX64), a["step"]  # float64 schedule
        assert b["epoch"] == pytest.approx(a["epoch"], **APPROX64), a["step"]  # a ratio of step counts
    assert ft[0]["learning_rate"] == 0.0  # warmup: the first update has lr 0
    assert ft[-1]["loss"] < ft[0]["loss"]  # it trained: a parity of two frozen runs would prove nothing


def test_eval_loss_and_metrics_match_transformers(runs):
    case, out = runs
    (hf, hf_eval), (ft, ft_eval) = out["hf"], out["ft"]
    assert set(ft_eval) == set(hf_eval)
    assert ft_eval["eval_loss"] == pytest.approx(hf_eval["eval_loss"], **APPROX64)  # float64 on both sides
    if case == "bert":  # exact: an argmax of float64 logits equal to ~1e-15 flips only on a tie that close
        assert ft_eval["eval_accuracy"] == hf_eval["eval_accuracy"]
    hf_end, ft_end = hf.state.log_history[-2], ft.state.log_history[-2]  # the train() summary, before evaluate()
    assert ft_end["train_loss"] == pytest.approx(hf_end["train_loss"], rel=hf_loss_rtol(ACCUM))
    assert ft.state.global_step == hf.state.global_step == STEPS


def test_final_params_match_transformers(runs):
    # float64 after 50 AdamW updates with clipping and weight decay (measured max |diff|: gpt2 4.0e-15, bert 2.2e-16)
    _, out = runs
    hf = dict(out["hf"][0].model.named_parameters())
    for name, p in out["ft"][0].model.named_parameters():
        torch.testing.assert_close(p.detach(), hf[name].detach(), **FLOAT64)
