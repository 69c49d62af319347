"""vLLM rollouts for GPUs, behind the same interface as our engine.

vLLM has a native Ouro model: it runs `total_ut_steps` loops (set with `hf_overrides`), keeps one paged K/V
cache per (loop, layer) and never calls the exit gate. So this engine does fixed depth only, with the full
cache; adaptive depth raises before anything loads. Log-probs come back processed
(`logprobs_mode="processed_logprobs"`: after temperature and top-k / top-p), like our engine's.

vLLM is imported lazily (there is no CPU wheel); without CUDA the engine refuses to start rather than pretend.
Weight updates (`load_weights`) reach the model inside vLLM's worker, which needs the engine in this process:
set `VLLM_ENABLE_V1_MULTIPROCESSING=0`, as TRL's colocate mode does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from looplm import LoopLMConfig

from .engine import (
    DepthConfig,
    ModelLimits,
    Prompt,
    RolloutEngine,
    RolloutRecord,
    SamplingConfig,
    prepare_request,
    request_keys,
)


def check_vllm_depth(depth: DepthConfig) -> None:
    """vLLM's Ouro runs every loop and never reads the gate: only fixed depth and the full cache exist there."""
    if depth.policy == "adaptive":
        raise ValueError(
            "VLLMEngine: adaptive depth (Q-exit) is not possible in vLLM, whose Ouro model always runs all "
            "total_ut_steps loops and never calls the exit gate; use TorchEngine / RolloutPool for adaptive depth"
        )
    if depth.kv_mode != "full":
        raise ValueError(f"VLLMEngine: kv_mode {depth.kv_mode!r} is not available in vLLM (it keeps the full cache)")


class VLLMEngine(RolloutEngine):
    def __init__(
        self,
        model: str | Path,
        tokenizer: Any = None,
        depth: DepthConfig | None = None,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.5,
        max_model_len: int | None = None,
        policy_version: int = 0,
        **llm_kwargs: Any,
    ):
        self.depth = depth or DepthConfig()
        self.depth.check()
        check_vllm_depth(self.depth)  # before CUDA and vllm: the error is about the request, not the machine
        if not torch.cuda.is_available():
            raise RuntimeError("VLLMEngine needs a CUDA GPU; on CPU use TorchEngine or RolloutPool")
        try:
            import vllm
        except ImportError as err:
            raise ImportError("VLLMEngine needs vLLM: pip install -e '.[vllm]'") from err
        self._vllm = vllm
        config = LoopLMConfig.from_pretrained(str(model))
        self.limits = ModelLimits.from_config(config)
        self.num_loops = self.depth.num_loops or config.total_ut_steps
        self.tokenizer = tokenizer
        self.policy_version = policy_version
        self.llm = vllm.LLM(
            model=str(model),
            tokenizer=str(model) if tokenizer is None else getattr(tokenizer, "name_or_path", str(model)),
            skip_tokenizer_init=tokenizer is None,
            hf_overrides={"total_ut_steps": self.num_loops},
            logprobs_mode="processed_logprobs",
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len or config.max_position_embeddings,
            **llm_kwargs,
        )

    def generate(
        self, prompts: Sequence[Prompt], sampling: SamplingConfig, depth: DepthConfig | None = None
    ) -> list[RolloutRecord]:
        depth = depth or self.depth
        check_vllm_depth(depth)
        if (depth.num_loops or self.limits.num_loops) != self.num_loops:
            raise ValueError(
                f"VLLMEngine was built for num_loops={self.num_loops} (hf_overrides); got {depth.num_loops}"
            )
        if sampling.return_distributions:
            raise ValueError("VLLMEngine: return_distributions is not supported (vLLM returns per-token log-probs)")
        prompt_ids, sampling, depth = prepare_request(prompts, sampling, depth, self.limits, self.tokenizer)
        # One seed per prompt, derived like our engine's stream keys, so a prompt's samples do not depend on
        # which other prompts share the call.
        seeds = request_keys(sampling.seed, torch.arange(len(prompt_ids))).tolist()
        params = [self._params(sampling, seed) for seed in seeds]
        requests = [{"prompt_token_ids": ids} for ids in prompt_ids]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [
            self._record(ids, completion)
            for ids, output in zip(prompt_ids, outputs, strict=True)
            for completion in output.outputs
        ]

    def _params(self, sampling: SamplingConfig, seed: int):
        return self._vllm.SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1,
            min_p=sampling.min_p,
            max_tokens=sampling.max_new_tokens,
            stop_token_ids=sampling.stop_token_ids,
            stop=sampling.stop_strings or None,
            ignore_eos=True,  # the model's eos ids are already in stop_token_ids unless ignore_eos was asked
            seed=seed,
            logprobs=0,  # the sampled token's log-prob only
            detokenize=self.tokenizer is not None,
        )

    def _record(self, prompt_ids: list[int], completion) -> RolloutRecord:
        tokens = list(completion.token_ids)
        logprobs = [step[token].logprob for token, step in zip(tokens, completion.logprobs, strict=True)]
        return RolloutRecord(
            prompt_ids=list(prompt_ids),
            completion_ids=tokens,
            logprobs=logprobs,
            exit_steps=[self.num_loops] * len(tokens),
            policy_version=self.policy_version,
            finish_reason="stop" if completion.finish_reason == "stop" else "length",
            num_loops=self.num_loops,
        )

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Copy the trainer's weights into vLLM's model (names are Ouro's checkpoint keys on both sides)."""
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0":
            raise RuntimeError(
                "VLLMEngine.load_weights needs vLLM's engine in this process: set "
                "VLLM_ENABLE_V1_MULTIPROCESSING=0 before building the engine (as TRL's colocate mode does)"
            )
        executor = self.llm.llm_engine.model_executor
        worker = getattr(executor.driver_worker, "worker", executor.driver_worker)
        worker.model_runner.model.load_weights(weights=list(state_dict.items()))
        self.llm.reset_prefix_cache()  # cached prefixes hold K/V of the old weights
        self.policy_version = version


__all__ = ["VLLMEngine", "check_vllm_depth"]
