"""The stateful shell that speaks Hugging Face's ``Trainer`` API, over the pure core.

This package holds the HF-compatible pieces: ``TrainingArguments`` and its argument parser, the conversion of
arguments into core configs (optimizer, schedule, step arithmetic), callbacks, ``TrainerState`` and the result
types. Nothing in ``ftrain`` outside this package imports it (DESIGN.md rule 1).
"""

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
from ftrain.trainer.trainer import Trainer
from ftrain.trainer.trainer_state import TrainerControl, TrainerState
from ftrain.trainer.utils import EvalPrediction, PredictionOutput, TrainOutput, get_last_checkpoint, set_seed

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
    "TrainOutput",
    "Trainer",
    "TrainerCallback",
    "TrainerControl",
    "TrainerState",
    "TrainingArguments",
    "get_last_checkpoint",
    "set_seed",
]
