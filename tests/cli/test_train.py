"""``ftrain train`` / ``eval`` / ``info`` / ``generate`` on one shared tiny run: reruns and resumes give the same
bits, eval reproduces the validation loss train logged, info shows what was saved."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # cli_helpers.py lives next to this file
from cli_helpers import (  # noqa: E402
    FORWARD_CHAIN,
    REPO,
    TINY,
    assert_bitwise_equal,
    call,
    final_tensors,
    records,
    run_cli,
)
from tolerances import gamma  # noqa: E402

import ftrain.recipes.digits as digits_recipe  # noqa: E402
from ftrain.models import GPT, GPTConfig  # noqa: E402


def test_train_logs_every_step_checkpoint_and_final_validation(tiny_run):
    run_dir, out = tiny_run
    recs = records(run_dir)
    assert [(r["step"], r["split"]) for r in recs] == [(2, "train"), (4, "train"), (6, "train"), (6, "val")]
    val = recs[-1]
    assert val["perplexity"] == math.exp(val["loss"])  # the recipe's math.exp of this very float: bitwise
    assert val["loss"] < math.log(256)  # better than uniform over the bytes after 6 steps
    assert f"final validation perplexity {val['perplexity']:.4f}  (loss {val['loss']:.4f})" in out
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step_{s:08d}" for s in (2, 4, 6)]


def test_rerun_with_the_same_seed_is_bitwise_identical(tiny_run, tmp_path):
    run_dir, out = tiny_run
    threads = torch.get_num_threads()
    rc, out2, err = call("train", *TINY, "--train.steps", "6", "--log.output-dir", str(tmp_path / "again"))
    assert rc == 0, err
    assert torch.get_num_threads() == threads  # train.threads is restored after the run
    assert records(tmp_path / "again") == records(run_dir)
    printed = [[x for x in text.splitlines() if x.startswith("step")] for text in (out, out2)]
    assert printed[0] == printed[1] and len(printed[0]) == 4
    assert_bitwise_equal(final_tensors(tmp_path / "again", 6), final_tensors(run_dir, 6))


def test_another_seed_gives_another_run(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    rc, _, err = call("train", *TINY, "--train.steps", "2", "--train.seed", "1", "--log.output-dir", str(tmp_path))
    assert rc == 0, err
    assert records(tmp_path)[0]["loss"] != records(run_dir)[0]["loss"]


def test_resume_after_a_kill_ends_bitwise_equal_to_the_uninterrupted_run(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    killed = tmp_path / "killed"
    shutil.copytree(run_dir, killed)  # a run killed after step 5: checkpoint 2 survives, metrics logged up to 6
    for step in (4, 6):
        shutil.rmtree(killed / "checkpoints" / f"step_{step:08d}")
    (killed / "checkpoints" / ".tmp-step_00000004-dead").mkdir()  # a half-written checkpoint is never resumed
    rc, out, err = call("train", *TINY, "--train.steps", "6", "--log.output-dir", str(killed), "--resume")
    assert rc == 0, err
    assert "resuming from" in out and "(step 2)" in out
    assert records(killed) == records(run_dir)  # the records after step 2 were replaced, not duplicated
    assert_bitwise_equal(final_tensors(killed, 6), final_tensors(run_dir, 6))


def test_resume_with_another_recipe_is_refused(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    shutil.copytree(run_dir, tmp_path / "r")
    rc, _, err = call(
        "train", *TINY, "--train.steps", "6", "--optim.lr", "0.5", "--log.output-dir", str(tmp_path / "r"), "--resume"
    )
    assert rc == 2
    assert "optim.lr: 0.002 -> 0.5" in err and "Traceback" not in err and err.count("\n") == 1


def test_train_refuses_to_overwrite_a_run_and_resume_needs_a_checkpoint(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    rc, _, err = call("train", *TINY, "--train.steps", "6", "--log.output-dir", str(run_dir))
    assert rc == 2 and "already holds checkpoints (latest step 6): pass --resume" in err
    rc, _, err = call("train", *TINY, "--log.output-dir", str(tmp_path / "empty"), "--resume")
    assert rc == 2 and "--resume: no checkpoint in" in err


def test_eval_reproduces_the_validation_loss_train_logged(tiny_run):
    run_dir, _ = tiny_run
    rc, out, err = call("eval", str(run_dir))
    assert rc == 0, err
    result = json.loads(out.splitlines()[-1])
    val = records(run_dir)[-1]
    # bitwise: the same evaluation function on the same weights, batches and thread count (train.threads: 1)
    assert (result["step"], result["val_loss"], result["val_perplexity"]) == (6, val["loss"], val["perplexity"])


def test_eval_is_an_independent_forward_pass(tiny_run):
    """The eval command's loss equals a plain torch forward of the saved weights on the first validation bytes.

    The reference runs in float64 on the float32 weights (converted exactly), so it is exact to ~1e-16 and the
    difference is the command's own float32 rounding: each of the 20 × 31 per-byte losses goes through
    FORWARD_CHAIN roundings and their mean through 620 more, γ_(688 + 620) ≈ 7.8e-5 relative; one byte counted
    twice or missed moves the mean by ~1/620 ≈ 1.6e-3 of its spread."""
    run_dir, _ = tiny_run
    rc, out, _ = call("eval", str(run_dir / "checkpoints" / "step_00000004"), "--batches", "5")  # 5 x 4 windows
    assert rc == 0
    tensors = final_tensors(run_dir, 4)
    model = GPT(GPTConfig(vocab_size=256, seq_len=32, n_layer=1, n_head=2, d_model=32, dropout=0.1)).eval().double()
    state = {k.split("']['")[1].rstrip("']"): v.double() for k, v in tensors.items() if k.startswith("['params']")}
    model.load_state_dict(state, strict=False)  # lm_head.weight is tied to wte.weight
    from pydoc_data.topics import topics

    data = torch.tensor(list("\n\n".join(topics[n] for n in sorted(topics)).encode()))
    val = data[int(0.9 * len(data)) :]
    windows = val[: 20 * 32].view(20, 32)
    with torch.no_grad():
        logits = model(windows)
        ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), windows[:, 1:].reshape(-1))
    rtol = gamma(FORWARD_CHAIN + 20 * 31)
    assert json.loads(out.splitlines()[-1])["val_loss"] == pytest.approx(ref.item(), rel=rtol, abs=0)


def test_info_lists_step_shapes_metrics_and_recipe(tiny_run):
    run_dir, _ = tiny_run
    rc, out, _ = call("info", str(run_dir))
    assert rc == 0
    assert "step         6" in out
    assert "['params']['wte.weight']" in out and "float32   [256, 32]" in out
    assert "['params']['blocks.0.fc.weight']" in out and "float32   [128, 32]" in out
    n_params = sum(v.numel() for k, v in final_tensors(run_dir, 6).items() if k.startswith("['params']"))
    assert f"params       {n_params // 1} " in out or f"{n_params:,} values" in out
    val = records(run_dir)[-1]
    assert f"val_loss {val['loss']:.6g}" in out
    assert "task: gpt" in out and "n_layer: 1" in out and "steps: 6" in out
    rc, out4, _ = call("info", str(run_dir / "checkpoints" / "step_00000004"))
    assert rc == 0 and "step         4" in out4


def test_generate_is_seeded_and_continues_the_prompt(tiny_run):
    run_dir, _ = tiny_run
    args = ["generate", str(run_dir), "--prompt", "The ", "--max-new-tokens", "20", "--temperature", "1.0"]
    (rc1, a, _), (rc2, b, _), (rc3, c, _) = call(*args), call(*args), call(*args, "--seed", "7")
    assert rc1 == rc2 == rc3 == 0
    assert a == b and a != c and a.startswith("The ")
    rc, greedy, _ = call(*args[:-2], "--temperature", "0")
    assert rc == 0 and greedy == call(*args[:-2], "--temperature", "0", "--seed", "9")[1]  # greedy ignores the seed


def test_default_recipe_end_to_end_with_few_steps(tmp_path):
    """The real default recipe (model, data, logging, TensorBoard, plot) through `python -m ftrain`, 3 steps."""
    proc = run_cli("train", "--train.steps", "3", "--log.every", "1", "--log.output-dir", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out_dir = tmp_path / "out"
    assert (out_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out_dir / "tensorboard").glob("events.out.tfevents.*"))
    recs = records(out_dir, timing=True)
    assert [r["step"] for r in recs if r["split"] == "train"] == [1, 2, 3]
    assert all(r["tokens_per_s"] > 0 for r in recs[1:] if r["split"] == "train")
    val = recs[-1]
    assert 0 < val["loss"] < math.log(256) + 0.1  # 3 steps from a uniform guess over bytes (ln 256): near it
    assert "842,496 parameters" in proc.stdout  # the default model: 4 layers, d_model 128, 256 byte vocabulary
    assert f"final validation perplexity {val['perplexity']:.4f}" in proc.stdout
    for line in ("checkpoints ", "metrics ", "tensorboard ", "loss curve "):
        assert line in proc.stdout
    assert "loss=" in proc.stderr and "tokens/s=" in proc.stderr  # the progress bar
    # examples/train_gpt.py, a hand-written loop over the same core, lands on the same validation loss: the same
    # kernels on the same batches in the same order on one thread, so the same bits, and the same printed digits.
    example = subprocess.run(
        [sys.executable, str(REPO / "examples" / "train_gpt.py"), "--steps", "3"], capture_output=True, text=True
    )
    assert example.returncode == 0, example.stderr
    assert f"validation loss {val['loss']:.4f}  perplexity {val['perplexity']:.3f}" in example.stdout


def _blobs(n: int = 600, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten well-separated 64-d clusters, standing in for load_digits when scikit-learn is absent."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(10, 64, generator=g)
    y = torch.arange(n) % 10
    return (centers[y] + 0.15 * torch.randn(n, 64, generator=g)).clamp(0, 1), y


def test_classifier_recipe_reports_accuracy_above_chance(tmp_path, monkeypatch):
    monkeypatch.setattr(digits_recipe, "load_arrays", _blobs)
    rc, out, err = call("train", "digits", "--train.steps", "60", "--log.output-dir", str(tmp_path), "--log.no-plot")
    assert rc == 0, err
    val = records(tmp_path)[-1]
    assert val["split"] == "val" and val["accuracy"] > 0.9  # chance is 0.1
    assert f"final validation accuracy {val['accuracy']:.4f}" in out
    rc, _, err = call("generate", str(tmp_path))
    assert rc == 2 and "not a language model" in err


def test_digits_recipe_on_scikit_learn_digits(tmp_path):
    pytest.importorskip("sklearn")
    rc, _, err = call("train", "digits", "--train.steps", "150", "--log.output-dir", str(tmp_path), "--log.no-plot")
    assert rc == 0, err
    assert records(tmp_path)[-1]["accuracy"] > 0.9  # chance is 0.1
