"""Atomic checkpoint directories: write under a temporary name, commit with a marker, then rename.

A save goes through these states on disk (DESIGN.md invariant 7):

1. ``.tmp-step_00000120-<uuid>/`` — files are written and fsynced here; nothing lists it.
2. ``manifest.json`` (sizes and hashes of every file), then the ``COMMIT`` marker (the manifest's size and hash)
   are written last and fsynced, then the directory itself.
3. ``rename(.tmp-step_00000120-<uuid>, step_00000120)``, then the parent directory is fsynced.

A directory is a checkpoint only if its name parses as a step *and* it holds ``COMMIT``, so a save killed at any
moment leaves either the previous set of checkpoints or the new one, never a half-written checkpoint that is listed.
Deleting renames the directory to ``.del-...`` first, so a deletion killed half-way never leaves a listed
checkpoint with missing files. Leftover ``.tmp-*`` and ``.del-*`` directories are removed by
:func:`clean_leftovers` (the manager calls it when it starts).

Example:
    >>> import tempfile, pathlib
    >>> tmpdir = tempfile.TemporaryDirectory()
    >>> root = pathlib.Path(tmpdir.name)
    >>> naming = StepNaming()
    >>> tmp = make_tmp_dir(root, naming.name(120))
    >>> tmp.name.startswith(".tmp-step_00000120-"), list_steps(root, naming)
    (True, [])
    >>> _ = write_file(tmp / "data.bin", b"payload", "sha256")
    >>> commit(tmp, root / naming.name(120), {"step": 120})
    >>> list_steps(root, naming)
    [120]
    >>> tmpdir.cleanup()
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from ftrain.checkpoint.integrity import FileEntry, hash_bytes

__all__ = [
    "COMMIT_FILE",
    "DELETE_PREFIX",
    "MANIFEST_FILE",
    "META_FILE",
    "TMP_PREFIX",
    "StepNaming",
    "clean_leftovers",
    "commit",
    "fsync_dir",
    "is_committed",
    "list_step_dirs",
    "list_steps",
    "make_tmp_dir",
    "read_commit",
    "remove_dir",
    "unlist_dir",
    "write_file",
]

COMMIT_FILE = "COMMIT"
MANIFEST_FILE = "manifest.json"
META_FILE = "meta.json"
TMP_PREFIX = ".tmp-"
DELETE_PREFIX = ".del-"


@dataclasses.dataclass(frozen=True)
class StepNaming:
    """How a step maps to a directory name: ``prefix`` + the step zero-padded to ``digits`` digits.

    The default gives ``step_00000120``; ``StepNaming("checkpoint-", 0)`` gives Hugging Face's ``checkpoint-120``.
    Parsing accepts any number of digits, so steps past ``10**digits`` still sort and list correctly. This is the
    one parser of checkpoint directory names in ftrain (the Trainer's ``checkpoint-N`` included).

    Example:
        >>> StepNaming().name(120), StepNaming().parse("step_00000120"), StepNaming().parse(".tmp-step_1-x")
        ('step_00000120', 120, None)
        >>> hf = StepNaming("checkpoint-", 0)
        >>> hf.name(7), hf.parse("checkpoint-3x"), hf.parse("checkpoint-3x", exact=False)
        ('checkpoint-7', None, 3)
    """

    prefix: str = "step_"
    digits: int = 8

    def __post_init__(self):
        bad = not self.prefix or self.prefix.startswith(".") or "/" in self.prefix or os.sep in self.prefix
        if bad:
            raise ValueError(
                f"step_prefix={self.prefix!r}: a directory name prefix must be non-empty, have no path separator "
                "and not start with '.' (names starting with '.' are temporary)"
            )
        if not isinstance(self.digits, int) or not 0 <= self.digits <= 20:
            raise ValueError(f"step_digits={self.digits!r}: must be an int in [0, 20] (0 = no zero padding)")

    def name(self, step: int) -> str:
        return f"{self.prefix}{step:0{self.digits}d}"

    def parse(self, name: str, *, exact: bool = True) -> int | None:
        """The step a directory name stands for, or ``None``.

        Args:
            name: a directory name (not a path).
            exact: the name must be the prefix and digits only. ``False`` also accepts anything after the digits
                (``checkpoint-3x`` -> 3), as transformers' ``sort_checkpoints`` reads names; never for listing
                checkpoints to restore.
        """
        pattern = re.escape(self.prefix) + r"(\d+)"
        m = re.fullmatch(pattern, name) if exact else re.match(pattern, name)
        return int(m.group(1)) if m else None


def fsync_dir(path: str | os.PathLike) -> None:
    """Flushes a directory's entries (new, renamed or removed files) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str | os.PathLike, data: bytes, algorithm: str) -> FileEntry:
    """Writes ``data``, fsyncs it, and returns its :class:`FileEntry`."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hash_bytes(data, algorithm)


def make_tmp_dir(root: str | os.PathLike, final_name: str, token: str | None = None) -> Path:
    """Creates ``root/.tmp-<final_name>-<token>`` (``token`` a fresh uuid unless given: all ranks of a distributed
    save pass the same one) and returns it. ``root`` is created if needed."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{final_name}-{token or uuid.uuid4().hex}"
    tmp.mkdir(exist_ok=token is not None)
    return tmp


def commit(tmp: str | os.PathLike, final: str | os.PathLike, marker: dict[str, Any]) -> None:
    """Writes the ``COMMIT`` marker (JSON ``marker``) into ``tmp``, fsyncs it and ``tmp``, renames ``tmp`` to
    ``final`` and fsyncs the parent. ``final`` must not exist."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        raise FileExistsError(f"cannot commit {tmp.name}: {final} already exists")
    with open(tmp / COMMIT_FILE, "w") as f:
        json.dump(marker, f)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    os.rename(tmp, final)
    fsync_dir(final.parent)


def is_committed(path: str | os.PathLike) -> bool:
    return (Path(path) / COMMIT_FILE).is_file()


def read_commit(path: str | os.PathLike) -> dict[str, Any]:
    """The ``COMMIT`` marker's JSON; ``{}`` if it cannot be parsed (the caller reports the corruption)."""
    try:
        doc = json.loads((Path(path) / COMMIT_FILE).read_bytes())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def list_step_dirs(root: str | os.PathLike, naming: StepNaming, *, exact: bool = True) -> list[tuple[int, Path]]:
    """Every directory under ``root`` whose name parses as a step, committed or not, as ``(step, root / name)``.

    Sorted by step; names of the same step (``checkpoint-5``, ``checkpoint-05``) keep the order the directory
    lists them in. Files and other names are left out. A checkpoint is only a listed directory that also holds
    ``COMMIT`` (:func:`list_steps`); this lists what other tools (Hugging Face's ``Trainer``) count as checkpoints.

    Args:
        root: the directory to list.
        naming: the names of step directories.
        exact: see :meth:`StepNaming.parse`.

    Raises:
        FileNotFoundError: ``root`` does not exist.

    Example:
        >>> import tempfile, pathlib
        >>> tmpdir = tempfile.TemporaryDirectory()
        >>> root = pathlib.Path(tmpdir.name)
        >>> for name in ("checkpoint-10", "checkpoint-2", "checkpoint-x", ".tmp-checkpoint-3-0"):
        ...     (root / name).mkdir()
        >>> [(step, path.name) for step, path in list_step_dirs(root, StepNaming("checkpoint-", 0))]
        [(2, 'checkpoint-2'), (10, 'checkpoint-10')]
        >>> tmpdir.cleanup()
    """
    root = Path(root)
    found = []
    with os.scandir(root) as entries:
        for entry in entries:
            step = naming.parse(entry.name, exact=exact)
            if step is not None and entry.is_dir():
                found.append((step, root / entry.name))
    return sorted(found, key=lambda item: item[0])


def list_steps(root: str | os.PathLike, naming: StepNaming) -> list[int]:
    """Steps with a committed checkpoint under ``root``, ascending. Temporary and uncommitted directories are never
    listed."""
    if not Path(root).is_dir():
        return []
    return [step for step, path in list_step_dirs(root, naming) if is_committed(path)]


def unlist_dir(path: str | os.PathLike) -> Path:
    """Renames a checkpoint directory to ``.del-<name>-<uuid>`` (so it is no longer listed, atomically) and fsyncs
    the parent; returns the new path, for :func:`shutil.rmtree`."""
    path = Path(path)
    trash = path.parent / f"{DELETE_PREFIX}{path.name}-{uuid.uuid4().hex}"
    os.rename(path, trash)
    fsync_dir(path.parent)
    return trash


def remove_dir(path: str | os.PathLike) -> None:
    """Deletes a checkpoint directory so that no reader ever sees it half-deleted: :func:`unlist_dir`, then remove
    the files."""
    shutil.rmtree(unlist_dir(path), ignore_errors=True)


def clean_leftovers(root: str | os.PathLike) -> list[str]:
    """Removes the ``.tmp-*`` and ``.del-*`` directories a killed save or deletion left under ``root``; returns
    their names. Call it only when no save into ``root`` is in progress."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for entry in os.scandir(root):
        if entry.name.startswith((TMP_PREFIX, DELETE_PREFIX)) and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.name)
    if removed:
        fsync_dir(root)
    return sorted(removed)
