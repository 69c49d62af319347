"""The Ray actor pool: same records as the engine, parity through actors, weights per version, dead actors.

One local Ray (2 CPUs) and one 2-actor pool (1 thread each) for the whole module: starting actors is the
slow part.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest
import ray
import torch

from rollout.engine import DepthConfig, SamplingConfig
from rollout.parity import TokenGaps, check_parity
from rollout.pool import PoolConfig, RolloutPool, pack_state_dict, unpack_state_dict
from rollout.torch_engine import TorchEngine
from tests.helpers import ADAPTIVE, mixed_prompts, small_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = mixed_prompts(10, low=1, high=60)


@pytest.fixture(scope="module")
def pool(ray_cluster, model):
    with RolloutPool(model, PoolConfig(num_actors=2, threads_per_actor=1, max_batch_size=4)) as p:
        yield p


def test_parity_through_the_pool_fixed_and_adaptive(pool, model):
    """The suite's guard of the invariant: rollouts from actors, replayed by the training forward."""
    # Untruncated: top-p's boundary can flip on float noise (test_torch_engine covers truncation).
    sampling = SamplingConfig(n=2, max_new_tokens=40, seed=11, return_distributions=True)
    parts = []
    for depth in (DepthConfig(), ADAPTIVE):
        records = pool.generate(PROMPTS, sampling, depth)
        gaps = check_parity(model, records, sampling)
        stats = gaps.stats()
        fed = [e for r in records for e in r.exit_steps[:-1]]
        print(f"\n[pool parity {depth.label()}] {stats}, exit steps {sorted(set(fed))}")
        assert stats.max_abs_gap <= 1e-5 and stats.filtered_tokens == 0 and stats.support_changes == 0, stats
        if depth.policy == "adaptive":
            assert set(fed) == {1, 2, 3, 4}, "q should give a mix of exit steps on this gate"
        parts.append(gaps)
    assert TokenGaps.cat(parts).stats().tokens == 2 * len(PROMPTS) * 2 * 40


def test_pool_returns_what_one_engine_returns_in_prompt_order(pool, model):
    sampling = SamplingConfig(n=3, max_new_tokens=12, seed=4, stop_token_ids=list(range(3, 60)))
    pooled = pool.generate(PROMPTS, sampling, ADAPTIVE)
    local = TorchEngine(model).generate(PROMPTS, sampling, ADAPTIVE)
    assert [r.prompt_ids for r in pooled] == [p for p in PROMPTS for _ in range(3)]
    assert [(r.completion_ids, r.exit_steps) for r in pooled] == [(r.completion_ids, r.exit_steps) for r in local]


def generate_and_signal(pool, sampling: SamplingConfig, index: int, sig: int, join_s: float) -> dict:
    """`pool.generate(PROMPTS)` in a thread; once the pool has handed actor `index` a shard (its `_submit`,
    watched: an event, not a guessed wait), send that actor's process `sig`. -> {"records": ...} when the call
    came back within `join_s` seconds, else {}."""
    pid = ray.get(pool.actors[index].ping.remote())
    handed, submit, result = threading.Event(), pool._submit, {}

    def watched(i, *args):
        future = submit(i, *args)
        if i == index:
            handed.set()
        return future

    call = threading.Thread(target=lambda: result.setdefault("records", pool.generate(PROMPTS, sampling)))
    pool._submit = watched
    try:
        call.start()
        assert handed.wait(timeout=60), f"actor {index} was never given a shard"
        assert call.is_alive(), "the call finished before the signal: the workload is too small to test mid-call"
        os.kill(pid, sig)
        call.join(timeout=join_s)
    finally:
        del pool._submit  # the class's own again
    return result | {"pid": pid}


def kill_actor(pool, index: int) -> None:
    """SIGKILL an actor's process from outside, as an OOM killer or a lost node would."""
    os.kill(ray.get(pool.actors[index].ping.remote()), signal.SIGKILL)


def test_an_actor_killed_mid_shard_is_replaced_and_every_completion_comes_back_once(pool):
    sampling = SamplingConfig(n=2, max_new_tokens=160, seed=9, ignore_eos=True)
    expected = pool.generate(PROMPTS, sampling)
    before = pool.replacements
    records = generate_and_signal(pool, sampling, 1, signal.SIGKILL, join_s=300)["records"]
    assert pool.replacements == before + 1
    assert {r.policy_version for r in records} == {pool.policy_version}
    assert len(records) == len(PROMPTS) * 2
    assert [r.prompt_ids for r in records] == [p for p in PROMPTS for _ in range(2)]
    assert [r.completion_ids for r in records] == [r.completion_ids for r in expected]


def test_weights_ship_once_per_version_and_a_replacement_actor_gets_the_latest(pool, model):
    other = small_model(seed=1)
    sampling = SamplingConfig(max_new_tokens=8, seed=2)
    try:
        pool.load_weights(other.state_dict(), version=5)
        kill_actor(pool, 0)  # its replacement must come up with version 5's weights, not the first ones
        records = pool.generate(PROMPTS, sampling)
        assert {r.policy_version for r in records} == {5}
        local = TorchEngine(other).generate(PROMPTS, sampling)
        assert [r.completion_ids for r in records] == [r.completion_ids for r in local]
    finally:
        pool.load_weights(model.state_dict(), version=6)
    assert {r.policy_version for r in pool.generate(PROMPTS[:2], sampling)} == {6}


def test_an_actor_killed_between_calls_is_replaced_on_the_next_call(pool):
    sampling = SamplingConfig(max_new_tokens=4, seed=0)
    ray.kill(pool.actors[0], no_restart=True)
    assert len(pool.generate(PROMPTS, sampling)) == len(PROMPTS)


def test_bad_input_fails_in_the_driver_before_any_actor_works(pool):
    before = pool.replacements
    with pytest.raises(ValueError, match="q must be in"):
        pool.generate(PROMPTS, SamplingConfig(), DepthConfig(policy="adaptive", exit_threshold=2.0))
    with pytest.raises(ValueError, match="prompts is empty"):
        pool.generate([], SamplingConfig())
    assert pool.replacements == before


def test_state_dict_packing_round_trips_bfloat16():
    state = {"a": torch.randn(3, 2).bfloat16(), "b": torch.randn(4)}
    back = unpack_state_dict(pack_state_dict(state))
    assert back["a"].dtype == torch.bfloat16 and torch.equal(back["a"], state["a"]) and torch.equal(back["b"], state["b"])


def test_a_hung_actor_is_timed_out_replaced_and_its_shard_redone(pool):
    """An actor stopped mid-call (SIGSTOP: alive, answering nothing) is killed after `actor_timeout_s`, replaced,
    and its shard regenerated: the same completions as without the hang, each exactly once."""
    sampling = SamplingConfig(n=2, max_new_tokens=100, seed=9, ignore_eos=True)
    expected = pool.generate(PROMPTS, sampling)
    before, timeout = pool.replacements, pool.config.actor_timeout_s
    pool.config.actor_timeout_s = 12.0  # covers a replacement's start-up (a few seconds) plus its shard
    try:
        result = generate_and_signal(pool, sampling, 0, signal.SIGSTOP, join_s=120)
        assert "records" in result, "the pool did not recover from a hung actor"
    finally:
        pool.config.actor_timeout_s = timeout
    with pytest.raises(ProcessLookupError):
        os.kill(result["pid"], 0)  # the stopped process was killed, not left behind
    assert pool.replacements == before + 1
    assert [r.completion_ids for r in result["records"]] == [r.completion_ids for r in expected]


def test_actor_timeout_is_checked_at_load_time():
    with pytest.raises(ValueError, match="actor_timeout_s"):
        PoolConfig(actor_timeout_s=0).check()


def test_chunks_handed_to_free_actors_give_each_request_the_same_completion(pool, model):
    """Chunks of 1 prompt (actors take many, in whatever order they free up) vs the default chunking vs one
    engine: the same token ids and depths for every request, log-probs within the parity bound."""
    sampling = SamplingConfig(n=2, max_new_tokens=16, seed=21, stop_token_ids=list(range(3, 60)))
    local = TorchEngine(model, max_batch_size=3).generate(PROMPTS, sampling, ADAPTIVE)
    default = pool.generate(PROMPTS, sampling, ADAPTIVE)
    size = pool.config.chunk_prompts
    pool.config.chunk_prompts = 1
    try:
        small = pool.generate(PROMPTS, sampling, ADAPTIVE)
    finally:
        pool.config.chunk_prompts = size
    for records in (default, small):
        assert [(r.completion_ids, r.exit_steps) for r in records] == [(r.completion_ids, r.exit_steps) for r in local]
        gaps = [abs(a - b) for r, s in zip(records, local, strict=True) for a, b in zip(r.logprobs, s.logprobs, strict=True)]
        assert max(gaps) <= 1e-5


def test_chunk_prompts_is_checked_at_load_time():
    with pytest.raises(ValueError, match="chunk_prompts"):
        PoolConfig(chunk_prompts=0).check()

