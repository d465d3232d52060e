"""Where the Trainer's model, state and batches live: transformers' device placement rules, in one place.

transformers moves the model to ``args.device`` when the ``Trainer`` is built (``place_model_on_device``), moves
every batch there in ``_prepare_inputs`` and, for ``bf16_full_eval`` / ``fp16_full_eval``, casts the model before
an evaluation run outside ``train()``. ftrain's ``Trainer`` calls the same overridable hooks at the same points;
the decisions they need are these small functions:

- :func:`is_model_parallel`: the model is spread by ``from_pretrained(device_map=...)`` (``hf_device_map``) over
  several devices, or sits on one device that is not ``args.device`` — it is then left where it is;
- :func:`place_model_on_device`: transformers' rule for moving the model when the Trainer is built;
- :func:`cast_for_full_eval`: the model as ``*_full_eval`` evaluates it — a copy with its floating-point tensors
  in the evaluation dtype on the device (transformers casts the user's model in place; here the model and the
  ``TrainState`` are left as they are);
- :func:`check_training_wrapper`: refuses a ``_wrap_model`` override that returns another module for training;
- :func:`prepare_step_batch`: a training step's batch through the trainer's ``_prepare_inputs``, one microbatch at
  a time, firing ``on_substep_end`` between them as transformers does.

The ``TrainState`` is made from the placed model, so its ``params``, ``buffers`` and ``opt_state`` are on the
device too; its ``step`` and RNG ``key`` stay on the CPU by design (the host derives each step's seed from them
without a device sync, see :mod:`ftrain.state`). With several processes :func:`ftrain.distributed.shard_state`
places the leaves on the mesh.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = [
    "cast_for_full_eval",
    "check_training_wrapper",
    "is_model_parallel",
    "place_model_on_device",
    "prepare_step_batch",
]


def is_model_parallel(model: nn.Module, device: torch.device) -> bool:
    """Whether ``model`` was placed by ``from_pretrained(device_map=...)`` in a way the Trainer must keep.

    transformers' rule: the accelerator devices of ``model.hf_device_map`` (``"cpu"`` and ``"disk"`` aside) are
    several, or one that is not ``device``. A model without ``hf_device_map`` is not.

    Example:
        >>> m = nn.Linear(1, 1)
        >>> m.hf_device_map = {"": 0, "lm_head": 1}
        >>> is_model_parallel(m, torch.device("cuda", 0)), is_model_parallel(nn.Linear(1, 1), torch.device("cpu"))
        (True, False)
    """
    device_map = getattr(model, "hf_device_map", None)
    if device_map is None:
        return False
    devices = {d for d in device_map.values() if d not in ("cpu", "disk")}
    if len(devices) > 1:
        return True
    return len(devices) == 1 and device != torch.device(next(iter(devices)))


def place_model_on_device(args: Any, model: nn.Module, *, sharded: bool, full_eval: bool) -> bool:
    """Whether the Trainer moves ``model`` to ``args.device`` when it is built (transformers' rule).

    ``args.place_model_on_device`` decides when it is not ``None`` (a ``TrainingArguments`` subclass may override
    the property). Otherwise the model is moved unless it is model parallel (:func:`is_model_parallel`), its
    leaves are sharded over processes (``sharded``: FSDP / ZeRO, placed by ``shard_state``), or a
    ``*_full_eval`` flag is set (``full_eval``: ``train()`` moves it, and an evaluation before training casts and
    moves a copy). A bitsandbytes-quantized model is never moved (its tensors do not support ``.to``).

    Example:
        >>> class Args:
        ...     place_model_on_device, device = None, torch.device("cpu")
        >>> place_model_on_device(Args(), nn.Linear(1, 1), sharded=False, full_eval=False)
        True
        >>> place_model_on_device(Args(), nn.Linear(1, 1), sharded=False, full_eval=True)
        False
    """
    if getattr(model, "quantization_method", None) == "bitsandbytes":
        return False
    if args.place_model_on_device is not None:
        return bool(args.place_model_on_device)
    return not (is_model_parallel(model, args.device) or sharded or full_eval)


def cast_for_full_eval(model: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A copy of ``model`` whose floating-point parameters and buffers are ``dtype`` on ``device`` (what
    transformers' ``model.to(dtype=..., device=...)`` makes of the model for ``*_full_eval``), leaving ``model``
    as it is. Tied weights stay tied; other tensors only move.

    Example:
        >>> lin = nn.Linear(2, 1)
        >>> half = cast_for_full_eval(lin, torch.bfloat16, torch.device("cpu"))
        >>> half.weight.dtype, lin.weight.dtype, half is lin
        (torch.bfloat16, torch.float32, False)
    """

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(cast(p), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = cast(b)
    return copy.deepcopy(model, memo)


def prepare_step_batch(trainer: Any, batch: Any) -> Any:
    """``batch`` (one microbatch, or a step's list of them) with each microbatch passed through
    ``trainer._prepare_inputs`` (to ``args.device``, plus what an override adds), in order; ``on_substep_end``
    fires after each microbatch but the last, as transformers interleaves them (the pure step then runs the
    prepared microbatches together)."""
    if not isinstance(batch, list):
        return trainer._prepare_inputs(batch)
    prepared = []
    for i, microbatch in enumerate(batch):
        prepared.append(trainer._prepare_inputs(microbatch))
        if i < len(batch) - 1:
            trainer.control = trainer.callback_handler.on_substep_end(trainer.args, trainer.state, trainer.control)
    return prepared


def check_training_wrapper(trainer_name: str, wrapped: Any, model: nn.Module) -> None:
    """Refuses a ``_wrap_model(model, training=True)`` that returned another module than ``model``.

    transformers trains the module ``_wrap_model`` returns. ftrain's pure step trains the ``TrainState``: tensors
    bound to a meta skeleton of ``model``, so a wrapper module (DDP, a compiled or patched copy) would be silently
    bypassed; changes an override makes to ``model`` in place are kept, since the state is built from it after.

    Raises:
        TypeError: ``wrapped`` is not ``model``, with what to do instead.
    """
    if wrapped is model:
        return
    raise TypeError(
        f"{trainer_name}._wrap_model(model, training=True) returned a {type(wrapped).__name__}, not the model. "
        "ftrain's train step runs the TrainState built from trainer.model (its own parallel layout and compile "
        "replace DDP/FSDP wrappers and torch.compile), so a different module cannot be trained. Return the model "
        "when training=True (change it in place if needed) and keep the wrapper for training=False, which "
        "evaluation uses; put per-step behaviour in training_step or compute_loss."
    )
