import optree
import pytest
import torch
import torch.utils._pytree as torch_pytree
from conftest import make_gpt

from ftrain import TrainState, optim, random, tree
from ftrain.module import Bound, split_module


def test_split_module_puts_skeleton_on_meta_and_shares_storage():
    model = make_gpt()
    skeleton, params, buffers = split_module(model)
    assert all(p.device.type == "meta" for p in skeleton.parameters())
    assert params["wte.weight"].data_ptr() == model.wte.weight.data_ptr()
    assert "lm_head.weight" not in params  # tied to wte.weight, listed once
    x = torch.randint(0, 64, (2, 16))
    model.eval()
    skeleton.eval()
    # bitwise: the same modules' kernels on the same tensors (a functional call), in the same process
    torch.testing.assert_close(Bound(skeleton, params, buffers)(x), model(x), rtol=0, atol=0)


def test_frozen_parameters_and_buffers_go_to_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    model[0].bias.requires_grad_(False)
    _, params, buffers = split_module(model)
    assert sorted(params) == ["0.weight", "1.bias", "1.weight"]
    assert sorted(buffers) == ["0.bias", "1.num_batches_tracked", "1.running_mean", "1.running_var"]


def test_state_is_a_pytree_for_optree_and_torch():
    state = TrainState.create(make_gpt(), optim.adamw(1e-3), key=random.key(0))
    leaves, spec = optree.tree_flatten(state, namespace="ftrain")
    assert optree.tree_unflatten(spec, leaves).skeleton is state.skeleton
    t_leaves, t_spec = torch_pytree.tree_flatten(state)
    assert len(t_leaves) == len(leaves)
    doubled = torch_pytree.tree_map(lambda x: x * 2, state)
    assert isinstance(doubled, TrainState) and int(doubled.step) == 0
    paths = [tree.keystr(p) for p in tree.tree_paths(state)]
    assert "['params']['wte.weight']" in paths and paths[0] == "['step']"


def test_apply_gradients_equals_torch_sgd():
    model = make_gpt(dtype=torch.float64)
    state = TrainState.create(model, optim.sgd(0.5, momentum=0.9), key=0, copy=True)
    ref = make_gpt(dtype=torch.float64)
    opt = torch.optim.SGD([p for p in ref.parameters()], lr=0.5, momentum=0.9)
    for i in range(3):
        grads = {k: torch.full_like(v, 0.1 * (i + 1)) for k, v in state.params.items()}
        state = state.apply_gradients(grads)
        for name, p in ref.named_parameters():
            p.grad = grads[name].clone()
        opt.step()
    assert int(state.step) == 3
    # float64, the same SGD in another order (foreach ops vs torch's loop): a few roundings per step (~1e-16
    # relative); rtol=1e-12 leaves 10**4 u and still fails on any real difference (lr·g = 0.05 per step). Params
    # are init + a shared step of >= 0.05 per step, none near 0, so no atol.
    for name, p in ref.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach(), rtol=1e-12, atol=0)


def test_apply_gradients_with_mismatched_tree_names_the_key():
    state = TrainState.create(torch.nn.Linear(2, 2), optim.sgd(0.1), key=0)
    grads = {"weight": torch.zeros(2, 2), "bais": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"(?s)state.params only: \[.bias.\].*grads only: \[.bais.\]"):
        state.apply_gradients(grads)


def test_integer_parameter_is_rejected_with_its_key_path():
    with pytest.raises(TypeError, match=r"\['counts'\] has dtype torch.int64"):
        optim.adamw(1e-3).init({"w": torch.zeros(2), "counts": torch.zeros(2, dtype=torch.int64)})


def test_to_module_and_load_into_round_trip_the_weights():
    model = make_gpt()
    state = TrainState.create(model, optim.sgd(0.1), key=0, copy=True)
    state = state.replace(params={k: v + 1 for k, v in state.params.items()})
    exported = state.to_module()
    assert exported.lm_head.weight is exported.wte.weight  # tying survives
    assert torch.equal(exported.wte.weight, model.wte.weight + 1)  # bitwise: the same addition on the same values
    state.load_into(model)
    assert torch.equal(model.blocks[0].qkv.weight, state.params["blocks.0.qkv.weight"])  # a copy: bitwise


def test_create_rejects_torch_optimizers_and_bad_keys():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="ftrain.optim.GradientTransformation"):
        TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1), key=0)
    with pytest.raises(TypeError, match="key must be"):
        TrainState.create(model, optim.sgd(0.1), key=torch.zeros(3))
