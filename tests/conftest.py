"""Shared fixtures: a tiny GPT and its loss, and compiled steps shared between tests (compiling is slow here)."""

import pytest
import torch

from ftrain import losses
from ftrain.models import GPT, GPTConfig

TINY = GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32, dropout=0.1)


def gpt_loss(model, batch):
    return losses.cross_entropy(model(batch["input_ids"]), batch["labels"], shift=True)


def make_gpt(seed: int = 0, dropout: float = 0.1, dtype=torch.float32) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(**{**TINY.__dict__, "dropout": dropout})
    return GPT(cfg).to(dtype)


def lm_batches(n: int, batch_size: int = 8, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of random tokens with variable-length -100 padding at the end of each row."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, TINY.vocab_size, (batch_size, TINY.seq_len), generator=g)
        lengths = torch.randint(3, TINY.seq_len + 1, (batch_size,), generator=g)
        labels = ids.clone()
        labels[torch.arange(TINY.seq_len)[None, :] >= lengths[:, None]] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


@pytest.fixture(scope="session")
def batches():
    return lm_batches(20)


def pytest_collection_modifyitems(items):
    # Run the compiled tests last, so a quick failure elsewhere shows up first.
    items.sort(key=lambda item: item.get_closest_marker("compiled") is not None)
