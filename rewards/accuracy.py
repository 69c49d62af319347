"""`accuracy_reward`: math-verify equivalence of the final answer with the ground truth, 1.0 / 0.0.

Differs from `trl.rewards.accuracy_reward` where TRL's does not fit a trainer that runs in threads and Ray
actors: TRL's turns math-verify's timeouts off outside the main thread (a hostile answer can then hang the
step) and parses the whole completion, think block included. Ours reads one final answer after `</think>`
(`answers.final_answer`), accepts the ground truth under any of the usual column names, and verifies in
worker processes with wall-clock limits (`verifier`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from rewards.answers import final_answer, gold_answer, prompt_opens_think
from rewards.inputs import completion_text, ground_truths, prompt_texts
from rewards.verifier import DEFAULT_CALL_TIMEOUT_S, DEFAULT_TIMEOUT_S, default_verifier

logger = logging.getLogger(__name__)


def accuracy_reward(
    prompts: Sequence[Any] | None = None,
    completions: Sequence[Any] = (),
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
    log_metric: Callable[[str, float], None] | None = None,
    **columns: Any,
) -> list[float | None]:
    """1.0 when the final answer (last `\\boxed{}` or `Answer:` line, after `</think>` if there is a think
    block) is equivalent to the ground truth under math-verify, else 0.0 (no answer, timeout or error
    included: those are counted in `verifier_stats()` and logged). None for a row without a usable ground truth.

    `timeout_s` limits each comparison and `call_timeout_s` the whole call (wall clock); `log_metric` is TRL's
    hook and receives this call's timeouts and errors.
    """
    if timeout_s <= 0 or call_timeout_s <= 0:
        raise ValueError(f"timeout_s and call_timeout_s must be > 0, got {timeout_s} and {call_timeout_s}")
    if not completions:
        return []
    n = len(completions)
    truths = [t if t is None else gold_answer(t) for t in ground_truths(columns, n)]
    opens = [prompt_opens_think(p) for p in prompt_texts(prompts, n)]
    answers = [final_answer(completion_text(c), o) for c, o in zip(completions, opens, strict=True)]
    rewards: list[float | None] = [None if t is None else 0.0 for t in truths]
    rows = [i for i in range(n) if truths[i] is not None and answers[i] is not None]
    result = default_verifier().verify([(truths[i], answers[i]) for i in rows], timeout_s, call_timeout_s)
    for i, verdict in zip(rows, result.values, strict=True):
        rewards[i] = None if verdict is None else float(verdict)
    if log_metric is not None:
        log_metric("verifier/timeouts", float(result.timeouts))
        log_metric("verifier/errors", float(result.errors))
    return rewards
