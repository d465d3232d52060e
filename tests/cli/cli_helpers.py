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

from ftrain.cli import main

REPO = Path(__file__).resolve().parents[2]
# The default gpt recipe shrunk to a 1-layer, 32-wide model on 32-byte windows: a step takes milliseconds.
TINY = [
    "--model.n-layer", "1", "--model.n-head", "2", "--model.d-model", "32", "--model.seq-len", "32",
    "--train.batch-size", "4", "--train.eval-batches", "2", "--train.eval-every", "0",
    "--log.every", "2", "--checkpoint.every", "2", "--checkpoint.keep", "None", "--log.no-tensorboard",
    "--log.no-plot",
]  # fmt: skip


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
