"""ftrain's built-in callbacks that are also subclasses of transformers' classes of the same name.

HF code finds the trainer's callbacks with ``isinstance`` against transformers' classes (``isinstance(cb,
transformers.DefaultFlowCallback)``, TRL's ``pop_callback(PrinterCallback)``...). transformers' classes are plain
classes (no ``register`` for virtual subclasses), so each class here derives from ftrain's class first, for its
methods, and from transformers' class second, for those checks. ftrain imports this module only when transformers'
callback module is already imported (:func:`ftrain.trainer.callbacks.builtin_class`), never from ``import ftrain``.

Example:
    >>> import transformers
    >>> from ftrain.trainer import callbacks
    >>> flow = TWINS[callbacks.DefaultFlowCallback]()
    >>> isinstance(flow, transformers.DefaultFlowCallback), isinstance(flow, callbacks.DefaultFlowCallback)
    (True, True)
    >>> type(flow).on_step_end is callbacks.DefaultFlowCallback.on_step_end
    True
"""

from __future__ import annotations

import functools
import sys

from transformers import trainer_callback as _hf

from ftrain.trainer import callbacks as _ftrain
from ftrain.trainer import jit_checkpoint as _jit

__all__ = ["TWINS", "DefaultFlowCallback", "PrinterCallback", "ProgressCallback", "twin"]


class DefaultFlowCallback(_ftrain.DefaultFlowCallback, _hf.DefaultFlowCallback):
    """ftrain's :class:`~ftrain.trainer.callbacks.DefaultFlowCallback`, also a ``transformers.DefaultFlowCallback``."""


class ProgressCallback(_ftrain.ProgressCallback, _hf.ProgressCallback):
    """ftrain's :class:`~ftrain.trainer.callbacks.ProgressCallback`, also a ``transformers.ProgressCallback``."""


class PrinterCallback(_ftrain.PrinterCallback, _hf.PrinterCallback):
    """ftrain's :class:`~ftrain.trainer.callbacks.PrinterCallback`, also a ``transformers.PrinterCallback``."""


#: ftrain's class -> the class above deriving from it and from transformers' class of the same name.
TWINS: dict[type, type] = {
    _ftrain.DefaultFlowCallback: DefaultFlowCallback,
    _ftrain.ProgressCallback: ProgressCallback,
    _ftrain.PrinterCallback: PrinterCallback,
}


def twin(klass: type) -> type:
    """The class to instantiate for ftrain's callback class ``klass``: its twin in :data:`TWINS`; for
    :class:`~ftrain.trainer.jit_checkpoint.JITCheckpointCallback`, once ``transformers.trainer_jit_checkpoint`` is
    imported, a subclass of transformers' ``JITCheckpointCallback`` too (HF code counts it with ``isinstance``);
    else ``klass`` itself."""
    if klass is _jit.JITCheckpointCallback and "transformers.trainer_jit_checkpoint" in sys.modules:
        return _jit_checkpoint_twin()
    return TWINS.get(klass, klass)


@functools.cache
def _jit_checkpoint_twin() -> type:
    from transformers.trainer_jit_checkpoint import JITCheckpointCallback as HFJITCheckpointCallback

    class JITCheckpointCallback(_jit.JITCheckpointCallback, HFJITCheckpointCallback):
        """ftrain's :class:`~ftrain.trainer.jit_checkpoint.JITCheckpointCallback`, also transformers'."""

    return JITCheckpointCallback
