"""Keys are int64 tensors, compared exactly; torch.rand draws from the same seed in the same process are bitwise."""

import pytest
import torch

from ftrain import random


def test_key_is_deterministic_and_seed_sensitive():
    assert torch.equal(random.key(0), random.key(0))
    assert not torch.equal(random.key(0), random.key(1))
    assert random.is_key(random.key(2**70))


def test_split_gives_distinct_keys_and_is_deterministic():
    keys = random.split(random.key(3), 8)
    assert keys.shape == (8, 2)
    assert len({tuple(k.tolist()) for k in keys}) == 8
    assert torch.equal(keys, random.split(random.key(3), 8))
    assert not any(torch.equal(k, random.key(3)) for k in keys)


def test_fold_in_depends_on_data_and_accepts_tensors():
    k = random.key(0)
    seeds = {random.seed_for_step(k, s) for s in range(1000)}
    assert len(seeds) == 1000
    assert torch.equal(random.fold_in(k, 5), random.fold_in(k, torch.tensor(5)))
    assert all(0 <= s < 2**63 for s in seeds)


def test_step_rng_is_reproducible_and_restores_the_callers_rng():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with random.step_rng(random.key(0), 7):
        a = torch.rand(4)
    with random.step_rng(random.key(0), 7):
        b = torch.rand(4)
    with random.step_rng(random.key(0), 8):
        c = torch.rand(4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.rand(3), expected_next)


def test_bad_keys_raise_clear_errors():
    with pytest.raises(TypeError, match="ftrain random key"):
        random.split(torch.zeros(2))
    with pytest.raises(TypeError, match="seed must be an int"):
        random.key(1.5)
