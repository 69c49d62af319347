"""DAPO's Answer: scorer: its normalisation, the last-match rule, and hostile input."""

from __future__ import annotations

import pandas as pd
import pytest

from rewards.dapo import INVALID, dapo_answer_reward, dapo_score, extract_answer, normalize_final_answer
from tests.helpers import SHARED_DATA


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("$1,234$", "1234"),
        ("\\boxed{42}", "42"),
        ("x = 17", "17"),
        ("12 dollars", "12"),
        ("\\text{5}", "5"),
        ("90^\\circ", "90"),
        ("\\frac12", "\\frac{1}{2}"),
    ],
)
def test_normalisation(raw, expected):
    assert normalize_final_answer(raw) == expected


def test_last_answer_in_the_tail_wins():
    text = "Answer: 3\nwait, let me redo it.\nanswer : 5\n"
    assert extract_answer(text) == "5"
    assert dapo_score(text, "5") == 1.0 and dapo_score(text, "3") == -1.0
    # Only the last 300 characters count: an answer before them is not seen.
    assert extract_answer("Answer: 7\n" + "x" * 400) == INVALID
    assert dapo_score("no answer here", "7") == -1.0
    assert dapo_score("Answer:", "") == -1.0  # an empty line never matches an empty ground truth


def test_trl_signature_with_conversational_completions():
    completions = [[{"role": "assistant", "content": "<think>\n2+2=4\n</think>\nAnswer: 4"}], "Answer: 5"]
    assert dapo_answer_reward(prompts=["p", "p"], completions=completions, ground_truth=["4", "4"]) == [1.0, -1.0]
    with pytest.raises(ValueError, match="2 completions but 1 ground truths"):
        dapo_answer_reward(prompts=["p", "p"], completions=completions, ground_truth=["4"])


@pytest.mark.parametrize(
    ("text", "ground_truth", "expected"),
    [
        ("$" * 5000 + "Answer: " + "$x$" * 2000, "1", -1.0),  # the Answer: lies before the 300-character tail
        ("$" * 5000 + "\nAnswer: 1", "1", 1.0),  # ... and here inside it
        ("Answer: " + "\\boxed{" * 3000, "1", -1.0),
        ("Answer: \\boxed{1}", "1", 1.0),
        ("Answer: \\boxed{\\boxed{1}}", "1", -1.0),  # DAPO's normalisation strips the outer \\boxed{} only
        ("\x00Answer:\x00 1", "1", -1.0),  # NUL is not whitespace: the answer reads "\x001"
        ("\x00\nAnswer: 1", "1", 1.0),
        ("Answer: " + "=" * 10_000, "", -1.0),
        ("Answer: x = 1 = 2", "2", 1.0),  # the part after the last `=`
    ],
)
def test_hostile_strings_score_exactly(text, ground_truth, expected):
    assert dapo_score(text, ground_truth) == expected


@pytest.mark.skipif(not (SHARED_DATA / "dapo").exists(), reason="shared data not present")
def test_real_aime_ground_truths_score_themselves():
    frame = pd.read_parquet(SHARED_DATA / "dapo" / "aime-2024.parquet")
    truths = [row["ground_truth"] for row in frame["reward_model"]]
    assert len(truths) == 960
    assert all(dapo_score(f"...so the result follows.\nAnswer: {gt}", gt) == 1.0 for gt in truths)
    assert all(dapo_score(f"Answer: {int(gt) + 1}", gt) == -1.0 for gt in truths)
