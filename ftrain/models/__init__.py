"""Small reference models used by examples, benchmarks, tests and the CLI."""

from ftrain.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
