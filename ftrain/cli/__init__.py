"""The ``ftrain`` command: train a recipe, then evaluate, sample from and inspect its checkpoints.

::

    ftrain train [RECIPE] [--section.key VALUE ...] [--resume] [--nproc N]
    ftrain eval CKPT_OR_RUN_DIR [--step N] [--batches N]
    ftrain generate CKPT_OR_RUN_DIR [--prompt TEXT] [--max-new-tokens N] [--temperature T] [--seed S]
    ftrain info CKPT_OR_RUN_DIR [--step N]

``RECIPE`` is a built-in recipe (``gpt``, the default; ``digits``) or the path of a YAML file; every recipe key
can be overridden on the command line (``--train.steps 50 --optim.lr 1e-3``), parsed and type-checked by tyro from
the recipe's dataclasses. Bad input — an unknown recipe or key, a wrong type, a missing checkpoint — ends with a
one-line message on stderr and exit status 2 (``FTRAIN_DEBUG=1`` shows the traceback instead).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Annotated

import tyro

from ftrain.checkpoint import CheckpointError
from ftrain.recipes import Recipe, RecipeError, builtin_recipes, load_recipe

__all__ = ["main"]

DEFAULT_RECIPE = "gpt"
USAGE = __doc__.split("::")[1].split("``RECIPE``")[0].rstrip()


@dataclasses.dataclass(frozen=True)
class _Flags:
    resume: bool = False
    """Continue from the latest complete checkpoint in log.output_dir."""
    nproc: int = 1
    """Processes to train on (relaunches the command under torch.distributed.run)."""


def _train_command(recipe_cls: type[Recipe]) -> type:
    """The tyro root of ``ftrain train``: the recipe's fields at the top level, plus ``--resume`` / ``--nproc``."""
    return dataclasses.make_dataclass(
        "TrainCommand",
        [
            ("recipe", Annotated[recipe_cls, tyro.conf.arg(name="")]),  # --train.steps, not --recipe.train.steps
            ("flags", Annotated[_Flags, tyro.conf.arg(name="")]),
        ],
        frozen=True,
    )


def parse_train(argv: Sequence[str]) -> tuple[Recipe, bool, int]:
    """``(recipe, resume, nproc)`` from ``ftrain train`` arguments; the recipe's YAML gives the defaults.

    Raises:
        RecipeError: an unknown recipe name, a bad recipe file or value.
        SystemExit: tyro's usage errors (an unknown flag, a wrong type), after printing them.
    """
    argv = list(argv)
    name = argv.pop(0) if argv and not argv[0].startswith("-") else DEFAULT_RECIPE
    base = load_recipe(name)
    root = _train_command(type(base))
    parsed = tyro.cli(
        root,
        args=argv,
        default=root(recipe=base, flags=_Flags()),
        prog=f"ftrain train {name}",
        description=f"Train the {name!r} recipe ({base.task}); built-in recipes: {', '.join(builtin_recipes())}.",
    )
    return parsed.recipe, parsed.flags.resume, parsed.flags.nproc


def _without_nproc(argv: Sequence[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _relaunch(argv: Sequence[str], nproc: int) -> int:
    """Runs ``ftrain train ARGS`` in ``nproc`` worker processes under ``torch.distributed.run``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.call([*cmd, "-m", "ftrain", "train", *_without_nproc(argv)])


def _train(argv: Sequence[str]) -> int:
    from ftrain.cli.train import dist_env, train

    recipe, resume, nproc = parse_train(argv)
    rank, world = dist_env()
    if nproc < 1:
        raise RecipeError(f"--nproc must be >= 1, got {nproc}")
    if max(nproc, world) > 1:
        try:
            recipe.parallel.config(max(nproc, world))  # the mesh against the world size, before any work
        except ValueError as err:
            raise RecipeError(f"parallel: {err}") from None
    if nproc > 1 and world == 1:
        return _relaunch(argv, nproc)
    train(recipe, resume=resume, rank=rank, world_size=world)
    return 0


_RunPath = Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="CKPT_OR_RUN_DIR")]


@dataclasses.dataclass(frozen=True)
class EvalArgs:
    """Validation metrics of a checkpoint, on the validation data of the recipe it was trained with."""

    path: _RunPath
    """A run directory (log.output_dir), its checkpoints directory, or one checkpoint."""
    step: int | None = None
    """Which checkpoint (default: the newest)."""
    batches: int | None = None
    """Validation batches (default: the recipe's train.eval_batches; 0: all)."""


@dataclasses.dataclass(frozen=True)
class GenerateArgs:
    """Text sampled from a language-model checkpoint."""

    path: _RunPath
    """A run directory (log.output_dir), its checkpoints directory, or one checkpoint."""
    prompt: str = ""
    """The text to continue (empty: start after a newline)."""
    max_new_tokens: int = 200
    """How many tokens (bytes) to sample."""
    temperature: float = 0.8
    """Softmax temperature; 0 picks the most likely token."""
    seed: int = 0
    """Sampling seed: the same seed gives the same text."""
    step: int | None = None
    """Which checkpoint (default: the newest)."""


@dataclasses.dataclass(frozen=True)
class InfoArgs:
    """What a checkpoint holds: step, sizes, metrics, every leaf's dtype and shape, and its recipe."""

    path: _RunPath
    """A run directory (log.output_dir), its checkpoints directory, or one checkpoint."""
    step: int | None = None
    """Which checkpoint (default: the newest)."""


def _eval(argv: Sequence[str]) -> int:
    from ftrain.cli.inspect import eval_checkpoint

    a = tyro.cli(EvalArgs, args=list(argv), prog="ftrain eval")
    return eval_checkpoint(a.path, a.step, a.batches)


def _generate(argv: Sequence[str]) -> int:
    from ftrain.cli.inspect import generate_text

    a = tyro.cli(GenerateArgs, args=list(argv), prog="ftrain generate")
    return generate_text(a.path, a.prompt, a.max_new_tokens, a.temperature, a.seed, a.step)


def _info(argv: Sequence[str]) -> int:
    from ftrain.cli.inspect import info_checkpoint

    a = tyro.cli(InfoArgs, args=list(argv), prog="ftrain info")
    return info_checkpoint(a.path, a.step)


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "train": _train,
    "eval": _eval,
    "generate": _generate,
    "info": _info,
}
# Bad input a user can fix: reported in one line. Anything else is a bug and keeps its traceback.
_USER_ERRORS = (RecipeError, CheckpointError, FileNotFoundError, NotADirectoryError)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``ftrain`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Example:
        >>> main(["train", "gtp"])
        2
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage:{USAGE}\n\nRun `ftrain COMMAND --help` for a command's options.")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"ftrain: error: unknown command {command!r}; the commands are {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[command](rest)
    except _USER_ERRORS as err:
        if os.environ.get("FTRAIN_DEBUG"):
            raise
        message = " ".join(str(err).split()) if not isinstance(err, KeyError) else str(err)
        print(f"ftrain {command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ftrain {command}: interrupted", file=sys.stderr)
        return 130
