"""``make_train_step`` and ``make_eval_step``: pure step functions built from a loss function.

A loss function takes the model bound to the current tensors and one microbatch, and returns a
:class:`ftrain.losses.Loss` — ``(sum, count)`` — optionally followed by a dict of auxiliary 0-d tensors:

    def loss_fn(model, batch):
        logits = model(batch["input_ids"])
        return losses.cross_entropy(logits, batch["labels"], shift=True)

``train_step(state, batch) -> (state, metrics)`` then differentiates the summed loss of every microbatch with
``torch.autograd.grad``, divides the summed gradients once by the total count (so token weighting is exact however
the batch is split), applies ``state.tx`` and returns a new state. It mutates nothing, makes no host sync, and
returns metrics as 0-d tensors: ``loss``, ``loss_sum``, ``count``, ``grad_norm`` (before any clipping) and
``learning_rate`` (when the optimizer state records one), plus the loss function's auxiliary values summed over
microbatches.

The step is two layers: :meth:`TrainStep.core` is the pure tensor function that :func:`ftrain.jit` compiles;
:meth:`TrainStep.__call__` adds what must happen on the host — the module's train/eval mode and torch's RNG seeded
from ``fold_in(state.key, state.step)`` (DESIGN.md, "RNG under compile").

The losses of transformers models live here too, once: :func:`causal_lm_loss`, :func:`sequence_classification_loss`
and :func:`model_loss`, and :func:`make_loss_fn`, which picks one from the model's class (with label smoothing or a
``compute_loss_func``) and also returns the model's outputs — the Trainer trains and evaluates with it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ftrain import random as _random
from ftrain import tree as _tree
from ftrain.losses import Loss, cross_entropy, mse
from ftrain.module import Bound
from ftrain.optim.base import GradientTransformation
from ftrain.state import Donated, TrainState, mark_donated

__all__ = [
    "EvalStep",
    "LossWithOutputs",
    "TrainStep",
    "causal_lm_loss",
    "loss_item_count",
    "make_eval_step",
    "make_loss_fn",
    "make_train_step",
    "model_kind",
    "model_loss",
    "sequence_classification_loss",
]

Batch = Any
LossFn = Callable[[Bound, Batch], Any]


def _unpack_loss(out: Any, where: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    if isinstance(out, tuple) and len(out) in (2, 3):
        aux = out[2] if len(out) == 3 else {}
        if isinstance(aux, Mapping) and isinstance(out[0], torch.Tensor):
            count = out[1] if isinstance(out[1], torch.Tensor) else torch.tensor(out[1])
            return out[0], count, dict(aux)
    raise TypeError(
        f"{where}: the loss function must return (sum, count) or (sum, count, aux_dict) — e.g. "
        f"ftrain.losses.cross_entropy(logits, labels) — got {type(out).__name__}. Return sums, not means: the step "
        "divides by the total count once per optimizer step."
    )


def _split_microbatches(batch: Batch, accum_steps: int) -> list[Batch]:
    if isinstance(batch, list | tuple) and not _is_tensor_tuple(batch):
        if accum_steps != 1 and len(batch) > accum_steps:
            raise ValueError(f"train_step: got {len(batch)} microbatches but accum_steps={accum_steps}")
        return list(batch)
    if accum_steps == 1:
        return [batch]
    paths, leaves, spec = _tree.tree_flatten_with_path(batch)
    for path, leaf in zip(paths, leaves):
        if isinstance(leaf, torch.Tensor) and (leaf.dim() == 0 or leaf.shape[0] % accum_steps):
            raise ValueError(
                f"train_step: batch{_tree.keystr(path)} has shape {tuple(leaf.shape)}; with accum_steps="
                f"{accum_steps} its first dimension must be divisible by {accum_steps}. Pass a list of "
                "microbatches instead to accumulate uneven ones."
            )
    chunks = [leaf.chunk(accum_steps) if isinstance(leaf, torch.Tensor) else [leaf] * accum_steps for leaf in leaves]
    return [_tree.tree_unflatten(spec, [c[i] for c in chunks]) for i in range(accum_steps)]


def _is_tensor_tuple(batch: Sequence[Any]) -> bool:
    """``(inputs, targets)`` tuples are one batch, not a list of microbatches."""
    return isinstance(batch, tuple) and all(isinstance(x, torch.Tensor) for x in batch)


def _explain_missing_key(err: KeyError, batch: Batch) -> KeyError | None:
    missing = err.args[0] if err.args else None
    mbs = batch if isinstance(batch, list) else [batch]
    if isinstance(missing, str) and all(isinstance(b, Mapping) and missing not in b for b in mbs):
        return KeyError(
            f"the loss function reads batch[{missing!r}], but the batch has only the keys {sorted(mbs[0])}. Add "
            f"{missing!r} to the batch (the data collator builds it), or change the loss function."
        )
    return None


class _OneProcess:
    """The step's distributed hooks on one process: identities. A sharded state's skeleton carries a
    ``ftrain.distributed`` plan with the same methods (gather parameters before the forward, sum the loss totals
    over data-parallel ranks, move parameters and gradients into the optimizer's layout and back), so the step code
    is the same on 1 and N processes (DESIGN.md invariant 4) and this module never imports torch.distributed."""

    @staticmethod
    def grad_leaves(params: dict) -> dict:
        return params

    gather = to_update = from_update = grad_leaves

    @staticmethod
    def reduce_totals(*totals: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return totals

    @staticmethod
    def global_norm(grads: dict) -> torch.Tensor:
        return _tree.tree_global_norm(grads)


def _check_not_donated(state: TrainState) -> None:
    if isinstance(state.params, Donated):
        state.params._fail()


def _write_into(state: TrainState, params: dict, buffers: dict, opt_state: Any, step: torch.Tensor) -> tuple:
    """An eager donated step's results written into ``state``'s own tensors; returns those tensors. Leaves that are
    already the state's own (``update_and_apply(..., donate=True)`` updated them in place) are not copied."""
    from ftrain.optim.fused import _copy_state_into

    with torch.no_grad():
        state.step.copy_(step)
    old = (state.params, state.buffers, state.opt_state)
    return (*_copy_state_into(old, (params, buffers, opt_state)), state.step)


def _can_write_grads(leaves: list[torch.Tensor]) -> bool:
    """Whether the step may sum and divide its gradients in place (no new list of gradients per microbatch and
    per division). Eager steps on plain tensors may; a compiled step is functional anyway (Inductor fuses the
    ops), and DTensor gradients (a sharded state) keep the out-of-place ops."""
    return not torch.compiler.is_compiling() and all(type(x) is torch.Tensor for x in leaves)


def _owned_grads(grads: Sequence[torch.Tensor], keep: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``grads`` as tensors that only this step holds, so that it may write into them; a copy where needed.

    ``torch.autograd.grad`` can return one tensor for several leaves (the gradient through an ``a + b``), a
    stride-0 expansion (the gradient of ``x.sum()``), views of one tensor (the gradient through a ``cat``), or
    even a tensor of the caller's (a custom ``autograd.Function`` may return a saved input). Those are cloned;
    ``keep`` (the step's inputs) are never written. The usual case — fresh, dense gradients — costs no copy.
    """
    seen = {x.untyped_storage().data_ptr() for x in keep}
    owned = []
    for g in grads:
        ptr = g.untyped_storage().data_ptr()
        if ptr in seen or not (g.is_contiguous() or torch._debug_has_internal_overlap(g) == 0):
            g = g.clone()
        else:
            seen.add(ptr)
        owned.append(g)
    return owned


def _add(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if total is None else total + value


def _sum_grads(
    total: list[torch.Tensor] | None, grads: Sequence[torch.Tensor], in_place: bool, keep: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """``total + grads``; the first microbatch's gradients become the total (owned, to be written into)."""
    if total is None:
        return _owned_grads(grads, keep) if in_place else list(grads)
    if in_place:
        torch._foreach_add_(total, grads)
        return total
    return list(torch._foreach_add(total, grads))


def _divide_grads(grads: list[torch.Tensor], denom: torch.Tensor, in_place: bool) -> list[torch.Tensor]:
    if in_place:
        torch._foreach_div_(grads, denom.to(grads[0].dtype))
        return grads
    return list(torch._foreach_div(grads, denom.to(grads[0].dtype)))


def _plan(skeleton: nn.Module) -> Any:
    return getattr(skeleton, "_ftrain_plan", None) or _OneProcess


def _learning_rate(opt_state: Any) -> torch.Tensor | None:
    from ftrain.optim.wrappers import find_hyperparam

    return find_hyperparam(opt_state, "learning_rate")


class TrainStep:
    """``train_step(state, batch) -> (state, metrics)``; see the module docstring. Build with
    :func:`make_train_step`."""

    def __init__(self, loss_fn: LossFn, *, accum_steps: int = 1, donate: bool = False):
        if not callable(loss_fn):
            raise TypeError(f"make_train_step: loss_fn must be callable, got {type(loss_fn).__name__}")
        if not isinstance(accum_steps, int) or accum_steps < 1:
            raise ValueError(f"make_train_step: accum_steps must be an int >= 1, got {accum_steps!r}")
        self.loss_fn = loss_fn
        self.accum_steps = accum_steps
        self.donate = donate
        self.training = True

    def grads(
        self, skeleton: nn.Module, params: dict, buffers: dict, batch: Batch
    ) -> tuple[dict, dict, dict[str, torch.Tensor]]:
        """Gradients of the whole batch, divided once by its total count; ``(grads, new_buffers, metrics)``.

        With one microbatch the count is known before the backward, which then starts from ``1 / count`` (the
        gradient of the mean, as ``loss.backward()`` of a mean loss): no pass over the gradients divides them.
        Several microbatches' gradients are summed — in place in an eager step — and divided once at the end.
        """
        plan = _plan(skeleton)
        names = list(params)
        params = plan.grad_leaves(params)
        leaves = [params[n].detach().requires_grad_() for n in names]
        live = dict(zip(names, leaves))
        # Buffers are cloned so that a module mutating them in place (BatchNorm statistics) changes the new state,
        # never the caller's.
        mutable = getattr(skeleton, "_ftrain_buffer_names", ())
        buffers = {k: v.clone() if k in mutable else v for k, v in buffers.items()}
        model = Bound(skeleton, plan.gather(live), buffers)
        microbatches = _split_microbatches(batch, self.accum_steps)
        in_place = len(microbatches) > 1 and _can_write_grads(leaves)  # only a sum of several is written into
        total_grads = seed = None
        total_sum = total_count = None
        aux_sums: dict[str, torch.Tensor] = {}
        for mb in microbatches:
            with torch.enable_grad():
                loss_sum, count, aux = _unpack_loss(self.loss_fn(model, mb), "train_step")
            total_sum = _add(total_sum, loss_sum.detach())
            total_count = _add(total_count, count.detach())
            for k, v in aux.items():
                aux_sums[k] = _add(aux_sums.get(k), v.detach())
            if len(microbatches) == 1:
                total_sum, total_count = plan.reduce_totals(total_sum, total_count)  # over data ranks
                seed = torch.ones_like(loss_sum) / total_count.clamp_min(1).to(loss_sum.dtype)
            g = torch.autograd.grad(loss_sum, leaves, grad_outputs=seed, allow_unused=True, materialize_grads=True)
            total_grads = _sum_grads(total_grads, g, in_place, keep=(*leaves, *buffers.values()))
        if seed is None:
            total_sum, total_count = plan.reduce_totals(total_sum, total_count)  # once per step, over data ranks
            total_grads = _divide_grads(total_grads, total_count.clamp_min(1), in_place)
        grads = dict(zip(names, total_grads))
        loss = total_sum / total_count.clamp_min(1).to(total_sum.dtype)
        return grads, buffers, {"loss": loss, "loss_sum": total_sum, "count": total_count, **aux_sums}

    def core(
        self,
        skeleton: nn.Module,
        tx: GradientTransformation,
        params: dict,
        buffers: dict,
        opt_state: Any,
        step: torch.Tensor,
        batch: Batch,
    ) -> tuple[dict, dict, Any, torch.Tensor, dict[str, torch.Tensor]]:
        """The pure tensor function: ``(params, buffers, opt_state, step, metrics)`` after one update."""
        grads, new_buffers, metrics = self.grads_and_norm(skeleton, params, buffers, batch)
        # An eager donated step updates in place; a compiled one is donated by ftrain.jit (it copies into the inputs).
        donate = self.donate and not torch.compiler.is_compiling()
        new_params, new_opt_state = self.update(skeleton, tx, grads, params, opt_state, metrics, donate=donate)
        return new_params, new_buffers, new_opt_state, step + 1, metrics

    def grads_and_norm(
        self, skeleton: nn.Module, params: dict, buffers: dict, batch: Batch
    ) -> tuple[dict, dict, dict[str, torch.Tensor]]:
        """:meth:`grads` with the metric ``grad_norm`` added: the part of the step before the optimizer (what
        ``ftrain.jit(step, optimizer="eager")`` compiles)."""
        grads, new_buffers, metrics = self.grads(skeleton, params, buffers, batch)
        metrics["grad_norm"] = _plan(skeleton).global_norm(grads)
        return grads, new_buffers, metrics

    def update(
        self,
        skeleton: nn.Module,
        tx: GradientTransformation,
        grads: dict,
        params: dict,
        opt_state: Any,
        metrics: dict[str, torch.Tensor],
        *,
        donate: bool = False,
    ) -> tuple[dict, Any]:
        """The optimizer part of the step: ``(new_params, new_opt_state)`` from :func:`ftrain.optim.update_and_apply`
        (in place when ``donate``); adds ``learning_rate`` to ``metrics`` when the optimizer state records one."""
        from ftrain.optim.fused import update_and_apply

        plan = _plan(skeleton)
        new_params, new_opt_state = update_and_apply(
            tx,
            plan.to_update(grads),
            opt_state,
            plan.to_update(params),
            donate=donate,
            grad_norm=metrics["grad_norm"],
            donate_grads=True,  # the grads are this step's own: clipping may scale them in place
        )
        lr = _learning_rate(new_opt_state)
        if lr is not None:
            metrics["learning_rate"] = lr
        return plan.from_update(new_params), new_opt_state

    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, torch.Tensor]]:
        return self.run(self.core, state, batch)

    def run(self, core: Callable, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, torch.Tensor]]:
        """Calls ``core`` (this step's, or a compiled one) with the host-side set-up; returns the new state."""
        if not isinstance(state, TrainState):
            raise TypeError(f"train_step: expected a TrainState, got {type(state).__name__}")
        if state.skeleton is None or state.tx is None:
            raise ValueError("train_step: the state needs a skeleton and a tx; build it with TrainState.create")
        if state.skeleton.training != self.training:
            state.skeleton.train(self.training)
        donating = self.donate and core == self.core
        if donating:
            _check_not_donated(state)
            step_before = state.step.detach().clone()  # not int(): that would sync with the device
        try:
            with _random.step_rng(state.key, state.step, state.device):
                params, buffers, opt_state, step, metrics = core(
                    state.skeleton, state.tx, state.params, state.buffers, state.opt_state, state.step, batch
                )
        except KeyError as err:
            clear = _explain_missing_key(err, batch)
            if clear is None:
                raise
            raise clear from err
        if donating:
            params, buffers, opt_state, step = _write_into(state, params, buffers, opt_state, step)
        new = state.replace(step=step, params=params, buffers=buffers, opt_state=opt_state)
        if donating:
            mark_donated(state, step_before)
        return new, metrics


class EvalStep(TrainStep):
    """``eval_step(state, batch) -> metrics``: the loss in eval mode, no gradients, state unchanged."""

    def __init__(self, loss_fn: LossFn):
        super().__init__(loss_fn)
        self.training = False

    def core(self, skeleton, tx, params, buffers, opt_state, step, batch):
        plan = _plan(skeleton)
        with torch.no_grad():
            model = Bound(skeleton, plan.gather(params), buffers)
            loss_sum, count, aux = _unpack_loss(self.loss_fn(model, batch), "eval_step")
            loss_sum, count = plan.reduce_totals(loss_sum, count)
        metrics = {
            "loss": loss_sum / count.clamp_min(1).to(loss_sum.dtype),
            "loss_sum": loss_sum,
            "count": count,
        }
        return params, buffers, opt_state, step, {**metrics, **aux}

    def __call__(self, state: TrainState, batch: Batch) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return self.run(self.core, state, batch)[1]


def make_train_step(loss_fn: LossFn, *, accum_steps: int = 1, donate: bool = False) -> TrainStep:
    """A pure ``train_step(state, batch) -> (state, metrics)``.

    Args:
        loss_fn: ``loss_fn(model, batch) -> (sum, count)`` or ``(sum, count, aux)``; ``model`` is callable like
            the original module.
        accum_steps: split each batch along dim 0 into this many microbatches and accumulate their gradients
            inside the step. A list of microbatches (e.g. uneven ones) is accumulated whatever this is.
        donate: an eager step that writes the next state into the given state's tensors, as ``torch.optim``
            updates in place (peak memory holds one copy of params and optimizer state), and returns them; the
            given state is then dead (any use raises). A state built from a module without ``copy=True`` shares
            its storage, so the module is updated too. To compile a donating step use ``jit(step, donate=True)``
            on a step built without it.

    Example:
        >>> import torch
        >>> from ftrain import TrainState, losses, make_train_step, optim
        >>> state = TrainState.create(torch.nn.Linear(3, 1), optim.sgd(0.1), key=0)
        >>> step = make_train_step(lambda m, b: losses.mse(m(b["x"]), b["y"]), accum_steps=2)
        >>> state, metrics = step(state, {"x": torch.ones(4, 3), "y": torch.zeros(4, 1)})
        >>> int(state.step), sorted(metrics)
        (1, ['count', 'grad_norm', 'learning_rate', 'loss', 'loss_sum'])
    """
    return TrainStep(loss_fn, accum_steps=accum_steps, donate=donate)


def make_eval_step(loss_fn: LossFn) -> EvalStep:
    """``eval_step(state, batch) -> metrics`` (``loss``, ``loss_sum``, ``count`` and aux), in eval mode."""
    return EvalStep(loss_fn)


# ----------------------------------------------------------------------------------------------------------
# Losses of transformers models: computed from the logits with ftrain.losses, which gives (sum, count) and keeps
# the step traceable with fullgraph (transformers' own loss calls a logger dynamo cannot trace). The Trainer's
# default loss (train and eval) is :func:`make_loss_fn`; the three plain loss functions use the same pieces.

LossWithOutputs = Callable[[Any, Mapping[str, Any]], tuple[Loss, Any]]
_LABEL_KEYS = ("labels", "shift_labels")


def model_kind(model: Any) -> str:
    """``"causal_lm"``, ``"sequence_classification"`` or ``"other"``, from the model's class name
    (a multi-label classifier, ``config.problem_type="multi_label_classification"``, is ``"other"``)."""
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal_lm"
    if name.endswith("ForSequenceClassification"):
        problem = getattr(getattr(model, "config", None), "problem_type", None)
        return "other" if problem == "multi_label_classification" else "sequence_classification"
    return "other"


def _logits(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, Mapping):
        return outputs["logits"]
    logits = getattr(outputs, "logits", None)
    if logits is not None:
        return logits
    return outputs[0] if isinstance(outputs, tuple | list) else outputs


def _one(device: torch.device) -> torch.Tensor:
    return torch.ones((), dtype=torch.int64, device=device)


def _forward_without_labels(model: Any, batch: Mapping[str, Any]) -> Any:
    return model(**{k: v for k, v in batch.items() if k not in _LABEL_KEYS})


def _returned_loss(outputs: Any) -> Any:
    """The loss a model returned, as transformers reads it: ``outputs["loss"]`` from a mapping (a ``ModelOutput``
    too), else the first element of a tuple or list (``return_dict=False``, or a custom ``nn.Module`` returning
    ``(loss, logits, ...)``); ``None`` when there is none."""
    if isinstance(outputs, Mapping):
        return outputs.get("loss")
    if isinstance(outputs, tuple | list):
        return outputs[0] if outputs else None
    return getattr(outputs, "loss", None)


def _own_loss(model: Any, batch: Mapping[str, Any]) -> tuple[Loss, Any]:
    """The model's own loss output (see :func:`_returned_loss`) as ``Loss(loss, 1)``, and the outputs."""
    outputs = model(**batch)
    loss = _returned_loss(outputs)
    if loss is None:
        keys = f" (it returned the keys {list(outputs)})" if isinstance(outputs, Mapping) else ""
        raise ValueError(
            f"The model did not return a loss from the inputs{keys}; its batch needs labels (keys: 'labels' or, "
            "with the Trainer, TrainingArguments.label_names), or compute the loss from the logits (a loss "
            "function such as ftrain.step.causal_lm_loss, or the Trainer's compute_loss_func=)."
        )
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        what = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"The model's loss (outputs['loss'], or outputs[0] of a tuple) must be a one-element tensor, got {what}. "
            "A model returning a tuple must put its mean loss first, (loss, logits, ...), as transformers "
            "models do with return_dict=False; reduce a per-example loss with .mean() in forward."
        )
    return Loss(loss.reshape(()), _one(loss.device)), outputs


def _with_loss(outputs: Any, loss: Loss) -> Any:
    """``outputs`` of a forward without labels, shaped as the model returns them with labels: a tuple or list gets
    the mean loss in front, ``(loss, logits, ...)``, so that ``outputs[1:]`` are the predictions whichever way the
    loss was computed (transformers' ``prediction_step`` reads tuples so). Mappings are returned unchanged."""
    if not isinstance(outputs, tuple | list):
        return outputs
    mean = loss.sum / loss.count.clamp_min(1).to(loss.sum.dtype)
    return type(outputs)((mean, *outputs))


def _labelled_loss(kind: str, outputs: Any, batch: Mapping[str, Any], label_smoothing: float = 0.0) -> Loss:
    """The loss of ``kind`` from the outputs' logits and the batch's labels (``shift_labels`` for a causal LM)."""
    logits = _logits(outputs)
    if kind == "causal_lm" and "shift_labels" in batch:
        return cross_entropy(logits, batch["shift_labels"], label_smoothing=label_smoothing)
    labels = batch["labels"]
    if kind == "sequence_classification" and labels.is_floating_point():  # regression
        squeeze = labels.dim() == logits.dim() - 1 or logits.shape[-1] == 1
        return mse(logits.squeeze(-1) if squeeze else logits, labels.reshape(logits.squeeze(-1).shape))
    return cross_entropy(logits, labels, shift=kind == "causal_lm", label_smoothing=label_smoothing)


def causal_lm_loss(model: Bound, batch: Mapping[str, Any]) -> Loss:
    """Next-token cross-entropy for a causal LM: ``labels`` shifted by one (or ``shift_labels`` as given)."""
    return _labelled_loss("causal_lm", _forward_without_labels(model, batch), batch)


def sequence_classification_loss(model: Bound, batch: Mapping[str, Any]) -> Loss:
    """Cross-entropy over classes (integer ``labels``) or MSE (float ``labels``, regression), per example."""
    return _labelled_loss("sequence_classification", _forward_without_labels(model, batch), batch)


def model_loss(model: Bound, batch: Mapping[str, Any]) -> Loss:
    """The model's own ``loss`` output, counted as one item per microbatch (mean of microbatch means)."""
    return _own_loss(model, batch)[0]


def _item_count(labels: torch.Tensor, causal: bool) -> torch.Tensor:
    """transformers 5.x ``num_items_in_batch`` of one microbatch: labels that count (shifted for causal LMs)."""
    if labels.is_floating_point():
        return torch.tensor(labels.shape[0], device=labels.device)
    return ((labels[..., 1:] if causal else labels) != -100).sum()


def _uses_own_loss(kind: str, labels: Any, label_smoothing: float, compute_loss_func: Any) -> bool:
    return labels is None or (kind == "other" and compute_loss_func is None and not label_smoothing)


def make_loss_fn(
    model: Any, *, label_smoothing: float = 0.0, compute_loss_func: Callable[..., Any] | None = None
) -> LossWithOutputs:
    """``fn(model, batch) -> (Loss(sum, count), outputs)``: the loss of a transformers model, chosen by its class.

    - ``*ForCausalLM`` / ``*LMHeadModel``: :func:`causal_lm_loss`, ``count = (labels[..., 1:] != -100).sum()``
      (transformers 5.x ``num_items_in_batch`` semantics, so accumulation is exactly full-batch equivalent);
    - ``*ForSequenceClassification``: :func:`sequence_classification_loss`;
    - anything else, or a batch without ``labels``: :func:`model_loss` (one item per microbatch: the mean of
      microbatch means, transformers' behaviour for models without loss kwargs) — ``outputs["loss"]``, or
      ``outputs[0]`` of a model returning a tuple ``(loss, logits, ...)``, as transformers' ``compute_loss``;
    - ``label_smoothing``: uniform label smoothing in the cross-entropy (``LabelSmoother``'s maths; a model of no
      known kind then gets the cross-entropy of its logits);
    - ``compute_loss_func(outputs, labels, num_items_in_batch=n)``: called with this microbatch's item count ``n``
      and read as a mean over those items, so ``(loss * n, n)`` — exact for transformers-style loss functions.

    Args:
        model: the model (its class name picks the loss; ``config.problem_type`` is read for classifiers).
        label_smoothing: the label-smoothing epsilon (``TrainingArguments.label_smoothing_factor``).
        compute_loss_func: transformers' ``compute_loss_func(outputs, labels, num_items_in_batch=...)``.

    Returns:
        The loss function; wrap it as ``lambda m, b: fn(m, b)[0]`` for :func:`make_train_step` or
        :func:`make_eval_step`. Its outputs are the model's, as it returns them given the labels: where the loss
        was computed from a forward without labels, a tuple output gets the mean loss in front.

    Example:
        >>> import torch
        >>> class Line(torch.nn.Module):  # a custom module returning a tuple, as transformers' test models do
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = torch.nn.Parameter(torch.tensor(2.0))
        ...     def forward(self, x, labels=None):
        ...         y = self.w * x
        ...         return (y,) if labels is None else (torch.nn.functional.mse_loss(y, labels), y)
        >>> loss, outputs = make_loss_fn(Line())(Line(), {"x": torch.ones(3), "labels": torch.zeros(3)})
        >>> float(loss.sum), int(loss.count), outputs[1].tolist()
        (4.0, 1, [2.0, 2.0, 2.0])
    """
    kind = model_kind(model)

    def loss_with_outputs(bound: Any, batch: Mapping[str, Any]) -> tuple[Loss, Any]:
        labels = batch.get("labels")
        if _uses_own_loss(kind, labels, label_smoothing, compute_loss_func):
            return _own_loss(bound, batch)
        outputs = _forward_without_labels(bound, batch)
        if compute_loss_func is not None:
            count = _item_count(labels, kind == "causal_lm")
            mean = compute_loss_func(outputs, labels, num_items_in_batch=count)
            loss = Loss(mean * count.to(mean.dtype), count)
        else:
            loss = _labelled_loss(kind, outputs, batch, label_smoothing)
        return loss, _with_loss(outputs, loss)

    return loss_with_outputs


def loss_item_count(
    model: Any, batch: Mapping[str, Any], *, label_smoothing: float = 0.0, compute_loss_func: Any = None
) -> torch.Tensor:
    """The ``count`` of the ``Loss`` that :func:`make_loss_fn` gives for ``batch``, from the labels alone (the
    items a microbatch contributes to the step's ``(sum, count)`` reduction)."""
    kind = model_kind(model)
    causal = kind == "causal_lm"
    labels = batch.get("labels")
    if _uses_own_loss(kind, labels, label_smoothing, compute_loss_func):
        first = next((v for v in batch.values() if torch.is_tensor(v)), None)
        return _one(first.device if first is not None else torch.device("cpu"))
    if compute_loss_func is not None:
        return _item_count(labels, causal)
    if causal and "shift_labels" in batch:
        return (batch["shift_labels"] != -100).sum()
    if kind == "sequence_classification" and labels.is_floating_point():
        return torch.tensor(labels.numel(), device=labels.device)
    return ((labels[..., 1:] if causal else labels) != -100).sum()
