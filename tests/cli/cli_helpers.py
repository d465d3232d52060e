"""Helpers for the ``ftrain`` command tests: a tiny GPT recipe, in-process and subprocess runs."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/tolerances.py
from tolerances import adam_loss_drift, reduction_rtol  # noqa: E402

from ftrain.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# The default gpt recipe shrunk to a 1-layer, 32-wide model on 32-byte windows: a step takes milliseconds.
TINY = [
    "--model.n-layer", "1", "--model.n-head", "2", "--model.d-model", "32", "--model.seq-len", "32",
    "--train.batch-size", "4", "--train.eval-batches", "2", "--train.eval-every", "0",
    "--log.every", "2", "--checkpoint.every", "2", "--checkpoint.keep", "None", "--log.no-tensorboard",
    "--log.no-plot",
]  # fmt: skip


# The ftrain command trains float32 (recipes have no dtype), so its comparisons of two runs get float32 tolerances
# derived from what they compare. One token's loss in the TINY model passes through reductions of these lengths, each
# term rounding once (Higham's γ_n bounds such a chain like a sum of n terms): LayerNorm (32), qkv (32), scores (16 per
# head), softmax (32 positions), weights · values (32), projection (32), LayerNorm (32), fc (32), fc_out (128) in its
# one layer; then LayerNorm (32), lm_head (32) and the log-sum-exp over the 256 bytes. The backward runs as many.
FORWARD_CHAIN = (32 + 32 + 16 + 32 + 32 + 32 + 32 + 32 + 128) + 32 + 32 + 256  # 688
TOKENS_PER_STEP = 4 * 31  # --train.batch-size 4 windows of 32 bytes, 31 predicted bytes each
VAL_TOKENS = 2 * TOKENS_PER_STEP  # --train.eval-batches 2


def loss_rtol(
    tokens: int, *, steps: int = 0, lr: float = 2e-3, n_params: int = 0, grad_norm: float = 0.0, loss: float = 1.0
) -> float:
    """Relative tolerance between the float32 losses of two runs of the same mathematics (another process count,
    compiled vs eager) after ``steps`` AdamW steps of peak ``lr``: the loss's own rounding plus a first-order estimate
    of what the params' drift does to it.

    - The loss: a mean over ``tokens`` of per-token losses, each through ``FORWARD_CHAIN`` roundings, on each side:
      ``reduction_rtol(FORWARD_CHAIN + tokens)``.
    - The drift: the two runs' gradients differ by rounding, relative ρ = ``reduction_rtol(2·FORWARD_CHAIN + tokens)``
      (forward, backward and the sum over tokens), which Adam carries into the loss as
      :func:`tolerances.adam_loss_drift` (for a validation loss the largest training gradient norm stands in for its
      gradient's: the same loss on other text of the same kind), divided by ``loss`` to make it relative.

    For the TINY runs (≈ 22k params, ‖g‖₂ ≈ 2, 3 steps, loss ≈ 5.3) this is ≈ 2e-4 relative; a rank that sees the
    wrong rows, a token counted twice or missed, or a step of lr moves the loss by 1e-3 or more. Seen: ≈ 1e-7."""
    drift = adam_loss_drift(lr, steps, reduction_rtol(2 * FORWARD_CHAIN + tokens), n_params, grad_norm)
    return reduction_rtol(FORWARD_CHAIN + tokens) + drift / loss


def call(*args: str) -> tuple[int, str, str]:
    """``ftrain ARGS`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as e:  # tyro's usage errors
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m ftrain ARGS`` in a subprocess (one thread: the machine is shared)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "ftrain", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


def records(run_dir: Path, *, timing: bool = False) -> list[dict]:
    """The run's metrics.jsonl records, without the timing fields unless asked."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    return recs if timing else [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in recs]


def final_tensors(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """Every tensor of the state saved at ``step``."""
    return load_file(run_dir / "checkpoints" / f"step_{step:08d}" / "state.safetensors")


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []


def assert_losses_match(got: list[dict], want: list[dict], n_params: int) -> None:
    """Two float32 TINY runs of the same mathematics logged the same records, each loss within :func:`loss_rtol`
    (train records: the loss of that step, after step - 1 updates; val records: after step updates)."""
    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in want]
    grad_norm = max(r["grad_norm"] for r in got + want if r["split"] == "train")
    for a, b in zip(got, want):
        train = a["split"] == "train"
        rtol = loss_rtol(
            TOKENS_PER_STEP if train else VAL_TOKENS,
            steps=a["step"] - 1 if train else a["step"],
            n_params=n_params,
            grad_norm=grad_norm,
            loss=min(a["loss"], b["loss"]),
        )
        assert abs(a["loss"] - b["loss"]) <= rtol * abs(b["loss"]), (a, b, rtol)


def n_params(run_dir: Path, step: int) -> int:
    """The number of parameter values the run saved at ``step``."""
    return sum(v.numel() for k, v in final_tensors(run_dir, step).items() if k.startswith("['params']"))
