"""``Seq2SeqTrainer`` and ``Seq2SeqTrainingArguments``: evaluation by generation, as transformers' seq2seq pair.

:class:`Seq2SeqTrainingArguments` adds transformers' five fields to :class:`~ftrain.trainer.args.TrainingArguments`
and checks them in the same validation pass. What happens to each is recorded in :data:`SEQ2SEQ_DISPOSITIONS` (the
seq2seq part of :data:`ftrain.trainer.plan.DISPOSITIONS`):

- ``predict_with_generate``: ``evaluate`` / ``predict`` generate with the model (its current weights, in eval mode)
  and report the generated ids as predictions, padded to the length transformers pads them to;
- ``generation_max_length`` / ``generation_num_beams``: ``max_length`` / ``num_beams`` of that generation, unless
  the call passes its own (``evaluate(max_length=..., num_beams=..., **gen_kwargs)``);
- ``generation_config``: a ``GenerationConfig`` (or a path / hub id / dict of one), validated and set on the model
  when the trainer is built;
- ``sortish_sampler``: transformers documents it (length-sorted batches with some randomness) but 5.x no longer
  reads it; ftrain honours it as ``train_sampling_strategy="group_by_length"``, which samples that way.

The evaluation loss is the Trainer's (``(sum, count)`` over every label token of the set, see
:mod:`ftrain.trainer.evaluation`); generation only changes what ``compute_metrics`` receives.

Example:
    >>> args = Seq2SeqTrainingArguments("out", predict_with_generate=True, generation_num_beams=2)
    >>> generation_policy(args)
    GenerationPolicy(predict_with_generate=True, max_length=None, num_beams=2)
"""

from __future__ import annotations

import copy
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftrain.losses import mean
from ftrain.trainer.args import TrainingArguments, _arg
from ftrain.trainer.evaluation import Evaluator
from ftrain.trainer.plan import Disposition
from ftrain.trainer.trainer import Trainer, _as_ftrain_args
from ftrain.trainer.utils import PredictionOutput

__all__ = [
    "SEQ2SEQ_DISPOSITIONS",
    "GenerationPolicy",
    "Seq2SeqTrainer",
    "Seq2SeqTrainingArguments",
    "generation_policy",
]


# ----------------------------------------------------------------------------------------------------------
# The arguments.


def _is_generation_config(value: Any) -> bool:
    """Whether ``value`` is a ``transformers.GenerationConfig`` (transformers is imported only if it may be one)."""
    if isinstance(value, (str, os.PathLike, dict, type(None))):
        return False
    from transformers import GenerationConfig

    return isinstance(value, GenerationConfig)


def _check_positive_int(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
        raise ValueError(f"Seq2SeqTrainingArguments: {name} must be an int >= 1 or None, got {value!r}.")


@dataclass
class Seq2SeqTrainingArguments(TrainingArguments):
    """transformers' ``Seq2SeqTrainingArguments``: :class:`TrainingArguments` plus the generation fields, checked
    in the same validation pass (the constructor and the fluent setters).

    Raises:
        ValueError: an invalid generation field, or ``sortish_sampler=True`` with a ``train_sampling_strategy``
            other than ``"random"`` (the default) or ``"group_by_length"``.
    """

    sortish_sampler: bool = _arg(False, "Sample training batches of similar lengths (as group_by_length).")
    predict_with_generate: bool = _arg(False, "Evaluate and predict by generating (for ROUGE, BLEU...).")
    generation_max_length: int | None = _arg(None, "max_length of generation in evaluate/predict.")
    generation_num_beams: int | None = _arg(None, "num_beams of generation in evaluate/predict.")
    generation_config: str | Path | dict | None = _arg(
        None, "GenerationConfig (or its folder, file, hub id or dict) set on the model for evaluate/predict."
    )

    def _derive_defaults(self) -> None:
        super()._derive_defaults()
        if self.sortish_sampler and self.train_sampling_strategy == "random":
            self.train_sampling_strategy = "group_by_length"

    def _validate(self) -> None:
        super()._validate()
        for name in ("sortish_sampler", "predict_with_generate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"Seq2SeqTrainingArguments: {name} must be True or False, got {getattr(self, name)!r}."
                )
        _check_positive_int("generation_max_length", self.generation_max_length)
        _check_positive_int("generation_num_beams", self.generation_num_beams)
        if self.sortish_sampler and self.train_sampling_strategy != "group_by_length":
            raise ValueError(
                "Seq2SeqTrainingArguments: sortish_sampler=True samples batches of similar lengths "
                f"(train_sampling_strategy='group_by_length'), which train_sampling_strategy="
                f"{self.train_sampling_strategy!r} contradicts; set only one of them."
            )
        value = self.generation_config
        if not isinstance(value, (str, os.PathLike, dict, type(None))) and not _is_generation_config(value):
            raise ValueError(
                "Seq2SeqTrainingArguments: generation_config must be a transformers.GenerationConfig, a path to its "
                f"folder or JSON file, a hub model id, or a dict of its fields; got {type(value).__name__}."
            )

    def to_dict(self) -> dict[str, Any]:
        """:meth:`TrainingArguments.to_dict`, with ``generation_config`` as a dict (a ``GenerationConfig``) or a
        string (a path), as transformers writes it."""
        out = super().to_dict()
        value = self.generation_config
        if _is_generation_config(value):
            out["generation_config"] = value.to_dict()
        elif isinstance(value, os.PathLike):
            out["generation_config"] = os.fspath(value)
        return out


@dataclass(frozen=True)
class GenerationPolicy:
    """How ``evaluate`` / ``predict`` generate (decided from the arguments, read by :class:`Seq2SeqEvaluator`).

    Attributes:
        predict_with_generate: predictions are generated ids, not logits.
        max_length, num_beams: ``generation_max_length`` / ``generation_num_beams``: the ``max_length`` /
            ``num_beams`` given to ``generate`` when the call gives none (``None``: the generation config's).
    """

    predict_with_generate: bool
    max_length: int | None
    num_beams: int | None


def generation_policy(args: Seq2SeqTrainingArguments) -> GenerationPolicy:
    """The :class:`GenerationPolicy` of ``args``."""
    return GenerationPolicy(
        predict_with_generate=args.predict_with_generate,
        max_length=args.generation_max_length,
        num_beams=args.generation_num_beams,
    )


#: The fields ``Seq2SeqTrainingArguments`` adds -> their :class:`~ftrain.trainer.plan.Disposition`; ``where`` names
#: attributes of the :class:`Seq2SeqTrainer` (``plan...`` is its Trainer plan).
SEQ2SEQ_DISPOSITIONS: dict[str, Disposition] = {
    "sortish_sampler": Disposition(
        "honoured",
        where=("plan.data.sampling_strategy",),
        why="as train_sampling_strategy='group_by_length' (transformers 5 documents it but no longer reads it)",
    ),
    "predict_with_generate": Disposition("honoured", where=("generation_plan.predict_with_generate",)),
    "generation_max_length": Disposition("honoured", where=("generation_plan.max_length",)),
    "generation_num_beams": Disposition("honoured", where=("generation_plan.num_beams",)),
    "generation_config": Disposition(
        "honoured", where=("model.generation_config",), why="loaded and set on the model when the trainer is built"
    ),
}


def _as_seq2seq_args(args: Any) -> Seq2SeqTrainingArguments:
    """``args`` as ftrain's :class:`Seq2SeqTrainingArguments` (transformers' are converted field by field).

    Raises:
        TypeError: ftrain's plain ``TrainingArguments``, which have no generation fields.
    """
    if args is None:
        return Seq2SeqTrainingArguments(output_dir="tmp_trainer")
    if isinstance(args, TrainingArguments) and not isinstance(args, Seq2SeqTrainingArguments):
        raise TypeError(
            "Seq2SeqTrainer: args is a TrainingArguments, which has none of the generation fields "
            "(predict_with_generate, generation_max_length, ...) the Seq2SeqTrainer reads; build "
            "ftrain.Seq2SeqTrainingArguments(...) with the same keywords instead."
        )
    return _as_ftrain_args(args, Seq2SeqTrainingArguments)


# ----------------------------------------------------------------------------------------------------------
# Evaluation by generation.


def _padded_length(width: int, config: Any) -> int | None:
    """The length transformers pads a ``width``-wide block of generated ids (or labels) to: the generation config's
    ``max_length``, or ``max_new_tokens + 1`` when that is longer than the block; ``None``: no padding."""
    if width < config.max_length:
        return config.max_length
    if config.max_new_tokens is not None and width < config.max_new_tokens + 1:
        return config.max_new_tokens + 1
    return None


class Seq2SeqEvaluator(Evaluator):
    """The Trainer's :class:`~ftrain.trainer.evaluation.Evaluator`, generating when ``predict_with_generate`` asks:
    a batch's loss is the Trainer's, its predictions the generated ids (padded by the trainer's
    ``_pad_tensors_to_max_len``), its labels ``inputs["labels"]`` padded the same way."""

    def _loss_repeats(self, rows: int) -> int:
        """``eval_batch_size`` for every batch, the last partial one included: transformers' ``Seq2SeqTrainer``
        gathers the repeated losses with ``accelerator.gather`` (not ``gather_for_metrics``), so its ``eval_loss``
        weights each batch alike."""
        return self.trainer.plan.data.eval_batch_size

    def _prediction_parts(
        self,
        model: Any,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str],
        gen_kwargs: dict[str, Any] | None = None,
    ) -> tuple[Any, Any, Any]:
        trainer = self.trainer
        if not trainer.generation_plan.predict_with_generate or prediction_loss_only:
            return super()._prediction_parts(model, inputs, prediction_loss_only, ignore_keys)
        inputs = trainer._prepare_inputs(inputs)  # generate from args.device (and an override's changes), as HF
        tokens = self._generate(model, inputs, dict(gen_kwargs) if gen_kwargs else dict(trainer._gen_kwargs))
        config = _filled_generation_config(model)
        loss = super()._prediction_parts(model, inputs, True, ignore_keys, prepared=True)[0]
        if trainer.plan.eval.prediction_loss_only:
            return loss, None, None
        labels = inputs.get("labels")
        return loss, self._padded(tokens, config), None if labels is None else self._padded(labels, config)

    def _generate(self, model: Any, inputs: dict[str, Any], gen_kwargs: dict[str, Any]) -> torch.Tensor:
        """``model.generate`` on the batch, with ``gen_kwargs`` (unset ``num_beams`` / ``max_length`` left to the
        generation config). Decoder inputs made from the labels are dropped, so the model generates from scratch."""
        for name in ("num_beams", "max_length"):
            if gen_kwargs.get(name, 0) is None:
                del gen_kwargs[name]
        labels, decoder_ids = inputs.get("labels"), inputs.get("decoder_input_ids")
        if labels is not None and decoder_ids is not None and labels.shape == decoder_ids.shape:
            inputs = {k: v for k, v in inputs.items() if k not in ("decoder_input_ids", "decoder_attention_mask")}
        return model.generate(**inputs, **gen_kwargs)

    def _padded(self, tensor: torch.Tensor, config: Any) -> torch.Tensor:
        length = _padded_length(tensor.shape[-1], config)
        return tensor if length is None else self.trainer._pad_tensors_to_max_len(tensor, length)

    def prediction_step(
        self,
        model: Any,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
        gen_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor | None, Any, Any]:
        """``(mean loss, generated ids or logits, labels)`` of one batch; ``gen_kwargs`` (when not empty) replace
        those of the ``evaluate`` / ``predict`` call."""
        loss, predictions, labels = self._prediction_parts(
            model, inputs, prediction_loss_only, self._ignore_keys(ignore_keys), gen_kwargs
        )
        return None if loss is None else mean(loss), predictions, labels


def _filled_generation_config(model: Any) -> Any:
    """``model.generation_config`` with transformers' generation defaults filled in where unset, as transformers'
    ``Seq2SeqTrainer`` leaves it after each generation (so later calls, and the saved config, are the same)."""
    config = model.generation_config
    if config._from_model_config:  # transformers stops re-deriving it from the model config after one generation
        config._from_model_config = False
    config.update(**config._get_default_generation_params(), defaults_only=True)
    return config


# ----------------------------------------------------------------------------------------------------------
# The trainer.


class Seq2SeqTrainer(Trainer):
    """transformers' ``Seq2SeqTrainer`` over ftrain's :class:`~ftrain.trainer.Trainer`: with
    ``predict_with_generate``, ``evaluate`` and ``predict`` report generated ids (and take ``generate``'s keyword
    arguments); training is the Trainer's.

    Args:
        model ... preprocess_logits_for_metrics: as :class:`~ftrain.trainer.Trainer` (transformers' order).
        args: ftrain's or transformers' ``Seq2SeqTrainingArguments`` (default
            ``Seq2SeqTrainingArguments(output_dir="tmp_trainer")``).
        optimizer_cls_and_kwargs: as :class:`~ftrain.trainer.Trainer`.

    Raises:
        TypeError: ``args`` is ftrain's plain ``TrainingArguments``.
        ValueError: the Trainer's errors; with ``predict_with_generate``, a model without ``generate`` or without a
            padding id; an invalid ``generation_config``.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: Any = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        model_init: Any = None,
        compute_loss_func: Any = None,
        compute_metrics: Any = None,
        callbacks: list[Any] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        preprocess_logits_for_metrics: Any = None,
        optimizer_cls_and_kwargs: tuple[Any, dict[str, Any]] | None = None,
    ) -> None:
        self._gen_kwargs: dict[str, Any] = {}  # generate's kwargs of the running evaluate / predict call
        super().__init__(
            model=model,
            args=_as_seq2seq_args(args),
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            model_init=model_init,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        if self.args.generation_config is not None:
            self.model.generation_config = self.load_generation_config(self.args.generation_config)
        if self.generation_plan.predict_with_generate:
            self._check_can_generate()

    def _build_components(self) -> None:
        super()._build_components()
        self._evaluator = Seq2SeqEvaluator(self)

    @property
    def generation_plan(self) -> GenerationPolicy:
        """How ``evaluate`` / ``predict`` generate, from the current ``args``."""
        return generation_policy(self.args)

    def _check_can_generate(self) -> None:
        if not callable(getattr(self.model, "generate", None)):
            raise ValueError(
                f"Seq2SeqTrainer: predict_with_generate=True needs a model with a generate() method; "
                f"{type(self.model).__name__} has none. Use a transformers generation model, or set "
                "predict_with_generate=False."
            )
        self._pad_token_id()

    @staticmethod
    def load_generation_config(gen_config_arg: Any) -> Any:
        """The ``GenerationConfig`` that ``generation_config`` names: a copy of a ``GenerationConfig``, one built
        from a dict, or one loaded from a folder, a JSON file or a hub model id; validated strictly (as transformers:
        saving it at the end of training would fail otherwise).

        Raises:
            ValueError: a configuration that does not validate, with transformers' reasons.
        """
        from transformers import GenerationConfig

        if isinstance(gen_config_arg, GenerationConfig):
            config = copy.deepcopy(gen_config_arg)
        elif isinstance(gen_config_arg, dict):
            config = GenerationConfig.from_dict(gen_config_arg)
        else:
            path = Path(gen_config_arg)
            if path.is_file():
                config = GenerationConfig.from_pretrained(path.parent, path.name)
            else:  # a folder, or a model id on the hub
                config = GenerationConfig.from_pretrained(path if path.is_dir() else str(gen_config_arg))
        try:
            config.validate(strict=True)
        except ValueError as e:
            raise ValueError(f"Seq2SeqTrainer: generation_config is not valid: {e}\nFix these to train.") from e
        return config

    def _generation_kwargs(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        """``gen_kwargs`` of an ``evaluate`` / ``predict`` call, completed with ``generation_max_length`` (unless
        the call gives ``max_length`` or ``max_new_tokens``) and ``generation_num_beams``."""
        policy, kwargs = self.generation_plan, dict(gen_kwargs)
        if kwargs.get("max_length") is None and kwargs.get("max_new_tokens") is None and policy.max_length is not None:
            kwargs["max_length"] = policy.max_length
        if kwargs.get("num_beams") is None and policy.num_beams is not None:
            kwargs["num_beams"] = policy.num_beams
        return kwargs

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
        **gen_kwargs: Any,
    ) -> dict[str, float]:
        """:meth:`Trainer.evaluate`; with ``predict_with_generate`` the predictions are generated with
        ``gen_kwargs`` (``max_length``, ``num_beams``, ``max_new_tokens``... of ``generate``)."""
        self._gen_kwargs = self._generation_kwargs(gen_kwargs)
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def predict(
        self,
        test_dataset: Any,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "test",
        **gen_kwargs: Any,
    ) -> PredictionOutput:
        """:meth:`Trainer.predict`; with ``predict_with_generate`` the predictions are generated ids (padded with
        the padding id to the generation config's ``max_length``), generated with ``gen_kwargs``."""
        self._gen_kwargs = self._generation_kwargs(gen_kwargs)
        return super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def prediction_step(
        self,
        model: Any,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
        **gen_kwargs: Any,
    ) -> tuple[torch.Tensor | None, Any, Any]:
        """``(loss, generated ids, labels)`` of one batch with ``predict_with_generate`` (else the Trainer's
        ``(loss, logits, labels)``); ``gen_kwargs`` default to those of the ``evaluate`` / ``predict`` call."""
        return self._evaluator.prediction_step(model, inputs, prediction_loss_only, ignore_keys, gen_kwargs)

    def _pad_token_id(self) -> int:
        """The id generated ids and labels are padded with: the processing class's padding id (its end-of-sequence
        id when it has none), else the model config's ``pad_token_id``.

        Raises:
            ValueError: no such id.
        """
        pc = self.processing_class
        if pc is not None and hasattr(pc, "pad_token_id"):
            pad = pc.pad_token_id if pc.pad_token_id is not None else getattr(pc, "eos_token_id", None)
        else:
            pad = getattr(getattr(self.model, "config", None), "pad_token_id", None)
        if pad is None:
            raise ValueError(
                "Seq2SeqTrainer: predict_with_generate pads generated ids and labels, and finds no padding id: set "
                "pad_token_id in the model's config (or give a processing_class with a pad or eos token)."
            )
        return pad

    def _pad_tensors_to_max_len(self, tensor: torch.Tensor, max_length: int) -> torch.Tensor:
        """``tensor`` (rows × length) right-padded with the padding id to ``max_length`` columns."""
        padded = torch.full(
            (tensor.shape[0], max_length), self._pad_token_id(), dtype=tensor.dtype, device=tensor.device
        )
        padded[:, : tensor.shape[-1]] = tensor
        return padded
