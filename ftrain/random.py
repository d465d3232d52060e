"""Explicit random keys, JAX style.

A key is a CPU ``int64`` tensor of shape ``(2,)``. It lives in the :class:`~ftrain.state.TrainState`, so a
checkpoint carries it and a resumed run draws the same numbers. Keys are derived on the host with a
SplitMix64-style mixer (cheap, deterministic, platform-independent); nothing here touches torch's global RNG.

Dropout and other in-graph randomness use torch's generators, which cannot be seeded inside a ``fullgraph``
compiled region. So a step runs under :func:`step_rng`: the host derives the step's seed from
``fold_in(key, step)``, forks torch's RNG, seeds it, runs the step, and restores the caller's RNG state. Eager and
compiled steps are then reproducible run to run (DESIGN.md, "RNG under compile").

Example:
    >>> from ftrain import random
    >>> k = random.key(0)
    >>> a, b = random.split(k)
    >>> bool((a != b).any())
    True
    >>> random.seed_for_step(k, 3) == random.seed_for_step(k, 3)
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["fold_in", "is_key", "key", "seed_for_step", "split", "step_rng"]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(x: int) -> int:
    """SplitMix64 finalizer: a bijection on 64-bit integers with good avalanche."""
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _to_signed(x: int) -> int:
    return x - (1 << 64) if x >= (1 << 63) else x


def _words(key_: torch.Tensor) -> tuple[int, int]:
    if not is_key(key_):
        raise TypeError(
            f"expected an ftrain random key (a CPU int64 tensor of shape (2,), from ftrain.random.key(seed)), got "
            f"{type(key_).__name__}"
            + (f" of dtype {key_.dtype}, shape {tuple(key_.shape)}" if isinstance(key_, torch.Tensor) else "")
        )
    hi, lo = key_.tolist()
    return hi & _MASK64, lo & _MASK64


def _make(hi: int, lo: int) -> torch.Tensor:
    return torch.tensor([_to_signed(hi), _to_signed(lo)], dtype=torch.int64)


def is_key(x: object) -> bool:
    """True for a tensor that can be a key: int64, shape ``(2,)``, on the CPU."""
    return isinstance(x, torch.Tensor) and x.dtype == torch.int64 and tuple(x.shape) == (2,) and x.device.type == "cpu"


def key(seed: int) -> torch.Tensor:
    """A new key from an integer seed (any Python int; negative and > 64-bit seeds are folded)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"ftrain.random.key(seed): seed must be an int, got {type(seed).__name__} ({seed!r})")
    s = seed & _MASK64
    hi = _mix64(s ^ (seed >> 64 & _MASK64))
    return _make(hi, _mix64(hi ^ 0x5851F42D4C957F2D))


def fold_in(key_: torch.Tensor, data: int | torch.Tensor) -> torch.Tensor:
    """A new key that depends on ``key_`` and the integer ``data`` (a step number, a rank, a layer index)."""
    if isinstance(data, torch.Tensor):
        if data.numel() != 1 or data.is_floating_point():
            raise TypeError(f"fold_in: data must be an integer or a 1-element integer tensor, got {data!r}")
        data = int(data.item())
    hi, lo = _words(key_)
    d = data & _MASK64
    new_hi = _mix64(hi ^ _mix64(d))
    new_lo = _mix64(lo ^ _mix64(d ^ _GOLDEN) ^ new_hi)
    return _make(new_hi, new_lo)


def split(key_: torch.Tensor, num: int = 2) -> torch.Tensor:
    """``num`` new independent keys, stacked into an ``(num, 2)`` tensor (index it or unpack it)."""
    if num < 1:
        raise ValueError(f"split: num must be >= 1, got {num}")
    hi, lo = _words(key_)
    rows = []
    for i in range(num):
        a = _mix64(hi ^ _mix64(2 * i + 1))
        b = _mix64(lo ^ _mix64(2 * i + 2) ^ a)
        rows.append([_to_signed(a), _to_signed(b)])
    return torch.tensor(rows, dtype=torch.int64)


def seed_for_step(key_: torch.Tensor, step: int | torch.Tensor) -> int:
    """The 63-bit seed a step at ``step`` runs with: ``fold_in(key_, step)`` reduced to a ``manual_seed`` int."""
    hi, lo = _words(fold_in(key_, step))
    return (hi ^ (lo >> 1)) & ((1 << 63) - 1)


@contextlib.contextmanager
def step_rng(key_: torch.Tensor, step: int | torch.Tensor, device: torch.device | None = None) -> Iterator[int]:
    """Runs the body with torch's RNG seeded from ``(key_, step)`` and restores the caller's RNG state after.

    ``device`` names the accelerator whose generator the body uses (CPU is always forked); yields the seed.
    """
    seed = seed_for_step(key_, step)
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        _seed_forked(seed, devices)
        yield seed


def _seed_forked(seed: int, cuda_devices: list[torch.device]) -> None:
    """Seeds the generators ``step_rng`` forked: the CPU's and the given CUDA device's. Not ``torch.manual_seed``,
    which also seeds every other device type's generators (outside the fork, so the caller's RNG would change) and,
    where CUDA is not initialised, records a stack trace for a deferred seed: ~0.1 ms a step on the CPU."""
    torch.default_generator.manual_seed(seed)
    for device in cuda_devices:
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
