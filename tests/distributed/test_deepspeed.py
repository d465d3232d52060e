"""DeepSpeed configs → ParallelConfig: stages, offload, precision, the "auto" filling and mismatch errors, and an
error naming each key that has no equivalent.

Filling from TrainingArguments (the field names in the messages) is tested in ``tests/trainer/test_parallel.py``."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from ftrain.distributed.config import ParallelConfig
from ftrain.distributed.deepspeed import (
    DEEPSPEED_AUTO_KEYS,
    DEEPSPEED_IGNORED,
    fill_deepspeed_config,
    parallel_config_from_deepspeed,
)


def _values(**overrides) -> dict:
    """A run's values for DeepSpeed's "auto" keys (dotted keys given with ``__`` for ``.``)."""
    values = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "optimizer.params.lr": 3e-4,
        "optimizer.params.betas": [0.9, 0.999],
        "optimizer.params.eps": 1e-8,
        "optimizer.params.weight_decay": 0.01,
        "fp16.enabled": False,
        "bf16.enabled": False,
    }
    return {**values, **{k.replace("__", "."): v for k, v in overrides.items()}}


@pytest.mark.parametrize(
    "stage, expected",
    [
        (0, ParallelConfig(dp_replicate=4, dp_shard=1, shard_level=1)),
        (1, ParallelConfig(dp_replicate=1, dp_shard=4, shard_level=1)),
        (2, ParallelConfig(dp_replicate=1, dp_shard=4, shard_level=2)),
        (3, ParallelConfig(dp_replicate=1, dp_shard=4, shard_level=3)),
    ],
)
def test_zero_stage_is_the_shard_level(stage, expected):
    assert parallel_config_from_deepspeed({"zero_optimization": {"stage": stage}}, 4) == expected


def test_no_zero_section_is_plain_data_parallel():
    assert parallel_config_from_deepspeed({}, 3) == ParallelConfig(dp_replicate=3, dp_shard=1, shard_level=1)


@pytest.mark.parametrize(
    "zero, offload",
    [
        ({"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}}, True),
        ({"stage": 3, "offload_optimizer": {"device": "none"}, "offload_param": {"device": "none"}}, False),
        ({"stage": 1, "cpu_offload": True}, True),  # the pre-0.3.16 spelling
    ],
)
def test_optimizer_offload(zero, offload):
    assert parallel_config_from_deepspeed({"zero_optimization": zero}, 2).offload_optimizer is offload


def test_precision_and_communication_dtype():
    cfg = parallel_config_from_deepspeed({"bf16": {"enabled": True}, "communication_data_type": "fp32"}, 2)
    assert (cfg.param_dtype, cfg.reduce_dtype) == (torch.bfloat16, torch.float32)
    cfg = parallel_config_from_deepspeed({"fp16": {"enabled": True, "loss_scale": 0}}, 2)
    assert (cfg.param_dtype, cfg.reduce_dtype) == (torch.float16, None)
    cfg = parallel_config_from_deepspeed({"fp16": {"enabled": False}, "bf16": {"enabled": False}}, 2)
    assert (cfg.param_dtype, cfg.reduce_dtype) == (None, None)
    with pytest.raises(ValueError, match="fp16.enabled and bf16.enabled are both true"):
        parallel_config_from_deepspeed({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, 2)
    with pytest.raises(ValueError, match=r"communication_data_type='int8' is not one of \['bf16', 'fp16', 'fp32'\]"):
        parallel_config_from_deepspeed({"communication_data_type": "int8"}, 2)


def test_auto_precision_must_be_filled_first():
    ds = {"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}
    fill = lambda **kw: fill_deepspeed_config(ds, _values(**kw), 2)  # noqa: E731
    assert parallel_config_from_deepspeed(fill(bf16__enabled=True), 2).param_dtype == torch.bfloat16
    assert parallel_config_from_deepspeed(fill(fp16__enabled=True), 2).param_dtype == torch.float16
    assert parallel_config_from_deepspeed(fill(), 2).param_dtype is None
    with pytest.raises(ValueError, match=r'bf16.enabled is "auto", which is filled from TrainingArguments.bf16; pass'):
        parallel_config_from_deepspeed({"bf16": {"enabled": "auto"}}, 2)


def test_auto_values_are_filled_like_transformers():
    ds = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": 0}},
        "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"},
    }
    filled = fill_deepspeed_config(ds, _values(optimizer__params__weight_decay=0), world_size=8)
    assert filled["train_micro_batch_size_per_gpu"] == 4
    assert filled["gradient_accumulation_steps"] == 2
    assert filled["train_batch_size"] == 64  # 8 ranks × 4 × 2
    assert filled["gradient_clipping"] == 1.0
    assert filled["optimizer"]["params"] == {"lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0}
    assert filled["zero_optimization"]["reduce_bucket_size"] == "auto"  # tuning key: accepted, no effect
    assert ds["train_batch_size"] == "auto"  # the input is not changed


def test_values_decide_only_the_keys_they_hold():
    ds = {"train_batch_size": "auto", "gradient_clipping": "auto", "optimizer": {"params": {"lr": 0.1}}}
    assert fill_deepspeed_config(ds, {"train_batch_size": 48}, 8) == {**ds, "train_batch_size": 48}
    assert fill_deepspeed_config(ds, {"train_micro_batch_size_per_gpu": 3}, 8)["train_batch_size"] == 24  # accum 1
    assert fill_deepspeed_config(ds, {"gradient_clipping": None}, 8)["gradient_clipping"] is None  # as transformers
    unknown = fill_deepspeed_config(ds, {"optimizer.params.lr": None, "optimizer.params.betas": [0.9, None]}, 8)
    assert unknown["optimizer"]["params"]["lr"] == 0.1  # an unknown value checks nothing
    with pytest.raises(ValueError, match=r"\['optimizer.lr'\] are not keys DeepSpeed fills from \"auto\"; use some of"):
        fill_deepspeed_config(ds, {"optimizer.lr": 0.1}, 8)
    assert len(DEEPSPEED_AUTO_KEYS) == 10


def test_mismatches_are_listed_with_both_values():
    ds = {
        "train_micro_batch_size_per_gpu": 8,
        "train_batch_size": 100,
        "gradient_clipping": 0.5,
        "gradient_accumulation_steps": 2,
        "optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.95]}},
    }
    with pytest.raises(ValueError) as err:
        fill_deepspeed_config(ds, _values(), 8, names={"gradient_clipping": "max_grad_norm"})
    assert str(err.value).splitlines() == [
        "DeepSpeed config values disagree with TrainingArguments:",
        "- ds train_micro_batch_size_per_gpu=8 vs hf train_micro_batch_size_per_gpu=4",
        "- ds train_batch_size=100 vs hf train_batch_size (calculated)=64",
        "- ds gradient_clipping=0.5 vs hf max_grad_norm=1.0",
        "- ds optimizer.params.betas=[0.9, 0.95] vs hf optimizer.params.betas=[0.9, 0.999]",
        'Set these DeepSpeed values to "auto" (filled from TrainingArguments) or make them equal.',
    ]
    with pytest.raises(ValueError, match=r"- ds bf16.enabled=True vs hf bf16.enabled=False"):
        fill_deepspeed_config({"bf16": {"enabled": True}}, _values(), 8)


UNSUPPORTED = [
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}},
     "- zero_optimization.offload_param: parameter offload has no equivalent"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/x"}}},
     '- zero_optimization.offload_optimizer.device="nvme": only "cpu" (or "none") is supported'),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.3}}},
     "- zero_optimization.offload_optimizer.ratio=0.3: partial offload is not supported"),
    ({"zero_optimization": {"stage": 3, "zero_quantized_weights": True}},
     "- zero_optimization.zero_quantized_weights: ZeRO++ weight quantisation is not implemented"),
    ({"zero_optimization": {"stage": 3, "zero_quantized_gradients": True}},
     "- zero_optimization.zero_quantized_gradients: ZeRO++ gradient quantisation is not implemented"),
    ({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 8}},
     "- zero_optimization.zero_hpz_partition_size: ZeRO++ hierarchical partitioning (hpZ) has no equivalent"),
    ({"zero_optimization": {"stage": 3, "mics_shard_size": 8}}, "- zero_optimization.mics_shard_size: MiCS"),
    ({"pipeline": {"stages": 2}}, "- pipeline: pipeline parallelism is not implemented"),
    ({"tensor_parallel": {"autotp_size": 2}}, "- tensor_parallel: DeepSpeed AutoTP is not used; set ParallelConfig(tp"),
    ({"sequence_parallel_size": 2}, "- sequence_parallel_size: DeepSpeed-Ulysses is not used; set ParallelConfig(cp"),
    ({"scheduler": {"type": "WarmupLR", "params": {}}}, "- scheduler: DeepSpeed's learning-rate schedules are not"),
    ({"optimizer": {"type": "Lamb", "params": {}}}, "- optimizer.type='Lamb': DeepSpeed's optimizers are not used"),
    ({"optimizer": {"type": "Adam", "params": {"adam_w_mode": False}}}, "- optimizer.params.adam_w_mode=false"),
    ({"amp": {"enabled": True}}, "- amp: apex AMP is not supported"),
    ({"compression_training": {"weight_quantization": {}}}, "- compression_training: DeepSpeed compression"),
    ({"elasticity": {"enabled": True}}, "- elasticity: elastic training is not supported"),
    ({"zero_optimisation": {"stage": 2}}, "- zero_optimisation: not a DeepSpeed key ftrain knows (a typo?)"),
    ({"zero_optimization": {"stage": 2, "overlap_com": True}}, "- zero_optimization.overlap_com: not a DeepSpeed key"),
]  # fmt: skip


@pytest.mark.parametrize("ds, message", UNSUPPORTED, ids=[m.split(":")[0][2:] for _, m in UNSUPPORTED])
def test_each_unsupported_key_is_named_with_the_reason(ds, message):
    with pytest.raises(ValueError) as err:
        parallel_config_from_deepspeed(ds, 4)
    text = str(err.value)
    assert text.startswith("DeepSpeed config has settings ftrain cannot honour:\n")
    assert message in text


def test_switched_off_features_are_accepted():
    ds = {
        "zero_optimization": {"stage": 3, "zero_quantized_weights": False, "zero_hpz_partition_size": 1,
                              "mics_shard_size": -1},
        "pipeline": {"enabled": False},
        "sequence_parallel_size": 1,
        "elasticity": {"enabled": False},
    }  # fmt: skip
    assert parallel_config_from_deepspeed(ds, 4) == ParallelConfig(dp_shard=4, shard_level=3)


def test_every_unsupported_key_is_reported_in_one_error():
    ds = {"pipeline": {}, "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}
    with pytest.raises(ValueError) as err:
        parallel_config_from_deepspeed(ds, 4)
    assert sum(line.startswith("- ") for line in str(err.value).splitlines()) == 2


def test_engine_tuning_keys_are_accepted_and_logged(caplog):
    zero = {k.split(".", 1)[1]: "auto" for k in DEEPSPEED_IGNORED if k.startswith("zero_optimization.")}
    ds = {"zero_optimization": {"stage": 2, **zero}, "steps_per_print": 10, "wall_clock_breakdown": False}
    with caplog.at_level(logging.INFO, logger="ftrain.distributed.deepspeed"):
        assert parallel_config_from_deepspeed(ds, 2) == ParallelConfig(dp_shard=2, shard_level=2)
    assert "zero_optimization.overlap_comm (tunes DeepSpeed's own engine" in caplog.text
    assert "steps_per_print (DeepSpeed logging/monitoring" in caplog.text


def test_json_path_and_json_string(tmp_path):
    ds = {"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    expected = ParallelConfig(dp_shard=2, shard_level=3, param_dtype=torch.bfloat16)
    assert parallel_config_from_deepspeed(str(path), 2) == expected
    assert parallel_config_from_deepspeed(json.dumps(ds), 2) == expected
    with pytest.raises(ValueError, match=r"'missing.json' is neither a file nor a JSON object"):
        parallel_config_from_deepspeed("missing.json", 2)


def test_bad_stage_and_offload_without_sharding():
    with pytest.raises(ValueError, match=r"zero_optimization.stage must be 0, 1, 2 or 3, got 'auto'"):
        parallel_config_from_deepspeed({"zero_optimization": {"stage": "auto"}}, 2)
    with pytest.raises(ValueError, match=r"offload_optimizer needs ZeRO stage 1, 2 or 3 \(stage is 0\)"):
        parallel_config_from_deepspeed({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}, 2)
