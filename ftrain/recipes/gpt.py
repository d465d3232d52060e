"""The ``gpt`` recipe: a small byte-level GPT on English text — by default the pydoc topics CPython ships.

``pydoc_data.topics`` (~470 kB of Python reference prose) is in every CPython install, so the default run needs no
download. The text is read as UTF-8 bytes (vocabulary 256), sorted by topic name so it is the same everywhere,
and cut once: the first ``1 - val_fraction`` is training text, the rest validation. Training examples are windows
of ``seq_len`` bytes every ``stride`` bytes, shuffled by ``BatchStream``; validation windows do not overlap.

Example:
    >>> train, val = text_windows(torch.arange(100), seq_len=8, stride=4, val_fraction=0.2)
    >>> train["input_ids"].shape, val["input_ids"].shape
    (torch.Size([19, 8]), torch.Size([2, 8]))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from ftrain import losses
from ftrain.models import GPT, GPTConfig
from ftrain.recipes.config import LogConfig, Recipe, RecipeError
from ftrain.recipes.task import Task, init_model

__all__ = ["GPTModel", "GPTRecipe", "TextData", "build", "generate", "load_text", "text_windows"]

PYDOC = "pydoc"


@dataclasses.dataclass(frozen=True)
class GPTModel:
    """The :class:`ftrain.models.GPT` shape (the vocabulary is the 256 byte values)."""

    seq_len: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.1

    def __post_init__(self) -> None:
        try:
            self.config()
        except ValueError as err:
            raise RecipeError(f"model: {err}") from None

    def config(self) -> GPTConfig:
        return GPTConfig(
            vocab_size=256,
            seq_len=self.seq_len,
            n_layer=self.n_layer,
            n_head=self.n_head,
            d_model=self.d_model,
            dropout=self.dropout,
        )


@dataclasses.dataclass(frozen=True)
class TextData:
    """The text.

    Args:
        source: ``pydoc`` (CPython's ``pydoc_data.topics``) or the path of a UTF-8 text file.
        val_fraction: the share of the text (its end) kept for validation.
        stride: bytes between the starts of training windows (0: ``seq_len // 2``).
    """

    source: str = PYDOC
    val_fraction: float = 0.1
    stride: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise RecipeError(f"data.val_fraction: must be in (0, 1), got {self.val_fraction}")
        if self.stride < 0:
            raise RecipeError(f"data.stride: must be >= 0, got {self.stride}")


@dataclasses.dataclass(frozen=True)
class GPTRecipe(Recipe):
    """A byte-level GPT language model."""

    task: ClassVar[str] = "gpt"
    model: GPTModel = GPTModel()
    data: TextData = TextData()
    log: LogConfig = LogConfig(output_dir="runs/gpt")


def load_text(source: str) -> torch.Tensor:
    """The bytes of ``source`` (``pydoc`` or a file path) as a 1-d int64 tensor.

    Raises:
        RecipeError: the file does not exist.
    """
    if source == PYDOC:
        from pydoc_data.topics import topics

        raw = "\n\n".join(topics[name] for name in sorted(topics)).encode("utf-8")
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise RecipeError(f"data.source: {str(path)!r} is not a file; give a UTF-8 text file or 'pydoc'")
        raw = path.read_bytes()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()


def text_windows(
    data: torch.Tensor, *, seq_len: int, stride: int, val_fraction: float
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Training windows every ``stride`` bytes of the first part; non-overlapping windows of the last part.

    Raises:
        RecipeError: a split shorter than one window.
    """
    cut = int((1 - val_fraction) * len(data))
    train, val = data[:cut], data[cut:]
    if min(len(train), len(val)) < seq_len:
        raise RecipeError(
            f"data: the text ({len(data)} bytes) is too short for windows of model.seq_len={seq_len} in both "
            f"splits (train {len(train)}, validation {len(val)} bytes); use more text or a shorter seq_len"
        )
    return {"input_ids": train.unfold(0, seq_len, stride)}, {"input_ids": val.unfold(0, seq_len, seq_len)}


def loss_fn(model: Any, batch: Mapping[str, torch.Tensor]) -> losses.Loss:
    """Next-byte cross-entropy, summed over the positions (``(sum, count)``)."""
    return losses.cross_entropy(model(batch["input_ids"]), batch["input_ids"], shift=True)


def summarize(sums: Mapping[str, float]) -> dict[str, float]:
    """Validation loss (nats per byte) and perplexity."""
    loss = sums["loss"]
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf")}


@torch.no_grad()
def generate(module: torch.nn.Module, prompt: str, max_new_tokens: int, temperature: float, seed: int) -> str:
    """Samples ``max_new_tokens`` bytes after ``prompt`` (greedy when ``temperature`` is 0).

    Raises:
        ValueError: a negative ``temperature`` or ``max_new_tokens``.
    """
    if temperature < 0 or max_new_tokens < 0:
        raise ValueError(f"generate: temperature ({temperature}) and max-new-tokens ({max_new_tokens}) must be >= 0")
    module.eval()
    g = torch.Generator().manual_seed(seed)
    seq_len = module.config.seq_len
    ids = torch.tensor(list(prompt.encode("utf-8")) or [10], dtype=torch.long)[None]
    for _ in range(max_new_tokens):
        logits = module(ids[:, -seq_len:])[0, -1].double()
        if temperature == 0:
            nxt = logits.argmax()[None]
        else:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g)
        ids = torch.cat([ids, nxt[None]], dim=1)
    return bytes(ids[0].tolist()).decode("utf-8", errors="replace")


def build(recipe: GPTRecipe, key: torch.Tensor) -> Task:
    """The task of a ``gpt`` recipe; the initial weights come from ``key``."""
    m, d = recipe.model, recipe.data
    train, val = text_windows(
        load_text(d.source), seq_len=m.seq_len, stride=d.stride or max(1, m.seq_len // 2), val_fraction=d.val_fraction
    )
    return Task(
        model=init_model(lambda: GPT(m.config()), key),
        train_data=train,
        val_data=val,
        loss_fn=loss_fn,
        unit="tokens",
        summarize=summarize,
        headline="perplexity",
        generate=generate,
    )
