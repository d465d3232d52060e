"""The device mesh of a run, and which data-parallel shard this process reads.

:func:`build_mesh` turns a :class:`~ftrain.distributed.ParallelConfig` into a ``DeviceMesh`` whose dimensions are
named :data:`~ftrain.distributed.MESH_DIMS` (every dimension is present, size 1 included, so a plan can always
name it). It starts the default process group from the ``torchrun`` environment when nobody has yet (gloo on CPU,
nccl on CUDA). :func:`data_parallel_rank` / :func:`data_parallel_size` say which part of each global batch this
process reads, for ``ftrain.data.BatchStream(rank=..., world_size=...)``: ranks that differ only along ``cp`` or
``tp`` read the same rows.

Example:
    >>> mesh_shape_error(ParallelConfig(dp_replicate=2, dp_shard=3), 4)
    'ParallelConfig: dp_replicate × dp_shard × cp × tp = 2 × 3 × 1 × 1 = 6, but the world size is 4. Make the product equal the number of processes (dp_shard=-1 fills in the rest).'
"""  # noqa: E501

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ftrain.distributed.config import MESH_DIMS, ParallelConfig

__all__ = ["build_mesh", "data_parallel_rank", "data_parallel_size", "init_process_group", "mesh_shape_error"]

_DATA_DIMS = ("dp_replicate", "dp_shard")


def mesh_shape_error(config: ParallelConfig, world_size: int) -> str | None:
    """The message :func:`build_mesh` would raise for ``config`` on ``world_size`` processes, or ``None``."""
    try:
        config.resolve(world_size)
    except ValueError as err:
        return str(err)
    return None


def init_process_group(
    device_type: str | None = None, *, backend: str | None = None, timeout: timedelta | None = None
) -> None:
    """Starts the default process group from the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``...) unless one is running: gloo on CPU, nccl on CUDA (plus gloo for CPU tensors, which an
    offloaded optimizer state uses). Without that environment, starts a one-process group.

    Args:
        device_type: ``"cpu"`` or ``"cuda"``; ``None`` picks CUDA when it is available.
        backend: the device's backend instead of the default (``TrainingArguments.ddp_backend``); on CUDA, CPU
            tensors keep gloo.
        timeout: the timeout of the group's collectives (``ddp_timeout``); ``None``: torch.distributed's default.
    """
    if dist.is_initialized():
        return
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    device_backend = backend or ("nccl" if device_type == "cuda" else "gloo")
    if device_type == "cuda" and device_backend != "gloo":
        device_backend = f"cpu:gloo,cuda:{device_backend}"
    options = {} if timeout is None else {"timeout": timeout}
    if "RANK" not in os.environ:  # a single process outside torchrun: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(device_backend, rank=0, world_size=1, **options)
        return
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(device_backend, **options)


def build_mesh(
    config: ParallelConfig,
    device_type: str | None = None,
    *,
    backend: str | None = None,
    timeout: timedelta | None = None,
) -> DeviceMesh:
    """A ``DeviceMesh`` of shape ``config.resolve(world_size).shape`` with dims named :data:`MESH_DIMS`.

    Args:
        config: the layout; ``dp_shard=-1`` takes the processes the other sizes leave.
        device_type: ``"cpu"`` or ``"cuda"``; ``None`` picks CUDA when it is available.
        backend, timeout: for the process group, when this call starts it (:func:`init_process_group`).

    Returns:
        The mesh; ``mesh["dp_shard"]`` etc. are its one-dimensional sub-meshes.

    Raises:
        ValueError: the sizes do not multiply to the world size (the message shows the arithmetic).
    """
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    init_process_group(device_type, backend=backend, timeout=timeout)
    world = dist.get_world_size()
    problem = mesh_shape_error(config, world)
    if problem is not None:
        raise ValueError(problem)
    shape = config.resolve(world).shape
    return init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)


def _check_mesh(mesh: DeviceMesh) -> None:
    if tuple(mesh.mesh_dim_names or ()) != MESH_DIMS:
        raise ValueError(
            f"expected a mesh with dims {MESH_DIMS} (from ftrain.distributed.build_mesh), got {mesh.mesh_dim_names}"
        )


def data_parallel_rank(mesh: DeviceMesh) -> int:
    """This process's index among the ranks that read different data (``dp_replicate`` × ``dp_shard``)."""
    _check_mesh(mesh)
    return mesh.get_local_rank("dp_replicate") * mesh.size(1) + mesh.get_local_rank("dp_shard")


def data_parallel_size(mesh: DeviceMesh) -> int:
    """How many ranks read different data: ``dp_replicate × dp_shard`` (the ``world_size`` of a BatchStream)."""
    _check_mesh(mesh)
    return mesh.size(0) * mesh.size(1)
