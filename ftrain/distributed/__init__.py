"""ftrain.distributed: the same ``train_step`` on N processes, through DTensor placements on a DeviceMesh."""

from ftrain.distributed.config import MESH_DIMS, ParallelConfig

__all__ = ["MESH_DIMS", "ParallelConfig"]
