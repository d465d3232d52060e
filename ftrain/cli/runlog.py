"""What a run writes besides checkpoints: ``metrics.jsonl``, TensorBoard events and the loss-curve PNG.

Every record is one JSON line ``{"step": ..., "split": "train" | "val", <metric>: <float>, ...}``. A resumed run
first drops the records of steps after the checkpoint it resumes from (a killed run may have logged past it), so
the file of a resumed run equals the file of a run that never stopped, timing fields aside.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> out = Path(tempfile.mkdtemp())
    >>> log = RunLog(out, tensorboard=False)
    >>> log.write(10, "train", {"loss": 2.5})
    >>> log.write(20, "train", {"loss": 2.0})
    >>> log.close()
    >>> [r["step"] for r in RunLog(out, tensorboard=False, resume_step=10).records()]
    [10]
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["METRICS_FILE", "PLOT_FILE", "TENSORBOARD_DIR", "RunLog", "plot_losses"]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PLOT_FILE = "loss.png"


def _tensorboard_writer(directory: Path, purge_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("ftrain: TensorBoard logs skipped: pip install ftrain[tensorboard]", file=sys.stderr)
        return None
    return SummaryWriter(str(directory), purge_step=purge_step)


class RunLog:
    """Appends metric records to ``<out>/metrics.jsonl`` and (optionally) TensorBoard events in ``<out>/tensorboard``.

    Args:
        out: the run's output directory (created if missing).
        tensorboard: also write TensorBoard events (skipped with a one-line warning when it is not installed).
        resume_step: the step a resumed run continues from: later records are dropped. ``None`` starts afresh
            (the file is emptied).
    """

    def __init__(self, out: Path, *, tensorboard: bool = True, resume_step: int | None = None):
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / METRICS_FILE
        kept = [r for r in self._read() if r["step"] <= resume_step] if resume_step is not None else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")
        purge = None if resume_step is None else resume_step + 1  # TensorBoard drops events from this step on
        self.tensorboard_dir = out / TENSORBOARD_DIR
        self._tb = _tensorboard_writer(self.tensorboard_dir, purge) if tensorboard else None

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def records(self) -> list[dict[str, Any]]:
        """Every record in the file so far."""
        return self._read()

    @property
    def has_tensorboard(self) -> bool:
        return self._tb is not None

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        """One record: ``metrics`` (floats) of ``split`` at ``step``."""
        record = {"step": step, "split": split, **{k: float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(f"{split}/{name}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def plot_losses(records: list[Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """Draws training and validation loss against the step into the PNG ``path`` (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for split, style in (("train", "-"), ("val", "o-")):
        points = [(r["step"], r["loss"]) for r in records if r["split"] == split and math.isfinite(r["loss"])]
        if points:
            ax.plot(*zip(*points), style, label=f"{split} loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
