"""``trainer.accelerator``: the part of accelerate's ``Accelerator`` API that scripts and callbacks read.

transformers' Trainer keeps an ``accelerate.Accelerator`` and HF code reads it: ``num_processes``,
``process_index``, ``is_main_process``, ``device``, ``distributed_type``, ``unwrap_model``, ``gather_for_metrics``,
``print``, ``split_between_processes``, the loader settings of ``accelerator_config`` (``split_batches``,
``dispatch_batches``, ``even_batches``, ``use_seedable_sampler``, ``non_blocking``), ``gradient_state``... ftrain
owns devices, process groups, precision and accumulation itself (a real ``Accelerator`` would take them over and keep
a process-wide singleton state), so :class:`TrainerAccelerator` answers the same questions from the facts the Trainer
decided (its plan, mesh and arguments), with accelerate's values: ``gradient_accumulation_steps`` is 1 as in
transformers (which accumulates outside accelerate; ftrain accumulates inside the pure step), ``gradient_state`` is a
:class:`GradientState` with the plugin settings transformers gives accelerate, and ``distributed_type`` is
accelerate's ``DistributedType`` member when accelerate is imported (an equal string enum otherwise: importing
ftrain does not import accelerate). :func:`configured_accelerate_state` finds a state a script set up with
accelerate, for ``accelerator_config["use_configured_state"]``.

Example:
    >>> acc = TrainerAccelerator(device=torch.device("cpu"), num_processes=1, process_index=0,
    ...                          local_process_index=0, mixed_precision="no")
    >>> acc.is_main_process, acc.use_distributed, acc.distributed_type == "NO"
    (True, False, True)
    >>> with acc.split_between_processes([1, 2, 3]) as mine:
    ...     mine
    [1, 2, 3]
"""

from __future__ import annotations

import contextlib
import enum
import gc
import math
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import torch

from ftrain.trainer.args import AcceleratorConfig
from ftrain.trainer.memory import clear_device_cache
from ftrain.trainer.utils import nested_gather

__all__ = ["DistributedType", "GradientState", "TrainerAccelerator", "configured_accelerate_state"]


class DistributedType(str, enum.Enum):
    """accelerate's ``DistributedType`` values ftrain runs as; equal to accelerate's members (both are strings)."""

    NO = "NO"
    MULTI_CPU = "MULTI_CPU"
    MULTI_GPU = "MULTI_GPU"
    FSDP = "FSDP"


def _distributed_type(name: str) -> Any:
    """accelerate's ``DistributedType`` member when accelerate is already imported (so ``isinstance`` checks
    against it hold), else ftrain's equal one: importing accelerate is left to code that uses it."""
    accelerate_utils = sys.modules.get("accelerate.utils")
    if accelerate_utils is not None and hasattr(accelerate_utils, "DistributedType"):
        return accelerate_utils.DistributedType[name]
    return DistributedType[name]


# accelerate's ``GradientAccumulationPlugin`` defaults: its ``to_kwargs()`` (``GradientState.plugin_kwargs``) keeps
# only the settings that differ from them.
_PLUGIN_DEFAULTS = {"num_steps": None, "adjust_scheduler": True, "sync_with_dataloader": True, "sync_each_batch": False}


class GradientState:
    """accelerate's ``accelerator.gradient_state``, as transformers' Trainer configures it.

    transformers accumulates gradients itself and hands accelerate a ``GradientAccumulationPlugin`` made of
    ``accelerator_config["gradient_accumulation_kwargs"]`` with ``num_steps`` forced to 1 (a ``num_steps`` given
    there became ``args.gradient_accumulation_steps``); ``plugin_kwargs`` holds that plugin's settings that differ
    from its defaults, as accelerate stores them. ftrain accumulates inside the pure step, so every callback sees a
    finished step: ``sync_gradients`` is True.

    Args:
        gradient_accumulation_kwargs: ``accelerator_config["gradient_accumulation_kwargs"]`` (or ``None``).

    Example:
        >>> GradientState({"sync_each_batch": True, "num_steps": 4}).plugin_kwargs
        {'sync_each_batch': True, 'num_steps': 1}
    """

    def __init__(self, gradient_accumulation_kwargs: dict[str, Any] | None = None) -> None:
        settings = {**(gradient_accumulation_kwargs or {}), "num_steps": 1}
        self.plugin_kwargs = {k: v for k, v in settings.items() if v != _PLUGIN_DEFAULTS[k]}
        self.sync_gradients = True

    @property
    def num_steps(self) -> int:
        """Micro-batches accelerate accumulates over: 1 (the Trainer accumulates)."""
        return self.plugin_kwargs.get("num_steps", 1)

    @property
    def adjust_scheduler(self) -> bool:
        """The plugin's ``adjust_scheduler`` when set, else False (accelerate's answer)."""
        return self.plugin_kwargs.get("adjust_scheduler", False)

    @property
    def sync_with_dataloader(self) -> bool:
        """The plugin's ``sync_with_dataloader`` (default True)."""
        return self.plugin_kwargs.get("sync_with_dataloader", True)


def configured_accelerate_state() -> Any:
    """The process state a script already set up with accelerate (``Accelerator()`` or ``PartialState()``), or
    ``None``: there is none unless accelerate was imported and its shared state filled (this never imports it)."""
    state_module = sys.modules.get("accelerate.state")
    partial_state = getattr(state_module, "PartialState", None)
    if partial_state is None or not partial_state._shared_state:
        return None
    return partial_state()


def _is_compiled(model: Any) -> bool:
    """``model`` is ``torch.compile``'s wrapper (nothing is, before dynamo is imported)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(model, eval_frame.OptimizedModule)


def _unwrap_parallel(model: Any) -> Any:
    """``model`` without its ``DataParallel`` / ``DistributedDataParallel`` / ``FullyShardedDataParallel``
    containers (each keeps the wrapped module as ``.module``)."""
    containers: tuple[type, ...] = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FullyShardedDataParallel

        containers += (FullyShardedDataParallel,)
    while isinstance(model, containers):
        model = model.module
    return model


class TrainerAccelerator:
    """accelerate's ``Accelerator`` questions, answered from the Trainer's facts (see the module docstring).

    Args:
        device: this process's device.
        num_processes, process_index, local_process_index: the world size and this process's ranks.
        mixed_precision: ``"bf16"`` or ``"no"`` (ftrain runs no fp16).
        fsdp: the parameters are sharded over the data-parallel ranks (``DistributedType.FSDP``).
        config: ``args.accelerator_config`` (an :class:`~ftrain.trainer.args.AcceleratorConfig`): its loader
            settings and ``gradient_accumulation_kwargs``; ``None`` reads as the defaults.
    """

    def __init__(
        self,
        *,
        device: torch.device,
        num_processes: int,
        process_index: int,
        local_process_index: int,
        mixed_precision: str,
        fsdp: bool = False,
        config: AcceleratorConfig | None = None,
    ) -> None:
        self.device = device
        self.num_processes = num_processes
        self.process_index = process_index
        self.local_process_index = local_process_index
        self.mixed_precision = mixed_precision
        self.distributed_type = self._distributed_type(fsdp)
        self._config = AcceleratorConfig() if config is None else config
        self.gradient_state = GradientState(self._config.gradient_accumulation_kwargs)
        self.state = SimpleNamespace(
            device=device,
            num_processes=num_processes,
            process_index=process_index,
            local_process_index=local_process_index,
            distributed_type=self.distributed_type,
            mixed_precision=mixed_precision,
            is_main_process=self.is_main_process,
            is_local_main_process=self.is_local_main_process,
            use_distributed=self.use_distributed,
        )

    def _distributed_type(self, fsdp: bool) -> Any:
        if self.num_processes <= 1:
            return _distributed_type("NO")
        if fsdp:
            return _distributed_type("FSDP")
        return _distributed_type("MULTI_GPU" if self.device.type == "cuda" else "MULTI_CPU")

    @property
    def split_batches(self) -> bool:
        """``accelerator_config["split_batches"]``: batch sizes are global, split over the processes."""
        return self._config.split_batches

    @property
    def dispatch_batches(self) -> bool | None:
        """``accelerator_config["dispatch_batches"]`` as given (ftrain's processes each read their own rows)."""
        return self._config.dispatch_batches

    @property
    def even_batches(self) -> bool:
        """``accelerator_config["even_batches"]``: every process gets a last batch."""
        return self._config.even_batches

    @property
    def use_seedable_sampler(self) -> bool:
        """``accelerator_config["use_seedable_sampler"]`` as given (ftrain's order is always seeded)."""
        return self._config.use_seedable_sampler

    @property
    def non_blocking(self) -> bool:
        """``accelerator_config["non_blocking"]``: host-to-device copies may overlap."""
        return self._config.non_blocking

    @property
    def sync_gradients(self) -> bool:
        """Whether the current step ends an accumulation: always True where ftrain's callbacks run."""
        return self.gradient_state.sync_gradients

    @sync_gradients.setter
    def sync_gradients(self, value: bool) -> None:
        self.gradient_state.sync_gradients = value

    @property
    def gradient_accumulation_steps(self) -> int:
        """1, as in transformers: accumulation happens outside accelerate."""
        return self.gradient_state.num_steps

    @property
    def is_main_process(self) -> bool:
        """Global rank 0."""
        return self.process_index == 0

    @property
    def is_local_main_process(self) -> bool:
        """Rank 0 of this node."""
        return self.local_process_index == 0

    @property
    def is_last_process(self) -> bool:
        """The highest global rank."""
        return self.process_index == self.num_processes - 1

    @property
    def use_distributed(self) -> bool:
        """More than one process trains."""
        return self.num_processes > 1

    def unwrap_model(self, model: Any, keep_fp32_wrapper: bool = True, keep_torch_compile: bool = True) -> Any:
        """``model`` without the containers that parallelise it (``DataParallel``, ``DistributedDataParallel``,
        ``FullyShardedDataParallel``), as accelerate unwraps it; a ``torch.compile`` wrapper is kept (around the
        unwrapped module) unless ``keep_torch_compile=False``. ftrain never wraps the Trainer's model itself, and
        adds no mixed-precision wrapper to its ``forward``, so ``keep_fp32_wrapper`` has nothing to remove."""
        compiled = model if _is_compiled(model) else None
        inner = _unwrap_parallel(model._orig_mod if compiled is not None else model)
        if compiled is None or not keep_torch_compile:
            return inner
        compiled._orig_mod = inner  # accelerate, too, puts the unwrapped module back inside the compiled one
        return compiled

    def gather(self, tensor: Any) -> Any:
        """``tensor`` (or nested lists / tuples / dicts of them) from every process, concatenated on dim 0."""
        return nested_gather(tensor)

    def gather_for_metrics(self, input_data: Any, use_gather_object: bool = False) -> Any:
        """:meth:`gather`; Python objects are gathered with ``all_gather_object`` when ``use_gather_object``.

        accelerate drops the samples its loader repeated to even out the last batch; this accelerator knows no
        loader, so it keeps every row it is given. ftrain's evaluation loop drops its own padding rows (the batch's
        ``_valid`` mask, False where a short last batch is padded over the processes) before it gathers; a custom
        loop over ``get_eval_dataloader()`` on several processes must drop them too."""
        if use_gather_object and self.use_distributed:
            gathered: list[Any] = [None] * self.num_processes
            torch.distributed.all_gather_object(gathered, input_data)
            return [x for part in gathered for x in (part if isinstance(part, list) else [part])]
        return self.gather(input_data)

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        """``tensor`` summed (``"sum"``) or averaged (``"mean"``) over the processes."""
        if not self.use_distributed:
            return tensor
        out = tensor.clone()
        torch.distributed.all_reduce(out)
        return out / self.num_processes if reduction == "mean" else out

    def wait_for_everyone(self) -> None:
        """A barrier across the processes (nothing on one process)."""
        if self.use_distributed:
            torch.distributed.barrier()

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on the local main process only."""
        if self.is_local_main_process:
            print(*args, **kwargs)

    @contextlib.contextmanager
    def split_between_processes(self, inputs: Any, apply_padding: bool = False) -> Iterator[Any]:
        """This process's contiguous share of ``inputs`` (a list, tuple, tensor or dict of them), as accelerate
        splits it: the first ``len % num_processes`` processes get one more item; with ``apply_padding`` every
        share is as long as the first, padded with the last item."""
        yield self._share(inputs, apply_padding)

    def _share(self, inputs: Any, apply_padding: bool) -> Any:
        if isinstance(inputs, dict):
            return {k: self._share(v, apply_padding) for k, v in inputs.items()}
        n, world = len(inputs), self.num_processes
        per, extra = divmod(n, world)
        start = self.process_index * per + min(self.process_index, extra)
        share = inputs[start : start + per + (1 if self.process_index < extra else 0)]
        if apply_padding and len(share) < math.ceil(n / world) and n > 0:
            pad = inputs[-1:]
            if isinstance(share, torch.Tensor):
                share = torch.cat([share, pad.expand(math.ceil(n / world) - len(share), *pad.shape[1:])])
            else:
                share = share + type(share)(pad) * (math.ceil(n / world) - len(share))
        return share

    def free_memory(self, *objects: Any) -> list[None]:
        """Collects garbage and releases the device allocator's cache; returns ``[None] * len(objects)`` so that
        ``a, b = accelerator.free_memory(a, b)`` drops the references, as accelerate."""
        gc.collect()
        clear_device_cache(self.device)
        return [None] * len(objects)

    def clear(self, *objects: Any) -> list[None]:
        """Alias of :meth:`free_memory`."""
        return self.free_memory(*objects)
