"""The reward functions on tables of cases, their inputs (columns, message lists, None rows) and the registry."""

from __future__ import annotations

import functools
import pickle

import pytest

import rewards
from rewards import (
    REWARD_FUNCS,
    accuracy_reward,
    dapo_answer_reward,
    dapo_reward,
    format_reward,
    get_reward_funcs,
    overlong_reward,
    verifier_stats,
)
from tests.helpers import ACCURACY_CASES, MEGABYTE


def test_accuracy_table():
    golds, completions, expected = zip(*ACCURACY_CASES, strict=True)
    assert accuracy_reward(completions=list(completions), solution=list(golds)) == list(expected)


@pytest.mark.parametrize(
    "column",
    [
        {"solution": ["\\frac{1}{2}", "7"]},
        {"ground_truth": ["\\frac{1}{2}", "7"]},
        {"answer": ["\\frac{1}{2}", "7"]},
        {"reward_model": [{"ground_truth": "\\frac{1}{2}", "style": "rule"}, {"ground_truth": 7}]},
    ],
    ids=lambda c: next(iter(c)),
)
def test_every_ground_truth_column(column):
    completions = ["Answer: 0.5", "Answer: 8"]
    assert accuracy_reward(completions=completions, **column) == [1.0, 0.0]
    assert dapo_reward(completions=["Answer: 1/2", "Answer: 8"], **column) == [-1.0, -1.0]  # exact strings only
    assert dapo_reward(completions=["Answer: \\frac{1}{2}", "Answer: 7"], **column) == [1.0, 1.0]


def test_rows_without_ground_truth_do_not_apply():
    columns = {"reward_model": [{"ground_truth": None}, {"style": "rule"}, None, {"ground_truth": "2"}]}
    assert accuracy_reward(completions=["Answer: 2"] * 4, **columns) == [None, None, None, 1.0]
    assert dapo_reward(completions=["Answer: 2"] * 4, **columns) == [None, None, None, 1.0]
    assert accuracy_reward(completions=["Answer: 2", "Answer: 2"], solution=["", float("nan")]) == [None, None]


def test_missing_or_wrong_ground_truth_is_a_clear_error():
    for func in (accuracy_reward, dapo_reward):
        with pytest.raises(KeyError, match=r"expected one of \['ground_truth', 'reward_model', 'answer', 'solution'\]"):
            func(prompts=["p"], completions=["Answer: 1"], question=["q"])
        with pytest.raises(TypeError, match="row 1: column 'reward_model' must hold"):
            func(completions=["a", "b"], reward_model=[{"ground_truth": "1"}, "1"])
        with pytest.raises(TypeError, match="row 0: ground truth in column 'solution' must be a string or a number"):
            func(completions=["a"], solution=[["1"]])
        with pytest.raises(ValueError, match="2 completions but 1 ground truths in column 'answer'"):
            func(completions=["a", "b"], answer=["1"])


def test_conversational_completions_and_prompts():
    completions = [[{"role": "assistant", "content": "<think>\n2+2=4\n</think>\nAnswer: 4"}], [{"role": "assistant", "content": None}]]
    prompts = [[{"role": "user", "content": "2+2?"}]] * 2
    assert accuracy_reward(prompts=prompts, completions=completions, ground_truth=["4", "4"]) == [1.0, 0.0]
    assert dapo_answer_reward(prompts=prompts, completions=completions, ground_truth=["4", "4"]) == [1.0, -1.0]
    assert format_reward(prompts=prompts, completions=completions) == [1.0, 0.0]


def test_a_prompt_that_opened_think_hides_an_unclosed_answer():
    prompt = "<|im_start|>assistant\n<think>\n"
    assert accuracy_reward(prompts=[prompt], completions=["so Answer: 4"], answer=["4"]) == [0.0]
    assert accuracy_reward(prompts=[prompt], completions=["so</think>Answer: 4"], answer=["4"]) == [1.0]


@pytest.mark.parametrize(
    ("prompt", "completion", "expected"),
    [
        (None, "<think>\nwork\n</think>\nAnswer: 4", 1.0),
        (None, "  <think>work</think>\\boxed{4}", 1.0),
        (None, "work</think>\nAnswer: 4", 1.0),  # the prompt may have opened the block
        ("Q <think>", "work</think>\nAnswer: 4", 1.0),  # ... and this one did
        ("Q", "work</think>\nAnswer: 4", 0.0),  # ... and this one did not
        (None, "<think>work</think>", 0.0),  # no answer after the block
        (None, "<think>work\nAnswer: 4", 0.0),  # never closed
        (None, "Answer: 4", 0.0),  # no think block
        (None, "<think>a</think><think>b</think>Answer: 4", 0.0),  # two blocks
        (None, "<think>a</think>Answer: 4</think>", 0.0),
        (None, "", 0.0),
        (None, "<think>" + MEGABYTE + "</think>Answer: 4", 1.0),
    ],
)
def test_format_table(prompt, completion, expected):
    assert format_reward(prompts=None if prompt is None else [prompt], completions=[completion]) == [expected]


def test_overlong_is_dapo_shaping_on_token_counts():
    ids = [[0] * n for n in (0, 80, 90, 99, 100, 101, 500)]
    assert overlong_reward(completion_ids=ids, max_completion_len=100, soft_punish_cache=20) == [0.0, 0.0, -0.5, -0.95, -1.0, -1.0, -1.0]
    assert overlong_reward(completion_ids=ids, max_completion_len=100, soft_punish_cache=0) == [0.0] * 5 + [-1.0, -1.0]
    assert overlong_reward(completion_ids=[[0] * 16384, [0] * 20480]) == [0.0, -1.0]  # DAPO's 20480 / 4096
    with pytest.raises(KeyError, match="needs `completion_ids`"):
        overlong_reward(completions=["a"])
    with pytest.raises(ValueError, match="0 <= soft_punish_cache <= max_completion_len"):
        overlong_reward(completion_ids=[[1]], max_completion_len=10, soft_punish_cache=11)


def test_get_reward_funcs_binds_options_by_name():
    funcs = get_reward_funcs(["accuracy_reward", "overlong_reward", "format_reward"], max_completion_len=10, soft_punish_cache=5, timeout_s=2.0)
    accuracy, overlong, fmt = funcs
    assert fmt is format_reward and isinstance(overlong, functools.partial)
    assert overlong.keywords == {"max_completion_len": 10, "soft_punish_cache": 5}
    assert accuracy.keywords == {"timeout_s": 2.0}
    assert overlong(prompts=["p"], completions=["c"], completion_ids=[[1] * 8]) == [-0.6]
    assert pickle.loads(pickle.dumps(overlong))(completion_ids=[[1] * 8]) == [-0.6]  # TRL may ship it to a process
    assert set(REWARD_FUNCS) == {"accuracy_reward", "dapo_reward", "depth_penalty", "format_reward", "overlong_reward"}
    assert rewards.reward_options(accuracy_reward) == ["timeout_s", "call_timeout_s"]


def test_get_reward_funcs_errors_name_what_is_known():
    with pytest.raises(KeyError, match=r"unknown reward function\(s\) \['acuracy'\]; known: \['accuracy_reward', 'dapo_reward'"):
        get_reward_funcs(["acuracy"])
    with pytest.raises(TypeError, match=r"\['max_len'\] are taken by none of \['format_reward'\]"):
        get_reward_funcs("format_reward", max_len=3)
    with pytest.raises(ValueError, match="soft_punish_cache"):
        get_reward_funcs("overlong_reward", max_completion_len=10, soft_punish_cache=-1)
    with pytest.raises(ValueError, match="timeout_s"):
        get_reward_funcs("accuracy_reward", timeout_s=0)


def test_counts_and_trl_metric_hook():
    before = verifier_stats()
    logged = {}
    result = accuracy_reward(
        completions=["Answer: 3", "Answer: 4", "Answer: 0.5", "no answer"],
        solution=["3", "3", "\\frac{1}{2}", "3"],
        log_metric=lambda name, value: logged.__setitem__(name, value),
    )
    after = verifier_stats()
    assert result == [1.0, 0.0, 1.0, 0.0]
    # Two decided by string checks (3 = 3, 3 != 4), one by math-verify, one had no answer to check.
    assert {k: after[k] - before[k] for k in after} == {"calls": 1, "prechecked": 2, "timeouts": 0, "errors": 0}
    assert logged == {"verifier/timeouts": 0.0, "verifier/errors": 0.0}


def test_called_as_trl_calls_reward_functions():
    """TRL 1.16's `_calculate_rewards`: keywords only, every dataset column but the prompt, plus its hooks; and
    the names it logs them under."""
    from trl.trainer.utils import get_callable_name

    funcs = get_reward_funcs(list(REWARD_FUNCS), max_completion_len=8, soft_punish_cache=4, alpha=0.5)
    prompts = [[{"role": "user", "content": "1+1?"}]] * 2
    completions = [[{"role": "assistant", "content": "<think>1+1</think>Answer: 2"}], [{"role": "assistant", "content": "3"}]]
    metrics: dict[str, list[float]] = {}
    hooks = {"trainer_state": object(), "log_extra": lambda *a: None, "log_metric": lambda k, v: metrics.setdefault(k, []).append(v)}
    columns = {"reward_model": [{"ground_truth": "2", "style": "rule"}] * 2, "data_source": ["math_dapo"] * 2, "ability": ["MATH"] * 2,
               "exit_steps": [[1, 2, 3, 4, 4, 4, 4], [2, 2, 4]]}  # the GRPO recipe's rollout_func adds exit_steps
    scores = {
        get_callable_name(func): func(prompts=prompts, completions=completions, completion_ids=[[5] * 7, [5] * 3], **columns, **hooks)
        for func in funcs
    }
    assert scores == {
        "accuracy_reward": [1.0, 0.0],
        "dapo_reward": [1.0, -1.0],
        "depth_penalty": [-1.5, -1.0],
        "format_reward": [1.0, 0.0],
        "overlong_reward": [-0.75, 0.0],
    }
    assert metrics == {"verifier/timeouts": [0.0], "verifier/errors": [0.0]}
