"""Collators against transformers' own: DataCollatorWithPadding, ForTokenClassification, ForLanguageModeling."""

import numpy as np
import pytest
import torch

from ftrain.data import BatchStream, default_collate, make_causal_lm_collator, make_padding_collator

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer built in memory (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "[MASK]": 2, **{w: i + 3 for i, w in enumerate("a b c d e f".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]"
    )


TEXTS = ["a b c d e", "a", "b c", "f e d"]


def features(tokenizer, labels="seq"):
    out = []
    for i, text in enumerate(TEXTS):
        enc = dict(tokenizer(text))
        if labels == "seq":
            enc["labels"] = [t + 10 for t in enc["input_ids"]]
        elif labels == "label":
            enc["label"] = i % 2
        out.append(enc)
    return out


def assert_same(ours, theirs):
    """Exact: collation copies and pads values (token ids, masks, labels), it computes nothing."""
    theirs = dict(theirs)
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("multiple", [None, 4])
def test_padding_equals_data_collator_with_padding(tokenizer, side, multiple):
    tokenizer.padding_side = side
    try:
        hf = transformers.DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple)
        ours = make_padding_collator(tokenizer, pad_to_multiple_of=multiple)
        assert_same(ours(features(tokenizer, "label")), hf(features(tokenizer, "label")))
        hf_tok = transformers.DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=multiple)
        assert_same(ours(features(tokenizer, "seq")), hf_tok(features(tokenizer, "seq")))
    finally:
        tokenizer.padding_side = "right"
    width = ours(features(tokenizer, "seq"))["input_ids"].shape[1]
    assert width == (8 if multiple else 5)


def test_max_length_padding_and_too_long(tokenizer):
    hf = transformers.DataCollatorWithPadding(tokenizer, padding="max_length", max_length=7)
    ours = make_padding_collator(tokenizer, max_length=7)
    assert_same(ours(features(tokenizer, "label")), hf(features(tokenizer, "label")))
    with pytest.raises(ValueError, match=r"5 tokens, more than max_length=3; truncate"):
        make_padding_collator(tokenizer, max_length=3)(features(tokenizer, None))


def test_causal_lm_labels_equal_data_collator_for_language_modeling(tokenizer):
    hf = transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False, pad_to_multiple_of=4)
    ours = make_causal_lm_collator(tokenizer, pad_to_multiple_of=4, mask_every_pad_token=True)
    assert_same(ours(features(tokenizer, None)), hf(features(tokenizer, None)))
    # by default only padding positions are masked: a real token equal to the pad id keeps its label
    batch = make_causal_lm_collator(pad_token_id=2)([{"input_ids": [2, 3, 2]}, {"input_ids": [3]}])
    assert batch["labels"].tolist() == [[2, 3, 2], [3, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    left = make_causal_lm_collator(pad_token_id=0, padding_side="left")([{"input_ids": [5, 6]}, {"input_ids": [7]}])
    assert left["labels"].tolist() == [[5, 6], [-100, 7]]


def test_default_collate_matches_default_data_collator():
    feats = [{"x": np.array([i, i + 1.5]), "y": [i, i], "label": float(i)} for i in range(3)]
    ours = default_collate(feats)
    assert_same(ours, transformers.default_data_collator(feats))
    assert ours["labels"].dtype == torch.float32 and ours["y"].dtype == torch.int64
    ids = default_collate([{"label_ids": [1, 2]}, {"label_ids": [3, 4]}])
    assert ids["labels"].tolist() == [[1, 2], [3, 4]]


def test_transformers_collator_in_a_stream(tokenizer):
    data = features(tokenizer, "label") * 3
    hf = transformers.DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)
    stream = BatchStream(data, 4, seed=0, collate_fn=hf)
    batch = stream.batch_at(1)
    assert type(batch) is dict and batch["input_ids"].shape == (4, 8) and batch["labels"].dtype == torch.int64
    mlm = transformers.DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=0.5)
    masked = BatchStream(features(tokenizer, None) * 8, 8, seed=0, collate_fn=mlm)
    # MLM masking draws from torch's global RNG: the stream seeds it per microbatch, whatever the caller's RNG
    torch.manual_seed(1)
    first = masked.batch_at(2)["labels"]
    torch.manual_seed(2)
    # bitwise: the same draws from the same per-microbatch seed, in the same process
    assert torch.equal(first, masked.replace().batch_at(2)["labels"])
    assert (first == -100).any() and (first != -100).any()
    assert not torch.equal(first, masked.batch_at(1)["labels"])


def test_ragged_and_non_tensor_errors_name_the_key_and_the_fix():
    with pytest.raises(ValueError, match=r"'input_ids' is ragged: example 1 has shape \(1,\).*make_padding_collator"):
        default_collate([{"input_ids": [1, 2]}, {"input_ids": [3]}])
    with pytest.raises(TypeError, match=r"example 0\['text'\] is a string.*columns="):
        default_collate([{"text": "hi", "x": 1}])
    with pytest.raises(KeyError, match=r"example 1 has keys \['x'\].*missing \['y'\]"):
        default_collate([{"x": 1, "y": 2}, {"x": 1}])
    with pytest.raises(TypeError, match="example 0 is a tuple"):
        default_collate([(torch.ones(1), torch.zeros(1))])
    with pytest.raises(ValueError, match=r"'spans' is ragged.*pad_values=\{'spans'"):
        make_padding_collator(pad_token_id=0)([{"input_ids": [1], "spans": [1, 2]}, {"input_ids": [1], "spans": [1]}])
    with pytest.raises(ValueError, match="no pad token.*tokenizer.pad_token = tokenizer.eos_token"):
        make_padding_collator(type("Tok", (), {"pad_token_id": None})())
    with pytest.raises(ValueError, match="already have labels"):
        make_causal_lm_collator(pad_token_id=0)([{"input_ids": [1], "labels": [1]}])
