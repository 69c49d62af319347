"""Sampling checks of a LoopLM through a rollout engine: the completions come from the same engine (and depth
policy) that RL samples from, so what is measured is the policy's own behaviour.

- `task_accuracy`: held-out accuracy (the RL recipe before/after, the demo, the gate frontier);
- `sample_check`: the SFT recipe's after-training check of a saved folder: the fraction of well-formed
  completions (`is_well_formed`: `rewards.shaping`'s format check, and a stop rather than a cut-off) and the
  accuracy where a reference answer is known.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from looplm.tokenizer import apply_chat
from rewards.dapo import INVALID, dapo_score, extract_answer
from rewards.shaping import format_reward
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


def is_well_formed(completion: str, finish_reason: str, prompt: str | None = None, thinking: bool = True) -> bool:
    """The completion stopped by itself and has the think-then-answer form of `rewards.shaping.format_reward`
    (one closed think block, opened by the prompt or by the completion, then a final answer); for a model trained
    to answer directly (`thinking=False`), a stop and an `Answer:` line."""
    if not thinking:
        return finish_reason == "stop" and extract_answer(completion) != INVALID
    return finish_reason == "stop" and format_reward([prompt], [completion])[0] == 1.0


def sample_check(
    folder: str | Path,
    prompts: Sequence[Any],
    answers: Sequence[str | None],
    sampling: SamplingConfig,
    examples: int = 3,
    thinking: bool = True,
) -> dict[str, Any]:
    """Load a saved model folder into our rollout engine, sample `prompts`, score the completions' format and,
    where `answers` has one, their final answer (DAPO's scorer). `thinking=False`: the model was trained on replies
    without a think block, so the prompts end without the template's opening `<think>` (as in training)."""
    from transformers import AutoTokenizer

    from rollout.torch_engine import TorchEngine

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    engine = TorchEngine.from_pretrained(folder, tokenizer=tokenizer)
    if not thinking:
        prompts = [apply_chat(tokenizer, list(p), enable_thinking=False) for p in prompts]
    records = engine.generate(list(prompts), sampling)
    texts = tokenizer.batch_decode([r.completion_ids for r in records], skip_special_tokens=True)
    prompt_texts = tokenizer.batch_decode([r.prompt_ids for r in records])
    formed = [
        is_well_formed(t, r.finish_reason, p, thinking) for t, r, p in zip(texts, records, prompt_texts, strict=True)
    ]
    scored = [dapo_score(t, a) > 0 for t, a in zip(texts, answers, strict=True) if a is not None]
    return {
        "num_prompts": len(records),
        "well_formed": sum(formed) / max(len(formed), 1),
        "answer_accuracy": sum(scored) / len(scored) if scored else None,
        "examples": [{"prompt": p, "completion": t} for p, t in zip(prompt_texts[:examples], texts, strict=False)],
    }


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


__all__ = ["TaskAccuracy", "folder_accuracy", "is_well_formed", "sample_check", "task_accuracy"]
