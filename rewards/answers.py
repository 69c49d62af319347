"""Finding a completion's final answer: the think block, the last `\\boxed{}` or `Answer:` line, size bounds.

Pure string work on bounded input, in the caller's process: only the extracted answer (at most
`MAX_ANSWER_CHARS`) ever reaches math-verify's worker processes.
"""

from __future__ import annotations

import re

from rewards.dapo import ANSWER_PATTERN

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# The final answer sits at the end of a completion; a 1 MB completion is searched only in its last 4,000
# characters (after `</think>`), so extraction stays microseconds and never scans hostile megabytes with
# regexes. DAPO's own scorer reads 300; 4,000 leaves room for a worked final line with a long LaTeX answer.
TAIL_CHARS = 4000
# No real final answer is this long: longer ones are not sent to math-verify (its parse time grows with the
# input and nested LaTeX can make it hang); they count as no answer.
MAX_ANSWER_CHARS = 1000
# Nor is any real answer nested this deep (`\frac{\sqrt{\frac{a}{b}}}{c}` is 3); math-verify runs for seconds
# on 50 nested braces and for minutes on 200, so deeper ones count as no answer instead of as a timeout.
MAX_NESTING = 16
GSM8K_MARKER = "####"  # GSM8K's `answer` column ends with `#### N`


def prompt_opens_think(prompt: str | None) -> bool:
    """True when the prompt text ends inside an open think block (Thinking chat templates open `<think>`)."""
    return prompt is not None and prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)


def answer_region(completion: str, think_open: bool = False) -> str | None:
    """The text after the last `</think>`; the whole completion when it has no think block; None while the
    completion is still inside an unclosed think block (an answer in there does not count)."""
    close = completion.rfind(THINK_CLOSE)
    if close >= 0:
        return completion[close + len(THINK_CLOSE) :]
    if think_open or THINK_OPEN in completion:
        return None
    return completion


def last_boxed(text: str) -> tuple[int, str] | None:
    """(position, content) of the last balanced `\\boxed{...}` in the text, or None."""
    start = text.rfind("\\boxed{")
    while start >= 0:
        content = _braced(text, start + len("\\boxed{"))
        if content is not None:
            return start, content
        start = text.rfind("\\boxed{", 0, start)  # unbalanced: an earlier one may still close
    return None


def _braced(text: str, begin: int) -> str | None:
    """The content up to the `}` that closes the brace opened just before `begin`, or None if none does."""
    depth = 1
    for i in range(begin, min(len(text), begin + MAX_ANSWER_CHARS + 1)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
    return None


def final_answer(completion: str, think_open: bool = False) -> str | None:
    """The completion's final answer: the last `\\boxed{}` or `Answer:` line (whichever comes last), read only
    after `</think>` when there is a think block. None when there is none (or it is implausibly long)."""
    region = answer_region(completion, think_open)
    if region is None:
        return None
    tail = region[-TAIL_CHARS:]
    boxed = last_boxed(tail)
    lines = list(ANSWER_PATTERN.finditer(tail))
    if lines and (boxed is None or lines[-1].start() > boxed[0]):
        answer = lines[-1].group(1)
    elif boxed is not None:
        answer = boxed[1]
    else:
        return None
    return _bounded(answer)


def gold_answer(ground_truth: str) -> str | None:
    """The answer inside a ground truth: its last `\\boxed{}` or `Answer:` line, GSM8K's `#### N`, or the
    whole string (DAPO-Math and most datasets store the bare answer). None when empty or implausibly long."""
    tail = ground_truth[-TAIL_CHARS:]
    boxed = last_boxed(tail)
    if boxed is not None:
        return _bounded(boxed[1])
    if GSM8K_MARKER in tail:
        return _bounded(tail.rsplit(GSM8K_MARKER, 1)[1])
    lines = list(ANSWER_PATTERN.finditer(tail))
    return _bounded(lines[-1].group(1) if lines else ground_truth)


def _bounded(answer: str) -> str | None:
    answer = answer.strip()
    return answer if answer and len(answer) <= MAX_ANSWER_CHARS and _nesting(answer) <= MAX_NESTING else None


def _nesting(text: str) -> int:
    """The deepest `{`/`(`/`[` nesting in the text (unbalanced closers ignored)."""
    depth = deepest = 0
    for char in text:
        if char in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "})]" and depth:
            depth -= 1
    return deepest


_DOLLARS = re.compile(r"^\$+|\$+$")
_SPACES = re.compile(r"\s+|\\[,;! ]")  # whitespace and LaTeX spacing commands
_INTEGER = re.compile(r"-?(\d+|\d{1,3}(,\d{3})+)")  # thousands separators only in their places: "1,2" is a list


def canonical(answer: str) -> str:
    """A conservative normal form for the exact-match pre-check: no outer `$`, spacing, trailing period,
    `\\left`/`\\right`, and `\\dfrac`/`\\tfrac` read as `\\frac`. Equal canonical forms are equal answers;
    unequal ones go to math-verify (or are both integers, see `precheck`)."""
    answer = _DOLLARS.sub("", answer.strip()).rstrip(".")
    answer = answer.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return _SPACES.sub("", answer)


def precheck(gold: str, answer: str) -> bool | None:
    """Decide without math-verify where a string check is exact: equal canonical forms -> True; two different
    integers (DAPO-Math's ground truths are all integers; thousands separators dropped) -> False; else None."""
    gold, answer = canonical(gold), canonical(answer)
    if gold == answer:
        return True
    if _INTEGER.fullmatch(gold) and _INTEGER.fullmatch(answer):
        return int(gold.replace(",", "")) == int(answer.replace(",", ""))
    return None


def latex_for_verify(answer: str) -> str:
    """The answer as math-verify's LaTeX extractor reads it best: inside `$...$` (a bare `5.` or `\\dfrac12`
    is missed or misread outside math mode)."""
    return f"${_DOLLARS.sub('', answer.strip()).rstrip('.')}$"
