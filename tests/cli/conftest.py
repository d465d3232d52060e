"""Fixtures of the ``ftrain`` command tests: one tiny run shared by every test that reads a run.

The recipes set ``train.threads: 1`` themselves (restored after each run), so nothing here changes torch's threads.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # cli_helpers.py lives next to this file
from cli_helpers import TINY, call  # noqa: E402


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny gpt run of 6 steps (checkpoints at 2, 4, 6), shared by the tests that read a run: (dir, stdout)."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    rc, out, err = call("train", *TINY, "--train.steps", "6", "--log.output-dir", str(run_dir))
    assert rc == 0, err
    return run_dir, out
