"""GPU check of ``ftrain.Trainer``'s device placement: a tiny GPT-2 trained on the GPU against ``transformers.Trainer``.

For fp32 and bf16, eager and ``torch_compile=True``: 20 steps of a GPT-2 built from a config (2 layers, d=64), the
same data and AdamW settings on both trainers (transformers' eager, the reference). Checks, per run:

- placement: ``trainer.model``'s parameters and the ``TrainState``'s ``params`` / ``opt_state`` are on the GPU, and
  every batch an overridden ``_prepare_inputs`` returns is on it;
- parity: each step's logged loss equals transformers' within ``1e-4`` relative in fp32 (TF32 off on both sides, so
  the matmuls are IEEE float32) and within ``1e-2`` in bf16 (about 2.5 bfloat16 roundings, unit roundoff 2**-8:
  autocast runs the matmuls in bf16, and a compiled step fuses them differently from transformers' eager ones).

``--dry-run`` runs the same code on the CPU (``use_cpu=True``), eager only and 3 steps: a smoke test of the script.

Usage:
    python benchmarks/gpu_trainer_check.py [--dry-run]   # also run by benchmarks/gpu_check.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback

import torch

STEPS = 20
RTOL = {False: 1e-4, True: 1e-2}  # by bf16


def _model():
    import transformers

    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # transformers 5 counts num_items_in_batch on the shifted labels, as ftrain
    return model


def _data(rows: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (rows, 32), generator=g)
    return [{"input_ids": r, "labels": r} for r in ids]


def _settings(out: str, steps: int, bf16: bool, cpu: bool) -> dict:
    return dict(output_dir=out, report_to="none", save_strategy="no", disable_tqdm=True, max_steps=steps,
                logging_steps=1, learning_rate=1e-3, warmup_steps=2, optim="adamw_torch", per_device_train_batch_size=4,
                gradient_accumulation_steps=2, train_sampling_strategy="sequential", seed=0, bf16=bf16,
                use_cpu=cpu, tf32=None if cpu else False)  # fmt: skip


def _losses(trainer) -> list[float]:
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def run_one(bf16: bool, compile_: bool, steps: int, cpu: bool) -> dict:
    """One ftrain run against the transformers reference; returns the row of results."""
    import transformers

    from ftrain.trainer import Trainer, TrainingArguments

    seen: set[str] = set()

    class Recording(Trainer):
        def _prepare_inputs(self, inputs):
            inputs = super()._prepare_inputs(inputs)
            seen.update(str(v.device) for v in inputs.values() if torch.is_tensor(v))
            return inputs

    data = _data(4 * 2 * steps)
    with tempfile.TemporaryDirectory() as out:
        ours = Recording(_model(), TrainingArguments(**_settings(out + "/a", steps, bf16, cpu), torch_compile=compile_),
                         train_dataset=data)  # fmt: skip
        ours.train()
        reference = transformers.TrainingArguments(**_settings(out + "/b", steps, bf16, cpu))
        theirs = transformers.Trainer(_model(), reference, train_dataset=data)
        theirs.train()
    device = str(ours.plan.process.device)
    state = ours._train_state
    leaves = [*state.params.values(), *torch.utils._pytree.tree_leaves(state.opt_state)]
    placed = {str(p.device) for p in ours.model.parameters()} | {str(t.device) for t in leaves if torch.is_tensor(t)}
    mine, ref = _losses(ours), _losses(theirs)
    worst = max(abs(a - b) / abs(b) for a, b in zip(mine, ref)) if mine and len(mine) == len(ref) else float("inf")
    ok = placed == {device} and seen == {device} and worst <= RTOL[bf16]
    return {"check": f"Trainer {'bf16' if bf16 else 'fp32'} {'compiled' if compile_ else 'eager'}", "device": device,
            "state_and_model_devices": sorted(placed), "batch_devices": sorted(seen), "steps": len(mine),
            "max_rel_loss_diff": worst, "rtol": RTOL[bf16], "ok": ok}  # fmt: skip


def trainer_checks(dry_run: bool) -> list[dict]:
    """Every (bf16, compile) run; a run that raises is reported as a failed row. TF32 (the runs turn it off) is
    restored after."""
    rows, precision = [], torch.backends.fp32_precision
    for bf16 in (False, True):
        for compile_ in (False,) if dry_run else (False, True):
            try:
                rows.append(run_one(bf16, compile_, 3 if dry_run else STEPS, cpu=dry_run))
            except Exception as err:  # report every run, even when one breaks
                traceback.print_exc()
                rows.append({"check": f"Trainer bf16={bf16} compile={compile_}", "ok": False,
                             "error": f"{type(err).__name__}: {err}"[:500]})  # fmt: skip
    torch.backends.fp32_precision = precision
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU smoke run: eager, 3 steps")
    args = p.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_trainer_check: no CUDA device; use --dry-run for the CPU smoke run", file=sys.stderr)
        return 2
    rows = trainer_checks(args.dry_run)
    for row in rows:
        print(json.dumps(row))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
