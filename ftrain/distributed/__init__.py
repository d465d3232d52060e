"""ftrain.distributed: the same ``train_step`` on N processes, through DTensor placements on a DeviceMesh.

The recipe, in order: :func:`build_mesh` (starts the process group from torchrun's environment), then
:func:`shard_state` (params, optimizer state as DTensors; the plan rides on the skeleton), then a
``BatchStream(rank=data_parallel_rank(mesh), world_size=data_parallel_size(mesh))``, then the usual
``make_train_step`` / ``ftrain.jit`` / ``CheckpointManager(..., backend="dcp")``. See docs/distributed.md.
:func:`parallel_config_from_fsdp` and :func:`parallel_config_from_deepspeed` turn HF's FSDP settings and a DeepSpeed
config into a ``ParallelConfig``.
"""

from ftrain.distributed.config import MESH_DIMS, ParallelConfig
from ftrain.distributed.context_parallel import (
    ContextParallelAttention,
    all_gather_kv_attention,
    apply_context_parallel,
    cp_permutation,
    cp_shard_indices,
    prepare_cp_batch,
    shift_labels,
    unshard_sequence,
)
from ftrain.distributed.deepspeed import fill_deepspeed_config, load_deepspeed_config, parallel_config_from_deepspeed
from ftrain.distributed.fsdp import parallel_config_from_fsdp
from ftrain.distributed.mesh import (
    build_mesh,
    data_parallel_rank,
    data_parallel_size,
    init_process_group,
    mesh_shape_error,
)
from ftrain.distributed.plan import LeafLayout, ShardingPlan, make_plan, tp_layouts
from ftrain.distributed.state import gather_state, get_plan, reduce_metrics, shard_state

__all__ = [
    "ContextParallelAttention",
    "MESH_DIMS",
    "LeafLayout",
    "ParallelConfig",
    "ShardingPlan",
    "all_gather_kv_attention",
    "apply_context_parallel",
    "build_mesh",
    "cp_permutation",
    "cp_shard_indices",
    "data_parallel_rank",
    "data_parallel_size",
    "fill_deepspeed_config",
    "gather_state",
    "get_plan",
    "init_process_group",
    "load_deepspeed_config",
    "make_plan",
    "mesh_shape_error",
    "parallel_config_from_deepspeed",
    "parallel_config_from_fsdp",
    "prepare_cp_batch",
    "reduce_metrics",
    "shard_state",
    "shift_labels",
    "tp_layouts",
    "unshard_sequence",
]
