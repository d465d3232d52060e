"""The optional orbax backend (``pip install ftrain[orbax]``): bitwise round trips (bfloat16 and float8 through
ml_dtypes, zero-size leaves, sync and async) and corruption found by file name.

The checks run in a child process: importing orbax imports jax, whose threads would make every later ``fork`` in
this test process unsafe (DataLoader workers in other tests). For the same reason the skip looks the packages up
with ``find_spec`` instead of ``pytest.importorskip``, which would import them here.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
from concurrent.futures import ProcessPoolExecutor
from importlib.util import find_spec
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # ckpt_helpers.py lives here; the child process imports it too
from ckpt_helpers import orbax_checks  # noqa: E402

pytestmark = pytest.mark.skipif(
    find_spec("orbax") is None or find_spec("ml_dtypes") is None,
    reason="orbax-checkpoint / ml_dtypes are not installed (optional extra: pip install ftrain[orbax])",
)


def test_orbax_round_trips_bitwise_and_names_a_corrupt_file(tmp_path):
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "ftrain", "ftrain.checkpoint"])
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        files = pool.submit(orbax_checks, str(tmp_path)).result(timeout=120)
    assert {"COMMIT", "manifest.json", "meta.json", "orbax_keys.json", "orbax/_METADATA"} <= set(files)
    assert "jax" not in sys.modules


def test_without_orbax_the_backend_says_which_extra_to_install(monkeypatch):
    from ftrain.checkpoint import backend_orbax

    monkeypatch.setitem(sys.modules, "orbax", None)
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)
    with pytest.raises(ImportError, match=r"pip install ftrain\[orbax\]"):
        backend_orbax.OrbaxBackend()
    assert "jax" not in sys.modules
