"""The parallel, hash-in-the-same-pass file I/O under the safetensors backend, with the chunks made tiny so a small
file spans many jobs and threads: bytes and digests against the safetensors library and hashlib / xxhash over the
whole file, the job layout, and a file that ends early."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))  # ckpt_helpers.py lives next to this file
from ckpt_helpers import assert_bitwise_equal, make_state  # noqa: E402

from ftrain.checkpoint import CheckpointManager, CheckpointManagerOptions, CorruptCheckpointError, fileio  # noqa: E402
from ftrain.checkpoint.backends import read_safetensors, write_safetensors  # noqa: E402
from ftrain.checkpoint.integrity import FileEntry  # noqa: E402

REFERENCE = {
    "sha256": lambda data: hashlib.sha256(data).hexdigest(),
    "xxh3_128": lambda data: xxhash.xxh3_128(data).hexdigest(),
}


@pytest.fixture
def tiny_chunks(monkeypatch):
    """1 KiB jobs on 3 reader threads: every tensor below spans or shares jobs."""
    monkeypatch.setattr(fileio, "IO_CHUNK", 1024)
    monkeypatch.setattr(fileio, "IO_THREADS", 3)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(40, 30, generator=g, dtype=torch.float64)
    out = {
        "f64": wide,  # 9600 bytes: split over ten jobs
        "transposed": wide.t()[:7],  # not contiguous: written from a copy
        "bf16": torch.randn(333, generator=g).to(torch.bfloat16),
        "i8": torch.randint(-128, 127, (1001,), generator=g, dtype=torch.int8),
        "mask": torch.rand(77, generator=g) > 0.5,
        "empty": torch.zeros(0, 3),
    }
    out.update({f"s{i:03d}": torch.tensor(i, dtype=torch.int32) for i in range(600)})  # > 512 views in one job
    return out


@pytest.mark.parametrize("algorithm", ["xxh3_128", "sha256"])
def test_a_file_of_many_jobs_round_trips_bitwise_and_its_digest_is_the_whole_files(tmp_path, tiny_chunks, algorithm):
    tensors, path = _tensors(), tmp_path / "t.safetensors"
    entry = write_safetensors(path, tensors, algorithm, {"format": "pt"})
    data = path.read_bytes()
    assert entry == FileEntry(len(data), REFERENCE[algorithm](data))
    by_library = load_file(path)
    assert set(by_library) == set(tensors)
    for key, t in tensors.items():
        assert by_library[key].dtype == t.dtype and torch.equal(by_library[key], t), key
    like = {k: torch.empty(t.shape, dtype=t.dtype) for k, t in tensors.items()}
    back = read_safetensors(path, like, algorithm, entry)
    for key, t in tensors.items():
        assert back[key].dtype == t.dtype and torch.equal(back[key], t), key
        assert back[key].is_contiguous() and back[key].untyped_storage().nbytes() == t.numel() * t.element_size()


def test_jobs_split_large_views_gather_small_ones_and_cover_the_file_once():
    views = [memoryview(bytearray(n)) for n in (5, 2500, 0, *([3] * 700), 1)]
    jobs = list(fileio.io_jobs(views, 100, chunk=1024))
    offset = 100
    for job in jobs:
        assert job.offset == offset and 0 < len(job.views) <= 512
        assert job.nbytes < 1024 + 1024  # at most one piece past the chunk
        offset += job.nbytes
    assert offset == 100 + sum(v.nbytes for v in views)
    assert [v.nbytes for v in jobs[0].views] == [5, 1024]  # the 2500-byte view is cut at the chunk
    assert max(len(j.views) for j in jobs) == 342  # 3-byte views gathered until the chunk is reached


def test_a_file_that_ends_early_stops_every_reader_with_the_error(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(bytes(range(256)) * 10)  # 2560 bytes; the views want 8192
    views = [memoryview(bytearray(4096)), memoryview(bytearray(4096))]
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(EOFError, match="short"):
            fileio.read_jobs(
                fd,
                fileio.io_jobs(views, 0, chunk=512),
                hasher=hashlib.sha256(),
                short=lambda: EOFError("short"),
                threads=3,
            )
    finally:
        os.close(fd)
    assert bytes(views[0][:2560]) == path.read_bytes()  # what was there was read


def test_the_manager_restores_bitwise_and_finds_a_flipped_byte_across_many_jobs(tmp_path, tiny_chunks):
    state = (make_state(), {"big": torch.randn(3000, generator=torch.Generator().manual_seed(1))})
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, state)
        assert_bitwise_equal(mgr.restore(like=(make_state(seed=5), {"big": torch.zeros(3000)})), state)
        path = tmp_path / "step_00000001" / "state.safetensors"
        data = bytearray(path.read_bytes())
        data[-5000] ^= 0x10  # in "big", jobs before the end: the jobs after it are read and hashed too
        path.write_bytes(bytes(data))
        with pytest.raises(CorruptCheckpointError, match="'state.safetensors' is corrupt: its xxh3_128 differs"):
            mgr.restore(1, like=(make_state(), {"big": torch.zeros(3000)}))


def test_an_unknown_hash_algorithm_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"hash_algorithm='xxh3' is not .* use one of \['xxh3_128', .*'sha256'"):
        CheckpointManagerOptions(hash_algorithm="xxh3")
