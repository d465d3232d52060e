"""ftrain: training for PyTorch in the style of JAX.

Training is a pure function ``train_step(state, batch) -> (state, metrics)`` over an immutable
:class:`TrainState` pytree; :func:`jit` compiles the whole step with ``torch.compile``.
"""

from ftrain import data, losses, metrics, optim, random, schedules, tree
from ftrain.jit import jit
from ftrain.state import TrainState
from ftrain.step import make_eval_step, make_train_step

__version__ = "0.1.0"

__all__ = [
    "TrainState",
    "data",
    "jit",
    "losses",
    "make_eval_step",
    "make_train_step",
    "metrics",
    "optim",
    "random",
    "schedules",
    "tree",
]


#: The Hugging Face ``Trainer`` family, importable as ``from ftrain import X`` (the names of
#: ``ftrain.trainer.__all__``): the shell is imported on first use, so ``import ftrain`` loads neither it nor
#: transformers. transformers' data collators among them come from transformers itself.
_FROM_TRAINER = frozenset(
    (
        "CallbackHandler", "DataCollator", "DataCollatorForLanguageModeling", "DataCollatorForMultipleChoice",
        "DataCollatorForPermutationLanguageModeling", "DataCollatorForSeq2Seq", "DataCollatorForTokenClassification",
        "DataCollatorWithFlattening", "DataCollatorWithPadding", "DefaultDataCollator", "DefaultFlowCallback",
        "EarlyStoppingCallback", "EvalPrediction", "HfArgumentParser", "IntervalStrategy", "OptimizerNames",
        "PredictionOutput", "PrinterCallback", "ProgressCallback", "SaveStrategy", "SchedulerType", "Seq2SeqTrainer",
        "Seq2SeqTrainingArguments", "TrainOutput", "Trainer", "TrainerCallback", "TrainerControl", "TrainerState",
        "TrainingArguments", "default_data_collator", "enable_full_determinism", "get_constant_schedule",
        "get_constant_schedule_with_warmup", "get_cosine_schedule_with_warmup",
        "get_cosine_with_hard_restarts_schedule_with_warmup", "get_cosine_with_min_lr_schedule_with_warmup",
        "get_cosine_with_min_lr_schedule_with_warmup_lr_rate", "get_greedy_schedule", "get_inverse_sqrt_schedule",
        "get_last_checkpoint", "get_linear_schedule_with_warmup", "get_polynomial_decay_schedule_with_warmup",
        "get_reduce_on_plateau_schedule", "get_scheduler", "get_wsd_schedule", "set_seed",
    )
)  # fmt: skip


def __getattr__(name: str):
    """``ftrain.Trainer``, ``ftrain.get_scheduler``, ``ftrain.DataCollatorForSeq2Seq``...: the names of
    ``ftrain.trainer``, imported on first use (the core never imports the shell)."""
    if name in _FROM_TRAINER:
        import importlib

        return getattr(importlib.import_module("ftrain.trainer"), name)
    raise AttributeError(f"module 'ftrain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_FROM_TRAINER})
