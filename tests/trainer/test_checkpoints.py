"""The Trainer's checkpoint folders against transformers.Trainer: which ``checkpoint-N`` folders survive each save
(``save_total_limit``), ``best_model_checkpoint``, weights-only folders, foreign folders and resume.

Both trainers run the same schedule with a scripted ``compute_metrics`` (a score per evaluated step), and every
``on_save`` records the folders on disk, so the rotation is compared save by save. The expected lists are also
derived by hand in each test's comment.
"""

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

import ftrain.checkpoint.backends as backends  # noqa: E402
from ftrain.trainer import Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from ftrain.tree import tree_leaves, tree_map  # noqa: E402
from tests.trainer.test_trainer import BASE, StopAt, rows, tiny_gpt2  # noqa: E402


class FoldersAtSave(TrainerCallback):
    """The ``checkpoint-*`` folders of ``output_dir`` by step, after each save (and its rotation)."""

    def __init__(self):
        self.seen = []

    def on_save(self, args, state, control, **kwargs):
        names = [n for n in os.listdir(args.output_dir) if n.startswith("checkpoint-")]
        names.sort(key=lambda n: int(n.removeprefix("checkpoint-")))
        self.seen.append((state.global_step, names))


def _run(trainer_cls, args_cls, out, scores, callbacks=(), resume=None, **kw):
    """Trains with ``compute_metrics`` returning ``scores[global_step]``; returns the trainer and its folder record."""
    holder = {}

    def compute_metrics(pred):
        return {"score": scores[holder["trainer"].state.global_step]}

    args = args_cls(output_dir=str(out), **{**BASE, **kw})
    trainer = trainer_cls(model=tiny_gpt2(), args=args, train_dataset=rows(), eval_dataset=rows(8, seed=2),
                          compute_metrics=compute_metrics)  # fmt: skip
    holder["trainer"] = trainer
    record = FoldersAtSave()
    for cb in (record, *callbacks):
        trainer.add_callback(cb)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, record.seen


def _best_name(trainer):
    best = trainer.state.best_model_checkpoint
    return None if best is None else os.path.basename(best)


def test_best_evaluated_after_its_save_is_kept_as_transformers(tmp_path):
    """eval_strategy="epoch", save_strategy="steps": the step-end save of steps 4 and 8 comes before the epoch-end
    evaluation that finds them best, so a best recorded with the checkpoint's metrics could not know them. By hand,
    limit 2: 2 | 2,4 | 4,6 (best 4) | 4,8 | 8,10 (best 8) | 8,12."""
    kw = dict(max_steps=12, save_steps=2, eval_strategy="epoch", metric_for_best_model="score", save_total_limit=2)
    scores = {4: 1.0, 8: 5.0, 12: 0.0}  # 16 rows / batch 4: an epoch is 4 steps
    hf, hf_seen = _run(transformers.Trainer, transformers.TrainingArguments, tmp_path / "hf", scores, **kw)
    ft, ft_seen = _run(Trainer, TrainingArguments, tmp_path / "ft", scores, **kw)
    expected = [[2], [2, 4], [4, 6], [4, 8], [8, 10], [8, 12]]
    assert hf_seen == [(s, [f"checkpoint-{n}" for n in e]) for s, e in zip(range(2, 13, 2), expected, strict=True)]
    assert ft_seen == hf_seen
    assert _best_name(ft) == _best_name(hf) == "checkpoint-8"
    assert ft.state.best_model_checkpoint == os.path.join(ft.args.output_dir, "checkpoint-8")  # transformers' form
    assert (ft.state.best_global_step, ft.state.best_metric) == (hf.state.best_global_step, hf.state.best_metric)


def test_weights_only_folders_rotate_as_transformers(tmp_path):
    """save_only_model=True: folders the manager never committed still count and rotate. Evaluated and saved every 2
    steps, best at 4, limit 2, by hand: 2 | 2,4 | 4,6 | 4,8."""
    kw = dict(max_steps=8, save_steps=2, eval_strategy="steps", eval_steps=2, metric_for_best_model="score",
              save_total_limit=2, save_only_model=True)  # fmt: skip
    scores = {2: 1.0, 4: 5.0, 6: 0.0, 8: 2.0}
    hf, hf_seen = _run(transformers.Trainer, transformers.TrainingArguments, tmp_path / "hf", scores, **kw)
    ft, ft_seen = _run(Trainer, TrainingArguments, tmp_path / "ft", scores, **kw)
    assert [names for _, names in ft_seen] == [names for _, names in hf_seen] == [
        ["checkpoint-2"], ["checkpoint-2", "checkpoint-4"], ["checkpoint-4", "checkpoint-6"],
        ["checkpoint-4", "checkpoint-8"],
    ]  # fmt: skip
    assert _best_name(ft) == _best_name(hf) == "checkpoint-4"
    files = set(os.listdir(tmp_path / "ft" / "checkpoint-8"))  # the views only: no state, not committed
    assert {"config.json", "model.safetensors", "trainer_state.json", "training_args.json"} <= files
    assert not files & {"COMMIT", "state.safetensors", "meta.json"}


def test_foreign_folders_are_replaced_and_counted(tmp_path):
    """A transformers-written checkpoint-1 and checkpoint-2 are already there. The save of step 2 replaces the
    folder of its step (a committed ftrain checkpoint, without the stray file), and limit 1 then deletes
    checkpoint-1, as transformers' rotation does."""
    out = tmp_path / "ft"
    for name in ("checkpoint-1", "checkpoint-2"):
        (out / name).mkdir(parents=True)
        (out / name / "stray.txt").write_text("x")
    trainer = Trainer(tiny_gpt2(), TrainingArguments(str(out), **BASE, max_steps=2, save_steps=2, save_total_limit=1),
                      train_dataset=rows())  # fmt: skip
    trainer.train()
    assert sorted(os.listdir(out)) == ["checkpoint-2"]
    files = set(os.listdir(out / "checkpoint-2"))
    assert {"COMMIT", "state.safetensors", "model.safetensors", "trainer_state.json"} <= files
    assert "stray.txt" not in files


def test_resume_keeps_rotating_as_one_uninterrupted_transformers_run(tmp_path):
    """Stopped after checkpoint-4 and resumed to 8: the best (4) comes back with the TrainerState and stays
    protected. By hand, limit 2: 2 | 2,4 || 4,6 | 4,8."""
    kw = dict(max_steps=8, save_steps=2, eval_strategy="steps", eval_steps=2, metric_for_best_model="score",
              save_total_limit=2)  # fmt: skip
    scores = {2: 1.0, 4: 5.0, 6: 0.0, 8: 2.0}
    hf, hf_seen = _run(transformers.Trainer, transformers.TrainingArguments, tmp_path / "hf", scores, **kw)
    _, first = _run(Trainer, TrainingArguments, tmp_path / "ft", scores, callbacks=[StopAt(4)], **kw)
    ft, second = _run(Trainer, TrainingArguments, tmp_path / "ft", scores, resume=True, **kw)
    assert first + second == hf_seen
    assert [names for _, names in hf_seen][-1] == ["checkpoint-4", "checkpoint-8"]
    assert _best_name(ft) == _best_name(hf) == "checkpoint-4"


def test_a_resume_reads_the_committed_state_once_and_restores_it_bitwise(tmp_path, monkeypatch):
    """The weights hook's read of ``state.safetensors`` serves the optimizer state, step and key too: the resume
    reads the file once, and the TrainState it builds is the manager's restore of the checkpoint, bitwise."""

    class Snapshot(Trainer):
        def _load_rng_state(self, checkpoint):  # the last resume hook: the state is complete after it
            super()._load_rng_state(checkpoint)
            copy = lambda leaf: leaf.clone() if isinstance(leaf, torch.Tensor) else leaf  # noqa: E731
            self.resumed = tree_map(copy, self._train_state)  # a copy: the steps update the state's tensors in place

    kw = dict(max_steps=4, save_steps=2, logging_steps=1)
    _run(Trainer, TrainingArguments, tmp_path, {}, callbacks=[StopAt(2)], **kw)
    reads, read = [], backends.read_safetensors
    monkeypatch.setattr(backends, "read_safetensors", lambda path, *a, **k: reads.append(path) or read(path, *a, **k))
    trainer, _ = _run(Snapshot, TrainingArguments, tmp_path, {}, resume=str(tmp_path / "checkpoint-2"), **kw)
    assert reads == [tmp_path / "checkpoint-2" / "state.safetensors"]
    saved = trainer._checkpoint_manager(tmp_path).restore(2, like=trainer.resumed)
    assert int(trainer.resumed.step) == 2
    for a, b in zip(tree_leaves(trainer.resumed), tree_leaves(saved), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_an_overridden_get_output_dir_moves_the_checkpoints_as_transformers(tmp_path):
    """transformers' ``_save_checkpoint`` writes into ``_get_output_dir(trial)`` and rotates there; a subclass that
    overrides it finds the same folders there with both trainers, and none in ``output_dir``."""
    sides = {"hf": (transformers.Trainer, transformers.TrainingArguments), "ft": (Trainer, TrainingArguments)}
    for lib, (trainer_cls, args_cls) in sides.items():
        run_dir = str(tmp_path / lib / "elsewhere")
        elsewhere = type("Elsewhere", (trainer_cls,), {"_get_output_dir": lambda self, trial, d=run_dir: d})
        args = args_cls(output_dir=str(tmp_path / lib / "out"), max_steps=6, save_steps=2, save_total_limit=2, **BASE)
        elsewhere(model=tiny_gpt2(), args=args, train_dataset=rows()).train()
        assert sorted(os.listdir(run_dir)) == ["checkpoint-4", "checkpoint-6"], lib
        assert not (tmp_path / lib / "out").exists() or os.listdir(tmp_path / lib / "out") == [], lib
