"""hf_decay_mask / decay_parameter_names against HF's own ``Trainer.get_decay_parameter_names``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ftrain.optim.masks import decay_parameter_names, hf_decay_mask

transformers = pytest.importorskip("transformers")


def _hf_names(model: nn.Module) -> set[str]:
    # ``self`` is unused by the method: HF's real code, no Trainer (and no TrainingArguments) needed.
    return set(transformers.Trainer.get_decay_parameter_names(None, model))


def _check_against_hf(model: nn.Module) -> dict[str, bool]:
    hf = _hf_names(model)
    mask = hf_decay_mask(model)
    expected = {n: n in hf for n, p in model.named_parameters() if p.requires_grad}
    assert mask == expected
    assert list(mask) == [n for n, p in model.named_parameters() if p.requires_grad]  # order
    assert decay_parameter_names(model) == [n for n, _ in model.named_parameters() if n in hf]
    return mask


def test_gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    mask = _check_against_hf(model)
    assert mask["transformer.wte.weight"] and mask["transformer.h.1.attn.c_attn.weight"]
    assert not mask["transformer.h.0.ln_1.weight"] and not mask["transformer.ln_f.bias"]
    assert not mask["transformer.h.0.mlp.c_fc.bias"]
    # per block: attn c_attn, c_proj, mlp c_fc, c_proj weights; plus wte, wpe
    assert sum(mask.values()) == 2 * 4 + 2
    assert "lm_head.weight" not in mask  # tied to wte: named_parameters() lists it once


def test_llama_rmsnorm_by_name():
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(config)
    mask = _check_against_hf(model)
    assert not mask["model.norm.weight"]
    assert not mask["model.layers.0.input_layernorm.weight"]
    assert not mask["model.layers.1.post_attention_layernorm.weight"]
    assert mask["model.layers.0.self_attn.q_proj.weight"] and mask["lm_head.weight"]
    assert sum(mask.values()) == 2 * 7 + 2  # q, k, v, o, gate, up, down per layer; embed_tokens, lm_head


class _MyLayerNorm(nn.LayerNorm):
    """A subclass counts as a LayerNorm for HF (isinstance)."""


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))  # a direct parameter next to children
        self.inner = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.LayerNorm(3)))
        self.my_norm = nn.Linear(3, 3, bias=False)
        self.normalizer = nn.Linear(3, 3, bias=False)  # "norm" not followed by "." or the end: decays
        self.Layer_Norm = nn.Linear(3, 3, bias=False)  # lowercased: matches "_norm."
        self.custom = _MyLayerNorm(3)
        self.RMSNormish = nn.Linear(3, 3, bias=False)  # lowercased: matches "rmsnorm"


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm_gain = nn.Parameter(torch.ones(3))  # top-level, "norm_gain": no pattern matches
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.frozen = nn.Linear(3, 3)
        self.frozen.weight.requires_grad_(False)
        self.head = nn.Linear(3, 2)


def test_custom_module_nested_layernorm_names_and_frozen():
    model = _Model()
    mask = _check_against_hf(model)
    assert mask == {
        "norm_gain": True,
        **{
            f"blocks.{i}.{name}": decays
            for i in range(2)
            for name, decays in [
                ("scale", True),
                ("inner.0.weight", True),
                ("inner.0.bias", False),
                ("inner.1.0.weight", False),  # LayerNorm two levels down
                ("inner.1.0.bias", False),
                ("my_norm.weight", False),
                ("normalizer.weight", True),
                ("Layer_Norm.weight", False),
                ("custom.weight", False),
                ("custom.bias", False),
                ("RMSNormish.weight", False),
            ]
        },
        "frozen.bias": False,
        "head.weight": True,
        "head.bias": False,
    }
    assert "frozen.weight" not in mask  # not trainable
    assert "frozen.weight" in decay_parameter_names(model)  # HF's list includes frozen params


def test_root_layernorm_and_custom_rule():
    ln = nn.LayerNorm(4)
    # HF only tests the children it recurses into, so a LayerNorm passed as the model decays its weight
    assert hf_decay_mask(ln) == {"weight": True, "bias": False} == {n: n in _hf_names(ln) for n in ("weight", "bias")}
    model = nn.Sequential(nn.Linear(2, 2), nn.Embedding(3, 2))
    assert hf_decay_mask(model, layer_types=(nn.Embedding,), name_patterns=()) == {
        "0.weight": True,
        "0.bias": True,
        "1.weight": False,
    }
