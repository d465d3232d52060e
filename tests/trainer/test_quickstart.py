"""Hugging Face's documented quick start runs on ftrain with only the import changed, and lands where transformers does.

The script is transformers' ``Trainer`` quick start: ``TrainingArguments(output_dir, num_train_epochs,
per_device_train_batch_size, learning_rate, logging_dir)`` then ``Trainer(model, args, train_dataset).train()``,
here on a from-config BERT classifier and a toy dataset tokenized by a WordLevel tokenizer trained locally (no
download), with ``processing_class=tokenizer`` so the default collator pads. Two arguments are added to both runs so
that they are comparable step by step: ``logging_steps`` (to see the loss) and ``train_sampling_strategy``. The model
is float64, as "lands where transformers does" is a mathematical claim (see tests/tolerances.py).
"""

import json
import math
import re

import pytest
import torch
from tolerances import FLOAT64

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")
topics = pytest.importorskip("pydoc_data.topics")

import ftrain.trainer  # noqa: E402
from tests.trainer.test_trainer_parity import APPROX64, hf_loss_rtol  # noqa: E402

EPOCHS, BATCH, N_SENTENCES = 3, 8, 48


def toy_sentences() -> list[str]:
    """The first lines of 4..12 words from Python's own help topics, in a fixed order."""
    lines = (line.strip() for key in sorted(topics.topics) for line in topics.topics[key].splitlines())
    picked = [line for line in lines if 4 <= len(line.split()) <= 12 and line.isascii()]
    return picked[:N_SENTENCES]


def toy_tokenizer(sentences: list[str]) -> "transformers.PreTrainedTokenizerFast":
    model = tokenizers.models.WordLevel(unk_token="[UNK]")
    tok = tokenizers.Tokenizer(model)
    tok.normalizer = tokenizers.normalizers.Lowercase()
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.WordLevelTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]"])
    tok.train_from_iterator(sentences, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def toy_dataset(tokenizer) -> "datasets.Dataset":
    sentences = toy_sentences()
    # A rule the model can pick up from the tokens: does the sentence name "the"?
    labels = [int(bool(re.search(r"\bthe\b", s.lower()))) for s in sentences]
    ds = datasets.Dataset.from_dict({"text": sentences, "label": labels})
    # Rows keep their own lengths (truncated to 16): the collator pads each batch.
    return ds.map(lambda row: tokenizer(row["text"], truncation=True, max_length=16), remove_columns=["text"])


def toy_model(tokenizer) -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0, attention_probs_dropout_prob=0,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).double()  # float64: its CrossEntropyLoss keeps it


def quickstart(Trainer, TrainingArguments, output_dir, **version_args):  # noqa: N803 (the script's own names)
    """The quick start, verbatim but for the names passed in."""
    tokenizer = toy_tokenizer(toy_sentences())
    ds = toy_dataset(tokenizer)
    model = toy_model(tokenizer)
    args = TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=EPOCHS,
        per_device_train_batch_size=BATCH,
        learning_rate=1e-3,
        logging_steps=2,
        train_sampling_strategy="sequential",
        **version_args,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    return trainer, trainer.train()


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """One torch thread for this module (see tests/trainer/conftest.py)."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out_ft = tmp_path_factory.mktemp("ft")
    with pytest.warns(FutureWarning, match="logging_dir"):
        ft = quickstart(
            ftrain.trainer.Trainer, ftrain.trainer.TrainingArguments, out_ft, logging_dir=str(out_ft / "logs")
        )
    # transformers 5.x removed logging_dir (TypeError there); ftrain keeps accepting it with a FutureWarning.
    hf = quickstart(transformers.Trainer, transformers.TrainingArguments, tmp_path_factory.mktemp("hf"))
    return {"ft": ft, "hf": hf, "ft_dir": out_ft}


def _losses(trainer) -> list[float]:
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def test_quickstart_trains_and_returns_train_output(runs):
    trainer, out = runs["ft"]
    steps = EPOCHS * math.ceil(N_SENTENCES / BATCH)
    assert isinstance(out, ftrain.trainer.TrainOutput)
    assert out.global_step == steps == trainer.state.global_step
    losses = _losses(trainer)
    assert len(losses) == steps // 2
    # Sequential order: every epoch sees the same batches, so the per-epoch mean of the logged loss compares like
    # with like, and it must fall epoch after epoch.
    per_epoch = [sum(losses[i : i + len(losses) // EPOCHS]) for i in range(0, len(losses), len(losses) // EPOCHS)]
    assert per_epoch[0] > per_epoch[1] > per_epoch[2]
    assert losses[-1] < losses[0] - 0.01
    # every log covers 2 updates, so the mean of the logged losses is the training loss: float64 arithmetic on the
    # same per-step losses, summed in another grouping
    assert out.training_loss == pytest.approx(sum(losses) / len(losses), **APPROX64)
    assert {"train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "epoch"} <= set(
        out.metrics
    )
    assert out.metrics["train_loss"] == out.training_loss
    assert out.metrics["epoch"] == pytest.approx(EPOCHS, **APPROX64)  # a ratio of step counts


def test_quickstart_writes_a_checkpoint_at_the_end(runs):
    trainer, out = runs["ft"]
    ckpt = runs["ft_dir"] / f"checkpoint-{out.global_step}"
    assert [p.name for p in runs["ft_dir"].glob("checkpoint-*")] == [ckpt.name]
    names = {p.name for p in ckpt.iterdir()}
    assert {"model.safetensors", "config.json", "trainer_state.json", "training_args.json", "tokenizer.json"} <= names
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == out.global_step
    assert [e["loss"] for e in state["log_history"] if "loss" in e] == _losses(trainer)
    reloaded = transformers.BertForSequenceClassification.from_pretrained(ckpt)
    for name, p in trainer.model.named_parameters():  # a save/load round trip (float64 kept): bitwise
        torch.testing.assert_close(reloaded.state_dict()[name], p.detach(), rtol=0, atol=0)


def test_quickstart_matches_transformers(runs):
    (ft, ft_out), (hf, hf_out) = runs["ft"], runs["hf"]
    assert ft_out.global_step == hf_out.global_step
    # transformers' float32 loss accumulator (hf_loss_rtol): 2 microbatches per log, 1 per step
    assert _losses(ft)[-1] == pytest.approx(_losses(hf)[-1], rel=hf_loss_rtol(2))
    assert ft_out.training_loss == pytest.approx(hf_out.training_loss, rel=hf_loss_rtol(2))
    for name, p in ft.model.named_parameters():  # float64 after 18 AdamW updates
        torch.testing.assert_close(p.detach(), dict(hf.model.named_parameters())[name].detach(), **FLOAT64)
