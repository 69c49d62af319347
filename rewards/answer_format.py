"""The answer format: how SFT traces and prompts ask for an answer, and how an answer is read back.

One home for the format the rewards score (`rewards.dapo`): worked steps in a think block, then the answer
alone on the last line, `<think>\\n{steps}\\n</think>\\nAnswer: {answer}`. The data loaders and the synthetic
tasks write it from here, so neither needs the other (nor the recipes) to know it.
"""

from __future__ import annotations

from rewards.dapo import INVALID, extract_answer

# DAPO-Math-17k's instruction around each problem; GSM8K prompts reuse it so one reward parses both.
DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


def format_trace(steps: str, answer: str) -> str:
    """An SFT target: worked steps in a think block, then `Answer: N` alone on the last line."""
    return f"<think>\n{steps.strip()}\n</think>\nAnswer: {answer}"


def dapo_prompt(problem: str) -> str:
    """Wrap a problem in DAPO-Math-17k's `Answer:` instruction."""
    return f"{DAPO_PREFIX}{problem.strip()}{DAPO_SUFFIX}"


def parse_answer(text: str) -> str | None:
    """The normalised last `Answer:` (DAPO's scorer, the one the rewards use), or None when there is none."""
    answer = extract_answer(text)
    return None if answer == INVALID else answer


__all__ = ["DAPO_PREFIX", "DAPO_SUFFIX", "dapo_prompt", "format_trace", "parse_answer"]
