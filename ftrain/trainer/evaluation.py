"""The trainer's evaluation / prediction loop.

**Losses.** The Trainer's default loss, for training and evaluation alike, is the core's
:func:`ftrain.step.make_loss_fn` (re-exported here with :func:`~ftrain.step.loss_item_count` and
:func:`~ftrain.step.model_kind`): ``(sum, count)`` from the model's class, ``label_smoothing_factor`` and
``compute_loss_func`` (DESIGN.md invariant 6). Evaluation calls it on the whole batch; the train step on each
microbatch.

**Evaluation.** :class:`Evaluator` runs the model (weights synced from the train state) in eval mode under
``no_grad`` over a :class:`~ftrain.data.BatchStream`. Each batch's loss and predictions are taken as transformers'
``prediction_step`` takes them: ``outputs["loss"]`` or ``outputs[0]`` of a tuple, and the other outputs (``outputs[1:]``
of a tuple, a mapping's values but ``ignore_keys``) as the predictions. ``{prefix}_loss`` follows
``eval_loss_reduction``: by default (``"batch"``) transformers' number, each batch's mean loss repeated once per
example and averaged (batches weighted by their examples); ``"token"`` gives the exact ``(sum, count)`` mean over
the whole set, token-weighted for causal LMs (the two agree when every example has as many tokens). Logits and
labels are gathered as numpy arrays (dim 1 padded with -100 across batches, as transformers does; or lists of
per-batch arrays with ``eval_do_concat_batches=False``) for ``compute_metrics``; ``include_for_metrics`` adds the
inputs and per-example losses, and ``batch_eval_metrics`` calls ``compute_metrics`` per batch instead
(transformers' semantics). As transformers' ``EvalLoopContainer``, each batch's outputs (losses included) stay where
they were computed, so the loop never waits for the device between batches; they move to the CPU (as numpy) every
``eval_accumulation_steps`` batches, or once at the end when it is ``None``.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ftrain.data import BatchStream
from ftrain.losses import Loss
from ftrain.step import LossWithOutputs, loss_item_count, make_loss_fn, model_kind
from ftrain.trainer.utils import EvalLoopOutput, EvalPrediction, PredictionOutput, denumpify_detensorize, speed_metrics

__all__ = ["Evaluator", "LossWithOutputs", "loss_item_count", "make_loss_fn", "model_kind"]


# ----------------------------------------------------------------------------------------------------------
# Gathering predictions.


def _to_numpy(value: Any) -> Any:
    """Tensors to numpy in their own dtype, as transformers' ``nested_numpify``: only bfloat16, which numpy lacks,
    becomes float32 (a float64 model's predictions stay float64)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    if isinstance(value, tuple | list):
        return type(value)(_to_numpy(v) for v in value)
    return value


def _concat(arrays: list[Any]) -> Any:
    """transformers' ``nested_concat``: along dim 0, dim 1 padded with -100 to the longest."""
    first = arrays[0]
    if isinstance(first, tuple | list):
        return type(first)(_concat([a[i] for a in arrays]) for i in range(len(first)))
    if first.ndim < 2 or all(a.shape[1:] == first.shape[1:] for a in arrays):
        return np.concatenate(arrays, axis=0)
    width = max(a.shape[1] for a in arrays)
    out = np.full((sum(a.shape[0] for a in arrays), width, *first.shape[2:]), -100, dtype=first.dtype)
    row = 0
    for a in arrays:
        out[row : row + a.shape[0], : a.shape[1]] = a
        row += a.shape[0]
    return out


def _prediction_logits(outputs: Any, ignore_keys: list[str], has_loss: bool) -> Any:
    """The predictions in a model's ``outputs``, as transformers' ``prediction_step`` takes them: a mapping's tensors
    but ``ignore_keys`` (and ``loss`` when a loss was computed); a tuple's tensors after its first element (the loss)
    when a loss was computed, else all of them; a bare tensor as it is. A 1-tuple becomes its element."""
    if torch.is_tensor(outputs):
        return outputs
    if isinstance(outputs, Mapping):
        skip = ignore_keys + ["loss"] if has_loss else ignore_keys
        values = tuple(v for k, v in outputs.items() if k not in skip and torch.is_tensor(v))
    else:
        values = tuple(v for v in (outputs[1:] if has_loss else outputs) if torch.is_tensor(v))
    return values[0] if len(values) == 1 else values


def _rows(batch: Mapping[str, Any]) -> int:
    """The number of examples in a batch: the first dimension of its first tensor."""
    return next(v for v in batch.values() if torch.is_tensor(v)).shape[0]


def _can_return_loss(model: Any) -> bool:
    """Whether ``model.forward`` takes ``return_loss`` defaulting to ``True`` (CLIP-like models, which compute a loss
    without labels): transformers' ``can_return_loss``."""
    parameter = inspect.signature(type(model).forward).parameters.get("return_loss")
    return parameter is not None and parameter.default is True


class _Collected:
    """One of the loop's outputs (predictions, labels, inputs or losses), gathered batch by batch (transformers'
    ``EvalLoopContainer``): added tensors stay on their device until :meth:`to_cpu_and_numpy` moves them to the
    CPU as numpy (a host sync); :meth:`result` moves the rest and concatenates the batches along dim 0 (dim 1 padded
    with -100), or, with ``eval_do_concat_batches=False``, returns the list of per-batch arrays; ``None`` when
    nothing was added.

    Attributes:
        parts: the per-batch numpy arrays moved so far.
    """

    def __init__(self, concat: bool) -> None:
        self.concat = concat
        self.parts: list[Any] = []
        self._pending: list[Any] = []

    def add(self, value: Any) -> None:
        if value is not None:
            self._pending.append(value)

    def to_cpu_and_numpy(self) -> None:
        self.parts.extend(_to_numpy(value) for value in self._pending)
        self._pending = []

    def result(self) -> Any:
        self.to_cpu_and_numpy()
        if not self.parts:
            return None
        return _concat(self.parts) if self.concat else self.parts


def _sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    total = value.detach().clone()
    torch.distributed.all_reduce(total)
    return total


def _pad_across_ranks(tensors: Any, device: torch.device) -> Any:
    """``tensors`` with dim 1 padded with -100 to its longest over the ranks (transformers'
    ``pad_across_processes``), so that they can be gathered; a collective per tensor of 2+ dims."""
    if isinstance(tensors, tuple | list):
        return type(tensors)(_pad_across_ranks(t, device) for t in tensors)
    if not isinstance(tensors, torch.Tensor) or tensors.dim() < 2:
        return tensors
    width = torch.tensor(tensors.shape[1], device=device)
    torch.distributed.all_reduce(width, op=torch.distributed.ReduceOp.MAX)
    if int(width) == tensors.shape[1]:
        return tensors
    out = tensors.new_full((tensors.shape[0], int(width), *tensors.shape[2:]), -100)
    out[:, : tensors.shape[1]] = tensors
    return out


def _select_rows(tensors: Any, keep: torch.Tensor) -> Any:
    if isinstance(tensors, tuple | list):
        return type(tensors)(_select_rows(t, keep) for t in tensors)
    if not isinstance(tensors, torch.Tensor):
        return tensors
    return tensors[keep.to(tensors.device)]


def _batches(dataloader: Any) -> Any:
    """The batches of an evaluation loader: a BatchStream's one pass, or what any other loader (a torch
    ``DataLoader`` or a list that an overridden ``get_eval_dataloader`` returns) yields when iterated."""
    return dataloader.iter_from(0) if isinstance(dataloader, BatchStream) else iter(dataloader)


def _with_last(iterable: Any) -> Any:
    """``(item, is_last)`` pairs, looking one item ahead."""
    it = iter(iterable)
    try:
        item = next(it)
    except StopIteration:
        return
    for following in it:
        yield item, False
        item = following
    yield item, True


class Evaluator:
    """The Trainer's evaluation and prediction loop (a component: the Trainer's ``evaluate``, ``predict``,
    ``evaluation_loop``, ``prediction_step`` and ``compute_loss`` delegate here).

    It keeps no state of its own: each call reads the trainer's model, datasets, ``compute_metrics``,
    ``preprocess_logits_for_metrics``, callbacks and ``state``, and calls back through the trainer's methods
    wherever transformers does (``get_eval_dataloader``, ``evaluation_loop``, ``prediction_step`` when overridden,
    ``compute_loss`` when overridden, ``_nested_gather``, ``log``), so a subclass's overrides take part.

    Args:
        trainer: the :class:`~ftrain.trainer.Trainer` it serves.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """The default ``Trainer.compute_loss``: the microbatch's mean loss (``sum / count``, or
        ``sum / num_items_in_batch`` when given), as transformers."""
        loss, outputs = self.trainer._loss_with_outputs(model, inputs)
        denom = loss.count if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
        mean = loss.sum / denom.clamp_min(1).to(loss.sum.dtype)
        return (mean, outputs) if return_outputs else mean

    def _ignore_keys(self, ignore_keys: list[str] | None) -> list[str]:
        if ignore_keys is not None:
            return list(ignore_keys)
        model = self.trainer.model
        if not hasattr(model, "config"):
            return []
        return list(getattr(model.config, "keys_to_ignore_at_inference", ["cache"]))

    def _prediction_parts(
        self,
        model: Any,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str],
        *,
        prepared: bool = False,
    ) -> tuple[Loss | None, Any, Any]:
        """``(Loss(sum, count) or None, logits, labels)`` of one batch, under ``no_grad`` (``prepared``: ``inputs``
        already went through ``trainer._prepare_inputs``).

        As transformers' ``prediction_step``: a loss is computed when the batch has every label of
        ``label_names``, or, without label names, when the model computes one without labels (``return_loss``);
        a custom ``compute_loss`` (a batch mean) then counts once per example."""
        trainer = self.trainer
        names = trainer.label_names
        has_labels = bool(names) and all(inputs.get(k) is not None for k in names)
        return_loss = inputs.get("return_loss")
        if return_loss is None:
            return_loss = _can_return_loss(trainer.model)
        wants_loss = has_labels or (not names and bool(return_loss))
        if not prepared:  # to args.device (and an override's changes), once per batch as transformers
            inputs = trainer._prepare_inputs(inputs)
        labels = None
        if wants_loss:  # without label names, an empty tuple (as transformers)
            labels = tuple(inputs[k].detach() for k in names)
            labels = labels[0] if len(labels) == 1 else labels
        with torch.no_grad(), trainer.compute_loss_context_manager():
            if wants_loss and trainer.overrides("compute_loss"):
                mean, outputs = trainer.compute_loss(model, inputs, return_outputs=True)
                rows = torch.full((), _rows(inputs), dtype=torch.int64, device=mean.device)  # no host-to-device copy
                loss = Loss(mean.detach().mean() * rows, rows)
            elif wants_loss:
                loss, outputs = trainer._loss_with_outputs(model, inputs)
                loss = Loss(loss.sum.detach(), loss.count.detach())
            else:
                loss, outputs = None, model(**inputs)
        if prediction_loss_only:
            return loss, None, None
        return loss, _prediction_logits(outputs, ignore_keys, has_loss=loss is not None), labels

    def prediction_step(
        self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: list[str] | None = None
    ) -> tuple[torch.Tensor | None, Any, Any]:
        """The default ``Trainer.prediction_step``: ``(loss, logits, labels)`` of one batch; ``loss`` is its mean."""
        ignore_keys = self._ignore_keys(ignore_keys)
        loss, logits, labels = self._prediction_parts(model, inputs, prediction_loss_only, ignore_keys)
        mean = None if loss is None else loss.sum / loss.count.clamp_min(1).to(loss.sum.dtype)
        return mean, logits, labels

    def _batch_parts(self, model: Any, batch: dict, loss_only: bool, ignore_keys: list[str]) -> tuple:
        if not self.trainer.overrides("prediction_step"):
            return self._prediction_parts(model, batch, loss_only, ignore_keys)
        mean, logits, labels = self.trainer.prediction_step(model, batch, loss_only, ignore_keys=ignore_keys)
        rows = _rows(batch)
        loss = None if mean is None else Loss(mean.detach() * rows, torch.tensor(rows))  # sample-weighted, as HF
        return loss, logits, labels

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        """The default ``Trainer.evaluation_loop``; see its docstring."""
        trainer, args, plan = self.trainer, self.trainer.args, self.trainer.plan
        loss_only = plan.eval.prediction_loss_only if prediction_loss_only is None else prediction_loss_only
        ignore_keys = self._ignore_keys(ignore_keys)
        model = trainer._model_for_inference()
        batch_metrics = plan.eval.batch_eval_metrics
        keep = not batch_metrics or description == "Prediction"
        main_input = getattr(trainer.model, "main_input_name", "input_ids")
        want_inputs, want_losses = plan.eval.include_inputs, plan.eval.include_loss
        total_sum = total_count = None
        preds, labels, inputs, losses = (_Collected(plan.eval.concat_batches) for _ in range(4))
        metrics: dict[str, Any] | None = None
        num_samples = 0
        distributed = trainer.mesh is not None
        collected = (preds, labels, inputs, losses)
        for step, (batch, is_last) in enumerate(_with_last(_batches(dataloader)), start=1):
            valid = batch.get("_valid")  # False on the rows that pad a short last batch over the ranks
            batch = {k: v for k, v in batch.items() if k != "_valid"}
            rows = _rows(batch)
            loss, logits, batch_labels = self._batch_parts(model, batch, loss_only, ignore_keys)
            batch_losses = None
            if loss is not None:  # padding rows have labels -100: they add nothing to (sum, count)
                total_sum = loss.sum if total_sum is None else total_sum + loss.sum
                total_count = loss.count if total_count is None else total_count + loss.count
                batch_losses = (loss.sum / loss.count.clamp_min(1).to(loss.sum.dtype)).reshape(1)
                batch_losses = batch_losses.repeat(self._loss_repeats(rows))
            if logits is not None and trainer.preprocess_logits_for_metrics is not None:
                logits = trainer.preprocess_logits_for_metrics(logits, batch_labels)
            batch_inputs = trainer._prepare_input(batch.get(main_input)) if want_inputs else None
            if distributed:  # every rank's rows, in the global order, padding rows dropped
                rows, logits, batch_labels, batch_inputs, batch_losses = self._gather_rows(
                    valid, rows, logits, batch_labels, batch_inputs, batch_losses
                )
            num_samples += rows
            losses.add(batch_losses)  # always: the "batch" eval_loss is their mean
            if keep:
                inputs.add(batch_inputs)
                preds.add(logits)
                labels.add(batch_labels)
            trainer.control = trainer.callback_handler.on_prediction_step(args, trainer.state, trainer.control)
            compute_metrics = trainer.compute_metrics
            if batch_metrics and compute_metrics is not None and logits is not None and batch_labels is not None:
                prediction = EvalPrediction(
                    predictions=logits,
                    label_ids=batch_labels,
                    inputs=batch if want_inputs else None,
                    losses=batch_losses if want_losses else None,
                )
                metrics = compute_metrics(prediction, compute_result=is_last)
            if plan.eval.accumulation_steps is not None and step % plan.eval.accumulation_steps == 0:
                for outputs in collected:
                    outputs.to_cpu_and_numpy()
        if distributed and total_sum is not None:  # the exact (sum, count) over every rank's rows
            total_sum, total_count = _sum_over_ranks(total_sum), _sum_over_ranks(total_count)
        all_preds, all_labels, all_inputs = preds.result(), labels.result(), inputs.result()
        all_losses = losses.result()  # every batch's losses moved: losses.parts is complete
        if not batch_metrics:
            metrics = None
            if trainer.compute_metrics is not None and all_preds is not None and all_labels is not None:
                prediction = EvalPrediction(
                    predictions=all_preds,
                    label_ids=all_labels,
                    inputs=all_inputs if want_inputs else None,
                    losses=all_losses if want_losses else None,
                )
                metrics = trainer.compute_metrics(prediction)
        loss = self._eval_loss(losses.parts, total_sum, total_count)
        metrics = _loop_metrics(metrics, loss, metric_key_prefix)
        return EvalLoopOutput(all_preds, all_labels, metrics, num_samples)

    def _loss_repeats(self, rows: int) -> int:
        """How many times a batch's mean loss counts in the ``"batch"`` ``eval_loss``: once per row (transformers'
        ``Trainer`` repeats it ``eval_batch_size`` times and ``gather_for_metrics`` drops the last batch's
        padding)."""
        return rows

    def _eval_loss(self, batch_losses: list[np.ndarray], total_sum: Any, total_count: Any) -> float | None:
        """``{prefix}_loss`` by ``eval_loss_reduction``: ``"batch"``, transformers' number — the mean of every
        example's batch-mean loss (batches weighted by their examples), leaving NaN/inf out under
        ``logging_nan_inf_filter`` as transformers does (unless all are); ``"token"``, the exact ``(sum, count)``
        mean. ``None`` when no batch gave a loss."""
        if self.trainer.plan.eval.loss_reduction == "token":
            return None if total_sum is None else float(total_sum / total_count.clamp_min(1).to(total_sum.dtype))
        if not batch_losses:
            return None
        values = np.concatenate(batch_losses)
        finite = np.isfinite(values)
        if self.trainer.plan.log.nan_inf_filter and finite.any():
            values = values[finite]
        return values.mean().item()

    def _gather_rows(self, valid: Any, rows: int, *tensors: Any) -> tuple[Any, ...]:
        """``(global rows, *tensors)``: each of ``tensors`` (a batch's per-row outputs, or ``None``) from every rank
        (the trainer's ``_nested_gather``, dim 1 padded with -100 to the longest across ranks), without the padding
        rows."""
        mask = torch.ones(rows, dtype=torch.bool) if valid is None else valid.to(torch.bool)
        device = self.trainer.plan.process.device
        gathered = self.trainer._nested_gather(_pad_across_ranks([mask.to(device), *tensors], device))
        keep = gathered[0].cpu()
        return (int(keep.sum()), *(_select_rows(t, keep) for t in gathered[1:]))

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """The default ``Trainer.evaluate``; see its docstring."""
        trainer = self.trainer
        dataset = trainer.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(dataset, dict):
            metrics = {}
            for name, data in dataset.items():
                metrics.update(trainer.evaluate(data, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        stream = trainer.get_eval_dataloader(dataset)
        start = time.time()
        output = trainer.evaluation_loop(
            stream,
            "Evaluation",
            prediction_loss_only=True if trainer.compute_metrics is None else None,
            ignore_keys=ignore_keys,
            metric_key_prefix=metric_key_prefix,
        )
        self._add_speed_metrics(output, metric_key_prefix, start)
        trainer.log(output.metrics)
        trainer.control = trainer.callback_handler.on_evaluate(trainer.args, trainer.state, trainer.control,
                                                               output.metrics)  # fmt: skip
        return output.metrics

    def _add_speed_metrics(self, output: Any, metric_key_prefix: str, start: float) -> None:
        """``{prefix}_runtime``, ``_samples_per_second`` and ``_steps_per_second`` into ``output.metrics``."""
        plan = self.trainer.plan
        batch_size = plan.data.eval_batch_size * plan.process.world_size
        num_steps = math.ceil(output.num_samples / batch_size)
        output.metrics.update(
            speed_metrics(metric_key_prefix, start, num_samples=output.num_samples, num_steps=num_steps)
        )

    def predict(
        self, test_dataset: Any, ignore_keys: list[str] | None = None, metric_key_prefix: str = "test"
    ) -> PredictionOutput:
        """The default ``Trainer.predict``; see its docstring."""
        trainer = self.trainer
        stream = trainer.get_test_dataloader(test_dataset)
        start = time.time()
        output = trainer.evaluation_loop(stream, "Prediction", ignore_keys=ignore_keys,
                                         metric_key_prefix=metric_key_prefix)  # fmt: skip
        self._add_speed_metrics(output, metric_key_prefix, start)
        trainer.control = trainer.callback_handler.on_predict(trainer.args, trainer.state, trainer.control,
                                                              output.metrics)  # fmt: skip
        return PredictionOutput(predictions=output.predictions, label_ids=output.label_ids, metrics=output.metrics)


def _loop_metrics(metrics: Any, loss: float | None, prefix: str) -> dict:
    """``compute_metrics``' results as numbers, with ``{prefix}_loss`` (when there is one), every key prefixed."""
    metrics = denumpify_detensorize(dict(metrics or {}))
    if loss is not None:
        metrics[f"{prefix}_loss"] = loss
    return {k if k.startswith(f"{prefix}_") else f"{prefix}_{k}": v for k, v in metrics.items()}
