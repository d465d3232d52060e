"""Writes the notebooks in this folder from the cell sources below, without outputs.

    python notebooks/_build.py          # rewrites notebooks/0*.ipynb
    python notebooks/_build.py --check  # exits 1 if a notebook differs from what this script would write

The sources live here so that a review reads Python, not JSON; edit this file, never the .ipynb files.
tests/test_notebooks.py executes every notebook and checks what its last cell prints.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

Cell = tuple[str, str]  # ("md" | "py", source)


def md(text: str) -> Cell:
    return ("md", textwrap.dedent(text).strip("\n"))


def py(text: str) -> Cell:
    return ("py", textwrap.dedent(text).strip("\n"))


# ----------------------------------------------------------------------------------------------------------
# 01 — the pure loop

PURE_LOOP: list[Cell] = [
    md("""
    # 01 · The pure training loop

    In ftrain, training is a pure function `train_step(state, batch) -> (state, metrics)`. Everything that changes
    (step, parameters, optimizer state, RNG key) lives in one immutable `TrainState`; the loop only feeds batches
    and keeps the new state. This notebook trains a small byte-level GPT on the English text CPython ships
    (`pydoc_data.topics`), in well under a minute on a laptop CPU, then checks the result against `torch.optim`.
    """),
    py("""
    from pydoc_data.topics import topics

    import torch

    import ftrain
    from ftrain import losses, optim, schedules
    from ftrain.data import BatchStream
    from ftrain.models import GPT, GPTConfig

    # The help topics as bytes (tokens 0..255), cut into rows of 64; 90% to train, the rest to evaluate.
    text = "\\n\\n".join(topics[name] for name in sorted(topics))[:120_000]
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    rows = data[: len(data) // 64 * 64].view(-1, 64)
    train_rows, val_rows = rows[:-128], rows[-128:]
    print(f"{len(train_rows)} training rows, {len(val_rows)} validation rows of 64 bytes")
    """),
    md("""
    ## The loop

    The optimizer is an optax-style chain of pure transformations (clip, then AdamW with HF's weight-decay rule);
    the learning rate is a schedule, a function of the step. `BatchStream` gives the batch of step `k` as a function
    of `(seed, k)`, so a rerun sees the same data. `make_eval_step` builds the evaluation step from the same loss.
    """),
    py("""
    STEPS = 60
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, seq_len=64, n_layer=2, n_head=4, d_model=64, dropout=0.0))
    lr = schedules.get_schedule("cosine", 3e-3, num_warmup_steps=6, num_training_steps=STEPS)
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(lr, weight_decay=0.1, mask=optim.hf_decay_mask(model)))
    state = ftrain.TrainState.create(model, tx, key=0)


    def loss_fn(model, batch):
        return losses.cross_entropy(model(batch["input_ids"]), batch["input_ids"], shift=True)  # (sum, count)


    train_step, eval_step = ftrain.make_train_step(loss_fn), ftrain.make_eval_step(loss_fn)
    train_stream = BatchStream({"input_ids": train_rows}, batch_size=16, seed=0)
    val_stream = BatchStream({"input_ids": val_rows}, batch_size=64, shuffle=False)


    def evaluate(state, step_fn=eval_step):
        reducer = ftrain.metrics.Reducer()  # sums (loss_sum, count) over batches, divides once
        for batch in val_stream.iter_from(0):
            reducer.add(step_fn(state, batch))
        return reducer.compute()["loss"]


    initial_loss, running = evaluate(state), ftrain.metrics.RunningMean()
    for batch in train_stream.iter_from(0, stop=STEPS):
        state, metrics = train_step(state, batch)  # metrics are 0-d tensors: no host sync inside the loop
        running.add(metrics)
        if int(state.step) % 20 == 0:
            m = running.pop()
            print(
                f"step {int(state.step):3d}  loss {m['loss']:.3f}  "
                f"lr {m['learning_rate']:.2e}  grad norm {m['grad_norm']:.2f}"
            )
    final_loss = evaluate(state)
    print(f"validation loss {initial_loss:.3f} -> {final_loss:.3f}")
    """),
    md("""
    ## Is it right? The same steps with `torch.optim`

    The step is pure: the module we started from was never touched, so it still holds the initial weights. Training
    a copy of it with `torch.nn.utils.clip_grad_norm_`, `torch.optim.AdamW` (no decay for biases and LayerNorm
    weights) and a hand-written warmup + cosine schedule on the same batches must give the same parameters.

    Both run in float64 for this check. In float32 the two would differ in the last bits of every gradient, and
    Adam, which moves each weight by about `lr` whatever its gradient's size, turns that into a whole `±lr` on a
    weight whose gradient is rounding noise: no float32 tolerance on the weights is both safe and tight. In float64
    the same rounding stays near `1e-15`, and any real difference (another learning rate, a missing term) shows.
    """),
    py("""
    import copy
    import math

    assert int(state.step) == STEPS and state.params["wte.weight"] is not model.wte.weight
    model64 = copy.deepcopy(model).double()  # the initial weights: train_step returned new tensors, changed nothing
    ref = copy.deepcopy(model64)
    decay = set(optim.decay_parameter_names(ref))
    groups = [
        {"params": [p for n, p in ref.named_parameters() if n in decay], "weight_decay": 0.1},
        {"params": [p for n, p in ref.named_parameters() if n not in decay], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=3e-3)
    cosine = lambda s: s / 6 if s < 6 else 0.5 * (1 + math.cos(math.pi * (s - 6) / (STEPS - 6)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)

    check = ftrain.TrainState.create(model64, tx, key=0)
    for k in range(8):
        batch = train_stream.batch_at(k)
        check, _ = train_step(check, batch)
        opt.zero_grad()
        logits = ref(batch["input_ids"])[:, :-1]  # predict byte t + 1 from bytes up to t
        torch.nn.functional.cross_entropy(logits.reshape(-1, 256), batch["input_ids"][:, 1:].reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        sched.step()
    worst = max((check.params[n] - p).abs().max().item() for n, p in ref.named_parameters())
    print(f"largest difference from torch.optim after 8 steps, in float64: {worst:.1e}")
    assert worst < 1e6 * 2**-53, worst  # a million float64 roundings (2**-53 each): ~1e-10, far below a real change
    """),
    md("""
    ## Compiling (optional)

    `ftrain.jit` compiles a whole step with `torch.compile`. Compiling takes seconds to a minute on a CPU, which pays
    off only for long runs; here we compile the evaluation step and check that it agrees with the eager one.
    """),
    py("""
    compiled_loss = evaluate(state, step_fn=ftrain.jit(eval_step))
    # The compiled step fuses and reorders the same float32 arithmetic, so the two may differ by rounding. The mean
    # of 128 × 63 byte losses, each through ~1,800 roundings (2 layers of LayerNorms, matmuls over 64 and 256,
    # softmax over 64 positions; the log-sum-exp over 256 bytes), is off by at most γ_n ≈ n · 2**-24 relative on
    # each side, n ≈ 9,900 (Higham's bound for n operations in a row): about 1e-3 relative between the two.
    n = 128 * 63 + 1_824
    tolerance = 2 * n * 2**-24 * final_loss
    print(f"eager {final_loss:.6f}  compiled {compiled_loss:.6f}  (float32 rounding bound {tolerance:.1e})")
    assert abs(compiled_loss - final_loss) < tolerance
    """),
    md("""
    ## Summary

    The loss must have fallen from about `ln 256 = 5.55` (a uniform guess over bytes) by more than one nat.
    """),
    py("""
    assert abs(initial_loss - math.log(256)) < 0.3, initial_loss
    assert final_loss < initial_loss - 1.0, (initial_loss, final_loss)
    print(f"PURE_LOOP_OK steps={int(state.step)} val_loss={final_loss:.3f} torch_optim_diff={worst:.1e}")
    """),
]

# ----------------------------------------------------------------------------------------------------------
# 02 — a custom gradient transformation

CUSTOM_TRANSFORM: list[Cell] = [
    md("""
    # 02 · Writing and testing a gradient transformation

    An ftrain optimizer is a `GradientTransformation`: two pure functions, `init(params) -> state` and
    `update(updates, state, params) -> (updates, state)`, composed with `optim.chain`. Here we write **Signum**
    (sign of the gradient's momentum; Bernstein et al., 2018), chain it with clipping and a learning-rate schedule,
    and test it three ways: by hand, against a plain PyTorch loop, and against a built-in it should equal.

    The tests run in float64. Two computations of the same arithmetic in another order then agree to about `1e-16`,
    so a tight tolerance, `TOL` below, tells a real difference from rounding; in float32 a momentum that is rounding
    noise could take the other sign and move a weight by a whole learning rate.
    """),
    py("""
    from typing import NamedTuple

    import torch

    import ftrain
    from ftrain import optim, schedules, tree


    class SignumState(NamedTuple):
        momentum: dict  # a tree shaped like the params; a NamedTuple is a pytree, so checkpoints just work


    def scale_by_signum(beta: float = 0.9) -> optim.GradientTransformation:
        \"\"\"m = beta * m + (1 - beta) * g; the update is sign(m). Pure: new tensors, nothing mutated.\"\"\"

        def init(params):
            return SignumState(tree.tree_map(torch.zeros_like, params))

        def update(updates, state, params=None):
            momentum = tree.tree_map(lambda m, g: beta * m + (1 - beta) * g, state.momentum, updates)
            return tree.tree_map(torch.sign, momentum), SignumState(momentum)

        return optim.GradientTransformation(init, update)


    torch.set_default_dtype(torch.float64)  # the tests below build float64 tensors and modules
    TOL = 1e6 * 2**-53  # ~1.1e-10: a million float64 roundings (2**-53 each), far below any real difference
    """),
    md("""
    ## Test 1: by hand

    Two updates of a 3-element gradient with `beta = 0.9`: the momentum is `0.1 * g1`, then `0.9 * m1 + 0.1 * g2`.
    """),
    py("""
    tx = scale_by_signum(0.9)
    params = {"w": torch.zeros(3)}
    g1, g2 = torch.tensor([0.5, -2.0, 0.0]), torch.tensor([-1.0, 1.0, 0.1])
    state0 = tx.init(params)
    u1, state1 = tx.update({"w": g1}, state0, params)
    u2, state2 = tx.update({"w": g2}, state1, params)

    assert torch.equal(u1["w"], torch.tensor([1.0, -1.0, 0.0]))  # signs: exact
    assert torch.equal(u2["w"], torch.tensor([-1.0, -1.0, 1.0]))  # m2 = [-0.055, -0.08, 0.01]
    torch.testing.assert_close(state2.momentum["w"], torch.tensor([-0.055, -0.08, 0.01]), rtol=0, atol=TOL)
    assert torch.equal(state0.momentum["w"], torch.zeros(3)) and torch.equal(g1, torch.tensor([0.5, -2.0, 0.0]))
    print("by hand: OK; the old state and the gradients are unchanged")
    """),
    md("""
    ## Test 2: in a training step, against plain PyTorch

    Chained as clip → Signum → learning rate (with warmup and linear decay), inside `make_train_step`, on a small
    regression. The reference is the same algorithm written as an ordinary PyTorch loop: `backward`,
    `clip_grad_norm_`, momentum buffers, `p -= lr * sign(m)`.
    """),
    py("""
    STEPS, PEAK = 20, 0.05
    lr = schedules.get_schedule("linear", PEAK, num_warmup_steps=4, num_training_steps=STEPS)
    signum = optim.chain(optim.clip_by_global_norm(1.0), scale_by_signum(0.9), optim.scale_by_learning_rate(lr))

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = x @ torch.randn(8, 2, generator=g) + 0.1 * torch.randn(64, 2, generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    reference = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    reference.load_state_dict(model.state_dict())

    state = ftrain.TrainState.create(model, signum, key=0, copy=True)
    train_step = ftrain.make_train_step(lambda m, b: ftrain.losses.mse(m(b["x"]), b["y"]))
    buffers = [torch.zeros_like(p) for p in reference.parameters()]
    losses = []
    for step in range(STEPS):
        batch = {"x": x[step % 4 * 16 :][:16], "y": y[step % 4 * 16 :][:16]}
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))

        reference.zero_grad()
        torch.nn.functional.mse_loss(reference(batch["x"]), batch["y"]).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        step_lr = PEAK * (step / 4 if step < 4 else (STEPS - step) / (STEPS - 4))
        with torch.no_grad():
            for p, m in zip(reference.parameters(), buffers):
                m.mul_(0.9).add_(p.grad, alpha=0.1)
                p.sub_(step_lr * torch.sign(m))

    worst = max((state.params[n] - p).abs().max().item() for n, p in reference.named_parameters())
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; largest difference from the PyTorch loop {worst:.1e}")
    assert worst < TOL, worst
    assert losses[-1] < 0.5 * losses[0], losses
    """),
    md("""
    ## Test 3: Signum is Lion with `b1 = b2`

    Lion's update is `sign(b1 * m + (1 - b1) * g)` before its momentum moves to `b2 * m + (1 - b2) * g`; with
    `b1 = b2 = beta` both are Signum's new momentum. ftrain's built-in `scale_by_lion` must then give the same
    updates.
    """),
    py("""
    ours, lion = scale_by_signum(0.9), optim.scale_by_lion(0.9, 0.9)
    params = {"a": torch.zeros(5, 3), "b": torch.zeros(7)}
    s_ours, s_lion = ours.init(params), lion.init(params)
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
        u_ours, s_ours = ours.update(grads, s_ours, params)
        u_lion, s_lion = lion.update(grads, s_lion, params)
        # the momenta: the same values computed two ways (multiply-add here, lerp in Lion), so equal to rounding...
        torch.testing.assert_close(s_ours.momentum, s_lion.mu, rtol=0, atol=TOL)
        # ...and the updates, their signs, exactly: no momentum is within that rounding of 0
        assert all(torch.equal(u_ours[k], u_lion[k]) for k in params)
        assert min(m.abs().min().item() for m in s_ours.momentum.values()) > TOL
    torch.set_default_dtype(torch.float32)  # back to torch's default
    print("SIGNUM_OK: same updates as optim.scale_by_lion(0.9, 0.9) over 10 steps;", f"pytorch_diff={worst:.1e}")
    """),
]

# ----------------------------------------------------------------------------------------------------------
# 03 — from transformers.Trainer to ftrain.Trainer

HF_TRAINER: list[Cell] = [
    md("""
    # 03 · From `transformers.Trainer` to `ftrain.Trainer`

    `ftrain.Trainer` speaks the Hugging Face `Trainer` API: an existing script moves over by changing one import.
    Below is transformers' quick start — `TrainingArguments(output_dir, num_train_epochs,
    per_device_train_batch_size, learning_rate)` then `Trainer(model, args, train_dataset).train()` — on a tiny
    GPT-2 built from a config (nothing is downloaded) and byte tokens of Python's help text. It runs twice, once per
    import, and the logged losses are compared step by step.
    """),
    py("""
    from pydoc_data.topics import topics

    import datasets
    import torch
    import transformers

    text = "\\n\\n".join(topics[name] for name in sorted(topics))
    ids = torch.frombuffer(bytearray(text.encode("utf-8")[: 48 * 32]), dtype=torch.uint8).long().view(48, 32).tolist()
    train_dataset = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    config = transformers.GPT2Config(
        vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip


    def quickstart(Trainer, TrainingArguments, output_dir):
        \"\"\"The quick start script; only the two names passed in differ between the runs.\"\"\"
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(config)
        model.loss_type = "ForCausalLM"  # transformers' documented token count for the causal-LM loss
        args = TrainingArguments(
            output_dir=output_dir,
            num_train_epochs=2,
            per_device_train_batch_size=8,
            learning_rate=3e-3,
            logging_steps=1,  # added to both runs: a loss every step
            train_sampling_strategy="sequential",  # added to both runs: the same batches in the same order
            report_to="none",  # added to both runs: no TensorBoard files, no progress bars
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=train_dataset)
        trainer.train()
        return trainer
    """),
    md("""
    ## The same script, two imports
    """),
    py("""
    from transformers import Trainer, TrainingArguments

    hf = quickstart(Trainer, TrainingArguments, "hf_run")
    """),
    py("""
    from ftrain import Trainer, TrainingArguments

    ft = quickstart(Trainer, TrainingArguments, "ftrain_run")
    """),
    md("""
    ## The logged losses, side by side

    Same model, same data order, same AdamW and linear schedule, in float32 as the quick start runs: the two runs
    compute the same mathematics by different code, so they differ by float32 rounding, and Adam spreads it. Adam
    moves every weight by about `lr` whatever its gradient's size, so a weight whose gradient is rounding noise can
    move `+lr` in one run and `-lr` in the other; but such a weight barely moves the loss (its gradient is about 0),
    so the losses still agree closely. The bound below, to first order: a loss computed through `n` float32
    roundings is off by `ρ = 2·n·2**-24` relative between two runs, and after `k` steps the weights' drift moves it
    by at most `2·lr·k·ρ·‖g‖₁ ≤ 2·lr·k·ρ·√N·‖g‖₂` (`N` weights, `‖g‖₂` the gradient norm both trainers log).
    """),
    py("""
    import math


    def logged(trainer, key="loss"):
        return [(e["step"], e[key]) for e in trainer.state.log_history if key in e]


    hf_log, ft_log = logged(hf), logged(ft)
    print(f"{'step':>4}  {'transformers':>12}  {'ftrain':>10}  rel. diff")
    for (step, a), (_, b) in zip(hf_log, ft_log):
        print(f"{step:4d}  {a:12.6f}  {b:10.6f}  {abs(a - b) / a:.1e}")

    assert [s for s, _ in ft_log] == [s for s, _ in hf_log] == list(range(1, 13))
    # n: the 8 × 31 tokens of a step, and ~1,060 roundings along one token's forward (2 layers of LayerNorms and
    # matmuls over 32 and 128, softmax over 32 positions; the log-sum-exp over 256 bytes), as many backward
    rho = 2 * (8 * 31 + 2 * 1_056) * 2**-24
    n_weights = sum(p.numel() for p in ft.model.parameters())
    grad_norm = max(g for _, g in logged(hf, "grad_norm") + logged(ft, "grad_norm"))
    bound = rho * (1 + 2 * 3e-3 * 11 * math.sqrt(n_weights) * grad_norm / min(b for _, b in ft_log))  # k <= 11
    worst = max(abs(a - b) / a for (_, a), (_, b) in zip(hf_log, ft_log))
    print(f"largest relative difference {worst:.1e}; float32 bound {bound:.1e}")
    assert worst < bound, (worst, bound)
    assert ft_log[-1][1] < ft_log[0][1] - 0.5  # and it learns
    """),
    md("""
    ## What else moves over

    The model the trainer holds is an ordinary `transformers` model with the trained weights, and the checkpoint
    folder has the layout users know (`checkpoint-12/model.safetensors`, `trainer_state.json`, ...).
    `logging_dir`, which older quick starts pass, was removed in transformers 5; ftrain still accepts it and warns.
    """),
    py("""
    import os
    import warnings

    # The weights: in float32, a weight whose gradient is rounding noise can end 2·lr·12 apart in the two runs (Adam,
    # above), so that is all a comparison of weights can promise here; the losses above are the close comparison.
    hf_params = dict(hf.model.named_parameters())
    param_diff = max((p - hf_params[n]).abs().max().item() for n, p in ft.model.named_parameters())
    assert param_diff <= 2 * 3e-3 * 12, param_diff
    assert {"model.safetensors", "trainer_state.json"} <= set(os.listdir("ftrain_run/checkpoint-12"))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TrainingArguments(output_dir="ftrain_run", logging_dir="ftrain_run/logs", report_to="none")
    assert any("logging_dir" in str(w.message) for w in caught)
    diffs = f"max_rel_loss_diff={worst:.1e} bound={bound:.1e} max_param_diff={param_diff:.1e}"
    print(f"HF_TRAINER_OK steps={len(ft_log)} {diffs}")
    """),
]

# ----------------------------------------------------------------------------------------------------------
# 04 — determinism

DETERMINISM: list[Cell] = [
    md("""
    # 04 · Determinism: kill, resume, compare the bits

    A checkpoint holds everything that determines the rest of a run: the step, parameters, optimizer state and RNG
    key, and — because the batch of step `k` is a function of `(seed, k)` — the data position too. So a run that is
    killed at step 7, resumed from its checkpoint at step 4 and trained to step 12 must end with **the same bits**
    as a run that never stopped. Dropout is on, so the RNG has to be right as well.
    """),
    py("""
    import shutil
    import tempfile

    import torch

    import ftrain
    from ftrain import losses, optim, schedules
    from ftrain.checkpoint import CheckpointManager, CheckpointManagerOptions
    from ftrain.data import BatchStream
    from ftrain.models import GPT, GPTConfig

    N, KILL_AT, EVERY = 12, 7, 4  # train 12 steps; the crash comes at step 7; a checkpoint every 4 steps
    CONFIG = GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32, dropout=0.1)
    rows = torch.randint(0, 64, (40, 16), generator=torch.Generator().manual_seed(1))
    stream = BatchStream({"input_ids": rows}, batch_size=8, seed=0)  # 5 steps per epoch, reshuffled each epoch
    train_step = ftrain.make_train_step(
        lambda model, batch: losses.cross_entropy(model(batch["input_ids"]), batch["input_ids"], shift=True)
    )


    def new_state(init_seed):
        torch.manual_seed(init_seed)
        lr = schedules.get_schedule("linear", 1e-2, num_warmup_steps=2, num_training_steps=N)
        tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(lr, weight_decay=0.1))
        return ftrain.TrainState.create(GPT(CONFIG), tx, key=0)


    def train(state, stop, manager=None):
        for batch in stream.iter_from(int(state.step), stop=stop):  # the data position is state.step
            state, _ = train_step(state, batch)
            if manager is not None:
                manager.save(int(state.step), state)  # writes only when the policy says the step is due
        return state
    """),
    md("""
    ## The uninterrupted run
    """),
    py("""
    reference = train(new_state(init_seed=0), N)
    print(reference)
    """),
    md("""
    ## The run that crashes

    Same start, a `CheckpointManager` saving every 4 steps; it stops at step 7 and everything in memory is dropped.
    """),
    py("""
    directory = tempfile.mkdtemp(prefix="ftrain-determinism-")
    options = CheckpointManagerOptions(save_interval_steps=EVERY)
    manager = CheckpointManager(directory, options)
    crashed = train(new_state(init_seed=0), KILL_AT, manager)
    assert int(crashed.step) == KILL_AT and manager.all_steps() == [4]
    manager.close()
    del crashed, manager  # the "kill": only the files on disk survive
    """),
    md("""
    ## Resume

    A new process would build a fresh state — here with *different* initial weights, and a scrambled global RNG, to
    show that nothing but the checkpoint carries over — and restore onto it. The stream goes on from `state.step`.
    """),
    py("""
    torch.manual_seed(12345)
    template = new_state(init_seed=1)
    manager = CheckpointManager(directory, options)
    state = manager.restore(like=template)  # the newest good checkpoint: step 4
    assert int(state.step) == 4
    assert not torch.equal(state.params["wte.weight"], template.params["wte.weight"])
    resumed = train(state, N, manager)
    print(resumed, "checkpoints:", manager.all_steps())
    manager.close()
    """),
    md("""
    ## Compare the bits

    Every leaf of the two final states — step, parameters, buffers, the AdamW moments and counts, the RNG key —
    must be equal, not merely close. As a control, resuming with the data restarted at step 0 instead of step 4
    must *not* give the same bits (the comparison can fail).
    """),
    py("""
    def leaves(state):
        paths, values, _ = ftrain.tree.tree_flatten_with_path(state)
        return {ftrain.tree.keystr(p): v for p, v in zip(paths, values)}


    ref_leaves, res_leaves = leaves(reference), leaves(resumed)
    assert ref_leaves.keys() == res_leaves.keys()
    different = [k for k, v in ref_leaves.items() if not torch.equal(v, res_leaves[k])]
    assert not different, different

    with CheckpointManager(directory, options) as manager:
        restored = manager.restore(4, like=template)
    for batch in stream.iter_from(0, stop=N - 4):  # wrong: the data position should be step 4
        restored, _ = train_step(restored, batch)
    wrong = leaves(restored)
    assert any(not torch.equal(v, wrong[k]) for k, v in ref_leaves.items() if k.startswith("['params']"))
    shutil.rmtree(directory)
    print(f"DETERMINISM_OK {len(ref_leaves)} leaves bitwise equal after kill at step {KILL_AT} and resume from step 4")
    """),
]

NOTEBOOKS: dict[str, list[Cell]] = {
    "01_pure_loop.ipynb": PURE_LOOP,
    "02_custom_transform.ipynb": CUSTOM_TRANSFORM,
    "03_hf_trainer.ipynb": HF_TRAINER,
    "04_determinism.ipynb": DETERMINISM,
}


def build(cells: list[Cell]) -> nbformat.NotebookNode:
    """A notebook (nbformat 4, no outputs, Python 3 kernel) from ``cells``.

    Cell ids are the cell's position, so rebuilding an unchanged notebook writes the same bytes.
    """
    nb = new_notebook(
        metadata={
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        }
    )
    for i, (kind, source) in enumerate(cells):
        cell = new_markdown_cell(source) if kind == "md" else new_code_cell(source)
        cell["id"] = f"cell-{i:02d}"
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    stale = []
    for name, cells in NOTEBOOKS.items():
        text = nbformat.writes(build(cells)) + "\n"
        path = HERE / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python notebooks/_build.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
