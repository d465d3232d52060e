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

from transformers import trainer_callback as _hf

from ftrain.trainer import callbacks as _ftrain

__all__ = ["TWINS", "DefaultFlowCallback", "PrinterCallback", "ProgressCallback"]


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
