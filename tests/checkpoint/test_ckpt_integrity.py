"""Atomic commits and integrity: what is listed, what a crash leaves, and corrupt files found by name on restore."""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import xxhash

sys.path.insert(0, str(Path(__file__).parent))  # ckpt_helpers.py lives next to this file
from ckpt_helpers import assert_bitwise_equal, bits, make_state  # noqa: E402

from ftrain.checkpoint import (  # noqa: E402
    CheckpointManager,
    CheckpointManagerOptions,
    CorruptCheckpointError,
    StepAlreadyExistsError,
    atomic,
)
from ftrain.checkpoint.integrity import Manifest  # noqa: E402


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _middle_of_the_tensors(path: Path) -> int:
    """The offset of the middle byte of a safetensors file's tensor data (after the 8-byte length and the header)."""
    start = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    return (start + path.stat().st_size) // 2


def _truncate(path: Path, n: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-n])


def _three_checkpoints(tmp_path, backend="safetensors", hash_algorithm="xxh3_128"):
    states = {s: make_state(steps=s) for s in (1, 2, 3)}
    with CheckpointManager(tmp_path, CheckpointManagerOptions(backend=backend, hash_algorithm=hash_algorithm)) as mgr:
        for s, state in states.items():
            mgr.save(s, state)
    return states


def test_layout_on_disk_and_the_commit_marker(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(120, make_state())
    ckpt = tmp_path / "step_00000120"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000120"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["COMMIT", "manifest.json", "meta.json", "state.safetensors"]
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["algorithm"] == "xxh3_128"
    assert sorted(manifest["files"]) == ["meta.json", "state.safetensors"]
    for name, entry in manifest["files"].items():  # the streamed digests are the xxhash library's over the whole file
        data = (ckpt / name).read_bytes()
        assert entry == {"size": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}
    commit = json.loads((ckpt / "COMMIT").read_text())
    manifest_bytes = (ckpt / "manifest.json").read_bytes()
    assert commit == {
        "step": 120,
        "algorithm": "xxh3_128",
        "manifest": {"size": len(manifest_bytes), "digest": xxhash.xxh3_128(manifest_bytes).hexdigest()},
    }


def test_a_sha256_manifest_holds_hashlib_digests_and_still_restores_with_the_default_options(tmp_path):
    """hash_algorithm="sha256" (and checkpoints written when sha256 was the default) record sha256 in the manifest
    and the marker; a manager with the default options verifies them with sha256, and finds a flipped byte."""
    state = make_state()
    with CheckpointManager(tmp_path, CheckpointManagerOptions(hash_algorithm="sha256")) as mgr:
        mgr.save(1, state)
        mgr.save(2, state)
    ckpt = tmp_path / "step_00000001"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["algorithm"] == "sha256"
    for name, entry in manifest["files"].items():
        data = (ckpt / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    commit = json.loads((ckpt / "COMMIT").read_text())
    assert commit["algorithm"] == "sha256"
    assert commit["manifest"]["digest"] == hashlib.sha256((ckpt / "manifest.json").read_bytes()).hexdigest()
    damaged = tmp_path / "step_00000002" / "state.safetensors"
    _flip_byte(damaged, _middle_of_the_tensors(damaged))
    with CheckpointManager(tmp_path) as mgr:
        assert_bitwise_equal(mgr.restore(1, like=make_state(seed=3)), state)
        with pytest.raises(CorruptCheckpointError, match="'state.safetensors' is corrupt: its sha256 differs"):
            mgr.restore(2, like=make_state())


def test_hugging_face_style_directory_names(tmp_path):
    opts = CheckpointManagerOptions(step_prefix="checkpoint-", step_digits=0)
    with CheckpointManager(tmp_path, opts) as mgr:
        mgr.save(7, make_state())
        mgr.save(1200, make_state())
        assert mgr.all_steps() == [7, 1200]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1200", "checkpoint-7"]


def test_uncommitted_and_temporary_directories_are_never_listed_and_leftovers_are_cleaned(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, make_state())
    (tmp_path / "step_00000002").mkdir()  # no COMMIT marker: e.g. copied by hand, half-way
    (tmp_path / "step_00000002" / "state.safetensors").write_bytes(b"partial")
    (tmp_path / ".tmp-step_00000003-abc").mkdir()  # a save killed mid-write
    (tmp_path / ".tmp-step_00000003-abc" / "state.safetensors").write_bytes(b"partial")
    (tmp_path / ".del-step_00000000-def").mkdir()  # a deletion killed mid-way
    assert atomic.list_steps(tmp_path, atomic.StepNaming()) == [1]
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.all_steps() == [1] and mgr.latest_step() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001", "step_00000002"]


def test_a_save_that_fails_before_the_commit_leaves_nothing_listed(tmp_path, monkeypatch):
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, make_state())

        def crash(tmp, final, marker):
            raise OSError("disk full (simulated)")

        monkeypatch.setattr(atomic, "commit", crash)
        with pytest.raises(OSError, match="disk full"):
            mgr.save(2, make_state())
        assert mgr.all_steps() == [1]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]  # the failed save cleaned up
    monkeypatch.undo()
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.all_steps() == [1]
        assert mgr.save(2, make_state())  # the step is free again
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_files_written_with_the_state_are_committed_and_verified_with_it(tmp_path):
    """save(write_files=...): the caller's files land in the uncommitted folder and are hashed into the manifest (a
    damaged one is named by its check), a failing writer leaves nothing listed, and async saves refuse it."""

    def extra(folder):
        assert folder.name.startswith(".tmp-")  # written before the commit
        (folder / "extra.txt").write_text("hello")

    def failing(folder):
        raise OSError("disk full (simulated)")

    state = make_state()
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, state, write_files=extra)
        with pytest.raises(OSError, match="disk full"):
            mgr.save(2, state, write_files=failing)
        assert mgr.all_steps() == [1]
    ckpt = tmp_path / "step_00000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert sorted(files) == ["extra.txt", "meta.json", "state.safetensors"] and files["extra.txt"]["size"] == 5
    manifest = Manifest.from_bytes((ckpt / "manifest.json").read_bytes(), ckpt)
    manifest.verify(ckpt)
    (ckpt / "extra.txt").write_text("hellO")
    with pytest.raises(CorruptCheckpointError, match="extra.txt"):
        manifest.verify(ckpt)
    with CheckpointManager(tmp_path / "async", CheckpointManagerOptions(async_save=True)) as mgr:
        with pytest.raises(ValueError, match=r"write_files=\.\.\.\) needs a synchronous save"):
            mgr.save(1, state, write_files=extra)


def test_a_committed_step_is_never_overwritten(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(5, make_state())
        assert not mgr.save(5, make_state())  # not due: not newer than the newest
        with pytest.raises(StepAlreadyExistsError, match=r"step 5 already has a checkpoint .*manager.delete\(step\)"):
            mgr.save(5, make_state(), force=True)
        mgr.delete(5)
        assert mgr.all_steps() == [] and mgr.save(5, make_state(), force=True)


@pytest.mark.parametrize("algorithm", ["xxh3_128", "sha256"])
@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: _flip_byte(p, p.stat().st_size - 3), "its {} differs from the manifest's"),
        (lambda p: _flip_byte(p, _middle_of_the_tensors(p)), "its {} differs from the manifest's"),
        (lambda p: _truncate(p, 5), r"expected \d+ bytes, found \d+ \(truncated or overwritten\?\)"),
    ],
    ids=["flipped-last-byte", "flipped-middle-byte", "truncated"],
)
def test_a_damaged_tensor_file_is_named_and_restore_falls_back_to_the_previous_checkpoint(
    tmp_path, damage, message, algorithm
):
    states = _three_checkpoints(tmp_path, hash_algorithm=algorithm)
    damage(tmp_path / "step_00000003" / "state.safetensors")
    message = message.format(algorithm)
    with CheckpointManager(tmp_path) as mgr:
        with pytest.raises(CorruptCheckpointError, match=rf"file 'state.safetensors' is corrupt: {message}") as e:
            mgr.restore(3, like=make_state())
        assert e.value.file == "state.safetensors" and e.value.path == tmp_path / "step_00000003"
        with pytest.warns(
            UserWarning,
            match=r"skipping the corrupt checkpoint step_00000003: .*state.safetensors.* "
            r"\(falling back to step 2\)",
        ):
            restored = mgr.restore(like=make_state())
    assert_bitwise_equal(restored, states[2])


@pytest.mark.parametrize("name", ["meta.json", "manifest.json", "COMMIT"])
def test_damaged_metadata_files_are_named_too(tmp_path, name):
    _three_checkpoints(tmp_path)
    path = tmp_path / "step_00000003" / name
    _flip_byte(path, path.stat().st_size // 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the manager warns at start that it cannot read step 3's metrics
        mgr = CheckpointManager(tmp_path)
    with mgr, pytest.raises(CorruptCheckpointError, match=f"file '{name}' is corrupt") as e:
        mgr.restore(3, like=make_state())
    assert e.value.file == name


def test_a_damaged_dcp_file_is_named(tmp_path):
    _three_checkpoints(tmp_path, backend="dcp")
    shard = tmp_path / "step_00000003" / "dcp" / "__0_0.distcp"
    _flip_byte(shard, shard.stat().st_size // 2)
    with CheckpointManager(tmp_path, CheckpointManagerOptions(backend="dcp")) as mgr:
        with pytest.raises(CorruptCheckpointError, match=r"file 'dcp/__0_0.distcp' is corrupt: its xxh3_128 differs"):
            mgr.restore(3, like=make_state())
        with pytest.warns(UserWarning, match="falling back to step 2"):
            assert int(mgr.restore(like=make_state()).step) == 2


def test_when_every_checkpoint_is_corrupt_restore_raises(tmp_path):
    _three_checkpoints(tmp_path)
    for s in (1, 2, 3):
        _truncate(tmp_path / f"step_0000000{s}" / "state.safetensors", 1)
    with CheckpointManager(tmp_path) as mgr, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CorruptCheckpointError, match="every checkpoint in .* is corrupt"):
            mgr.restore(like=make_state())
    assert len(caught) == 3


def test_verify_false_skips_the_hash_check(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"w": torch.zeros(4)})
        path = tmp_path / "step_00000001" / "state.safetensors"
        _flip_byte(path, path.stat().st_size - 1)  # the last byte of the last float: 0.0 -> tiny negative... bits
        restored = mgr.restore(1, verify=False)["['w']"]
    assert bits(restored) != bits(torch.zeros(4))
