"""The Hugging Face Trainer family imported from ftrain, the ``get_scheduler`` family, and ``Seq2SeqTrainer``.

The reference is transformers itself, run in the same test: its ``get_scheduler`` / ``get_*_schedule*`` functions
(the torch optimizer's learning rate after each ``scheduler.step()``) and its ``Seq2SeqTrainer`` on the same tiny
float64 T5 and BART, the same data and the same arguments. Schedules are float64 on both sides (``FLOAT64``); the
trainers do the same float64 arithmetic, so losses agree to ``FLOAT64`` and generated ids exactly.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch
from tolerances import FLOAT64

import ftrain
import ftrain.trainer
from ftrain.schedules import SCHEDULE_NAMES, plateau_update

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from ftrain.trainer.plan import make_plan  # noqa: E402
from ftrain.trainer.seq2seq import SEQ2SEQ_DISPOSITIONS, Seq2SeqTrainer, Seq2SeqTrainingArguments  # noqa: E402

APPROX64 = {"rel": FLOAT64["rtol"], "abs": FLOAT64["atol"]}

# ----------------------------------------------------------------------------------------------------------
# Names


#: What HF training scripts (transformers' examples/pytorch) import with the Trainer.
HF_TRAINER_NAMES = (
    "Trainer", "TrainingArguments", "Seq2SeqTrainer", "Seq2SeqTrainingArguments", "TrainerCallback", "TrainerState",
    "TrainerControl", "EarlyStoppingCallback", "PrinterCallback", "ProgressCallback", "DefaultFlowCallback",
    "set_seed", "enable_full_determinism", "HfArgumentParser", "IntervalStrategy", "SchedulerType", "EvalPrediction",
    "get_scheduler", "default_data_collator", "DataCollatorWithPadding", "DataCollatorForLanguageModeling",
    "DataCollatorForSeq2Seq", "DataCollatorForTokenClassification", "DataCollatorForMultipleChoice",
)  # fmt: skip
#: From ``transformers.trainer_utils``, which the example scripts import too.
TRAINER_UTILS_NAMES = ("get_last_checkpoint", "PredictionOutput", "TrainOutput")
#: Every scheduler function ``transformers`` exports from ``transformers.optimization``.
SCHEDULE_FUNCTIONS = tuple(
    name for name in transformers.optimization.__dict__ if name.startswith("get_") and name in dir(transformers)
)


def test_schedule_functions_are_transformers_exports():
    assert len(SCHEDULE_FUNCTIONS) == 13 and "get_wsd_schedule" in SCHEDULE_FUNCTIONS


@pytest.mark.parametrize("name", HF_TRAINER_NAMES + TRAINER_UTILS_NAMES + SCHEDULE_FUNCTIONS)
def test_every_hf_trainer_name_imports_from_ftrain(name):
    ours = getattr(ftrain, name)
    assert ours is getattr(ftrain.trainer, name)
    if name in ftrain.trainer.FROM_TRANSFORMERS:
        assert ours is getattr(transformers, name)  # re-exported as it is
    else:
        assert ours.__module__.startswith("ftrain.")  # ftrain's own


def test_the_top_level_names_are_the_trainer_packages():
    assert ftrain._FROM_TRAINER == set(ftrain.trainer.__all__)
    assert set(ftrain.trainer.FROM_TRANSFORMERS) <= set(dir(transformers))
    with pytest.raises(AttributeError, match="has no attribute 'Trainerr'"):
        ftrain.Trainerr  # noqa: B018


def test_imports_are_lazy_and_a_reexport_without_transformers_says_what_to_install():
    """One subprocess: ``import ftrain`` loads neither the shell nor transformers; ftrain's own names load the
    shell, still not transformers; a re-exported collator, with transformers unavailable, raises a teaching error."""
    code = (
        "import sys, ftrain\n"
        "print(sorted(m for m in ('transformers', 'ftrain.trainer') if m in sys.modules))\n"
        "ftrain.get_scheduler, ftrain.Seq2SeqTrainer\n"
        "print(sorted(m for m in ('transformers', 'ftrain.trainer') if m in sys.modules))\n"
        "sys.modules['transformers'] = None  # as if it were not installed\n"
        "try:\n    ftrain.DataCollatorForSeq2Seq\nexcept ImportError as e:\n    print(e)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    before, after, message = out.strip().split("\n", 2)
    assert (before, after) == ("[]", "['ftrain.trainer']")
    assert "ftrain.DataCollatorForSeq2Seq is transformers' DataCollatorForSeq2Seq" in message
    assert "pip install transformers" in message and "make_padding_collator" in message


# ----------------------------------------------------------------------------------------------------------
# Schedules: ftrain's value at step k == the torch optimizer's lr after k scheduler.step() calls.

LR, W, T = 0.1, 3, 12
STEP_KWARGS = {
    "cosine": {"num_cycles": 0.7},
    "cosine_with_restarts": {"num_cycles": 2},
    "polynomial": {"lr_end": 1e-3, "power": 2.0},
    "inverse_sqrt": {"timescale": 4},
    "cosine_with_min_lr": {"min_lr": 0.01},
    "cosine_warmup_with_min_lr": {"min_lr_rate": 0.1, "warmup_lr_rate": 0.2},
    "warmup_stable_decay": {"num_decay_steps": 4, "decay_type": "1-sqrt", "min_lr_ratio": 0.05},
}
STEP_SCHEDULES = [name for name in SCHEDULE_NAMES if name not in ("reduce_lr_on_plateau", "greedy")]


def _torch_lrs(scheduler, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return lrs


def _sgd(lr: float = LR) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _ftrain_lrs(schedule, steps: int) -> list[float]:
    return [float(schedule(torch.tensor(k))) for k in range(steps)]


@pytest.mark.parametrize("name", STEP_SCHEDULES)
def test_get_scheduler_matches_transformers_at_every_step(name):
    kwargs = STEP_KWARGS.get(name, {})
    hf = transformers.get_scheduler(name, _sgd(), num_warmup_steps=W, num_training_steps=T,
                                    scheduler_specific_kwargs=kwargs)  # fmt: skip
    ours = ftrain.get_scheduler(name, LR, num_warmup_steps=W, num_training_steps=T, scheduler_specific_kwargs=kwargs)
    assert _ftrain_lrs(ours, T + 3) == pytest.approx(_torch_lrs(hf, T + 3), **APPROX64)
    # an ftrain optimizer description (factory, kwargs) carries the learning rate as a number does
    described = ftrain.get_scheduler(name, (ftrain.optim.adamw, {"learning_rate": LR}), W, T, kwargs)
    assert _ftrain_lrs(described, T + 3) == _ftrain_lrs(ours, T + 3)


#: Each transformers function with positional arguments as a script passes them (no last_epoch).
FUNCTION_ARGS = {
    "get_constant_schedule": (),
    "get_constant_schedule_with_warmup": (W,),
    "get_linear_schedule_with_warmup": (W, T),
    "get_cosine_schedule_with_warmup": (W, T, 1.5),
    "get_cosine_with_hard_restarts_schedule_with_warmup": (W, T, 3),
    "get_polynomial_decay_schedule_with_warmup": (W, T, 1e-4, 0.5),
    "get_inverse_sqrt_schedule": (W, 5),
    "get_cosine_with_min_lr_schedule_with_warmup": (W, T, 0.5),
    "get_cosine_with_min_lr_schedule_with_warmup_lr_rate": (W, T, 0.5),
    "get_wsd_schedule": (W, 4, T),
}
FUNCTION_KWARGS = {
    "get_cosine_with_min_lr_schedule_with_warmup": {"min_lr_rate": 0.2},
    "get_cosine_with_min_lr_schedule_with_warmup_lr_rate": {"min_lr": 0.02, "warmup_lr_rate": 0.3},
    "get_wsd_schedule": {"warmup_type": "cosine", "decay_type": "linear", "min_lr_ratio": 0.1},
}


@pytest.mark.parametrize("name", sorted(FUNCTION_ARGS))
@pytest.mark.parametrize("last_epoch", [-1, 4])
def test_each_schedule_function_matches_transformers(name, last_epoch):
    """Same positional arguments; ``last_epoch`` (a resumed torch scheduler) shifts the schedule as torch does."""
    args, kwargs = FUNCTION_ARGS[name], {**FUNCTION_KWARGS.get(name, {}), "last_epoch": last_epoch}
    optimizer = _sgd()
    if last_epoch != -1:  # torch requires the base lr recorded when a scheduler resumes
        optimizer.param_groups[0]["initial_lr"] = LR
    hf = getattr(transformers, name)(optimizer, *args, **kwargs)
    ours = getattr(ftrain, name)(LR, *args, **kwargs)
    assert _ftrain_lrs(ours, T + 2) == pytest.approx(_torch_lrs(hf, T + 2), **APPROX64)


def test_reduce_on_plateau_matches_torch():
    kwargs = {"factor": 0.5, "patience": 1, "min_lr": 0.02, "threshold": 0.01, "cooldown": 1}
    hf = transformers.get_scheduler("reduce_lr_on_plateau", _sgd(), scheduler_specific_kwargs=kwargs)
    tx = ftrain.get_scheduler("reduce_lr_on_plateau", LR, scheduler_specific_kwargs=kwargs)
    state = tx.init({"w": torch.zeros(1)})
    for metric in [3.0, 2.0, 2.0, 2.0, 2.5, 1.0, 1.0, 1.0, 1.0, 1.0]:
        hf.step(metric)
        state = plateau_update(state, metric)
        assert LR * float(state.scale) == pytest.approx(hf.optimizer.param_groups[0]["lr"], **APPROX64)
    assert float(state.scale) < 1  # the sequence did reduce


def test_get_scheduler_errors_teach():
    with pytest.raises(TypeError, match="got a torch.optim.SGD. .*Pass the learning rate instead"):
        ftrain.get_scheduler("linear", _sgd(), 1, 10)
    with pytest.raises(TypeError, match=r"has no numeric kwargs\['learning_rate'\]"):
        ftrain.get_linear_schedule_with_warmup((ftrain.optim.sgd, {}), 1, 10)
    with pytest.raises(ValueError, match=r"\['patient'\] are not arguments of greedy"):
        ftrain.get_scheduler("greedy", LR, scheduler_specific_kwargs={"patient": 1})
    with pytest.raises(ValueError, match="is not a valid SchedulerType"):
        ftrain.get_scheduler("cosine_restarts", LR, 1, 10)
    with pytest.raises(ValueError, match="requires `num_training_steps`"):  # transformers raises ValueError too
        ftrain.get_scheduler("linear", LR, num_warmup_steps=1)
    with pytest.raises(ValueError, match="last_epoch must be an int >= -1"):
        ftrain.get_constant_schedule(LR, last_epoch=-2)


# ----------------------------------------------------------------------------------------------------------
# Seq2SeqTrainingArguments


def _hf_seq2seq_fields() -> list[str]:
    import dataclasses

    plain = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    return [f.name for f in dataclasses.fields(transformers.Seq2SeqTrainingArguments) if f.name not in plain]


def test_every_seq2seq_field_has_a_disposition_naming_what_exists(tmp_path):
    assert sorted(SEQ2SEQ_DISPOSITIONS) == sorted(_hf_seq2seq_fields())
    trainer = Seq2SeqTrainer(t5(), Seq2SeqTrainingArguments(str(tmp_path), report_to="none", use_cpu=True))
    import operator

    for name, disposition in SEQ2SEQ_DISPOSITIONS.items():
        assert disposition.kind == "honoured", name
        for path in disposition.where:
            operator.attrgetter(path)(trainer)  # raises if the path does not exist


def test_seq2seq_arguments_are_validated_when_built():
    for bad, message in (
        ({"generation_max_length": 0}, "generation_max_length must be an int >= 1 or None, got 0"),
        ({"generation_num_beams": 1.5}, "generation_num_beams must be an int >= 1 or None"),
        ({"predict_with_generate": "yes"}, "predict_with_generate must be True or False"),
        ({"generation_config": 3}, "generation_config must be a transformers.GenerationConfig, a path"),
        ({"sortish_sampler": True, "train_sampling_strategy": "sequential"}, "sortish_sampler=True samples"),
    ):
        with pytest.raises(ValueError, match=message):
            Seq2SeqTrainingArguments("out", **bad)
    args = Seq2SeqTrainingArguments("out")
    args.generation_max_length = 0
    with pytest.raises(ValueError, match="generation_max_length must be"):  # the setters run the same pass
        args.set_evaluate(batch_size=4)


def test_sortish_sampler_samples_by_length():
    args = Seq2SeqTrainingArguments("out", sortish_sampler=True)
    assert args.train_sampling_strategy == "group_by_length"
    assert make_plan(args).data.sampling_strategy == "group_by_length"


def test_seq2seq_arguments_round_trip_and_parse(tmp_path):
    config = transformers.GenerationConfig(max_length=12, num_beams=3, decoder_start_token_id=0)
    args = Seq2SeqTrainingArguments("out", predict_with_generate=True, generation_config=config)
    d = args.to_dict()
    assert d["generation_config"] == config.to_dict()
    assert Seq2SeqTrainingArguments(**d).to_dict() == d
    hf = transformers.Seq2SeqTrainingArguments("out", predict_with_generate=True, generation_config=config)
    assert d["generation_config"] == hf.to_dict()["generation_config"]
    (parsed,) = ftrain.HfArgumentParser(Seq2SeqTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "o", "--predict_with_generate", "--generation_num_beams", "2", "--sortish_sampler",
         "--generation_config", str(tmp_path)], look_for_args_file=False,
    )  # fmt: skip
    assert (parsed.predict_with_generate, parsed.generation_num_beams, parsed.sortish_sampler) == (True, 2, True)
    assert parsed.generation_config == str(tmp_path)


def test_transformers_seq2seq_arguments_are_converted(tmp_path):
    config = transformers.GenerationConfig(num_beams=3, max_length=9, decoder_start_token_id=0)
    hf = transformers.Seq2SeqTrainingArguments(
        str(tmp_path), predict_with_generate=True, generation_num_beams=2, generation_config=config, use_cpu=True
    )
    trainer = Seq2SeqTrainer(t5(), hf)
    assert isinstance(trainer.args, Seq2SeqTrainingArguments)
    assert (trainer.generation_plan.predict_with_generate, trainer.generation_plan.num_beams) == (True, 2)
    assert trainer.model.generation_config.to_dict() == config.to_dict()


def test_seq2seq_trainer_refuses_what_it_cannot_use(tmp_path):
    with pytest.raises(TypeError, match="has none of the generation fields"):
        Seq2SeqTrainer(t5(), ftrain.TrainingArguments(str(tmp_path)))
    args = Seq2SeqTrainingArguments(str(tmp_path), predict_with_generate=True, report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="needs a model with a generate"):
        Seq2SeqTrainer(torch.nn.Linear(2, 2), args)
    model = t5()
    model.config.pad_token_id = None
    with pytest.raises(ValueError, match="finds no padding id"):
        Seq2SeqTrainer(model, args)
    bad = transformers.GenerationConfig(num_beams=1)
    bad.length_penalty = 2.0  # only used by beam search: transformers' strict validation refuses it
    with pytest.raises(ValueError, match="generation_config is not valid"):
        Seq2SeqTrainer(t5(), Seq2SeqTrainingArguments(str(tmp_path), generation_config=bad, use_cpu=True))


# ----------------------------------------------------------------------------------------------------------
# Seq2SeqTrainer against transformers'


def t5() -> torch.nn.Module:
    config = transformers.T5Config(
        vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(config).double()


def bart() -> torch.nn.Module:
    config = transformers.BartConfig(
        vocab_size=100, d_model=16, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, forced_eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    # untied: with d_model 16 and tied embeddings, two training steps collapse generation onto the eos id at once
    torch.manual_seed(0)
    return transformers.BartForConditionalGeneration(config).double()


def rows(n: int, seed: int, model_name: str = "t5"):
    """Sources of 7 tokens, targets of 4 tokens and the end-of-sequence id (ids from 3: 0-2 are special). All
    targets have the same length, so transformers' evaluation loss (a mean of batch means, weighted by rows) and
    ftrain's (token-weighted over the set) are the same quantity. For BART the rows carry ``decoder_input_ids`` (the
    labels shifted right), which exercise the rule that drops them before generating."""
    eos, start = (1, 0) if model_name == "t5" else (2, 2)
    g = torch.Generator().manual_seed(seed)
    src, tgt = torch.randint(3, 100, (n, 7), generator=g), torch.randint(3, 100, (n, 4), generator=g)
    tgt = torch.cat([tgt, torch.full((n, 1), eos)], dim=1)
    data = {"input_ids": src.tolist(), "attention_mask": torch.ones_like(src).tolist(), "labels": tgt.tolist()}
    if model_name == "bart":
        data["decoder_input_ids"] = torch.cat([torch.full((n, 1), start), tgt[:, :-1]], dim=1).tolist()
    return datasets.Dataset.from_dict(data)


ARGS = dict(
    report_to="none", use_cpu=True, max_steps=3, per_device_train_batch_size=4, per_device_eval_batch_size=3,
    learning_rate=1e-2, warmup_steps=1, save_strategy="no", train_sampling_strategy="sequential", disable_tqdm=True,
    predict_with_generate=True, generation_max_length=8, seed=0, eval_strategy="steps", eval_steps=2,
)  # fmt: skip
MODELS = {"t5": t5, "bart": bart}


def _run_both(tmp_path, model_name: str, **extra):
    """Both trainers: train 3 steps, evaluate (greedy, generation_max_length=8), predict with beams; the
    ``compute_metrics`` inputs, the outputs and the model's generation config afterwards."""
    build = MODELS[model_name]
    out = {}
    for side, trainer_cls, args_cls in (
        ("hf", transformers.Seq2SeqTrainer, transformers.Seq2SeqTrainingArguments),
        ("ft", Seq2SeqTrainer, Seq2SeqTrainingArguments),
    ):
        seen = []

        def compute_metrics(prediction, seen=seen):
            seen.append((prediction.predictions, prediction.label_ids))
            return {"long": float((prediction.predictions > 2).sum(-1).mean())}

        args = args_cls(str(tmp_path / side), **{**ARGS, **extra})
        trainer = trainer_cls(model=build(), args=args, train_dataset=rows(12, 0, model_name),
                              eval_dataset=rows(7, 1, model_name), compute_metrics=compute_metrics)  # fmt: skip
        trainer.train()
        evaluated = trainer.evaluate()
        predicted = trainer.predict(rows(5, 2, model_name), num_beams=2, max_new_tokens=4)
        out[side] = (seen, evaluated, predicted, trainer.model.generation_config.to_dict())
    return out


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_evaluate_and_predict_with_generate_match_transformers(tmp_path, model_name, one_thread):
    runs = _run_both(tmp_path, model_name)
    (hf_seen, hf_eval, hf_pred, hf_config), (ft_seen, ft_eval, ft_pred, ft_config) = runs["hf"], runs["ft"]
    # compute_metrics received the same arrays: generated ids (greedy in the evaluations during training, at steps 2
    # and 3, the last, and in evaluate(); then 2 beams in predict()) and labels, padded alike
    assert len(ft_seen) == len(hf_seen) == 4
    for (hp, hl), (fp, fl) in zip(hf_seen, ft_seen):
        assert fp.dtype == hp.dtype and fl.dtype == hl.dtype
        np.testing.assert_array_equal(fp, hp)
        np.testing.assert_array_equal(fl, hl)
    assert (hf_seen[0][0] > 2).any(axis=1).all()  # real tokens were generated, not only padding
    np.testing.assert_array_equal(ft_pred.predictions, hf_pred.predictions)
    np.testing.assert_array_equal(ft_pred.label_ids, hf_pred.label_ids)
    # float64 models trained alike: the losses are the same computation
    assert ft_eval["eval_loss"] == pytest.approx(hf_eval["eval_loss"], **APPROX64)
    assert ft_pred.metrics["test_loss"] == pytest.approx(hf_pred.metrics["test_loss"], **APPROX64)
    assert ft_eval["eval_long"] == hf_eval["eval_long"] and ft_pred.metrics["test_long"] == hf_pred.metrics["test_long"]
    assert set(ft_eval) == set(hf_eval) and set(ft_pred.metrics) == set(hf_pred.metrics)
    assert ft_config == hf_config  # the generation config is left as transformers leaves it


def test_generation_config_and_gen_kwargs_match_transformers(tmp_path, one_thread):
    """A saved GenerationConfig folder (num_beams=2, max_length 6) set on the model; ``evaluate(num_beams=1)``
    overrides it for one call; a subclass passing its own ``gen_kwargs`` to ``prediction_step`` wins over both."""
    folder = tmp_path / "generation"
    transformers.GenerationConfig(num_beams=2, max_length=6, decoder_start_token_id=0, eos_token_id=1,
                                  pad_token_id=0).save_pretrained(folder)  # fmt: skip
    results = {}
    for side, base, args_cls in (
        ("hf", transformers.Seq2SeqTrainer, transformers.Seq2SeqTrainingArguments),
        ("ft", Seq2SeqTrainer, Seq2SeqTrainingArguments),
    ):

        class Greedy3(base):
            def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
                return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys, max_new_tokens=3,
                                               num_beams=1)  # fmt: skip

        args = args_cls(str(tmp_path / side), **{**ARGS, "generation_max_length": None, "eval_strategy": "no",
                                                  "generation_config": str(folder)})  # fmt: skip
        plain = base(model=t5(), args=args)
        custom = Greedy3(model=t5(), args=args)
        data = rows(5, 3)
        results[side] = [
            plain.predict(data).predictions,  # the folder's config: 2 beams, max_length 6
            plain.predict(data, num_beams=1).predictions,
            custom.predict(data).predictions,
            plain.model.generation_config.to_dict(),
        ]
    for hf, ft in zip(results["hf"][:3], results["ft"][:3]):
        np.testing.assert_array_equal(ft, hf)
    assert results["ft"][3] == results["hf"][3]
    assert results["ft"][0].shape[1] == 6  # padded to the config's max_length, as transformers


def test_generation_reads_the_prepared_inputs_as_transformers(tmp_path, one_thread):
    """transformers' ``prediction_step`` generates from ``self._prepare_inputs(inputs)`` (on ``args.device``, with
    what an override changes), called once per batch: a subclass masking the last source tokens there changes the
    generated ids, the same on both sides."""
    results, calls = {}, {"hf": 0, "ft": 0}
    for side, base, args_cls in (
        ("hf", transformers.Seq2SeqTrainer, transformers.Seq2SeqTrainingArguments),
        ("ft", Seq2SeqTrainer, Seq2SeqTrainingArguments),
    ):

        class MaskTail(base):
            def _prepare_inputs(self, inputs, side=side):
                calls[side] += 1
                inputs = dict(super()._prepare_inputs(inputs))
                mask = inputs["attention_mask"].clone()
                mask[:, -4:] = 0  # out of place: the batch itself is left as it is
                inputs["attention_mask"] = mask
                return inputs

        args = args_cls(str(tmp_path / side), **{**ARGS, "eval_strategy": "no"})
        data = rows(5, 4)
        masked = MaskTail(model=t5(), args=args).predict(data)
        plain = base(model=t5(), args=args).predict(data)
        results[side] = (masked, plain)
    (hf_masked, hf_plain), (ft_masked, ft_plain) = results["hf"], results["ft"]
    assert calls["ft"] == calls["hf"] == 2  # 5 rows, 3 per batch
    assert not np.array_equal(hf_masked.predictions, hf_plain.predictions)  # the mask matters to generation
    np.testing.assert_array_equal(ft_masked.predictions, hf_masked.predictions)
    np.testing.assert_array_equal(ft_plain.predictions, hf_plain.predictions)
    assert ft_masked.metrics["test_loss"] == pytest.approx(hf_masked.metrics["test_loss"], **APPROX64)
