"""Arguments and call shapes that used to be accepted and ignored (issue 14, sections 0, 3 and 6), against
transformers' Trainer run in the same test: ``train(trial=...)``, ``_inner_training_loop(batch_size=...)``,
NEFTune's hook removal, ``trainer.accelerator``, ``use_cache``, memory metrics, ``torch_empty_cache_steps``,
``ddp_timeout`` / ``ddp_backend``, JIT checkpoints on SIGTERM, transformers' callbacks, and the refusals.

Everything compared here is a count, a name, a key set or a configuration value, so the comparisons are exact;
the memory numbers are checked against the size of a known allocation.
"""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from ftrain.trainer import Trainer, TrainingArguments  # noqa: E402
from ftrain.trainer import loop as ftrain_loop  # noqa: E402
from ftrain.trainer.memory import TrainerMemoryTracker  # noqa: E402
from tests.trainer.side_by_side import logged_steps, side_args  # noqa: E402
from tests.trainer.test_compat import COMMON, tiny_gpt2, token_rows  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = dict(COMMON, max_steps=3, per_device_train_batch_size=4, logging_steps=1, learning_rate=1e-3)


def both(HFArgs, tmp_path, model_init=None, train_dataset=None, eval_dataset=None, callbacks=list, **kwargs):
    """(transformers' Trainer, ftrain's Trainer), built alike from ``STEPS`` plus ``kwargs``; ``callbacks()`` gives
    each its own callbacks."""
    data = train_dataset if train_dataset is not None else token_rows()
    out = []
    for _, trainer_cls, args in side_args(tmp_path, {**STEPS, **kwargs}, hf_args_cls=HFArgs):
        model = None if model_init is not None else tiny_gpt2()
        out.append(trainer_cls(model=model, model_init=model_init, args=args, train_dataset=data,
                               eval_dataset=eval_dataset, callbacks=callbacks()))  # fmt: skip
    return tuple(out)


# ---- call shapes ---------------------------------------------------------------------------------------------


def test_train_with_a_trial_gives_it_to_model_init_and_records_it(HFArgs, tmp_path):
    seen = {"hf": [], "ft": []}
    trial = {"learning_rate": 3e-4}

    def make_init(key):
        def model_init(t):
            seen[key].append(t)
            return tiny_gpt2()

        return model_init

    trainers = []
    for key, (cls, args_cls) in {"hf": (transformers.Trainer, HFArgs), "ft": (Trainer, TrainingArguments)}.items():
        trainer = cls(
            model_init=make_init(key), args=args_cls(str(tmp_path / key), **STEPS), train_dataset=token_rows()
        )
        trainer.train(trial=trial)
        trainers.append(trainer)
    hf, ft = trainers
    assert seen["ft"] == seen["hf"] == [None, trial]  # the constructor's call, then train()'s with the trial
    assert ft._trial is trial and hf._trial is trial
    assert ft.state.trial_params == hf.state.trial_params == trial
    assert ft.state.global_step == hf.state.global_step == 3


def test_inner_training_loop_takes_transformers_arguments_and_honours_batch_size(HFArgs, tmp_path):
    # transformers honours batch_size under auto_find_batch_size (its only caller); ftrain always honours it.
    hf, ft = both(HFArgs, tmp_path, max_steps=-1, num_train_epochs=1, auto_find_batch_size=True)
    outs = [t._inner_training_loop(batch_size=2, args=t.args, resume_from_checkpoint=None, trial=None,
                                   ignore_keys_for_eval=None) for t in (hf, ft)]  # fmt: skip
    assert ft.state.train_batch_size == hf.state.train_batch_size == 2
    assert ft.state.max_steps == hf.state.max_steps == 6  # 12 rows, 2 per step
    assert outs[1].global_step == outs[0].global_step == 6


def test_neftune_hook_is_removed_after_training(HFArgs, tmp_path):
    hf, ft = both(HFArgs, tmp_path, neftune_noise_alpha=5.0)
    hf.train()
    ft.train()
    embeddings = ft._train_state.skeleton.get_input_embeddings()
    assert len(embeddings._forward_hooks) == len(hf.model.get_input_embeddings()._forward_hooks) == 0
    assert len(ft.model.get_input_embeddings()._forward_hooks) == 0 and ft.neftune_hook_handle is None


# ---- trainer.accelerator -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bf16", [False, True])
def test_accelerator_answers_like_transformers(HFArgs, tmp_path, bf16):
    hf, ft = both(HFArgs, tmp_path, bf16=bf16, gradient_accumulation_steps=2)
    names = ("num_processes", "process_index", "local_process_index", "is_main_process", "is_local_main_process",
             "is_last_process", "device", "gradient_accumulation_steps", "use_distributed", "distributed_type",
             "mixed_precision", "sync_gradients")  # fmt: skip
    assert {n: getattr(ft.accelerator, n) for n in names} == {n: getattr(hf.accelerator, n) for n in names}
    state_names = ("num_processes", "process_index", "local_process_index", "device", "distributed_type",
                   "is_main_process", "is_local_main_process", "use_distributed")  # fmt: skip
    assert {n: getattr(ft.accelerator.state, n) for n in state_names} == {
        n: getattr(hf.accelerator.state, n) for n in state_names
    }
    assert str(ft.accelerator.state.mixed_precision) == str(hf.accelerator.state.mixed_precision)
    assert ft.accelerator.unwrap_model(ft.model) is ft.model and hf.accelerator.unwrap_model(hf.model) is hf.model
    compiled = torch.compile(ft.model)
    assert ft.accelerator.unwrap_model(compiled, keep_torch_compile=False) is ft.model
    assert hf.accelerator.unwrap_model(compiled, keep_torch_compile=False) is ft.model
    x = {"a": torch.arange(6.0).reshape(3, 2), "b": [torch.ones(2)]}
    for method in ("gather", "gather_for_metrics", "reduce"):
        ours, theirs = getattr(ft.accelerator, method)(x["a"]), getattr(hf.accelerator, method)(x["a"])
        assert torch.equal(ours, theirs), method
    assert str(ft.accelerator.gather(x)) == str(hf.accelerator.gather(x))
    for inputs in ([1, 2, 3, 4, 5], torch.arange(5), {"k": [1, 2]}):
        for padding in (False, True):
            with ft.accelerator.split_between_processes(inputs, apply_padding=padding) as ours:
                pass
            with hf.accelerator.split_between_processes(inputs, apply_padding=padding) as theirs:
                pass
            assert str(ours) == str(theirs)
    a, b = ft.accelerator.free_memory(torch.ones(3), torch.ones(3))
    assert (a, b) == tuple(hf.accelerator.free_memory(torch.ones(3), torch.ones(3))) == (None, None)


def test_accelerator_print_only_on_the_main_process(HFArgs, tmp_path, capsys):
    _, ft = both(HFArgs, tmp_path)
    ft.accelerator.print("shown")
    ft.accelerator.local_process_index = 1
    ft.accelerator.print("hidden")
    assert capsys.readouterr().out == "shown\n"


# ---- arguments -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [False, True])
def test_use_cache_is_set_on_the_model_config(HFArgs, tmp_path, use_cache):
    hf, ft = both(HFArgs, tmp_path, use_cache=use_cache)
    assert ft.model.config.use_cache == hf.model.config.use_cache == use_cache


def test_memory_metrics_have_transformers_keys(HFArgs, tmp_path):
    # one step: transformers' tracker polls memory in a busy thread for the whole stage
    hf, ft = both(HFArgs, tmp_path, skip_memory_metrics=False, eval_strategy="no", max_steps=1)
    keys = {}
    for name, trainer in (("hf", hf), ("ft", ft)):
        train = trainer.train().metrics
        evaluation = trainer.evaluate(token_rows(4, seed=3))
        keys[name] = (sorted(k for k in train if "mem" in k), sorted(k for k in evaluation if "mem" in k))
        logged = trainer.state.log_history[-1]
        keys[name] += (sorted(k for k in logged if "mem" in k),)
    assert keys["ft"] == keys["hf"]
    assert "train_mem_cpu_alloc_delta" in keys["ft"][0] and "init_mem_cpu_peaked_delta" in keys["ft"][0]
    assert keys["ft"][1] == ["eval_mem_cpu_alloc_delta", "eval_mem_cpu_peaked_delta"]


def test_memory_metrics_are_skipped_by_default(HFArgs, tmp_path):
    hf, ft = both(HFArgs, tmp_path)
    assert [k for k in ft.train().metrics if "mem" in k] == [k for k in hf.train().metrics if "mem" in k] == []


def test_memory_tracker_measures_a_known_allocation():
    """A stage that holds 64 MiB for a moment and frees it: its peak is at least that much above its end, as
    transformers' tracker measures it (a busy thread; ours reads the kernel's peak), and little stays allocated."""
    from transformers.trainer_utils import TrainerMemoryTracker as HFTracker

    size = 64 * 2**20

    def workload():
        block = torch.ones(size // 8, dtype=torch.float64)  # written, so resident
        time.sleep(0.05)
        del block

    ours = TrainerMemoryTracker(skip_memory_metrics=False, device=torch.device("cpu"))
    ours.start("init")
    ours.stop_and_update_metrics("init")
    ours.start("train")
    workload()
    metrics: dict = {}
    ours.stop_and_update_metrics("train", metrics)

    theirs = HFTracker(skip_memory_metrics=False)

    def __init__():  # noqa: N807 - transformers' tracker names the stage after its caller; the first is __init__
        theirs.start()
        theirs.stop_and_update_metrics()

    def train():  # transformers' tracker names the stage after its caller
        theirs.start()
        workload()
        hf_metrics: dict = {}
        theirs.stop_and_update_metrics(hf_metrics)
        return hf_metrics

    __init__()
    hf_metrics = train()
    keys = ["train_mem_cpu_alloc_delta", "train_mem_cpu_peaked_delta"]
    assert sorted(metrics) == sorted(hf_metrics) == sorted(["before_init_mem_cpu", *keys, *(k.replace("train", "init")
                                                                                           for k in keys)])  # fmt: skip
    for m in (metrics, hf_metrics):
        assert m["train_mem_cpu_peaked_delta"] >= 0.95 * size  # the block was resident at the peak
        assert abs(m["train_mem_cpu_alloc_delta"]) < 0.5 * size  # and released at the end


def test_torch_empty_cache_steps_clear_at_transformers_steps(HFArgs, tmp_path, monkeypatch):
    calls = {"hf": [], "ft": []}
    hf, ft = both(HFArgs, tmp_path, max_steps=7, torch_empty_cache_steps=3)
    monkeypatch.setattr(transformers.trainer, "clear_device_cache", lambda: calls["hf"].append(hf.state.global_step))
    monkeypatch.setattr(ftrain_loop, "clear_device_cache", lambda device: calls["ft"].append(ft.state.global_step))
    hf.train()
    ft.train()
    assert calls["ft"] == calls["hf"] == [0, 3, 6]


class _GroupStarted(Exception):
    """Raised by the recorded ``torch.distributed.init_process_group``: the test needs nothing after it."""


def test_ddp_timeout_and_backend_reach_the_process_group(HFArgs, monkeypatch):
    """The backend and timeout are what ``init_process_group`` gets when the Trainer starts the group (on one
    process of a torchrun world of 2, and alone outside torchrun; torch.distributed's call is recorded, not made);
    the timeout is transformers' ``ddp_timeout_delta``."""
    from ftrain.distributed import mesh
    from ftrain.trainer.plan import make_plan

    expected = HFArgs("out", use_cpu=True, ddp_timeout=77).ddp_timeout_delta
    started = []

    def record(backend, **kw):
        started.append((backend, kw))
        raise _GroupStarted

    monkeypatch.setattr(mesh.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(mesh.dist, "init_process_group", record)
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    args = TrainingArguments("out", use_cpu=True, ddp_backend="mpi", ddp_timeout=77, report_to="none")
    with pytest.raises(_GroupStarted):  # mpi: not the CPU's default (gloo), so the argument is what reaches torch
        Trainer(model=torch.nn.Linear(2, 1), args=args)
    assert started == [("mpi", {"timeout": expected})]
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    plan = make_plan(TrainingArguments("out", use_cpu=True, ddp_backend="gloo", ddp_timeout=77))
    with pytest.raises(_GroupStarted):
        mesh.init_process_group("cpu", backend=plan.parallel.backend, timeout=plan.parallel.timeout)
    assert started[1:] == [("gloo", {"rank": 0, "world_size": 1, "timeout": expected})]
    assert expected == timedelta(seconds=77)
    with pytest.raises(ValueError, match="ddp_backend='nccl' cannot run on this process's device"):
        TrainingArguments("out", use_cpu=True, ddp_backend="nccl")


def test_save_strategy_best_needs_a_metric_as_in_transformers(HFArgs, tmp_path):
    with pytest.raises(ValueError, match="metric_for_best_model"):
        transformers.Trainer(model=tiny_gpt2(), args=HFArgs(str(tmp_path / "hf"), **COMMON | {"save_strategy": "best"}))
    with pytest.raises(ValueError, match="save_strategy='best'.*metric_for_best_model"):
        TrainingArguments(str(tmp_path / "ft"), **COMMON | {"save_strategy": "best"})
    TrainingArguments(str(tmp_path / "ft"), **COMMON | {"save_strategy": "best", "metric_for_best_model": "loss"})


def test_refused_arguments_say_what_to_do(HFArgs, tmp_path):
    hf = transformers.Trainer(model=tiny_gpt2(), args=HFArgs(str(tmp_path / "hf"), **STEPS, use_liger_kernel=True),
                              train_dataset=token_rows())  # fmt: skip
    with pytest.raises(ImportError, match="liger"):  # transformers refuses it when training starts
        hf.train()
    with pytest.raises(ValueError, match="use_liger_kernel=True.*Remove the argument"):
        TrainingArguments("out", use_liger_kernel=True)
    for debug in ("underflow_overflow", "tpu_metrics_debug"):
        with pytest.raises(ValueError, match=f"debug=\\['{debug}'\\] is not provided by ftrain"):
            TrainingArguments("out", debug=debug)


def test_accelerator_config_accumulation_keys(HFArgs, tmp_path):
    """transformers hands gradient_accumulation_kwargs to accelerate's GradientAccumulationPlugin, which refuses
    other keys; num_steps becomes gradient_accumulation_steps in both."""
    config = {"gradient_accumulation_kwargs": {"num_steps": 3, "sync_each_batch": True}}
    hf, ft = both(HFArgs, tmp_path, accelerator_config=config)
    assert ft.args.gradient_accumulation_steps == hf.args.gradient_accumulation_steps == 3
    with pytest.raises(TypeError, match="steps_per_sync"):
        both(HFArgs, tmp_path, accelerator_config={"gradient_accumulation_kwargs": {"steps_per_sync": 2}})
    with pytest.raises(ValueError, match=r"unknown keys \['steps_per_sync'\]"):
        TrainingArguments("out", accelerator_config={"gradient_accumulation_kwargs": {"steps_per_sync": 2}})


# ---- JIT checkpoints -----------------------------------------------------------------------------------------


class _SigtermAt(transformers.TrainerCallback):
    """Sends SIGTERM to this process at the end of step ``step`` and waits for the delayed request (kill_wait 0)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.3)  # the handler's timer (0 s here) sets the request from its thread


def _jit_manager(trainer):
    callbacks = trainer.callback_handler.callbacks
    return next(cb for cb in callbacks if type(cb).__name__ == "JITCheckpointCallback").jit_manager


def _jit_trainer(HFArgs, tmp_path, which, **kwargs):
    """One trainer with ``enable_jit_checkpoint`` (built alone: each installs its SIGTERM handler when built)."""
    trainer_cls, args_cls = (transformers.Trainer, HFArgs) if which == "hf" else (Trainer, TrainingArguments)
    args = args_cls(output_dir=str(tmp_path / which), **{**STEPS, "enable_jit_checkpoint": True, **kwargs})
    return trainer_cls(model=tiny_gpt2(), args=args, train_dataset=token_rows(), callbacks=[_SigtermAt(2)])


def test_jit_checkpoint_on_sigterm_is_written_where_transformers_writes_it(HFArgs, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    trainers = {}
    for which in ("hf", "ft"):
        trainer = trainers[which] = _jit_trainer(HFArgs, tmp_path, which, max_steps=6, save_strategy="no")
        _jit_manager(trainer).kill_wait = 0
        trainer.train()
        assert signal.getsignal(signal.SIGTERM) == before  # restored when training ended
    hf, ft = trainers["hf"], trainers["ft"]
    assert ft.state.global_step == hf.state.global_step == 3  # stopped after the step that saw the request
    assert sorted(os.listdir(tmp_path / "ft")) == ["checkpoint-2"] == sorted(os.listdir(tmp_path / "hf"))
    assert os.path.exists(tmp_path / "ft" / "checkpoint-2" / "model.safetensors")
    resumed = Trainer(model=tiny_gpt2(), args=TrainingArguments(str(tmp_path / "ft"), **{**STEPS, "max_steps": 6}),
                      train_dataset=token_rows())  # fmt: skip
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 6


def test_jit_checkpoint_handler_only_when_asked(HFArgs, tmp_path):
    hf, ft = both(HFArgs, tmp_path)
    names = lambda t: [type(cb).__name__ for cb in t.callback_handler.callbacks]  # noqa: E731
    assert ("JITCheckpointCallback" in names(ft)) == ("JITCheckpointCallback" in names(hf)) is False
    before = signal.getsignal(signal.SIGTERM)
    for which in ("hf", "ft"):
        trainer = _jit_trainer(HFArgs, tmp_path, which)
        assert names(trainer).count("JITCheckpointCallback") == 1
        manager = _jit_manager(trainer)
        assert manager.kill_wait == 3 and signal.getsignal(signal.SIGTERM) == manager._sigterm_handler
        signal.signal(signal.SIGTERM, before)


# ---- transformers' callbacks ---------------------------------------------------------------------------------


def test_removing_transformers_default_flow_callback_removes_ftrains(HFArgs, tmp_path):
    hf, ft = both(HFArgs, tmp_path, save_strategy="steps", save_steps=1)
    popped = [t.pop_callback(transformers.DefaultFlowCallback) for t in (hf, ft)]
    assert [type(p).__name__ for p in popped] == ["DefaultFlowCallback"] * 2
    assert (
        ft.pop_callback(transformers.DefaultFlowCallback) is None is hf.pop_callback(transformers.DefaultFlowCallback)
    )
    ft.add_callback(popped[1])
    ft.remove_callback(transformers.DefaultFlowCallback)
    for t in (hf, ft):
        t.remove_callback(transformers.ProgressCallback)
        t.remove_callback(transformers.PrinterCallback)
        t.train()
    # without a flow callback nothing asks for logs or checkpoints, and training runs max_steps all the same
    assert [type(cb).__name__ for cb in ft.callback_handler.callbacks] == []
    assert logged_steps(ft) == logged_steps(hf) == []
    folders = [os.listdir(p) if p.exists() else [] for p in (tmp_path / "hf", tmp_path / "ft")]
    assert folders == [[], []] and ft.state.global_step == hf.state.global_step == 3


class _SaveAndStop(transformers.TrainerCallback):
    """A transformers callback steering through ``control``: save at step 2, stop at step 3."""

    def __init__(self) -> None:
        self.events = []

    def on_step_end(self, args, state, control, **kwargs):
        self.events.append((state.global_step, type(args).__name__ == "TrainingArguments"))
        if state.global_step == 2:
            control.should_save = True
        if state.global_step == 3:
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        self.events.append(("save", state.global_step))


@pytest.mark.parametrize("as_class", [False, True])
def test_transformers_callback_subclass_steers_like_in_transformers(HFArgs, tmp_path, as_class):
    callbacks = (lambda: [_SaveAndStop]) if as_class else (lambda: [_SaveAndStop()])
    hf, ft = both(HFArgs, tmp_path, max_steps=6, callbacks=callbacks)
    for t in (hf, ft):
        t.train()
    events = [next(cb for cb in t.callback_handler.callbacks if isinstance(cb, _SaveAndStop)).events for t in (hf, ft)]
    assert events[1] == events[0] == [(1, True), (2, True), ("save", 2), (3, True)]
    assert sorted(os.listdir(tmp_path / "ft")) == sorted(os.listdir(tmp_path / "hf")) == ["checkpoint-2"]
    assert ft.state.global_step == hf.state.global_step == 3


def test_transformers_early_stopping_callback_instance_works(HFArgs, tmp_path):
    evals = token_rows(4, seed=3)
    options = dict(max_steps=8, eval_strategy="steps", eval_steps=1, metric_for_best_model="loss",
                   learning_rate=0.5, greater_is_better=False)  # fmt: skip
    cbs = lambda: [transformers.EarlyStoppingCallback(early_stopping_patience=1, early_stopping_threshold=10.0)]  # noqa: E731
    hf, ft = both(HFArgs, tmp_path, eval_dataset=evals, callbacks=cbs, **options)
    hf.train()
    ft.train()
    # a threshold of 10 nats: the second evaluation never counts as an improvement, so both stop at step 2
    assert ft.state.global_step == hf.state.global_step == 2
