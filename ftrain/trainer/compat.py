"""The rest of transformers' ``Trainer`` method index, mapped onto ftrain's design (:class:`HFCompatMixin`).

Scripts and libraries built on transformers' ``Trainer`` (TRL, custom subclasses) call these helpers by name. Each
keeps transformers' signature and meaning where ftrain has the same concept, and says what it does instead where
ftrain's design differs:

- **Optimizer, scheduler and RNG state live in the** :class:`~ftrain.TrainState` (``opt_state``, ``step``, ``key``):
  ``_save_optimizer_and_scheduler`` / ``_save_rng_state`` write those parts as safetensors / JSON next to a
  checkpoint (never a pickle), and the ``_load_*`` twins read them back into the current state (or from a committed
  ftrain checkpoint's ``state.safetensors``).
- **No wrappers, no accelerator.** ``_wrap_model`` returns the model, ``create_accelerator_and_postprocess`` records
  the device / process facts the shell reads, and there is no loss scaler (``_save_scaler`` is a no-op).
- **Weights load strictly.** ``_load_from_checkpoint`` reads an ftrain checkpoint or a transformers-written folder
  (``model.safetensors`` or a sharded index) and refuses pickled ``pytorch_model.bin`` files.

Methods transformers 5 moved out of the class (``_sorted_checkpoints``, ``_nested_gather``, ``num_tokens``,
``prediction_loop``, ``get_optimizer_group``, ``tokenizer``...) keep their transformers 4.57 signatures.

Example:
    >>> import torch
    >>> from ftrain.trainer import Trainer, TrainingArguments
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.lin = torch.nn.Linear(2, 1)
    ...     def forward(self, x, labels=None):
    ...         return {"logits": self.lin(x)}
    >>> trainer = Trainer(Net(), TrainingArguments("/tmp/ftrain-doctest", report_to="none", use_cpu=True,
    ...                                            per_device_train_batch_size=4, gradient_accumulation_steps=2))
    >>> trainer.get_total_train_batch_size(trainer.args), trainer.get_tp_size()
    (8, 1)
    >>> batch = trainer._prepare_inputs({"x": [torch.ones(1)], "labels": (torch.zeros(1),)})
    >>> type(batch["x"]).__name__, type(batch["labels"]).__name__
    ('list', 'tuple')
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftrain import optim as _optim
from ftrain.checkpoint import atomic as _atomic
from ftrain.checkpoint import treeio as _treeio
from ftrain.data.columns import make_column_filter, remove_unused_columns, signature_columns
from ftrain.trainer import convert as _convert
from ftrain.trainer.loop import parallel_layout
from ftrain.trainer.utils import (
    PREFIX_CHECKPOINT_DIR,
    EvalLoopOutput,
    load_weights_strict,
    nested_gather,
    nested_numpify,
    read_safetensors_weights,
)

__all__ = ["HFCompatMixin", "OPTIMIZER_NAME", "RNG_STATE_NAME", "SCHEDULER_NAME"]

logger = logging.getLogger(__name__)

OPTIMIZER_NAME = "optimizer.safetensors"
SCHEDULER_NAME = "scheduler.json"
RNG_STATE_NAME = "rng_state.json"
_PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_STATE_KEY = re.compile(r"^\['(params|buffers)'\]\['(.+)'\]$")
_OPT_PREFIX = "['opt_state']"


def _config_size(config: Any, *names: str) -> int:
    """The first of ``names`` that ``config`` (an ftrain ``ParallelConfig``, accelerate's ``ParallelismConfig`` or a
    dict) sets, else 1."""
    for name in names:
        value = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
        if value is not None:
            return int(value)
    return 1


def _as_optimizer_groups(model: nn.Module, weight_decay: float, user_tx: bool) -> list[dict[str, Any]]:
    decays = _optim.hf_decay_mask(model)
    if user_tx:
        return [{"params": list(decays), "weight_decay": None}]
    groups = [
        {"params": [n for n, d in decays.items() if d], "weight_decay": weight_decay},
        {"params": [n for n, d in decays.items() if not d], "weight_decay": 0.0},
    ]
    return groups


class HFCompatMixin:
    """transformers ``Trainer`` methods that scripts and subclasses call by name, over ftrain's pure state; see the
    module docstring. Mixed into :class:`~ftrain.trainer.Trainer`."""

    # ---- set-up ---------------------------------------------------------------------------------------------------

    def create_accelerator_and_postprocess(self) -> None:
        """Records the process and device facts transformers' ``Trainer`` keeps after creating its accelerator.

        ftrain has no ``accelerate.Accelerator``: devices and process groups come from ``torch.distributed`` (read
        through ``args``), and gradient accumulation happens inside the pure step. Sets ``device``, ``world_size``,
        ``process_index``, ``is_deepspeed_enabled`` / ``is_fsdp_xla_enabled`` (always ``False``: ftrain shards
        DTensor state leaves instead), ``is_fsdp_enabled`` (``ParallelConfig.dp_shard > 1``), ``is_tp_enabled``,
        ``gather_function`` (:meth:`_nested_gather`) and ``_train_batch_size``.

        With several processes (``WORLD_SIZE`` > 1, as torchrun sets) it also decides the layout,
        ``parallel_config`` (:func:`~ftrain.trainer.loop.parallel_layout`), and builds ``mesh`` on it (starting
        the process group); both are ``None`` on one process.

        Like transformers, a ``num_steps`` in ``accelerator_config.gradient_accumulation_kwargs`` becomes
        ``args.gradient_accumulation_steps`` (ftrain accumulates inside the pure step).

        Raises:
            ValueError: ``accelerator_config["gradient_accumulation_kwargs"]["num_steps"]`` together with
                ``gradient_accumulation_steps > 1`` (transformers' check: which one is meant is unknown), or a
                layout :func:`~ftrain.trainer.loop.parallel_layout` refuses.
        """
        args = self.args
        config = args.accelerator_config
        kwargs = config.get("gradient_accumulation_kwargs") if isinstance(config, Mapping) else None
        kwargs = getattr(config, "gradient_accumulation_kwargs", None) if kwargs is None else kwargs
        num_steps = (kwargs or {}).get("num_steps")
        # __init__ calls this; a second call (scripts, hyper-parameter search) finds its own takeover, not a conflict
        taken = getattr(self, "_num_steps_taken", None) == num_steps == args.gradient_accumulation_steps
        if num_steps is not None and args.gradient_accumulation_steps > 1 and not taken:
            raise ValueError(
                "The `AcceleratorConfig`'s `num_steps` is set but `gradient_accumulation_steps` is greater than 1 in "
                "the passed `TrainingArguments`. Set only one of them."
            )
        if num_steps is not None:
            args.gradient_accumulation_steps = self._num_steps_taken = int(num_steps)  # transformers does, too
        self.device, self.world_size, self.process_index = args.device, args.world_size, args.process_index
        self.is_deepspeed_enabled = self.is_fsdp_xla_enabled = False
        # Several processes: the layout, and the mesh (starting the process group from torchrun's environment).
        self.parallel_config = parallel_layout(args)
        self.mesh = None
        if self.parallel_config is not None:
            from ftrain.distributed import build_mesh

            self.mesh = build_mesh(self.parallel_config, self.device.type)
        parallel = self.parallel_config if self.parallel_config is not None else args.parallelism_config
        if hasattr(parallel, "resolve"):  # ftrain's ParallelConfig: dp_shard=-1 takes what the world size leaves
            parallel = parallel.resolve(args.world_size)
        self.is_fsdp_enabled = parallel is not None and _config_size(parallel, "dp_shard", "dp_shard_size") > 1
        self.is_tp_enabled = self.get_tp_size() > 1
        self.gather_function = self._nested_gather
        self._train_batch_size = args.train_batch_size

    @property
    def tokenizer(self) -> Any:
        """Deprecated alias of ``processing_class`` (as transformers 4.46-4.57), with its warning."""
        logger.warning("Trainer.tokenizer is now deprecated. You should use Trainer.processing_class instead.")
        return self.processing_class

    @tokenizer.setter
    def tokenizer(self, processing_class: Any) -> None:
        logger.warning(
            "Trainer.tokenizer is now deprecated. You should use `Trainer.processing_class = processing_class` instead."
        )
        self.processing_class = processing_class

    def _align_special_tokens(self) -> None:
        """Aligns the model config's (and generation config's) EOS / BOS / PAD ids with the tokenizer's.

        transformers' rule (5.x ``align_special_tokens``): only ids the tokenizer defines are propagated; an id
        already in the config (and generation config) is left alone; a config that lists several EOS ids, and the
        generation config, keep their other ids after the tokenizer's. Warns with the ids it changed. Does nothing
        without a ``processing_class`` or a model ``config``.
        """
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        config = getattr(self.model, "config", None)
        if tokenizer is None or config is None:
            return
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        generation = getattr(self.model, "generation_config", None)
        updated: dict[str, Any] = {}
        for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
            token = getattr(tokenizer, name, None)
            if token is None:
                continue
            in_config = getattr(config, name, None)
            config_ids = in_config if isinstance(in_config, list) else [in_config]
            gen_ids = getattr(generation, name, None) if generation is not None else None
            gen_ids = gen_ids if isinstance(gen_ids, list) else [gen_ids]
            if token in config_ids and (generation is None or token in gen_ids):
                continue
            updated[name] = token
            several = name == "eos_token_id"
            keep = several and isinstance(in_config, list)
            setattr(config, name, [token, *(t for t in config_ids if t != token)] if keep else token)
            if generation is not None:
                others = [t for t in gen_ids if t is not None and t != token]
                setattr(generation, name, [token, *others] if several else token)
        if updated:
            logger.warning(
                "The tokenizer has new PAD/BOS/EOS tokens that differ from the model config and generation config. "
                "The model config and generation config were aligned accordingly, being updated with the "
                f"tokenizer's values. Updated tokens: {updated}."
            )

    # ---- data -----------------------------------------------------------------------------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        """Sets ``_signature_columns`` (once): the model ``forward``'s parameters (the base model's for PEFT), then
        ``label``, ``label_ids`` and the label names (:func:`ftrain.data.columns.signature_columns`)."""
        if getattr(self, "_signature_columns", None) is None:
            self._signature_columns = signature_columns(self.model, label_names=self.label_names)

    def _remove_unused_columns(self, dataset: Any, description: str | None = None) -> Any:
        """``dataset`` (a ``datasets.Dataset``) without the columns the model's ``forward`` does not take, when
        ``args.remove_unused_columns``.

        Raises:
            ValueError: no column matches the signature (it names both lists and how to fix it).
        """
        if not self.args.remove_unused_columns:
            return dataset
        self._set_signature_columns_if_needed()
        return remove_unused_columns(dataset, self._signature_columns, model_name=type(self.model).__name__,
                                     description=description or "")  # fmt: skip

    def _get_collator_with_removed_columns(self, data_collator: Callable, description: str | None = None) -> Callable:
        """``data_collator`` preceded by the column filter (dict examples keep the signature keys; others pass
        through), when ``args.remove_unused_columns``; else ``data_collator`` itself."""
        if not self.args.remove_unused_columns:
            return data_collator
        self._set_signature_columns_if_needed()
        keep = make_column_filter(self._signature_columns, model_name=type(self.model).__name__)

        def collate(features: list[Any]) -> Any:
            return data_collator([keep(f) for f in features])

        return collate

    def _get_dataloader(
        self,
        dataset: Any,
        description: str,
        batch_size: int,
        sampler_fn: Callable | None = None,
        is_training: bool = False,
        dataloader_key: str | None = None,
    ) -> Any:
        """The :class:`~ftrain.data.BatchStream` over ``dataset`` (what ``get_*_dataloader`` return).

        It removes unused columns itself, collates with ``data_collator``, shards per rank and, when training, yields
        one list of ``gradient_accumulation_steps`` microbatches per optimizer step in an order that is a function
        of ``(data_seed or seed, epoch)`` — so a resume continues bitwise. ``dataloader_key`` is accepted and
        ignored (a stream holds no worker pool to cache).

        Raises:
            ValueError: a ``sampler_fn``: the order is chosen by ``args.train_sampling_strategy`` instead.
        """
        if sampler_fn is not None:
            raise ValueError(
                f"_get_dataloader({description!r}): ftrain's BatchStream does not take a sampler: its order is a "
                "function of the seed and the epoch, so that a resume continues bitwise. Choose the order with "
                "TrainingArguments(train_sampling_strategy='random' | 'sequential' | 'group_by_length')."
            )
        return self._stream(dataset, batch_size, train=is_training)

    @staticmethod
    def num_tokens(train_dl: Any, max_steps: int | None = None) -> int:
        """Tokens (``input_ids`` elements) in a training loader, as transformers 4.x counted them: with
        ``max_steps``, the first batch's count times ``max_steps``. A :class:`~ftrain.data.BatchStream` is read for
        one epoch and each of its items (one optimizer step, a list of microbatches) counts all its microbatches.
        A batch without ``input_ids`` logs a warning and the count so far is returned."""
        total = 0
        try:
            for item in train_dl.iter_from(0) if hasattr(train_dl, "iter_from") else train_dl:
                tokens = sum(mb["input_ids"].numel() for mb in (item if isinstance(item, list) else [item]))
                if max_steps is not None:
                    return tokens * max_steps
                total += tokens
        except KeyError:
            logger.warning("Cannot get num_tokens from dataloader")
        return total

    # ---- optimizer ------------------------------------------------------------------------------------------------

    @staticmethod
    def get_optimizer_cls_and_kwargs(args: Any, model: nn.Module | None = None) -> tuple[Callable[..., Any], dict]:
        """The ``ftrain.optim`` factory and keyword arguments for ``args.optim``: every torch-only
        ``OptimizerNames`` value is mapped (``adamw_torch[_fused]``, ``adafactor``, ``sgd``, ``adagrad``, ``rmsprop``,
        ``lion_32bit``); see :func:`ftrain.trainer.convert.get_optimizer_cls_and_kwargs`.

        Raises:
            ValueError: an optimizer that needs another package (bitsandbytes, torchao, GaLore...), naming one to use.
        """
        return _convert.get_optimizer_cls_and_kwargs(args, model)

    def get_optimizer_group(self, param: str | nn.Parameter | None = None) -> Any:
        """The optimizer's parameter groups, by parameter name (ftrain's optimizer is a pure function of
        ``{name: tensor}`` trees, not of ``param_groups``).

        The groups are transformers' two: weight decay ``args.weight_decay`` on the parameters
        :func:`ftrain.optim.hf_decay_mask` selects, then 0 on biases and norm weights (one group with
        ``weight_decay=None`` for an optimizer passed by the user, whose grouping is its own).

        Args:
            param: a parameter name or a parameter of ``self.model``; ``None`` for all groups.

        Returns:
            The group ``{"params": [names], "weight_decay": wd}`` holding ``param``, or, without ``param``, the list
            of each group's names.

        Raises:
            ValueError: the optimizer is not created yet, or ``param`` is not a trainable parameter of the model.
        """
        if self.optimizer is None:
            raise ValueError("Trainer optimizer is None, please make sure you have setup the optimizer before.")
        groups = _as_optimizer_groups(self.model, self.args.weight_decay, self._user_optimizer is not None)
        if param is None:
            return [group["params"] for group in groups]
        name = param
        if isinstance(param, torch.Tensor):
            name = next((n for n, p in self.model.named_parameters() if p is param), None)
        for group in groups:
            if name in group["params"]:
                return group
        raise ValueError(
            f"get_optimizer_group: {repr(name) if isinstance(name, str) else 'the given tensor'} is not a trainable "
            f"parameter of {type(self.model).__name__}; pass one of its named_parameters() names."
        )

    # ---- step arithmetic ------------------------------------------------------------------------------------------

    def get_tp_size(self) -> int:
        """Tensor-parallel size: ``model._tp_size`` when set (transformers' tp_plan), else the ``tp`` (ftrain
        ``ParallelConfig``) or ``tp_size`` (accelerate ``ParallelismConfig``) of ``args.parallelism_config``, else 1."""
        model_tp = getattr(self.model, "_tp_size", None)
        if model_tp is not None:
            return int(model_tp)
        parallel = self.args.parallelism_config
        return 1 if parallel is None else _config_size(parallel, "tp", "tp_size")

    def _cp_size(self) -> int:
        parallel = self.args.parallelism_config
        return 1 if parallel is None else _config_size(parallel, "cp", "cp_size")

    def _sp_size(self) -> int:
        parallel = self.args.parallelism_config
        return 1 if parallel is None else _config_size(parallel, "sp_size")

    def get_total_train_batch_size(self, args: Any) -> int:
        """Examples per optimizer step over all processes: ``train_batch_size × gradient_accumulation_steps ×
        dp_world_size``, with ``dp_world_size = world_size // (tp × cp × sp)`` (transformers' formula)."""
        dp_world_size = args.world_size // self.get_tp_size() // self._cp_size() // self._sp_size()
        return args.train_batch_size * args.gradient_accumulation_steps * dp_world_size

    def set_initial_training_values(
        self, args: Any, dataloader: Any, total_train_batch_size: int | None = None
    ) -> tuple[int, int, int, int | float, int, int, int]:
        """transformers' training counts: ``(num_train_epochs, num_update_steps_per_epoch, num_examples,
        num_train_samples, total_train_batch_size, steps_in_epoch, max_steps)``.

        ``dataloader`` is a :class:`~ftrain.data.BatchStream` (its length in microbatches is
        ``layout.microbatches_per_epoch``) or any loader; ``total_train_batch_size`` (transformers 4.x passed it)
        defaults to :meth:`get_total_train_batch_size`.

        Raises:
            ValueError: a loader without a length and ``max_steps <= 0`` (transformers' message).
        """
        layout = getattr(dataloader, "layout", None)
        try:
            length = layout.microbatches_per_epoch if layout is not None else len(dataloader)
        except TypeError:
            length = None
        total = self.get_total_train_batch_size(args) if total_train_batch_size is None else total_train_batch_size
        if not length:
            if args.max_steps <= 0:
                raise ValueError(
                    "args.max_steps must be set to a positive value if dataloader does not have a length, was "
                    f"{args.max_steps}"
                )
            steps = args.max_steps
            return (sys.maxsize, steps, total * steps, total * steps, total, steps * args.gradient_accumulation_steps,
                    steps)  # fmt: skip
        counts = _convert.compute_steps(args, length)
        examples = self.num_examples(dataloader) if hasattr(dataloader, "source") else len(dataloader.dataset)
        samples = counts.max_steps * total if args.max_steps > 0 else examples * args.num_train_epochs
        return (counts.num_train_epochs, counts.num_update_steps_per_epoch, examples, samples, total, length,
                counts.max_steps)  # fmt: skip

    # ---- batches --------------------------------------------------------------------------------------------------

    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, device: torch.device
    ) -> tuple[list, torch.Tensor | None]:
        """Up to ``num_batches`` batches from ``epoch_iterator`` and their label count ``num_items_in_batch``.

        The count is the one ftrain's loss reduces by (:func:`~ftrain.trainer.evaluation.loss_item_count`:
        ``labels[..., 1:] != -100`` for causal LMs, or ``shift_labels``), summed over the batches and, with
        ``average_tokens_across_devices`` on several processes, over the processes; it is divided by
        ``tp × cp × sp`` (ranks that see the same batch), as transformers. ``None`` when the first batch has no
        ``labels``. Unlike transformers it does not depend on whether ``forward`` takes ``**kwargs``: ftrain's
        loss is always (sum, count).
        """
        from ftrain.trainer.evaluation import loss_item_count

        batches: list = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batches or not isinstance(batches[0], Mapping) or "labels" not in batches[0]:
            return batches, None
        kwargs = dict(label_smoothing=self.args.label_smoothing_factor, compute_loss_func=self.compute_loss_func)
        count = sum(loss_item_count(self.model, b, **kwargs).to(device) for b in batches)
        if self.args.average_tokens_across_devices and torch.distributed.is_available():
            if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                torch.distributed.all_reduce(count)
        return batches, count / (self.get_tp_size() * self._cp_size() * self._sp_size())

    def _prepare_input(self, data: Any) -> Any:
        """``data`` with every tensor moved to ``args.device``, through (nested) mappings, lists and tuples, whose
        types are kept; other values unchanged."""
        if isinstance(data, Mapping):
            return type(data)({k: self._prepare_input(v) for k, v in data.items()})
        if isinstance(data, (tuple, list)):
            return type(data)(self._prepare_input(v) for v in data)
        if isinstance(data, torch.Tensor):
            return data.to(device=self.args.device)
        return data

    def _prepare_inputs(self, inputs: Mapping[str, Any]) -> Mapping[str, Any]:
        """:meth:`_prepare_input` of a batch.

        Raises:
            ValueError: an empty batch (names the columns the model takes).
        """
        inputs = self._prepare_input(inputs)
        if len(inputs) == 0:
            self._set_signature_columns_if_needed()
            raise ValueError(
                "The batch received was empty, your model won't be able to train on it. Double-check that your "
                f"training dataset contains keys expected by the model: {','.join(self._signature_columns)}."
            )
        return inputs

    def _prepare_context_parallel_inputs(
        self, model: nn.Module, inputs: dict[str, Any]
    ) -> tuple[Callable[[], contextlib.AbstractContextManager], dict[str, Any]]:
        """``(context factory, inputs)`` for context parallelism, as transformers returns them.

        With a ``cp`` size above 1 in ``args.parallelism_config`` the inputs get what must be computed on the whole
        sequence before it is split: ``shift_labels`` from ``labels`` (last position -100) and global
        ``position_ids``. ftrain splits the sequence in its distributed layer
        (:func:`ftrain.distributed.context_parallel.prepare_cp_batch`), so the context is always
        ``contextlib.nullcontext``. Without context parallelism the inputs are returned unchanged.

        Raises:
            ValueError: context parallelism with a model whose attention is not ``sdpa``.
        """
        if self._cp_size() <= 1:
            return contextlib.nullcontext, inputs
        from ftrain.distributed.context_parallel import shift_labels

        attn = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa")
        if attn != "sdpa":
            raise ValueError(f"Context parallelism is supported only with SDPA attention, you are using {attn}.")
        inputs = dict(inputs)
        if "shift_labels" not in inputs and "labels" in inputs:
            inputs["shift_labels"] = shift_labels(inputs["labels"])
        if "position_ids" not in inputs and "input_ids" in inputs:
            ids = inputs["input_ids"]
            inputs["position_ids"] = torch.arange(ids.size(1), device=ids.device).expand(ids.size(0), -1)
        return contextlib.nullcontext, inputs

    # ---- evaluation -----------------------------------------------------------------------------------------------

    def prediction_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        """Deprecated: transformers 4.x's legacy loop (``use_legacy_prediction_loop``), removed in transformers 5.
        Warns (``FutureWarning``) and runs :meth:`evaluation_loop` with the same arguments."""
        warnings.warn(
            "Trainer.prediction_loop is deprecated (transformers 5 removed it with use_legacy_prediction_loop); "
            "call Trainer.evaluation_loop, which takes the same arguments.",
            FutureWarning,
            stacklevel=2,
        )
        return self.evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)

    def _nested_gather(self, tensors: Any, name: str | None = None) -> Any:
        """``tensors`` (nested lists / tuples / dicts of tensors) from every process, concatenated on dim 0
        (:func:`~ftrain.trainer.utils.nested_gather`); unchanged on one process. ``name`` (an XLA tag) is unused."""
        return nested_gather(tensors)

    def _gather_and_numpify(self, tensors: Any, name: str | None = None) -> Any:
        """:meth:`_nested_gather`, then to numpy (bfloat16 as float32)."""
        if tensors is None:
            return None
        return nested_numpify(self._nested_gather(tensors, name))

    def torch_jit_model_eval(self, model: nn.Module, dataloader: Any, training: bool = False) -> nn.Module:
        """Returns ``model`` unchanged: transformers 4.x traced it with TorchScript for ``jit_mode_eval`` (removed in
        transformers 5). ftrain compiles its pure steps with :func:`ftrain.jit` (``torch_compile=True``) instead; a
        traced module would freeze the parameters that the pure step passes in."""
        return model

    # ---- model placement ------------------------------------------------------------------------------------------

    def _move_model_to_device(self, model: nn.Module, device: torch.device) -> None:
        """Moves ``model`` to ``device`` in place, unless it is spread over several devices (``hf_device_map``),
        which is left as it is with a warning (transformers' rule)."""
        if getattr(model, "hf_device_map", None) is not None:
            logger.warning("The model is already on multiple devices. Skipping the move to device specified in `args`.")
            return
        model.to(device)

    def _wrap_model(self, model: nn.Module, training: bool = True, dataloader: Any = None) -> nn.Module:
        """Returns ``model`` itself: ftrain never wraps it.

        transformers wraps for DataParallel / DDP / FSDP. In ftrain parallelism is a property of the
        ``TrainState``'s leaves (DTensor placements chosen by a plan) and the step calls ``functional_call`` on a
        hook-free skeleton; a DDP or FSDP2 wrapper's hooks would replace the tensors the step passes in (see
        DESIGN.md, "FSDP").
        """
        return model

    # ---- flops ----------------------------------------------------------------------------------------------------

    def floating_point_ops(self, inputs: Mapping[str, Any]) -> int:
        """Forward + backward floating-point operations of one microbatch, transformers' estimate.

        ``model.floating_point_ops(inputs)`` when the model defines it (transformers 4.x models, custom ones); else
        ``6 × inputs[main_input_name].numel() × model.num_parameters(exclude_embeddings=True)`` (the count is
        cached per model: transformers walks the modules on every call); else 0.
        """
        model = self.model
        own = getattr(model, "floating_point_ops", None)
        if own is not None:
            return int(own(inputs))
        main_input = getattr(model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(model, "num_parameters"):
            return 0
        cached = getattr(self, "_flos_params", None)
        if not (isinstance(cached, tuple) and cached[0] is model):
            cached = self._flos_params = (model, int(model.num_parameters(exclude_embeddings=True)))
        return 6 * inputs[main_input].numel() * cached[1]

    def _count_flos(self, inputs: Any) -> None:
        """Adds the :meth:`floating_point_ops` of ``inputs`` (a microbatch or a step's list of them) to
        ``current_flos``. Local and host-only (shapes), so the loop calls it every step."""
        for mb in inputs if isinstance(inputs, list) else [inputs]:
            if isinstance(mb, Mapping):
                self.current_flos = getattr(self, "current_flos", 0.0) + float(self.floating_point_ops(mb))

    def store_flos(self, inputs: Any = None) -> None:
        """Adds ``current_flos`` to ``state.total_flos`` (summed over the processes when there are several) and
        resets it, as transformers: the loop calls it before a checkpoint and at the end of training, not per step
        (the sum over processes is a collective and a host read).

        ``inputs``, when given, are counted first (:meth:`_count_flos`); transformers' own callers pass nothing.
        """
        if inputs is not None:
            self._count_flos(inputs)
        flos = getattr(self, "current_flos", 0.0)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                total = torch.tensor(float(flos), dtype=torch.float64, device=self.args.device)
                torch.distributed.all_reduce(total)
                flos = total.item()
        self.state.total_flos += flos
        self.current_flos = 0.0

    # ---- checkpoints ----------------------------------------------------------------------------------------------

    def _sorted_checkpoints(
        self, output_dir: str | None = None, checkpoint_prefix: str = PREFIX_CHECKPOINT_DIR, use_mtime: bool = False
    ) -> list[str]:
        """The ``{checkpoint_prefix}-N`` directories of ``output_dir`` (default ``args.output_dir``), oldest first.

        Ordered by ``N`` (or by modification time with ``use_mtime``; when all times lie within one second the
        filesystem's times are not trusted and ``N`` is used). ``state.best_model_checkpoint``, when listed and not
        the newest, moves to the second-to-last place, so rotation (which deletes from the front) keeps it and the
        newest stays last, as transformers orders them.
        """
        output_dir = self.args.output_dir if output_dir is None else output_dir
        pattern = re.compile(rf".*{checkpoint_prefix}-([0-9]+)")
        found = []
        for path in (str(p) for p in Path(output_dir).glob(f"{checkpoint_prefix}-*") if p.is_dir()):
            if use_mtime:
                found.append((os.path.getmtime(path), path))
            elif (match := pattern.match(path)) is not None:
                found.append((int(match.group(1)), path))
        found.sort()
        if use_mtime and len(found) > 1 and found[-1][0] - found[0][0] < 1.0:
            logger.warning("mtime may not be reliable on this filesystem, falling back to numerical ordering")
            return self._sorted_checkpoints(output_dir, checkpoint_prefix, use_mtime=False)
        paths = [path for _, path in found]
        best = self.state.best_model_checkpoint
        if best is not None and str(Path(best)) in paths and paths[-1] != str(Path(best)):
            best, newest = str(Path(best)), paths[-1]
            paths = [p for p in paths if p not in (best, newest)] + [best, newest]
        return paths

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Loads the weights saved in ``resume_from_checkpoint`` into ``model`` (default ``self.model``), in place.

        Reads, in this order: a committed ftrain checkpoint's ``state.safetensors`` (its ``params`` and
        ``buffers``), else transformers' ``model.safetensors``, else a sharded ``model.safetensors.index.json``.
        Keys match strictly: every parameter and persistent buffer must be there (one name of a tied pair is
        enough, as ``save_pretrained`` writes it) and nothing else. When ``model`` is ``self.model`` and a
        ``TrainState`` exists, the state takes the loaded weights too (the next step and ``save_model`` use them).

        Raises:
            ValueError: no weights in the folder (transformers' message), pickled ``pytorch_model.bin`` weights
                (refused: loading a pickle can run code), or keys / shapes that do not match (listed).
        """
        model = self.model if model is None else model
        folder = str(resume_from_checkpoint)
        tensors = self._committed_weights(folder)
        if tensors is None:
            tensors = read_safetensors_weights(folder)
        if tensors is None:
            pickled = [n for n in _PICKLED_WEIGHTS if os.path.isfile(os.path.join(folder, n))]
            if pickled:
                raise ValueError(
                    f"{folder} holds {pickled[0]}, a pickle: ftrain never unpickles checkpoint files (loading a pickle "
                    "can run arbitrary code). Convert it once, in an environment that trusts the file, with "
                    "AutoModel.from_pretrained(folder).save_pretrained(folder), which writes model.safetensors."
                )
            raise ValueError(f"Can't find a valid checkpoint at {folder}")
        logger.info("Loading model from %s.", folder)
        load_weights_strict(model, tensors, folder)
        if model is self.model and getattr(self, "_train_state", None) is not None:
            self._train_state = self._train_state.replace(
                params={k: v.detach().clone() for k, v in self._named_like(model, self._train_state.params).items()},
                buffers={k: v.detach().clone() for k, v in self._named_like(model, self._train_state.buffers).items()},
            )
            self._model_stale = False

    @staticmethod
    def _named_like(model: nn.Module, names: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        named = dict(model.named_parameters(remove_duplicate=False))
        named.update(model.named_buffers(remove_duplicate=False))
        return {k: named[k].to(device=v.device, dtype=v.dtype) for k, v in names.items()}

    def _committed_state(self, folder: str) -> dict[str, Any] | None:
        """``{key path: tensor}`` of a committed ftrain checkpoint (``checkpoint-N`` with ``COMMIT``), else None."""
        path = Path(folder).absolute()
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", path.name)
        if match is None or not _atomic.is_committed(path):
            return None
        return self._checkpoint_manager(path.parent).restore(int(match.group(1)))

    def _committed_weights(self, folder: str) -> dict[str, torch.Tensor] | None:
        flat = self._committed_state(folder)
        if flat is None:
            return None
        return {m.group(2): v for k, v in flat.items() if (m := _STATE_KEY.match(k)) and isinstance(v, torch.Tensor)}

    def _require_train_state(self, what: str) -> Any:
        state = getattr(self, "_train_state", None)
        if state is None:
            raise RuntimeError(
                f"{what}: there is no TrainState yet; it is built when train() starts (optimizer, schedule and RNG "
                "key live in it). Call this from a callback or after train()."
            )
        return state

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Writes the optimizer and schedule state: ``optimizer.safetensors`` and ``scheduler.json``.

        In ftrain both are part of the ``TrainState``: the optimizer state is ``state.opt_state`` (its tensors by
        key path, with the leaf list in the safetensors metadata) and the schedule is a function of the update
        count inside it, so ``scheduler.json`` only records ``{"step", "learning_rate"}`` for readers. Committed
        ftrain checkpoints already hold both in ``state.safetensors``.

        Raises:
            RuntimeError: before ``train()`` built the state.
        """
        from safetensors.torch import save_file

        state = self._require_train_state("_save_optimizer_and_scheduler")
        specs, tensors = _treeio.flatten({"opt_state": state.opt_state})
        os.makedirs(output_dir, exist_ok=True)
        leaves = json.dumps([s.to_json() for s in specs])
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(tensors, os.path.join(output_dir, OPTIMIZER_NAME), metadata={"format": "pt", "leaves": leaves})
        lr = _convert.logged_learning_rate(state.opt_state)
        info = {"step": int(state.step), "learning_rate": None if lr is None else float(lr)}
        Path(output_dir, SCHEDULER_NAME).write_text(json.dumps(info, indent=2) + "\n")

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Restores ``state.opt_state`` (optimizer moments and the schedule's update count) from ``checkpoint``:
        its ``optimizer.safetensors``, else its committed ftrain ``state.safetensors``; nothing when there is
        neither (or ``checkpoint`` is None), as transformers.

        Raises:
            CheckpointMismatchError: the saved optimizer state does not fit the current one (names the leaves).
            RuntimeError: before ``train()`` built the state.
        """
        if checkpoint is None:
            return
        from safetensors import safe_open

        state = self._require_train_state("_load_optimizer_and_scheduler")
        like = {"opt_state": state.opt_state}
        path = os.path.join(checkpoint, OPTIMIZER_NAME)
        if os.path.isfile(path):
            with safe_open(path, framework="pt") as f:
                specs = [_treeio.LeafSpec.from_json(d) for d in json.loads(f.metadata()["leaves"])]
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        else:
            flat = self._committed_state(checkpoint)
            if flat is None:
                return
            saved = [s for s in self._saved_specs(checkpoint) if s.path.startswith(_OPT_PREFIX)]
            specs, tensors = saved, {s.path: flat[s.path] for s in saved if s.kind == "tensor"}
        _treeio.check_fits(specs, like, where=f"the optimizer state in {checkpoint}")
        self._train_state = state.replace(opt_state=_treeio.rebuild(like, specs, tensors)["opt_state"])

    def _saved_specs(self, checkpoint: str) -> list[Any]:
        path = Path(checkpoint).absolute()
        step = int(path.name.rsplit("-", 1)[1])
        return list(self._checkpoint_manager(path.parent).metadata(step).leaves)

    def _rng_file(self, folder: str) -> str:
        name = RNG_STATE_NAME if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}.json"
        return os.path.join(folder, name)

    def _save_rng_state(self, output_dir: str) -> None:
        """Writes ``rng_state.json`` (``rng_state_{rank}.json`` with several processes, as transformers names its
        ``.pth``): ``{"key": [hi, lo], "step": n}``.

        In ftrain the RNG is the key in the ``TrainState``: the step's dropout / NEFTune draws are seeded from
        ``fold_in(key, step)``, and the global torch / numpy / Python generators play no part, so the key and the
        step are the whole RNG state. JSON, never a pickle.

        Raises:
            RuntimeError: before ``train()`` built the state.
        """
        state = self._require_train_state("_save_rng_state")
        os.makedirs(output_dir, exist_ok=True)
        doc = {"key": [int(x) for x in state.key.tolist()], "step": int(state.step)}
        Path(self._rng_file(output_dir)).write_text(json.dumps(doc) + "\n")

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """Sets the ``TrainState``'s key from ``checkpoint``'s ``rng_state.json`` (see :meth:`_save_rng_state`).

        Nothing happens without ``checkpoint`` or without the file (logged, as transformers). The step is not
        changed: it comes with the weights and optimizer state.

        Raises:
            ValueError: a file that is not ftrain's (e.g. transformers' pickled ``rng_state.pth`` is never read).
            RuntimeError: before ``train()`` built the state.
        """
        if checkpoint is None:
            return
        path = self._rng_file(checkpoint)
        if not os.path.isfile(path):
            logger.info("Didn't find an RNG file (%s); reproducibility of the resumed run is not guaranteed.", path)
            return
        state = self._require_train_state("_load_rng_state")
        doc = json.loads(Path(path).read_text())
        key = doc.get("key") if isinstance(doc, dict) else None
        if not (isinstance(key, list) and len(key) == 2 and all(isinstance(x, int) for x in key)):
            raise ValueError(f"{path}: expected {{'key': [int, int], 'step': int}} (ftrain's RNG file), got {doc!r}")
        self._train_state = state.replace(key=torch.tensor(key, dtype=torch.int64))

    def _save_scaler(self, output_dir: str) -> None:
        """Does nothing, as transformers without a scaler: ftrain keeps no ``GradScaler`` (mixed precision is bf16
        autocast, which needs no loss scaling), so there is no scaler state to save."""

    def _load_scaler(self, checkpoint: str | None) -> None:
        """Does nothing (ftrain has no loss scaler); a transformers ``scaler.pt`` in ``checkpoint`` is not read
        (a pickle), and a warning says so."""
        if checkpoint is not None and os.path.isfile(os.path.join(checkpoint, "scaler.pt")):
            logger.warning("%s/scaler.pt is ignored: ftrain trains without a loss scaler.", checkpoint)
