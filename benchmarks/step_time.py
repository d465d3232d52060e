"""Step time and peak memory: ftrain's pure step against hand-written PyTorch loops, in one run.

Variants (same model, data and AdamW hyper-parameters; timed together in one process, in interleaved rounds;
memory measured in a fresh process each):
  (a) eager loop, torch.optim.AdamW(foreach=True)     (d) ftrain eager step
  (b) eager loop, torch.optim.AdamW(fused=True)       (e) ftrain compiled step (jit)
  (c) torch.compile(model) + compiled optimizer step  (f) ftrain compiled + donated state
                                                      (g) ftrain eager + donated state (make_train_step(donate=True))
                                                      (h) ftrain compiled gradients, eager fused optimizer
                                                          (jit(..., optimizer="eager"))
                                                      (i) (h) + donated state
Compiled ratios are to the best of (a)-(c), goal (e), (f) and (i) <= 0.95x in time; the eager steps (d), (g) are also
compared with the best eager hand loop, (b), goal (g) <= 1.00x; peak memory is compared with the in-place loop (a),
goal (f), (g) and (i) <= 1.10x.

Peak memory on CPU is measured from the process's resident set: the persistent state (params + optimizer state,
counted from the tensors) plus the transient peak of one step (peak RSS during the step, reset through
/proc/self/clear_refs, minus RSS before it). glibc is told to mmap every allocation above 128 KiB, so freed tensors
leave the resident set at once and the reading follows live tensors.

Usage:
    python benchmarks/step_time.py                 # 3.5M GPT timing + 25M GPT memory, all variants
    python benchmarks/step_time.py --quick         # smoke run: 2 rounds of 3 steps, memory on the 3.5M GPT
    python benchmarks/step_time.py --measure time --json results.json   # timing only, rows as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "a": "eager + AdamW foreach",
    "b": "eager + AdamW fused",
    "c": "compile(model) + compiled opt",
    "d": "ftrain eager",
    "e": "ftrain compiled",
    "f": "ftrain compiled + donated",
    "g": "ftrain eager + donated",
    "h": "ftrain compiled grads + eager opt",
    "i": "ftrain compiled grads + eager opt + donated",
}
SIZES = {
    "3.5M": dict(vocab_size=512, seq_len=128, n_layer=4, n_head=4, d_model=256, dropout=0.1),
    "25M": dict(vocab_size=512, seq_len=128, n_layer=8, n_head=8, d_model=512, dropout=0.1),
}
LR, WD, BATCH = 1e-3, 0.01, 8


def _rss_kib() -> tuple[int, int]:
    status = Path("/proc/self/status").read_text()
    return (
        int(re.search(r"VmRSS:\s+(\d+)", status).group(1)),
        int(re.search(r"VmHWM:\s+(\d+)", status).group(1)),
    )


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _build(variant: str, size: str):
    """Returns (step_fn, state_bytes_fn); step_fn() runs one training step and blocks until it is done."""
    import torch
    import torch.nn.functional as F

    from ftrain import TrainState, jit, losses, make_train_step, optim
    from ftrain.models import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(**SIZES[size])
    model = GPT(cfg)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (BATCH, cfg.seq_len), generator=g)

    if variant in "abc":
        impl = {"fused": True} if variant == "b" else {"foreach": True}
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, **impl)
        fwd = torch.compile(model) if variant == "c" else model
        opt_step = torch.compile(opt.step) if variant == "c" else opt.step

        def step():
            logits = fwd(ids)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
            loss.backward()
            opt_step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        def state_bytes():
            tensors = list(model.parameters()) + [
                t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)
            ]
            return sum(t.numel() * t.element_size() for t in tensors)

        return step, state_bytes

    def loss_fn(m, batch):
        return losses.cross_entropy(m(batch["input_ids"]), batch["input_ids"], shift=True)

    train_step = make_train_step(loss_fn, donate=variant == "g")
    if variant == "e":
        train_step = jit(train_step)
    elif variant == "f":
        train_step = jit(train_step, donate=True)
    elif variant in "hi":  # the precompile cache off: steady state is measured, not the first call
        train_step = jit(train_step, optimizer="eager", donate=variant == "i", cache_dir=False)
    holder = {"state": TrainState.create(model, optim.adamw(LR, weight_decay=WD), key=0)}
    batch = {"input_ids": ids}

    def step():
        holder["state"], metrics = train_step(holder["state"], batch)
        return metrics["loss"]

    def state_bytes():
        from ftrain import tree

        s = holder["state"]
        return sum(t.numel() * t.element_size() for t in tree.tree_leaves((s.params, s.buffers, s.opt_state)))

    return step, state_bytes


def _time_all(variants: str, size: str, rounds: int, steps: int, warmup: int) -> list[dict]:
    """Median ms/step of every variant, built in this one process and timed in interleaved rounds, so that
    drift in the machine's speed (other load, thermal) hits every variant alike."""
    builds = {v: _build(v, size) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for v, (step, _) in builds.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            float(step())
        print(f"  warm-up ({v}) {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    for _ in range(rounds):
        for v, (step, _) in builds.items():
            for _ in range(steps):
                t = time.perf_counter()
                float(step())
                times[v].append(time.perf_counter() - t)
    return [{"variant": v, "size": size, "ms_per_step": statistics.median(times[v]) * 1e3} for v in variants]


def _peak_memory(variant: str, size: str, steps: int, warmup: int) -> dict:
    """Persistent state bytes + the largest transient RSS growth during one step (run in a fresh process)."""
    step, state_bytes = _build(variant, size)
    for _ in range(warmup):
        float(step())
    transient = []
    for _ in range(steps):
        rss_before, _ = _rss_kib()
        _reset_peak()
        float(step())
        transient.append(max(_rss_kib()[1] - rss_before, 0) * 1024)
    return {"variant": variant, "size": size, "peak_mb": (state_bytes() + max(transient)) / 2**20}


def _spawn_memory(variant: str, size: str) -> dict:
    # mmap every allocation above 128 KiB so that RSS follows live tensors (this slows allocation, which is why
    # the timing runs do not use it).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    cmd = [sys.executable, __file__, "--memory-worker", variant, "--size", size]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"variant ({variant}) on {size} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(rows: list[dict], time_size: str, mem_size: str) -> str:
    # Keyed by what was measured as well: a quick run times and measures memory on the same size.
    by_time = {r["variant"]: r for r in rows if r["size"] == time_size and "ms_per_step" in r}
    by_mem = {r["variant"]: r for r in rows if r["size"] == mem_size and "peak_mb" in r}
    timed = [by_time[v]["ms_per_step"] for v in "abc" if v in by_time]
    best_ms = min(timed) if timed else None
    fused = by_time.get("b")  # the best eager hand loop: what the eager steps (d), (g) are held to
    base = by_mem.get("a")
    w = 4 + max(len(name) for name in VARIANTS.values())
    lines = [
        f"{'variant':<{w}} {'ms/step':>8} {'x best(a-c)':>11} {'x (b)':>6} {'peak MB':>8} {'x (a)':>6}",
        f"{'':<{w}} {time_size:>8} {'':>11} {'':>6} {mem_size:>8} {'':>6}",
    ]
    for v, name in VARIANTS.items():
        t, m = by_time.get(v), by_mem.get(v)
        if t is None and m is None:
            continue
        ratio = f"{t['ms_per_step'] / best_ms:11.2f}" if t and best_ms else f"{'-':>11}"
        x_b = f"{t['ms_per_step'] / fused['ms_per_step']:6.2f}" if t and fused else f"{'-':>6}"
        ms = f"{t['ms_per_step']:8.1f} {ratio} {x_b}" if t else f"{'-':>8} {'-':>11} {'-':>6}"
        x_a = f"{m['peak_mb'] / base['peak_mb']:6.2f}" if m and base else f"{'-':>6}"
        peak = f"{m['peak_mb']:8.1f} {x_a}" if m else f"{'-':>8} {'-':>6}"
        lines.append(f"({v}) {name:<{w - 4}} {ms} {peak}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    p.add_argument("--size", default="25M", choices=sorted(SIZES), help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant and round (default 6)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 3 steps, memory on the 3.5M GPT")
    p.add_argument("--measure", choices=("time", "memory", "both"), default="both", help="what to measure")
    p.add_argument("--variants", default="abcdefghi")
    p.add_argument("--out", "--json", dest="out", default="benchmarks/results/step_time.json", help="JSON rows")
    args = p.parse_args()
    if args.memory_worker:
        print(json.dumps(_peak_memory(args.memory_worker, args.size, steps=3, warmup=3)))
        return
    import torch

    time_size, mem_size = "3.5M", "3.5M" if args.quick else "25M"
    rounds, steps = (2, min(args.steps, 3)) if args.quick else (args.rounds, args.steps)
    rows = []
    if args.measure in ("time", "both"):
        rows += _time_all(args.variants, time_size, rounds, steps, warmup=3)
    if args.measure in ("memory", "both"):
        for v in args.variants:
            rows.append(_spawn_memory(v, mem_size))
            print(f"  {mem_size} ({v}) peak {rows[-1]['peak_mb']:.1f} MB", file=sys.stderr)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(
        f"Step time on a {time_size}-parameter GPT (batch {BATCH}, seq 128), peak memory on a {mem_size} one; {machine}"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine, "quick": args.quick, "time_size": time_size, "mem_size": mem_size, "rows": rows}
    Path(args.out).write_text(json.dumps(payload, indent=2))
    print(_table(rows, time_size, mem_size))


if __name__ == "__main__":
    main()
