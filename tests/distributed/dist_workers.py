"""Workers of the multi-process tests (2 gloo ranks on the CPU) and the single-process references they are
compared with. Each worker runs several layouts in one launch (a launch costs seconds of imports) and rank 0
writes what it measured to ``out``; the test process computes the references and compares.

Models and data are float64 (gloo reduces float64): N ranks == 1 process is a mathematical claim, checked with
``tolerances.FLOAT64``. In float32 the two sides' gradients differ in their last bits and Adam turns that into
``±lr`` on the elements whose gradient is rounding noise (issue 12). Only the ``bf16`` layout stays float32: its
float32 master weights under a bfloat16 forward are what it tests."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))  # tests/conftest.py: the tiny GPT and its loss
from conftest import gpt_loss, lm_batches, make_gpt  # noqa: E402

from ftrain import TrainState, jit, losses, make_train_step, optim  # noqa: E402

STEPS = 20
BATCH = 8
DTYPE = torch.float64  # every layout's model and data but bf16's (float32 master weights, bf16 forward)

# name -> (ParallelConfig kwargs, model, accum_steps, tp_plan)
LAYOUTS = {
    "dp": (dict(dp_replicate=2, dp_shard=1), "gpt", 1, None),
    "fsdp": (dict(dp_shard=2), "gpt", 1, None),
    "hsdp": (dict(dp_replicate=1, dp_shard=2), "mlp", 1, None),
    "fsdp_accum": (dict(dp_shard=2), "gpt", 2, None),
    "dp_accum": (dict(dp_replicate=2, dp_shard=1), "mlp", 2, None),
    "zero1": (dict(dp_shard=2, shard_level=1), "mlp", 1, None),
    "zero2": (dict(dp_shard=2, shard_level=2), "gpt", 2, None),
    "offload": (dict(dp_shard=2, offload_optimizer=True), "mlp", 1, None),
    "uneven": (dict(dp_shard=2), "mlp", 1, None),
    "tp": (dict(dp_shard=1, tp=2), "mlp", 1, {"0": "colwise", "2": "rowwise"}),
    "bf16": (dict(dp_shard=2, param_dtype="bf16", reduce_dtype="fp32"), "gpt", 1, None),
    "dp_mlp": (dict(dp_replicate=2, dp_shard=1), "mlp", 1, None),
}


def make_mlp() -> torch.nn.Module:
    """5 and 3 rows: dim 0 does not divide by 2, so FSDP shards are uneven."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 5), torch.nn.Linear(5, 3))
    return mlp.to(DTYPE)


def make_tp_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(DTYPE)


def mlp_loss(model, batch):
    """MSE, and the rows seen as an auxiliary sum (which ``reduce_metrics`` must sum over ranks for logging)."""
    total, count = losses.mse(model(batch["x"]), batch["y"])
    return total, count, {"rows": torch.tensor(float(batch["x"].shape[0]))}


def mlp_batches(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [
        {"x": torch.randn(BATCH, 6, generator=g, dtype=DTYPE), "y": torch.randn(BATCH, 3, generator=g, dtype=DTYPE)}
        for _ in range(n)
    ]


def tx() -> optim.GradientTransformation:
    return optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(3e-3, eps=1e-4, weight_decay=0.1))


def problem(name: str):
    """(fresh model, loss_fn, batches) of a layout."""
    model = LAYOUTS[name][1]
    if model == "gpt":
        dtype = torch.float32 if LAYOUTS[name][0].get("param_dtype") else DTYPE
        return make_gpt(0, dropout=0.0, dtype=dtype), gpt_loss, lm_batches(STEPS, BATCH)
    if name == "tp":
        return make_tp_mlp(), mlp_loss, mlp_batches(STEPS)
    return make_mlp(), mlp_loss, mlp_batches(STEPS)


def local_batch(batch: dict, rank: int, world: int, accum: int):
    """This rank's rows, as BatchStream deals them: each global microbatch split into ``world`` contiguous parts."""
    micro = [dict(zip(batch, vs)) for vs in zip(*(v.chunk(accum) for v in batch.values()))]
    mine = [{k: v.chunk(world)[rank] for k, v in mb.items()} for mb in micro]
    return mine if accum > 1 else mine[0]


def reference(name: str, *, param_dtype: torch.dtype | None = None) -> dict[str, object]:
    """The single-process run on the same global batches: loss curve and final params. With ``param_dtype`` the
    forward runs on parameters cast to it (the cast mixed precision makes), gradients flow back in float32 (the
    bf16 layout's master dtype)."""
    model, loss_fn, batches = problem(name)
    accum = LAYOUTS[name][2]
    if param_dtype is not None:
        inner = loss_fn

        def loss_fn(m, b):
            return inner(_Cast(m, param_dtype), b)

    state = TrainState.create(model, tx(), key=0)
    step = make_train_step(loss_fn, accum_steps=accum)
    curve, norms = [], []
    for b in batches:
        state, metrics = step(state, b)
        curve.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    return {
        "loss": torch.tensor(curve, dtype=torch.float64),
        "params": dict(state.params),
        "grad_norm": metrics["grad_norm"],
        "max_grad_norm": max(norms),  # the largest gradient of the run (before clipping), for a loss tolerance
    }


class _Cast:
    """A bound model whose params are cast to ``dtype`` before the forward (the reference of param_dtype)."""

    def __init__(self, bound, dtype):
        self.bound, self.dtype = bound, dtype

    def __call__(self, *args, **kwargs):
        from ftrain.module import Bound

        params = {k: v.to(self.dtype) for k, v in self.bound.params.items()}
        return Bound(self.bound.skeleton, params, self.bound.buffers)(*args, **kwargs)


def _init(rank: int, world: int, init_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def run_layout(name: str, rank: int, world: int, *, compiled: bool = False) -> dict[str, object]:
    """Trains ``name``'s layout for STEPS steps on this rank's share of each batch; returns the global loss curve
    and the gathered final params (and, to check placements, the local shape of the first parameter)."""
    from torch.distributed.tensor import DTensor

    from ftrain import tree
    from ftrain.distributed import ParallelConfig, build_mesh, gather_state, reduce_metrics, shard_state

    kwargs, _, accum, tp_plan = LAYOUTS[name]
    config = ParallelConfig(**kwargs)
    mesh = build_mesh(config, "cpu")
    model, loss_fn, batches = problem(name)
    state = shard_state(TrainState.create(model, tx(), key=0), mesh, config, tp_plan=tp_plan)
    step = make_train_step(loss_fn, accum_steps=accum)
    if compiled:
        step = jit(step)
    dp_rank, dp_world = (0, 1) if name == "tp" else (rank, world)
    hidden = []  # the width of the activation between the tp pair, as each rank computes it
    if tp_plan:
        state.skeleton[1].register_forward_hook(lambda m, args, out: hidden.append(out.shape[-1]))
    outputs = []  # the dtype the model's forward computed in: bfloat16 under param_dtype="bf16"
    if config.param_dtype is not None:
        state.skeleton.register_forward_hook(lambda m, args, out: outputs.append(str(out.dtype)))
    curve = []
    for b in batches:
        state, metrics = step(state, local_batch(b, dp_rank, dp_world, accum))
        curve.append(float(metrics["loss"]))
    moments = [x for x in tree.tree_leaves(state.opt_state) if isinstance(x, DTensor)]
    out = {
        "loss": torch.tensor(curve, dtype=torch.float64),
        "params": dict(gather_state(state).params),
        "local_rows": torch.tensor([v.to_local().shape[0] for v in state.params.values()]),
        # optimizer values held by this rank / in all: 1/2 when the optimizer state is sharded over 2 ranks
        "hidden": torch.tensor(hidden[-1] if hidden else -1),
        "output_dtype": outputs[-1] if outputs else "",
        # the last step's metrics as the step returns them, and as reduce_metrics gives them for logging
        "metrics": {k: v.detach().clone() for k, v in metrics.items()},
        "logged": {k: torch.as_tensor(v).detach().clone() for k, v in reduce_metrics(metrics, state).items()},
        "opt_fraction": torch.tensor(sum(x.to_local().numel() for x in moments) / sum(x.numel() for x in moments)),
    }
    if compiled:
        out["recompiles"] = torch.tensor(step.recompiles)
    return out


def layouts_worker(rank: int, world: int, init_file: str, out: str, names: list[str], compiled: bool) -> None:
    import torch.distributed as dist

    _init(rank, world, init_file)
    try:
        results = {name: run_layout(name, rank, world, compiled=compiled) for name in names}
        if rank == 1:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


# -- sharded checkpoints -------------------------------------------------------------------------------------------

CKPT_STEPS, CKPT_AT = 6, 3


def tensors_of(state: TrainState) -> dict[str, torch.Tensor]:
    """Every tensor leaf of a (plain) state by key path, for bitwise comparison across processes."""
    from ftrain import tree

    paths, leaves, _ = tree.tree_flatten_with_path(state)
    return {tree.keystr(p): x for p, x in zip(paths, leaves) if isinstance(x, torch.Tensor)}


def plain_run(steps: int) -> TrainState:
    """The single-process run the checkpoint tests save from or compare with."""
    state = TrainState.create(make_gpt(0, dropout=0.0, dtype=DTYPE), tx(), key=0)
    step = make_train_step(gpt_loss)
    for b in lm_batches(steps, BATCH)[:steps]:
        state, _ = step(state, b)
    return state


def _sharded(name: str, seed: int = 0):
    from ftrain.distributed import ParallelConfig, build_mesh, shard_state

    config = ParallelConfig(**LAYOUTS[name][0])
    state = TrainState.create(make_gpt(seed, dropout=0.0, dtype=DTYPE), tx(), key=seed)
    return shard_state(state, build_mesh(config), config)


def _train(state: TrainState, until: int, rank: int, world: int) -> TrainState:
    step = make_train_step(gpt_loss)
    batches = lm_batches(CKPT_STEPS, BATCH)
    while int(state.step) < until:  # the data position is a function of state.step
        state, _ = step(state, local_batch(batches[int(state.step)], rank, world, 1))
    return state


def ckpt_worker(rank: int, world: int, init_file: str, root: str, out: str) -> None:
    """Rank 1 writes to ``out``: the FSDP state at step CKPT_AT (saved to ``root/run``), and the single-process
    checkpoint ``root/single`` restored into FSDP. Asserts in-process: resume == uninterrupted (bitwise: the same
    kernels on the same layout, in the same processes, from the same values), and the FSDP checkpoint restored under
    a DP plan == the FSDP state (bitwise: a round trip of stored values, nothing recomputed)."""
    import torch.distributed as dist

    from ftrain.checkpoint import CheckpointManager, CheckpointManagerOptions
    from ftrain.distributed import gather_state

    _init(rank, world, init_file)
    opts = CheckpointManagerOptions(backend="dcp")
    try:
        state = _train(_sharded("fsdp"), CKPT_AT, rank, world)
        with CheckpointManager(Path(root) / "run", opts) as mgr:
            mgr.save(CKPT_AT, state)
        at_save = tensors_of(gather_state(state))
        final = tensors_of(gather_state(_train(state, CKPT_STEPS, rank, world)))
        with CheckpointManager(Path(root) / "run", opts) as mgr:
            resumed = mgr.restore(like=_sharded("fsdp", seed=5))
            as_dp = mgr.restore(like=_sharded("dp", seed=5))
        assert int(resumed.step) == CKPT_AT
        _assert_bitwise(tensors_of(gather_state(_train(resumed, CKPT_STEPS, rank, world))), final, "resumed")
        _assert_bitwise(tensors_of(gather_state(as_dp)), at_save, "FSDP -> DP")
        with CheckpointManager(Path(root) / "single", opts) as mgr:
            from_single = tensors_of(gather_state(mgr.restore(like=_sharded("fsdp", seed=5))))
        if rank == 1:
            torch.save({"at_save": at_save, "from_single": from_single}, out)
    finally:
        dist.destroy_process_group()


def _assert_bitwise(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), what
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), f"{what}: {k} differs"
