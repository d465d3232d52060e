"""2 gloo processes train each layout for 20 steps on their halves of the global batches; the loss curve and the
final params equal the single-process run on the same global batches (DESIGN.md invariant 4: same step code on 1
and N processes). One launch covers every eager layout; one launch covers the compiled ones.

The claim is mathematical, so it is checked in float64 (dist_workers builds float64 models) with
``tolerances.FLOAT64``: the two sides sum the loss and gradients over 2 half batches instead of 1 whole one, a
reordering that costs a few units of 2**-53, while a real difference (a missing term, a wrong count or mean, a step
of lr) is orders of magnitude above it. Only bf16 mixed precision is float32, with its tolerance derived below."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as tmp

sys.path.insert(0, str(Path(__file__).parent))
import dist_workers as w  # noqa: E402
from tolerances import FLOAT64, UNIT_ROUNDOFF, adam_drift, adam_loss_drift, reduction_rtol  # noqa: E402

EAGER = ["dp", "fsdp", "hsdp", "fsdp_accum", "dp_accum", "zero1", "zero2", "offload", "uneven", "tp", "bf16"]
COMPILED = ["uneven", "dp_mlp"]  # FSDP (uneven shards) and DP; the MLP keeps two compiles short


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


def assert_matches(got: dict, ref: dict) -> None:
    """The float64 loss curve and final params of the 2-process run == the 1-process run's, to ``FLOAT64``."""
    assert got["loss"].dtype == ref["loss"].dtype == torch.float64
    torch.testing.assert_close(got["loss"], ref["loss"], **FLOAT64)
    assert sorted(got["params"]) == sorted(ref["params"])
    for k, v in ref["params"].items():
        assert v.dtype == torch.float64, k
        torch.testing.assert_close(got["params"][k], v, **FLOAT64, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("name", [n for n in EAGER if n != "bf16"])
def test_two_processes_equal_one(eager_results, name):
    ref = w.reference(name)
    got = eager_results[name]
    assert_matches(got, ref)
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


def adam_loss_rtol(loss_rtol: float, grad_rtol: float, lr: float, steps: int, ref: dict) -> float:
    """Relative tolerance on the loss of two runs whose gradients differ by rounding (relative ``grad_rtol``) after
    ``steps`` Adam steps, each loss itself computed to ``loss_rtol``: :func:`tolerances.adam_loss_drift` relative to
    the smallest loss."""
    n_params = sum(v.numel() for v in ref["params"].values())
    drift = adam_loss_drift(lr, steps, grad_rtol, n_params, float(ref["max_grad_norm"]))
    return loss_rtol + drift / float(ref["loss"].min())


def test_bf16_params_match_a_reference_that_casts_the_same_way(eager_results):
    """bf16 mixed precision is float32 master weights under a bfloat16 forward: float32 and bfloat16 are the point,
    so the tolerances come from bfloat16's rounding and Adam's step size, not from float64."""
    ref = w.reference("bf16", param_dtype=torch.bfloat16)
    got = eager_results["bf16"]
    assert got["output_dtype"] == "torch.bfloat16"  # the forward really ran in bfloat16
    assert all(v.dtype == torch.float32 for v in got["params"].values())  # master weights stay float32
    last = w.lm_batches(w.STEPS, w.BATCH)[-1]["labels"]  # every label of the global batch counted once, exactly
    assert int(got["metrics"]["count"]) == int((last[:, 1:] != -100).sum())
    # The loss. Both sides start from the same float32 masters, cast alike, and compute each row alike; they differ:
    # the weight gradients, each the output of a matmul over the rows (accumulated in float32, rounded to bfloat16):
    # the ranks' halves round separately and are summed in float32 (reduce_dtype), the reference rounds the whole.
    # So gradients differ by one bfloat16 rounding on each side, 2·2**-8, and Adam spreads that over the steps
    # (adam_loss_rtol); the loss itself is a float32 sum of ≤ 8 × 15 tokens a step, reordered over the 2 ranks.
    # That comes to ≈ 5e-2: it catches a diverged or NaN run, not a subtle one - the exact count and the dtypes
    # above, and the float64 layouts, carry the rest (seen: 6e-5).
    tokens = w.BATCH * 15
    rtol = adam_loss_rtol(reduction_rtol(tokens), 2 * UNIT_ROUNDOFF[torch.bfloat16], 3e-3, w.STEPS - 1, ref)
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=rtol, atol=0.0)
    # The params: float32 masters after STEPS AdamW steps of lr 3e-3 whose gradients differ by bfloat16 rounding:
    # an element whose gradient is rounding noise moves +lr on one side and -lr on the other, so adam_drift is the
    # bound. It is loose by nature (the float64 layouts above make the equivalence claim).
    for k, v in ref["params"].items():
        torch.testing.assert_close(got["params"][k], v, rtol=0, atol=adam_drift(3e-3, w.STEPS))


@pytest.mark.compiled
def test_compiled_two_processes_equal_one(tmp_path):
    results = launch(tmp_path, COMPILED, compiled=True)
    for name in COMPILED:  # compiled on 2 ranks == eager on 1: float64, FLOAT64 (inductor reorders, rounds alike)
        assert_matches(results[name], w.reference(name))
        assert int(results[name]["recompiles"]) == 0


def test_metrics_are_global_and_aux_sums_are_reduced_for_logging(eager_results):
    ref = w.reference("uneven")
    got = eager_results["uneven"]
    # loss, count and grad_norm come out of the step global already (the (sum, count) all-reduce)...
    assert float(got["metrics"]["count"]) == 8 * 3  # 8 rows × 3 outputs of the global batch
    torch.testing.assert_close(got["metrics"]["grad_norm"], ref["grad_norm"], **FLOAT64)  # float64: 2 sums vs 1
    # ...while the loss function's own sums are this rank's until reduce_metrics sums them (4 rows of 8 each).
    assert float(got["metrics"]["rows"]) == 4 and float(got["logged"]["rows"]) == 8
    assert torch.equal(got["logged"]["loss"], got["metrics"]["loss"])  # passed through, not recomputed: bitwise
