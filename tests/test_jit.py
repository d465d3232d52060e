"""Compiled steps: a few small compiles shared between tests (torch.compile is slow on 2 CPU cores).

Compiled == eager is a mathematical claim (Inductor fuses and reorders the arithmetic), checked in float64 with
``FLOAT64`` (tests/tolerances.py). The float32 default step is compared only with itself (dropout reproducibility,
resume, donation): bitwise, because the same compiled kernels run on the same inputs in the same order.
"""

import pytest
import torch
from conftest import gpt_loss, lm_batches, make_gpt
from tolerances import FLOAT64

from ftrain import TrainState, jit, make_eval_step, make_train_step, optim, random, schedules, tree

pytestmark = pytest.mark.compiled

STEP = make_train_step(gpt_loss)


def _tx():
    sched = schedules.get_schedule("cosine", 1e-2, num_warmup_steps=5, num_training_steps=20)
    return optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(sched, weight_decay=0.01))


def _fresh(seed_key=7, dropout=0.1, dtype=torch.float32):
    return TrainState.create(make_gpt(dropout=dropout, dtype=dtype), _tx(), key=random.key(seed_key), copy=True)


def _run(step, state, batches):
    out = []
    for b in batches:
        state, m = step(state, b)
        out.append(m)
    return state, out


@pytest.fixture(scope="module")
def default_jit():
    """The default compiled step (Inductor's own dropout, deterministic=True), shared by the tests below."""
    return jit(STEP)


def test_compiled_equals_eager_for_20_steps_with_no_recompiles_as_lr_changes(batches):
    # fallback_random makes Inductor draw dropout masks as eager does, so the two runs can be compared.
    # float64: in float32, Adam turns rounding-level gradients into full-size steps of single elements (issue 12;
    # the key bias, the middle third of qkv.bias, has an exactly zero gradient: softmax ignores a shift shared by
    # all keys, so only noise moves it). In float64 that noise is ~1e-18 and moves an element by <= lr · noise / eps
    # = 1e-12 a step (measured <= 1e-13 after 20), so every element of every tensor is compared with FLOAT64.
    compiled = jit(STEP, fallback_random=True)
    s_c, m_c = _run(compiled, _fresh(dtype=torch.float64), batches)
    s_e, m_e = _run(STEP, _fresh(dtype=torch.float64), batches)
    lrs = [float(m["learning_rate"]) for m in m_c]
    assert len(set(lrs)) == 20 and lrs[0] == 0.0  # warmup starts at 0 and the lr moves every step
    torch.testing.assert_close(torch.stack([m["loss"] for m in m_c]), torch.stack([m["loss"] for m in m_e]), **FLOAT64)
    for name in s_e.params:
        torch.testing.assert_close(s_c.params[name], s_e.params[name], **FLOAT64, msg=lambda m, n=name: f"{n}: {m}")
    assert compiled.compiles == 1 and compiled.recompiles == 0


def test_compiled_dropout_is_bitwise_reproducible_and_resumes_bitwise(default_jit, batches, tmp_path):
    from safetensors.torch import load_file, save_file

    # bitwise: the same compiled float32 kernels on the same inputs and dropout seeds, in this process
    a, _ = _run(default_jit, _fresh(), batches)
    b, _ = _run(default_jit, _fresh(), batches)
    for x, y in zip(tree.tree_leaves(a), tree.tree_leaves(b)):
        assert torch.equal(x, y)
    half, _ = _run(default_jit, _fresh(), batches[:10])
    paths, leaves, _ = tree.tree_flatten_with_path(half)
    save_file({tree.keystr(p): x.contiguous() for p, x in zip(paths, leaves)}, tmp_path / "s.safetensors")
    loaded = load_file(tmp_path / "s.safetensors")
    t_paths, _, spec = tree.tree_flatten_with_path(_fresh())
    resumed, _ = _run(default_jit, tree.tree_unflatten(spec, [loaded[tree.keystr(p)] for p in t_paths]), batches[10:])
    for x, y in zip(tree.tree_leaves(resumed), tree.tree_leaves(a)):
        assert torch.equal(x, y)
    # Dropout is really on: another key gives other numbers.
    c, _ = _run(default_jit, _fresh(seed_key=8), batches[:2])
    assert not torch.equal(c.params["wte.weight"], _run(default_jit, _fresh(), batches[:2])[0].params["wte.weight"])
    assert default_jit.recompiles == 0


def test_donated_step_matches_and_the_donated_state_is_dead(default_jit, batches):
    donating = jit(STEP, donate=True)
    state = _fresh()
    storage = state.params["wte.weight"].data_ptr()
    new, metrics = donating(state, batches[0])
    new, metrics = donating(new, batches[1])
    assert new.params["wte.weight"].data_ptr() == storage  # written in place
    with pytest.raises(RuntimeError, match="donated to a step at step 0"):
        state.params["wte.weight"]
    with pytest.raises(RuntimeError, match="donated"):
        donating(state, batches[0])
    # bitwise: the same graph compiled by the same Inductor on this machine; donation only adds copies of the
    # results into the old tensors, which change no arithmetic
    ref, _ = _run(default_jit, _fresh(), batches[:2])
    for x, y in zip(tree.tree_leaves(new), tree.tree_leaves(ref)):
        assert torch.equal(x, y)


def test_compiled_eval_step_equals_eager():
    state = _fresh(dropout=0.5, dtype=torch.float64)  # float64: a mathematical claim (FLOAT64)
    batch = lm_batches(1)[0]
    eager = make_eval_step(gpt_loss)
    compiled = jit(eager)
    torch.testing.assert_close(compiled(state, batch)["loss"], eager(state, batch)["loss"], **FLOAT64)


def test_compile_failure_surfaces_the_plain_python_error():
    state = _fresh()
    with pytest.raises(KeyError, match=r"reads batch\['labels'\]"):
        jit(STEP)(state, {"input_ids": lm_batches(1)[0]["input_ids"]})


def test_transformers_gpt2_step_compiles_fullgraph_and_matches_eager():
    from transformers import GPT2Config, GPT2LMHeadModel

    from ftrain.step import causal_lm_loss

    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    # float64 (FLOAT64): causal_lm_loss keeps the logits' dtype, so the whole step is float64
    state = TrainState.create(GPT2LMHeadModel(cfg).double(), optim.adamw(1e-3), key=0, copy=True)
    batch = dict(lm_batches(1)[0])
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    step = make_train_step(causal_lm_loss)
    compiled = jit(step, fallback_random=True)  # GPT-2's dropout is on: draw masks as eager does
    s_c, m_c = _run(compiled, state, [batch, batch])
    s_e, m_e = _run(step, state, [batch, batch])
    for a, b in zip(m_c, m_e):
        torch.testing.assert_close(a["loss"], b["loss"], **FLOAT64)
    for name in s_e.params:
        torch.testing.assert_close(s_c.params[name], s_e.params[name], **FLOAT64, msg=lambda m, n=name: f"{n}: {m}")
    assert compiled.compiles == 1 and compiled.recompiles == 0
