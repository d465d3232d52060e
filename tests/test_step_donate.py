"""The eager donated step (``make_train_step(..., donate=True)``) and the memory contract of the eager step.

A donated step writes the next state into the given state's tensors, as ``torch.optim`` updates in place; an
undonated step leaves its input bitwise as it was. Bitwise claims here compare the same kernels on the same inputs
in the same order (donation only changes where results are written, never how they are computed); the gradient
claims against torch are mathematical and are checked in float64 with ``FLOAT64`` (tests/tolerances.py).
"""

import pytest
import torch
from conftest import gpt_loss, lm_batches, make_gpt
from tolerances import FLOAT64

from ftrain import TrainState, losses, make_train_step, optim, tree


class _ConvBN(torch.nn.Module):
    """A model whose BatchNorm running statistics (buffers) change at every training step."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv1d(3, 4, 3)
        self.bn = torch.nn.BatchNorm1d(4)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).relu().mean(-1))


def _bn_loss(model, batch):
    return losses.mse(model(batch["x"]), batch["y"])


def _bn_batches(n):
    g = torch.Generator().manual_seed(3)
    return [{"x": torch.randn(6, 3, 8, generator=g), "y": torch.randn(6, 1, generator=g)} for _ in range(n)]


# name: (model factory, optimizer, loss function, batches, accum_steps)
CASES = {
    "adamw": (make_gpt, lambda: optim.adamw(1e-2, weight_decay=0.1), gpt_loss, lambda: lm_batches(3), 1),
    "sgd_momentum": (make_gpt, lambda: optim.sgd(0.1, momentum=0.9), gpt_loss, lambda: lm_batches(3), 1),
    "batchnorm": (_ConvBN, lambda: optim.adamw(1e-2), _bn_loss, lambda: _bn_batches(3), 1),
    "accumulation_2": (make_gpt, lambda: optim.adamw(1e-2), gpt_loss, lambda: lm_batches(3), 2),
}


def _state(case):
    make_model, make_tx, *_ = CASES[case]
    return TrainState.create(make_model(), make_tx(), key=0, copy=True)


def _leaves(state):
    return tree.tree_leaves((state.params, state.buffers, state.opt_state, state.step))


def _run(case, donate):
    _, _, loss_fn, make_batches, accum = CASES[case]
    step = make_train_step(loss_fn, accum_steps=accum, donate=donate)
    state, history = _state(case), []
    for batch in make_batches():
        state, metrics = step(state, batch)
        history.append(metrics)
    return state, history


@pytest.mark.parametrize("case", sorted(CASES))
def test_donated_steps_equal_undonated_steps_bitwise(case):
    donated, m_donated = _run(case, donate=True)
    kept, m_kept = _run(case, donate=False)
    # bitwise: the same kernels on the same inputs; donation only writes the results into the old tensors
    for x, y in zip(_leaves(donated), _leaves(kept), strict=True):
        assert torch.equal(x, y)
    for a, b in zip(m_donated, m_kept, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert int(donated.step) == 3
    if case == "batchnorm":  # the buffers really moved, so their write-back was exercised
        assert not torch.equal(donated.buffers["bn.running_mean"], _state(case).buffers["bn.running_mean"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_donated_step_returns_the_input_tensors_updated_in_place(case):
    _, _, loss_fn, make_batches, accum = CASES[case]
    state = _state(case)
    inputs = _leaves(state)
    pointers = [t.data_ptr() for t in inputs]
    new, _ = make_train_step(loss_fn, accum_steps=accum, donate=True)(state, make_batches()[0])
    outputs = _leaves(new)
    assert [t.data_ptr() for t in outputs] == pointers
    assert all(a is b for a, b in zip(inputs, outputs, strict=True))


def test_a_donated_state_raises_on_use_and_the_module_sharing_it_is_updated_in_place():
    model = make_gpt()
    state = TrainState.create(model, optim.adamw(1e-2), key=0)  # shares the module's storage
    step = make_train_step(gpt_loss, donate=True)
    batch = lm_batches(1)[0]
    new, _ = step(state, batch)
    with pytest.raises(RuntimeError, match=r"donated to a step at step 0: .*Use the state the step returned"):
        state.params["wte.weight"]
    with pytest.raises(RuntimeError, match="donated to a step at step 0"):
        step(state, batch)
    with pytest.raises(RuntimeError, match="state.opt_state is gone"):
        state.opt_state[0]
    # as torch.optim: the module holds the new values (bitwise: the very same tensors)
    for name, p in model.named_parameters():
        assert p.data_ptr() == new.params[name].data_ptr()
    new, _ = step(new, batch)  # the returned state is alive and steps on
    assert int(new.step) == 2


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_undonated_step_leaves_its_input_bitwise_untouched(case):
    _, _, loss_fn, make_batches, accum = CASES[case]
    state = _state(case)
    before = [t.clone() for t in _leaves(state)]
    step = make_train_step(loss_fn, accum_steps=accum)
    new, _ = step(state, make_batches()[0])
    new, _ = step(new, make_batches()[1])
    for x, y in zip(_leaves(state), before, strict=True):
        assert torch.equal(x, y)  # bitwise: against clones taken before the steps
    assert int(state.step) == 0 and int(new.step) == 2


def test_a_failed_donated_step_leaves_the_state_usable():
    """A bad batch fails in the forward, before anything is written: the state is not donated, and steps on."""
    state = _state("batchnorm")
    before = [t.clone() for t in _leaves(state)]
    step = make_train_step(_bn_loss, donate=True)
    with pytest.raises(KeyError, match="reads batch\\['y'\\]"):
        step(state, {"x": torch.randn(6, 3, 8)})
    for x, y in zip(_leaves(state), before, strict=True):
        assert torch.equal(x, y)
    new, _ = step(state, _bn_batches(1)[0])
    assert int(new.step) == 1


class _SharedGradients(torch.nn.Module):
    """Parameters whose gradients autograd returns aliased: ``a + b`` gives both the same tensor, ``e.sum()`` a
    stride-0 expansion, ``cat`` views of one tensor (``c``, ``d``), and ``_Returns`` gives ``w``'s gradient as the
    tensor of the parameter ``u`` itself. The step writes into its gradients when it accumulates; it must copy
    these first."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        for name, shape in {"a": (3,), "b": (3,), "c": (3,), "d": (2,), "e": (2,), "w": (3,), "u": (3,)}.items():
            setattr(self, name, torch.nn.Parameter(torch.randn(*shape, generator=g, dtype=torch.float64)))

    def forward(self, x):
        out = (x * (self.a + self.b)).sum(-1) + self.e.sum() + (torch.cat([self.c, self.d]) ** 2).sum()
        return out + _Returns.apply(self.w, self.u)


class _Returns(torch.autograd.Function):
    """``(w * u).sum()``, whose backward returns the tensor ``u`` itself as ``w``'s gradient when the incoming
    gradient is 1 (the value is right; the point is the aliasing)."""

    @staticmethod
    def forward(ctx, w, u):
        ctx.save_for_backward(w, u)
        return (w * u).sum()

    @staticmethod
    def backward(ctx, grad):
        w, u = ctx.saved_tensors
        return u if bool(grad == 1) else grad * u, grad * w


def _sample_loss(model, batch):  # one sample per microbatch: the output's sum has a backward seed of 1
    return losses.Loss(model(batch).sum(), torch.tensor(batch.shape[0]))


def test_the_aliasing_model_really_gets_aliased_gradients():
    model = _SharedGradients()
    names = [n for n, _ in model.named_parameters()]
    g = dict(zip(names, torch.autograd.grad(model(torch.ones(1, 3)).sum(), list(model.parameters()))))
    assert g["a"] is g["b"] and g["e"].stride() == (0,) and g["w"] is model.u
    assert g["c"].untyped_storage().data_ptr() == g["d"].untyped_storage().data_ptr()


@pytest.mark.parametrize("donate", [False, True])
def test_accumulated_gradients_that_autograd_aliases_are_summed_correctly(donate):
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    state = TrainState.create(_SharedGradients(), optim.sgd(1.0), key=0, copy=True)
    params_before = {k: v.clone() for k, v in state.params.items()}
    leaves_before = [t.clone() for t in _leaves(state)]
    new, _ = make_train_step(_sample_loss, accum_steps=4, donate=donate)(state, x)  # 4 microbatches of 1 sample
    if not donate:
        for t, b in zip(_leaves(state), leaves_before, strict=True):
            assert torch.equal(t, b)  # bitwise: no gradient was written into the caller's tensors
    # torch reference: the four samples' gradients summed by loss.backward(), then the mean; SGD lr 1 moves each
    # parameter by -mean gradient
    ref = _SharedGradients()
    for i in range(4):
        ref(x[i : i + 1]).sum().backward()
    for name, p in ref.named_parameters():
        # float64, the same mathematics summed in another order (FLOAT64)
        torch.testing.assert_close(new.params[name], params_before[name] - p.grad / 4, **FLOAT64)
