"""2 gloo processes train each layout for 20 steps on their halves of the global batches; the loss curve and the
final params equal the single-process run on the same global batches (DESIGN.md invariant 4: same step code on 1
and N processes). One launch covers every eager layout; one launch covers the compiled ones."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as tmp

sys.path.insert(0, str(Path(__file__).parent))
import dist_workers as w  # noqa: E402

EAGER = ["dp", "fsdp", "hsdp", "fsdp_accum", "dp_accum", "zero1", "zero2", "offload", "uneven", "tp", "bf16"]
COMPILED = ["uneven", "dp_mlp"]  # FSDP (uneven shards) and DP; the MLP keeps two compiles short
RTOL = 1e-5


def launch(tmp_path: Path, names: list[str], compiled: bool) -> dict:
    ctx = tmp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "ftrain", "torch.distributed.tensor", "dist_workers"])
    out = tmp_path / "results.pt"
    tmp.start_processes(
        w.layouts_worker,
        args=(2, str(tmp_path / "store"), str(out), names, compiled),
        nprocs=2,
        start_method="forkserver",
    )
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def eager_results(tmp_path_factory) -> dict:
    return launch(tmp_path_factory.mktemp("layouts"), EAGER, compiled=False)


def assert_matches(got: dict, ref: dict, rtol: float, atol: float) -> None:
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=rtol, atol=0.0)
    assert sorted(got["params"]) == sorted(ref["params"])
    for k, v in ref["params"].items():
        torch.testing.assert_close(got["params"][k], v, rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("name", [n for n in EAGER if n != "bf16"])
def test_two_processes_equal_one(eager_results, name):
    ref = w.reference(name)
    got = eager_results[name]
    # Adam divides by sqrt(nu): a gradient that differs in its last bits (summed over 2 ranks instead of one
    # batch) moves a tiny-gradient weight by up to ~lr * 1e-4, hence the small absolute term on the params.
    assert_matches(got, ref, rtol=RTOL, atol=1e-6)
    assert not torch.equal(got["loss"][0], got["loss"][-1])  # it trained


def test_placements_are_sharded(eager_results):
    # Rank 1's local rows: FSDP shards dim 0 (5 rows -> 2 on rank 1: uneven), DP and ZeRO-1/2 keep params whole,
    # colwise TP halves the first Linear's rows and rowwise keeps the second's.
    assert eager_results["uneven"]["local_rows"].tolist() == [2, 2, 2, 2, 1, 1]
    assert eager_results["dp"]["local_rows"][0] == 64  # wte: 64 rows, replicated
    assert eager_results["fsdp"]["local_rows"][0] == 32
    assert eager_results["zero1"]["local_rows"][0] == 4  # the MLP's first Linear, whole
    assert eager_results["zero2"]["local_rows"][0] == 64
    assert eager_results["tp"]["local_rows"].tolist() == [4, 4, 3, 3]
    # TP splits the compute too: between the colwise and the rowwise Linear each rank holds 4 of the 8 features.
    assert int(eager_results["tp"]["hidden"]) == 4
    # Adam's moments: sharded over dp_shard at every shard level (ZeRO-1 up), whole under DP.
    for name in ("fsdp", "zero1", "zero2", "offload", "hsdp"):
        assert abs(float(eager_results[name]["opt_fraction"]) - 0.5) < 0.1, name  # MLP shards are uneven
    assert float(eager_results["dp"]["opt_fraction"]) == 1.0


def test_bf16_params_match_a_reference_that_casts_the_same_way(eager_results):
    # The forward runs in bfloat16 on both sides; the 2-process run sums two half-batch gradients where the
    # reference computes one, so bfloat16 rounding (8 bits of mantissa, ~4e-3) differs: 1e-2 on the loss.
    ref = w.reference("bf16", param_dtype=torch.bfloat16)
    got = eager_results["bf16"]
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-2, atol=0.0)
    fp32 = w.reference("fsdp")
    assert not torch.allclose(got["loss"], fp32["loss"], rtol=1e-5, atol=0)  # bf16 really ran
    for k, v in ref["params"].items():
        assert got["params"][k].dtype == torch.float32  # master weights stay float32
        torch.testing.assert_close(got["params"][k], v, rtol=0, atol=3e-2)


@pytest.mark.compiled
def test_compiled_two_processes_equal_one(tmp_path):
    results = launch(tmp_path, COMPILED, compiled=True)
    for name in COMPILED:
        assert_matches(results[name], w.reference(name), rtol=RTOL, atol=1e-6)
        assert int(results[name]["recompiles"]) == 0


def test_metrics_are_global_and_aux_sums_are_reduced_for_logging(eager_results):
    ref = w.reference("uneven")
    got = eager_results["uneven"]
    # loss, count and grad_norm come out of the step global already (the (sum, count) all-reduce)...
    assert float(got["metrics"]["count"]) == 8 * 3  # 8 rows × 3 outputs of the global batch
    torch.testing.assert_close(got["metrics"]["grad_norm"], ref["grad_norm"], rtol=1e-5, atol=0)
    # ...while the loss function's own sums are this rank's until reduce_metrics sums them (4 rows of 8 each).
    assert float(got["metrics"]["rows"]) == 4 and float(got["logged"]["rows"]) == 8
    assert torch.equal(got["logged"]["loss"], got["metrics"]["loss"])
