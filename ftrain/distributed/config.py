"""How a run is laid out over processes: the mesh shape and what is sharded along it.

A :class:`ParallelConfig` is validated when it is built (each size a positive int, a known shard level and dtype)
and again against the world size when the mesh is made (:meth:`ParallelConfig.resolve`), with the arithmetic in
the message. The mesh axes are, outermost first, ``dp_replicate`` (HSDP's replica groups; plain data parallel when
``dp_shard`` is 1), ``dp_shard`` (FSDP / ZeRO shards), ``cp`` (context parallel: the sequence dimension of the
batch) and ``tp`` (tensor parallel: Linear weights split column- or row-wise).

Example:
    >>> ParallelConfig(dp_shard=-1, tp=2).resolve(8)
    ParallelConfig(dp_replicate=1, dp_shard=4, cp=1, tp=2, shard_level=3, param_dtype=None, reduce_dtype=None, offload_optimizer=False)
    >>> ParallelConfig(dp_replicate=2, dp_shard=2).resolve(8)
    Traceback (most recent call last):
    ...
    ValueError: ParallelConfig: dp_replicate × dp_shard × cp × tp = 2 × 2 × 1 × 1 = 4, but the world size is 8. Make the product equal the number of processes (dp_shard=-1 fills in the rest).
"""  # noqa: E501

from __future__ import annotations

import dataclasses
import math

import torch

__all__ = ["MESH_DIMS", "ParallelConfig"]

MESH_DIMS = ("dp_replicate", "dp_shard", "cp", "tp")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def _dtype(value: torch.dtype | str | None, field: str) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        if isinstance(value, torch.dtype) and not value.is_floating_point:
            raise ValueError(f"ParallelConfig.{field} must be a floating dtype, got {value}")
        return value
    if isinstance(value, str) and value.lower() in _DTYPES:
        return _DTYPES[value.lower()]
    raise ValueError(f"ParallelConfig.{field}={value!r} is not a dtype; use one of {sorted(_DTYPES)} or a torch.dtype")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """The mesh shape and the sharding policy of a run.

    Args:
        dp_replicate: replica groups (data parallel across them; with ``dp_shard > 1`` this is HSDP).
        dp_shard: shards of the state within a replica group; ``-1`` takes whatever the world size leaves.
        cp: context-parallel ranks; the batch's sequence dimension is split across them.
        tp: tensor-parallel ranks; Linear layers are split column-/row-wise where the model allows.
        shard_level: what ``dp_shard`` shards (the ZeRO stages): 1 the optimizer state, 2 the optimizer state and
            the gradients, 3 (FSDP) those and the parameters.
        param_dtype: compute dtype of gathered parameters (mixed precision); ``None`` keeps the stored dtype.
        reduce_dtype: dtype gradients are reduced in; ``None`` keeps the gradient's dtype.
        offload_optimizer: keep the (sharded) optimizer state on the CPU (ZeRO-offload).
    """

    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1
    shard_level: int = 3
    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    offload_optimizer: bool = False

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "cp", "tp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ParallelConfig.{name} must be an int >= 1, got {value!r}")
        if (
            not isinstance(self.dp_shard, int)
            or isinstance(self.dp_shard, bool)
            or not (self.dp_shard == -1 or self.dp_shard >= 1)
        ):
            raise ValueError(f"ParallelConfig.dp_shard must be an int >= 1 or -1 (the rest), got {self.dp_shard!r}")
        if self.shard_level not in (1, 2, 3):
            raise ValueError(
                f"ParallelConfig.shard_level must be 1 (optimizer state), 2 (+ gradients) or 3 (+ parameters), "
                f"got {self.shard_level!r}"
            )
        object.__setattr__(self, "param_dtype", _dtype(self.param_dtype, "param_dtype"))
        object.__setattr__(self, "reduce_dtype", _dtype(self.reduce_dtype, "reduce_dtype"))
        if not isinstance(self.offload_optimizer, bool):
            raise ValueError(f"ParallelConfig.offload_optimizer must be a bool, got {self.offload_optimizer!r}")

    def resolve(self, world_size: int) -> ParallelConfig:
        """This config with ``dp_shard=-1`` filled in; raises when the sizes do not multiply to ``world_size``."""
        others = self.dp_replicate * self.cp * self.tp
        if self.dp_shard == -1:
            if world_size % others:
                raise ValueError(
                    f"ParallelConfig: dp_replicate × cp × tp = {self.dp_replicate} × {self.cp} × {self.tp} = "
                    f"{others} does not divide the world size {world_size}, so dp_shard=-1 has no value. Pick "
                    "sizes whose product divides the number of processes."
                )
            return dataclasses.replace(self, dp_shard=world_size // others)
        product = others * self.dp_shard
        if product != world_size:
            raise ValueError(
                f"ParallelConfig: dp_replicate × dp_shard × cp × tp = {self.dp_replicate} × {self.dp_shard} × "
                f"{self.cp} × {self.tp} = {product}, but the world size is {world_size}. Make the product equal "
                "the number of processes (dp_shard=-1 fills in the rest)."
            )
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        """Sizes along :data:`MESH_DIMS` (resolve first when ``dp_shard`` is -1)."""
        if self.dp_shard == -1:
            raise ValueError("ParallelConfig.shape: dp_shard is -1; call resolve(world_size) first")
        return (self.dp_replicate, self.dp_shard, self.cp, self.tp)

    @property
    def dp_size(self) -> int:
        """Ranks that see different data: dp_replicate × dp_shard."""
        return math.prod(self.shape[:2])
