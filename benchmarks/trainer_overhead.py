"""Overhead of ftrain's ``Trainer`` over its own pure loop, and its throughput against ``transformers.Trainer``.

Variants (same GPT-2, data, default optimizer — fused AdamW in transformers, ``ftrain.optim.adamw`` in ftrain — with
the linear schedule and clipping of the default arguments; timed in one process, in interleaved rounds):
  (a) raw ftrain loop: ``TrainState`` + ``make_train_step(..., donate=True)`` (the Trainer's eager step) +
      ``BatchStream``, the optimizer from ``ftrain.trainer.convert.make_optimizer`` (the identical ``tx`` the
      Trainer builds), the loss read every ``logging_steps`` as the Trainer logs it
  (b) ``ftrain.Trainer.train()``, default arguments
  (c) ``transformers.Trainer.train()``, default arguments
  with ``--compile``, also each with ``torch_compile=True``: (a) and (b) compile with ``ftrain.jit`` and the
  Trainer's ``jit_options`` (donated state, the gradients compiled and the optimizer fused eager kernels,
  deterministic algorithms only under ``full_determinism``); (c) is transformers' ``torch.compile`` of the model.
"Default arguments" leaves the optimizer, schedule, clipping and precision to each library's defaults; only what
makes the workload is set: batch size, steps, learning rate and weight decay, sequential sampling, logging every 10
steps, no saving, no reporting, no progress bar.
Each run does ``--warmup`` updates then ``--steps`` timed updates; only the timed updates count (the Trainers are
timed by a callback between ``on_step_end`` of the last warm-up update and of the last update: steady state, after
any compile). Goals: (b)/(a) time <= 1.03, eager and compiled; (b)/(c) samples/s >= 1.10 eager, >= 1.5 compiled.

Usage:
    python benchmarks/trainer_overhead.py               # 3 rounds, eager
    python benchmarks/trainer_overhead.py --compile     # plus the compiled variants
    python benchmarks/trainer_overhead.py --quick       # 2 rounds of 20 updates (a smoke run; noisier), written
                                                        # to results/trainer_overhead_quick.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import transformers

import ftrain
from ftrain.data import BatchStream, default_collate
from ftrain.jit import jit
from ftrain.state import TrainState
from ftrain.step import make_train_step
from ftrain.trainer import Trainer, TrainerCallback, TrainingArguments
from ftrain.trainer.convert import make_optimizer
from ftrain.trainer.evaluation import make_loss_fn
from ftrain.trainer.plan import jit_options

MODEL = dict(n_layer=4, n_embd=128, n_head=4, vocab_size=1024, n_positions=128)
SEQ, BATCH, LOGGING_STEPS = 128, 8, 10
RESULTS = Path(__file__).parent / "results" / "trainer_overhead.json"


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**MODEL))
    model.loss_type = "ForCausalLM"  # the v5 causal count in both trainers (see tests/trainer/test_trainer_parity.py)
    return model


def build_data(rows: int):
    import datasets

    ids = torch.randint(0, MODEL["vocab_size"], (rows, SEQ), generator=torch.Generator().manual_seed(0)).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def training_args(cls, out: str, max_steps: int, compile_: bool):
    kwargs = dict(
        output_dir=out, max_steps=max_steps, per_device_train_batch_size=BATCH, learning_rate=1e-3,
        weight_decay=0.01, logging_steps=LOGGING_STEPS, report_to="none", save_strategy="no", disable_tqdm=True,
        use_cpu=True, train_sampling_strategy="sequential", seed=0,
    )  # fmt: skip
    if compile_:
        kwargs["torch_compile"] = True
    return cls(**kwargs)


def run_raw(data, warmup: int, steps: int, compile_: bool) -> float:
    """(a): the loop the Trainer runs, written by hand over the pure core; seconds for the timed updates."""
    with tempfile.TemporaryDirectory() as out:
        args = training_args(TrainingArguments, out, warmup + steps, compile_)
    model = build_model()
    tx = make_optimizer(args, model, num_training_steps=warmup + steps)
    state = TrainState.create(model, tx, key=args.seed)
    loss_fn = make_loss_fn(model)
    if compile_:  # the Trainer's own jit settings (donation, determinism, mode)
        step = jit(make_train_step(lambda m, b: loss_fn(m, b)[0]), **jit_options(args))
    else:  # the Trainer's eager step: donated
        step = make_train_step(lambda m, b: loss_fn(m, b)[0], donate=True)
    stream = BatchStream(data, BATCH, seed=0, shuffle=False, collate_fn=default_collate)
    start = None
    for i, batch in enumerate(stream.iter_from(0, stop=warmup + steps), start=1):
        state, metrics = step(state, batch)
        if i % LOGGING_STEPS == 0:
            float(metrics["loss"])  # what the Trainer's log reads
        if i == warmup:
            start = time.perf_counter()
    return time.perf_counter() - start


def _timer(base):
    class Timer(base):
        def __init__(self, warmup: int):
            self.warmup, self.start, self.end = warmup, None, None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == self.warmup:
                self.start = time.perf_counter()
            self.end = time.perf_counter()

    return Timer


def run_trainer(trainer_cls, args_cls, callback_base, data, warmup: int, steps: int, compile_: bool) -> float:
    """(b) / (c): ``Trainer.train()``; seconds for the timed updates."""
    timer = _timer(callback_base)(warmup)
    with tempfile.TemporaryDirectory() as out:
        args = training_args(args_cls, out, warmup + steps, compile_)
        trainer = trainer_cls(model=build_model(), args=args, train_dataset=data, callbacks=[timer])
        trainer.train()
    return timer.end - timer.start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--compile", action="store_true", help="also time torch_compile=True for each variant")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see below)")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 + 20 updates (overrides the above)")
    opts = parser.parse_args()
    if opts.quick:
        opts.rounds, opts.warmup, opts.steps = 2, 3, 20
    # On a shared 2-core machine, 2 intra-op threads next to any other busy process spin against each other: the
    # same forward/backward measured 0.2 s with 1 thread and 3.2 s with 2. One thread keeps the ratios meaningful.
    torch.set_num_threads(opts.threads)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()

    data = build_data((opts.warmup + opts.steps) * BATCH)
    variants = {
        "a": ("raw ftrain loop", lambda c: run_raw(data, opts.warmup, opts.steps, c)),
        "b": ("ftrain.Trainer (default args)",
              lambda c: run_trainer(Trainer, TrainingArguments, TrainerCallback, data, opts.warmup, opts.steps, c)),
        "c": ("transformers.Trainer (default args)",
              lambda c: run_trainer(transformers.Trainer, transformers.TrainingArguments, transformers.TrainerCallback,
                                    data, opts.warmup, opts.steps, c)),
    }  # fmt: skip
    runs = [(k, False) for k in "abc"] + ([(k, True) for k in "abc"] if opts.compile else [])
    times: dict[str, list[float]] = {}
    for r in range(opts.rounds):
        order = runs if r % 2 == 0 else runs[::-1]  # alternate the order so drift hits every variant alike
        for key, compile_ in order:
            name = key + ("+compile" if compile_ else "")
            seconds = variants[key][1](compile_)
            times.setdefault(name, []).append(seconds)
            print(f"round {r + 1}: {name:<10} {seconds:7.3f} s", file=sys.stderr, flush=True)

    samples = opts.steps * BATCH
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(dict(variant=name, label=variants[name[0]][0] + (" + torch_compile" if "+" in name else ""),
                         median_s=med, min_s=min(ts), samples_per_s=samples / med, runs=ts))  # fmt: skip
    by = {row["variant"]: row for row in rows}
    ratios = {
        "b/a time (eager), goal <= 1.03": by["b"]["median_s"] / by["a"]["median_s"],
        "b/c samples/s (eager), goal >= 1.10": by["b"]["samples_per_s"] / by["c"]["samples_per_s"],
    }
    if opts.compile:
        compiled = {v: by[v + "+compile"] for v in "abc"}
        ratios["b/a time (compiled), goal <= 1.03"] = compiled["b"]["median_s"] / compiled["a"]["median_s"]
        ratios["b/c samples/s (compiled), goal >= 1.5"] = (
            compiled["b"]["samples_per_s"] / compiled["c"]["samples_per_s"]
        )

    print(f"\nGPT-2 {MODEL}, seq {SEQ}, batch {BATCH}, {opts.steps} timed updates after {opts.warmup}, "
          f"median of {opts.rounds} interleaved rounds, {opts.threads} torch thread(s)")  # fmt: skip
    print(f"| {'variant':<63} | {'median s':>9} | {'min s':>7} | {'samples/s':>9} |")
    print(f"|{'-' * 65}|{'-' * 11}|{'-' * 9}|{'-' * 11}|")
    for row in rows:
        print(f"| ({row['variant']}) {row['label']:<{60 - len(row['variant'])}} | {row['median_s']:9.3f} | "
              f"{row['min_s']:7.3f} | {row['samples_per_s']:9.1f} |")  # fmt: skip
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")

    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    results = RESULTS.with_name("trainer_overhead_quick.json") if opts.quick else RESULTS
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(dict(machine=machine, ftrain=getattr(ftrain, "__version__", None),
                                       transformers=transformers.__version__, model=MODEL, seq=SEQ, batch=BATCH,
                                       steps=opts.steps, warmup=opts.warmup, rounds=opts.rounds,
                                       threads=opts.threads, rows=rows, ratios=ratios), indent=2) + "\n")  # fmt: skip
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
