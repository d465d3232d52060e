"""The ``"dcp"`` backend: ``torch.distributed.checkpoint`` for sharded (DTensor) states, any world size.

Every process calls ``write`` with its own leaves — DTensor shards and replicated tensors — and DCP writes one
``__<rank>_0.distcp`` file per process plus a ``.metadata`` index into ``<checkpoint>/dcp/``. ``read`` loads into
empty tensors shaped like the template's leaves: a DTensor template gets its own shards whatever the world size or
placements at save time (DCP reshards), and a plain tensor template gets the full tensor, so a state saved by 2
processes restores in 1.

Loading never unpickles arbitrary objects (DESIGN.md invariant 7): DCP reads tensor data with
``torch.load(weights_only=True)``, but its stock reader loads ``.metadata`` with ``pickle.load`` and non-tensor items
with ``torch.load(weights_only=False)``. Here ``.metadata`` is read by an unpickler that resolves only DCP's own
metadata classes, ``torch.Size``, dtypes and layouts, and paths, and a checkpoint whose metadata lists any
non-tensor item is refused: both with :class:`~ftrain.checkpoint.CorruptCheckpointError`.

Example:
    >>> import tempfile, pathlib, torch
    >>> tmpdir = tempfile.TemporaryDirectory()
    >>> d = pathlib.Path(tmpdir.name)
    >>> b = DcpBackend()
    >>> b.write(d, {"['w']": torch.arange(4.0)}, {}, hash_algorithm="sha256")
    {}
    >>> b.read(d, {"['w']": torch.empty(4)})["['w']"]
    tensor([0., 1., 2., 3.])
    >>> tmpdir.cleanup()
"""

from __future__ import annotations

import contextlib
import io
import pickle
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ftrain.checkpoint.errors import CorruptCheckpointError
from ftrain.checkpoint.integrity import FileEntry, Manifest

__all__ = ["DcpBackend", "load_dcp_metadata"]

SUBDIR = "dcp"

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"MetadataIndex"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals DCP's metadata is made of (and torch dtypes); anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype | torch.layout):
            return getattr(torch, name)
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP metadata; refusing to load it")


def load_dcp_metadata(path: str | Path) -> Any:
    """DCP's ``.metadata`` file, unpickled with only DCP's metadata classes allowed.

    Raises:
        CorruptCheckpointError: the file is missing, unreadable, or references any other global.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, ImportError) as e:
        raise CorruptCheckpointError(
            f"checkpoint {str(path.parent.parent)!r}: file '{SUBDIR}/{path.name}' cannot be loaded safely ({e}). "
            "Restore an earlier step, or delete this one.",
            path=path.parent.parent,
            file=f"{SUBDIR}/{path.name}",
        ) from None
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    if not isinstance(metadata, Metadata):
        why = f"holds a {type(metadata).__name__}, not DCP Metadata"
    else:
        # DCP loads a non-tensor item with torch.load(weights_only=False): ftrain writes tensors only, so any other
        # item means the file was not written by ftrain, and is refused rather than unpickled.
        others = [k for k, md in metadata.state_dict_metadata.items() if not isinstance(md, TensorStorageMetadata)]
        why = f"lists non-tensor items {others[:3]}, which DCP would unpickle; refusing to load them" if others else ""
    if why:
        raise CorruptCheckpointError(
            f"checkpoint {str(path.parent.parent)!r}: file '{SUBDIR}/{path.name}' {why}",
            path=path.parent.parent,
            file=f"{SUBDIR}/{path.name}",
        )
    return metadata


def _safe_reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            metadata = load_dcp_metadata(Path(self.path) / ".metadata")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return _SafeFileSystemReader(path)


class DcpBackend:
    """``torch.distributed.checkpoint`` files in ``<checkpoint>/dcp/``; every process calls write and read.

    Args:
        process_group: the group DCP coordinates over (default: the default group, or none if
            ``torch.distributed`` is not initialized). With ``async_save`` on several processes, pass a group that
            the training step does not use (e.g. ``torch.distributed.new_group(backend="gloo")``): the background
            writer runs collectives on it.
        thread_count: DCP's writer threads per process.
    """

    name = "dcp"
    collective = True

    def __init__(self, process_group: Any = None, thread_count: int = 1):
        self.process_group = process_group
        self.thread_count = thread_count

    @staticmethod
    def _no_dist() -> bool:
        import torch.distributed as dist

        return not (dist.is_available() and dist.is_initialized())

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[dict[str, Any]]:
        """DCP's keyword arguments; without torch.distributed, hides DCP's warning that it runs in one process."""
        no_dist = self._no_dist()
        with warnings.catch_warnings():
            if no_dist:
                warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninit")
            yield {"process_group": self.process_group, "no_dist": no_dist}

    def write(
        self, directory: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], *, hash_algorithm: str
    ) -> dict[str, FileEntry]:
        import torch.distributed.checkpoint as dcp

        sub = Path(directory) / SUBDIR
        sub.mkdir(exist_ok=True)
        writer = dcp.FileSystemWriter(sub, single_file_per_rank=True, sync_files=True, thread_count=self.thread_count)
        with self._quiet() as kwargs:
            dcp.save(dict(tensors), storage_writer=writer, **kwargs)
        return {}

    def read(
        self, directory: Path, like: Mapping[str, torch.Tensor], *, manifest: Manifest | None = None
    ) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp

        sub = Path(directory) / SUBDIR
        if manifest is not None:
            names = [n for n in manifest.files if n.startswith(f"{SUBDIR}/")]
            if f"{SUBDIR}/.metadata" not in names:
                raise CorruptCheckpointError(
                    f"checkpoint {str(directory)!r}: file '{SUBDIR}/.metadata' is not in the manifest; this is not a "
                    "DCP checkpoint or it is corrupt.",
                    path=directory,
                    file=f"{SUBDIR}/.metadata",
                )
            manifest.verify(directory, names)
        targets = {k: torch.empty_like(v) for k, v in like.items()}
        with self._quiet() as kwargs:
            dcp.load(targets, storage_reader=_safe_reader(sub), **kwargs)
        return targets

    def __repr__(self) -> str:
        return f"DcpBackend(process_group={self.process_group!r})"
