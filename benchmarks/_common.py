"""Helpers shared by the benchmark scripts: a description of the machine and the JSON writer behind ``--json``.

The scripts run as ``python benchmarks/<name>.py``, so this directory is on ``sys.path`` and ``import _common`` works.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else what ``platform`` knows.

    Returns:
        e.g. ``"AMD EPYC"``; ``platform.machine()`` (``"x86_64"``) where ``/proc/cpuinfo`` has no model name.

    Example:
        >>> isinstance(cpu_model(), str) and len(cpu_model()) > 0
        True
    """
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(package: str) -> str | None:
    """The installed version of ``package`` without importing it (importing transformers takes seconds).

    Example:
        >>> version("torch") is not None, version("no-such-package-xyz")
        (True, None)
    """
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """What a benchmark number depends on: CPU, cores, library versions, and when it was measured.

    Returns:
        A JSON-ready dict with ``cpu``, ``cores``, ``python``, ``torch``, ``transformers``, ``ftrain``, ``date``
        (UTC, ISO 8601).

    Example:
        >>> sorted(machine_info())
        ['cores', 'cpu', 'date', 'ftrain', 'machine', 'python', 'torch', 'transformers']
    """
    return {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "ftrain": version("ftrain"),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus ``machine_info()`` under ``"machine_info"``) as indented JSON, creating the folder.

    Args:
        path: the file to write.
        payload: JSON-serializable results.

    Returns:
        The path written.

    Example:
        >>> import tempfile
        >>> p = write_json(Path(tempfile.mkdtemp()) / "sub" / "r.json", {"x": 1})
        >>> json.loads(p.read_text())["x"]
        1
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**payload, "machine_info": machine_info()}, indent=2) + "\n")
    return out
