"""Column removal and label discovery against transformers' own Trainer methods, on tiny models built from configs."""

import inspect
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from ftrain.data import BatchStream, find_labels, make_column_filter, remove_unused_columns, signature_columns

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def models():
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16, n_positions=16)
    )
    bert_cfg = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, vocab_size=16)
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(**bert_cfg, num_labels=3))
    qa = transformers.BertForQuestionAnswering(transformers.BertConfig(**bert_cfg))
    return {"gpt2": gpt2, "bert": bert, "qa": qa}


def hf_trainer_view(model, label_names=None):
    """The attributes transformers' Trainer column methods read, on a stand-in (no accelerate needed)."""
    from transformers.trainer import Trainer
    from transformers.utils import find_labels as hf_find_labels

    view = SimpleNamespace(model=model, _signature_columns=None, args=SimpleNamespace(remove_unused_columns=True))
    view.label_names = hf_find_labels(model.__class__) if label_names is None else label_names
    view._set_signature_columns_if_needed = lambda: Trainer._set_signature_columns_if_needed(view)
    view.remove = lambda ds: Trainer._remove_unused_columns(view, ds, "training")
    return view


@pytest.mark.parametrize("name", ["gpt2", "bert", "qa"])
def test_find_labels_and_signature_columns_equal_transformers(models, name):
    from transformers.utils import find_labels as hf_find_labels

    model = models[name]
    assert find_labels(model) == find_labels(type(model)) == hf_find_labels(type(model))
    view = hf_trainer_view(model)
    view._set_signature_columns_if_needed()
    ours, theirs = signature_columns(model), view._signature_columns
    forward = list(inspect.signature(model.forward).parameters)
    assert ours[: len(forward)] == theirs[: len(forward)] == forward  # forward's parameters, in order
    assert set(ours) == set(theirs)  # then label, label_ids and the label names (HF appends them from a set())
    expected_labels = {"gpt2": ["labels"], "bert": ["labels"], "qa": ["start_positions", "end_positions"]}[name]
    assert find_labels(model) == expected_labels
    custom = signature_columns(model, label_names=["target"])
    view = hf_trainer_view(model, label_names=["target"])
    view._set_signature_columns_if_needed()
    assert set(custom) == set(view._signature_columns) and "target" in custom


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_remove_unused_columns_equals_transformers(models, name):
    model = models[name]
    ds = datasets.Dataset.from_dict(
        {
            "input_ids": [[1, 2]] * 4,
            "attention_mask": [[1, 1]] * 4,
            "label": [0, 1, 2, 0],
            "text": ["x"] * 4,
            "idx": [0] * 4,
        }
    )
    theirs = hf_trainer_view(model).remove(ds)
    ours = remove_unused_columns(ds, signature_columns(model))
    assert ours.column_names == theirs.column_names
    assert set(ours.column_names) == {"input_ids", "attention_mask", "label"}
    # no matching column: both raise
    bad = datasets.Dataset.from_dict({"text": ["x"], "idx": [0]})
    with pytest.raises(ValueError, match="No columns in the dataset match"):
        hf_trainer_view(model).remove(bad)
    with pytest.raises(
        ValueError, match=r"No columns in the dataset match.*\[idx, text\].*remove_unused_columns=False"
    ):
        remove_unused_columns(bad, signature_columns(model), model_name=type(model).__name__)


def test_column_filter_equals_remove_columns_collator(models):
    from transformers.trainer_utils import RemoveColumnsCollator

    cols = signature_columns(models["bert"])
    feats = [
        {"input_ids": [1, 2], "label": 1, "text": "a", "idx": 3},
        {"input_ids": [3, 4], "label": 0, "text": "b", "idx": 4},
    ]
    theirs = RemoveColumnsCollator(lambda f: f, cols)(feats)
    keep = make_column_filter(cols)
    assert [keep(f) for f in feats] == theirs
    with pytest.raises(ValueError, match=r"strict columns: an example has keys \['idx', 'text'\]"):
        make_column_filter(cols, strict=True)(feats[0])


def test_stream_removes_or_rejects_unknown_columns(models):
    cols = signature_columns(models["bert"])
    rows = [{"input_ids": [i, i], "label": i % 3, "text": "t", "idx": i} for i in range(8)]
    batch = BatchStream(rows, 4, seed=0, columns=cols).batch_at(0)
    assert sorted(batch) == ["input_ids", "labels"]
    with pytest.raises(ValueError, match=r"\['idx', 'text'\] that the model's forward does not take"):
        BatchStream(rows, 4, seed=0, columns=cols, strict_columns=True)
    ds = datasets.Dataset.from_list(rows)
    assert sorted(BatchStream(ds, 4, seed=0, columns=cols).batch_at(1)) == ["input_ids", "labels"]
    with pytest.raises(ValueError, match=r"the dataset has keys \['idx', 'text'\]"):
        BatchStream(ds, 4, seed=0, columns=cols, strict_columns=True)
    with pytest.raises(ValueError, match="No columns in the dataset match"):
        BatchStream([{"text": "a"}] * 4, 2, columns=cols)


def test_importing_ftrain_data_imports_neither_transformers_nor_datasets():
    code = "import sys, ftrain.data; print(sorted(m for m in ('transformers', 'datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_stream_batches_feed_a_transformers_model(models):
    cols = signature_columns(models["bert"])
    rows = [{"input_ids": [1, 2, 3][: i % 3 + 1], "label": i % 3, "sentence": "s"} for i in range(6)]
    from ftrain.data import make_padding_collator

    stream = BatchStream(rows, 3, seed=0, columns=cols, collate_fn=make_padding_collator(pad_token_id=0))
    out = models["bert"](**stream.batch_at(0))
    assert out.logits.shape == (3, 3) and torch.isfinite(out.loss)
