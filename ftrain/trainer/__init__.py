"""The stateful shell that speaks Hugging Face's ``Trainer`` API, over the pure core.

This package holds the HF-compatible pieces: ``TrainingArguments`` and its argument parser, the conversion of
arguments into core configs (optimizer, schedule, step arithmetic), callbacks, ``TrainerState`` and the result
types. Nothing in ``ftrain`` outside this package imports it (DESIGN.md rule 1).

Every name a Hugging Face training script imports with the ``Trainer`` is here (and ``from ftrain import X`` gives
it too): ftrain's own ``Trainer``, ``Seq2SeqTrainer``, arguments, callbacks, result types, ``set_seed`` and the
``get_scheduler`` family (:mod:`ftrain.trainer.schedulers`), plus transformers' data collators re-exported as they
are (:data:`FROM_TRANSFORMERS`).
"""

import importlib
from typing import Any

from ftrain.trainer import schedulers as _schedulers
from ftrain.trainer.args import (
    IntervalStrategy,
    OptimizerNames,
    SaveStrategy,
    SchedulerType,
    TrainingArguments,
)
from ftrain.trainer.callbacks import (
    CallbackHandler,
    DefaultFlowCallback,
    EarlyStoppingCallback,
    PrinterCallback,
    ProgressCallback,
    TrainerCallback,
)
from ftrain.trainer.hf_argparser import HfArgumentParser
from ftrain.trainer.schedulers import *  # noqa: F403  (the get_scheduler family: schedulers.__all__)
from ftrain.trainer.seq2seq import Seq2SeqTrainer, Seq2SeqTrainingArguments
from ftrain.trainer.trainer import Trainer
from ftrain.trainer.trainer_state import TrainerControl, TrainerState
from ftrain.trainer.utils import (
    EvalPrediction,
    PredictionOutput,
    TrainOutput,
    enable_full_determinism,
    get_last_checkpoint,
    set_seed,
)

#: transformers' data collators, re-exported as they are (imported from transformers on first use): each is a plain
#: function of a list of rows, which ftrain's Trainer calls like any ``data_collator``. ftrain's own collators are in
#: :mod:`ftrain.data` (``default_collate``, ``make_padding_collator``, ``make_causal_lm_collator``).
FROM_TRANSFORMERS: tuple[str, ...] = (
    "DataCollator",
    "DataCollatorForLanguageModeling",
    "DataCollatorForMultipleChoice",
    "DataCollatorForPermutationLanguageModeling",
    "DataCollatorForSeq2Seq",
    "DataCollatorForTokenClassification",
    "DataCollatorWithFlattening",
    "DataCollatorWithPadding",
    "DefaultDataCollator",
    "default_data_collator",
)

__all__ = [
    "CallbackHandler",
    "DefaultFlowCallback",
    "EarlyStoppingCallback",
    "EvalPrediction",
    "HfArgumentParser",
    "IntervalStrategy",
    "OptimizerNames",
    "PredictionOutput",
    "PrinterCallback",
    "ProgressCallback",
    "SaveStrategy",
    "SchedulerType",
    "Seq2SeqTrainer",
    "Seq2SeqTrainingArguments",
    "TrainOutput",
    "Trainer",
    "TrainerCallback",
    "TrainerControl",
    "TrainerState",
    "TrainingArguments",
    "enable_full_determinism",
    "get_last_checkpoint",
    "set_seed",
    *_schedulers.__all__,
    *FROM_TRANSFORMERS,
]


def __getattr__(name: str) -> Any:
    """transformers' data collators (:data:`FROM_TRANSFORMERS`), imported from transformers on first use.

    Raises:
        ImportError: transformers is not installed (the message says what to use instead).
        AttributeError: any other unknown name.
    """
    if name not in FROM_TRANSFORMERS:
        raise AttributeError(f"module 'ftrain.trainer' has no attribute {name!r}")
    try:
        collators = importlib.import_module("transformers.data.data_collator")
    except ImportError as e:
        raise ImportError(
            f"ftrain.{name} is transformers' {name}, re-exported unchanged, and transformers is not installed "
            f"({e}). Install it (pip install transformers), or use ftrain.data's collators (default_collate, "
            "make_padding_collator, make_causal_lm_collator)."
        ) from e
    return getattr(collators, name)
