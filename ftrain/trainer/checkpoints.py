"""The Trainer's checkpoint I/O: :class:`TrainerCheckpoints` reads and writes every ``checkpoint-N`` folder through
:class:`~ftrain.checkpoint.CheckpointManager` and the checkpoint package's public functions.

**Layout.** ``output_dir/checkpoint-{global_step}/`` is a ``CheckpointManager`` checkpoint (``step_prefix=
"checkpoint-"``, no zero padding), written atomically: ``state.safetensors`` (the whole ``TrainState``: params,
buffers, optimizer state, step, key), ``meta.json`` (whose ``extra`` holds the ``TrainerState`` at that step),
``manifest.json`` and ``COMMIT`` (written last). Once committed, the folder gets the Hugging Face views: the
trainer's ``save_model`` writes ``model.safetensors`` + ``config.json``, the processing class and
``training_args.json``; then come ``trainer_state.json`` (JSON, never a pickle) and the hub push. A resume reads only
committed data — the state and the ``TrainerState`` in ``meta.json`` — so a crash after the commit but before the
views are written still resumes. The data position is ``state.step`` (``BatchStream.iter_from``) and dropout keys
are ``fold_in(key, step)``, so a resume continues bitwise. ``save_only_model=True`` writes the views only (no
state: such a folder does not resume), as transformers.

**Several processes** (torchrun): the state is sharded; every rank writes its shards of ``checkpoint-N`` with the
``dcp`` backend (``dcp/`` instead of ``state.safetensors``), and rank 0 (``args.should_save``) writes the views from
the gathered full weights. A resume needs the same layout of the state (``like=``), which DCP fills from any number
of writers.

**Retention** is the manager's: ``save_total_limit`` becomes ``max_to_keep`` with ``retention="total"``, transformers'
rule (the newest and the best are kept and count toward the limit, so ``save_total_limit=1`` can keep 2). The manager
applies it after each commit, and ``_rotate_checkpoints`` applies it again counting the folders the manager does not
list (``save_only_model`` folders, transformers-written ones), which transformers counts and deletes too. Folders go
through the manager only: it unlists (renames) a folder before deleting its files.

**The best checkpoint** is transformers' ``state.best_model_checkpoint``: at a save, ``checkpoint-{best_global_step}``
if that folder exists (or is this save), else unchanged. The manager keeps it through ``should_keep_fn``, asked at
each retention, rather than through a ``metric``: a checkpoint's metrics are fixed when it is committed, and
transformers can name as best a folder committed before its evaluation (``eval_strategy="epoch"`` with
``save_strategy="steps"``: the step-end save comes before the epoch-end evaluation of the same step), a folder the
manager does not list (``save_only_model``), or, after a resume, a different folder than the best metric among the
checkpoints left by an earlier run in the same directory.

**Hooks.** The Trainer keeps transformers' method names (``_save_checkpoint``, ``_load_from_checkpoint``,
``_save_optimizer_and_scheduler``...) as thin delegations to this component, and the component calls back through
the trainer's overridable methods: ``save_model``, ``store_flos``, ``_push_from_checkpoint``, ``_write_hf_views``
and ``_rotate_checkpoints``. Where ftrain deliberately differs: the optimizer, schedule and RNG of a checkpoint are
its committed ``TrainState``, so ``_save_checkpoint`` does not call ``_save_optimizer_and_scheduler`` /
``_save_scaler`` / ``_save_rng_state`` (they would write a second copy), a resume restores the whole state rather
than calling ``_load_from_checkpoint`` / ``_load_optimizer_and_scheduler`` / ``_load_rng_state``, and
``_load_best_model`` restores the best checkpoint's whole state (weights bitwise). Those hooks, called directly,
read and write their own files: ``optimizer.safetensors`` (:func:`~ftrain.checkpoint.save_tree_file`),
``scheduler.json`` and ``rng_state.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ftrain.checkpoint import (
    CheckpointManager,
    CheckpointManagerOptions,
    StepNaming,
    is_committed,
    list_step_dirs,
    load_tree_file,
    save_tree_file,
)
from ftrain.state import TrainState
from ftrain.trainer.callbacks import restore_callback_states
from ftrain.trainer.convert import logged_learning_rate
from ftrain.trainer.trainer_state import ExportableState, TrainerState, export_callback_states
from ftrain.trainer.utils import (
    CHECKPOINT_NAMING,
    PREFIX_CHECKPOINT_DIR,
    get_last_checkpoint,
    load_weights_strict,
    read_safetensors_weights,
)

if TYPE_CHECKING:
    from ftrain.trainer.trainer import Trainer

__all__ = [
    "OPTIMIZER_NAME",
    "RNG_STATE_NAME",
    "SCHEDULER_NAME",
    "TRAINER_STATE_NAME",
    "TRAINING_ARGS_NAME",
    "TrainerCheckpoints",
]

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
TRAINING_ARGS_NAME = "training_args.json"
OPTIMIZER_NAME = "optimizer.safetensors"
SCHEDULER_NAME = "scheduler.json"
RNG_STATE_NAME = "rng_state.json"
_PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_STATE_KEY = re.compile(r"^\['(params|buffers)'\]\['(.+)'\]$")  # a key path of the TrainState's weights


def _barrier() -> None:
    """Waits for every process (nothing on one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            torch.distributed.barrier()


def _named_like(model: nn.Module, names: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``model``'s parameters and buffers of the names in ``names``, with those tensors' devices and dtypes."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    return {k: named[k].to(device=v.device, dtype=v.dtype) for k, v in names.items()}


class TrainerCheckpoints:
    """Every read and write of the Trainer's checkpoint folders; see the module docstring.

    Args:
        trainer: the Trainer it serves. Read at each call, never cached: ``args``, ``state``, ``control``,
            ``mesh``, ``_train_state``, ``model``, ``callback_handler``; called back: ``save_model``,
            ``store_flos``, ``_write_hf_views``, ``_push_from_checkpoint``,
            ``_rotate_checkpoints``.

    Attributes:
        trainer: the Trainer.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self._manager: CheckpointManager | None = None  # of the directory last used, with the options then

    # ---- the manager ----------------------------------------------------------------------------------------------

    def manager(self, directory: str | os.PathLike[str]) -> CheckpointManager:
        """The manager of ``directory``; a new one (the previous closed) when the directory or the options changed.

        Options: ``checkpoint-N`` names, the ``dcp`` backend when the state is sharded (``trainer.mesh``), and with
        ``save_total_limit > 0`` transformers' retention (``max_to_keep=save_total_limit``, ``retention="total"``,
        the best folder kept by ``should_keep_fn``).
        """
        directory = Path(directory).absolute()
        options = self._options()
        current = self._manager
        if current is None or current.directory != directory or current.options != options:
            if current is not None:
                current.close()
            self._manager = CheckpointManager(directory, options)
        return self._manager

    def _options(self) -> CheckpointManagerOptions:
        return self.trainer.plan.save.checkpoint_options(sharded=self.trainer.mesh is not None,
                                                         should_keep_fn=self._keeps)  # fmt: skip

    def _keeps(self, step: int) -> bool:
        """The manager's ``should_keep_fn``: True for the folder named like ``state.best_model_checkpoint``, which
        transformers' rotation never deletes."""
        best = self.trainer.state.best_model_checkpoint
        return best is not None and CHECKPOINT_NAMING.parse(Path(best).name) == step

    def _committed(self, folder: str | os.PathLike[str]) -> tuple[CheckpointManager, int] | None:
        """The manager and step of ``folder`` if it is a committed ``checkpoint-N`` (no manager is made otherwise)."""
        path = Path(folder).absolute()
        step = CHECKPOINT_NAMING.parse(path.name)
        if step is None or not is_committed(path):
            return None
        return self.manager(path.parent), step

    # ---- resume and the best model --------------------------------------------------------------------------------

    def resolve_resume(self, resume_from_checkpoint: bool | str | None) -> str | None:
        """``train(resume_from_checkpoint=...)`` as a folder: ``True`` is the last ``checkpoint-N`` of
        ``output_dir`` (:func:`~ftrain.trainer.utils.get_last_checkpoint`), ``False`` / ``None`` is ``None``.

        Raises:
            ValueError: no checkpoint in ``output_dir`` (``True``), or no such folder.
        """
        if resume_from_checkpoint is False or resume_from_checkpoint is None:
            return None
        output_dir = self.trainer.plan.save.output_dir
        if resume_from_checkpoint is True:
            found = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
            if found is None:
                raise ValueError(f"No valid checkpoint found in output directory ({output_dir})")
            return found
        if not os.path.isdir(resume_from_checkpoint):
            raise ValueError(f"Can't find a valid checkpoint at {resume_from_checkpoint}")
        return str(resume_from_checkpoint)

    def restore_checkpoint(self, checkpoint: str, state: TrainState) -> TrainState:
        """The ``TrainState`` saved in ``checkpoint`` (rebuilt on ``state``); sets the trainer's ``TrainerState``
        from it (a best folder that no longer exists is dropped, as transformers) and, with
        ``restore_callback_states_from_checkpoint``, its callbacks' states.

        Raises:
            ValueError: ``checkpoint`` is not a committed ftrain checkpoint.
        """
        trainer = self.trainer
        committed = self._committed(checkpoint)
        if committed is None:
            raise ValueError(
                f"{checkpoint} is not a committed ftrain checkpoint (no COMMIT marker / ftrain state): it was written "
                "by transformers, with save_only_model=True, or interrupted. ftrain resumes only from its own "
                "checkpoints; load the weights with from_pretrained and train without resume_from_checkpoint."
            )
        manager, step = committed
        restored = manager.restore(step, like=state)
        trainer.state = TrainerState(**manager.restore_extra(step)["trainer_state"])
        if trainer.state.best_model_checkpoint and not os.path.isdir(trainer.state.best_model_checkpoint):
            trainer.state.best_model_checkpoint = None
        if trainer.plan.save.restore_callback_states:
            stored = trainer.state.stateful_callbacks
            trainer.control = restore_callback_states(trainer.callback_handler, trainer.control, stored)
        return restored

    def load_best_model(self) -> None:
        """Restores the whole state saved in ``state.best_model_checkpoint`` (weights bitwise).

        Raises:
            ValueError: ``best_model_checkpoint`` is not a ``checkpoint-N`` folder.
            FileNotFoundError: it holds no committed checkpoint (e.g. it was saved with ``save_only_model``).
        """
        trainer = self.trainer
        path = Path(trainer.state.best_model_checkpoint)
        step = CHECKPOINT_NAMING.parse(path.name)
        if step is None:
            raise ValueError(f"best_model_checkpoint={str(path)!r} is not a {PREFIX_CHECKPOINT_DIR}-N folder")
        trainer._train_state = self.manager(path.parent).restore(step, like=trainer._train_state)
        trainer._model_stale = True

    # ---- saving ---------------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Writes ``output_dir/checkpoint-{global_step}`` (see the module docstring), then rotates.

        Every process calls it. A folder of the same step is replaced, as transformers overwrites it.
        """
        trainer = self.trainer
        save, state = trainer.plan.save, trainer.state
        step = state.global_step
        manager = self.manager(save.output_dir)
        folder = manager.step_path(step)
        if step in manager.all_steps() or folder.is_dir():
            manager.delete(step, include_uncommitted=True)  # every rank forgets it; rank 0 deletes the folder
        _barrier()
        best = state.best_global_step
        if best and (best == step or manager.step_path(best).exists()):
            state.best_model_checkpoint = os.path.join(save.output_dir, CHECKPOINT_NAMING.name(best))
        self._refresh_stateful_callbacks()
        trainer.store_flos()  # trainer_state.json holds the flops up to this step, as transformers
        if save.only_model:
            if save.should_save:
                folder.mkdir(parents=True)
        else:  # every rank: with a sharded state each writes its shards (DCP)
            extra = {"trainer_state": dataclasses.asdict(state)}
            manager.save(step, trainer._train_state, extra=extra, force=True)
        trainer._write_hf_views(folder)  # save_model gathers a sharded state's weights: every rank calls it
        _barrier()  # the views exist before any rank lists checkpoints to rotate
        trainer._rotate_checkpoints()

    def write_hf_views(self, folder: Path) -> None:
        """transformers' files in ``folder``: the trainer's ``save_model`` (weights + config, processing class,
        ``training_args.json``), then, on the saving process, ``trainer_state.json`` and the hub push.

        Every process calls it, as transformers calls ``save_model``: gathering a sharded state's weights is a
        collective.
        """
        trainer = self.trainer
        trainer.save_model(str(folder), _internal_call=True)
        if trainer.plan.save.should_save:
            trainer.state.save_to_json(Path(folder) / TRAINER_STATE_NAME)
            if trainer.plan.hub.push_to_hub:
                trainer._push_from_checkpoint(str(folder))

    def _refresh_stateful_callbacks(self) -> None:
        trainer = self.trainer
        candidates = [*trainer.callback_handler.callbacks, trainer.control]
        stateful = [c for c in candidates if isinstance(c, ExportableState)]
        trainer.state.stateful_callbacks = export_callback_states(stateful)

    # ---- listing, retention, deletion -----------------------------------------------------------------------------

    def checkpoint_dirs(self) -> list[tuple[int, str]]:
        """``(step, path)`` of every ``checkpoint-N`` folder of ``output_dir``, committed or not, by step."""
        out = self.trainer.plan.save.output_dir
        if not os.path.isdir(out):
            return []
        return [(step, os.path.join(out, path.name)) for step, path in list_step_dirs(out, CHECKPOINT_NAMING)]

    def delete_checkpoint(self, step: int, path: str) -> None:
        """Deletes the checkpoint folder ``path`` of ``step`` (committed or not) through the manager of its parent;
        nothing if it is gone. Every process may call it: rank 0 deletes, every rank forgets the step."""
        if os.path.isdir(path):
            self.manager(Path(path).parent).delete(step, include_uncommitted=True)

    def rotate_checkpoints(self) -> None:
        """transformers' rotation (``save_total_limit``) over every ``checkpoint-N`` folder of ``output_dir``,
        including those the manager does not list: ``CheckpointManager.apply_retention``. Every process calls it
        (they list, wait for each other, then rank 0 deletes)."""
        limit = self.trainer.plan.save.total_limit
        if limit is None or limit <= 0:
            return
        self.manager(self.trainer.plan.save.output_dir).apply_retention(include_uncommitted=True)

    def keep_only_best(self) -> None:
        """At the end of training with ``save_total_limit == 1`` and a best checkpoint, deletes every other
        ``checkpoint-N`` folder, as transformers (the saving process does it)."""
        save, best = self.trainer.plan.save, self.trainer.state.best_model_checkpoint
        if not (save.should_save and best and save.total_limit == 1):
            return
        for step, path in self.checkpoint_dirs():
            if os.path.abspath(path) != os.path.abspath(best):
                self.delete_checkpoint(step, path)

    def sorted_checkpoints(
        self, output_dir: str | None = None, checkpoint_prefix: str = PREFIX_CHECKPOINT_DIR, use_mtime: bool = False
    ) -> list[str]:
        """The ``{checkpoint_prefix}-N`` folders of ``output_dir`` (default ``args.output_dir``), oldest first, as
        transformers' ``sort_checkpoints``.

        Ordered by ``N`` (a name may go on after the digits: ``checkpoint-3x`` is 3), or with ``use_mtime`` by
        modification time, every ``{checkpoint_prefix}-*`` folder (when all times lie within one second the
        filesystem's times are not trusted and ``N`` is used). ``state.best_model_checkpoint``, when listed and not
        the newest, moves to the second-to-last place, so rotation (which deletes from the front) keeps it and the
        newest stays last.
        """
        output_dir = self.trainer.plan.save.output_dir if output_dir is None else output_dir
        if not os.path.isdir(output_dir):
            return []
        if use_mtime:
            folders = [p for p in Path(output_dir).glob(f"{checkpoint_prefix}-*") if p.is_dir()]
            found = sorted((os.path.getmtime(p), str(p)) for p in folders)
            if len(found) > 1 and found[-1][0] - found[0][0] < 1.0:
                logger.warning("mtime may not be reliable on this filesystem, falling back to numerical ordering")
                return self.sorted_checkpoints(output_dir, checkpoint_prefix, use_mtime=False)
        else:
            naming = StepNaming(f"{checkpoint_prefix}-", 0)
            found = sorted((step, str(p)) for step, p in list_step_dirs(output_dir, naming, exact=False))
        paths = [path for _, path in found]
        best = self.trainer.state.best_model_checkpoint
        if best is not None and str(Path(best)) in paths and paths[-1] != str(Path(best)):
            best, newest = str(Path(best)), paths[-1]
            paths = [p for p in paths if p not in (best, newest)] + [best, newest]
        return paths

    # ---- weights --------------------------------------------------------------------------------------------------

    def load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Loads the weights saved in ``resume_from_checkpoint`` into ``model`` (default the trainer's), in place.

        Reads, in this order: a committed ftrain checkpoint's state (its ``params`` and ``buffers``), else
        transformers' ``model.safetensors``, else a sharded ``model.safetensors.index.json``. Keys match strictly:
        every parameter and persistent buffer must be there (one name of a tied pair is enough, as
        ``save_pretrained`` writes it) and nothing else. When ``model`` is the trainer's model and a ``TrainState``
        exists, the state takes the loaded weights too (the next step and ``save_model`` use them).

        Raises:
            ValueError: no weights in the folder (transformers' message), pickled ``pytorch_model.bin`` weights
                (refused: loading a pickle can run code), or keys / shapes that do not match (listed).
        """
        trainer = self.trainer
        model = trainer.model if model is None else model
        folder = str(resume_from_checkpoint)
        tensors = self.committed_weights(folder)
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
        state = trainer._train_state
        if model is trainer.model and state is not None:
            trainer._train_state = state.replace(
                params={k: v.detach().clone() for k, v in _named_like(model, state.params).items()},
                buffers={k: v.detach().clone() for k, v in _named_like(model, state.buffers).items()},
            )
            trainer._model_stale = False

    def committed_state(self, folder: str) -> dict[str, Any] | None:
        """``{key path: tensor / None / value}`` of a committed ftrain checkpoint (``checkpoint-N`` with
        ``COMMIT``), else ``None``."""
        committed = self._committed(folder)
        if committed is None:
            return None
        manager, step = committed
        return manager.restore(step)

    def committed_weights(self, folder: str) -> dict[str, torch.Tensor] | None:
        """The weights of a committed ftrain checkpoint by ``state_dict`` name, else ``None``."""
        flat = self.committed_state(folder)
        if flat is None:
            return None
        return {m.group(2): v for k, v in flat.items() if (m := _STATE_KEY.match(k)) and isinstance(v, torch.Tensor)}

    def saved_specs(self, checkpoint: str) -> list[Any]:
        """Every leaf (key path, kind, dtype, shape) of the state saved in the ``checkpoint-N`` folder.

        Raises:
            ValueError: not a ``checkpoint-N`` folder.
            FileNotFoundError: it holds no committed checkpoint.
        """
        path = Path(checkpoint).absolute()
        step = CHECKPOINT_NAMING.parse(path.name)
        if step is None:
            raise ValueError(f"{checkpoint} is not a {PREFIX_CHECKPOINT_DIR}-N folder")
        return list(self.manager(path.parent).metadata(step).leaves)

    # ---- optimizer, schedule, RNG, scaler: transformers' per-file hooks -------------------------------------------

    def _require_state(self, what: str) -> TrainState:
        state = self.trainer._train_state
        if state is None:
            raise RuntimeError(
                f"{what}: there is no TrainState yet; it is built when train() starts (optimizer, schedule and RNG "
                "key live in it). Call this from a callback or after train()."
            )
        return state

    def save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Writes the optimizer and schedule state: ``optimizer.safetensors`` and ``scheduler.json``.

        In ftrain both are part of the ``TrainState``: the optimizer state is ``state.opt_state``, written as
        the tree ``{"opt_state": ...}`` by :func:`~ftrain.checkpoint.save_tree_file` (its tensors by key path, the
        leaf list in the safetensors metadata), and the schedule is a function of the update count inside it, so
        ``scheduler.json`` only records ``{"step", "learning_rate"}`` for readers. Committed ftrain checkpoints
        already hold both in ``state.safetensors``.

        Raises:
            RuntimeError: before ``train()`` built the state.
        """
        state = self._require_state("_save_optimizer_and_scheduler")
        os.makedirs(output_dir, exist_ok=True)
        save_tree_file(os.path.join(output_dir, OPTIMIZER_NAME), {"opt_state": state.opt_state})
        lr = logged_learning_rate(state.opt_state)
        info = {"step": int(state.step), "learning_rate": None if lr is None else float(lr)}
        Path(output_dir, SCHEDULER_NAME).write_text(json.dumps(info, indent=2) + "\n")

    def load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Restores ``state.opt_state`` (optimizer moments and the schedule's update count) from ``checkpoint``:
        its ``optimizer.safetensors``, else its committed ftrain state; nothing when there is neither (or
        ``checkpoint`` is None), as transformers.

        Raises:
            CheckpointMismatchError: the saved state does not fit the current one (names the leaves).
            RuntimeError: before ``train()`` built the state.
        """
        if checkpoint is None:
            return
        state = self._require_state("_load_optimizer_and_scheduler")
        path = os.path.join(checkpoint, OPTIMIZER_NAME)
        if os.path.isfile(path):
            opt_state = load_tree_file(path, {"opt_state": state.opt_state})["opt_state"]
        else:
            committed = self._committed(checkpoint)
            if committed is None:
                return
            manager, step = committed
            opt_state = manager.restore(step, like=state).opt_state
        self.trainer._train_state = state.replace(opt_state=opt_state)

    def rng_file(self, folder: str) -> str:
        """``folder/rng_state.json``, or ``rng_state_{rank}.json`` with several processes (transformers' naming)."""
        process = self.trainer.plan.process
        name = RNG_STATE_NAME if process.world_size <= 1 else f"rng_state_{process.process_index}.json"
        return os.path.join(folder, name)

    def save_rng_state(self, output_dir: str) -> None:
        """Writes ``rng_state.json`` (``rng_state_{rank}.json`` with several processes, as transformers names its
        ``.pth``): ``{"key": [hi, lo], "step": n}``.

        In ftrain the RNG is the key in the ``TrainState``: the step's dropout / NEFTune draws are seeded from
        ``fold_in(key, step)``, and the global torch / numpy / Python generators play no part, so the key and the
        step are the whole RNG state. JSON, never a pickle.

        Raises:
            RuntimeError: before ``train()`` built the state.
        """
        state = self._require_state("_save_rng_state")
        os.makedirs(output_dir, exist_ok=True)
        doc = {"key": [int(x) for x in state.key.tolist()], "step": int(state.step)}
        Path(self.rng_file(output_dir)).write_text(json.dumps(doc) + "\n")

    def load_rng_state(self, checkpoint: str | None) -> None:
        """Sets the ``TrainState``'s key from ``checkpoint``'s ``rng_state.json`` (see :meth:`save_rng_state`).

        Nothing happens without ``checkpoint`` or without the file (logged, as transformers). The step is not
        changed: it comes with the weights and optimizer state.

        Raises:
            ValueError: a file that is not ftrain's (e.g. transformers' pickled ``rng_state.pth`` is never read).
            RuntimeError: before ``train()`` built the state.
        """
        if checkpoint is None:
            return
        path = self.rng_file(checkpoint)
        if not os.path.isfile(path):
            logger.info("Didn't find an RNG file (%s); reproducibility of the resumed run is not guaranteed.", path)
            return
        state = self._require_state("_load_rng_state")
        doc = json.loads(Path(path).read_text())
        key = doc.get("key") if isinstance(doc, dict) else None
        if not (isinstance(key, list) and len(key) == 2 and all(isinstance(x, int) for x in key)):
            raise ValueError(f"{path}: expected {{'key': [int, int], 'step': int}} (ftrain's RNG file), got {doc!r}")
        self.trainer._train_state = state.replace(key=torch.tensor(key, dtype=torch.int64))

    def save_scaler(self, output_dir: str) -> None:
        """Does nothing, as transformers without a scaler: ftrain keeps no ``GradScaler`` (mixed precision is bf16
        autocast, which needs no loss scaling), so there is no scaler state to save."""

    def load_scaler(self, checkpoint: str | None) -> None:
        """Does nothing (ftrain has no loss scaler); a transformers ``scaler.pt`` in ``checkpoint`` is not read
        (a pickle), and a warning says so."""
        if checkpoint is not None and os.path.isfile(os.path.join(checkpoint, "scaler.pt")):
            logger.warning("%s/scaler.pt is ignored: ftrain trains without a loss scaler.", checkpoint)
