"""save_tree_file / load_tree_file: one pytree in one safetensors file, its leaf list in the metadata."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ftrain import TrainState, optim
from ftrain.checkpoint import CheckpointMismatchError, load_tree_file, save_tree_file

TREE = {"a": torch.tensor([1.0, 2.0]), "b": None, "c": 3, "d": {"e": torch.tensor(7, dtype=torch.int64)}}


def _like():
    return {"a": torch.zeros(2), "b": None, "c": 0, "d": {"e": torch.tensor(0, dtype=torch.int64)}}


def test_the_file_is_safetensors_with_the_leaf_list_in_its_metadata(tmp_path):
    path = tmp_path / "tree.safetensors"
    save_tree_file(path, TREE)
    assert {k: v.tolist() for k, v in load_file(path).items()} == {"['a']": [1.0, 2.0], "['d']['e']": 7}
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert json.loads(meta["leaves"]) == [  # tree order, written out by hand
        {"path": "['a']", "kind": "tensor", "dtype": "float32", "shape": [2]},
        {"path": "['b']", "kind": "none"},
        {"path": "['c']", "kind": "python", "value": 3},
        {"path": "['d']['e']", "kind": "tensor", "dtype": "int64", "shape": []},
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["tree.safetensors"]  # no temporary file left


def test_round_trip_of_an_optimizer_state_is_bitwise(tmp_path):
    torch.manual_seed(0)
    state = TrainState.create(torch.nn.Linear(3, 2), optim.adamw(1e-3, weight_decay=0.1), key=0)
    grads = {k: torch.randn_like(v) for k, v in state.params.items()}
    state = state.apply_gradients(grads)  # non-zero moments and a step count of 1
    path = tmp_path / "optimizer.safetensors"
    save_tree_file(path, {"opt_state": state.opt_state})
    zeros = torch.utils._pytree.tree_map(torch.zeros_like, state.opt_state)
    loaded = load_tree_file(path, {"opt_state": zeros})["opt_state"]
    ours, theirs = torch.utils._pytree.tree_leaves(loaded), torch.utils._pytree.tree_leaves(state.opt_state)
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_reads_the_file_safetensors_save_file_wrote(tmp_path):
    """The format ftrain's Trainer wrote optimizer.safetensors in before (safetensors' own writer)."""
    leaves = [
        {"path": "['a']", "kind": "tensor", "dtype": "float32", "shape": [2]},
        {"path": "['b']", "kind": "none"},
        {"path": "['c']", "kind": "python", "value": 5},
        {"path": "['d']['e']", "kind": "tensor", "dtype": "int64", "shape": []},
    ]
    tensors = {"['a']": torch.tensor([3.0, 4.0]), "['d']['e']": torch.tensor(9)}
    save_file(tensors, tmp_path / "old.safetensors", metadata={"format": "pt", "leaves": json.dumps(leaves)})
    tree = load_tree_file(tmp_path / "old.safetensors", _like())
    assert tree["a"].tolist() == [3.0, 4.0] and tree["b"] is None and tree["c"] == 5 and int(tree["d"]["e"]) == 9


def test_a_template_that_does_not_fit_names_the_leaves(tmp_path):
    path = tmp_path / "tree.safetensors"
    save_tree_file(path, TREE)
    like = {**_like(), "a": torch.zeros(3)}
    with pytest.raises(CheckpointMismatchError, match=r"\['a'\]: float32 \(2,\) in the checkpoint, float32 \(3,\)"):
        load_tree_file(path, like)
    with pytest.raises(CheckpointMismatchError, match=r"only in like: \['x'\]"):
        load_tree_file(path, {**_like(), "x": torch.zeros(1)})


def test_a_safetensors_file_without_a_leaf_list_is_refused(tmp_path):
    save_file({"w": torch.ones(1)}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="is not a tree file: its safetensors metadata has no 'leaves' list"):
        load_tree_file(tmp_path / "model.safetensors", {"w": torch.zeros(1)})
    with pytest.raises(TypeError, match=r"cannot checkpoint the leaf at \['x'\]: a object"):
        save_tree_file(tmp_path / "bad.safetensors", {"x": object()})
