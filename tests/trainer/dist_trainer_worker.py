"""Two-process ``ftrain.Trainer`` runs for ``test_trainer_distributed.py``.

Launched as ``python -m torch.distributed.run --nproc_per_node 2 dist_trainer_worker.py OUT``; trains the tiny GPT-2
of ``test_trainer_parity.py`` (float64: the test compares it with one process to ``FLOAT64``) with
``per_device_train_batch_size=2`` on each of the 2 ranks (the global batch of a one-process run with 4):

- ``fsdp``: ``fsdp="full_shard"``, checkpoints at steps 4 and 8, then ``evaluate()`` and ``save_model()``;
- ``ddp``: no ``fsdp`` (plain data parallel), then ``save_model()``;
- ``resume``: as ``fsdp``, stopped by a callback right after checkpoint-4, then a new Trainer resumes it to step 8.

Rank 0 writes ``OUT/<run>.json`` (log history, evaluation metrics, what the sharding looked like) and
``OUT/<run>_state.pt`` (the full final state: params and optimizer leaves, gathered on every rank).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: ``tests.trainer...`` imports
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: ``from tolerances import ...`` (pytest's path)

from ftrain.trainer import ProgressCallback, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from tests.trainer.test_trainer_parity import ARGS, tiny_gpt2, token_rows  # noqa: E402

# The runs: 8 updates of 2 microbatches, checkpoints every 4, sequential sampling and no dropout (ARGS, tiny_gpt2).
RUN_ARGS = {
    **ARGS,
    "max_steps": 8,
    "per_device_train_batch_size": 2,  # × 2 ranks × 2 microbatches: 8 rows per update
    "per_device_eval_batch_size": 2,
    "save_strategy": "steps",
    "save_steps": 4,
    "include_num_input_tokens_seen": "all",
}
EVAL_ROWS = 9  # 2 batches of 2 × 2 ranks, then 1 row: the last batch is padded on rank 1


def eval_rows():
    return token_rows(EVAL_ROWS, seed=2)


def argmax_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``preprocess_logits_for_metrics``: the predicted tokens."""
    return logits.argmax(-1)


def next_token_metrics(prediction) -> dict[str, float]:
    """``compute_metrics``: how many rows were gathered, and checksums of the predictions and labels that weight
    each element by its position (a row missing, duplicated or out of order changes them)."""
    preds, labels = prediction.predictions.astype("int64"), prediction.label_ids.astype("int64")
    weights = np.arange(1, preds.size + 1).reshape(preds.shape)
    return {
        "rows": float(len(preds)),
        "pred_checksum": float((preds * weights).sum()),
        "label_checksum": float((labels * weights).sum()),
    }


def _trainer(out: Path, name: str, **overrides):
    args = TrainingArguments(output_dir=str(out / name), **{**RUN_ARGS, **overrides})
    trainer = Trainer(
        model=tiny_gpt2(),
        args=args,
        train_dataset=token_rows(),
        eval_dataset=eval_rows(),
        compute_metrics=next_token_metrics,
        preprocess_logits_for_metrics=argmax_logits,
    )
    trainer.remove_callback(ProgressCallback)
    return trainer


def _dump(trainer, out: Path, name: str, **extra) -> None:
    """Every rank gathers the full state; rank 0 writes it and the log history."""
    from ftrain import tree
    from ftrain.distributed import gather_state

    full = gather_state(trainer._train_state)
    if trainer.is_world_process_zero():
        leaves = {"params": dict(full.params), "opt_state": tree.tree_leaves(full.opt_state)}
        torch.save(leaves, out / f"{name}_state.pt")
        record = {"log_history": trainer.state.log_history, **extra}
        (out / f"{name}.json").write_text(json.dumps(record))


def _layout(trainer) -> dict:
    """What the Trainer laid out: its config and the local shape of one parameter on this rank."""
    name = "transformer.h.0.mlp.c_fc.weight"
    leaf = trainer._train_state.params[name]
    local = leaf.to_local() if hasattr(leaf, "to_local") else leaf
    config = trainer.parallel_config
    return {
        "dp_replicate": config.dp_replicate,
        "dp_shard": config.dp_shard,
        "is_fsdp_enabled": trainer.is_fsdp_enabled,
        "local_shape": list(local.shape),
        "full_shape": list(trainer.model.get_parameter(name).shape),
    }


class StopAfter(TrainerCallback):
    """A callback that stops training after ``step`` (its checkpoint is written first): the 'killed' run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def main(out: Path) -> None:
    torch.set_num_threads(1)
    fsdp = _trainer(out, "fsdp", fsdp="full_shard")
    fsdp.train()
    layout = _layout(fsdp)
    metrics = fsdp.evaluate()
    fsdp.save_model(str(out / "fsdp" / "final"))
    _dump(fsdp, out, "fsdp", eval=metrics, layout=layout, tokens=fsdp.state.num_input_tokens_seen)

    ddp = _trainer(out, "ddp", save_strategy="no")
    ddp.train()
    _dump(ddp, out, "ddp", layout=_layout(ddp))

    killed = _trainer(out, "resume", fsdp="full_shard")
    killed.add_callback(StopAfter(4))
    killed.train()
    resumed = _trainer(out, "resume", fsdp="full_shard")
    resumed.train(resume_from_checkpoint=True)
    _dump(resumed, out, "resume", killed_at=killed.state.global_step)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
