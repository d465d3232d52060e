"""ftrain.trainer.Trainer: resume, callbacks, metrics and best model, custom losses, export, bad input.

transformers.Trainer is the independent reference wherever both can run the same thing. The model is float64, so a
comparison with it is a mathematical claim checked to ``FLOAT64`` (see tests/tolerances.py); resumed and reloaded
runs are compared bitwise (the same kernels in the same order).
"""

import json
import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from ftrain import optim  # noqa: E402
from ftrain.trainer import Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from tests.trainer.test_trainer_parity import APPROX64, causal_lm_loss  # noqa: E402

BASE = dict(
    report_to="none",
    use_cpu=True,
    train_sampling_strategy="sequential",
    learning_rate=1e-3,
    optim="adamw_torch",
    per_device_train_batch_size=4,
    per_device_eval_batch_size=4,
    disable_tqdm=True,
    seed=0,
)


def tiny_gpt2():  # no argument: it is also a model_init (with one, it would get the trial)
    config = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16, resid_pdrop=0.1, embd_pdrop=0, attn_pdrop=0,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double()
    model.loss_type = "ForCausalLM"  # transformers' v5 count (labels[..., 1:]); see test_trainer_parity.py
    model.loss_function = causal_lm_loss  # transformers' causal loss without its float32 upcast (ditto)
    return model


def rows(n=16, length=8, seed=1):
    ids = torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(seed)).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def make(tmp_path, name="out", trainer_cls=Trainer, model=None, **kw):
    args = TrainingArguments(output_dir=str(tmp_path / name), **{**BASE, **kw})
    return trainer_cls(model=model or tiny_gpt2(), args=args, train_dataset=rows(), eval_dataset=rows(8, seed=2))


def step_logs(trainer):
    return [e for e in trainer.state.log_history if "loss" in e]


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


# ---- resume -------------------------------------------------------------------------------------------------------


def test_resume_from_checkpoint_is_bitwise(tmp_path):
    kw = dict(max_steps=10, save_steps=5, logging_steps=1, gradient_accumulation_steps=2, warmup_steps=2)
    full = make(tmp_path, "full", **kw)  # dropout 0.1: the per-step keys must be resumed too
    full.train()
    part = make(tmp_path, "part", **kw)
    part.add_callback(StopAt(5))
    part.train()
    ckpt = tmp_path / "part" / "checkpoint-5"
    assert sorted(os.listdir(tmp_path / "part")) == ["checkpoint-5"]
    assert {"trainer_state.json", "training_args.json", "model.safetensors", "config.json"} <= set(os.listdir(ckpt))
    hf_state = transformers.TrainerState.load_from_json(str(ckpt / "trainer_state.json"))
    assert hf_state.global_step == 5 and len(hf_state.log_history) == 5
    assert json.loads((ckpt / "training_args.json").read_text())["save_steps"] == 5

    resumed = make(tmp_path, "part", **kw)
    out = resumed.train(resume_from_checkpoint=True)
    assert out.global_step == 10
    # bitwise: steps 6-10 run the same kernels in the same order from an exactly restored state (keys included)
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    assert step_logs(resumed) == step_logs(full)
    # the resumed run's train_loss covers steps 6-10: float64 arithmetic on the same logged losses, grouped otherwise
    assert out.metrics["train_loss"] == pytest.approx(np.mean([e["loss"] for e in step_logs(full)[5:]]), **APPROX64)


def test_resume_without_checkpoint_raises(tmp_path):
    trainer = make(tmp_path, max_steps=2)
    with pytest.raises(ValueError, match="No valid checkpoint"):
        os.makedirs(trainer.args.output_dir)
        trainer.train(resume_from_checkpoint=True)


# ---- callbacks ----------------------------------------------------------------------------------------------------


def _recorder(base):
    class Recorder(base):
        def __init__(self):
            self.events = []

    for event in (
        "on_init_end on_train_begin on_train_end on_epoch_begin on_epoch_end on_step_begin on_pre_optimizer_step "
        "on_optimizer_step on_substep_end on_step_end on_evaluate on_predict on_save on_log on_prediction_step"
    ).split():
        setattr(Recorder, event, lambda self, args, state, control, _e=event, **kw: self.events.append(_e))
    return Recorder()


def test_callback_events_in_transformers_order(tmp_path):
    kw = dict(num_train_epochs=2, gradient_accumulation_steps=2, logging_steps=2, eval_strategy="epoch",
              save_strategy="epoch")  # fmt: skip
    events = {}
    for name, trainer_cls, args_cls, base in (
        ("hf", transformers.Trainer, transformers.TrainingArguments, transformers.TrainerCallback),
        ("ft", Trainer, TrainingArguments, TrainerCallback),
    ):
        rec = _recorder(base)  # ftrain accepts a transformers.TrainerCallback too (checked below)
        args = args_cls(output_dir=str(tmp_path / name), **{**BASE, **kw})
        trainer_cls(model=tiny_gpt2(), args=args, train_dataset=rows(12), eval_dataset=rows(8), callbacks=[rec]).train()
        events[name] = rec.events
    assert "on_substep_end" in events["ft"] and events["ft"].count("on_save") == 2
    assert events["ft"] == events["hf"]
    hf_style = _recorder(transformers.TrainerCallback)
    trainer = make(tmp_path, "x", max_steps=1, save_strategy="no")
    trainer.add_callback(hf_style)
    trainer.train()
    assert hf_style.events[:3] == ["on_train_begin", "on_epoch_begin", "on_step_begin"]


def test_callback_can_stop_training(tmp_path):
    trainer = make(tmp_path, max_steps=10, save_strategy="no", logging_steps=1)
    trainer.add_callback(StopAt(3))
    assert trainer.train().global_step == 3
    assert [e["step"] for e in step_logs(trainer)] == [1, 2, 3]


# ---- evaluation, metrics, best model ------------------------------------------------------------------------------


def test_compute_metrics_gets_transformers_shapes(tmp_path):
    seen = {}

    def compute_metrics(pred):
        preds, labels = pred
        seen[type(pred).__module__.split(".")[0]] = (preds.shape, labels.shape)
        return {"token_acc": float((preds.argmax(-1)[:, :-1] == labels[:, 1:]).mean())}

    for name, trainer_cls, args_cls in (
        ("hf", transformers.Trainer, transformers.TrainingArguments),
        ("ft", Trainer, TrainingArguments),
    ):
        args = args_cls(output_dir=str(tmp_path / name), **BASE)
        trainer = trainer_cls(model=tiny_gpt2(), args=args, eval_dataset=rows(6), compute_metrics=compute_metrics)
        seen[name] = trainer.evaluate()
    assert seen["ftrain"] == seen["transformers"] == ((6, 8, 64), (6, 8))
    # exact: an argmax of float64 logits equal to ~1e-15 flips only on a tie that close
    assert seen["ft"]["eval_token_acc"] == seen["hf"]["eval_token_acc"]
    assert seen["ft"]["eval_loss"] == pytest.approx(seen["hf"]["eval_loss"], **APPROX64)  # the same float64 forward
    # transformers adds eval_model_preparation_time when it evaluates a model not yet prepared by accelerate
    assert set(seen["ft"]) == set(seen["hf"]) - {"eval_model_preparation_time"}
    assert seen["ft"]["eval_steps_per_second"] > 0


def test_predict_returns_predictions_and_test_metrics(tmp_path):
    out = make(tmp_path, max_steps=1).predict(rows(5))
    assert out.predictions.shape == (5, 8, 64) and out.label_ids.shape == (5, 8)
    assert "test_loss" in out.metrics and "test_runtime" in out.metrics


def test_load_best_model_at_end_keeps_and_loads_the_best(tmp_path):
    def compute_metrics(pred):  # a made-up metric that is best at step 2 of 4
        compute_metrics.calls += 1
        return {"score": [0.0, 5.0, 1.0, 2.0][compute_metrics.calls - 1]}

    compute_metrics.calls = 0
    args = TrainingArguments(output_dir=str(tmp_path / "best"), **BASE, max_steps=4, eval_strategy="steps",
                             eval_steps=1, save_steps=1, save_total_limit=1, load_best_model_at_end=True,
                             metric_for_best_model="score", logging_steps=1)  # fmt: skip
    trainer = Trainer(tiny_gpt2(), args, train_dataset=rows(), eval_dataset=rows(4), compute_metrics=compute_metrics)
    params_at = {}

    class Snapshot(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            params_at[state.global_step] = {k: v.clone() for k, v in trainer._train_state.params.items()}

    trainer.add_callback(Snapshot())
    trainer.train()
    assert trainer.state.best_global_step == 2 and trainer.state.best_metric == 5.0
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    assert sorted(os.listdir(tmp_path / "best")) == ["checkpoint-2"]  # limit 1: only the best survives the end
    for name, p in trainer.model.named_parameters():  # the best checkpoint's weights, loaded back: bitwise
        assert torch.equal(p, params_at[2][name]), name


# ---- custom losses ------------------------------------------------------------------------------------------------


class ZeroLossTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = model(**inputs).loss * 0.0
        return (loss, None) if return_outputs else loss


def test_compute_loss_override_trains_on_it(tmp_path):
    model = tiny_gpt2()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer = make(tmp_path, trainer_cls=ZeroLossTrainer, model=model, max_steps=3, weight_decay=0.5,
                   learning_rate=0.1, logging_steps=1, save_strategy="no")  # fmt: skip
    trainer.train()
    assert [e["loss"] for e in step_logs(trainer)] == [0.0, 0.0, 0.0]
    decay = set(trainer.get_decay_parameter_names())
    assert "transformer.h.0.attn.c_attn.weight" in decay and "transformer.h.0.ln_1.weight" not in decay
    for name, p in model.named_parameters():
        # Zero gradients: Adam's update is exactly 0, only the decoupled decay p *= 1 - lr_t * wd acts (lr_t: 0.1,
        # 0.067, 0.033), so |p| = 0.90·|before|. Both bounds hold by a margin of 5% or more, against float64 rounding
        # of 1e-15 relative, so they need no slack (a zero stays exactly zero).
        expected = before[name] * (1 - 0.1 * 0.5) ** 3
        if name in decay:
            assert not torch.equal(p, before[name]), name
            assert (p.abs() <= before[name].abs()).all() and (p.abs() >= expected.abs()).all(), name
        else:
            assert torch.equal(p, before[name]), name  # no decay, no update: untouched bit for bit


def test_training_step_override_calling_backward_is_refused(tmp_path):
    class Custom(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            loss.backward()
            return loss.detach()

    trainer = make(tmp_path, trainer_cls=Custom, max_steps=1, save_strategy="no")
    with pytest.raises(RuntimeError, match="called backward"):
        trainer.train()


# ---- export -------------------------------------------------------------------------------------------------------


def test_save_model_loads_with_from_pretrained(tmp_path):
    trainer = make(tmp_path, max_steps=2, save_strategy="no")
    trainer.train()
    trainer.save_model(str(tmp_path / "export"))
    loaded = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "export")).eval()
    ids = torch.tensor(rows(2)["input_ids"])
    trainer.model.eval()
    assert torch.equal(loaded(ids).logits, trainer.model(ids).logits)  # a save/load round trip, same kernels: bitwise
    assert json.loads((tmp_path / "export" / "training_args.json").read_text())["max_steps"] == 2


# ---- bad input ----------------------------------------------------------------------------------------------------


def test_bad_input_fails_at_construction(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), **BASE, eval_strategy="steps")
    with pytest.raises(ValueError, match="eval_dataset"):
        Trainer(tiny_gpt2(), args, train_dataset=rows())
    args = TrainingArguments(output_dir=str(tmp_path), **BASE)
    with pytest.raises(ValueError, match="not both"):
        Trainer(tiny_gpt2(), args, model_init=tiny_gpt2)
    model = tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(TypeError, match=r"optimizers=\(None, scheduler\)"):
        Trainer(model, args, optimizers=(None, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)))
    with pytest.raises(TypeError, match="cannot translate the optimizer class torch.optim.nadam.NAdam"):
        Trainer(model, args, optimizers=(torch.optim.NAdam(model.parameters()), None))
    with pytest.raises(ValueError, match=r"AdamW\(amsgrad=True\) has no ftrain equivalent"):
        Trainer(model, args, optimizers=(torch.optim.AdamW(model.parameters(), amsgrad=True), None))
    with pytest.raises(ValueError, match="not parameters of GPT2LMHeadModel"):
        Trainer(model, args, optimizers=(torch.optim.AdamW(tiny_gpt2().parameters()), None))


def test_ftrain_optimizer_is_accepted(tmp_path):
    model = tiny_gpt2()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), **{**BASE, "max_steps": 1, "save_strategy": "no"})
    trainer = Trainer(model, args, train_dataset=rows(), optimizers=(optim.sgd(0.5), None))
    trainer.train()
    assert trainer.get_learning_rates() == [0.5]  # the constant the optimizer was built with, read back
    assert not torch.equal(model.transformer.wte.weight, before["transformer.wte.weight"])  # it moved
