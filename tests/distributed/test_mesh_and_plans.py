"""Unit tests without extra processes: mesh arithmetic in errors, tensor-parallel plan checks, the one-process
layouts, and the refusal of FSDP2 ``fully_shard`` modules."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from tolerances import FLOAT64
from torch import nn
from torch.distributed.tensor import Replicate, Shard

from ftrain import TrainState, make_train_step, optim
from ftrain.distributed import ParallelConfig, mesh_shape_error, tp_layouts


def test_mesh_error_shows_the_arithmetic():
    assert mesh_shape_error(ParallelConfig(dp_shard=2, tp=2), 4) is None
    assert mesh_shape_error(ParallelConfig(dp_replicate=2, dp_shard=2, cp=2), 4) == (
        "ParallelConfig: dp_replicate × dp_shard × cp × tp = 2 × 2 × 2 × 1 = 8, but the world size is 4. Make the "
        "product equal the number of processes (dp_shard=-1 fills in the rest)."
    )
    assert mesh_shape_error(ParallelConfig(tp=3), 4) == (
        "ParallelConfig: dp_replicate × cp × tp = 1 × 1 × 3 = 3 does not divide the world size 4, so dp_shard=-1 "
        "has no value. Pick sizes whose product divides the number of processes."
    )


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4, bias=False))


def test_tp_plan_places_colwise_and_rowwise():
    assert tp_layouts(mlp(), {"0": "colwise", "2": "rowwise"}, 2) == {
        "0.weight": Shard(0),
        "0.bias": Shard(0),
        "2.weight": Shard(1),
    }
    assert tp_layouts(mlp(), {r"[02]": "colwise"}, 2) == {
        "0.weight": Shard(0),
        "0.bias": Shard(0),
        "2.weight": Shard(0),
    }
    assert tp_layouts(mlp(), None, 2) == {}
    assert Replicate() not in tp_layouts(mlp(), {"0": "colwise"}, 3).values()


@pytest.mark.parametrize(
    ("plan", "tp", "message"),
    [
        ({"1": "colwise"}, 2, "tp_plan: '1' matches '1', a ReLU; only nn.Linear layers can be split"),
        ({"7": "colwise"}, 2, "tp_plan: '7' matches no module of Sequential"),
        ({"0": "diagonal"}, 2, r"tp_plan\['0'\] = 'diagonal'; use 'colwise' or 'rowwise'"),
        ({"2": "rowwise"}, 4, r"splits in_features=6 of nn.Linear '2' over tp=4, but 6 % 4 = 2"),
    ],
)
def test_tp_plan_errors_say_what_and_where(plan, tp, message):
    with pytest.raises(ValueError, match=message):
        tp_layouts(mlp(), plan, tp)


@pytest.fixture
def world_of_one(tmp_path):
    """A one-process gloo group for the duration of a test (fully_shard and DeviceMesh need one)."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fully_shard_module_is_refused(world_of_one):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = mlp()
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    with pytest.raises(TypeError, match="wrapped by FSDP2 fully_shard.*shard with ftrain.distributed placements"):
        TrainState.create(model, optim.sgd(0.1), key=0)


def test_one_process_sharded_step_equals_plain_step(world_of_one):
    from ftrain import losses
    from ftrain.distributed import build_mesh, gather_state, get_plan, shard_state

    config = ParallelConfig()
    torch.manual_seed(0)
    plain = TrainState.create(mlp().double(), optim.adamw(1e-2), key=0, copy=True)
    sharded = shard_state(plain, build_mesh(config, "cpu"), config)
    assert get_plan(sharded).dims == ("dp_shard",) and get_plan(plain) is None
    with pytest.raises(ValueError, match="sharded already"):
        shard_state(sharded, get_plan(sharded).mesh, config)
    step = make_train_step(lambda m, b: losses.mse(m(b["x"]), b["y"]))
    batch = {"x": torch.randn(8, 4, dtype=torch.float64), "y": torch.randn(8, 4, dtype=torch.float64)}
    losses_seen = []
    for _ in range(3):
        plain, m1 = step(plain, batch)
        sharded, m2 = step(sharded, batch)
        losses_seen.append((m1["loss"], m2["loss"]))
    # The first forward is bitwise the same: on one rank a Shard(0) is the whole tensor and the sharded step runs
    # the plain step's kernels on the same values. The updates are not: the plain state's AdamW takes the fused
    # kernel (ftrain.optim.update_and_apply), DTensor leaves the generic foreach route - the same mathematics
    # rounded differently, so from then on float64 (the state is float64) and FLOAT64.
    assert torch.equal(*losses_seen[0])
    for a, b in losses_seen[1:]:
        torch.testing.assert_close(b, a, **FLOAT64)
    for k, v in gather_state(sharded).params.items():
        torch.testing.assert_close(v, plain.params[k], **FLOAT64, msg=k)
    # The norm: the plan sums squares shard by shard then takes one sqrt, the plain step a foreach_norm.
    assert m1["grad_norm"].dtype == m2["grad_norm"].dtype == torch.float64
    torch.testing.assert_close(m2["grad_norm"], m1["grad_norm"], **FLOAT64)
