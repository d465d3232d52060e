"""The Trainer's hyper-parameter search (HyperparameterSearch, optuna) and Hub (HubClient: model card, repo, pushes;
the network is faked), and that both call back through a subclass's overrides."""

import fnmatch
import os
import types
from concurrent.futures import Future

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
optuna = pytest.importorskip("optuna")
huggingface_hub = pytest.importorskip("huggingface_hub")
yaml = pytest.importorskip("yaml")

from transformers import modelcard as hf_modelcard  # noqa: E402
from transformers import trainer_utils as hf_trainer_utils  # noqa: E402

import ftrain.trainer.hp_search as hp_search  # noqa: E402
from ftrain.trainer import Trainer, TrainingArguments  # noqa: E402
from ftrain.trainer.hp_search import (  # noqa: E402
    BestRun,
    HPSearchBackend,
    HyperparameterSearch,
    default_compute_objective,
    default_hp_space_optuna,
)
from ftrain.trainer.hub import HubClient, make_markdown_table, parse_log_history, training_hyperparameters  # noqa: E402
from tests.trainer.test_trainer import BASE as TRAINER_BASE  # noqa: E402
from tests.trainer.test_trainer import rows, tiny_gpt2  # noqa: E402
from tests.trainer.test_trainer_parity import APPROX64  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


T = Trainer


BASE = {**TRAINER_BASE, "save_strategy": "no"}


def make(tmp_path, name="out", model_init=tiny_gpt2, model=None, **kw):
    args = TrainingArguments(output_dir=str(tmp_path / name), **{**BASE, **kw})
    return T(model=model, model_init=None if model is not None else model_init, args=args,
             train_dataset=rows(), eval_dataset=rows(8, seed=2))  # fmt: skip


def lr_space(trial):
    return {"learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)}


# ---- hyper-parameter search --------------------------------------------------------------------------------------


def test_defaults_match_transformers():
    trial = optuna.trial.FixedTrial(
        {"learning_rate": 3e-5, "num_train_epochs": 2, "seed": 7, "per_device_train_batch_size": 16}
    )
    assert default_hp_space_optuna(trial) == hf_trainer_utils.default_hp_space_optuna(trial)
    for metrics in [
        {"eval_loss": 1.5, "epoch": 2.0, "eval_runtime": 0.3, "eval_samples_per_second": 9.0},
        {"eval_loss": 1.5, "eval_accuracy": 0.25, "eval_f1": 0.5, "eval_steps_per_second": 3.0},
    ]:
        assert default_compute_objective(metrics) == hf_trainer_utils.default_compute_objective(metrics)
    assert BestRun._fields == hf_trainer_utils.BestRun._fields


def test_search_best_run_matches_retraining(tmp_path):
    trainer = make(tmp_path, eval_strategy="epoch", num_train_epochs=1)
    best = trainer.hyperparameter_search(
        hp_space=lr_space, n_trials=3, direction="minimize", backend="optuna",
        sampler=optuna.samplers.TPESampler(seed=0),
    )  # fmt: skip
    assert isinstance(best, BestRun) and best.run_id in {"0", "1", "2"} and best.run_summary is None
    assert set(best.hyperparameters) == {"learning_rate"}
    assert trainer.args.learning_rate == 1e-3 and trainer.args.output_dir == str(tmp_path / "out")  # restored
    assert trainer.hp_search_backend is None

    again = make(tmp_path, "again", eval_strategy="epoch", num_train_epochs=1, **best.hyperparameters)
    again.train()
    # the best trial's objective is the eval_loss of its arguments retrained: the same float64 training (tiny_gpt2)
    assert again.evaluate()["eval_loss"] == pytest.approx(best.objective, **APPROX64)


def test_search_without_eval_during_training_and_trial_model_init(tmp_path):
    seen = []

    def model_init(trial):
        seen.append(trial)
        return tiny_gpt2()

    trainer = make(tmp_path, model_init=model_init, max_steps=2)
    best = trainer.hyperparameter_search(
        hp_space=lr_space, n_trials=2, backend="optuna", sampler=optuna.samplers.TPESampler(seed=1),
        hp_name=lambda trial: f"trial-{trial.number}",
    )  # fmt: skip
    assert any(isinstance(t, optuna.Trial) for t in seen)  # model_init got the trial
    assert isinstance(best.objective, float)
    assert trainer.state.is_hyper_param_search and trainer.state.trial_name == "trial-1"
    assert set(trainer.state.trial_params) == {"learning_rate"}


def test_median_pruner_prunes(tmp_path):
    calls = []

    def objective(metrics):  # later trials get worse objectives at every step
        calls.append(metrics)
        return float(len(calls))

    storage = optuna.storages.InMemoryStorage()
    trainer = make(tmp_path, eval_strategy="steps", eval_steps=1, max_steps=4)
    best = trainer.hyperparameter_search(
        hp_space=lr_space, compute_objective=objective, n_trials=3, backend="optuna", study_name="prune",
        storage=storage, sampler=optuna.samplers.TPESampler(seed=0),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0),
    )  # fmt: skip
    states = [t.state for t in optuna.load_study(study_name="prune", storage=storage).trials]
    assert states[0] == optuna.trial.TrialState.COMPLETE
    assert states[1:] == [optuna.trial.TrialState.PRUNED] * 2
    assert best.run_id == "0" and best.objective == 4.0
    assert len(calls) == 4 + 1 + 1  # pruned at the first evaluation


def test_hp_search_setup_applies_params_on_a_copy(tmp_path, caplog):
    trainer = make(tmp_path)
    base = trainer.args
    trainer.hp_search_backend = HPSearchBackend.OPTUNA
    trainer.hp_space = lambda trial: {"learning_rate": 0.01, "num_train_epochs": 2, "not_a_field": 1}
    trial = optuna.trial.FixedTrial({}, number=5)
    trainer._hp_search_setup(trial)
    assert trainer.args is not base and base.learning_rate == 1e-3
    assert trainer.args.learning_rate == 0.01
    assert trainer.args.num_train_epochs == 2.0 and isinstance(trainer.args.num_train_epochs, float)
    assert trainer.args.output_dir == os.path.join(base.output_dir, "run-5")
    assert "not_a_field" in caplog.text


def test_report_to_hp_search():
    class FakeTrial:
        study = types.SimpleNamespace(directions=["minimize"])

        def __init__(self, prune):
            self.prune, self.reports = prune, []

        def report(self, value, step):
            self.reports.append((value, step))

        def should_prune(self):
            return self.prune

    ended = []
    trainer = types.SimpleNamespace(
        args="args", state="state", control="control",
        callback_handler=types.SimpleNamespace(on_train_end=lambda *a: ended.append(a)),
    )  # fmt: skip
    search = HyperparameterSearch(trainer)
    search.report(FakeTrial(prune=False), 3, {"eval_loss": 0.5})  # outside a search: nothing
    assert search.objective is None
    search.backend, search.compute_objective = HPSearchBackend.OPTUNA, default_compute_objective
    trial = FakeTrial(prune=False)
    search.report(trial, 3, {"eval_loss": 0.5, "epoch": 1.0})
    assert trial.reports == [(0.5, 3)] and search.objective == 0.5 and ended == []
    with pytest.raises(optuna.TrialPruned):
        search.report(FakeTrial(prune=True), 4, {"eval_loss": 0.4})
    assert ended == [("args", "state", "control")] and search.objective == 0.4  # on_train_end before the raise


def test_search_calls_back_through_trainer_overrides(tmp_path):
    """hyperparameter_search goes through the Trainer's hooks, so a subclass's _hp_search_setup, call_model_init,
    evaluate and _report_to_hp_search take part (transformers' run_hp_search_optuna and train() call them)."""
    calls = []

    class Spy(Trainer):
        def _hp_search_setup(self, trial):
            super()._hp_search_setup(trial)
            calls.append(("setup", trial.number, os.path.basename(self.args.output_dir)))

        def call_model_init(self, trial=None):
            calls.append(("init",))
            return super().call_model_init(trial)

        def _report_to_hp_search(self, trial, step, metrics):
            calls.append(("report", trial.number, step))
            self.objective = 100.0 - trial.number  # the override decides the objective: later trials look better

        def evaluate(self, *args, **kwargs):
            calls.append(("evaluate",))
            return super().evaluate(*args, **kwargs)

    args = TrainingArguments(output_dir=str(tmp_path / "out"), **{**BASE, "eval_strategy": "steps", "eval_steps": 1,
                                                                   "max_steps": 2})  # fmt: skip
    trainer = Spy(model_init=tiny_gpt2, args=args, train_dataset=rows(), eval_dataset=rows(8, seed=2))
    calls.clear()
    best = trainer.hyperparameter_search(hp_space=lr_space, n_trials=2, backend="optuna",
                                         sampler=optuna.samplers.TPESampler(seed=0))  # fmt: skip
    trial_calls = [("init",), ("init",), ("evaluate",), ("report", 0, 1), ("evaluate",), ("report", 0, 2)]
    assert calls[0] == ("setup", 0, "run-0") and calls[1:7] == trial_calls
    assert calls[7] == ("setup", 1, "run-1") and calls[8:] == [(c[0], 1, *c[2:]) if c[0] == "report" else c
                                                               for c in trial_calls]  # fmt: skip
    assert best.run_id == "1" and best.objective == 99.0  # the overriding objective reached the study
    assert trainer.objective == 99.0 and trainer._search.objective == 99.0  # the attribute is the component's
    assert trainer.hp_search_backend is None and trainer._trial is None and trainer.hp_space is lr_space


def test_search_errors(tmp_path, monkeypatch):
    trainer = make(tmp_path, model=tiny_gpt2())
    with pytest.raises(RuntimeError, match="model_init"):
        trainer.hyperparameter_search(backend="optuna", n_trials=1)
    with pytest.raises(RuntimeError, match="model_init"):
        trainer._hp_search_setup(optuna.trial.FixedTrial({}))
    with pytest.raises(ValueError):
        trainer.hyperparameter_search(backend="sigopt")
    with pytest.raises(NotImplementedError, match="use backend='optuna'.* or backend='ray'"):
        trainer.hyperparameter_search(backend="wandb")
    monkeypatch.setattr(hp_search, "_available", lambda backend: False)
    with pytest.raises(ImportError, match=r"pip install ftrain\[optuna\]"):
        trainer.hyperparameter_search(backend="optuna")
    with pytest.raises(ImportError, match=r"ray backend, but it is not installed. Run `pip install 'ray\[tune\]'`"):
        trainer.hyperparameter_search(backend="ray")
    with pytest.raises(RuntimeError, match=r"ftrain\[optuna\]"):
        trainer.hyperparameter_search()


# ---- model card --------------------------------------------------------------------------------------------------


def test_model_card(tmp_path):
    trainer = make(tmp_path, model=tiny_gpt2(), eval_strategy="epoch", num_train_epochs=2, logging_steps=1)
    trainer.train()
    trainer.create_model_card(dataset="toy", language="en", license="mit", tags="demo")
    text = open(tmp_path / "out" / "README.md", encoding="utf-8").read()
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["library_name"] == "transformers" and meta["language"] == ["en"] and meta["license"] == "mit"
    assert meta["tags"] == ["demo", "generated_from_trainer"]
    assert meta["model-index"] == [{"name": "out", "results": []}]
    assert "\n# out\n\nThis model was trained from scratch on the toy dataset.\n" in text
    for section in ("## Model description", "## Intended uses & limitations", "## Training and evaluation data",
                    "## Training procedure", "### Training hyperparameters", "### Training results",
                    "### Framework versions"):  # fmt: skip
        assert f"\n{section}\n" in text
    for line in ("- learning_rate: 0.001", "- train_batch_size: 4", "- eval_batch_size: 4", "- seed: 0",
                 "- lr_scheduler_type: linear", f"- num_epochs: {trainer.args.num_train_epochs}",
                 "- optimizer: Use adamw_torch with betas=(0.9,0.999) and epsilon=1e-08 and "
                 "optimizer_args=No additional optimizer arguments"):  # fmt: skip
        assert f"\n{line}\n" in text
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    table = text.split("### Training results\n\n")[1].split("\n\n")[0].splitlines()
    assert table[0].split("|")[1:-1] == [" Training Loss ", " Epoch ", " Step ", " Validation Loss "]
    assert len(table) == 2 + len(evals) == 4
    for line, entry in zip(table[2:], evals):
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert cells[1:] == [hf_modelcard._maybe_round(entry[k]) for k in ("epoch", "step", "eval_loss")]
    assert "- Ftrain " in text and f"- Pytorch {torch.__version__}" in text
    assert f"- Transformers {transformers.__version__}" in text
    assert f"- Loss: {hf_modelcard._maybe_round(evals[-1]['eval_loss'])}" in text

    # The same table and results as transformers' own model card code.
    assert parse_log_history(trainer.state.log_history) == hf_modelcard.parse_log_history(trainer.state.log_history)
    lines = parse_log_history(trainer.state.log_history)[1]
    assert make_markdown_table(lines) == hf_modelcard.make_markdown_table(lines)


def test_hyperparameters_match_transformers(tmp_path):
    kw = dict(learning_rate=3e-4, per_device_train_batch_size=4, gradient_accumulation_steps=2, warmup_steps=3,
              max_steps=10, optim="adamw_torch", label_smoothing_factor=0.1, seed=3, report_to="none",
              use_cpu=True)  # fmt: skip
    ours = training_hyperparameters(TrainingArguments(output_dir=str(tmp_path / "a"), **kw))
    hf_args = transformers.TrainingArguments(output_dir=str(tmp_path / "b"), **kw)
    theirs = hf_modelcard.extract_hyperparameters_from_trainer(types.SimpleNamespace(args=hf_args))
    # transformers formats the OptimizerNames enum itself ("OptimizerNames.ADAMW_TORCH"); ftrain writes its value.
    theirs["optimizer"] = theirs["optimizer"].replace(str(hf_args.optim), hf_args.optim.value)
    assert ours == theirs


# ---- hub ----------------------------------------------------------------------------------------------------------


class FakeHub:
    def __init__(self, pending=False):
        self.repos, self.uploads, self.pending = [], [], pending

    def create_repo(self, repo_id, **kwargs):
        self.repos.append((repo_id, kwargs))
        return types.SimpleNamespace(repo_id=f"user/{repo_id}")

    def upload_folder(self, **kwargs):
        root, ignore = kwargs["folder_path"], kwargs.get("ignore_patterns") or []
        files = set()
        for dirpath, _, names in os.walk(root):
            for name in names:
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                if not any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(rel.split(os.sep)[0], p) for p in ignore):
                    files.add(rel)
        self.uploads.append({**kwargs, "files": files})
        if not kwargs.get("run_as_future"):
            return "commit-info"
        future = Future()
        if not self.pending:
            future.set_result("commit-info")
        return future


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub, "create_repo", fake.create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake.upload_folder)
    return fake


def test_init_hf_repo(tmp_path, hub):
    trainer = make(tmp_path, model=tiny_gpt2(), hub_token="tok", hub_private_repo=True)
    trainer.init_hf_repo()
    assert hub.repos == [("out", {"token": "tok", "private": True, "exist_ok": True})]
    assert trainer.hub_model_id == "user/out"
    trainer.args.hub_model_id = "org/named"
    trainer.init_hf_repo(token="other", private=False)
    assert hub.repos[-1] == ("org/named", {"token": "other", "private": False, "exist_ok": True})


def test_push_to_hub(tmp_path, hub):
    trainer = make(tmp_path, model=tiny_gpt2(), max_steps=2)
    trainer.train()
    out = tmp_path / "out"
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoint-1" / "x.bin").write_text("x")
    (out / "_private").write_text("x")
    result = trainer.push_to_hub(revision="dev", license="mit")
    assert result == "commit-info"
    assert hub.repos == [("out", {"token": None, "private": None, "exist_ok": True})]
    (upload,) = hub.uploads
    assert upload["repo_id"] == "user/out" and upload["folder_path"] == str(out)
    assert upload["commit_message"] == "End of training" and upload["revision"] == "dev"
    assert upload["ignore_patterns"] == ["_*", "checkpoint-*"] and upload["run_as_future"] is False
    assert {"model.safetensors", "config.json", "README.md", "training_args.json"} <= upload["files"]
    assert not any(f.startswith(("checkpoint-", "_")) for f in upload["files"])
    card = (out / "README.md").read_text()
    assert "license: mit" in card and "\n# out\n" in card
    trainer.push_to_hub(commit_message="again", blocking=False, token="t")
    assert len(hub.repos) == 1 and hub.uploads[-1]["run_as_future"] is True and hub.uploads[-1]["token"] == "t"


@pytest.mark.parametrize("strategy", ["end", "every_save", "checkpoint", "all_checkpoints"])
def test_push_from_checkpoint(tmp_path, hub, strategy):
    trainer = make(tmp_path, model=tiny_gpt2(), hub_strategy=strategy, save_strategy="steps", hub_revision="r")
    trainer.hub_model_id = "user/out"
    ckpt = tmp_path / "out" / "checkpoint-5"
    trainer.save_model(str(ckpt))
    (ckpt / "optimizer.pt").write_text("state")
    trainer.state.global_step = 5
    trainer._push_from_checkpoint(str(ckpt))
    out = tmp_path / "out"
    if strategy == "end":
        assert hub.uploads == [] and not (out / "model.safetensors").exists()
        return
    assert (out / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
    assert not (out / "optimizer.pt").exists()
    main = hub.uploads[0]
    assert main["folder_path"] == str(out) and main["commit_message"] == "Training in progress, step 5"
    assert main["ignore_patterns"] == ["_*", "checkpoint-*"] and main["run_as_future"] and main["revision"] == "r"
    assert {"model.safetensors", "config.json", "training_args.json"} <= main["files"]
    if strategy == "every_save":
        assert len(hub.uploads) == 1
        return
    (extra,) = hub.uploads[1:]
    assert extra["folder_path"] == str(ckpt) and extra["commit_message"] == "Training in progress, step 5, checkpoint"
    assert extra["path_in_repo"] == ("last-checkpoint" if strategy == "checkpoint" else "checkpoint-5")
    assert "optimizer.pt" in extra["files"]
    assert trainer.push_in_progress.is_done()


def test_push_waits_for_pending_push(tmp_path, hub):
    hub.pending = True
    trainer = make(tmp_path, model=tiny_gpt2(), hub_strategy="every_save", save_strategy="epoch")
    trainer.hub_model_id = "user/out"
    ckpt = tmp_path / "out" / "checkpoint-1"
    trainer.save_model(str(ckpt))
    trainer.state.epoch = 1.0
    trainer._push_from_checkpoint(str(ckpt))
    assert hub.uploads[0]["commit_message"] == "Training in progress, epoch 1"
    trainer._push_from_checkpoint(str(ckpt))  # skipped: the previous push is pending
    assert len(hub.uploads) == 1
    trainer.args.hub_always_push = True
    trainer._push_from_checkpoint(str(ckpt))
    assert len(hub.uploads) == 2 and len(trainer.push_in_progress.jobs) == 2
    for job in trainer.push_in_progress.jobs:
        job.set_result("done")
    trainer._finish_current_push()
    assert trainer.push_in_progress.is_done()


def test_push_calls_back_through_trainer_overrides(tmp_path, hub):
    """The Hub client goes through the Trainer's hooks: push_to_hub calls init_hf_repo, save_model,
    create_model_card and _finish_current_push, and each checkpoint saved during train() goes through
    _push_from_checkpoint, so a subclass's overrides take part."""
    calls = []

    class Spy(Trainer):
        def init_hf_repo(self, token=None, private=None):
            calls.append(("init_hf_repo", token, private))
            super().init_hf_repo(token=token, private=private)

        def save_model(self, output_dir=None, _internal_call=False):
            calls.append(("save_model", output_dir, _internal_call))
            super().save_model(output_dir, _internal_call)

        def create_model_card(self, **kwargs):
            calls.append(("create_model_card", kwargs))  # no card written: the override replaces it

        def _push_from_checkpoint(self, checkpoint_folder):
            calls.append(("push_from_checkpoint", os.path.basename(checkpoint_folder)))
            super()._push_from_checkpoint(checkpoint_folder)

        def _finish_current_push(self):
            pending = self.push_in_progress
            calls.append(("finish_current_push", None if pending is None else pending.is_done()))
            super()._finish_current_push()

    args = TrainingArguments(output_dir=str(tmp_path / "out"), **{**BASE, "save_strategy": "steps", "save_steps": 1,
                             "max_steps": 2, "push_to_hub": True, "hub_strategy": "checkpoint"})  # fmt: skip
    trainer = Spy(model=tiny_gpt2(), args=args, train_dataset=rows())
    assert calls == [("init_hf_repo", None, None)] and trainer.hub_model_id == "user/out"
    assert isinstance(trainer._hub, HubClient) and trainer._hub.hub_model_id == "user/out"  # the component's
    calls.clear()
    trainer.train()
    pushed = [c for c in calls if c[0] == "push_from_checkpoint"]
    assert pushed == [("push_from_checkpoint", "checkpoint-1"), ("push_from_checkpoint", "checkpoint-2")]
    messages = [f"Training in progress, step {n}{extra}" for n in (1, 2) for extra in ("", ", checkpoint")]
    assert [u["commit_message"] for u in hub.uploads] == messages
    assert trainer.push_in_progress is trainer._hub.push_in_progress and len(trainer.push_in_progress.jobs) == 2
    calls.clear()
    trainer.push_to_hub(commit_message="done", tags="demo", language="en")
    assert calls == [
        ("save_model", None, True),
        ("create_model_card", {"model_name": "out", "tags": "demo", "language": "en"}),
        ("finish_current_push", True),
    ]
    assert hub.uploads[-1]["commit_message"] == "done" and not (tmp_path / "out" / "README.md").exists()
    trainer.hub_model_id = None  # a script may reset it, as on transformers' Trainer: the next push creates the repo
    trainer.push_to_hub(token="tok", private=True)
    assert calls[-1] == ("finish_current_push", None)  # init_hf_repo forgot the pushes to the old repository
    assert calls[3] == ("init_hf_repo", "tok", True) and hub.repos[-1] == ("out", {"token": "tok", "private": True,
                                                                                    "exist_ok": True})  # fmt: skip
