"""One pytree in one safetensors file: :func:`save_tree_file` and :func:`load_tree_file`.

For a part of a state kept next to a checkpoint rather than in it (an optimizer state, say). The tensors are
stored by key path (as in :mod:`ftrain.checkpoint.treeio`), and the leaf list — every leaf's path, kind, dtype and
shape, and the values of Python scalars — is JSON in the file's safetensors metadata under ``"leaves"``, next to
``"format": "pt"``, so ``safetensors.torch.load_file`` reads the tensors too. A load checks the file against the
template before it reads any tensor, with a :class:`~ftrain.checkpoint.CheckpointMismatchError` that names the
leaves that differ. A save writes a temporary file, fsyncs it and renames it, so a crash never leaves half a file
under the name.

Example:
    >>> import os, tempfile, torch
    >>> tmpdir = tempfile.TemporaryDirectory()
    >>> path = os.path.join(tmpdir.name, "tree.safetensors")
    >>> save_tree_file(path, {"mu": torch.arange(3.0), "count": torch.tensor(2), "lr": 0.1, "skip": None})
    >>> tree = load_tree_file(path, {"mu": torch.zeros(3), "count": torch.tensor(0), "lr": 0.0, "skip": None})
    >>> tree["mu"], tree["count"], tree["lr"], tree["skip"]
    (tensor([0., 1., 2.]), tensor(2), 0.1, None)
    >>> tmpdir.cleanup()
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch

from ftrain.checkpoint.atomic import fsync_dir
from ftrain.checkpoint.backends import read_safetensors, read_safetensors_metadata, write_safetensors
from ftrain.checkpoint.treeio import LeafSpec, check_fits, dtype_from_name, flatten, is_dtensor, rebuild

__all__ = ["LEAVES_KEY", "load_tree_file", "save_tree_file"]

#: The safetensors metadata key that holds the JSON leaf list.
LEAVES_KEY = "leaves"


def save_tree_file(path: str | os.PathLike, tree: Any, /) -> None:
    """Writes ``tree`` into the safetensors file ``path``: its tensors by key path (moved to the CPU), its leaf
    list in the metadata. Replaces an existing file atomically.

    Args:
        path: the file to write; its directory must exist.
        tree: a pytree of tensors, ``None`` and JSON-able scalars (``int``, ``float``, ``bool``, ``str``).

    Raises:
        TypeError: a leaf that cannot be stored (names its key path), e.g. a DTensor: gather it first.
    """
    specs, tensors = flatten(tree)
    for key, t in tensors.items():
        if is_dtensor(t):
            raise TypeError(
                f"save_tree_file: the leaf at {key} is a DTensor; a tree file holds one full copy. Gather it first "
                "(t.full_tensor()), or save the sharded state with a CheckpointManager(backend='dcp')."
            )
    metadata = {"format": "pt", LEAVES_KEY: json.dumps([s.to_json() for s in specs])}
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex}")
    try:
        write_safetensors(tmp, tensors, None, metadata)  # no manifest: nothing to hash
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def load_tree_file(path: str | os.PathLike, like: Any, /) -> Any:
    """The tree saved by :func:`save_tree_file` in ``path``, rebuilt on the template ``like``.

    Args:
        path: the file.
        like: a tree with the saved structure, dtypes and shapes; its leaves' devices (and DTensor placements) are
            the restored tensors' devices. Saved Python scalars replace the template's values.

    Returns:
        A tree shaped like ``like`` holding the saved leaves.

    Raises:
        CheckpointMismatchError: a key path, kind, dtype or shape differs from ``like`` (names them); nothing is
            read then.
        ValueError: the file's metadata holds no leaf list (a safetensors file that is not a tree file).
        CorruptCheckpointError: the file is truncated, or its tensors differ from its leaf list.
        FileNotFoundError: no such file.
    """
    path = Path(path)
    metadata = read_safetensors_metadata(path)
    try:
        specs = [LeafSpec.from_json(doc) for doc in json.loads(metadata[LEAVES_KEY])]
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"{path} is not a tree file: its safetensors metadata has no {LEAVES_KEY!r} list of leaves. Write it "
            "with ftrain.checkpoint.save_tree_file, or read its tensors with safetensors.torch.load_file."
        ) from None
    check_fits(specs, like, where=f"the tree file {str(path)!r}")
    templates = {s.path: torch.empty(s.shape, dtype=dtype_from_name(s.dtype)) for s in specs if s.kind == "tensor"}
    return rebuild(like, specs, read_safetensors(path, templates))
