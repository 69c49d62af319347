"""Synthetic reasoning tasks generated in code: seeded, deterministic, tiny vocabulary.

A ~1-10M-parameter model learns them on two CPU cores in minutes, so recipes can be smoke-tested end to
end without downloads. The text uses only digits, `+ - * ( ) = : .`, spaces, newlines, the think tags and
the words `Compute`, `mod`, `Answer`, so a tiny tokenizer covers it.

Rows are dicts with `messages` (user + assistant, for SFT), `prompt` (the user message, for GRPO) and
`ground_truth` (str); the assistant turn ends with `Answer: N`, the format `rewards.dapo` parses.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from datasets import Dataset

from posttrain.data import format_trace

MODULUS = 23
OPERATORS = "+-*"


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _row(question: str, answer: int, reply: str) -> dict[str, Any]:
    user = {"role": "user", "content": question}
    return {
        "messages": [user, {"role": "assistant", "content": reply}],
        "prompt": [user],
        "ground_truth": str(answer),
    }


def _arithmetic_problem(rng: random.Random, num_ops: int, max_operand: int, modulus: int | None) -> dict[str, Any]:
    """Left-to-right chain `((a op b) op c) ...`, parenthesised only where precedence needs it."""
    value = rng.randint(1, max_operand)
    expression, is_sum, steps = str(value), False, []
    for _ in range(num_ops):
        op = rng.choice(OPERATORS)
        low, high = (min(1, value), min(max_operand, value)) if op == "-" else (1, max_operand)  # stays >= 0
        operand = rng.randint(low, high)
        if op == "*" and is_sum:
            expression = f"({expression})"
        expression, is_sum = f"{expression}{op}{operand}", op != "*"
        result = _apply(op, value, operand)
        steps.append(f"{value}{op}{operand}={result}")
        value = result
    if modulus is not None:
        steps.append(f"{value} mod {modulus}={value % modulus}")
        expression = f"({expression})" if is_sum else expression  # mod applies to the whole expression
        expression, value = f"{expression} mod {modulus}", value % modulus
    return _row(f"Compute {expression}.", value, format_trace("\n".join(steps), str(value)))


def arithmetic_traces(
    n: int, seed: int = 0, num_ops: tuple[int, int] = (2, 3), max_operand: int = 9, modulus: int | None = MODULUS
) -> list[dict[str, Any]]:
    """`n` problems like `Compute (7+5)*3 mod 23.` with traces `<think>\\n7+5=12\\n12*3=36\\n36 mod 23=13\\n</think>\\nAnswer: 13`.

    Each problem has between `num_ops[0]` and `num_ops[1]` operations on operands in 0..max_operand;
    `modulus=None` leaves out the final reduction.
    """
    rng = random.Random(seed)
    return [_arithmetic_problem(rng, rng.randint(*num_ops), max_operand, modulus) for _ in range(n)]


def _prefix_tree(rng: random.Random, ops: int, modulus: int) -> tuple[list[str], int]:
    """A random prefix expression with `ops` operators over 0..modulus-1 and its value mod `modulus`."""
    if ops == 0:
        leaf = rng.randrange(modulus)
        return [str(leaf)], leaf
    left_ops = rng.randint(0, ops - 1)
    op = rng.choice(OPERATORS)
    left, a = _prefix_tree(rng, left_ops, modulus)
    right, b = _prefix_tree(rng, ops - 1 - left_ops, modulus)
    return [op, *left, *right], _apply(op, a, b) % modulus


def modular_expressions(n: int, length: int = 8, seed: int = 0, modulus: int = MODULUS) -> list[dict[str, Any]]:
    """The Ouro paper's "Mano" task: prefix expressions with `length` operators over + - * mod `modulus`.

    The answer comes directly (`Answer: N`, no steps), so every bit of the computation happens inside the
    model: more loops measurably help, which makes it the task for gate tuning and depth demos. Rows also
    carry `length`.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens, value = _prefix_tree(rng, length, modulus)
        row = _row(f"Compute {' '.join(tokens)} mod {modulus}.", value, f"Answer: {value}")
        rows.append({**row, "length": length})
    return rows


def to_dataset(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> Dataset:
    """A `datasets.Dataset` of the rows, optionally keeping only `columns` (e.g. ["messages"] for SFT,
    ["prompt", "ground_truth"] for GRPO)."""
    keep = list(columns) if columns is not None else list(rows[0]) if rows else []
    return Dataset.from_dict({column: [row[column] for row in rows] for column in keep})


__all__ = ["arithmetic_traces", "modular_expressions", "to_dataset"]
