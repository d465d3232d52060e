"""``train.compile``: the compiled run resumes bitwise and agrees with the eager run to rounding.

Bitwise: the resumed compiled run against the uninterrupted compiled one (the same compiled kernels on the same
values, in one process). Compiled vs eager is the same mathematics by other kernels (inductor fuses and reorders), in
float32 as the command trains: cli_helpers.loss_rtol derives that tolerance (≈ 2e-4 relative here)."""

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # cli_helpers.py lives next to this file
from cli_helpers import (  # noqa: E402
    TINY,
    assert_bitwise_equal,
    assert_losses_match,
    call,
    final_tensors,
    n_params,
    records,
)


@pytest.mark.compiled
def test_compiled_run_resumes_bitwise_and_matches_eager(tmp_path):
    args = ["train", *TINY, "--train.steps", "4", "--model.dropout", "0.0", "--log.every", "1"]
    rc, _, err = call(*args, "--train.compile", "--log.output-dir", str(tmp_path / "compiled"))
    assert rc == 0, err
    shutil.copytree(tmp_path / "compiled", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_00000004")
    rc, _, err = call(*args, "--train.compile", "--log.output-dir", str(tmp_path / "resumed"), "--resume")
    assert rc == 0, err
    assert records(tmp_path / "resumed") == records(tmp_path / "compiled")
    assert_bitwise_equal(final_tensors(tmp_path / "resumed", 4), final_tensors(tmp_path / "compiled", 4))
    rc, _, err = call(*args, "--train.no-compile", "--log.output-dir", str(tmp_path / "eager"))
    assert rc == 0, err
    compiled, eager = records(tmp_path / "compiled"), records(tmp_path / "eager")
    assert_losses_match(compiled, eager, n_params(tmp_path / "eager", 4))  # compilation never changes meaning
