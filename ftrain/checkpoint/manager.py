"""``CheckpointManager``: save and restore a whole run, atomically, with retention policies and async writes.

A checkpoint holds everything that determines the rest of a run (DESIGN.md invariant 3): every leaf of the state
(``step``, ``params``, ``buffers``, ``opt_state``, the RNG ``key``) plus JSON ``extra`` (config, data position,
anything the caller needs) and the ``metrics`` it was saved with. On disk::

    <directory>/
      step_00000120/              one committed checkpoint (``step_prefix`` + zero-padded step)
        state.safetensors         the tensors, keyed by key path (or dcp/..., or orbax/... + orbax_keys.json)
        meta.json                 step, backend, time, key, metrics, extra, model class and config, and every leaf's
                                  key path, kind (tensor / none / python), dtype and shape
        manifest.json             size and checksum (xxh3_128 by default, or sha256...) of every file above
        COMMIT                    written last: the step and the manifest's size and checksum
      .tmp-step_00000125-<uuid>/  a save in progress (or killed): never listed, removed when a manager starts

Writes are atomic (:mod:`ftrain.checkpoint.atomic`), checked on restore (:mod:`ftrain.checkpoint.integrity`),
and rebuilt onto a template without unpickling anything (:mod:`ftrain.checkpoint.treeio`). When and what to keep
is :mod:`ftrain.checkpoint.policy`.

With ``async_save=True``, ``save`` blocks only while the tensors are copied into staging buffers
(:mod:`ftrain.checkpoint.staging`); a background thread writes, commits and applies retention. **The caller may
donate or overwrite the state as soon as** ``save`` **returns.** One save is in flight at a time: the next ``save``
first waits for the previous write. A failed background write raises at the next ``save``,
``wait_until_finished``, ``restore`` or ``close``.

Example:
    >>> import tempfile, torch
    >>> from ftrain import TrainState, optim
    >>> from ftrain.checkpoint import CheckpointManager, CheckpointManagerOptions
    >>> state = TrainState.create(torch.nn.Linear(2, 1), optim.adamw(1e-3), key=0)
    >>> tmpdir = tempfile.TemporaryDirectory()
    >>> with CheckpointManager(tmpdir.name, CheckpointManagerOptions(max_to_keep=2)) as mgr:
    ...     for step in (10, 20, 30):
    ...         _ = mgr.save(step, state, metrics={"loss": 1.0 / step}, extra={"epoch": step // 10})
    ...     restored = mgr.restore(like=state)
    ...     mgr.all_steps(), mgr.latest_step(), mgr.metadata().extra
    ([20, 30], 30, {'epoch': 3})
    >>> torch.equal(restored.params["weight"], state.params["weight"])
    True
    >>> tmpdir.cleanup()
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ftrain import random as _random
from ftrain.checkpoint import atomic
from ftrain.checkpoint.backends import Backend, get_backend
from ftrain.checkpoint.errors import CorruptCheckpointError, StepAlreadyExistsError
from ftrain.checkpoint.integrity import FileEntry, Manifest, hash_file, verify_bytes
from ftrain.checkpoint.policy import CheckpointManagerOptions, best_steps, is_save_due, metric_value, select_to_keep
from ftrain.checkpoint.staging import Stager, dist_any, dist_barrier, dist_broadcast_token, dist_info
from ftrain.checkpoint.treeio import LeafSpec, check_fits, dtype_from_name, flatten, like_tensors, rebuild

__all__ = ["CheckpointInfo", "CheckpointManager"]

_META_FORMAT = "ftrain.checkpoint"


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What ``meta.json`` says about one committed checkpoint.

    Attributes:
        step: the step it was saved as.
        path: its directory.
        backend: the backend that wrote its tensors.
        time: when it was saved (seconds since the epoch).
        metrics: the metrics passed to ``save`` (floats), or ``None``.
        extra: the JSON ``extra`` passed to ``save``, or ``None``.
        model: ``{"class": ..., "config": ...}`` of the state's model skeleton when known, else ``None``.
        leaves: every leaf's key path, kind, dtype and shape.
    """

    step: int
    path: Path
    backend: str
    time: float
    metrics: dict[str, float] | None
    extra: Any
    model: dict[str, Any] | None
    leaves: tuple[LeafSpec, ...]


def _json_problem(obj: Any, where: str) -> str | None:
    """The first place in ``obj`` that JSON cannot hold, or ``None``."""
    if obj is None or isinstance(obj, bool | int | str):
        return None
    if isinstance(obj, float):
        return None if math.isfinite(obj) else f"{where} = {obj!r} (not finite)"
    if isinstance(obj, list | tuple):
        return next((p for i, v in enumerate(obj) if (p := _json_problem(v, f"{where}[{i}]"))), None)
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                return f"{where} has the key {k!r} ({type(k).__name__}, JSON keys are strings)"
            if p := _json_problem(v, f"{where}[{k!r}]"):
                return p
        return None
    return f"{where} is a {type(obj).__name__}"


def _metrics_json(metrics: Mapping[str, Any] | None) -> dict[str, float] | None:
    if metrics is None:
        return None
    out = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.detach().reshape(()).double().item()
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(
                f"save(metrics=...): metrics[{name!r}] must be a number or a 1-element tensor, got "
                f"{type(value).__name__}"
            )
        out[str(name)] = float(value)
    return out


def _model_info(state: Any) -> dict[str, Any] | None:
    skeleton = getattr(state, "skeleton", None)
    if skeleton is None:
        return None
    info: dict[str, Any] = {"class": f"{type(skeleton).__module__}.{type(skeleton).__qualname__}"}
    config = getattr(skeleton, "config", None)
    try:
        if hasattr(config, "to_json_string"):
            info["config"] = json.loads(config.to_json_string(use_diff=False))
        elif dataclasses.is_dataclass(config):
            info["config"] = json.loads(json.dumps(dataclasses.asdict(config)))
    except (TypeError, ValueError):  # informational only: a config JSON cannot hold is left out
        pass
    return info


def _as_step(step: Any) -> int:
    if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_floating_point():
        step = int(step)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise TypeError(f"step must be an int >= 0 (or a 0-d integer tensor), got {step!r}")
    return step


class CheckpointManager:
    """Saves, lists, keeps and restores the checkpoints of one run in ``directory``. See the module docstring.

    Args:
        directory: where checkpoints live (created if missing). Only one manager may write into it at a time.
        options: :class:`~ftrain.checkpoint.CheckpointManagerOptions` (defaults: save whenever asked, keep all,
            synchronous, safetensors).

    Raises:
        ValueError: ``save_on_preemption`` outside the main thread (signal handlers can only be set there).
        ImportError: ``backend="orbax"`` without orbax-checkpoint installed.
    """

    def __init__(self, directory: str | Path, options: CheckpointManagerOptions | None = None):
        self.options = options if options is not None else CheckpointManagerOptions()
        if not isinstance(self.options, CheckpointManagerOptions):
            raise TypeError(f"options must be a CheckpointManagerOptions, got {type(self.options).__name__}")
        self.directory = Path(directory).absolute()
        self.backend: Backend = get_backend(self.options.backend)
        self._naming = self.options.naming
        self._group = self.backend.process_group
        self._rank, self._world = dist_info(self._group)
        self._lock = threading.RLock()
        self._steps: dict[int, dict[str, float] | None] = {}  # committed step -> metrics
        self._pending: Future | None = None
        self._pending_step: int | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stager = Stager()
        self._preempted = False
        self._previous_handlers: dict[int, Any] = {}
        self._closed = False
        self._last_save_time = time.monotonic()
        if self._rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic.clean_leftovers(self.directory)
        if self.backend.collective:
            dist_barrier(self._group)
        self._refresh()
        if self.options.save_on_preemption:
            self._install_signal_handlers()

    # ----------------------------------------------------------------------------------------------------------
    # listing

    def _refresh(self) -> None:
        """Syncs the cache of committed steps with the directory (another tool may have deleted one)."""
        with self._lock:  # the writer thread commits and deletes under this lock too
            on_disk = atomic.list_steps(self.directory, self._naming)
            for step in set(self._steps) - set(on_disk):
                del self._steps[step]
            for step in on_disk:
                if step not in self._steps:
                    self._steps[step] = self._read_metrics(step)

    def _read_metrics(self, step: int) -> dict[str, float] | None:
        try:
            return self._read_meta(self.step_path(step))[1].get("metrics")
        except CorruptCheckpointError as e:
            warnings.warn(f"{e} (its metrics are ignored for retention)", stacklevel=3)
            return None

    def step_path(self, step: int) -> Path:
        """The directory ``step`` is (or would be) saved in, committed or not, existing or not."""
        return self.directory / self._naming.name(step)

    def all_steps(self) -> list[int]:
        """Steps with a committed checkpoint, ascending (a save still in flight is not listed)."""
        self._refresh()
        with self._lock:
            return sorted(self._steps)

    def latest_step(self) -> int | None:
        """The newest committed step, or ``None``."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The committed step with the best metric (``None`` without a metric option or any recorded metric)."""
        self._refresh()
        with self._lock:
            values = {s: metric_value(m, self.options) for s, m in self._steps.items()}
        best = best_steps(values, self.options, 1)
        return best[0] if best else None

    @property
    def preempted(self) -> bool:
        """True once a preemption signal arrived (``save_on_preemption``): save, then stop training."""
        return self._preempted

    # ----------------------------------------------------------------------------------------------------------
    # saving

    def should_save(self, step: int) -> bool:
        """Whether ``step`` is due under the options (always after a preemption signal, never for a step at or
        before the newest saved one). With a collective backend on several processes and ``save_on_preemption`` or
        ``save_interval_seconds``, the ranks agree through an all-reduce, so every rank must call it at the same
        steps (``save`` calls it too)."""
        step = _as_step(step)
        together = self._world > 1 and self.backend.collective  # what one rank sees, every rank must act on
        if together and self.options.save_on_preemption:
            self._preempted = dist_any(self._preempted, self._group)
        with self._lock:
            known = [*self._steps, *([self._pending_step] if self._pending_step is not None else [])]
        due = is_save_due(
            step,
            self.options,
            latest_step=max(known, default=None),
            seconds_since_save=time.monotonic() - self._last_save_time,
            preempted=self._preempted,
        )
        if together and self.options.save_interval_seconds:  # clocks differ between ranks
            due = dist_any(due, self._group)
        return due

    def save(
        self,
        step: int,
        state: Any,
        *,
        metrics: Mapping[str, Any] | None = None,
        extra: Any = None,
        force: bool = False,
        write_files: Callable[[Path], None] | None = None,
    ) -> bool:
        """Saves ``state`` as ``step`` if :meth:`should_save` says so (or ``force``); returns whether it did.

        Synchronous: returns once the checkpoint is committed and retention applied. With ``async_save``: returns
        once the tensors are staged — the caller may then donate or overwrite ``state`` — and writes in the
        background. Call it from every process when the backend is ``"dcp"``.

        Args:
            step: the step number (names the directory).
            state: a ``TrainState`` or any pytree of tensors, ``None`` and JSON-able scalars.
            metrics: numbers (or 1-element tensors) stored with the checkpoint; the options' ``metric`` ranks it.
            extra: JSON-able data stored in ``meta.json`` (config, data position, ...); see :meth:`metadata`.
            force: save even if no policy says the step is due.
            write_files: called with the uncommitted directory once the state is written there and before the
                commit (synchronous saves only; with a collective backend on every rank, else on rank 0): the files
                it writes are hashed into the manifest and committed with the state, so a crash never leaves a
                listed checkpoint with some of them missing. For files that belong with the state (an export in
                another library's format, say).

        Raises:
            StepAlreadyExistsError: ``step`` is already committed.
            TypeError: ``extra`` or ``metrics`` cannot be stored as JSON, or a leaf is not storable (names it).
            ValueError: ``write_files`` with ``async_save`` (it would run while the caller changes the state).
            KeyError: ``metrics`` lacks the options' ``metric``.
            Exception: the error of a previous asynchronous write.
        """
        self._check_open()
        step = _as_step(step)
        if write_files is not None and self.options.async_save:
            raise ValueError(
                "save(write_files=...) needs a synchronous save: with async_save=True the files would be written in "
                "the background while the caller goes on changing what they describe. Write them after "
                "wait_until_finished(), or build the manager with async_save=False."
            )
        self.wait_until_finished()
        if not (force or self.should_save(step)):
            return False
        with self._lock:
            if step in self._steps:
                raise StepAlreadyExistsError(
                    f"step {step} already has a checkpoint at {self.step_path(step)}; checkpoints are never "
                    "overwritten. Delete it first (manager.delete(step)) or save under another step."
                )
        meta, tensors = self._prepare(step, state, metrics, extra)
        if self.options.async_save:
            staged = self._stager.stage(tensors)
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ftrain-checkpoint")
            with self._lock:
                self._pending_step = step
                self._pending = self._executor.submit(self._write, step, staged, meta)
        else:
            self._write(step, tensors, meta, write_files)
        self._last_save_time = time.monotonic()
        return True

    def _prepare(self, step: int, state: Any, metrics: Any, extra: Any) -> tuple[dict[str, Any], dict]:
        """Validates the inputs and builds ``meta.json`` (in the caller's thread, so mistakes raise here)."""
        if problem := _json_problem(extra, "extra"):
            raise TypeError(f"save(extra=...): {problem}; extra must be JSON (dict, list, str, number, bool, None).")
        metrics_json = _metrics_json(metrics)
        if self.options.has_best and metrics_json is not None:
            metric_value(metrics_json, self.options, strict=True)
        specs, tensors = flatten(state)
        key = getattr(state, "key", None)
        meta = {
            "format": _META_FORMAT,
            "version": 1,
            "step": step,
            "backend": self.backend.name,
            "time": time.time(),
            "world_size": self._world,
            "torch": torch.__version__,
            "key": key.tolist() if _random.is_key(key) else None,
            "metrics": metrics_json,
            "extra": extra,
            "model": _model_info(state),
            "leaves": [s.to_json() for s in specs],
        }
        return meta, tensors

    def _write(
        self,
        step: int,
        tensors: Mapping[str, torch.Tensor],
        meta: dict[str, Any],
        write_files: Callable[[Path], None] | None = None,
    ) -> None:
        """Writes into a temporary directory (the state, then ``write_files``), commits, applies retention. Runs on
        the writer thread when async."""
        collective = self.backend.collective
        tmp = None
        try:
            if self._rank != 0 and not collective:
                return
            name = self._naming.name(step)
            token = dist_broadcast_token(self._group) if collective else None
            tmp = atomic.make_tmp_dir(self.directory, name, token)
            entries = dict(self.backend.write(tmp, tensors, meta, hash_algorithm=self.options.hash_algorithm))
            if write_files is not None:
                write_files(tmp)
            if collective:
                dist_barrier(self._group)
            if self._rank == 0:
                self._commit(tmp, step, meta, entries)
            if collective:
                dist_barrier(self._group)
                if self._rank != 0:  # mirror rank 0's listing, so every rank's should_save agrees
                    with self._lock:
                        self._steps[step] = meta["metrics"]
                        keep = select_to_keep(self._steps, self._steps, self.options)
                        self._steps = {s: m for s, m in self._steps.items() if s in keep}
        except BaseException:
            if tmp is not None and self._rank == 0 and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)  # what a crash would leave; the next manager would remove it
            raise
        finally:
            with self._lock:
                if self._pending_step == step:
                    self._pending_step = None

    def _commit(self, tmp: Path, step: int, meta: dict[str, Any], entries: dict[str, FileEntry]) -> None:
        algorithm = self.options.hash_algorithm
        entries[atomic.META_FILE] = atomic.write_file(
            tmp / atomic.META_FILE, json.dumps(meta, indent=1).encode(), algorithm
        )
        for path in sorted(tmp.rglob("*")):  # files the backend did not hash itself (DCP, orbax): hash and fsync
            rel = path.relative_to(tmp).as_posix()
            if path.is_dir():
                atomic.fsync_dir(path)
            elif rel not in entries:
                entries[rel] = hash_file(path, algorithm, fsync=True)
        manifest = atomic.write_file(tmp / atomic.MANIFEST_FILE, Manifest(algorithm, entries).to_bytes(), algorithm)
        marker = {"step": step, "algorithm": algorithm, "manifest": {"size": manifest.size, "digest": manifest.digest}}
        with self._lock:
            atomic.commit(tmp, self.step_path(step), marker)
            self._steps[step] = meta["metrics"]
        self._apply_retention()

    def _apply_retention(self) -> None:
        """Retention after a commit (rank 0, or the writer thread): the committed steps the policy does not keep."""
        with self._lock:
            drop = sorted(set(self._steps) - select_to_keep(self._steps, self._steps, self.options))
        self._remove(drop)

    def _remove(self, steps: list[int]) -> None:
        """Forgets ``steps``; rank 0 unlists their directories (under the lock: the writer commits under it too),
        then removes the files. A directory that cannot be unlisted is left, with a warning."""
        trash = []
        with self._lock:
            for step in steps:
                self._steps.pop(step, None)
                if self._rank != 0:
                    continue
                try:
                    trash.append(atomic.unlist_dir(self.step_path(step)))
                except OSError as e:
                    warnings.warn(f"retention could not delete {self.step_path(step)}: {e}", stacklevel=3)
        for path in trash:
            shutil.rmtree(path, ignore_errors=True)

    def apply_retention(self, *, include_uncommitted: bool = False) -> list[int]:
        """Deletes now what the retention policy does not keep (``save`` does it after each commit); returns the
        deleted steps, ascending.

        Args:
            include_uncommitted: also count the directories named like a step that hold no committed checkpoint (a
                copy another tool wrote, e.g. Hugging Face's ``Trainer``, or a weights-only folder) as checkpoints
                saved without metrics, and delete them like checkpoints: Hugging Face's ``save_total_limit`` counts
                every ``checkpoint-N`` folder. Temporary ``.tmp-`` directories are never counted.

        With a collective backend on several processes every rank calls it: each lists, they wait for each other,
        then rank 0 deletes and every rank forgets the deleted steps.

        Raises:
            Exception: the error of a previous asynchronous write.
        """
        self._check_open()
        self.wait_until_finished()
        self._refresh()
        with self._lock:
            metrics = dict(self._steps)
        steps = set(metrics)
        if include_uncommitted and self.directory.is_dir():
            steps.update(step for step, _ in atomic.list_step_dirs(self.directory, self._naming))
        drop = sorted(steps - select_to_keep(steps, metrics, self.options))
        if self.backend.collective:
            dist_barrier(self._group)  # no rank deletes before every rank has listed
        self._remove(drop)
        return drop

    def delete(self, step: int, *, include_uncommitted: bool = False) -> None:
        """Deletes a committed checkpoint atomically: it is unlisted (renamed) before its files go.

        With a collective backend on several processes every rank calls it: rank 0 deletes the directory, every
        rank forgets the step.

        Args:
            step: the step to delete.
            include_uncommitted: also delete a directory named like ``step`` that holds no committed checkpoint (a
                copy another tool wrote, an interrupted copy), e.g. to save ``step`` again.

        Raises:
            FileNotFoundError: (rank 0) no committed checkpoint for ``step`` (with ``include_uncommitted``, no
                directory of its name).
        """
        step = _as_step(step)
        self.wait_until_finished()
        path = self.step_path(step)
        if self._rank == 0:
            found = path.is_dir() if include_uncommitted else step in self.all_steps()
            if not found:
                what = "directory" if include_uncommitted else "committed checkpoint"
                raise FileNotFoundError(f"no {what} for step {step} in {self.directory} ({path.name})")
        self._remove([step])

    def wait_until_finished(self) -> None:
        """Blocks until the asynchronous write in flight (if any) is committed.

        Raises:
            Exception: the error the background write failed with (raised once).
        """
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    # ----------------------------------------------------------------------------------------------------------
    # restoring

    def _read_meta(self, path: Path) -> tuple[Manifest, dict[str, Any]]:
        """The verified manifest and ``meta.json`` of a committed checkpoint."""
        marker = atomic.read_commit(path)
        try:
            expected = FileEntry(int(marker["manifest"]["size"]), str(marker["manifest"]["digest"]))
            algorithm = str(marker["algorithm"])
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpointError(
                f"checkpoint {str(path)!r}: file {atomic.COMMIT_FILE!r} is corrupt: it is not a valid commit marker. "
                "Restore an earlier step or delete this one.",
                path=path,
                file=atomic.COMMIT_FILE,
            ) from None
        manifest_bytes = self._read_bytes(path, atomic.MANIFEST_FILE)
        verify_bytes(path, atomic.MANIFEST_FILE, manifest_bytes, expected, algorithm)
        manifest = Manifest.from_bytes(manifest_bytes, path)
        meta_bytes = self._read_bytes(path, atomic.META_FILE)
        if atomic.META_FILE not in manifest.files:
            raise CorruptCheckpointError(f"checkpoint {str(path)!r}: meta.json is not in the manifest", path=path)
        verify_bytes(path, atomic.META_FILE, meta_bytes, manifest.files[atomic.META_FILE], manifest.algorithm)
        return manifest, json.loads(meta_bytes)

    @staticmethod
    def _read_bytes(path: Path, name: str) -> bytes:
        try:
            return (path / name).read_bytes()
        except FileNotFoundError:
            raise CorruptCheckpointError(
                f"checkpoint {str(path)!r}: file {name!r} is corrupt: it is missing. Restore an earlier step or delete "
                "this one.",
                path=path,
                file=name,
            ) from None

    def _committed_path(self, step: int) -> Path:
        path = self.step_path(_as_step(step))
        if not atomic.is_committed(path):
            raise FileNotFoundError(
                f"no committed checkpoint for step {step} in {self.directory}; committed steps: {self.all_steps()}"
            )
        return path

    def _load_info(self, step: int) -> tuple[Manifest, CheckpointInfo]:
        path = self._committed_path(step)
        manifest, meta = self._read_meta(path)
        info = CheckpointInfo(
            step=int(meta["step"]),
            path=path,
            backend=str(meta["backend"]),
            time=float(meta["time"]),
            metrics=meta.get("metrics"),
            extra=meta.get("extra"),
            model=meta.get("model"),
            leaves=tuple(LeafSpec.from_json(x) for x in meta["leaves"]),
        )
        return manifest, info

    def metadata(self, step: int | None = None) -> CheckpointInfo:
        """What was saved with ``step`` (default: the newest): metrics, ``extra``, model config, leaves.

        Raises:
            FileNotFoundError: no such committed checkpoint.
            CorruptCheckpointError: its ``meta.json`` or manifest is damaged.
        """
        self.wait_until_finished()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no committed checkpoint in {self.directory}")
        return self._load_info(step)[1]

    def restore_extra(self, step: int | None = None) -> Any:
        """The ``extra`` saved with ``step`` (default: the newest)."""
        return self.metadata(step).extra

    def restore(self, step: int | None = None, *, like: Any = None, verify: bool = True) -> Any:
        """The state saved as ``step``, rebuilt on the template ``like``.

        Without ``step``, the newest checkpoint that is intact: a corrupt one is skipped with a warning naming it
        and the file, and the next older one is tried.

        Args:
            step: which checkpoint (default: the newest good one).
            like: a template with the saved tree structure, dtypes and shapes — e.g. a freshly created
                ``TrainState`` — whose static parts (skeleton, ``tx``) are reused and whose leaves' devices (and
                DTensor placements) the restored tensors take. ``None`` returns ``{key path: tensor / None /
                value}`` as saved.
            verify: check the size and hash of every file it reads (the state's and meta.json) against the
                manifest; files of ``save(write_files=...)`` are checked by ``Manifest.verify``.

        Raises:
            FileNotFoundError: no committed checkpoint (for ``step``).
            CheckpointMismatchError: a key path, dtype or shape differs from ``like`` (names them).
            CorruptCheckpointError: a file is damaged (names it); without ``step``, only if every checkpoint is.
        """
        return self.restore_with_metadata(step, like=like, verify=verify)[0]

    def restore_with_metadata(
        self, step: int | None = None, *, like: Any = None, verify: bool = True
    ) -> tuple[Any, CheckpointInfo]:
        """Like :meth:`restore`, and also the restored checkpoint's :class:`CheckpointInfo`."""
        self._check_open()
        self.wait_until_finished()
        if step is not None:
            return self._restore_step(step, like, verify)
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no committed checkpoint in {self.directory} to restore from")
        errors: list[CorruptCheckpointError] = []
        for s in reversed(steps):
            try:
                return self._restore_step(s, like, verify)
            except CorruptCheckpointError as e:
                errors.append(e)
                older = [x for x in steps if x < s]
                then = f"falling back to step {older[-1]}" if older else "no older checkpoint is left"
                warnings.warn(f"skipping the corrupt checkpoint {self._naming.name(s)}: {e} ({then})", stacklevel=2)
        raise CorruptCheckpointError(
            f"every checkpoint in {self.directory} is corrupt ({len(errors)}); the newest error: {errors[0]}",
            path=self.directory,
        ) from errors[0]

    def _restore_step(self, step: int, like: Any, verify: bool) -> tuple[Any, CheckpointInfo]:
        manifest, info = self._load_info(step)
        specs = list(info.leaves)
        if like is not None:
            check_fits(specs, like, where=f"checkpoint {info.path.name}")
            templates = like_tensors(like)
        else:
            templates = {
                s.path: torch.empty(s.shape, dtype=dtype_from_name(s.dtype)) for s in specs if s.kind == "tensor"
            }
        backend = self.backend if info.backend == self.backend.name else get_backend(info.backend)
        tensors = backend.read(info.path, templates, manifest=manifest if verify else None)
        if like is not None:
            return rebuild(like, specs, tensors), info
        flat = {s.path: tensors[s.path] if s.kind == "tensor" else s.value for s in specs}
        return flat, info

    # ----------------------------------------------------------------------------------------------------------
    # lifecycle

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise ValueError(
                "save_on_preemption=True installs a signal handler, which Python allows only in the main thread; "
                "build the CheckpointManager in the main thread, or set save_on_preemption=False."
            )
        for sig in self.options.preemption_signals:
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._preempted = True
        previous = self._previous_handlers.get(signum)
        if callable(previous):
            previous(signum, frame)

    def _restore_signal_handlers(self) -> None:
        for sig, previous in self._previous_handlers.items():
            if signal.getsignal(sig) == self._on_signal:
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous_handlers.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"this CheckpointManager ({self.directory}) is closed; build a new one")

    def close(self) -> None:
        """Waits for the write in flight, restores the previous signal handlers and frees the staging buffers.

        Raises:
            Exception: the error of the last asynchronous write, if it failed (after cleaning up).
        """
        if self._closed:
            return
        self._closed = True
        try:
            self.wait_until_finished()
        finally:
            if self._previous_handlers:
                self._restore_signal_handlers()
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            self._stager.clear()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"CheckpointManager({str(self.directory)!r}, backend={self.backend.name!r}, "
            f"steps={sorted(self._steps)}, async_save={self.options.async_save})"
        )
