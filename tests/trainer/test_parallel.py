"""TrainingArguments → ParallelConfig: what the Trainer reads from ftrain's, transformers' and plain attribute
objects (``fsdp``, ``fsdp_config``, ``deepspeed``, ``bf16`` / ``fp16`` and the DeepSpeed ``"auto"`` fields).

The FSDP and DeepSpeed mappings themselves are tested from plain values in ``tests/distributed/``; the layout a
Trainer picks (``parallel_layout``) in ``test_trainer_distributed.py``."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from ftrain.distributed import ParallelConfig, parallel_config_from_deepspeed, parallel_config_from_fsdp
from ftrain.trainer.parallel import fill_deepspeed_config_from_args, parallel_config_from_training_args


def _args(fsdp=None, fsdp_config=None, deepspeed=None, **kw) -> SimpleNamespace:
    base = dict(
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_grad_norm=1.0,
        learning_rate=3e-4,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        weight_decay=0.01,
        fp16=False,
        bf16=False,
    )
    return SimpleNamespace(fsdp=fsdp, fsdp_config=fsdp_config, deepspeed=deepspeed, **{**base, **kw})


def test_fsdp_settings_go_through_the_fsdp_mapping():
    config = {"reshard_after_forward": False}
    assert parallel_config_from_training_args(_args("offload", config), 4) == parallel_config_from_fsdp(
        "offload", config, 4
    )
    assert parallel_config_from_training_args(_args("offload", config), 4) == ParallelConfig(
        dp_shard=4, shard_level=2, offload_optimizer=True
    )
    got = parallel_config_from_training_args(_args("hybrid_shard"), 8, shard_group_size=2)
    assert got == ParallelConfig(dp_replicate=4, dp_shard=2)
    for fsdp in (None, False, "", []):
        assert parallel_config_from_training_args(_args(fsdp), 4) is None
    assert parallel_config_from_training_args(SimpleNamespace(), 4) is None  # an object without the fields


def test_bf16_and_fp16_give_the_fsdp_mixed_precision():
    cfg = parallel_config_from_training_args(_args(True, bf16=True), 2)
    assert (cfg.param_dtype, cfg.reduce_dtype) == (torch.bfloat16, torch.bfloat16)
    cfg = parallel_config_from_training_args(_args(True, fp16=True), 2)
    assert (cfg.param_dtype, cfg.reduce_dtype) == (torch.float16, torch.float16)
    cfg = parallel_config_from_training_args(_args(True), 2)
    assert (cfg.param_dtype, cfg.reduce_dtype) == (None, None)
    policy = {"mixed_precision_policy": {"param_dtype": "torch.bfloat16", "reduce_dtype": "float32"}}
    cfg = parallel_config_from_training_args(_args(True, policy, bf16=True), 2)
    assert (cfg.param_dtype, cfg.reduce_dtype) == (torch.bfloat16, torch.float32)


def test_deepspeed_goes_through_the_deepspeed_mapping():
    ds = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto", "bf16": {"enabled": "auto"}}
    got = parallel_config_from_training_args(_args(deepspeed=ds, bf16=True), 4)
    assert got == parallel_config_from_deepspeed(fill_deepspeed_config_from_args(ds, _args(bf16=True), 4), 4)
    assert got == ParallelConfig(dp_shard=4, shard_level=2, param_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"- ds train_micro_batch_size_per_gpu=2 vs hf per_device_train_batch_size=4"):
        parallel_config_from_training_args(_args(deepspeed={"train_micro_batch_size_per_gpu": 2}), 4)
    with pytest.raises(ValueError, match="fsdp and deepspeed are both set; choose one"):
        parallel_config_from_training_args(_args("full_shard", deepspeed=ds), 4)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['sharded'\]"):  # checked before the conflict
        parallel_config_from_training_args(_args("sharded", deepspeed=ds), 4)


def test_auto_precision_is_filled_from_training_arguments():
    ds = {"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}
    assert parallel_config_from_training_args(_args(deepspeed=ds, bf16=True), 2).param_dtype == torch.bfloat16
    assert parallel_config_from_training_args(_args(deepspeed=ds, fp16=True), 2).param_dtype == torch.float16
    assert parallel_config_from_training_args(_args(deepspeed=ds, fp16_full_eval=True), 2).param_dtype == torch.float16
    assert parallel_config_from_training_args(_args(deepspeed=ds), 2).param_dtype is None


def test_auto_values_are_filled_from_training_arguments():
    ds = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": 0}},
    }
    filled = fill_deepspeed_config_from_args(ds, _args(weight_decay=0), world_size=8)
    assert (filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"]) == (4, 2)
    assert filled["train_batch_size"] == 64  # 8 ranks × 4 × 2
    assert filled["gradient_clipping"] == 1.0
    assert filled["optimizer"]["params"] == {"lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0}


def test_mismatches_name_the_training_arguments_fields():
    ds = {
        "train_micro_batch_size_per_gpu": 8,
        "train_batch_size": 100,
        "gradient_clipping": 0.5,
        "gradient_accumulation_steps": 2,
        "optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.95]}},
    }
    with pytest.raises(ValueError) as err:
        parallel_config_from_training_args(_args(deepspeed=ds), 8)
    assert str(err.value).splitlines() == [
        "DeepSpeed config values disagree with TrainingArguments:",
        "- ds train_micro_batch_size_per_gpu=8 vs hf per_device_train_batch_size=4",
        "- ds train_batch_size=100 vs hf train_batch_size (calculated)=64",
        "- ds gradient_clipping=0.5 vs hf max_grad_norm=1.0",
        "- ds optimizer.params.betas=[0.9, 0.95] vs hf adam_beta1+adam_beta2=[0.9, 0.999]",
        'Set these DeepSpeed values to "auto" (filled from TrainingArguments) or make them equal.',
    ]
    with pytest.raises(ValueError, match=r"- ds bf16.enabled=True vs hf bf16\|bf16_full_eval=False"):
        fill_deepspeed_config_from_args({"bf16": {"enabled": True}}, _args(), 8)


def test_transformers_training_arguments_fill_the_same_values(HFArgs, tmp_path):
    args = HFArgs(
        str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=3, max_grad_norm=0.7, use_cpu=True
    )
    ds = {"train_batch_size": "auto", "gradient_clipping": "auto", "zero_optimization": {"stage": 2}}
    assert fill_deepspeed_config_from_args(ds, args, world_size=4)["train_batch_size"] == 24
    args.deepspeed = ds
    assert parallel_config_from_training_args(args, 4) == ParallelConfig(dp_shard=4, shard_level=2)


@pytest.mark.parametrize("fsdp", ["full_shard", "shard_grad_op offload", "full_shard auto_wrap offload"])
def test_ftrain_and_transformers_arguments_agree(fsdp, HFArgs, tmp_path):
    """transformers rewrites legacy fsdp strings into fsdp_config (fsdp=True, reshard_after_forward, cpu_offload);
    ftrain keeps them as given. Both must map to the same ParallelConfig."""
    from ftrain.trainer import TrainingArguments

    env = dict(os.environ)
    try:  # transformers sets FSDP_* environment variables
        hf = HFArgs(str(tmp_path), fsdp=fsdp, fsdp_config={"min_num_params": 10}, use_cpu=True)
    finally:
        os.environ.clear()
        os.environ.update(env)
    ours = TrainingArguments(str(tmp_path), fsdp=fsdp, fsdp_config={"min_num_params": 10})
    assert hf.fsdp is True and ours.fsdp == fsdp  # the two really arrive in different forms
    got = parallel_config_from_training_args(hf, 4)
    assert got == parallel_config_from_training_args(ours, 4)
    assert got.shard_level == (2 if "shard_grad_op" in fsdp else 3)
    assert got.offload_optimizer is ("offload" in fsdp)
