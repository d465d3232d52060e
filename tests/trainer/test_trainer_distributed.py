"""``ftrain.Trainer`` under ``torch.distributed.run --nproc_per_node 2`` (gloo, CPU) trains what one process trains.

One launch of ``dist_trainer_worker.py`` runs FSDP (``fsdp="full_shard"``), plain data parallel, and an FSDP run
stopped after checkpoint-4 then resumed; the reference is a one-process ``ftrain.Trainer`` on the same global batch
(4 rows per device × 1 process vs 2 × 2), sequential sampling and no dropout. Eager only.

Two ranks and one process compute the same mathematics with reductions split differently (each rank's (sum, count)
then a sum over ranks), so the model is float64 (``tiny_gpt2()``) and the comparisons use ``FLOAT64``: in float32 one
element whose gradient is rounding noise moved by ~lr and broke ``atol=1e-6`` on another CPU (issue 12). The resumed
run against the uninterrupted one runs the same kernels on the same layout, so that comparison is bitwise.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tolerances import FLOAT64

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")
safetensors_torch = pytest.importorskip("safetensors.torch")

from ftrain.trainer import ProgressCallback, Trainer, TrainingArguments  # noqa: E402
from tests.trainer import dist_trainer_worker as w  # noqa: E402
from tests.trainer.test_trainer_parity import APPROX64, tiny_gpt2, token_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RUNS_IN_LAUNCH = 4  # train() calls in the worker: fsdp, ddp, the stopped run, the resumed run


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """The worker's output directory and the launch's stdout."""
    out = tmp_path_factory.mktemp("two")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(Path(w.__file__)), str(out)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return out, proc.stdout


@pytest.fixture(scope="module")
def one(tmp_path_factory, one_thread):
    """The one-process reference: 4 rows per device, the same global batches and evaluation."""
    out = tmp_path_factory.mktemp("one")
    sizes = {"per_device_train_batch_size": 4, "per_device_eval_batch_size": 4}
    args = TrainingArguments(output_dir=str(out), **{**w.RUN_ARGS, **sizes})
    trainer = Trainer(
        model=tiny_gpt2(),
        args=args,
        train_dataset=token_rows(),
        eval_dataset=w.eval_rows(),
        compute_metrics=w.next_token_metrics,
        preprocess_logits_for_metrics=w.argmax_logits,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    return out, trainer, trainer.evaluate()


def _record(two, name):
    out, _ = two
    return json.loads((out / f"{name}.json").read_text()), torch.load(out / f"{name}_state.pt")


def _steps(history):
    return [e for e in history if "loss" in e]


def test_fsdp_shards_the_state_and_no_fsdp_replicates_it(two):
    fsdp, _ = _record(two, "fsdp")
    ddp, _ = _record(two, "ddp")
    assert fsdp["layout"]["dp_shard"] == 2 and fsdp["layout"]["is_fsdp_enabled"]
    assert fsdp["layout"]["local_shape"][0] * 2 == fsdp["layout"]["full_shape"][0]  # half the rows on each rank
    assert (ddp["layout"]["dp_replicate"], ddp["layout"]["dp_shard"]) == (2, 1) and not ddp["layout"]["is_fsdp_enabled"]
    assert ddp["layout"]["local_shape"] == ddp["layout"]["full_shape"]


@pytest.mark.parametrize("name", ["fsdp", "ddp"])
def test_logged_losses_and_final_params_match_one_process(two, one, name):
    record, state = _record(two, name)
    ref = _steps(one[1].state.log_history)
    got = _steps(record["log_history"])
    assert [e["step"] for e in got] == list(range(1, 9)) == [e["step"] for e in ref]
    for a, b in zip(ref, got):
        # float64 on both sides, ftrain's loss accumulator included: FLOAT64 for each logged value
        assert b["loss"] == pytest.approx(a["loss"], **APPROX64)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], **APPROX64)
        assert b["learning_rate"] == pytest.approx(a["learning_rate"], **APPROX64)
        assert b["epoch"] == pytest.approx(a["epoch"], **APPROX64)
        assert b["num_input_tokens_seen"] == a["num_input_tokens_seen"]  # summed over the ranks (integers)
    summary = next(e for e in record["log_history"] if "train_loss" in e)
    ref_summary = next(e for e in one[1].state.log_history if "train_loss" in e)
    assert summary["train_loss"] == pytest.approx(ref_summary["train_loss"], **APPROX64)
    ref_params = one[1]._train_state.params
    assert set(state["params"]) == set(ref_params)
    for key, value in state["params"].items():
        # Float64 after 8 AdamW steps (measured max |diff| 2.3e-15); a rank's missing microbatch or a wrong lr is
        # orders of magnitude above FLOAT64 (lr 1.001e-3 moves the params by ~5e-6).
        assert value.dtype == torch.float64
        torch.testing.assert_close(value, ref_params[key], **FLOAT64)


def test_evaluate_sums_over_ranks_and_gathers_every_row(two, one):
    record, _ = _record(two, "fsdp")
    got, ref = record["eval"], one[2]
    assert got["eval_rows"] == ref["eval_rows"] == w.EVAL_ROWS  # rank 1's padding row is dropped
    assert got["eval_loss"] == pytest.approx(ref["eval_loss"], **APPROX64)  # float64 (sum, count) over the ranks
    assert got["eval_pred_checksum"] == ref["eval_pred_checksum"]  # the same rows, in the same order
    assert got["eval_label_checksum"] == ref["eval_label_checksum"]


def test_checkpoints_hold_sharded_state_and_full_hf_views(two, one):
    out = two[0] / "fsdp"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    folder = out / "checkpoint-4"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["backend"] == "dcp"
    assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == 4
    assert (folder / "COMMIT").exists() and (folder / "config.json").exists()
    weights = safetensors_torch.load_file(folder / "model.safetensors")
    ref = safetensors_torch.load_file(one[0] / "checkpoint-4" / "model.safetensors")
    assert set(weights) == set(ref)
    for key, value in weights.items():
        # full tensors, not one rank's shard: float64 params after 4 steps, as in the params test above
        torch.testing.assert_close(value, ref[key], **FLOAT64)
    # transformers' optimizer.pt holds the gathered optimizer state (every rank's shard), as one process writes it
    ours, theirs = (torch.load(f / "optimizer.pt", weights_only=True) for f in (folder, one[0] / "checkpoint-4"))
    assert ours["param_groups"] == theirs["param_groups"] and ours["state"].keys() == theirs["state"].keys()
    for i, entry in theirs["state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(ours["state"][i][key], value, **FLOAT64)
    assert {"rng_state_0.pth", "rng_state_1.pth", "scheduler.pt"} <= {p.name for p in folder.iterdir()}


def test_save_model_writes_the_full_model_from_rank_zero(two):
    _, state = _record(two, "fsdp")
    final = two[0] / "fsdp" / "final"
    model = transformers.GPT2LMHeadModel.from_pretrained(final)
    params = dict(model.named_parameters())
    for key, value in state["params"].items():  # a save/load round trip of the gathered float64 params: bitwise
        assert torch.equal(params[key].detach(), value), key


def test_resume_from_checkpoint_four_ends_bitwise_equal(two):
    fsdp, full = _record(two, "fsdp")
    resumed, state = _record(two, "resume")
    assert resumed["killed_at"] == 4
    # Bitwise: the resumed run executes steps 5-8 with the same kernels, in the same order, on the same 2-rank layout
    # as the uninterrupted one, from a state restored exactly.
    for key, value in full["params"].items():
        assert torch.equal(state["params"][key], value), key
    assert len(state["opt_state"]) == len(full["opt_state"])
    for a, b in zip(state["opt_state"], full["opt_state"]):
        assert torch.equal(a, b)
    # steps 1-4 come back with the TrainerState of checkpoint-4 (as transformers); 5-8 are recomputed
    logged = [(e["step"], e["loss"], e["grad_norm"]) for e in _steps(resumed["log_history"])]
    assert logged == [(e["step"], e["loss"], e["grad_norm"]) for e in _steps(fsdp["log_history"])]


def test_only_world_process_zero_logs(two):
    assert two[1].count("'train_loss'") == RUNS_IN_LAUNCH  # the train() summary, printed by rank 0 only


# ---- one process: what __init__ and train() set up (issue 5 follow-ups) ----------------------------------------------


def test_init_records_the_process_facts_without_a_mesh_on_one_process(tmp_path):
    trainer = Trainer(model=tiny_gpt2(), args=TrainingArguments(str(tmp_path), report_to="none", use_cpu=True))
    assert (trainer.device.type, trainer.world_size, trainer.process_index) == ("cpu", 1, 0)
    assert trainer.parallel_config is None and trainer.mesh is None and trainer._data_parallel() == (0, 1)
    assert not trainer.is_fsdp_enabled  # fsdp on one process lays nothing out, as without it


def test_train_aligns_the_model_config_with_the_tokenizer_as_transformers(tmp_path, one_thread):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers.trainer_utils import align_special_tokens

    vocab = {f"t{i}": i for i in range(64)}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t1")), eos_token="t5", pad_token="t7"
    )
    ours, theirs = tiny_gpt2(), tiny_gpt2()
    args = TrainingArguments(str(tmp_path), **{**w.ARGS, "max_steps": 1})
    trainer = Trainer(model=ours, args=args, train_dataset=token_rows(8), processing_class=tokenizer)
    trainer.remove_callback(ProgressCallback)
    assert ours.config.eos_token_id == 0  # untouched until train()
    trainer.train()
    align_special_tokens(theirs, tokenizer)
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        assert getattr(ours.config, name) == getattr(theirs.config, name), name
        assert getattr(ours.generation_config, name) == getattr(theirs.generation_config, name), name
    assert (ours.config.eos_token_id, ours.config.pad_token_id) == (5, 7)


def _layout_args(**changes):
    from types import SimpleNamespace

    base = dict(world_size=2, fsdp=None, fsdp_config=None, deepspeed=None, parallelism_config=None, bf16=False)
    return SimpleNamespace(**{**base, "fp16": False, **changes})


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"fsdp": "full_shard", "parallelism_config": "P"}, ValueError, "parallelism_config and fsdp/deepspeed"),
        ({"parallelism_config": object()}, ValueError, "is a object; ftrain's Trainer lays out its state with an"),
        ({"parallelism_config": "TP"}, NotImplementedError, "cp=1, tp=2: context and tensor parallel are not wired"),
    ],
)
def test_parallel_layout_refuses_what_the_trainer_cannot_lay_out(changes, error, match):
    from ftrain.distributed import ParallelConfig
    from ftrain.trainer.parallel import parallel_layout

    named = {"P": ParallelConfig(dp_shard=2), "TP": ParallelConfig(dp_shard=1, tp=2)}
    changes = {
        k: named.get(v, v) if isinstance(v, str) and k == "parallelism_config" else v for k, v in changes.items()
    }
    with pytest.raises(error, match=match):
        parallel_layout(_layout_args(**changes))
    assert parallel_layout(_layout_args(world_size=1, fsdp="full_shard")) is None  # one process: nothing to lay out
    assert parallel_layout(_layout_args(parallelism_config=named["P"])).dp_shard == 2
