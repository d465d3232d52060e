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
