"""HF's FSDP settings (``fsdp`` options, ``fsdp_config``) → ParallelConfig, from plain values.

What the Trainer reads from ``TrainingArguments`` to call this is tested in ``tests/trainer/test_parallel.py``."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from ftrain.distributed.config import ParallelConfig
from ftrain.distributed.fsdp import fsdp_options, parallel_config_from_fsdp

CASES = [
    ("full_shard", ParallelConfig(dp_shard=8, shard_level=3)),
    (True, ParallelConfig(dp_shard=8, shard_level=3)),
    (["full_shard", "auto_wrap"], ParallelConfig(dp_shard=8, shard_level=3)),
    ("shard_grad_op", ParallelConfig(dp_shard=8, shard_level=2)),
    ("no_shard", ParallelConfig(dp_replicate=8, dp_shard=1, shard_level=1)),
    ("hybrid_shard", ParallelConfig(dp_replicate=2, dp_shard=4, shard_level=3)),
    ("hybrid_shard_zero2 auto_wrap", ParallelConfig(dp_replicate=2, dp_shard=4, shard_level=2)),
    ("full_shard offload auto_wrap", ParallelConfig(dp_shard=8, shard_level=3, offload_optimizer=True)),
    ("SHARD_GRAD_OP offload", ParallelConfig(dp_shard=8, shard_level=2, offload_optimizer=True)),
]


@pytest.mark.parametrize("fsdp, expected", CASES, ids=[str(c[0]) for c in CASES])
def test_fsdp_options(fsdp, expected):
    assert parallel_config_from_fsdp(fsdp, None, 8, shard_group_size=4) == expected


@pytest.mark.parametrize(
    "fsdp_config, expected",
    [
        ({"reshard_after_forward": False}, ParallelConfig(dp_shard=8, shard_level=2)),
        ({"reshard_after_forward": "true"}, ParallelConfig(dp_shard=8, shard_level=3)),
        ({"fsdp_reshard_after_forward": "false"}, ParallelConfig(dp_shard=8, shard_level=2)),  # accelerate's prefix
        ({"version": 1, "reshard_after_forward": "hybrid_shard"}, ParallelConfig(dp_replicate=4, dp_shard=2)),
        ({"sharding_strategy": "SHARD_GRAD_OP"}, ParallelConfig(dp_shard=8, shard_level=2)),
        ({"cpu_offload": "true"}, ParallelConfig(dp_shard=8, offload_optimizer=True)),
    ],
)
def test_fsdp_config_keys(fsdp_config, expected):
    assert parallel_config_from_fsdp(True, fsdp_config, 8, shard_group_size=2) == expected


def test_fsdp_config_from_a_json_file_or_string(tmp_path):
    path = tmp_path / "fsdp.json"
    path.write_text(json.dumps({"reshard_after_forward": False, "min_num_params": 100}))
    expected = ParallelConfig(dp_shard=4, shard_level=2)
    assert parallel_config_from_fsdp(True, str(path), 4) == expected
    assert parallel_config_from_fsdp(True, path, 4) == expected
    assert parallel_config_from_fsdp(True, path.read_text(), 4) == expected


def test_conflicting_strategies_name_both():
    with pytest.raises(ValueError, match=r"given twice and disagrees: fsdp='full_shard', "):
        parallel_config_from_fsdp("full_shard", {"reshard_after_forward": False}, 4)
    with pytest.raises(ValueError, match=r"several sharding strategies \['full_shard', 'shard_grad_op'\]"):
        parallel_config_from_fsdp("full_shard shard_grad_op", None, 4)


def test_mixed_precision():
    cfg = parallel_config_from_fsdp(True, None, 2, mixed_precision=torch.bfloat16)
    assert (cfg.param_dtype, cfg.reduce_dtype) == (torch.bfloat16, torch.bfloat16)
    cfg = parallel_config_from_fsdp(True, None, 2, mixed_precision=torch.float16)
    assert (cfg.param_dtype, cfg.reduce_dtype) == (torch.float16, torch.float16)
    cfg = parallel_config_from_fsdp(True, None, 2)
    assert (cfg.param_dtype, cfg.reduce_dtype) == (None, None)
    policy = {"mixed_precision_policy": {"param_dtype": "torch.bfloat16", "reduce_dtype": "float32"}}
    cfg = parallel_config_from_fsdp(True, policy, 2, mixed_precision=torch.float16)  # the policy wins
    assert (cfg.param_dtype, cfg.reduce_dtype) == (torch.bfloat16, torch.float32)
    cfg = parallel_config_from_fsdp(True, {"mixed_precision_policy": "bf16"}, 2)
    assert (cfg.param_dtype, cfg.reduce_dtype) == (torch.bfloat16, torch.bfloat16)
    with pytest.raises(ValueError, match=r"mixed_precision_policy'\]: unknown key\(s\) \['cast_inputs'\]"):
        parallel_config_from_fsdp(True, {"mixed_precision_policy": {"cast_inputs": True}}, 2)


def test_wrap_keys_are_accepted_and_logged(caplog):
    config = {"min_num_params": 1000, "transformer_layer_cls_to_wrap": ["Block"], "state_dict_type": "SHARDED"}
    with caplog.at_level(logging.INFO, logger="ftrain.distributed.fsdp"):
        assert parallel_config_from_fsdp(True, config, 2) == ParallelConfig(dp_shard=2)
    assert "min_num_params (placement-based sharding shards every parameter" in caplog.text
    assert "transformer_layer_cls_to_wrap (placement-based" in caplog.text


@pytest.mark.parametrize(
    "fsdp, config, message",
    [
        ("full_shard sharded", None, r"unknown option\(s\) \['sharded'\]; use some of \['full_shard'"),
        (True, {"activation_checkpointing": True}, r"- activation_checkpointing=True: set TrainingArg"),
        (True, {"xla": "true"}, r"- xla=True: XLA FSDP is not supported"),
        (True, {"min_num_param": 3}, r"- min_num_param: not an fsdp_config key ftrain knows \(a typo\?\)"),
        (True, {"reshard_after_forward": 2}, r"reshard_after_forward'\]=2: use true/false or one of"),
        (True, {"cpu_offload": "maybe"}, r"fsdp_config\['cpu_offload'\]='maybe' is not a boolean"),
        (True, "nope.json", r"fsdp_config='nope.json' is neither a dict, a JSON file nor a JSON object"),
    ],
)
def test_bad_fsdp_settings(fsdp, config, message):
    with pytest.raises(ValueError, match=message):
        parallel_config_from_fsdp(fsdp, config, 4)


def test_hybrid_group_size(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=r"the group size is unknown: pass shard_group_size="):
        parallel_config_from_fsdp("hybrid_shard", None, 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert parallel_config_from_fsdp("hybrid_shard", None, 8) == ParallelConfig(dp_replicate=4, dp_shard=2)
    with pytest.raises(ValueError, match=r"shard group size 3 does not divide the world size 8"):
        parallel_config_from_fsdp("hybrid_shard", None, 8, shard_group_size=3)


def test_no_fsdp_is_none():
    for fsdp in (None, False, "", []):
        assert fsdp_options(fsdp) is None
        assert parallel_config_from_fsdp(fsdp, {"reshard_after_forward": False}, 4) is None
    assert fsdp_options(True) == []
    assert fsdp_options(("Full_Shard", "offload")) == ["full_shard", "offload"]
