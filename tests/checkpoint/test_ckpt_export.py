"""export_pretrained: a directory that transformers' from_pretrained loads, with identical logits."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import ftrain
from ftrain import optim
from ftrain.checkpoint import export_pretrained
from ftrain.models import GPT, GPTConfig
from ftrain.step import causal_lm_loss

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install ftrain[hf])")


@pytest.fixture(scope="module")
def trained_gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    state = ftrain.TrainState.create(model, optim.adamw(1e-2), key=0, copy=True)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    state, _ = ftrain.make_train_step(causal_lm_loss)(state, {"input_ids": ids, "labels": ids})
    return state, ids


def test_from_pretrained_gives_identical_logits(tmp_path, trained_gpt2):
    state, ids = trained_gpt2
    export_pretrained(state, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no missing / unexpected keys, no tied-weight complaints
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "GPT2LMHeadModel"
    reference = state.to_module().eval()
    with torch.no_grad():
        expected = reference(ids).logits
        got = loaded.eval()(ids).logits
    assert torch.equal(got, expected)  # bitwise: the same GPT-2 code and weights on the same input, in this process
    trained = state.params["transformer.wte.weight"]
    assert torch.equal(loaded.lm_head.weight, trained)  # tied again on load
    assert not torch.equal(trained, transformers.GPT2LMHeadModel(loaded.config).transformer.wte.weight)


def test_the_directory_matches_save_pretrained(tmp_path, trained_gpt2):
    state, _ = trained_gpt2
    export_pretrained(state, tmp_path / "ours")
    state.to_module().save_pretrained(tmp_path / "hf")
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    theirs = load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert "lm_head.weight" not in ours  # tied weights are stored once
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    with safe_open(tmp_path / "ours" / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["dtype"] == "float32"
    assert {k: v for k, v in config.items() if k != "transformers_version"} == {
        k: v for k, v in hf_config.items() if k != "transformers_version"
    }
    assert (tmp_path / "ours" / "generation_config.json").exists() == (
        tmp_path / "hf" / "generation_config.json"
    ).exists()


def test_export_keeps_other_files_and_leaves_no_temporary_ones(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    export_pretrained(torch.nn.Linear(2, 1), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "tokenizer.json"]


def test_an_ftrain_gpt_exports_its_dataclass_config_and_untied_names(tmp_path):
    cfg = GPTConfig(vocab_size=16, seq_len=8, n_layer=1, n_head=2, d_model=8)
    model = GPT(cfg)
    export_pretrained(ftrain.TrainState.create(model, optim.sgd(0.1), key=0), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    assert "wte.weight" in weights and "lm_head.weight" not in weights
    assert json.loads((tmp_path / "config.json").read_text())["d_model"] == 8
    fresh = GPT(cfg)
    fresh.load_state_dict(weights, strict=False)
    assert torch.equal(fresh.lm_head.weight, model.wte.weight)


def test_export_rejects_what_it_cannot_write(tmp_path):
    with pytest.raises(TypeError, match="expected a TrainState or a torch.nn.Module, got dict"):
        export_pretrained({"w": torch.ones(1)}, tmp_path)
    with pytest.raises(TypeError, match="config must be a transformers PretrainedConfig, a dataclass or a dict"):
        export_pretrained(torch.nn.Linear(1, 1), tmp_path, config="gpt2")
