"""``ftrain train --nproc 2``: two processes under torch.distributed.run train what one process trains."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # cli_helpers.py lives next to this file
from cli_helpers import TINY, call, records, run_cli  # noqa: E402

# Dropout off: each rank draws its own dropout masks, so only the dropout-free run is comparable number for number.
ARGS = ["train", *TINY, "--train.steps", "4", "--model.dropout", "0.0"]


def test_two_processes_match_one_process(tmp_path):
    proc = run_cli(*ARGS, "--nproc", "2", "--log.output-dir", "two", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rc, _, err = call(*ARGS, "--log.output-dir", str(tmp_path / "one"))
    assert rc == 0, err
    two, one = records(tmp_path / "two"), records(tmp_path / "one")
    assert [(r["step"], r["split"]) for r in two] == [(r["step"], r["split"]) for r in one]
    for a, b in zip(two, one):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (a, b)
    assert proc.stdout.count("final validation perplexity") == 1  # rank 0 reports, once
    # The sharded (DCP) checkpoint is read back by a single process: eval gives the validation loss logged.
    rc, out, err = call("eval", str(tmp_path / "two"))
    assert rc == 0, err
    assert abs(json.loads(out.splitlines()[-1])["val_loss"] - two[-1]["loss"]) < 1e-6
