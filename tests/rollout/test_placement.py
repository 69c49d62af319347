"""The pool on a Ray cluster: actors placed by declared GPUs over simulated nodes, a node lost mid-generation,
and a cluster already running on the machine.

Ray's own simulation (`ray.cluster_utils.Cluster`: several raylets on this machine) with GPUs declared to Ray:
the actors hold them as Ray sees it and, finding no CUDA, run their engines on CPU threads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from rollout.engine import SamplingConfig
from rollout.pool import PoolConfig, RolloutPool
from tests.helpers import ADAPTIVE, mixed_prompts, small_model

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
PROMPTS = mixed_prompts(8, low=1, high=30)


@pytest.fixture(scope="module")
def two_gpu_nodes():
    """A head with no room for actors and two worker nodes of 2 CPUs and 1 (declared) GPU each."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


def test_spread_places_one_actor_per_gpu_node_and_a_lost_node_loses_nothing(two_gpu_nodes):
    cluster, nodes = two_gpu_nodes
    worker_nodes = {n.node_id for n in nodes}
    config = PoolConfig(num_actors=2, threads_per_actor=1, gpus_per_actor=1, placement="spread", max_batch_size=4)
    with RolloutPool(small_model(), config) as pool:
        where = pool.placement()
        assert {w.node_id for w in where} == worker_nodes, "spread: one actor on each GPU node"
        assert all(len(w.gpu_ids) == 1 and w.device == "cpu" for w in where), where

        pool.load_weights(small_model(seed=1).state_dict(), version=3)
        sampling = SamplingConfig(n=2, max_new_tokens=120, seed=5, ignore_eos=True)
        expected = pool.generate(PROMPTS, sampling, ADAPTIVE)
        assert {r.policy_version for r in expected} == {3}

        lost = next(n for n in nodes if n.node_id == where[1].node_id)
        result: dict = {}
        call = threading.Thread(target=lambda: result.setdefault("records", pool.generate(PROMPTS, sampling, ADAPTIVE)))
        call.start()
        cluster.remove_node(lost)  # mid-generation: the call has just handed out its chunks
        call.join(timeout=300)
        records = result["records"]
        assert pool.replacements >= 1, "no actor was lost mid-call: the test did not test a node loss"
        assert [(r.prompt_ids, r.completion_ids, r.exit_steps) for r in records] == [
            (r.prompt_ids, r.completion_ids, r.exit_steps) for r in expected
        ], "every completion comes back once, as it would have without the loss"
        assert {r.policy_version for r in records} == {3}

        # The lost node's bundle has nowhere to go (the other node's GPU is taken): its replacement waits, and the next
        # call runs on the actor that answers instead of queueing work behind the one that cannot start.
        again = pool.generate(PROMPTS[:2], SamplingConfig(n=1, max_new_tokens=8, seed=1), ADAPTIVE)
        assert len(again) == 2


def test_fractional_gpus_pack_actors_onto_one_node(two_gpu_nodes):
    """(After the node loss above: one GPU node is left.) Two actors of half a GPU share it."""
    config = PoolConfig(num_actors=2, threads_per_actor=1, gpus_per_actor=0.5, placement="pack")
    with RolloutPool(small_model(), config) as pool:
        where = pool.placement()
        assert len({w.node_id for w in where}) == 1, "pack: both actors on one node, sharing its GPU"
        assert [w.gpu_ids for w in where][0] == [w.gpu_ids for w in where][1]


def test_an_unplaceable_pool_fails_with_the_clusters_resources(two_gpu_nodes):
    config = PoolConfig(num_actors=3, gpus_per_actor=1, placement="spread", placement_timeout_s=3)
    with pytest.raises(RuntimeError, match="could not place 3 actors"):
        RolloutPool(small_model(), config)


def test_with_a_cluster_running_the_default_config_starts_a_private_ray_and_says_so(tmp_path, monkeypatch):
    """A cluster `ray start` left on the machine (here a simulated one, not connected to this process): the
    default pool starts its own Ray and names the running one; `ray_address=auto` joins it.

    Token authentication off for both sides: a driver in another process could not join the simulated head with
    it on (actors cancelled before they ran, the issue's "The actor never ran"); joining a real `ray start --head`
    with it on worked (checked by hand: README, "Scaling out")."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    model = tmp_path / "model"
    small_model().save_pretrained(model)
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 2})
    try:
        logs = {}
        for name, extra in {"default": [], "auto": ["pool.ray_address=auto"]}.items():
            run = subprocess.run(
                [sys.executable, str(REPO / "run.py"), "rollout", "--config", str(REPO / "configs/rollout_tiny.yaml"),
                 f"model={model}", f"output={tmp_path / name}.jsonl", "prompts.count=4", "sampling.max_new_tokens=4",
                 "pool.num_cpus=2", *extra],
                cwd=tmp_path, env=os.environ | {"PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}, capture_output=True,
                text=True, timeout=300,
            )
            logs[name] = run.stdout + run.stderr
            assert run.returncode == 0, logs[name][-3000:]
            assert (tmp_path / f"{name}.jsonl").read_text().count("\n") == 4 * 4
        assert "started a private local Ray" in logs["default"]
        assert f"a Ray cluster also runs on this machine ({cluster.address})" in logs["default"]
        assert "joined the Ray cluster at auto" in logs["auto"]
    finally:
        cluster.shutdown()
