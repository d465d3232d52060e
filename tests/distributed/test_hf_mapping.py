"""TrainingArguments' fsdp / fsdp_config / deepspeed → ParallelConfig, for ftrain's, transformers' and plain
attribute objects."""

from __future__ import annotations

import json
import logging
import os
from types import SimpleNamespace

import pytest
import torch

from ftrain.distributed.config import ParallelConfig
from ftrain.distributed.deepspeed import parallel_config_from_deepspeed
from ftrain.distributed.hf import parallel_config_from_training_args


def _args(fsdp=None, fsdp_config=None, deepspeed=None, **kw) -> SimpleNamespace:
    base = dict(per_device_train_batch_size=4, gradient_accumulation_steps=1, max_grad_norm=1.0, bf16=False)
    return SimpleNamespace(fsdp=fsdp, fsdp_config=fsdp_config, deepspeed=deepspeed, **{**base, **kw})


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
    assert parallel_config_from_training_args(_args(fsdp), 8, shard_group_size=4) == expected


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
    assert parallel_config_from_training_args(_args(True, fsdp_config), 8, shard_group_size=2) == expected


def test_fsdp_config_from_a_json_file_or_string(tmp_path):
    path = tmp_path / "fsdp.json"
    path.write_text(json.dumps({"reshard_after_forward": False, "min_num_params": 100}))
    expected = ParallelConfig(dp_shard=4, shard_level=2)
    assert parallel_config_from_training_args(_args(True, str(path)), 4) == expected
    assert parallel_config_from_training_args(_args(True, path.read_text()), 4) == expected


def test_conflicting_strategies_name_both():
    with pytest.raises(ValueError, match=r"given twice and disagrees: fsdp='full_shard', "):
        parallel_config_from_training_args(_args("full_shard", {"reshard_after_forward": False}), 4)
    with pytest.raises(ValueError, match=r"several sharding strategies \['full_shard', 'shard_grad_op'\]"):
        parallel_config_from_training_args(_args("full_shard shard_grad_op"), 4)


def test_mixed_precision():
    cfg = parallel_config_from_training_args(_args(True, bf16=True), 2)
    assert (cfg.param_dtype, cfg.reduce_dtype) == (torch.bfloat16, torch.bfloat16)
    cfg = parallel_config_from_training_args(_args(True, fp16=True), 2)
    assert (cfg.param_dtype, cfg.reduce_dtype) == (torch.float16, torch.float16)
    policy = {"mixed_precision_policy": {"param_dtype": "torch.bfloat16", "reduce_dtype": "float32"}}
    cfg = parallel_config_from_training_args(_args(True, policy, bf16=True), 2)
    assert (cfg.param_dtype, cfg.reduce_dtype) == (torch.bfloat16, torch.float32)
    cfg = parallel_config_from_training_args(_args(True, {"mixed_precision_policy": "bf16"}), 2)
    assert (cfg.param_dtype, cfg.reduce_dtype) == (torch.bfloat16, torch.bfloat16)
    with pytest.raises(ValueError, match=r"mixed_precision_policy'\]: unknown key\(s\) \['cast_inputs'\]"):
        parallel_config_from_training_args(_args(True, {"mixed_precision_policy": {"cast_inputs": True}}), 2)


def test_wrap_keys_are_accepted_and_logged(caplog):
    config = {"min_num_params": 1000, "transformer_layer_cls_to_wrap": ["Block"], "state_dict_type": "SHARDED"}
    with caplog.at_level(logging.INFO, logger="ftrain.distributed.hf"):
        assert parallel_config_from_training_args(_args(True, config), 2) == ParallelConfig(dp_shard=2)
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
        parallel_config_from_training_args(_args(fsdp, config), 4)


def test_hybrid_group_size(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=r"the group size is unknown: pass shard_group_size="):
        parallel_config_from_training_args(_args("hybrid_shard"), 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert parallel_config_from_training_args(_args("hybrid_shard"), 8) == ParallelConfig(dp_replicate=4, dp_shard=2)
    with pytest.raises(ValueError, match=r"shard group size 3 does not divide the world size 8"):
        parallel_config_from_training_args(_args("hybrid_shard"), 8, shard_group_size=3)


def test_no_fsdp_no_deepspeed_is_none():
    for fsdp in (None, False, "", []):
        assert parallel_config_from_training_args(_args(fsdp), 4) is None


def test_deepspeed_goes_through_the_deepspeed_mapping():
    ds = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto", "bf16": {"enabled": "auto"}}
    got = parallel_config_from_training_args(_args(deepspeed=ds, bf16=True), 4)
    assert got == parallel_config_from_deepspeed(ds, 4, args=_args(bf16=True))
    assert got == ParallelConfig(dp_shard=4, shard_level=2, param_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"- ds train_micro_batch_size_per_gpu=2 vs hf per_device_train_batch_size=4"):
        parallel_config_from_training_args(_args(deepspeed={"train_micro_batch_size_per_gpu": 2}), 4)
    with pytest.raises(ValueError, match="fsdp and deepspeed are both set; choose one"):
        parallel_config_from_training_args(_args("full_shard", deepspeed=ds), 4)


@pytest.mark.parametrize("fsdp", ["full_shard", "shard_grad_op offload", "full_shard auto_wrap offload"])
def test_ftrain_and_transformers_arguments_agree(fsdp, tmp_path):
    """transformers rewrites legacy fsdp strings into fsdp_config (fsdp=True, reshard_after_forward, cpu_offload);
    ftrain keeps them as given. Both must map to the same ParallelConfig."""
    transformers = pytest.importorskip("transformers")
    from ftrain.trainer import TrainingArguments

    env = dict(os.environ)
    try:  # transformers sets FSDP_* environment variables
        hf = transformers.TrainingArguments(str(tmp_path), fsdp=fsdp, fsdp_config={"min_num_params": 10}, use_cpu=True)
    finally:
        os.environ.clear()
        os.environ.update(env)
    ours = TrainingArguments(str(tmp_path), fsdp=fsdp, fsdp_config={"min_num_params": 10})
    assert hf.fsdp is True and ours.fsdp == fsdp  # the two really arrive in different forms
    got = parallel_config_from_training_args(hf, 4)
    assert got == parallel_config_from_training_args(ours, 4)
    assert got.shard_level == (2 if "shard_grad_op" in fsdp else 3)
    assert got.offload_optimizer is ("offload" in fsdp)
