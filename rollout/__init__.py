"""Rollouts for LoopLMs: one interface, our PyTorch engine, a Ray actor pool, vLLM for GPUs, the parity check.

    from rollout import TorchEngine, RolloutPool, SamplingConfig, DepthConfig, check_parity

    engine = TorchEngine(model)                                  # or RolloutPool(model_or_folder, PoolConfig(...))
    records = engine.generate(prompts, SamplingConfig(n=4, max_new_tokens=256, seed=0),
                              DepthConfig(policy="adaptive", exit_threshold=0.8))
    engine.load_weights(trainer_model.state_dict(), version=step)   # records carry the version
    check_parity(trainer_model, records, sampling).stats()           # rollout vs training forward

`RolloutPool`, `PoolConfig` (Ray) and `VLLMEngine` are imported on first use, so `import rollout` costs
neither Ray nor vLLM.
"""

from __future__ import annotations

import importlib
from typing import Any

from .engine import (
    DepthConfig,
    ModelLimits,
    RolloutEngine,
    RolloutRecord,
    SamplingConfig,
    prepare_request,
    processed_logprobs,
)
from .parity import ParityStats, TokenGaps, check_parity, replay_logprobs, token_gaps
from .torch_engine import TorchEngine

_LAZY = {"RolloutPool": ".pool", "PoolConfig": ".pool", "VLLMEngine": ".vllm_engine"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'rollout' has no attribute {name!r}")


__all__ = [
    "DepthConfig",
    "ModelLimits",
    "ParityStats",
    "PoolConfig",
    "RolloutEngine",
    "RolloutPool",
    "RolloutRecord",
    "SamplingConfig",
    "TokenGaps",
    "TorchEngine",
    "VLLMEngine",
    "check_parity",
    "prepare_request",
    "processed_logprobs",
    "replay_logprobs",
    "token_gaps",
]
