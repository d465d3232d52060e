"""The Trainer's training loop and checkpoints: a loop over the pure ``train_step``, callbacks, logs and saves.

The loop holds no training math (DESIGN.md rule 2): one call of the core ``train_step(state, batch)`` is one
optimizer update, with accumulation, the loss reduction, clipping, the optimizer and the schedule inside it. The
shell only fires callbacks in transformers' order, turns metrics into numbers when it logs, and saves.

Events per optimizer step, as transformers fires them: ``on_step_begin``, ``on_substep_end`` once per microbatch
but the last (fired before the step runs: the microbatches are accumulated inside the one pure step),
``on_pre_optimizer_step``, the step, ``on_optimizer_step``, ``on_step_end``, then log / evaluate / save.

**Logging and metric-driven pieces.** ``logging_nan_inf_filter`` replaces a NaN/inf step loss in the logging
accumulator by ``accumulator / (1 + steps since the last log)`` as transformers does — per optimizer step here, per
microbatch there (the same with ``gradient_accumulation_steps=1``); after a log the accumulator restarts at 0, where
transformers' ``tr_loss -= tr_loss`` keeps an unfiltered NaN for the rest of the run. ``include_num_input_tokens_seen``
counts tokens per microbatch into ``state.num_input_tokens_seen`` (logged with every entry, with
``train_tokens_per_second`` in the training logs). Under ``lr_scheduler_type="reduce_lr_on_plateau"`` each evaluation
in ``train()`` (not ``eval_on_start``) feeds ``eval_{metric_for_best_model}`` to
:func:`ftrain.schedules.plateau_update` on the optimizer state in the ``TrainState``.

**Checkpoint layout.** ``output_dir/checkpoint-{global_step}/`` is a :class:`~ftrain.checkpoint.CheckpointManager`
checkpoint (``step_prefix="checkpoint-"``, no zero padding), written atomically: ``state.safetensors`` (the whole
``TrainState``: params, buffers, optimizer state, step, key), ``meta.json`` (whose ``extra`` holds the
``TrainerState`` at that step), ``manifest.json`` and ``COMMIT`` (written last). Once committed, the directory gets
the Hugging Face views: ``model.safetensors`` + ``config.json`` (:func:`~ftrain.checkpoint.export_pretrained`),
``trainer_state.json`` and ``training_args.json`` (JSON, never a pickle). A resume reads only committed data — the
state and the ``TrainerState`` in ``meta.json`` — so a crash after the commit but before the views are written still
resumes. The data position is ``state.step`` (``BatchStream.iter_from``) and dropout keys are
``fold_in(key, step)``, so a resume continues bitwise.

**Several processes** (torchrun): the state is sharded in :meth:`TrainingLoopMixin._distribute`; every rank writes
its shards of ``checkpoint-N`` with the ``dcp`` backend (``dcp/`` instead of ``state.safetensors``), and rank 0
(``args.should_save``) writes the transformers views from the gathered full weights. A resume needs the same layout
of the state (``like=``), which DCP fills from any number of writers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ftrain import tree as _tree
from ftrain.checkpoint import CheckpointManager, CheckpointManagerOptions, export_pretrained
from ftrain.metrics import to_host
from ftrain.schedules import ReduceOnPlateauState, plateau_update
from ftrain.state import TrainState
from ftrain.trainer.args import SaveStrategy
from ftrain.trainer.convert import compute_steps, logged_learning_rate
from ftrain.trainer.trainer_state import TrainerState
from ftrain.trainer.utils import PREFIX_CHECKPOINT_DIR, TrainOutput, get_last_checkpoint, speed_metrics

__all__ = ["TRAINER_STATE_NAME", "TRAINING_ARGS_NAME", "TrainingLoopMixin", "parallel_layout"]

TRAINER_STATE_NAME = "trainer_state.json"
TRAINING_ARGS_NAME = "training_args.json"
logger = logging.getLogger(__name__)
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoint_options(sharded: bool = False) -> CheckpointManagerOptions:
    """The manager options of the HF layout: ``checkpoint-N`` names; the trainer rotates (``save_total_limit``).
    A sharded state is written by every rank with the ``dcp`` backend."""
    backend = {"backend": "dcp"} if sharded else {}
    return CheckpointManagerOptions(step_prefix=f"{PREFIX_CHECKPOINT_DIR}-", step_digits=0, **backend)


def parallel_layout(args: Any) -> Any:
    """The ``ParallelConfig`` a Trainer on ``args.world_size`` processes trains with; ``None`` on one process.

    ``fsdp`` / ``fsdp_config`` / ``deepspeed`` give it (:func:`ftrain.distributed.parallel_config_from_training_args`);
    else an ftrain ``ParallelConfig`` in ``parallelism_config``; else plain data parallel
    (``dp_replicate=world_size``), what transformers does with DDP.

    Example:
        >>> from types import SimpleNamespace
        >>> args = SimpleNamespace(world_size=4, fsdp="shard_grad_op", fsdp_config=None, deepspeed=None,
        ...                        parallelism_config=None, bf16=False, fp16=False)
        >>> parallel_layout(args).dp_shard, parallel_layout(args).shard_level
        (4, 2)
        >>> parallel_layout(SimpleNamespace(**{**vars(args), "fsdp": None})).dp_replicate
        4

    Raises:
        ValueError: ``parallelism_config`` together with ``fsdp`` / ``deepspeed``, an accelerate
            ``ParallelismConfig``, or what ``parallel_config_from_training_args`` refuses.
        NotImplementedError: a layout with ``cp`` or ``tp`` > 1 (the Trainer has no tensor-parallel plan or
            sequence splitting yet).
    """
    world = args.world_size
    if world <= 1:
        return None
    from ftrain.distributed import ParallelConfig, parallel_config_from_training_args

    config = parallel_config_from_training_args(args, world)
    given = getattr(args, "parallelism_config", None)
    if given is not None and config is not None:
        raise ValueError("TrainingArguments: parallelism_config and fsdp/deepspeed are both set; keep one layout")
    if given is not None and not isinstance(given, ParallelConfig):
        raise ValueError(
            f"TrainingArguments.parallelism_config is a {type(given).__name__}; ftrain's Trainer lays out its state "
            "with an ftrain.distributed.ParallelConfig (or use fsdp=... / deepspeed=...)."
        )
    config = config or (given.resolve(world) if given is not None else ParallelConfig(dp_replicate=world, dp_shard=1))
    if config.cp > 1 or config.tp > 1:
        raise NotImplementedError(
            f"Trainer: cp={config.cp}, tp={config.tp}: context and tensor parallel are not wired into the Trainer "
            "yet; use them through ftrain.distributed with make_train_step (docs/distributed.md)."
        )
    return config


def _barrier() -> None:
    """Waits for every process (nothing on one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            torch.distributed.barrier()


def _rebinding_checkpoint(checkpoint_func: Any) -> Any:
    """``checkpoint_func(function, *args)`` whose recompute sees the tensors the layer had in the forward.

    transformers calls it with ``functools.partial(forward, layer, **kwargs)``. Inside ``functional_call`` the
    layer's parameters and buffers are the step's tensors; when the backward recomputes the layer they are meta
    again, so the recompute re-binds the ones captured at forward time."""
    from torch.nn.utils.stateless import _reparametrize_module

    def func(function: Any, *args: Any, **kwargs: Any) -> Any:
        layer = getattr(function, "args", (None,))[0] if getattr(function, "args", None) else None
        if not isinstance(layer, torch.nn.Module):
            return checkpoint_func(function, *args, **kwargs)
        names = [n for n, _ in layer.named_parameters(remove_duplicate=False)]
        names += [n for n, _ in layer.named_buffers(remove_duplicate=False)]
        tensors = {n: _get_attr(layer, n) for n in names}

        def run(*inner: Any) -> Any:
            with _reparametrize_module(layer, tensors):
                return function(*inner)

        return checkpoint_func(run, *args, **kwargs)

    func._ftrain_rebinds = True
    return func


def _is_tokenizer(processing_class: Any) -> bool:
    """Whether ``processing_class`` is a transformers tokenizer or processor (transformers' test in ``train()``).
    Without transformers imported, nothing can be one."""
    import sys

    transformers = sys.modules.get("transformers")
    if processing_class is None or transformers is None:
        return False
    kinds = tuple(
        getattr(transformers, n) for n in ("PreTrainedTokenizerBase", "ProcessorMixin") if hasattr(transformers, n)
    )
    return isinstance(processing_class, kinds)


def _get_attr(module: torch.nn.Module, name: str) -> Any:
    for part in name.split("."):
        module = getattr(module, part)
    return module


class TrainingLoopMixin:
    """``train`` and its parts (``_inner_training_loop``, ``_run_epoch``, ``_maybe_log_save_evaluate``,
    ``_save_checkpoint``...) with transformers' names."""

    # ---- set-up ---------------------------------------------------------------------------------------------------

    def _resolve_resume(self, resume_from_checkpoint: bool | str | None) -> str | None:
        if resume_from_checkpoint is False or resume_from_checkpoint is None:
            return None
        if resume_from_checkpoint is True:
            found = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            if found is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
            return found
        if not os.path.isdir(resume_from_checkpoint):
            raise ValueError(f"Can't find a valid checkpoint at {resume_from_checkpoint}")
        return str(resume_from_checkpoint)

    def _checkpoint_manager(self, directory: str | os.PathLike[str]) -> CheckpointManager:
        directory = Path(directory).absolute()
        if self._manager is None or self._manager.directory != directory:
            if self._manager is not None:
                self._manager.close()
            self._manager = CheckpointManager(directory, checkpoint_options(getattr(self, "mesh", None) is not None))
        return self._manager

    def _restore_checkpoint(self, checkpoint: str, state: TrainState) -> TrainState:
        """The ``TrainState`` and ``TrainerState`` saved in ``checkpoint`` (a ``checkpoint-N`` directory)."""
        path = Path(checkpoint).absolute()
        match = _CHECKPOINT_RE.match(path.name)
        manager = self._checkpoint_manager(path.parent) if match else None
        if manager is None or int(match.group(1)) not in manager.all_steps():
            raise ValueError(
                f"{checkpoint} is not a committed ftrain checkpoint (no COMMIT marker / ftrain state): it was written "
                "by transformers, with save_only_model=True, or interrupted. ftrain resumes only from its own "
                "checkpoints; load the weights with from_pretrained and train without resume_from_checkpoint."
            )
        step = int(match.group(1))
        restored = manager.restore(step, like=state)
        self.state = TrainerState(**manager.restore_extra(step)["trainer_state"])
        if self.state.best_model_checkpoint and not os.path.isdir(self.state.best_model_checkpoint):
            self.state.best_model_checkpoint = None
        if self.args.restore_callback_states_from_checkpoint:
            from ftrain.trainer.callbacks import restore_callback_states

            self.control = restore_callback_states(self.callback_handler, self.control, self.state.stateful_callbacks)
        return restored

    # ---- the loop -------------------------------------------------------------------------------------------------

    def train(
        self,
        resume_from_checkpoint: bool | str | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ) -> TrainOutput:
        """Trains for ``max_steps`` / ``num_train_epochs``; resumes bitwise from a checkpoint (``True``: the last one
        in ``output_dir``). Returns ``TrainOutput(global_step, training_loss, metrics)``."""
        if kwargs:
            raise TypeError(f"train() got unexpected keyword arguments: {', '.join(kwargs)}")
        if trial is not None:
            raise NotImplementedError("hyper-parameter search trials are not supported by ftrain's Trainer yet.")
        checkpoint = self._resolve_resume(resume_from_checkpoint)
        if self.model_init is not None:
            self._seed()
            self.model = self.call_model_init()
        if _is_tokenizer(self.processing_class):  # new special tokens for fine-tuning, as transformers
            self._align_special_tokens()
        self.is_in_train = True
        try:
            return self._inner_training_loop(checkpoint, ignore_keys_for_eval)
        finally:
            self.is_in_train = False

    def _inner_training_loop(self, checkpoint: str | None, ignore_keys_for_eval: list[str] | None) -> TrainOutput:
        stream = self.get_train_dataloader()
        steps = compute_steps(self.args, stream.layout.microbatches_per_epoch)
        self._setup_training(stream, steps.max_steps, checkpoint)
        self.state.init_training_references(self, steps.max_steps, steps.num_train_epochs, None)
        self.state.train_batch_size = self.args.train_batch_size
        self.state.compute_steps(self.args, steps.max_steps)
        start_time = time.time()
        self._train_start_time = start_time
        self._initial_global_step = self.state.global_step
        self._initial_num_input_tokens_seen = self.state.num_input_tokens_seen
        self._tr_loss = torch.zeros((), dtype=torch.float64)
        self._total_loss_scalar = 0.0
        self._globalstep_last_logged = self.state.global_step
        self._last_step_metrics: dict[str, torch.Tensor] | None = None
        self.control = self.callback_handler.on_train_begin(self.args, self.state, self.control)
        if self.args.eval_on_start:
            self._evaluate(ignore_keys_for_eval, skip_scheduler=True)
        for epoch in range(self.state.global_step // len(stream), steps.num_train_epochs):
            self.control = self.callback_handler.on_epoch_begin(self.args, self.state, self.control)
            self._run_epoch(stream, epoch, ignore_keys_for_eval)
            if self.control.should_training_stop:
                break
        num_train_samples = steps.max_steps * steps.total_train_batch_size
        return self._finalize_training(num_train_samples, start_time)

    def _setup_training(self, stream: Any, max_steps: int, checkpoint: str | None) -> None:
        """Converts the arguments into core pieces once: the optimizer, the state, the step, the manager."""
        self.state = TrainerState()
        self.current_flos = 0.0
        self.callback_handler.train_dataloader = stream
        self.create_optimizer_and_scheduler(num_training_steps=max_steps)
        state = self._distribute(TrainState.create(self.model, self.optimizer, key=self.args.seed))
        if checkpoint is not None:
            state = self._restore_checkpoint(checkpoint, state)
        if self.args.activation_checkpointing:
            self._enable_activation_checkpointing(state.skeleton)
        # NEFTune's hook goes on the skeleton here, outside the step: torch.compile cannot trace registering a hook,
        # and the hook itself adds noise only in training mode, so evaluation through this skeleton sees none.
        self._neftune_handle = None
        if self.neftune_noise_alpha is not None:
            self._neftune_handle = self._activate_neftune(state.skeleton)
        self._train_state = state
        self._train_step = self._make_train_step()
        self._model_stale = checkpoint is not None

    def _distribute(self, state: TrainState) -> TrainState:
        """THE ONE PLACE the Trainer lays its state out over processes: ``shard_state`` with the layout and mesh that
        ``create_accelerator_and_postprocess`` decided (FSDP / ZeRO from ``fsdp`` or ``deepspeed``, else plain data
        parallel); unchanged on one process. Every rank builds the same state (same model, same seed) first.

        The step then reduces the loss ``(sum, count)`` and the gradients over the data-parallel ranks, so its
        ``loss`` and ``grad_norm`` are global and identical on every rank: the logged loss is transformers'
        ``nested_gather(tr_loss).mean()`` (its per-rank losses are scaled so that their mean is the global mean).
        """
        mesh = getattr(self, "mesh", None)
        if mesh is None:
            return state
        from ftrain.distributed import shard_state

        return shard_state(state, mesh, self.parallel_config)

    def _export_state(self) -> TrainState:
        """The train state with full parameters (for ``self.model`` and exported weights; no optimizer state when
        sharded). A collective on a sharded state — every rank calls it — cached while the parameters stay the
        same objects, so a rank-0-only export after a sync gathers nothing more."""
        from ftrain.distributed import gather_state, get_plan

        state = self._train_state
        if get_plan(state) is None:
            return state
        cached = getattr(self, "_gathered", None)
        if cached is not None and cached[0] is state.params and cached[1] is state.buffers:
            return cached[2]
        full = gather_state(state.replace(opt_state=None))
        self._gathered = (state.params, state.buffers, full)
        return full

    def _enable_activation_checkpointing(self, skeleton: Any) -> None:
        """transformers' activation checkpointing, enabled on the step's meta skeleton (never the user's model).

        ``every_n_layers`` and ``offload`` are taken out of ``activation_checkpointing_kwargs`` as transformers does;
        the rest goes to ``torch.utils.checkpoint.checkpoint`` (``use_reentrant=False`` by default). Each layer's
        checkpoint function is wrapped to re-bind the tensors the functional forward gave the layer: the recompute
        runs during the step's backward, after ``functional_call`` has put the meta tensors back."""
        kwargs = dict(self.args.activation_checkpointing_kwargs or {})
        every_n_layers, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
        enable = getattr(skeleton, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs or None, every_n_layers=every_n_layers, offload=offload)
        elif hasattr(skeleton, "gradient_checkpointing_enable"):
            skeleton.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)
        else:
            raise ValueError(
                f"activation_checkpointing=True needs a model with activation_checkpointing_enable() (a transformers "
                f"PreTrainedModel); {type(skeleton).__name__} has none."
            )
        for module in skeleton.modules():
            func = getattr(module, "_gradient_checkpointing_func", None)
            if func is not None and not getattr(func, "_ftrain_rebinds", False):
                module._gradient_checkpointing_func = _rebinding_checkpoint(func)

    def _run_epoch(self, stream: Any, epoch: int, ignore_keys_for_eval: list[str] | None) -> None:
        """One pass over the epoch from the current global step; transformers' ``_run_epoch``."""
        per_epoch = len(stream)
        stop = min((epoch + 1) * per_epoch, self.state.max_steps)
        ran = False
        for batch in stream.iter_from(self.state.global_step, stop=stop):
            ran = True
            self._training_update(batch, stream, epoch)
            self._maybe_log_save_evaluate(ignore_keys_for_eval)
            if self.control.should_epoch_stop or self.control.should_training_stop:
                break
        if not ran and self.state.global_step < self.state.max_steps:
            self.control.should_training_stop = True
        self.control = self.callback_handler.on_epoch_end(self.args, self.state, self.control)
        self._maybe_log_save_evaluate(ignore_keys_for_eval)

    def _training_update(self, batch: Any, stream: Any, epoch: int) -> None:
        """One optimizer update with its callbacks; the update itself is one call of the pure step."""
        handler, args = self.callback_handler, self.args
        self.control = handler.on_step_begin(args, self.state, self.control)
        for _ in range(len(batch) - 1 if isinstance(batch, list) else 0):
            self.control = handler.on_substep_end(args, self.state, self.control)
        self.control = handler.on_pre_optimizer_step(args, self.state, self.control)
        self._train_state, metrics = self._train_step(self._train_state, batch)
        self._model_stale = True
        self.control = handler.on_optimizer_step(args, self.state, self.control)
        self._accumulate_loss(metrics["loss"].detach().to(self._tr_loss.dtype))
        self._last_step_metrics = metrics
        self._count_flos(batch)  # flushed into state.total_flos by store_flos() at saves and at the end
        self._track_num_input_tokens(batch)
        self.state.global_step += 1
        per_epoch = len(stream)
        micro_done = min((self.state.global_step - epoch * per_epoch) * stream.layout.accum_steps,
                         stream.layout.microbatches_per_epoch)  # fmt: skip
        self.state.epoch = epoch + micro_done / stream.layout.microbatches_per_epoch
        self.control = handler.on_step_end(args, self.state, self.control)

    def _accumulate_loss(self, step_loss: torch.Tensor) -> None:
        """Adds the step's loss to the logging accumulator. With ``logging_nan_inf_filter``, a NaN/inf loss adds
        ``accumulator / (1 + steps since the last log)`` instead, as transformers (the update itself already ran).

        transformers filters per microbatch; here the step is one pure update, so a non-finite microbatch makes the
        whole step's loss non-finite and the whole step is replaced (identical when ``gradient_accumulation_steps``
        is 1)."""
        if self.args.logging_nan_inf_filter:
            window = 1 + self.state.global_step - self._globalstep_last_logged
            step_loss = torch.where(torch.isfinite(step_loss), step_loss, self._tr_loss / window)
        self._tr_loss = self._tr_loss + step_loss

    def _track_num_input_tokens(self, batch: Any) -> None:
        """``state.num_input_tokens_seen`` as transformers counts it (``include_num_input_tokens_seen``): every
        element of the main input, or with ``"non_padding"`` the ``attention_mask`` sum (else the tokens that are not
        the tokenizer's pad id)."""
        mode = self.args.include_num_input_tokens_seen
        if mode == "no":
            return
        name = getattr(self.model, "main_input_name", "input_ids")
        pad_id = getattr(self.processing_class, "pad_token_id", None)
        seen = 0
        for mb in batch if isinstance(batch, list) else [batch]:
            if not isinstance(mb, dict) or name not in mb:
                logger.warning(
                    "Tried to track the number of tokens seen, but the batch has no %r (the model's main_input_name); "
                    "set main_input_name on the model.",
                    name,
                )
                return
            ids = mb[name]
            valid = mb.get("_valid")
            rows = valid.to(torch.bool) if valid is not None else torch.ones(ids.shape[0], dtype=torch.bool)
            if mode == "non_padding" and "attention_mask" in mb:
                tokens = mb["attention_mask"][rows].sum()
            elif mode == "non_padding" and pad_id is not None:
                tokens = (ids[rows] != pad_id).sum()
            else:
                tokens = ids[rows].numel()
            seen += int(tokens)
        if getattr(self, "mesh", None) is not None:  # every rank's rows, as transformers gathers them
            total = torch.tensor(seen, dtype=torch.int64, device=self.args.device)
            torch.distributed.all_reduce(total)
            seen = int(total)
        self.state.num_input_tokens_seen += seen

    def _maybe_log_save_evaluate(self, ignore_keys_for_eval: list[str] | None = None) -> None:
        """Logs, evaluates and saves as ``control`` asks (transformers' ``_maybe_log_save_evaluate``)."""
        if self.control.should_log and self.state.global_step > self._globalstep_last_logged:
            self._log_training_metrics()
        if self.control.should_evaluate:
            metrics = self._evaluate(ignore_keys_for_eval)
            is_new_best = self._determine_best_metric(metrics)
            if self.args.save_strategy == SaveStrategy.BEST:
                self.control.should_save = is_new_best
        if self.control.should_save:
            self._save_checkpoint()
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)

    def _log_training_metrics(self) -> None:
        """``loss`` (mean over the updates since the last log), ``grad_norm``, ``learning_rate``."""
        metrics = self._last_step_metrics or {}
        # One device-to-host transfer for everything this log reads.
        pending = {"loss": self._tr_loss, "learning_rate": self._learning_rate_tensor(metrics)}
        if "grad_norm" in metrics:
            pending["grad_norm"] = metrics["grad_norm"]
        host = to_host({k: v for k, v in pending.items() if v is not None})
        tr_loss = host["loss"]
        self._tr_loss = torch.zeros((), dtype=torch.float64)
        logs: dict[str, float] = {"loss": tr_loss / (self.state.global_step - self._globalstep_last_logged)}
        if "grad_norm" in host:
            logs["grad_norm"] = host["grad_norm"]
        logs["learning_rate"] = host.get("learning_rate", float("nan"))
        self._total_loss_scalar += tr_loss
        self._globalstep_last_logged = self.state.global_step
        self.log(logs, self._train_start_time)

    def _learning_rate_tensor(self, metrics: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The lr of the last update (with any plateau scale), as a tensor; ``None`` when the optimizer has none."""
        lr = logged_learning_rate(self._train_state.opt_state)
        return metrics.get("learning_rate") if lr is None else torch.as_tensor(lr)

    def _evaluate(self, ignore_keys_for_eval: list[str] | None, skip_scheduler: bool = False) -> dict[str, float]:
        """Evaluates, then feeds ``eval_{metric_for_best_model}`` to the optimizer's plateau state (transformers
        steps ``ReduceLROnPlateau`` there), through :func:`ftrain.schedules.plateau_update`."""
        metrics = self.evaluate(ignore_keys=ignore_keys_for_eval)
        if skip_scheduler or not self._has_plateau():
            return metrics
        name = self.args.metric_for_best_model
        key = name if name.startswith("eval_") else f"eval_{name}"
        if key not in metrics:
            raise KeyError(
                f"The `metric_for_best_model` training argument is set to '{key}', which is not found in the "
                f"evaluation metrics. The available evaluation metrics are: {list(metrics)}. Make compute_metrics "
                f"return '{key}' or change `metric_for_best_model` in the TrainingArguments."
            )
        opt_state = plateau_update(self._train_state.opt_state, float(metrics[key]))
        self._train_state = self._train_state.replace(opt_state=opt_state)
        return metrics

    def _has_plateau(self) -> bool:
        if self._train_state is None:
            return False
        is_plateau = lambda x: isinstance(x, ReduceOnPlateauState)
        return any(is_plateau(x) for x in _tree.tree_leaves(self._train_state.opt_state, is_leaf=is_plateau))

    def _determine_best_metric(self, metrics: dict[str, float]) -> bool:
        """Updates ``best_metric`` / ``best_global_step`` from ``metric_for_best_model``; True on a new best."""
        name = self.args.metric_for_best_model
        if name is None:
            return False
        key = name if name.startswith("eval_") else f"eval_{name}"
        if key not in metrics:
            raise KeyError(
                f"The `metric_for_best_model` training argument is set to '{key}', which is not found in the "
                f"evaluation metrics. The available evaluation metrics are: {list(metrics)}. Consider changing the "
                "`metric_for_best_model` via the TrainingArguments."
            )
        value, greater = metrics[key], self.args.greater_is_better
        if self.state.best_metric is None:
            self.state.best_metric = float("-inf") if greater else float("inf")
        if (value > self.state.best_metric) if greater else (value < self.state.best_metric):
            self.state.best_metric = value
            if self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST):
                self.state.best_global_step = self.state.global_step
            return True
        return False

    def _finalize_training(self, num_train_samples: int, start_time: float) -> TrainOutput:
        self._total_loss_scalar += float(self._tr_loss)
        steps_run = self.state.global_step - self._initial_global_step
        train_loss = self._total_loss_scalar / max(steps_run, 0.001)
        metrics = speed_metrics(
            "train",
            start_time,
            num_samples=num_train_samples * steps_run / max(self.state.max_steps, 1),
            num_steps=steps_run,
        )
        self.store_flos()
        metrics["total_flos"] = self.state.total_flos
        metrics["train_loss"] = train_loss
        self.log(metrics)
        if getattr(self, "_neftune_handle", None) is not None:
            self._deactivate_neftune(self._train_state.skeleton, self._neftune_handle)
            self._neftune_handle = None
        if self.args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            self._load_best_model()
        self._sync_model()
        if self.args.should_save and self.state.best_model_checkpoint and self.args.save_total_limit == 1:
            for step, path in self._checkpoint_dirs():
                if os.path.abspath(path) != os.path.abspath(self.state.best_model_checkpoint):
                    self._delete_checkpoint(step, path)
        self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
        return TrainOutput(self.state.global_step, train_loss, metrics)

    def _load_best_model(self) -> None:
        """Restores the whole state saved in ``best_model_checkpoint`` (weights bitwise)."""
        path = Path(self.state.best_model_checkpoint)
        step = int(_CHECKPOINT_RE.match(path.name).group(1))
        manager = self._checkpoint_manager(path.parent)
        self._train_state = manager.restore(step, like=self._train_state)
        self._model_stale = True

    # ---- checkpoints ----------------------------------------------------------------------------------------------

    def _save_checkpoint(self, model: Any = None, trial: Any = None) -> None:
        """Writes ``output_dir/checkpoint-{global_step}`` (see the module docstring), then rotates."""
        step = self.state.global_step
        manager = self._checkpoint_manager(self.args.output_dir)
        folder = manager.directory / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        if step in manager.all_steps():
            manager.delete(step)  # transformers overwrites a checkpoint of the same step
        elif folder.exists() and self.args.should_save:
            shutil.rmtree(folder)
        _barrier()
        if self.state.best_global_step:
            best = manager.directory / f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}"
            if best.exists() or self.state.best_global_step == step:
                self.state.best_model_checkpoint = str(best)
        self._refresh_stateful_callbacks()
        self.store_flos()  # trainer_state.json holds the flops up to this step, as transformers
        extra = {"trainer_state": dataclasses.asdict(self.state)}
        if self.args.save_only_model:
            if self.args.should_save:
                folder.mkdir(parents=True)
        else:  # every rank: with a sharded state each writes its shards (DCP)
            manager.save(step, self._train_state, extra=extra, force=True)
        exported = self._export_state()  # a collective when sharded
        if self.args.should_save:
            self._write_hf_views(folder, exported)
        _barrier()  # the views exist before any rank lists checkpoints to rotate
        self._rotate_checkpoints()

    def _write_hf_views(self, folder: Path, exported: TrainState) -> None:
        """transformers' files in ``folder`` (one process writes them): weights + config, processing class,
        ``trainer_state.json``, ``training_args.json``; then the hub push."""
        export_pretrained(exported, folder)
        if self.processing_class is not None and hasattr(self.processing_class, "save_pretrained"):
            self.processing_class.save_pretrained(str(folder))
        self.state.save_to_json(folder / TRAINER_STATE_NAME)
        (folder / TRAINING_ARGS_NAME).write_text(self.args.to_json_string())
        if self.args.push_to_hub:
            self._push_from_checkpoint(str(folder))

    def _refresh_stateful_callbacks(self) -> None:
        from ftrain.trainer.trainer_state import ExportableState, export_callback_states

        stateful = [cb for cb in [*self.callback_handler.callbacks, self.control] if isinstance(cb, ExportableState)]
        self.state.stateful_callbacks = export_callback_states(stateful)

    def _checkpoint_dirs(self) -> list[tuple[int, str]]:
        out = self.args.output_dir
        if not os.path.isdir(out):
            return []
        found = [(int(m.group(1)), os.path.join(out, n)) for n in os.listdir(out) if (m := _CHECKPOINT_RE.match(n))]
        return sorted(s for s in found if os.path.isdir(s[1]))

    def _delete_checkpoint(self, step: int, path: str) -> None:
        manager = self._checkpoint_manager(self.args.output_dir)
        if step in manager.all_steps():
            manager.delete(step)  # every rank forgets it; rank 0 deletes the files
        elif self.args.should_save:
            shutil.rmtree(path, ignore_errors=True)

    def _rotate_checkpoints(self) -> None:
        """transformers' rule: keep the newest and the best; delete the oldest others down to ``save_total_limit``.
        Every rank calls it: each lists the same directories (between barriers), rank 0 deletes the files."""
        limit = self.args.save_total_limit
        if limit is None or limit <= 0:
            return
        dirs = self._checkpoint_dirs()
        _barrier()  # no rank deletes before every rank has listed
        best = self.state.best_model_checkpoint
        protected = {dirs[-1][1]} if dirs else set()
        if best is not None:
            protected.add(os.path.join(self.args.output_dir, os.path.basename(best)))
        keep = max(limit, len(protected))
        deletable = [d for d in dirs if d[1] not in protected]
        for step, path in deletable[: max(0, len(dirs) - keep)]:
            self._delete_checkpoint(step, path)

    def _sync_model(self) -> None:
        """Copies the train state's weights into ``self.model`` (what users, callbacks and eval see)."""
        if self._train_state is not None and self._model_stale:
            self._export_state().load_into(self.model)  # full weights: a collective when sharded
            self._model_stale = False
