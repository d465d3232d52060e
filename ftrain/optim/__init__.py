"""Optax-shaped gradient transformations: ``init(params) -> state``, ``update(updates, state, params) ->
(updates, state)``, pure. Every optimizer is a ``chain`` of small transforms.

Example:
    >>> import torch
    >>> from ftrain import optim
    >>> tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3, weight_decay=0.01))
    >>> params = {"w": torch.ones(3)}
    >>> updates, state = tx.update({"w": torch.full((3,), 0.5)}, tx.init(params), params)
    >>> new_params = optim.apply_updates(params, updates)
"""

from ftrain.optim.alias import *  # noqa: F403
from ftrain.optim.base import *  # noqa: F403
from ftrain.optim.combine import *  # noqa: F403
from ftrain.optim.factorized import *  # noqa: F403
from ftrain.optim.fused import *  # noqa: F403
from ftrain.optim.masks import *  # noqa: F403
from ftrain.optim.named import *  # noqa: F403
from ftrain.optim.transform import *  # noqa: F403
from ftrain.optim.update import *  # noqa: F403
from ftrain.optim.wrappers import *  # noqa: F403
