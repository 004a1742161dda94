"""Fixtures shared by the tests; the models, data and assertions they use live in helpers.py."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def seeded():
    """A test that uses this starts from a known global RNG state and leaves it, and the thread count, as it
    found them. One thread: these models are tiny, and on a shared 2-core machine two OpenMP threads per op
    slow them down tenfold."""
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.set_rng_state(state)
