"""``jit(step, optimizer="eager")`` and the precompile cache between processes (ftrain/compile_cache.py).

Two compiles in all: one float64 step in this process (eager optimizer == the eager step, donation == no
donation), and one float32 gradient function compiled ahead of time by a first subprocess and loaded by a second.
"""

import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import gpt_loss, lm_batches, make_gpt
from tolerances import FLOAT64

from ftrain import TrainState, compile_cache, jit, make_train_step, optim, tree
from ftrain.step import TrainStep

STEP = make_train_step(gpt_loss)


def _state(dtype=torch.float32, **kw):
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.01))
    return TrainState.create(make_gpt(dtype=dtype, **kw), tx, key=0, copy=True)


def _key(state, batch, step=STEP, **options):
    args = (step, state.skeleton, state.params, state.buffers, batch)
    return compile_cache.cache_key(TrainStep.grads_and_norm, args, {"mode": None, **options})


# --- the cache key and directory (no compile) ------------------------------------------------------------------


def test_cache_key_changes_with_what_decides_the_compiled_code():
    batch = lm_batches(1)[0]
    base = _key(_state(), batch)
    assert _key(_state(), batch) == base  # another instance of the same model and batch: the same file
    assert _key(_state(seed=3), batch) == base  # other weights compile to the same code
    other_loss = make_train_step(lambda m, b: gpt_loss(m, b))
    changed = {
        "structure": _key(TrainState.create(_bigger_gpt(), optim.adamw(1e-2), key=0), batch),
        "dtype": _key(_state(dtype=torch.float64), batch),
        "dropout rate": _key(_state(dropout=0.2), batch),
        "batch shape": _key(_state(), lm_batches(1, batch_size=4)[0]),
        "loss function": _key(_state(), batch, step=other_loss),
        "accumulation": _key(_state(), batch, step=make_train_step(gpt_loss, accum_steps=2)),
        "jit option": _key(_state(), batch, mode="max-autotune"),
    }
    assert len(set(changed.values()) | {base}) == len(changed) + 1, changed


_KEY_CHILD = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    from conftest import lm_batches, make_gpt
    from ftrain import TrainState, compile_cache, make_train_step, optim
    from ftrain.step import TrainStep

    def loss(model, batch):  # a comprehension: a nested code object, whose repr holds an address
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return model(inputs["input_ids"]).float().square().mean()

    step = make_train_step(loss)
    state = TrainState.create(make_gpt(), optim.adamw(1e-2), key=0)
    args = (step, state.skeleton, state.params, state.buffers, lm_batches(1)[0])
    print(compile_cache.cache_key(TrainStep.grads_and_norm, args, {"mode": None}))
    """
)


def test_cache_key_is_the_same_in_another_process():
    # What a resume relies on: a fresh process computes the key the first one saved under (nothing process-local
    # such as an address may enter it).
    tests = str(Path(__file__).parent)
    keys = {
        subprocess.run([sys.executable, "-c", _KEY_CHILD, tests], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    }
    assert len(keys) == 1 and len(keys.pop().strip()) == 32


def _bigger_gpt():
    from conftest import TINY

    from ftrain.models import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY.__dict__, "n_layer": TINY.n_layer + 1}))


def test_cache_dir_argument_then_environment_then_default(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.resolve_cache_dir(None) == tmp_path / "ftrain" / "compile"
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "env"))
    assert compile_cache.resolve_cache_dir(None) == tmp_path / "env"
    assert compile_cache.resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert compile_cache.resolve_cache_dir(False) is None
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.resolve_cache_dir(None) is None


def test_unknown_optimizer_mode_is_refused():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        jit(STEP, optimizer="fused")


# --- one compile in this process --------------------------------------------------------------------------------


@pytest.mark.compiled
def test_eager_optimizer_matches_the_eager_step_and_donation_matches(batches):
    # float64 (FLOAT64): compiled gradients against eager ones is a mathematical claim; the optimizer runs eagerly.
    compiled = jit(STEP, optimizer="eager", fallback_random=True, cache_dir=False)
    donating = jit(STEP, optimizer="eager", fallback_random=True, cache_dir=False, donate=True)
    s_c, s_e, s_d = (_state(dtype=torch.float64) for _ in range(3))
    storage = s_d.params["wte.weight"].data_ptr()
    for b in batches[:3]:
        s_c, m_c = compiled(s_c, b)
        s_e, m_e = STEP(s_e, b)
        s_d, m_d = donating(s_d, b)
        torch.testing.assert_close(m_c["loss"], m_e["loss"], **FLOAT64)
        torch.testing.assert_close(m_c["grad_norm"], m_e["grad_norm"], **FLOAT64)
    for name in s_e.params:
        torch.testing.assert_close(s_c.params[name], s_e.params[name], **FLOAT64, msg=lambda m, n=name: f"{n}: {m}")
    # bitwise: the same compiled gradient kernels, then the same optimizer arithmetic, in place or not
    for x, y in zip(tree.tree_leaves(s_d), tree.tree_leaves(s_c)):
        assert torch.equal(x, y)
    assert s_d.params["wte.weight"].data_ptr() == storage and int(s_d.step) == 3
    assert compiled.recompiles == 0 and donating.recompiles == 0


# --- one compile, in a subprocess; loaded by a second ----------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, sys.argv[2])
    from conftest import gpt_loss, lm_batches, make_gpt
    from ftrain import TrainState, jit, make_train_step, optim
    from ftrain.step import TrainStep
    torch.set_num_threads(1)
    step = jit(make_train_step(gpt_loss), optimizer="eager", cache_dir=sys.argv[1])
    state = TrainState.create(make_gpt(dropout=0.0), optim.adamw(1e-2), key=0)
    for batch in lm_batches(2):
        state, metrics = step(state, batch)
    # a model of another structure: its guards must reject the precompiled function loaded for this one
    other = TrainState.create(make_gpt(dropout=0.0).double(), optim.adamw(1e-2), key=0)
    args = (step.step, other.skeleton, other.params, other.buffers, lm_batches(1)[0])
    print(json.dumps(dict(
        loaded=step.cache_loaded, compiles=step.compiles, file=str(step.cache_file),
        loss=float(metrics["loss"]), wte=state.params["wte.weight"].double().sum().item(),
        other_guard=bool(step._precompiled.guard_check(*args)),
    )))
    """
)


def _child(cache: Path, inductor_cache: Path) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_cache)}
    env.pop(compile_cache.ENV, None)
    tests = str(Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(cache), tests], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.compiled
@pytest.mark.skipif(not compile_cache.precompile_supported(), reason="this torch has no precompile")
def test_a_second_process_loads_the_precompiled_step_instead_of_compiling(tmp_path):
    first = _child(tmp_path / "ftrain", tmp_path / "inductor")
    assert not first["loaded"] and first["compiles"] == 1 and Path(first["file"]).exists()
    second = _child(tmp_path / "ftrain", tmp_path / "inductor")
    assert second["loaded"] and second["compiles"] == 0 and second["file"] == first["file"]
    # bitwise: the same saved kernels on the same inputs
    assert (second["loss"], second["wte"]) == (first["loss"], first["wte"])
    assert not second["other_guard"]  # another dtype never runs the loaded function


_ISA_CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from torch._inductor import cpu_vec_isa
    from ftrain import compile_cache
    cache = Path(sys.argv[1])
    trusted = compile_cache.trust_recorded_vector_isas(cache)
    isas = [str(i) for i in cpu_vec_isa.valid_vec_isa_list()]  # the probe runs here unless trusted
    compile_cache.record_vector_isas(cache)
    print(json.dumps(dict(trusted=trusted, isas=isas)))
    """
)


@pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64", reason="Inductor probes x86-64 ISAs")
def test_a_recorded_vector_isa_probe_gives_the_list_the_probe_gives(tmp_path):
    # The first process probes (builds and dlopens a test library per ISA) and records; the second reuses the
    # record and must end with the very list the probe made; a record saying the probe failed an ISA is not used.
    def child():
        out = subprocess.run([sys.executable, "-c", _ISA_CHILD, str(tmp_path)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    probed = child()
    assert not probed["trusted"] and probed["isas"]
    record = json.loads((tmp_path / "vector_isa.json").read_text())
    (passed,) = record.values()  # True where the compiler built and loaded every ISA the CPU reports (here: yes)
    reused = child()
    assert reused["trusted"] == passed and reused["isas"] == probed["isas"]
    (tmp_path / "vector_isa.json").write_text(json.dumps({k: False for k in record}))
    assert not child()["trusted"]
