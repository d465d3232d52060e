"""The Trainer's hyper-parameter search (HyperparameterSearch), ray tune backend: trials run in ray workers; their
objectives are checked against the same hyper-parameters retrained here with a plain Trainer.

A worker is another process, whose thread count (and so float32 reduction order) need not be this one's, so the
model is float64 and a reported objective must equal the retrained eval_loss to ``FLOAT64`` (``APPROX64``)."""

import math
import os
import sys
import threading

import pytest
import torch

ray = pytest.importorskip("ray")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from ray import tune  # noqa: E402
from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining  # noqa: E402
from transformers import trainer_utils as hf_trainer_utils  # noqa: E402

import ftrain.trainer.hp_search as hp_search  # noqa: E402
from ftrain.trainer import Trainer, TrainingArguments  # noqa: E402
from ftrain.trainer.hp_search import (  # noqa: E402
    BestRun,
    HPSearchBackend,
    HyperparameterSearch,
    default_compute_objective,
    default_hp_space_ray,
)
from tests.trainer.test_trainer import BASE as TRAINER_BASE  # noqa: E402
from tests.trainer.test_trainer import rows  # noqa: E402
from tests.trainer.test_trainer_parity import APPROX64  # noqa: E402

# The trials unpickle this module's model_init / hp_name in ray workers, which need not be able to import a test
# module by name: ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

BASE = {**TRAINER_BASE, "save_strategy": "no"}
QUIET = dict(verbose=0)  # ray's progress table is noise in test output


def gpt2(dropout):
    config = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16, resid_pdrop=dropout, embd_pdrop=0,
        attn_pdrop=0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double()  # float64: see the module docstring
    model.loss_type = "ForCausalLM"
    return model


def tiny_gpt2():  # model_init with no argument (with one, it gets the trial)
    return gpt2(0.1)


def make(tmp_path, name="out", model_init=tiny_gpt2, model=None, **kw):
    args = TrainingArguments(output_dir=str(tmp_path / name), **{**BASE, **kw})
    return Trainer(model=model, model_init=None if model is not None else model_init, args=args,
                   train_dataset=rows(), eval_dataset=rows(8, seed=2))  # fmt: skip


def retrained_eval_losses(tmp_path, name, model=None, **kw):
    """eval_loss after each evaluation of a plain (no search) Trainer with these arguments, in this process."""
    trainer = make(tmp_path, name, model=model, **kw)
    trainer.train()
    return [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]


@pytest.fixture(scope="module")
def ray_session(one_thread):
    """One local ray for the module (starting one costs seconds). Ray gives each 1-CPU trial OMP_NUM_THREADS=1, so
    this process retrains on one thread too (``one_thread``): the same reductions, the same numbers."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


# ---- without trials ----------------------------------------------------------------------------------------------


def test_default_space_matches_transformers():
    ours, theirs = default_hp_space_ray(None), hf_trainer_utils.default_hp_space_ray(None)
    assert sorted(ours) == sorted(theirs)
    for key, domain in ours.items():
        other = theirs[key]
        assert type(domain) is type(other) and type(domain.get_sampler()) is type(other.get_sampler())
        assert getattr(domain, "categories", None) == getattr(other, "categories", None)
        assert (getattr(domain, "lower", None), getattr(domain, "upper", None)) == (
            getattr(other, "lower", None),
            getattr(other, "upper", None),
        )


def test_auto_backend_order(monkeypatch):
    assert hp_search.default_hp_search_backend() == "optuna"  # both installed: transformers' order
    monkeypatch.setattr(hp_search, "_available", lambda backend: backend is HPSearchBackend.RAY)
    assert hp_search.default_hp_search_backend() == "ray"


def test_report_to_ray(monkeypatch):
    reports = []
    monkeypatch.setattr(tune, "report", lambda metrics, **kw: reports.append((metrics, kw)))
    search = HyperparameterSearch(trainer=None)
    search.backend, search.compute_objective = HPSearchBackend.RAY, default_compute_objective
    metrics = {"eval_loss": 0.5, "eval_accuracy": 0.25, "epoch": 1.0}
    search.report({"learning_rate": 0.1}, 3, metrics)
    assert reports == [({**metrics, "objective": 0.25}, {})] and search.objective == 0.25
    assert "objective" not in metrics  # the caller's dict is left alone


def test_shipped_trainer_components_serve_the_copy(tmp_path, monkeypatch):
    """The copy ray pickles into each trial has its own components: the search (with the search's settings), the Hub
    client (same repository, no pending push), the loop, the evaluator, the checkpoints. A component still serving the
    original Trainer would evaluate the original's untrained model and report to its callbacks."""
    trainer = make(tmp_path, eval_strategy="epoch")
    trainer.hub_model_id, trainer.push_in_progress = "user/out", object()
    search = trainer._search
    search.backend, search.hp_space, search.hp_name = HPSearchBackend.RAY, default_hp_space_ray, str
    search.compute_objective, search.trial, search.objective = default_compute_objective, {"seed": 3}, 1.0
    shipped = search.ray_trainer()
    assert shipped._search is not search and shipped._search.trainer is shipped
    assert (shipped.hp_search_backend, shipped.hp_space, shipped.hp_name, shipped.compute_objective) == (
        HPSearchBackend.RAY, default_hp_space_ray, str, default_compute_objective
    )  # fmt: skip
    assert shipped._trial is None and shipped.objective is None  # no trial yet in the copy
    assert shipped._hub.trainer is shipped and shipped.hub_model_id == "user/out" and shipped.push_in_progress is None
    for name in ("_loop", "_evaluator", "_checkpoints"):  # the other components, built by the Trainer
        assert getattr(shipped, name).trainer is shipped and getattr(trainer, name).trainer is trainer
    assert shipped.gather_function.__self__ is shipped and shipped.model is None
    (callback,) = [cb for cb in shipped.callback_handler.callbacks if isinstance(cb, hp_search._HPSearchCallback)]
    assert callback.search is shipped._search
    # the original is left as it was
    assert trainer._search is search and search.trial == {"seed": 3} and trainer.push_in_progress is not None
    assert trainer._evaluator.trainer is trainer and trainer.model is not None


def test_ray_errors(tmp_path, ray_session):
    def optuna_space(trial):
        return {"learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)}

    search = dict(backend="ray", n_trials=1)
    no_init = make(tmp_path, "model", model=tiny_gpt2())
    with pytest.raises(RuntimeError, match="model_init"):
        no_init.hyperparameter_search(**search)
    trainer = make(tmp_path)
    with pytest.raises(TypeError, match=r"hp_space\(None\) raised AttributeError.*optuna-style"):
        trainer.hyperparameter_search(hp_space=optuna_space, **search)
    with pytest.raises(TypeError, match="must return a dict"):
        trainer.hyperparameter_search(hp_space=lambda _: [("learning_rate", 0.1)], **search)
    with pytest.raises(ValueError, match="direction='minimize' or 'maximize'"):
        trainer.hyperparameter_search(direction=["minimize", "maximize"], **search)
    with pytest.raises(ValueError, match=r"'num_samples' \(pass n_trials\)"):
        trainer.hyperparameter_search(num_samples=3, **search)
    with pytest.raises(TypeError, match=r"got \['n_jobs'\], which are neither tune.TuneConfig"):
        trainer.hyperparameter_search(n_jobs=2, **search)
    with pytest.raises(RuntimeError, match="AsyncHyperBandScheduler as a scheduler but you haven't enabled evaluation"):
        trainer.hyperparameter_search(scheduler=ASHAScheduler(), **search)
    with pytest.raises(NotImplementedError, match="PopulationBasedTraining restarts trials"):
        trainer.hyperparameter_search(
            scheduler=PopulationBasedTraining(hyperparam_mutations={"learning_rate": [1e-3]}), **search
        )
    trainer.lock = threading.Lock()  # ray cannot pickle it into the trials
    with pytest.raises(TypeError, match=r"Trainer attributes that do not pickle: \[.lock.\]"):
        trainer.hyperparameter_search(**search)
    assert trainer.hp_search_backend is None and trainer.args.output_dir == str(tmp_path / "out")


# ---- with trials -------------------------------------------------------------------------------------------------


def test_ray_best_run_matches_retraining(tmp_path, ray_session):
    """Two trials (a grid over the learning rate, a sampled seed), two evaluations each: every reported objective is
    the eval_loss of the same arguments retrained here, and the best run is the lower one."""
    trainer = make(tmp_path, eval_strategy="epoch", num_train_epochs=2)
    model = trainer.model
    space = {"learning_rate": tune.grid_search([1e-3, 1e-2]), "seed": tune.randint(1, 40)}
    best = trainer.hyperparameter_search(
        hp_space=lambda _: space, n_trials=1, backend="ray", storage_path=str(tmp_path / "ray"), **QUIET
    )
    assert isinstance(best, BestRun) and best.run_summary is not None
    assert trainer.hp_search_backend is None and trainer.model is model  # the Trainer is left as it was
    assert trainer.args.learning_rate == 1e-3 and trainer.args.output_dir == str(tmp_path / "out")
    objectives = {}
    for result in best.run_summary:
        params = result.config
        assert params["learning_rate"] in (1e-3, 1e-2) and 1 <= params["seed"] < 40  # drawn from the space
        reported = result.metrics_dataframe["objective"].tolist()
        expected = retrained_eval_losses(tmp_path, f"again-{params['learning_rate']}", eval_strategy="epoch",
                                         num_train_epochs=2, **params)  # fmt: skip
        assert reported == pytest.approx(expected, **APPROX64) and len(expected) == 2  # one report per evaluation
        objectives[result.metrics["trial_id"]] = expected[-1]
    assert len(objectives) == 2
    best_id = min(objectives, key=objectives.get)
    assert best.run_id == best_id and best.objective == pytest.approx(objectives[best_id], **APPROX64)
    assert best.hyperparameters == next(r.config for r in best.run_summary if r.metrics["trial_id"] == best_id)


def test_ray_final_evaluate_trial_model_init_and_failures(tmp_path, ray_session):
    """No evaluation during training: one final evaluate() is reported. model_init gets the trial's config (a key
    that is no TrainingArguments field reaches it), and checkpoints go to output_dir/run-<trial id>."""

    def model_init(trial):  # the Trainer's constructor calls it with None, as transformers'
        return gpt2(0.1 if trial is None else trial["dropout"])

    trainer = make(tmp_path, model_init=model_init, max_steps=2, save_steps=2, save_strategy="steps")
    space = {"learning_rate": 3e-3, "dropout": 0.2}
    best = trainer.hyperparameter_search(
        hp_space=lambda _: space, n_trials=1, backend="ray", direction="maximize",
        storage_path=str(tmp_path / "ray"), **QUIET,
    )  # fmt: skip
    (result,) = best.run_summary
    assert result.metrics_dataframe.shape[0] == 1 and result.metrics["objective"] == result.metrics["eval_loss"]
    assert best.hyperparameters == space
    expected = retrained_eval_losses(tmp_path, "again", model=gpt2(0.2), max_steps=2, learning_rate=3e-3,
                                     eval_strategy="steps", eval_steps=2)  # fmt: skip
    assert best.objective == pytest.approx(expected[-1], **APPROX64)
    assert os.path.isdir(tmp_path / "out" / f"run-{best.run_id}" / "checkpoint-2")
    # the control: without the trial's dropout the eval_loss differs, by far more than isclose's 1e-9 relative
    assert not math.isclose(expected[-1], retrained_eval_losses(tmp_path, "drop", model=gpt2(0.0), max_steps=2,
                            learning_rate=3e-3, eval_strategy="steps", eval_steps=2)[-1])  # fmt: skip

    # A value that is no valid learning rate fails in the trial: the search says so, with the trial's error.
    with pytest.raises(
        RuntimeError,
        match=r"1 of 1 ray tune trials failed; the first error: ValueError: .*TrainingArguments.learning_rate to 'fa",
    ):
        trainer.hyperparameter_search(
            hp_space=lambda _: {"learning_rate": "fast", "dropout": 0.0}, n_trials=1, backend="ray",
            storage_path=str(tmp_path / "ray"), **QUIET,
        )  # fmt: skip
