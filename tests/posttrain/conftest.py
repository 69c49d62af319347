"""Fixtures for the recipe tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    """Hidden-32 models gain nothing from intra-op threads, and on a busy 2-core machine two threads make
    these tests about 10x slower (OpenMP threads waiting on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
