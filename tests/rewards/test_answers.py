"""Final-answer extraction (think block, last `\\boxed{}` or `Answer:`, bounds) and the string pre-check."""

from __future__ import annotations

import pytest

from rewards.answers import (
    MAX_ANSWER_CHARS,
    MAX_NESTING,
    TAIL_CHARS,
    canonical,
    final_answer,
    gold_answer,
    precheck,
)


@pytest.mark.parametrize(
    ("completion", "think_open", "expected"),
    [
        ("so \\boxed{3}.", False, "3"),
        ("\\boxed{\\frac{1}{2}} is it", False, "\\frac{1}{2}"),
        ("Answer: 3\nno wait\nAnswer: 5", False, "5"),  # several Answer: lines: the last counts
        ("\\boxed{1} then\nAnswer: 2", False, "2"),  # whichever comes last
        ("Answer: 2 or rather \\boxed{7}", False, "7"),
        ("<think>\\boxed{3}</think> I give up", False, None),  # only inside the think block: does not count
        ("<think>Answer: 3", False, None),  # unclosed think block
        ("still thinking, Answer: 3", True, None),  # the prompt opened the block and it never closed
        ("reasoning</think>\nAnswer: 4", True, "4"),  # prompt-opened block, closed in the completion
        ("<think>Answer: 1</think><think>Answer: 2</think>Answer: 3", False, "3"),
        ("", False, None),
        ("no answer at all", False, None),
        ("\\boxed{", False, None),  # malformed: never closes
        ("\\boxed{4} and a broken \\boxed{5", False, "4"),  # an earlier balanced one still counts
        ("\\boxed{" + "{" * 15 + "1" + "}" * 15 + "}", False, "{" * 15 + "1" + "}" * 15),
        ("\\boxed{" + "{" * (MAX_NESTING + 1) + "1" + "}" * (MAX_NESTING + 1) + "}", False, None),  # too deep
        ("\\boxed{" + "1" * (MAX_ANSWER_CHARS + 1) + "}", False, None),  # implausibly long: no answer
        ("Answer: 9\n" + "x" * TAIL_CHARS, False, None),  # outside the tail that is read
        ("x" * 1_000_000 + "\nAnswer: 6", False, "6"),  # a 1 MB completion: its tail is read
    ],
)
def test_final_answer(completion, think_open, expected):
    assert final_answer(completion, think_open) == expected


@pytest.mark.parametrize(
    ("ground_truth", "expected"),
    [
        ("34", "34"),
        (" \\frac{1}{2} ", "\\frac{1}{2}"),
        ("so the answer is $\\boxed{5}$.", "5"),  # a MATH-style solution text
        ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),  # GSM8K's answer column
        ("", None),
        ("x" * (MAX_ANSWER_CHARS + 1), None),
    ],
)
def test_gold_answer(ground_truth, expected):
    assert gold_answer(ground_truth) == expected


@pytest.mark.parametrize(
    ("gold", "answer", "expected"),
    [
        ("3", "3", True),
        ("$\\dfrac{1}{2}$", "\\frac{1}{2}.", True),
        ("\\left(1,2\\right)", "(1, 2)", True),
        ("1000", "1,000", True),  # thousands separator
        ("12", "1,2", None),  # "1,2" is a list, not twelve: math-verify decides
        ("-007", "-7", True),
        ("3", "4", False),
        ("3", "3.0", None),  # equal, but only math-verify knows
        ("\\frac{1}{2}", "0.5", None),
    ],
)
def test_precheck(gold, answer, expected):
    assert precheck(gold, answer) is expected


def test_canonical_drops_spacing_and_dollars():
    assert canonical("$ x \\, + \\; 1 $") == "x+1"
