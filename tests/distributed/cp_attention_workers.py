"""Workers and shared pieces of tests/distributed/test_context_parallel.py, in a module of their own so that
forkserver children can import them: forking a pytest process that has already compiled (its thread pools and
locks) deadlocked the children."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ftrain import losses
from ftrain.distributed.context_parallel import all_gather_kv_attention, cp_shard_indices, prepare_cp_batch

VOCAB, SEQ = 32, 16


def _batch(seed: int = 0, batch_size: int = 3) -> dict[str, torch.Tensor]:
    """Random tokens, right padding of varying length (mask 0, labels -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch_size, SEQ), generator=g)
    lengths = torch.tensor([SEQ, SEQ - 5, 7])[:batch_size]
    mask = (torch.arange(SEQ)[None] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class TinyCausalLM(nn.Module):
    """Two pre-norm attention blocks with learned positions; ``attend(q, k, v, layer)`` is injected."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.wte, self.wpe = nn.Embedding(VOCAB, d), nn.Embedding(SEQ, d)
        self.blocks = nn.ModuleList(nn.ModuleDict({"ln": nn.LayerNorm(d), "qkv": nn.Linear(d, 3 * d)}) for _ in "ab")
        self.head = nn.Linear(d, VOCAB)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attend) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe(position_ids)
        b, t, d = x.shape
        for block in self.blocks:
            q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in block["qkv"](block["ln"](x)).split(d, -1))
            x = x + attend(q, k, v).transpose(1, 2).reshape(b, t, d)
        return self.head(x)


def _model() -> TinyCausalLM:
    torch.manual_seed(0)
    return TinyCausalLM().double()


def _reference_attention(mask: torch.Tensor):
    """Causal + key padding, each query always seeing itself: the mask built directly on the global sequence."""
    allowed = torch.ones(SEQ, SEQ, dtype=torch.bool).tril() & mask.bool()[:, None, None, :]
    allowed = allowed | torch.eye(SEQ, dtype=torch.bool)
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def _cp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        batch = _batch(seed=5)
        for load_balance in (True, False):
            model = _model()
            shard = prepare_cp_batch(batch, rank, world_size, load_balance=load_balance)

            def attend(q, k, v, shard=shard):
                return all_gather_kv_attention(
                    q,
                    k,
                    v,
                    group=dist.group.WORLD,
                    positions=shard["position_ids"],
                    key_padding_mask=shard["attention_mask"],
                )

            logits = model(shard["input_ids"], shard["position_ids"], attend)
            total, count = losses.cross_entropy(logits, shard["shift_labels"])
            grads = torch.autograd.grad(total, list(model.parameters()))
            torch.save(
                {"sum": total.detach(), "count": count, "grads": grads, "logits": logits.detach()},
                f"{out_dir}/rank{rank}_lb{int(load_balance)}.pt",
            )
    finally:
        dist.destroy_process_group()


def _compiled_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        g = torch.Generator().manual_seed(rank)
        q, k, v = (torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64) for _ in "qkv")
        mask = torch.ones(2, 4, dtype=torch.bool)
        mask[1, 2:] = rank == 0  # padding at the end of the second sequence, on rank 1

        def attention_grads(q, k, v):
            out = all_gather_kv_attention(
                q, k, v, group=dist.group.WORLD, positions=cp_shard_indices(8, rank, 2), key_padding_mask=mask
            )
            return (out.detach(), *torch.autograd.grad(out.square().sum(), (q, k, v)))

        leaves = [t.requires_grad_() for t in (q, k, v)]
        eager = attention_grads(*leaves)
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            compiled = torch.compile(attention_grads, fullgraph=True)(*leaves)
        torch.save({"eager": [t.detach() for t in eager], "compiled": [t.detach() for t in compiled]},
                   f"{out_dir}/compiled{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()
