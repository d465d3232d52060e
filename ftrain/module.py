"""``nn.Module`` -> (skeleton, params, buffers), and calling a skeleton functionally.

The skeleton is a copy of the module on the ``meta`` device: it holds the module's code and configuration but no
storage, so a :class:`~ftrain.state.TrainState` can carry it as a static field at no cost. Tensors come back in
through :func:`torch.func.functional_call`, which also re-ties shared weights (GPT-2's ``lm_head.weight`` is
``transformer.wte.weight``: ``named_parameters`` lists it once, and the call ties it again).

Example:
    >>> import torch
    >>> from ftrain.module import split_module, Bound
    >>> skeleton, params, buffers = split_module(torch.nn.Linear(3, 2))
    >>> skeleton.weight.device.type, sorted(params)
    ('meta', ['bias', 'weight'])
    >>> Bound(skeleton, params, buffers)(torch.ones(1, 3)).shape
    torch.Size([1, 2])
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["Bound", "load_into_module", "materialize", "split_module"]


def _check_not_fsdp2(model: nn.Module) -> None:
    for name, sub in model.named_modules():
        if any(cls.__name__.startswith("FSDPModule") for cls in type(sub).__mro__):
            where = name or "the model"
            raise TypeError(
                f"{where} is wrapped by FSDP2 fully_shard. Its forward hooks replace the parameters that "
                "functional_call passes in, so gradients would silently come back zero. Give ftrain the unwrapped "
                "module and shard with ftrain.distributed placements instead."
            )


def split_module(model: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Splits ``model`` into a meta-device skeleton, its trainable parameters and everything else it holds.

    Returns:
        ``(skeleton, params, buffers)``. ``params`` maps ``named_parameters()`` names of the parameters with
        ``requires_grad=True`` to detached tensors that share storage with the module's. ``buffers`` holds the
        module's buffers (persistent or not) and its frozen parameters (``requires_grad=False``): everything the
        forward needs that the optimizer does not update.

    Raises:
        TypeError: the model is wrapped by FSDP2 ``fully_shard`` (see DESIGN.md, "FSDP").
    """
    _check_not_fsdp2(model)
    params: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    memo: dict[int, Any] = {}
    for name, p in model.named_parameters():
        (params if p.requires_grad else buffers)[name] = p.detach()
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for name, b in model.named_buffers():
        buffers[name] = b
        memo[id(b)] = torch.empty_like(b, device="meta")
    skeleton = copy.deepcopy(model, memo)
    # Names of real buffers (not frozen parameters): the ones a forward may update in place (BatchNorm).
    skeleton._ftrain_buffer_names = frozenset(name for name, _ in model.named_buffers())
    return skeleton, params, buffers


class Bound:
    """A skeleton bound to tensors: calling it runs the module's forward on ``params`` and ``buffers``.

    This is what a loss function receives as ``model`` inside a train step. Attribute access falls through to the
    skeleton (``model.config`` works for transformers models).
    """

    __slots__ = ("skeleton", "params", "buffers")

    def __init__(self, skeleton: nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]):
        self.skeleton = skeleton
        self.params = params
        self.buffers = buffers

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(
            self.skeleton, (self.params, self.buffers), args, kwargs, tie_weights=True, strict=False
        )

    def __getattr__(self, name: str) -> Any:
        if name in Bound.__slots__ or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.skeleton, name)


def materialize(skeleton: nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> nn.Module:
    """A real module with the skeleton's structure and copies of the given tensors; tied weights stay tied."""
    given = {**params, **buffers}
    own = dict(skeleton.named_parameters()) | dict(skeleton.named_buffers())
    _check_names(skeleton, own, given)
    memo: dict[int, Any] = {}
    for name, p in skeleton.named_parameters():
        memo[id(p)] = nn.Parameter(given[name].detach().clone(), requires_grad=p.requires_grad)
    for name, b in skeleton.named_buffers():
        memo[id(b)] = given[name].detach().clone()
    return copy.deepcopy(skeleton, memo)


def _check_names(module: nn.Module, own: dict[str, Any], given: dict[str, Any]) -> None:
    unknown = sorted(set(given) - set(own))
    missing = sorted(set(own) - set(given))
    if unknown or missing:
        raise KeyError(
            f"names do not match the module ({type(module).__name__}): not in the module: {unknown[:5]}; not in "
            f"the state: {missing[:5]}. Was the state built from another architecture or config?"
        )


def load_into_module(module: nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> None:
    """Copies ``params`` and ``buffers`` into ``module``'s own tensors, in place (for export and HF models).

    Raises:
        KeyError: a name that ``module`` does not have, or a parameter/buffer of ``module`` missing from both.
    """
    own = dict(module.named_parameters()) | dict(module.named_buffers())
    given = {**params, **buffers}
    _check_names(module, own, given)
    with torch.no_grad():
        for name, value in given.items():
            target = own[name]
            if target.shape != value.shape:
                raise ValueError(
                    f"load_into_module: {name!r} has shape {tuple(value.shape)} in the state and "
                    f"{tuple(target.shape)} in the module."
                )
            target.copy_(value)
