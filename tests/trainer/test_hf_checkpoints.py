"""transformers' checkpoint layout, its hooks, and continuing a run across the two libraries.

The reference is transformers itself, run in the same test: its ``Trainer`` (a run to step 20 saving at step 10,
and its resume), its ``create_optimizer_and_scheduler`` (torch optimizers and ``LambdaLR``) and its
``rotate_checkpoints``. Two claims are checked in float64 (``tiny_gpt2`` of test_trainer_parity), with the suite's
tolerances (tests/tolerances.py):

- **continuing a run**: transformers to step 10, then ftrain from its ``checkpoint-10`` to step 20, equals
  transformers' own run to step 20 — and the other way round — in every logged ``learning_rate`` and ``grad_norm``
  and in the final weights (``FLOAT64``: the same mathematics in float64), and in the logged ``loss`` within
  :func:`hf_loss_rtol` (transformers sums a logging window's losses in float32). A wrong optimizer moment, step
  count or schedule position moves these by orders of magnitude more (one step of lr is 1e-3 relative).
- **the files**: ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth`` and ``trainer_state.json`` that ftrain writes
  at a step are what transformers writes at that step: the same keys and hyper-parameters exactly, moments and
  rates to ``FLOAT64``.
"""

import json
import logging
import os
import shutil

import pytest
import torch
from tolerances import FLOAT64

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from transformers.trainer_utils import rotate_checkpoints  # noqa: E402

from ftrain.optim import hf_decay_mask  # noqa: E402
from ftrain.trainer import Trainer, TrainingArguments  # noqa: E402
from ftrain.trainer.convert import make_optimizer  # noqa: E402
from ftrain.trainer.hf_checkpoint import (  # noqa: E402
    UnmappableOptimizerError,
    load_torch_file,
    opt_state_from_torch,
    opt_state_to_torch,
)
from ftrain.trainer.plan import make_plan  # noqa: E402
from ftrain.trainer.torch_optim import hf_param_groups  # noqa: E402
from ftrain.tree import tree_leaves  # noqa: E402
from tests.trainer.side_by_side import APPROX64, SIDES, hf_loss_rtol, logged_steps  # noqa: E402
from tests.trainer.test_trainer_parity import tiny_gpt2, token_rows  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = dict(
    report_to="none", use_cpu=True, disable_tqdm=True, seed=0, train_sampling_strategy="sequential",
    logging_steps=1, learning_rate=1e-3, warmup_steps=3, lr_scheduler_type="linear", optim="adamw_torch",
    weight_decay=0.1, max_grad_norm=1.0, per_device_train_batch_size=4, save_strategy="steps", save_steps=10,
)  # fmt: skip


def _train(lib, out, *, resume=None, ga=1, max_steps=20, **extra):
    trainer_cls, args_cls = SIDES[lib]
    args = args_cls(output_dir=str(out), max_steps=max_steps, gradient_accumulation_steps=ga, **{**ARGS, **extra})
    trainer = trainer_cls(model=tiny_gpt2(), args=args, train_dataset=token_rows())
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture(scope="module", params=[1, 2], ids=["ga1", "ga2"])
def runs(request, tmp_path_factory):
    """Per library, a run of 20 steps that saved checkpoint-10 (and checkpoint-20)."""
    ga = request.param
    return ga, {lib: _train(lib, tmp_path_factory.mktemp(lib), ga=ga) for lib in SIDES}


def _steps(trainer, first):
    return [e for e in logged_steps(trainer) if e["step"] >= first]


def _assert_continues(resumed, reference, ga):
    """``resumed``'s steps 11-20 and final weights are ``reference``'s (see the module docstring)."""
    ours, theirs = _steps(resumed, 11), _steps(reference, 11)
    assert [e["step"] for e in ours] == [e["step"] for e in theirs] == list(range(11, 21))
    for a, b in zip(ours, theirs):
        assert a["learning_rate"] == pytest.approx(b["learning_rate"], **APPROX64), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], **APPROX64), a["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=hf_loss_rtol(ga)), a["step"]
        assert a["epoch"] == pytest.approx(b["epoch"], **APPROX64), a["step"]
    expected = reference.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, expected[name], **FLOAT64, msg=name)


def test_ftrain_continues_a_transformers_run(runs, tmp_path):
    ga, trainers = runs
    checkpoint = os.path.join(trainers["hf"].args.output_dir, "checkpoint-10")
    resumed = _train("ft", tmp_path, resume=checkpoint, ga=ga)
    assert resumed.state.global_step == 20
    assert resumed.state.log_history[:10] == trainers["hf"].state.log_history[:10]  # trainer_state.json's history
    _assert_continues(resumed, trainers["hf"], ga)


def test_transformers_continues_an_ftrain_run(runs, tmp_path):
    ga, trainers = runs
    checkpoint = os.path.join(trainers["ft"].args.output_dir, "checkpoint-10")
    _assert_continues(_train("hf", tmp_path, resume=checkpoint, ga=ga), trainers["ft"], ga)


def test_checkpoint_files_are_what_transformers_writes(runs):
    _, trainers = runs
    hf, ft = (os.path.join(trainers[lib].args.output_dir, "checkpoint-10") for lib in ("hf", "ft"))
    hf_files = {"model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                "training_args.bin", "trainer_state.json"}  # fmt: skip
    assert hf_files <= set(os.listdir(hf)) and hf_files <= set(os.listdir(ft))
    load = lambda folder, name: load_torch_file(os.path.join(folder, name))  # noqa: E731  (weights_only=True)
    ours, theirs = load(ft, "optimizer.pt"), load(hf, "optimizer.pt")
    assert [{k: v for k, v in g.items() if k != "lr"} for g in ours["param_groups"]] == [
        {k: v for k, v in g.items() if k != "lr"} for g in theirs["param_groups"]
    ]
    for a, b in zip(ours["param_groups"], theirs["param_groups"]):
        assert a["lr"] == pytest.approx(b["lr"], **APPROX64)
    assert ours["state"].keys() == theirs["state"].keys()
    for i, state in theirs["state"].items():
        assert ours["state"][i].keys() == state.keys()
        for key, value in state.items():
            assert ours["state"][i][key].dtype == value.dtype, (i, key)
            torch.testing.assert_close(ours["state"][i][key], value, **FLOAT64, msg=f"{i} {key}")
    sched_ours, sched_theirs = load(ft, "scheduler.pt"), load(hf, "scheduler.pt")
    assert {k: v for k, v in sched_ours.items() if k != "_last_lr"} == {
        k: v for k, v in sched_theirs.items() if k != "_last_lr"
    }
    assert sched_ours["_last_lr"] == pytest.approx(sched_theirs["_last_lr"], **APPROX64)
    assert load(ft, "rng_state.pth").keys() == load(hf, "rng_state.pth").keys()
    state_ours, state_theirs = (json.load(open(os.path.join(f, "trainer_state.json"))) for f in (ft, hf))
    assert state_ours.keys() == state_theirs.keys()
    assert [e.keys() for e in state_ours["log_history"]] == [e.keys() for e in state_theirs["log_history"]]
    args = torch.load(os.path.join(ft, "training_args.bin"), weights_only=False)  # a pickle, as transformers'
    assert (args.learning_rate, args.save_steps) == (1e-3, 10)


# ---- the torch forms of each optimizer, against the torch optimizer transformers builds ----------------------------


@pytest.mark.parametrize(
    "optim, optim_args",
    [("adamw_torch", None), ("sgd", "momentum=0.9,nesterov=True"), ("adagrad", "lr_decay=0.1"),
     ("rmsprop", "momentum=0.5,centered=True")],
)  # fmt: skip
def test_opt_state_maps_to_and_from_transformers_torch_optimizer(optim, optim_args, tmp_path):
    """Three updates on both sides with the same gradients: opt_state_to_torch gives the torch optimizer's
    state_dict() (exact keys and hyper-parameters; float64 tensors to FLOAT64), and opt_state_from_torch of that
    state_dict gives ftrain's opt_state back."""
    kw = dict(learning_rate=0.1, weight_decay=0.1, warmup_steps=1, optim=optim, optim_args=optim_args,
              max_grad_norm=0.0, report_to="none", use_cpu=True)  # fmt: skip
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2)).double()
    hf = transformers.Trainer(model=model, args=transformers.TrainingArguments(str(tmp_path), **kw))
    hf.create_optimizer_and_scheduler(num_training_steps=5)
    args = TrainingArguments(str(tmp_path), **kw)
    tx = make_optimizer(args, model, num_training_steps=5)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = tx.init(params)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}
        for name, p in model.named_parameters():
            p.grad = grads[name].clone()
        used_lr = hf.lr_scheduler.get_last_lr()[0]  # the rate of this update (ftrain's state records it)
        hf.optimizer.step()
        hf.lr_scheduler.step()
        updates, state = tx.update(grads, state, params)
        params = {k: params[k] + updates[k] for k in params}
    theirs = hf.optimizer.state_dict()
    groups = hf_param_groups(make_plan(args).optim, hf_decay_mask(model), lr=hf.lr_scheduler.get_last_lr()[0])
    ours = opt_state_to_torch(state, groups, step=3)
    assert [{k: v for k, v in g.items() if k != "lr"} for g in ours["param_groups"]] == [
        {k: v for k, v in g.items() if k != "lr"} for g in theirs["param_groups"]
    ]
    assert ours["state"].keys() == theirs["state"].keys()
    for i, entry in theirs["state"].items():
        assert ours["state"][i].keys() == entry.keys(), i
        for key, value in entry.items():
            torch.testing.assert_close(ours["state"][i][key], value, **FLOAT64, msg=f"{i} {key}")
    back = opt_state_from_torch(theirs, tx.init(params), [g["params"] for g in groups], step=3,
                                learning_rate=used_lr)  # fmt: skip
    for a, b in zip(tree_leaves(back), tree_leaves(state), strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **FLOAT64)


# ---- hooks, atomicity, errors ---------------------------------------------------------------------------------------

HOOKS = ("save_model", "_save_optimizer_and_scheduler", "_save_scaler", "_save_rng_state", "_load_from_checkpoint",
         "_load_optimizer_and_scheduler", "_load_scaler", "_load_rng_state")  # fmt: skip


def _recording(base, calls):
    """``base`` with every hook of HOOKS recorded (``save_model`` only when a checkpoint calls it)."""

    def wrap(name):
        def hook(self, *args, **kwargs):
            if name != "save_model" or kwargs.get("_internal_call") or (len(args) > 1 and args[1]):
                calls.append(name)
            return getattr(base, name)(self, *args, **kwargs)

        return hook

    return type(f"Recording{base.__name__}", (base,), {name: wrap(name) for name in HOOKS})


def test_hooks_are_called_in_transformers_order_on_save_and_resume(tmp_path):
    """The same recording subclass of each library's Trainer, saving at step 2, then resuming from it to step 4."""
    orders = {}
    for lib, (trainer_cls, args_cls) in SIDES.items():
        calls = []
        cls = _recording(trainer_cls, calls)
        for step, resume in ((2, None), (4, str(tmp_path / lib / "checkpoint-2"))):
            args = args_cls(output_dir=str(tmp_path / lib), max_steps=step, **{**ARGS, "save_steps": 2})
            cls(model=tiny_gpt2(), args=args, train_dataset=token_rows()).train(resume_from_checkpoint=resume)
        orders[lib] = calls
    assert orders["ft"] == orders["hf"]
    assert orders["hf"][4:8] == ["_load_from_checkpoint", "_load_optimizer_and_scheduler", "_load_scaler",
                                 "_load_rng_state"]  # fmt: skip


def test_a_failing_hook_leaves_no_checkpoint_and_hook_files_are_committed(tmp_path):
    class Extra(Trainer):
        def _save_rng_state(self, output_dir):
            super()._save_rng_state(output_dir)
            with open(os.path.join(output_dir, "extra.txt"), "w") as f:
                f.write(str(self.state.global_step))

    class Failing(Trainer):
        def _save_rng_state(self, output_dir):
            raise OSError("disk full")

    args = TrainingArguments(str(tmp_path / "ok"), max_steps=2, **{**ARGS, "save_steps": 2})
    Extra(model=tiny_gpt2(), args=args, train_dataset=token_rows()).train()
    folder = tmp_path / "ok" / "checkpoint-2"
    assert (folder / "extra.txt").read_text() == "2" and (folder / "COMMIT").is_file()
    assert "extra.txt" in json.loads((folder / "manifest.json").read_text())["files"]
    args = TrainingArguments(str(tmp_path / "bad"), max_steps=2, **{**ARGS, "save_steps": 2})
    with pytest.raises(OSError, match="disk full"):
        Failing(model=tiny_gpt2(), args=args, train_dataset=token_rows()).train()
    assert os.listdir(tmp_path / "bad") == []  # neither checkpoint-2 nor a temporary folder


def test_checkpoints_that_cannot_be_continued_are_refused_with_the_reason(runs, tmp_path):
    _, trainers = runs
    source = os.path.join(trainers["hf"].args.output_dir, "checkpoint-10")
    copy = tmp_path / "checkpoint-10"
    shutil.copytree(source, copy)
    optimizer = torch.load(copy / "optimizer.pt", weights_only=True)
    optimizer["state"][0]["max_exp_avg_sq"] = optimizer["state"][0]["exp_avg_sq"]  # amsgrad's
    torch.save(optimizer, copy / "optimizer.pt")
    with pytest.raises(UnmappableOptimizerError, match=r"parameter 'transformer.wte.weight' has optimizer state "
                                                       r"\['max_exp_avg_sq'\]"):  # fmt: skip
        _train("ft", tmp_path / "a", resume=str(copy))
    shutil.copy(os.path.join(source, "optimizer.pt"), copy / "optimizer.pt")
    with pytest.raises(UnmappableOptimizerError, match=r"betas=\(0.9, 0.999\), but these TrainingArguments give "
                                                       r"betas=\(0.9, 0.95\)"):  # fmt: skip
        _train("ft", tmp_path / "b", resume=str(copy), adam_beta2=0.95)
    with pytest.raises(ValueError, match="had learning_rate=0.001 .* have learning_rate=0.002"):
        _train("ft", tmp_path / "c", resume=str(copy), learning_rate=2e-3)
    os.remove(copy / "optimizer.pt")
    with pytest.raises(ValueError, match=r"cannot be resumed: it lacks \['optimizer.pt'\] \(a weights-only folder"):
        _train("ft", tmp_path / "d", resume=str(copy))


def test_an_optimizer_without_torch_form_writes_no_optimizer_pt_and_says_so(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ftrain.trainer.checkpoints"):
        _train("ft", tmp_path, max_steps=4, save_steps=2, optim="lion_32bit")
    assert caplog.text.count("optimizer.pt and scheduler.pt are not written") == 1
    assert "lion_32bit" in caplog.text
    for step in (2, 4):
        files = set(os.listdir(tmp_path / f"checkpoint-{step}"))
        assert {"state.safetensors", "rng_state.pth", "COMMIT"} <= files and "optimizer.pt" not in files


def test_rotate_checkpoints_by_mtime_is_transformers(tmp_path):
    """Folders whose modification times disagree with their steps: ``use_mtime=True`` deletes what transformers'
    rotate_checkpoints deletes (the best and the newest by time protected). A ``checkpoint-best`` folder (no step),
    which transformers would count and delete, is left alone: it is in ours only, and stays."""
    (tmp_path / "ours" / "checkpoint-best").mkdir(parents=True)
    os.utime(tmp_path / "ours" / "checkpoint-best", (900, 900))  # the oldest
    for root in ("ours", "theirs"):
        for i, step in enumerate((5, 1, 4, 2, 3)):  # mtime order
            (tmp_path / root / f"checkpoint-{step}").mkdir(parents=True)
            os.utime(tmp_path / root / f"checkpoint-{step}", (1000 + 10 * i, 1000 + 10 * i))
    trainer = Trainer(tiny_gpt2(), TrainingArguments(str(tmp_path / "ours"), save_total_limit=2, **ARGS))
    trainer.state.best_model_checkpoint = str(tmp_path / "ours" / "checkpoint-4")
    trainer._rotate_checkpoints(use_mtime=True)
    rotate_checkpoints(str(tmp_path / "theirs"), 2, str(tmp_path / "theirs" / "checkpoint-4"), use_mtime=True)
    assert sorted(os.listdir(tmp_path / "theirs")) == ["checkpoint-3", "checkpoint-4"]
    assert sorted(os.listdir(tmp_path / "ours")) == ["checkpoint-3", "checkpoint-4", "checkpoint-best"]
