"""Trainer parity with transformers.Trainer (the independent reference) on a tiny GPT-2, step by step."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from ftrain.trainer import Trainer, TrainingArguments  # noqa: E402

ARGS = dict(
    report_to="none",
    use_cpu=True,
    train_sampling_strategy="sequential",
    max_steps=10,
    logging_steps=1,
    learning_rate=1e-3,
    warmup_steps=2,
    lr_scheduler_type="linear",
    optim="adamw_torch",
    per_device_train_batch_size=4,
    per_device_eval_batch_size=4,
    gradient_accumulation_steps=2,
    save_strategy="no",
    disable_tqdm=True,
    seed=0,
)


def tiny_gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).float()
    # GPT2LMHeadModel's class name is not in transformers' LOSS_MAPPING, so 5.24 leaves loss_type=None and counts
    # num_items_in_batch over the *unshifted* labels (while computing the shifted loss). Naming the loss type gives
    # the documented v5 semantics, count = labels[..., 1:] != -100, which ftrain implements.
    model.loss_type = "ForCausalLM"
    return model


def token_rows(n: int = 24, length: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, length), generator=g).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data, evals = token_rows(), token_rows(10, seed=2)
    out = {}
    for name, trainer_cls, args_cls in (
        ("hf", transformers.Trainer, transformers.TrainingArguments),
        ("ft", Trainer, TrainingArguments),
    ):
        args = args_cls(output_dir=str(tmp_path_factory.mktemp(name)), **ARGS)
        trainer = trainer_cls(model=tiny_gpt2(), args=args, train_dataset=data, eval_dataset=evals)
        trainer.train()
        out[name] = (trainer, trainer.evaluate())
    return out


def _steps(trainer):
    return [e for e in trainer.state.log_history if "loss" in e]


def test_logged_loss_lr_grad_norm_match_transformers_every_step(runs):
    hf, ft = _steps(runs["hf"][0]), _steps(runs["ft"][0])
    assert [e["step"] for e in ft] == list(range(1, 11)) == [e["step"] for e in hf]
    for a, b in zip(hf, ft):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["learning_rate"] == pytest.approx(a["learning_rate"], rel=1e-6, abs=1e-12)
        assert b["epoch"] == pytest.approx(a["epoch"])
    assert ft[0]["learning_rate"] == 0.0  # warmup: the first update has lr 0, as transformers


def test_final_params_match_transformers(runs):
    hf = dict(runs["hf"][0].model.named_parameters())
    for name, p in runs["ft"][0].model.named_parameters():
        torch.testing.assert_close(p.detach(), hf[name].detach(), rtol=1e-5, atol=2e-6)


def test_eval_loss_and_train_metrics_match_transformers(runs):
    (hf, hf_eval), (ft, ft_eval) = runs["hf"], runs["ft"]
    assert ft_eval["eval_loss"] == pytest.approx(hf_eval["eval_loss"], rel=1e-5)
    assert set(ft_eval) == set(hf_eval)
    hf_end, ft_end = hf.state.log_history[-2], ft.state.log_history[-2]  # the train() summary, before evaluate()
    assert set(ft_end) == set(hf_end)
    assert ft_end["train_loss"] == pytest.approx(hf_end["train_loss"], rel=1e-5)
    assert ft_end["total_flos"] == hf_end["total_flos"]
    assert math.isclose(ft.state.epoch, hf.state.epoch)
