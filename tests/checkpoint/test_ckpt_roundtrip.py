"""Round trips in every backend: bitwise for float32 / bfloat16 / int64 leaves, nested optimizer states with None
leaves, Python scalars and the RNG key; the template checks; the restored state trains on identically."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))  # ckpt_helpers.py lives next to this file (tests/ is no package)
from ckpt_helpers import assert_bitwise_equal, bits, make_state  # noqa: E402

import ftrain  # noqa: E402
from ftrain import losses  # noqa: E402
from ftrain.checkpoint import (  # noqa: E402
    CheckpointManager,
    CheckpointManagerOptions,
    CheckpointMismatchError,
    CorruptCheckpointError,
)
from ftrain.checkpoint.backend_dcp import load_dcp_metadata  # noqa: E402

BACKENDS = ["safetensors", "dcp"]  # orbax: test_ckpt_orbax.py (in a child process: jax starts threads)


def _options(backend: str, **kw) -> CheckpointManagerOptions:
    return CheckpointManagerOptions(backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("async_save", [False, True])
def test_round_trip_is_bitwise_for_every_leaf(tmp_path, backend, async_save):
    state = make_state()
    with CheckpointManager(tmp_path, _options(backend, async_save=async_save)) as mgr:
        assert mgr.save(2, state, extra={"epoch": 1})
        restored = mgr.restore(like=make_state(seed=5, steps=0))
    assert_bitwise_equal(restored, state)
    assert restored.skeleton is not state.skeleton  # the template's static parts are reused
    assert restored.opt_state[1].inner_state.inner_state[0].mu["fc.bias"] is None  # masked leaves stay None
    assert restored.params["head.weight"].dtype == torch.bfloat16
    assert restored.key.tolist() == state.key.tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_restored_state_trains_on_bitwise_like_the_original(tmp_path, backend):
    def loss_fn(model, batch):  # dropout (seeded from the key), BatchNorm statistics, a bfloat16 layer
        return losses.mse(model(batch["x"]), batch["y"])

    step = ftrain.make_train_step(loss_fn)
    batch = {"x": torch.randn(8, 4, generator=torch.Generator().manual_seed(3)), "y": torch.zeros(8, 2)}
    state = make_state()
    with CheckpointManager(tmp_path, _options(backend)) as mgr:
        mgr.save(2, state)
        restored = mgr.restore(2, like=make_state(seed=9))
    for _ in range(3):
        state, _ = step(state, batch)
        restored, _ = step(restored, batch)
    assert_bitwise_equal(restored, state)


def test_like_none_returns_the_saved_leaves_by_key_path(tmp_path):
    state = make_state()
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"w": torch.arange(3.0), "n": None, "lr": 0.5, "s": state.step})
        flat = mgr.restore()
    assert list(flat) == ["['lr']", "['n']", "['s']", "['w']"]
    assert flat["['lr']"] == 0.5 and flat["['n']"] is None
    assert bits(flat["['w']"]) == bits(torch.arange(3.0)) and flat["['s']"].dtype == torch.int64


def test_safetensors_file_is_readable_by_the_safetensors_library(tmp_path):
    state = make_state()
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(7, state)
    loaded = load_file(tmp_path / "step_00000007" / "state.safetensors")
    assert set(loaded) == set(_named(state))
    for name, t in _named(state).items():
        assert bits(loaded[name]) == bits(t) and loaded[name].dtype == t.dtype, name


def _named(state) -> dict[str, torch.Tensor]:
    paths, leaves, _ = ftrain.tree.tree_flatten_with_path(state)
    return {ftrain.tree.keystr(p): leaf for p, leaf in zip(paths, leaves)}


def test_meta_json_records_step_key_metrics_extra_model_and_every_leaf(tmp_path):
    state = make_state()
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(3, state, metrics={"loss": torch.tensor(0.25)}, extra={"data": {"position": 3}})
        info = mgr.metadata(3)
    meta = json.loads((tmp_path / "step_00000003" / "meta.json").read_text())
    assert meta["step"] == 3 and meta["backend"] == "safetensors"
    assert meta["key"] == state.key.tolist()
    assert info.metrics == {"loss": 0.25} and info.extra == {"data": {"position": 3}}
    assert info.model["class"].endswith("ckpt_helpers.TinyNet")
    leaves = {leaf["path"]: leaf for leaf in meta["leaves"]}
    assert leaves["['params']['head.weight']"] == {
        "path": "['params']['head.weight']",
        "kind": "tensor",
        "dtype": "bfloat16",
        "shape": [2, 3],
    }
    assert leaves["['opt_state'][1][0][2][0][1]['fc.bias']"]["kind"] == "none"


def test_restore_into_a_mismatching_template_names_every_differing_path(tmp_path):
    state = make_state()
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, state)
        wrong_dtype = state.replace(params={**state.params, "fc.weight": state.params["fc.weight"].double()})
        with pytest.raises(CheckpointMismatchError) as e:
            mgr.restore(like=wrong_dtype)
        assert "['params']['fc.weight']: float32 (3, 4) in the checkpoint, float64 (3, 4) in like" in str(e.value)
        wrong_shape = state.replace(params={**state.params, "fc.bias": torch.zeros(5)})
        with pytest.raises(
            CheckpointMismatchError,
            match=r"\['params'\]\['fc.bias'\]: float32 \(3,\) in the checkpoint, "
            r"float32 \(5,\) in like",
        ):
            mgr.restore(like=wrong_shape)
        missing = state.replace(params={k: v for k, v in state.params.items() if k != "fc.bias"})
        with pytest.raises(CheckpointMismatchError, match=r"only in the checkpoint: \['params'\]\['fc.bias'\]"):
            mgr.restore(like=missing)


def test_save_rejects_what_json_cannot_hold_and_names_where(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        with pytest.raises(TypeError, match=r"extra\['cfg'\]\['fn'\] is a builtin_function_or_method"):
            mgr.save(1, {"w": torch.ones(1)}, extra={"cfg": {"fn": print}})
        with pytest.raises(TypeError, match=r"leaf at \['obj'\]: a object"):
            mgr.save(1, {"obj": object()})
        with pytest.raises(TypeError, match=r"metrics\['loss'\] must be a number"):
            mgr.save(1, {"w": torch.ones(1)}, metrics={"loss": "low"})
        assert mgr.all_steps() == []


def test_saving_a_donated_state_raises_the_donation_error(tmp_path):
    from ftrain.state import mark_donated

    state = make_state()
    mark_donated(state, 2)
    with CheckpointManager(tmp_path) as mgr, pytest.raises(RuntimeError, match="donated to a step"):
        mgr.save(2, state)


# ---------------------------------------------------------------------------------------------------------------
# DCP: a world-size-1 gloo process group, DTensor leaves, and metadata loading without arbitrary unpickling


@pytest.fixture
def gloo_world_of_one(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("async_save", [False, True])
def test_dcp_round_trip_of_dtensor_leaves_in_a_gloo_group(tmp_path, gloo_world_of_one, async_save):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    state = make_state()
    sharded = state.replace(
        params={k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in state.params.items()},
        buffers={k: distribute_tensor(v, mesh, [Replicate()]) for k, v in state.buffers.items()},
    )
    with CheckpointManager(tmp_path / "ckpt", CheckpointManagerOptions(backend="dcp", async_save=async_save)) as mgr:
        mgr.save(2, sharded)
        as_dtensor = mgr.restore(like=make_state(seed=3).replace(params=sharded.params, buffers=sharded.buffers))
        as_plain = mgr.restore(like=make_state(seed=3))
    assert isinstance(as_dtensor.params["fc.weight"], DTensor)
    assert as_dtensor.params["fc.weight"].placements == (Shard(0),)
    assert_bitwise_equal(as_plain, state)
    assert bits(as_dtensor.params["head.weight"].full_tensor()) == bits(state.params["head.weight"])


def test_dcp_metadata_loader_refuses_anything_but_dcp_metadata(tmp_path):
    with CheckpointManager(tmp_path, CheckpointManagerOptions(backend="dcp")) as mgr:
        mgr.save(1, make_state())
    meta_file = tmp_path / "step_00000001" / "dcp" / ".metadata"
    assert type(load_dcp_metadata(meta_file)).__name__ == "Metadata"

    class Evil:
        def __reduce__(self):
            return (subprocess.call, (["touch", str(tmp_path / "pwned")],))

    meta_file.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CorruptCheckpointError, match="subprocess.call is not part of DCP metadata"):
        load_dcp_metadata(meta_file)
    assert not (tmp_path / "pwned").exists()


def test_a_dcp_checkpoint_with_non_tensor_items_is_refused_not_unpickled(tmp_path):
    import torch.distributed.checkpoint as dcp

    with CheckpointManager(tmp_path, CheckpointManagerOptions(backend="dcp")) as mgr:
        mgr.save(1, {"w": torch.ones(2)})
    sub = tmp_path / "step_00000001" / "dcp"
    for f in sub.iterdir():
        f.unlink()
    with pytest.warns(UserWarning, match="assuming the intent is to save in a single process"):
        dcp.save({"['w']": torch.ones(2), "payload": {"any": "object"}}, checkpoint_id=sub)  # stored as a pickle
    with pytest.raises(
        CorruptCheckpointError, match=r"lists non-tensor items \['payload.any'\], which DCP would unpickle"
    ):
        load_dcp_metadata(sub / ".metadata")


def test_importing_ftrain_checkpoint_imports_no_optional_or_heavy_backend():
    code = (
        "import sys, ftrain.checkpoint; "
        "print(sorted(m for m in ('orbax', 'jax', 'ml_dtypes', 'transformers', 'torch.distributed.checkpoint', "
        "'ftrain.trainer') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
