"""Device placement and the placement / step-arithmetic hooks of ``ftrain.Trainer``, against ``transformers.Trainer``.

No GPU is needed. ``args.device`` is compared with transformers' for each way of choosing it (torch's availability
checks patched). Placement itself is checked on the ``meta`` device: a step on meta tensors computes shapes only,
so those tests assert where every tensor is — the model, the ``TrainState``'s leaves, each batch the model and
``_prepare_inputs`` see, the metrics before they are read on the host — and that transformers' Trainer is given the
same device. Each hook (``_move_model_to_device``, ``_wrap_model``, ``_prepare_inputs``,
``set_initial_training_values``, ``get_total_train_batch_size``) is overridden the same way on a transformers and an
ftrain subclass: the call order must be the same, and the override's effect must reach the same numbers.

Numbers are compared in float64 (the model and data are float64) with ``FLOAT64`` (tests/tolerances.py) where both
sides compute the same mathematics in float64; transformers accumulates its logged training loss in float32, which
``hf_loss_rtol`` (side_by_side) bounds. The ``*_full_eval`` evaluations run in bfloat16 / float16, bounded
from those dtypes' unit roundoff.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from tolerances import FLOAT64, UNIT_ROUNDOFF

transformers = pytest.importorskip("transformers")

import ftrain.trainer.evaluation as evaluation_module  # noqa: E402
import ftrain.trainer.loop as loop_module  # noqa: E402
from ftrain.trainer import Trainer, TrainingArguments  # noqa: E402
from ftrain.trainer.plan import make_plan  # noqa: E402
from tests.trainer.side_by_side import APPROX64, hf_loss_rtol, logged_steps, regression_rows, side_args  # noqa: E402
from tests.trainer.test_trainer_parity import tiny_gpt2, token_rows  # noqa: E402

HOOKS = ("_move_model_to_device", "_wrap_model", "_prepare_inputs", "set_initial_training_values",
         "get_total_train_batch_size")  # fmt: skip


class SharedLog(list):
    """A list that copies of its module share (ftrain's train step runs a deep copy of the model's skeleton)."""

    def __deepcopy__(self, memo):
        return self


class Regressor(torch.nn.Module):
    """A float64 linear regressor; ``scale`` (a batch key an override may add) multiplies its prediction."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 1, dtype=torch.float64)
        self.seen = SharedLog()  # the devices of each (eager) forward's inputs

    def forward(self, x, labels=None, scale=None):
        if not torch.compiler.is_compiling():
            self.seen.append(tuple(t.device.type for t in (x, labels, scale) if t is not None))
        out = self.lin(x).squeeze(-1) * (1.0 if scale is None else scale)
        return {"loss": ((out - labels) ** 2).mean(), "logits": out}


def rows(n: int = 16) -> list[dict[str, torch.Tensor]]:
    return regression_rows(n, intercept=0.1)


def settings(**changes) -> dict:
    return dict(report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, max_steps=4, logging_steps=1,
                learning_rate=0.05, optim="adamw_torch", lr_scheduler_type="linear", per_device_train_batch_size=2,
                per_device_eval_batch_size=4, gradient_accumulation_steps=2, train_sampling_strategy="sequential",
                seed=0) | changes  # fmt: skip


def pair(tmp_path, overrides: dict, ftrain_only: dict | None = None, **changes):
    """An ftrain and a transformers Trainer subclass with the same method ``overrides``, model, data and settings
    (``ftrain_only``: settings of the ftrain one alone)."""
    trainers = {}
    for name, base, args in side_args(tmp_path, settings(**changes), ft_only=ftrain_only):
        cls = type("Sub", (base,), dict(overrides))
        trainers[name] = cls(Regressor(), args, train_dataset=rows(), eval_dataset=rows(8))
    return trainers["ft"], trainers["hf"]


def side(trainer) -> str:
    return "ftrain" if isinstance(trainer, Trainer) else "transformers"


def recording(calls: dict[str, list[str]]) -> dict:
    """Overrides of every hook that append the hook's name to ``calls[side]`` and call the base class's."""

    def wrap(name):
        def hook(self, *args, **kwargs):
            training = kwargs.get("training", args[1] if len(args) > 1 else True)
            calls[side(self)].append(f"_wrap_model(training={training})" if name == "_wrap_model" else name)
            return getattr(super(type(self), self), name)(*args, **kwargs)

        return hook

    return {name: wrap(name) for name in HOOKS}


def step_losses(trainer) -> list[float]:
    return [e["loss"] for e in logged_steps(trainer)]


# ---- args.device -------------------------------------------------------------------------------------------------


def _no_cuda():
    return mock.patch("torch.cuda.is_available", return_value=False)


DEVICE_CASES = {
    "cpu (no accelerator)": ({}, [_no_cuda]),
    "use_cpu with a GPU": ({"use_cpu": True}, [lambda: mock.patch("torch.cuda.is_available", return_value=True)]),
    "cuda": ({}, [lambda: mock.patch("torch.cuda.is_available", return_value=True),
                  lambda: mock.patch("torch.cuda.device_count", return_value=1),
                  lambda: mock.patch("torch.cuda.set_device")]),
    "mps": ({}, [_no_cuda, lambda: mock.patch("torch.backends.mps.is_available", return_value=True),
                 lambda: mock.patch("torch.backends.mps.is_built", return_value=True)]),
    "use_cpu on a mac": ({"use_cpu": True}, [lambda: mock.patch("torch.backends.mps.is_available", return_value=True),
                                             lambda: mock.patch("torch.backends.mps.is_built", return_value=True)]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(DEVICE_CASES))
def test_device_is_the_one_transformers_picks(case, tmp_path):
    from transformers.utils import import_utils

    changes, patches = DEVICE_CASES[case]
    import_utils.is_torch_mps_available.cache_clear()  # cached by transformers
    try:
        with contextlib_stack(patches):
            theirs = transformers.TrainingArguments(str(tmp_path), report_to="none", **changes).device
            ours = TrainingArguments(str(tmp_path), **changes)
            assert ours.device == make_plan(ours).process.device == theirs
    finally:
        import_utils.is_torch_mps_available.cache_clear()


def test_device_under_torchrun_is_the_local_rank(monkeypatch):
    """With several processes accelerate's ``PartialState`` (transformers' device) is ``cuda:{LOCAL_RANK}``; it needs
    the process group, so this case is checked against that rule rather than a transformers object."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert TrainingArguments("out").device == torch.device("cuda", 3)
    assert TrainingArguments("out", use_cpu=True).device == torch.device("cpu")


def contextlib_stack(factories):
    import contextlib

    stack = contextlib.ExitStack()
    for factory in factories:
        stack.enter_context(factory())
    return stack


# ---- placement on a device that is not the CPU (meta) --------------------------------------------------------------


@pytest.fixture
def on_meta(monkeypatch):
    """``args.device`` is ``meta`` for both trainers; the host reads of ftrain's metrics record the devices of the
    tensors they are given (meta tensors have no values: they read as 0)."""
    monkeypatch.setattr(TrainingArguments, "device", property(lambda self: torch.device("meta")))
    # transformers' device property also sets up its process state (``_setup_devices``): keep that, answer meta
    hf_meta = property(lambda self: self._setup_devices and torch.device("meta"))
    monkeypatch.setattr(transformers.TrainingArguments, "device", hf_meta)
    host_reads: list[set[str]] = []

    def to_host(metrics):
        host_reads.append({v.device.type for v in metrics.values() if torch.is_tensor(v)})
        return {k: 0.0 for k in metrics}

    def eval_loss(self, batch_losses, total_sum, total_count):
        host_reads.append({total_sum.device.type, total_count.device.type})
        return 0.0

    to_numpy = evaluation_module._to_numpy

    def predictions_to_numpy(value):
        if not torch.is_tensor(value):
            return to_numpy(value)
        host_reads.append({value.device.type})
        return np.zeros(tuple(value.shape))

    monkeypatch.setattr(loop_module, "to_host", to_host)
    monkeypatch.setattr(evaluation_module, "_to_numpy", predictions_to_numpy)
    monkeypatch.setattr(evaluation_module.Evaluator, "_eval_loss", eval_loss)
    return host_reads


def test_model_state_batches_and_metrics_live_on_args_device(on_meta, tmp_path):
    moved_to = {}

    def move(self, model, device):
        moved_to[side(self)] = device
        return super(type(self), self)._move_model_to_device(model, device)

    prepared: list[set[str]] = []

    def prepare(self, inputs):
        out = super(type(self), self)._prepare_inputs(inputs)
        prepared.append({v.device.type for v in out.values()})
        return out

    ours, _ = pair(tmp_path, {"_move_model_to_device": move, "_prepare_inputs": prepare})
    assert moved_to == {"ftrain": torch.device("meta"), "transformers": torch.device("meta")}
    assert ours.plan.process.device == torch.device("meta") and ours.model.lin.weight.is_meta
    ours.train()
    state = ours._train_state
    leaves = [*state.params.values(), *state.buffers.values(), *torch.utils._pytree.tree_leaves(state.opt_state)]
    assert leaves and all(t.is_meta for t in leaves if torch.is_tensor(t))
    assert state.step.device.type == state.key.device.type == "cpu"  # host-side by design (ftrain.state)
    train_batches = len(prepared)
    assert train_batches == 4 * 2  # every microbatch of the 4 steps
    ours.evaluate()
    ours.predict(rows(8))
    assert len(prepared) == train_batches + 2 + 2  # every evaluation and prediction batch
    assert all(devices == {"meta"} for devices in prepared)
    assert ours.model.seen and all(set(devices) == {"meta"} for devices in ours.model.seen)
    # each log, train_loss, eval_loss, each evaluation and prediction batch's losses, and predict's predictions and
    # labels
    assert len(on_meta) == 4 + 1 + 1 + 2 + 2 + 2 * 2 + 1 and all(devices == {"meta"} for devices in on_meta)


# ---- the hooks, in transformers' order ------------------------------------------------------------------------------


def test_hooks_are_called_in_transformers_order(tmp_path):
    calls = {"ftrain": [], "transformers": []}
    for trainer in pair(tmp_path, recording(calls)):
        trainer.train()
        trainer.evaluate()
    expected_train = ["set_initial_training_values", "get_total_train_batch_size", "_wrap_model(training=True)"]
    expected = ["_move_model_to_device", *expected_train, *["_prepare_inputs"] * 8, "_wrap_model(training=False)",
                *["_prepare_inputs"] * 2]  # fmt: skip
    assert calls["transformers"] == expected  # what this test assumes of transformers
    assert calls["ftrain"] == calls["transformers"]


@pytest.mark.parametrize("torch_compile", [False, pytest.param(True, marks=pytest.mark.compiled)],
                         ids=["eager", "compiled"])  # fmt: skip
def test_prepare_inputs_override_reaches_the_loss(tmp_path, torch_compile):
    def prepare(self, inputs):
        inputs = super(type(self), self)._prepare_inputs(inputs)
        return {**inputs, "scale": torch.full_like(inputs["labels"], 0.5)}

    # the reference stays eager: it is the mathematics that is compared
    # SGD: the smallest step to compile
    ours, theirs = pair(tmp_path, {"_prepare_inputs": prepare}, ftrain_only={"torch_compile": torch_compile},
                        optim="sgd", max_steps=3)  # fmt: skip
    ours.train(), theirs.train()
    assert all(len(devices) == 3 for devices in ours.model.seen)  # the forward got the key the override added
    # transformers' logged loss is accumulated in float32 over the window's 2 microbatches
    assert step_losses(ours) == pytest.approx(step_losses(theirs), rel=hf_loss_rtol(2))
    plain, _ = pair(tmp_path / "plain", {}, optim="sgd", max_steps=3)
    plain.train()
    assert step_losses(plain)[0] != pytest.approx(step_losses(ours)[0], rel=hf_loss_rtol(2))  # the override counts
    for name, value in theirs.model.state_dict().items():
        torch.testing.assert_close(ours.model.state_dict()[name], value, rtol=FLOAT64["rtol"], atol=FLOAT64["atol"])


def test_wrap_model_override_is_evaluated_and_refused_for_training(tmp_path):
    class Doubled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **inputs):
            out = self.inner(**inputs)
            return {"loss": 2 * out["loss"], "logits": out["logits"]}

    def wrap(self, model, training=True, dataloader=None):
        return model if training else Doubled(model)

    ours, theirs = pair(tmp_path, {"_wrap_model": wrap})
    plain, _ = pair(tmp_path / "plain", {})
    assert ours.evaluate()["eval_loss"] == pytest.approx(theirs.evaluate()["eval_loss"], **APPROX64)
    assert ours.evaluate()["eval_loss"] == pytest.approx(2 * plain.evaluate()["eval_loss"], **APPROX64)

    def always(self, model, training=True, dataloader=None):
        return Doubled(model)

    wrapping, _ = pair(tmp_path / "always", {"_wrap_model": always})
    with pytest.raises(TypeError, match=r"_wrap_model\(model, training=True\) returned a Doubled.*training=False"):
        wrapping.train()


def test_set_initial_training_values_override_drives_the_run(tmp_path):
    def shorter(self, args, dataloader, *rest):
        values = list(super(type(self), self).set_initial_training_values(args, dataloader, *rest))
        values[-1] = 3  # max_steps: 3 instead of 4 (the schedule, the stop, the epochs)
        return tuple(values)

    ours, theirs = pair(tmp_path, {"set_initial_training_values": shorter})
    ours.train(), theirs.train()
    ours_logs = [(e["step"], e["epoch"], e["learning_rate"]) for e in logged_steps(ours)]
    theirs_logs = [(e["step"], e["epoch"], e["learning_rate"]) for e in logged_steps(theirs)]
    assert len(ours_logs) == 3 and ours.state.max_steps == theirs.state.max_steps == 3
    assert [s for s, _, _ in ours_logs] == [s for s, _, _ in theirs_logs]
    assert [e for _, e, _ in ours_logs] == pytest.approx([e for _, e, _ in theirs_logs], **APPROX64)
    assert [lr for _, _, lr in ours_logs] == pytest.approx([lr for _, _, lr in theirs_logs], **APPROX64)


def test_get_total_train_batch_size_override_drives_the_counts(tmp_path):
    seen = {}

    def total(self, args):
        return 100

    def finalize(self, *args):
        seen[side(self)] = args[-2]  # num_train_samples (transformers passes the trial first)
        return super(type(self), self)._finalize_training(*args)

    ours, theirs = pair(tmp_path, {"get_total_train_batch_size": total, "_finalize_training": finalize})
    ours.train(), theirs.train()
    assert seen == {"ftrain": 4 * 100, "transformers": 4 * 100}  # max_steps × the overridden total


# ---- bf16_full_eval / fp16_full_eval ---------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, dtype", [("bf16_full_eval", torch.bfloat16), ("fp16_full_eval", torch.float16)])
def test_full_eval_matches_transformers_and_leaves_the_model(tmp_path, flag, dtype):
    """Both evaluate the float32 GPT-2 cast to ``dtype``. They run the same half-precision forward; the losses may
    differ only where they are reduced (ftrain's (sum, count) against transformers' float32 cross entropy), far
    below one rounding of ``dtype``, the bound used. The evaluated copy's logits are in ``dtype`` (a hook on the
    user's model travels with the copy); the user's model stays float32."""
    data = token_rows(8)
    common = dict(report_to="none", use_cpu=True, per_device_eval_batch_size=4, disable_tqdm=True)
    model = tiny_gpt2(torch.float32)
    logits_dtypes = set()
    model.register_forward_hook(lambda module, args, output: logits_dtypes.add(output.logits.dtype))
    ours = Trainer(model, TrainingArguments(str(tmp_path / "a"), **{flag: True}, **common), eval_dataset=data)
    theirs = transformers.Trainer(tiny_gpt2(torch.float32), transformers.TrainingArguments(
        str(tmp_path / "b"), **{flag: True}, **common), eval_dataset=data)  # fmt: skip
    loss, their_loss = (t.evaluate()["eval_loss"] for t in (ours, theirs))
    assert next(theirs.model.parameters()).dtype == dtype  # transformers casts its model in place
    assert all(p.dtype == torch.float32 for p in model.parameters())  # ftrain evaluated a copy
    bound = UNIT_ROUNDOFF[dtype]
    assert loss == pytest.approx(their_loss, rel=bound)
    assert logits_dtypes == {dtype}  # the evaluation ran the cast copy
