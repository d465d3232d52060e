"""``export_pretrained``: a trained state as a ``save_pretrained``-compatible directory.

The directory holds what ``transformers``' ``save_pretrained`` writes for a single-file model: ``model.safetensors``
(``{"format": "pt"}`` metadata, written by the safetensors library itself) with the state dict's persistent
tensors under their ``state_dict`` names — tied weights once, under the name ``named_parameters`` keeps (GPT-2's
``transformer.wte.weight``, not ``lm_head.weight``), as transformers does — plus, for a transformers model,
``config.json`` (with ``architectures`` and ``dtype`` filled in, as ``save_pretrained`` does) and
``generation_config.json`` when the model can generate. ``AutoModelForCausalLM.from_pretrained(directory)`` then
loads it. Each file is written under a temporary name, fsynced and renamed, so a reader never sees half a file;
other files in the directory (a tokenizer) are left alone.

Non-transformers models get ``model.safetensors`` and, when their config is a dataclass or a dict (or ``config=``
is given), a ``config.json`` of it.

Example:
    >>> import tempfile, torch
    >>> from safetensors.torch import load_file
    >>> tmpdir = tempfile.TemporaryDirectory()
    >>> d = tmpdir.name
    >>> export_pretrained(torch.nn.Linear(2, 1), d)
    >>> sorted(load_file(f"{d}/model.safetensors"))
    ['bias', 'weight']
    >>> tmpdir.cleanup()
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftrain.checkpoint.atomic import fsync_dir
from ftrain.module import split_module

__all__ = ["export_pretrained"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def _split(state_or_module: Any) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """``(skeleton, tensors by name)`` from a TrainState or an ``nn.Module``."""
    if isinstance(state_or_module, nn.Module):
        skeleton, params, buffers = split_module(state_or_module)
    elif all(hasattr(state_or_module, f) for f in ("skeleton", "params", "buffers")):
        skeleton, params, buffers = state_or_module.skeleton, state_or_module.params, state_or_module.buffers
        if skeleton is None:
            raise ValueError("export_pretrained: this state has no skeleton; pass the module instead (state.load_into)")
    else:
        raise TypeError(
            f"export_pretrained: expected a TrainState or a torch.nn.Module, got {type(state_or_module).__name__}"
        )
    return skeleton, {**params, **buffers}


def _state_dict_tensors(skeleton: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The persistent tensors in ``state_dict`` order, tied ones once, as contiguous CPU tensors of their own."""
    names = [n for n in skeleton.state_dict(keep_vars=True) if n in tensors]
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name in names:
        t = tensors[name].detach()
        if type(t).__name__ == "DTensor":
            t = t.full_tensor()
        t = t.cpu().contiguous()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()  # safetensors refuses tensors that share memory
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _main_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    return next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)


def _write_config(skeleton: nn.Module, config: Any, tmp: Path, dtype: torch.dtype) -> None:
    config = config if config is not None else getattr(skeleton, "config", None)
    if config is None:
        return
    if hasattr(config, "save_pretrained"):  # a transformers PretrainedConfig: what save_pretrained writes
        config = copy.deepcopy(config)
        config.dtype = str(dtype).removeprefix("torch.")
        if hasattr(skeleton, "config") and hasattr(skeleton, "can_generate"):
            config.architectures = [type(skeleton).__name__]
        config.save_pretrained(tmp)
        generation = getattr(skeleton, "generation_config", None)
        can_generate = getattr(skeleton, "can_generate", lambda: False)
        if generation is not None and can_generate():
            generation.save_pretrained(tmp)
        return
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not isinstance(config, dict):
        raise TypeError(
            f"export_pretrained: config must be a transformers PretrainedConfig, a dataclass or a dict, got "
            f"{type(config).__name__}"
        )
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_pretrained(state_or_module: Any, directory: str | os.PathLike, *, config: Any = None) -> None:
    """Writes ``model.safetensors`` (and ``config.json`` for models with a config) into ``directory``.

    Args:
        state_or_module: a :class:`~ftrain.TrainState` (its skeleton, params and buffers) or an ``nn.Module``.
        directory: created if missing; files of the same names are replaced atomically, others are kept.
        config: the config to write instead of the model's own ``.config`` (a transformers config, a dataclass or a
            dict).

    Raises:
        TypeError: not a state or module, or a config that cannot be written.
        ValueError: a state without a skeleton.
    """
    from safetensors.torch import save_file

    skeleton, tensors = _split(state_or_module)
    weights = _state_dict_tensors(skeleton, tensors)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".tmp-export-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        save_file(weights, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        _write_config(skeleton, config, tmp, _main_dtype(weights))
        for path in sorted(tmp.iterdir()):
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            os.replace(path, directory / path.name)
        fsync_dir(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
