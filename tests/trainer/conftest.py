"""Fixtures shared by the Trainer tests."""

import importlib.util

import pytest
import torch

HAS_ACCELERATE = importlib.util.find_spec("accelerate") is not None


def _device_without_accelerate(self):
    """transformers' device choice for one process without accelerate's state: cuda:0 if usable, else CPU."""
    self.distributed_state = None
    if self.use_cpu or not torch.cuda.is_available():
        self._n_gpu = 0
        return torch.device("cpu")
    self._n_gpu = torch.cuda.device_count()
    return torch.device("cuda:0")


@pytest.fixture
def HFArgs(monkeypatch):
    """``transformers.TrainingArguments``, buildable without accelerate (which it needs only to pick a device)."""
    transformers = pytest.importorskip("transformers")
    cls = transformers.TrainingArguments
    if not HAS_ACCELERATE:
        monkeypatch.setattr(cls, "_setup_devices", property(_device_without_accelerate))
    return cls


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes run fastest on one thread, and on a shared 2-core machine two threads next to a busy neighbour spin
    against each other (a GPT-2 step measured 10x slower); the setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
