"""One optimizer update alone, ftrain against torch.optim, on the parameter shapes of a 3.3M-parameter GPT.

For each alias, in one process, interleaved rounds (median ms per update, float32, one torch thread):

- baseline: its ``torch.optim`` counterpart, ``fused=True`` where torch has a fused kernel (Adam, AdamW, SGD,
  Adagrad), ``foreach=True`` otherwise (RMSprop, Adafactor). Lion has no torch optimizer: the baseline is a
  hand-written in-place foreach loop (``lerp`` / ``sign`` / ``add_`` / ``lerp_``, the least a Lion step does).
  torch's Adafactor is not HF's (no update clipping or relative step): it is the nearest torch.optim has;
- ``donated``: ``ftrain.optim.update_and_apply(..., donate=True)``, what the eager donated step and the Trainer run
  (goal ``<= 1.2`` of the baseline);
- context, no goal: the undonated ``update_and_apply`` (new buffers for the new state, inputs untouched) and the
  old generic route, ``tx.update`` then ``apply_updates``.

Usage:
    python benchmarks/optimizer.py                      # 7 rounds of 10 updates per variant
    python benchmarks/optimizer.py --quick --json r.json  # smoke run: 2 rounds of 3 updates, rows as JSON
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json  # noqa: E402

from ftrain import optim  # noqa: E402
from ftrain.models import GPT, GPTConfig  # noqa: E402

GPT_SHAPES = dict(vocab_size=512, seq_len=128, n_layer=4, n_head=4, d_model=256)  # step_time.py's "3.5M": 3.32M
GOAL = "<= 1.2"


def _lion_foreach(params: list[torch.Tensor], lr: float, b1: float, b2: float, wd: float) -> Callable[[], None]:
    """A hand-written in-place Lion step over ``params`` (their ``.grad``), the baseline for ``lion``."""
    mu = [torch.zeros_like(p) for p in params]

    def step() -> None:
        with torch.no_grad():
            grads = [p.grad for p in params]
            direction = torch._foreach_lerp(mu, grads, 1 - b1)
            torch._foreach_sign_(direction)
            torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_add_(params, direction, alpha=-lr)
            torch._foreach_lerp_(mu, grads, 1 - b2)

    return step


def _torch_step(make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]) -> Callable:
    return lambda params: make(params).step


ALIASES: dict[str, tuple[Callable[[], optim.GradientTransformation], Callable, str]] = {
    "adamw": (
        lambda: optim.adamw(1e-3, weight_decay=0.01),
        _torch_step(lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True)),
        "AdamW(fused)",
    ),
    "adam": (
        lambda: optim.adam(1e-3),
        _torch_step(lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True)),
        "Adam(fused)",
    ),
    "sgd_momentum": (
        lambda: optim.sgd(1e-2, momentum=0.9),
        _torch_step(lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, fused=True)),
        "SGD(fused)",
    ),
    "sgd_nesterov": (
        lambda: optim.sgd(1e-2, momentum=0.9, nesterov=True, weight_decay=1e-4),
        _torch_step(
            lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-4, fused=True)
        ),
        "SGD(fused)",
    ),
    "adagrad": (
        lambda: optim.adagrad(1e-2),
        _torch_step(lambda ps: torch.optim.Adagrad(ps, lr=1e-2, fused=True)),
        "Adagrad(fused)",
    ),
    "rmsprop": (
        lambda: optim.rmsprop(1e-3, momentum=0.9),
        _torch_step(lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.9, foreach=True)),
        "RMSprop(foreach)",
    ),
    "lion": (
        lambda: optim.lion(1e-4, weight_decay=0.1),
        lambda ps: _lion_foreach(ps, 1e-4, 0.9, 0.99, 0.1),
        "foreach loop",
    ),
    "adafactor": (
        lambda: optim.adafactor(1e-3),
        _torch_step(lambda ps: torch.optim.Adafactor(ps, lr=1e-3, foreach=True)),
        "Adafactor(foreach)",
    ),
}
VARIANTS = ("baseline", "donated", "pure", "generic")


def _shapes() -> dict[str, torch.Size]:
    torch.manual_seed(0)
    return {n: p.shape for n, p in GPT(GPTConfig(**GPT_SHAPES, dropout=0.0)).named_parameters()}


def _variants(alias: str, shapes: dict[str, torch.Size]) -> dict[str, Callable[[], None]]:
    """One update of each variant, on state of its own (the same random parameters and gradients)."""
    make_tx, make_torch, _ = ALIASES[alias]
    gen = torch.Generator().manual_seed(1)
    start = {n: torch.randn(s, generator=gen) * 0.02 for n, s in shapes.items()}
    grads = {n: torch.randn(s, generator=gen) * 1e-3 for n, s in shapes.items()}
    out: dict[str, Callable[[], None]] = {}

    tensors = [p.clone().requires_grad_() for p in start.values()]
    for p, g in zip(tensors, grads.values()):
        p.grad = g.clone()
    out["baseline"] = make_torch(tensors)

    tx = make_tx()
    for variant in ("donated", "pure", "generic"):
        box = {"params": {n: p.clone() for n, p in start.items()}}
        box["state"] = tx.init(box["params"])

        def update(box=box, variant=variant) -> None:
            if variant == "generic":
                updates, box["state"] = tx.update(grads, box["state"], box["params"])
                box["params"] = optim.apply_updates(box["params"], updates)
            else:
                box["params"], box["state"] = optim.update_and_apply(
                    tx, grads, box["state"], box["params"], donate=variant == "donated"
                )

        out[variant] = update
    route = optim.route_of(tx, grads, tx.init(start), start)
    assert route.startswith("fused"), f"{alias}: {route}"  # the benchmark measures the fused route
    return out


def _time(alias: str, rounds: int, steps: int, warmup: int) -> dict[str, float]:
    """Median ms per update of each variant, rounds interleaved so machine drift hits every variant alike."""
    fns = _variants(alias, _shapes())
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    per_round: dict[str, list[float]] = {v: [] for v in fns}
    for _ in range(rounds):
        for variant, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            per_round[variant].append((time.perf_counter() - t0) * 1e3 / steps)
    return {v: statistics.median(ms) for v, ms in per_round.items()}


def _table(rows: list[dict]) -> str:
    lines = [f"{'alias':14s} {'baseline':20s} " + " ".join(f"{v + ' ms':>12s}" for v in VARIANTS)
             + f" {'donated/base':>13s} {'pure/base':>10s} {'generic/base':>13s}"]  # fmt: skip
    for r in rows:
        ms = [r[v] for v in VARIANTS]
        ratios = [r[v] / r["baseline"] for v in ("donated", "pure", "generic")]
        lines.append(f"{r['alias']:14s} {r['baseline_label']:20s} " + " ".join(f"{x:12.2f}" for x in ms)
                     + f" {ratios[0]:13.2f} {ratios[1]:10.2f} {ratios[2]:13.2f}")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 3 updates per variant")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--only", default=None, help="comma-separated aliases (default: all)")
    args = p.parse_args()
    torch.set_num_threads(1)
    rounds, steps, warmup = (2, 3, 1) if args.quick else (7, 10, 3)
    names = args.only.split(",") if args.only else list(ALIASES)
    rows = []
    for alias in names:
        ms = _time(alias, rounds, steps, warmup)
        rows.append({"alias": alias, "baseline_label": ALIASES[alias][2], **ms})
        print(f"{alias}: " + ", ".join(f"{v} {ms[v]:.2f} ms" for v in VARIANTS), flush=True)
    print()
    print(_table(rows))
    if args.json:
        settings = {"rounds": rounds, "steps": steps, "warmup": warmup, "threads": 1, "params": sum(
            s.numel() for s in _shapes().values()), "goal": GOAL}  # fmt: skip
        write_json(args.json, {"benchmark": "optimizer", "settings": settings, "rows": rows})


if __name__ == "__main__":
    main()
