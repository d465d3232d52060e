"""Metrics stay tensors until they are logged.

Steps return dicts of 0-d tensors. Reading one with ``float()`` waits for the device, so a loop that logs every
``k`` steps should keep adding tensors and call :func:`to_host` once per log: a single transfer for the whole dict.
:class:`Reducer` does this for evaluation — it adds ``loss_sum`` and ``count`` over batches (and over ranks, when
distributed) so the reported loss is the exact token-weighted mean, not a mean of batch means.

Example:
    >>> import torch
    >>> from ftrain import metrics
    >>> r = metrics.Reducer()
    >>> r.add({"loss_sum": torch.tensor(6.0), "count": torch.tensor(3)})
    >>> r.add({"loss_sum": torch.tensor(1.0), "count": torch.tensor(1)})
    >>> r.compute()
    {'count': 4.0, 'loss': 1.75, 'loss_sum': 7.0}
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = ["Reducer", "RunningMean", "perplexity", "to_host"]


def to_host(metrics: Mapping[str, torch.Tensor | float | int], /) -> dict[str, float]:
    """Converts a dict of 0-d tensors (or numbers) to floats with one device-to-host transfer per device the
    tensors are on (a step's metrics on the GPU, a learning rate on the CPU: two)."""
    by_device: dict[torch.device, list[str]] = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, []).append(k)
    out = {k: float(v) for k, v in metrics.items() if not isinstance(v, torch.Tensor)}
    for names in by_device.values():
        stacked = torch.stack([metrics[k].detach().reshape(()).to(torch.float64) for k in names])
        out.update(zip(names, stacked.cpu().tolist()))
    return dict(sorted(out.items()))


class Reducer:
    """Sums metric tensors over batches; :meth:`compute` divides ``loss_sum`` by ``count`` once.

    Every key is summed; ``loss`` (a per-batch mean) is ignored and recomputed from the sums.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, metrics: Mapping[str, torch.Tensor], /) -> None:
        for k, v in metrics.items():
            if k == "loss":
                continue
            v = v.detach()
            self.sums[k] = v if k not in self.sums else self.sums[k] + v

    def compute(self) -> dict[str, float]:
        host = to_host(self.sums)
        if "loss_sum" in host and "count" in host:
            host["loss"] = host["loss_sum"] / host["count"] if host["count"] else float("nan")
        return dict(sorted(host.items()))


class RunningMean:
    """Mean of per-step metrics since the last :meth:`pop`, kept on the device (HF's logged ``loss`` is the mean
    over the optimizer steps since the previous log)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.n = 0

    def add(self, metrics: Mapping[str, torch.Tensor], /) -> None:
        for k, v in metrics.items():
            v = v.detach().to(torch.float64)
            self.sums[k] = v if k not in self.sums else self.sums[k] + v
        self.n += 1

    def pop(self) -> dict[str, float]:
        """The means since the last call (one host transfer), and a reset."""
        if not self.n:
            return {}
        host = {k: v / self.n for k, v in to_host(self.sums).items()}
        self.sums, self.n = {}, 0
        return host


def perplexity(loss: float) -> float:
    """``exp(loss)``, ``inf`` on overflow."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")
