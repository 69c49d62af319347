"""DAPO's `Answer:` scorer, as its reference implementation does it (verl `math_dapo.py`, Minerva-style).

Keep the last 300 characters, take the last `Answer: ...` up to the end of the line (case-insensitive),
normalise both sides (drop `$`, `\\text{}`, units, `\\boxed{}`, thousands separators, keep the part after the
last `=`) and compare strings exactly: +1 correct, -1 wrong. Pure string work on bounded input (300 characters),
so no timeout is needed here; symbolic equivalence is math-verify's job.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from rewards.inputs import completion_text, ground_truths

ANSWER_PATTERN = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")
TAIL_CHARS = 300
INVALID = "[INVALID]"

_SUBSTITUTIONS = [
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), (r"\ ", ""), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
]
_REMOVED = [
    "square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue", "points",
    "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals", "edges", "students",
    "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3",
    "\\text{\n}", "\\text{}", r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;", r",\!", "{,}", '"', "\\dots",
]


def normalize_final_answer(answer: str) -> str:
    """DAPO/Minerva normalisation of a final answer string."""
    answer = answer.split("=")[-1]
    for before, after in _SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expression in _REMOVED:
        answer = answer.replace(expression, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)
    answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer.strip()


def extract_answer(text: str) -> str:
    """The normalised last `Answer:` of the text's tail, or "[INVALID]" when there is none."""
    matches = ANSWER_PATTERN.findall(text[-TAIL_CHARS:])
    return normalize_final_answer(matches[-1]) if matches else INVALID


def dapo_score(completion: str, ground_truth: str) -> float:
    """+1.0 when the completion's final answer equals the ground truth after normalisation, else -1.0."""
    predicted = extract_answer(completion)
    return 1.0 if predicted != INVALID and predicted == normalize_final_answer(str(ground_truth)) else -1.0


def dapo_reward(prompts: Sequence[Any] | None = None, completions: Sequence[Any] = (), **columns: Any) -> list[float | None]:
    """TRL reward function: DAPO's +1/-1 on the `Answer:` line, one score per completion; None for a row
    without a ground truth. As DAPO's scorer does, it reads the last 300 characters whatever they are (a think
    block included): `accuracy_reward` is the think-aware, math-verify one."""
    if not completions:
        return []
    truths = ground_truths(columns, len(completions))
    return [
        None if truth is None else dapo_score(completion_text(completion), truth)
        for completion, truth in zip(completions, truths, strict=True)
    ]


dapo_answer_reward = dapo_reward  # its first name, kept for callers

__all__ = ["INVALID", "dapo_answer_reward", "dapo_reward", "dapo_score", "extract_answer", "normalize_final_answer"]
