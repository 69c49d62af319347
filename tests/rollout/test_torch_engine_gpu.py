"""Our engine on a CUDA GPU: the same code as on CPU (continuous batching, depth-gathered decode step), held to
the same contract there. Skipped with a message where no GPU is lent; run them when one is."""

from __future__ import annotations

import pytest
import torch

from bench.rollout_bench import RolloutBenchConfig, run_rollout_bench
from cli.init import InitConfig
from rollout.engine import DepthConfig, SamplingConfig
from rollout.parity import check_exit_parity, check_parity
from rollout.torch_engine import TorchEngine
from tests.helpers import ADAPTIVE, mixed_prompts, small_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="our engine on GPU: needs CUDA (none here)"),
]

SAMPLED = DepthConfig(policy="sampled", exit_temperature=1.0)


@pytest.mark.parametrize("depth", [DepthConfig(), ADAPTIVE, SAMPLED], ids=["fixed", "adaptive", "sampled"])
def test_gpu_rollouts_replay_with_the_training_forward_whatever_the_batch(depth):
    model = small_model().cuda()
    prompts = mixed_prompts(12)
    sampling = SamplingConfig(n=2, max_new_tokens=24, seed=0)
    records = TorchEngine(model, max_batch_size=8).generate(prompts, sampling, depth)
    assert {r.policy_version for r in records} == {0} and all(r.completion_ids for r in records)
    stats = check_parity(model, records, sampling).stats()
    print(f"\n[our engine on GPU, fp32, {depth.label()}] {stats}")
    assert stats.max_abs_gap <= 1e-3 and stats.filtered_tokens == 0  # GPU kernels: close, not bitwise
    if depth.policy == "sampled":
        assert float(check_exit_parity(model, records, depth.exit_temperature).max()) <= 1e-3
    # A request's completion does not depend on its slot or batch (noise keyed by request and step).
    alone = TorchEngine(model, max_batch_size=1).generate(prompts[:3], sampling, depth)
    assert [r.completion_ids for r in alone] == [r.completion_ids for r in records[:6]]
    assert [r.exit_steps for r in alone] == [r.exit_steps for r in records[:6]]


def test_gpu_compiled_decode_replays_with_the_training_forward():
    """`compile_decode` on CUDA: the written-out attention of the compiled step, held to the same bound."""
    model = small_model().cuda()
    sampling = SamplingConfig(n=2, max_new_tokens=24, seed=0)
    records = TorchEngine(small_model().cuda(), max_batch_size=4, compile_decode=True).generate(mixed_prompts(8), sampling)
    stats = check_parity(model, records, sampling).stats()
    print(f"\n[our engine on GPU, compiled decode step] {stats}")
    assert stats.max_abs_gap <= 1e-3 and stats.filtered_tokens == 0


def test_gpu_rollout_bench_measures_its_parts_on_the_gpu(tmp_path):
    """`rollout.device=cuda`: the decode step, adaptive vs fixed depth and the RL workload run on the GPU."""
    results = run_rollout_bench(RolloutBenchConfig(
        model=str(tmp_path / "m"), init_random=InitConfig(size="small"), device="cuda", batch_sizes=[1, 4],
        max_new_tokens=4, variable_max_new_tokens=8, stop_ids=8, rl_prompts=4, rl_samples=2, repeats=1,
        compile_decode=False, baseline_rev="", parts=["decode_step", "adaptive_vs_fixed", "rl_workload"],
    ))  # (no baseline: a copy of the tree may come without its git history)
    (rl,) = results["rl_workload"]
    assert rl["ours_tokens"] > 0 and rl["generate_tokens"] > 0 and rl["adaptive_over_fixed"] > 0
    assert {r["batch"] for r in results["adaptive_vs_fixed"]} == {1, 4}
