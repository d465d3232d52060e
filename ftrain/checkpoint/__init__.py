"""Checkpoints: save and restore a whole run, atomically, with retention policies and asynchronous writes.

- :class:`CheckpointManager` / :class:`CheckpointManagerOptions`: when to save (every N steps, on given steps, every
  T seconds, on SIGTERM), what to keep (last N, every K-th, best N by a metric; never the newest or the best), sync
  or async writes, and restore with a fallback past corrupt checkpoints.
- Backends: ``"safetensors"`` (default), ``"dcp"`` (torch.distributed.checkpoint, sharded DTensor states) and
  ``"orbax"`` (optional: ``pip install ftrain[orbax]``); or any :class:`Backend`.
- :func:`export_pretrained`: a ``save_pretrained``-compatible model directory (``model.safetensors`` +
  ``config.json``) that ``transformers`` ``from_pretrained`` loads.

Nothing here unpickles: tensors go through safetensors (or DCP with a restricted metadata loader, or orbax),
metadata through JSON. See :mod:`ftrain.checkpoint.manager` for the layout on disk.
"""

from ftrain.checkpoint.backends import Backend, SafetensorsBackend, get_backend
from ftrain.checkpoint.errors import (
    CheckpointError,
    CheckpointMismatchError,
    CorruptCheckpointError,
    StepAlreadyExistsError,
)
from ftrain.checkpoint.export import export_pretrained
from ftrain.checkpoint.manager import CheckpointInfo, CheckpointManager
from ftrain.checkpoint.policy import CheckpointManagerOptions, select_to_keep

__all__ = [
    "Backend",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointManagerOptions",
    "CheckpointMismatchError",
    "CorruptCheckpointError",
    "SafetensorsBackend",
    "StepAlreadyExistsError",
    "export_pretrained",
    "get_backend",
    "select_to_keep",
]
