"""The Trainer's checkpoint I/O: :class:`TrainerCheckpoints` reads and writes every ``checkpoint-N`` folder through
:class:`~ftrain.checkpoint.CheckpointManager` and the checkpoint package's public functions.

**Layout.** ``output_dir/checkpoint-{global_step}/`` is a ``CheckpointManager`` checkpoint (``step_prefix=
"checkpoint-"``, no zero padding) that also holds transformers' files, so transformers' ``Trainer`` resumes it and
users' tooling reads it: ``state.safetensors`` (the whole ``TrainState``: params, buffers, optimizer state, step,
key), ``meta.json`` (the manager's description of it), then, through the trainer's overridable hooks in
the order transformers' ``_save_checkpoint`` calls them, ``save_model`` (``model.safetensors``, ``config.json``, the
processing class, ``training_args.json`` and ``training_args.bin``), ``_save_optimizer_and_scheduler``
(``optimizer.pt``, ``scheduler.pt``), ``_save_scaler`` (nothing: no loss scaler), ``_save_rng_state``
(``rng_state.pth``), and ``trainer_state.json``, the one copy of the ``TrainerState`` (a NaN or infinite logged
loss is written as ``NaN`` / ``Infinity``, as transformers' ``json.dumps`` does, so it is not in ``meta.json``,
whose JSON is strict); last ``manifest.json`` and ``COMMIT``. Every file is written into
the manager's uncommitted ``.tmp-checkpoint-N-<id>`` folder and committed at once (the hooks receive that folder as
``output_dir``), so a crash never leaves a ``checkpoint-N`` that looks complete and is not. The hub push follows the
commit. ``save_only_model=True`` writes the ``save_model`` files and ``trainer_state.json`` only (no state: such a
folder does not resume), also under a temporary name renamed into place when complete.

**Resume** calls transformers' hooks in transformers' order, so a subclass's overrides take effect:
``_load_from_checkpoint`` (weights, from ``train()``), then the ``TrainerState`` (arguments that differ from the
saved run's are warned about, ``compare_trainer_and_checkpoint_args``), ``_load_callback_state``,
``_load_optimizer_and_scheduler``, ``_load_scaler``, ``_load_rng_state``. For a committed ftrain checkpoint each
hook takes its part of the committed ``TrainState`` (weights, then optimizer state and step, then key; the file
is read and verified once, by the first), so a resume continues bitwise: the data position is ``state.step``
(``BatchStream.iter_from``) and dropout keys are ``fold_in(key, step)``. A folder transformers wrote resumes from
``model.safetensors``, ``trainer_state.json``, ``optimizer.pt`` + ``scheduler.pt`` (mapped onto ftrain's optimizer
state by :mod:`ftrain.trainer.hf_checkpoint`, read with ``torch.load(weights_only=True)``) and ``rng_state.pth``
(the global generators).

**training_args.bin** is ``torch.save(args)`` of ftrain's ``TrainingArguments``, as transformers pickles its own:
tooling reads it with ``torch.load(weights_only=False)`` (which needs ftrain importable). ftrain itself never
reads it (a pickle can run code); ``training_args.json`` holds the same arguments as JSON.

**Several processes** (torchrun): the state is sharded; every rank writes its shards of ``checkpoint-N`` with the
``dcp`` backend (``dcp/`` instead of ``state.safetensors``) and its ``rng_state_{rank}.pth``; the weights and the
optimizer state are gathered (every rank takes part) and rank 0 (``args.should_save``) writes them. A resume needs
the same layout of the state (``like=``), which DCP fills from any number of writers.

**Retention** is the manager's: ``save_total_limit`` becomes ``max_to_keep`` with ``retention="total"``, transformers'
rule (the newest and the best are kept and count toward the limit, so ``save_total_limit=1`` can keep 2). The manager
applies it after each commit, and ``_rotate_checkpoints`` applies it again counting the folders the manager does not
list (``save_only_model`` folders, transformers-written ones), which transformers counts and deletes too; with
``use_mtime=True`` it orders the folders by modification time, as transformers' rotation. Folders go through the
manager only: it unlists (renames) a folder before deleting its files.

**The best checkpoint** is transformers' ``state.best_model_checkpoint``: at a save, ``checkpoint-{best_global_step}``
if that folder exists (or is this save), else unchanged. The manager keeps it through ``should_keep_fn``, asked at
each retention, rather than through a ``metric``: a checkpoint's metrics are fixed when it is committed, and
transformers can name as best a folder committed before its evaluation (``eval_strategy="epoch"`` with
``save_strategy="steps"``: the step-end save comes before the epoch-end evaluation of the same step), a folder the
manager does not list (``save_only_model``), or, after a resume, a different folder than the best metric among the
checkpoints left by an earlier run in the same directory. ``_load_best_model`` restores the best checkpoint's whole
state (weights bitwise).

**Optimizers without a torch form** (Lion, Adafactor, ``reduce_lr_on_plateau``, a user's ``GradientTransformation``)
have no ``optimizer.pt`` / ``scheduler.pt``: a warning says so once per trainer, the state is in ``state.safetensors``
and ftrain resumes from it, but transformers cannot.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ftrain import optim as _optim
from ftrain.checkpoint import (
    CheckpointManager,
    CheckpointManagerOptions,
    StepNaming,
    is_committed,
    list_step_dirs,
)
from ftrain.checkpoint.atomic import fsync_dir, make_tmp_dir
from ftrain.checkpoint.treeio import LeafSpec, check_fits, rebuild
from ftrain.state import TrainState
from ftrain.trainer.callbacks import restore_callback_states
from ftrain.trainer.hf_checkpoint import (
    OPTIMIZER_NAME,
    RNG_STATE_NAME,
    SCALER_NAME,
    SCHEDULER_NAME,
    TRAINING_ARGS_BIN,
    UnmappableOptimizerError,
    check_param_groups,
    lambda_lr_state_dict,
    load_torch_file,
    opt_state_from_torch,
    opt_state_to_torch,
    rng_states,
    set_rng_states,
)
from ftrain.trainer.torch_optim import hf_param_groups
from ftrain.trainer.trainer_state import (
    ExportableState,
    TrainerState,
    compare_trainer_and_checkpoint_args,
    export_callback_states,
)
from ftrain.trainer.utils import (
    CHECKPOINT_NAMING,
    PREFIX_CHECKPOINT_DIR,
    get_last_checkpoint,
    hf_logger,
    load_weights_strict,
    read_safetensors_weights,
)

if TYPE_CHECKING:
    from ftrain.trainer.trainer import Trainer

__all__ = [
    "OPTIMIZER_NAME",
    "RNG_STATE_NAME",
    "SCALER_NAME",
    "SCHEDULER_NAME",
    "TRAINER_STATE_NAME",
    "TRAINING_ARGS_BIN",
    "TRAINING_ARGS_NAME",
    "TrainerCheckpoints",
]

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
TRAINING_ARGS_NAME = "training_args.json"
_PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_STATE_KEY = re.compile(r"^\['(params|buffers)'\]\['(.+)'\]$")  # a key path of the TrainState's weights


def _barrier() -> None:
    """Waits for every process (nothing on one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            torch.distributed.barrier()


def _weights(flat: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The ``params`` and ``buffers`` of a flat committed ``TrainState`` by ``state_dict`` name."""
    return {m.group(2): v for k, v in flat.items() if (m := _STATE_KEY.match(k)) and isinstance(v, torch.Tensor)}


def _named_like(model: nn.Module, names: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``model``'s parameters and buffers of the names in ``names``, with those tensors' devices and dtypes."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    return {k: named[k].to(device=v.device, dtype=v.dtype) for k, v in names.items()}


class TrainerCheckpoints:
    """Every read and write of the Trainer's checkpoint folders; see the module docstring.

    Args:
        trainer: the Trainer it serves. Read at each call, never cached: ``args``, ``state``, ``control``,
            ``mesh``, ``_train_state``, ``model``, ``callback_handler``, ``lr_scheduler``; called back:
            ``save_model``, ``store_flos``, ``_write_hf_views``, ``_save_optimizer_and_scheduler``,
            ``_save_scaler``, ``_save_rng_state``, ``_load_callback_state``, ``_load_optimizer_and_scheduler``,
            ``_load_scaler``, ``_load_rng_state``, ``_push_from_checkpoint``, ``_rotate_checkpoints``.

    Attributes:
        trainer: the Trainer.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self._manager: CheckpointManager | None = None  # of the directory last used, with the options then
        self._resuming: dict[str, TrainState] | None = None  # during a resume: the committed state, read once
        # From resolve_resume to restore_checkpoint: the folder train() resumes from, and its committed state as
        # load_from_checkpoint read it for the weights, so the resume's TrainState is rebuilt from that one read.
        self._resume_from: str | None = None
        self._read_ahead: tuple[tuple[LeafSpec, ...], dict[str, Any]] | None = None
        self._warned_unmappable = False  # the missing optimizer.pt is reported once per trainer

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
        ``output_dir`` (:func:`~ftrain.trainer.utils.get_last_checkpoint`), ``False`` / ``None`` is ``None``. The
        folder is remembered until :meth:`restore_checkpoint`: ``load_from_checkpoint`` keeps what it reads from it
        for the rest of the resume.

        Raises:
            ValueError: no checkpoint in ``output_dir`` (``True``), or no such folder.
        """
        self._resume_from = self._read_ahead = None
        if resume_from_checkpoint is False or resume_from_checkpoint is None:
            return None
        output_dir = self.trainer.plan.save.output_dir
        if resume_from_checkpoint is True:
            found = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
            if found is None:
                raise ValueError(f"No valid checkpoint found in output directory ({output_dir})")
        else:
            found = str(resume_from_checkpoint)
            if not os.path.isdir(found):
                raise ValueError(f"Can't find a valid checkpoint at {found}")
        self._resume_from = os.path.abspath(found)
        return found

    def restore_checkpoint(self, checkpoint: str, state: TrainState) -> TrainState:
        """Resumes from ``checkpoint`` onto the fresh ``state`` (built from the weights ``_load_from_checkpoint``
        loaded) and returns the resumed ``TrainState``.

        Sets the trainer's ``TrainerState`` from the checkpoint's ``trainer_state.json`` (a best folder that no longer
        exists is dropped with a warning, as transformers), warns about arguments that differ from the saved run's,
        then calls the trainer's ``_load_callback_state``, ``_load_optimizer_and_scheduler``, ``_load_scaler`` and
        ``_load_rng_state`` in transformers' order. A committed ftrain checkpoint is read once for all of them.

        Raises:
            ValueError: ``checkpoint`` cannot be resumed (says what it lacks and why).
        """
        trainer = self.trainer
        self._check_resumable(checkpoint)
        trainer._train_state = state
        trainer.state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        best = trainer.state.best_model_checkpoint
        if best is not None and not os.path.isdir(best):
            hf_logger("trainer").warning(f"The resumed state's best checkpoint {best} no longer exists; ignoring it.")
            trainer.state.best_model_checkpoint = None
        compare_trainer_and_checkpoint_args(trainer.args, trainer.state)
        trainer._load_callback_state()
        self._resuming = {}
        try:
            trainer._load_optimizer_and_scheduler(checkpoint)
            trainer._load_scaler(checkpoint)
            trainer._load_rng_state(checkpoint)
        finally:  # what was read for this resume is not kept past it
            self._resuming = self._resume_from = self._read_ahead = None
        return trainer._train_state

    def _check_resumable(self, checkpoint: str) -> None:
        """Raises unless ``checkpoint`` is a committed ftrain checkpoint or a folder transformers can resume."""
        if self._committed(checkpoint) is not None:
            return
        needed = (TRAINER_STATE_NAME, OPTIMIZER_NAME, SCHEDULER_NAME)
        missing = [n for n in needed if not os.path.isfile(os.path.join(checkpoint, n))]
        if not missing:
            return
        if os.path.isfile(os.path.join(checkpoint, "meta.json")):
            why = "an ftrain checkpoint whose save did not finish (no COMMIT marker)"
        elif os.path.isfile(os.path.join(checkpoint, TRAINER_STATE_NAME)):
            why = "a weights-only folder (save_only_model=True), or one whose optimizer has no torch form"
        else:
            why = "not a checkpoint folder of ftrain's or transformers' Trainer"
        raise ValueError(
            f"{checkpoint} cannot be resumed: it lacks {missing} ({why}). Resume from another checkpoint-N, or load "
            "the weights with from_pretrained and train without resume_from_checkpoint."
        )

    def load_callback_state(self) -> None:
        """With ``restore_callback_states_from_checkpoint``, rebuilds the callbacks and the control object whose
        states ``trainer.state.stateful_callbacks`` holds (:func:`~ftrain.trainer.callbacks.restore_callback_states`);
        nothing otherwise."""
        trainer = self.trainer
        if trainer.plan.save.restore_callback_states:
            stored = trainer.state.stateful_callbacks
            trainer.control = restore_callback_states(trainer.callback_handler, trainer.control, stored)

    def _committed_train_state(self, checkpoint: str, like: TrainState) -> TrainState | None:
        """The ``TrainState`` committed in ``checkpoint`` rebuilt on ``like``, else ``None``; read once per resume
        (from what ``load_from_checkpoint`` read for the weights when it read this folder at the resume's start)."""
        key = os.path.abspath(checkpoint)
        if self._resuming is not None and key in self._resuming:
            return self._resuming[key]
        committed = self._committed(checkpoint)
        if committed is None:
            return None
        manager, step = committed
        if self._read_ahead is not None and key == self._resume_from:
            (leaves, flat), self._read_ahead = self._read_ahead, None
            check_fits(list(leaves), like, where=f"checkpoint {Path(key).name}")
            restored = rebuild(like, list(leaves), flat)  # what manager.restore(step, like=like) returns
        else:
            restored = manager.restore(step, like=like)
        if self._resuming is not None:
            self._resuming[key] = restored
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

    def save_checkpoint(self, run_dir: str | None = None) -> None:
        """Writes ``run_dir/checkpoint-{global_step}`` (see the module docstring), pushes it, then rotates
        ``run_dir``'s folders. ``run_dir`` is the trainer's ``_get_output_dir(trial)`` (default ``output_dir``).

        Every process calls it. A folder of the same step is replaced, as transformers overwrites it.
        """
        trainer = self.trainer
        save, state = trainer.plan.save, trainer.state
        run_dir = save.output_dir if run_dir is None else run_dir
        step = state.global_step
        manager = self.manager(run_dir)
        folder = manager.step_path(step)
        if step in manager.all_steps() or folder.is_dir():
            manager.delete(step, include_uncommitted=True)  # every rank forgets it; rank 0 deletes the folder
        _barrier()
        trainer.store_flos()  # trainer_state.json holds the flops up to this step, as transformers
        best = state.best_global_step
        if best and (best == step or manager.step_path(best).exists()):
            state.best_model_checkpoint = os.path.join(run_dir, CHECKPOINT_NAMING.name(best))
        self._refresh_stateful_callbacks()
        if save.only_model:
            self._publish(folder, trainer._write_hf_views)
        else:  # every rank: with a sharded state each writes its shards (DCP); trainer_state.json is a written file
            manager.save(step, trainer._train_state, force=True, write_files=trainer._write_hf_views)
        _barrier()  # the folder is in place before any rank pushes or lists checkpoints to rotate
        if save.should_save and trainer.plan.hub.push_to_hub:
            trainer._push_from_checkpoint(str(folder))
        trainer._rotate_checkpoints(output_dir=run_dir)

    def _publish(self, folder: Path, write: Callable[[Path], None]) -> None:
        """``write(tmp)`` into a temporary folder next to ``folder``, renamed to ``folder`` once complete (a folder
        the manager does not commit: ``save_only_model``). Only the saving process has a folder; the others call
        ``write`` with ``folder`` itself, where (not saving) they write nothing, for the collectives inside."""
        if not self.trainer.plan.save.should_save:
            write(folder)
            return
        tmp = make_tmp_dir(folder.parent, folder.name)
        try:
            write(tmp)
            fsync_dir(tmp)
            os.rename(tmp, folder)
            fsync_dir(folder.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def write_hf_views(self, output_dir: Path) -> None:
        """transformers' files of a checkpoint, written into ``output_dir`` (the uncommitted folder) through the
        trainer's hooks in the order transformers' ``_save_checkpoint`` calls them: ``save_model(output_dir,
        _internal_call=True)``, then (unless ``save_only_model``) ``_save_optimizer_and_scheduler``,
        ``_save_scaler`` and ``_save_rng_state``, then ``trainer_state.json`` on the saving process.

        Every process calls it, as transformers calls these hooks: gathering a sharded state's weights and
        optimizer state is a collective, and each rank writes its own RNG file.
        """
        trainer, folder = self.trainer, str(output_dir)
        trainer.save_model(folder, _internal_call=True)
        if not trainer.plan.save.only_model:
            trainer._save_optimizer_and_scheduler(folder)
            trainer._save_scaler(folder)
            trainer._save_rng_state(folder)
        if trainer.plan.save.should_save:
            trainer.state.save_to_json(Path(folder) / TRAINER_STATE_NAME)

    def _refresh_stateful_callbacks(self) -> None:
        trainer = self.trainer
        candidates = [*trainer.callback_handler.callbacks, trainer.control]
        stateful = [c for c in candidates if isinstance(c, ExportableState)]
        trainer.state.stateful_callbacks = export_callback_states(stateful)

    # ---- listing, retention, deletion -----------------------------------------------------------------------------

    def checkpoint_dirs(self, output_dir: str | None = None) -> list[tuple[int, str]]:
        """``(step, path)`` of every ``checkpoint-N`` folder of ``output_dir`` (default ``args.output_dir``),
        committed or not, by step."""
        out = self.trainer.plan.save.output_dir if output_dir is None else output_dir
        if not os.path.isdir(out):
            return []
        return [(step, os.path.join(out, path.name)) for step, path in list_step_dirs(out, CHECKPOINT_NAMING)]

    def delete_checkpoint(self, step: int, path: str) -> None:
        """Deletes the checkpoint folder ``path`` of ``step`` (committed or not) through the manager of its parent;
        nothing if it is gone. Every process may call it: rank 0 deletes, every rank forgets the step."""
        if os.path.isdir(path):
            self.manager(Path(path).parent).delete(step, include_uncommitted=True)

    def rotate_checkpoints(self, use_mtime: bool = False, output_dir: str | None = None) -> None:
        """transformers' rotation (``save_total_limit``) over every ``checkpoint-N`` folder of ``output_dir``
        (default ``args.output_dir``), including those the manager does not list.

        By step (default): ``CheckpointManager.apply_retention``. With ``use_mtime``: the folders ordered by
        modification time (by step when all times lie within one second), the newest and the best protected, the
        oldest others deleted until ``max(save_total_limit, protected)`` remain, as transformers'
        ``rotate_checkpoints``; a ``checkpoint-*`` folder with no step in its name (``checkpoint-best``) is not a
        checkpoint, so it is neither counted nor deleted (transformers deletes it). Every process calls it (they
        list, wait for each other, then rank 0 deletes)."""
        limit = self.trainer.plan.save.total_limit
        if limit is None or limit <= 0:
            return
        directory = self.trainer.plan.save.output_dir if output_dir is None else output_dir
        if not use_mtime:
            self.manager(directory).apply_retention(include_uncommitted=True)
            return
        ordered = self._ordered_checkpoints(directory, PREFIX_CHECKPOINT_DIR, use_mtime=True)
        steps = {path: CHECKPOINT_NAMING.parse(Path(path).name, exact=False) for path in ordered}
        paths = [path for path in ordered if steps[path] is not None]
        best = self.trainer.state.best_model_checkpoint
        protected = {p for p in paths[-1:]} | ({str(Path(best))} if best is not None else set())
        remaining = len(paths)
        for path in paths:
            if remaining <= max(limit, len(protected)):
                break
            if path not in protected:
                self.delete_checkpoint(steps[path], path)
                remaining -= 1

    def keep_only_best(self) -> None:
        """At the end of training with ``save_total_limit == 1`` and a best checkpoint, deletes every other
        ``checkpoint-N`` folder of ``_get_output_dir(trial)``, as transformers (the saving process does it)."""
        trainer = self.trainer
        save, best = trainer.plan.save, trainer.state.best_model_checkpoint
        if not (save.should_save and best and save.total_limit == 1):
            return
        for step, path in self.checkpoint_dirs(trainer._get_output_dir(trainer._trial)):
            if os.path.abspath(path) != os.path.abspath(best):
                self.delete_checkpoint(step, path)

    def sorted_checkpoints(
        self, output_dir: str | None = None, checkpoint_prefix: str = PREFIX_CHECKPOINT_DIR, use_mtime: bool = False
    ) -> list[str]:
        """The ``{checkpoint_prefix}-N`` folders of ``output_dir`` (default ``args.output_dir``), oldest first, as
        transformers' ``sort_checkpoints`` (:meth:`_ordered_checkpoints`). ``state.best_model_checkpoint``, when
        listed and not the newest, moves to the second-to-last place, so rotation (which deletes from the front)
        keeps it and the newest stays last.
        """
        output_dir = self.trainer.plan.save.output_dir if output_dir is None else output_dir
        paths = self._ordered_checkpoints(output_dir, checkpoint_prefix, use_mtime)
        best = self.trainer.state.best_model_checkpoint
        if best is not None and str(Path(best)) in paths and paths[-1] != str(Path(best)):
            best, newest = str(Path(best)), paths[-1]
            paths = [p for p in paths if p not in (best, newest)] + [best, newest]
        return paths

    def _ordered_checkpoints(self, output_dir: str, checkpoint_prefix: str, use_mtime: bool) -> list[str]:
        """The ``{checkpoint_prefix}-N`` folders of ``output_dir``, oldest first: by ``N`` (a name may go on after
        the digits: ``checkpoint-3x`` is 3), or with ``use_mtime`` every ``{checkpoint_prefix}-*`` folder by
        modification time (when all times lie within one second the filesystem's times are not trusted and ``N``
        is used)."""
        if not os.path.isdir(output_dir):
            return []
        if use_mtime:
            folders = [p for p in Path(output_dir).glob(f"{checkpoint_prefix}-*") if p.is_dir()]
            found = sorted((os.path.getmtime(p), str(p)) for p in folders)
            if len(found) > 1 and found[-1][0] - found[0][0] < 1.0:
                logger.warning("mtime may not be reliable on this filesystem, falling back to numerical ordering")
                return self._ordered_checkpoints(output_dir, checkpoint_prefix, use_mtime=False)
        else:
            naming = StepNaming(f"{checkpoint_prefix}-", 0)
            found = sorted((step, str(p)) for step, p in list_step_dirs(output_dir, naming, exact=False))
        return [path for _, path in found]

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
        read = self._read_committed(folder)
        if read is not None and os.path.abspath(folder) == self._resume_from:
            self._read_ahead = read  # the resume's optimizer state, step and key come from this same read
        tensors = None if read is None else _weights(read[1])
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

    def _read_committed(self, folder: str) -> tuple[tuple[LeafSpec, ...], dict[str, Any]] | None:
        """``(leaves, {key path: tensor / None / value})`` of a committed ftrain checkpoint (``checkpoint-N`` with
        ``COMMIT``), as saved (CPU tensors), else ``None``."""
        committed = self._committed(folder)
        if committed is None:
            return None
        manager, step = committed
        flat, info = manager.restore_with_metadata(step)
        return info.leaves, flat

    def committed_state(self, folder: str) -> dict[str, Any] | None:
        """``{key path: tensor / None / value}`` of a committed ftrain checkpoint (``checkpoint-N`` with
        ``COMMIT``), else ``None``."""
        read = self._read_committed(folder)
        return None if read is None else read[1]

    def committed_weights(self, folder: str) -> dict[str, torch.Tensor] | None:
        """The weights of a committed ftrain checkpoint by ``state_dict`` name, else ``None``."""
        flat = self.committed_state(folder)
        return None if flat is None else _weights(flat)

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

    def _torch_param_groups(self, lr: float) -> list[dict[str, Any]]:
        """transformers' param groups for this trainer's optimizer (parameter names in ``"params"``).

        Raises:
            UnmappableOptimizerError: the optimizer is the user's (``optimizers=``, ``optimizer_cls_and_kwargs``,
                an overridden ``create_optimizer``) or not a torch one in transformers.
        """
        trainer = self.trainer
        if trainer._user_optimizer is not None or trainer.optimizer_cls_and_kwargs is not None:
            raise UnmappableOptimizerError(
                "the optimizer was given to the Trainer (optimizers= / optimizer_cls_and_kwargs=): transformers "
                "would not know its torch class and param groups, so optimizer.pt cannot describe it."
            )
        if trainer.overrides("create_optimizer"):
            raise UnmappableOptimizerError(
                f"{type(trainer).__name__}.create_optimizer is overridden: its optimizer may not be the one the "
                "arguments name, so optimizer.pt cannot describe it."
            )
        return hf_param_groups(trainer.plan.optim, _optim.hf_decay_mask(trainer.model), lr=lr)

    def _schedule_value(self, step: int) -> float:
        """The schedule's learning rate for update ``step`` (0-based), as a float: ``lr_scheduler`` is the
        Trainer's ``LambdaLR`` view (base lr × factor, as torch computes it) or, with an ftrain transformation given
        by the user, the schedule itself.

        Raises:
            UnmappableOptimizerError: another torch scheduler (it has no ``LambdaLR`` form).
        """
        scheduler, step = self.trainer.lr_scheduler, max(step, 0)
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            return float(scheduler.base_lrs[0] * scheduler.lr_lambdas[0](step))
        if callable(scheduler) and not hasattr(scheduler, "state_dict"):
            return float(scheduler(torch.tensor(step)))
        raise UnmappableOptimizerError(
            f"the learning-rate scheduler is a {type(scheduler).__name__}: scheduler.pt holds transformers' LambdaLR."
        )

    def torch_optimizer_files(self, state: TrainState) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(optimizer.pt, scheduler.pt)`` contents for ``state``: transformers' AdamW / SGD / Adagrad / RMSprop
        ``state_dict()`` (:func:`~ftrain.trainer.hf_checkpoint.opt_state_to_torch`) and its ``LambdaLR``'s.

        Gathers a sharded optimizer state: every rank calls it.

        Raises:
            UnmappableOptimizerError: the optimizer or schedule has no torch form (says why).
        """
        step = int(state.step)
        next_lr = self._schedule_value(step)
        groups = self._torch_param_groups(next_lr)
        optimizer = opt_state_to_torch(state.opt_state, groups, step=step)
        scheduler = lambda_lr_state_dict(self.trainer.plan.optim.learning_rate, len(groups), step=step,
                                         last_lr=next_lr)  # fmt: skip
        return optimizer, scheduler

    def save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Writes ``optimizer.pt`` and ``scheduler.pt`` (``torch.save``, as transformers) on the saving process.

        The optimizer state and the schedule's position are the ``TrainState``'s (``opt_state``, ``step``), in the
        format of the torch optimizer and ``LambdaLR`` transformers builds for the same arguments, so transformers'
        ``Trainer`` resumes from them. An optimizer with no torch form writes neither file, with a warning (once).

        Raises:
            RuntimeError: before ``train()`` built the state.
        """
        state = self._require_state("_save_optimizer_and_scheduler")
        try:
            optimizer, scheduler = self.torch_optimizer_files(state)
        except UnmappableOptimizerError as e:
            if not self._warned_unmappable:
                self._warned_unmappable = True
                logger.warning("optimizer.pt and scheduler.pt are not written: %s", e)
            return
        if self.trainer.plan.save.should_save:
            os.makedirs(output_dir, exist_ok=True)
            torch.save(optimizer, os.path.join(output_dir, OPTIMIZER_NAME))
            torch.save(scheduler, os.path.join(output_dir, SCHEDULER_NAME))

    def load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Restores ``state.opt_state`` and ``state.step`` from ``checkpoint``: its committed ftrain state, else
        transformers' ``optimizer.pt`` + ``scheduler.pt`` (both needed, as transformers; read with
        ``torch.load(weights_only=True)``); nothing when there is neither (or ``checkpoint`` is None).

        Raises:
            CheckpointMismatchError: a committed state that does not fit the current one (names the leaves).
            UnmappableOptimizerError: ``optimizer.pt`` of another optimizer, other hyper-parameters or other param
                groups than this run's (says which).
            ValueError: ``scheduler.pt`` with another peak learning rate than ``learning_rate``.
            RuntimeError: before ``train()`` built the state.
        """
        if checkpoint is None:
            return
        state = self._require_state("_load_optimizer_and_scheduler")
        restored = self._committed_train_state(checkpoint, state)
        if restored is not None:
            self.trainer._train_state = state.replace(opt_state=restored.opt_state, step=restored.step)
            return
        files = [os.path.join(checkpoint, n) for n in (OPTIMIZER_NAME, SCHEDULER_NAME)]
        if all(os.path.isfile(f) for f in files):
            self.trainer._train_state = self._state_from_torch_files(state, *files)

    def _state_from_torch_files(self, state: TrainState, optimizer_file: str, scheduler_file: str) -> TrainState:
        """``state`` continuing transformers' optimizer and ``LambdaLR`` saved in these files."""
        scheduler = load_torch_file(scheduler_file)
        step = int(scheduler["last_epoch"])
        base_lr = self.trainer.plan.optim.learning_rate
        if any(float(lr) != base_lr for lr in scheduler.get("base_lrs", [])):
            raise ValueError(
                f"{scheduler_file}: the run that wrote it had learning_rate={scheduler['base_lrs'][0]!r} (base_lrs), "
                f"these TrainingArguments have learning_rate={base_lr!r}; set learning_rate to the checkpoint's to "
                "continue the run (transformers' resume keeps the checkpoint's)."
            )
        saved = load_torch_file(optimizer_file)
        groups = self._torch_param_groups(self._schedule_value(step))
        check_param_groups(saved.get("param_groups", []), groups)
        opt_state = opt_state_from_torch(saved, state.opt_state, [g["params"] for g in groups], step=step,
                                         learning_rate=self._schedule_value(step - 1))  # fmt: skip
        return state.replace(opt_state=opt_state, step=torch.tensor(step, dtype=torch.int64))

    def rng_file(self, folder: str) -> str:
        """``folder/rng_state.pth``, or ``rng_state_{rank}.pth`` with several processes (transformers' naming)."""
        process = self.trainer.plan.process
        name = RNG_STATE_NAME if process.world_size <= 1 else f"rng_state_{process.process_index}.pth"
        return os.path.join(folder, name)

    def save_rng_state(self, output_dir: str) -> None:
        """Writes ``rng_state.pth`` (``rng_state_{rank}.pth`` with several processes), as transformers: the global
        Python, numpy, torch CPU (and CUDA) generators (:func:`~ftrain.trainer.hf_checkpoint.rng_states`).

        ftrain's own randomness (dropout, NEFTune) is the ``TrainState``'s key, saved with the state; the global
        generators matter to user code (a collator's masking, say) and to transformers resuming the folder.
        """
        os.makedirs(output_dir, exist_ok=True)
        distributed = self.trainer.plan.process.world_size > 1
        torch.save(rng_states(distributed=distributed), self.rng_file(output_dir))

    def load_rng_state(self, checkpoint: str | None) -> None:
        """Restores the RNG of ``checkpoint``: the ``TrainState``'s key from a committed ftrain checkpoint, and the
        global generators from its ``rng_state.pth`` (read with ``torch.load(weights_only=True)``). Without the
        file the global generators are left alone (logged, as transformers).

        Raises:
            pickle.UnpicklingError: an RNG file holding other objects than transformers writes.
        """
        if checkpoint is None:
            return
        if self.trainer._train_state is not None:
            restored = self._committed_train_state(checkpoint, self.trainer._train_state)
            if restored is not None:
                self.trainer._train_state = self.trainer._train_state.replace(key=restored.key)
        path = self.rng_file(checkpoint)
        if not os.path.isfile(path):
            logger.info("Didn't find an RNG file (%s); the global generators are not restored.", path)
            return
        set_rng_states(load_torch_file(path), distributed=self.trainer.plan.process.world_size > 1)

    def save_scaler(self, output_dir: str) -> None:
        """Does nothing, as transformers without a scaler: ftrain keeps no ``GradScaler`` (mixed precision is bf16
        autocast, which needs no loss scaling), so there is no scaler state to save."""

    def load_scaler(self, checkpoint: str | None) -> None:
        """Does nothing (ftrain has no loss scaler); a transformers ``scaler.pt`` in ``checkpoint`` (an fp16 run's)
        is not read, and a warning says so."""
        if checkpoint is not None and os.path.isfile(os.path.join(checkpoint, SCALER_NAME)):
            logger.warning("%s/%s is ignored: ftrain trains without a loss scaler.", checkpoint, SCALER_NAME)
