"""Task accuracy of a LoopLM: sample held-out prompts through a rollout engine and score the answers.

One function, used by the RL recipe (before/after), the demo and the gate frontier: the completions come from
the same engine (and depth policy) that RL samples from, so an accuracy is the policy's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rewards.dapo import dapo_score
from rollout.engine import DepthConfig, RolloutEngine, SamplingConfig, mean_loops_per_token


@dataclass
class TaskAccuracy:
    accuracy: float  # fraction of completions whose final answer (DAPO's `Answer:` scorer) is the ground truth
    mean_loops_per_token: float
    mean_completion_tokens: float
    truncated_frac: float
    completions: int
    seed: int | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def task_accuracy(
    engine: RolloutEngine,
    tokenizer: Any,
    prompts: Sequence[Any],
    ground_truths: Sequence[str],
    sampling: SamplingConfig,
    depth: DepthConfig | None = None,
) -> TaskAccuracy:
    """Generate `sampling.n` completions per prompt with `engine` and score them against `ground_truths`."""
    if len(prompts) != len(ground_truths):
        raise ValueError(f"{len(prompts)} prompts but {len(ground_truths)} ground truths")
    records = engine.generate(list(prompts), sampling, depth)
    texts = tokenizer.batch_decode([r.completion_ids for r in records], skip_special_tokens=True)
    truths = [gt for gt in ground_truths for _ in range(sampling.n)]
    correct = [dapo_score(text, gt) > 0 for text, gt in zip(texts, truths, strict=True)]
    return TaskAccuracy(
        accuracy=sum(correct) / len(correct),
        mean_loops_per_token=mean_loops_per_token(records),
        mean_completion_tokens=sum(len(r.completion_ids) for r in records) / len(records),
        truncated_frac=sum(r.finish_reason == "length" for r in records) / len(records),
        completions=len(records),
        seed=sampling.seed,
    )


def folder_accuracy(
    model_path: str | Path,
    prompts: Sequence[Any],
    ground_truths: Sequence[str],
    depth: DepthConfig,
    sampling: SamplingConfig | None = None,
    batch_size: int = 64,
) -> TaskAccuracy:
    """A saved model folder's accuracy and average loops on held-out examples under one depth policy (e.g.
    `DepthConfig(policy="sampled")`, whose exits are seeded by `sampling.seed`). Default sampling: greedy tokens,
    96 new tokens, stop at the tokenizer's eos, seed 0 (as the gate frontier's generation accuracy)."""
    from transformers import AutoTokenizer

    from looplm.tokenizer import fix_ouro_special_tokens
    from rollout.torch_engine import TorchEngine

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    fix_ouro_special_tokens(tokenizer)  # eos = <|im_end|>, where completions stop (Ouro folders say id 0)
    engine = TorchEngine.from_pretrained(model_path, tokenizer=tokenizer, max_batch_size=batch_size)
    sampling = sampling or SamplingConfig(
        temperature=0.0, max_new_tokens=96, seed=0, stop_token_ids=[tokenizer.eos_token_id]
    )
    return task_accuracy(engine, tokenizer, prompts, ground_truths, sampling, depth)


__all__ = ["TaskAccuracy", "folder_accuracy", "task_accuracy"]
