"""Exact mode through the Ray pool (its own module: the pool tests' module-wide pool holds the cluster's CPUs)."""

from __future__ import annotations

import pytest
import torch

from rollout.engine import DepthConfig, SamplingConfig
from rollout.parity import check_parity
from rollout.pool import PoolConfig, RolloutPool
from tests.helpers import ADAPTIVE, mixed_prompts, small_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = mixed_prompts(6, low=1, high=60)


@pytest.mark.parametrize("depth", [DepthConfig(), ADAPTIVE], ids=["fixed", "adaptive"])
def test_exact_mode_bf16_parity_through_the_pool_is_exactly_zero(ray_cluster, depth):
    """Exact mode ships with the model: bf16 actors' decode steps equal the driver's training forward bit for bit."""
    model = small_model().to(torch.bfloat16)
    model.config.exact_mode = True
    sampling = SamplingConfig(n=2, max_new_tokens=24, seed=13, ignore_eos=True)
    with RolloutPool(model, PoolConfig(num_actors=2, threads_per_actor=1, max_batch_size=4)) as exact_pool:
        records = exact_pool.generate(PROMPTS, sampling, depth)
    with torch.enable_grad():
        assert check_parity(model, records, sampling).stats().max_abs_gap == 0.0
