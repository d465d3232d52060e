"""Which parameters get weight decay, by Hugging Face ``Trainer``'s rule.

HF's ``Trainer.get_decay_parameter_names`` excludes a parameter from decay when it sits inside an
``nn.LayerNorm`` (at any depth below the model) or when its lowercased dotted name matches one of the regexes
``bias``, ``layernorm``, ``rmsnorm``, ``(?:^|\\.)norm(?:$|\\.)``, ``_norm(?:$|\\.)``. Everything else decays.
RMSNorm layers of most models are caught by name (``input_layernorm``, ``model.norm``), not by type.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    >>> hf_decay_mask(model)
    {'0.weight': True, '0.bias': False, '1.weight': False, '1.bias': False}
    >>> decay_parameter_names(model)
    ['0.weight']
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

__all__ = ["HF_NO_DECAY_LAYER_TYPES", "HF_NO_DECAY_NAME_PATTERNS", "decay_parameter_names", "hf_decay_mask"]

HF_NO_DECAY_NAME_PATTERNS: tuple[str, ...] = (
    r"bias",
    r"layernorm",
    r"rmsnorm",
    r"(?:^|\.)norm(?:$|\.)",
    r"_norm(?:$|\.)",
)
"""Regexes searched in the lowercased dotted parameter name (HF ``Trainer.get_decay_parameter_names``)."""

HF_NO_DECAY_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm,)
"""Module types whose parameters (at any depth) never decay."""


def _decays(
    model: nn.Module,
    name: str,
    layer_types: tuple[type[nn.Module], ...],
    patterns: Sequence[re.Pattern[str]],
) -> bool:
    if any(p.search(name.lower()) for p in patterns):
        return False
    parts = name.split(".")[:-1]
    # HF tests the *children* it recurses into, so the model itself never counts as a forbidden layer.
    for depth in range(1, len(parts) + 1):
        if isinstance(model.get_submodule(".".join(parts[:depth])), layer_types):
            return False
    return True


def hf_decay_mask(
    model: nn.Module,
    *,
    layer_types: Iterable[type[nn.Module]] = HF_NO_DECAY_LAYER_TYPES,
    name_patterns: Iterable[str] = HF_NO_DECAY_NAME_PATTERNS,
) -> dict[str, bool]:
    """``{name: decays}`` for the trainable parameters of ``model``, keyed and ordered like
    ``model.named_parameters()`` (parameters with ``requires_grad=False`` are left out).

    Pass it as the ``mask`` of ``adamw`` / ``adafactor`` / ``add_decayed_weights`` to decay what HF's
    ``Trainer`` decays (its first param group; the second gets ``weight_decay=0``).

    Args:
        model: the module whose parameters the optimizer sees.
        layer_types: module types whose parameters never decay (HF: ``nn.LayerNorm``).
        name_patterns: regexes; a match anywhere in the lowercased name means no decay (HF's five).

    Returns:
        A dict of Python bools, ``True`` where the parameter decays.
    """
    types = tuple(layer_types)
    patterns = [re.compile(p) for p in name_patterns]
    return {
        name: _decays(model, name, types, patterns) for name, param in model.named_parameters() if param.requires_grad
    }


def decay_parameter_names(
    model: nn.Module,
    *,
    layer_types: Iterable[type[nn.Module]] = HF_NO_DECAY_LAYER_TYPES,
    name_patterns: Iterable[str] = HF_NO_DECAY_NAME_PATTERNS,
) -> list[str]:
    """The names of the parameters that decay, in ``model.named_parameters()`` order: HF's
    ``Trainer.get_decay_parameter_names(model)`` as its optimizer grouping uses it.

    Like HF, frozen parameters are included (the ``Trainer`` drops them when it builds param groups). HF's
    own list differs only in order (it lists a module's children before its direct parameters) and in also
    naming a tied parameter under its second name, which ``named_parameters()`` skips.

    Args:
        model: the module.
        layer_types, name_patterns: as in :func:`hf_decay_mask`.

    Returns:
        The decaying parameter names.
    """
    types = tuple(layer_types)
    patterns = [re.compile(p) for p in name_patterns]
    return [name for name, _ in model.named_parameters() if _decays(model, name, types, patterns)]
