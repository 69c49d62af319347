"""posttrain.synthetic: deterministic per seed, arithmetic checked independently, DAPO answer format."""

from __future__ import annotations

import re

import pytest

from posttrain.synthetic import (
    FUNCTIONS_SEED,
    SyntheticTask,
    arithmetic_traces,
    compositions,
    function_tables,
    modular_expressions,
    to_dataset,
)
from rewards.dapo import dapo_score

TRACE = re.compile(r"<think>\n(?P<steps>.+)\n</think>\nAnswer: (?P<answer>\d+)", re.DOTALL)
QUESTION = re.compile(r"Compute (?P<expression>.+?)(?: mod (?P<modulus>\d+))?\.")
ALLOWED_CHARS = set("0123456789+-*()=:. \n<>/") | set("Computemodthinkswer") | {"A"}


def check_arithmetic_row(row: dict, modulus: int | None) -> None:
    question = row["prompt"][0]["content"]
    assert row["messages"][0] == row["prompt"][0] and row["messages"][1]["role"] == "assistant"
    match = QUESTION.fullmatch(question)
    assert match, question
    assert match["modulus"] == (None if modulus is None else str(modulus))
    expected = eval(match["expression"])  # digits and + - * ( ) only, generated in code
    if modulus is not None:
        expected %= modulus
    trace = TRACE.fullmatch(row["messages"][1]["content"])
    assert trace, row["messages"][1]["content"]
    assert trace["answer"] == row["ground_truth"] == str(expected)
    for step in trace["steps"].splitlines():
        left, right = step.split("=")
        assert eval(left.replace(" mod ", " % ")) == int(right), step


@pytest.mark.parametrize("modulus", [23, None, 7])
def test_arithmetic_traces_are_correct(modulus: int | None) -> None:
    rows = arithmetic_traces(300, seed=3, modulus=modulus)
    assert len(rows) == 300
    for row in rows:
        check_arithmetic_row(row, modulus)


def test_arithmetic_traces_example_shape() -> None:
    row = arithmetic_traces(1, seed=0)[0]
    assert set(row) == {"messages", "prompt", "ground_truth"}
    steps = TRACE.fullmatch(row["messages"][1]["content"])["steps"].splitlines()
    assert 3 <= len(steps) <= 4 and re.fullmatch(r"\d+ mod 23=\d+", steps[-1])


def test_arithmetic_traces_operation_count_and_operands() -> None:
    rows = arithmetic_traces(200, seed=1, num_ops=(2, 3), max_operand=9, modulus=None)
    counts = {len(TRACE.fullmatch(r["messages"][1]["content"])["steps"].splitlines()) for r in rows}
    assert counts == {2, 3}
    numbers = {int(n) for r in rows for n in re.findall(r"\d+", QUESTION.fullmatch(r["prompt"][0]["content"])["expression"])}
    assert max(numbers) <= 9 and min(numbers) >= 0


def test_synthetic_rows_are_deterministic_per_seed() -> None:
    assert arithmetic_traces(50, seed=5) == arithmetic_traces(50, seed=5)
    assert arithmetic_traces(50, seed=5) != arithmetic_traces(50, seed=6)
    assert modular_expressions(50, length=6, seed=5) == modular_expressions(50, length=6, seed=5)
    assert modular_expressions(50, length=6, seed=5) != modular_expressions(50, length=6, seed=6)


def eval_prefix(tokens: list[str], modulus: int) -> int:
    """Independent stack evaluator: scan right to left, operators pop two operands."""
    stack: list[int] = []
    for token in reversed(tokens):
        if token.isdigit():
            stack.append(int(token))
        else:
            a, b = stack.pop(), stack.pop()
            stack.append({"+": a + b, "-": a - b, "*": a * b}[token] % modulus)
    assert len(stack) == 1
    return stack[0]


@pytest.mark.parametrize("length", [1, 4, 12])
def test_modular_expressions_are_correct(length: int) -> None:
    for row in modular_expressions(200, length=length, seed=2):
        match = QUESTION.fullmatch(row["prompt"][0]["content"])
        assert match and match["modulus"] == "23"
        tokens = match["expression"].split()
        assert sum(token in "+-*" for token in tokens) == length == row["length"]
        assert all(token in "+-*" or 0 <= int(token) < 23 for token in tokens)
        assert row["ground_truth"] == str(eval_prefix(tokens, 23))
        assert row["messages"][1]["content"] == f"Answer: {row['ground_truth']}"


def test_answers_score_with_the_dapo_reward() -> None:
    for row in arithmetic_traces(20, seed=0) + modular_expressions(20, length=5, seed=0):
        assert dapo_score(row["messages"][1]["content"], row["ground_truth"]) == 1.0
        assert dapo_score("Answer: 99999", row["ground_truth"]) == -1.0


def test_vocabulary_is_small() -> None:
    rows = arithmetic_traces(300, seed=0) + modular_expressions(300, length=8, seed=0)
    text = "".join(m["content"] for row in rows for m in row["messages"])
    assert set(text) <= ALLOWED_CHARS, set(text) - ALLOWED_CHARS
    assert set(re.findall(r"[A-Za-z]+", text)) == {"Compute", "mod", "think", "Answer"}


def test_to_dataset_columns() -> None:
    rows = arithmetic_traces(10, seed=0)
    assert to_dataset(rows).column_names == ["messages", "prompt", "ground_truth"]
    grpo = to_dataset(rows, ["prompt", "ground_truth"])
    assert grpo.column_names == ["prompt", "ground_truth"] and len(grpo) == 10
    assert grpo[3]["prompt"] == rows[3]["prompt"]
    sft = to_dataset(modular_expressions(4, length=3), ["messages"])
    assert sft[0]["messages"][1]["content"].startswith("Answer: ")


def test_sloppy_teacher_skips_the_reduction_but_ground_truth_stays_right() -> None:
    task = SyntheticTask(operators="+", modulus=10, skip_reduction=0.5)
    rows = task.rows(400, seed=0)
    skipped = 0
    for row in rows:
        question, trace = row["messages"][0]["content"], row["messages"][1]["content"]
        expression = question.removeprefix("Compute ").removesuffix(" mod 10.")
        assert row["ground_truth"] == str(eval(expression) % 10)  # noqa: S307 - digits and + only
        stated = trace.rsplit("Answer: ", 1)[1]
        if " mod 10=" not in trace:
            skipped += 1
            assert stated == str(eval(expression))  # noqa: S307 - the unreduced sum
        else:
            assert stated == row["ground_truth"]
    assert 160 <= skipped <= 240  # 50% of 400, within 4 sigma
    assert SyntheticTask().rows(20, seed=3) == arithmetic_traces(20, seed=3)  # defaults: the original task


def test_compositions_apply_each_fixed_function_in_turn() -> None:
    rows = SyntheticTask(kind="compose").rows(500, seed=4)
    tables = function_tables(4, FUNCTIONS_SEED)
    assert all(table[x] != x for table in tables.values() for x in range(10))  # no shared fixed point
    assert len({tuple(table) for table in tables.values()}) == 4
    for row in rows:
        start, names = row["prompt"][0]["content"].removeprefix("Start ").removesuffix(" .").split(" apply ")
        value = int(start)
        for name in names.split():
            value = tables[name][value]
        assert row["messages"][1]["content"] == f"Answer: {value}" and row["ground_truth"] == str(value)
        assert row["depth"] == len(names.split())
    assert {row["depth"] for row in rows} == set(range(1, 7))
    assert SyntheticTask(kind="compose").rows(5, seed=4) == rows[:5]  # seeded
    assert compositions(3, seed=9, steps=(2, 2), functions=1)[0]["prompt"][0]["content"].endswith("apply a a .")


@pytest.mark.parametrize("bad", [dict(operators="/"), dict(skip_reduction=1.5), dict(num_ops=(0, 2)),
                                 dict(kind="sums"), dict(compose_steps=(0, 2)), dict(functions=9)])
def test_synthetic_task_rejects_bad_values(bad) -> None:
    with pytest.raises(ValueError, match="task."):
        SyntheticTask(**bad)
