"""Shard a :class:`~ftrain.state.TrainState` over a mesh, gather it back, and reduce metrics for logging.

:func:`shard_state` is the one visible place where a run's parallel layout is applied, in order (torchtitan's
``apply_*`` recipe): tensor parallel, then data parallel / FSDP / ZeRO over ``dp_shard``, then mixed precision and
optimizer offload, which the plan carries into the step. The plan is attached to the state's (meta-device)
skeleton, a static field, so the same :func:`ftrain.make_train_step` runs on 1 process and on N. The Trainer and
the ``ftrain train`` command lay out their states with it too: each only decides the config and builds the mesh.

Example (one process: a world of one, every layout trivial)::

    mesh = build_mesh(ParallelConfig())
    state = shard_state(TrainState.create(model, optim.adamw(1e-3), key=0), mesh, ParallelConfig())
    state, metrics = make_train_step(loss_fn)(state, batch)
    plain = gather_state(state)   # full tensors on every rank, for export
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from ftrain import tree as _tree
from ftrain.distributed.config import ParallelConfig
from ftrain.distributed.plan import ShardingPlan, apply_tp, distribute, make_plan, shard_opt_state
from ftrain.state import TrainState

__all__ = ["PLAN_ATTR", "gather_state", "get_plan", "reduce_metrics", "shard_state"]

PLAN_ATTR = "_ftrain_plan"
_GLOBAL_METRICS = frozenset({"loss", "loss_sum", "count", "grad_norm", "learning_rate"})


def get_plan(state: TrainState) -> ShardingPlan | None:
    """The :class:`ShardingPlan` a sharded state carries (``None`` for a plain state)."""
    return getattr(state.skeleton, PLAN_ATTR, None)


def shard_state(
    state: TrainState,
    mesh: DeviceMesh,
    config: ParallelConfig,
    *,
    tp_plan: Mapping[str, str] | None = None,
) -> TrainState:
    """``state`` with DTensor leaves laid out by ``config`` on ``mesh``, and the plan the step follows.

    Every rank must pass the same (full) state, e.g. built from the same seed. Params take their storage layout,
    per-parameter optimizer leaves the optimizer layout; buffers, ``step``, ``key`` and scalar optimizer leaves
    stay plain tensors.

    Args:
        state: a plain state (not sharded yet) from :meth:`TrainState.create`.
        mesh: from :func:`build_mesh` (dims :data:`MESH_DIMS`).
        config: the layout; ``shard_level``, dtypes and ``offload_optimizer`` as in :class:`ParallelConfig`.
        tp_plan: ``{"module.path.regex": "colwise" | "rowwise"}`` for tensor parallel (needs ``config.tp > 1``).

    Returns:
        The sharded state; its skeleton is a shallow copy carrying the plan.

    Raises:
        ValueError: the state is sharded already, or the mesh / tp plan does not fit (see :func:`make_plan`).
    """
    if get_plan(state) is not None or any(isinstance(x, DTensor) for x in _tree.tree_leaves(state.params)):
        raise ValueError("shard_state: this state is sharded already; pass the plain state (gather_state undoes it)")
    plan = make_plan(state.params, state.skeleton, mesh, config, tp_plan)
    # 1. tensor parallel and 2. dp_shard / ZeRO: both are placements in each leaf's layout.
    params = {k: distribute(v, plan.mesh, plan.layouts[k].storage) for k, v in state.params.items()}
    # 3. optimizer state mirrors the optimizer layout (on the CPU mesh when offloaded).
    opt_state = shard_opt_state(state.opt_state, state.params, plan)
    buffers = {k: v.to(mesh.device_type) for k, v in state.buffers.items()}
    # 4. tensor-parallel compute: the planned Linear layers run on their shards (hooks on a copy of the skeleton).
    # 5. mixed precision and offload live in the plan, which the step finds on the skeleton.
    plan.base_skeleton = state.skeleton
    skeleton = apply_tp(state.skeleton, plan)
    skeleton = copy.copy(skeleton) if skeleton is state.skeleton else skeleton
    object.__setattr__(skeleton, PLAN_ATTR, plan)
    return state.replace(params=params, buffers=buffers, opt_state=opt_state, skeleton=skeleton)


def gather_state(state: TrainState) -> TrainState:
    """A plain state with full tensors on every rank (a collective: every rank must call it), for export, HF
    ``save_pretrained`` or a one-process restart. The skeleton loses its plan."""

    def full(x: Any) -> Any:
        return x.full_tensor() if isinstance(x, DTensor) else x

    plan = get_plan(state)
    skeleton = state.skeleton if plan is None else plan.base_skeleton
    return state.replace(
        params=_tree.tree_map(full, state.params),
        opt_state=_tree.tree_map(full, state.opt_state),
        skeleton=skeleton,
    )


def reduce_metrics(metrics: Mapping[str, torch.Tensor], state: TrainState) -> dict[str, torch.Tensor]:
    """Metrics for logging: the loss function's auxiliary sums summed over data-parallel ranks. ``loss``,
    ``loss_sum``, ``count``, ``grad_norm`` and ``learning_rate`` are global already and pass through (call on
    every rank: it is a collective)."""
    import torch.distributed._functional_collectives as funcol

    plan = get_plan(state)
    if plan is None:
        return dict(metrics)
    out = {}
    for k, v in metrics.items():
        if k not in _GLOBAL_METRICS:
            for dim in plan.data_dims:
                v = funcol.all_reduce(v, "sum", (plan.mesh, dim))
            v = funcol.wait_tensor(v) if hasattr(funcol, "wait_tensor") else v
        out[k] = v
    return out
