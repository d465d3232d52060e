"""``ftrain train``: a recipe run with the pure core only — ``TrainState``, ``make_train_step``, ``ftrain.jit``,
``BatchStream``, ``CheckpointManager``, ``ftrain.optim`` / ``ftrain.schedules`` and ``ftrain.metrics``.

The run is a function of the recipe: the seed gives the initial weights, the data order and the dropout, and the
data position is the state's step, so a rerun prints the same numbers and ``--resume`` from any checkpoint ends
with bitwise the same state as a run that never stopped (DESIGN.md invariant 3).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import ftrain
from ftrain import metrics as _metrics
from ftrain import optim, random, schedules
from ftrain.checkpoint import CheckpointManager, CheckpointManagerOptions
from ftrain.cli.runlog import PLOT_FILE, RunLog, plot_losses
from ftrain.data import BatchStream
from ftrain.recipes import Recipe, RecipeError, Task, build_task, recipe_from_dict
from ftrain.recipes.config import to_dict

__all__ = ["build_run", "evaluate", "make_optimizer", "train"]

CHECKPOINT_DIR = "checkpoints"
# What a resumed run may change: when and where things are written, not what is computed.
_FREE = ("checkpoint.", "log.", "train.eval_every", "train.eval_batches", "train.threads")


def make_optimizer(recipe: Recipe, model: torch.nn.Module) -> optim.GradientTransformation:
    """The recipe's optimizer: global-norm clipping, then the alias (:func:`ftrain.optim.make_optimizer`, which
    the Trainer's optimizer is built with too), its learning rate following the schedule.

    ``adamw`` and ``lion`` decay what HF's rule decays (not biases and LayerNorm weights); ``sgd``'s L2 penalty
    applies to every parameter.

    Raises:
        RecipeError: ``adam`` with weight decay (ambiguous: use ``adamw`` for decoupled decay).
    """
    o, s, steps = recipe.optim, recipe.schedule, recipe.train.steps
    lr = schedules.get_schedule(s.name, o.lr, num_warmup_steps=s.warmup(steps), num_training_steps=steps)
    b1, b2 = o.betas
    hyperparams = {"momentum": o.momentum} if o.name == "sgd" else {"b1": b1, "b2": b2}
    mask = None if o.name == "sgd" else optim.hf_decay_mask(model)
    try:
        tx = optim.make_optimizer(o.name, lr, weight_decay=o.weight_decay, decay_mask=mask, **hyperparams)
    except ValueError as err:  # adam with weight decay
        raise RecipeError(f"optim.weight_decay: {err}") from None
    return optim.chain(optim.clip_by_global_norm(o.clip), tx) if o.clip is not None else tx


@dataclasses.dataclass
class Run:
    """What a recipe builds: the task, the initial state and the (possibly compiled) steps."""

    recipe: Recipe
    task: Task
    state: ftrain.TrainState
    train_step: Any
    eval_step: Any
    data_key: torch.Tensor
    rank: int = 0
    world_size: int = 1


def build_run(recipe: Recipe, *, compile: bool | None = None, rank: int = 0, world_size: int = 1) -> Run:
    """The task, a fresh ``TrainState`` and its steps; ``compile`` defaults to ``recipe.train.compile``.

    With several processes the state is laid out by :func:`ftrain.distributed.shard_state` on the mesh of the
    recipe's ``parallel`` section; checkpoints then use the ``dcp`` backend and validation sums go through
    ``reduce_metrics``. Recipes allow only the data dims (``dp_replicate`` × ``dp_shard``), so the process rank and
    world size are the data-parallel rank and size that ``BatchStream`` takes.
    """
    model_key, data_key = random.split(random.key(recipe.train.seed))
    task = build_task(recipe, model_key)
    state = ftrain.TrainState.create(task.model, make_optimizer(recipe, task.model), key=model_key)
    if world_size > 1:  # --nproc N: DTensor leaves on the mesh of the recipe's `parallel` section
        from ftrain.distributed import build_mesh, shard_state

        config = recipe.parallel.config(world_size)
        state = shard_state(state, build_mesh(config), config)
    # Donated, the step writes the next state into the previous one's tensors (memory as torch.optim's in-place
    # loop). On one process the optimizer runs as fused eager kernels (compiled: after the compiled gradients,
    # which a rerun or resume loads from ftrain's precompile cache); DTensor leaves keep the generic route, whole
    # step compiled (DTensor has no rule for the in-place copy an eager donated update makes).
    donate, one_process = recipe.train.donate, world_size == 1
    eval_step = ftrain.make_eval_step(task.loss_fn)
    if recipe.train.compile if compile is None else compile:
        optimizer = "eager" if one_process else "compiled"
        train_step = ftrain.jit(ftrain.make_train_step(task.loss_fn), donate=donate, optimizer=optimizer)
        eval_step = ftrain.jit(eval_step)
    else:
        train_step = ftrain.make_train_step(task.loss_fn, donate=donate and one_process)
    return Run(recipe, task, state, train_step, eval_step, data_key, rank, world_size)


def evaluate(run: Run, state: ftrain.TrainState, max_batches: int | None = None) -> dict[str, float]:
    """The task's validation metrics of ``state`` over the first ``max_batches`` (default ``train.eval_batches``;
    0 = all) validation batches, in order; exact token/example-weighted sums (over all ranks)."""
    stream = BatchStream(
        run.task.val_data, run.recipe.train.microbatch_size, shuffle=False, rank=run.rank, world_size=run.world_size,
        drop_last=run.world_size > 1,  # a padded last microbatch would count its padding rows
    )  # fmt: skip
    limit = run.recipe.train.eval_batches if max_batches is None else max_batches
    n = len(stream) if not limit else min(limit, len(stream))
    reducer = _metrics.Reducer()
    for i in range(n):
        m = run.eval_step(state, stream.batch_at(i))
        if run.world_size > 1:  # loss_sum and count are global already; auxiliary sums are per rank
            from ftrain.distributed import reduce_metrics

            m = reduce_metrics(m, state)
        reducer.add(m)
    return run.task.summarize(reducer.compute())


def _check_resumable(saved: Any, recipe: Recipe, where: Path) -> None:
    """A resume must recompute the same run: only what decides when and where things are written may change."""
    old, new = _flat(to_dict(recipe_from_dict(saved))), _flat(to_dict(recipe))
    changed = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k) and not k.startswith(_FREE)]
    if changed:
        what = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise RecipeError(
            f"--resume: the recipe differs from the one the checkpoints in {where} were trained with ({what}); resume "
            f"with the same recipe and overrides (only {', '.join(k.rstrip('.') for k in _FREE)} may change)"
        )


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _open_manager(recipe: Recipe, resume: bool, world_size: int) -> tuple[CheckpointManager, int]:
    out = Path(recipe.log.output_dir)
    c = recipe.checkpoint
    backend = "dcp" if world_size > 1 else "safetensors"  # DCP writes a sharded state from every rank
    options = CheckpointManagerOptions(save_interval_steps=c.every or None, max_to_keep=c.keep, backend=backend)
    mgr = CheckpointManager(out / CHECKPOINT_DIR, options)
    latest = mgr.latest_step()
    if resume and latest is None:
        mgr.close()
        raise FileNotFoundError(f"--resume: no checkpoint in {out / CHECKPOINT_DIR} to resume from")
    if not resume and latest is not None:
        mgr.close()
        raise RecipeError(
            f"{out} already holds checkpoints (latest step {latest}): pass --resume to continue that run, or choose "
            "another --log.output-dir (or delete the directory)"
        )
    return mgr, latest or 0


def _save(mgr: CheckpointManager, step: int, run: Run, state: Any, metrics: dict, world_size: int) -> None:
    extra = {"recipe": to_dict(run.recipe), "ftrain": ftrain.__version__, "world_size": world_size}
    mgr.save(step, state, metrics=metrics, extra=extra, force=step == run.recipe.train.steps)


def _say(text: str, rank: int) -> None:
    if rank == 0:
        tqdm.write(text)


def train(recipe: Recipe, *, resume: bool = False, rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """Runs ``recipe`` to ``train.steps`` (from the latest checkpoint with ``resume``); returns the final
    validation metrics. Writes checkpoints, ``metrics.jsonl``, TensorBoard events and ``loss.png`` into
    ``log.output_dir``.

    Raises:
        RecipeError: checkpoints exist without ``resume``, or ``resume`` with a recipe that differs from the
            checkpoint's.
        FileNotFoundError: ``resume`` without a checkpoint.
    """
    with recipe_threads(recipe):
        return _train(recipe, resume, rank, world_size)


@contextlib.contextmanager
def recipe_threads(recipe: Recipe) -> Iterator[None]:
    """Runs the block with ``train.threads`` CPU threads (when set), then restores torch's setting."""
    threads = torch.get_num_threads()
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train(recipe: Recipe, resume: bool, rank: int, world_size: int) -> dict[str, float]:
    out, t = Path(recipe.log.output_dir), recipe.train
    run = build_run(recipe, rank=rank, world_size=world_size)
    mgr, start = _open_manager(recipe, resume, world_size)
    log = None
    try:
        state = run.state
        if resume:  # the recipe check first: it explains a mismatch better than the restore's shape check would
            _check_resumable((mgr.metadata().extra or {}).get("recipe"), recipe, out / CHECKPOINT_DIR)
            state, info = mgr.restore_with_metadata(like=state)
            start = int(state.step)
            _say(f"resuming from {info.path} (step {start})", rank)
        if rank == 0:
            log = RunLog(out, tensorboard=recipe.log.tensorboard, resume_step=start if resume else None)
        stream = BatchStream(
            run.task.train_data, t.microbatch_size, seed=run.data_key, accum_steps=t.accum, drop_last=True,
            rank=rank, world_size=world_size,  # = the data-parallel rank/size: recipes refuse tp/cp > 1
        )  # fmt: skip
        n_params = sum(p.numel() for p in state.params.values())
        _say(f"{recipe.task}: {n_params:,} parameters, {len(stream):,} steps per epoch; steps {start}..{t.steps}", rank)
        val = _loop(run, state, stream, mgr, log, start, rank, world_size)
    finally:
        mgr.close()
        if log is not None:
            log.close()
    if log is not None:
        _report(run, out, log, val, mgr)
    return val


def _loop(run: Run, state: Any, stream: BatchStream, mgr, log, start: int, rank: int, world: int) -> dict:
    """The training loop proper; returns the last validation metrics."""
    t, every, unit = run.recipe.train, run.recipe.log.every, run.task.unit
    running, val = _metrics.RunningMean(), {}
    bar = tqdm(total=t.steps, initial=start, desc="train", unit="step", dynamic_ncols=True, disable=rank != 0)
    clock, skip = 0.0, 0.0
    for step, batch in enumerate(stream.iter_from(start, stop=t.steps), start=start + 1):
        state, m = run.train_step(state, batch)
        running.add(m)
        bar.update(1)
        if step == start + 1:  # throughput counts from the end of this process's first (maybe compiling) step
            clock, skip = time.perf_counter(), float(m["count"])
        if step % every == 0 or step == t.steps:
            n, means = running.n, running.pop()
            now, done = time.perf_counter(), means.pop("count") * n - skip
            rate = done / (now - clock) if done > 0 else float("nan")
            clock, skip = now, 0.0
            means.pop("loss_sum", None)
            if log is not None:
                log.write(step, "train", {**means, f"{unit}_per_s": rate})
            bar.set_postfix({"loss": f"{means['loss']:.4f}", f"{unit}/s": f"{rate:,.0f}"})
            lr = f"  lr {means['learning_rate']:.3e}" if "learning_rate" in means else ""
            _say(f"step {step:5d}  loss {means['loss']:.4f}{lr}  grad_norm {means['grad_norm']:.4f}", rank)
        evaluated = step == t.steps or bool(t.eval_every and step % t.eval_every == 0)
        if evaluated:
            val = evaluate(run, state)
            if log is not None:
                log.write(step, "val", val)
            _say(f"step {step:5d}  validation " + "  ".join(f"{k} {v:.4f}" for k, v in val.items()), rank)
        if step == t.steps or mgr.should_save(step):
            host = {k: v for k, v in _metrics.to_host(m).items() if k not in ("loss_sum", "count")}
            host.update({f"val_{k}": v for k, v in val.items()} if evaluated else {})
            _save(mgr, step, run, state, host, world)
    bar.close()
    return val


def _report(run: Run, out: Path, log: RunLog, val: dict, mgr: CheckpointManager) -> None:
    records = log.records()
    if run.recipe.log.plot and records:
        plot_losses(records, out / PLOT_FILE, title=f"ftrain {run.recipe.task}")
    steps = mgr.all_steps()
    print(f"checkpoints  {mgr.directory} (steps {', '.join(map(str, steps))})")
    print(f"metrics      {log.path}")
    if log.has_tensorboard:
        print(f"tensorboard  {log.tensorboard_dir}  (tensorboard --logdir {log.tensorboard_dir})")
    if run.recipe.log.plot and records:
        print(f"loss curve   {out / PLOT_FILE}")
    if val:
        head = run.task.headline
        rest = "  ".join(f"{k} {v:.4f}" for k, v in val.items() if k != head)
        print(f"final validation {head} {val[head]:.4f}  ({rest})")


def dist_env() -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun's environment (``(0, 1)`` outside it)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
