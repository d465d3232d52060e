"""Context parallel: batch preparation against the unsharded batch, (sum, count) bookkeeping, and a 2-rank gloo
run of a tiny causal-attention LM whose loss and gradients equal the single-process ones.

Every numeric comparison here is a mathematical equivalence (cp shards == the whole sequence, all-gather attention ==
masked attention on the global sequence, compiled == eager) computed in float64 (the models and logits are float64),
so it uses ``tolerances.FLOAT64``; index and count comparisons are exact."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as tmp
from tolerances import FLOAT64

from ftrain import losses
from ftrain.distributed.context_parallel import (
    all_gather_kv_attention,
    cp_permutation,
    cp_shard_indices,
    prepare_cp_batch,
    unshard_sequence,
)

sys.path.insert(0, str(Path(__file__).parent))  # the workers live next to this file; forkserver children import them
from cp_attention_workers import (  # noqa: E402
    SEQ,
    VOCAB,
    _batch,
    _compiled_worker,
    _cp_worker,
    _model,
    _reference_attention,
)


@pytest.mark.parametrize("cp_size", [1, 2, 4])
@pytest.mark.parametrize("load_balance", [True, False])
def test_shards_reassemble_to_the_globally_shifted_batch(cp_size, load_balance):
    batch = _batch()
    shards = [prepare_cp_batch(batch, r, cp_size, load_balance=load_balance) for r in range(cp_size)]
    expected_shift = torch.cat([batch["labels"][:, 1:], torch.full((3, 1), -100)], dim=1)
    for key, want in [
        ("input_ids", batch["input_ids"]),
        ("attention_mask", batch["attention_mask"]),
        ("shift_labels", expected_shift),
        ("position_ids", torch.arange(SEQ).expand(3, SEQ)),
    ]:
        got = unshard_sequence([s[key] for s in shards], load_balance=load_balance)
        assert torch.equal(got, want), key
    assert all("labels" not in s for s in shards)  # the loss must use shift_labels, never shift a shard again
    assert all(s["input_ids"].shape == (3, SEQ // cp_size) for s in shards)
    assert "position_ids" not in batch and "labels" in batch  # the input batch is not changed


def test_load_balanced_order_is_head_tail_and_evens_causal_work():
    assert cp_permutation(16, 4).view(4, -1).tolist() == [
        [0, 1, 14, 15],
        [2, 3, 12, 13],
        [4, 5, 10, 11],
        [6, 7, 8, 9],
    ]
    # causal attention work of a rank = the number of keys its queries see = sum(position + 1)
    balanced = [int((cp_shard_indices(64, r, 4) + 1).sum()) for r in range(4)]
    contiguous = [int((cp_shard_indices(64, r, 4, load_balance=False) + 1).sum()) for r in range(4)]
    assert balanced == [520] * 4 and sum(balanced) == 64 * 65 // 2
    assert contiguous == [136, 392, 648, 904]


def test_given_position_ids_and_shift_labels_are_sharded_not_recomputed():
    batch = _batch()
    batch["position_ids"] = torch.arange(SEQ).flip(0).expand(3, SEQ)
    batch["shift_labels"] = torch.full((3, SEQ), 7)
    shard = prepare_cp_batch(batch, 1, 2)
    index = cp_shard_indices(SEQ, 1, 2)
    assert torch.equal(shard["position_ids"], batch["position_ids"][:, index])
    assert torch.equal(shard["shift_labels"], torch.full((3, SEQ // 2), 7))
    assert "labels" not in shard


@pytest.mark.parametrize("load_balance", [True, False])
def test_sum_and_count_over_cp_ranks_equal_the_unsharded_loss(load_balance):
    batch = _batch(seed=3)
    logits = torch.randn(3, SEQ, VOCAB, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    full_sum, full_count = losses.cross_entropy(logits, batch["labels"], shift=True)
    total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.long)
    for r in range(4):
        shard = prepare_cp_batch(batch, r, 4, load_balance=load_balance)
        local_logits = logits[:, cp_shard_indices(SEQ, r, 4, load_balance=load_balance)]
        s, n = losses.cross_entropy(local_logits, shard["shift_labels"])
        total, count = total + s, count + n
    assert int(count) == int(full_count) == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(total, full_sum, **FLOAT64)  # float64: 4 shard sums added vs 1 sum


def test_bad_inputs_fail_with_the_fix():
    batch = _batch()
    with pytest.raises(ValueError, match=r"sequence length 16 is not a multiple of 32 chunks.*Pad the batch"):
        prepare_cp_batch(batch, 0, 16)
    with pytest.raises(ValueError, match=r"cp_rank must be an int in \[0, 2\), got 2"):
        prepare_cp_batch(batch, 2, 2)
    with pytest.raises(ValueError, match=r"batch\['mask4d'\] has size 1 along seq_dim=1 but the sequence length is 16"):
        prepare_cp_batch({**batch, "mask4d": torch.ones(3, 1, SEQ, SEQ)}, 0, 2)
    with pytest.raises(ValueError, match=r"none of \['input_ids', 'inputs_embeds', 'labels', 'shift_labels'\]"):
        prepare_cp_batch({"x": torch.ones(2, 4)}, 0, 2)
    odd = {"input_ids": torch.arange(7)[None]}
    assert torch.equal(prepare_cp_batch(odd, 0, 1)["input_ids"], odd["input_ids"])  # cp=1: any length
    shard = prepare_cp_batch({**batch, "cls": torch.tensor([1, 2, 3])}, 0, 2)
    assert torch.equal(shard["cls"], torch.tensor([1, 2, 3]))  # a per-example tensor stays whole


# --- 2 gloo ranks: a tiny causal-attention LM, cp=2 against one process ---------------------------------------


def test_two_gloo_ranks_match_one_process_loss_and_gradients(tmp_path):
    tmp.start_processes(
        _cp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="forkserver", join=True
    )
    batch = _batch(seed=5)
    model = _model()
    logits = model(batch["input_ids"], torch.arange(SEQ).expand(3, SEQ), _reference_attention(batch["attention_mask"]))
    ref_sum, ref_count = losses.cross_entropy(logits, batch["labels"], shift=True)
    ref_grads = torch.autograd.grad(ref_sum, list(model.parameters()))
    for load_balance in (True, False):
        ranks = [torch.load(tmp_path / f"rank{r}_lb{int(load_balance)}.pt") for r in range(2)]
        # float64 (the model is float64): attention over gathered keys vs over the masked global sequence, FLOAT64
        got_logits = unshard_sequence([r["logits"] for r in ranks], load_balance=load_balance)
        torch.testing.assert_close(got_logits, logits.detach(), **FLOAT64)
        assert int(sum(r["count"] for r in ranks)) == int(ref_count)
        torch.testing.assert_close(sum(r["sum"] for r in ranks), ref_sum.detach(), **FLOAT64)
        for i, ref in enumerate(ref_grads):
            got = ranks[0]["grads"][i] + ranks[1]["grads"][i]
            torch.testing.assert_close(got, ref, **FLOAT64)
            assert float(ref.abs().max()) > 1e-6  # every parameter gets a gradient, so the comparison has teeth


@pytest.mark.compiled
def test_attention_compiles_fullgraph_and_matches_eager(tmp_path):
    tmp.start_processes(
        _compiled_worker,
        args=(2, str(tmp_path / "store"), str(tmp_path)),
        nprocs=2,
        start_method="forkserver",
        join=True,
    )
    for rank in range(2):
        result = torch.load(tmp_path / f"compiled{rank}.pt")
        for eager, compiled in zip(result["eager"], result["compiled"]):  # float64: inductor's fusions vs eager
            assert eager.dtype == torch.float64
            torch.testing.assert_close(compiled, eager, **FLOAT64)
        assert float(result["eager"][2].abs().sum()) > 0  # K gets a gradient (through the reduce-scatter)


def test_attention_shape_errors_come_before_any_collective():
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"same local_seq, got q \(1, 2, 4, 8\), k \(1, 2, 3, 8\)"):
        all_gather_kv_attention(q, torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), group=None, positions=None)
    with pytest.raises(ValueError, match=r"positions \(5,\) must end in local_seq=4"):
        all_gather_kv_attention(q, q, q, group=None, positions=torch.arange(5))
