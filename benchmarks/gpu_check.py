"""GPU check: single-rank NCCL parity of ftrain.distributed, then tokens/s and MFU of a GPT-2-small-shaped GPT.

Parity (one process, a one-rank NCCL mesh from ``ftrain.distributed.build_mesh``):
  - a tiny GPT trained 3 steps by the plain step and by the same step on ``shard_state(...)`` (FSDP layout):
    losses and final parameters must agree;
  - ``all_gather_kv_attention`` over the mesh's ``cp`` dimension against causal SDPA: output and gradients.

Trainer (``gpu_trainer_check.py``): ``ftrain.Trainer`` trains a tiny GPT-2 on the GPU (fp32 / bf16, eager / compiled)
against ``transformers.Trainer``: model, state and batches on the device, per-step losses equal.

Throughput (same model, data and AdamW hyper-parameters, bf16 autocast, timed in interleaved rounds):
  (a) torch.compile(model) + torch.optim.AdamW(fused=True), a hand-written loop
  (b) ftrain: jit(make_train_step(loss), donate=True) — the whole step compiled
MFU uses the PaLM/nanoGPT count, 6·N + 12·L·d·T FLOPs per token (N: parameters without position embeddings),
against the GPU's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s; --peak-tflops to override).

Usage:
    python benchmarks/gpu_check.py                 # on a CUDA machine; JSON to $OUT/gpu_check.json if OUT is set
    python benchmarks/gpu_check.py --dry-run       # CPU smoke run: tiny model, gloo, a few steps
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from ftrain import TrainState, jit, losses, make_train_step, optim
from ftrain.models import GPT, GPTConfig

GPT2_SMALL = dict(vocab_size=50304, seq_len=1024, n_layer=12, n_head=12, d_model=768, dropout=0.0)  # 124M
TINY = dict(vocab_size=256, seq_len=64, n_layer=2, n_head=4, d_model=64, dropout=0.0)
LR, WD, BETAS = 6e-4, 0.1, (0.9, 0.95)
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0}


def _peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def _loss_fn(amp_device: str | None):
    def loss(model, batch):
        if amp_device is None:
            return losses.cross_entropy(model(batch["input_ids"]), batch["input_ids"], shift=True)
        with torch.autocast(amp_device, dtype=torch.bfloat16):
            logits = model(batch["input_ids"])
        return losses.cross_entropy(logits, batch["input_ids"], shift=True)  # upcasts bf16 logits to float32

    return loss


# --- parity on a one-rank mesh ------------------------------------------------------------------------------


def _check_sharded_step(device: torch.device) -> dict:
    from ftrain.distributed import ParallelConfig, build_mesh, gather_state, shard_state

    mesh = build_mesh(ParallelConfig(dp_shard=1), device.type)
    cfg = GPTConfig(**TINY)
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, cfg.vocab_size, (4, cfg.seq_len), generator=g).to(device)} for _ in "abc"]
    step = make_train_step(_loss_fn(None))
    results = []
    for sharded in (False, True):
        torch.manual_seed(0)
        state = TrainState.create(GPT(cfg).to(device), optim.adamw(1e-3, weight_decay=0.1), key=0)
        if sharded:
            state = shard_state(state, mesh, ParallelConfig(dp_shard=1))
        run_losses = []
        for batch in batches:
            state, metrics = step(state, batch)
            run_losses.append(float(metrics["loss"]))
        params = (gather_state(state) if sharded else state).params
        results.append((run_losses, {k: v.detach().float().cpu() for k, v in params.items()}))
    (plain_losses, plain), (sharded_losses, shard) = results
    d_loss = max(abs(a - b) for a, b in zip(plain_losses, sharded_losses))
    d_param = max(float((plain[k] - shard[k]).abs().max()) for k in plain)
    return {"check": "sharded step == plain step", "max_abs_loss": d_loss, "max_abs_param": d_param,
            "ok": d_loss < 1e-5 and d_param < 1e-5, "mesh": str(mesh.device_type)}  # fmt: skip


def _check_cp_attention(device: torch.device) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from ftrain.distributed import init_process_group
    from ftrain.distributed.context_parallel import all_gather_kv_attention

    init_process_group(device.type)  # a world of one unless torchrun started this process
    mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("cp",))
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, 32, 16, generator=g, dtype=torch.float64).to(device).requires_grad_() for _ in "qkv")
    positions = torch.arange(32, device=device)
    out = all_gather_kv_attention(q, k, v, group=mesh, positions=positions)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    d_out = float((out - ref).detach().abs().max())
    d_grad = max(float((a - b).abs().max()) for a, b in zip(grads, ref_grads))
    return {"check": "all_gather_kv_attention == causal SDPA", "max_abs_out": d_out, "max_abs_grad": d_grad,
            "ok": d_out < 1e-10 and d_grad < 1e-10}  # fmt: skip


def parity_checks(device: torch.device) -> list[dict]:
    rows = []
    for check in (_check_sharded_step, _check_cp_attention):
        try:
            rows.append(check(device))
        except Exception as err:  # report every check, even when one breaks
            traceback.print_exc()
            rows.append({"check": check.__name__, "ok": False, "error": f"{type(err).__name__}: {err}"[:500]})
    return rows


# --- throughput ----------------------------------------------------------------------------------------------


def _build(variant: str, cfg: GPTConfig, batch: dict, device: torch.device, amp: bool):
    """Returns ``step() -> loss tensor``; both variants start from the same weights."""
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    amp_device = device.type if amp else None
    if variant == "torch":
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD, fused=True)
        fwd = torch.compile(model)
        ids = batch["input_ids"]

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = fwd(ids)
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        return step
    # deterministic=False: the hand-written loop is not deterministic either (DESIGN.md measured ~4% for it).
    train_step = jit(make_train_step(_loss_fn(amp_device)), donate=True, deterministic=False)
    holder = {"state": TrainState.create(model, optim.adamw(LR, *BETAS, weight_decay=WD), key=0)}

    def step():
        holder["state"], metrics = train_step(holder["state"], batch)
        return metrics["loss"]

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(cfg: GPTConfig, device: torch.device, batch_size: int, amp: bool, rounds: int, steps: int) -> list:
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len), generator=g).to(device)}
    rows = {}
    builds = {}
    failed = []
    for variant in ("torch", "ftrain"):
        t0 = time.perf_counter()
        try:
            step = _build(variant, cfg, batch, device, amp)
            first = float(step())  # compiles
            for _ in range(2):
                step()
            _sync(device)
        except Exception as err:  # time the other variant all the same
            traceback.print_exc()
            failed.append({"variant": variant, "error": f"{type(err).__name__}: {err}"[:500]})
            continue
        builds[variant] = step
        rows[variant] = {"variant": variant, "first_loss": first, "warmup_s": time.perf_counter() - t0, "times": []}
        print(f"  {variant}: warm-up (compile) {rows[variant]['warmup_s']:.1f} s, first loss {first:.4f}", flush=True)
    for _ in range(rounds):  # interleaved, so drift in clock speed hits both alike
        for variant, step in builds.items():
            _sync(device)
            t = time.perf_counter()
            for _ in range(steps):
                loss = step()
            _sync(device)
            rows[variant]["times"].append((time.perf_counter() - t) / steps)
            rows[variant]["last_loss"] = float(loss)
    tokens = batch_size * cfg.seq_len
    for row in rows.values():
        row["ms_per_step"] = statistics.median(row.pop("times")) * 1e3
        row["tokens_per_s"] = tokens / (row["ms_per_step"] / 1e3)
    return list(rows.values()) + failed


def flops_per_token(model_cfg: GPTConfig, n_params: int) -> float:
    """6·N + 12·L·d·T (nanoGPT's estimate_mfu): N without the position embeddings, which do no matmul."""
    c = model_cfg
    return 6 * (n_params - c.seq_len * c.d_model) + 12 * c.n_layer * c.d_model * c.seq_len


def _table(rows: list[dict], peak: float | None) -> str:
    lines = [f"{'variant':<42} {'ms/step':>9} {'tokens/s':>11} {'MFU':>6} {'x torch':>8} {'first loss':>10}"]
    base = next((r["ms_per_step"] for r in rows if r["variant"] == "torch" and "error" not in r), float("nan"))
    names = {"torch": "(a) torch.compile(model) + fused AdamW", "ftrain": "(b) ftrain jit(step, donate=True)"}
    for r in rows:
        if "error" in r:
            lines.append(f"{names[r['variant']]:<42} FAILED: {r['error'][:200]}")
            continue
        mfu = f"{r['mfu'] * 100:5.1f}%" if r.get("mfu") is not None else f"{'-':>6}"
        lines.append(
            f"{names[r['variant']]:<42} {r['ms_per_step']:9.1f} {r['tokens_per_s']:11.0f} {mfu} "
            f"{r['ms_per_step'] / base:8.3f} {r['first_loss']:10.4f}"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU smoke run: tiny model, gloo mesh, few steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU")
    p.add_argument("--skip-parity", action="store_true")
    p.add_argument("--skip-trainer", action="store_true", help="skip the Trainer placement/parity runs")
    p.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu_check.json when OUT is set)")
    args = p.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --dry-run for the CPU smoke run", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda:0")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.fp32_precision = "tf32"  # the API transformers and ftrain's Trainer set (no legacy mix)
    cfg = GPTConfig(**(TINY if args.dry_run else GPT2_SMALL))
    batch_size, rounds, steps = (4, 1, 2) if args.dry_run else (args.batch_size, args.rounds, args.steps)
    t_start = time.perf_counter()
    parity = [] if args.skip_parity else parity_checks(device)
    if not args.skip_trainer:  # ftrain.Trainer on the device against transformers.Trainer (gpu_trainer_check.py)
        sys.path.insert(0, str(Path(__file__).parent))
        from gpu_trainer_check import trainer_checks

        parity += trainer_checks(args.dry_run)
    for row in parity:
        print(f"  parity: {row}", flush=True)
    rows = throughput(cfg, device, batch_size, amp=True, rounds=rounds, steps=steps)
    n_params = sum(p.numel() for p in GPT(cfg).parameters())
    peak = _peak_tflops(device, args.peak_tflops)
    for r in (r for r in rows if "error" not in r):
        r["mfu"] = flops_per_token(cfg, n_params) * r["tokens_per_s"] / (peak * 1e12) if peak else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"GPT {n_params / 1e6:.1f}M params, batch {batch_size} × {cfg.seq_len}, bf16 autocast; {name}, "
          f"torch {torch.__version__}, peak {peak} TFLOP/s")  # fmt: skip
    print(_table(rows, peak))
    result = {
        "device": name, "torch": torch.__version__, "params": n_params, "batch_size": batch_size,
        "seq_len": cfg.seq_len, "peak_tflops": peak, "parity": parity, "throughput": rows,
        "wall_s": time.perf_counter() - t_start, "dry_run": args.dry_run,
    }  # fmt: skip
    out = args.out or (os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
    print(f"wall {result['wall_s']:.0f} s; parity {'ok' if all(r['ok'] for r in parity) else 'FAILED'}")
    return 0 if all(r["ok"] for r in parity) and not any("error" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
