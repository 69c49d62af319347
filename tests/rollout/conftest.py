"""Fixtures for the rollout tests: a LoopLM of a few hundred K parameters (tests/helpers.py: `small_model`), a local
Ray, one thread."""

from __future__ import annotations

import pytest
import ray

import looplm
from tests.helpers import single_thread, small_model

# Requested by the engine tests (80 s vs 4 s for one test here; see `single_thread`). Not by
# test_parity_trained: its trained weights (and so its worst token) depend on the thread count.
one_thread = pytest.fixture(scope="module", name="one_thread")(single_thread)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray of 2 CPUs for one test module (a module's pools hold its CPUs until the module ends)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model() -> looplm.LoopLMForCausalLM:
    return small_model()
