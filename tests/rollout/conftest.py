"""Fixtures for the rollout tests: a LoopLM of a few hundred K parameters and mixed-length prompts."""

from __future__ import annotations

import pytest
import ray
import torch

import looplm
from looplm.tiny import tiny_model
from rollout.engine import DepthConfig


def small_model(seed: int = 0) -> looplm.LoopLMForCausalLM:
    """~0.42M parameters, T = 4, with a spread-out exit gate so Q-exit gives a mix of depths."""
    return tiny_model("small", seed=seed)


def mixed_prompts(count: int, low: int = 1, high: int = 40, vocab: int = 1024, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (count,), generator=g).tolist()
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


ADAPTIVE = DepthConfig(policy="adaptive", exit_threshold=0.6)


@pytest.fixture(scope="module")
def one_thread():
    """As in tests/posttrain: these small models gain nothing from intra-op threads, and on a busy 2-core
    machine two threads made the engine tests about 20x slower (measured: 80 s vs 4 s for one test).
    Not for test_parity_trained: its trained weights (and so its worst token) depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray of 2 CPUs for one test module (a module's pools hold its CPUs until the module ends)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model() -> looplm.LoopLMForCausalLM:
    return small_model()
