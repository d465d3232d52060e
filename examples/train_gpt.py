"""Train a small byte-level GPT on the English text CPython ships (pydoc_data.topics) with ftrain's pure core.

    python examples/train_gpt.py                  # ~2 minutes on 2 CPU cores
    python examples/train_gpt.py --steps 50 --no-compile

Everything that changes is in the TrainState; a batch is a pure function of (data key, step), so a rerun with the
same seed prints the same numbers.
"""

from __future__ import annotations

import argparse
import math
import time
from pydoc_data.topics import topics

import torch

import ftrain
from ftrain import losses, optim, random, schedules
from ftrain.models import GPT, GPTConfig


def load_bytes() -> tuple[torch.Tensor, torch.Tensor]:
    """The pydoc topics as one byte stream (sorted by topic name, so it is the same everywhere), split 90/10."""
    text = "\n\n".join(topics[name] for name in sorted(topics))
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    cut = int(0.9 * len(data))
    return data[:cut], data[cut:]


def batch_at(data: torch.Tensor, key: torch.Tensor, step: int, batch_size: int, seq_len: int) -> dict:
    """Random windows of ``seq_len`` bytes; which windows depends only on (key, step)."""
    g = torch.Generator().manual_seed(random.seed_for_step(key, step))
    starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=g)
    ids = torch.stack([data[s : s + seq_len] for s in starts.tolist()])
    return {"input_ids": ids}


def loss_fn(model, batch):
    return losses.cross_entropy(model(batch["input_ids"]), batch["input_ids"], shift=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args()

    train, val = load_bytes()
    model_key, data_key = random.split(random.key(args.seed))
    torch.manual_seed(random.seed_for_step(model_key, 0))  # the initial weights come from the key too
    model = GPT(GPTConfig(vocab_size=256, seq_len=args.seq_len, n_layer=4, n_head=4, d_model=128, dropout=0.1))

    # AdamW with HF's weight-decay rule (no decay for biases and LayerNorm weights), warmup + cosine, clipping.
    lr = schedules.get_schedule("cosine", args.lr, num_warmup_steps=args.steps // 10, num_training_steps=args.steps)
    tx = optim.chain(
        optim.clip_by_global_norm(1.0),
        optim.adamw(lr, weight_decay=0.1, mask=optim.hf_decay_mask(model)),
    )
    state = ftrain.TrainState.create(model, tx, key=model_key)
    train_step = ftrain.make_train_step(loss_fn)
    eval_step = ftrain.make_eval_step(loss_fn)
    if not args.no_compile:
        train_step, eval_step = ftrain.jit(train_step, donate=True), ftrain.jit(eval_step)
    print(f"{sum(v.numel() for v in state.params.values()):,} parameters; {len(train):,} training bytes")

    running = ftrain.metrics.RunningMean()
    t0 = time.perf_counter()
    for step in range(args.steps):
        state, metrics = train_step(state, batch_at(train, data_key, step, args.batch_size, args.seq_len))
        running.add(metrics)
        if step == 0:
            t0 = time.perf_counter()  # throughput after the first (compiling) step
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            m = running.pop()
            tok_s = step * args.batch_size * args.seq_len / max(time.perf_counter() - t0, 1e-9)
            print(f"step {step + 1:4d}  loss {m['loss']:.4f}  lr {m['learning_rate']:.2e}  {tok_s:,.0f} tokens/s")

    val_key = random.fold_in(data_key, 1)
    reducer = ftrain.metrics.Reducer()
    for i in range(args.eval_batches):
        reducer.add(eval_step(state, batch_at(val, val_key, i, args.batch_size, args.seq_len)))
    val_loss = reducer.compute()["loss"]
    print(f"validation loss {val_loss:.4f}  perplexity {math.exp(val_loss):.3f}")


if __name__ == "__main__":
    main()
