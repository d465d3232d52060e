"""Storage backends: the :class:`Backend` protocol and the default, :class:`SafetensorsBackend`.

A backend only moves tensors: it writes a ``{key path: tensor}`` dict into a (temporary) directory and reads it back
into new tensors shaped like a template. Everything else — JSON metadata, the manifest, the commit, retention — is
the manager's. Backends: ``"safetensors"`` (this module), ``"dcp"``
(:class:`~ftrain.checkpoint.backend_dcp.DcpBackend`, DTensor states on any number of processes) and ``"orbax"``
(:class:`~ftrain.checkpoint.backend_orbax.OrbaxBackend`, optional extra).

The safetensors file is written here in one streaming pass, straight from the tensors' memory (no serialized copy),
hashed while the bytes go out, and read back on several threads straight into new tensors, hashed in the same
pass (:mod:`ftrain.checkpoint.fileio`). The layout is the safetensors format (8-byte little-endian header length,
JSON header, then the tensors back to back, each aligned to its element size), so ``safetensors.torch.load_file``
reads these files too; tests check it does. Nothing is memory-mapped: a restored tensor never aliases the file.

Example:
    >>> import tempfile, pathlib, torch
    >>> tmpdir = tempfile.TemporaryDirectory()
    >>> d = pathlib.Path(tmpdir.name)
    >>> b = SafetensorsBackend()
    >>> entries = b.write(d, {"['w']": torch.arange(3.0)}, {}, hash_algorithm="sha256")
    >>> sorted(entries)
    ['state.safetensors']
    >>> b.read(d, {"['w']": torch.empty(3)})["['w']"]
    tensor([0., 1., 2.])
    >>> tmpdir.cleanup()
"""

from __future__ import annotations

import itertools
import json
import os
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from ftrain.checkpoint.errors import CorruptCheckpointError
from ftrain.checkpoint.fileio import io_jobs, read_jobs, write_jobs
from ftrain.checkpoint.integrity import FileEntry, Manifest, new_hash
from ftrain.checkpoint.treeio import is_dtensor

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "SafetensorsBackend",
    "get_backend",
    "missing_backend_members",
    "read_safetensors",
    "read_safetensors_metadata",
    "write_safetensors",
]

#: The backends :func:`get_backend` builds from a name.
BACKEND_NAMES = ("safetensors", "dcp", "orbax")

_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.complex64: "C64",
}
_MAX_HEADER = 100 << 20


@runtime_checkable
class Backend(Protocol):
    """How tensors reach the disk. Implement it to add a storage format.

    Attributes:
        name: recorded in ``meta.json`` so a restore can tell which backend wrote a checkpoint.
        collective: True if every process calls ``write``/``read`` (each holding its shards, as DCP does); False if
            only the primary process writes a full copy.
        process_group: the ``torch.distributed`` group the manager coordinates over (which rank writes, barriers,
            the commit) and a collective backend's own collectives run on; ``None`` for the default group, or a
            lone process when ``torch.distributed`` is not initialized. One-process backends set ``None``.
    """

    name: str
    collective: bool
    process_group: Any

    def write(
        self, directory: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], *, hash_algorithm: str
    ) -> dict[str, FileEntry]:
        """Writes ``tensors`` (key path -> tensor) into ``directory``, which exists and is empty of the backend's
        files; fsyncs what it wrote. Returns the size and digest of the files it hashed while writing (the manager
        hashes any other file it finds). ``meta`` is the checkpoint's JSON metadata, for backends that embed it."""
        ...

    def read(
        self, directory: Path, like: Mapping[str, torch.Tensor], *, manifest: Manifest | None = None
    ) -> dict[str, torch.Tensor]:
        """New tensors for every key of ``like`` (dtype, shape, device or DTensor placement as the template's),
        never views of the files. With a ``manifest``, checks each file it reads against it and raises
        :class:`~ftrain.checkpoint.CorruptCheckpointError` naming the file."""
        ...


def missing_backend_members(obj: object) -> list[str]:
    """The members of :class:`Backend` that ``obj`` lacks (``[]`` for a backend), for an error that names them.

    Example:
        >>> missing_backend_members(SafetensorsBackend()), missing_backend_members(object())
        ([], ['name', 'collective', 'process_group', 'write', 'read'])
    """
    methods = [n for n, v in vars(Backend).items() if callable(v) and not n.startswith("_")]
    return [n for n in (*Backend.__annotations__, *methods) if not hasattr(obj, n)]


def _byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU contiguous tensor, without a copy."""
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _check_writable(key: str, t: torch.Tensor) -> None:
    if is_dtensor(t):
        raise TypeError(
            f"{key} is a DTensor: the safetensors backend writes one full copy from one process. Use "
            "CheckpointManagerOptions(backend='dcp') for sharded states."
        )
    if t.dtype not in _CODES:
        raise TypeError(f"{key}: dtype {t.dtype} cannot be stored in safetensors; cast it or use backend='dcp'")


def _host_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` on the CPU: a view of its memory if it is a contiguous CPU tensor, else of a copy."""
    t = t.detach()
    return _byte_view((t if t.device.type == "cpu" else t.cpu()).contiguous())


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    algorithm: str | None,
    metadata: Mapping[str, str] | None = None,
) -> FileEntry | None:
    """Writes a safetensors file in one pass from the tensors' memory (non-CPU tensors are copied a few at a time),
    fsyncs it once, and returns its size and ``algorithm`` digest (``None`` without an algorithm). Tensors are laid
    out largest element size first, so each is aligned."""
    if sys.byteorder != "little":
        raise NotImplementedError("the safetensors writer supports little-endian hosts only")
    for key, t in tensors.items():
        _check_writable(key, t)
    order = sorted(tensors, key=lambda k: -tensors[k].element_size())
    header: dict[str, Any] = {}
    offset = 0
    for key in order:
        t = tensors[key]
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    first = struct.pack("<Q", len(head)) + head
    hasher = new_hash(algorithm) if algorithm else None
    views = itertools.chain([memoryview(first)], (_host_bytes(tensors[key]) for key in order))
    with open(path, "wb", buffering=0) as f:
        write_jobs(f.fileno(), io_jobs(views, 0), hasher=hasher)
        os.fsync(f.fileno())
    return FileEntry(len(first) + offset, hasher.hexdigest()) if hasher is not None else None


def _corrupt(path: Path, why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"checkpoint {str(path.parent)!r}: file {path.name!r} is corrupt: {why}. The checkpoint cannot be restored as "
        "it is; restore an earlier step (manager.all_steps() lists them) or delete this one.",
        path=path.parent,
        file=path.name,
    )


def _read_into(f, mv: memoryview, path: Path) -> None:
    while mv.nbytes:
        n = f.readinto(mv)
        if not n:
            raise _corrupt(path, "it ends early (truncated)")
        mv = mv[n:]


def _parse_header(path: Path, f, size: int) -> tuple[bytes, dict[str, Any], dict[str, str]]:
    first = bytearray(8)
    _read_into(f, memoryview(first), path)
    (n,) = struct.unpack("<Q", first)
    if n > min(size - 8, _MAX_HEADER):
        raise _corrupt(path, f"its header length {n} does not fit in a {size}-byte file")
    head = bytearray(n)
    _read_into(f, memoryview(head), path)
    try:
        header = json.loads(bytes(head))
    except ValueError as e:
        raise _corrupt(path, f"its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        metadata = {}
    return bytes(first + head), header, metadata


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file's header (``{}`` if it has none); reads no tensor.

    Raises:
        CorruptCheckpointError: not a safetensors file (names it).
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise _corrupt(path, f"it has only {size} bytes")
    with open(path, "rb", buffering=0) as f:
        return _parse_header(path, f, size)[2]


def _plan(path: Path, header: dict[str, Any], like: Mapping[str, torch.Tensor], data_size: int) -> list[str]:
    """Checks the header against the templates; returns the keys in file order."""
    if set(header) != set(like):
        extra, missing = sorted(set(header) - set(like)), sorted(set(like) - set(header))
        raise _corrupt(path, f"its tensors differ from meta.json (extra: {extra[:3]}, missing: {missing[:3]})")
    spans = []
    for key, target in like.items():
        e = header[key]
        want = (_CODES.get(target.dtype), list(target.shape))
        if not isinstance(e, dict) or (e.get("dtype"), e.get("shape")) != want:
            raise _corrupt(path, f"{key} is stored as {e!r}, expected dtype {want[0]} shape {want[1]}")
        begin, end = e.get("data_offsets", (None, None))
        if (
            not (isinstance(begin, int) and isinstance(end, int))
            or end - begin != target.numel() * target.element_size()
        ):
            raise _corrupt(path, f"{key} has bad data offsets {e.get('data_offsets')!r}")
        spans.append((begin, end, key))
    spans.sort()
    pos = 0
    for begin, end, key in spans:
        if begin != pos:
            raise _corrupt(path, f"{key} starts at byte {begin}, expected {pos} (overlap or gap)")
        pos = end
    if pos != data_size:
        raise _corrupt(path, f"its tensors hold {pos} bytes but the file has {data_size} after the header")
    return [key for _, _, key in spans]


def read_safetensors(
    path: str | os.PathLike,
    like: Mapping[str, torch.Tensor],
    algorithm: str | None = None,
    expected: FileEntry | None = None,
) -> dict[str, torch.Tensor]:
    """Reads a safetensors file into new CPU tensors with ``like``'s dtypes and shapes, on several threads straight
    into the tensors' memory; with ``expected``, checks its size and ``algorithm`` digest in the same pass.

    Raises:
        CorruptCheckpointError: truncated, altered, or not matching ``like`` (names the file).
    """
    path = Path(path)
    size = path.stat().st_size
    if expected is not None and size != expected.size:
        raise _corrupt(path, f"expected {expected.size} bytes, found {size} (truncated or overwritten?)")
    if size < 8:
        raise _corrupt(path, f"it has only {size} bytes")
    hasher = new_hash(algorithm) if expected is not None else None
    with open(path, "rb", buffering=0) as f:
        first, header, _ = _parse_header(path, f, size)
        keys = _plan(path, header, like, size - len(first))
        out = {key: torch.empty(like[key].shape, dtype=like[key].dtype) for key in keys}
        if hasher is not None:
            hasher.update(first)
        jobs = io_jobs((_byte_view(out[key]) for key in keys), len(first))
        read_jobs(f.fileno(), jobs, hasher=hasher, short=lambda: _corrupt(path, "it ends early (truncated)"))
    if hasher is not None and hasher.hexdigest() != expected.digest:
        raise _corrupt(path, f"its {algorithm} differs from the manifest's (flipped bits?)")
    return out


class SafetensorsBackend:
    """All tensors of a state in one safetensors file (``state.safetensors``), keyed by key path. One process.

    Args:
        file_name: the file's name inside the checkpoint directory.
    """

    name = "safetensors"
    collective = False
    process_group = None

    def __init__(self, file_name: str = "state.safetensors"):
        self.file_name = file_name

    def write(
        self, directory: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], *, hash_algorithm: str
    ) -> dict[str, FileEntry]:
        entry = write_safetensors(Path(directory) / self.file_name, tensors, hash_algorithm, {"format": "pt"})
        return {self.file_name: entry}

    def read(
        self, directory: Path, like: Mapping[str, torch.Tensor], *, manifest: Manifest | None = None
    ) -> dict[str, torch.Tensor]:
        path = Path(directory) / self.file_name
        if not path.is_file():
            raise _corrupt(path, "it is missing")
        if manifest is None:
            return read_safetensors(path, like)
        if self.file_name not in manifest.files:
            raise _corrupt(path, "it is not in the manifest")
        return read_safetensors(path, like, manifest.algorithm, manifest.files[self.file_name])

    def __repr__(self) -> str:
        return f"SafetensorsBackend(file_name={self.file_name!r})"


def get_backend(backend: str | Backend) -> Backend:
    """A backend instance from its name (one of :data:`BACKEND_NAMES`) or the instance itself.

    Raises:
        ImportError: ``"orbax"`` without orbax-checkpoint installed (says which extra to install).
        ValueError: an unknown name.
    """
    if not isinstance(backend, str):
        return backend
    if backend == "safetensors":
        return SafetensorsBackend()
    if backend == "dcp":
        from ftrain.checkpoint.backend_dcp import DcpBackend

        return DcpBackend()
    if backend == "orbax":
        from ftrain.checkpoint.backend_orbax import OrbaxBackend

        return OrbaxBackend()
    raise ValueError(f"unknown checkpoint backend {backend!r}; use one of {list(BACKEND_NAMES)}")
