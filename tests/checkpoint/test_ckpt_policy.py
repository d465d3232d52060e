"""When to save and what to keep: option validation, save triggers, SIGTERM, and retention as a property over random
save sequences (exactly the policy's set survives; the newest and the best are never deleted)."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
import types

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftrain.checkpoint import CheckpointManager, CheckpointManagerOptions, SafetensorsBackend, select_to_keep
from ftrain.checkpoint.backend_dcp import DcpBackend
from ftrain.checkpoint.backend_orbax import OrbaxBackend
from ftrain.checkpoint.backends import missing_backend_members
from ftrain.checkpoint.policy import is_save_due

TINY = {"w": torch.ones(2)}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_to_keep": 0}, "max_to_keep must be an int >= 1 or None, got 0"),
        ({"save_interval_steps": 2.5}, "save_interval_steps must be an int >= 1 or None, got 2.5"),
        ({"save_on_steps": [3, -1]}, "every entry of save_on_steps must be an int >= 0"),
        ({"save_interval_seconds": 0}, "save_interval_seconds must be a number > 0, got 0"),
        ({"keep_period": 10}, "keep_period=10 has no effect without max_to_keep"),
        ({"max_to_keep": 2, "keep_best": 2}, "keep_best=2 needs a metric to rank by"),
        ({"metric": "loss", "best_fn": lambda m: m["loss"]}, "give either metric .* or best_fn .*, not both"),
        ({"metric": "loss", "best_mode": "lowest"}, "best_mode must be 'min' .* or 'max'"),
        ({"backend": "hdf5"}, "backend='hdf5' is unknown; use one of \\['safetensors', 'dcp', 'orbax'\\]"),
        ({"backend": object()}, "members of ftrain.checkpoint.Backend; a object lacks name, collective, process_group"),
        (
            {"backend": types.SimpleNamespace(name="mine", collective=False, write=print, read=print)},
            "members of ftrain.checkpoint.Backend; a SimpleNamespace lacks process_group$",
        ),
        ({"hash_algorithm": "crc"}, "hash_algorithm='crc' is not a hashlib algorithm"),
        ({"step_prefix": ".hidden"}, "step_prefix='.hidden'"),
        ({"max_to_keep": 2, "retention": "newest"}, "retention must be 'union' .* or 'total' .*, got 'newest'"),
        ({"retention": "total"}, "retention='total' has no effect without max_to_keep"),
        ({"should_keep_fn": lambda step: True}, "should_keep_fn has no effect without max_to_keep"),
        ({"max_to_keep": 2, "should_keep_fn": 3}, r"should_keep_fn must be callable \(step -> bool\), got int"),
    ],
)
def test_invalid_options_raise_when_built_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CheckpointManagerOptions(**kwargs)


def test_every_shipped_backend_has_every_protocol_member_and_its_process_group():
    group = object()
    assert [missing_backend_members(b) for b in (SafetensorsBackend(), DcpBackend(group), OrbaxBackend)] == [[]] * 3
    assert (SafetensorsBackend().process_group, DcpBackend(group).process_group, OrbaxBackend.process_group) == (
        None,
        group,
        None,
    )


def test_save_triggers():
    opts = CheckpointManagerOptions(save_interval_steps=10, save_on_steps=[3, 7])
    due = [s for s in range(0, 31) if is_save_due(s, opts, latest_step=None, seconds_since_save=0.0)]
    assert due == [0, 3, 7, 10, 20, 30]
    assert not is_save_due(20, opts, latest_step=20, seconds_since_save=0.0)  # never at or before the newest
    assert is_save_due(21, opts, latest_step=20, seconds_since_save=0.0, preempted=True)
    timed = CheckpointManagerOptions(save_interval_seconds=60)
    assert not is_save_due(5, timed, latest_step=None, seconds_since_save=59.9)
    assert is_save_due(5, timed, latest_step=None, seconds_since_save=60.0)
    assert is_save_due(5, CheckpointManagerOptions(), latest_step=4, seconds_since_save=0.0)  # no trigger: always


def test_should_save_by_wall_clock(tmp_path):
    with CheckpointManager(tmp_path, CheckpointManagerOptions(save_interval_seconds=0.2)) as mgr:
        assert not mgr.should_save(1) and not mgr.save(1, TINY)
        time.sleep(0.25)
        assert mgr.save(2, TINY)
        assert not mgr.should_save(3)
        assert mgr.all_steps() == [2]


def test_sigterm_makes_the_next_step_due_and_the_previous_handler_is_chained_and_restored(tmp_path):
    calls = []

    def previous(signum, frame):
        calls.append(signum)

    old = signal.signal(signal.SIGTERM, previous)
    try:
        opts = CheckpointManagerOptions(save_interval_steps=100, save_on_preemption=True)
        with CheckpointManager(tmp_path, opts) as mgr:
            assert not mgr.should_save(7) and not mgr.preempted
            os.kill(os.getpid(), signal.SIGTERM)
            assert mgr.preempted and mgr.should_save(7)
            assert mgr.save(7, TINY)
            assert calls == [signal.SIGTERM]
            assert signal.getsignal(signal.SIGTERM) == mgr._on_signal
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, old)


def test_save_on_preemption_needs_the_main_thread(tmp_path):
    errors = []

    def build():
        try:
            CheckpointManager(tmp_path, CheckpointManagerOptions(save_on_preemption=True))
        except ValueError as e:
            errors.append(str(e))

    t = threading.Thread(target=build)
    t.start()
    t.join()
    assert errors and "only in the main thread" in errors[0]


def test_metrics_without_the_ranked_metric_raise_with_the_available_names(tmp_path):
    with CheckpointManager(tmp_path, CheckpointManagerOptions(metric="eval_loss")) as mgr:
        with pytest.raises(KeyError, match=r"metric 'eval_loss' cannot be read from the metrics \['loss'\]"):
            mgr.save(1, TINY, metrics={"loss": 1.0})
        assert mgr.save(1, TINY)  # saving without metrics is allowed: never 'best'
        assert mgr.best_step() is None


def test_orbax_best_fn_with_max_to_keep_never_deletes_the_newest(tmp_path):
    """Orbax's manager, with best_fn and max_to_keep, kept only the best and deleted the newest step, so a crash
    restarted from an old one. Here the newest survives together with the best."""
    losses = {1: 0.9, 2: 0.3, 3: 0.2, 4: 0.5, 5: 0.8}
    opts = CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m["loss"], keep_best=2)
    with CheckpointManager(tmp_path, opts) as mgr:
        for step, loss in losses.items():
            mgr.save(step, TINY, metrics={"loss": loss})
        assert mgr.all_steps() == [2, 3, 5]  # the 2 best (0.2, 0.3) and the newest (0.8)
        assert mgr.latest_step() == 5 and mgr.best_step() == 3
    opts = CheckpointManagerOptions(max_to_keep=2, metric="acc", best_mode="max")
    with CheckpointManager(tmp_path / "acc", opts) as mgr:
        for step, acc in {1: 0.5, 2: 0.9, 3: 0.9, 4: 0.1, 5: 0.2}.items():
            mgr.save(step, TINY, metrics={"acc": acc})
        assert mgr.all_steps() == [2, 4, 5] and mgr.best_step() == 2  # a tie goes to the earlier step


def _reference_survivors(history, opts):
    """Retention by its definition, simulated save by save (deleted checkpoints never come back)."""
    alive: dict[int, float | None] = {}
    for step, value in history:
        alive[step] = value
        if opts.max_to_keep is None:
            continue
        steps = sorted(alive)
        protected = set(steps[-opts.max_to_keep :]) | {steps[-1]}
        if opts.keep_period:
            protected |= {s for s in steps if s % opts.keep_period == 0}
        if opts.metric:
            sign = 1 if opts.best_mode == "min" else -1
            ranked = sorted((sign * v, s) for s, v in alive.items() if v is not None and not math.isnan(v))
            protected |= {s for _, s in ranked[: opts.keep_best or 1]}
        alive = {s: v for s, v in alive.items() if s in protected}
    return sorted(alive)


options_strategy = st.builds(
    CheckpointManagerOptions,
    max_to_keep=st.one_of(st.none(), st.integers(1, 4)),
    metric=st.sampled_from([None, "loss"]),
    best_mode=st.sampled_from(["min", "max"]),
).flatmap(
    lambda o: st.builds(
        CheckpointManagerOptions,
        max_to_keep=st.just(o.max_to_keep),
        keep_period=st.none() if o.max_to_keep is None else st.one_of(st.none(), st.integers(2, 5)),
        metric=st.just(o.metric),
        best_mode=st.just(o.best_mode),
        keep_best=st.none() if o.max_to_keep is None or o.metric is None else st.one_of(st.none(), st.integers(1, 3)),
    )
)
value_strategy = st.one_of(st.none(), st.sampled_from([0.5, 1.0, 2.0, float("nan")]), st.floats(0, 10, width=32))
history_strategy = st.lists(st.tuples(st.integers(1, 4), value_strategy), min_size=1, max_size=12).map(
    lambda gaps: [(sum(g for g, _ in gaps[: i + 1]), v) for i, (_, v) in enumerate(gaps)]
)


def _check_invariants(survivors, history, opts):
    assert history[-1][0] in survivors  # the newest is never deleted
    if opts.metric:
        ranked = [(v if opts.best_mode == "min" else -v, s) for s, v in history if v is not None and not math.isnan(v)]
        if ranked:
            assert min(ranked)[1] in survivors  # the best ever saved is never deleted
    if opts.max_to_keep is None:
        assert survivors == [s for s, _ in history]


@settings(max_examples=300, deadline=None)
@given(opts=options_strategy, history=history_strategy)
def test_select_to_keep_matches_the_definition(opts, history):
    alive: dict[int, dict | None] = {}
    for step, value in history:
        alive[step] = None if value is None else {"loss": value}
        keep = select_to_keep(alive, alive, opts)
        alive = {s: m for s, m in alive.items() if s in keep}
    survivors = sorted(alive)
    assert survivors == _reference_survivors(history, opts)
    _check_invariants(survivors, history, opts)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(opts=options_strategy, history=history_strategy)
def test_the_manager_keeps_exactly_the_policys_set_on_disk(tmp_path_factory, opts, history):
    directory = tmp_path_factory.mktemp("retention")
    with CheckpointManager(directory, opts) as mgr:
        for step, value in history:
            assert mgr.save(step, TINY, metrics=None if value is None else {"loss": value})
        survivors = mgr.all_steps()
    assert survivors == _reference_survivors(history, opts)
    _check_invariants(survivors, history, opts)
    with CheckpointManager(directory, opts) as mgr:  # a new manager sees the same set, metrics included
        assert mgr.all_steps() == survivors
        if opts.metric:
            ranked = [
                (v if opts.best_mode == "min" else -v, s) for s, v in history if v is not None and not math.isnan(v)
            ]
            assert mgr.best_step() == (min(ranked)[1] if ranked else None)


# ---- retention="total": Hugging Face's save_total_limit -------------------------------------------------------------

LOSSES = {10: 0.5, 20: 0.2, 30: 0.4, 40: 0.3, 50: 0.6}  # the best is 20, the newest 50


@pytest.mark.parametrize(
    ("kwargs", "survivors"),
    [
        # protected: newest 50 and best 20, already 2 = max_to_keep: nothing else (union would add 40)
        ({"max_to_keep": 2, "metric": "loss"}, [20, 50]),
        # the protected steps outnumber max_to_keep=1: both stay (transformers' "limit=1 keeps 2")
        ({"max_to_keep": 1, "metric": "loss"}, [20, 50]),
        # max_to_keep=3: 20 and 50, then the newest other, 40
        ({"max_to_keep": 3, "metric": "loss"}, [20, 40, 50]),
        # best = newest (max mode: 0.6 at 50): one protected step, then 40 and 30
        ({"max_to_keep": 3, "metric": "loss", "best_mode": "max"}, [30, 40, 50]),
        # keep_period=20 protects 20 and 40, with 50: room for one more, 30
        ({"max_to_keep": 4, "keep_period": 20}, [20, 30, 40, 50]),
        # should_keep_fn protects 10 (no metric), with 50: nothing else fits in 2
        ({"max_to_keep": 2, "should_keep_fn": lambda step: step == 10}, [10, 50]),
        ({"max_to_keep": 3, "should_keep_fn": lambda step: step == 10}, [10, 40, 50]),
    ],
)
def test_total_retention_hand_derived(kwargs, survivors):
    opts = CheckpointManagerOptions(retention="total", **kwargs)
    metrics = {s: {"loss": v} for s, v in LOSSES.items()}
    assert sorted(select_to_keep(LOSSES, metrics, opts)) == survivors


def test_union_retention_keeps_the_protected_in_addition():
    opts = CheckpointManagerOptions(max_to_keep=2, metric="loss", should_keep_fn=lambda step: step == 10)
    metrics = {s: {"loss": v} for s, v in LOSSES.items()}
    assert sorted(select_to_keep(LOSSES, metrics, opts)) == [10, 20, 40, 50]  # newest 2 + best + should_keep


def _hf_rotation_survivors(root, history, limit):
    """transformers' own rotate_checkpoints, save by save, on real folders; the best is the strictly best loss so far
    (ties to the earlier step), as the Trainer's best_model_checkpoint."""
    from transformers.trainer_utils import rotate_checkpoints

    best_value, best = math.inf, None
    for step, value in history:
        (root / f"checkpoint-{step}").mkdir()
        if value is not None and value < best_value:  # NaN is never better
            best_value, best = value, step
        best_path = None if best is None else str(root / f"checkpoint-{best}")
        rotate_checkpoints(str(root), save_total_limit=limit, best_model_checkpoint=best_path, use_mtime=False)
    return sorted(int(p.name.split("-")[1]) for p in root.iterdir())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limit=st.integers(1, 4), history=history_strategy, by_metric=st.booleans())
def test_total_retention_is_transformers_rotate_checkpoints(tmp_path_factory, limit, history, by_metric):
    """The policy with retention="total" deletes what transformers' rotation deletes, save by save, whether the best
    is ranked by the metric or named by should_keep_fn."""
    pytest.importorskip("transformers")
    theirs = _hf_rotation_survivors(tmp_path_factory.mktemp("hf"), history, limit)
    best = {}  # the step should_keep_fn names: the strictly best so far
    best_value = math.inf
    alive: dict[int, dict | None] = {}
    for step, value in history:
        if value is not None and value < best_value:
            best_value, best["step"] = value, step
        alive[step] = None if value is None else {"loss": value}
        if by_metric:
            opts = CheckpointManagerOptions(max_to_keep=limit, retention="total", metric="loss")
        else:
            opts = CheckpointManagerOptions(
                max_to_keep=limit, retention="total", should_keep_fn=lambda s: s == best.get("step")
            )
        keep = select_to_keep(alive, alive, opts)
        alive = {s: m for s, m in alive.items() if s in keep}
    assert sorted(alive) == theirs


def test_apply_retention_counts_and_deletes_uncommitted_folders_like_transformers(tmp_path):
    """Committed checkpoints 2, 4, 5 among foreign folders 1 and 3; the best is 1 (should_keep_fn), 2 in total. The
    manager's retention after each commit sees only 2, 4, 5 (5 and 4 stay); apply_retention(include_uncommitted)
    then counts all: 5 and the best 1 fill the limit, so 3 and 4 go — as transformers' rotation, run on a copy."""
    from transformers.trainer_utils import rotate_checkpoints

    for root in (tmp_path / "ours", tmp_path / "hf"):
        for step in (1, 3):
            (root / f"checkpoint-{step}").mkdir(parents=True)
            (root / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"x")
    opts = CheckpointManagerOptions(
        step_prefix="checkpoint-", step_digits=0, max_to_keep=2, retention="total", should_keep_fn=lambda s: s == 1
    )
    with CheckpointManager(tmp_path / "ours", opts) as mgr:
        for step in (2, 4, 5):
            mgr.save(step, TINY)
        assert mgr.all_steps() == [4, 5]
        assert mgr.apply_retention() == []  # committed only: already within the limit
        assert mgr.apply_retention(include_uncommitted=True) == [3, 4]
        assert mgr.all_steps() == [5]
    for step in (2, 4, 5):
        (tmp_path / "hf" / f"checkpoint-{step}").mkdir()
    rotate_checkpoints(str(tmp_path / "hf"), 2, best_model_checkpoint=str(tmp_path / "hf" / "checkpoint-1"))
    ours = sorted(p.name for p in (tmp_path / "ours").iterdir())
    assert ours == sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["checkpoint-1", "checkpoint-5"]


def test_delete_an_uncommitted_folder_only_when_asked(tmp_path):
    opts = CheckpointManagerOptions(step_prefix="checkpoint-", step_digits=0)
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "model.safetensors").write_bytes(b"x")
    with CheckpointManager(tmp_path, opts) as mgr:
        with pytest.raises(FileNotFoundError, match=r"no committed checkpoint for step 3 .*\(checkpoint-3\)"):
            mgr.delete(3)
        mgr.delete(3, include_uncommitted=True)
        assert not (tmp_path / "checkpoint-3").exists()
        with pytest.raises(FileNotFoundError, match=r"no directory for step 3"):
            mgr.delete(3, include_uncommitted=True)
        mgr.save(3, TINY)  # the step is free: a same-named folder would have blocked the commit
        mgr.delete(3, include_uncommitted=True)  # a committed one goes too
        assert mgr.all_steps() == [] and os.listdir(tmp_path) == []
