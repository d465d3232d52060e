"""Integrity of a checkpoint: every file's size and hash in ``manifest.json``, checked on restore.

The manifest lists each file of a checkpoint (paths relative to its directory, ``/``-separated) with its size in
bytes and its digest. The ``COMMIT`` marker, written last, records the manifest's own size and digest, so a flipped
byte anywhere — in a tensor file, in ``meta.json`` or in the manifest itself — is found on restore, and the error
names the file.

Algorithms (the manifest and the marker record which one wrote them, so a checkpoint always verifies with its own):

- ``xxh3_128`` (the default; the ``xxhash`` package): a 128-bit non-cryptographic checksum at ~13 GB/s on one core
  here, well above the disk or the page cache, so a verified restore costs about what an unverified one does. It
  detects what happens to files by accident — torn or partial writes, truncation, bit rot, a file from another
  save — with a chance of a random collision of 2^-128. It does **not** protect against deliberate tampering:
  anyone who can write the files can make a different file with the same checksum.
- any :mod:`hashlib` algorithm, e.g. ``sha256`` (hardware-accelerated on current x86 and ARM CPUs, ~0.8 GB/s on one
  core here; ``blake2b`` measured 0.6 GB/s): a cryptographic hash, for when a checkpoint must not be forged by
  whoever can write the disk (keep the ``COMMIT`` marker's digest somewhere they cannot). Checkpoints written
  before ``xxh3_128`` became the default recorded ``sha256`` and still verify.

Large buffers are hashed on a helper thread while the next one is read or written (:class:`OverlappedHasher`; both
``hashlib`` and ``xxhash`` release the GIL).

Example:
    >>> import tempfile, pathlib
    >>> tmpdir = tempfile.TemporaryDirectory()
    >>> d = pathlib.Path(tmpdir.name)
    >>> _ = (d / "a.bin").write_bytes(b"hello")
    >>> entry = hash_file(d / "a.bin", "sha256")
    >>> entry.size, entry.digest[:12]
    (5, '2cf24dba5fb0')
    >>> verify_file(d, "a.bin", entry, "sha256")
    >>> _ = (d / "a.bin").write_bytes(b"hellO")
    >>> verify_file(d, "a.bin", entry, "sha256")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ftrain.checkpoint.errors.CorruptCheckpointError: checkpoint ... file 'a.bin' is corrupt: its sha256 differs ...
    >>> tmpdir.cleanup()
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ftrain.checkpoint.errors import CorruptCheckpointError

__all__ = [
    "FileEntry",
    "Manifest",
    "OverlappedHasher",
    "DEFAULT_HASH",
    "check_hash_algorithm",
    "hash_bytes",
    "hash_file",
    "new_hash",
    "verify_bytes",
    "verify_file",
]

CHUNK = 16 << 20  # bytes per hash update / read; large enough to amortize, small enough to overlap
_MANIFEST_FORMAT = "ftrain.checkpoint.manifest"


#: The manifest's default algorithm: a fast checksum (see the module docstring for what it detects).
DEFAULT_HASH = "xxh3_128"
#: Algorithms from outside hashlib, by name: a function that imports and builds the hash object.
_FAST_HASHES = {"xxh3_128": lambda: _import_xxhash().xxh3_128()}


def _import_xxhash() -> Any:
    try:
        import xxhash
    except ImportError:
        raise ImportError(
            "the checkpoint hash 'xxh3_128' needs the xxhash package (a dependency of ftrain): pip install xxhash, "
            "or save with CheckpointManagerOptions(hash_algorithm='sha256')"
        ) from None
    return xxhash


def check_hash_algorithm(name: str) -> str:
    """Returns ``name`` if it is ``xxh3_128`` or a :mod:`hashlib` algorithm (with no length argument); raises
    ``ValueError`` otherwise."""
    if isinstance(name, str) and name in _FAST_HASHES:
        return name
    if not isinstance(name, str) or name not in hashlib.algorithms_available or name.startswith("shake"):
        good = [*_FAST_HASHES, *sorted(a for a in hashlib.algorithms_guaranteed if not a.startswith("shake"))]
        raise ValueError(
            f"hash_algorithm={name!r} is not a hashlib algorithm usable here nor xxh3_128; use one of {good}"
        )
    return name


def new_hash(algorithm: str) -> Any:
    """A fresh hash object (``update`` / ``hexdigest``) for a name :func:`check_hash_algorithm` accepts.

    Example:
        >>> new_hash("xxh3_128").hexdigest() == "99aa06d3014798d86001c324468d497f"  # the empty input
        True
    """
    make = _FAST_HASHES.get(algorithm)
    return make() if make is not None else hashlib.new(algorithm)


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint: ``size`` in bytes and the hex ``digest`` of its content."""

    size: int
    digest: str


class OverlappedHasher:
    """A hash fed from one thread and computed on another, so hashing overlaps with the caller's I/O.

    ``update`` queues a buffer (the caller must not change it until :meth:`hexdigest` returns); updates are applied
    in order by a single helper thread. Buffers under 1 MiB are hashed inline.
    """

    def __init__(self, algorithm: str):
        self._hash = new_hash(algorithm)
        self._pool: ThreadPoolExecutor | None = None
        self._last: Future | None = None
        self.size = 0

    def update(self, data: bytes | memoryview) -> Future | None:
        """Queues ``data``; returns a future that is done once it is hashed (``None`` when hashed inline)."""
        n = memoryview(data).nbytes
        self.size += n
        if n < (1 << 20):
            self._drain()
            self._hash.update(data)
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ftrain-hash")
        self._last = self._pool.submit(self._hash.update, data)
        return self._last

    def _drain(self) -> None:
        if self._last is not None:
            self._last.result()
            self._last = None

    def hexdigest(self) -> str:
        """Waits for queued updates; the digest of everything so far."""
        try:
            self._drain()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
        return self._hash.hexdigest()

    def entry(self) -> FileEntry:
        return FileEntry(self.size, self.hexdigest())


def hash_bytes(data: bytes, algorithm: str) -> FileEntry:
    h = new_hash(algorithm)
    h.update(data)
    return FileEntry(len(data), h.hexdigest())


def hash_file(path: str | os.PathLike, algorithm: str, *, fsync: bool = False) -> FileEntry:
    """Size and digest of a file, read in chunks; with ``fsync``, also flushes the file to disk."""
    hasher = OverlappedHasher(algorithm)
    with open(path, "rb", buffering=0) as f:
        size = max(1, min(CHUNK, os.fstat(f.fileno()).st_size))
        buffers = [bytearray(size), bytearray(size)]  # one is read into while the other is hashed
        pending: list[Future | None] = [None, None]
        for i in itertools.count():
            if pending[i % 2] is not None:
                pending[i % 2].result()
            n = f.readinto(buffers[i % 2])
            if not n:
                break
            pending[i % 2] = hasher.update(memoryview(buffers[i % 2])[:n])
        if fsync:
            os.fsync(f.fileno())
    return hasher.entry()


def _corrupt(directory: str | os.PathLike, name: str, why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"checkpoint {str(directory)!r}: file {name!r} is corrupt: {why}. The checkpoint cannot be restored as it "
        "is; restore an earlier step (manager.all_steps() lists them) or delete this one.",
        path=directory,
        file=name,
    )


def verify_file(directory: str | os.PathLike, name: str, entry: FileEntry, algorithm: str) -> None:
    """Raises :class:`CorruptCheckpointError` naming ``name`` unless the file has ``entry``'s size and digest."""
    path = Path(directory) / name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise _corrupt(directory, name, "it is missing") from None
    if size != entry.size:
        raise _corrupt(directory, name, f"expected {entry.size} bytes, found {size} (truncated or overwritten?)")
    got = hash_file(path, algorithm)
    if got.digest != entry.digest:
        raise _corrupt(directory, name, f"its {algorithm} differs from the manifest's (flipped bits?)")


def verify_bytes(directory: str | os.PathLike, name: str, data: bytes, entry: FileEntry, algorithm: str) -> None:
    """Like :func:`verify_file` for a file already read into ``data``."""
    if len(data) != entry.size:
        raise _corrupt(directory, name, f"expected {entry.size} bytes, found {len(data)} (truncated or overwritten?)")
    if hash_bytes(data, algorithm).digest != entry.digest:
        raise _corrupt(directory, name, f"its {algorithm} differs from the manifest's (flipped bits?)")


@dataclasses.dataclass(frozen=True)
class Manifest:
    """Every file of a checkpoint with its :class:`FileEntry`, and the hash algorithm used.

    On disk (``manifest.json``)::

        {"format": "ftrain.checkpoint.manifest", "version": 1, "algorithm": "sha256",
         "files": {"meta.json": {"size": 1234, "sha256": "9f86..."}, "state.safetensors": {...}}}
    """

    algorithm: str
    files: Mapping[str, FileEntry]

    def to_bytes(self) -> bytes:
        files = {name: {"size": e.size, self.algorithm: e.digest} for name, e in sorted(self.files.items())}
        doc = {"format": _MANIFEST_FORMAT, "version": 1, "algorithm": self.algorithm, "files": files}
        return (json.dumps(doc, indent=1) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, directory: str | os.PathLike) -> Manifest:
        try:
            doc: Any = json.loads(data)
            algorithm = check_hash_algorithm(doc["algorithm"])
            if doc.get("format") != _MANIFEST_FORMAT:
                raise ValueError(f"format is {doc.get('format')!r}")
            files = {str(n): FileEntry(int(e["size"]), str(e[algorithm])) for n, e in doc["files"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise _corrupt(directory, "manifest.json", f"it is not a valid manifest ({e})") from None
        return cls(algorithm, files)

    def verify(self, directory: str | os.PathLike, names: list[str] | None = None) -> None:
        """Checks the listed files (default: all) against the manifest."""
        for name in self.files if names is None else names:
            if name not in self.files:
                raise _corrupt(directory, name, "it is not in the manifest")
            verify_file(directory, name, self.files[name], self.algorithm)
