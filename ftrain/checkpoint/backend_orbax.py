"""The ``"orbax"`` backend: orbax-checkpoint (tensorstore / OCDBT) files, an optional extra.

``pip install ftrain[orbax]`` brings ``orbax-checkpoint`` (with jax and tensorstore) and ``ml_dtypes``. Nothing here
imports them until the backend is built, so ``import ftrain.checkpoint`` stays light. Tensors go to orbax as numpy
views of CPU tensors (no copy); ``bfloat16`` and float8 go through ``ml_dtypes`` by reinterpreting the bits, so the
round trip is bitwise. Orbax cannot store zero-size arrays: those are rebuilt from their recorded shape.

Layout: ``<checkpoint>/orbax/`` (orbax's own directory) and ``<checkpoint>/orbax_keys.json`` (key path -> orbax
name: orbax treats ``.`` and brackets in keys as structure, so leaves are stored as ``t00000``, ``t00001``, ...).
One process: orbax's multi-host mode needs ``jax.distributed``, which ftrain does not set up.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ftrain.checkpoint.atomic import write_file
from ftrain.checkpoint.errors import CorruptCheckpointError
from ftrain.checkpoint.integrity import FileEntry, Manifest
from ftrain.checkpoint.treeio import is_dtensor

__all__ = ["OrbaxBackend", "import_orbax"]

SUBDIR = "orbax"
KEYS_FILE = "orbax_keys.json"
# torch dtypes without a numpy equivalent: (same-width integer dtype to reinterpret through, ml_dtypes name)
_VIA_ML_DTYPES = {
    torch.bfloat16: (torch.int16, "bfloat16"),
    torch.float8_e4m3fn: (torch.uint8, "float8_e4m3fn"),
    torch.float8_e5m2: (torch.uint8, "float8_e5m2"),
}


def import_orbax() -> tuple[Any, Any]:
    """``(orbax.checkpoint, ml_dtypes)``.

    Raises:
        ImportError: either is missing, with the command that installs them.
    """
    try:
        import ml_dtypes
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise ImportError(
            f"the 'orbax' checkpoint backend needs orbax-checkpoint and ml_dtypes ({e}). Install them with "
            "`pip install ftrain[orbax]` (or `pip install orbax-checkpoint ml_dtypes`), or use backend='safetensors'."
        ) from e
    return ocp, ml_dtypes


def _to_numpy(t: torch.Tensor, ml_dtypes: Any):
    t = t.detach()
    t = (t if t.device.type == "cpu" else t.cpu()).contiguous()
    if t.dtype in _VIA_ML_DTYPES:
        via, name = _VIA_ML_DTYPES[t.dtype]
        return t.view(via).numpy().view(getattr(ml_dtypes, name))
    return t.numpy()


def _from_numpy(a: Any, dtype: torch.dtype) -> torch.Tensor:
    import numpy as np

    if not a.flags.writeable or not a.flags.c_contiguous:
        a = np.array(a, copy=True, order="C")
    if dtype in _VIA_ML_DTYPES:
        via = _VIA_ML_DTYPES[dtype][0]
        return torch.from_numpy(a.view(torch.empty((), dtype=via).numpy().dtype)).view(dtype)
    return torch.from_numpy(a)


class OrbaxBackend:
    """orbax-checkpoint's ``StandardCheckpointer`` under ``<checkpoint>/orbax/``. One process.

    Raises:
        ImportError: when built without orbax-checkpoint installed (names the extra).
    """

    name = "orbax"
    collective = False
    process_group = None

    def __init__(self):
        import_orbax()

    def write(
        self, directory: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], *, hash_algorithm: str
    ) -> dict[str, FileEntry]:
        ocp, ml_dtypes = import_orbax()
        keys, arrays = {}, {}
        for i, (key, t) in enumerate(tensors.items()):
            if is_dtensor(t):
                raise TypeError(f"{key} is a DTensor: the orbax backend writes from one process; use backend='dcp'")
            keys[key] = f"t{i:05d}"
            if t.numel():
                arrays[keys[key]] = _to_numpy(t, ml_dtypes)
        entry = write_file(Path(directory) / KEYS_FILE, json.dumps(keys, indent=1).encode(), hash_algorithm)
        checkpointer = ocp.StandardCheckpointer()
        try:
            checkpointer.save(Path(directory) / SUBDIR, arrays)
            checkpointer.wait_until_finished()
        finally:
            checkpointer.close()
        return {KEYS_FILE: entry}

    def read(
        self, directory: Path, like: Mapping[str, torch.Tensor], *, manifest: Manifest | None = None
    ) -> dict[str, torch.Tensor]:
        ocp, ml_dtypes = import_orbax()
        directory = Path(directory)
        if manifest is not None:
            names = [n for n in manifest.files if n.startswith(f"{SUBDIR}/") or n == KEYS_FILE]
            if KEYS_FILE not in names:
                raise CorruptCheckpointError(
                    f"checkpoint {str(directory)!r}: file {KEYS_FILE!r} is not in the manifest; this is not an orbax "
                    "checkpoint or it is corrupt.",
                    path=directory,
                    file=KEYS_FILE,
                )
            manifest.verify(directory, names)
        keys = json.loads((directory / KEYS_FILE).read_text())
        abstract = {
            keys[k]: _to_numpy(torch.empty(t.shape, dtype=t.dtype), ml_dtypes) for k, t in like.items() if t.numel()
        }
        checkpointer = ocp.StandardCheckpointer()
        try:
            arrays = checkpointer.restore(directory / SUBDIR, abstract) if abstract else {}
        finally:
            checkpointer.close()
        out = {}
        for key, t in like.items():
            loaded = _from_numpy(arrays[keys[key]], t.dtype) if t.numel() else torch.empty(t.shape, dtype=t.dtype)
            out[key] = loaded.reshape(t.shape)
        return out

    def __repr__(self) -> str:
        return "OrbaxBackend()"
