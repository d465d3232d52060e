"""Trainer parity with transformers.Trainer (the independent reference) on a tiny GPT-2, step by step.

Both trainers compute the same mathematics, so the claim is checked in float64 (``tiny_gpt2()`` is float64, token
ids stay int64) with the tolerances of tests/tolerances.py: ``FLOAT64`` (about 1.1e-10 relative) wherever both
sides compute in float64, and :func:`hf_loss_rtol` for a loss *transformers* logs, which it accumulates in float32.
In float32 the final params after Adam steps could only be bounded by ``adam_drift`` (issue 12).
"""

import math

import pytest
import torch
from tolerances import FLOAT64

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from ftrain.trainer import Trainer, TrainingArguments  # noqa: E402
from tests.trainer.side_by_side import APPROX64, hf_loss_rtol  # noqa: E402  (re-exported to the other parity tests)

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


def causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **kw):
    """transformers' ``ForCausalLMLoss`` (transformers/loss/loss_utils.py) without its first line, ``logits =
    logits.float()``: that upcast, meant for half precision, rounds a float64 model's logits to float32, and its
    loss and gradients then differ from ftrain's float64 ones by float32 rounding (2.6e-9 in the final params here
    instead of 6e-15). ftrain upcasts only float16/bfloat16. In float32 the two are the same function (checked in
    ``test_float64_causal_lm_loss_is_transformers_loss``)."""
    from transformers.loss.loss_utils import fixed_cross_entropy

    if shift_labels is None:
        labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:].contiguous()
    logits = logits.view(-1, vocab_size)
    return fixed_cross_entropy(logits, shift_labels.view(-1).to(logits.device), num_items_in_batch, ignore_index, **kw)


def tiny_gpt2(dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """The tiny GPT-2 of the Trainer tests, float64 unless a test is about float32 (bf16 autocast, fp16)."""
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).to(dtype)
    # GPT2LMHeadModel's class name is not in transformers' LOSS_MAPPING, so 5.24 leaves loss_type=None and counts
    # num_items_in_batch over the *unshifted* labels (while computing the shifted loss). Naming the loss type gives
    # the documented v5 semantics, count = labels[..., 1:] != -100, which ftrain implements.
    model.loss_type = "ForCausalLM"
    if dtype == torch.float64:
        model.loss_function = causal_lm_loss  # transformers' causal loss in the model's dtype (see causal_lm_loss)
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


def test_float64_causal_lm_loss_is_transformers_loss():
    """causal_lm_loss differs from transformers' ForCausalLMLoss only in not rounding float64 logits to float32: in
    float32 the two run the same kernels in the same order, so they agree bit for bit (with and without a count)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(3, 5, 64, generator=g), torch.randint(0, 64, (3, 5), generator=g)
    labels[0, :2] = -100
    for count in (None, torch.tensor(9)):
        ours = causal_lm_loss(logits, labels, 64, num_items_in_batch=count)
        assert torch.equal(ours, ForCausalLMLoss(logits, labels, 64, num_items_in_batch=count))
    assert causal_lm_loss(logits.double(), labels, 64).dtype == torch.float64


def test_logged_loss_lr_grad_norm_match_transformers_every_step(runs):
    hf, ft = _steps(runs["hf"][0]), _steps(runs["ft"][0])
    assert [e["step"] for e in ft] == list(range(1, 11)) == [e["step"] for e in hf]
    for a, b in zip(hf, ft):
        # transformers' float32 loss accumulator: 2 microbatches per logged step (measured <= 5.4e-8 relative)
        assert b["loss"] == pytest.approx(a["loss"], rel=hf_loss_rtol(2))
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], **APPROX64)  # float64 on both sides (<= 2.3e-16)
        assert b["learning_rate"] == pytest.approx(a["learning_rate"], **APPROX64)  # the schedule, in float64
        assert b["epoch"] == pytest.approx(a["epoch"], **APPROX64)  # a ratio of step counts
    assert ft[0]["learning_rate"] == 0.0  # warmup: the first update has lr 0, as transformers


def test_final_params_match_transformers(runs):
    # Float64 after 10 AdamW steps: measured max |diff| 6.3e-15 (FLOAT64 allows 1.1e-10 + 1.1e-10·|p|). A real
    # difference fails it by orders of magnitude: learning_rate 1.001e-3 gives 5e-6, one step fewer 5e-4.
    hf = dict(runs["hf"][0].model.named_parameters())
    for name, p in runs["ft"][0].model.named_parameters():
        assert p.dtype == torch.float64
        torch.testing.assert_close(p.detach(), hf[name].detach(), **FLOAT64)


def test_eval_loss_and_train_metrics_match_transformers(runs):
    (hf, hf_eval), (ft, ft_eval) = runs["hf"], runs["ft"]
    assert ft_eval["eval_loss"] == pytest.approx(hf_eval["eval_loss"], **APPROX64)  # float64 both (8.9e-16 measured)
    assert set(ft_eval) == set(hf_eval)
    hf_end, ft_end = hf.state.log_history[-2], ft.state.log_history[-2]  # the train() summary, before evaluate()
    assert set(ft_end) == set(hf_end)
    assert ft_end["train_loss"] == pytest.approx(hf_end["train_loss"], rel=hf_loss_rtol(2))  # mean of logged windows
    assert ft_end["total_flos"] == hf_end["total_flos"]  # integer-valued counts: exact
    assert math.isclose(ft.state.epoch, hf.state.epoch, rel_tol=FLOAT64["rtol"])  # a ratio of step counts
