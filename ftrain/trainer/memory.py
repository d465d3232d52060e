"""Memory metrics (``skip_memory_metrics=False``) and the device-cache flush (``torch_empty_cache_steps``).

:class:`TrainerMemoryTracker` reports what transformers' tracker of the same name reports, under the same keys: for
each stage (``init`` — the Trainer's constructor —, ``train``, ``eval``, ``test``) the change of the process's
resident memory from the stage's start to its end (``{stage}_mem_cpu_alloc_delta``) and how far above its end the
peak went (``{stage}_mem_cpu_peaked_delta``), the same two for the CUDA allocator (``{stage}_mem_gpu_*``) when
the device is a CUDA GPU, and, in the first stage reported, the ``init`` stage's numbers and ``before_init_mem_cpu``
(``before_init_mem_gpu``). A stage started inside another one (an evaluation during training) is not measured on
its own, as in transformers.

The CPU peak is read from the kernel instead of transformers' busy-polling thread: ``VmHWM`` in
``/proc/self/status`` is the peak resident set size, and writing ``5`` to ``/proc/self/clear_refs`` resets it to
the current size (Linux 4.0+). Where that is not possible a sampling thread (every millisecond) measures it.

Example:
    >>> tracker = TrainerMemoryTracker(skip_memory_metrics=False, device=torch.device("cpu"))
    >>> tracker.start("train")
    >>> metrics = {}
    >>> tracker.stop_and_update_metrics("train", metrics)
    >>> sorted(metrics)
    ['train_mem_cpu_alloc_delta', 'train_mem_cpu_peaked_delta']
"""

from __future__ import annotations

import gc
import re
import threading
import time
from typing import Any

import torch

__all__ = ["TrainerMemoryTracker", "clear_device_cache"]

_STAGES = ("init", "train", "eval", "test")


def clear_device_cache(device: torch.device) -> None:
    """Releases the cached, unused blocks of ``device``'s allocator (``torch_empty_cache_steps``); the CPU has none.

    Example:
        >>> clear_device_cache(torch.device("cpu"))  # nothing to release
    """
    backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    empty = getattr(backend, "empty_cache", None)
    if empty is not None and backend.is_available():
        empty()


def _read_peak_rss() -> int | None:
    """``VmHWM`` (peak resident set size) of this process in bytes, or ``None`` where ``/proc`` lacks it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            match = re.search(r"VmHWM:\s+(\d+) kB", f.read())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _reset_peak_rss() -> bool:
    """Resets ``VmHWM`` to the current resident size; ``False`` where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return _read_peak_rss() is not None


class _PeakSampler:
    """The fallback CPU peak: a daemon thread sampling the resident size every millisecond until stopped."""

    def __init__(self, read: Any) -> None:
        self.read, self.peak, self.running = read, read(), True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.read())
            time.sleep(0.001)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return max(self.peak, self.read())


class TrainerMemoryTracker:
    """Measures the memory of the Trainer's stages (see the module docstring for the metrics).

    Args:
        skip_memory_metrics: when True (``TrainingArguments``' default) nothing is measured or reported.
        device: the training device; CUDA devices also get the ``*_mem_gpu_*`` metrics.

    Raises:
        ImportError: ``skip_memory_metrics=False`` without ``psutil`` (transformers then silently reports nothing).
    """

    def __init__(self, skip_memory_metrics: bool = True, device: torch.device | None = None) -> None:
        self.skip_memory_metrics = skip_memory_metrics
        self.cur_stage: str | None = None
        self.cpu: dict[str, dict[str, int]] = {}
        self.gpu: dict[str, dict[str, int]] = {}
        self.init_reported = False
        if skip_memory_metrics:
            return
        try:
            import psutil
        except ImportError as e:
            raise ImportError(
                "TrainingArguments(skip_memory_metrics=False) measures memory with psutil, which is not installed: "
                "pip install psutil, or leave skip_memory_metrics=True."
            ) from e
        self.process = psutil.Process()
        self.cuda = device is not None and device.type == "cuda" and torch.cuda.is_available()
        self.sampler: _PeakSampler | None = None
        self.start_cpu = self.start_gpu = 0

    def cpu_mem_used(self) -> int:
        """The resident set size of this process, in bytes."""
        return self.process.memory_info().rss

    def start(self, stage: str) -> None:
        """Starts measuring ``stage`` (one of ``init``, ``train``, ``eval``, ``test``); ignored inside another
        stage."""
        if self.skip_memory_metrics or (self.cur_stage is not None and self.cur_stage != stage):
            return
        if stage not in _STAGES:
            raise ValueError(f"TrainerMemoryTracker.start: unknown stage {stage!r}; use one of {_STAGES}.")
        self.cur_stage = stage
        gc.collect()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.empty_cache()
            self.start_gpu = torch.cuda.memory_allocated()
        self.start_cpu = self.cpu_mem_used()
        self.sampler = None if _reset_peak_rss() else _PeakSampler(self.cpu_mem_used)

    def stop(self, stage: str) -> None:
        """Stops measuring ``stage`` and records its numbers; ignored for a stage started inside another one."""
        if self.skip_memory_metrics or self.cur_stage != stage:
            return
        peak = self.sampler.stop() if self.sampler is not None else _read_peak_rss()
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            now, gpu_peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
            self.gpu[stage] = {"begin": self.start_gpu, "alloc": now - self.start_gpu, "peaked": max(0, gpu_peak - now)}
        now = self.cpu_mem_used()
        self.cpu[stage] = {"begin": self.start_cpu, "alloc": now - self.start_cpu, "peaked": max(0, peak - now)}
        self.cur_stage = None

    def update_metrics(self, stage: str, metrics: dict[str, Any]) -> None:
        """Adds ``stage``'s numbers to ``metrics`` (and the constructor's, the first time)."""
        if self.skip_memory_metrics or (self.cur_stage is not None and self.cur_stage != stage):
            return
        stages = [stage]
        if not self.init_reported and "init" in self.cpu:
            stages.insert(0, "init")
            self.init_reported = True
        for name in stages:
            for kind in ("alloc", "peaked"):
                if name in self.cpu:
                    metrics[f"{name}_mem_cpu_{kind}_delta"] = self.cpu[name][kind]
                if name in self.gpu:
                    metrics[f"{name}_mem_gpu_{kind}_delta"] = self.gpu[name][kind]
        if stages[0] == "init":
            metrics["before_init_mem_cpu"] = self.cpu["init"]["begin"]
            if "init" in self.gpu:
                metrics["before_init_mem_gpu"] = self.gpu["init"]["begin"]

    def stop_and_update_metrics(self, stage: str, metrics: dict[str, Any] | None = None) -> None:
        """:meth:`stop`, then :meth:`update_metrics` when ``metrics`` is given."""
        if self.skip_memory_metrics or (self.cur_stage is not None and self.cur_stage != stage):
            return
        self.stop(stage)
        if metrics is not None:
            self.update_metrics(stage, metrics)
