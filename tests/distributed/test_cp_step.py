"""Context parallel end to end: ``ftrain.models.GPT`` with ``apply_context_parallel``, batches through
``prepare_cp_batch`` and the sharded ``make_train_step`` on 2 gloo processes train 10 steps to the same losses and
parameters as one process on the whole sequence (float64, so the tolerance can be tight). One launch covers cp=2
(load-balanced and contiguous shards), FSDP (dp_shard=2, cp=1) through the same script, and a control that shows
the comparison can fail: cp=2 without the all-gather attention."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as tmp

sys.path.insert(0, str(Path(__file__).parent))
import cp_workers as w  # noqa: E402
from conftest import lm_batches, make_gpt  # noqa: E402
from tolerances import FLOAT64  # noqa: E402

from ftrain.distributed.context_parallel import (  # noqa: E402
    ContextParallelAttention,
    apply_context_parallel,
    lm_loss,
    prepare_cp_batch,
)

# float64 end to end (cp_workers builds float64 models): the cp run sums each rank's half of the loss and gradients
# where the reference computes them at once, a difference in the last bits (~1e-16), which 10 AdamW steps leave far
# below tolerances.FLOAT64 (1.1e-10); a real difference (the control below: attention without the other shard's
# keys) is 1e-4 and more.


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    tmp_path = tmp_path_factory.mktemp("cp_step")
    ctx = tmp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "ftrain", "torch.distributed.tensor", "cp_workers"])
    out = tmp_path / "results.pt"
    tmp.start_processes(
        w.cp_worker, args=(2, str(tmp_path / "store"), str(out), list(w.LAYOUTS)), nprocs=2, start_method="forkserver"
    )
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def reference() -> dict:
    return w.reference()


@pytest.mark.parametrize("name", ["cp_balanced", "cp_contiguous", "fsdp"])
def test_two_processes_equal_one(results, reference, name):
    got = results[name]
    assert got["loss"].dtype == torch.float64
    torch.testing.assert_close(got["loss"], reference["loss"], **FLOAT64)
    assert sorted(got["params"]) == sorted(reference["params"])
    for k, v in reference["params"].items():
        torch.testing.assert_close(got["params"][k], v, **FLOAT64, msg=lambda m, k=k: f"{k}: {m}")
    # the step's metrics are global: every label of the global batch is counted once, grad_norm over all tokens
    # (summed in float64 for float64 gradients, on 2 ranks as on 1: FLOAT64)
    assert int(got["metrics"]["count"]) == int(reference["metrics"]["count"])
    assert got["metrics"]["grad_norm"].dtype == torch.float64
    torch.testing.assert_close(got["metrics"]["grad_norm"], reference["metrics"]["grad_norm"], **FLOAT64)
    # it trained: 10 AdamW steps of lr 3e-3 moved the weights (random tokens: the loss stays near ln 64)
    init = {k: v.detach() for k, v in make_gpt(0, dropout=0.0, dtype=torch.float64).named_parameters()}
    for k in ("wte.weight", "blocks.0.qkv.weight", "blocks.1.fc_out.weight"):
        assert float((got["params"][k] - init[k]).abs().max()) > 1e-2, k


def test_each_rank_computes_its_share(results):
    # cp=2: every row, half of the 16 positions, attention through the cp hook; FSDP: half the rows, whole sequence
    for name in ("cp_balanced", "cp_contiguous"):
        assert results[name]["input_shape"].tolist() == [w.BATCH, 8]
        assert results[name]["attention"] == "ContextParallelAttention"
    assert results["fsdp"]["input_shape"].tolist() == [w.BATCH // 2, 16]
    assert results["fsdp"]["attention"] == "NoneType"  # cp=1: apply_context_parallel keeps the model's attention


def test_without_the_all_gather_attention_the_loss_differs(results, reference):
    # The control: each rank attends only to its own shard, so tokens lose their earlier context; the loss of the
    # very first step (same params) already differs by far more than FLOAT64 (1e-4 here, 10**6 times more).
    got = results["cp_local_attention"]["loss"]
    assert abs(float(got[0] - reference["loss"][0])) > 1e-4
    assert results["cp_local_attention"]["attention"] == "NoneType"


# --- one process: the model and loss pieces ---------------------------------------------------------------------


def test_position_ids_default_is_arange_and_embeds_global_positions():
    model = make_gpt(0, dropout=0.0, dtype=torch.float64)
    ids = lm_batches(1)[0]["input_ids"]
    plain = model(ids)
    assert torch.equal(model(ids, position_ids=torch.arange(16)), plain)
    assert torch.equal(model(ids, position_ids=torch.arange(16).expand(8, 16)), plain)
    # the second half of the sequence at positions 8..15 == the default path of a model whose position table
    # starts at row 8 (the attention is causal in the order of the tokens either way)
    half = ids[:, 8:]
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.wpe.weight[:8] = model.wpe.weight[8:]
    # bitwise: the same kernels on the same values (rows 8..15 of the table are rows 0..7 of the moved one)
    assert torch.equal(model(half, position_ids=torch.arange(8, 16)), moved(half))
    assert not torch.allclose(moved(half), model(half))
    with pytest.raises(ValueError, match=r"position_ids has shape \(15,\); expected .* with seq=16"):
        model(ids, position_ids=torch.arange(15))


def test_lm_loss_on_cp_shards_sums_to_the_shifted_loss():
    model = make_gpt(0, dropout=0.0, dtype=torch.float64)
    batch = lm_batches(1)[0]
    full_sum, full_count = lm_loss(model, batch)
    # reference: the logits of the whole sequence against labels shifted by one (no cp involved)
    logits = model(batch["input_ids"])
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 64), batch["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    torch.testing.assert_close(full_sum, ref, **FLOAT64)  # float64: the same sum by another code path
    # shards scored on the full-sequence logits (what the cp attention computes): shift_labels, no second shift
    for load_balance in (True, False):
        total, count = torch.zeros((), dtype=torch.float64), 0
        for r in range(2):
            shard = prepare_cp_batch(batch, r, 2, load_balance=load_balance)
            index = shard["position_ids"][0]
            s, n = lm_loss(lambda ids, position_ids, index=index: logits[:, index], shard)
            total, count = total + s, count + int(n)
        assert count == int(full_count) == int((batch["labels"][:, 1:] != -100).sum())
        torch.testing.assert_close(total, full_sum, **FLOAT64)  # float64: 2 shard sums added vs 1 sum
    with pytest.raises(KeyError, match=r"neither 'shift_labels' nor 'labels' \(keys: \['input_ids'\]\)"):
        lm_loss(model, {"input_ids": batch["input_ids"]})


def test_apply_context_parallel_errors_and_deepcopy():
    with pytest.raises(ValueError, match=r"Linear has no module with an attention_fn attribute"):
        apply_context_parallel(torch.nn.Linear(2, 2), mesh=None)

    class FlatMesh:
        mesh_dim_names = ("dp",)

    with pytest.raises(ValueError, match=r"the mesh has dims \('dp',\), none named 'cp'.*build_mesh"):
        apply_context_parallel(make_gpt(0), FlatMesh())
    # TrainState.create deep-copies the model into a meta skeleton: the hook (and its process group) is shared
    model = make_gpt(0)
    model.attention_fn = ContextParallelAttention(group="a process group")
    assert copy.deepcopy(model).attention_fn is model.attention_fn
    with pytest.raises(ValueError, match="called without position_ids"):
        model(lm_batches(1)[0]["input_ids"])
