"""``ftrain eval``, ``ftrain generate`` and ``ftrain info``: what a checkpoint holds and does.

Each takes a run directory (a recipe's ``log.output_dir``), its ``checkpoints`` directory or one checkpoint
(``.../checkpoints/step_00000300``). The recipe the run was trained with is stored in the checkpoint (``extra``),
so the model is rebuilt without repeating any flag.
"""

from __future__ import annotations

import datetime
import json
from collections import defaultdict
from pathlib import Path

import ftrain
from ftrain.checkpoint import CheckpointInfo, CheckpointManager
from ftrain.checkpoint.treeio import dtype_from_name
from ftrain.cli.train import CHECKPOINT_DIR, Run, build_run, evaluate, recipe_threads
from ftrain.recipes import Recipe, RecipeError, dump, recipe_from_dict

__all__ = ["describe", "load_run", "open_checkpoint"]


def open_checkpoint(path: str | Path, step: int | None = None) -> tuple[CheckpointManager, CheckpointInfo]:
    """The manager of the checkpoints at ``path`` and the metadata of ``step`` (default: the newest).

    Raises:
        FileNotFoundError: ``path`` does not exist, holds no checkpoint, or not ``step``.
    """
    p = Path(path).expanduser()
    hint = "give a run directory (the recipe's log.output_dir) or one of its checkpoints"
    if not p.exists():
        raise FileNotFoundError(f"{str(p)!r} does not exist; {hint}")
    if (p / "COMMIT").is_file():  # one checkpoint: its manager is the parent directory
        try:
            step = int(json.loads((p / "meta.json").read_text())["step"]) if step is None else step
        except (OSError, ValueError, KeyError) as err:
            raise FileNotFoundError(f"{str(p)!r} is not a readable checkpoint ({err})") from None
        p = p.parent
    elif (p / CHECKPOINT_DIR).is_dir():
        p = p / CHECKPOINT_DIR
    if not p.is_dir():
        raise FileNotFoundError(f"{str(p)!r} is not a directory; {hint}")
    _refuse_while_writing(p)
    mgr = CheckpointManager(p)
    if not mgr.all_steps():
        mgr.close()
        raise FileNotFoundError(f"no checkpoint in {str(p)!r}; {hint}")
    try:
        return mgr, mgr.metadata(step)
    except FileNotFoundError:
        mgr.close()
        raise


def _refuse_while_writing(directory: Path) -> None:
    """A ``CheckpointManager`` removes unfinished saves when it opens: never open one on a save in progress.

    Raises:
        FileNotFoundError: ``directory`` holds an unfinished save (``.tmp-*``).
    """
    busy = sorted(e.name for e in directory.iterdir() if e.name.startswith(".tmp-") and e.is_dir())
    if busy:
        raise FileNotFoundError(
            f"{str(directory)!r} holds an unfinished save ({busy[0]}): a run is writing a checkpoint there, or was "
            "killed while it did. Retry when the save is done; if no run is writing, resume that run "
            "(ftrain train --resume removes it)"
        )


def _recipe_of(info: CheckpointInfo) -> Recipe:
    saved = (info.extra or {}).get("recipe") if isinstance(info.extra, dict) else None
    if saved is None:
        raise RecipeError(f"checkpoint {info.path} holds no recipe (it was not written by `ftrain train`)")
    return recipe_from_dict(saved, where=f"the recipe stored in {info.path}")


def load_run(path: str | Path, step: int | None = None) -> tuple[Run, ftrain.TrainState, CheckpointInfo]:
    """The run rebuilt from the recipe stored in a checkpoint, with the checkpoint's state restored (eager)."""
    mgr, info = open_checkpoint(path, step)
    try:
        run = build_run(_recipe_of(info), compile=False)
        state = mgr.restore(info.step, like=run.state)
    finally:
        mgr.close()
    return run, state, info


def eval_checkpoint(path: str, step: int | None, batches: int | None) -> int:
    """Prints the validation metrics of a checkpoint (the same numbers ``ftrain train`` logged at that step)."""
    run, state, info = load_run(path, step)
    with recipe_threads(run.recipe):
        val = evaluate(run, state, batches)
    print(f"checkpoint {info.path} (step {info.step})")
    print("validation " + "  ".join(f"{k} {v:.4f}" for k, v in val.items()))
    print(json.dumps({"step": info.step, **{f"val_{k}": v for k, v in val.items()}}))
    return 0


def generate_text(path: str, prompt: str, max_new_tokens: int, temperature: float, seed: int, step: int | None) -> int:
    """Prints text sampled from a language-model checkpoint."""
    run, state, info = load_run(path, step)
    if run.task.generate is None:
        raise RecipeError(f"the {run.recipe.task!r} recipe is not a language model; `ftrain generate` needs one (gpt)")
    with recipe_threads(run.recipe):
        print(run.task.generate(state.to_module(), prompt, max_new_tokens, temperature, seed))
    return 0


def _size(nbytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return ""


def describe(info: CheckpointInfo) -> str:
    """A readable summary of a checkpoint: step, sizes, metrics, every leaf's dtype and shape, and the recipe."""
    on_disk = sum(f.stat().st_size for f in info.path.rglob("*") if f.is_file())
    saved = datetime.datetime.fromtimestamp(info.time, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    lines = []
    for leaf in info.leaves:
        top = leaf.path[2:].split("'")[0] if leaf.path.startswith("['") else leaf.path.split("[")[0]
        if leaf.kind == "tensor":
            numel = 1
            for d in leaf.shape:
                numel *= d
            nbytes = numel * dtype_from_name(leaf.dtype).itemsize
            g = groups[top]
            g[0], g[1], g[2] = g[0] + 1, g[1] + numel, g[2] + nbytes
            lines.append(f"  {leaf.path:<56} {leaf.dtype:<9} {list(leaf.shape)}")
        else:
            lines.append(f"  {leaf.path:<56} {leaf.describe()}")
    out = [
        f"checkpoint   {info.path}",
        f"step         {info.step}   (saved {saved}, backend {info.backend}, {_size(on_disk)} on disk)",
    ]
    out += [f"{k:<12} {n} tensor{'s' * (n != 1)}, {v:,} values, {_size(b)}" for k, (n, v, b) in groups.items()]
    if info.metrics:
        out.append("metrics      " + "  ".join(f"{k} {v:.6g}" for k, v in sorted(info.metrics.items())))
    if info.model:
        out.append(f"model        {info.model.get('class')} {json.dumps(info.model.get('config', {}))}")
    out += ["leaves", *lines]
    try:
        out += ["recipe", *("  " + line for line in dump(_recipe_of(info)).splitlines())]
    except RecipeError as err:
        out.append(f"recipe       ({err})")
    return "\n".join(out)


def info_checkpoint(path: str, step: int | None) -> int:
    """Prints :func:`describe` of a checkpoint."""
    mgr, info = open_checkpoint(path, step)
    mgr.close()
    print(describe(info))
    return 0
