"""Cold start: the first compiled training step in a fresh process, ftrain.Trainer against transformers.Trainer.

What is timed: in a fresh Python process, the first update of ``Trainer.train()`` with ``torch_compile=True`` on
the tiny GPT-2 of trainer_overhead.py (same model, data and arguments): from the callback ``on_step_begin`` of the
first update to its ``on_step_end`` — compiling, loading caches and running the step; not the imports, not building
the Trainer or the dataloader. Each measurement runs in its own subprocess, one torch thread:

  empty cache  the process gets a fresh ``TORCHINDUCTOR_CACHE_DIR`` and ``FTRAIN_COMPILE_CACHE`` (nothing compiled);
  warm cache   a second process on the directories the first left (a rerun, or a resume of the same run).

Variants: ``transformers.Trainer`` (the baseline); ``ftrain.Trainer`` as it is (its ``jit_options``: the gradients
compiled and precompiled into the cache, the optimizer run eagerly as fused kernels), held to the goals; and, for
context, ``ftrain.Trainer`` with ``optimizer="compiled"`` (the whole step one graph, as before; patched into the
Trainer's plan in the child process). Rounds alternate the order of the variants. Goals (median over rounds): empty
cache <= 1.0x transformers, warm cache <= 0.5x.

Usage:
    python benchmarks/cold_start.py                 # 2 rounds
    python benchmarks/cold_start.py --quick         # 1 round (a smoke run; one compile per variant is minutes)
    python benchmarks/cold_start.py --json out.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

VARIANTS = {
    "transformers": "transformers.Trainer",
    "ftrain": "ftrain.Trainer",
    "ftrain_whole_step": 'ftrain.Trainer, jit optimizer="compiled"',
}
GOALS = {"empty": "<= 1.0", "warm": "<= 0.5"}


def child(variant: str) -> float:
    """Runs in the subprocess: builds the Trainer, trains 2 updates, returns the first update's seconds."""
    import logging
    import warnings

    import torch
    import trainer_overhead as bench
    import transformers

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    if variant == "transformers":
        trainer_cls, args_cls, base = transformers.Trainer, transformers.TrainingArguments, transformers.TrainerCallback
    else:
        from ftrain.trainer import Trainer, TrainerCallback, TrainingArguments
        from ftrain.trainer import plan as plan_module

        trainer_cls, args_cls, base = Trainer, TrainingArguments, TrainerCallback
        if variant == "ftrain_whole_step":
            jit_options = plan_module.jit_options
            plan_module.jit_options = lambda args: {**jit_options(args), "optimizer": "compiled"}

    class FirstStep(base):
        start = end = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                self.end = time.perf_counter()

    timer = FirstStep()
    data = bench.build_data(2 * bench.BATCH)
    with tempfile.TemporaryDirectory() as out:
        args = bench.training_args(args_cls, out, 2, True)
        trainer_cls(model=bench.build_model(), args=args, train_dataset=data, callbacks=[timer]).train()
    return timer.end - timer.start


def measure(variant: str, caches: Path) -> float:
    """The first-step seconds of ``variant`` in a fresh process whose compile caches are under ``caches``."""
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
        "FTRAIN_COMPILE_CACHE": str(caches / "ftrain"),
    }
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{out.stderr[-4000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 round (a smoke run)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        print(child(opts.child))
        return
    rounds = 1 if opts.quick else opts.rounds
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(rounds):
        order = list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]
        for variant in order:
            with tempfile.TemporaryDirectory() as caches:
                for cache in ("empty", "warm"):  # the second process finds what the first left
                    seconds = measure(variant, Path(caches))
                    times.setdefault((variant, cache), []).append(seconds)
                    print(f"round {r + 1}: {variant:<18} {cache:<5} {seconds:7.2f} s", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nfirst compiled step (s), median of {rounds} round(s), one torch thread")
    print(f"| {'variant':<36} | {'empty cache':>11} | {'warm cache':>10} |")
    print(f"|{'-' * 38}|{'-' * 13}|{'-' * 12}|")
    for v, label in VARIANTS.items():
        print(f"| {label:<36} | {med[(v, 'empty')]:11.2f} | {med[(v, 'warm')]:10.2f} |")
    ratios = {}
    for v in ("ftrain", "ftrain_whole_step"):
        for cache, goal in GOALS.items():
            name = f"first compiled step, {cache} cache: {VARIANTS[v]} vs transformers.Trainer"
            goal = goal if v == "ftrain" else None
            ratios[name] = dict(measured=med[(v, cache)], baseline=med[("transformers", cache)], unit="s", goal=goal)
            print(f"{name}: {med[(v, cache)] / med[('transformers', cache)]:.3f} (goal {goal})")
    if opts.json:
        from _common import write_json

        rows = [dict(variant=v, cache=c, runs=ts, median_s=med[(v, c)]) for (v, c), ts in times.items()]
        write_json(opts.json, dict(rounds=rounds, rows=rows, ratios=ratios))
        print(f"wrote {opts.json}")


if __name__ == "__main__":
    main()
