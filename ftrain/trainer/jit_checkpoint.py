"""Just-in-time checkpoints (``enable_jit_checkpoint``): on SIGTERM, save a checkpoint and stop, as transformers.

A scheduler that preempts a job sends SIGTERM, then SIGKILL after a grace period. With ``enable_jit_checkpoint=True``
the Trainer installs :class:`JITCheckpointManager`'s SIGTERM handler when it is built (the previous handler comes
back when training ends). The handler waits ``kill_wait`` seconds (transformers' 3: a SIGKILL that follows at once
means there is no time to save), then asks for a checkpoint; :class:`JITCheckpointCallback` sees the request at the
next ``on_step_begin``, ``on_pre_optimizer_step``, ``on_step_end`` or ``on_epoch_end``, writes
``output_dir/checkpoint-{global_step}`` through ``trainer._save_checkpoint`` and stops training — transformers'
events, folder and order. The checkpoint is committed atomically like every ftrain checkpoint, so transformers'
``checkpoint-is-incomplete.txt`` marker is not needed: a folder cut short by the SIGKILL is never taken for a good
one when resuming.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from ftrain.trainer.callbacks import TrainerCallback

__all__ = ["JITCheckpointCallback", "JITCheckpointManager"]

logger = logging.getLogger(__name__)


class JITCheckpointManager:
    """The SIGTERM handler and the checkpoint request it raises.

    Args:
        trainer: the Trainer whose ``_save_checkpoint`` writes the checkpoint.
        kill_wait: seconds between the SIGTERM and the request.

    Attributes:
        is_checkpoint_requested: set ``kill_wait`` seconds after a SIGTERM, cleared when the checkpoint is written.
        timer: the pending request's timer (``None`` before a SIGTERM).
    """

    def __init__(self, trainer: Any, kill_wait: float = 3) -> None:
        self.trainer = trainer
        self.kill_wait = kill_wait
        self.is_checkpoint_requested = False
        self.timer: threading.Timer | None = None
        self._original_sigterm_handler: Any = None

    def setup_signal_handler(self) -> None:
        """Installs the SIGTERM handler (keeping the one it replaces, for :meth:`restore_signal_handler`)."""
        self._original_sigterm_handler = signal.signal(signal.SIGTERM, self._sigterm_handler)

    def restore_signal_handler(self) -> None:
        """Puts back the SIGTERM handler that :meth:`setup_signal_handler` replaced."""
        if self._original_sigterm_handler is not None:
            signal.signal(signal.SIGTERM, self._original_sigterm_handler)
            self._original_sigterm_handler = None

    def _sigterm_handler(self, signum: int, frame: Any) -> None:
        if self.is_checkpoint_requested or self.timer is not None:
            return
        logger.info("SIGTERM received: a checkpoint is requested in %ss", self.kill_wait)
        self.timer = threading.Timer(self.kill_wait, self._request_checkpoint)
        self.timer.daemon = True
        self.timer.start()

    def _request_checkpoint(self) -> None:
        self.is_checkpoint_requested = True

    def execute_jit_checkpoint(self) -> None:
        """Writes ``checkpoint-{global_step}`` now (``trainer._save_checkpoint(trainer.model, trial=None)``)."""
        self.is_checkpoint_requested = False  # one checkpoint per request, even if saving fails
        logger.info("Saving a just-in-time checkpoint at step %d", self.trainer.state.global_step)
        self.trainer._save_checkpoint(self.trainer.model, trial=None)


class JITCheckpointCallback(TrainerCallback):
    """Writes the requested just-in-time checkpoint at the next step or epoch boundary and stops training.

    :meth:`set_trainer` installs the SIGTERM handler when the trainer's arguments ask for it; ``on_train_end``
    restores the previous handler.
    """

    def __init__(self) -> None:
        self.trainer: Any = None
        self.jit_manager: JITCheckpointManager | None = None

    def set_trainer(self, trainer: Any) -> None:
        """Binds the callback to ``trainer`` and, with ``enable_jit_checkpoint``, installs the SIGTERM handler."""
        self.trainer = trainer
        if trainer.plan.save.jit_checkpoint:
            self.jit_manager = JITCheckpointManager(trainer)
            self.jit_manager.setup_signal_handler()

    def _save_if_requested(self, control: Any, *, cancel_save: bool) -> None:
        if self.jit_manager is None or not self.jit_manager.is_checkpoint_requested:
            return
        if cancel_save:  # the checkpoint written here replaces the one the step or epoch would write
            control.should_save = False
        control.should_training_stop = True
        self.jit_manager.execute_jit_checkpoint()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._save_if_requested(control, cancel_save=False)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._save_if_requested(control, cancel_save=False)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._save_if_requested(control, cancel_save=True)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._save_if_requested(control, cancel_save=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.jit_manager is not None:
            self.jit_manager.restore_signal_handler()
