"""Bad input to the ``ftrain`` command ends with one clear message on stderr and exit status 2, no traceback."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # cli_helpers.py lives next to this file
from cli_helpers import call, run_cli  # noqa: E402


def _one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_unknown_recipe_key_on_the_command_line_through_python_m(tmp_path):
    proc = run_cli("train", "--train.stepz", "3", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "Unrecognized options: --train.stepz" in proc.stderr and "--train.steps INT" in proc.stderr  # suggestion
    assert not (tmp_path / "runs").exists()  # nothing was trained or written


def test_missing_checkpoint_directory_through_python_m(tmp_path):
    proc = run_cli("eval", str(tmp_path / "nope"))
    assert proc.returncode == 2
    assert _one_line(proc.stderr) == (
        f"ftrain eval: error: '{tmp_path / 'nope'}' does not exist; give a run directory (the recipe's "
        "log.output_dir) or one of its checkpoints"
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "--train.steps", "abc"], "Error parsing --train.steps: invalid literal for int()"),
        (["train", "--optim.name", "adamx"], "--optim.name"),
        (["train", "--train.steps", "0"], "train.steps: must be >= 1, got 0"),
        (["train", "--train.batch-size", "6", "--train.accum", "4"], "train.batch_size: 6 is not divisible by"),
    ],
)
def test_usage_errors_name_the_flag(args, expected):
    rc, out, err = call(*args)
    assert rc == 2 and expected in err and "Traceback" not in err and out == ""


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "gtp"], "ftrain train: error: unknown recipe 'gtp' (did you mean 'gpt'?): give a built-in recipe"),
        (["train", "missing.yaml"], "ftrain train: error: recipe file 'missing.yaml' does not exist"),
        (["frobnicate"], "ftrain: error: unknown command 'frobnicate'; the commands are train, eval, generate, info"),
        (["train", "--nproc", "0"], "ftrain train: error: --nproc must be >= 1, got 0"),
        (["train", "--nproc", "2", "--parallel.dp-replicate", "3"], "ftrain train: error: parallel: ParallelConfig:"),
        (
            ["train", "--nproc", "2", "--parallel.tp", "2"],
            "ftrain train: error: parallel: cp=1, tp=2: the ftrain command",
        ),
    ],
)
def test_bad_names_are_one_line_errors(args, expected):
    rc, _, err = call(*args)
    assert rc == 2
    assert _one_line(err).startswith(expected)


def test_bad_recipe_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("task: gpt\noptim:\n  lr: fast\n")
    rc, _, err = call("train", str(path))
    assert rc == 2
    assert _one_line(err) == "ftrain train: error: mine.yaml: recipe key 'optim.lr' must be float, got 'fast' (str)"


def test_a_directory_without_checkpoints(tmp_path):
    rc, _, err = call("info", str(tmp_path))
    assert rc == 2 and _one_line(err).startswith(f"ftrain info: error: no checkpoint in '{tmp_path}'")
    rc, _, err = call("info", str(tmp_path), "--step", "3")
    assert rc == 2


def test_no_command_prints_usage():
    rc, out, _ = call()
    assert rc == 2 and "ftrain train [RECIPE]" in out


def test_readers_never_touch_a_save_in_progress(tiny_run):
    run_dir, _ = tiny_run
    writing = run_dir / "checkpoints" / ".tmp-step_00000008-123"
    writing.mkdir()
    try:
        rc, _, err = call("info", str(run_dir))
        assert rc == 2 and "holds an unfinished save (.tmp-step_00000008-123)" in _one_line(err)
        assert writing.is_dir()  # opening a CheckpointManager would have removed it
    finally:
        writing.rmdir()
