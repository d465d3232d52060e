"""``ftrain train --nproc 2``: two processes under torch.distributed.run train what one process trains.

The command trains float32 (recipes have no dtype), so the losses are compared with float32 tolerances derived in
cli_helpers.loss_rtol: the loss's rounding plus a first-order estimate of Adam's drift, ≈ 2e-4 relative here."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # cli_helpers.py lives next to this file
from cli_helpers import (  # noqa: E402
    TINY,
    VAL_TOKENS,
    assert_losses_match,
    call,
    loss_rtol,
    n_params,
    records,
    run_cli,
)

# Dropout off: each rank draws its own dropout masks, so only the dropout-free run is comparable number for number.
# A record every step: the first is the loss of the initial weights, which no optimizer step has touched yet.
ARGS = ["train", *TINY, "--train.steps", "4", "--model.dropout", "0.0", "--log.every", "1"]


def test_two_processes_match_one_process(tmp_path):
    proc = run_cli(*ARGS, "--nproc", "2", "--log.output-dir", "two", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rc, _, err = call(*ARGS, "--log.output-dir", str(tmp_path / "one"))
    assert rc == 0, err
    two, one = records(tmp_path / "two"), records(tmp_path / "one")
    assert_losses_match(two, one, n_params(tmp_path / "one", 4))
    assert proc.stdout.count("final validation perplexity") == 1  # rank 0 reports, once
    # The sharded (DCP) checkpoint is read back by a single process: eval gives the validation loss logged. The
    # same weights (restored bitwise), summed over 1 process instead of 2: only the loss's own rounding differs.
    rc, out, err = call("eval", str(tmp_path / "two"))
    assert rc == 0, err
    val_loss = json.loads(out.splitlines()[-1])["val_loss"]
    assert abs(val_loss - two[-1]["loss"]) <= loss_rtol(VAL_TOKENS) * two[-1]["loss"]
