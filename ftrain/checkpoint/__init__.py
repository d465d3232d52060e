"""Checkpoints: save and restore a whole run, atomically, with retention policies and asynchronous writes.

- :class:`CheckpointManager` / :class:`CheckpointManagerOptions`: when to save (every N steps, on given steps, every
  T seconds, on SIGTERM), what to keep (last N, every K-th, best N by a metric, steps a ``should_keep_fn`` names;
  never the newest or the best; ``retention="total"`` counts those within N, as Hugging Face's
  ``save_total_limit``), sync or async writes, and restore with a fallback past corrupt checkpoints.
- Backends: ``"safetensors"`` (default), ``"dcp"`` (torch.distributed.checkpoint, sharded DTensor states) and
  ``"orbax"`` (optional: ``pip install ftrain[orbax]``); or any :class:`Backend`.
- :func:`export_pretrained`: a ``save_pretrained``-compatible model directory (``model.safetensors`` +
  ``config.json``) that ``transformers`` ``from_pretrained`` loads.
- :func:`save_tree_file` / :func:`load_tree_file`: one pytree (an optimizer state, say) in one safetensors file,
  checked against a template on load.
- :class:`StepNaming`, :func:`list_step_dirs`, :func:`is_committed`: how step directories are named and parsed
  (``step_00000120``, or Hugging Face's ``checkpoint-120``), every directory named like a step, and whether one
  holds a committed checkpoint.

Nothing here unpickles: tensors go through safetensors (or DCP with a restricted metadata loader, or orbax),
metadata through JSON. See :mod:`ftrain.checkpoint.manager` for the layout on disk.
"""

from ftrain.checkpoint.atomic import StepNaming, is_committed, list_step_dirs
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
from ftrain.checkpoint.treefile import load_tree_file, save_tree_file

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
    "StepNaming",
    "export_pretrained",
    "get_backend",
    "is_committed",
    "list_step_dirs",
    "load_tree_file",
    "save_tree_file",
    "select_to_keep",
]
