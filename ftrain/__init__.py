"""ftrain: training for PyTorch in the style of JAX."""

__version__ = "0.1.0"
