"""The rest of transformers' Trainer method index, checked against transformers' own Trainer.

Nothing here compares two trainings: weights and optimizer state loaded from a checkpoint are compared bitwise (a
save/load round trip), and the rest are counts, configuration values and structure, compared exactly.
"""

import contextlib
import logging
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from transformers.trainer_pt_utils import nested_numpify as hf_nested_numpify  # noqa: E402
from transformers.trainer_utils import align_special_tokens, sort_checkpoints  # noqa: E402

from ftrain.distributed.config import ParallelConfig  # noqa: E402
from ftrain.trainer import Trainer, TrainingArguments  # noqa: E402
from ftrain.trainer.convert import get_optimizer_cls_and_kwargs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = (
    "create_accelerator_and_postprocess tokenizer _get_dataloader _remove_unused_columns "
    "_get_collator_with_removed_columns _set_signature_columns_if_needed _align_special_tokens "
    "get_optimizer_cls_and_kwargs get_optimizer_group num_tokens get_total_train_batch_size get_tp_size "
    "set_initial_training_values get_batch_samples prediction_loop _gather_and_numpify _nested_gather "
    "_load_from_checkpoint _save_optimizer_and_scheduler _load_optimizer_and_scheduler _save_rng_state "
    "_load_rng_state _sorted_checkpoints _save_scaler _load_scaler _move_model_to_device _wrap_model _prepare_input "
    "_prepare_inputs floating_point_ops store_flos torch_jit_model_eval _prepare_context_parallel_inputs"
).split()
COMMON = dict(report_to="none", use_cpu=True, disable_tqdm=True, seed=0, save_strategy="no")


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    config = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).float()
    model.loss_type = "ForCausalLM"  # v5's documented causal count (see test_trainer_parity.py)
    return model


def token_rows(n: int = 12, length: int = 8, seed: int = 1) -> "datasets.Dataset":
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, length), generator=g).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids, "text": ["x"] * n})


def pair(HFArgs, tmp_path, model=None, **kwargs):
    """(transformers' Trainer, ftrain's Trainer) on the same model class, data and arguments."""
    data = kwargs.pop("train_dataset", token_rows())
    options = {**COMMON, **kwargs}
    hf = transformers.Trainer(model=model or tiny_gpt2(), args=HFArgs(output_dir=str(tmp_path / "hf"), **options),
                              train_dataset=data)  # fmt: skip
    ft = Trainer(model=model or tiny_gpt2(), args=TrainingArguments(str(tmp_path / "ft"), **options),
                 train_dataset=data)  # fmt: skip
    return hf, ft


def lm_batch(rows: int = 2, length: int = 6, seed: int = 0, pad: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, -pad:] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def test_every_method_of_the_issue_exists_with_transformers_kind():
    missing = [name for name in METHODS if not hasattr(Trainer, name)]
    assert missing == []
    defined = lambda name: next(vars(c)[name] for c in Trainer.__mro__ if name in vars(c))  # noqa: E731
    assert isinstance(defined("get_optimizer_cls_and_kwargs"), staticmethod)
    assert isinstance(defined("num_tokens"), staticmethod)
    assert isinstance(defined("tokenizer"), property)


# ---- set-up ---------------------------------------------------------------------------------------------------------


def test_tokenizer_is_a_deprecated_alias_of_processing_class(tmp_path, caplog):
    trainer = Trainer(tiny_gpt2(), TrainingArguments(str(tmp_path), **COMMON), processing_class="tok")
    assert "tokenizer" not in vars(trainer)  # not shadowed by an instance attribute
    with caplog.at_level(logging.WARNING, logger="ftrain.trainer.compat"):
        assert trainer.tokenizer == "tok"
        trainer.tokenizer = "other"
    assert trainer.processing_class == "other"
    assert [r.getMessage() for r in caplog.records] == [
        "Trainer.tokenizer is now deprecated. You should use Trainer.processing_class instead.",
        "Trainer.tokenizer is now deprecated. You should use `Trainer.processing_class = processing_class` instead.",
    ]


def test_create_accelerator_and_postprocess_sets_what_transformers_sets(HFArgs, tmp_path):
    hf, ft = pair(HFArgs, tmp_path, per_device_train_batch_size=3)
    ft.create_accelerator_and_postprocess()
    for name in ("is_deepspeed_enabled", "is_fsdp_enabled", "is_fsdp_xla_enabled", "_train_batch_size"):
        theirs = bool(getattr(hf, name)) if name.startswith("is_") else getattr(hf, name)  # None there for "off"
        assert getattr(ft, name) == theirs, name
    assert (ft.device, ft.world_size, ft.process_index) == (hf.args.device, 1, 0)
    assert ft.gather_function == ft._nested_gather and ft.is_tp_enabled is False
    accelerator_config = {"gradient_accumulation_kwargs": {"num_steps": 4}}
    args = TrainingArguments(str(tmp_path), gradient_accumulation_steps=2, accelerator_config=accelerator_config,
                             **COMMON)  # fmt: skip
    with pytest.raises(ValueError, match="`num_steps` is set but `gradient_accumulation_steps` is greater than 1"):
        Trainer(tiny_gpt2(), args).create_accelerator_and_postprocess()
    args.gradient_accumulation_steps = 1
    Trainer(tiny_gpt2(), args).create_accelerator_and_postprocess()
    assert args.gradient_accumulation_steps == 4


def test_align_special_tokens_matches_transformers(tmp_path):
    tokenizer = SimpleNamespace(eos_token_id=5, bos_token_id=None, pad_token_id=7)
    theirs, ours = tiny_gpt2(), tiny_gpt2()
    for model in (theirs, ours):
        model.generation_config.eos_token_id = [0, 3]
    align_special_tokens(theirs, tokenizer)
    Trainer(ours, TrainingArguments(str(tmp_path), **COMMON), processing_class=tokenizer)._align_special_tokens()
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        assert getattr(ours.config, name) == getattr(theirs.config, name), name
        assert getattr(ours.generation_config, name) == getattr(theirs.generation_config, name), name
    assert ours.config.eos_token_id == 5 and ours.generation_config.eos_token_id == [5, 0, 3]


# ---- data -----------------------------------------------------------------------------------------------------------


def test_column_removal_matches_transformers(HFArgs, tmp_path):
    hf, ft = pair(HFArgs, tmp_path)
    hf._set_signature_columns_if_needed()
    ft._set_signature_columns_if_needed()
    assert set(ft._signature_columns) == set(hf._signature_columns)
    data = token_rows()
    assert ft._remove_unused_columns(data, "training").column_names == hf._remove_unused_columns(data).column_names
    examples = [{"input_ids": [1, 2], "labels": [1, 2], "text": "x"}, {"input_ids": [3, 4], "labels": [3, 4], "n": 1}]
    seen = {}
    collate = lambda name: lambda feats: seen.setdefault(name, feats)  # noqa: E731
    hf._get_collator_with_removed_columns(collate("hf"), "training")(examples)
    ft._get_collator_with_removed_columns(collate("ft"), "training")(examples)
    assert (
        seen["ft"] == seen["hf"] == [{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3, 4], "labels": [3, 4]}]
    )
    bad = datasets.Dataset.from_dict({"text": ["a"]})
    with pytest.raises(ValueError, match="No columns in the dataset match"):
        hf._remove_unused_columns(bad)
    with pytest.raises(ValueError, match=r"No columns in the dataset match .*\[text\].*remove_unused_columns=False"):
        ft._remove_unused_columns(bad)
    ft.args.remove_unused_columns = False
    assert ft._remove_unused_columns(data) is data


def test_get_dataloader_is_the_stream_and_refuses_a_sampler(HFArgs, tmp_path):
    hf, ft = pair(HFArgs, tmp_path, per_device_train_batch_size=4)
    stream = ft._get_dataloader(ft.train_dataset, "Training", 4, is_training=True)
    hf_loader = hf._get_dataloader(hf.train_dataset, "Training", 4, sampler_fn=None, is_training=True)
    assert stream.layout.microbatches_per_epoch == len(hf_loader) == 3
    first = next(iter(stream.iter_from(0)))
    first = first[0] if isinstance(first, list) else first
    assert "text" not in first and first["input_ids"].shape == (4, 8)
    with pytest.raises(ValueError, match="does not take a sampler.*train_sampling_strategy"):
        ft._get_dataloader(ft.train_dataset, "Training", 4, sampler_fn=lambda d: None)


def test_num_tokens_counts_input_ids(tmp_path):
    loader = torch.utils.data.DataLoader(
        [{"input_ids": torch.zeros(5, dtype=torch.long)} for _ in range(7)], batch_size=3
    )  # batches of 3, 3, 1 rows
    assert Trainer.num_tokens(loader) == 35
    assert Trainer.num_tokens(loader, max_steps=4) == 3 * 5 * 4
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, **COMMON)
    trainer = Trainer(tiny_gpt2(), args, train_dataset=token_rows())
    assert trainer.num_tokens(trainer.get_train_dataloader()) == 12 * 8
    assert Trainer.num_tokens([{"x": torch.ones(2)}]) == 0


# ---- optimizer ------------------------------------------------------------------------------------------------------


def test_get_optimizer_cls_and_kwargs_is_static_and_gives_torch_classes(HFArgs):
    kw = dict(COMMON, learning_rate=3e-4, adam_beta2=0.95, adam_epsilon=1e-6)  # non-defaults, so each must be read
    for name, optim_args in (("adamw_torch", None), ("adamw_torch_fused", None), ("sgd", "momentum=0.9,nesterov=True"),
                             ("adagrad", "lr_decay=0.1"), ("rmsprop", "momentum=0.5,centered=True")):  # fmt: skip
        ours = Trainer.get_optimizer_cls_and_kwargs(TrainingArguments("out", optim=name, optim_args=optim_args, **kw))
        theirs = transformers.Trainer.get_optimizer_cls_and_kwargs(HFArgs("out", optim=name, optim_args=optim_args,
                                                                          **kw))  # fmt: skip
        assert ours == theirs, name  # the torch class and its keyword arguments, exactly transformers'
    for name in ("adafactor", "lion_32bit"):  # no torch class: ftrain's factory
        factory, kwargs = Trainer.get_optimizer_cls_and_kwargs(TrainingArguments("out", optim=name, **COMMON))
        assert (factory, kwargs) == get_optimizer_cls_and_kwargs(TrainingArguments("out", optim=name, **COMMON))


def test_get_optimizer_group_matches_transformers_groups(HFArgs, tmp_path):
    hf, ft = pair(HFArgs, tmp_path, weight_decay=0.1)
    with pytest.raises(ValueError, match="Trainer optimizer is None"):
        ft.get_optimizer_group()
    hf.create_optimizer()
    ft.create_optimizer()
    hf_names, ft_names = ({id(p): n for n, p in t.model.named_parameters()} for t in (hf, ft))
    theirs = [[hf_names[id(p)] for p in group] for group in hf.get_optimizer_group()]
    assert [[ft_names[id(p)] for p in group] for group in ft.get_optimizer_group()] == theirs
    ln = dict(ft.model.named_parameters())["transformer.h.0.ln_1.weight"]
    group = ft.get_optimizer_group(ln)
    assert any(p is ln for p in group["params"]) and group["weight_decay"] == 0.0
    assert ft.get_optimizer_group("transformer.h.0.mlp.c_fc.weight")["weight_decay"] == 0.1  # by name (ftrain's)
    with pytest.raises(ValueError, match="'nope' is in no parameter group"):
        ft.get_optimizer_group("nope")


# ---- step arithmetic ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, num_train_epochs=2.5),
        dict(per_device_train_batch_size=5, gradient_accumulation_steps=1, max_steps=7),
        dict(per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=2),
    ],
)
def test_batch_size_and_initial_training_values_match_transformers(HFArgs, tmp_path, kwargs):
    hf, ft = pair(HFArgs, tmp_path, **kwargs)
    assert ft.get_total_train_batch_size(ft.args) == hf.get_total_train_batch_size(hf.args)
    theirs = hf.set_initial_training_values(hf.args, hf.get_train_dataloader())
    assert ft.set_initial_training_values(ft.args, ft.get_train_dataloader()) == theirs


def test_get_tp_size_reads_the_model_then_the_parallel_config(HFArgs, tmp_path):
    hf, ft = pair(HFArgs, tmp_path, per_device_train_batch_size=2)
    assert ft.get_tp_size() == hf.get_tp_size() == 1
    hf.model._tp_size = ft.model._tp_size = 4
    assert ft.get_tp_size() == hf.get_tp_size() == 4
    del ft.model._tp_size
    ft.args.parallelism_config = ParallelConfig(tp=2, cp=2)
    assert ft.get_tp_size() == 2
    ft.args.parallelism_config = {"tp_size": 3}
    assert ft.get_tp_size() == 3


def test_get_batch_samples_matches_transformers(HFArgs, tmp_path):
    hf, ft = pair(HFArgs, tmp_path)
    batches = [lm_batch(seed=i, pad=i + 1) for i in range(3)]
    theirs, their_count = hf.get_batch_samples(iter(batches), 2, torch.device("cpu"))
    ours, count = ft.get_batch_samples(iter(batches), 2, torch.device("cpu"))
    assert ours == theirs == batches[:2]
    assert int(count) == int(their_count) == 2 * 4 + 2 * 3  # rows x (5 shifted labels - padding)
    ours, count = ft.get_batch_samples(iter(batches), 5, torch.device("cpu"))
    assert len(ours) == 3 and int(count) == int(hf.get_batch_samples(iter(batches), 5, torch.device("cpu"))[1])
    assert ft.get_batch_samples(iter([{"input_ids": torch.ones(1, 2)}]), 1, torch.device("cpu"))[1] is None


def test_prepare_inputs_matches_transformers(HFArgs, tmp_path):
    hf, ft = pair(HFArgs, tmp_path)
    inputs = {"a": torch.ones(2), "nested": {"b": [torch.zeros(1), (torch.arange(3), "s")]}, "n": 3}
    theirs, ours = hf._prepare_inputs(inputs), ft._prepare_inputs(inputs)
    assert repr(ours) == repr(theirs)
    assert type(ours["nested"]["b"][1]) is tuple and ours["nested"]["b"][1][0].device == ft.args.device
    with pytest.raises(ValueError, match="The batch received was empty.*expected by the model: input_ids"):
        ft._prepare_inputs({})


def test_prepare_context_parallel_inputs(tmp_path):
    trainer = Trainer(tiny_gpt2(), TrainingArguments(str(tmp_path), **COMMON))
    batch = lm_batch(rows=2, length=4)
    factory, same = trainer._prepare_context_parallel_inputs(trainer.model, batch)
    assert factory is contextlib.nullcontext and same is batch
    trainer.args.parallelism_config = ParallelConfig(cp=2)
    trainer.model.config._attn_implementation = "sdpa"
    factory, out = trainer._prepare_context_parallel_inputs(trainer.model, batch)
    expected = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:]  # transformers' shift
    assert torch.equal(out["shift_labels"], expected)
    assert out["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert "shift_labels" not in batch  # the caller's dict is left alone
    trainer.model.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="only with SDPA attention, you are using eager"):
        trainer._prepare_context_parallel_inputs(trainer.model, batch)


# ---- evaluation -----------------------------------------------------------------------------------------------------


def test_prediction_loop_is_a_deprecated_evaluation_loop(tmp_path):
    trainer = Trainer(tiny_gpt2(), TrainingArguments(str(tmp_path), per_device_eval_batch_size=4, **COMMON))
    loader = trainer.get_eval_dataloader(token_rows(6))
    with pytest.warns(FutureWarning, match="prediction_loop is deprecated.*evaluation_loop"):
        old = trainer.prediction_loop(loader, "Evaluation", metric_key_prefix="test")
    new = trainer.evaluation_loop(loader, "Evaluation", metric_key_prefix="test")
    # the same loop on the same weights, kernels and order: bitwise
    assert old.metrics == new.metrics and old.num_samples == new.num_samples == 6
    np.testing.assert_array_equal(old.predictions, new.predictions)


def test_gather_and_numpify_match_transformers(tmp_path):
    trainer = Trainer(tiny_gpt2(), TrainingArguments(str(tmp_path), **COMMON))
    tensors = (torch.ones(2, dtype=torch.bfloat16), {"n": torch.tensor(3)})
    ours, theirs = trainer._gather_and_numpify(tensors, "eval"), hf_nested_numpify(tensors)
    assert repr(ours) == repr(theirs)
    assert trainer._nested_gather(tensors) is tensors and trainer._gather_and_numpify(None, "x") is None


def test_nested_gather_in_a_process_group_matches_distributed_concat(tmp_path):
    from transformers.trainer_pt_utils import distributed_concat

    assert not torch.distributed.is_initialized()
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        trainer = Trainer(tiny_gpt2(), TrainingArguments(str(tmp_path), **COMMON))
        tensors = {"loss": torch.tensor(2.0), "logits": [torch.arange(6.0).reshape(2, 3)]}
        ours, theirs = trainer._nested_gather(tensors), distributed_concat(tensors)
        assert repr(ours) == repr(theirs) and ours["loss"].shape == (1,)
    finally:
        torch.distributed.destroy_process_group()


def test_torch_jit_model_eval_and_wrap_model_return_the_model(tmp_path):
    trainer = Trainer(tiny_gpt2(), TrainingArguments(str(tmp_path), **COMMON))
    assert trainer.torch_jit_model_eval(trainer.model, None) is trainer.model
    assert trainer._wrap_model(trainer.model, training=True) is trainer.model


def test_move_model_to_device_skips_models_spread_over_devices(tmp_path, caplog):
    trainer = Trainer(tiny_gpt2(), TrainingArguments(str(tmp_path), **COMMON))
    model = torch.nn.Linear(2, 2).to(torch.float64)
    trainer._move_model_to_device(model, torch.device("meta"))
    assert model.weight.device.type == "meta"
    spread = torch.nn.Linear(2, 2)
    spread.hf_device_map = {"": 0, "x": 1}
    with caplog.at_level(logging.WARNING, logger="ftrain.trainer.compat"):
        trainer._move_model_to_device(spread, torch.device("meta"))
    assert spread.weight.device.type == "cpu" and "already on multiple devices" in caplog.text


# ---- flops ----------------------------------------------------------------------------------------------------------


def test_floating_point_ops_and_store_flos_match_transformers(HFArgs, tmp_path):
    hf, ft = pair(HFArgs, tmp_path)
    batch = lm_batch(rows=3, length=5)
    assert (
        ft.floating_point_ops(batch)
        == hf.floating_point_ops(batch)
        == 6 * 15 * hf.model.num_parameters(exclude_embeddings=True)
    )
    assert ft.floating_point_ops({"labels": batch["labels"]}) == hf.floating_point_ops({"labels": batch["labels"]})
    for trainer in (hf, ft):
        trainer.state.total_flos = 5.0
        trainer.current_flos = float(trainer.floating_point_ops(batch))
        trainer.store_flos()
    assert ft.state.total_flos == hf.state.total_flos and ft.current_flos == hf.current_flos == 0
    ft.store_flos([batch, batch])  # what the loop passes: one step's microbatches
    assert ft.state.total_flos == hf.state.total_flos + 2 * hf.floating_point_ops(batch)
    ft.model.floating_point_ops = lambda inputs: 42  # a model's own estimate wins
    assert ft.floating_point_ops(batch) == 42


def test_training_total_flos_are_flushed_where_transformers_flushes_them(tmp_path):
    """``store_flos`` runs at each log and at the end (not per step, where it would be a collective and a host read),
    so ``state.total_flos`` seen by ``on_log`` callbacks equals transformers' at every log."""
    seen = {}

    def counting(base, side):
        calls = seen.setdefault(side, {"store": 0, "on_log": []})

        class Counting(base):
            def store_flos(self, *args):
                calls["store"] += 1
                super().store_flos(*args)

        class AtLog(transformers.TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                calls["on_log"].append(state.total_flos)

        return Counting, AtLog()

    for side, (base, args_cls) in {"hf": (transformers.Trainer, transformers.TrainingArguments),
                                   "ft": (Trainer, TrainingArguments)}.items():  # fmt: skip
        cls, callback = counting(base, side)
        args = args_cls(str(tmp_path / side), max_steps=4, per_device_train_batch_size=4, logging_steps=2, **COMMON)
        trainer = cls(tiny_gpt2(), args, train_dataset=token_rows(), callbacks=[callback])
        trainer.train()  # (transformers' PrinterCallback pops total_flos from the returned metrics: read the state)
        seen[side]["total"] = trainer.state.total_flos
    assert seen["ft"] == seen["hf"]
    assert seen["ft"]["store"] == 3  # two logs and the end of training, none per step
    assert seen["ft"]["total"] == 4 * 6 * 4 * 8 * tiny_gpt2().num_parameters(exclude_embeddings=True)


# ---- checkpoints ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("best", [None, "checkpoint-2", "checkpoint-10", "checkpoint-99"])
def test_sorted_checkpoints_match_transformers(tmp_path, best):
    for name in ("checkpoint-10", "checkpoint-2", "checkpoint-1", "checkpoint-5", "checkpoint-3x", "other-4"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-7").write_text("a file, not a checkpoint")
    trainer = Trainer(tiny_gpt2(), TrainingArguments(str(tmp_path), **COMMON))
    trainer.state.best_model_checkpoint = None if best is None else str(tmp_path / best)
    theirs = sort_checkpoints(str(tmp_path), best_model_checkpoint=trainer.state.best_model_checkpoint)
    assert trainer._sorted_checkpoints() == theirs
    assert [os.path.basename(p) for p in trainer._sorted_checkpoints(use_mtime=True)] == [
        os.path.basename(p) for p in sort_checkpoints(str(tmp_path), use_mtime=True,
                                                      best_model_checkpoint=trainer.state.best_model_checkpoint)
    ]  # fmt: skip
    if best == "checkpoint-2":
        assert [os.path.basename(p) for p in theirs] == [
            "checkpoint-1", "checkpoint-3x", "checkpoint-5", "checkpoint-2", "checkpoint-10",
        ]  # fmt: skip


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("layout", ["save_pretrained", "sharded", "hf_trainer_save_model"])
def test_load_from_checkpoint_of_a_transformers_folder_gives_identical_weights(HFArgs, tmp_path, layout):
    source = tiny_gpt2(seed=1)
    folder = tmp_path / "saved"
    if layout == "save_pretrained":
        source.save_pretrained(folder)
    elif layout == "sharded":
        source.save_pretrained(folder, max_shard_size="4KB")
        assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    else:
        hf = transformers.Trainer(model=source, args=HFArgs(output_dir=str(tmp_path / "hf"), **COMMON))
        hf.save_model(str(folder))
    trainer = Trainer(tiny_gpt2(seed=0), TrainingArguments(str(tmp_path / "ft"), **COMMON))
    trainer._load_from_checkpoint(str(folder))
    expected, got = _weights(source), _weights(trainer.model)
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_load_from_checkpoint_refuses_pickles_and_mismatched_keys(tmp_path):
    trainer = Trainer(tiny_gpt2(), TrainingArguments(str(tmp_path / "ft"), **COMMON))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="pytorch_model.bin, a pickle: ftrain never unpickles"):
        trainer._load_from_checkpoint(str(pickled))
    with pytest.raises(ValueError, match="Can't find a valid checkpoint at"):
        trainer._load_from_checkpoint(str(tmp_path))
    other = tmp_path / "other"
    bigger = tiny_gpt2()
    bigger.extra = torch.nn.Linear(1, 1)
    del bigger.transformer.ln_f
    bigger.save_pretrained(other)
    with pytest.raises(ValueError) as info:
        trainer._load_from_checkpoint(str(other))
    message = str(info.value)
    assert "missing keys ['transformer.ln_f.weight', 'transformer.ln_f.bias'] (2)" in message
    assert "unexpected keys ['extra.bias', 'extra.weight'] (2)" in message


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An ftrain run of 2 steps that saved checkpoint-2, and the model it ended with."""
    out = tmp_path_factory.mktemp("run")
    args = TrainingArguments(str(out), **{**COMMON, "save_strategy": "steps"}, max_steps=2, save_steps=2,
                             per_device_train_batch_size=4, logging_steps=10, optim="adamw_torch")  # fmt: skip
    trainer = Trainer(tiny_gpt2(), args, train_dataset=token_rows())
    trainer.train()
    return trainer, out / "checkpoint-2"


def test_load_from_checkpoint_of_an_ftrain_checkpoint(trained, tmp_path):
    source, checkpoint = trained
    (checkpoint / "model.safetensors").rename(tmp_path / "moved")  # the committed state alone is enough
    try:
        trainer = Trainer(tiny_gpt2(seed=3), TrainingArguments(str(tmp_path), **COMMON))
        trainer._load_from_checkpoint(str(checkpoint))
    finally:
        (tmp_path / "moved").rename(checkpoint / "model.safetensors")
    expected = _weights(source.model)
    for name, value in _weights(trainer.model).items():
        assert torch.equal(value, expected[name]), name


def test_optimizer_scheduler_and_rng_state_round_trip(trained, tmp_path):
    """The hooks write transformers' torch files; the _load_* twins read them (or the committed state) back exactly."""
    trainer, checkpoint = trained
    state = trainer._train_state
    trainer._save_optimizer_and_scheduler(str(tmp_path))
    trainer._save_rng_state(str(tmp_path))
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth"} <= {p.name for p in tmp_path.iterdir()}
    assert torch.load(tmp_path / "scheduler.pt", weights_only=True)["last_epoch"] == 2
    zeroed = state.replace(opt_state=torch.utils._pytree.tree_map(lambda t: torch.zeros_like(t), state.opt_state),
                           key=torch.tensor([1, 2]), step=torch.tensor(0))  # fmt: skip
    leaves = lambda s: [t for t in torch.utils._pytree.tree_leaves(s.opt_state)]  # noqa: E731
    for source in (str(tmp_path), str(checkpoint)):  # transformers' files, then a committed ftrain checkpoint
        trainer._train_state = zeroed
        trainer._load_optimizer_and_scheduler(source)
        assert int(trainer._train_state.step) == 2
        for a, b in zip(leaves(trainer._train_state), leaves(state), strict=True):
            assert torch.equal(a, b)
    trainer._load_rng_state(str(checkpoint))
    assert torch.equal(trainer._train_state.key, state.key)  # the committed key
    saved = torch.get_rng_state()
    torch.rand(3)
    trainer._load_rng_state(str(tmp_path))
    assert torch.equal(torch.get_rng_state(), saved)
    trainer._train_state = state
    trainer._load_optimizer_and_scheduler(None)
    trainer._load_rng_state(str(tmp_path / "nothing-here"))
    assert trainer._train_state is state


def test_state_helpers_need_a_train_state_and_the_scaler_is_a_no_op(tmp_path, caplog):
    trainer = Trainer(tiny_gpt2(), TrainingArguments(str(tmp_path), **COMMON))
    with pytest.raises(RuntimeError, match="_save_optimizer_and_scheduler: there is no TrainState yet"):
        trainer._save_optimizer_and_scheduler(str(tmp_path))
    trainer._save_scaler(str(tmp_path / "scaler"))
    assert not (tmp_path / "scaler").exists()
    (tmp_path / "scaler.pt").write_bytes(b"pickle")
    with caplog.at_level(logging.WARNING, logger="ftrain.trainer.checkpoints"):
        trainer._load_scaler(str(tmp_path))
    assert "scaler.pt is ignored" in caplog.text


def test_load_from_checkpoint_during_training_updates_the_train_state(tmp_path):
    args = TrainingArguments(str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4, logging_steps=10,
                             **COMMON)  # fmt: skip
    trainer = Trainer(tiny_gpt2(), args, train_dataset=token_rows())
    trainer.train()
    source = tiny_gpt2(seed=5)
    source.save_pretrained(tmp_path / "other")
    trainer._load_from_checkpoint(str(tmp_path / "other"))
    expected = dict(source.named_parameters())
    for name, value in trainer._train_state.params.items():
        assert torch.equal(value, expected[name]), name  # the next step and save_model see the loaded weights
    trainer.save_model(str(tmp_path / "exported"))
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "exported")
    assert torch.equal(reloaded.transformer.h[0].attn.c_attn.weight, source.transformer.h[0].attn.c_attn.weight)
