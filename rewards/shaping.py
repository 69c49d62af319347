"""Shaping rewards that need no ground truth: `format_reward` (think block, then an answer) and
`overlong_reward` (DAPO's soft overlong punishment, TRL's implementation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trl.rewards import get_soft_overlong_punishment

from rewards.answers import THINK_CLOSE, THINK_OPEN, final_answer, prompt_opens_think
from rewards.inputs import completion_text, prompt_texts

# DAPO's values (L_max = 20480, cache C = 4096); recipes pass their own through `get_reward_funcs`.
DAPO_MAX_COMPLETION_LEN = 20480
DAPO_SOFT_PUNISH_CACHE = 4096


def format_reward(prompts: Sequence[Any] | None = None, completions: Sequence[Any] = (), **_: Any) -> list[float]:
    """1.0 for one closed think block followed by a final answer (`\\boxed{}` or `Answer:` line), else 0.0.

    The completion may open the block itself (`<think>` thought `</think>` answer) or start inside it when the
    prompt opened it (thought `</think>` answer). When the prompt is a chat-message list its rendered text (and
    whether the template opened `<think>`) is unknown, so both forms count. Unlike
    `trl.rewards.think_format_reward`, which requires `<think>` at the start and no answer, this accepts a
    prompt-opened block and requires the answer."""
    texts = [completion_text(c) for c in completions]
    return [float(_well_formed(t, p)) for t, p in zip(texts, prompt_texts(prompts, len(texts)), strict=True)]


def _well_formed(text: str, prompt: str | None) -> bool:
    body = text.lstrip()
    if body.startswith(THINK_OPEN):
        body = body[len(THINK_OPEN) :]
    elif prompt is not None and not prompt_opens_think(prompt):
        return False  # a known prompt left no block open, and the completion did not open one
    return body.count(THINK_CLOSE) == 1 and THINK_OPEN not in body and final_answer(body) is not None


def overlong_reward(
    prompts: Sequence[Any] | None = None,
    completions: Sequence[Any] = (),
    completion_ids: Sequence[Sequence[int]] | None = None,
    *,
    max_completion_len: int = DAPO_MAX_COMPLETION_LEN,
    soft_punish_cache: int = DAPO_SOFT_PUNISH_CACHE,
    **_: Any,
) -> list[float]:
    """DAPO's soft overlong shaping on token counts: 0 up to `max_completion_len - soft_punish_cache`, then
    linear down to -1 at `max_completion_len` (and -1 beyond). TRL's `get_soft_overlong_punishment` computes
    it; this checks the options (TRL's divides by a cache of 0 only past the limit, so 0 means a hard cliff)
    and reads `completion_ids`, which TRL passes to every reward function."""
    if max_completion_len <= 0 or not 0 <= soft_punish_cache <= max_completion_len:
        raise ValueError(
            "overlong_reward needs max_completion_len > 0 and 0 <= soft_punish_cache <= max_completion_len, "
            f"got {max_completion_len} and {soft_punish_cache}"
        )
    if completion_ids is None:
        if completions:
            raise KeyError("overlong_reward needs `completion_ids` (token ids per completion; TRL passes them)")
        return []
    return get_soft_overlong_punishment(max_completion_len, soft_punish_cache)(completion_ids)
