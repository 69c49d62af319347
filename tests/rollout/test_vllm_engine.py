"""The vLLM engine: adaptive depth refused on any machine; real generation only with CUDA and vLLM."""

from __future__ import annotations

import pytest
import torch

from rollout.engine import DepthConfig, SamplingConfig
from rollout.parity import check_parity
from rollout.vllm_engine import VLLMEngine
from tests.helpers import mixed_prompts, small_model


@pytest.mark.parametrize(
    ("depth", "message"),
    [
        (DepthConfig(policy="adaptive", exit_threshold=0.5), "never calls the exit gate"),
        (DepthConfig(kv_mode="last"), "kv_mode 'last' is not available"),
    ],
)
def test_depth_vllm_cannot_run_is_refused_before_anything_loads(tmp_path, depth, message):
    with pytest.raises(ValueError, match=message):
        VLLMEngine(tmp_path / "no-model-needed", depth=depth)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_without_cuda_the_engine_refuses_to_start(tmp_path):
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        VLLMEngine(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM needs CUDA")
def test_vllm_fixed_depth_rollouts_replay_with_the_training_forward(tmp_path):
    pytest.importorskip("vllm")
    model = small_model()
    model.save_pretrained(tmp_path)
    engine = VLLMEngine(tmp_path, depth=DepthConfig(num_loops=4), dtype="float32", gpu_memory_utilization=0.3)
    sampling = SamplingConfig(n=2, max_new_tokens=16, seed=0)
    records = engine.generate(mixed_prompts(4), sampling)
    assert len(records) == 8 and all(r.exit_steps == [4] * len(r.completion_ids) for r in records)
    stats = check_parity(model.cuda(), records, sampling).stats()
    print(f"\n[vLLM parity, fp32 on GPU] {stats}")
    assert stats.max_abs_gap <= 1e-3 and stats.filtered_tokens == 0  # GPU kernels differ: not a bitwise match
    with pytest.raises(ValueError, match="never calls the exit gate"):
        engine.generate(mixed_prompts(1), sampling, DepthConfig(policy="adaptive", exit_threshold=0.5))
