"""Train a small byte-level GPT on the English text CPython ships (pydoc_data.topics) with ftrain's pure core.

    python examples/train_gpt.py                 # eager, a couple of minutes on 2 CPU cores
    python examples/train_gpt.py --steps 50 --compile

This is the loop `ftrain train` runs for its default recipe, without checkpoints and logging files: everything
that changes is in the TrainState, and a batch is a pure function of (seed, step), so a rerun prints the same
numbers. The text and its windows come from the recipe module (ftrain/recipes/gpt.py).
"""

from __future__ import annotations

import argparse

import torch

import ftrain
from ftrain import metrics, optim, random, schedules
from ftrain.data import BatchStream
from ftrain.models import GPT, GPTConfig
from ftrain.recipes.gpt import load_text, loss_fn, text_windows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (one is fastest for this model on a busy CPU)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    # Training windows of 128 bytes every 64 bytes of the first 90% of the text; validation: the rest, in order.
    train_data, val_data = text_windows(load_text("pydoc"), seq_len=128, stride=64, val_fraction=0.1)
    model_key, data_key = random.split(random.key(args.seed))
    torch.manual_seed(random.seed_for_step(model_key, 0))  # the initial weights come from the key too
    model = GPT(GPTConfig(vocab_size=256, seq_len=128, n_layer=4, n_head=4, d_model=128, dropout=0.1))

    # AdamW with HF's weight-decay rule (no decay for biases and LayerNorm weights), warmup + cosine, clipping.
    lr = schedules.get_schedule("cosine", args.lr, num_warmup_steps=args.steps // 10, num_training_steps=args.steps)
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(lr, weight_decay=0.1, mask=optim.hf_decay_mask(model)))
    state = ftrain.TrainState.create(model, tx, key=model_key)
    train_step, eval_step = ftrain.make_train_step(loss_fn), ftrain.make_eval_step(loss_fn)
    if args.compile:
        train_step, eval_step = ftrain.jit(train_step, donate=True), ftrain.jit(eval_step)

    stream = BatchStream(train_data, args.batch_size, seed=data_key, drop_last=True)  # batch k = f(seed, k)
    running = metrics.RunningMean()
    for step, batch in enumerate(stream.iter_from(0, stop=args.steps), start=1):
        state, m = train_step(state, batch)
        running.add(m)  # metrics stay tensors: no host sync until we print
        if step % 50 == 0 or step == args.steps:
            m = running.pop()
            print(f"step {step:4d}  loss {m['loss']:.4f}  lr {m['learning_rate']:.2e}  grad_norm {m['grad_norm']:.3f}")

    val = BatchStream(val_data, args.batch_size, shuffle=False)
    reducer = metrics.Reducer()  # sums (loss_sum, count): the exact per-byte mean over the validation windows
    for i in range(min(20, len(val))):
        reducer.add(eval_step(state, val.batch_at(i)))
    loss = reducer.compute()["loss"]
    print(f"validation loss {loss:.4f}  perplexity {metrics.perplexity(loss):.3f}")


if __name__ == "__main__":
    main()
