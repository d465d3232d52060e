"""Placements for every leaf of a :class:`~ftrain.state.TrainState`, and the hooks a train step calls on them.

A parameter has three layouts (tuples of DTensor placements over the mesh dims of size > 1, :func:`active_dims`):

- ``storage``: how it is held between steps (``Shard(0)`` along ``dp_shard`` at ``shard_level=3``, FSDP);
- ``grad``: how its gradient is reduced (``Shard(0)``, a reduce-scatter, from ``shard_level=2``; else an
  all-reduce to ``Replicate``);
- ``update``: how the optimizer state is held and the update computed (``Shard(0)`` along ``dp_shard`` at every
  shard level: ZeRO-1 shards the optimizer state).

``dp_replicate`` and ``cp`` are always ``Replicate`` for parameters; ``tp`` follows the tensor-parallel plan
(colwise: weight and bias ``Shard(0)``; rowwise: weight ``Shard(1)``, bias ``Replicate``). Buffers, ``step`` and
``key`` stay plain tensors (identical on every rank); optimizer leaves shaped like a parameter (Adam's moments)
take its ``update`` layout, the others (counts, learning rates) stay plain.

Inside the step (SimpleFSDP): :meth:`ShardingPlan.gather` redistributes each parameter to ``Replicate`` and takes
the local tensor with ``grad_placements`` ``Partial`` over the data dims, so the forward runs on plain tensors and
backward brings the gradient back to the ``grad`` layout — all-gather forward, reduce-scatter backward.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard

from ftrain import tree as _tree
from ftrain.distributed.config import MESH_DIMS, ParallelConfig

__all__ = ["LeafLayout", "ShardingPlan", "active_dims", "apply_tp", "make_plan", "tp_layouts"]

Placements = tuple[Placement, ...]
_DATA_DIMS = ("dp_replicate", "dp_shard", "cp")


@dataclasses.dataclass(frozen=True)
class LeafLayout:
    """The three layouts of one parameter (see the module docstring)."""

    storage: Placements
    grad: Placements
    update: Placements


def _with(placements: Placements, dims: tuple[str, ...], dim: str, placement: Placement) -> Placements:
    if dim not in dims:  # a mesh dim of size 1: nothing to place along it
        return placements
    out = list(placements)
    out[dims.index(dim)] = placement
    return tuple(out)


def active_dims(mesh: DeviceMesh) -> tuple[str, ...]:
    """The mesh dims of size > 1 (``("dp_shard",)`` on one process): DTensors live on this sub-mesh, because
    DTensor's sharding propagation enumerates placements over every mesh dim (exponential in their number: on a
    4-dim mesh of 1 × 2 × 1 × 1 the first step took 40 s of CPU)."""
    dims = tuple(name for name in MESH_DIMS if mesh[name].size() > 1)
    return dims or ("dp_shard",)


def tp_layouts(skeleton: nn.Module, tp_plan: Mapping[str, str] | None, tp: int) -> dict[str, Placement]:
    """The ``tp`` placement of each parameter a tensor-parallel plan names.

    Args:
        skeleton: the model (any device); module paths are matched with ``re.fullmatch``.
        tp_plan: ``{"module.path.regex": "colwise" | "rowwise"}``; every pattern must match at least one Linear.
        tp: the ``tp`` mesh size; the split dimension must be divisible by it.

    Returns:
        ``{param_name: Shard(0) | Shard(1) | Replicate()}`` for the matched Linear layers' weights and biases.

    Raises:
        ValueError: an unknown style, a pattern matching no module or a non-Linear module, or a size not divisible
            by ``tp`` (the message names the module and the arithmetic).

    Example:
        >>> mlp = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4))
        >>> tp_layouts(mlp, {"0": "colwise", "2": "rowwise"}, 2)
        {'0.weight': Shard(dim=0), '0.bias': Shard(dim=0), '2.weight': Shard(dim=1), '2.bias': Replicate()}
        >>> tp_layouts(mlp, {"0": "colwise"}, 4)
        Traceback (most recent call last):
        ...
        ValueError: tp_plan: '0' is colwise, which splits out_features=6 of nn.Linear '0' over tp=4, but 6 % 4 = 2. Pick a tp size that divides 6, or leave this layer out of the plan.
    """  # noqa: E501
    out: dict[str, Placement] = {}
    for pattern, style in (tp_plan or {}).items():
        if style not in ("colwise", "rowwise"):
            raise ValueError(f"tp_plan[{pattern!r}] = {style!r}; use 'colwise' or 'rowwise'")
        matched = [(n, m) for n, m in skeleton.named_modules() if n and re.fullmatch(pattern, n)]
        if not matched:
            raise ValueError(f"tp_plan: {pattern!r} matches no module of {type(skeleton).__name__}")
        for name, module in matched:
            if not isinstance(module, nn.Linear):
                raise ValueError(
                    f"tp_plan: {pattern!r} matches {name!r}, a {type(module).__name__}; only nn.Linear layers can be "
                    "split column-/row-wise. Narrow the pattern."
                )
            size = module.out_features if style == "colwise" else module.in_features
            what = "out_features" if style == "colwise" else "in_features"
            if size % tp:
                raise ValueError(
                    f"tp_plan: {pattern!r} is {style}, which splits {what}={size} of nn.Linear {name!r} over tp={tp}, "
                    f"but {size} % {tp} = {size % tp}. Pick a tp size that divides {size}, or leave this layer out "
                    "of the plan."
                )
            out[f"{name}.weight"] = Shard(0) if style == "colwise" else Shard(1)
            if module.bias is not None:
                out[f"{name}.bias"] = Shard(0) if style == "colwise" else Replicate()
    return out


def _layout(
    param: torch.Tensor, config: ParallelConfig, tp_placement: Placement | None, dims: tuple[str, ...]
) -> LeafLayout:
    base: Placements = (Replicate(),) * len(dims)
    if tp_placement is not None:
        base = _with(base, dims, "tp", tp_placement)
    if param.dim() == 0 or config.dp_shard == 1:
        return LeafLayout(base, base, base)
    sharded = _with(base, dims, "dp_shard", Shard(0))
    storage = sharded if config.shard_level == 3 else base
    grad = sharded if config.shard_level >= 2 else base
    return LeafLayout(storage, grad, sharded)


class ShardingPlan:
    """The layouts of a state's parameters on a mesh, and the hooks the train step calls.

    Build with :func:`make_plan` (or :func:`ftrain.distributed.shard_state`, which also attaches it to the state's
    skeleton, where :func:`ftrain.make_train_step` finds it).

    Attributes:
        mesh: the sub-mesh of the dims of size > 1 (:func:`active_dims`) that the DTensors live on.
        dims: its dim names; every placement tuple is over these.
        config: the resolved :class:`ParallelConfig`.
        layouts: ``{param_name: LeafLayout}``.
        tp_params: ``{param_name: placement along tp}`` of the tensor-parallel Linear layers.
        tp_mesh: the ``tp`` sub-mesh those layers compute on (``None`` without tensor parallel).
        update_mesh: the mesh the optimizer state lives on (a CPU mesh over the same ranks when
            ``offload_optimizer``).
    """

    def __init__(
        self,
        mesh: DeviceMesh,
        config: ParallelConfig,
        layouts: dict[str, LeafLayout],
        tp_params: Mapping[str, Placement] | None = None,
    ):
        self.dims = active_dims(mesh)
        self.mesh = mesh[self.dims]
        self.tp_params = dict(tp_params or {})
        self.base_skeleton: nn.Module | None = None  # the skeleton before shard_state (gather_state gives it back)
        self.tp_mesh = mesh["tp"] if "tp" in self.dims else None
        self.config = config
        self.layouts = layouts
        # Gradients of the gathered parameters are partial sums over the ranks that saw different tokens; tp ranks
        # saw the same tokens, so their gradients are already whole (Replicate).
        self.data_dims = tuple(i for i, d in enumerate(self.dims) if d in _DATA_DIMS and self.mesh.size(i) > 1)
        self.update_mesh = self.mesh
        if config.offload_optimizer and mesh.device_type != "cpu":
            self.update_mesh = DeviceMesh("cpu", self.mesh.mesh, mesh_dim_names=self.dims)
        self._replicate: Placements = (Replicate(),) * len(self.dims)
        self._grad_partial: Placements = tuple(
            Partial() if i in self.data_dims else Replicate() for i in range(len(self.dims))
        )

    # -- hooks called by ftrain.step ---------------------------------------------------------------------------

    def grad_leaves(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Params in their ``grad`` layout: the tensors the step differentiates (a local slice when the gradient
        is sharded finer than the storage, ZeRO-2)."""
        return {k: _redistribute(v, self.layouts[k].grad) for k, v in params.items()}

    def gather(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full local tensors for the forward (all-gather), cast to ``param_dtype``; backward reduces the
        gradients (in ``reduce_dtype``) into each leaf's layout."""
        cfg = self.config
        out = {}
        for name, p in params.items():
            x = p
            wire = cfg.reduce_dtype or cfg.param_dtype
            if wire is not None and x.is_floating_point():
                x = x.to(wire)
            tp = self.tp_params.get(name)
            if tp is not None:  # gathered over the data dims only; the tp-planned Linear runs on DTensors
                keep = tuple(tp if d == "tp" else Replicate() for d in self.dims)
                grad_as = tuple(tp if d == "tp" else p for d, p in zip(self.dims, self._grad_partial))
                x = x.redistribute(self.mesh, keep).to_local(grad_placements=grad_as)
            elif isinstance(x, DTensor):
                x = x.redistribute(self.mesh, self._replicate).to_local(grad_placements=self._grad_partial)
            if cfg.param_dtype is not None and x.is_floating_point():
                x = x.to(cfg.param_dtype)
            if tp is not None:
                x = DTensor.from_local(x, self.tp_mesh, (tp,), run_check=False)
            out[name] = x
        return out

    def reduce_totals(self, *totals: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Sums 0-d tensors (the loss sum and token count) over the ranks that saw different data."""
        out = []
        for t in totals:
            for dim in self.data_dims:
                t = funcol.all_reduce(t, "sum", (self.mesh, dim))
            out.append(t)
        return tuple(out)

    def global_norm(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """The L2 norm of all gradients together (in float64 for float64 gradients, else float32), summing squares
        over the dims they are sharded on."""
        groups: dict[tuple[int, ...], torch.Tensor] = {}
        for g in grads.values():
            local = g.to_local() if isinstance(g, DTensor) else g
            dims = tuple(i for i, p in enumerate(getattr(g, "placements", ())) if p.is_shard())
            acc = torch.float64 if local.dtype == torch.float64 else torch.float32
            sq = local.to(acc).pow(2).sum()
            groups[dims] = sq if dims not in groups else groups[dims] + sq.to(groups[dims].dtype)
        # Summed in the widest dtype present, as the one-process norm is (float64 gradients give a float64 norm).
        acc = torch.float64 if any(sq.dtype == torch.float64 for sq in groups.values()) else torch.float32
        total = torch.zeros((), dtype=acc)
        for dims, sq in groups.items():
            for dim in dims:
                sq = funcol.all_reduce(sq, "sum", (self.mesh, dim))
            total = total.to(sq.device) + sq.to(acc)
        return total.sqrt()

    def to_update(self, tree: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Params or grads in the optimizer's layout (a local slice when stored replicated; moved to the CPU mesh
        when the optimizer is offloaded)."""
        return {k: _move(_redistribute(v, self.layouts[k].update), self.update_mesh) for k, v in tree.items()}

    def from_update(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Updated params back in their storage layout (an all-gather when stored replicated, ZeRO-1/2)."""
        return {k: _redistribute(_move(v, self.mesh), self.layouts[k].storage) for k, v in params.items()}

    def __repr__(self) -> str:
        return f"ShardingPlan(mesh={tuple(self.mesh.shape)}, {self.config}, {len(self.layouts)} params)"


def _redistribute(x: torch.Tensor, placements: Placements) -> torch.Tensor:
    # No "already there?" test: under torch.compile, comparing placements guards on the identity of the
    # placement objects, which are new after every step (a recompile on step 2). Same placements cost nothing.
    if not isinstance(x, DTensor):
        return x
    return x.redistribute(x.device_mesh, placements)


def _move(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """The same DTensor on ``mesh`` (same ranks, another device type): the local shard is copied across."""
    if not isinstance(x, DTensor) or x.device_mesh is mesh:
        return x
    local = x.to_local().to(mesh.device_type)
    return DTensor.from_local(local, mesh, x.placements, run_check=False, shape=x.shape, stride=x.stride())


def make_plan(
    params: Mapping[str, torch.Tensor],
    skeleton: nn.Module,
    mesh: DeviceMesh,
    config: ParallelConfig,
    tp_plan: Mapping[str, str] | None = None,
) -> ShardingPlan:
    """The layout of each parameter under ``config`` (and ``tp_plan``) on ``mesh``.

    Raises:
        ValueError: the mesh does not have the dims :data:`MESH_DIMS`, or its shape differs from ``config``'s; a
            tp plan without a ``tp`` dimension, or a bad tp plan (see :func:`tp_layouts`).
    """
    if tuple(mesh.mesh_dim_names or ()) != MESH_DIMS:
        raise ValueError(f"make_plan: the mesh's dims are {mesh.mesh_dim_names}; build it with build_mesh(config)")
    config = config.resolve(mesh.size())
    if tuple(mesh.shape) != config.shape:
        raise ValueError(f"make_plan: the mesh has shape {tuple(mesh.shape)} but the config says {config.shape}")
    if tp_plan and config.tp == 1:
        raise ValueError("make_plan: a tp_plan was given but ParallelConfig.tp is 1; set tp > 1 or drop the plan")
    tp = tp_layouts(skeleton, tp_plan, config.tp) if config.tp > 1 else {}
    dims = active_dims(mesh)
    layouts = {name: _layout(p, config, tp.get(name), dims) for name, p in params.items()}
    return ShardingPlan(mesh, config, layouts, {k: v for k, v in tp.items() if k in params})


# Tensor parallel compute (Megatron pairs): a colwise Linear takes the replicated input and leaves its output split
# along the last dim (a local tensor, so whatever runs between the pair sees plain tensors); the rowwise Linear
# takes that split input, and its partial sums are all-reduced. Backward of the colwise input's from_local is the
# all-reduce of the input gradient. The hooks only touch inputs and outputs, never the parameters (DESIGN.md, "FSDP").


def _colwise_in(mesh: DeviceMesh, module: nn.Module, args: tuple) -> tuple:
    return (DTensor.from_local(args[0], mesh, (Replicate(),), run_check=False), *args[1:])


def _colwise_out(module: nn.Module, args: tuple, output: DTensor) -> torch.Tensor:
    return output.to_local()


def _rowwise_in(mesh: DeviceMesh, module: nn.Module, args: tuple) -> tuple:
    return (DTensor.from_local(args[0], mesh, (Shard(-1),), run_check=False), *args[1:])


def _rowwise_out(mesh: DeviceMesh, module: nn.Module, args: tuple, output: DTensor) -> torch.Tensor:
    return output.redistribute(mesh, (Replicate(),)).to_local()


def apply_tp(skeleton: nn.Module, plan: ShardingPlan) -> nn.Module:
    """A copy of ``skeleton`` whose tp-planned Linear layers compute on their shards (input/output hooks); the
    skeleton itself is left as it is. Without a tp plan, ``skeleton`` is returned."""
    if not plan.tp_params:
        return skeleton
    import functools

    skeleton = copy.deepcopy(skeleton)  # meta tensors: costs no memory
    styles = {n.rsplit(".", 1)[0]: p == Shard(0) for n, p in plan.tp_params.items() if n.endswith(".weight")}
    for name, colwise in styles.items():
        module = skeleton.get_submodule(name)
        if colwise:
            module.register_forward_pre_hook(functools.partial(_colwise_in, plan.tp_mesh))
            module.register_forward_hook(_colwise_out)
        else:
            module.register_forward_pre_hook(functools.partial(_rowwise_in, plan.tp_mesh))
            module.register_forward_hook(functools.partial(_rowwise_out, plan.tp_mesh))
    return skeleton


def distribute(x: torch.Tensor, mesh: DeviceMesh, placements: Placements) -> torch.Tensor:
    """``x`` (the same full value on every rank) as a DTensor; each rank keeps its slice, no communication."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(x.detach().to(mesh.device_type), mesh, placements, src_data_rank=None)


def shard_opt_state(opt_state: Any, params: Mapping[str, torch.Tensor], plan: ShardingPlan) -> Any:
    """Optimizer leaves under a parameter's name with its shape get its ``update`` layout; others stay as they
    are (on the CPU when the optimizer is offloaded)."""
    paths, leaves, spec = _tree.tree_flatten_with_path(opt_state)
    out = []
    for path, leaf in zip(paths, leaves):
        name = next((k for k in reversed(path) if isinstance(k, str) and k in plan.layouts), None)
        if isinstance(leaf, torch.Tensor) and name is not None and leaf.shape == params[name].shape:
            leaf = distribute(leaf, plan.update_mesh, plan.layouts[name].update)
        elif isinstance(leaf, torch.Tensor) and plan.config.offload_optimizer:
            leaf = leaf.to("cpu")
        out.append(leaf)
    return _tree.tree_unflatten(spec, out)
